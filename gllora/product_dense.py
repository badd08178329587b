"""A dense layer on flattened low-rank products ``vec(a_i b_i^T)``, never forming them.

MLP+Dense's first layer is ``h = sum_i vec(a_i b_i^T) @ W_i`` with ``a_i [I, r]``,
``b_i [J, r]`` and ``W_i [I * J, h]``: 352M weights at the Qwen2-1.5B k/v shape. The
products are rank ``r``, so the layer factors through the kernel instead:

    T_i = a_i^T W_i                  [r, J, h]   (one GEMM, contracting I)
    h   = sum_{i, r, j} T_i[r, j, :] b_i[j, r]

Under ``vmap`` the batch is folded into the rank axis, as in
:func:`gllora.ops.equivariant_linear`: ``a [k, I, B, r]`` gives one ``[B r, I] @ [I, J h]``
GEMM per module that reads the kernel once, and the only temporary is ``T``
(``k * B * r * J * h`` floats, a few times smaller than one batch of products when
``I`` is the longer side). Why not the products: XLA's CPU runtime (jax 0.10) sends
``[B, I J] @ [I J, h]`` to YNNPACK, which copies the whole kernel into a packed buffer
of its own each call, runs that skinny product at a few GB/s, and reports the copy's
allocation failure as ``INTERNAL: YNNPACK operation failed``; and the products of a
batch are a fresh ``B * k * I * J`` buffer per call whose page faults alone cost more
than reading the kernel (``benchmarks/bench_dense.py``). Compiled with YNNPACK's fusions
off, the products one module at a time still lose to this GEMM at batch 8 and win only
at batch 32 (``benchmarks/bench_dense_tiles.py``; BUILD_NOTES.md, "Performance").

The gradient is a custom VJP of the batched form: ``dW_i = a_i (b_i * g)`` is one
``[I, B r] @ [B r, J h]`` GEMM per module, written straight into the kernel's layout.
No Flax here; :class:`gllora.layers.GroupedDense` wraps it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import custom_batching, lax

Array = jax.Array


class Products(NamedTuple):
    """The features ``vec(a_i b_i^T)`` of one module group, ``I`` major, kept as factors.

    Attributes:
      a: ``[k, I, r]``.
      b: ``[k, J, r]``.
    """

    a: Array
    b: Array

    @property
    def num_features(self) -> int:
        """``I * J``: the features per module."""
        return self.a.shape[-2] * self.b.shape[-2]


def kernel_shape(products: Products, features: int) -> tuple[int, int, int]:
    """The kernel of ``features`` outputs on ``products``: ``[k, J * features, I]``.

    Stored output-major, one ``[J h, I]`` matrix per module: with the big axis ``J h`` of
    the GEMM below as its rows, the CPU runtime reuses each kernel entry across the whole
    batch (measured 2x faster than ``[I, J h]``, ``benchmarks/bench_dense.py``).
    """
    return (products.a.shape[-3], products.b.shape[-2] * features, products.a.shape[-2])


def as_dense_kernel(kernel: Array, num_cols: int) -> Array:
    """``kernel [k, J h, I]`` as the dense layer's ``[k, I * J, h]`` (``J = num_cols``),
    the weight of ``vec(a_i b_i^T)`` (``I``-major), e.g. to compare with a ``Dense``."""
    k, jh, i = kernel.shape
    h = jh // num_cols
    return jnp.transpose(kernel.reshape(k, num_cols, h, i), (0, 3, 1, 2)).reshape(
        k, i * num_cols, h
    )


def _check(a_shape, b_shape, kernel_shape_) -> None:
    """Shapes of ONE example: ``a [k, I, r]``, ``b [k, J, r]``, ``kernel [k, J*h, I]``."""
    if len(a_shape) != 3 or len(b_shape) != 3 or len(kernel_shape_) != 3:
        raise ValueError(
            f"product_dense: expected a [k, I, r], b [k, J, r], kernel [k, J*h, I] per example; "
            f"got a {list(a_shape)}, b {list(b_shape)}, kernel {list(kernel_shape_)}"
        )
    (k, i, r), (kb, j, rb), (kk, jh, ki) = a_shape, b_shape, kernel_shape_
    if (kb, rb) != (k, r) or (kk, ki) != (k, i) or jh % j:
        raise ValueError(
            f"product_dense: a {list(a_shape)} and b {list(b_shape)} ([modules, rows, rank]) do "
            f"not match each other or the kernel {list(kernel_shape_)} ([k, J*h, I])"
        )


@custom_batching.custom_vmap
def product_dense(a: Array, b: Array, kernel: Array) -> Array:
    """``sum_i vec(a_i b_i^T) @ W_i`` for one example, without forming ``a_i b_i^T``.

    Args:
      a: ``[k, I, r]``.
      b: ``[k, J, r]``.
      kernel: ``[k, J * h, I]`` (:func:`kernel_shape`): ``kernel[i, j h + c, p]`` is the
        weight of feature ``(a_i b_i^T)[p, j]`` for output ``c``; :func:`as_dense_kernel`
        gives the usual ``W_i [I * J, h]``.

    Returns:
      ``[h]``: ``einsum("kf,kfh->h", (a @ b^T).reshape(k, -1), as_dense_kernel(kernel))``.
      Under ``vmap`` over ``a`` and ``b`` (not the kernel) it is one GEMM per module over
      the batch folded into the rank axis; differentiate it with the ``vmap`` inside the
      ``grad`` (as every batched loss does), like the other custom ``vmap`` rules here.
    """
    _check(a.shape, b.shape, kernel.shape)
    return _per_example(a, b, kernel)


def _per_example(a: Array, b: Array, kernel: Array) -> Array:
    return _fused(a[:, :, None], b[:, :, None], kernel)[0]


@product_dense.def_vmap
def _product_dense_vmap(axis_size, in_batched, a, b, kernel):
    a_batched, b_batched, kernel_batched = in_batched
    if kernel_batched:  # several models at once: the generic rule
        axes = tuple(0 if x else None for x in in_batched)
        return jax.vmap(_per_example, in_axes=axes, axis_size=axis_size)(a, b, kernel), True
    # The factors are small beside the kernel: broadcasting an unbatched one is cheap.
    a = a if a_batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
    b = b if b_batched else jnp.broadcast_to(b, (axis_size,) + b.shape)
    _check(a.shape[1:], b.shape[1:], kernel.shape)
    # [B, k, I, r] -> [k, I, B, r]: a no-op for rank-major batches (the two moves cancel).
    return _fused(jnp.moveaxis(a, 0, 2), jnp.moveaxis(b, 0, 2), kernel), True


@custom_batching.custom_vmap
def _module_gemm(x: Array, y: Array) -> Array:
    """``x_i @ y_i`` per module: ``[k, p, q] @ [k, q, s] -> [k, p, s]``."""
    return lax.dot_general(x, y, (((2,), (1,)), ((0,), (0,))))


@_module_gemm.def_vmap
def _module_gemm_vmap(axis_size, in_batched, x, y):
    # Several kernels (the engine's seeds) on the same factors: broadcast the factors
    # (small) so that both operands carry the new axis as a batch axis. Left to the
    # default rule, XLA gives the kernel side a free axis beside the modules and copies
    # the whole kernel (or its gradient) into that layout.
    x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size,) + x.shape)
    y = y if in_batched[1] else jnp.broadcast_to(y, (axis_size,) + y.shape)
    return lax.dot_general(x, y, (((3,), (2,)), ((0, 1), (0, 1)))), True


def _forward(a: Array, b: Array, kernel: Array) -> tuple[Array, Array]:
    """``a [k, I, B, r]``, ``b [k, J, B, r]`` -> (``[B, h]``, ``T [k, J, h, B, r]``)."""
    k, i, batch, r = a.shape
    j = b.shape[1]
    h = kernel.shape[1] // j
    # T = W^T a: [J h, I] @ [I, B r] per module, both operands row-major as they come
    # (rank-major factors need no transpose), which the CPU runtime hands to YNNPACK.
    t = _module_gemm(kernel, a.reshape(k, i, batch * r)).reshape(k, j, h, batch, r)
    # out[B, c] = sum_(k, j, r) T * b, read through a transpose to [k, J, B, r, h]: YNNPACK
    # does not fuse transposes, so the reduction stays out of the GEMM, where it runs
    # slower and T would be an intermediate that XLA's buffer accounting misses
    # (compiled.memory_analysis(), which Figure 5's memory plan reads).
    t_last = jnp.transpose(t, (0, 1, 3, 4, 2))
    return jnp.sum(t_last * b[..., None], axis=(0, 1, 3)), t


@jax.custom_vjp
def _fused(a: Array, b: Array, kernel: Array) -> Array:
    return _forward(a, b, kernel)[0]


def _fused_fwd(a, b, kernel):
    out, t = _forward(a, b, kernel)
    return out, (a, b, kernel, t)


def _kernel_grad_elementwise(a: Array, b: Array, g: Array) -> Array:
    """``dW[k, (j, c), i] = sum_B P_B[k, j, i] g[B, c]`` as ``B`` broadcast products.

    With fewer examples than outputs (``B < h``) the batch's products ``P [k, B, J, I]``
    are smaller than the kernel, and ``dW`` written as an elementwise expression of them
    is fused by XLA into its consumers (the optimiser's moment updates), so the kernel-
    sized gradient is never a buffer of its own: at the Qwen2 k/v shape a fresh 1.4 GB
    per step whose page faults alone cost ~0.5 s. (A GEMM's output always is a buffer.)
    """
    k, i, batch, r = a.shape
    j, h = b.shape[1], g.shape[1]
    # g is an expression of the network's backward pass: materialise it (a product with
    # the identity is a buffer XLA does not fuse; an optimization barrier is dropped
    # before fusion on CPU), or XLA fuses that expression into the kernel-sized loop and
    # recomputes it for every entry (70x slower).
    g = g @ jnp.eye(h, dtype=g.dtype)
    # [k, B, J, I], as the batched product lays it out: each term below then streams
    # one contiguous [J, I] slab (a transposed layout turns the loop into gathers, 20x).
    p = jnp.einsum("kjbr,kibr->kbji", b, a)
    terms = [p[:, n, :, None, :] * g[n][None, None, :, None] for n in range(batch)]
    return sum(terms[1:], terms[0]).reshape(k, j * h, i)


def _fused_bwd(res, g):
    a, b, kernel, t = res
    k, i, batch, r = a.shape
    j = b.shape[1]
    h = kernel.shape[1] // j
    g5 = g.T[None, None, :, :, None]  # [1, 1, h, B, 1]
    # (b * g)[k, (J, h), (B, r)]: small; both big products below are plain GEMMs on it.
    bg = (b[:, :, None] * g5).reshape(k, j * h, batch * r)
    if batch < h:
        d_kernel = _kernel_grad_elementwise(a, b, g)
    else:  # dW = (b g) a^T: [J h, B r] @ [B r, I]; a^T materialised row-major (small).
        a_t = lax.optimization_barrier(jnp.swapaxes(a.reshape(k, i, batch * r), 1, 2))
        d_kernel = _module_gemm(bg, a_t)
    # Dropped by XLA when the factors need no gradient (training).
    d_a = lax.dot_general(kernel, bg, (((1,), (1,)), ((0,), (0,)))).reshape(a.shape)
    d_b = jnp.sum(t * g5, axis=2)  # [k, J, B, r]
    return d_a, d_b, d_kernel


_fused.defvjp(_fused_fwd, _fused_bwd)
