"""Reading LoRA adapter files: PEFT, diffusers, kohya / sd-scripts, LyCORIS, ComfyUI.

::

    from gllora import io
    info = io.inspect("adapters/my_lora")        # header only: no factor data is read
    info.format, info.shapes, info.ranks, info.scales, info.metadata, info.non_lora
    lora = io.load_adapter("adapters/my_lora")   # a gllora.Lora of numpy float32 arrays

``path`` is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) or
one ``.safetensors`` file (diffusers, kohya, LyCORIS, ComfyUI-style, or a PEFT weights
file with its ``adapter_config.json`` beside it). The format is told from the tensor
keys (and PEFT's ``peft_type``). Everything here is numpy: a loaded ``Lora`` holds
numpy arrays, which reach a device only when a model runs.

Every module becomes ``(u [n, r], v [m, r])`` with ``u @ v.T`` the delta in
the layout of the base weight (``ModuleInfo.layout``): ``[out, in]`` for linear layers,
``[out, in*kh*kw]`` for conv kernels (flattened), ``[in, out]`` for GPT-2 ``Conv1D``
(``conv1d``), ``[num_embeddings, dim]`` for embeddings; ``flat`` when the file does not
say whether ``[out, M]`` is linear or a flattened kernel (LoHa, decomposed LoKr). The
LoRA scale is folded into ``u``. Extra inputs travel as ``lora.extras[kind][name]``:
``magnitude`` (DoRA, per output row), ``magnitude_in`` (LyCORIS DoRA per input column),
``bias`` (the base bias's delta: PEFT ``lora_bias``, ``diff_b``). Modules are in
natural order of their names (``layers.2`` before ``layers.10``), so files of one kind
give one structure.

Names: PEFT, the module path in the base model; diffusers, ``<component>.<path>``
(``unet.``, ``text_encoder.``, ``text_encoder_2.``, without transformers-4's
``text_model.`` level); kohya and LyCORIS, the kohya name (``lora_unet_...``); ComfyUI
style, the key path with its ``diffusion_model.`` / ``text_encoders.<name>.`` prefix.

LoHa and LoKr modules are converted exactly (see :mod:`gllora.io.formats.lycoris`): a
LoHa of ranks ``r1, r2`` becomes a rank-``r1*r2`` product, a LoKr a rank-``k1*k2``
product, with Kronecker-structured factors. Their parameters are defined only up to the
subgroup ``GL(r1) (x) GL(r2)`` of ``GL(r1*r2)``, not all of it: models invariant to GL(r)
see the exact delta and remain valid; non-invariant models see one canonical
factorization. A dense difference (``diff``, LyCORIS ``full``) is exact at full rank.

What is not a low-rank delta is never fed to a model and never dropped silently: full
weight copies (PEFT ``modules_to_save``, a sequence classifier's head), vector
differences (norm weights) are listed in ``AdapterInfo.non_lora`` with what they are;
adapters whose delta needs the base weights (OFT, BOFT, GLoRA, IA3, VeRA) are refused
with the reason; any other key a reader does not understand is an error.

Errors: a missing path raises ``FileNotFoundError``; anything else wrong raises a
``ValueError`` that names the file and, where known, the module and shapes.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

import numpy as np

from gllora._lora import Lora
from gllora.io._safetensors import (
    Header,
    ReadBuffer,
    TensorReader,
    parse_metadata,
    read_file,
    read_header,
    view,
)
from gllora.io.formats import comfy as _comfy
from gllora.io.formats import common as _common
from gllora.io.formats import diffusers as _diffusers
from gllora.io.formats import kohya as _kohya
from gllora.io.formats import peft as _peft
from gllora.io.formats.common import NonLora
from gllora.spec import LoraSpec

__all__ = ["AdapterInfo", "ModuleInfo", "NonLora", "inspect", "load_adapter"]

_LEGACY_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_BUFFER = ReadBuffer()  # load_adapter reads every file into this one (per thread)

#: PEFT plans by (header bytes, file size, config bytes): adapters trained with one
#: config on one base model are byte-identical in both, so a folder of them is planned
#: once. Only successful plans are kept; entries are [plans, non_lora, modules or None].
_PLAN_CACHE: dict[tuple[bytes, int, bytes], list[Any]] = {}
_PLAN_CACHE_SIZE = 256


@dataclasses.dataclass(frozen=True, slots=True)
class ModuleInfo:
    """One module as its file describes it.

    Attributes:
      name: the module name (see the module docstring).
      kind: ``lora``, ``loha``, ``lokr``, ``adalora`` or ``dense``.
      layout: ``linear``, ``conv``, ``conv1d``, ``embedding`` or ``flat``.
      shape: ``(n, m)``, the shapes of ``u [n, r]`` and ``v [m, r]``.
      rank: ``r`` of the ``(u, v)`` form (``r1*r2`` for LoHa, ``k1*k2`` for LoKr,
        ``min(n, m)`` for a dense difference).
      scale: the scale folded into ``u`` (``alpha / r``, ``alpha / sqrt(r)``, ...).
      alpha: the alpha the scale came from, or None (none in the file or config).
      base_shape: the delta in the base weight's layout, e.g. ``(out, in, kh, kw)``,
        when the file tells; None for ``flat``.
      extras: ``{kind: shape}`` of per-module extra inputs (``{"magnitude": (out,)}``).
      keys: the tensor keys the module is read from.
      notes: what else a reader should know (a dense difference, a pruned rank, ...).
    """

    name: str
    kind: str
    layout: str
    shape: tuple[int, int]
    rank: int
    scale: float
    alpha: float | None
    base_shape: tuple[int, ...] | None
    extras: dict[str, tuple[int, ...]]
    keys: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def scale_rule(self) -> str:
        """How the scale came about, in words (``alpha / r = 8 / 4``, ...)."""
        if self.alpha is None:
            return f"{self.scale:g} (no alpha)"
        return f"{self.scale:g} (alpha {self.alpha:g}, rank {self.rank})"


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What :func:`inspect` learns from an adapter's header (and config), no factor data.

    Attributes:
      path: the path given.
      weights: the safetensors file read.
      format: ``peft``, ``peft_adalora``, ``peft_loha``, ``peft_lokr``, ``diffusers``,
        ``kohya``, ``kohya_locon`` (a conv kernel larger than 1x1), ``lycoris_loha``,
        ``lycoris_lokr``, ``lycoris_full``, ``lycoris`` (mixed), or ``comfyui``
        (``diffusion_model.`` / ``text_encoders.`` keys).
      modules: name -> :class:`ModuleInfo`, in natural order.
      metadata: the raw safetensors ``__metadata__`` (strings).
      parsed_metadata: the same with obvious numbers, booleans, ``None`` and JSON
        objects/lists parsed (kohya's ``ss_num_train_images``, ``ss_tag_frequency``).
      config: the PEFT ``adapter_config.json``; for diffusers the
        ``lora_adapter_metadata`` per component (``{"unet": {...}}``); else None.
      file_size: size of ``weights`` in bytes.
      non_lora: the tensors that are not part of a low-rank delta (full weight copies,
        vector differences), each with what it is; never loaded.
    """

    path: str
    weights: str
    format: str
    modules: dict[str, ModuleInfo]
    metadata: dict[str, str]
    parsed_metadata: dict[str, Any]
    config: dict[str, Any] | None
    file_size: int
    non_lora: tuple[NonLora, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.modules)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (n, m)}``, as ``Lora.shapes`` of the loaded adapter."""
        return {k: m.shape for k, m in self.modules.items()}

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    @property
    def scales(self) -> dict[str, float]:
        return {k: m.scale for k, m in self.modules.items()}

    @property
    def layouts(self) -> dict[str, str]:
        return {k: m.layout for k, m in self.modules.items()}


@dataclasses.dataclass
class _Planned:
    path: str
    header: Header
    format: str
    plans: list[_common.ModulePlan]
    non_lora: list[NonLora]
    config: dict[str, Any] | None
    cached: list[Any] | None = None  # the plan-cache entry, to keep inspect's modules in


def _plan_peft(path: str, header: Header, config_path: str) -> _Planned:
    with open(config_path, "rb") as f:
        raw_config = f.read()
    key = (header.raw, header.file_size, raw_config)
    cached = _PLAN_CACHE.get(key) if header.raw is not None else None
    config = _peft.parse_config(config_path, raw_config)
    if cached is None:
        plans, non_lora = _peft.plan(header, config, config_path)
        cached = [plans, non_lora, None]
        if header.raw is not None and _PLAN_CACHE_SIZE:
            if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
                _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
            _PLAN_CACHE[key] = cached
    return _Planned(path, header, _peft_format(config), cached[0], cached[1], config, cached)


def _legacy_magic(path: str) -> bool:
    """A torch zip archive or a raw pickle (protocol 2-5)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"
    )


def _read(path: str, whole: bool) -> tuple[Header, np.ndarray | None]:
    """The header (and, with ``whole``, every byte) of a safetensors file."""
    if path.lower().endswith(_LEGACY_SUFFIXES):
        raise _peft.legacy_error(path)
    try:
        return read_file(path, _BUFFER) if whole else (read_header(path), None)
    except ValueError:
        if _legacy_magic(path):
            raise _peft.legacy_error(path) from None
        raise


def _family(header: Header) -> str:
    """``peft``, ``kohya``, ``comfyui`` or ``diffusers``, from the keys; raises on none or a mix."""
    if not header.entries:
        raise ValueError(f"{header.path}: holds no tensors")
    seen: dict[str, str] = {}
    for key in header.entries:
        if _peft.is_peft_key(key):
            seen.setdefault("peft", key)
        elif _kohya.is_kohya_key(key):
            seen.setdefault("kohya", key)
        elif _comfy.is_comfy_key(key):
            seen.setdefault("comfyui", key)
        elif _diffusers.is_diffusers_key(key):
            seen.setdefault("diffusers", key)
        if len(seen) > 1:
            break
    if len(seen) == 1:
        return next(iter(seen))
    if not seen:
        keys = ", ".join(repr(k) for k in list(header.entries)[:3])
        raise ValueError(
            f"{header.path}: not a PEFT, diffusers, kohya, LyCORIS or ComfyUI LoRA file "
            f"(keys: {keys} ...)"
        )
    mix = ", ".join(f"{fam} ({key!r})" for fam, key in seen.items())
    raise ValueError(f"{header.path}: mixes the key styles of {mix}")


def _peft_format(config: dict[str, Any]) -> str:
    kind = str(config.get("peft_type", "LORA")).lower()
    return "peft" if kind == "lora" else f"peft_{kind}"


def _plan(path: str | os.PathLike, whole: bool = False) -> tuple[_Planned, np.ndarray | None]:
    path = os.fspath(path)
    if os.path.isdir(path):
        config_path, weights = _peft.resolve_folder(path)
        _peft.read_config(config_path)  # a bad config is reported before the weights
        header, data = _read(weights, whole)
        return _plan_peft(path, header, config_path), data
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such adapter file or folder", path)
    header, data = _read(path, whole)
    family = _family(header)
    if family == "peft":
        return _plan_peft(path, header, _peft.find_config(path)), data
    with TensorReader(header) as reader:
        if data is not None:

            def read_scalar(key: str) -> float:
                return reader.scalar_of(view(header, data, key), key)

        else:
            read_scalar = reader.read_scalar
        if family == "kohya":
            plans, non_lora = _kohya.plan(header, read_scalar)
            return _Planned(path, header, _kohya.format_name(plans), plans, non_lora, None), data
        if family == "comfyui":
            plans, non_lora = _comfy.plan(header, read_scalar)
            return _Planned(path, header, "comfyui", plans, non_lora, None), data
        plans, non_lora = _diffusers.plan(header, read_scalar)
        configs = _diffusers.component_configs(header) or None
        return _Planned(path, header, "diffusers", plans, non_lora, configs), data


def inspect(path: str | os.PathLike) -> AdapterInfo:
    """Describes an adapter from its header (and config); reads no factor data.

    Only kohya/LyCORIS ``alpha`` scalars (a few bytes each) are read besides the header.

    Args:
      path: a PEFT folder or a ``.safetensors`` adapter file.

    Returns:
      An :class:`AdapterInfo` whose names and shapes are those of ``load_adapter(path)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: naming the file (and module), for any malformed or unsupported input.
    """
    planned, _ = _plan(path)
    modules = planned.cached[2] if planned.cached else None
    if modules is None:
        modules = _module_infos(planned.plans)
        if planned.cached:
            planned.cached[2] = modules
    metadata = planned.header.metadata
    return AdapterInfo(
        path=planned.path,
        weights=planned.header.path,
        format=planned.format,
        modules=dict(modules),
        metadata=dict(metadata),
        parsed_metadata=parse_metadata(metadata),
        config=planned.config,
        file_size=planned.header.file_size,
        non_lora=tuple(planned.non_lora),
    )


def _module_infos(plans: list[_common.ModulePlan]) -> dict[str, ModuleInfo]:
    modules = {}
    for p in plans:
        modules[p.name] = ModuleInfo(
            p.name,
            p.kind,
            p.layout,
            (p.n, p.m),
            p.rank,
            p.scale,
            p.alpha,
            p.base_shape,
            {x.kind: (x.size,) for x in p.extras},
            (*p.tensors.values(), *(x.key for x in p.extras)),
            p.notes,
        )
    return modules


def load_adapter(path: str | os.PathLike) -> Lora:
    """Loads an adapter as a :class:`gllora.Lora` of numpy arrays (float32; order as ``inspect``).

    The file is read once; factors are written straight into the stacked per-group
    arrays (plain LoRA modules in float32, the products of LoHa/LoKr/Tucker modules in
    float64 and then rounded once).

    Args:
      path: a PEFT folder or a ``.safetensors`` adapter file.

    Returns:
      A ``Lora`` with ``u [n, r]``, ``v [m, r]`` per module (``u @ v.T`` the delta in
      the base weight's layout, scale folded into ``u``), numpy arrays, and the extras
      ``magnitude`` / ``magnitude_in`` / ``bias`` ``[size]`` where the file has them.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: naming the file and module, for malformed input or NaN/Inf factors.
    """
    planned, data = _plan(path, whole=True)
    header, plans = planned.header, planned.plans
    layout = planned.cached[3] if planned.cached and len(planned.cached) > 3 else None
    if layout is None:
        layout = _layout(plans)
        if planned.cached:
            planned.cached.append(layout)
    spec, groups, by_name = layout
    # One float32 view of the whole file: an aligned F32 tensor is then a slice of it.
    flat = data[: data.size // 4 * 4].view(np.float32)
    us, vs, ranks = [], [], []
    for group, members in zip(spec.groups, groups):
        r = max(p.rank for p in members)
        mixed = any(p.rank != r for p in members)
        alloc = np.zeros if mixed else np.empty  # zero columns past a smaller rank
        u = alloc((len(members), group.n, r), np.float32)
        v = alloc((len(members), group.m, r), np.float32)
        for i, p in enumerate(members):
            if p.rank == r:
                _fill(header, data, flat, p, u[i], v[i])
            else:
                _fill(header, data, flat, p, u[i, :, : p.rank], v[i, :, : p.rank])
        # One BLAS reduction per array finds any NaN/Inf: the sum of squares is not finite
        # if an entry is not (or if it overflows: then the exact per-module check decides).
        fu, fv = u.reshape(-1), v.reshape(-1)
        if not (np.isfinite(np.dot(fu, fu)) and np.isfinite(np.dot(fv, fv))):
            for i, p in enumerate(members):
                _check_module(header, data, p, u[i], v[i])
        us.append(u)
        vs.append(v)
        ranks.append(np.asarray([p.rank for p in members], np.int32))
    extras = {}
    for kind, names in spec.extras:
        extras[kind] = {}
        for name in names:
            (x,) = [x for x in by_name[name].extras if x.kind == kind]
            extras[kind][name] = _extra(header, data, by_name[name], x)
    return Lora(spec, us, vs, ranks, extras)


def _f32(header: Header, data, flat, key: str) -> np.ndarray:
    """Tensor ``key`` as a flat array: a slice of ``flat`` for an aligned F32 tensor."""
    entry = header.entries[key]
    if entry.dtype == "F32" and entry.start % 4 == 0:
        return flat[entry.start // 4 : entry.end // 4]
    return view(header, data, key).reshape(-1)


def _layout(plans: list[_common.ModulePlan]):
    """``(spec, [plans of each group], {name: plan})`` of a loaded adapter."""
    extras_of: dict[str, list[str]] = {}
    for p in plans:
        for x in p.extras:
            extras_of.setdefault(x.kind, []).append(p.name)
    spec = LoraSpec.from_shapes([(p.name, p.n, p.m) for p in plans], extras_of)
    by_name = {p.name: p for p in plans}
    return spec, [[by_name[name] for name in g.names] for g in spec.groups], by_name


def _fill(header: Header, data, flat, p: _common.ModulePlan, u_out, v_out) -> None:
    """Writes the module's ``u [n, r]``, ``v [m, r]`` into ``u_out``, ``v_out`` (float32)."""
    if p.build is _common.build_lora:  # the common case, without float64 temporaries
        a = _f32(header, data, flat, p.tensors["A"]).reshape(p.rank, -1)
        b = _f32(header, data, flat, p.tensors["B"]).reshape(-1, p.rank)
        src_u, src_v = (a.T, b) if p.layout in ("conv1d", "embedding") else (b, a.T)
        if p.scale == 1.0:
            u_out[...] = src_u
        else:
            np.multiply(src_u, p.scale, out=u_out, dtype=np.float32)
        if src_v is b or p.rank > 16:
            v_out[...] = src_v
        else:  # a transposed copy is faster one contiguous row of A at a time
            for j in range(p.rank):
                v_out[:, j] = a[j]
        return

    def fetch(role: str) -> np.ndarray:
        return _checked(header, view(header, data, p.tensors[role]), p.tensors[role], p.name)

    u, v = p.build(p, fetch)
    if u.shape != (p.n, p.rank) or v.shape != (p.m, p.rank):
        raise _common.fail(
            header.path,
            f"built u {list(u.shape)}, v {list(v.shape)}; expected [{p.n}, {p.rank}], "
            f"[{p.m}, {p.rank}] from the header",
            p.name,
        )
    with np.errstate(over="ignore"):  # an overflow is reported by the finite check
        u_out[...] = u
        v_out[...] = v


def _checked(header: Header, x: np.ndarray, key: str, module: str) -> np.ndarray:
    """``x`` as float64, or a ``ValueError`` naming the key if it holds NaN/Inf."""
    finite = np.isfinite(x)
    if not finite.all():
        raise _common.fail(
            header.path,
            f"tensor {key!r} {list(x.shape)} has {x.size - int(finite.sum())} NaN/Inf values",
            module,
        )
    return x.astype(np.float64)


def _check_module(header: Header, data, p: _common.ModulePlan, u, v) -> None:
    """Names the tensor at fault for a module whose factors are not finite."""
    for key in p.tensors.values():
        _checked(header, view(header, data, key), key, p.name)
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise _common.fail(header.path, f"the factors overflow float32 (scale {p.scale})", p.name)


def _extra(header: Header, data, p: _common.ModulePlan, x: _common.ExtraPlan) -> np.ndarray:
    raw = _checked(header, view(header, data, x.key), x.key, p.name).reshape(-1)
    with np.errstate(over="ignore"):
        out = (raw * x.scale if x.scale != 1.0 else raw).astype(np.float32)
    if not np.isfinite(out).all():
        raise _common.fail(header.path, f"extra {x.kind!r} overflows float32", p.name)
    return out
