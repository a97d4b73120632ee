"""Run logging: Weights & Biases (offline by default) plus a terminal progress bar.

`make_logger("wandb", ...)` gives a `RunLogger`, `make_logger("none")` a `NullLogger`; both have
the same methods, so callers never check which one they hold:

| method                          | what it does                                                    |
|---------------------------------|-----------------------------------------------------------------|
| `init(config, project, ...)`    | start the run (grouped by `group`), log the resolved `config`   |
| `log(metrics, step)`            | training curves (the learners' `log` callback has this shape)  |
| `log_episode(episode, prefix)`  | one finished episode's metrics under `prefix/` (own x-axis)    |
| `summary(metrics)`              | final numbers (means over evaluation episodes, ...)            |
| `progress(total, desc)`         | a tqdm bar that `log(.., step)` and `log_episode` advance       |
| `finish()`                      | close the bar and the run                                       |

The mode is W&B's own where the user set one: `logger.mode=` when given, else `WANDB_MODE`
(or `WANDB_DISABLED=true`), else what `wandb offline` / `wandb online` / `wandb disabled` wrote
to W&B's settings file (`./wandb/settings`, then `$WANDB_CONFIG_DIR/settings`). Only when the
user set nothing is it offline, which needs no account and no network: the run is written to
`<dir>/wandb/offline-run-*/run-<id>.wandb` and `wandb sync <that dir>` uploads it later. No mode
ever prompts for a login: `online` without credentials (WANDB_API_KEY, `wandb login`) fails at
`init` with a message saying so. Nothing here imports hydra or omegaconf: configs arrive as plain
dicts.
"""

from __future__ import annotations

import configparser
import csv
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

MODES = ("offline", "online", "disabled")
# W&B's older spellings of the same modes (WANDB_MODE=dryrun / run still work in wandb).
_ALIASES = {"dryrun": "offline", "run": "online"}


def resolve_mode(mode: str | None = None) -> tuple[str, str]:
    """The W&B mode to run in and where it came from (see the module docstring)."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"logger mode={mode!r}; allowed: {', '.join(MODES)}")
        return mode, "logger.mode"
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled", "WANDB_DISABLED"
    env = os.environ.get("WANDB_MODE")
    if env:
        env = _ALIASES.get(env, env)
        if env not in MODES:
            raise ValueError(f"WANDB_MODE={env!r}; allowed: {', '.join(MODES)}")
        return env, "WANDB_MODE"
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or pathlib.Path.home() / ".config" / "wandb"
    for settings in (pathlib.Path("wandb") / "settings", pathlib.Path(config_dir) / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
        except configparser.Error:
            continue  # a settings file wandb itself cannot read is not a choice the user made
        value = parser.get("default", "mode", fallback="")
        value = _ALIASES.get(value, value)
        if value in MODES:
            return value, str(settings)
    return "offline", "default"


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CsvMetrics:
    """A learner's `log(metrics, step)` callback that keeps the scalar metrics as a CSV, one row
    per call (`global_step`, `wall_s`, then the metrics): the learning curve without W&B.

    The file is rewritten whole at every call, so that a killed run keeps its curve. With
    `resume=True` a file that exists already is continued (a resumed run appends to its
    curve); otherwise it is replaced at the first call (a new run in a reused run dir must not
    carry the curve of the run before it)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = pathlib.Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        self.start = time.perf_counter()

    def __call__(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {"global_step": step, "wall_s": round(time.perf_counter() - self.start, 3)}
        row |= {k: v for k, v in metrics.items() if _scalar(v)}
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(self.rows)


class NullLogger:
    """`logger=none`: the RunLogger interface, doing nothing but the progress bar."""

    run_id: str | None = None
    run_dir: str | None = None

    def __init__(self, progress: bool = True) -> None:
        self.show_progress = progress
        self._bar = None

    def init(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> NullLogger:
        return self

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._advance(metrics, step)

    def log_episode(self, episode: Mapping[str, Any], prefix: str = "eval") -> None:
        if self._bar is not None:
            self._bar.update(1)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def progress(self, total: int | None, desc: str = "") -> None:
        """Start a bar of `total` steps (None: close the current one).

        Shown only on a terminal (tqdm's `disable=None`) and when `progress` was asked for, so
        tests and batch jobs print nothing."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if total is not None and self.show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, disable=None, file=sys.stderr, leave=False)

    def _advance(self, metrics: Mapping[str, Any], step: int | None) -> None:
        bar = self._bar
        if bar is None or step is None:
            return
        shown = {
            k.split("/")[-1]: f"{v:.3g}"
            for k, v in metrics.items()
            if k in ("charts/episodic_return", "losses/entropy", "rollout/ep_rew_mean")
            and _scalar(v)
        }
        if shown:
            bar.set_postfix(shown, refresh=False)  # drawn by the update below
        bar.update(max(0, step - bar.n))

    def finish(self) -> None:
        self.progress(None)


class RunLogger(NullLogger):
    """A W&B run. `init` must come first; `finish` closes it (also safe if init never ran)."""

    def __init__(self, progress: bool = True) -> None:
        super().__init__(progress)
        self.run = None
        self._episodes: dict[str, int] = {}

    def init(
        self,
        config: Mapping[str, Any] | None = None,
        project: str = "esper-gym",
        group: str | None = None,
        name: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike | None = None,
        entity: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        run_id: str | None = None,
    ) -> RunLogger:
        """Start the run. `run_id` of an earlier run continues it (`resume="allow"`): offline,
        the second part is its own directory and `wandb sync` joins them under one id.
        `mode` None: W&B's own setting, offline if the user set none (`resolve_mode`)."""
        mode, self.mode_source = resolve_mode(mode)
        self.mode = mode
        # Set before wandb is imported: it reads them at import and at init. SILENT keeps its
        # banner out of test output; the mode is also the environment's so that nothing wandb
        # starts on its own (a login check, a service) goes online when offline was resolved.
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_MODE"] = mode
        import wandb

        if mode == "online" and not wandb.login(prompt=False, verify=False):
            raise RuntimeError(
                "logger.mode=online needs W&B credentials (WANDB_API_KEY or `wandb login`); "
                "use logger.mode=offline to log locally and `wandb sync` later"
            )
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            mode=mode,
            dir=os.fspath(dir) if dir is not None else None,
            config=dict(config or {}),
            tags=list(tags),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",  # a -m sweep runs several jobs in one process
        )
        self.run_id = self.run.id
        # files/ is the run's file dir; its parent is the offline-run-* directory.
        self.run_dir = os.path.dirname(self.run.dir)
        return self

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._advance(metrics, step)
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_episode(self, episode: Mapping[str, Any], prefix: str = "eval") -> None:
        """Log one episode's scalars as `prefix/<key>` against their own axis `prefix/episode`
        (0, 1, ...), so evaluation episodes need no place on the training step axis."""
        super().log_episode(episode, prefix)
        if self.run is None:
            return
        n = self._episodes.get(prefix, 0)
        if n == 0:
            self.run.define_metric(f"{prefix}/episode")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/episode")
        self._episodes[prefix] = n + 1
        row = {
            f"{prefix}/{k}": _loggable(v) for k, v in episode.items() if _loggable(v) is not None
        }
        row[f"{prefix}/episode"] = n
        # A row of its own: logged without a step it would join the pending training row.
        self.run.log(row, step=self.run.step + 1)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                if _loggable(value) is not None:
                    self.run.summary[key] = _loggable(value)

    def finish(self) -> None:
        super().finish()
        if self.run is not None:
            self.run.finish()
            self.run = None


def _loggable(value: Any) -> Any:
    """Scalars as they are (NaN kept: W&B shows it), bools as 0/1, everything else dropped."""
    if isinstance(value, bool):
        return int(value)
    if _scalar(value):
        return value
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy / torch scalars
        return value.item()
    if isinstance(value, str):
        return value
    return None


def make_logger(kind: str = "wandb", progress: bool = True) -> NullLogger:
    """`"wandb"` -> RunLogger, `"none"` -> NullLogger (same interface)."""
    if kind == "wandb":
        return RunLogger(progress)
    if kind == "none":
        return NullLogger(progress)
    raise ValueError(f"logger kind={kind!r}; allowed: wandb, none")
