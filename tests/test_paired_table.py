"""experiments/paired_table.py: merging a train run's evaluation only when it played the same
episodes, and pairs only where both agents played."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from esper_gym.bench import paired as paired_table


def _episodes():
    rows = []
    for task, base in (("spirals", 4.0), ("fashion_mnist", 7.0)):
        for seed in range(5):
            for agent, delta in (("schedule", 0.0), ("tamiyo0", 0.1), ("noop", -1.0)):
                rows.append({"agent": agent, "task": task, "seed": seed,
                             "return": base + delta + 0.01 * seed, "test_acc": 0.8,
                             "params_added": 100})  # fmt: skip
    return pd.DataFrame(rows)


def _train_results(tmp_path, schedule_shift=0.0):
    eps = lambda agent, delta: [  # noqa: E731
        {"seed": s, "return": 4.0 + delta + 0.01 * s, "test_acc": 0.7, "params_added": 50}
        for s in range(5)
    ]
    results = {"task": "spirals", "eval": {
        "maskable_ppo": {"episodes": eps("maskable_ppo", -0.5)},
        "schedule": {"episodes": eps("schedule", schedule_shift)},
    }}  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path


def test_merge_pairs_a_train_run_playing_the_same_episodes(tmp_path):
    path = _train_results(tmp_path)
    merged = paired_table.merge(_episodes(), paired_table.train_episodes(path), path)
    assert set(merged["agent"]) == {"schedule", "tamiyo0", "noop", "maskable_ppo"}
    assert len(merged[merged["agent"] == "schedule"]) == 10  # not duplicated
    table = paired_table.paired_table(merged, ["maskable_ppo", "tamiyo0"], ["schedule"], ["return"])
    # maskable_ppo played spirals only: no fashion_mnist pair, and no NaN row for it
    assert set(zip(table["task"], table["agent"])) == {
        ("spirals", "maskable_ppo"),
        ("spirals", "tamiyo0"),
        ("fashion_mnist", "tamiyo0"),
    }
    row = table[table["agent"] == "maskable_ppo"].iloc[0]
    assert row["diff"] == pytest.approx(-0.5) and row["n"] == 5
    assert "–" in paired_table.markdown(table, "return")


def test_merge_refuses_other_episodes(tmp_path):
    path = _train_results(tmp_path, schedule_shift=0.2)  # other seeds or contexts
    with pytest.raises(SystemExit, match=r"schedule on spirals seed 0.*not the same episodes"):
        paired_table.merge(_episodes(), paired_table.train_episodes(path), path)


def test_a_pool_joins_its_members_pairs():
    """Two checkpoints pooled: one pair per (member, seed), the mean of both members' diffs,
    and the pool's mean score; an agent outside the pool is not counted."""
    eps = _episodes()
    twin = eps[eps["agent"] == "tamiyo0"].assign(agent="tamiyo1")
    twin["return"] += 0.2  # tamiyo1 is 0.3 above the schedule, tamiyo0 0.1
    eps = pd.concat([eps, twin], ignore_index=True)
    table = paired_table.pooled_table(
        eps, {"tamiyo": ["tamiyo0", "tamiyo1"]}, ["schedule"], ["return"]
    )
    row = table[table["task"] == "spirals"].iloc[0]
    assert row["n"] == 10 and row["members"] == "tamiyo0,tamiyo1"
    assert row["diff"] == pytest.approx(0.2) and row["lo"] <= 0.2 <= row["hi"]
    assert row["return_mean"] == pytest.approx(4.0 + 0.2 + 0.02)


def test_by_context_resamples_whole_contexts():
    """Two contexts, one where the agent gains 1 and one where it loses 0.5, 4 seeds each with
    tiny noise: per episode the CI is narrow; resampling contexts it spans both signs."""
    rows = []
    for seed in range(8):
        context = seed % 2
        gain = 1.0 if context == 0 else -0.5
        for agent, delta in (("schedule", 0.0), ("tamiyo0", gain + 0.001 * seed)):
            rows.append({"agent": agent, "task": "spirals_pace", "seed": seed,
                         "context_index": context, "return": 3.0 + delta})  # fmt: skip
    episodes = pd.DataFrame(rows)
    seeds = paired_table.paired_table(episodes, ["tamiyo0"], ["schedule"], ["return"])
    contexts = paired_table.paired_table(
        episodes, ["tamiyo0"], ["schedule"], ["return"], by_context=True
    )
    assert seeds["diff"][0] == pytest.approx(contexts["diff"][0])  # the same mean
    assert seeds["lo"][0] > -0.5 and seeds["hi"][0] < 1.0  # episodes: within the two
    assert contexts["lo"][0] == pytest.approx(-0.5, abs=0.01)  # both contexts the losing one
    assert contexts["hi"][0] == pytest.approx(1.0, abs=0.01)


def test_also_adds_another_evaluations_agents_but_not_another_checkpoint_under_a_name(capsys):
    """`--also`: the oracle of a main evaluation joins a later one on the same episodes; a
    tamiyo0 that is another checkpoint there is left out (and said), not paired as the same."""
    later = _episodes().assign(checkpoint=lambda d: d["agent"].map({"tamiyo0": "new.pt"}))
    main = _episodes().assign(checkpoint=lambda d: d["agent"].map({"tamiyo0": "old.pt"}))
    main["return"] += main["agent"].map({"tamiyo0": 0.3}).fillna(0.0)  # the old one differs
    oracle = main[main["agent"] == "schedule"].assign(agent="oracle")
    oracle["return"] += 0.4
    main = pd.concat([main, oracle], ignore_index=True)
    merged = paired_table.merge(later, paired_table.other_players(later, main), "main")
    assert "tamiyo0" in capsys.readouterr().out
    assert set(merged["agent"]) == {"schedule", "tamiyo0", "noop", "oracle"}
    assert (merged[merged["agent"] == "tamiyo0"]["checkpoint"] == "new.pt").all()
    from esper_gym.bench.oracle import oracle_gap_share

    shares = oracle_gap_share(merged).set_index(["task", "agent"])["oracle_gap_share"]
    assert shares["spirals", "tamiyo0"] == pytest.approx(0.1 / 0.4)  # +0.1 of the oracle's +0.4
    # Per context: the same paired mean, and each one's most frequent plan.
    one_seed_each = merged.assign(plan="8:0:residual_mlp", context_index=merged["seed"])
    rows = paired_table.per_context(one_seed_each, ["tamiyo0"], ["oracle"])
    assert len(rows) == 10 and rows["diff"].round(9).eq(round(0.1 - 0.4, 9)).all()
    assert set(rows["agent_plan"]) == {"8:0:residual_mlp"} and (rows["n"] == 1).all()
    # An older episodes file without a checkpoint column: its tamiyo0 names no checkpoint, so
    # it is not the new.pt one (left out); the baselines merge.
    older = paired_table.other_players(later, main.drop(columns="checkpoint"))
    assert set(older["agent"]) == {"schedule", "noop", "oracle"}
    main.loc[main["agent"] == "schedule", "return"] += 0.2  # not the same episodes: refused
    with pytest.raises(SystemExit, match="not the same episodes"):
        paired_table.merge(later, paired_table.other_players(later, main), "main")
