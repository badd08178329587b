"""Featurizers of LoRA modules: dense products, singular values, O(r) alignment.

Each function takes one group of ``k`` same-shaped modules, ``u [..., k, n, r]`` and
``v [..., k, m, r]``, with any leading batch axes, in plain ``jax.numpy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dense(u: Array, v: Array) -> Array:
    """``u v^T`` per module, ``[..., k, n, m]``: invariant and complete, but O(nmr)."""
    return jnp.einsum("...nr,...mr->...nm", u, v)


def singular_values(u: Array, v: Array, rank: int | None = None) -> Array:
    """Singular values of ``u v^T``, largest first, never forming the ``n x m`` matrix.

    With thin QRs ``u = Q1 R1`` and ``v = Q2 R2``, ``u v^T = Q1 (R1 R2^T) Q2^T`` has the
    singular values of the small core ``R1 R2^T`` (``[r, r]``): O((n + m) r^2).

    Args:
      u: ``[..., n, r]``.
      v: ``[..., m, r]``.
      rank: how many values to return: the top ``rank`` values, zero-padded if the
        factors have fewer columns (default: ``r``).

    Returns:
      ``[..., rank]``, GL(r)-invariant.
    """
    r = u.shape[-1]
    rank = r if rank is None else rank
    _, r1 = jnp.linalg.qr(u)  # [..., min(n, r), r]
    _, r2 = jnp.linalg.qr(v)  # [..., min(m, r), r]
    core = jnp.einsum("...ir,...jr->...ij", r1, r2)
    s = jnp.linalg.svd(core, compute_uv=False)  # descending
    return _fit_last(s, rank)


def _fit_last(x: Array, size: int) -> Array:
    """Truncates or zero-pads the last axis of ``x`` to ``size``."""
    if x.shape[-1] >= size:
        return x[..., :size]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def procrustes(u: Array, v: Array, u_t: Array, v_t: Array) -> Array:
    """The orthogonal ``Q`` minimising ``|u Q - u_t|^2 + |v Q - v_t|^2`` (eq. 3), ``[..., r, r]``.

    ``Q = A B^T`` where ``A S B^T`` is the SVD of ``u^T u_t + v^T v_t`` (``[r, r]``).
    Unique when that matrix has distinct singular values (almost everywhere).
    """
    m = jnp.einsum("...nr,...ns->...rs", u, u_t) + jnp.einsum("...mr,...ms->...rs", v, v_t)
    a, _, bt = jnp.linalg.svd(m, full_matrices=False)
    return a @ bt


def oalign(u: Array, v: Array, u_t: Array, v_t: Array) -> tuple[Array, Array]:
    """``(u Q, v Q)`` aligned to the template ``(u_t, v_t)``; O(r)-invariant, not GL-invariant.

    Factors of another rank than the template are zero-padded to the larger of the two
    ranks, aligned, and cut to the template's rank: a zero-padded LoRA aligns exactly as
    the original does.

    Returns:
      ``u [..., n, r_t]``, ``v [..., m, r_t]``.
    """
    r_t = u_t.shape[-1]
    r = max(u.shape[-1], r_t)
    u, v, u_t, v_t = (_fit_last(x, r) for x in (u, v, u_t, v_t))
    q = procrustes(u, v, jnp.broadcast_to(u_t, u.shape), jnp.broadcast_to(v_t, v.shape))
    return (u @ q)[..., :r_t], (v @ q)[..., :r_t]
