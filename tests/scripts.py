"""Load an experiment script as `python experiments/<name>.py` imports it, without running main."""

import pathlib
import runpy
import sys

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str) -> dict:
    """The namespace of experiments/<name>.py: its folder is on sys.path while it imports (the
    scripts share experiments/report.py), and its `if __name__ == "__main__"` block is skipped."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return runpy.run_path(str(EXPERIMENTS / f"{name}.py"), run_name="imported_by_a_test")
    finally:
        sys.path.remove(str(EXPERIMENTS))
