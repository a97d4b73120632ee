"""experiments/gate_branches.py: what a gated checkpoint decides at its gate's branch points."""

import pytest
import torch

from esper_gym.agents.gate import ScheduleGate
from esper_gym.agents.tamiyo import TamiyoPolicy, env_record, save_checkpoint
from esper_gym.env import MorphogeneticEnv
from tests.scripts import load_experiment

TINY = {"dataset_kwargs": {"n_train": 1024, "n_val": 256, "n_test": 256}, "eval_size": 256}


@pytest.fixture(scope="module")
def gate_branches():
    return load_experiment("gate_branches")


def test_branch_points_are_the_plan_familys_and_ungated_checkpoints_are_refused(
    gate_branches, tmp_path, kernel_dir
):
    env = ScheduleGate(
        MorphogeneticEnv(task="spirals_pace", contexts="train", kernel_dir=kernel_dir, **TINY),
        "plans",
    )
    torch.manual_seed(0)
    policy = TamiyoPolicy.for_space(env.observation_space)
    path = tmp_path / "gated.pt"
    save_checkpoint(path, policy, None, 0, None, env_record(env))
    probs, grown, gate, sized = gate_branches["branches"](
        str(path), 2, contexts=1, kernel_dir=kernel_dir, **TINY
    )
    assert gate == "plans" and sum(grown.values()) == 2
    # At 0 the family's one germination opens its one- and three-seed plans alike.
    assert {size for progress, size in sized if progress == 0.0} == {"1/3"}
    assert sized[0.0, "1/3"] == probs["first", 0.0]
    # The family grows first at progress 0, 0.25 or 0.5 (conf/schedule_plans.yaml): an
    # untrained policy is offered the first germination at 0 in both episodes.
    assert len(probs["first", 0.0]) == 2
    assert {p for kind, p in probs if kind == "first"} <= {0.0, 0.25, 0.5}
    assert all(0 < p < 1 for ps in probs.values() for p in ps)
    counts = ScheduleGate(env.unwrapped, "counts")
    path = tmp_path / "counts.pt"
    save_checkpoint(path, policy, None, 0, None, env_record(counts))
    _, _, gate, sized = gate_branches["branches"](
        str(path), 1, contexts=1, kernel_dir=kernel_dir, **TINY
    )
    assert gate == "counts"  # behind counts each germination names its plan's size
    assert {size for progress, size in sized if progress == 0.0} == {"1", "3"}
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, policy, None, 0, None, env_record(env.unwrapped))
    with pytest.raises(SystemExit, match="not a gated checkpoint"):
        gate_branches["branches"](str(plain), 1, contexts=1)
