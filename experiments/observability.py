"""Observability of the value of reacting: does the run show, by the time a plan grows, whether
growing will pay?

value_of_reacting.py chooses a plan per context with the context known: that is the value of
*knowing* the context. A controller that reads the run has only its observations. This measures
how much of the grow-or-not choice they carry, on a task's train and test contexts:

- Plays NoOp on every context x seed (`--seeds` train seeds 0.., 8 test seeds 1_000_000.., the
  held-out seeds of evaluate), keeping every observation, and each `--plans` entry (ids into the
  task's pruned plan family, conf/schedule_plans.yaml) on the same seeds. With common seeds a
  plan's run is NoOp's until its first germination, so NoOp's observations up to that step are
  exactly what a controller deciding there has seen.
- **Gate**: a ridge regression of the plan's return gain over NoOp on the observation history up
  to the plan's first germination (`globals`: every global feature at every step; `+nodes`:
  also every node row), fitted on train contexts, lambda chosen by leave-one-context-out CV on
  train contexts only. On test contexts the gate plays the plan where the predicted gain is > 0,
  else NoOp. Reported paired on common seeds against always playing the plan, with a 95%
  bootstrap CI over contexts.
- The same gate on the true context factors (quadratic), a controller told the context: the
  ceiling of this model class; and the per-context oracle gate (in-sample on test contexts).
- **Factor visibility**: the test-context correlation of each context factor with its ridge
  prediction from the history (1: the run shows it by then; about 0: it does not).

```bash
python experiments/observability.py --task spirals_budget --plans 4 5 --seeds 8 \
    --report results/value_of_reacting/spirals_budget_observability.txt
```
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import report  # noqa: E402

from esper_gym.bench import oracle, stats  # noqa: E402
from esper_gym.tasks import get_task  # noqa: E402

FIRST_TEST_SEED = 1_000_000  # esper_gym.evaluate's held-out seeds
LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
KS = (1, 2, 5, 10, 20, 40, 80)


def play(task: str, split: str, plan_id: int, context: int, seed: int):
    """One episode (a pool worker): plan `plan_id` of the pruned family (0 is NoOp). Returns the
    return, the step of the first germination (None: never) and, for NoOp, every observation's
    globals and node rows (valid nodes), one row per step."""
    import torch

    from esper_gym.actions import WAIT, Action
    from esper_gym.agents.baselines import ScheduleAgent
    from esper_gym.env import MorphogeneticEnv
    from esper_gym.episode import play_episode

    torch.set_num_threads(1)
    env = MorphogeneticEnv(task=task, contexts=split)
    plan = oracle.tuned_plans(task)[plan_id]
    agent = ScheduleAgent(env.observation_space, env.action_space, plan, env.task.blueprints)
    wait = env.layout.encode(Action(WAIT))
    globs, nodes, first = [], [], []

    def act(obs):
        action = agent.act(obs)
        if plan_id == 0:
            globs.append(np.asarray(obs["globals"], dtype=float))
            nodes.append(np.asarray(obs["nodes"], dtype=float)[obs["node_mask"].astype(bool)])
        if action != wait and not first:
            first.append(len(globs) if plan_id == 0 else env.steps)
        return action

    metrics, _ = play_episode(env, act, seed, {"context": int(context)})
    env.close()
    history = (np.array(globs), np.array(nodes)) if plan_id == 0 else None
    return float(metrics["return"]), (first[0] if first else None), history


def _standardise(x: np.ndarray):
    keep = x.std(0) > 0
    mu, sd = x[:, keep].mean(0), x[:, keep].std(0)
    return lambda z: (z[:, keep] - mu) / sd


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float):
    """Ridge regression on standardised columns (constant ones dropped); returns predict(x)."""
    scale = _standardise(x)

    def design(z):
        return np.hstack([scale(z), np.ones((len(z), 1))])

    a = design(x)
    penalty = lam * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk: with nothing to read, the gate's
    # prediction falls back to the mean gain (always grow, or never), not to 0
    w = np.linalg.solve(a.T @ a + penalty, a.T @ y)
    return lambda z: design(z) @ w


def choose_lambda(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """The lambda of LAMBDAS with the least leave-one-group-out squared error (groups: the
    contexts, so that no seed of a held-out context helps fit)."""
    errors = []
    for lam in LAMBDAS:
        err = 0.0
        for g in np.unique(groups):
            held = groups == g
            err += float(((ridge_fit(x[~held], y[~held], lam)(x[held]) - y[held]) ** 2).sum())
        errors.append(err)
    return LAMBDAS[int(np.argmin(errors))]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T


def knn_fit(x: np.ndarray, y: np.ndarray, k: int):
    """k nearest neighbours (Euclidean, standardised columns): the mean gain of the k train
    episodes nearest each query; returns predict(x). Nonparametric, so it reads what a linear
    readout cannot (thresholds, interactions) where there are episodes enough."""
    scale = _standardise(x)
    ref = scale(x)

    def predict(z):
        d = _squared_distances(scale(z), ref)
        return y[np.argsort(d, axis=1, kind="stable")[:, :k]].mean(1)

    return predict


def choose_k(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> int:
    """The k of KS with the least leave-one-group-out squared error: an episode's neighbours
    never come from its own context."""
    z = _standardise(x)(x)
    d = _squared_distances(z, z)
    d[groups[:, None] == groups[None, :]] = np.inf
    order = np.argsort(d, axis=1, kind="stable")
    errors = [float(((y[order[:, :k]].mean(1) - y) ** 2).sum()) for k in KS]
    return KS[int(np.argmin(errors))]


MODELS = {"ridge": (choose_lambda, ridge_fit), "kNN": (choose_k, knn_fit)}


def gate_gain(predicted: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Per episode, the gate's return minus always playing the plan: 0 where it plays the plan
    (predicted gain > 0), -gain where it plays NoOp instead."""
    return np.where(predicted > 0, 0.0, -gain)


def quadratic(f: np.ndarray) -> np.ndarray:
    return np.hstack([f, (f[:, :, None] * f[:, None, :]).reshape(len(f), -1)])


def interval(diff: np.ndarray, contexts: np.ndarray, reps: int) -> str:
    ci = stats.cluster_bootstrap_ci([diff[contexts == c] for c in np.unique(contexts)], reps)
    return f"{ci.estimate:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]"


def run(args) -> dict:
    space = get_task(args.task).context_space
    seeds = {"train": list(range(args.seeds)), "test": [FIRST_TEST_SEED + j for j in range(8)]}
    cells = [
        (split, p, c, s)
        for split in ("train", "test")
        for p in (0, *args.plans)
        for c in range(len(space.contexts(split)))[: args.contexts or None]
        for s in seeds[split]
    ]
    print(f"{args.task}: {len(cells)} episodes (NoOp and plans {args.plans})", flush=True)
    out, start = {}, time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
        jobs = [(args.task, *cell) for cell in cells]
        for cell, result in zip(cells, pool.map(play, *zip(*jobs), chunksize=8)):
            out[cell] = result
    print(f"played in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def analyse(task: str, plans: list[int], episodes: dict, reps: int) -> None:
    space = get_task(task).context_space
    names = [f.name for f in space.factors]
    described = [oracle.describe(p) for p in oracle.tuned_plans(task)]
    for plan in plans:
        cells = [(sp, c, s) for (sp, p, c, s) in episodes if p == plan]
        # Every episode is cut at the earliest step the plan germinated on (the same step in
        # every context of a task with fixed decisions): NoOp's observations up to and
        # including it are what a controller deciding there has seen. From train episodes only.
        train = [(c, s) for sp, c, s in cells if sp == "train"]
        noop_len = min(len(episodes[("train", 0, c, s)][2][0]) for c, s in train)
        firsts = [episodes[("train", plan, c, s)][1] for c, s in train]
        k = min([f + 1 for f in firsts if f is not None] + [noop_len])
        data = {}
        for split in ("train", "test"):
            mine = [(c, s) for sp, c, s in cells if sp == split]
            gain = [
                episodes[(split, plan, c, s)][0] - episodes[(split, 0, c, s)][0] for c, s in mine
            ]
            hist = [episodes[(split, 0, c, s)][2] for c, s in mine]  # NoOp's, same seed
            glob = np.array([h[0][:k].ravel() for h in hist])
            data[split] = {
                "context": np.array([c for c, _ in mine]),
                "gain": np.array(gain),
                "globals": glob,
                "+nodes": np.hstack([glob, np.array([h[1][:k].ravel() for h in hist])]),
                "raw": np.array([space.features(space.contexts(split)[c]) for c, _ in mine]),
                "levels": [space.contexts(split)[c] for c, _ in mine],
            }
            data[split]["factors"] = quadratic(data[split]["raw"])
        tr, te = data["train"], data["test"]
        print(f"\n## Plan {plan}: {described[plan]}\n")
        print(
            f"Decided on the first {k} observations. Mean gain over NoOp: train "
            f"{tr['gain'].mean():+.3f}, test {te['gain'].mean():+.3f} ({len(tr['gain'])} and "
            f"{len(te['gain'])} episodes).\n"
        )
        print(
            "| gate fitted on train contexts | lambda or k | test: gate - the plan | corr(pred, gain) |"
        )
        print("|---|---|---|---|")
        gates = (
            ("ridge", "globals", "history of the globals"),
            ("ridge", "+nodes", "history of the globals and node rows"),
            ("kNN", "+nodes", "history of the globals and node rows, kNN"),
            ("ridge", "factors", "true context factors (told the context)"),
        )
        for model, feats, label in gates:
            choose, fit = MODELS[model]
            param = choose(tr[feats], tr["gain"], tr["context"])
            pred = fit(tr[feats], tr["gain"], param)(te[feats])
            diff = gate_gain(pred, te["gain"])
            corr = np.corrcoef(pred, te["gain"])[0, 1]
            name = f"k={param}" if model == "kNN" else f"{param:g}"
            print(f"| {label} | {name} | {interval(diff, te['context'], reps)} | {corr:+.2f} |")
        per_context = {c: te["gain"][te["context"] == c].mean() for c in np.unique(te["context"])}
        best = gate_gain(np.array([per_context[c] for c in te["context"]]), te["gain"])
        print(
            f"| per-context oracle (in-sample on test) | - | {interval(best, te['context'], reps)} | - |"
        )
        print(
            "\n| factor | mean gain over NoOp per level (train and test) "
            "| test corr(factor, its prediction from the globals and node rows) |"
        )
        print("|---|---|---|")
        levels_of = tr["levels"] + te["levels"]
        gain = np.concatenate([tr["gain"], te["gain"]])
        for j, name in enumerate(names):
            level = np.array([str(c[name]) for c in levels_of])
            order = sorted({c[name] for c in levels_of})  # the levels' own order (8 < 16)
            levels = ", ".join(f"{v}: {gain[level == str(v)].mean():+.2f}" for v in order)
            y_tr, y_te = tr["raw"][:, j], te["raw"][:, j]
            corr = "-"
            if y_tr.std() > 0 and y_te.std() > 0:
                lam = choose_lambda(tr["+nodes"], y_tr, tr["context"])
                pred = ridge_fit(tr["+nodes"], y_tr, lam)(te["+nodes"])
                corr = f"{np.corrcoef(pred, y_te)[0, 1]:+.2f}"
            print(f"| {name} | {levels} | {corr} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="spirals_budget")
    p.add_argument("--plans", type=int, nargs="+", default=[4, 5], help="ids in the pruned family")
    p.add_argument("--seeds", type=int, default=8, help="train seeds per context")
    p.add_argument(
        "--contexts", type=int, default=0, help="first N contexts of each split (0: all)"
    )
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--report", default=None, help="also write what is printed to this file")
    args = p.parse_args(argv)
    family = oracle.tuned_plans(args.task)
    if not family:
        raise SystemExit(f"task {args.task!r} has no pruned plan family (tune_schedule.py)")
    bad = [i for i in args.plans if not 0 < i < len(family)]
    if bad:
        raise SystemExit(f"--plans {bad}: allowed 1..{len(family) - 1} (0 is NoOp)")
    with report(args.report):
        analyse(args.task, args.plans, run(args), args.reps)


if __name__ == "__main__":
    main()
