"""The LoRA weight space: a pytree of per-module low-rank factors.

One adapted weight matrix ("module") is a pair ``u [n, r]``, ``v [m, r]`` with
``delta = u @ v.T`` of shape ``[n, m]`` (``n`` output features, ``m`` input
features; a conv kernel is flattened to ``m = in * kh * kw``). A :class:`Lora`
holds an ordered set of named modules, possibly of different shapes and ranks,
with optional leading batch axes.

Modules of the same ``(n, m)`` are stored stacked, as one *group*:
``u [*batch, k, n, r]``, ``v [*batch, k, m, r]``, so models process each group
with one batched contraction and run time and compile time scale with the number
of distinct shapes, not the number of modules. Modules of one group with
different ranks are zero-padded to the group's largest rank; zero columns leave
``u @ v.T`` unchanged, so padding is exact. The true rank of every module is kept
in ``rank [*batch, k]`` (an array, so LoRAs of different ranks can be padded to a
common rank and batched).

A ``Lora`` is a JAX pytree whose structure is its :class:`LoraSpec` (the module
names and groups); stacking LoRAs with :func:`stack` makes a batch, and
:func:`in_axes` gives the ``vmap`` axes of a batch in either of :data:`LAYOUTS`.

The class itself is defined in the numpy-only :mod:`gllora._lora` (so that readers
build LoRAs of numpy arrays without JAX) and the structure in :mod:`gllora.spec`;
this module registers the class as a pytree and adds the JAX batching helpers.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

from gllora._lora import Lora
from gllora.spec import LAYOUTS, GroupSpec, LoraSpec, check_layout, check_match

__all__ = [
    "LAYOUTS",
    "GroupSpec",
    "Lora",
    "LoraSpec",
    "batch_axes",
    "in_axes",
    "seed_axes",
    "split_seeds",
    "stack",
    "take_examples",
    "to_layout",
]

Array = jax.Array


def _flatten_with_keys(lora: Lora):
    keys = jax.tree_util.GetAttrKey
    children = (
        (keys("u"), lora.u),
        (keys("v"), lora.v),
        (keys("rank"), lora.rank),
        (keys("extras"), lora.extras),
    )
    return children, lora.spec


def _flatten(lora: Lora):
    return (lora.u, lora.v, lora.rank, lora.extras), lora.spec


def _unflatten(spec: LoraSpec, children) -> Lora:
    u, v, rank, extras = children
    return Lora(spec, u, v, rank, extras)


jax.tree_util.register_pytree_with_keys(Lora, _flatten_with_keys, _unflatten, _flatten)


# -- batches ------------------------------------------------------------------


def stack(loras: Iterable[Lora], layout: str = "leading") -> Lora:
    """Stacks single LoRAs of the same structure into a batch.

    LoRAs whose groups have different ranks are zero-padded to the largest rank of
    each group first (exact). ``layout`` picks where the batch axis goes: see ``LAYOUTS``.
    Use :func:`in_axes` to ``vmap`` a per-example function over the result.
    """
    loras = list(loras)
    if not loras:
        raise ValueError("stack: no LoRAs given")
    first = loras[0]
    for i, lora in enumerate(loras[1:], 1):
        check_match(first.spec, lora.spec, f"stack: LoRA {i} differs from LoRA 0", extras=True)
        if lora.batch_shape:
            raise ValueError(f"stack: LoRA {i} is already batched {list(lora.batch_shape)}")
    ranks = [max(l.u[g].shape[-1] for l in loras) for g in range(len(first.u))]
    loras = [l.pad_rank(ranks) for l in loras]
    batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *loras)
    return to_layout(batch, "leading", layout)


def to_layout(batch: Lora, src: str, dst: str) -> Lora:
    """Moves the (single) batch axis of ``batch`` from layout ``src`` to ``dst``."""
    check_layout(src)
    check_layout(dst)
    if src == dst:
        return batch
    src_axes, dst_axes = in_axes(batch, src), in_axes(batch, dst)
    return jax.tree_util.tree_map(lambda x, a, b: jnp.moveaxis(x, a, b), batch, src_axes, dst_axes)


def in_axes(batch: Lora, layout: str = "leading") -> Lora:
    """The ``vmap`` ``in_axes`` pytree for a batch in ``layout`` (a Lora of ints).

    ``"leading"``: every leaf has the batch at axis 0. ``"rank_major"``: factors have it
    at -2 (``[k, n, B, r]``), ranks and extras at -1 (``[k, B]``, ``[size, B]``).
    """
    return batch_axes(batch, layout)


def batch_axes(batch: Lora, layout: str, *, seeds: bool = False) -> Lora:
    """Per leaf, the axis of the example axis ``B`` of a batch in ``layout`` (a Lora of ints).

    With ``seeds``, the batch also has a seed axis ``S`` right before ``B`` (the engine's
    ``[S, B, k, n, r]`` or ``[k, n, S, B, r]``; see :func:`seed_axes`). This is the one
    place that knows where each layout keeps its batch axes: ``vmap`` axes, seed splits,
    gathers and shardings are all derived from it.
    """
    if check_layout(layout) == "leading":
        return jax.tree_util.tree_map(lambda _: 1 if seeds else 0, batch)
    return batch.replace(
        u=tuple(-2 for _ in batch.u),
        v=tuple(-2 for _ in batch.v),
        rank=tuple(-1 for _ in batch.rank),
        extras=jax.tree_util.tree_map(lambda _: -1, batch.extras),
    )


def seed_axes(batch: Lora, layout: str) -> Lora:
    """Per leaf, the axis of the seed axis ``S`` of a seeded batch (right before ``B``)."""
    if check_layout(layout) == "leading":
        return jax.tree_util.tree_map(lambda _: 0, batch)
    return jax.tree_util.tree_map(lambda a: a - 1, batch_axes(batch, layout))


def split_seeds(batch: Lora, seeds: int, layout: str) -> Lora:
    """A batch of ``S * B`` examples reshaped to ``S`` seeds of ``B`` (a view for numpy).

    Works on numpy and JAX arrays alike; the example axis is split in place into
    ``(S, B)``, seed-major.
    """

    def split(x, axis):
        shape, axis = list(x.shape), axis % x.ndim
        shape[axis : axis + 1] = [seeds, shape[axis] // seeds]
        return x.reshape(shape)

    return jax.tree_util.tree_map(split, batch, batch_axes(batch, layout))


def take_examples(batch: Lora, pos: Array, layout: str) -> Lora:
    """Examples ``pos`` (any integer shape) of a batch; ``pos``'s axes replace ``B``."""
    return jax.tree_util.tree_map(
        lambda x, axis: jnp.take(x, pos, axis=axis % x.ndim), batch, batch_axes(batch, layout)
    )
