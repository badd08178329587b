"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<suffix>``; the module name is the module
path in the base model. Rules (``fixtures/real_loras/CONVENTIONS.md`` 1-9):

- ``lora_A.weight [r, in(, *k)]`` / ``lora_B.weight [out, r(, 1, ...)]``; conv kernels
  are flattened (``v [in * prod(k), r]``).
- scale ``alpha / r`` or ``alpha / sqrt(r)`` (``use_rslora``), with ``rank_pattern`` /
  ``alpha_pattern`` matched as PEFT does; the rank in the file must equal the config's.
- ``fan_in_fan_out`` (GPT-2 ``Conv1D``, weight ``[in, out]``): layout ``conv1d``,
  ``delta = (B @ A).T * scale``.
- ``lora_embedding_A [r, num_embeddings]`` / ``lora_embedding_B [dim, r]``: layout
  ``embedding``, ``delta [num_embeddings, dim]``. The full ``base_layer.weight`` PEFT
  saves beside an embedding LoRA is ignored (never read).
- DoRA ``lora_magnitude_vector [out]`` is kept as the extra ``magnitude``.

Legacy ``adapter_model.bin`` files are pickles: they are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gllora.io._safetensors import Header
from gllora.io.formats import common as _common

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "EA",
    ".lora_embedding_B": "EB",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".base_layer.weight": "base",
}
_NAMES = {
    "A": "lora_A",
    "B": "lora_B",
    "EA": "lora_embedding_A",
    "EB": "lora_embedding_B",
    "magnitude": "lora_magnitude_vector",
    "base": "base_layer.weight",
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
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid JSON adapter config ({e})") from None
    if not isinstance(config, dict):
        # A bad file's content, not a bad argument type: ValueError, as everywhere here.
        raise ValueError(f"{path}: the adapter config must be a JSON object")  # noqa: TRY004
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported; gllora reads LORA")
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


def plan(header: Header, config: dict[str, Any], config_path: str) -> list[_common.ModulePlan]:
    """One plan per module of a PEFT weights file (header only)."""
    path = header.path
    groups: dict[str, dict[str, str]] = {}
    unused = []
    for key in header.entries:
        role, module = None, None
        if key.startswith(PREFIX):
            for suffix, r in _SUFFIXES.items():
                if key.endswith(suffix) and len(key) > len(PREFIX) + len(suffix):
                    role, module = r, key[len(PREFIX) : -len(suffix)]
                    break
        if role is None:
            if key.endswith((".lora_A.bias", ".lora_B.bias")):
                raise _common.fail(
                    path, f"{key!r}: LoRA biases (lora_bias=True) are not a u v^T product"
                )
            unused.append(key)
            continue
        if role in groups.setdefault(module, {}):
            raise _common.fail(
                path, f"two keys for {_NAMES[role]}: {groups[module][role]!r}, {key!r}", module
            )
        groups[module][role] = key

    transposed = bool(config.get("fan_in_fan_out", False))
    plans = []
    for module, roles in groups.items():
        embedding = "EA" in roles or "EB" in roles
        a_role, b_role = ("EA", "EB") if embedding else ("A", "B")
        # Only embedding LoRAs come with their base weight; any other role is left over.
        allowed = {a_role, b_role, "magnitude"} | ({"base"} if embedding else set())
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
        p.scale, p.alpha = _common.peft_scale(config, module, p.rank, config_path, module)
        if "magnitude" in roles:
            b_rows = header.entries[b].shape[0]
            _common.plan_magnitude(header, p, roles["magnitude"], (b_rows, p.n))
        elif config.get("use_dora", False):
            raise _common.fail(
                path, "the config says use_dora but there is no lora_magnitude_vector", module
            )
        plans.append(p)
    return _common.finish(path, plans, unused)


def find_config(path: str) -> str:
    """The adapter_config.json beside a PEFT weights file passed directly."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path}: PEFT keys ({PREFIX}...) need {CONFIG_NAME} beside the file for "
            "lora_alpha; pass the adapter folder"
        )
    return config_path
