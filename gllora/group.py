"""The symmetry group of the LoRA weight space: GL(r)^L and its O(r)^L subgroup.

``g`` in GL(r) acts on one module by ``(u, v) -> (u g, v g^-T)``, which leaves
``u v^T`` unchanged; a LoRA of L modules carries one independent ``g_i`` per module.
This is a right action: ``act(act(x, g1), g2) == act(x, g1 @ g2)``.

Plain ``jax.numpy``: no Flax here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from gllora import linalg
from gllora.lora import Lora

Array = jax.Array


def random_orthogonal(key: Array, r: int, batch_shape: tuple[int, ...] = ()) -> Array:
    """Haar-random orthogonal matrices, ``[*batch_shape, r, r]``."""
    return _sample(key, r, jnp.full(batch_shape, r), "o", 1.0)


def random_gl(
    key: Array, r: int, *, max_cond: float = 4.0, batch_shape: tuple[int, ...] = ()
) -> Array:
    """Random invertible matrices with condition number ``max_cond``, ``[*batch, r, r]``.

    ``g = Q1 diag(s) Q2^T`` with Haar-random ``Q1, Q2`` (so ``det g`` takes either sign)
    and log-uniform singular values stretched so that ``max(s) / min(s) == max_cond``
    exactly for ``r >= 2`` (the condition number is bounded, and reached, so tests see
    the stated worst case); ``s`` spans ``[max_cond^-1/2, max_cond^1/2]``. For ``r = 1``,
    ``g`` is a random sign times a scale in that range.
    """
    return _sample(key, r, jnp.full(batch_shape, r), "gl", max_cond)


def random_element(
    key: Array, lora: Lora, kind: str = "gl", *, max_cond: float = 4.0
) -> tuple[Array, ...]:
    """An independent random group element per module, stacked like the LoRA's groups.

    Respects padding: a module of true rank ``r0`` stored at rank ``r`` gets
    ``diag(g0, I)`` with ``g0`` in GL(r0) (or O(r0)), so its zero columns stay zero.

    Args:
      key: PRNG key.
      lora: a LoRA, batched or not (layout ``"leading"``).
      kind: ``"gl"`` or ``"o"``.
      max_cond: condition number of the GL elements.

    Returns:
      One ``[*batch, k, r, r]`` array per group.
    """
    keys = jax.random.split(key, len(lora.u))
    return tuple(
        _sample(k, u.shape[-1], rank, kind, max_cond).astype(u.dtype)
        for k, u, rank in zip(keys, lora.u, lora.rank)
    )


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _sample(key: Array, r: int, rank: Array, kind: str, max_cond: float) -> Array:
    """Group elements ``diag(g0, I)`` with ``g0`` on the leading ``rank`` block; ``[*, r, r]``."""
    return _sample_pair(key, r, rank, kind, max_cond)[0]


def _sample_pair(key: Array, r: int, rank: Array, kind: str, max_cond: float):
    """``(g, g^-T)`` for :func:`_sample`'s ``g = Q1 diag(s) Q2^T``: ``g^-T = Q1 diag(1/s) Q2^T``.

    No inverse or solve is computed (nor any LAPACK call: :func:`gllora.linalg.orthonormalize`
    makes the ``Q``s), so augmentation inside a jitted training step stays plain ``jnp``.
    """
    if kind not in ("gl", "o"):
        raise ValueError(f"unknown group {kind!r}; use 'gl' or 'o'")
    if max_cond < 1:
        raise ValueError(f"max_cond must be >= 1, got {max_cond}")
    k1, k2, k3 = jax.random.split(key, 3)
    q1 = _orthogonal_on_block(k1, r, rank)
    if kind == "o":
        return q1, q1
    q2 = _orthogonal_on_block(k2, r, rank)
    log_s = jax.random.uniform(k3, (*rank.shape, r))
    live = _live_columns(r, rank)
    lo = jnp.where(live, log_s, jnp.inf).min(-1, keepdims=True)
    hi = jnp.where(live, log_s, -jnp.inf).max(-1, keepdims=True)
    # Stretch the live log-singular values to [-1/2, 1/2]: cond == max_cond exactly. A
    # rank-1 element is a scale in [max_cond^-1/2, max_cond^1/2].
    centred = jnp.where(hi > lo, (log_s - lo) / jnp.maximum(hi - lo, 1e-12) - 0.5, log_s - 0.5)
    s = jnp.where(live, jnp.exp(centred * jnp.log(max_cond)), 1.0)
    q2t = jnp.swapaxes(q2, -1, -2)
    return (q1 * s[..., None, :]) @ q2t, (q1 / s[..., None, :]) @ q2t


def _live_columns(r: int, rank: Array) -> Array:
    """``[*, r]`` bool: which of ``r`` stored columns are within each true ``rank``."""
    return jnp.arange(r).reshape((1,) * rank.ndim + (r,)) < rank[..., None]


def _orthogonal_on_block(key: Array, r: int, rank: Array) -> Array:
    """Haar-random orthogonal on the leading ``rank`` block, identity elsewhere."""
    z = jax.random.normal(key, (*rank.shape, r, r))
    live = _live_columns(r, rank)
    z = jnp.where(live[..., :, None] & live[..., None, :], z, jnp.broadcast_to(jnp.eye(r), z.shape))
    # Gram-Schmidt of a block-diagonal matrix is block-diagonal (the identity block stays
    # the identity), and Gram-Schmidt's R has a positive diagonal, which makes Q of a
    # Gaussian matrix Haar-distributed.
    return linalg.orthonormalize(z)


@jax.jit
def act_stacked(lora: Lora, gs: tuple[Array, ...]) -> Lora:
    """The action with group elements stacked per group, ``[*batch, k, r, r]`` each."""
    _check_stacked(lora, gs)
    # v g^-T == v (g^-1)^T; g^-1 by Gauss-Jordan on [r, r] (plain jnp, no LAPACK).
    eye = [jnp.broadcast_to(jnp.eye(g.shape[-1], dtype=g.dtype), g.shape) for g in gs]
    inv_t = tuple(jnp.swapaxes(linalg.solve(g, i), -1, -2) for g, i in zip(gs, eye))
    return _act_with(lora, gs, inv_t)


def _check_stacked(lora: Lora, gs: tuple[Array, ...]) -> None:
    if len(gs) != len(lora.u):
        raise ValueError(f"expected {len(lora.u)} stacked group elements, got {len(gs)}")
    for spec, u, g in zip(lora.spec.groups, lora.u, gs):
        r = u.shape[-1]
        if g.shape[-2:] != (r, r) or g.shape[-3] != len(spec.names):
            raise ValueError(
                f"group {spec.describe()}: group element {list(g.shape)} does not "
                f"match {len(spec.names)} modules of rank {r}"
            )


def _act_with(lora: Lora, gs, inv_t) -> Lora:
    """``(u g, v g^-T)`` with ``g^-T`` given (``[*batch, k, r, r]`` per group)."""
    us = tuple(jnp.einsum("...nr,...rs->...ns", u, g) for u, g in zip(lora.u, gs))
    vs = tuple(jnp.einsum("...mr,...rs->...ms", v, h) for v, h in zip(lora.v, inv_t))
    return lora.replace(u=us, v=vs)


def act(lora: Lora, g: Mapping[str, Array]) -> Lora:
    """``(u g, v g^-T)`` for each module, with ``g = {name: [*batch, r, r]}``.

    Args:
      lora: a LoRA (layout ``"leading"``), batched or not.
      g: one invertible matrix per module name, of the module's stored rank.

    Raises:
      ValueError: a module without a group element, an unknown name, or a shape
        that does not match the module's rank.
    """
    missing = [n for n in lora.names if n not in g]
    unknown = [n for n in g if n not in lora.shapes]
    if missing or unknown:
        raise ValueError(
            f"group elements must be given for exactly the LoRA's modules: "
            f"missing {missing[:5]}, unknown {unknown[:5]}"
        )
    gs = []
    for spec, u in zip(lora.spec.groups, lora.u):
        r = u.shape[-1]
        for name in spec.names:
            if jnp.shape(g[name])[-2:] != (r, r):
                raise ValueError(
                    f"module {name!r}: group element {list(jnp.shape(g[name]))} does "
                    f"not match the module's rank {r} (expected [..., {r}, {r}])"
                )
        gs.append(jnp.stack([jnp.asarray(g[name], u.dtype) for name in spec.names], axis=-3))
    return act_stacked(lora, tuple(gs))


def random_action(key: Array, lora: Lora, kind: str = "gl", *, max_cond: float = 4.0) -> Lora:
    """``lora`` moved by an independent random element per module (data augmentation).

    The same elements as :func:`random_element` with the same key; ``g^-T`` is formed
    from ``g``'s factors, so no inverse is computed.
    """
    keys = jax.random.split(key, len(lora.u))
    pairs = [
        _sample_pair(k, u.shape[-1], rank, kind, max_cond)
        for k, u, rank in zip(keys, lora.u, lora.rank)
    ]
    gs = tuple(g.astype(u.dtype) for (g, _), u in zip(pairs, lora.u))
    inv_t = tuple(h.astype(u.dtype) for (_, h), u in zip(pairs, lora.u))
    _check_stacked(lora, gs)
    return _act_with(lora, gs, inv_t)
