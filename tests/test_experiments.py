"""Every experiment script still imports: a module that moved must not leave a script behind."""

import pathlib
import runpy

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_imports(script, monkeypatch):
    # As `python experiments/<script>.py` runs it: its folder first on sys.path (report.py).
    monkeypatch.syspath_prepend(str(script.parent))
    namespace = runpy.run_path(str(script), run_name="imported_by_a_test")  # no main() run
    assert callable(namespace.get("main")) or namespace.get("__doc__")
