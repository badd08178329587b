"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<suffix>``; the module name is the module
path in the base model. ``peft_type`` decides the rules (``CONVENTIONS.md`` 1-9):

**LORA.** ``lora_A.weight [r, in(, *k)]`` / ``lora_B.weight [out, r(, 1, ...)]``; conv
kernels are flattened (``v [in * prod(k), r]``). Scale ``alpha / r`` or ``alpha /
sqrt(r)`` (``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` matched as PEFT
does; the rank in the file must equal the config's.

- ``fan_in_fan_out`` (GPT-2 ``Conv1D``, weight ``[in, out]``): layout ``conv1d``,
  ``delta = (B @ A).T * scale``.
- ``lora_embedding_A [r, num_embeddings]`` / ``lora_embedding_B [dim, r]``: layout
  ``embedding``, ``delta [num_embeddings, dim]``. The full ``base_layer.weight`` PEFT
  saves beside an embedding LoRA is listed as not a low-rank delta (never read).
- DoRA ``lora_magnitude_vector [out]``: the extra ``magnitude``.
- ``lora_bias=True``: ``lora_B.bias [out]`` gives the extra ``bias``, the base bias's
  delta ``scale * lora_B.bias`` (PEFT merges exactly that).
- ``modules_to_save`` (and the classifier head PEFT adds for ``task_type="SEQ_CLS"``):
  the full trained copies (``lm_head.weight``, ``score.weight``) are listed in
  ``AdapterInfo.non_lora``, never loaded as model input. A key matched by neither a
  LoRA rule nor ``modules_to_save`` is an error, as always.
- ``target_parameters`` (PEFT's ``ParamWrapper``, MoE experts stored as one 3-d
  parameter ``[E, out, in]``): ``lora_A [r*E, in]`` holds expert ``e`` in rows
  ``e*r:(e+1)*r`` and ``lora_B [out, r*E]`` in columns ``e::E``; each expert is one
  module ``<path>.<parameter>.<e>`` with ``delta_e = scale * B_e @ A_e`` ``[out, in]``
  (the LoRA map's orientation; a model may store the parameter transposed). Several
  parameters of one module are nested wrappers (``experts.base_layer.lora_A`` is the
  inner one); PEFT wraps them in the order the module registers its parameters,
  which the file does not record, so those modules are named by their wrapper path
  instead of a parameter name (``<path>.base_layer.<e>``, ``<path>.<e>``).

**ADALORA.** ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]`` (no ``.weight``):
``delta = B @ (A * E) * scale`` with ``scale = lora_alpha / (init_r + 1e-5)`` (PEFT's
``ranknum`` is ``init_r`` and survives rank pruning), so ``u = scale * B * E.T``,
``v = A.T``. After pruning, ``rank_pattern`` (one boolean per initial rank) gives each
module's rank in the file; a module pruned to rank 0 has no delta and is kept as one
zero column.

**LOHA / LOKR.** ``hada_*`` / ``lokr_*`` (no ``.weight``), converted exactly as LyCORIS's
(:mod:`gllora.io.formats.lycoris`) but scaled by PEFT's rule: ``alpha / r`` with
``r``/``alpha`` from ``r``/``alpha``/``rank_pattern``/``alpha_pattern`` -- for LoKr
even when both Kronecker factors are whole, where LyCORIS uses 1.

Other ``peft_type`` values (VeRA, IA3, OFT, BOFT, ...) are refused with what they are.
Legacy ``adapter_model.bin`` files are pickles: they are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common
from gllora.io.formats import lycoris as _lycoris

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR")

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "EA",
    ".lora_embedding_B": "EB",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".base_layer.weight": "base",
}
_ADALORA_SUFFIXES = {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"}
_LYCORIS_SUFFIXES = {
    "LOHA": {f".{k}": k for k in (*_lycoris.LOHA_KEYS, *_lycoris.TUCKER_KEYS)},
    "LOKR": {f".{k}": k for k in (*_lycoris.LOKR_KEYS, "lokr_t2")},
}
_NAMES = {
    "A": "lora_A",
    "B": "lora_B",
    "E": "lora_E",
    "bias": "lora_B.bias",
    "EA": "lora_embedding_A",
    "EB": "lora_embedding_B",
    "magnitude": "lora_magnitude_vector",
    "base": "base_layer.weight",
}

#: What the PEFT adapter types gllora refuses are, and why they are not a u v^T delta.
_REFUSED = {
    "IA3": "rescales activations by learned vectors (delta = W * (l - 1)): it needs the "
    "base weights and is not a low-rank product",
    "OFT": "multiplies the base weight by a learned orthogonal matrix R (delta = (R - I) W): "
    "it needs the base weights and is not a low-rank product",
    "BOFT": "multiplies the base weight by a butterfly-factored orthogonal matrix R (delta = "
    "(R - I) W): it needs the base weights and is not a low-rank product",
    "VERA": "stores only scaling vectors; its shared random matrices A and B are not in the "
    "file (regenerated from a seed), so the delta cannot be rebuilt from it",
    "HRA": "reflects the base weight by Householder vectors (delta = (H - I) W): it needs the "
    "base weights",
}

LEGACY_HINT = (
    "it is a PyTorch pickle, which gllora never unpickles (loading a pickle can run "
    "arbitrary code). Convert it once, in an environment you trust, with "
    "`PeftModel.from_pretrained(base, folder).save_pretrained(out_folder)` (writes "
    "adapter_model.safetensors), or with `safetensors.torch.save_file(torch.load(path, "
    "weights_only=True), 'adapter_model.safetensors')` beside adapter_config.json"
)


def legacy_error(path: str) -> ValueError:
    return ValueError(f"{path}: legacy PyTorch weights are not read: {LEGACY_HINT}")


def read_config(path: str) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; a ``ValueError`` naming the file otherwise."""
    return read_config_bytes(path)[0]


def read_config_bytes(path: str) -> tuple[dict[str, Any], bytes]:
    """``(config, the file's bytes)``; see :func:`read_config`."""
    with open(path, "rb") as f:
        raw = f.read()
    return parse_config(path, raw), raw


def parse_config(path: str, raw: bytes) -> dict[str, Any]:
    """The checked config in ``raw``, the bytes of the file ``path``."""
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid JSON adapter config ({e})") from None
    if not isinstance(config, dict):
        # A bad file's content, not a bad argument type: ValueError, as everywhere here.
        raise ValueError(f"{path}: the adapter config must be a JSON object")  # noqa: TRY004
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() not in PEFT_TYPES:
        why = _REFUSED.get(str(peft_type).upper())
        if why:
            raise ValueError(
                f"{path}: peft_type {peft_type!r} is not a low-rank adapter: it {why}; "
                "gllora refuses it"
            )
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not supported; gllora reads "
            f"{', '.join(PEFT_TYPES)}"
        )
    return config


def resolve_folder(folder: str) -> tuple[str, str]:
    """``(config path, weights path)`` of a PEFT folder, or a clear ``ValueError``."""
    config = os.path.join(folder, CONFIG_NAME)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        legacy = os.path.join(folder, "adapter_model.bin")
        if os.path.isfile(legacy):
            raise legacy_error(legacy)
        raise ValueError(
            f"{folder}: a PEFT adapter folder needs {WEIGHTS_NAME}; found "
            f"{sorted(os.listdir(folder))[:10]}"
        )
    if not os.path.isfile(config):
        raise ValueError(f"{folder}: a PEFT adapter folder needs {CONFIG_NAME} (for lora_alpha)")
    return config, weights


def is_peft_key(key: str) -> bool:
    return key.startswith(PREFIX)


def _split(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    if key.startswith(PREFIX):
        for suffix, role in suffixes.items():
            if key.endswith(suffix) and len(key) > len(PREFIX) + len(suffix):
                return key[len(PREFIX) : -len(suffix)], role
    return None


def _saved_copy(module_path: str, config: dict[str, Any]) -> str | None:
    """The ``modules_to_save`` entry a key's module matches (PEFT's rule: equal, or a
    suffix after a dot), or None."""
    for target in config.get("modules_to_save") or ():
        if isinstance(target, str) and (
            module_path == target or module_path.endswith("." + target)
        ):
            return target
    return None


def plan(
    header: Header, config: dict[str, Any], config_path: str
) -> tuple[list[_common.ModulePlan], list[_common.NonLora]]:
    """The plans of a PEFT weights file (header only) and its non-LoRA tensors."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == "ADALORA":
        return _plan_adalora(header, config, config_path)
    if peft_type in _LYCORIS_SUFFIXES:
        return _plan_lycoris(header, config, config_path, peft_type)
    return _plan_lora(header, config, config_path)


def _group(header, config, suffixes, unused, non_lora, module_roles=None):
    """``{module: {role: key}}``; keys that are full copies go to ``non_lora``, others
    that no rule reads to ``unused``."""
    groups: dict[str, dict[str, str]] = {}
    for key in header.entries:
        split = _split(key, suffixes)
        if split is None:
            path = key[len(PREFIX) :] if key.startswith(PREFIX) else None
            target = path and _saved_copy(path.rpartition(".")[0], config)
            if target:
                e = header.entries[key]
                non_lora.append(
                    _common.NonLora(
                        key,
                        e.dtype,
                        e.shape,
                        f"a full trained copy of a module in modules_to_save ({target!r}): "
                        "a whole weight, not a low-rank delta; not loaded",
                    )
                )
            else:
                unused.append(key)
            continue
        module, role = split
        roles = groups.setdefault(module, {})
        if role in roles:
            raise _common.fail(
                header.path,
                f"two keys for {_NAMES.get(role, role)}: {roles[role]!r}, {key!r}",
                module,
            )
        roles[role] = key
    return groups


def _plan_lora(header, config, config_path):
    path = header.path
    unused: list[str] = []
    non_lora: list[_common.NonLora] = []
    groups = _group(header, config, _SUFFIXES, unused, non_lora)
    transposed = bool(config.get("fan_in_fan_out", False))
    targets = [t for t in config.get("target_parameters") or () if isinstance(t, str)]
    simple, config_rank = None, config.get("r", 8)
    if not config.get("rank_pattern") and not config.get("alpha_pattern") and groups:
        simple = _common.peft_scale(config, "", None, config_path, next(iter(groups)))
    plans = []
    for module, roles in groups.items():
        if targets and _wrapped_parameters(module, targets) is not None:
            plans.extend(_plan_experts(header, config, config_path, module, roles, targets))
            continue
        embedding = "EA" in roles or "EB" in roles
        a_role, b_role = ("EA", "EB") if embedding else ("A", "B")
        if embedding and "base" in roles:
            e = header.entries[roles.pop("base")]
            non_lora.append(
                _common.NonLora(
                    e.key,
                    e.dtype,
                    e.shape,
                    "the full embedding PEFT saves beside an "
                    "embedding LoRA (save_embedding_layers): not a delta; not loaded",
                )
            )
        allowed = {a_role, b_role, "magnitude", "bias"}
        unused.extend(roles.pop(r) for r in sorted(roles.keys() - allowed))
        if not roles:
            continue
        if a_role not in roles or b_role not in roles:
            have = ", ".join(_NAMES[r] for r in sorted(roles))
            raise _common.fail(
                path, f"needs both {_NAMES[a_role]} and {_NAMES[b_role]}; has only {have}", module
            )
        a, b = roles[a_role], roles[b_role]
        p = _common.plan_lora(header, module, a, b, 1.0, transposed and not embedding, embedding)
        if simple is not None and p.rank == config_rank:  # no patterns: one scale for all
            p.scale, p.alpha = simple
        else:
            p.scale, p.alpha = _common.peft_scale(config, module, p.rank, config_path, module)
        b_rows = header.entries[b].shape[0]
        if "magnitude" in roles:
            _common.plan_magnitude(header, p, roles["magnitude"], (b_rows, p.n))
        elif config.get("use_dora", False):
            raise _common.fail(
                path, "the config says use_dora but there is no lora_magnitude_vector", module
            )
        if "bias" in roles:
            if not config.get("lora_bias", False):
                raise _common.fail(
                    path,
                    f"{roles['bias']!r}: a lora_B bias, but the config has no lora_bias",
                    module,
                )
            _common.plan_bias(header, p, roles["bias"], b_rows, p.scale)
        plans.append(p)
    return _common.finish(path, plans, unused), non_lora


def _wrapped_parameters(module: str, targets: list[str]) -> tuple[str, int] | None:
    """``(module path, nesting depth)`` of a ``ParamWrapper`` key path, or None."""
    depth = 0
    base = module
    while base.endswith(".base_layer"):
        base, depth = base[: -len(".base_layer")], depth + 1
    return (base, depth) if _target_params(base, targets) else None


def _target_params(base: str, targets: list[str]) -> list[str]:
    """The parameter names of ``target_parameters`` entries that match module ``base``."""
    out = []
    for t in targets:
        owner, _, param = t.rpartition(".")
        if base == owner or base.endswith("." + owner):
            out.append(param)
    return sorted(set(out))


def _plan_experts(header, config, config_path, module, roles, targets):
    """One plan per expert of a ``target_parameters`` wrapper (see the module docstring)."""
    path = header.path
    base, depth = _wrapped_parameters(module, targets)
    params = _target_params(base, targets)
    if set(roles) - {"A", "B"} or len(roles) != 2:
        raise _common.fail(
            path,
            f"a target_parameters wrapper needs lora_A and lora_B only; has {sorted(roles.values())}",
            module,
        )
    a = _common.require_float(header, roles["A"], module)
    b = _common.require_float(header, roles["B"], module)
    name = f"{base}.{params[0]}" if len(params) == 1 and depth == 0 else module
    scale, alpha = _common.peft_scale(config, name, None, config_path, module)
    r = int(config.get("r", 8))
    rank_pattern = config.get("rank_pattern") or {}
    key = _common._pattern_key(rank_pattern, name, "rank_pattern", config_path)
    if key is not None:
        r = int(rank_pattern[key])
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] % r:
        raise _common.fail(
            path,
            f"lora_A {list(a)} and lora_B {list(b)} must be [r*E, in] and [out, r*E] with "
            f"r = {r} (config)",
            module,
        )
    experts = a[0] // r
    plans = []
    for e in range(experts):
        p = _common.ModulePlan(
            name=f"{name}.{e}" if experts > 1 else name,
            kind="lora",
            layout="linear",
            n=b[0],
            m=a[1],
            rank=r,
            scale=scale,
            tensors={"A": roles["A"], "B": roles["B"]},
            build=_build_expert,
            alpha=alpha,
            args={"expert": e, "experts": experts},
            notes=(f"expert {e} of {experts} of a target_parameters LoRA",) if experts > 1 else (),
        )
        plans.append(p)
    return plans


def _build_expert(plan, fetch):
    e, experts, r = plan.args["expert"], plan.args["experts"], plan.rank
    a, b = fetch("A"), fetch("B")
    return plan.scale * b[:, e::experts], a[e * r : (e + 1) * r].T


def _plan_adalora(header, config, config_path):
    path = header.path
    unused: list[str] = []
    non_lora: list[_common.NonLora] = []
    groups = _group(header, config, _ADALORA_SUFFIXES, unused, non_lora)
    init_r = _common._number(config.get("init_r", 12), "init_r", config_path, None)
    alpha = _common._number(config.get("lora_alpha", 8), "lora_alpha", config_path, None)
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        raise _common.fail(config_path, f"rank_pattern must be a JSON object, got {rank_pattern!r}")
    plans = []
    for module, roles in groups.items():
        missing = [_NAMES[r] for r in "AEB" if r not in roles]
        if missing:
            raise _common.fail(
                path, f"an AdaLoRA module needs lora_A, lora_E and lora_B; lacks {missing}", module
            )
        a, e, b = (_common.require_float_or_empty(header, roles[r], module) for r in "AEB")
        r = a[0]
        if len(a) != 2 or len(b) != 2 or e != (r, 1) or b[1] != r:
            raise _common.fail(
                path,
                f"AdaLoRA factors do not fit: lora_A {list(a)}, lora_E {list(e)}, lora_B {list(b)} "
                "(expected [r, in], [r, 1], [out, r])",
                module,
            )
        mask = rank_pattern.get(f"{module}.lora_E")
        want = sum(bool(x) for x in mask) if isinstance(mask, list) else int(init_r)
        if r != want:
            raise _common.fail(
                config_path,
                f"the file has rank {r} but the config gives {want} (init_r / rank_pattern)",
                module,
            )
        # PEFT: scaling = lora_alpha (rank r where alpha <= 0), divided by ranknum = init_r.
        scaling = alpha if alpha > 0 else (r if isinstance(mask, list) else init_r)
        p = _common.ModulePlan(
            name=module,
            kind="adalora",
            layout="conv1d" if config.get("fan_in_fan_out", False) else "linear",
            n=b[0],
            m=a[1],
            rank=max(r, 1),
            scale=float(scaling / (init_r + 1e-5)),
            tensors={"A": roles["A"], "E": roles["E"], "B": roles["B"]},
            build=_build_adalora,
            base_shape=(b[0], a[1]),
            alpha=float(alpha),
            notes=("pruned to rank 0: no delta, kept as one zero column",) if r == 0 else (),
        )
        if p.layout == "conv1d":
            p.n, p.m, p.base_shape = a[1], b[0], (a[1], b[0])
        plans.append(p)
    return _common.finish(path, plans, unused), non_lora


def _build_adalora(plan, fetch):
    a, e, b = fetch("A"), fetch("E"), fetch("B")
    if a.shape[0] == 0:
        n_out, n_in = b.shape[0], a.shape[1]
        u, v = np.zeros((n_out, 1)), np.zeros((n_in, 1))
    else:
        u, v = b * e[:, 0][None, :], a.T
    if plan.layout == "conv1d":
        return plan.scale * v, u
    return plan.scale * u, v


def _plan_lycoris(header, config, config_path, peft_type):
    path = header.path
    unused: list[str] = []
    non_lora: list[_common.NonLora] = []
    groups = _group(header, config, _LYCORIS_SUFFIXES[peft_type], unused, non_lora)
    plans = []
    for module, roles in groups.items():
        if "lokr_t2" in roles:
            raise _common.fail(
                path, f"Tucker LoKr factors ({roles['lokr_t2']!r}) are not supported", module
            )
        if peft_type == "LOHA":
            file_rank = (
                header.entries[roles["hada_w1_b"]].shape[0] if "hada_w1_b" in roles else None
            )
            scale, alpha = _common.peft_scale(
                config, module, file_rank, config_path, module, "alpha"
            )
            p = _lycoris.plan_loha(header, module, roles, alpha, scale=scale)
        else:
            ranks = {
                header.entries[roles[k]].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in roles
            }
            file_rank = ranks.pop() if len(ranks) == 1 else None
            scale, alpha = _common.peft_scale(
                config, module, file_rank, config_path, module, "alpha"
            )
            p = _lycoris.plan_lokr(header, module, roles, alpha, scale=scale)
        plans.append(p)
    return _common.finish(path, plans, unused), non_lora


def find_config(path: str) -> str:
    """The adapter_config.json beside a PEFT weights file passed directly."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path}: PEFT keys ({PREFIX}...) need {CONFIG_NAME} beside the file for "
            "lora_alpha; pass the adapter folder"
        )
    return config_path
