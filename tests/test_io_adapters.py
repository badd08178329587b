"""Tests of gllora.io.adapters against real PEFT/diffusers/kohya/LyCORIS files.

The fixtures in tests/data/real_loras were made with the real libraries (see its
MANIFEST.json); ``ground_truth.safetensors`` holds each module's true delta.

Tolerance: factors are float32 and ``u @ v.T`` sums at most r1*r2 = 16 products, so
each entry is within a few float32 ulps (~1e-7 relative) of the sum it represents;
cancellation makes the relative error of single small entries unbounded, so the
absolute part is relative to the module's largest entry: ``rtol=1e-5``,
``atol=1e-6 * max|delta|``. Measured worst case on the fixtures: 3e-7 (LoHa).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gllora import io
from gllora.io import adapters

DATA = Path(__file__).parent / "data" / "real_loras"

# (file or folder under DATA, ground-truth folder, expected format)
FIXTURES = [
    ("diffusers_sd/pytorch_lora_weights.safetensors", "diffusers_sd", "diffusers"),
    ("diffusers_sd/pytorch_lora_weights_no_metadata.safetensors", "diffusers_sd", "diffusers"),
    ("diffusers_sd_conv/pytorch_lora_weights.safetensors", "diffusers_sd_conv", "diffusers"),
    (
        "diffusers_sd_conv/pytorch_lora_weights_mixed_keys.safetensors",
        "diffusers_sd_conv",
        "diffusers",
    ),
    ("kohya_from_diffusers/kohya_lora.safetensors", "kohya_from_diffusers", "kohya_locon"),
    ("kohya_lycoris_locon/kohya_lycoris_locon.safetensors", "kohya_lycoris_locon", "kohya_locon"),
    ("lycoris_loha/lycoris_loha.safetensors", "lycoris_loha", "lycoris_loha"),
    ("lycoris_lokr/lycoris_lokr.safetensors", "lycoris_lokr", "lycoris_lokr"),
    ("peft_gpt2/lora_conv1d", "peft_gpt2/lora_conv1d", "peft"),
    ("peft_llm/dora", "peft_llm/dora", "peft"),
    ("peft_llm/lora_embedding", "peft_llm/lora_embedding", "peft"),
    ("peft_llm/lora_r4_kv", "peft_llm/lora_r4_kv", "peft"),
    ("peft_llm/lora_r8_qkvo_patterns", "peft_llm/lora_r8_qkvo_patterns", "peft"),
    ("peft_llm/lora_rslora", "peft_llm/lora_rslora", "peft"),
]
_KINDS = {"linear": "linear", "Conv1D": "conv1d", "embedding": "embedding"}

LOCON = DATA / "kohya_lycoris_locon" / "kohya_lycoris_locon.safetensors"
LOCON_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def assert_delta(got, want, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=what)


def deltas(lora) -> dict[str, np.ndarray]:
    return {name: np.asarray(lora.delta(name)) for name in lora.names}


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


def rewrite(src, dst, edit=None, metadata=None):
    """Copies a safetensors file through ``edit(dict) -> dict`` (numpy dtypes only)."""
    tensors = dict(load_file(str(src)))
    tensors = edit(tensors) if edit else tensors
    save_file(tensors, str(dst), metadata=metadata_of(src) if metadata is None else metadata)
    return dst


def write_raw(path, tensors, metadata=None, header_extra=None):
    """A safetensors file from ``{key: (dtype name, shape, bytes)}``, for bf16 and bad headers."""
    header, blobs, offset = {}, [], 0
    for key, (dtype, shape, data) in tensors.items():
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def to_bf16(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """bf16 bytes of ``x`` (truncated) and the float32 values they stand for."""
    top = (np.asarray(x, "<f4").view("<u4") >> 16).astype("<u2")
    return top.tobytes(), (top.astype(np.uint32) << 16).view(np.float32)


def copy_peft(name, tmp_path) -> Path:
    dst = tmp_path / Path(name).name
    shutil.copytree(DATA / name, dst)
    return dst


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


# -- every fixture against its ground truth ------------------------------------


@pytest.mark.parametrize("rel,truth,fmt", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_fixture_matches_ground_truth(rel, truth, fmt):
    gt = json.loads((DATA / truth / "ground_truth.json").read_text())["modules"]
    gt_delta = load_file(str(DATA / truth / "ground_truth.safetensors"))
    info = io.inspect(DATA / rel)
    lora = io.load_adapter(DATA / rel)

    assert info.format == fmt
    assert sorted(lora.names) == sorted(gt), "every module, none extra"
    assert info.names == lora.names and info.shapes == lora.shapes
    no_metadata = "no_metadata" in rel
    for name in lora.names:
        want = gt_delta[f"{name}.delta"]
        scale = gt[name].get("scaling", gt[name].get("scale"))
        if no_metadata:  # diffusers then uses alpha = r: the delta without the config scale
            want, scale = want / scale, 1.0
        mod = info.modules[name]
        # Only conv kernels are reshaped; Conv1D/embedding deltas are compared as stored.
        assert mod.base_shape in (None, want.shape), name
        assert_delta(lora.delta(name), want.reshape(mod.shape), f"{rel}: {name}")
        assert mod.scale == pytest.approx(scale, rel=1e-6), name
        assert int(lora.rank_of(name)) == mod.rank
        if gt[name].get("kind") in _KINDS:
            assert mod.layout == _KINDS[gt[name]["kind"]], name
        if "r" in gt[name] and mod.kind == "lora":
            assert mod.rank == gt[name]["r"]


def test_modules_in_natural_order():
    info = io.inspect(DATA / "peft_llm/lora_r4_kv")
    assert info.names == (
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    )


def test_natural_sort_puts_2_before_10(tmp_path):
    folder = copy_peft("peft_llm/lora_r4_kv", tmp_path)

    def renumber(t):
        return {
            k.replace("layers.1.", "layers.10.").replace("layers.0.", "layers.2."): v
            for k, v in t.items()
        }

    rewrite(folder / "adapter_model.safetensors", folder / "adapter_model.safetensors", renumber)
    names = io.load_adapter(folder).names
    assert names[0].startswith("model.layers.2.") and names[-1].startswith("model.layers.10.")


# -- PEFT ----------------------------------------------------------------------


def test_rank_pattern_and_alpha_pattern_pick_the_right_scales():
    info = io.inspect(DATA / "peft_llm/lora_r8_qkvo_patterns")
    expect = {  # (rank, scale): r=8, alpha=16; o_proj l0 r=2; q_proj l1 r=4; v_proj alpha 4
        "model.layers.0.self_attn.o_proj": (2, 8.0),
        "model.layers.1.self_attn.q_proj": (4, 4.0),
        "model.layers.0.self_attn.q_proj": (8, 2.0),
        "model.layers.0.self_attn.v_proj": (8, 0.5),
        "model.layers.1.self_attn.v_proj": (8, 0.5),
        "model.layers.1.self_attn.o_proj": (8, 2.0),
    }
    for name, (rank, scale) in expect.items():
        assert (info.ranks[name], info.scales[name]) == (rank, scale), name
    assert info.config["alpha_pattern"] == {"v_proj": 4}


def test_rank_pattern_must_describe_the_file(tmp_path):
    folder = copy_peft("peft_llm/lora_r8_qkvo_patterns", tmp_path)
    edit_config(folder, rank_pattern={})
    with pytest.raises(ValueError, match=r"adapter_config\.json.*o_proj.*rank 8.*rank 2"):
        io.inspect(folder)


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    assert set(io.inspect(DATA / "peft_llm/lora_rslora").scales.values()) == {8 / math.sqrt(4)}
    folder = copy_peft("peft_llm/lora_rslora", tmp_path)
    edit_config(folder, use_rslora=False)
    assert set(io.inspect(folder).scales.values()) == {8 / 4}


def test_dora_magnitude_is_an_extra():
    lora = io.load_adapter(DATA / "peft_llm/dora")
    info = io.inspect(DATA / "peft_llm/dora")
    raw = load_file(str(DATA / "peft_llm/dora/adapter_model.safetensors"))
    assert set(lora.extras["magnitude"]) == set(lora.names)
    for name in lora.names:
        want = raw[f"base_model.model.{name}.lora_magnitude_vector"]
        np.testing.assert_array_equal(np.asarray(lora.extras["magnitude"][name]), want)
        assert info.modules[name].extras == {"magnitude": (lora.shapes[name][0],)}


def test_dora_config_without_magnitude_is_an_error(tmp_path):
    folder = copy_peft("peft_llm/dora", tmp_path)
    weights = folder / "adapter_model.safetensors"
    rewrite(weights, weights, lambda t: {k: v for k, v in t.items() if "magnitude" not in k})
    with pytest.raises(ValueError, match="use_dora.*lora_magnitude_vector"):
        io.inspect(folder)


def test_embedding_base_layer_is_ignored_but_not_elsewhere(tmp_path):
    info = io.inspect(DATA / "peft_llm/lora_embedding")
    assert info.layouts["model.embed_tokens"] == "embedding"
    assert info.modules["model.embed_tokens"].base_shape == (128, 64)
    folder = copy_peft("peft_llm/lora_embedding", tmp_path)
    weights = folder / "adapter_model.safetensors"
    extra = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    rewrite(weights, weights, lambda t: {**t, extra: np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match=r"not understood.*q_proj\.base_layer\.weight"):
        io.load_adapter(folder)


def test_peft_weights_file_uses_the_config_beside_it(tmp_path):
    info = io.inspect(DATA / "peft_gpt2/lora_conv1d/adapter_model.safetensors")
    assert info.format == "peft" and set(info.layouts.values()) == {"conv1d"}
    assert info.config["fan_in_fan_out"] is True
    lonely = tmp_path / "adapter_model.safetensors"
    shutil.copy(DATA / "peft_gpt2/lora_conv1d/adapter_model.safetensors", lonely)
    with pytest.raises(ValueError, match="adapter_config.json"):
        io.inspect(lonely)


def test_legacy_bin_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(DATA / "peft_llm/lora_r4_kv/adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    disguised = tmp_path / "weights.safetensors"
    shutil.copy(folder / "adapter_model.bin", disguised)
    for path in (folder, folder / "adapter_model.bin", disguised):
        with pytest.raises(ValueError, match=r"adapter_model\.bin|weights\.safetensors") as e:
            io.load_adapter(path)
        assert "never unpickles" in str(e.value) and "save_pretrained" in str(e.value)
    assert not marker.exists()


# -- diffusers -------------------------------------------------------------------


def test_mixed_key_file_keeps_every_module():
    manifest = json.loads((DATA / "MANIFEST.json").read_text())
    dropped = manifest["fixtures"]["diffusers_sd_conv"][
        "diffusers_loader_drops_from_mixed_keys_file"
    ]
    mixed = io.load_adapter(DATA / "diffusers_sd_conv/pytorch_lora_weights_mixed_keys.safetensors")
    plain = io.load_adapter(DATA / "diffusers_sd_conv/pytorch_lora_weights.safetensors")
    assert set(dropped) <= set(mixed.names) and mixed.names == plain.names
    assert len(mixed.names) == 45
    for name, want in deltas(plain).items():
        assert_delta(mixed.delta(name), want, name)


def test_text_model_level_and_text_encoder_2_prefix(tmp_path):
    src = DATA / "diffusers_sd/pytorch_lora_weights.safetensors"
    plain = deltas(io.load_adapter(src))
    old = rewrite(
        src,
        tmp_path / "old.safetensors",
        lambda t: {k.replace("text_encoder.", "text_encoder.text_model."): v for k, v in t.items()},
    )
    lora = io.load_adapter(old)
    assert sorted(lora.names) == sorted(plain)
    for name, want in plain.items():
        assert_delta(lora.delta(name), want, name)

    sdxl = rewrite(
        src,
        tmp_path / "sdxl.safetensors",
        lambda t: {
            k.replace("text_encoder.", "text_encoder_2.text_model."): v for k, v in t.items()
        },
    )
    names = io.inspect(sdxl).names
    assert "text_encoder_2.encoder.layers.1.self_attn.v_proj" in names
    assert not any(n.startswith("text_encoder.") for n in names)


def test_attn_procs_spelling_and_network_alpha(tmp_path):
    rng = np.random.default_rng(0)
    down, up = (
        rng.normal(size=(2, 8)).astype(np.float32),
        rng.normal(size=(8, 2)).astype(np.float32),
    )
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"{attn}.processor.to_q_lora.down.weight": down,
        f"{attn}.processor.to_q_lora.up.weight": up,
        f"{attn}.processor.to_out_lora.down.weight": down,
        f"{attn}.processor.to_out_lora.up.weight": up,
    }
    save_file(tensors, str(tmp_path / "procs.safetensors"))
    lora = io.load_adapter(tmp_path / "procs.safetensors")
    assert lora.names == (f"unet.{attn}.to_out.0", f"unet.{attn}.to_q")
    assert_delta(lora.delta(f"unet.{attn}.to_q"), up @ down)

    tensors = {
        "unet.mid.lora.down.weight": down,
        "unet.mid.lora.up.weight": up,
        "unet.mid.alpha": np.array(1.0, np.float32),
    }
    save_file(tensors, str(tmp_path / "alpha.safetensors"))
    assert io.inspect(tmp_path / "alpha.safetensors").scales == {"unet.mid": 0.5}


# -- kohya / LyCORIS -------------------------------------------------------------


def _locon_raw(alpha=None, factor_dtype="F32"):
    """The LoCon fixture's tensors as raw entries, with alphas replaced by ``alpha``."""
    raw, floats = {}, {}
    for key, x in load_file(str(LOCON)).items():
        if key.endswith(".alpha"):
            if alpha is not None:
                raw[key] = alpha
            continue
        if factor_dtype == "BF16":
            data, floats[key] = to_bf16(x)
        else:
            data, floats[key] = x.astype("<f4").tobytes(), x
        raw[key] = (factor_dtype, x.shape, data)
    return raw, floats


@pytest.mark.parametrize(
    "alpha,scale",
    [
        (None, 1.0),
        (("F32", (), np.float32(0).tobytes()), 1.0),
        (("F16", (), np.float16(2).tobytes()), 0.5),
        (("BF16", (), to_bf16(np.float32([2]))[0]), 0.5),
        (("I64", (), np.int64(2).tobytes()), 0.5),
        (("F64", (), np.float64(2).tobytes()), 0.5),
    ],
    ids=["missing", "zero", "f16", "bf16", "i64", "f64"],
)
def test_kohya_alpha_any_dtype_missing_or_zero(tmp_path, alpha, scale):
    raw, _ = _locon_raw(alpha)
    path = write_raw(tmp_path / "a.safetensors", raw)
    assert io.inspect(path).scales[LOCON_FC1] == scale  # r = 4


def test_bf16_factors_are_widened_exactly(tmp_path):
    raw, floats = _locon_raw(("F32", (), np.float32(2).tobytes()), factor_dtype="BF16")
    lora = io.load_adapter(write_raw(tmp_path / "bf16.safetensors", raw))
    down = floats[f"{LOCON_FC1}.lora_down.weight"]
    up = floats[f"{LOCON_FC1}.lora_up.weight"]
    assert_delta(lora.delta(LOCON_FC1), 0.5 * up.astype(np.float64) @ down)


def test_f16_factors(tmp_path):
    path = rewrite(
        LOCON,
        tmp_path / "f16.safetensors",
        lambda t: {k: v.astype(np.float16) for k, v in t.items()},
    )
    raw = load_file(str(path))
    lora = io.load_adapter(path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    want = raw[f"{conv}.lora_up.weight"].reshape(16, 2).astype(np.float64) @ raw[
        f"{conv}.lora_down.weight"
    ].reshape(2, -1)
    assert_delta(lora.delta(conv), 2.0 * want)  # conv_alpha 4 / conv_dim 2


def _loha(rng, n, m, r1, r2):
    return {
        "lora_unet_x.hada_w1_a": rng.normal(size=(n, r1)).astype(np.float32),
        "lora_unet_x.hada_w1_b": rng.normal(size=(r1, m)).astype(np.float32),
        "lora_unet_x.hada_w2_a": rng.normal(size=(n, r2)).astype(np.float32),
        "lora_unet_x.hada_w2_b": rng.normal(size=(r2, m)).astype(np.float32),
        "lora_unet_x.alpha": np.array(3.0, np.float32),
    }


@pytest.mark.parametrize(
    "n,m,r1,r2,rank", [(32, 20, 3, 3, 9), (12, 16, 4, 4, 12), (16, 10, 4, 4, 10)]
)
def test_loha_khatri_rao_rank_and_dense_cap(tmp_path, n, m, r1, r2, rank):
    t = _loha(np.random.default_rng(1), n, m, r1, r2)
    save_file(t, str(tmp_path / "loha.safetensors"))
    lora = io.load_adapter(tmp_path / "loha.safetensors")
    want = (t["lora_unet_x.hada_w1_a"].astype(np.float64) @ t["lora_unet_x.hada_w1_b"]) * (
        t["lora_unet_x.hada_w2_a"].astype(np.float64) @ t["lora_unet_x.hada_w2_b"]
    )
    assert int(lora.rank_of("lora_unet_x")) == rank
    assert_delta(lora.delta("lora_unet_x"), want * 3.0 / r1)


@pytest.mark.parametrize(
    "w1,w2,scale,rank",
    [
        (
            {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 3)},
            {"lokr_w2_a": (5, 3), "lokr_w2_b": (3, 6)},
            1.0,
            6,
        ),
        ({"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 3)}, {"lokr_w2": (5, 6)}, 1.5, 2 * 5),
        ({"lokr_w1": (6, 2)}, {"lokr_w2_a": (5, 2), "lokr_w2_b": (2, 7)}, 1.5, 2 * 2),
        ({"lokr_w1": (3, 4)}, {"lokr_w2": (4, 2, 3, 3)}, 1.0, 3 * 4),  # nothing decomposed
    ],
    ids=["both-decomposed", "w1-decomposed", "w2-decomposed", "conv-full"],
)
def test_lokr_exact_kronecker_factors(tmp_path, w1, w2, scale, rank):
    """alpha = 3; scale = alpha / dim of the decomposed w2 (else w1); rank = k1 * k2."""
    rng = np.random.default_rng(2)
    t = {f"lora_unet_x.{k}": rng.normal(size=s).astype(np.float32) for k, s in {**w1, **w2}.items()}
    t["lora_unet_x.alpha"] = np.array(3.0, np.float32)
    save_file(t, str(tmp_path / "lokr.safetensors"))

    def full(w):
        if f"lora_unet_x.lokr_{w}" in t:
            x = t[f"lora_unet_x.lokr_{w}"].astype(np.float64)
            return x.reshape(x.shape[0], -1)
        return t[f"lora_unet_x.lokr_{w}_a"].astype(np.float64) @ t[f"lora_unet_x.lokr_{w}_b"]

    info = io.inspect(tmp_path / "lokr.safetensors")
    lora = io.load_adapter(tmp_path / "lokr.safetensors")
    assert info.scales["lora_unet_x"] == scale
    assert info.ranks["lora_unet_x"] == rank == int(lora.rank_of("lora_unet_x"))
    assert_delta(lora.delta("lora_unet_x"), scale * np.kron(full("w1"), full("w2")))


def test_kohya_metadata_is_kept_raw_and_parsed(tmp_path):
    metadata = {
        "ss_num_train_images": "12",
        "ss_learning_rate": "1e-4",
        "ss_tag_frequency": json.dumps({"set": {"cat": 3}}),
        "ss_training_comment": "None",
        "ss_cache_latents": "True",
        "ss_sd_model_name": "v1-5.ckpt",
        "sshs_model_hash": "0x67dc",
    }
    path = rewrite(LOCON, tmp_path / "meta.safetensors", metadata=metadata)
    info = io.inspect(path)
    assert info.metadata == metadata
    assert info.parsed_metadata == {
        "ss_num_train_images": 12,
        "ss_learning_rate": 1e-4,
        "ss_tag_frequency": {"set": {"cat": 3}},
        "ss_training_comment": None,
        "ss_cache_latents": True,
        "ss_sd_model_name": "v1-5.ckpt",
        "sshs_model_hash": "0x67dc",
    }


# -- bad input: ValueError (OSError for a missing path) naming file and module ----------


BOTH = pytest.mark.parametrize("read", [io.inspect, io.load_adapter], ids=["inspect", "load"])


@BOTH
@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"\x01\x02\x03", "only 3 bytes"),
        (struct.pack("<Q", 10**6) + b"{}", "runs past the end"),
        (struct.pack("<Q", 5) + b"{abc}", "not JSON"),
        (struct.pack("<Q", 3) + b"[1]", "not an object"),
        (struct.pack("<Q", 2) + b"{}", "holds no tensors"),
        (struct.pack("<Q", 8) + b'{"a":1} ', "dtype, shape and data_offsets"),
        (struct.pack("<Q", 15) + b'{"a":1,"a":2}  ', "duplicate key"),
        (struct.pack("<Q", 28) + b'{"__metadata__": {"a": 1}}  ', "strings to strings"),
    ],
    ids=["empty", "tiny", "length", "json", "array", "no-tensors", "entry", "dup", "metadata"],
)
def test_malformed_files(tmp_path, read, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read(path)
    assert str(path) in str(e.value)


@BOTH
def test_random_bytes_and_truncated_files(tmp_path, read):
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(3).bytes(4096))
    half = tmp_path / "half.safetensors"
    half.write_bytes(LOCON.read_bytes()[: LOCON.stat().st_size // 2])
    short = tmp_path / "short.safetensors"
    short.write_bytes(LOCON.read_bytes()[:-3])
    for path, message in ((noise, "not a safetensors"), (half, "truncated"), (short, "truncated")):
        with pytest.raises(ValueError, match=message) as e:
            read(path)
        assert str(path) in str(e.value)


@BOTH
@pytest.mark.parametrize(
    "tensors,message",
    [
        ({"lora_unet_x.lora_down.weight": ("F99", [1], b"\0")}, "unknown dtype 'F99'"),
        ({"lora_unet_x.lora_down.weight": ("F32", [2, 2], b"\0" * 12)}, r"needs 16 bytes"),
        ({"lora_unet_x.lora_down.weight": ("F32", [-1], b"")}, "non-negative"),
    ],
    ids=["dtype", "size", "shape"],
)
def test_bad_tensor_entries(tmp_path, read, tensors, message):
    path = write_raw(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ValueError, match=message) as e:
        read(path)
    assert str(path) in str(e.value) and "lora_unet_x.lora_down.weight" in str(e.value)


@BOTH
def test_overlapping_tensors(tmp_path, read):
    raw = json.dumps(
        {
            "a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "a.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    ).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(ValueError, match="overlap"):
        read(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_factor_fails_on_load_not_inspect(tmp_path, bad):
    def poison(t):
        t[f"{LOCON_FC1}.lora_up.weight"][3, 1] = bad
        return t

    path = rewrite(LOCON, tmp_path / "nan.safetensors", poison)
    io.inspect(path)  # the header is fine and inspect reads no factor data
    with pytest.raises(ValueError, match="NaN/Inf") as e:
        io.load_adapter(path)
    assert str(path) in str(e.value) and LOCON_FC1 in str(e.value)


def _peft_edit(tmp_path, edit):
    folder = copy_peft("peft_llm/lora_r4_kv", tmp_path)
    weights = folder / "adapter_model.safetensors"
    rewrite(weights, weights, edit)
    return folder


K_PROJ = "base_model.model.model.layers.0.self_attn.k_proj"


@BOTH
def test_peft_rank_mismatch_and_missing_b(tmp_path, read):
    folder = _peft_edit(
        tmp_path, lambda t: {**t, f"{K_PROJ}.lora_A.weight": np.ones((3, 64), np.float32)}
    )
    with pytest.raises(ValueError, match=r"k_proj.*\[3, 64\].*\[32, 4\].*different ranks") as e:
        read(folder)
    assert "adapter_model.safetensors" in str(e.value)

    folder = _peft_edit(
        tmp_path / "b", lambda t: {k: v for k, v in t.items() if k != f"{K_PROJ}.lora_B.weight"}
    )
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj.*lora_B"):
        read(folder)


@BOTH
def test_peft_folder_problems(tmp_path, read):
    folder = copy_peft("peft_llm/lora_r4_kv", tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json.*not a valid JSON"):
        read(folder)

    folder = copy_peft("peft_llm/lora_rslora", tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="needs adapter_model.safetensors") as e:
        read(folder)
    assert str(folder) in str(e.value)

    folder = copy_peft("peft_llm/dora", tmp_path)
    edit_config(folder, peft_type="VERA")
    with pytest.raises(ValueError, match="peft_type 'VERA' is not a low-rank adapter.*seed"):
        read(folder)
    edit_config(folder, peft_type="PROMPT_TUNING")
    with pytest.raises(ValueError, match="peft_type 'PROMPT_TUNING' is not supported.*LOKR"):
        read(folder)

    folder = copy_peft("peft_llm/lora_embedding", tmp_path)
    edit_config(folder, alpha_pattern={"q_proj(": 3})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        read(folder)


@BOTH
def test_missing_path_is_oserror(tmp_path, read):
    with pytest.raises(FileNotFoundError) as e:
        read(tmp_path / "nope.safetensors")
    assert isinstance(e.value, OSError) and "nope.safetensors" in str(e.value)


@BOTH
@pytest.mark.parametrize(
    "extra,message",
    [
        ({f"{LOCON_FC1}.lora_norm.weight": np.ones(2, np.float32)}, "lora_norm.weight"),
        ({f"{LOCON_FC1}.lora_mid.weight": np.ones((4, 4, 3, 3), np.float32)}, "Tucker"),
        ({f"{LOCON_FC1}.hada_w1_a": np.ones((32, 4), np.float32)}, "mixes loha and lora"),
        ({"lora_unet_y.alpha": np.ones((), np.float32)}, "lora_unet_y.*has no factors"),
        (
            {"lora_unet_z.lora_down.weight": np.ones((2, 8), np.float32)},
            "lora_unet_z.*needs lora_up",
        ),
        ({"unet.a.lora_A.weight": np.ones((2, 8), np.float32)}, "mixes the key styles"),
        ({"something.else": np.ones(2, np.float32)}, "not understood.*something.else"),
    ],
    ids=[
        "unknown-suffix",
        "tucker",
        "two-algos",
        "alpha-only",
        "no-up",
        "mixed-formats",
        "unknown-key",
    ],
)
def test_unknown_or_incomplete_kohya_keys(tmp_path, read, extra, message):
    path = rewrite(LOCON, tmp_path / "extra.safetensors", lambda t: {**t, **extra})
    with pytest.raises(ValueError, match=message) as e:
        read(path)
    assert str(path) in str(e.value)


@BOTH
def test_unknown_diffusers_and_peft_keys(tmp_path, read):
    src = DATA / "diffusers_sd/pytorch_lora_weights.safetensors"
    path = rewrite(
        src,
        tmp_path / "d.safetensors",
        lambda t: {**t, "unet.conv_in.weight": np.ones(2, np.float32)},
    )
    with pytest.raises(ValueError, match=r"not understood.*unet\.conv_in\.weight"):
        read(path)
    folder = _peft_edit(tmp_path, lambda t: {**t, f"{K_PROJ}.lora_A.bias": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="lora_A.bias"):
        read(folder)
    folder = _peft_edit(
        tmp_path / "2", lambda t: {**t, "base_model.model.score.weight": np.ones(2, np.float32)}
    )
    with pytest.raises(ValueError, match=r"not understood.*score\.weight"):
        read(folder)


@BOTH
def test_integer_factor_is_refused(tmp_path, read):
    path = rewrite(
        LOCON,
        tmp_path / "int.safetensors",
        lambda t: {**t, f"{LOCON_FC1}.lora_down.weight": np.ones((4, 16), np.int64)},
    )
    with pytest.raises(ValueError, match=f"{LOCON_FC1}.*dtype I64"):
        read(path)


def test_public_api():
    assert io.AdapterInfo is adapters.AdapterInfo
    assert callable(io.inspect) and callable(io.load_adapter)
    info = io.inspect(str(DATA / "lycoris_loha/lycoris_loha.safetensors"))
    assert info.weights.endswith("lycoris_loha.safetensors") and info.file_size > 0
    assert set(info.layouts.values()) == {"flat"} and info.config is None
    assert os.fspath(info.path).endswith("lycoris_loha.safetensors")
