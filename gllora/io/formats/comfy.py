"""ComfyUI-style files: ``diffusion_model.<path>`` and ``text_encoders.<encoder>.<path>``.

ComfyUI (and the trainers that write its "native" layout: Wan 2.x, HunyuanVideo,
Flux, LTX, Qwen-Image LoRAs) names a module by its path in the original model's state
dict, prefixed by ``diffusion_model.`` or ``text_encoders.<name>.`` (``clip_l``,
``clip_g``, ``t5xxl``, ...), and keeps the prefix: module names are the key paths as
written (``diffusion_model.blocks.0.self_attn.q``). Suffixes:

- ``lora_A.weight``/``lora_B.weight`` or ``lora_down.weight``/``lora_up.weight`` (or
  ``lora.down.weight``/``lora.up.weight``), ``alpha`` (``scale = alpha / r``, 1 when
  absent, as ComfyUI does);
- ``diff`` (a dense weight difference: exact at full rank; a vector ``diff``, Wan's
  norm weights, is listed as not a low-rank delta), ``diff_b`` (the ``bias`` extra);
- ``dora_scale``, LyCORIS ``hada_*`` / ``lokr_*`` (see :mod:`gllora.io.formats.roles`).

Fused projections (HunyuanVideo ``img_attn_qkv``, Flux ``img_attn.qkv``,
``linear1``) are one module of their fused shape, as in the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common
from gllora.io.formats import roles as _roles

_PREFIX = re.compile(r"(diffusion_model|text_encoders\.\w+)\.")
# (suffix in the file, the role's name in roles.py), longest first so ".lora_down.weight"
# is not read as a module "x.lora_down" with suffix "weight"
_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
}
_SUFFIXES = sorted(
    {**{s: s for s in _roles.SUFFIXES}, **_ALIASES}.items(), key=lambda kv: -len(kv[0])
)


def _split(key: str) -> tuple[str, str] | None:
    """``(module name, role)`` of a ComfyUI-style key, or None."""
    if not _PREFIX.match(key):
        return None
    for suffix, role in _SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], role
    return None


def is_comfy_key(key: str) -> bool:
    return _split(key) is not None


def plan(
    header: Header, read_scalar: Callable[[str], float]
) -> tuple[list[_common.ModulePlan], list[_common.NonLora]]:
    """The plans of a ComfyUI-style file and the tensors that are not a low-rank delta."""
    groups: dict[str, dict[str, str]] = {}
    unused = []
    for key in header.entries:
        split = _split(key)
        if split is None:
            unused.append(key)
            continue
        name, role = split
        roles = groups.setdefault(name, {})
        if role in roles:
            raise _common.fail(
                header.path, f"two tensors for {role}: {roles[role]!r} and {key!r}", name
            )
        roles[role] = key
    wd_meta = _roles.wd_on_output(header)
    plans, non_lora = [], []
    for name, roles in groups.items():
        p, listed = _roles.plan_module(header, name, roles, read_scalar, wd_meta)
        non_lora.extend(listed)
        if p is not None:
            plans.append(p)
    return _common.finish(header.path, plans, unused), non_lora
