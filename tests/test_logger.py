"""esper_gym.logger: W&B's own mode settings are honoured; offline only when none is set."""

import pytest

from esper_gym.logger import make_logger, resolve_mode


@pytest.fixture
def no_wandb_settings(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_offline_only_when_the_user_set_nothing(no_wandb_settings):
    assert resolve_mode() == ("offline", "default")
    assert resolve_mode("online") == ("online", "logger.mode")


@pytest.mark.parametrize(
    ("var", "value", "mode"),
    [("WANDB_MODE", "disabled", "disabled"), ("WANDB_MODE", "online", "online"),
     ("WANDB_MODE", "dryrun", "offline"), ("WANDB_DISABLED", "true", "disabled")],
)  # fmt: skip
def test_wandb_environment_variables_win_over_the_default(no_wandb_settings, monkeypatch, var, value, mode):  # fmt: skip
    monkeypatch.setenv(var, value)
    assert resolve_mode() == (mode, var)
    assert resolve_mode("offline") == ("offline", "logger.mode")  # an explicit choice wins


def test_wandb_settings_files_are_read_like_wandb_offline_writes_them(no_wandb_settings):
    tmp = no_wandb_settings
    (tmp / "config").mkdir()
    (tmp / "config" / "settings").write_text("[default]\nmode = disabled\n")
    assert resolve_mode() == ("disabled", str(tmp / "config" / "settings"))
    (tmp / "wandb").mkdir()
    (tmp / "wandb" / "settings").write_text("[default]\nmode = online\n")  # the folder's wins
    assert resolve_mode()[0] == "online"
    (tmp / "wandb" / "settings").write_text("not an ini file")
    assert resolve_mode()[0] == "disabled"


def test_a_bad_mode_is_one_clear_error(no_wandb_settings, monkeypatch):
    with pytest.raises(ValueError, match="logger mode='offlne'; allowed: offline, online"):
        resolve_mode("offlne")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'; allowed"):
        resolve_mode()


def test_wandb_mode_disabled_writes_no_run(no_wandb_settings, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = make_logger("wandb", progress=False).init({"a": 1}, dir=str(no_wandb_settings / "w"))
    logger.log({"x": 1.0}, step=1)
    logger.finish()
    assert logger.mode == "disabled" and logger.mode_source == "WANDB_MODE"
    assert not list((no_wandb_settings / "w").glob("wandb/offline-run-*"))
