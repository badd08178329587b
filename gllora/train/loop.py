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

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from gllora import models, parallel
from gllora.io import dataset as dataset_lib
from gllora.io.dataset import multi as multi_lib
from gllora.train import featurized, multi, pipeline, steps, tasks
from gllora.train import results as results_lib
from gllora.train import state as state_lib

# Fields that may differ when a run is resumed (they do not change the results, beyond
# float32 rounding for the device layout or for where features are computed).
_RESUMABLE = (
    "progress", "log_every_steps", "num_devices", "shard_params", "precompute_features"
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any data is read, on an unusable config."""
    if config.model not in models.names():
        raise ValueError(
            f"config.model: unknown model {config.model!r}; known: {', '.join(models.names())}"
        )
    if config.model not in config.models:
        raise ValueError(f"config.models has no hyperparameters for {config.model!r}")
    if config.augment not in ("none", "gl", "o", "perm_sign"):
        raise ValueError(
            f"config.augment must be 'none', 'gl', 'o' or 'perm_sign', got {config.augment!r}"
        )
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
    dtype = config.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"config.dtype must be 'float32' or 'float64', got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "config.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
            "jax.config.update('jax_enable_x64', True)) before JAX starts"
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


@dataclasses.dataclass
class _Run:
    """What a run reads before it trains: the data, the targets, the steps' setup."""

    config: ml_collections.ConfigDict
    mesh: Any
    ds: dataset_lib.Dataset
    splits: dict[str, np.ndarray]
    targets: list[tasks.Target]
    labels: np.ndarray
    seeds: list[int]
    ranks: list[int]
    setup: steps.Setup
    steps_per_epoch: int
    total_steps: int


def _open_run(config: ml_collections.ConfigDict, mesh) -> _Run:
    """Reads the dataset, resolves the targets and builds the steps' setup; no device work."""
    if multi_lib.is_multi(config.dataset):
        ds = multi_lib.MultiDataset(config.dataset)
        if not models.any_structure(config.model):
            raise ValueError(
                f"{ds.path} holds LoRAs of {len(ds.structures)} structures "
                f"({', '.join(ds.names())}); model {config.model!r} takes one structure (train it "
                f"on one of {ds.path}/structures/*), models for several: "
                f"{', '.join(m for m in models.names() if models.any_structure(m))}"
            )
    else:
        ds = dataset_lib.open(config.dataset)
    splits = read_splits(ds)
    targets = tasks.resolve(ds, tuple(config.targets), splits["train"])
    B = int(config.batch_size)
    if len(splits["train"]) < B:
        raise ValueError(
            f"{ds.path}: the training split has {len(splits['train'])} LoRAs, fewer than "
            f"config.batch_size={B}"
        )
    parallel.check_divisible(B, mesh, "config.batch_size")
    if isinstance(ds, multi_lib.MultiDataset):
        steps_per_epoch = multi.steps_per_epoch(ds, splits["train"], B)
        ranks = [sub.max_ranks() for _, sub in ds.structures]
    else:
        steps_per_epoch = len(splits["train"]) // B
        ranks = ds.max_ranks()
    total_steps = steps_per_epoch * int(config.num_epochs)
    return _Run(
        config=config,
        mesh=mesh,
        ds=ds,
        splits=splits,
        targets=targets,
        labels=tasks.encode(ds, targets),
        seeds=_seeds(config),
        ranks=ranks,
        setup=steps.make_setup(config, targets, total_steps),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def _write_run_files(run: _Run, workdir: str, main: bool) -> None:
    """``config.json`` and ``targets.json`` (what the Predictor needs to rebuild the model)."""
    # Process 0 writes the run's files; the others write to nowhere.
    where = (lambda name: os.path.join(workdir, name)) if main else (lambda name: os.devnull)
    with open(where("config.json"), "w") as f:
        json.dump(_config_json(run.config), f, indent=1)
    if isinstance(run.ds, multi_lib.MultiDataset):
        # Several structures: the Predictor does not restore such runs (yet); the
        # structures are recorded for the reader.
        layout = {"structures": multi.spec_json(run.ds, run.ranks), "ranks": None, "spec": None}
        sizes = {}
    else:
        layout = {"ranks": run.ranks, "spec": dataset_lib.spec_to_json(run.ds.spec)}
        sizes = state_lib.extras_sizes(run.ds.batch(run.splits["train"][:1], ranks=run.ranks))
    with open(where("targets.json"), "w") as f:
        json.dump(
            {
                "targets": [t.to_json() for t in run.targets],
                **layout,
                "extras_sizes": sizes,
                "dataset": os.path.abspath(run.ds.path),
                "seeds": run.seeds,
            },
            f,
            indent=1,
        )


def _sources(run: _Run) -> dict[str, pipeline.Source]:
    """Every split's batches in the model's layout: held on the devices if they fit."""
    if isinstance(run.ds, multi_lib.MultiDataset):
        bytes_per_lora = max(
            sum(len(g.names) * (g.n + g.m) * r * 4 for g, r in zip(sub.spec.groups, ranks))
            for (_, sub), ranks in zip(run.ds.structures, run.ranks)
        )
        fits = len(run.splits["train"]) * bytes_per_lora <= run.config.in_memory_gb * 1e9
        return {
            name: multi.MultiSource(run.ds, run.ranks, ids, fits, run.mesh, run.setup.layout)
            for name, ids in run.splits.items()
        }
    bytes_per_lora = sum(
        len(g.names) * (g.n + g.m) * r * 4 for g, r in zip(run.ds.spec.groups, run.ranks)
    )
    fits = len(run.splits["train"]) * bytes_per_lora <= run.config.in_memory_gb * 1e9
    return {
        name: pipeline.Source(run.ds, run.ranks, ids if fits else None, run.mesh, run.setup.layout)
        for name, ids in run.splits.items()
    }


def _featurized(run: _Run, state, sources: dict[str, Any]) -> dict[str, Any]:
    """The splits' features, computed once (:mod:`gllora.train.featurized`), where the
    model's features have no parameters, nothing changes them between steps (no
    augmentation) and every seed's features of the splits fit ``config.in_memory_gb``;
    else the sources as they are."""
    config = run.config
    if not (
        config.get("precompute_features", True)
        and models.fixed_features(config.model)
        and config.augment == "none"
        and run.setup.layout == "leading"  # featurized batches are [S, B, ...]
        and not isinstance(run.ds, multi_lib.MultiDataset)
    ):
        return sources
    params, consts = state["params"], state["consts"]
    train = sources["train"]
    per_lora = featurized.feature_bytes(run.setup, params, consts, train, run.splits["train"][0])
    need = per_lora * sum(len(ids) for ids in run.splits.values())
    if need > config.in_memory_gb * 1e9:
        logging.info(
            "features of %s: %.2f GB for every seed and split, over config.in_memory_gb=%g; "
            "computed at every step instead",
            config.model,
            need / 1e9,
            config.in_memory_gb,
        )
        return sources
    t0 = time.perf_counter()
    out = {
        name: featurized.FeatureSource(
            sources[name], ids, run.setup, params, consts, int(config.batch_size)
        )
        for name, ids in run.splits.items()
    }
    logging.info(
        "features of %s computed once: %.2f GB in %.1f s", config.model, need / 1e9,
        time.perf_counter() - t0,
    )  # fmt: skip
    return out


def _train(run: _Run, state, placed, manager, sources, log: _MetricsLog, main: bool):
    """The epochs: steps, logged losses, validation after each epoch, best model, checkpoints."""
    config, mesh, seeds = run.config, run.mesh, run.seeds
    S, B = len(seeds), int(config.batch_size)
    replicated = parallel.replicated(mesh)
    train_step = jax.jit(
        functools.partial(steps.train_step, run.setup),
        donate_argnums=0,
        out_shardings=(placed, replicated),
    )
    update_best = jax.jit(steps.update_best, donate_argnums=0, out_shardings=placed)
    predict = make_predict(run.setup, mesh, sources["validation"].layout)
    # Labels [S, B, C] and weights [S, B] split along B like the batch: each process puts
    # only its devices' rows.
    label_sharding = parallel.split_along(mesh, 3, 1)
    rows = parallel.local_slice(B, mesh)
    w_dev = parallel.put(np.ones((S, B), np.float32), parallel.split_along(mesh, 2, 1))

    start = int(state["step"])
    if isinstance(run.ds, multi_lib.MultiDataset):
        indices = multi.step_batches(seeds, run.ds, run.splits["train"], B, start, run.total_steps)
        batches = multi.read_steps(sources["train"], indices)
    else:
        indices = pipeline.step_indices(seeds, run.splits["train"], B, start, run.total_steps)
        batches = pipeline.prefetch(sources["train"], indices)
    bar, t0, losses = None, time.perf_counter(), []
    for step in range(start, run.total_steps):
        ids, batch = next(batches)
        y = parallel.host_to_global(
            run.labels[ids[:, rows]], label_sharding, (S, B, run.labels.shape[-1])
        )
        state, loss = train_step(state, batch, y, w_dev)
        losses.append(loss)
        done = step + 1
        if bar is None:  # after the first step, so its compilation is not in the ETA
            bar = tqdm(
                total=run.total_steps,
                initial=done,
                disable=not (config.progress and main),
                desc=config.model,
                unit="step",
                dynamic_ncols=True,
            )
        else:
            bar.update(1)
        if done % config.log_every_steps == 0 or done % run.steps_per_epoch == 0:
            mean_loss = np.stack(parallel.to_host(losses)).mean(0)
            losses = []
            if not np.all(np.isfinite(mean_loss)):
                bad = [seeds[i] for i in np.flatnonzero(~np.isfinite(mean_loss))]
                raise FloatingPointError(
                    f"training loss became NaN/Inf at step {done} for seeds {bad} "
                    f"({config.model} on {run.ds.path}); lower config.learning_rate (now "
                    f"{config.learning_rate}) or set config.grad_clip"
                )
            log.write(
                step=done,
                split="train",
                loss=mean_loss.tolist(),
                steps_per_second=config.log_every_steps / max(time.perf_counter() - t0, 1e-9),
            )
            bar.set_postfix(loss=f"{mean_loss.mean():.4f}")
            t0 = time.perf_counter()
        if done % run.steps_per_epoch == 0:
            epoch = done // run.steps_per_epoch
            val = results_lib.evaluate_split(
                predict,
                run.targets,
                state["params"],
                state["consts"],
                sources["validation"],
                run.splits["validation"],
                run.labels,
                config.eval_batch_size,
            )
            val_loss = np.asarray([m["loss"] for m in val], np.float32)
            state = update_best(state, val_loss, np.int32(epoch))
            log.write(step=done, epoch=epoch, split="validation", metrics=val)
            if epoch % config.checkpoint_every_epochs == 0 or done == run.total_steps:
                state_lib.save(manager, done, state)
    if bar is not None:
        bar.close()
    if manager.latest_step() != run.total_steps:
        state_lib.save(manager, run.total_steps, state)
    return state, predict


def make_predict(setup: steps.Setup, mesh, layout: str):
    """:func:`steps.predict` jitted for batches in ``layout``, outputs replicated."""
    return jax.jit(
        functools.partial(steps.predict, setup, layout=layout),
        out_shardings=parallel.replicated(mesh),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.num_seeds`` models and returns (and writes) the results.

    Args:
      config: see ``experiments/configs/default.py``.
      workdir: where config, metrics, checkpoints and results go; an existing run of
        the same config there is resumed. A run that fails before its first checkpoint
        in a workdir it created leaves no workdir behind.

    Returns:
      The contents of ``results.json``.
    """
    check_config(config)
    mesh = parallel.make_mesh(int(config.get("num_devices", 0)))
    main = parallel.is_main_process()
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        return _train_and_evaluate(config, workdir, mesh, main)
    except BaseException:
        checkpoints = os.path.join(workdir, "checkpoints")
        if created and main and not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
            shutil.rmtree(workdir, ignore_errors=True)  # nothing to resume: leave nothing
        raise


def _train_and_evaluate(config, workdir: str, mesh, main: bool) -> dict[str, Any]:
    _check_workdir_config(workdir, config)
    run = _open_run(config, mesh)
    _write_run_files(run, workdir, main)

    state, placed = state_lib.initial(
        config, run.ds, run.splits["train"], run.ranks, run.seeds, run.setup, mesh
    )
    manager = state_lib.checkpoint_manager(workdir)
    if manager.latest_step() is not None:
        state = state_lib.restore(
            manager, state
        )  # onto this run's mesh, whatever the saving one was
        logging.info("resumed from step %d", int(state["step"]))
    log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), int(state["step"]), enabled=main)

    sources = _featurized(run, state, _sources(run))
    state, predict = _train(run, state, placed, manager, sources, log, main)
    results = results_lib.final_results(
        predict, run.targets, state, sources, run.splits, run.labels, config, run.seeds
    )
    where = os.path.join(workdir, "results.json") if main else os.devnull
    with open(where, "w") as f:
        json.dump(results, f, indent=1)
    return results
