"""GL(r)-equivariant maps and invariants on stacked LoRA factors, in plain ``jax.numpy``.

Every function takes one group of ``k`` same-shaped modules, ``u [k, n, r]`` and
``v [k, m, r]``, and treats the modules independently (each carries its own ``g_i``).
No Flax here: :mod:`gllora.layers` wraps these with parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import custom_batching

Array = jax.Array


@custom_batching.custom_vmap
def equivariant_linear(kernel: Array, u: Array) -> Array:
    """``Phi_i @ u_i`` per module (eq. 4) with ``Phi_i = kernel_i^T``.

    Args:
      kernel: ``[k, n, d]``, input rows first as in a Flax ``Dense`` kernel.
      u: ``[k, n, r]``.

    Returns:
      ``[k, d, r]``. Left multiplication commutes with the right action ``u -> u g``, and
      these maps are all the GL-equivariant linear maps (Proposition 1).

    Under ``vmap`` over the LoRAs (not the kernel), the batch is folded into the rank
    axis: one ``[n, d]^T @ [n, B * r]`` product per module. Left to itself, XLA keeps
    ``B`` and ``r`` apart and, for the kernel's gradient, transposes the whole input
    batch with a minor axis of size ``r``: about 6x slower per training step on CPU
    (``benchmarks/bench_models.py``).
    """
    return jnp.einsum("knd,knr->kdr", kernel, u)


@equivariant_linear.def_vmap
def _equivariant_linear_vmap(axis_size, in_batched, kernel, u):
    kernel_batched, u_batched = in_batched
    if kernel_batched or not u_batched:  # e.g. several models at once: the generic rule
        fn = lambda a, b: jnp.einsum("knd,knr->kdr", a, b)
        axes = (0 if kernel_batched else None, 0 if u_batched else None)
        return jax.vmap(fn, in_axes=axes, axis_size=axis_size)(kernel, u), True
    folded = jnp.moveaxis(u, 0, 2)  # [k, n, B, r]: a no-op for rank-major batches
    k, n, b, r = folded.shape
    out = jnp.einsum("knd,knc->kdc", kernel, folded.reshape(k, n, b * r))
    return jnp.moveaxis(out.reshape(k, -1, b, r), 2, 0), True


@custom_batching.custom_vmap
def grouped_dense(x: Array, kernel: Array) -> Array:
    """``sum_k x_k @ kernel_k``: ``x [k, F]``, ``kernel [k, F, h]`` -> ``[h]``.

    Under ``vmap`` over ``x`` this is one ``[B, k F] @ [k F, h]`` product (the kernel's
    reshape is free), instead of a batched contraction that copies the kernel.
    """
    return jnp.einsum("kf,kfh->h", x, kernel)


@grouped_dense.def_vmap
def _grouped_dense_vmap(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if kernel_batched or not x_batched:
        fn = lambda a, b: jnp.einsum("kf,kfh->h", a, b)
        axes = (0 if x_batched else None, 0 if kernel_batched else None)
        return jax.vmap(fn, in_axes=axes, axis_size=axis_size)(x, kernel), True
    b = x.shape[0]
    return x.reshape(b, -1) @ kernel.reshape(-1, kernel.shape[-1]), True


def row_sums(u: Array, v: Array) -> tuple[Array, Array]:
    """Row and column sums of ``u v^T`` without forming it: ``([k, n], [k, m])``.

    ``(u v^T) 1 = u (v^T 1)`` and ``1^T (u v^T) = (u^T 1)^T v^T``: O((n + m) r).
    """
    rows = jnp.einsum("knr,kr->kn", u, v.sum(axis=1))
    cols = jnp.einsum("kmr,kr->km", v, u.sum(axis=1))
    return rows, cols


def relu_sign(x: Array) -> Array:
    """``ReLU(sign(x))``: 1 where ``x > 0``, else 0 (no gradient flows through it)."""
    return (x > 0).astype(x.dtype)


#: Scalar nonlinearities for :func:`gl_nonlinearity`; any function R -> R is equivariant there.
SIGMAS: dict[str, Callable[[Array], Array]] = {
    "relu_sign": relu_sign,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
}


def gl_nonlinearity(u: Array, v: Array, sigma: Callable[[Array], Array]) -> tuple[Array, Array]:
    """The GL nonlinearity of eq. 6: scale row ``i`` of ``u`` by ``sigma(row sum i of u v^T)``
    and row ``j`` of ``v`` by ``sigma(column sum j)``. Shapes are kept.

    ``u v^T`` is invariant and rows of ``u`` are acted on independently, so this is
    equivariant for any ``sigma`` (Lemma 2).
    """
    rows, cols = row_sums(u, v)
    return sigma(rows)[..., None] * u, sigma(cols)[..., None] * v


def invariant_gate(
    u: Array, v: Array, b_u: Array, b_v: Array, scale: Array, shift: Array
) -> tuple[Array, Array]:
    """A gate on each row from a learned, normalised invariant (an alternative to eq. 6).

    Row ``i`` of ``u`` is scaled by ``sigmoid(a_i z_i / rms(z) + c_i)`` with
    ``z = (u v^T) b_u = u (v^T b_u)`` (``b_u = 1`` gives eq. 6's row sums), ``rms`` over the
    module's rows, and learned ``a, c``; the same for ``v`` with ``(v u^T) b_v``. ``z`` is a
    function of ``u v^T``, hence invariant, so the map is equivariant (Lemma 2). Eq. 6's
    ``relu(sign(row sum))`` is a 0/1 mask whose pattern, on LoRAs whose row-sum signs are
    coin flips, differs from one LoRA to the next; this gate is smooth, does not grow with
    the rank (the normalisation), and its bias can learn to hold a row open.

    Args:
      u: ``[k, n, r]``; v: ``[k, m, r]``.
      b_u: ``[k, m]``, b_v: ``[k, n]``: the learned directions.
      scale, shift: ``[2, k, max(n, m)]``: per row, for ``u`` (index 0, first ``n``) and
        ``v`` (index 1, first ``m``).

    Returns:
      ``(u', v')``, shapes kept.
    """
    n, m = u.shape[1], v.shape[1]

    def gate(z, a, c):
        rms = jnp.sqrt(jnp.mean(z * z, axis=1, keepdims=True) + 1e-12)
        return jax.nn.sigmoid(a * z / rms + c)[..., None]

    z_u = jnp.einsum("knr,kr->kn", u, jnp.einsum("kmr,km->kr", v, b_u))
    z_v = jnp.einsum("kmr,kr->km", v, jnp.einsum("knr,kn->kr", u, b_v))
    return (
        gate(z_u, scale[0, :, :n], shift[0, :, :n]) * u,
        gate(z_v, scale[1, :, :m], shift[1, :, :m]) * v,
    )
