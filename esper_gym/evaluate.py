"""Hydra entry point of the benchmark suite: agents x tasks x seeds -> episodes.csv, an IQM
table with CIs (summary.csv, results.md), replays.json, figures.

```bash
python -m esper_gym.evaluate                                   # baselines, spirals + fashion_mnist, 5 seeds
python -m esper_gym.evaluate agents=[tamiyo,heuristic,random,noop] checkpoints.tamiyo=outputs/<run>
python -m esper_gym.evaluate tasks=[spirals] seeds=2 task_overrides.spirals.max_epochs=4
python -m esper_gym.evaluate tasks=[spirals,spirals_deep] ...  # a variant: another host graph
python -m esper_gym.evaluate 'tasks=[spirals]' contexts=test   # held-out contexts (esper_gym.contexts)
python -m esper_gym.evaluate 'agents=[schedule,lookahead,noop]' contexts=test oracle.family.counts=[1]
python -m esper_gym.evaluate -m reward.weights.param_cost=0,0.2,1  # writes result.json per job
```

A run: conf/evaluate.yaml composed and checked (`esper_gym.config.evaluate.build_evaluate`: a
bad value stops it before any episode, `error: <message>`, exit status 2), the numerics mode
applied (`numerics=portable` re-executes the command), then `esper_gym.bench.suite.evaluate`:
the jobs (`esper_gym.bench.jobs`), the oracle (`esper_gym.bench.oracle`), the statistics,
tables and figures, written to `out_dir` (default: the Hydra run dir,
`outputs/evaluate/<date>/<time>`; a folder holding files tracked by git is refused: committed
results are never overwritten). Train's spellings work too: `task.<field>=v` (every task),
`eval.episodes`/`eval.first_seed`/`eval.greedy`. The objective (what a Hydra sweeper optimises)
is the first agent's IQM return over all its episodes.

Python: `evaluate(EvalConfig(agents, resolve_tasks(names), seeds, out_dir, ...))`.
Hydra is imported only inside `main`, so pool workers (which import this module when it is
`__main__`) do not pay for it.
"""

from esper_gym import config_dir, numerics
from esper_gym.bench.jobs import resolve_tasks
from esper_gym.bench.suite import EvalConfig, EvalResult, evaluate

__all__ = ["EvalConfig", "EvalResult", "evaluate", "main", "resolve_tasks"]


def main() -> None:
    """`python -m esper_gym.evaluate [overrides]` (conf/evaluate.yaml, `esper_gym.config_dir()`)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from esper_gym import config
    from esper_gym.bench import stats
    from esper_gym.config import evaluate as config_evaluate

    config_evaluate.register_configs()

    @hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")
    def _main(cfg) -> float:
        with config.one_line_errors():
            conf = config_evaluate.build_evaluate(cfg, HydraConfig.get().runtime.output_dir)
            # Re-executes the command in that mode if it is not (before any episode: the
            # variables must be set before torch loads MKL); workers inherit it.
            numerics.ensure(cfg.numerics)
            logger = config_evaluate.init_logger(cfg, conf.out_dir)
            try:
                result = evaluate(conf, logger)
            finally:
                if logger is not None:
                    logger.finish()
        first = result.episodes[result.episodes["agent"] == result.episodes["agent"].iloc[0]]
        return float(stats.iqm(first["return"].to_numpy(dtype=float)))

    _main()


if __name__ == "__main__":
    main()
