"""The group GL(r)^L, its O(r) subgroup, sampling and the action."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import Lora, group, testing

KEY = jax.random.key(0)
SHAPES = {"q": (12, 10), "k": (12, 10), "o": (6, 9)}


def test_random_gl_has_the_stated_condition_number():
    for r in (2, 4, 7):
        g = np.asarray(group.random_gl(KEY, r, max_cond=4.0, batch_shape=(16,)))
        np.testing.assert_allclose(np.linalg.cond(g), 4.0, rtol=1e-4)
    g = np.asarray(group.random_gl(KEY, 4, max_cond=1e3, batch_shape=(8,)))
    np.testing.assert_allclose(np.linalg.cond(g), 1e3, rtol=1e-3)
    # Both signs of the determinant occur.
    dets = np.linalg.det(np.asarray(group.random_gl(KEY, 3, batch_shape=(64,))))
    assert (dets > 0).any() and (dets < 0).any()


def test_random_orthogonal_is_orthogonal():
    q = np.asarray(group.random_orthogonal(KEY, 5, (10,)))
    np.testing.assert_allclose(
        q @ np.swapaxes(q, -1, -2), np.broadcast_to(np.eye(5), q.shape), atol=1e-5
    )


def test_action_preserves_deltas_and_changes_factors():
    lora = testing.random_lora(KEY, SHAPES, rank=4)
    g = {name: group.random_gl(jax.random.key(i), 4) for i, name in enumerate(lora.names)}
    moved = group.act(lora, g)
    for name in lora.names:
        np.testing.assert_allclose(moved.delta(name), lora.delta(name), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            moved.factors(name)[0], lora.factors(name)[0] @ g[name], rtol=1e-5, atol=1e-6
        )
        assert not np.allclose(moved.factors(name)[0], lora.factors(name)[0], atol=1e-2)


def test_group_law_is_a_right_action():
    lora = testing.random_lora(KEY, SHAPES, rank=4)
    k1, k2 = jax.random.split(jax.random.key(1))
    g1 = {n: group.random_gl(jax.random.fold_in(k1, i), 4) for i, n in enumerate(lora.names)}
    g2 = {n: group.random_gl(jax.random.fold_in(k2, i), 4) for i, n in enumerate(lora.names)}
    twice = group.act(group.act(lora, g1), g2)
    once = group.act(lora, {n: g1[n] @ g2[n] for n in lora.names})
    testing.max_abs_diff((twice.u, twice.v), (once.u, once.v)) < 1e-4
    np.testing.assert_allclose(
        np.concatenate([x.ravel() for x in twice.u + twice.v]),
        np.concatenate([x.ravel() for x in once.u + once.v]),
        rtol=1e-4,
        atol=1e-5,
    )
    # Identity acts trivially.
    ident = group.act(lora, {n: jnp.eye(4) for n in lora.names})
    assert testing.max_abs_diff(ident.u, lora.u) == 0.0


def test_group_law_in_float64_to_1e_10():
    with jax.enable_x64(True):
        lora = testing.random_lora(KEY, SHAPES, rank=3, dtype=jnp.float64)
        gs1 = group.random_element(jax.random.key(1), lora)
        gs2 = group.random_element(jax.random.key(2), lora)
        assert gs1[0].dtype == jnp.float64
        twice = group.act_stacked(group.act_stacked(lora, gs1), gs2)
        once = group.act_stacked(lora, tuple(a @ b for a, b in zip(gs1, gs2)))
        assert testing.max_abs_diff((twice.u, twice.v), (once.u, once.v)) < 1e-10
        for name in lora.names:
            np.testing.assert_allclose(twice.delta(name), lora.delta(name), rtol=1e-10, atol=1e-12)


def test_elements_for_padded_modules_keep_padding_zero():
    f = {
        "a": (np.ones((6, 2), np.float32), np.ones((5, 2), np.float32)),
        "b": (np.ones((6, 4), np.float32), np.ones((5, 4), np.float32)),
    }
    lora = Lora.from_factors(f)
    for kind in ("gl", "o"):
        moved = group.random_action(KEY, lora, kind)
        u, _ = moved.factors("a")
        np.testing.assert_array_equal(u[:, 2:], 0.0)
        assert not np.allclose(u[:, :2], 1.0)
        np.testing.assert_allclose(moved.delta("a"), lora.delta("a"), rtol=1e-4, atol=1e-5)


def test_batched_elements_are_independent_per_example_and_module():
    lora = testing.random_lora(KEY, SHAPES, rank=3, batch_shape=(5,))
    gs = group.random_element(KEY, lora)
    assert gs[0].shape == (5, 2, 3, 3)
    assert not np.allclose(gs[0][0, 0], gs[0][1, 0]) and not np.allclose(gs[0][0, 0], gs[0][0, 1])


def test_bad_group_elements_are_rejected():
    lora = testing.random_lora(KEY, SHAPES, rank=4)
    g = {n: jnp.eye(4) for n in lora.names}
    with pytest.raises(ValueError, match="missing.*'o'"):
        group.act(lora, {n: g[n] for n in ("q", "k")})
    with pytest.raises(ValueError, match="unknown.*'zz'"):
        group.act(lora, {**g, "zz": jnp.eye(4)})
    with pytest.raises(ValueError, match="module 'q'.*rank 4"):
        group.act(lora, {**g, "q": jnp.eye(3)})
    with pytest.raises(ValueError, match="unknown group"):
        group.random_element(KEY, lora, "sl")
