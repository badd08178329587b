"""Equivariant maps, nonlinearities and featurizers, against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import Lora, features, layers, ops, testing

KEY = jax.random.key(0)
SHAPES = {"a": (20, 12), "b": (20, 12), "c": (7, 30)}


def _map_groups(fn):
    """Lifts a per-group ``(u, v) -> (u', v')`` function to a LoRA -> LoRA function."""

    def lifted(lora):
        pairs = [fn(u, v) for u, v in zip(lora.u, lora.v)]
        return lora.replace(u=tuple(p[0] for p in pairs), v=tuple(p[1] for p in pairs))

    return lifted


def test_row_sums_match_the_dense_product():
    lora = testing.random_lora(KEY, SHAPES, rank=3)
    rows, cols = ops.row_sums(lora.u[0], lora.v[0])
    dense = np.asarray(features.dense(lora.u[0], lora.v[0]))
    np.testing.assert_allclose(rows, dense.sum(2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cols, dense.sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", sorted(ops.SIGMAS))
def test_gl_nonlinearity_is_equivariant(sigma):
    lora = testing.random_lora(KEY, SHAPES, rank=3)
    fn = _map_groups(lambda u, v: ops.gl_nonlinearity(u, v, ops.SIGMAS[sigma]))
    testing.assert_equivariant(fn, jax.random.key(1), lora)


def test_pointwise_relu_is_not_equivariant_negative_control():
    lora = testing.random_lora(KEY, SHAPES, rank=3)
    with pytest.raises(AssertionError, match="not equivariant"):
        testing.assert_equivariant(
            _map_groups(lambda u, v: (jax.nn.relu(u), jax.nn.relu(v))), jax.random.key(1), lora
        )


def test_equivariant_linear_is_equivariant_and_right_multiplication_is_not():
    lora = testing.random_lora(KEY, SHAPES, rank=3)
    phis = [
        jax.random.normal(jax.random.key(i), (u.shape[0], u.shape[1], 5))
        for i, u in enumerate(lora.u)
    ]
    psis = [
        jax.random.normal(jax.random.key(9 + i), (v.shape[0], v.shape[1], 5))
        for i, v in enumerate(lora.v)
    ]

    def linear(x):
        return x.replace(
            u=tuple(ops.equivariant_linear(p, u) for p, u in zip(phis, x.u)),
            v=tuple(ops.equivariant_linear(p, v) for p, v in zip(psis, x.v)),
        )

    testing.assert_equivariant(linear, jax.random.key(1), lora)
    mix = jax.random.normal(jax.random.key(3), (3, 3))
    with pytest.raises(AssertionError):
        testing.assert_equivariant(
            _map_groups(lambda u, v: (u @ mix, v @ mix)), jax.random.key(1), lora
        )


def _svd_of_dense(u, v, rank):
    dense = np.asarray(u, np.float64) @ np.swapaxes(np.asarray(v, np.float64), -1, -2)
    want = np.linalg.svd(dense, compute_uv=False)[..., :rank]
    return np.pad(want, [(0, 0)] * (want.ndim - 1) + [(0, rank - want.shape[-1])])


def test_singular_values_equal_numpy_svd_of_the_dense_product():
    # Module "b" is [3, 50] at rank 5: two of its singular values are exactly zero.
    lora = testing.random_lora(KEY, {"a": (40, 25), "b": (3, 50)}, rank=5)
    eps = float(np.finfo(np.float32).eps)
    for u, v in zip(lora.u, lora.v):
        want = _svd_of_dense(u, v, 5)
        # Both factors read twice: errors like a Householder QR's, a small multiple of
        # eps |u| |v|.
        got = np.asarray(features.singular_values(u, v, refine="both"))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # One pass over a factor: x^T x carries an absolute error of at most n eps |x|^2
        # (each of the n products and partial sums rounds once), which moves a squared
        # singular value by that much and a singular value by at most its square root
        # (Weyl, then |sqrt(a) - sqrt(b)| <= sqrt(|a - b|)); the core adds eps.
        for refine in ("none", "u"):
            got = np.asarray(features.singular_values(u, v, refine=refine))
            norm = lambda x: np.linalg.norm(np.asarray(x), axis=(-2, -1))
            bound = np.sqrt(2 * max(u.shape[-2], v.shape[-2]) * eps) * norm(u) * norm(v)
            assert np.all(np.abs(got - want) <= bound[..., None]), (refine, got, want, bound)
            # Full-rank, well-conditioned modules lose almost nothing in one pass.
            if u.shape[-2] >= 5:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="refine"):
        features.singular_values(lora.u[0], lora.v[0], refine="yes")
    # Truncation and zero-padding to another rank.
    s = features.singular_values(lora.u[0], lora.v[0])
    np.testing.assert_array_equal(
        features.singular_values(lora.u[0], lora.v[0], rank=2), s[..., :2]
    )
    padded = features.singular_values(lora.u[0], lora.v[0], rank=8)
    np.testing.assert_array_equal(padded[..., 5:], 0.0)
    # Zero-padded columns are exact zeros in the Gram matrix: they stay exact zeros.
    u0, v0 = (np.pad(np.asarray(x), [(0, 0), (0, 0), (0, 3)]) for x in (lora.u[0], lora.v[0]))
    np.testing.assert_array_equal(np.asarray(features.singular_values(u0, v0))[..., 5:], 0.0)


def test_singular_values_are_gl_invariant_even_ill_conditioned():
    lora = testing.random_lora(KEY, SHAPES, rank=4)
    fn = lambda x: [features.singular_values(u, v) for u, v in zip(x.u, x.v)]
    testing.assert_invariant(fn, jax.random.key(2), lora)
    testing.assert_invariant(fn, jax.random.key(2), lora, max_cond=100.0, rtol=1e-3, atol=1e-4)


def test_oalign_is_o_invariant_but_not_gl_invariant():
    lora = testing.random_lora(KEY, SHAPES, rank=4)
    template = testing.random_lora(jax.random.key(7), SHAPES, rank=4)
    fn = lambda x: [
        features.oalign(u, v, ut, vt) for u, v, ut, vt in zip(x.u, x.v, template.u, template.v)
    ]
    testing.assert_invariant(fn, jax.random.key(2), lora, kind="o", rtol=1e-3, atol=1e-4)
    with pytest.raises(AssertionError):
        testing.assert_invariant(fn, jax.random.key(2), lora, kind="gl")
    # Procrustes returns an orthogonal matrix that does minimise the distance.
    q = np.asarray(features.procrustes(lora.u[0], lora.v[0], template.u[0], template.v[0]))
    np.testing.assert_allclose(
        q @ np.swapaxes(q, -1, -2), np.broadcast_to(np.eye(4), q.shape), atol=1e-5
    )


def test_trunk_layers_work_on_mixed_ranks():
    f = {
        "a": (np.ones((6, 2), np.float32), np.ones((5, 2), np.float32)),
        "b": (np.ones((6, 4), np.float32), np.ones((5, 4), np.float32)),
    }
    lora = Lora.from_factors(f)
    out = layers.gl_nonlinearity(lora, "sigmoid")
    np.testing.assert_array_equal(out.factors("a")[0][:, 2:], 0.0)
    with pytest.raises(ValueError, match="unknown GL nonlinearity"):
        layers.gl_nonlinearity(lora, "gelu")


@pytest.mark.parametrize("layout_axis", [0, 2])
def test_batched_products_match_plain_einsums_in_value_and_gradient(layout_axis):
    """The custom vmap rules of equivariant_linear and grouped_dense change speed, not results."""
    keys = jax.random.split(KEY, 4)
    kernel = jax.random.normal(keys[0], (3, 10, 5))
    u = jax.random.normal(keys[1], (6, 3, 10, 4) if layout_axis == 0 else (3, 10, 6, 4))
    dense_kernel = jax.random.normal(keys[2], (3, 20, 7))
    x = jax.random.normal(keys[3], (6, 3, 20))

    def lin_loss(fn, kernel, u):
        out = jax.vmap(lambda ui: fn(kernel, ui), in_axes=layout_axis)(u)
        return jnp.sum(jnp.sin(out))

    plain_lin = lambda a, b: jnp.einsum("knd,knr->kdr", a, b)
    for argnums in (0, 1):
        got = jax.grad(lin_loss, argnums=(1, 2)[argnums])(ops.equivariant_linear, kernel, u)
        want = jax.grad(lin_loss, argnums=(1, 2)[argnums])(plain_lin, kernel, u)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        lin_loss(ops.equivariant_linear, kernel, u), lin_loss(plain_lin, kernel, u), rtol=1e-5
    )

    def dense_loss(fn, x, kernel):
        return jnp.sum(jnp.sin(jax.vmap(lambda xi: fn(xi, kernel))(x)))

    plain_dense = lambda a, b: jnp.einsum("kf,kfh->h", a, b)
    for arg in (1, 2):
        np.testing.assert_allclose(
            jax.grad(dense_loss, argnums=arg)(ops.grouped_dense, x, dense_kernel),
            jax.grad(dense_loss, argnums=arg)(plain_dense, x, dense_kernel),
            rtol=1e-4,
            atol=1e-4,
        )
    # Several kernels at once (the engine's vmap over seeds) take the generic rule.
    kernels = jnp.stack([kernel, 2 * kernel])
    both = jax.vmap(
        lambda k_: jax.vmap(lambda ui: ops.equivariant_linear(k_, ui), in_axes=layout_axis)(u)
    )(kernels)
    np.testing.assert_allclose(both[1], 2 * both[0], rtol=1e-5, atol=1e-5)
