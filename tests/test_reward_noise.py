"""experiments/reward_noise.py: the plan variants and the noise decomposition it reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esper_gym.agents.baselines import Germination
from esper_gym.bench import noise as reward_noise


def test_variants_change_one_decision_of_the_plan():
    plan = (Germination(0.0, "residual_mlp", "next"), Germination(0.2, "low_rank", "next"))
    out = reward_noise.variants(plan)
    assert out["schedule"] == plan
    assert out["drop last"] == plan[:1]
    assert out["last +0.2"] == (plan[0], Germination(0.4, "low_rank", "next"))
    assert "one more" not in out
    single = reward_noise.variants(plan[:1])
    assert single["one more"] == (plan[0], Germination(0.2, "residual_mlp", "next"))
    assert single["drop last"] == ()


def test_summary_separates_seed_context_and_decision_noise():
    """Returns = context level (sd 2) + seed level (sd 0.5, shared by both plans of a seed)
    + the decision's effect 0.1 + per-episode noise (sd 0.05): the paired spread is the
    episode noise alone, the same-context spread adds the seed level, the unpaired one the
    context level too."""
    rng = np.random.default_rng(0)
    contexts, seeds = 8, 6
    rows = []
    for c in range(contexts):
        level = rng.normal(0, 2.0)
        for s in range(seeds):
            seed = c * seeds + s
            seed_level = rng.normal(0, 0.5)
            for variant, effect in (("schedule", 0.0), ("drop last", 0.1)):
                ret = level + seed_level + effect + rng.normal(0, 0.05)
                rewards = [ret / 4] * 4
                rows.append(
                    {"setting": "own split", "variant": variant, "seed": seed, "context": c,
                     "return": ret, "test_acc": 80 + 10 * effect, "rewards": rewards}
                )  # fmt: skip
    summary = reward_noise.summarize(pd.DataFrame(rows))
    (row,) = summary.itertuples()
    assert row.effect == pytest.approx(0.1, abs=0.03)
    assert row.effect_lo < 0.1 < row.effect_hi
    assert row.sd_paired == pytest.approx(np.sqrt(2) * 0.05, rel=0.3)
    assert row.sd_same_context == pytest.approx(np.sqrt(2 * (0.5**2 + 0.05**2)), rel=0.3)
    assert row.sd_unpaired > 2 * row.sd_same_context
    assert row.seeds_paired < row.seeds_same_context < row.seeds_unpaired
    assert row.test_acc_effect == pytest.approx(1.0)
    # test accuracy always rises: agreement is the share of seeds whose return rose too
    ret = {(r["variant"], r["seed"]): r["return"] for r in rows}
    rose = [ret["drop last", s] > ret["schedule", s] for s in range(contexts * seeds)]
    assert row.agree == pytest.approx(np.mean(rose)) and 0.5 < row.agree < 1
    assert row.same_context_pairs == contexts * seeds * (seeds - 1)
    assert "drop last" in reward_noise.render(summary)
