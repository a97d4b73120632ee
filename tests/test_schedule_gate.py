"""experiments/schedule_gate.py trains and scores Tamiyo behind the package's schedule gate
(esper_gym.agents.gate, tested in tests/test_gate.py) on the task it is given."""

import pytest

from esper_gym.agents.gate import ScheduleGate
from tests.scripts import load_experiment


@pytest.fixture(scope="module")
def gate_module():
    return load_experiment("schedule_gate")


def test_the_script_plays_behind_the_package_gate(gate_module, tmp_path):
    make = gate_module["make_env"]
    env = make("spirals_pace", "train", False, str(tmp_path / "kernels"), declined="drop")
    assert isinstance(env, ScheduleGate) and env.declined == "drop"
    assert env.unwrapped.task.name == "spirals_pace"
    plain = make("spirals_budget", "test", True, str(tmp_path / "kernels"), gate=False)
    assert not isinstance(plain, ScheduleGate) and plain.show_context
