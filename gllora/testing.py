"""Random LoRAs and symmetry checks, shared by the test suite and by users' own models.

>>> lora = random_lora(key, {"q": (32, 48), "k": (32, 48)}, rank=4)
>>> assert_invariant(lambda x: model.apply(variables, x), key, lora)        # GL(r)^L
>>> assert_equivariant(lambda x: trunk.apply(variables, x), key, lora)

The group elements come from :func:`gllora.group.random_element`, the same sampler the
training engine uses for augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gllora import group
from gllora.lora import Lora

Array = jax.Array


def random_lora(
    key: Array,
    shapes: Mapping[str, tuple[int, int]] | Sequence[tuple[str, int, int]],
    rank: int | Mapping[str, int] = 4,
    *,
    batch_shape: tuple[int, ...] = (),
    scale: float = 1.0,
    dtype: Any = jnp.float32,
) -> Lora:
    """A LoRA with i.i.d. normal factors (entries ``scale / sqrt(r)``-distributed).

    Args:
      key: PRNG key.
      shapes: ``{name: (n, m)}`` or ``[(name, n, m), ...]``.
      rank: one rank, or one per module name.
      batch_shape: leading batch axes.
    """
    items = (
        list(shapes.items()) if isinstance(shapes, Mapping) else [(n, (a, b)) for n, a, b in shapes]
    )
    factors = {}
    for k, (name, (n, m)) in zip(jax.random.split(key, len(items)), items):
        r = rank[name] if isinstance(rank, Mapping) else rank
        ku, kv = jax.random.split(k)
        std = scale / np.sqrt(r)
        factors[name] = (
            std * jax.random.normal(ku, (*batch_shape, n, r), dtype),
            std * jax.random.normal(kv, (*batch_shape, m, r), dtype),
        )
    return Lora.from_factors(factors)


def assert_invariant(
    fn: Callable[[Lora], Any],
    key: Array,
    lora: Lora,
    *,
    kind: str = "gl",
    max_cond: float = 4.0,
    trials: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    jit: bool = True,
) -> None:
    """Asserts ``fn(lora . g) == fn(lora)`` for random ``g`` (one per module).

    Args:
      fn: the function to check; any pytree output.
      key: PRNG key for the group elements.
      lora: the input, batched or not.
      kind: ``"gl"`` (GL(r)^L) or ``"o"`` (O(r)^L).
      max_cond: condition number of the GL elements.
      trials: how many random elements to try.
      jit: compile ``fn`` once (much faster than running it op by op).

    Raises:
      AssertionError: with the largest deviation, if ``fn`` is not invariant.
    """
    fn = jax.jit(fn) if jit else fn
    expected = fn(lora)
    for trial, k in enumerate(jax.random.split(key, trials)):
        moved = group.random_action(k, lora, kind, max_cond=max_cond)
        try:
            chex.assert_trees_all_close(fn(moved), expected, rtol=rtol, atol=atol)
        except AssertionError as e:
            raise AssertionError(
                f"not invariant under {kind.upper()}(r) (trial {trial}, max_cond={max_cond}): {e}"
            ) from None


def assert_equivariant(
    fn: Callable[[Lora], Lora],
    key: Array,
    lora: Lora,
    *,
    kind: str = "gl",
    max_cond: float = 4.0,
    trials: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    jit: bool = True,
) -> None:
    """Asserts ``fn(lora . g) == fn(lora) . g`` for random ``g`` (one per module).

    ``fn`` maps a LoRA to a LoRA with the same modules and ranks (shapes may change).

    Raises:
      AssertionError: with the largest deviation, if ``fn`` is not equivariant.
    """
    fn = jax.jit(fn) if jit else fn
    out = fn(lora)
    for trial, k in enumerate(jax.random.split(key, trials)):
        g = group.random_element(k, lora, kind, max_cond=max_cond)
        lhs = fn(group.act_stacked(lora, g))
        rhs = group.act_stacked(out, g)
        try:
            chex.assert_trees_all_close((lhs.u, lhs.v), (rhs.u, rhs.v), rtol=rtol, atol=atol)
        except AssertionError as e:
            raise AssertionError(
                f"not equivariant under {kind.upper()}(r) (trial {trial}, max_cond={max_cond}): {e}"
            ) from None


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two pytrees of arrays."""
    diffs = jax.tree_util.tree_map(
        lambda x, y: jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))), a, b
    )
    return float(max(jax.tree_util.tree_leaves(diffs)))
