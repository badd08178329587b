"""Worker processes for training and analysis.

The reproduction runs ``jobs`` workers (default: one per core), so training runs of
different models proceed side by side and compilation (single-threaded in XLA)
overlaps with another run's steps. Workers are not pinned: no model issues a batched
LAPACK call (the cause of the stalls jaxlib 0.10.2's CPU runtime had under concurrent
QRs and SVDs; gllora.linalg replaced them), so a worker may use every core.

Tasks are module-level functions (picklable for the ``spawn`` start method); each
returns plain data.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
from typing import Any


def available_cores() -> list[int]:
    """The CPU cores this process may run on (empty where the OS cannot tell)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _init() -> None:
    import logging

    _die_with_parent()

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger().setLevel(logging.WARNING)


def _die_with_parent() -> None:
    """Asks Linux to send this worker SIGTERM when the process that started it dies, so a
    killed sweep or reproduction leaves no orphan trainings running (elsewhere: no-op).
    Workers are started from the pool owner's main thread, whose exit is the trigger."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the call: nothing would signal us
        os._exit(1)


class Pool:
    """``jobs`` worker processes (default: one per available core)."""

    def __init__(self, jobs: int = 0):
        cores = available_cores()
        self.jobs = jobs or max(1, len(cores) or (os.cpu_count() or 1))
        ctx = mp.get_context("spawn")
        self._executor = cf.ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_init)

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
