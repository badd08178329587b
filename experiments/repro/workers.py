"""Worker processes for training and analysis, each pinned to ONE CPU core.

Why one core per process: with jaxlib 0.10.2 on a 2-core CPU, MLP + SVD training hangs
for ever (3 runs of 3 on this machine). XLA's CPU runtime runs independent operations
concurrently on its intra-op pool (one thread per core), and jaxlib's batched LAPACK
kernels (QR, SVD: ``ParallelBatchMap``) split their batch into tasks on that same pool
and block until they finish; two concurrent QRs (of ``u`` and of ``v``) each hold a
pool thread and wait for the other's tasks. ``--xla_cpu_multi_thread_eigen=false`` does
not prevent it; a process whose CPU affinity is one core (a pool of one thread) does
(jaxlib 0.11 compiles the parallel path out). So the reproduction runs ``jobs``
workers, one per core, and both cores stay busy: training runs of different models
proceed side by side, and compilation (single-threaded in XLA) overlaps.

Tasks are module-level functions (picklable for the ``spawn`` start method); each
returns plain data.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from typing import Any


def available_cores() -> list[int]:
    """The CPU cores this process may run on (empty where the OS cannot tell)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _init(counter, cores: list[int]) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores[index % len(cores)]})  # before JAX starts
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger().setLevel(logging.WARNING)


class Pool:
    """``jobs`` worker processes (default: one per available core), one core each."""

    def __init__(self, jobs: int = 0):
        cores = available_cores()
        self.jobs = jobs or max(1, len(cores) or (os.cpu_count() or 1))
        ctx = mp.get_context("spawn")
        self._executor = cf.ProcessPoolExecutor(
            self.jobs, mp_context=ctx, initializer=_init, initargs=(ctx.Value("i", 0), cores)
        )

    def submit(self, fn, *args, **kwargs) -> cf.Future:
        return self._executor.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- tasks ---------------------------------------------------------------------------


def make_config(
    experiment: str, model: str, size: str, dataset: str, overrides: dict | None = None
):
    """The training config of one run: ``experiments/configs/paper.py`` plus overrides
    (``{"field": value, "model": {hparam: value}}``)."""
    from experiments.configs import paper

    config = paper.get_config(f"{experiment}:{model}:{size}")
    config.dataset = dataset
    for key, value in (overrides or {}).items():
        if key == "model":
            for name, v in value.items():
                config.models[model][name] = v
        else:
            config[key] = value
    return config


def train(
    experiment: str,
    model: str,
    size: str,
    dataset: str,
    workdir: str,
    overrides: dict | None = None,
) -> tuple[dict[str, Any], float, str]:
    """Trains (or reuses, or resumes) one run; see :func:`runner.run_training`."""
    from experiments.repro import runner

    config = make_config(experiment, model, size, dataset, overrides)
    return runner.run_training(config, workdir)


def figure4(workdir: str, datasets: dict[int, str]) -> dict:
    from experiments.repro import analysis

    return analysis.rank_generalization(workdir, datasets)


def d3(workdir: str) -> dict:
    from experiments.repro import analysis

    return analysis.d3_analysis(workdir)
