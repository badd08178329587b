"""The adapter kinds of issue 13 against fixtures made by the real libraries.

``tests/data/more_loras`` was written by ``tests/data/make_real_loras.py`` (PEFT 0.21,
diffusers 0.42, transformers 5, LyCORIS 4.1; its MANIFEST.json says how each was made).
Every ``ground_truth.safetensors`` holds the library's own delta of each module (PEFT's
``get_delta_weight``, a LyCORIS layer's forward on basis inputs in float64, diffusers'
loader), checked there by a forward pass.

Tolerance (derived, per entry): our ``u`` and ``v`` are float32, each entry rounded at
most twice (the factor, and the scale multiply), so ``u_ik v_jk`` is within ``4 * 2^-24``
of the product of the exact factors; the library computed its float32 delta as a sum
of ``r`` such products, accumulating at most ``r`` roundings of partial sums bounded by
``sum_k |u_ik v_jk|``; and the ground truth was stored in float32 (one more rounding of
``|want|``). So ``|ours - want| <= (r + 8) * 2^-24 * (|u| @ |v|.T) + 2^-24 * |want|``,
computed in float64 from our factors. A wrong scale, a transposed factor or a lost
column breaks it by many orders of magnitude.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gllora import io

DATA = Path(__file__).parent / "data" / "more_loras"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())["fixtures"]
LOADED = sorted(k for k, v in MANIFEST.items() if "refuse" not in v)
REFUSED = sorted(k for k, v in MANIFEST.items() if "refuse" in v)
EPS = 2.0**-24

# fixture -> the format inspect must report
FORMATS = {
    "flux_kohya": "kohya",
    "hunyuan_video_native": "comfyui",
    "lycoris_dora_in": "kohya_locon",
    "lycoris_dora_out": "kohya_locon",
    "lycoris_full": "lycoris_full",
    "lycoris_locon_tucker": "kohya_locon",
    "lycoris_loha_tucker": "lycoris_loha",
    "peft_adalora": "peft_adalora",
    "peft_adalora_pruned": "peft_adalora",
    "peft_loha": "peft_loha",
    "peft_loha_tucker": "peft_loha",
    "peft_lokr": "peft_lokr",
    "peft_lokr_decompose_both": "peft_lokr",
    "peft_lokr_whole": "peft_lokr",
    "peft_lora_bias": "peft",
    "peft_modules_to_save": "peft",
    "peft_moe_one_parameter": "peft",
    "peft_moe_target_parameters": "peft",
    "peft_seq_cls": "peft",
    "wan_native": "comfyui",
}

MOE = "model.layers.0.mlp.experts"


def adapter_path(name: str) -> Path:
    folder = DATA / name
    if (folder / "adapter_config.json").exists():
        return folder
    (path,) = [p for p in folder.glob("*.safetensors") if p.name != "ground_truth.safetensors"]
    return path


def truth(name: str) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict]:
    """``({module: delta}, {extra kind: {module: value}}, ground_truth.json)`` in the
    reader's module names: a MoE parameter ``[E, out, in]`` becomes one module per expert
    (see gllora.io.formats.peft)."""
    raw = load_file(str(DATA / name / "ground_truth.safetensors"))
    meta = json.loads((DATA / name / "ground_truth.json").read_text())
    deltas, extras = {}, {}
    for key, x in raw.items():
        module, _, what = key.rpartition(".")
        if what == "delta":
            deltas[module] = x
        else:
            extras.setdefault(what, {})[module] = x
    if name.startswith("peft_moe"):
        # PEFT nests the wrappers of one module in the order the module registers its
        # parameters (Mixtral: gate_up_proj, then down_proj): the inner one is base_layer.
        names = (
            {f"{MOE}.gate_up_proj": f"{MOE}.gate_up_proj"}
            if name == "peft_moe_one_parameter"
            else {f"{MOE}.gate_up_proj": f"{MOE}.base_layer", f"{MOE}.down_proj": MOE}
        )
        deltas = {f"{names[k]}.{e}": x[e] for k, x in deltas.items() for e in range(x.shape[0])}
    return deltas, extras, meta


def assert_exact(lora, name, want):
    u, v = (np.asarray(x, np.float64) for x in lora.factors(name))
    got = u @ v.T
    want = np.asarray(want, np.float64).reshape(got.shape)
    tol = (u.shape[1] + 8) * EPS * (np.abs(u) @ np.abs(v).T) + EPS * np.abs(want)
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{name}: {bad.sum()} entries off, worst {np.abs(got - want).max():.3g}"


@pytest.mark.parametrize("name", LOADED)
def test_every_fixture_is_exact(name):
    deltas, extras, meta = truth(name)
    path = adapter_path(name)
    info = io.inspect(path)
    lora = io.load_adapter(path)
    assert info.format == FORMATS[name]
    assert sorted(lora.names) == sorted(deltas), "every module, none extra"
    assert info.names == lora.names and info.shapes == lora.shapes
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in lora.u + lora.v)
    for module, want in deltas.items():
        assert_exact(lora, module, want)
    # extras: exactly those of the ground truth, to float32 rounding of one product
    assert {k: sorted(v) for k, v in lora.extras.items()} == {
        k: sorted(v) for k, v in extras.items()
    }
    for kind, per in extras.items():
        for module, want in per.items():
            got = np.asarray(lora.extras[kind][module], np.float64)
            np.testing.assert_allclose(got, want.reshape(-1), rtol=4 * EPS, atol=0)
            assert info.modules[module].extras[kind] == (want.size,)
    assert sorted(x.key.removeprefix("base_model.model.") for x in info.non_lora) == sorted(
        meta["non_lora"]
    )


@pytest.mark.parametrize(
    "name,message",
    [
        ("lycoris_diag_oft", r"\(Diag-\)OFT module \(oft_blocks \[\d+, 2, 2\]\).*\(R - I\) W"),
        ("lycoris_boft", r"BOFT \(butterfly OFT\) module.*needs the base weights"),
        ("lycoris_glora", r"GLoRA module.*W \(a1 a2\) \+ b1 b2.*base weight"),
        ("lycoris_ia3", r"IA3 module.*rescales the base weight"),
    ],
)
def test_refused_with_what_it_is(name, message):
    assert name in REFUSED
    path = adapter_path(name)
    for read in (io.inspect, io.load_adapter):
        with pytest.raises(ValueError, match=message) as e:
            read(path)
        assert str(path) in str(e.value) and "module 'lycoris_" in str(e.value)
        assert "has no factors" not in str(e.value)


def test_every_refusal_fixture_is_tested():
    assert set(REFUSED) == {"lycoris_diag_oft", "lycoris_boft", "lycoris_glora", "lycoris_ia3"}
    assert set(LOADED) == set(FORMATS)


@pytest.mark.parametrize(
    "peft_type,message",
    [
        ("OFT", r"peft_type 'OFT' is not a low-rank adapter.*\(R - I\) W"),
        ("BOFT", r"peft_type 'BOFT' is not a low-rank adapter.*butterfly"),
        ("IA3", r"peft_type 'IA3' is not a low-rank adapter"),
    ],
)
def test_peft_types_that_need_the_base_weights_are_refused(tmp_path, peft_type, message):
    folder = tmp_path / "a"
    shutil.copytree(DATA / "peft_lora_bias", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": peft_type}))
    with pytest.raises(ValueError, match=message) as e:
        io.inspect(folder)
    assert "adapter_config.json" in str(e.value)


# -- PEFT ------------------------------------------------------------------------------


def test_adalora_scale_is_alpha_over_init_r_not_r_nor_the_pruned_rank():
    for name in ("peft_adalora", "peft_adalora_pruned"):
        info = io.inspect(adapter_path(name))
        config = info.config
        assert (config["init_r"], config["r"], config["lora_alpha"]) == (6, 8, 8)
        assert set(info.scales.values()) == {8 / (6 + 1e-5)}, name
    pruned = io.inspect(adapter_path("peft_adalora_pruned")).modules
    q, v = (pruned[f"model.layers.0.self_attn.{p}_proj"] for p in "qv")
    assert v.rank == 4  # the rank_pattern keeps 4 of init_r = 6
    assert q.rank == 1 and "pruned to rank 0" in q.notes[0]
    lora = io.load_adapter(adapter_path("peft_adalora_pruned"))
    np.testing.assert_array_equal(lora.delta("model.layers.0.self_attn.q_proj"), 0)


def test_adalora_rank_must_match_the_rank_pattern(tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(DATA / "peft_adalora_pruned", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"]["model.layers.0.self_attn.v_proj.lora_E"] = [True] * 6
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"v_proj.*file has rank 4 but the config gives 6"):
        io.inspect(folder)


def test_peft_lokr_scales_whole_factors_by_alpha_over_r_lycoris_by_one(tmp_path):
    info = io.inspect(adapter_path("peft_lokr_whole"))
    assert all(m.kind == "lokr" for m in info.modules.values())
    assert set(info.scales.values()) == {3 / 8}  # alpha 3, r 8: PEFT's rule
    # The same whole factors in a LyCORIS file: scale 1 (LyCORIS ignores alpha there).
    raw = load_file(str(adapter_path("peft_lokr_whole") / "adapter_model.safetensors"))
    kohya = {
        k.replace("base_model.model.", "lycoris_").replace(".lokr", ".lokr"): v
        for k, v in raw.items()
    }
    kohya.update({"lycoris_proj.alpha": np.float32(3.0), "lycoris_square.alpha": np.float32(3.0)})
    save_file({k: np.asarray(v) for k, v in kohya.items()}, str(tmp_path / "l.safetensors"))
    assert set(io.inspect(tmp_path / "l.safetensors").scales.values()) == {1.0}


def test_lora_bias_is_an_extra_and_needs_the_config_flag(tmp_path):
    path = adapter_path("peft_lora_bias")
    info = io.inspect(path)
    raw = load_file(str(path / "adapter_model.safetensors"))
    lora = io.load_adapter(path)
    for name, mod in info.modules.items():
        bias = raw[f"base_model.model.{name}.lora_B.bias"].astype(np.float64)
        np.testing.assert_allclose(lora.extras["bias"][name], mod.scale * bias, rtol=2 * EPS)
    folder = tmp_path / "b"
    shutil.copytree(path, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": False}))
    with pytest.raises(ValueError, match=r"q_proj.*lora_B bias, but the config has no lora_bias"):
        io.inspect(folder)


def test_full_copies_are_listed_with_their_reason_never_loaded():
    info = io.inspect(adapter_path("peft_modules_to_save"))
    (entry,) = info.non_lora
    assert entry.key == "base_model.model.lm_head.weight" and entry.shape == (64, 32)
    assert "modules_to_save ('lm_head')" in entry.what and "not loaded" in entry.what
    lora = io.load_adapter(adapter_path("peft_modules_to_save"))
    assert not any("lm_head" in n for n in lora.names) and not lora.extras
    seq = io.inspect(adapter_path("peft_seq_cls"))
    assert [x.key for x in seq.non_lora] == ["base_model.model.score.weight"]
    assert "score" in seq.non_lora[0].what


def test_moe_experts_are_one_module_each_named_by_parameter_when_unambiguous():
    one = io.inspect(adapter_path("peft_moe_one_parameter"))
    assert one.names == tuple(f"{MOE}.gate_up_proj.{e}" for e in range(3))
    assert set(one.shapes.values()) == {(32, 32)} and set(one.ranks.values()) == {2}
    both = io.inspect(adapter_path("peft_moe_target_parameters"))
    assert set(both.names) == {f"{MOE}.{e}" for e in range(3)} | {
        f"{MOE}.base_layer.{e}" for e in range(3)
    }
    assert both.modules[f"{MOE}.0"].shape == (32, 16)  # down_proj: hidden <- intermediate
    assert "expert 0 of 3" in both.modules[f"{MOE}.0"].notes[0]


# -- LyCORIS ------------------------------------------------------------------------------

SQUARE = "lycoris_square"  # a 12 x 12 linear layer: both DoRA scales have size 12


def test_dora_on_a_square_layer_is_told_by_the_axis_not_the_size():
    inp = io.inspect(adapter_path("lycoris_dora_in")).modules[SQUARE]
    out = io.inspect(adapter_path("lycoris_dora_out")).modules[SQUARE]
    assert inp.shape == out.shape == (12, 12)
    assert inp.extras == {"magnitude_in": (12,)} and "input column" in inp.notes[0]
    assert out.extras == {"magnitude": (12,)}
    raw = load_file(str(adapter_path("lycoris_dora_in")))
    assert raw[f"{SQUARE}.dora_scale"].shape == (1, 12)  # [1, in]: one per input column
    lora = io.load_adapter(adapter_path("lycoris_dora_in"))
    assert "magnitude" not in lora.extras  # never reported as the per-row magnitude
    np.testing.assert_array_equal(
        lora.extras["magnitude_in"][SQUARE], raw[f"{SQUARE}.dora_scale"].reshape(-1)
    )


@pytest.mark.parametrize(
    "wd_on_output,kind", [(None, None), ("False", "magnitude_in"), ("True", "magnitude")]
)
def test_a_bare_dora_vector_on_a_square_layer_needs_the_flag(tmp_path, wd_on_output, kind):
    raw = load_file(str(adapter_path("lycoris_dora_in")))
    raw[f"{SQUARE}.dora_scale"] = raw[f"{SQUARE}.dora_scale"].reshape(-1)  # [12]
    meta = (
        {}
        if wd_on_output is None
        else {"ss_network_args": json.dumps({"algo": "lora", "wd_on_output": wd_on_output})}
    )
    path = tmp_path / "bare.safetensors"
    save_file(raw, str(path), metadata=meta)
    if kind is None:
        with pytest.raises(ValueError, match=r"lycoris_square.*bare vector on a square layer"):
            io.inspect(path)
    else:
        assert io.inspect(path).modules[SQUARE].extras == {kind: (12,)}


def test_dense_differences_are_exact_at_full_rank():
    info = io.inspect(adapter_path("lycoris_full"))
    for mod in info.modules.values():
        assert mod.kind == "dense" and mod.rank == min(mod.shape)
        assert "dense weight difference" in mod.notes[0]
    assert info.modules["lycoris_conv"].base_shape == (8, 6, 3, 3)
    wan = io.inspect(adapter_path("wan_native"))
    head = wan.modules["diffusion_model.head.head"]
    assert head.kind == "dense" and head.extras == {"bias": (head.shape[0],)}
    (norm,) = wan.non_lora
    assert norm.key.endswith("norm3.diff") and "vector" in norm.what


def test_tucker_factors_stay_low_rank_in_the_unfolding():
    locon = io.inspect(adapter_path("lycoris_locon_tucker")).modules["lycoris_conv"]
    assert (locon.rank, locon.shape, locon.base_shape) == (2, (8, 54), (8, 6, 3, 3))
    loha = io.inspect(adapter_path("lycoris_loha_tucker")).modules["lycoris_conv"]
    assert (loha.kind, loha.rank, loha.layout) == ("loha", 4, "conv")


# -- diffusion transformers ------------------------------------------------------------------


def test_kohya_flux_split_qkv_is_rank_3r_scaled_by_alpha_over_3r():
    info = io.inspect(adapter_path("flux_kohya"))
    qkv = info.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert (qkv.shape, qkv.rank, qkv.alpha, qkv.scale) == ((48, 16), 6, 2.0, 2.0 / 6)
    assert info.modules["lora_unet_single_blocks_0_linear1"].shape == (112, 16)


def test_fused_hunyuan_qkv_is_one_module():
    info = io.inspect(adapter_path("hunyuan_video_native"))
    assert info.shapes["diffusion_model.double_blocks.0.img_attn_qkv"] == (48, 16)


# -- bad input ---------------------------------------------------------------------------


def _wan(tmp_path, edit) -> Path:
    raw = load_file(str(adapter_path("wan_native")))
    path = tmp_path / "wan.safetensors"
    save_file(edit(dict(raw)), str(path))
    return path


Q = "diffusion_model.blocks.0.self_attn.q"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: {**t, f"{Q}.lora_A.weight": np.ones((3, 16), np.float32)}, r"different ranks"),
        (lambda t: {k: v for k, v in t.items() if k != f"{Q}.lora_B.weight"}, r"needs lora_up"),
        (lambda t: {**t, f"{Q}.lora_X.weight": np.ones(2, np.float32)}, "not understood"),
        (lambda t: {**t, f"{Q}.diff_b": np.ones(5, np.float32)}, r"bias.*\[5\].*16 output"),
        (lambda t: {**t, f"{Q}.hada_w1_a": np.ones((16, 2), np.float32)}, "mixes"),
    ],
    ids=["ranks", "missing-up", "unknown-key", "bias-size", "mixed"],
)
def test_comfy_bad_modules_name_file_and_module(tmp_path, edit, message):
    path = _wan(tmp_path, edit)
    for read in (io.inspect, io.load_adapter):
        with pytest.raises(ValueError, match=message) as e:
            read(path)
        assert str(path) in str(e.value)
        if message != "not understood":
            assert repr(Q) in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_a_new_format_names_the_tensor(tmp_path, bad):
    def poison(t):
        t[f"{Q}.lora_B.weight"] = t[f"{Q}.lora_B.weight"].copy()
        t[f"{Q}.lora_B.weight"][1, 1] = bad
        return t

    path = _wan(tmp_path, poison)
    io.inspect(path)  # header only
    with pytest.raises(ValueError, match=rf"{Q}.*lora_B.weight.*NaN/Inf") as e:
        io.load_adapter(path)
    assert str(path) in str(e.value)


def test_truncated_new_format_file(tmp_path):
    src = adapter_path("hunyuan_video_native").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(src[:-10])
    for read in (io.inspect, io.load_adapter):
        with pytest.raises(ValueError, match="truncated") as e:
            read(path)
        assert str(path) in str(e.value)


def test_adalora_factors_that_do_not_fit(tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(DATA / "peft_adalora", folder)
    weights = folder / "adapter_model.safetensors"
    raw = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_E"
    raw[key] = np.ones((6, 2), np.float32)
    save_file(raw, str(weights))
    with pytest.raises(ValueError, match=r"v_proj.*AdaLoRA factors do not fit.*lora_E \[6, 2\]"):
        io.inspect(folder)


def test_the_bound_fails_a_wrong_scale():
    """Negative control: the derived bound rejects a delta off by one part in 10^4."""
    deltas, _, _ = truth("peft_loha")
    lora = io.load_adapter(adapter_path("peft_loha"))
    name = next(iter(deltas))
    assert_exact(lora, name, deltas[name])
    with pytest.raises(AssertionError, match="entries off"):
        assert_exact(lora, name, deltas[name] * (1 + 1e-4))
