"""The benchmark pipeline (esper_gym.evaluate) and its figures (esper_gym.bench.plots).

The CSV is checked against the episodes themselves: every row is replayed independently with
gym.make + esper_gym.agents.baselines.run_episode, and the numbers must be identical.
"""

import json
import os
import pathlib
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest

from esper_gym.agents.baselines import make_agent, run_episode
from esper_gym.bench import plots
from esper_gym.bench.jobs import (
    CSV_COLUMNS,
    Job,
    TaskSpec,
    check_compatible,
    make_jobs,
    resolve_tasks,
    run_job,
    with_agent_kwargs,
)
from esper_gym.bench.jobs import task_env as make_env
from esper_gym.bench.report import load_events
from esper_gym.bench.stats import iqm
from esper_gym.evaluate import EvalConfig, evaluate
from tests.conftest import SMALL

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small spirals with a two-blueprint library: few kernels to compile, so the test stays fast.
TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}
PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == PNG and len(data) > 2000, path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, kernel_dir):
    """Baselines on small spirals, 2 seeds, through the process pool."""
    out = tmp_path_factory.mktemp("eval")
    tasks = resolve_tasks(["spirals"], overrides={"spirals": TASK})
    result = evaluate(
        EvalConfig(
            ["heuristic", "random", "noop"],
            tasks,
            seeds=2,
            out_dir=out,
            first_seed=7,
            n_jobs=2,
            kernel_dir=kernel_dir,
            reps=500,
            progress=False,
        )
    )
    return out, result


def test_csv_has_one_row_per_episode_with_every_column(small_run):
    out, _ = small_run
    df = pd.read_csv(out / "episodes.csv")
    assert list(df.columns[: len(CSV_COLUMNS)]) == list(CSV_COLUMNS)
    assert sorted(c for c in df.columns if c.startswith("reward/")) == [
        f"reward/{k}"
        for k in sorted(
            (
                "accuracy",
                "param_cost",
                "latency_cost",
                "stability",
                "fault",
                "invalid_action",
                "intervention",
                "divergence",
            )
        )
    ]
    assert len(df) == 6
    assert set(zip(df["agent"], df["seed"])) == {
        (a, s) for a in ("heuristic", "random", "noop") for s in (7, 8)
    }
    assert (df["task"] == "spirals").all() and (df["wall_s"] > 0).all()
    assert (df["length"] == 6).all()  # SMALL: 6 decisions per episode
    # The summed reward components are the return.
    components = df[[c for c in df.columns if c.startswith("reward/")]].sum(axis=1)
    assert np.allclose(components, df["return"], atol=1e-9)


def test_csv_numbers_match_episodes_replayed_with_run_episode(small_run, kernel_dir):
    out, _ = small_run
    df = pd.read_csv(out / "episodes.csv")
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **TASK)
    for row in df.to_dict("records"):
        kwargs = {"seed": row["seed"]} if row["agent"] == "random" else {}
        ref = run_episode(env, make_agent(row["agent"], env, **kwargs), seed=row["seed"])
        where = f"{row['agent']} seed {row['seed']}"
        for key in ("val_acc", "test_acc", "params", "params_added", "faults", "invalid_actions"):
            assert row[key] == ref[key], f"{where}: {key} {row[key]} != {ref[key]}"
        assert row["length"] == ref["length"], where
        assert row["return"] == pytest.approx(ref["return"], abs=1e-12), where
        assert row["params"] - row["params_added"] == row["host_params"]
    # Growth actually happened in some episode, so the comparison covered kernels too.
    assert df["params_added"].max() > 0


def test_summary_and_table_agree_with_the_csv(small_run):
    out, result = small_run
    df = pd.read_csv(out / "episodes.csv")
    summary = pd.read_csv(out / "summary.csv")
    for row in summary.to_dict("records"):
        accs = df[(df["agent"] == row["agent"]) & (df["task"] == row["task"])]["test_acc"]
        assert row["test_acc_iqm"] == pytest.approx(iqm(accs.to_numpy()))
        assert row["test_acc_lo"] <= row["test_acc_iqm"] + 1e-12
        assert row["test_acc_hi"] >= row["test_acc_iqm"] - 1e-12
        assert row["n"] == 2
    assert (summary["vs_best"] == "best").sum() == 1
    # The reference is the baseline with the highest IQM return; its paired columns are empty
    # and every other agent's paired_diff is the mean of its per-seed return differences.
    ref = summary.loc[summary["return_iqm"].idxmax(), "agent"]
    assert (summary["reference"] == ref).all()
    by_seed = df.pivot(index="seed", columns="agent", values="return")
    for row in summary.to_dict("records"):
        if row["agent"] == ref:
            assert np.isnan(row["paired_diff"]) and np.isnan(row["p_improve"])
            continue
        diff = (by_seed[row["agent"]] - by_seed[ref]).mean()
        assert row["paired_diff"] == pytest.approx(diff)
        assert row["paired_lo"] <= row["paired_diff"] <= row["paired_hi"]
        assert 0.0 <= row["p_improve_lo"] <= row["p_improve"] <= row["p_improve_hi"] <= 1.0
    md = (out / "results.md").read_text()
    assert md == result.table
    # One row per agent in the IQM table, one in the decision-quality table below it.
    assert sum(line.startswith("| spirals |") for line in md.splitlines()) == 6
    assert md.startswith("Contexts: fixed") and "| decision quality |" in md
    for row in summary.to_dict("records"):
        episodes = df[(df["agent"] == row["agent"]) & (df["task"] == row["task"])]
        assert row["germinations"] == episodes["germinations"].sum()
        if row["germinations"]:
            assert row["decision_quality"] == pytest.approx(
                episodes["useful_seeds"].sum() / row["germinations"]
            )
        assert row["contexts"] == "fixed" and row["distinct_contexts"] == 1
    saved = json.loads((out / "result.json").read_text())
    assert saved["episodes_csv"] == "episodes.csv" and len(saved["summary"]) == 3


def test_figures_are_written_and_events_recorded(small_run):
    out, result = small_run
    assert_png(out / "pareto.png")
    assert_png(out / "performance_profiles.png")
    assert_png(out / "lifecycle.png")
    df = result.episodes
    growing = df[df["params_added"] > 0].iloc[0]
    events = load_events(out / "events.jsonl", growing["agent"], "spirals", growing["seed"])
    assert events and events[0]["from"] == "DORMANT" and events[0]["to"] == "GERMINATED"
    assert {"step", "layer", "slot", "blueprint", "from", "to", "reason"} <= set(events[0])


def test_hydra_entry_point_with_task_overrides(tmp_path, kernel_dir):
    """`python -m esper_gym.evaluate` composes conf/evaluate.yaml; task_overrides.<task>.<field>
    needs no `+`."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "esper_gym.evaluate",
        "agents=[noop]",
        "tasks=[spirals]",
        "seeds=1",
        "n_jobs=1",
        "plots.enabled=false",
        f"out_dir={out}",
        f"env.kernel_dir={kernel_dir}",
        "task_overrides.spirals.max_epochs=2",
        "task_overrides.spirals.decision_interval=8",
        "task_overrides.spirals.eval_size=256",
        "task_overrides.spirals.dataset_kwargs={n_train:1024,n_val:256,n_test:256}",
        "reward.weights.accuracy=1.0",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "episodes.csv")
    assert len(df) == 1 and df.loc[0, "length"] == 2 * 1024 // 128 // 8
    assert df.loc[0, "reward/accuracy"] == pytest.approx(df.loc[0, "return"])  # weight 1 applied
    config = json.loads((out / "result.json").read_text())["config"]
    assert config["task_overrides"]["spirals"]["max_epochs"] == 2


def test_unknown_tasks_agents_and_fields_fail_before_any_episode():
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks(["nope"])
    with pytest.raises(ValueError, match="registered"):
        resolve_tasks(["v"], variants={"v": {"host_kwargs": {}}})
    with pytest.raises(ValueError, match="unknown Task field"):
        resolve_tasks(["spirals"], overrides={"spirals": {"max_epoch": 1}})
    with pytest.raises(ValueError, match="checkpoint"):
        make_jobs(["tamiyo"], resolve_tasks(["spirals"]), 1)


def test_variant_changes_the_host_graph_but_not_the_spaces(kernel_dir):
    spirals, deep = resolve_tasks(
        ["spirals", "spirals_deep"],
        variants={"spirals_deep": {"task": "spirals", "host_kwargs": {"hidden": [16, 16, 16]}}},
        common=TASK,
    )
    assert deep.build().host_kwargs["hidden"] == (16, 16, 16)
    a, b = make_env(spirals, kernel_dir=kernel_dir), make_env(deep, kernel_dir=kernel_dir)
    assert a.observation_space == b.observation_space and a.action_space == b.action_space
    a.reset(seed=0)
    b.reset(seed=0)
    assert (len(a.unwrapped.layers), len(b.unwrapped.layers)) == (3, 4)


def test_tamiyo_checkpoint_runs_zero_shot_on_another_graph_and_refuses_other_spaces(
    tmp_path, kernel_dir
):
    import torch

    from esper_gym.agents.tamiyo import TamiyoPolicy, env_record, save_checkpoint

    spirals, deep = resolve_tasks(
        ["spirals", "spirals_deep"],
        variants={"spirals_deep": {"task": "spirals", "host_kwargs": {"hidden": [16, 16, 16]}}},
        common=TASK,
    )
    env = make_env(spirals, kernel_dir=kernel_dir)
    torch.manual_seed(0)
    policy = TamiyoPolicy.for_space(env.observation_space)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, policy, None, 0, None, env=env_record(env))
    for spec in (spirals, deep):
        out = run_job(Job("tamiyo", spec, seed=3, checkpoint=str(ckpt), kernel_dir=kernel_dir))
        assert out["row"]["length"] == 6 and out["row"]["n_layers"] == (3 if spec is spirals else 4)
        assert out["row"]["checkpoint"] == str(ckpt)
    # Same seed, same policy: the same episode (sampling is seeded with the episode seed).
    again = run_job(Job("tamiyo", spirals, seed=3, checkpoint=str(ckpt), kernel_dir=kernel_dir))
    first = run_job(Job("tamiyo", spirals, seed=3, checkpoint=str(ckpt), kernel_dir=kernel_dir))

    def replayable(row):  # wall-clock and cache-state telemetry differ between replays
        return {k: v for k, v in row.items() if k != "wall_s" and not k.startswith("telemetry/")}

    assert replayable(again["row"]) == replayable(first["row"])
    one_slot = make_env(TaskSpec("s1", "spirals", {**TASK, "seed_slots": 1}), kernel_dir=kernel_dir)
    with pytest.raises(ValueError, match="does not fit"):
        check_compatible(policy, one_slot)


def _checkpoint_on(tmp_path, spec, kernel_dir, record=True):
    import torch

    from esper_gym.agents.tamiyo import TamiyoPolicy, env_record, save_checkpoint

    env = make_env(spec, kernel_dir=kernel_dir)
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint.pt"
    record = env_record(env) if record else None
    save_checkpoint(ckpt, TamiyoPolicy.for_space(env.observation_space), None, 0, None, record)
    return ckpt


def test_checkpoint_with_a_reordered_blueprint_library_is_refused_before_any_episode(
    tmp_path, kernel_dir
):
    (spirals,) = resolve_tasks(["spirals"], common=TASK)
    ckpt = _checkpoint_on(tmp_path, spirals, kernel_dir)
    library = list(spirals.build().blueprints)
    swapped = [library[1], library[0], *library[2:]]  # same size: the spaces still match
    reordered = TaskSpec("swapped", "spirals", {**TASK, "blueprints": tuple(swapped)})
    assert make_env(reordered).action_space == make_env(spirals).action_space
    with pytest.raises(ValueError) as err:
        make_jobs(["tamiyo"], [spirals, reordered], 1, checkpoints={"tamiyo": str(ckpt)})
    message = str(err.value)
    assert str(library) in message and str(swapped) in message
    assert "blueprint library" in message
    # The same check guards a job run on its own (a worker of run_jobs).
    with pytest.raises(ValueError, match="blueprint library"):
        run_job(Job("tamiyo", reordered, seed=0, checkpoint=str(ckpt), kernel_dir=kernel_dir))


def test_checkpoint_without_a_recorded_library_is_refused(tmp_path, kernel_dir):
    (spirals,) = resolve_tasks(["spirals"], common=TASK)
    ckpt = _checkpoint_on(tmp_path, spirals, kernel_dir, record=False)
    with pytest.raises(ValueError, match="records no task or blueprint library"):
        make_jobs(["tamiyo"], [spirals], 1, checkpoints={"tamiyo": str(ckpt)})


def test_checkpoint_trained_seeing_the_context_is_evaluated_seeing_it(tmp_path, kernel_dir):
    """A policy trained with env.show_context has more globals: evaluate records that in the
    job and builds its env alike (baselines' envs stay plain), and refuses it without contexts
    rather than fail on the sizes. Showing the context changes the observation only."""
    import torch

    from esper_gym.agents.tamiyo import TamiyoPolicy, env_record, save_checkpoint

    (spirals,) = resolve_tasks(["spirals"], common=TASK)
    env = make_env(spirals, kernel_dir=kernel_dir, contexts="test", show_context=True)
    plain = make_env(spirals, kernel_dir=kernel_dir, contexts="test")
    extra = env.observation_space["globals"].shape[0] - plain.observation_space["globals"].shape[0]
    assert extra == len(env.unwrapped.context_space.factors) > 0
    record = env_record(env)
    assert record["show_context"] is True and "show_context" not in env_record(plain)
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, TamiyoPolicy.for_space(env.observation_space), None, 0, None, record)
    jobs = make_jobs(
        ["tamiyo", "noop"], [spirals], 1, checkpoints={"tamiyo": str(ckpt)},
        contexts="test", kernel_dir=kernel_dir,
    )  # fmt: skip
    assert {j.agent: j.show_context for j in jobs} == {"tamiyo": True, "noop": False}
    row = run_job(jobs[0])["row"]
    assert row["agent"] == "tamiyo" and row["length"] > 0 and np.isfinite(row["return"])
    with pytest.raises(ValueError, match=r"show_context.*contexts=test"):
        make_jobs(["tamiyo"], [spirals], 1, checkpoints={"tamiyo": str(ckpt)})
    # Same seed, same actions: the same episode with or without the context in view.
    returns = []
    for e in (env, plain):
        e.reset(seed=5)
        returns.append(sum(e.step(0)[1] for _ in range(6)))
    assert returns[0] == returns[1]


def test_agent_kwargs_of_a_checkpointed_policy_are_refused_by_name(tmp_path, kernel_dir):
    """A checkpointed policy has no actor settings since the MC-dropout gate was removed: any
    agent_kwargs.<checkpoint name> key is refused by name, as is an unknown agent."""
    (spirals,) = resolve_tasks(["spirals"], common=TASK)
    ckpt = str(_checkpoint_on(tmp_path, spirals, kernel_dir))
    jobs = make_jobs(["shut"], [spirals], [3], checkpoints={"shut": ckpt}, kernel_dir=kernel_dir)
    with pytest.raises(ValueError, match=r"agent_kwargs.shut: \['gate'\].*allowed: none"):
        with_agent_kwargs(jobs, {"shut": {"gate": 0.0}})
    with pytest.raises(ValueError, match=r"agent_kwargs for \['ghost'\]"):
        with_agent_kwargs(jobs, {"ghost": {"gate": 0.1}})


def test_negative_first_seed_is_refused_before_any_episode():
    (spirals,) = resolve_tasks(["spirals"], common=TASK)
    with pytest.raises(ValueError, match=r"seeds must be integers >= 0.*first_seed=-1"):
        make_jobs(["noop"], [spirals], 2, first_seed=-1)


# --- plots ---------------------------------------------------------------------------------------


def test_pareto_front():
    pts = [(0, 0.5), (100, 0.7), (50, 0.6), (200, 0.65), (50, 0.55), (300, 0.9)]
    assert plots.pareto_front(pts) == [(0, 0.5), (50, 0.6), (100, 0.7), (300, 0.9)]
    assert plots.pareto_front([(0, 0.5)]) == [(0, 0.5)]


def test_lifecycle_segments_follow_the_events():
    events = [
        {"step": 20, "layer": "fc1", "slot": 0, "blueprint": "fault_nan", "from": "DORMANT",
         "to": "GERMINATED", "reason": "germinate"},
        {"step": 40, "layer": "fc1", "slot": 0, "blueprint": "fault_nan", "from": "GERMINATED",
         "to": "TRAINING", "reason": "advance"},
        {"step": 42, "layer": "fc1", "slot": 0, "blueprint": "fault_nan", "from": "TRAINING",
         "to": "CULLED", "reason": "circuit breaker: 3 faults"},
        {"step": 43, "layer": "fc1", "slot": 0, "blueprint": "fault_nan", "from": "CULLED",
         "to": "EMBARGOED", "reason": "embargo"},
    ]  # fmt: skip
    segs = plots.lifecycle_segments(events, total_steps=100)[("fc1", 0)]
    assert [(s["state"].name, s["start"], s["end"]) for s in segs] == [
        ("DORMANT", 0, 20),
        ("GERMINATED", 20, 40),
        ("TRAINING", 40, 42),
        ("CULLED", 42, 43),
        ("EMBARGOED", 43, 100),
    ]
    assert segs[2]["reason"].startswith("circuit breaker")
    with pytest.raises(ValueError, match="does not follow"):
        plots.lifecycle_segments([{**events[1]}], 100)


def test_learning_curves_and_reward_sweep_figures(tmp_path):
    rng = np.random.default_rng(0)
    curve = pd.DataFrame(
        {
            "global_step": np.tile(np.arange(1, 11) * 256, 2),
            "charts/episodic_return": rng.normal(size=20),
            "run": ["a"] * 10 + ["b"] * 10,
        }
    )
    curve.loc[3, "charts/episodic_return"] = np.nan  # an update in which no episode ended
    curve.to_csv(tmp_path / "metrics.csv", index=False)
    assert_png(plots.learning_curves(tmp_path / "metrics.csv", tmp_path / "lc.png"))

    # A multirun of esper_gym.train jobs (results.json) and one of esper_gym.evaluate
    # (result.json + episodes.csv), each with the swept weight in .hydra/config.yaml.
    sweep = tmp_path / "multirun"
    for job, cost in enumerate((0.0, 0.2, 1.0)):
        d = sweep / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text(f"reward:\n  weights:\n    param_cost: {cost}\n")
        episodes = [
            {"seed": s, "test_acc": 0.8 - 0.1 * cost + 0.01 * s, "params_added": 1000 / (1 + cost)}
            for s in range(3)
        ]
        res = {"eval": {"tamiyo": {"episodes": episodes}, "noop": {"episodes": episodes}}}
        (d / "results.json").write_text(json.dumps(res))
    d = sweep / "3"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- reward.weights.param_cost=0.5\n")
    pd.DataFrame([{"agent": "heuristic", "seed": 0, "test_acc": 0.7, "params_added": 300}]).to_csv(
        d / "episodes.csv", index=False
    )
    (d / "result.json").write_text(json.dumps({"episodes_csv": "episodes.csv"}))
    df = plots.load_sweep(sweep, "reward.weights.param_cost")
    assert len(df) == 3 * 2 * 3 + 1
    assert sorted(df["reward.weights.param_cost"].unique()) == [0.0, 0.2, 0.5, 1.0]
    assert_png(plots.reward_sweep(df, "reward.weights.param_cost", tmp_path / "sweep.png"))


def test_figures_and_tables_go_to_the_run_logger(tmp_path):
    """plots.log_figures hands W&B images and tables to the RunLogger's run; a logger without a
    run (NullLogger) is skipped."""

    class Run:
        def __init__(self):
            self.logged = []

        def log(self, payload):
            self.logged.append(payload)

    class Logger:
        run = Run()

    png = plots.pareto(
        pd.DataFrame(
            {
                "task": "t",
                "agent": ["a", "a", "b"],
                "params_added": [0, 10, 5],
                "test_acc": [0.1, 0.2, 0.3],
            }
        ),
        tmp_path / "p.png",
        reps=50,
    )
    logger = Logger()
    plots.log_figures(logger, {"pareto": png}, tables={"summary": pd.DataFrame({"x": [1]})})
    (payload,) = logger.run.logged
    assert set(payload) == {"plots/pareto", "tables/summary"}
    plots.log_figures(object(), {"pareto": png})  # no run: nothing, no error


def test_a_baseline_that_cannot_be_built_is_refused_before_any_episode():
    """north has no tuned parameters for spirals_budget (conf/rule_params.yaml): evaluate says
    so before it plays, not after every other agent's episodes (once 15 minutes of them)."""
    from esper_gym.bench.jobs import check_players, with_agent_kwargs

    (budget,) = resolve_tasks(["spirals_budget"], common=SMALL)
    jobs = make_jobs(["noop", "north"], [budget], 2, contexts="test")
    with pytest.raises(ValueError, match="agent 'north' on task 'spirals_budget': no tuned north"):
        check_players(jobs)
    bad = with_agent_kwargs(jobs[:2], {"noop": {"speed": 2}})
    with pytest.raises(ValueError, match="agent 'noop' on task 'spirals_budget'"):
        check_players(bad)
    check_players(jobs[:2])  # noop alone: nothing to refuse
