"""experiments/collect_tamiyo_runs.py --policy-only: the committed checkpoint is the run's policy
without its Adam state, and still loads, checked, with weights_only."""

import json
import subprocess
import sys

import pandas as pd
import torch

from esper_gym.agents.tamiyo import TamiyoPolicy, load_checkpoint, save_checkpoint
from esper_gym.env import MorphogeneticEnv
from tests.conftest import SMALL
from tests.scripts import EXPERIMENTS


def test_policy_only_drops_the_optimizer_and_keeps_the_policy(tmp_path, kernel_dir):
    env = MorphogeneticEnv(kernel_dir=kernel_dir, **SMALL)
    torch.manual_seed(0)
    policy = TamiyoPolicy.for_space(env.observation_space)
    optimizer = torch.optim.Adam(policy.parameters())
    for p in policy.parameters():  # an Adam state for every parameter, as a trained run has
        p.grad = torch.ones_like(p)
    optimizer.step()
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", policy, optimizer, 1024, {}, {"task": "spirals",
                    "blueprints": list(env.task.blueprints)})  # fmt: skip
    (run / "run.json").write_text(json.dumps({"seed": 4}))
    pd.DataFrame({"global_step": [1024], "charts/episodic_return": [1.0]}).to_csv(
        run / "train_metrics.csv", index=False
    )
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "collect_tamiyo_runs.py"), str(run),
         "--checkpoints", str(out / "ckpt"), "--out", str(out), "--policy-only"],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    target = out / "ckpt" / "tamiyo_seed4.pt"
    assert target.stat().st_size < (run / "checkpoint.pt").stat().st_size / 2
    before, after = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(target)
    assert before.optimizer_state is not None and after.optimizer_state is None
    assert after.global_step == 1024 and after.env == before.env
    for key, value in before.policy.state_dict().items():
        assert torch.equal(value, after.policy.state_dict()[key])
