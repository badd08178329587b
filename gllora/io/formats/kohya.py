"""kohya / sd-scripts / LyCORIS files (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ...).

Module names are the kohya names as written in the file (``lora_unet_mid_block_
attentions_0_proj_in``): turning them back into module paths is ambiguous without the
base model's module list (``CONVENTIONS.md`` 14). Tensor keys are ``<name>.<suffix>``.
Rules (``CONVENTIONS.md`` 14-18):

- LoRA / LoCon: ``lora_down.weight [r, in(, kh, kw)]``, ``lora_up.weight [out, r(, 1,
  1)]``; conv kernels are flattened (``v [in*kh*kw, r]``).
- ``alpha``: a 0-d tensor of any dtype (int64, f32, f16, bf16), ``scale = alpha / r``;
  a missing or zero alpha means scale 1.
- LoHa (``hada_*``) and LoKr (``lokr_*``): see :mod:`gllora.io._lycoris`.
- ``dora_scale`` (DoRA magnitude) is kept as the extra ``magnitude``.
- Tucker-decomposed conv factors (``lora_mid``, ``hada_t1/t2``, ``lokr_t2``) and any
  other suffix are refused with an error that names the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common
from gllora.io.formats import lycoris as _lycoris

_KEY = re.compile(r"(lora_(unet|te\d*|transformer)|lycoris)_\w+\.")
_LORA = {"lora_down.weight": "down", "lora_up.weight": "up"}
_TUCKER = ("lora_mid.weight", *_lycoris.TUCKER_KEYS)
_KNOWN = {*_LORA, *_lycoris.LOHA_KEYS, *_lycoris.LOKR_KEYS, "alpha", "dora_scale", *_TUCKER}


def is_kohya_key(key: str) -> bool:
    return _KEY.match(key) is not None


def _algo(roles: dict[str, str]) -> set[str]:
    algos = set()
    for suffix in roles:
        if suffix in _LORA:
            algos.add("lora")
        elif suffix.startswith("hada_"):
            algos.add("loha")
        elif suffix.startswith("lokr_"):
            algos.add("lokr")
    return algos


def plan(header: Header, read_scalar: Callable[[str], float]) -> list[_common.ModulePlan]:
    """One plan per module of a kohya/LyCORIS file (header and alpha scalars only)."""
    path = header.path
    groups: dict[str, dict[str, str]] = {}
    unused = []
    for key in header.entries:
        name, _, suffix = key.partition(".")
        if not is_kohya_key(key) or suffix not in _KNOWN:
            unused.append(key)
            continue
        groups.setdefault(name, {})[suffix] = key

    plans = []
    for name, roles in groups.items():
        tucker = [roles[s] for s in _TUCKER if s in roles]
        if tucker:
            raise _common.fail(
                path, f"Tucker-decomposed conv factors ({tucker[0]!r}) are not supported", name
            )
        algos = _algo(roles)
        if len(algos) != 1:
            what = f"mixes {' and '.join(sorted(algos))} keys" if algos else "has no factors"
            raise _common.fail(path, f"{what}: {sorted(roles.values())}", name)
        alpha = None
        if "alpha" in roles:
            alpha = read_scalar(roles["alpha"])
            if not math.isfinite(alpha):
                raise _common.fail(path, f"alpha {roles['alpha']!r} is {alpha}", name)
        (algo,) = algos
        if algo == "loha":
            p = _lycoris.plan_loha(header, name, roles, alpha)
        elif algo == "lokr":
            p = _lycoris.plan_lokr(header, name, roles, alpha)
        else:
            for need in _LORA:
                if need not in roles:
                    have = ", ".join(repr(k) for k in roles.values())
                    raise _common.fail(path, f"needs {need}; has only {have}", name)
            down, up = roles["lora_down.weight"], roles["lora_up.weight"]
            p = _common.plan_lora(header, name, down, up, 1.0)
            p.scale, p.alpha = _common.kohya_scale(alpha, p.rank), alpha
        if "dora_scale" in roles:
            _common.plan_magnitude(header, p, roles["dora_scale"], (p.n, p.m))
        plans.append(p)
    return _common.finish(path, plans, unused)


def format_name(plans: list[_common.ModulePlan]) -> str:
    """``kohya``, ``kohya_locon`` (a conv kernel larger than 1x1), ``lycoris_loha``,
    ``lycoris_lokr``, or ``lycoris`` for files that mix algorithms."""
    kinds = {p.kind for p in plans}
    if kinds == {"lora"}:
        big_kernel = any(
            p.layout == "conv" and math.prod(p.base_shape[2:]) > 1 for p in plans if p.base_shape
        )
        return "kohya_locon" if big_kernel else "kohya"
    if len(kinds) == 1:
        return f"lycoris_{kinds.pop()}"
    return "lycoris"
