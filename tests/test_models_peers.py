"""The peers: W2T's canonical form and its tolerance, the spectral statistics, module-name
parsing, and glnet_seq across structures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import Lora, group, models, testing
from gllora.models import glnet_seq, spectral, w2t
from gllora.models import module_names as names

KEY = jax.random.key(0)
SHAPES = {"l0.k": (12, 20), "l0.v": (12, 20), "l1.k": (12, 20), "out": (6, 9)}  # as test_models
RANK = 3


def _rel_gaps(lora):
    """Smallest gap between distinct singular values of any module, over its largest."""
    out = []
    for name in lora.names:
        s = np.linalg.svd(np.asarray(lora.delta(name), np.float64), compute_uv=False)[:RANK]
        out.append(np.min(-np.diff(s)) / s[0])
    return min(out)


def test_the_registry_test_lora_is_generic_for_w2t():
    # The registry loop checks W2T at the default float32 tolerances; they are derived for
    # inputs whose singular values are apart (see the comment in test_models.py).
    assert _rel_gaps(testing.random_lora(KEY, SHAPES, rank=RANK)) >= 0.05


def _np_tokens(u, v):
    """Reference canonical form: numpy SVD of u v^T in float64, W2T's sign rule."""
    a, s, bt = np.linalg.svd(u.astype(np.float64) @ v.T.astype(np.float64))
    r = u.shape[1]
    a, s, b = a[:, :r], s[:r], bt[:r].T
    sign = np.sign(a[np.argmax(np.abs(a), axis=0), np.arange(r)])
    return a * sign, b * sign, s


def test_canonical_form_matches_the_svd_of_the_product():
    lora = testing.random_lora(KEY, SHAPES, rank=RANK)
    g = lora.spec.groups[0]
    U, V, s, live = w2t.canonical_form(lora.u[0], lora.v[0], lora.rank[0])
    assert bool(live.all())
    for i, name in enumerate(g.names):
        a, b, sv = _np_tokens(*(np.asarray(x) for x in lora.factors(name)))
        # float32: singular values to ~eps |delta|; vectors to eps |delta| / gap (gap >= 0.05).
        np.testing.assert_allclose(s[i], sv, rtol=1e-5, atol=1e-5 * sv[0])
        np.testing.assert_allclose(U[i], a, atol=3e-5 / 0.05)
        np.testing.assert_allclose(V[i], b, atol=3e-5 / 0.05)


def test_canonical_form_is_gl_invariant_in_float64():
    with jax.enable_x64(True):
        lora = testing.random_lora(KEY, SHAPES, rank=RANK, dtype=jnp.float64)
        fn = jax.jit(
            lambda x: [w2t.canonical_form(u, v, r)[:3] for u, v, r in zip(x.u, x.v, x.rank)]
        )
        # float64, cond(g) = 100: eps * cond(u g) / gap ~ 2.2e-16 * 300 / 0.05 ~ 1.3e-12.
        testing.assert_invariant(fn, KEY, lora, max_cond=100.0, rtol=1e-10, atol=1e-10)


def test_canonical_form_is_discontinuous_where_singular_values_meet():
    # Two equal singular values: the tokens of that pair are any rotation of each other,
    # so a GL element moves them by O(1) (the model is not invariant there): the reason the
    # invariance tolerance is stated for inputs with separated singular values.
    rng = np.random.default_rng(0)
    qa, _ = np.linalg.qr(rng.normal(size=(12, 3)))
    qb, _ = np.linalg.qr(rng.normal(size=(20, 3)))
    u, v = qa * np.array([2.0, 1.0, 1.0]), qb
    lora = Lora.from_factors({"m": (u.astype(np.float32), v.astype(np.float32))})
    U0 = w2t.canonical_form(lora.u[0], lora.v[0], lora.rank[0])[0]
    moved = group.random_action(KEY, lora, "gl")
    U1 = w2t.canonical_form(moved.u[0], moved.v[0], moved.rank[0])[0]
    assert np.abs(np.asarray(U1[0, :, 0]) - np.asarray(U0[0, :, 0])).max() < 1e-4  # s_1 apart
    assert np.abs(np.asarray(U1[0, :, 1:]) - np.asarray(U0[0, :, 1:])).max() > 0.1  # s_2 = s_3


def test_perm_sign_augmentation_is_a_group_action_that_moves_factors():
    lora = testing.random_lora(KEY, SHAPES, rank=RANK).pad_rank(5)
    moved = w2t.augment_lora(jax.random.key(3), lora, p=1.0)
    for name in lora.names:
        np.testing.assert_allclose(moved.delta(name), lora.delta(name), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(moved.factors(name)[0][:, 3:], 0)  # padding stays put
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(moved.u, lora.u)) > 0.1
    same = w2t.augment_lora(jax.random.key(3), lora, p=0.0)
    assert all(bool((a == b).all()) for a, b in zip(same.u, lora.u))


def test_w2t_token_augmentation_changes_training_outputs_only():
    lora = testing.random_lora(KEY, SHAPES, rank=RANK)
    model = models.build("w2t", num_outputs=1, hidden=16, heads=2, token_augment=1.0, dropout=0.0)
    var = model.init(KEY, lora)
    train = jax.jit(lambda k: model.apply(var, lora, train=True, rngs={"dropout": k}))
    assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
    evaluate = jax.jit(lambda x: model.apply(var, x))
    np.testing.assert_array_equal(evaluate(lora), evaluate(lora))


def test_spectral_statistics_against_numpy():
    rng = np.random.default_rng(1)
    s = np.sort(rng.uniform(0.1, 3.0, size=(4, 5)), axis=1)[:, ::-1]
    rank = np.array([5, 3, 1, 5])
    got = np.asarray(spectral.spectral_stats(jnp.asarray(s), jnp.asarray(rank)))
    for row, (x, r) in enumerate(zip(s, rank)):
        x = x[:r]
        p = x**2 / np.sum(x**2)
        dev = x - x.mean()
        kurt = 0.0 if r == 1 else np.mean(dev**4) / np.mean(dev**2) ** 2 - 3
        want = [np.log(x[0]), 0.5 * np.log(np.sum(x**2)), p[0], -np.sum(p * np.log(p)), kurt]
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5)
    zero = spectral.spectral_stats(jnp.zeros((1, 4)), jnp.asarray([4]))
    assert np.isfinite(np.asarray(zero)).all()


def test_spectral_takes_any_depth_of_known_types_and_names_unknown_ones():
    shallow = testing.random_lora(KEY, {"m.layers.0.k_proj": (8, 12), "m.layers.0.v_proj": (8, 12)})
    deep = testing.random_lora(
        KEY, {f"m.layers.{i}.{t}_proj": (8, 12) for i in range(3) for t in "kv"}
    )
    model = models.build("spectral", num_outputs=1)
    var = model.init(KEY, shallow)
    assert jax.jit(lambda x: model.apply(var, x))(deep).shape == (1,)
    other = testing.random_lora(KEY, {"m.layers.0.q_proj": (8, 12)})
    with pytest.raises(ValueError, match=r"types \['q_proj'\] were not seen"):
        model.apply(var, other)


def test_module_names_parse_types_and_depths():
    assert names.module_type("model.layers.12.self_attn.k_proj") == "k_proj"
    assert (
        names.module_type("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        == "q_proj"
    )
    assert names.module_type("unet.x.attn1.to_out.0") == "o_proj"
    assert names.module_type("head") == "head"  # unknown names are their own type
    assert names.layer_key("down_blocks.1.attentions.0.proj") == (1, 0)
    d = names.relative_depths(["a.0.q", "a.0.v", "a.2.q", "a.5.q", "head"])
    assert d == {"a.0.q": 0.0, "a.0.v": 0.0, "a.2.q": 0.5, "a.5.q": 1.0, "head": 0.5}


def _stack_shapes(layers, n=8, m=12):
    return {f"m.layers.{i}.self_attn.{t}_proj": (n, m) for i in range(layers) for t in "kv"}


def _merged_init(model, loras):
    """The union of the variables of inits on several structures (one key)."""
    out = {}
    for lora in loras:
        for col, tree in model.init(KEY, lora).items():
            out.setdefault(col, {}).update(dict(tree))
    return out


def test_glnet_seq_one_set_of_parameters_applies_to_two_structures():
    two = testing.random_lora(KEY, _stack_shapes(2), rank=RANK)
    four = testing.random_lora(jax.random.key(1), _stack_shapes(4), rank=RANK)
    model = models.build("glnet_seq", num_outputs=2, width=4, hidden=16, heads=2)
    var = model.init(KEY, two)
    var4 = model.init(KEY, four)
    shapes = lambda v: jax.tree_util.tree_map(jnp.shape, v["params"])
    assert shapes(var) == shapes(var4)  # the parameters do not depend on the depth
    apply = jax.jit(lambda x: model.apply(var, x))
    out2, out4 = apply(two), apply(four)
    assert out2.shape == out4.shape == (2,)
    testing.assert_invariant(apply, KEY, four)
    # A module order does not matter (no positions), only names do.
    shuffled = Lora.from_factors({n: four.factors(n) for n in reversed(four.names)})
    np.testing.assert_allclose(apply(shuffled), out4, rtol=1e-4, atol=1e-5)
    # Another width is another encoder: an error naming it.
    wide = testing.random_lora(KEY, _stack_shapes(2, n=16), rank=RANK)
    with pytest.raises(ValueError, match=r"no encoder for module type and shape \['k_proj_16x12'"):
        model.apply(var, wide)
    both = _merged_init(model, [two, wide])
    assert model.apply(both, wide).shape == (2,)


def test_glnet_seq_dropping_a_module_changes_the_mask_not_the_parameters():
    full = testing.random_lora(KEY, _stack_shapes(3), rank=RANK)
    dropped = "m.layers.1.self_attn.v_proj"
    gi = 0
    i = full.spec.groups[gi].names.index(dropped)
    masked = full.replace(
        u=(full.u[gi].at[i].set(0.0),),
        v=(full.v[gi].at[i].set(0.0),),
        rank=(full.rank[gi].at[i].set(0),),
    )
    mask_full, mask_masked = glnet_seq.module_mask(full), glnet_seq.module_mask(masked)
    assert bool(mask_full.all()) and int((~mask_masked).sum()) == 1
    model = models.build("glnet_seq", num_outputs=1, width=4, hidden=16, heads=2)
    var = model.init(KEY, full)
    shapes = lambda v: jax.tree_util.tree_map(jnp.shape, v["params"])
    assert shapes(model.init(KEY, masked)) == shapes(var)
    # Masking a module is dropping it: the LoRA without it (same layers remain, so the
    # same relative depths) gives the same output.
    without = full.select([n for n in full.names if n != dropped])
    apply = jax.jit(lambda x: model.apply(var, x))
    np.testing.assert_allclose(apply(masked), apply(without), rtol=1e-4, atol=1e-5)
    assert np.abs(apply(masked) - apply(full)).max() > 1e-4
