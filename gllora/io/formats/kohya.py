"""kohya / sd-scripts / LyCORIS files (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ...).

Module names are the kohya names as written in the file (``lora_unet_mid_block_
attentions_0_proj_in``): turning them back into module paths is ambiguous without the
base model's module list (``CONVENTIONS.md`` 14). Tensor keys are ``<name>.<suffix>``;
what each suffix means is in :mod:`gllora.io.formats.roles` (``CONVENTIONS.md`` 14-18):

- LoRA / LoCon: ``lora_down.weight [r, in(, kh, kw)]``, ``lora_up.weight [out, r(, 1,
  1)]``, optional Tucker ``lora_mid.weight``; conv kernels are flattened.
- ``alpha``: a 0-d tensor of any dtype (int64, f32, f16, bf16), ``scale = alpha / r``;
  a missing or zero alpha means scale 1.
- kohya Flux (``lora_unet_double_blocks_N_img_attn_qkv``, ``lora_unet_single_blocks_N_
  linear1``) keeps the fused modules as they are. sd-scripts' ``split_qkv`` saves three
  rank-``r`` LoRAs of a fused qkv as one rank-``3r`` module (down stacked, up
  block-diagonal) with the alpha of one split: every loader, sd-scripts' own included,
  then scales it by ``alpha / 3r``, and so does gllora (that is the delta the file
  applies; training scaled each split by ``alpha / r``).
- LoHa, LoKr, dense ``diff``/``diff_b`` (LyCORIS ``full``), ``dora_scale``; OFT, BOFT,
  GLoRA and IA3 are refused with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common
from gllora.io.formats import roles as _roles

_KEY = re.compile(r"(lora_(unet|te\d*|transformer)|lycoris)_\w+\.")
_KNOWN = frozenset(_roles.SUFFIXES)


def is_kohya_key(key: str) -> bool:
    return _KEY.match(key) is not None


def plan(
    header: Header, read_scalar: Callable[[str], float]
) -> tuple[list[_common.ModulePlan], list[_common.NonLora]]:
    """The plans of a kohya/LyCORIS file (header and alpha scalars only), and the
    tensors that are not part of a low-rank delta."""
    groups: dict[str, dict[str, str]] = {}
    unused = []
    for key in header.entries:
        name, _, suffix = key.partition(".")
        if suffix not in _KNOWN or not is_kohya_key(key):
            unused.append(key)
            continue
        groups.setdefault(name, {})[suffix] = key
    wd_meta = _roles.wd_on_output(header)
    plans, non_lora = [], []
    for name, roles in groups.items():
        p, listed = _roles.plan_module(header, name, roles, read_scalar, wd_meta)
        non_lora.extend(listed)
        if p is not None:
            plans.append(p)
    return _common.finish(header.path, plans, unused), non_lora


def format_name(plans: list[_common.ModulePlan]) -> str:
    """``kohya``, ``kohya_locon`` (a conv kernel larger than 1x1), ``lycoris_loha``,
    ``lycoris_lokr``, ``lycoris_full`` (dense), or ``lycoris`` for files that mix them."""
    kinds = {p.kind for p in plans}
    if kinds == {"lora"}:
        big_kernel = any(
            p.layout == "conv" and math.prod(p.base_shape[2:]) > 1 for p in plans if p.base_shape
        )
        return "kohya_locon" if big_kernel else "kohya"
    if len(kinds) == 1:
        kind = kinds.pop()
        return "lycoris_full" if kind == "dense" else f"lycoris_{kind}"
    return "lycoris"
