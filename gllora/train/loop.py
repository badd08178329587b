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

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from gllora import group, models, parallel
from gllora.io import dataset as dataset_lib
from gllora.lora import Lora, in_axes
from gllora.train import pipeline, tasks

Array = jax.Array
# Fields that may differ when a run is resumed (they do not change the results, beyond
# float32 rounding for the device layout).
_RESUMABLE = ("progress", "log_every_steps", "num_devices", "shard_params")


# -- configuration -----------------------------------------------------------------


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


def build_model(config: ml_collections.ConfigDict, num_outputs: int):
    hparams = dict(config.models[config.model])
    return models.build(config.model, num_outputs=num_outputs, **hparams)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    lr = (
        optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
        if config.schedule == "cosine"
        else config.learning_rate
    )
    if config.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.sgd(lr, momentum=0.9)
    if config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


# -- the model as a function of one example --------------------------------------------


def scale_input(lora: Lora, scales: tuple[Array, ...]) -> Lora:
    """Multiplies each group's ``u`` and ``v`` by fixed scalars (``scales[g] = [c_u, c_v]``).

    Scalars commute with every ``g``: GL-invariant models stay GL-invariant. They put
    LoRA entries of any magnitude (~1e-3 for real adapters) in the range where
    LayerNorm's epsilon does not swamp the signal.
    """
    return lora.replace(
        u=tuple(u * s[0] for u, s in zip(lora.u, scales)),
        v=tuple(v * s[1] for v, s in zip(lora.v, scales)),
    )


def input_scales(
    ds: dataset_lib.Dataset, ids: np.ndarray, ranks, enabled: bool
) -> tuple[np.ndarray, ...]:
    """Per group ``[1/rms(u), 1/rms(v)]`` over up to 256 training LoRAs (or ones); numpy."""
    if not enabled:
        return tuple(np.ones(2, np.float32) for _ in ds.spec.groups)
    sample = ds.batch(np.sort(ids[:256]), ranks=ranks)
    out = []
    for u, v, rank in zip(sample.u, sample.v, sample.rank):
        live = rank.sum() * 1.0  # number of live columns over the sample
        rms = lambda x, rows: math.sqrt(
            float((x.astype(np.float64) ** 2).sum()) / max(live * rows, 1.0)
        )
        cu, cv = rms(u, u.shape[-2]), rms(v, v.shape[-2])
        out.append(np.asarray([1.0 / max(cu, 1e-30), 1.0 / max(cv, 1e-30)], np.float32))
    return tuple(out)


class Programs:
    """The jitted programs of a run: init, train step, prediction, best-model bookkeeping.

    They run on ``mesh`` (default: every device): batches come split along ``B``,
    predictions return replicated, and :meth:`place` pins the state's shardings.
    """

    def __init__(self, config, model, targets, tx, mesh: Mesh | None = None):
        self.config, self.model, self.targets, self.tx = config, model, targets, tx
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        replicated = parallel.replicated(self.mesh)
        self.state_shardings = None
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.predict = jax.jit(self._predict, out_shardings=replicated)
        self.init = jax.jit(self._init)
        self.update_best = jax.jit(self._update_best, donate_argnums=0)

    def place(self, abstract, strict: bool = True):
        """Shardings of the state ``abstract`` on the mesh; the steps keep the state on them.

        Replicated, except the ``GroupedDense`` kernels under ``config.shard_params``
        (``strict=False``: replicate a kernel that does not split evenly).
        """
        shard_params = self.config.get("shard_params", "none")
        self.state_shardings = parallel.state_shardings(abstract, self.mesh, shard_params, strict)
        replicated = parallel.replicated(self.mesh)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(self.state_shardings, replicated)
        )
        self.update_best = jax.jit(
            self._update_best, donate_argnums=0, out_shardings=self.state_shardings
        )
        return self.state_shardings

    def _apply(self, params, consts, lora, train, key):
        lora = scale_input(lora, consts["input_scale"])
        variables = {"params": params, **{k: v for k, v in consts.items() if k != "input_scale"}}
        if not train:
            return self.model.apply(variables, lora)
        k_drop, k_aug = jax.random.split(key)
        if self.config.augment != "none":
            lora = group.random_action(
                k_aug, lora, self.config.augment, max_cond=self.config.augment_max_cond
            )
        return self.model.apply(variables, lora, train=True, rngs={"dropout": k_drop})

    def _init(self, key, template: Lora, scales):
        variables = self.model.init(key, scale_input(template, scales))
        params = variables.pop("params")
        return params, {**variables, "input_scale": scales}

    def _train_step(self, state, batch: Lora, y, w):
        """One step for every seed: ``batch`` ``[k, n, S, B, r]``, ``y [S, B, C]``, ``w [S, B]``."""
        step = state["step"]

        def per_seed(params, opt_state, consts, key_data, lora, y, w):
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
            keys = jax.random.split(key, y.shape[0])

            def loss_fn(p):
                out = jax.vmap(
                    lambda x, k: self._apply(p, consts, x, True, k),
                    in_axes=(in_axes(lora, "rank_major"), 0),
                )(lora, keys)
                return tasks.loss(self.targets, out, y, w)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params, opt_state, loss = jax.vmap(
            per_seed, in_axes=(0, 0, 0, 0, pipeline.seed_in_axes(batch), 0, 0)
        )(state["params"], state["opt_state"], state["consts"], state["key"], batch, y, w)
        return {**state, "params": params, "opt_state": opt_state, "step": step + 1}, loss

    def _predict(self, params, consts, lora: Lora):
        """Outputs of every seed on one rank-major batch: ``[S, B, num_outputs]``."""

        def per_seed(p, c):
            return jax.vmap(
                lambda x: self._apply(p, c, x, False, None), in_axes=(in_axes(lora, "rank_major"),)
            )(lora)

        return jax.vmap(per_seed)(params, consts)

    @staticmethod
    def _update_best(state, val_loss, epoch):
        improved = val_loss < state["best_loss"]
        pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        return {
            **state,
            "best_params": jax.tree_util.tree_map(pick, state["params"], state["best_params"]),
            "best_loss": jnp.where(improved, val_loss, state["best_loss"]),
            "best_epoch": jnp.where(improved, epoch, state["best_epoch"]),
        }


# -- the run -----------------------------------------------------------------------


def _seeds(config) -> list[int]:
    return [int(config.seed) + s for s in range(int(config.num_seeds))]


def _splits(ds: dataset_lib.Dataset) -> dict[str, np.ndarray]:
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
    mesh = parallel.make_mesh(int(config.get("num_devices", 0)))
    main = parallel.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(workdir, config)
    ds = dataset_lib.open(config.dataset)
    splits = _splits(ds)
    targets = tasks.resolve(ds, tuple(config.targets), splits["train"])
    labels = tasks.encode(ds, targets)
    num_outputs = sum(t.num_outputs for t in targets)
    model = build_model(config, num_outputs)
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
    tx = make_optimizer(config, total_steps)
    programs = Programs(config, model, targets, tx, mesh)
    ranks = ds.max_ranks()

    # Process 0 writes the run's files; the others write to nowhere.
    where = (lambda name: os.path.join(workdir, name)) if main else (lambda name: os.devnull)
    with open(where("config.json"), "w") as f:
        json.dump(_config_json(config), f, indent=1)
    sizes = extras_sizes(ds.batch(splits["train"][:1], ranks=ranks))
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

    state = _initial_state(config, ds, splits["train"], ranks, seeds, programs)
    manager = _checkpoint_manager(workdir)
    if manager.latest_step() is not None:
        state = _restore(manager, state)  # onto this run's mesh, whatever the saving one was
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
            val = evaluate_split(
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
                _save(manager, done, state)
    bar.close()
    if manager.latest_step() != total_steps:
        _save(manager, total_steps, state)
    results = final_results(programs, state, eval_src, splits, labels, config, seeds)
    with open(where("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _initial_state(config, ds, train_ids, ranks, seeds, programs: Programs) -> dict[str, Any]:
    """The state of every seed before training, made on the mesh (see :meth:`Programs.place`)."""
    # Each seed draws its own O-Align template from the training split; other models
    # only use it to learn the input shapes.
    template_ids = np.asarray([np.random.default_rng([s, 7]).choice(train_ids) for s in seeds])
    scales = input_scales(ds, train_ids, ranks, config.input_scale)
    templates = ds.batch(template_ids, ranks=ranks)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    build = functools.partial(_build_state, programs)
    shardings = programs.place(jax.eval_shape(build, keys, templates, scales))
    # Made by one jitted program straight onto its shardings: a split kernel is never
    # whole on one device.
    return jax.jit(build, out_shardings=shardings)(keys, templates, scales)


def _build_state(programs: Programs, keys, templates: Lora, scales) -> dict[str, Any]:
    """The initial state from the seeds' key data ``[S, 2]`` and templates ``[S, ...]``."""
    init_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), 1))(keys)
    params, consts = jax.vmap(programs._init, in_axes=(0, 0, None))(init_keys, templates, scales)
    S = keys.shape[0]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "consts": consts,
        "opt_state": jax.vmap(programs.tx.init)(params),
        # A copy: the train step donates its state, and one buffer cannot be donated twice.
        "best_params": jax.tree_util.tree_map(jnp.copy, params),
        "best_loss": jnp.full((S,), jnp.inf, jnp.float32),
        "best_epoch": jnp.zeros((S,), jnp.int32),
        "key": jnp.asarray(keys),
    }


def zeros_lora(spec, ranks, extras_sizes, batch: int | None = None) -> Lora:
    """A LoRA of zeros with the given structure (shapes for init and restore)."""
    lead = () if batch is None else (batch,)
    groups = list(zip(spec.groups, ranks))
    return Lora(
        spec,
        [np.zeros((*lead, len(g.names), g.n, r), np.float32) for g, r in groups],
        [np.zeros((*lead, len(g.names), g.m, r), np.float32) for g, r in groups],
        [np.full((*lead, len(g.names)), r, np.int32) for g, r in groups],
        {
            kind: {name: np.zeros((*lead, extras_sizes[kind][name]), np.float32) for name in names}
            for kind, names in spec.extras
        },
    )


def extras_sizes(lora: Lora) -> dict[str, dict[str, int]]:
    return {
        kind: {name: int(x.shape[-1]) for name, x in per.items()}
        for kind, per in lora.extras.items()
    }


def abstract_state(programs: Programs, spec, ranks, sizes, num_seeds: int):
    """Shapes and dtypes of a run's state, for restoring a checkpoint without data."""
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    keys = jax.ShapeDtypeStruct((num_seeds, *key_data.shape), key_data.dtype)
    template = zeros_lora(spec, ranks, sizes, num_seeds)
    scales = tuple(np.ones(2, np.float32) for _ in spec.groups)
    return jax.eval_shape(functools.partial(_build_state, programs), keys, template, scales)


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
    )


def _save(manager: ocp.CheckpointManager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, like, step: int | None = None):
    """The checkpoint at ``step`` (default: the latest) restored onto ``like``'s shardings.

    ``like``: arrays, or shape-dtype structs that carry a sharding: a checkpoint written
    on any number of devices is re-sharded onto them.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(
        step if step is not None else manager.latest_step(), args=ocp.args.StandardRestore(abstract)
    )


def predict_split(
    programs: Programs, params, consts, source: pipeline.Source, ids: np.ndarray, batch_size: int
) -> np.ndarray:
    """Outputs of every seed on ``ids``: ``[S, N, num_outputs]`` (batches padded to one shape).

    Batches are split over the source's mesh (``batch_size`` rounded up to a multiple of
    its device count); the outputs come back whole on every process.
    """
    size = parallel.round_up(batch_size, source.mesh)
    outs = []
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])
        out = programs.predict(params, consts, source.read(padded))
        outs.append(parallel.to_host(out)[:, : len(chunk)])
    return np.concatenate(outs, axis=1)


def evaluate_split(
    programs, params, consts, source, ids, labels, batch_size
) -> list[dict[str, Any]]:
    """Per-seed metrics of ``params`` on ``ids``."""
    outputs = predict_split(programs, params, consts, source, ids, batch_size)
    return [tasks.metrics(programs.targets, out, labels[ids]) for out in outputs]


def final_results(programs, state, sources, splits, labels, config, seeds) -> dict[str, Any]:
    """Metrics of each seed's best model on train, validation and test (read once, here)."""
    per_seed = [
        {"seed": s, "best_epoch": int(e)}
        for s, e in zip(seeds, parallel.to_host(state["best_epoch"]))
    ]
    for split in ("train", "validation", "test"):
        metrics = evaluate_split(
            programs,
            state["best_params"],
            state["consts"],
            sources[split],
            splits[split],
            labels,
            config.eval_batch_size,
        )
        for entry, m in zip(per_seed, metrics):
            entry[split] = m
    return {
        "model": config.model,
        "targets": [t.name for t in programs.targets],
        "num_seeds": len(seeds),
        "per_seed": per_seed,
        "summary": summarize(per_seed),
    }


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``{split: {target: {metric: {"mean", "std"}}}}`` over seeds (std with ddof=0)."""
    return {
        split: mean_std([entry[split] for entry in per_seed])
        for split in ("train", "validation", "test")
    }


def mean_std(values: list[Any]) -> Any:
    """Mean and standard deviation, leaf by leaf, of equally structured nested dicts."""
    if isinstance(values[0], dict):
        return {k: mean_std([v[k] for v in values]) for k in values[0]}
    arr = np.asarray(values, np.float64)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr))}
