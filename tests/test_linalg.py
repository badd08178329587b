"""The plain-jnp solvers of gllora.linalg against float64 numpy, and that they are LAPACK-free.

Tolerances come from the algorithms' error analysis, in units of float32's ``eps``:
a Jacobi rotation is backward stable (Golub & Van Loan 8.5), so ``T`` rotations touching
an entry leave a backward error of about ``T eps |A|``; each index takes part in ``r - 1``
rotations per sweep, so ``T = sweeps (r - 1)`` bounds it, and eigenvalues move by at most
the backward error (Weyl). The measured errors are 10-50x below these bounds; a solver
that has not converged misses them by orders of magnitude (the negative controls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import linalg

EPS = float(np.finfo(np.float32).eps)
RANKS = (1, 2, 3, 4, 5, 8, 16, 32, 64)


def _factor(rng, batch: int, n: int, r: int, cond: float) -> np.ndarray:
    """``[batch, n, r]`` float64 with singular values log-spaced from 1 to ``1 / cond``."""
    q, _ = np.linalg.qr(rng.normal(size=(batch, n, r)))
    w, _ = np.linalg.qr(rng.normal(size=(batch, r, r)))
    s = np.logspace(0, -np.log10(cond), r) if r > 1 else np.ones(1)
    return (q * s) @ np.swapaxes(w, -1, -2)


def _backward_bound(r: int) -> float:
    return linalg.default_sweeps(r) * max(r - 1, 1) * EPS


@pytest.mark.parametrize("r", RANKS)
def test_eigh_matches_float64_numpy(r):
    rng = np.random.default_rng(r)
    for cond in (1.0, 1e2, 1e4):
        x = _factor(rng, 16, max(2 * r, 8), r, cond)
        a = np.swapaxes(x, -1, -2) @ x  # symmetric PSD, condition number cond^2
        w, v = (np.asarray(t, np.float64) for t in linalg.eigh(jnp.asarray(a, jnp.float32)))
        want = np.linalg.eigvalsh(a)[..., ::-1]
        scale = np.abs(a).max(axis=(-2, -1), keepdims=True)[..., 0]
        bound = _backward_bound(r) + 2 * EPS  # + rounding of the float32 input
        assert np.all(np.abs(w - want) <= bound * scale), (r, cond)
        assert np.all(np.diff(w, axis=-1) <= 0)  # descending
        np.testing.assert_allclose(
            np.swapaxes(v, -1, -2) @ v, np.broadcast_to(np.eye(r), v.shape), atol=bound
        )
        recon = (v * w[..., None, :]) @ np.swapaxes(v, -1, -2)
        assert np.all(np.abs(recon - a) <= 2 * bound * scale[..., None])


def test_eigh_negative_control_too_few_sweeps_fail_the_bound():
    rng = np.random.default_rng(0)
    x = _factor(rng, 16, 32, 16, 1e4)
    a = np.swapaxes(x, -1, -2) @ x
    w, _ = linalg.eigh(jnp.asarray(a, jnp.float32), sweeps=2)
    err = np.abs(np.asarray(w, np.float64) - np.linalg.eigvalsh(a)[..., ::-1]).max()
    assert err > 10 * _backward_bound(16) * np.abs(a).max()


@pytest.mark.parametrize("r", RANKS)
def test_singular_values_and_polar_of_square_matrices(r):
    rng = np.random.default_rng(100 + r)
    for cond in (1.0, 1e2, 1e4):
        a = _factor(rng, 16, r, r, cond) * 3.0
        s = np.asarray(linalg.singular_values(jnp.asarray(a, jnp.float32)), np.float64)
        want = np.linalg.svd(a, compute_uv=False)
        # One-sided Jacobi: backward error (per column) relative to each column's norm,
        # so errors scale with the largest value: bound * s_max, plus input rounding.
        bound = (_backward_bound(r) + 2 * EPS) * want[..., :1]
        assert np.all(np.abs(s - want) <= bound), (r, cond)
        q = np.asarray(linalg.polar(jnp.asarray(a, jnp.float32)), np.float64)
        u, _, vt = np.linalg.svd(a)
        # U = (a V) / s: the direction of a column of norm s_min carries an absolute
        # error of bound * s_max, so U (hence Q, and its orthogonality) errs by ~ bound * cond.
        tol = (_backward_bound(r) + 2 * EPS) * cond
        np.testing.assert_allclose(q, u @ vt, atol=tol)
        eye = np.broadcast_to(np.eye(r), q.shape)
        np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, eye, atol=tol)


@pytest.mark.parametrize("r", (1, 4, 16, 64))
def test_gram_sqrt_keeps_relative_accuracy_of_small_singular_values(r):
    rng = np.random.default_rng(200 + r)
    for cond in (1.0, 1e2, 1e4):
        x = _factor(rng, 8, max(4 * r, 16), r, cond)
        root = linalg.gram_sqrt(jnp.asarray(x, jnp.float32))
        got = np.asarray(linalg.singular_values(root), np.float64)
        want = np.linalg.svd(x, compute_uv=False)
        # Householder-QR-like: each value with relative error ~ cond * (backward error).
        rel = np.abs(got - want) / want
        assert rel.max() <= 4 * cond * (_backward_bound(r) + 2 * EPS), (r, cond, rel.max())
        # One pass (the Gram alone) cannot: at cond 1e4 its smallest values are noise.
    x = _factor(rng, 8, 64, 16, 1e4)
    w, _ = linalg.eigh(linalg.gram(jnp.asarray(x, jnp.float32)))
    one_pass = np.sqrt(np.maximum(np.asarray(w, np.float64), 0))
    assert (
        np.abs(one_pass - np.linalg.svd(x, compute_uv=False)) / np.linalg.svd(x, compute_uv=False)
    ).max() > 0.1


def test_orthonormalize_and_solve():
    rng = np.random.default_rng(3)
    for r in (1, 3, 8, 32):
        z = rng.normal(size=(10, r, r))
        q = np.asarray(linalg.orthonormalize(jnp.asarray(z, jnp.float32)), np.float64)
        np.testing.assert_allclose(
            np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(r), q.shape), atol=10 * r * EPS
        )
        # z = Q R with R upper triangular, positive diagonal: the same Q as numpy's QR
        # with its signs fixed to a positive diagonal.
        q_np, r_np = np.linalg.qr(z)
        q_np = q_np * np.sign(np.diagonal(r_np, axis1=-2, axis2=-1))[..., None, :]
        np.testing.assert_allclose(q, q_np, atol=1e-4)
        b = rng.normal(size=(10, r, 5))
        got = np.asarray(linalg.solve(jnp.asarray(z, jnp.float32), jnp.asarray(b, jnp.float32)))
        want = np.linalg.solve(z, b)
        # Backward-stable elimination: forward error ~ cond(z) eps |x|.
        cond = np.linalg.cond(z)[:, None, None]
        assert np.all(
            np.abs(got - want)
            <= 10 * r * EPS * cond * np.abs(want).max(axis=(-2, -1), keepdims=True)
        )
    with pytest.raises(AssertionError):  # negative control: a non-orthogonal map
        np.testing.assert_allclose(z[0].T @ z[0], np.eye(32), atol=1e-3)


def _custom_calls(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).as_text()
    return [line for line in text.splitlines() if "custom_call" in line]


def test_solvers_issue_no_lapack_or_other_custom_calls():
    x = jnp.broadcast_to(jnp.eye(4) + 0.5, (3, 7, 4, 4))
    factor = jnp.broadcast_to(jnp.eye(20, 4) + 0.5, (3, 20, 4))
    for fn, args in (
        (linalg.eigh, (x,)),
        (linalg.svd_columns, (x,)),
        (linalg.singular_values, (x,)),
        (linalg.polar, (x,)),
        (linalg.gram_sqrt, (factor,)),
        (linalg.orthonormalize, (x,)),
        (linalg.solve, (x, x)),
    ):
        assert _custom_calls(fn, *args) == [], fn.__name__
    # The check sees LAPACK when it is there (negative control).
    assert any("lapack" in line for line in _custom_calls(jnp.linalg.eigh, x))
