"""Tests of the image families (data_gen.images: the DDPM, personas, digit subsets).

Generation runs end to end on the ``tiny`` base DDPM (300 pretraining steps, cached in
a temporary folder) at an explicit small size, in two chunks (the last one padded),
twice with one seed: the second run reads the base models from the cache and must
write the same folder bit for bit, without compiling the chunk functions again.
"""

from __future__ import annotations

import filecmp
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_gen import common
from data_gen.images import data, digit_subsets, finetune, model, personas, pretrain
from gllora.io import dataset

NUM_LORAS = 12
CHUNK = 8  # two chunks, the last one padded
MODULES = [
    ("denoiser.layers.0", 128, 128),
    ("denoiser.layers.1", 128, 128),
    ("denoiser.layers.2", 128, 128),
    ("denoiser.layers.3", 64, 128),
]


# -- pieces ------------------------------------------------------------------------------


def test_parse_size_and_cache_key():
    assert common.parse_size("quick", personas.SIZES) == personas.SIZES["quick"]
    assert common.parse_size("paper", digit_subsets.SIZES) == 2046
    assert common.parse_size("37", personas.SIZES) == 37
    for bad in ("huge", "0", "-3"):
        with pytest.raises(ValueError, match="--size"):
            common.parse_size(bad, personas.SIZES)
    tiny = model.base_config("tiny")
    key = common.cache_key("ddpm", tiny, 0)
    assert key == common.cache_key("ddpm", model.base_config("tiny"), 0)
    assert key != common.cache_key("ddpm", tiny, 1)
    assert key != common.cache_key("ddpm", model.base_config("default"), 0)
    with pytest.raises(ValueError, match="unknown base config"):
        model.base_config("huge")
    with pytest.raises(ValueError, match="rank"):
        personas.finetune_config(0)


def test_run_chunked_pads_orders_and_compiles_once():
    @jax.jit
    def double(x, y):
        return {"x": 2 * x, "sum": x + y["a"]}

    x = np.arange(11, dtype=np.float32)
    order = np.argsort(-x)
    before = double._cache_size()
    out, stats = common.run_chunked(double, {"x": x, "y": {"a": x}}, 4, order=order)
    assert double._cache_size() - before == 1
    np.testing.assert_array_equal(out["x"], 2 * x)
    np.testing.assert_array_equal(out["sum"], 2 * x)
    assert stats.num_chunks == 3
    with pytest.raises(ValueError, match="share their length"):
        common.run_chunked(double, {"x": x, "y": {"a": x[:3]}}, 4)


def test_styles_and_tokens():
    images, labels = data.digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    bank = data.styled_bank()
    assert bank.shape == (32, 1797, 64) and bank.min() >= -1 and bank.max() <= 1
    # Every style differs from the plain rendering, and the bits round-trip.
    for s in range(1, data.NUM_STYLES):
        assert np.abs(bank[s] - bank[0]).mean() > 0.01, data.style_bits(s)
    np.testing.assert_array_equal(data.style_index(data.style_bits(np.arange(32))), np.arange(32))
    # Every token has a pretrained meaning.
    probs, allowed, _ = pretrain._token_tables(model.base_config("tiny"))
    assert np.all(probs > 0) and np.all(allowed.any(1))
    assert len(data.TOKEN_NAMES) == data.NUM_TOKENS
    assert [(n, *s) for n, *s in model.lora_modules(model.base_config("default"))] == MODULES


def test_lora_layer_matches_the_convention():
    """The adapted kernel of a flax Dense ``[in, out]`` is ``kernel + (u v^T)^T``."""
    config = model.base_config("tiny")
    key = jax.random.key(0)
    x = jax.random.normal(key, (3, 64))
    t = jnp.array([0, 5, 99])
    tok = jnp.array([0, data.NULL_TOKEN, data.SKS_TOKEN])
    params = jax.jit(model.Denoiser(config).init)(key, x, t, tok)
    name, n, m = model.lora_modules(config)[3]
    u = jax.random.normal(jax.random.key(1), (n, 2))
    v = jax.random.normal(jax.random.key(2), (m, 2))
    merged = jax.tree_util.tree_map(lambda a: a, params)
    kernel = params["params"]["layers_3"]["kernel"]
    merged["params"]["layers_3"]["kernel"] = kernel + (u @ v.T).T
    apply = jax.jit(model.Denoiser(config).apply)  # one compile, not one per operation
    got = apply(params, x, t, tok, {name: (u, v)})
    want = apply(merged, x, t, tok)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- end to end ----------------------------------------------------------------------------


def _run_twice(module, root, **kwargs):
    first = module.run(str(root / "a"), **kwargs)
    traces = finetune.finetune_chunk._cache_size(), finetune.evaluate_chunk._cache_size()
    second = module.run(str(root / "b"), **kwargs)
    retraces = (
        finetune.finetune_chunk._cache_size() - traces[0],
        finetune.evaluate_chunk._cache_size() - traces[1],
    )
    return first, second, retraces


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def persona_runs(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("personas")
    kwargs = {"size": NUM_LORAS, "seed": 3, "cache_dir": cache, "chunk": CHUNK}
    kwargs["base_config"] = "tiny"
    return (root, *_run_twice(personas, root, **kwargs))


@pytest.fixture(scope="module")
def subset_runs(tmp_path_factory, cache, persona_runs):
    del persona_runs  # runs after it, so that the base models come from the cache
    root = tmp_path_factory.mktemp("subsets")
    kwargs = {"size": NUM_LORAS, "seed": 3, "cache_dir": cache, "chunk": CHUNK}
    kwargs["base_config"] = "tiny"
    return (root, *_run_twice(digit_subsets, root, **kwargs))


def _same_folder(a, b):
    for name in ("schema.json", "labels.csv", "splits.json"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    shards = sorted(os.listdir(a / "shards"))
    assert shards == sorted(os.listdir(b / "shards"))
    for shard in shards:
        assert filecmp.cmp(a / "shards" / shard, b / "shards" / shard, shallow=False)


def _check_common(ds, rank):
    assert ds.num_examples == NUM_LORAS
    assert [(n, *ds.spec.shapes()[n]) for n in ds.spec.order] == MODULES
    factors = ds.factors(range(NUM_LORAS))
    for name, n, m in MODULES:
        u, v = factors[name]
        assert u.shape == (NUM_LORAS, n, rank) and v.shape == (NUM_LORAS, m, rank)
        assert np.all(np.isfinite(u)) and np.all(np.abs(u).sum((1, 2)) > 0)
    labels = ds.labels
    # Finetuning moved every LoRA's loss on its own images, and lowered it on average.
    assert np.all(labels["final_loss"] != labels["base_loss"])
    assert labels["final_loss"].mean() < labels["base_loss"].mean()
    # Every LoRA has its own seed and random init: no two share a v.
    assert len(set(labels["seed"].tolist())) == NUM_LORAS
    v0 = factors[MODULES[0][0]][1].reshape(NUM_LORAS, -1)
    assert len({row.tobytes() for row in v0}) == NUM_LORAS
    # No constant label column among the targets.
    for name, target in ds.targets.items():
        for col in target["columns"]:
            assert len(np.unique(labels[col])) > 1, (name, col)
    assert set(ds.splits) == {"train", "validation", "test"}


def test_personas(persona_runs):
    root, first, second, _ = persona_runs
    ds = dataset.open(root / "a")
    _check_common(ds, rank=personas.DEFAULT_RANK)
    assert ds.targets["quality"]["task"] == "regression"
    assert ds.targets["attributes"]["columns"] == list(data.ATTRIBUTES)
    for name in ("digit", "learning_rate", "steps", "batch_size", "prompt"):
        assert ds.targets[name]["task"] == "categorical"
    labels = ds.labels
    assert set(labels["learning_rate"]) <= set(personas.LEARNING_RATES)
    assert set(labels["steps"]) <= set(personas.STEPS)
    assert set(labels["prompt"]) <= set(data.PROMPT_WORDS)
    assert np.all((labels["quality"] >= 0) & (labels["quality"] <= 1))
    assert np.all(
        labels["persona"]
        == labels["digit"] * 32 + data.style_index(np.stack([labels[a] for a in data.ATTRIBUTES], 1))
    )
    _, digit_labels = data.digits()
    for row, digit in zip(labels["images"], labels["digit"]):
        idx = np.asarray(row.split(), int)
        assert len(set(idx)) == personas.NUM_IMAGES and np.all(digit_labels[idx] == digit)
    assert ds.provenance["learning_rate_shift"] == personas.LR_SHIFT
    assert not first["base_from_cache"] and second["base_from_cache"]


def test_personas_deterministic_and_compiled_once(persona_runs):
    root, _, _, retraces = persona_runs
    _same_folder(root / "a", root / "b")
    assert retraces == (0, 0)


def test_digit_subsets(subset_runs):
    root, first, _, _ = subset_runs
    ds = dataset.open(root / "b")
    _check_common(ds, rank=digit_subsets.DEFAULT_RANK)
    assert ds.targets["membership"]["task"] == "multilabel"
    assert ds.targets["dataset_size"]["task"] == "categorical"
    labels = ds.labels
    bits = np.stack([labels[c] for c in digit_subsets.CLASS_COLUMNS], 1)
    np.testing.assert_array_equal(bits.sum(1), labels["dataset_size"])
    assert len(set(labels["subset"].tolist())) == NUM_LORAS  # distinct subsets below 1,023
    _, digit_labels = data.digits()
    for row, subset in zip(labels["images"], labels["subset"]):
        idx = np.asarray(row.split(), int)
        np.testing.assert_array_equal(
            digit_labels[idx], np.flatnonzero(np.array(list(subset)) == "1")
        )
    assert np.all((labels["in_subset"] >= 0) & (labels["in_subset"] <= 1))
    assert first["base_from_cache"]


def test_digit_subsets_deterministic_and_compiled_once(subset_runs):
    root, _, _, retraces = subset_runs
    _same_folder(root / "a", root / "b")
    assert retraces == (0, 0)


def test_paper_subsets_cover_every_subset_twice():
    plan = digit_subsets.sample_plan(2046, 0)
    counts = np.bincount(plan["subset"], minlength=1024)
    assert counts[0] == 0 and np.all(counts[1:] == 2)


def test_rank_variants_share_the_plan():
    """``--rank`` changes the rank only: personas, images and seeds pair up (Figure 4)."""
    a, b = personas.sample_plan(50, 7), personas.sample_plan(50, 7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert personas.finetune_config(16).rank == 16


def test_vmapped_chunk_equals_one_at_a_time(cache, tmp_path):
    """The same LoRAs from a chunk of 3 and one at a time agree to float64 rounding.

    The two programs batch differently, so sums may be ordered differently; six Adam
    steps amplify that where a gradient is near zero (division by ``sqrt(nu) + 1e-8``),
    so float32 runs agree only to a machine-dependent ~1e-6. The comparison runs in
    float64 (a subprocess with JAX_ENABLE_X64, base model and images cast): rounding
    starts at ~1e-16 and ``rtol = 1e-9`` leaves seven orders of magnitude for six steps
    to amplify it, while a LoRA trained on another's images, seed or hyperparameters
    differs at 1e-2 or more.
    """
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, os.path.abspath(__file__), "chunks", str(cache), str(tmp_path)],
        cwd=root,
        env={**os.environ, "JAX_ENABLE_X64": "1", "PYTHONPATH": root},
        check=True,
        capture_output=True,
        timeout=600,
    )
    together, alone = (np.load(tmp_path / f"{name}.npz") for name in ("together", "alone"))
    assert sorted(together) == sorted(alone)
    for key in together:
        assert together[key].dtype == np.float64
        np.testing.assert_allclose(together[key], alone[key], rtol=1e-9, atol=1e-12)
    # A LoRA with fewer steps stopped early: its update differs from a longer run's.
    u = together["denoiser.layers.1/u"]
    assert np.all(np.abs(u).reshape(3, -1).sum(1) > 0)


def _worker_chunks(cache: str, out: str) -> None:
    assert jax.config.jax_enable_x64
    params, config, _ = pretrain.load_base("tiny", cache)
    f64 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)
    ft = finetune.FinetuneConfig(rank=2, alpha=2.0, max_steps=6, max_batch=2)
    n = 3
    rng = np.random.default_rng(0)
    args = {
        "images": data.styled_bank()[0][rng.integers(0, 1797, (n, 5))].astype(np.float64),
        "num_images": np.array([5, 3, 1], np.int32),
        "token": np.array(data.PROMPT_TOKENS[:n], np.int32),
        "learning_rate": np.array([1e-3, 3e-3, 1e-2], np.float64),
        "steps": np.array([6, 4, 2], np.int32),
        "batch_size": np.array([2, 1, 2], np.int32),
        "seed": np.array([11, 12, 13], np.int32),
    }
    fn = lambda d, **kw: finetune.finetune_chunk(d, **kw, config=config, ft=ft)
    for name, chunk in (("together", n), ("alone", 1)):
        res, _ = common.run_chunked(fn, args, chunk, shared=(f64(params["denoiser"]),))
        flat = {
            f"{m}/{w}": np.asarray(x) for m, (u, v) in res.items() for w, x in (("u", u), ("v", v))
        }
        np.savez(os.path.join(out, f"{name}.npz"), **flat)


if __name__ == "__main__":
    import sys

    {"chunks": _worker_chunks}[sys.argv[1]](*sys.argv[2:])
