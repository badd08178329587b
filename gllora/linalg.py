"""Small dense linear algebra in plain ``jax.numpy``: no LAPACK custom calls.

Every LoL model works with per-module ``r x r`` problems (Gram matrices, cores, Procrustes
matrices) over thousands of modules at once. jaxlib 0.10's CPU LAPACK kernels split a
large batch into tasks on the same thread pool that runs them and block on them, so two
such calls at once can take every worker and deadlock (BUILD_NOTES.md, "Hot paths").
The solvers here are fixed sequences of vectorised ``jnp`` operations over any leading
batch axes: no data-dependent loops, no custom calls, the same on CPU, GPU and TPU.

- :func:`eigh`: cyclic Jacobi for symmetric matrices, in the parallel (round-robin)
  order: ``r / 2`` disjoint rotations per step, ``r - 1`` steps per sweep, each step two
  contiguous half-blocks, so nothing is gathered. The steps are one ``fori_loop`` body
  (a fixed trip count): unrolled, they compiled twice as slowly and ran no faster.
- :func:`svd_columns`: one-sided (Hestenes) Jacobi: rotates the columns of a square
  matrix until they are orthogonal; singular values are their norms. It works on the
  matrix itself, never on ``A^T A``, so small singular values keep their relative
  accuracy.
- :func:`gram_sqrt`: an ``r x r`` square root ``R`` of ``x^T x`` (``R^T R = x^T x``) from
  two passes over the factor ``x`` (Gram, rotate to near-orthogonal columns, Gram again):
  relative accuracy on small singular values like a QR, at the cost of matrix products.
- :func:`orthonormalize`: Gram-Schmidt with reorthogonalisation; :func:`solve`:
  Gauss-Jordan with partial pivoting.

Convergence of Jacobi in float32: quadratic once the off-diagonal is small; a fixed
number of sweeps (:func:`default_sweeps`) was measured against float64 numpy for ranks
1-64 and condition numbers up to 1e4 (``tests/test_linalg.py``, BUILD_NOTES.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def default_sweeps(r: int) -> int:
    """Jacobi sweeps that reach float32 convergence for ``r x r`` matrices.

    Measured (``tests/test_linalg.py``): the off-diagonal falls to rounding level after
    4 sweeps at ``r = 4``, 6 at 8, 10 at 16, 12 at 32, 14 at 64, for condition numbers up to 1e4; these
    counts add one or two sweeps of margin.
    """
    if r <= 2:
        return 1 if r == 2 else 0
    if r <= 4:
        return 5
    if r <= 8:
        return 8
    if r <= 16:
        return 11
    if r <= 32:
        return 13
    return 16


def _next_order(h: int) -> list[int]:
    """Position permutation of the circle method for pairs ``(i, i + h)``.

    The arrangement is two rows (positions ``0..h-1`` and ``h..2h-1``, paired
    column-wise); position 0 stays, every other index moves one place round the circle.
    ``x[..., order]`` gives the next step's arrangement, so after ``2h - 1`` steps every
    pair of indices has met exactly once.
    """
    top, bottom = list(range(h)), list(range(h, 2 * h))
    new_top = [top[0], bottom[0]] + top[1 : h - 1]
    new_bottom = bottom[1:] + [top[h - 1]]
    return (new_top + new_bottom) if h > 1 else [0, 1]


def _rotation(a_pp: Array, a_qq: Array, a_pq: Array) -> tuple[Array, Array]:
    """``(c, s)`` of the Jacobi rotation that zeroes ``a_pq``; ``cot 2t = (a_qq - a_pp) / 2 a_pq``.

    The smaller of the two angles (``|t| <= pi / 4``), the stable form of Golub & Van Loan
    (8.5.2). ``c = 1, s = 0`` (no rotation) where ``|a_pq| <= eps sqrt(|a_pp a_qq|)``: the
    pair is already orthogonal to working precision (the threshold of Demmel & Veselic,
    1992), and rotating it anyway would only add rounding, notably between equal
    eigenvalues, where every angle is as good as another.
    """
    eps = jnp.finfo(a_pq.dtype).eps
    zero = jnp.abs(a_pq) <= eps * jnp.sqrt(jnp.abs(a_pp * a_qq))
    tau = (a_qq - a_pp) / (2 * jnp.where(zero, 1, a_pq))
    sign = jnp.where(tau >= 0, 1.0, -1.0).astype(tau.dtype)
    # 1 / (|tau| + sqrt(1 + tau^2)) without overflowing tau^2 for huge tau.
    big = jnp.abs(tau) > 1e15
    t = sign / jnp.where(big, 2 * jnp.abs(tau), jnp.abs(tau) + jnp.sqrt(1 + tau * tau))
    t = jnp.where(zero, 0, t)
    c = jax.lax.rsqrt(1 + t * t)
    return c, t * c


def _rotate_pairs(x: Array, c: Array, s: Array, axis: int) -> Array:
    """Rotates the halves of ``x`` along ``axis`` (pairs ``(i, i + h)``) by ``(c, s)``.

    ``c, s`` have ``h`` entries on ``axis``'s position; ``x_i <- c x_i - s x_{i+h}``,
    ``x_{i+h} <- s x_i + c x_{i+h}``.
    """
    h = x.shape[axis] // 2
    lo = jax.lax.slice_in_dim(x, 0, h, axis=axis)
    hi = jax.lax.slice_in_dim(x, h, 2 * h, axis=axis)
    return jnp.concatenate([c * lo - s * hi, s * lo + c * hi], axis=axis)


def _permute(x: Array, order: list[int], axis: int) -> Array:
    """``x`` with positions along ``axis`` reordered (static order; slices, no gather)."""
    pieces, start = [], 0
    # Runs of consecutive positions become one slice each.
    while start < len(order):
        end = start + 1
        while end < len(order) and order[end] == order[end - 1] + 1:
            end += 1
        pieces.append(jax.lax.slice_in_dim(x, order[start], order[end - 1] + 1, axis=axis))
        start = end
    return jnp.concatenate(pieces, axis=axis)


def _pad_to_even(a: Array, square: bool) -> Array:
    """Pads an odd ``r`` by one zero row/column (its rotations are identities)."""
    r = a.shape[-1]
    if r % 2 == 0:
        return a
    widths = [(0, 0)] * (a.ndim - 2) + [(0, 1) if square else (0, 0), (0, 1)]
    return jnp.pad(a, widths)


def eigh(a: Array, sweeps: int | None = None, *, sort: bool = True) -> tuple[Array, Array]:
    """Eigenvalues and eigenvectors of symmetric ``a [..., r, r]`` by cyclic Jacobi.

    Args:
      a: symmetric matrices (only symmetric input is meaningful), any batch axes.
      sweeps: Jacobi sweeps (default :func:`default_sweeps`).
      sort: eigenvalues descending (and vectors with them); ``False`` skips the gathers
        where the order does not matter (square roots of Gram matrices).

    Returns:
      ``(w [..., r], V [..., r, r])``, ``a = V diag(w) V^T``, ``V`` orthogonal to rounding
      (a product of rotations).
    """
    r = a.shape[-1]
    sweeps = default_sweeps(r) if sweeps is None else sweeps
    x = _pad_to_even(a, square=True)
    re = x.shape[-1]
    h = re // 2
    v = jnp.broadcast_to(jnp.eye(re, dtype=a.dtype), x.shape)
    order = _next_order(h)

    def step(_, carry):
        x, v = carry
        d = jnp.diagonal(x, axis1=-2, axis2=-1)
        a_pq = jnp.diagonal(x[..., :h, h:], axis1=-2, axis2=-1)
        c, s = _rotation(d[..., :h], d[..., h:], a_pq)
        x = _rotate_pairs(x, c[..., :, None], s[..., :, None], axis=-2)
        x = _rotate_pairs(x, c[..., None, :], s[..., None, :], axis=-1)
        v = _rotate_pairs(v, c[..., None, :], s[..., None, :], axis=-1)
        return _permute(_permute(x, order, -2), order, -1), _permute(v, order, -1)

    x, v = jax.lax.fori_loop(0, sweeps * (re - 1), step, (x, v))
    w = jnp.diagonal(x, axis1=-2, axis2=-1)
    if re != r:  # drop the padded index (its row and column stayed zero)
        keep = _padded_position(r, sweeps)
        w = jnp.delete(w, keep, axis=-1, assume_unique_indices=True)
        v = jnp.delete(jnp.delete(v, keep, axis=-1, assume_unique_indices=True), r, axis=-2)
    if not sort:
        return w, v
    idx = jnp.argsort(-w, axis=-1)
    return jnp.take_along_axis(w, idx, -1), jnp.take_along_axis(v, idx[..., None, :], -1)


def _padded_position(r: int, sweeps: int) -> int:
    """Where the padding index (``r``, of ``r + 1`` even) sits after ``sweeps`` sweeps."""
    order = list(range(r + 1))
    step = _next_order((r + 1) // 2)
    for _ in range(sweeps * r):
        order = [order[i] for i in step]
    return order.index(r)


def svd_columns(a: Array, sweeps: int | None = None) -> tuple[Array, Array]:
    """One-sided Jacobi on square ``a [..., r, r]``: ``a V`` with orthogonal columns.

    Returns:
      ``(b, V)`` with ``b = a V`` (columns mutually orthogonal, their norms the singular
      values, unsorted) and ``V [..., r, r]`` orthogonal. ``b_j / |b_j|`` are the left
      singular vectors. Rotations use only inner products of columns, so the result is
      the same for ``a`` and ``Q a`` with orthogonal ``Q`` (to rounding).
    """
    r = a.shape[-1]
    sweeps = default_sweeps(r) if sweeps is None else sweeps
    x = _pad_to_even(a, square=False)
    re = x.shape[-1]
    h = re // 2
    v = jnp.broadcast_to(jnp.eye(re, dtype=a.dtype), (*a.shape[:-2], re, re))
    order = _next_order(h)

    def step(_, carry):
        x, v = carry
        lo, hi = x[..., :h], x[..., h:]
        c, s = _rotation(
            jnp.sum(lo * lo, axis=-2), jnp.sum(hi * hi, axis=-2), jnp.sum(lo * hi, axis=-2)
        )
        x = _rotate_pairs(x, c[..., None, :], s[..., None, :], axis=-1)
        v = _rotate_pairs(v, c[..., None, :], s[..., None, :], axis=-1)
        return _permute(x, order, -1), _permute(v, order, -1)

    x, v = jax.lax.fori_loop(0, sweeps * (re - 1), step, (x, v))
    if re != r:
        keep = _padded_position(r, sweeps)
        x = jnp.delete(x, keep, axis=-1, assume_unique_indices=True)
        v = jnp.delete(jnp.delete(v, keep, axis=-1, assume_unique_indices=True), r, axis=-2)
    return x, v


def singular_values(a: Array, sweeps: int | None = None) -> Array:
    """Singular values of square ``a [..., r, r]``, descending (one-sided Jacobi)."""
    b, _ = svd_columns(a, sweeps)
    return -jnp.sort(-jnp.sqrt(jnp.sum(b * b, axis=-2)), axis=-1)


def gram(x: Array) -> Array:
    """``x^T x`` per matrix: ``[..., n, r] -> [..., r, r]``."""
    return jnp.einsum("...nr,...ns->...rs", x, x)


def gram_sqrt(x: Array, sweeps: int | None = None) -> Array:
    """``R [..., r, r]`` with ``R^T R = x^T x``, accurate for ill-conditioned ``x [..., n, r]``.

    A Gram matrix formed in floating point carries an absolute error of about
    ``eps |x|^2``, which swamps eigenvalues below ``eps`` times the largest (singular
    values of ``x`` below ``sqrt(eps)`` of the largest: 3e-4 in float32). So: form
    ``G = x^T x``, rotate to its eigenvectors ``W`` (``y = x W`` has nearly orthogonal
    columns), form ``y^T y`` from the data again, whose errors are now relative to each
    column's own norm, and diagonalise that (``y^T y = Z diag(l) Z^T``; most of it is
    diagonal already, but inside a cluster of small eigenvalues the first ``W`` is as
    inaccurate as the first Gram, so this takes full sweeps too). Then ``R = diag(sqrt(l)) Z^T W^T``. Small singular values of ``x``
    come out with a relative error of about ``eps * cond(x)``, as from a Householder QR.
    """
    _, w = eigh(gram(x), sweeps, sort=False)
    l, z = eigh(gram(rotate(x, w)), sweeps, sort=False)
    root = jnp.sqrt(jnp.maximum(l, 0))
    return root[..., :, None] * jnp.einsum("...sr,...ts->...rt", z, w)


def rotate(x: Array, w: Array) -> Array:
    """``x w``: ``[..., n, r] @ [..., r, s] -> [..., n, s]``.

    For small ``r`` as ``r`` broadcast multiply-adds, which XLA fuses into the consumer
    (a Gram matrix) instead of a batched matrix product per module (measured 1.35x
    faster for ``r = 4`` on CPU).
    """
    if x.shape[-1] > 8:
        return jnp.einsum("...nr,...rs->...ns", x, w)
    return sum(x[..., :, i : i + 1] * w[..., None, i, :] for i in range(x.shape[-1]))


def polar(a: Array, sweeps: int | None = None) -> Array:
    """The orthogonal polar factor ``U V^T`` of square ``a [..., r, r]`` (``a = U S V^T``).

    For Procrustes (eq. 3). Where ``a`` is singular the factor is not unique; directions
    with a zero singular value are left out (a partial isometry), which for a zero-padded
    ``a`` (zero rows) gives the same ``x Q`` as any orthogonal completion would.
    """
    b, v = svd_columns(a, sweeps)
    norms = jnp.sqrt(jnp.sum(b * b, axis=-2, keepdims=True))
    tiny = jnp.finfo(a.dtype).tiny
    u = jnp.where(norms > tiny, b / jnp.where(norms > tiny, norms, 1), 0)
    return jnp.einsum("...ij,...kj->...ik", u, v)


def orthonormalize(z: Array) -> Array:
    """Orthonormal columns from ``z [..., r, r]`` (full rank) by Gram-Schmidt, twice.

    ``z = Q R`` with ``R``'s diagonal positive, so a Gaussian ``z`` gives a Haar-random
    ``Q``. Classical Gram-Schmidt with one reorthogonalisation ("twice is enough",
    Giraud et al. 2005) is orthogonal to rounding for any numerically full-rank ``z``.
    """
    r = z.shape[-1]

    def step(j, q):
        col = jax.lax.dynamic_index_in_dim(z, j, axis=-1, keepdims=False)
        for _ in range(2):
            col = col - jnp.einsum("...ij,...j->...i", q, jnp.einsum("...ij,...i->...j", q, col))
        col = col / jnp.linalg.norm(col, axis=-1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(q, col, j, axis=-1)

    return jax.lax.fori_loop(0, r, step, jnp.zeros_like(z))


def solve(a: Array, b: Array) -> Array:
    """``a^-1 b`` for ``a [..., r, r]``, ``b [..., r, m]``: Gauss-Jordan, partial pivoting.

    For the small well-conditioned systems of the group action (``v g^-T``); backward
    stable in practice like LAPACK's ``getrf``/``getrs`` with the same pivoting.
    """
    r = a.shape[-1]
    aug = jnp.concatenate([a, b], axis=-1)
    rows = jnp.broadcast_to(jnp.arange(r), a.shape[:-1])  # [..., r]

    def step(j, aug):
        col = jax.lax.dynamic_index_in_dim(aug, j, axis=-1, keepdims=False)  # [..., r]
        pivot = jnp.argmax(jnp.where(rows >= j, jnp.abs(col), -1), axis=-1)[..., None]
        # Swap rows j and pivot.
        perm = jnp.where(rows == j, pivot, jnp.where(rows == pivot, j, rows))
        aug = jnp.take_along_axis(aug, perm[..., None], axis=-2)
        row = jax.lax.dynamic_index_in_dim(aug, j, axis=-2, keepdims=True)  # [..., 1, r+m]
        row = row / jax.lax.dynamic_index_in_dim(row, j, axis=-1, keepdims=True)
        factor = jax.lax.dynamic_index_in_dim(aug, j, axis=-1, keepdims=True)  # [..., r, 1]
        return jnp.where((rows == j)[..., None], row, aug - factor * row)

    return jax.lax.fori_loop(0, r, step, aug)[..., r:]
