"""The registered models (the paper's five and the peers): Theorem 1 as tests, padding,
batching, compile-once, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import Lora, group, in_axes, models, stack, testing
from gllora.models import GLNetTrunk

KEY = jax.random.key(0)
# Two groups of different shapes; rank 3. Small, so every model compiles in seconds.
SHAPES = {"l0.k": (12, 20), "l0.v": (12, 20), "l1.k": (12, 20), "out": (6, 9)}
RANK = 3
SMALL = dict(
    glnet=dict(equiv_width=4, head_width=16),
    mlp=dict(hidden=16),
    mlp_oalign=dict(hidden=16),
    mlp_svd=dict(hidden=16),
    mlp_dense=dict(hidden=8),
    w2t=dict(hidden=16, heads=2),
    spectral=dict(),
    glnet_seq=dict(width=4, hidden=16, heads=2),
)
# W2T in the registry loop has the same tolerances as every GL model. Its canonical
# tokens are singular vectors, which move by about (backward error) / (singular-value gap)
# (Wedin's theorem). For this test LoRA the smallest relative gap is >= 0.05 (asserted in
# tests/test_models_peers.py): eps * cond(u g) / gap ~ 1.2e-7 * 12 / 0.05 = 3e-5 in the
# tokens at cond(g) = 4, and the outputs moved by < 2e-6 (measured), inside atol 1e-5.


@functools.cache
def _setup(name):
    lora = testing.random_lora(KEY, SHAPES, rank=RANK)
    template = testing.random_lora(jax.random.key(5), SHAPES, rank=RANK)
    extra = {"template": template} if name == "mlp_oalign" else {}
    model = models.build(name, num_outputs=2, **SMALL[name], **extra)
    variables = model.init(KEY, lora)
    return lora, model, variables, jax.jit(lambda x: model.apply(variables, x))


@pytest.mark.parametrize("name", models.names())
def test_registry_model_symmetry(name):
    """Every registered model is invariant to the group it declares, and not to GL otherwise."""
    lora, _, _, apply = _setup(name)
    kind = models.invariance(name)
    out = apply(lora)
    assert out.shape == (2,)
    # Invariance must not come from ignoring the input: another LoRA gives another output.
    other = testing.random_lora(jax.random.key(9), SHAPES, rank=RANK)
    assert np.abs(apply(other) - out).max() > 1e-3
    if kind is None:
        with pytest.raises(AssertionError, match="not invariant under O"):
            testing.assert_invariant(apply, KEY, lora, kind="o")
        return
    testing.assert_invariant(apply, KEY, lora, kind=kind, jit=False)
    if kind == "gl":
        # Ill-conditioned elements: float32 loses ~log10(cond) digits, hence the looser tolerance.
        testing.assert_invariant(
            apply, jax.random.key(1), lora, max_cond=100.0, rtol=1e-3, atol=1e-3, jit=False
        )
    else:
        with pytest.raises(AssertionError, match="not invariant under GL"):
            testing.assert_invariant(apply, KEY, lora, kind="gl", jit=False)


def test_mlp_oalign_is_not_invariant_to_a_scaling():
    lora, _, _, apply = _setup("mlp_oalign")
    scaled = group.act(lora, {n: 3.0 * jnp.eye(RANK) for n in lora.names})
    assert np.abs(apply(scaled) - apply(lora)).max() > 1e-3
    # ... while an orthogonal element leaves it unchanged.
    rotated = group.act(
        lora,
        {n: group.random_orthogonal(jax.random.key(i), RANK) for i, n in enumerate(lora.names)},
    )
    np.testing.assert_allclose(apply(rotated), apply(lora), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["glnet", "mlp_dense", "mlp_svd", "mlp_oalign", "w2t", "spectral", "glnet_seq"]
)
def test_zero_padding_to_a_larger_rank_changes_no_invariant_output(name):
    lora, _, _, apply = _setup(name)
    np.testing.assert_allclose(apply(lora.pad_rank(RANK + 3)), apply(lora), rtol=1e-4, atol=1e-5)


def test_mlp_svd_truncates_or_pads_other_ranks():
    lora, model, variables, apply = _setup("mlp_svd")
    low = testing.random_lora(KEY, SHAPES, rank=1)
    high = testing.random_lora(KEY, SHAPES, rank=6)
    assert model.apply(variables, low).shape == (2,) and model.apply(variables, high).shape == (2,)
    # Rank-6 input whose top-3 singular values equal a rank-3 LoRA's: same output.
    padded = Lora.from_factors(
        {
            n: (jnp.pad(u, ((0, 0), (0, 3))), jnp.pad(v, ((0, 0), (0, 3))))
            for n, (u, v) in ((n, lora.factors(n)) for n in lora.names)
        }
    )
    np.testing.assert_allclose(model.apply(variables, padded), apply(lora), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    # W2T's eager apply takes about two minutes on 2 busy cores: it runs in the slow step.
    ["glnet", "mlp_dense", "glnet_seq", "spectral", pytest.param("w2t", marks=pytest.mark.slow)],
)
def test_glnet_and_mlp_dense_take_any_rank(name):
    _, model, variables, _ = _setup(name)
    for r in (1, 8):
        assert model.apply(variables, testing.random_lora(KEY, SHAPES, rank=r)).shape == (2,)


def test_raw_mlp_rejects_another_rank_with_a_clear_error():
    _, model, variables, _ = _setup("mlp")
    with pytest.raises(
        ValueError, match=r"\[12, 20\]: l0.k.* have rank 4, the model was initialised with rank 3"
    ):
        model.apply(variables, testing.random_lora(KEY, SHAPES, rank=4))


@pytest.mark.parametrize("width", [5, None])
def test_glnet_trunk_is_equivariant_lora_to_lora(width):
    lora = testing.random_lora(KEY, SHAPES, rank=RANK)
    trunk = GLNetTrunk(width=width, depth=3, nonlinearity="sigmoid")
    variables = trunk.init(KEY, lora)
    fn = lambda x: trunk.apply(variables, x)
    out = fn(lora)
    assert out.names == lora.names
    want = (width, width) if width else (12, 20)
    assert out.shapes["l0.k"] == want
    testing.assert_equivariant(fn, KEY, lora, rtol=1e-3, atol=1e-4)
    # The relu_sign gate is exactly equivariant too.
    trunk = GLNetTrunk(width=width, depth=2)
    variables = trunk.init(KEY, lora)
    testing.assert_equivariant(lambda x: trunk.apply(variables, x), KEY, lora, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
def test_glnet_invariant_gate_and_residual_blocks_are_equivariant(residual):
    lora = testing.random_lora(KEY, SHAPES, rank=RANK)
    trunk = GLNetTrunk(width=6, depth=3, nonlinearity="gate", residual=residual)
    variables = trunk.init(KEY, lora)
    # Learned gate parameters away from their init, so the test sees a generic gate.
    variables = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(5), x.shape), variables
    )
    fn = lambda x: trunk.apply(variables, x)
    testing.assert_equivariant(fn, KEY, lora, rtol=1e-3, atol=1e-4)
    model = models.build("glnet", num_outputs=2, equiv_width=6, equiv_depth=3,
                         nonlinearity="gate", residual=residual)  # fmt: skip
    mv = model.init(KEY, lora)
    testing.assert_invariant(lambda x: model.apply(mv, x), KEY, lora, rtol=1e-3, atol=1e-4)

    # Negative control: a gate computed from the raw factor (not an invariant) breaks it.
    def bad(x):
        y = fn(x)
        return y.replace(u=tuple(jax.nn.sigmoid(u.sum(-1, keepdims=True)) * u for u in y.u))

    with pytest.raises(AssertionError):
        testing.assert_equivariant(bad, KEY, lora, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="unknown GL nonlinearity"):
        GLNetTrunk(width=6, depth=2, nonlinearity="relu").init(KEY, lora)


def test_glnet_mean_head_and_training_mode_dropout():
    lora = testing.random_lora(KEY, SHAPES, rank=RANK)
    model = models.build("glnet", num_outputs=1, equiv_width=4, head="mean", head_width=8)
    variables = model.init(KEY, lora)
    testing.assert_invariant(lambda x: model.apply(variables, x), KEY, lora)
    a = model.apply(variables, lora, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, lora, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


def test_extras_feed_the_models_and_keep_invariance():
    base = testing.random_lora(KEY, SHAPES, rank=RANK)
    f = {n: base.factors(n) for n in base.names}
    mags = {n: jnp.ones(SHAPES[n][0]) for n in base.names}
    lora = Lora.from_factors(f, extras={"magnitude": mags})
    lora2 = Lora.from_factors(f, extras={"magnitude": {n: 2 * m for n, m in mags.items()}})
    for name in ("glnet", "mlp_dense"):
        model = models.build(name, num_outputs=2, **SMALL[name])
        variables = model.init(KEY, lora)
        apply = lambda x: model.apply(variables, x)
        assert not np.allclose(apply(lora), apply(lora2))
        testing.assert_invariant(apply, KEY, lora)
        with pytest.raises(ValueError, match="differ"):
            model.apply(variables, base)  # the extras are missing


def test_vmap_equals_a_loop_in_both_layouts_and_traces_once():
    loras = [testing.random_lora(jax.random.key(i), SHAPES, rank=RANK) for i in range(4)]
    _, model, variables, _ = _setup("glnet")
    loop = jnp.stack([model.apply(variables, x) for x in loras])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def batched(batch):
        return jax.vmap(model.apply, in_axes=(None, 0))(variables, batch)

    leading = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *loras)
    np.testing.assert_allclose(batched(leading), loop, rtol=1e-4, atol=1e-5)
    batched(jax.tree_util.tree_map(lambda x: x + 1, leading))  # same shapes: no retrace
    rank_major = stack(loras, layout="rank_major")
    fast = jax.vmap(model.apply, in_axes=(None, in_axes(rank_major, "rank_major")))(
        variables, rank_major
    )
    np.testing.assert_allclose(fast, loop, rtol=1e-4, atol=1e-5)


def test_a_lora_with_other_modules_is_rejected_naming_them():
    _, model, variables, _ = _setup("glnet")
    renamed = testing.random_lora(
        KEY, {**{k: v for k, v in SHAPES.items() if k != "l1.k"}, "l9.k": (12, 20)}, rank=RANK
    )
    with pytest.raises(ValueError, match=r"l0.k, l0.v, l9.k"):
        model.apply(variables, renamed)
    reshaped = testing.random_lora(KEY, {**SHAPES, "out": (6, 10)}, rank=RANK)
    with pytest.raises(ValueError, match=r"\[6, 10\]: out"):
        model.apply(variables, reshaped)
    batch = testing.random_lora(KEY, SHAPES, rank=RANK, batch_shape=(2,))
    with pytest.raises(ValueError, match="ONE LoRA"):
        model.apply(variables, batch)


def test_unknown_model_or_hyperparameter():
    with pytest.raises(ValueError, match="unknown model 'gl_net'.*glnet"):
        models.build("gl_net", num_outputs=1)
    with pytest.raises(ValueError, match="no hyperparameters \\['width'\\]"):
        models.build("glnet", num_outputs=1, width=3)
    with pytest.raises(ValueError, match="num_outputs"):
        models.build("mlp", num_outputs=0)
