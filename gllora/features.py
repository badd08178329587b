"""Featurizers of LoRA modules: dense products, singular values, O(r) alignment.

Each function takes one group of ``k`` same-shaped modules, ``u [..., k, n, r]`` and
``v [..., k, m, r]``, with any leading batch axes, in plain ``jax.numpy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gllora import linalg

Array = jax.Array


def dense(u: Array, v: Array) -> Array:
    """``u v^T`` per module, ``[..., k, n, m]``: invariant and complete, but O(nmr)."""
    return jnp.einsum("...nr,...mr->...nm", u, v)


#: Which factors :func:`singular_values` reads twice (see there).
REFINE = ("none", "u", "both")


def singular_values(u: Array, v: Array, rank: int | None = None, *, refine: str = "u") -> Array:
    """Singular values of ``u v^T``, largest first, never forming the ``n x m`` matrix.

    With ``R_u^T R_u = u^T u`` and ``R_v^T R_v = v^T v`` (``[r, r]`` each),
    ``u v^T = Q_u R_u R_v^T Q_v^T`` for some ``Q_u``, ``Q_v`` with orthonormal columns, so
    ``u v^T`` has the singular values of the small core ``R_u R_v^T``: O((n + m) r^2).
    The square roots come from the Gram matrices by Jacobi (:mod:`gllora.linalg`), the
    core's singular values by one-sided Jacobi: plain ``jnp``, no LAPACK call, so no
    batch of them can deadlock jaxlib's CPU thread pool.

    Accuracy (float32, against float64 numpy: ``benchmarks/accuracy_svd.py``). A factor
    read once gives its Gram matrix an absolute error of about ``eps |x|^2``: a value
    ``1 / c`` of the largest comes out with a relative error of about ``2 eps c^2``
    (3e-4 at ``c = 100``, 3e-2 at 1,000), where ``c`` is that factor's own condition
    number. A factor read twice (:func:`gllora.linalg.gram_sqrt`) keeps about
    ``eps c``, as a Householder QR does. The default refines ``u`` only: in a LoRA
    ``u = scale * B`` is trained from zero and carries the spread of singular values
    (condition numbers up to 10^2 in the built-in persona LoRAs), while ``v = A^T``
    stays near its random initialisation (condition 1-2 there), whose Gram matrix is
    exact enough; and ``u`` is the smaller factor of most layers (output side), so the
    second pass is cheap.

    Args:
      u: ``[..., n, r]``.
      v: ``[..., m, r]``.
      rank: how many values to return: the top ``rank`` values, zero-padded if the
        factors have fewer columns (default: ``r``).
      refine: which factors to read twice: ``"u"`` (default), ``"both"`` (LAPACK-like
        accuracy for any input), ``"none"`` (fastest).

    Returns:
      ``[..., rank]``, GL(r)-invariant.
    """
    if refine not in REFINE:
        raise ValueError(f"refine must be one of {REFINE}, got {refine!r}")
    r = u.shape[-1]
    rank = r if rank is None else rank
    # One Jacobi solve for both Gram matrices (stacked): the solver's cost on CPU is
    # mostly per operation, not per matrix.
    w, vecs = linalg.eigh(jnp.stack([linalg.gram(u), linalg.gram(v)]), sort=False)
    if refine != "none":
        # Second pass: rotate to the first pass's eigenvectors, where the Gram matrices'
        # rounding is relative to each column's own norm (see linalg.gram_sqrt).
        again = [linalg.gram(linalg.rotate(u, vecs[0]))]
        if refine == "both":
            again.append(linalg.gram(linalg.rotate(v, vecs[1])))
        w2, z = linalg.eigh(jnp.stack(again), sort=False)
        vecs = jnp.concatenate(
            [jnp.einsum("...ts,...sr->...tr", vecs[: len(again)], z), vecs[len(again) :]]
        )
        w = jnp.concatenate([w2, w[len(again) :]])
    roots = jnp.sqrt(jnp.maximum(w, 0))[..., :, None] * jnp.swapaxes(vecs, -1, -2)
    core = jnp.einsum("...ij,...kj->...ik", roots[0], roots[1])
    return _fit_last(linalg.singular_values(core), rank)


def _fit_last(x: Array, size: int) -> Array:
    """Truncates or zero-pads the last axis of ``x`` to ``size``."""
    if x.shape[-1] >= size:
        return x[..., :size]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def procrustes(u: Array, v: Array, u_t: Array, v_t: Array) -> Array:
    """The orthogonal ``Q`` minimising ``|u Q - u_t|^2 + |v Q - v_t|^2`` (eq. 3), ``[..., r, r]``.

    ``Q = A B^T`` where ``A S B^T`` is the SVD of ``u^T u_t + v^T v_t`` (``[r, r]``): its
    polar factor, by one-sided Jacobi (:func:`gllora.linalg.polar`, no LAPACK). Unique
    when that matrix is nonsingular (almost everywhere); a zero-padded input aligns as
    the original.
    """
    m = jnp.einsum("...nr,...ns->...rs", u, u_t) + jnp.einsum("...mr,...ms->...rs", v, v_t)
    return linalg.polar(m)


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
