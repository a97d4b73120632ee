"""esper_gym.numerics and validate's use of it: records say what their CPU floats depend on; a
record from other numerics that does not reproduce is "not comparable", one from the same
numerics is refused; a portable record replays bit for bit whatever the machine knobs say."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from esper_gym import numerics, validate
from esper_gym.validate import ReplayError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _noop_episode(**changes) -> dict:
    """The registered spirals task, 80 WAITs from seed 0: 0.3 s of training."""
    return {
        "agent": "noop",
        "task": "spirals",
        "env_id": "Esper/Spirals-v0",
        "env_kwargs": {},
        "context_index": -1,
        "seed": 0,
        "actions": [0] * 80,
        "return": 1.0,
        "test_acc": 0.5,
        "threads": 1,
        **changes,
    }


def _write(path: pathlib.Path, *episodes: dict, version: int = validate.VERSION) -> str:
    path.write_text(
        json.dumps({"format": validate.FORMAT, "version": version, "episodes": episodes})
    )
    return str(path)


@pytest.fixture(scope="module")
def played(kernel_dir) -> dict:
    """`_noop_episode` as this process plays it (one thread), with its numbers and numerics."""
    import gymnasium as gym

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = gym.make("Esper/Spirals-v0", disable_env_checker=True, kernel_dir=kernel_dir)
        env.reset(seed=0)
        total, info = 0.0, {}
        for _ in range(80):
            _, reward, _, _, info = env.step(0)
            total += reward
        here = numerics.current()
    finally:
        torch.set_num_threads(threads)
    return _noop_episode(**{"return": total, "test_acc": info["test_acc"], "numerics": here})


def test_current_says_what_the_numbers_depend_on():
    now = numerics.current()
    assert set(now) == {"mode", "torch", "capability", "arch", "cpu", "threads"}
    assert now["torch"] == torch.__version__
    assert now["capability"] == torch.backends.cpu.get_cpu_capability()
    assert now["threads"] == torch.get_num_threads()
    assert isinstance(now["cpu"], str) and 0 < len(now["cpu"]) <= numerics.MAX_TEXT
    # This process was not started under PORTABLE_ENV (nor with oneDNN off): native.
    assert now["mode"] == ("portable" if numerics.env_is_portable() else "native")
    assert not numerics.env_is_portable({}) and numerics.env_is_portable(numerics.PORTABLE_ENV)
    assert not numerics.env_is_portable({**numerics.PORTABLE_ENV, "MKL_CBWR": "AVX2"})
    with pytest.raises(ValueError, match="numerics mode 'fast'"):
        numerics.ensure("fast")


def test_a_format_1_record_that_does_not_reproduce_is_not_comparable(
    played, tmp_path, kernel_dir, capsys
):
    old = {k: v for k, v in played.items() if k != "numerics"}
    old["return"] = math.nextafter(played["return"], 99)  # as another CPU would have it
    path = _write(tmp_path / "v1.json", old, version=1)
    report = validate.check(path, kernel_dir)
    assert (report.reproduced, report.not_comparable, report.refused) == (0, 1, 0)
    assert report.ok and "unknown numerics (replay format 1)" in report.lines[0]
    assert report.lines[0].startswith("not comparable: episode 0 (noop, spirals, seed 0)")
    assert validate.main([path, "--kernel-dir", kernel_dir, "-q"]) == 0
    assert "1 not comparable" in capsys.readouterr().out
    assert validate.main([path, "--kernel-dir", kernel_dir, "-q", "--strict"]) == 1
    # The same record stating this machine's numerics must reproduce: refused.
    same = _write(tmp_path / "v2.json", {**old, "numerics": played["numerics"]})
    report = validate.check(same, kernel_dir)
    assert (report.not_comparable, report.refused) == (0, 1), report.lines
    assert report.lines[0].startswith("REFUSED: episode 0") and "field 'return'" in report.lines[0]


def test_another_cpus_native_record_is_not_comparable_but_a_portable_one_is_checked(
    played, tmp_path, kernel_dir
):
    here = played["numerics"]
    other = {**here, "capability": "AVX2" if here["capability"] != "AVX2" else "AVX512"}
    wrong = math.nextafter(played["return"], -99)
    ok, off = played, {**played, "return": wrong, "numerics": other}
    report = validate.check(_write(tmp_path / "r.json", ok, off), kernel_dir)
    assert (report.reproduced, report.not_comparable, report.refused) == (1, 1, 0)
    assert "recorded with native numerics (torch" in report.lines[1]
    assert f"{other['capability']}" in report.lines[1] and here["capability"] in report.lines[1]
    # Portable numbers do not depend on the CPU: another CPU's portable record must reproduce
    # in a portable process (the rule; the replay in such a process is the subprocess test).
    portable = {**here, "mode": "portable", "capability": "DEFAULT", "cpu": "another CPU"}
    assert numerics.incomparable(portable, {**portable, "cpu": here["cpu"]}) is None
    assert "torch 2.0" in numerics.incomparable({**portable, "torch": "2.0"}, portable)
    assert numerics.incomparable({**portable, "threads": 2}, portable) is not None
    assert numerics.incomparable(portable, here) is not None  # a native process: other mode
    assert "aarch64" in numerics.incomparable({**portable, "arch": "aarch64"}, portable)


@pytest.mark.parametrize(
    ("numerics_field", "message"),
    [
        ("portable", "'numerics' = 'portable' must be null or an object"),
        ({"mode": "portable"}, r"'numerics' = \['mode'\] must be null or an object with exactly"),
        ("mode=fast", "'numerics.mode' = 'fast' allowed: native, portable"),
        ("torch=", "'numerics.torch' = '' must be a printable string"),
        ("torch=" + "9" * 65, "'numerics.torch' = .* must be a printable string of 1..64"),
        ("cpu=\x1b[2J", "'numerics.cpu' = .* must be a printable string of 1..128"),
        ("capability=7", "'numerics.capability' = 7 must be a printable string"),
        ("threads=0", r"'numerics.threads' = 0 must be an integer in \[1, 1024\]"),
        ("threads=True", r"'numerics.threads' = True must be an integer"),
        ("extra=1", "'numerics' = .* with exactly the fields"),
    ],
)
def test_the_numerics_field_is_type_checked(tmp_path, numerics_field, message):
    value = numerics_field
    if isinstance(value, str) and "=" in value:
        key, raw = value.split("=", 1)
        parsed = {"7": 7, "0": 0, "True": True, "1": 1}.get(raw, raw)
        value = {**numerics.current(), key: parsed}
    path = _write(tmp_path / "r.json", _noop_episode(numerics=value))
    with pytest.raises(ReplayError, match="episode 0 .*field " + message):
        validate.load(path)


def test_format_1_is_read_without_numerics_and_format_2_needs_them(tmp_path):
    (ep,) = validate.load(_write(tmp_path / "v1.json", _noop_episode(), version=1))
    assert ep["numerics"] is None
    with pytest.raises(ReplayError, match=r"missing fields \['numerics'\]"):
        validate.load(_write(tmp_path / "v2.json", _noop_episode()))
    for version in (3, "2", True):
        with pytest.raises(ReplayError, match="this reader knows"):
            validate.load(_write(tmp_path / "v.json", _noop_episode(), version=version))


_RECORD = """
import json, sys
from esper_gym import numerics, validate
from esper_gym.bench import jobs
assert numerics.env_is_portable()
job = jobs.Job("noop", jobs.resolve_tasks(["spirals"])[0], seed=3, kernel_dir=sys.argv[2])
ep = jobs.run_job(job)["replay"]
assert ep["numerics"]["mode"] == "portable", ep["numerics"]
tampered = {**ep, "test_acc": ep["test_acc"] + 2**-20}
validate.write(sys.argv[1], [ep, tampered])
"""


def test_a_portable_record_replays_bit_for_bit_with_other_machine_knobs(tmp_path, kernel_dir):
    # Recorded in the portable mode with AVX-512 knobs, replayed by the command started natively
    # with AVX2 knobs (it re-executes itself into the portable mode, the knobs still set): the
    # same bits. Natively, ATen's capability and MKL's branch change the numbers of an episode
    # (experiments/bench_numerics.py has the table).
    path = tmp_path / "replays.json"
    avx512 = {"MKL_ENABLE_INSTRUCTIONS": "AVX512", "ATEN_CPU_CAPABILITY": "avx512"}
    avx2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    native = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV}
    record_env = {**native, **avx512, **numerics.PORTABLE_ENV}
    cmd = [sys.executable, "-c", _RECORD, str(path), kernel_dir]
    done = subprocess.run(cmd, env=record_env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = [sys.executable, "-m", "esper_gym.validate", str(path), "--kernel-dir", kernel_dir]
    done = subprocess.run(cmd, env={**native, **avx2}, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ok episode 0 (noop, spirals, seed 3)" in done.stdout, done.stdout + done.stderr
    assert "REFUSED: episode 1 (noop, spirals, seed 3): field 'test_acc'" in done.stderr
    assert "1 episode(s) refused, 1 reproduced, 0 not comparable" in done.stderr


def test_a_kernel_compiled_natively_never_serves_a_portable_run(monkeypatch):
    """A template's initial weights come from ATen's random kernels, which draw other floats on
    another CPU capability: the recipe key carries the numerics, so a store filled by native
    runs compiles anew for a portable one (a shared store once made portable records that
    did not replay)."""
    from esper_gym.kernels import BLUEPRINTS, recipe_key

    for key in numerics.PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    native = recipe_key(BLUEPRINTS["residual_mlp"](), (16,))
    assert numerics.tag().startswith("native-")
    for key, value in numerics.PORTABLE_ENV.items():
        monkeypatch.setenv(key, value)
    assert numerics.tag() == "portable"
    assert recipe_key(BLUEPRINTS["residual_mlp"](), (16,)) != native
