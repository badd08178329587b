"""What the adapter readers share: module plans, the A/B LoRA rule, PEFT scales.

A reader turns a header into one :class:`ModulePlan` per module WITHOUT reading factor
data (``io.inspect`` stops there); ``io.load_adapter`` then calls each plan's ``build``
with a function that reads (and checks) one tensor, and gets ``(u [n, r], v [m, r])``
with ``u @ v.T`` the delta in the layout of the base weight.

Layouts (``ModulePlan.layout``):
  linear:    base weight ``[out, in]``; ``n = out``, ``m = in``.
  conv:      base kernel ``[out, in, *k]``, flattened: ``n = out``, ``m = in * prod(k)``.
  conv1d:    GPT-2 ``Conv1D`` (PEFT ``fan_in_fan_out``), base weight ``[in, out]``:
             ``n = in``, ``m = out``, ``delta = (B @ A).T * scale``.
  embedding: base weight ``[num_embeddings, dim]``: ``n = num_embeddings``, ``m = dim``.
  flat:      ``[out, M]`` where the file does not say whether ``M`` is a linear
             layer's input or a flattened conv kernel (LoHa, decomposed LoKr).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gllora.io._safetensors import FLOAT_DTYPES, Header

LAYOUTS = ("linear", "conv", "conv1d", "embedding", "flat")
_DIGITS = re.compile(r"(\d+)")

Fetch = Callable[[str], np.ndarray]


#: Extra inputs a module can carry beside ``u v^T`` (``lora.extras[kind][name]``):
#: ``magnitude`` DoRA's per-OUTPUT-row scale ``[out]`` (PEFT ``lora_magnitude_vector``,
#: LyCORIS ``dora_scale [out, 1, ...]``); ``magnitude_in`` DoRA's per-INPUT-column scale
#: ``[in]`` (LyCORIS ``wd_on_output=False``: ``dora_scale [1, in, ...]``), a different
#: quantity that must never be read as the per-row one; ``bias`` the delta of the base
#: layer's bias ``[out]`` (PEFT ``lora_bias=True``: ``lora_B.bias * scale``; Wan and
#: LyCORIS ``full``: ``diff_b``).
EXTRA_KINDS = ("magnitude", "magnitude_in", "bias")


@dataclasses.dataclass(slots=True)
class ExtraPlan:
    """An extra input of a module: ``scale * tensor(key).reshape(size)``."""

    kind: str
    key: str
    size: int
    scale: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class NonLora:
    """A tensor of an adapter file that is not part of a low-rank delta (a full weight
    saved by ``modules_to_save``, a norm-weight difference): listed, never loaded.

    Attributes:
      key: the tensor key.
      dtype: its safetensors dtype.
      shape: its shape.
      what: what it is and why it is not loaded.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    what: str


@dataclasses.dataclass(slots=True)
class ModulePlan:
    """One module as the header describes it; ``build(plan, fetch)`` gives ``(u, v)``.

    ``tensors`` maps a role (``"A"``, ``"B"``, ``"w1_a"``, ...) to the tensor key in the
    file; ``fetch(role)`` returns that tensor as float64, checked finite. Plain LoRA
    modules (``build is build_lora``) are read by a faster path that writes float32
    straight into the stacked arrays (same values).
    """

    name: str
    kind: str
    layout: str
    n: int
    m: int
    rank: int
    scale: float
    tensors: dict[str, str]
    build: Callable[[ModulePlan, Fetch], tuple[np.ndarray, np.ndarray]]
    base_shape: tuple[int, ...] | None = None
    alpha: float | None = None
    extras: list[ExtraPlan] = dataclasses.field(default_factory=list)
    notes: tuple[str, ...] = ()
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


def fail(path: str, msg: str, module: str | None = None) -> ValueError:
    """A ``ValueError`` whose message starts with the file and the module."""
    where = f"{path}: module {module!r}" if module is not None else path
    return ValueError(f"{where}: {msg}")


@functools.lru_cache(maxsize=1 << 16)
def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key under which ``layers.2`` comes before ``layers.10`` (cached: the module
    names of one base model repeat in every adapter of it)."""
    return tuple(int(t) if t.isdigit() else t for t in _DIGITS.split(name))


def require_float(header: Header, key: str, module: str) -> tuple[int, ...]:
    """The shape of factor ``key``; raises unless it is a float tensor without empty axes."""
    entry = header.entries[key]
    if entry.dtype not in FLOAT_DTYPES:
        raise fail(
            header.path,
            f"tensor {key!r} has dtype {entry.dtype}; factors must be one of {FLOAT_DTYPES}",
            module,
        )
    if 0 in entry.shape or not entry.shape:
        raise fail(header.path, f"tensor {key!r} has shape {list(entry.shape)}", module)
    return entry.shape


def require_float_or_empty(header: Header, key: str, module: str) -> tuple[int, ...]:
    """As :func:`require_float`, but a zero-length axis is allowed (AdaLoRA rank 0)."""
    entry = header.entries[key]
    if entry.dtype not in FLOAT_DTYPES:
        raise fail(
            header.path,
            f"tensor {key!r} has dtype {entry.dtype}; factors must be one of {FLOAT_DTYPES}",
            module,
        )
    if not entry.shape:
        raise fail(header.path, f"tensor {key!r} has shape {list(entry.shape)}", module)
    return entry.shape


def plan_lora(
    header: Header,
    name: str,
    a_key: str,
    b_key: str,
    scale: float,
    transposed: bool = False,
    embedding: bool = False,
) -> ModulePlan:
    """Checks a LoRA pair ``A [r, in, *k]``, ``B [out, r, *1]`` and plans its ``(u, v)``.

    Args:
      header: the file's header.
      name: the module name.
      a_key, b_key: the keys of ``A`` (lora_A / lora_down) and ``B`` (lora_B / lora_up).
      scale: the LoRA scale, folded into ``u``.
      transposed: the base weight is ``[in, out]`` (GPT-2 Conv1D): delta ``(B @ A).T``.
      embedding: PEFT's ``lora_embedding_A [r, num_embeddings]``, ``B [dim, r]``:
        delta ``(B @ A).T``, ``[num_embeddings, dim]``.
    """
    a = require_float(header, a_key, name)
    b = require_float(header, b_key, name)
    if len(a) < 2 or len(b) != len(a):
        raise fail(
            header.path,
            f"A {a_key!r} {list(a)} and B {b_key!r} {list(b)} must have the same number "
            "(>= 2) of axes",
            name,
        )
    if a[0] != b[1]:
        raise fail(
            header.path,
            f"A {a_key!r} {list(a)} and B {b_key!r} {list(b)} have different ranks "
            f"({a[0]} != {b[1]})",
            name,
        )
    if any(d != 1 for d in b[2:]):
        raise fail(header.path, f"B {b_key!r} {list(b)} must be [out, r, 1, ...]", name)
    rank, fan_in = a[0], math.prod(a[1:])
    if len(a) > 2:  # a conv kernel; PEFT's fan_in_fan_out does not apply to conv layers
        if embedding:
            raise fail(header.path, f"embedding factor A {list(a)} must be a matrix", name)
        layout, n, m, base = "conv", b[0], fan_in, (b[0], *a[1:])
    elif embedding:
        layout, n, m, base = "embedding", a[1], b[0], (a[1], b[0])
    elif transposed:
        layout, n, m, base = "conv1d", a[1], b[0], (a[1], b[0])
    else:
        layout, n, m, base = "linear", b[0], a[1], (b[0], a[1])
    return ModulePlan(
        name=name,
        kind="lora",
        layout=layout,
        n=n,
        m=m,
        rank=rank,
        scale=scale,
        tensors={"A": a_key, "B": b_key},
        build=build_lora,
        base_shape=base,
    )


def build_lora(plan: ModulePlan, fetch: Fetch) -> tuple[np.ndarray, np.ndarray]:
    """``u = scale * B [out, r]``, ``v = A.T [in * prod(k), r]`` (swapped for conv1d/embedding)."""
    a = fetch("A").reshape(plan.rank, -1)
    b = fetch("B").reshape(-1, plan.rank)
    if plan.layout in ("conv1d", "embedding"):
        return plan.scale * a.T, b
    return plan.scale * b, a.T


def plan_magnitude(header: Header, plan: ModulePlan, key: str, sizes: tuple[int, ...]) -> None:
    """Attaches a PEFT/diffusers DoRA magnitude (a per-output-row vector) to ``plan``."""
    shape = require_float(header, key, plan.name)
    size = math.prod(shape)
    if sum(d > 1 for d in shape) > 1 or size not in sizes:
        raise fail(
            header.path,
            f"DoRA magnitude {key!r} {list(shape)} should be a vector of size "
            f"{' or '.join(map(str, sorted(set(sizes))))}",
            plan.name,
        )
    plan.extras.append(ExtraPlan("magnitude", key, size))


def plan_bias(header: Header, plan: ModulePlan, key: str, out: int, scale: float) -> None:
    """Attaches a bias delta ``scale * tensor(key)`` of size ``out`` to ``plan``."""
    shape = require_float(header, key, plan.name)
    if math.prod(shape) != out or sum(d > 1 for d in shape) > 1:
        raise fail(
            header.path,
            f"bias {key!r} {list(shape)} should be a vector of the {out} output features",
            plan.name,
        )
    plan.extras.append(ExtraPlan("bias", key, out, scale))


def _pattern_key(patterns: Mapping[str, Any], module_path: str, what: str, path: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key with ``re.match(rf"(.*\\.)?({key})$", path)``."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return key
        except re.error as e:
            raise fail(
                path, f"{what} key {key!r} is not a valid regular expression ({e})"
            ) from None
    return None


def _number(value: Any, what: str, path: str, module: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(path, f"{what} must be a finite number, got {value!r}", module)
    return value


def peft_scale(
    config: Mapping[str, Any],
    module_path: str,
    file_rank: int | None,
    path: str,
    module: str,
    alpha_key: str = "lora_alpha",
) -> tuple[float, float]:
    """``(scale, alpha)`` of one module under a PEFT ``LoraConfig`` dict.

    ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); ``r`` and ``alpha`` come
    from ``rank_pattern`` / ``alpha_pattern`` when a key matches ``module_path`` (PEFT's
    rule, first match in dict order), else from ``r`` / ``lora_alpha`` (PEFT defaults 8).
    The configured rank must equal the rank in the file, or the scale PEFT would use
    is unknowable (and PEFT itself could not load the file); ``file_rank=None`` skips
    that check (a LoKr module of whole factors has no rank in the file). ``alpha_key``:
    ``"alpha"`` for PEFT's LoHa and LoKr configs.
    """
    r = config.get("r", 8)
    alpha = config.get(alpha_key, 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for what, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise fail(path, f"{what} must be a JSON object, got {pattern!r}")
    key = _pattern_key(rank_pattern, module_path, "rank_pattern", path)
    if key is not None:
        r = rank_pattern[key]
    key = _pattern_key(alpha_pattern, module_path, "alpha_pattern", path)
    if key is not None:
        alpha = alpha_pattern[key]
    r = _number(r, "r", path, module)
    alpha = _number(alpha, alpha_key, path, module)
    if r <= 0:
        raise fail(path, f"the config gives rank {r:g}; a rank must be positive", module)
    if file_rank is not None and r != file_rank:
        raise fail(
            path,
            f"the config gives rank {r:g} (r / rank_pattern) but the file has rank {file_rank}",
            module,
        )
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return float(scale), float(alpha)


def kohya_scale(alpha: float | None, dim: int) -> float:
    """``alpha / dim``; a missing or zero alpha means ``alpha = dim`` (scale 1)."""
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / dim


def finish(path: str, plans: list[ModulePlan], unused: set[str] | list[str]) -> list[ModulePlan]:
    """Raises on unconsumed keys and empty files; returns the plans in natural order."""
    if unused:
        shown = sorted(unused, key=natural_key)
        raise fail(
            path,
            f"{len(shown)} tensor key(s) not understood: {', '.join(map(repr, shown[:5]))}"
            f"{' ...' if len(shown) > 5 else ''}",
        )
    if not plans:
        raise fail(path, "holds no LoRA modules")
    for plan in plans:
        if not math.isfinite(plan.scale):
            raise fail(path, f"scale {plan.scale} is not finite", plan.name)
    return sorted(plans, key=lambda p: natural_key(p.name))
