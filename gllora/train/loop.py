"""``train_and_evaluate``: train any registered model on any dataset folder and target.

The protocol of the paper's section 5: train/validation/test splits from the dataset;
the model of the epoch with the lowest validation loss is kept (per seed); the test
split is read once, at the end. ``config.num_seeds`` independently initialised models,
each with its own data order, train together as one vmapped program; results are
reported per seed and as mean +- std.

The workdir holds ``config.json``, ``targets.json``, ``metrics.jsonl`` (one JSON object
per line), ``results.json`` and orbax checkpoints under ``checkpoints/``. Started again
with the same config, a run resumes from its last checkpoint and ends with the same
results as an uninterrupted run.

Devices (:mod:`gllora.parallel`): the run lives on a 1-D mesh of ``config.num_devices``
devices (all of every process by default). ``config.batch_size`` is the global batch,
split along its example axis over the devices; the state is replicated, except the
``GroupedDense`` kernels when ``config.shard_params`` splits them. Under
``jax.distributed`` every process runs this same function: each reads only its
devices' rows of a streamed batch, process 0 writes the files, all take part in the
checkpoints. The results equal a one-device run's to float32 tolerance, and a run
resumes on another number of devices (checkpoints are restored onto the current mesh).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from gllora import models, parallel
from gllora.io import dataset as dataset_lib
from gllora.train import pipeline, tasks
from gllora.train import programs as programs_lib
from gllora.train import results as results_lib
from gllora.train import state as state_lib

# Fields that may differ when a run is resumed (they do not change the results, beyond
# float32 rounding for the device layout).
_RESUMABLE = ("progress", "log_every_steps", "num_devices", "shard_params")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any data is read, on an unusable config."""
    if config.model not in models.names():
        raise ValueError(
            f"config.model: unknown model {config.model!r}; known: {', '.join(models.names())}"
        )
    if config.model not in config.models:
        raise ValueError(f"config.models has no hyperparameters for {config.model!r}")
    if config.augment not in ("none", "gl", "o"):
        raise ValueError(f"config.augment must be 'none', 'gl' or 'o', got {config.augment!r}")
    if config.optimizer not in ("adamw", "adam", "sgd"):
        raise ValueError(f"config.optimizer must be adamw, adam or sgd, got {config.optimizer!r}")
    if config.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.schedule must be 'constant' or 'cosine', got {config.schedule!r}")
    for name in ("batch_size", "num_epochs", "num_seeds", "eval_batch_size"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    if not config.dataset:
        raise ValueError("config.dataset: no dataset folder given (--config.dataset=PATH)")
    if isinstance(config.targets, str):
        raise ValueError("config.targets must be a tuple of target names, e.g. ('quality',)")
    # .get: configs written before these fields existed run on every device, unsplit.
    if config.get("shard_params", "none") not in parallel.SHARD_PARAMS:
        raise ValueError(
            f"config.shard_params must be one of {parallel.SHARD_PARAMS}, "
            f"got {config.shard_params!r}"
        )
    if int(config.get("num_devices", 0)) < 0:
        raise ValueError(f"config.num_devices must be >= 0 (0: all), got {config.num_devices}")


# -- the run -----------------------------------------------------------------------


def _seeds(config) -> list[int]:
    return [int(config.seed) + s for s in range(int(config.num_seeds))]


def read_splits(ds: dataset_lib.Dataset) -> dict[str, np.ndarray]:
    for name in ("train", "validation", "test"):
        if name not in ds.splits or len(ds.splits[name]) == 0:
            raise ValueError(
                f"{ds.path}: split {name!r} is missing or empty; splits: "
                f"{ {k: len(v) for k, v in ds.splits.items()} }"
            )
    return {name: np.sort(ds.splits[name]) for name in ("train", "validation", "test")}


def _config_json(config) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _check_workdir_config(workdir: str, config) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _config_json(config)
    diff = sorted(
        k for k in set(old) | set(new) if k not in _RESUMABLE and old.get(k) != new.get(k)
    )
    if diff:
        raise ValueError(
            f"{workdir} holds a run with another config (fields {diff} differ); "
            "use a new workdir, or the same config to resume"
        )


class _MetricsLog:
    """``metrics.jsonl``: appends lines; on resume drops lines past the restored step.

    Only process 0 writes (``enabled``); the others keep no file.
    """

    def __init__(self, path: str, resume_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = []
        if os.path.exists(path) and resume_step > 0:
            with open(path) as f:
                lines = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(lines)

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _warn_of_known_stall(model: str) -> None:
    """MLP + SVD training can stall on jaxlib 0.10.2's multi-threaded CPU runtime
    (BUILD_NOTES.md, "Known limits"); a process pinned to one core does not."""
    import jax

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if model == "mlp_svd" and jax.default_backend() == "cpu" and cores > 1:
        logging.warning(
            "mlp_svd on a %d-core CPU: jaxlib 0.10.2 can stall this training at 0%% CPU; "
            "if it stops making progress, run it pinned to one core (taskset -c 0 ...).",
            cores,
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.num_seeds`` models and returns (and writes) the results.

    Args:
      config: see ``experiments/configs/default.py``.
      workdir: where config, metrics, checkpoints and results go; an existing run of
        the same config there is resumed.

    Returns:
      The contents of ``results.json``.
    """
    check_config(config)
    _warn_of_known_stall(str(config.model))
    mesh = parallel.make_mesh(int(config.get("num_devices", 0)))
    main = parallel.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(workdir, config)
    ds = dataset_lib.open(config.dataset)
    splits = read_splits(ds)
    targets = tasks.resolve(ds, tuple(config.targets), splits["train"])
    labels = tasks.encode(ds, targets)
    num_outputs = sum(t.num_outputs for t in targets)
    model = programs_lib.build_model(config, num_outputs)
    seeds = _seeds(config)
    S, B = len(seeds), int(config.batch_size)
    if len(splits["train"]) < B:
        raise ValueError(
            f"{ds.path}: the training split has {len(splits['train'])} LoRAs, fewer than "
            f"config.batch_size={B}"
        )
    parallel.check_divisible(B, mesh, "config.batch_size")
    steps_per_epoch = len(splits["train"]) // B
    total_steps = steps_per_epoch * int(config.num_epochs)
    tx = programs_lib.make_optimizer(config, total_steps)
    programs = programs_lib.Programs(config, model, targets, tx, mesh)
    ranks = ds.max_ranks()

    # Process 0 writes the run's files; the others write to nowhere.
    where = (lambda name: os.path.join(workdir, name)) if main else (lambda name: os.devnull)
    with open(where("config.json"), "w") as f:
        json.dump(_config_json(config), f, indent=1)
    sizes = state_lib.extras_sizes(ds.batch(splits["train"][:1], ranks=ranks))
    with open(where("targets.json"), "w") as f:
        json.dump(
            {
                "targets": [t.to_json() for t in targets],
                "ranks": ranks,
                "spec": dataset_lib.spec_to_json(ds.spec),
                "extras_sizes": sizes,
                "dataset": os.path.abspath(ds.path),
                "seeds": seeds,
            },
            f,
            indent=1,
        )

    state = state_lib.initial(config, ds, splits["train"], ranks, seeds, programs)
    manager = state_lib.checkpoint_manager(workdir)
    if manager.latest_step() is not None:
        state = state_lib.restore(
            manager, state
        )  # onto this run's mesh, whatever the saving one was
        logging.info("resumed from step %d", int(state["step"]))
    start = int(state["step"])
    log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), start, enabled=main)

    bytes_per_lora = sum(len(g.names) * (g.n + g.m) * r * 4 for g, r in zip(ds.spec.groups, ranks))
    fits = len(splits["train"]) * bytes_per_lora <= config.in_memory_gb * 1e9
    train_src = pipeline.Source(ds, ranks, splits["train"] if fits else None, mesh)
    eval_src = {
        name: pipeline.Source(ds, ranks, ids if fits else None, mesh)
        for name, ids in splits.items()
        if name != "train"
    }
    eval_src["train"] = train_src
    # Labels [S, B, C] and weights [S, B] split along B like the batch: each process puts
    # only its devices' rows.
    label_sharding = parallel.split_along(mesh, 3, 1)
    rows = parallel.local_slice(B, mesh)
    w_dev = parallel.put(np.ones((S, B), np.float32), parallel.split_along(mesh, 2, 1))

    indices = pipeline.step_indices(seeds, splits["train"], B, start, total_steps)

    bar = tqdm(
        total=total_steps,
        initial=start,
        disable=not (config.progress and main),
        desc=config.model,
        unit="step",
        dynamic_ncols=True,
    )
    batches = pipeline.prefetch(train_src, indices)
    t0, losses = time.perf_counter(), []
    for step in range(start, total_steps):
        ids, batch = next(batches)
        y = parallel.host_to_global(labels[ids[:, rows]], label_sharding, (S, B, labels.shape[-1]))
        state, loss = programs.train_step(state, batch, y, w_dev)
        losses.append(loss)
        bar.update(1)
        done = step + 1
        if done % config.log_every_steps == 0 or done % steps_per_epoch == 0:
            mean_loss = np.stack(parallel.to_host(losses)).mean(0)
            losses = []
            if not np.all(np.isfinite(mean_loss)):
                bad = [seeds[i] for i in np.flatnonzero(~np.isfinite(mean_loss))]
                raise FloatingPointError(
                    f"training loss became NaN/Inf at step {done} for seeds {bad} ({config.model} on "
                    f"{ds.path}); lower config.learning_rate (now {config.learning_rate}) or set "
                    "config.grad_clip"
                )
            log.write(
                step=done,
                split="train",
                loss=mean_loss.tolist(),
                steps_per_second=config.log_every_steps / max(time.perf_counter() - t0, 1e-9),
            )
            bar.set_postfix(loss=f"{mean_loss.mean():.4f}")
            t0 = time.perf_counter()
        if done % steps_per_epoch == 0:
            epoch = done // steps_per_epoch
            val = results_lib.evaluate_split(
                programs,
                state["params"],
                state["consts"],
                eval_src["validation"],
                splits["validation"],
                labels,
                config.eval_batch_size,
            )
            val_loss = np.asarray([m["loss"] for m in val], np.float32)
            state = programs.update_best(state, val_loss, np.int32(epoch))
            log.write(step=done, epoch=epoch, split="validation", metrics=val)
            if epoch % config.checkpoint_every_epochs == 0 or done == total_steps:
                state_lib.save(manager, done, state)
    bar.close()
    if manager.latest_step() != total_steps:
        state_lib.save(manager, total_steps, state)
    results = results_lib.final_results(programs, state, eval_src, splits, labels, config, seeds)
    with open(where("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results
