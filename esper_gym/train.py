"""Hydra entry point: train an agent on a task, evaluate it on held-out seeds, log everything.

```bash
python -m esper_gym.train                                     # spirals: Tamiyo, then vs baselines
python -m esper_gym.train agent=heuristic logger=none         # a baseline: nothing to train
python -m esper_gym.train +experiment=fashion_mnist           # a named experiment (conf/experiment)
python -m esper_gym.train -m reward.weights.param_cost=0,0.05,0.2 seed=0,1,2   # a sweep
python -m esper_gym.train resume=outputs/2025-01-01/12-00-00  # continue that run's training
```

A run, `run(cfg, run_dir)`: parse and build (`esper_gym.config.build`: a bad value stops the run
before any work, `error: <message>`, exit status 2), then dispatch on `agent.kind`: Tamiyo
(`tamiyo`) or an SB3 model (`sb3`) trains on `env.num_envs` copies, episodes seeded from `seed`,
writes its checkpoint and learning curve to the run dir (`resume=<checkpoint or run dir>`
continues to this config's budget under the same W&B run id); baselines skip it. Then the agent
and the baselines of `eval.compare` play `eval.episodes` held-out episodes, seeds
`eval.first_seed + i` (`esper_gym.bench.jobs`; test contexts after training on `env.contexts=
train`; learners sample their policy seeded by the episode seed, `eval.greedy=true` the argmax),
logged as `eval/<agent>/...`; `results.json` and a table (`esper_gym.bench.report`) follow, and
the agent's mean evaluation return is returned (what a Hydra sweeper optimises).

Run dir (Hydra's `outputs/<date>/<time>`, `multirun/<date>/<time>/<job>` for `-m`): `.hydra/`,
`results.json`, `run.json` (agent, W&B run id), `checkpoint.pt` and `train_metrics.csv`
(tamiyo) or `checkpoint.zip` (sb3), `wandb/offline-run-*` (logger=wandb), `kernels/`
(env.kernel_dir=run).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import esper_gym
from esper_gym import config
from esper_gym.agents.gate import ScheduleGate
from esper_gym.bench import learners
from esper_gym.bench.jobs import baseline_actor, play_agents
from esper_gym.bench.report import format_results

# Re-exported for esper_gym.evaluate and older callers; the definitions are esper_gym.config's.
from esper_gym.config import (  # noqa: F401
    AgentKind,
    BatchedFactory,
    Built,
    ConfigError,
    _mirror,
    build_generator,
    build_reward_fn,
    build_reward_weights,
    env_factory,
    register_configs,
    validate,
)
from esper_gym.config import checkpoint_file as _checkpoint_file  # noqa: F401

register_configs()


def learn(cfg: DictConfig, built: Built, logger, run_dir: pathlib.Path):
    """Train (or continue) the configured learner: (actor, global_step, checkpoint path), or
    (None, 0, None) for a baseline."""
    greedy = cfg.eval.greedy
    if cfg.agent.kind == AgentKind.tamiyo:
        makers = built.env_makers
        return learners.train_tamiyo(built.ppo, makers, run_dir, logger, built.resume, greedy)
    if cfg.agent.kind == AgentKind.sb3:
        return learners.train_sb3(
            lambda **kw: config.build_agent(cfg, **kw),
            built.make,
            num_envs=built.num_envs,
            use_async=built.vectorization == "async",
            seed=cfg.seed,
            total_timesteps=cfg.agent.total_timesteps,
            run_dir=run_dir,
            logger=logger,
            resume=built.resume,
            greedy=greedy,
            name=cfg.agent.name,
        )
    return None, 0, None


def run(cfg: DictConfig, run_dir: str | pathlib.Path) -> dict[str, Any]:
    """Build, train (learners), evaluate, log; see the module docstring. Returns the results
    (also written to `run_dir/results.json`)."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    built = config.build(cfg, run_dir)
    print(f"kernel store: {built.kernel_dir} (env.kernel_dir; env.kernel_dir=run: this run's own)")
    print(config.contexts_line(cfg))
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    name, kind = cfg.agent.name, cfg.agent.kind
    logger = config.init_logger(cfg, run_dir, built.task)
    meta = {"agent": name, "kind": kind.value, "task": cfg.task.name, "seed": cfg.seed}
    meta.update(wandb_id=logger.run_id, wandb_dir=logger.run_dir)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    results: dict[str, Any] = {**meta, "global_step": 0, "checkpoint": None, "eval": {}}
    try:
        start = time.perf_counter()
        actor, step, ckpt = learn(cfg, built, logger, run_dir)
        results.update(global_step=step, checkpoint=ckpt and str(ckpt))
        results["train_s"] = time.perf_counter() - start
        # Trained on train contexts: scored on the held-out test contexts, as evaluate does.
        env = built.make(contexts="test") if cfg.env.contexts == "train" else built.make()
        seeds = [cfg.eval.first_seed + i for i in range(cfg.eval.episodes)]
        # Behind env.gate only the trained agent acts through the gate; the baselines it is
        # compared with play the same episodes as they are (ScheduleGate wraps the env last).
        plain = env.env if isinstance(env, ScheduleGate) else env
        players, others = {}, {}
        if seeds:  # eval.episodes=0: nothing to evaluate, and no table of NaN means
            own = config.build_agent(cfg, env=env) if actor is None else None
            players[name] = actor or baseline_actor(name, env, cfg.seed, own)
            for other in cfg.eval.compare:
                if other != name:  # make_agent's defaults
                    others[other] = baseline_actor(other, plain, cfg.seed)
        results["eval"] = play_agents(env, players, seeds, logger)
        results["eval"].update(play_agents(plain, others, seeds, logger))
        env.close()
        mine = results["eval"].get(name, {}).get("mean", {})
        results["objective"] = mine.get("return", math.nan)
        logger.summary({"global_step": step, "objective": results["objective"]})
    finally:
        logger.finish()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(format_results(results))
    return results


# An absolute path: Hydra resolves a relative one against the calling module when main() is
# imported and called (the console script) rather than run with `python -m`.
CONF_DIR = str(esper_gym.config_dir())


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """`python -m esper_gym.train [overrides]`; returns the objective for Hydra sweepers."""
    with config.one_line_errors():
        return run(cfg, HydraConfig.get().runtime.output_dir)["objective"]


if __name__ == "__main__":
    main()
