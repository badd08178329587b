"""A run's state: every seed's parameters, optimiser state and best model, built on the
mesh, and its orbax checkpoints (restored onto the current mesh, whatever the saving
one was)."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gllora.lora import Lora
from gllora.train.programs import Programs, input_scales


def initial(config, ds, train_ids, ranks, seeds, programs: Programs) -> dict[str, Any]:
    """The state of every seed before training, made on the mesh (see :meth:`gllora.train.programs.Programs.place`)."""
    # Each seed draws its own O-Align template from the training split; other models
    # only use it to learn the input shapes.
    template_ids = np.asarray([np.random.default_rng([s, 7]).choice(train_ids) for s in seeds])
    scales = input_scales(ds, train_ids, ranks, config.input_scale)
    templates = ds.batch(template_ids, ranks=ranks)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    build = functools.partial(_build, programs)
    shardings = programs.place(jax.eval_shape(build, keys, templates, scales))
    # Made by one jitted program straight onto its shardings: a split kernel is never
    # whole on one device.
    return jax.jit(build, out_shardings=shardings)(keys, templates, scales)


def _build(programs: Programs, keys, templates: Lora, scales) -> dict[str, Any]:
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
    return jax.eval_shape(functools.partial(_build, programs), keys, template, scales)


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
    )


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, like, step: int | None = None):
    """The checkpoint at ``step`` (default: the latest) restored onto ``like``'s shardings.

    ``like``: arrays, or shape-dtype structs that carry a sharding: a checkpoint written
    on any number of devices is re-sharded onto them.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(
        step if step is not None else manager.latest_step(), args=ocp.args.StandardRestore(abstract)
    )
