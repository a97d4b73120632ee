"""evaluate's jobs as Ray tasks (`executor=ray`): one task per job, one CPU each, on the Ray
this process starts (embedded: no dashboard, workers' logs kept off this terminal) or joins
(`address`: "auto" after `ray start`, or "host:port").

An episode is a pure function of its job, so the results are those of the local pool, in the
order of the jobs. A job whose worker process dies is retried once by Ray (`max_retries=1`);
a job that still fails (or raises) is reported by agent, task and seed: `JobsFailed` after
every other job has finished, never a silently missing row. Ray is optional:
`pip install "esper-gym[ray]"`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from esper_gym import numerics

Progress = Callable[[int, int, Mapping[str, Any]], None]


class JobsFailed(RuntimeError):
    """Jobs that failed after their retry: `failed` [(job, error text)], `results` every job's
    result in order (None for a failed one)."""

    def __init__(self, failed: list[tuple[Any, str]], results: list):
        self.failed, self.results = failed, results
        names = "; ".join(f"{_name(job)}: {err}" for job, err in failed)
        super().__init__(f"{len(failed)} of {len(results)} jobs failed after a retry: {names}")


def _name(job: Any) -> str:
    task = getattr(getattr(job, "task", None), "label", getattr(job, "task", "?"))
    return f"{getattr(job, 'agent', '?')} on {task} seed {getattr(job, 'seed', '?')}"


def run_jobs_ray(
    jobs: Sequence[Any],
    run_job: Callable[[Any], dict],
    progress: Progress | None = None,
    n_jobs: int | None = None,
    address: str | None = None,
) -> list[dict]:
    """`run_job(job)` for every job as a Ray task; results in the order of `jobs`.
    `progress(done, total, result["row"])` as each finishes (in the order they finish), one
    count over all jobs. `n_jobs`: the logical CPUs of an embedded Ray (None: the cores), so
    at most that many jobs run at once; a cluster's are its own."""
    from esper_gym.agents.tamiyo.runners import init_ray

    ray = init_ray(address, None if address else n_jobs)
    if not jobs:
        return []
    # A portable run's numerics variables go with its jobs, to a cluster's workers too.
    env_vars = {k: os.environ[k] for k in numerics.PORTABLE_ENV if k in os.environ}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    task = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False, **options)(run_job)
    refs = {task.remote(job): i for i, job in enumerate(jobs)}
    results: list[dict | None] = [None] * len(jobs)
    failed: list[tuple[int, str]] = []
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            i = refs[ref]
            done += 1
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayError as exc:  # died twice, or raised
                cause = getattr(exc, "cause", None) or exc
                text = " ".join(str(cause).split())[:300]
                failed.append((i, f"{type(cause).__name__}: {text}"))
                continue
            if progress is not None:
                progress(done, len(jobs), results[i]["row"])
    if failed:
        raise JobsFailed([(jobs[i], err) for i, err in sorted(failed)], results)
    return results
