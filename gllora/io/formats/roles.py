"""Modules described by suffix roles: kohya / LyCORIS and ComfyUI-style files.

In these files every tensor key is ``<module>.<suffix>`` and the suffix says what the
tensor is (``lora_down.weight``, ``alpha``, ``hada_w1_a``, ``diff_b``, ...). The readers
(:mod:`~gllora.io.formats.kohya`, :mod:`~gllora.io.formats.comfy`) group the keys by
module and call :func:`plan_module`, which decides what the module is:

- LoRA / LoCon (``lora_down``, ``lora_up``, optional Tucker ``lora_mid``), LoHa
  (``hada_*``, optional Tucker ``hada_t1/t2``), LoKr (``lokr_*``): low-rank products,
  converted exactly (:mod:`~gllora.io.formats.lycoris`); ``scale = alpha / r``.
- a dense difference (``diff``, LyCORIS ``full``): exact, at full rank (see
  :mod:`~gllora.io.formats.lycoris`); a vector ``diff`` (a norm weight) is listed as not
  a low-rank delta.
- ``diff_b``: the module's ``bias`` extra (listed on its own when the module has no
  weight delta); ``dora_scale``: DoRA's ``magnitude`` (per output row) or
  ``magnitude_in`` (per input column), told apart by the axis it lies along (LyCORIS
  writes ``[out, 1, ...]`` or, with ``wd_on_output=False``, ``[1, in, ...]``), never by
  its size: on a square layer both have the same size.
- OFT / BOFT, GLoRA and IA3 modules are refused with what they are: their delta needs
  the base weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common
from gllora.io.formats import lycoris as _lycoris

LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
NORMS = ("w_norm", "b_norm")
#: every suffix these files use, for the readers' key parsing
SUFFIXES = (
    *LORA,
    *_lycoris.LOHA_KEYS,
    *_lycoris.TUCKER_KEYS,
    *_lycoris.LOKR_KEYS,
    "lokr_t2",
    "alpha",
    "dora_scale",
    "diff",
    "diff_b",
    *NORMS,
    "oft_blocks",
    "rescale",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "on_input",  # IA3 (its "weight" is then a key nothing reads: the refusal comes first)
)


def wd_on_output(header: Header) -> bool | None:
    """LyCORIS's ``wd_on_output`` network argument from kohya metadata, if recorded."""
    raw = header.metadata.get("ss_network_args")
    if not raw:
        return None
    try:
        args = json.loads(raw)
    except ValueError:
        return None
    value = args.get("wd_on_output") if isinstance(args, dict) else None
    if value is None:
        return None
    return str(value).strip().lower() not in ("false", "0", "no")


def _refuse(header: Header, name: str, roles: dict[str, str]) -> None:
    """Raises for the module kinds whose delta is not in the file."""
    path = header.path
    if "oft_blocks" in roles:
        blocks = header.entries[roles["oft_blocks"]].shape
        kind = "BOFT (butterfly OFT)" if len(blocks) == 4 else "(Diag-)OFT"
        raise _common.fail(
            path,
            f"a LyCORIS {kind} module (oft_blocks {list(blocks)}): it multiplies the base "
            "weight by a learned orthogonal matrix R (delta = (R - I) W), so its delta "
            "needs the base weights and is not a low-rank product; gllora refuses it",
            name,
        )
    if any(k in roles for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")):
        raise _common.fail(path, _lycoris.NOT_LOW_RANK["a1.weight"] + "; gllora refuses it", name)
    if "on_input" in roles:
        raise _common.fail(path, _lycoris.NOT_LOW_RANK["on_input"] + "; gllora refuses it", name)
    if "lokr_t2" in roles:
        raise _common.fail(
            path, f"Tucker LoKr factors ({roles['lokr_t2']!r}) are not supported", name
        )


def plan_module(
    header: Header,
    name: str,
    roles: dict[str, str],
    read_scalar: Callable[[str], float],
    wd_meta: bool | None,
) -> tuple[_common.ModulePlan | None, list[_common.NonLora]]:
    """The plan of one module from its ``{suffix: key}``, and what is not a low-rank delta.

    Raises:
      ValueError: naming the file and module, for refused kinds, mixed algorithms,
        missing factors or shapes that do not fit.
    """
    path = header.path
    _refuse(header, name, roles)
    algos = set()
    if any(s in roles for s in LORA):
        algos.add("lora")
    if any(s.startswith("hada_") for s in roles):
        algos.add("loha")
    if any(s.startswith("lokr_") for s in roles):
        algos.add("lokr")
    diff = roles.get("diff")
    dense = diff is not None and len(header.entries[diff].shape) >= 2
    if dense:
        algos.add("dense")
    if len(algos) > 1:
        raise _common.fail(
            path, f"mixes {' and '.join(sorted(algos))} keys: {sorted(roles.values())}", name
        )
    non_lora = []
    if diff is not None and not dense:
        e = header.entries[diff]
        non_lora.append(
            _common.NonLora(
                diff,
                e.dtype,
                e.shape,
                "a dense difference of a vector (a norm weight): no matrix delta, not loaded",
            )
        )
    for norm in NORMS:
        if norm in roles:
            e = header.entries[roles[norm]]
            non_lora.append(
                _common.NonLora(
                    roles[norm],
                    e.dtype,
                    e.shape,
                    "a LyCORIS norm-layer weight or bias: not a low-rank delta, not loaded",
                )
            )
    if not algos:
        if "diff_b" in roles:
            e = header.entries[roles["diff_b"]]
            non_lora.append(
                _common.NonLora(
                    roles["diff_b"],
                    e.dtype,
                    e.shape,
                    "a bias difference of a module without a weight delta: not loaded",
                )
            )
        if non_lora:
            return None, non_lora
        raise _common.fail(path, f"has no factors: {sorted(roles.values())}", name)

    alpha = None
    if "alpha" in roles:
        alpha = read_scalar(roles["alpha"])
        if not math.isfinite(alpha):
            raise _common.fail(path, f"alpha {roles['alpha']!r} is {alpha}", name)
    (algo,) = algos
    if algo == "loha":
        plan = _lycoris.plan_loha(header, name, roles, alpha)
    elif algo == "lokr":
        plan = _lycoris.plan_lokr(header, name, roles, alpha)
    elif algo == "dense":
        plan = _lycoris.plan_dense(header, name, diff)
    else:
        for need in LORA[:2]:
            if need not in roles:
                have = ", ".join(repr(k) for k in roles.values())
                raise _common.fail(path, f"needs {need}; has only {have}", name)
        down, up = roles["lora_down.weight"], roles["lora_up.weight"]
        if "lora_mid.weight" in roles:
            plan = _lycoris.plan_locon_tucker(
                header, name, down, roles["lora_mid.weight"], up, alpha
            )
        else:
            plan = _common.plan_lora(header, name, down, up, 1.0)
            plan.scale, plan.alpha = _common.kohya_scale(alpha, plan.rank), alpha
    if "diff_b" in roles:
        _common.plan_bias(header, plan, roles["diff_b"], plan.n, 1.0)
    if "dora_scale" in roles:
        plan_dora_scale(header, plan, roles["dora_scale"], wd_meta)
    return plan, non_lora


def plan_dora_scale(
    header: Header, plan: _common.ModulePlan, key: str, wd_meta: bool | None
) -> None:
    """Attaches a kohya/LyCORIS ``dora_scale`` as ``magnitude`` or ``magnitude_in``.

    The axis the scale lies along says which it is (``[out, 1, ...]``: one per output
    row; ``[1, in, ...]``: one per input column); the size alone cannot tell them apart
    on a square layer. A bare vector is read by its size where that is unambiguous, by
    the file's ``wd_on_output`` network argument where recorded, and refused otherwise.
    """
    shape = _common.require_float(header, key, plan.name)
    out = plan.n
    in_ch = plan.base_shape[1] if plan.base_shape and len(plan.base_shape) > 1 else plan.m
    per_row = len(shape) >= 2 and shape[0] == out and all(d == 1 for d in shape[1:])
    per_col = (
        len(shape) >= 2 and shape[0] == 1 and shape[1] == in_ch and all(d == 1 for d in shape[2:])
    )
    if per_row and per_col:  # [1, 1]: a 1 x 1 layer, where the two coincide
        per_row, per_col = (wd_meta is not False), (wd_meta is False)
    if len(shape) == 1:
        size = shape[0]
        if size == out and size == in_ch:
            if wd_meta is None:
                raise _common.fail(
                    header.path,
                    f"dora_scale {key!r} {list(shape)} is a bare vector on a square layer "
                    f"[{out}, {in_ch}]: whether it scales output rows or input columns "
                    "(LyCORIS wd_on_output) cannot be told, and gllora does not guess",
                    plan.name,
                )
            per_row, per_col = wd_meta, not wd_meta
        else:
            per_row, per_col = size == out, size == in_ch
    if per_row:
        plan.extras.append(_common.ExtraPlan("magnitude", key, out))
    elif per_col:
        plan.extras.append(_common.ExtraPlan("magnitude_in", key, in_ch))
        plan.notes += ("DoRA scale per input column (LyCORIS wd_on_output=False)",)
    else:
        raise _common.fail(
            header.path,
            f"dora_scale {key!r} {list(shape)} fits neither [out={out}, 1, ...] (per output "
            f"row) nor [1, in={in_ch}, ...] (per input column)",
            plan.name,
        )
