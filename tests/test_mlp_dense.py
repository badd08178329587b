"""MLP+Dense's first layer on the factors (gllora.product_dense) equals the plain einsum on
the formed products, in value and gradient, in every batching the engine and the public
API use; the products are never materialised.

Tolerances: every output here is a sum of ``L`` float32 products of ``p`` factors, and
any summation order of such a sum is within ``gamma_{L+p} * sum|terms|`` of the exact
value (``gamma_n = n u / (1 - n u)``, ``u = 2^-24``; Higham, Accuracy and Stability,
eq. 3.5). Two float32 computations are within twice that of each other, with
``sum|terms|`` computed exactly (float64, absolute values). A wrong contraction (a
transposed kernel, a missing module) is off by ``O(sum|terms|)``, far outside it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import layers, models, product_dense, stack, testing
from gllora.lora import batch_axes, to_layout

KEY = jax.random.key(0)
U = 2.0**-24
K, I, J, R, H, B = 3, 6, 10, 2, 4, 5


def _gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _plain(a, b, kernel):
    """The products formed, flattened ``I``-major, then the dense layer."""
    prods = jnp.einsum("kir,kjr->kij", a, b).reshape(a.shape[0], -1)
    return jnp.einsum("kf,kfh->h", prods, product_dense.as_dense_kernel(kernel, b.shape[-2]))


def _w4(kernel) -> np.ndarray:
    """``kernel [K, J H, I]`` as ``|W| [K, I, J, H]`` (float64), by explicit indexing."""
    w = np.abs(np.asarray(kernel, np.float64)).reshape(K, J, H, I)
    return w.transpose(0, 3, 1, 2)


def _abs_terms(a, b, kernel) -> np.ndarray:
    """``sum |a_ir b_jr W_(ij)h|`` per output ``h`` (float64), batched over a leading ``B``."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    return np.einsum("...kir,...kjr,kijh->...h", a, b, _w4(kernel))


def _inputs(seed: int = 0, batch: int = B):
    ka, kb, kw = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(ka, (batch, K, I, R))
    b = jax.random.normal(kb, (batch, K, J, R))
    kernel = jax.random.normal(kw, (K, J * H, I))
    return a, b, kernel


def test_dense_kernel_layout():
    """``as_dense_kernel`` is the documented indexing: W[k, p J + j, c] = kernel[k, j H + c, p]."""
    kernel = np.arange(K * J * H * I, dtype=np.float32).reshape(K, J * H, I)
    dense = np.asarray(product_dense.as_dense_kernel(jnp.asarray(kernel), J))
    k, p, j, c = 2, 4, 7, 3
    assert dense.shape == (K, I * J, H)
    assert dense[k, p * J + j, c] == kernel[k, j * H + c, p]


def test_value_equals_the_formed_products_in_every_batching():
    a, b, kernel = _inputs()
    want = jax.vmap(lambda x, y: _plain(x, y, kernel))(a, b)
    bound = 2 * _gamma(K * I * J * R + 3) * _abs_terms(a, b, kernel)
    # One example (the custom vmap rule's primal), a leading batch, a rank-major batch.
    one = product_dense.product_dense(a[0], b[0], kernel)
    assert np.all(np.abs(one - want[0]) <= bound[0])
    lead = jax.jit(jax.vmap(lambda x, y: product_dense.product_dense(x, y, kernel)))(a, b)
    assert np.all(np.abs(lead - want) <= bound)
    rank_major = jax.vmap(lambda x, y: product_dense.product_dense(x, y, kernel), in_axes=2)(
        jnp.moveaxis(a, 0, 2), jnp.moveaxis(b, 0, 2)
    )
    assert np.all(np.abs(rank_major - want) <= bound)
    # One factor shared by the batch, and several kernels at once (the engine's seeds).
    shared = jax.vmap(lambda x: product_dense.product_dense(x, b[0], kernel))(a)
    want_shared = jax.vmap(lambda x: _plain(x, b[0], kernel))(a)
    assert np.all(np.abs(shared - want_shared) <= 2 * bound.max())
    seeds = jax.vmap(lambda w: jax.vmap(lambda x, y: product_dense.product_dense(x, y, w))(a, b))(
        jnp.stack([kernel, -kernel])
    )
    assert np.all(np.abs(seeds[0] - want) <= bound)
    assert np.all(np.abs(seeds[1] + want) <= bound)
    # Negative control: the kernel's rows read in the other order are far off.
    swapped = kernel.reshape(K, J, H, I).transpose(0, 2, 1, 3).reshape(K, J * H, I)
    off = jax.vmap(lambda x, y: product_dense.product_dense(x, y, swapped))(a, b)
    assert np.abs(off - want).max() > 100 * bound.max()


@pytest.mark.parametrize("rank_major", [False, True])
@pytest.mark.parametrize("batch", [B, H - 1], ids=["gemm", "elementwise"])
def test_gradients_equal_the_formed_products(rank_major, batch):
    """grad of a batched loss (the vmap inside the grad, as in training) w.r.t. the kernel
    and both factors, on both ways to the kernel's gradient (a GEMM; with fewer examples
    than outputs, products times cotangents). A linear loss ``sum_b c_b . out_b`` makes
    every cotangent exact."""
    a, b, kernel = _inputs(1, batch)
    c = jax.random.normal(jax.random.key(7), (batch, H))
    axis = 2 if rank_major else 0
    a_in, b_in = jnp.moveaxis(a, 0, axis), jnp.moveaxis(b, 0, axis)

    def loss(fn, a, b, kernel):
        out = jax.vmap(lambda x, y: fn(x, y, kernel), in_axes=axis)(a, b)
        return jnp.sum(c * out)

    grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    got = grads(product_dense.product_dense, a_in, b_in, kernel)
    want = grads(_plain, a_in, b_in, kernel)
    a64, b64, c64 = (np.abs(np.asarray(x, np.float64)) for x in (a, b, c))
    w64 = _w4(kernel)
    # dW_(ij)h = sum_(b, r) a b c: batch*R terms of 3 factors.
    bound_w = 2 * _gamma(batch * R + 3) * np.einsum("bkir,bkjr,bh->kjhi", a64, b64, c64)
    np.testing.assert_array_less(np.abs(got[2] - want[2]).reshape(K, J, H, I), bound_w + 1e-30)
    # da_ir = sum_(j, h) W b c (J*H terms), db_jr = sum_(i, h) W a c (I*H terms).
    bound_a = 2 * _gamma(J * H + 3) * np.einsum("kijh,bkjr,bh->bkir", w64, b64, c64)
    bound_b = 2 * _gamma(I * H + 3) * np.einsum("kijh,bkir,bh->bkjr", w64, a64, c64)
    for g, w_, bound in ((got[0], want[0], bound_a), (got[1], want[1], bound_b)):
        diff = np.abs(np.moveaxis(np.asarray(g - w_), axis, 0))
        np.testing.assert_array_less(diff, bound + 1e-30)
    assert np.abs(got[2]).max() > 1e-2  # a gradient that vanished would pass trivially


def test_bad_shapes_are_rejected_with_the_shapes():
    a, b, kernel = _inputs()
    with pytest.raises(ValueError, match=r"a \[3, 6, 2\] and b \[3, 10, 3\]"):
        product_dense.product_dense(a[0], jnp.ones((K, J, R + 1)), kernel)
    with pytest.raises(ValueError, match=r"kernel \[3, 40, 5\]"):
        product_dense.product_dense(a[0], b[0], jnp.ones((K, J * H, I - 1)))
    with pytest.raises(ValueError, match="per example"):
        product_dense.product_dense(a, b, kernel)  # a batch given to the per-example op


def _model(shapes, rank=2, hidden=4):
    lora = testing.random_lora(KEY, shapes, rank=rank)
    model = models.build("mlp_dense", num_outputs=2, hidden=hidden)
    return lora, model, model.init(KEY, lora)


def test_mlp_dense_first_layer_is_the_dense_layer_on_the_products():
    """Each group's kernel is named by its feature order; the first layer's output equals
    a float64 dense layer on the formed products in that order (``vec(v u^T)`` where
    ``m > n``, else ``vec(u v^T)``)."""
    shapes = {"wide.a": (4, 9), "wide.b": (4, 9), "tall": (7, 3)}
    lora, model, variables = _model(shapes)
    first = variables["params"]["first"]
    _, inter = model.apply(variables, lora, capture_intermediates=True, mutable=["intermediates"])
    got = np.asarray(inter["intermediates"]["first"]["__call__"][0], np.float64)
    want = np.asarray(first["bias"], np.float64)
    abs_terms, names = np.zeros_like(want), {"bias"}
    for g, u, v in zip(lora.spec.groups, lora.u, lora.v):
        # The longer factor first: its rows are the major feature index.
        a, b = (v, u) if g.m > g.n else (u, v)
        name = f"kernel_{g.key}_vu" if g.m > g.n else f"kernel_{g.key}_uv"
        k, i, j = len(g.names), a.shape[1], b.shape[1]
        assert first[name].shape == (k, j * 4, i)
        # kernel[k, j H + c, p] weighs feature (a b^T)[p, j] for output c.
        w4 = np.asarray(first[name], np.float64).reshape(k, j, 4, i).transpose(0, 3, 1, 2)
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        want = want + np.einsum("kir,kjr,kijh->h", a64, b64, w4)
        abs_terms += np.einsum("kir,kjr,kijh->h", np.abs(a64), np.abs(b64), np.abs(w4))
        names.add(name)
    assert set(first) == names
    # One float32 computation against the exact value: gamma_(L+3) with L = 2 * 4 * 9 * 2
    # terms in the largest group, plus the other groups' and the bias' additions.
    np.testing.assert_array_less(np.abs(got - want), _gamma(2 * 4 * 9 * 2 + 8) * abs_terms)


@pytest.mark.parametrize("layout", ["leading", "rank_major"])
def test_mlp_dense_batched_equals_one_example_at_a_time(layout):
    shapes = {"a": (4, 9), "b": (4, 9)}
    _, model, variables = _model(shapes)
    loras = [testing.random_lora(jax.random.key(i), shapes, rank=2) for i in range(3)]
    batch = to_layout(stack(loras), "leading", layout)
    got = jax.jit(
        jax.vmap(lambda x: model.apply(variables, x), in_axes=(batch_axes(batch, layout),))
    )(batch)
    want = np.stack([np.asarray(model.apply(variables, x)) for x in loras])
    # Same sums per example, grouped differently: within the first layer's bound, then
    # LayerNorm scales errors by at most 1 / std of its input; tested loosely here, the
    # first layer tightly above.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mlp_dense_never_forms_the_products():
    """The compiled batched forward and training gradient hold far less than one batch of
    products (``B * k * n * m`` floats) in temporaries. (With more examples than outputs,
    as here, the gradient is a GEMM; with fewer it is built from one batch of products,
    which are then smaller than the kernel.)"""
    shapes = {"a": (32, 512), "b": (32, 512)}
    lora, model, variables = _model(shapes, rank=1, hidden=2)
    batch = stack([lora] * 8)
    products = 8 * 2 * 32 * 512 * 4  # bytes; the factors are 32x smaller, the kernel 4x

    def loss(params, batch):
        out = jax.vmap(lambda x: model.apply({**variables, "params": params}, x))(batch)
        return jnp.sum(out**2)

    forward = jax.jit(jax.vmap(lambda x: model.apply(variables, x))).lower(batch).compile()
    grad = jax.jit(jax.grad(loss)).lower(variables["params"], batch).compile()
    assert forward.memory_analysis().temp_size_in_bytes < products / 8
    kernel = products // 4  # bytes; its gradient is a temporary of the grad
    assert grad.memory_analysis().temp_size_in_bytes < kernel + products / 8


def test_grouped_dense_still_takes_plain_features():
    """Other models' first layers (raw factors, singular values) keep the [k, F] path."""
    x = jax.random.normal(KEY, (3, 7))
    layer = layers.GroupedDense(5)
    params = layer.init(KEY, [("g", x)])
    kernel = params["params"]["kernel_g"]
    np.testing.assert_allclose(
        layer.apply(params, [("g", x)]), jnp.einsum("kf,kfh->h", x, kernel), rtol=1e-5
    )


def test_kernel_init_is_normal_with_the_total_fan_in_per_module():
    """Drawn a module at a time (to bound the initialiser's memory): still i.i.d. normal
    with variance 1 / fan-in, and the modules are not copies of one another."""
    shapes = {"a": (16, 64), "b": (16, 64)}
    _, _, variables = _model(shapes, hidden=8)
    (name,) = [n for n in variables["params"]["first"] if n.startswith("kernel_")]
    w = np.asarray(variables["params"]["first"][name], np.float64)
    n = w.size  # 2 x 16 x 64 x 8 = 16384 draws
    std = (2 * 16 * 64) ** -0.5
    # Sample mean and std of n normals: standard errors std / sqrt(n), std / sqrt(2 n).
    assert abs(w.mean()) < 5 * std / np.sqrt(n)
    assert abs(w.std() / std - 1) < 5 / np.sqrt(2 * n)
    corr = np.corrcoef(w[0].ravel(), w[1].ravel())[0, 1]
    assert abs(corr) < 5 / np.sqrt(n / 2)
