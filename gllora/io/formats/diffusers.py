"""diffusers LoRA files (``pytorch_lora_weights.safetensors``).

Module names are ``<component>.<module path>`` with the component ``unet``,
``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` or ``transformer``; the
``text_model.`` level of text-encoder paths written with transformers < 5 is
dropped, so both layouts give the same names. Rules (``CONVENTIONS.md`` 10-13):

- Any of the three A/B spellings, mixed freely in one file (diffusers' own loader
  drops modules from such files; here every key is either used or an error):
  ``lora_A.weight``/``lora_B.weight``; ``lora.down.weight``/``lora.up.weight`` and
  ``lora_linear_layer.down.weight``/``.up.weight``; the old attention-processor
  ``<attn>.processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0``; files
  of that kind without a component prefix are UNet files).
- Scale: a ``<module>.alpha`` tensor (network alpha, from converted kohya files) gives
  ``alpha / r``; else the PEFT rules with the component's ``r``, ``lora_alpha``,
  ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` from the ``lora_adapter_metadata``
  JSON; with neither, scale 1 (what diffusers does).
- ``lora_magnitude_vector`` (DoRA) is kept as the extra ``magnitude``; ``lora_B.bias``
  (PEFT's ``lora_bias=True``) as the extra ``bias``, ``scale * lora_B.bias``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
METADATA_KEY = "lora_adapter_metadata"

_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_B.bias", "bias"),
    (".alpha", "alpha"),
)
_ATTN_PROCS = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _split(key: str) -> tuple[str, str, str] | None:
    """``(component, module path, role)`` of a diffusers key, or None."""
    comp, _, rest = key.partition(".")
    if comp not in COMPONENTS:
        comp, rest = "unet", key  # attention-processor files carry no prefix
        if not _ATTN_PROCS.match(rest):
            return None
    match = _ATTN_PROCS.match(rest)
    if match:
        attn, proj, which = match.groups()
        proj = "to_out.0" if proj == "to_out" else proj
        return comp, f"{attn}.{proj}", "A" if which == "down" else "B"
    for suffix, role in _SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return comp, rest[: -len(suffix)], role
    return None


def is_diffusers_key(key: str) -> bool:
    return _split(key) is not None


def component_configs(header: Header) -> dict[str, dict[str, Any]]:
    raw = header.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise _common.fail(header.path, f"metadata {METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(flat, dict):
        raise _common.fail(header.path, f"metadata {METADATA_KEY!r} must be a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        configs.setdefault(comp, {})[field] = value
    return configs


def plan(
    header: Header, read_scalar: Callable[[str], float]
) -> tuple[list[_common.ModulePlan], list[_common.NonLora]]:
    """One plan per module of a diffusers file (header and alpha scalars only)."""
    path = header.path
    groups: dict[str, dict[str, str]] = {}
    where: dict[str, tuple[str, str]] = {}
    unused = []
    for key in header.entries:
        split = _split(key)
        if split is None:
            unused.append(key)
            continue
        comp, module_path, role = split
        short = module_path
        if comp.startswith("text_encoder") and short.startswith("text_model."):
            short = short[len("text_model.") :]
        name = f"{comp}.{short}"
        roles = groups.setdefault(name, {})
        if role in roles:
            raise _common.fail(
                path, f"two tensors for the same {role}: {roles[role]!r} and {key!r}", name
            )
        roles[role] = key
        where[name] = (comp, module_path)

    configs = component_configs(header)
    plans = []
    for name, roles in groups.items():
        if "A" not in roles or "B" not in roles:
            have = ", ".join(repr(k) for k in roles.values())
            raise _common.fail(
                path, f"needs both a down (A) and an up (B) tensor; has {have}", name
            )
        comp, module_path = where[name]
        p = _common.plan_lora(header, name, roles["A"], roles["B"], 1.0)
        if "alpha" in roles:
            p.alpha = read_scalar(roles["alpha"])
            p.scale = _common.kohya_scale(p.alpha, p.rank)
        elif comp in configs:
            p.scale, p.alpha = _common.peft_scale(configs[comp], module_path, p.rank, path, name)
        if "magnitude" in roles:
            _common.plan_magnitude(header, p, roles["magnitude"], (p.n,))
        if "bias" in roles:
            _common.plan_bias(header, p, roles["bias"], p.n, p.scale)
        plans.append(p)
    return _common.finish(path, plans, unused), []
