"""Makes the adapter fixtures in ``tests/data/more_loras`` with the real libraries.

Every fixture is an adapter file (or PEFT folder) as a library writes it, made from a
tiny randomly initialised base model, plus its ground truth: ``ground_truth.safetensors``
holds ``<module>.delta`` (the weight delta in the base weight's layout) and
``<module>.<extra>`` (e.g. ``bias``, the base bias delta) computed by the LIBRARY's own
code (PEFT's ``get_delta_weight``, LyCORIS's ``get_diff_weight``, diffusers' loader
followed by ``fuse_lora``: merged minus base weight), and ``ground_truth.json`` the
module list with scale, rank and kind. Each ground truth is checked here by a forward
pass: the base model with ``W + delta`` (and the other saved weights) must give the
adapted model's output (the measured difference is recorded in ``MANIFEST.json``).
Fixtures gllora must refuse carry the reason it must give instead of a ground truth.

Where a format has no library that writes it here (Wan 2.x, HunyuanVideo and Flux
"native" files, kohya Flux), the file is written from the format's key rules (as
diffusers' converters read them: ``diffusers/loaders/lora_conversion_utils.py``) and
the ground truth comes from diffusers LOADING it into a tiny model of that family and
fusing it; ``MANIFEST.json`` says which fixtures were made which way.

This script never runs in gllora's environment. Run it in a separate venv::

    python3 -m venv /work/fixture_venv
    /work/fixture_venv/bin/pip install torch==2.13.0 peft==0.21.2 diffusers==0.42.1 \\
        transformers==5.23.0 lycoris-lora==4.1.3 safetensors numpy
    PYTHONHASHSEED=0 /work/fixture_venv/bin/python tests/data/make_real_loras.py

It rewrites ``tests/data/more_loras`` (about 0.6 MB). Seeds are fixed; the files are
the same on every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parent / "more_loras"
STD = 0.1  # random factors are N(0, STD^2): trained-looking magnitudes, exact float32 products
MANIFEST: dict = {"fixtures": {}}


def versions() -> dict[str, str]:
    import diffusers
    import lycoris
    import peft
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "lycoris-lora": getattr(lycoris, "__version__", "4.1.3"),
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


def randomize(params, std: float = STD, seed: int = 0) -> None:
    """Sets trainable (adapter) parameters to N(0, std^2): a freshly initialised LoRA has
    B = 0 and so no delta to check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def record(
    name: str,
    folder: Path,
    *,
    made_with: str,
    deltas=None,
    modules=None,
    extras=None,
    non_lora=None,
    refuse=None,
    forward=None,
    notes=None,
) -> None:
    """Writes ``ground_truth.*`` for one fixture and its MANIFEST entry."""
    entry = {"made_with": made_with}
    if refuse is not None:
        entry["refuse"] = refuse
    else:
        tensors = {f"{k}.delta": v.detach().float().contiguous() for k, v in deltas.items()}
        for kind, per in (extras or {}).items():
            tensors.update({f"{k}.{kind}": v.detach().float().contiguous() for k, v in per.items()})
        save_file(tensors, str(folder / "ground_truth.safetensors"))
        (folder / "ground_truth.json").write_text(
            json.dumps({"modules": modules, "non_lora": non_lora or []}, indent=1, sort_keys=True)
        )
    if forward is not None:
        entry["forward_check_max_abs_diff"] = float(forward)
    if notes:
        entry["notes"] = notes
    MANIFEST["fixtures"][name] = entry


def fresh(name: str) -> Path:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# -- tiny base models -------------------------------------------------------------------


def tiny_llama(seq_cls: bool = False, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attention_bias=bias,
        num_labels=3,
        pad_token_id=0,
    )
    cls = LlamaForSequenceClassification if seq_cls else LlamaForCausalLM
    return cls(config).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_local_experts=3,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config).eval()


class TinyConvNet(torch.nn.Module):
    """A linear and a 3x3 conv layer, the shapes LoHa/LoKr/Tucker treat differently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 12)
        self.square = torch.nn.Linear(12, 12)

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))
        return self.square(self.proj(h))


IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def forward_merged(base, deltas, extras=None, full=None):
    """The base model's output with ``W + delta`` for every module (and bias deltas,
    full replacement weights): what the adapted model must give."""
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            key = name if name in params else f"{name}.weight"
            params[key].add_(delta.reshape(params[key].shape))
        for name, b in (extras or {}).get("bias", {}).items():
            params[f"{name}.bias"].add_(b)
        for key, w in (full or {}).items():
            params[key].copy_(w)
    return model


def peft_deltas(peft_model, adapter="default"):
    """``{module path: get_delta_weight}`` of every LoRA-like layer of a PEFT model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            if adapter not in getattr(module, "scaling", {adapter: 1}):
                continue
            path = name.removeprefix("base_model.model.")
            out[path] = module.get_delta_weight(adapter).detach()
    return out


# -- PEFT ----------------------------------------------------------------------------------


def peft_lora_family(name, base, config, *, bias=False, full_keys=(), seq_cls=False, notes=None):
    from peft import get_peft_model

    folder = fresh(name)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize([p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n])
    model.eval()
    model.save_pretrained(folder)
    deltas = peft_deltas(model)
    extras = {}
    if bias:
        extras["bias"] = {}
        for mname, module in model.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                b = module.lora_B["default"].bias
                if b is not None:
                    extras["bias"][mname.removeprefix("base_model.model.")] = (
                        b.detach() * module.scaling["default"]
                    )
    full = {}
    for key in full_keys:  # modules_to_save: the trained copy replaces the base weight
        module_path = key.rsplit(".", 1)[0]
        wrapper = model.get_submodule(f"base_model.model.{module_path}")
        with torch.no_grad():
            trained = wrapper.modules_to_save["default"].weight
            trained.add_(torch.randn(trained.shape, generator=torch.Generator().manual_seed(1)))
        full[key] = trained.detach().clone()
    model.save_pretrained(folder)  # again, with the edited full copies
    want = model(input_ids=IDS).logits.detach()
    got = forward_merged(base, deltas, extras, full)(input_ids=IDS).logits.detach()
    err = (want - got).abs().max().item()
    assert err < 1e-5, (name, err)
    modules = {
        k: {"scaling": None, "kind": "lora", "shape": list(v.shape)} for k, v in deltas.items()
    }
    record(
        name,
        folder,
        made_with=f"peft {config.__class__.__name__}",
        deltas=deltas,
        modules=modules,
        extras=extras,
        non_lora=sorted(full),
        forward=err,
        notes=notes,
    )


def make_peft():
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    llama = tiny_llama()
    peft_lora_family(
        "peft_modules_to_save",
        llama,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
        ),
        full_keys=["lm_head.weight"],
        notes="modules_to_save=['lm_head']: the file holds the full trained lm_head",
    )
    cls_model = tiny_llama(seq_cls=True)
    from peft import get_peft_model as _g  # noqa: F401

    folder_name = "peft_seq_cls"
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    folder = fresh(folder_name)
    model = get_peft_model(copy.deepcopy(cls_model), config)
    randomize([p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n])
    with torch.no_grad():
        head = model.base_model.model.score.modules_to_save["default"].weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(2)))
    model.eval()
    model.save_pretrained(folder)
    deltas = peft_deltas(model)
    want = model(input_ids=IDS).logits.detach()
    got = forward_merged(cls_model, deltas, full={"score.weight": head.detach()})(
        input_ids=IDS
    ).logits.detach()
    err = (want - got).abs().max().item()
    assert err < 1e-5, err
    record(
        folder_name,
        folder,
        made_with="peft LoraConfig(task_type='SEQ_CLS')",
        deltas=deltas,
        modules={k: {"kind": "lora"} for k in deltas},
        non_lora=["score.weight"],
        forward=err,
        notes="PEFT adds the classifier head (score) to modules_to_save for SEQ_CLS",
    )

    peft_lora_family(
        "peft_lora_bias",
        tiny_llama(bias=True),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
        bias=True,
        notes="lora_bias=True: lora_B has a bias; the base bias delta is lora_B.bias * scaling",
    )

    # LoHa and LoKr on a linear + conv model (PEFT keys have no .weight suffix).
    net = TinyConvNet().eval()
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(3))
    for name, config in [
        ("peft_loha", LoHaConfig(r=2, alpha=3, target_modules=["conv", "proj", "square"])),
        (
            "peft_loha_tucker",
            LoHaConfig(r=2, alpha=3, target_modules=["conv"], use_effective_conv2d=True),
        ),
        ("peft_lokr", LoKrConfig(r=2, alpha=3, target_modules=["conv", "proj", "square"])),
        (
            "peft_lokr_decompose_both",
            LoKrConfig(
                r=1,
                alpha=3,
                target_modules=["proj", "square"],
                decompose_both=True,
                decompose_factor=4,
            ),
        ),
        ("peft_lokr_whole", LoKrConfig(r=8, alpha=3, target_modules=["proj", "square"])),
    ]:
        folder = fresh(name)
        model = get_peft_model(copy.deepcopy(net), config)
        randomize([p for n, p in model.named_parameters() if p.requires_grad])
        model.eval()
        model.save_pretrained(folder)
        deltas = peft_deltas(model)
        with torch.no_grad():
            err = (model(x) - forward_merged(net, deltas)(x)).abs().max().item()
        assert err < 1e-5, (name, err)
        keys = sorted(load_file(str(folder / "adapter_model.safetensors")))
        record(
            name,
            folder,
            made_with=f"peft {config.__class__.__name__}",
            deltas=deltas,
            modules={
                k: {"kind": config.peft_type.value.lower(), "scaling": config.alpha / config.r}
                for k in deltas
            },
            forward=err,
            notes=f"keys: {keys[:6]}",
        )

    # AdaLoRA: before pruning (every init_r rank) and after (rank_pattern cuts the file).
    for name, prune in (("peft_adalora", False), ("peft_adalora_pruned", True)):
        folder = fresh(name)
        config = AdaLoraConfig(
            init_r=6,
            target_r=2,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            total_step=6,
            tinit=1,
            tfinal=2,
            deltaT=1,
        )
        model = get_peft_model(copy.deepcopy(llama), config)
        randomize([p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n])
        if prune:  # the real rank allocator: gradients, budget schedule, final masking
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            for step in range(config.total_step):
                out = model(input_ids=IDS, labels=IDS)
                out.loss.backward()
                opt.step()
                model.base_model.update_and_allocate(step)
                opt.zero_grad()
        model.eval()
        model.save_pretrained(folder)
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(copy.deepcopy(llama), folder).eval()
        deltas = peft_deltas(reloaded)
        for k, v in peft_deltas(model).items():  # the in-memory (masked) model agrees
            assert torch.allclose(v, deltas[k], atol=1e-6), k
        err = (logits(reloaded) - logits(forward_merged(llama, deltas))).abs().max().item()
        assert err < 1e-5, (name, err)
        saved = json.loads((folder / "adapter_config.json").read_text())
        record(
            name,
            folder,
            made_with="peft AdaLoraConfig" + (" + update_and_allocate" if prune else ""),
            deltas=deltas,
            modules={
                k: {"kind": "adalora", "scaling": config.lora_alpha / (config.init_r + 1e-5)}
                for k in deltas
            },
            forward=err,
            notes=f"rank_pattern saved: {bool(saved.get('rank_pattern'))}",
        )

    # MoE experts as 3-d parameters (target_parameters): both expert matrices of a module
    # (nested wrappers) and one parameter alone.
    moe = tiny_mixtral()
    from peft.tuners.lora.layer import ParamWrapper

    for name, targets in (
        ("peft_moe_target_parameters", ["experts.gate_up_proj", "experts.down_proj"]),
        ("peft_moe_one_parameter", ["experts.gate_up_proj"]),
    ):
        folder = fresh(name)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=targets)
        model = get_peft_model(copy.deepcopy(moe), config)
        randomize([p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n])
        model.eval()
        model.save_pretrained(folder)
        deltas = {}
        for mname, module in model.named_modules():
            if isinstance(module, ParamWrapper):
                path = mname.removeprefix("base_model.model.").replace(".base_layer", "")
                deltas[f"{path}.{module.parameter_name}"] = module.get_delta_weight(
                    "default"
                ).detach()
        merged = copy.deepcopy(moe)
        params = dict(merged.named_parameters())
        with torch.no_grad():
            for k, d in deltas.items():
                params[k].add_(d)
        err = (logits(model) - logits(merged)).abs().max().item()
        assert err < 1e-5, err
        record(
            name,
            folder,
            made_with="peft LoraConfig(target_parameters=...)",
            deltas=deltas,
            modules={k: {"kind": "lora", "experts": list(v.shape)} for k, v in deltas.items()},
            forward=err,
            notes=f"keys: {sorted(load_file(str(folder / 'adapter_model.safetensors')))}",
        )


# -- LyCORIS -----------------------------------------------------------------------------


def layer_delta(before: torch.nn.Module, after) -> torch.Tensor:
    """The weight delta an adapted layer applies, read off its forward pass: its outputs on
    basis inputs minus the base layer's, each minus its output at zero (which removes the
    biases). Exact for a linear map; for the 3x3 conv, the output pixel at the centre of a
    3x3 one-hot input sees every kernel tap. Run in float64, so the subtraction's
    cancellation (|W| >> |delta|) costs ~1e-16, not float32's ~1e-6."""
    dtype = before.weight.dtype
    with torch.no_grad():
        if isinstance(before, torch.nn.Linear):
            x = torch.eye(before.in_features, dtype=dtype)
            zero = torch.zeros_like(x)
            return ((after(x) - after(zero)) - (before(x) - before(zero))).T.contiguous()
        c, (kh, kw) = before.in_channels, before.kernel_size
        x = torch.eye(c * kh * kw, dtype=dtype).reshape(c * kh * kw, c, kh, kw)
        zero = torch.zeros_like(x)
        y = (after(x) - after(zero)) - (before(x) - before(zero))  # padding 1: [N, out, 3, 3]
        return y[:, :, kh // 2, kw // 2].T.reshape(before.out_channels, c, kh, kw).contiguous()


def make_lycoris():
    from lycoris import create_lycoris

    cases = [
        ("lycoris_locon_tucker", "lora", {"use_tucker": True}, None),
        ("lycoris_loha_tucker", "loha", {"use_tucker": True}, None),
        ("lycoris_dora_in", "lora", {"dora_wd": True, "wd_on_output": False}, None),
        ("lycoris_dora_out", "lora", {"dora_wd": True, "wd_on_output": True}, None),
        ("lycoris_full", "full", {}, None),
        ("lycoris_glora", "glora", {}, "GLoRA"),
        ("lycoris_diag_oft", "diag-oft", {}, "OFT"),
        ("lycoris_boft", "boft", {}, "BOFT"),
        ("lycoris_ia3", "ia3", {}, "IA3"),
    ]
    for name, algo, kwargs, refuse in cases:
        net = TinyConvNet()
        if algo == "boft":  # BOFT needs power-of-two widths
            net.proj, net.square = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16)
            net.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        net = net.double().eval()  # float64 forward passes: see layer_delta
        base = copy.deepcopy(net)
        lyco = create_lycoris(
            net, 1.0, linear_dim=2, linear_alpha=3, conv_dim=2, conv_alpha=1, algo=algo, **kwargs
        )
        lyco.apply_to()
        trainable = [p for p in lyco.parameters() if p.requires_grad]
        randomize(trainable)
        with torch.no_grad():
            for p in trainable:
                if algo == "full":  # full stores the new weight; make the difference non-trivial
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * STD)
                p.copy_(p.float().double())  # the float32 file then holds these exactly
        folder = fresh(name)
        path = folder / f"{name}.safetensors"
        lyco.save_weights(
            str(path),
            torch.float32,
            {
                "ss_network_args": json.dumps(
                    {"algo": algo, **{k: str(v) for k, v in kwargs.items()}}
                )
            },
        )
        if refuse:
            record(
                name,
                folder,
                made_with=f"lycoris-lora create_lycoris(algo={algo!r})",
                refuse=refuse,
                notes=f"keys: {sorted(load_file(str(path)))[:8]}",
            )
            continue
        deltas, extras, err = {}, {}, 0.0
        for mod in lyco.loras:
            short = mod.lora_name  # lycoris_<path>
            layer = short.removeprefix("lycoris_")
            before, after = getattr(base, layer), getattr(net, layer)
            forward = layer_delta(before, after)  # merged minus base, from the forward pass
            if getattr(
                mod, "wd", False
            ):  # DoRA: the forward weight is the decomposed W + delta, not W + delta
                diff = mod.get_diff_weight()[0].detach()
                w = before.weight.detach() + diff
                dims = tuple(range(1, w.dim())) if mod.wd_on_out else (0, *range(2, w.dim()))
                norm = (
                    torch.linalg.vector_norm(w, dim=dims, keepdim=True) + torch.finfo(w.dtype).eps
                )
                merged = w * (mod.dora_scale.detach() / norm)
                err = max(err, (merged - before.weight - forward).abs().max().item())
                deltas[short] = diff
                kind = "magnitude" if mod.wd_on_out else "magnitude_in"
                extras.setdefault(kind, {})[short] = mod.dora_scale.detach().reshape(-1)
            else:
                deltas[short] = forward
                if algo == "lora":  # get_diff_weight applies the scale once for LoCon
                    diff = mod.get_diff_weight()[0].reshape(forward.shape)
                    err = max(err, (diff - forward).abs().max().item())
                if algo == "full" and mod.bias is not None:
                    extras.setdefault("bias", {})[short] = (mod.bias - before.bias).detach()
        assert err < 1e-5, (name, err)
        record(
            name,
            folder,
            made_with=f"lycoris-lora create_lycoris(algo={algo!r}, {kwargs})",
            deltas=deltas,
            modules={k: {"kind": algo} for k in deltas},
            extras=extras,
            forward=err,
            notes="ground truth: each layer's forward on basis inputs minus "
            "the base layer's (LyCORIS 4.1.3 get_diff_weight scales LoHa twice)",
        )


# -- diffusion transformers: files written from the key rules, loaded by diffusers ----------------


def diffusers_deltas(transformer, adapter):
    """``{diffusers module: (delta, bias delta or None)}`` of a transformer diffusers loaded a
    LoRA into (PEFT layers), each checked against the layer's own forward pass."""
    from peft.tuners.lora import Linear as LoraLinear

    out, err = {}, 0.0
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            delta = module.get_delta_weight(adapter).detach()
            b = module.lora_B[adapter].bias
            bias = None if b is None else (b * module.scaling[adapter]).detach()
            x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(5))
            base = module.get_base_layer()
            want = torch.nn.functional.linear(
                x,
                base.weight + delta,
                None if base.bias is None else base.bias + (0 if bias is None else bias),
            )
            with torch.no_grad():
                err = max(err, (module(x) - want).abs().max().item())
            out[name] = (delta, bias)
    assert err < 1e-5, err
    return out, err


def factors(out_dim, in_dim, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, in_dim, generator=g) * STD, torch.randn(out_dim, r, generator=g) * STD)


def make_wan():
    from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
    ).eval()
    dim = 16
    sd, truth, extras = {}, {}, {"bias": {}}
    p = "diffusion_model.blocks.0"
    a, b = factors(dim, dim, 2, 10)  # self-attention q: alpha 1 -> scale 1/2, and a bias delta
    sd.update(
        {
            f"{p}.self_attn.q.lora_A.weight": a,
            f"{p}.self_attn.q.lora_B.weight": b,
            f"{p}.self_attn.q.alpha": torch.tensor(1.0),
            f"{p}.self_attn.q.diff_b": torch.randn(dim, generator=torch.Generator().manual_seed(11))
            * STD,
        }
    )
    a, b = factors(dim, dim, 3, 12)  # cross-attention k, no alpha: scale 1
    sd.update({f"{p}.cross_attn.k.lora_A.weight": a, f"{p}.cross_attn.k.lora_B.weight": b})
    a, b = factors(32, dim, 2, 13)  # ffn.0 (Linear dim -> ffn_dim)
    sd.update(
        {
            f"{p}.ffn.0.lora_A.weight": a,
            f"{p}.ffn.0.lora_B.weight": b,
            f"{p}.ffn.0.diff_b": torch.randn(32, generator=torch.Generator().manual_seed(14)) * STD,
        }
    )
    sd[f"{p}.norm3.diff"] = torch.zeros(dim)  # a norm weight difference (trainers save zeros)
    head = model.proj_out.weight.shape  # [out * prod(patch), dim]
    sd["diffusion_model.head.head.diff"] = (
        torch.randn(head, generator=torch.Generator().manual_seed(15)) * STD
    )  # a dense difference
    sd["diffusion_model.head.head.diff_b"] = (
        torch.randn(head[0], generator=torch.Generator().manual_seed(16)) * STD
    )
    folder = fresh("wan_native")
    path = folder / "wan_lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    state = WanPipeline.lora_state_dict(str(path))
    WanPipeline.load_lora_into_transformer(state, transformer=model, adapter_name="x")
    got, err = diffusers_deltas(model, "x")
    names = {
        "blocks.0.attn1.to_q": f"{p}.self_attn.q",
        "blocks.0.attn2.to_k": f"{p}.cross_attn.k",
        "blocks.0.ffn.net.0.proj": f"{p}.ffn.0",
        "proj_out": "diffusion_model.head.head",
    }
    assert set(got) == set(names), sorted(got)
    for theirs, ours in names.items():
        delta, bias = got[theirs]
        truth[ours] = delta
        if f"{ours}.diff_b" in sd:  # diffusers gives every layer a bias once any has one
            extras["bias"][ours] = bias
    record(
        "wan_native",
        folder,
        made_with="key rules (Wan 2.x diffusion_model. file); ground "
        "truth: diffusers WanPipeline.lora_state_dict + load_lora_into_transformer, "
        "get_delta_weight per layer",
        deltas=truth,
        modules={k: {"kind": "dense" if k.endswith("head.head") else "lora"} for k in truth},
        extras=extras,
        non_lora=[f"{p}.norm3.diff"],
        forward=err,
        notes="diffusers drops the norm .diff (a vector) and turns head.head.diff into "
        "lora_A = diff, lora_B = I: a dense difference at full rank",
    )


def make_flux_kohya():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    dim, r = 16, 2
    sd = {}
    # split_qkv (sd-scripts): three rank-r LoRAs saved as one: down [3r, in] stacked, up
    # [3*dim, 3r] block-diagonal, and the alpha of one split.
    downs = [factors(dim, dim, r, 20 + i)[0] for i in range(3)]
    ups = [factors(dim, dim, r, 30 + i)[1] for i in range(3)]
    up = torch.zeros(3 * dim, 3 * r)
    for i in range(3):
        up[i * dim : (i + 1) * dim, i * r : (i + 1) * r] = ups[i]
    q = "lora_unet_double_blocks_0_img_attn_qkv"
    sd.update(
        {
            f"{q}.lora_down.weight": torch.cat(downs),
            f"{q}.lora_up.weight": up,
            f"{q}.alpha": torch.tensor(float(r)),
        }
    )
    a, b = factors(3 * dim, dim, 4, 40)  # txt qkv trained fused (no split): dense up
    t = "lora_unet_double_blocks_0_txt_attn_qkv"
    sd.update(
        {f"{t}.lora_down.weight": a, f"{t}.lora_up.weight": b, f"{t}.alpha": torch.tensor(2.0)}
    )
    a, b = factors(dim, dim, 2, 41)
    o = "lora_unet_double_blocks_0_img_attn_proj"
    sd.update(
        {f"{o}.lora_down.weight": a, f"{o}.lora_up.weight": b, f"{o}.alpha": torch.tensor(1.0)}
    )
    a, b = factors(3 * dim + 4 * dim, dim, 3, 42)  # single block linear1: q, k, v and the MLP
    s = "lora_unet_single_blocks_0_linear1"
    sd.update(
        {f"{s}.lora_down.weight": a, f"{s}.lora_up.weight": b, f"{s}.alpha": torch.tensor(3.0)}
    )
    folder = fresh("flux_kohya")
    path = folder / "flux_kohya.safetensors"
    save_file(
        {k: v.contiguous() for k, v in sd.items()},
        str(path),
        {
            "ss_network_module": "networks.lora_flux",
            "ss_network_args": json.dumps({"split_qkv": "True"}),
        },
    )
    # diffusers' kohya-Flux converter hard-codes the single blocks' widths (3072), so the tiny
    # model's single block cannot be loaded: load the double-block modules only.
    partial = {k: v for k, v in sd.items() if "single_blocks" not in k}
    save_file({k: v.contiguous() for k, v in partial.items()}, str(folder / "_double.safetensors"))
    state, alphas = FluxPipeline.lora_state_dict(
        str(folder / "_double.safetensors"), return_alphas=True
    )
    (folder / "_double.safetensors").unlink()
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=model, adapter_name="x")
    got, err = diffusers_deltas(model, "x")
    truth = {
        q: torch.cat([got[f"transformer_blocks.0.attn.to_{c}"][0] for c in "qkv"]),
        t: torch.cat([got[f"transformer_blocks.0.attn.add_{c}_proj"][0] for c in "qkv"]),
        o: got["transformer_blocks.0.attn.to_out.0"][0],
        # from the key rule alpha / rank (the rule diffusers applies to the other modules)
        s: sd[f"{s}.lora_up.weight"] @ sd[f"{s}.lora_down.weight"] * (3.0 / 3),
    }
    record(
        "flux_kohya",
        folder,
        made_with="key rules (sd-scripts networks/lora_flux.py "
        "state_dict, split_qkv=True); ground truth: diffusers FluxPipeline.lora_state_dict + "
        "load_lora_into_transformer (double block), the alpha / rank rule (single block)",
        deltas=truth,
        modules={k: {"kind": "lora"} for k in truth},
        forward=err,
        notes="split_qkv: rank 3r = 6, scale alpha / 6 as every loader applies it "
        "(sd-scripts' own loader too); training scaled each split by alpha / r",
    )


def make_hunyuan():
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=0,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    ).eval()
    dim = 16
    sd = {}
    a, b = factors(3 * dim, dim, 2, 50)
    q = "diffusion_model.double_blocks.0.img_attn_qkv"
    sd.update({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b})
    a, b = factors(dim, dim, 2, 51)
    o = "diffusion_model.double_blocks.0.img_attn_proj"
    sd.update({f"{o}.lora_A.weight": a, f"{o}.lora_B.weight": b})
    folder = fresh("hunyuan_video_native")
    path = folder / "hunyuan_lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    state = HunyuanVideoPipeline.lora_state_dict(str(path))
    HunyuanVideoPipeline.load_lora_into_transformer(state, transformer=model, adapter_name="x")
    got, err = diffusers_deltas(model, "x")
    truth = {
        q: torch.cat([got[f"transformer_blocks.0.attn.to_{c}"][0] for c in "qkv"]),
        o: got["transformer_blocks.0.attn.to_out.0"][0],
    }
    record(
        "hunyuan_video_native",
        folder,
        made_with="key rules (HunyuanVideo original "
        "diffusion_model. file, fused img_attn_qkv); ground truth: diffusers "
        "HunyuanVideoPipeline.lora_state_dict + load_lora_into_transformer",
        deltas=truth,
        modules={k: {"kind": "lora"} for k in truth},
        forward=err,
        notes="diffusers splits the fused qkv B in three and shares A; gllora keeps the "
        "fused [3*dim, dim] module the file has",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated groups: peft,lycoris,diffusers")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    OUT.mkdir(exist_ok=True)
    groups = {
        "peft": make_peft,
        "lycoris": make_lycoris,
        "wan": make_wan,
        "flux": make_flux_kohya,
        "hunyuan": make_hunyuan,
    }
    if args.only and (OUT / "MANIFEST.json").exists():  # keep the entries of the others
        MANIFEST["fixtures"].update(json.loads((OUT / "MANIFEST.json").read_text())["fixtures"])
    for g in args.only.split(",") if args.only else groups:
        groups[g]()
    for readme in OUT.glob("*/README.md"):  # PEFT's model-card stub: not part of a fixture
        readme.unlink()
    MANIFEST["versions"] = versions()
    MANIFEST["std_of_random_factors"] = STD
    (OUT / "MANIFEST.json").write_text(json.dumps(MANIFEST, indent=1, sort_keys=True))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
