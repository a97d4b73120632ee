"""Karn: how well does its predictor know a seed's contribution, and do its proposals pay?

1. History: the heuristic agent plays `--history` episodes with Karn exploring every proposal
   (uniform over the variants: sizes, activations, init scales), so the kernel store records
   a spread of seed outcomes. Then `--heldout` more episodes (other seeds) the same way.
2. Predictor error: the ridge predictor fitted on the history's outcomes predicts the held-out
   episodes' measured contributions. Reported: mean absolute error relative to the mean
   absolute measured contribution (the target: within 20%), next to the same error of always
   predicting the history's mean (what a predictor that learned nothing scores).
3. Karn vs template: on `--seeds` evaluation seeds, the heuristic agent with the template
   generator and with Karn (`--explore`, each `--objective`, learning on from the store's
   history as it goes). Paired per seed: IQM of Karn - template and its 95% bootstrap CI,
   beside each arm's IQM [95% CI] of return, test accuracy and parameters added.

    python experiments/karn_report.py   # ~6 min on 2 shared cores; writes results/karn_report.*
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

from esper_gym.agents.baselines import make_agent
from esper_gym.bench.stats import iqm, stratified_bootstrap_ci
from esper_gym.episode import play_episode
from esper_gym.kernels import BlueprintGenerator, KernelStore
from esper_gym.kernels.karn import KarnGenerator, fit_outcomes, outcome_features


def episode(env_kwargs: dict, generator, seed: int) -> dict:
    env = gym.make("Esper/Spirals-v0", generator=generator, **env_kwargs)
    metrics, _ = play_episode(env, make_agent("heuristic", env).act, seed)
    env.close()
    return metrics


def predictor_error(history, heldout) -> dict:
    model = fit_outcomes(history)
    x = np.stack([outcome_features(o) for o in heldout])
    y = np.asarray([o.contribution for o in heldout])
    pred = model.predict(x)
    scale = float(np.abs(y).mean())
    mean_pred = np.full_like(y, np.mean([o.contribution for o in history]))
    seen = np.asarray([o.contribution for o in history])
    log_params = np.log2([max(o.params, 1) for o in history])
    return {
        "history_kinds": sorted({o.kind for o in history}),
        "history_mean": float(seen.mean()),
        "history_std": float(seen.std()),
        # Does the signal Karn learns from grow with the kernel's size?
        "history_corr_log_params": float(np.corrcoef(log_params, seen)[0, 1]),
        "history_outcomes": len(history),
        "heldout_outcomes": len(heldout),
        "mean_abs_contribution": scale,
        "mae": float(np.abs(pred - y).mean()),
        "relative_error": float(np.abs(pred - y).mean() / scale) if scale else float("nan"),
        "relative_error_of_mean": float(np.abs(mean_pred - y).mean() / scale)
        if scale
        else float("nan"),
        "r2": float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()),
        "spearman": float(
            np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(y)))[0, 1]
        ),
    }


def interval(values) -> list[float]:
    ci = stratified_bootstrap_ci([values], iqm, reps=2000, seed=0)
    return [ci.estimate, ci.lo, ci.hi]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=40, help="exploring episodes to learn from")
    parser.add_argument("--heldout", type=int, default=15, help="exploring episodes to test on")
    parser.add_argument("--seeds", type=int, default=20, help="paired evaluation seeds")
    parser.add_argument("--max-epochs", type=float, default=10.0)
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--objective", nargs="+", default=["per_param", "reward"])
    parser.add_argument("--out", default="results/karn_report")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    kernel_dir = tempfile.mkdtemp(prefix="karn-report-")  # a fresh store: no earlier history
    env_kwargs = {"kernel_dir": kernel_dir, "max_epochs": args.max_epochs}
    explorer = KarnGenerator(explore=1.0)
    for seed in range(args.history):
        episode(env_kwargs, explorer, seed)
    n_history = len(KernelStore(kernel_dir).outcomes())
    for seed in range(10_000, 10_000 + args.heldout):
        episode(env_kwargs, explorer, seed)
    outcomes = KernelStore(kernel_dir).outcomes()
    error = predictor_error(outcomes[:n_history], outcomes[n_history:])

    arms = {"template": BlueprintGenerator()}
    for objective in args.objective:
        arms[f"karn_{objective}"] = KarnGenerator(explore=args.explore, objective=objective)
    seeds = [1_000_000 + i for i in range(args.seeds)]
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:  # arms interleaved: Karn learns on from every episode's outcomes
        for name, generator in arms.items():
            runs[name].append(episode(env_kwargs, generator, seed))
    metrics = ("return", "test_acc", "params_added")
    compare = {
        name: {m: interval([r[m] for r in rs]) for m in metrics} for name, rs in runs.items()
    }
    paired = {
        name: {
            m: interval([a[m] - b[m] for a, b in zip(runs[name], runs["template"])])
            for m in metrics
        }
        for name in arms
        if name != "template"
    }
    report = {
        "task": "spirals",
        "agent": "heuristic",
        "args": vars(args),
        "predictor": error,
        "arms": compare,
        "paired_vs_template": paired,
        "episodes": runs,
        "outcomes_in_store": len(KernelStore(kernel_dir).outcomes()),
        "minutes": (time.perf_counter() - start) / 60,
    }
    text = render(report)
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".txt").write_text(text + "\n")


def render(report: dict) -> str:
    e, a = report["predictor"], report["args"]
    lines = [
        f"Karn on spirals (max_epochs {a['max_epochs']}), heuristic agent; "
        f"{report['minutes']:.1f} min",
        "",
        f"Predictor (ridge): fitted on {e['history_outcomes']} outcomes of {a['history']} "
        f"episodes, tested on {e['heldout_outcomes']} of {a['heldout']} held-out episodes",
        f"  error = mean |predicted - measured| / mean |measured| = {e['relative_error']:.0%} "
        f"(target: within 20%; always predicting the history's mean: "
        f"{e['relative_error_of_mean']:.0%})",
        f"  MAE {e['mae']:.4f} on contributions of mean |{e['mean_abs_contribution']:.4f}| "
        f"(accuracy, 0..1); R^2 {e['r2']:.2f}; Spearman {e['spearman']:.2f}",
        f"  history ({', '.join(e['history_kinds'])}): contribution mean {e['history_mean']:+.4f}, "
        f"std {e['history_std']:.4f}, correlation with log2(params) "
        f"{e['history_corr_log_params']:+.2f}",
        "",
        f"Karn vs template, {a['seeds']} paired seeds (explore {a['explore']}): IQM [95% CI]",
        f"  {'arm':<18}{'return':>26}{'test acc.':>26}{'params added':>28}",
    ]
    for name, m in report["arms"].items():
        lines.append(
            f"  {name:<18}"
            + "".join(f"{_iv(m[k], k):>26}" for k in ("return", "test_acc"))
            + f"{_iv(m['params_added'], 'params_added'):>28}"
        )
    for name, m in report["paired_vs_template"].items():
        lines.append(
            f"  {name + ' - template':<18}"
            + "".join(f"{_iv(m[k], k):>26}" for k in ("return", "test_acc"))
            + f"{_iv(m['params_added'], 'params_added'):>28}"
        )
    for name, m in report["paired_vs_template"].items():
        lo, hi = m["return"][1:]
        verdict = "beats" if lo > 0 else "loses to" if hi < 0 else "does not separate from"
        lines.append(
            f"  {name} {verdict} the template on return (paired CI [{lo:+.3f}, {hi:+.3f}])"
        )
    return "\n".join(lines)


def _iv(v: list[float], kind: str) -> str:
    if kind == "params_added":
        return f"{v[0]:,.0f} [{v[1]:,.0f}, {v[2]:,.0f}]"
    if kind == "test_acc":
        return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


if __name__ == "__main__":
    main()
