"""A run's state on the mesh: built by one jitted program straight onto its shardings,
checkpointed with orbax and restored onto the current mesh, whatever the saving one was."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from gllora import parallel
from gllora.io.dataset.multi import MultiDataset
from gllora.lora import Lora
from gllora.train import multi, steps


def seed_keys(seeds) -> np.ndarray:
    """The seeds' PRNG key data, ``[S, 2]``."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])


def initial(config, ds, train_ids, ranks, seeds, setup: steps.Setup, mesh: Mesh):
    """``(state, shardings)``: every seed's state before training, made on the mesh.

    The state is replicated, but for ``GroupedDense`` kernels split under
    ``config.shard_params`` (:func:`gllora.parallel.state_shardings`).
    """
    if isinstance(ds, MultiDataset):
        scales = multi.input_scales(ds, train_ids, ranks, config.input_scale)
        templates = multi.templates(ds, train_ids, ranks, seeds)
    else:
        # Each seed draws its own O-Align template from the training split; other models
        # only use it to learn the input shapes.
        template_ids = np.asarray([np.random.default_rng([s, 7]).choice(train_ids) for s in seeds])
        scales = steps.input_scales(ds, train_ids, ranks, config.input_scale)
        templates = ds.batch(template_ids, ranks=ranks)
    build = functools.partial(steps.create_train_state, setup)
    keys = seed_keys(seeds)
    abstract = jax.eval_shape(build, keys, templates, scales)
    placed = parallel.state_shardings(abstract, mesh, config.get("shard_params", "none"))
    # One jitted program straight onto the shardings: a split kernel is never whole on
    # one device.
    return jax.jit(build, out_shardings=placed)(keys, templates, scales), placed


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


def abstract_state(setup: steps.Setup, spec, ranks, sizes, num_seeds: int):
    """Shapes and dtypes of a run's state, for restoring a checkpoint without data."""
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    keys = jax.ShapeDtypeStruct((num_seeds, *key_data.shape), key_data.dtype)
    template = zeros_lora(spec, ranks, sizes, num_seeds)
    scales = tuple(np.ones(2, np.float32) for _ in spec.groups)
    return jax.eval_shape(
        functools.partial(steps.create_train_state, setup), keys, template, scales
    )


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


def restore_onto(manager: ocp.CheckpointManager, abstract, placed, step: int | None = None):
    """The checkpoint restored onto ``placed`` shardings of the ``abstract`` state."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, placed
    )
    return restore(manager, target, step)
