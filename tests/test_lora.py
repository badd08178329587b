"""The Lora pytree: construction, grouping by shape, padding, batching, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gllora import Lora, in_axes, stack, testing, to_layout

RNG = np.random.default_rng(0)


def _factors(n, m, r, batch=()):
    return (
        RNG.normal(size=(*batch, n, r)).astype(np.float32),
        RNG.normal(size=(*batch, m, r)).astype(np.float32),
    )


def test_from_factors_groups_same_shapes_and_keeps_order():
    f = {"b": _factors(8, 6, 2), "a": _factors(4, 5, 2), "c": _factors(8, 6, 2)}
    lora = Lora.from_factors(f)
    assert lora.names == ("b", "a", "c")
    assert [g.names for g in lora.spec.groups] == [("b", "c"), ("a",)]
    assert lora.u[0].shape == (2, 8, 2) and lora.v[0].shape == (2, 6, 2)
    for name, (u, v) in f.items():
        np.testing.assert_array_equal(lora.factors(name)[0], u)
        np.testing.assert_allclose(lora.delta(name), u @ v.T, rtol=1e-5, atol=1e-6)
    assert lora.shapes == {"b": (8, 6), "a": (4, 5), "c": (8, 6)}


def test_mixed_ranks_in_a_group_are_zero_padded_exactly():
    f = {"x": _factors(8, 6, 2), "y": _factors(8, 6, 5)}
    lora = Lora.from_factors(f)
    assert lora.u[0].shape == (2, 8, 5)
    assert int(lora.rank_of("x")) == 2 and int(lora.rank_of("y")) == 5
    np.testing.assert_array_equal(lora.factors("x")[0][:, 2:], 0)
    np.testing.assert_allclose(lora.delta("x"), f["x"][0] @ f["x"][1].T, rtol=1e-5, atol=1e-6)


def test_pad_rank_leaves_deltas_unchanged_and_refuses_to_shrink():
    lora = testing.random_lora(jax.random.key(0), {"a": (8, 6), "b": (3, 4)}, rank=3)
    padded = lora.pad_rank(7)
    assert padded.u[0].shape[-1] == 7
    for name in lora.names:
        np.testing.assert_allclose(padded.delta(name), lora.delta(name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot pad"):
        padded.pad_rank(3)


def test_is_a_pytree_and_stacks_into_batches():
    loras = [
        testing.random_lora(jax.random.key(i), {"a": (8, 6), "b": (3, 4)}, rank=3) for i in range(4)
    ]
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *loras)
    assert batch.batch_shape == (4,)
    np.testing.assert_allclose(batch.delta("a")[2], loras[2].delta("a"), rtol=1e-5, atol=1e-6)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(batch)]
    assert paths[0] == ".u[0]"


def test_stack_pads_ranks_and_layouts_round_trip():
    small = testing.random_lora(jax.random.key(0), {"a": (8, 6)}, rank=2)
    big = testing.random_lora(jax.random.key(1), {"a": (8, 6)}, rank=5)
    batch = stack([small, big])
    assert batch.u[0].shape == (2, 1, 8, 5)
    np.testing.assert_array_equal(batch.rank[0][:, 0], [2, 5])
    np.testing.assert_allclose(batch.delta("a")[0], small.delta("a"), rtol=1e-5, atol=1e-6)
    rm = stack([small, big], layout="rank_major")
    assert rm.u[0].shape == (1, 8, 2, 5) and rm.rank[0].shape == (1, 2)
    back = to_layout(rm, "rank_major", "leading")
    np.testing.assert_array_equal(back.u[0], batch.u[0])
    # vmap over either layout gives the same per-example results.
    f = lambda x: x.delta("a").sum()
    np.testing.assert_allclose(
        jax.vmap(f, in_axes=(in_axes(rm, "rank_major"),))(rm),
        jax.vmap(f)(batch),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "factors, match",
    [
        ({"a": (np.ones((4, 2)), np.ones((5, 3)))}, "different ranks"),
        ({"a": (np.ones(4), np.ones(5))}, "same number of axes"),
        ({"a": (np.ones((4, 2)), np.ones((2, 5, 2)))}, "same number of axes"),
        ({"a": (np.ones((0, 2)), np.ones((5, 2)))}, "empty dimension"),
        ({"a": (np.full((4, 2), np.nan), np.ones((5, 2)))}, "NaN/Inf"),
        ({"a": (np.ones((4, 2)), np.full((5, 2), np.inf))}, "NaN/Inf"),
        ({"a": (np.ones((4, 2), int), np.ones((5, 2)))}, "floating point"),
        ({"a": (np.ones((3, 4, 2)), np.ones((2, 5, 2)))}, "different batch axes"),
        ({"a": np.ones((4, 2))}, "pair"),
        ({"": (np.ones((4, 2)), np.ones((5, 2)))}, "non-empty strings"),
        ({}, "at least one module"),
    ],
)
def test_bad_input_names_the_module_and_shapes(factors, match):
    with pytest.raises(ValueError, match=match) as e:
        Lora.from_factors(factors)
    if factors and "a" in factors and match not in ("pair",):
        assert "'a'" in str(e.value)


def test_modules_with_different_batch_axes_are_rejected():
    with pytest.raises(ValueError, match="'b'.*batch axes"):
        Lora.from_factors({"a": _factors(4, 5, 2, (3,)), "b": _factors(4, 5, 2, (2,))})


def test_stack_rejects_different_structures():
    a = testing.random_lora(jax.random.key(0), {"a": (8, 6)}, rank=2)
    b = testing.random_lora(jax.random.key(0), {"b": (8, 6)}, rank=2)
    with pytest.raises(ValueError, match="'b'"):
        stack([a, b])


def test_extras_travel_with_the_lora():
    f = {"a": _factors(4, 5, 2), "b": _factors(3, 5, 2)}
    lora = Lora.from_factors(f, extras={"magnitude": {"a": np.ones(4), "b": np.ones(3)}})
    assert lora.spec.extras == (("magnitude", ("a", "b")),)
    with pytest.raises(ValueError, match="unknown modules"):
        Lora.from_factors(f, extras={"magnitude": {"zz": np.ones(4)}})
    with pytest.raises(ValueError, match="NaN/Inf"):
        Lora.from_factors(f, extras={"magnitude": {"a": np.full(4, np.nan)}})


def test_from_factors_keeps_numpy_on_the_host_and_jax_on_the_device():
    f = {"a": _factors(4, 5, 2), "b": _factors(4, 5, 3)}
    host = Lora.from_factors(f, extras={"magnitude": {"a": np.ones(4)}})
    leaves = jax.tree_util.tree_leaves(host)  # a registered pytree either way
    assert leaves and all(isinstance(x, np.ndarray) for x in leaves)
    assert host.u[0].dtype == np.float32 and host.rank[0].dtype == np.int32
    np.testing.assert_allclose(host.delta("a"), f["a"][0] @ f["a"][1].T, rtol=1e-5, atol=1e-6)
    dev = Lora.from_factors({k: (jnp.asarray(u), v) for k, (u, v) in f.items()})
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(dev))
    np.testing.assert_array_equal(dev.u[0], host.u[0])
    # a numpy LoRA goes through jit as it is, and selecting modules keeps it on the host
    assert float(jax.jit(lambda x: x.delta("b").sum())(host)) == pytest.approx(
        float(host.delta("b").sum()), rel=1e-5
    )
    one = host.select(["b"])
    assert one.names == ("b",) and isinstance(one.u[0], np.ndarray) and one.u[0].shape[-1] == 3
