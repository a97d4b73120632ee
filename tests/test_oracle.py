"""The per-context oracle of esper_gym.evaluate, the value of reacting, and the privileged rows."""

import json

import numpy as np
import pandas as pd
import pytest

from esper_gym.bench import oracle as oracle_lib
from esper_gym.bench.jobs import resolve_tasks
from esper_gym.bench.jobs import task_env as make_env
from esper_gym.bench.oracle import OracleConfig, context_index, plan_family, value_of_reacting
from esper_gym.evaluate import EvalConfig, evaluate
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}
# Two plans: the empty plan (NoOp) and one residual seed in the first layer at step 0.
TWO_PLANS = {
    "counts": [1],
    "starts": [0.0],
    "gaps": [0.1],
    "blueprints": ["residual_mlp"],
    "layers": ["first"],
}
FIRST_SEED = 11


@pytest.fixture(scope="module")
def run(tmp_path_factory, kernel_dir):
    """schedule, lookahead and noop on small spirals test contexts, 2 seeds, 2 workers, and
    the oracle with a 2-plan family chosen on one selection seed."""
    out = tmp_path_factory.mktemp("oracle")
    result = evaluate(
        EvalConfig(
            ["schedule", "lookahead", "noop"],
            resolve_tasks(["spirals"], overrides={"spirals": TASK}),
            seeds=2,
            out_dir=out,
            first_seed=FIRST_SEED,
            n_jobs=2,
            kernel_dir=kernel_dir,
            contexts="test",
            reps=500,
            make_plots=False,
            progress=False,
            agent_kwargs={"lookahead": {"every": 1, "horizon": 2}},
            oracle={"selection_seeds": 1, "selection_first_seed": 500, "family": TWO_PLANS},
        )
    )
    return out, result


def test_oracle_row_chosen_on_seeds_it_is_not_scored_on(run):
    out, _ = run
    episodes = pd.read_csv(out / "episodes.csv")
    selection = pd.read_csv(out / "oracle_selection.csv")
    oracle = episodes[episodes["agent"] == "oracle"]
    scored = set(episodes["seed"])
    assert sorted(oracle["seed"]) == [FIRST_SEED, FIRST_SEED + 1] == sorted(scored)
    assert set(selection["seed"]) == {500} and not set(selection["seed"]) & scored
    # Every context a scored seed plays was searched: both plans, one chosen, the better one.
    assert set(selection["context_index"]) == set(oracle["context_index"])
    for _, g in selection.groupby("context_index"):
        assert sorted(g["plan_id"]) == [0, 1]
        assert g["plan"].tolist()[0] == "(none)" and g["chosen"].sum() == 1
        chosen = g[g["chosen"]].iloc[0]
        assert chosen["return"] == g["return"].max()
        if g["return"].nunique() == 1:  # ties go to the smaller plan
            assert chosen["plan_id"] == 0
    # The oracle played the chosen plan on the scored seed: the empty plan grows nothing.
    for row in oracle.to_dict("records"):
        chosen = selection[
            (selection["context_index"] == row["context_index"]) & selection["chosen"]
        ]
        grew = chosen["plan_id"].iloc[0] == 1
        assert (row["germinations"] > 0) == grew, row
        same = episodes[(episodes["seed"] == row["seed"]) & (episodes["agent"] == "noop")]
        if not grew:  # the empty plan is NoOp, step for step
            assert row["return"] == same["return"].iloc[0]


def test_value_of_reacting_is_the_paired_mean_difference(run):
    out, result = run
    episodes = pd.read_csv(out / "episodes.csv")
    summary = pd.read_csv(out / "summary.csv")
    by_seed = episodes.pivot(index="seed", columns="agent", values="return")
    by_hand = (by_seed["oracle"] - by_seed["schedule"]).mean()
    row = summary[summary["agent"] == "oracle"].iloc[0]
    assert row["value_of_reacting"] == pytest.approx(by_hand, abs=1e-12)
    assert row["value_of_reacting_lo"] <= row["value_of_reacting"] <= row["value_of_reacting_hi"]
    assert row["value_of_reacting_n"] == 2
    assert summary.loc[summary["agent"] != "oracle", "value_of_reacting"].isna().all()
    md = (out / "results.md").read_text()
    assert md == result.table and f"- spirals: {by_hand:+.3f} [" in md and "(2 plans x " in md
    saved = json.loads((out / "result.json").read_text())
    assert saved["oracle"]["selection_seeds"] == [500] and saved["oracle"]["plans"] == {
        "spirals": 2
    }


def test_privileged_rows_are_marked_and_never_the_reference(run):
    out, _ = run
    summary = pd.read_csv(out / "summary.csv")
    marked = dict(zip(summary["agent"], summary["privileged"]))
    assert marked == {"schedule": False, "lookahead": True, "noop": False, "oracle": True}
    assert set(summary["reference"]) <= {"schedule", "noop"}
    md = (out / "results.md").read_text()
    assert "| lookahead † |" in md or "| **lookahead †** |" in md
    assert "| oracle † |" in md or "| **oracle †** |" in md
    assert "† Privileged (lookahead, oracle)" in md


def test_lookahead_cost_is_in_the_rows_summary_and_table(run):
    out, _ = run
    episodes = pd.read_csv(out / "episodes.csv")
    look = episodes[episodes["agent"] == "lookahead"]
    # every=1, horizon=2: each step tries >= 2 candidates for <= 2 forked steps each.
    assert (look["cost_steps"] >= look["length"]).all() and (look["cost_s"] > 0).all()
    assert (episodes.loc[episodes["agent"] != "lookahead", "cost_steps"] == 0).all()
    summary = pd.read_csv(out / "summary.csv").set_index("agent")
    assert summary.at["lookahead", "cost_steps_iqm"] == pytest.approx(
        look["cost_steps"].mean()  # two episodes: the IQM is the mean
    )
    assert "- lookahead on spirals: " in (out / "results.md").read_text()


def test_context_index_is_the_context_reset_draws(kernel_dir):
    (task,) = resolve_tasks(["spirals"], overrides={"spirals": TASK})
    env = make_env(task, kernel_dir=kernel_dir, contexts="test")
    for seed in (0, 11, 12, 500, 1_000_000):
        _, info = env.reset(seed=seed)
        assert context_index(task.build(), "test", seed) == info["context"]["index"]
    assert context_index(task.build(), None, 3) == -1


def test_the_family_is_the_tuned_one_unless_replaced():
    assert len(OracleConfig().plans("spirals")) == 57
    assert len(OracleConfig().plans("fashion_mnist")) == 21
    two = OracleConfig(family=TWO_PLANS).plans("spirals")
    assert two == [(), ({"at": 0.0, "blueprint": "residual_mlp", "layer": "first"},)]
    # Unset fields keep the tuned family's: one germination, 2 starts x 2 blueprints x first/last.
    assert len(OracleConfig(family={"counts": [1]}).plans("spirals")) == 1 + 2 * 2 * 2
    assert plan_family([2], [0.5], [0.5], ["low_rank"], ["next"]) == [()]  # reaches progress 1


def test_bad_oracle_settings_are_refused_with_the_value():
    with pytest.raises(ValueError, match=r"selection seeds \[7\] are also scored seeds"):
        OracleConfig(selection_first_seed=6, selection_seeds=2).selection_seed_list([7, 8])
    with pytest.raises(ValueError, match=r"selection_seeds=0 must be an integer >= 1"):
        OracleConfig(selection_seeds=0)
    with pytest.raises(ValueError, match=r"oracle.family fields \['count'\]; allowed: counts"):
        OracleConfig(family={"count": [1]})
    with pytest.raises(ValueError, match=r"oracle fields \['seeds'\]"):
        OracleConfig.from_mapping({"seeds": 3})
    with pytest.raises(ValueError, match="no schedule family for task 'cifar10'"):
        OracleConfig().plans("cifar10")


def test_value_of_reacting_pairs_by_seed_and_pools_tasks():
    rows = []
    for task, diffs in (("a", [1.0, 3.0]), ("b", [-1.0, -1.0, 2.0])):
        for seed, d in enumerate(diffs):
            rows.append({"task": task, "agent": "schedule", "seed": seed, "return": 10.0 + seed})
            rows.append({"task": task, "agent": "oracle", "seed": seed, "return": 10.0 + seed + d})
    rows.append({"task": "a", "agent": "oracle", "seed": 9, "return": 99.0})  # no schedule pair
    out = value_of_reacting(pd.DataFrame(rows), reps=200).set_index("task")
    assert out.at["a", "value_of_reacting"] == pytest.approx(2.0)
    assert out.at["a", "value_of_reacting_n"] == 2
    assert out.at["b", "value_of_reacting"] == pytest.approx(0.0)
    assert out.at["all tasks", "value_of_reacting"] == pytest.approx(np.mean([1, 3, -1, -1, 2]))
    assert (out["value_of_reacting_lo"] <= out["value_of_reacting"]).all()
    assert (out["value_of_reacting"] <= out["value_of_reacting_hi"]).all()
    assert (out["agent"] == oracle_lib.ORACLE).all()


def test_oracle_gap_share_is_the_paired_share_of_the_gap():
    table = {  # seed: (schedule, oracle, agent, flat) returns on task "a"
        0: (1.0, 3.0, 2.0, 1.0),
        1: (2.0, 4.0, 4.0, 2.0),
    }
    rows = [
        {"task": "a", "agent": agent, "seed": seed, "return": values[i]}
        for seed, values in table.items()
        for i, agent in enumerate(("schedule", "oracle", "learner", "flat"))
    ]
    rows.append({"task": "a", "agent": "learner", "seed": 7, "return": 50.0})  # unpaired: ignored
    # Task "b": the oracle is not above the schedule, so there is no gap to recover.
    rows += [{"task": "b", "agent": a, "seed": 0, "return": 1.0} for a in ("schedule", "oracle")]
    rows.append({"task": "b", "agent": "learner", "seed": 0, "return": 2.0})
    out = oracle_lib.oracle_gap_share(pd.DataFrame(rows)).set_index(["task", "agent"])
    assert out.at[("a", "learner"), "oracle_gap_share"] == pytest.approx(0.75)  # 1.5 of 2
    assert out.at[("a", "flat"), "oracle_gap_share"] == pytest.approx(0.0)
    assert np.isnan(out.at[("b", "learner"), "oracle_gap_share"])
    assert ("a", "oracle") not in out.index and ("a", "schedule") not in out.index


def test_no_oracle_without_contexts(tmp_path, kernel_dir):
    result = evaluate(
        EvalConfig(
            ["noop"],
            resolve_tasks(["spirals"], overrides={"spirals": TASK}),
            seeds=1,
            out_dir=tmp_path,
            kernel_dir=kernel_dir,
            reps=50,
            make_plots=False,
            progress=False,
            oracle={"family": TWO_PLANS},
        )
    )
    assert list(result.episodes["agent"]) == ["noop"]
    assert not (tmp_path / "oracle_selection.csv").exists()


# --- references from a table of every plan on the scored episodes ------------------------------
def _toy():
    """returns[plans, contexts, seeds]: NoOp (plan 0), grow (plan 1), grow late (plan 2); the
    first context wants growth, the second does not, plan 2 is lucky on one episode."""
    return np.array(
        [
            [[1.0, 1.2, 0.8, 1.0], [2.0, 2.1, 1.9, 2.0]],  # NoOp
            [[2.0, 2.3, 1.9, 2.2], [1.0, 1.1, 0.9, 1.0]],  # grow
            [[1.5, 3.0, 1.4, 1.5], [1.5, 1.6, 1.4, 1.5]],  # grow late (lucky at (0, 1))
        ]
    )


def test_hindsight_is_above_the_oracle_which_is_above_the_best_fixed_plan():
    cube = _toy()
    refs = oracle_lib.references(cube, sizes=[0, 1, 1])
    assert refs["hindsight"] >= refs["oracle"] >= refs["best_fixed"]
    assert refs["oracle_plans"] == [1, 0]  # grow where it pays, wait where it does not
    assert refs["best_fixed"] == pytest.approx(cube[2].mean())  # the hedge is the best fixed plan
    assert refs["hindsight"] == pytest.approx(cube.max(axis=0).mean())
    rng = np.random.default_rng(0)
    for _ in range(20):  # an identity of maxima: on any table
        r = rng.normal(size=(5, 4, 3))
        refs = oracle_lib.references(r)
        assert refs["hindsight"] >= refs["oracle"] >= refs["best_fixed"]


def test_leave_one_seed_out_value_its_noise_and_the_hindsight_bound():
    cube = _toy()
    fixed, per_context = oracle_lib.loso_choices(cube, [0, 1, 1])
    assert (per_context[0] == 1).all() and (per_context[1] == 0).all()
    v = oracle_lib.loso_value_of_reacting(cube, [0, 1, 1], reps=500)
    c, s = np.indices(fixed.shape)
    diff = cube[per_context, c, s] - cube[fixed, c, s]
    assert v["value"] == pytest.approx(diff.mean()) and v["lo"] <= v["value"] <= v["hi"]
    assert v["sd"] == pytest.approx(diff.std(ddof=1)) and v["ratio"] == pytest.approx(
        v["value"] / v["sd"]
    )
    assert v["hindsight"] >= v["value"] > 0 and v["episodes"] == 8
    with pytest.raises(ValueError, match="2 seeds"):
        oracle_lib.loso_choices(cube[:, :, :1])
    # The long table <-> cube round trip, and a hole is refused (the comparison is paired).
    rows = [
        {"plan_id": p, "context": c, "seed": 10 + s, "return": cube[p, c, s]}
        for p, c, s in np.ndindex(cube.shape)
    ]
    back, _, _, seeds = oracle_lib.returns_cube(pd.DataFrame(rows))
    assert np.array_equal(back, cube) and seeds == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="not complete"):
        oracle_lib.returns_cube(pd.DataFrame(rows[1:]))


def test_hindsight_rows_pick_each_episodes_best_plan_and_noise_columns():
    plan_rows = pd.DataFrame(
        {"task": "t", "seed": [1, 1, 2, 2], "plan_id": [0, 1, 0, 1], "return": [1.0, 2.0, 3, 0]}
    )
    rows = oracle_lib.hindsight(plan_rows)
    assert list(rows["plan_id"]) == [1, 0] and set(rows["agent"]) == {oracle_lib.HINDSIGHT}
    episodes = pd.DataFrame(
        {
            "task": "t",
            "agent": ["oracle"] * 3 + ["schedule"] * 3,
            "seed": [1, 2, 3, 1, 2, 3],
            "return": [2.0, 3.0, 4.0, 1.0, 1.0, 1.0],
        }
    )
    noise = oracle_lib.value_of_reacting_noise(episodes).iloc[0]
    assert noise["value_of_reacting_sd"] == pytest.approx(1.0)  # differences 1, 2, 3
    assert noise["value_of_reacting_ratio"] == pytest.approx(2.0)


def test_selection_defaults_to_eight_seeds_and_the_pruned_family():
    assert OracleConfig().selection_seeds == 8
    pruned = oracle_lib.tuned_plans("spirals_budget")
    assert pruned is not None and pruned[0] == ()  # NoOp first
    assert OracleConfig().plans("spirals_budget") == pruned
    assert len(OracleConfig(family={"counts": [1]}).plans("spirals_budget")) > 1  # a family given
    assert oracle_lib.tuned_plans("spirals") is None  # no pruned family: the tuned family
    assert len(OracleConfig().plans("spirals")) == 57


def test_cluster_bootstrap_resamples_whole_clusters():
    from esper_gym.bench.stats import cluster_bootstrap_ci

    ci = cluster_bootstrap_ci([[1.0, 1.0, 1.0], [3.0]], reps=500)
    assert ci.estimate == pytest.approx(1.5)  # the mean of every value, not of the clusters
    assert ci.lo >= 1.0 and ci.hi <= 3.0
    same = cluster_bootstrap_ci([[2.0, 2.0], [2.0]], reps=100)
    assert same.lo == same.hi == 2.0
