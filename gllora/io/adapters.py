"""Reading LoRA adapter files: PEFT, diffusers, kohya / sd-scripts, LyCORIS LoHa/LoKr.

::

    from gllora import io
    info = io.inspect("adapters/my_lora")        # header only: no factor data is read
    info.format, info.shapes, info.ranks, info.scales, info.metadata
    lora = io.load_adapter("adapters/my_lora")   # a gllora.Lora, float32

``path`` is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) or
one ``.safetensors`` file (diffusers, kohya, LyCORIS, or a PEFT weights file with its
``adapter_config.json`` beside it). The format is told from the tensor keys.

Every module becomes ``(u [n, r], v [m, r])`` with ``u @ v.T`` the weight delta in
the layout of the base weight (``ModuleInfo.layout``): ``[out, in]`` for linear layers,
``[out, in*kh*kw]`` for conv kernels (flattened), ``[in, out]`` for GPT-2 ``Conv1D``
(``conv1d``), ``[num_embeddings, dim]`` for embeddings; ``flat`` when the file does not
say whether ``[out, M]`` is linear or a flattened kernel (LoHa, decomposed LoKr). The
LoRA scale is folded into ``u``. DoRA magnitude vectors travel as
``lora.extras["magnitude"][name]``. Modules are in natural order of their names
(``layers.2`` before ``layers.10``), so files of one kind give one structure.

Names: PEFT, the module path in the base model; diffusers, ``<component>.<path>``
(``unet.``, ``text_encoder.``, ``text_encoder_2.``, without transformers-4's
``text_model.`` level); kohya and LyCORIS, the kohya name (``lora_unet_...``).

LoHa and LoKr modules are converted exactly (see :mod:`gllora.io._lycoris`): a LoHa of
ranks ``r1, r2`` becomes a rank-``r1*r2`` product, a LoKr a rank-``k1*k2`` product, with
Kronecker-structured factors. Their parameters are defined only up to the subgroup
``GL(r1) (x) GL(r2)`` of ``GL(r1*r2)``, not all of it: models invariant to GL(r) see the
exact delta and remain valid; non-invariant models see one canonical factorization.

Errors: a missing path raises ``FileNotFoundError``; anything else wrong raises a
``ValueError`` that names the file and, where known, the module and shapes. No tensor
key is ever dropped silently: a key a reader does not understand is an error.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
from typing import Any

import numpy as np

from gllora._lora import Lora
from gllora.io._safetensors import Header, TensorReader, parse_metadata, read_header
from gllora.io.formats import (
    common as _common,
)
from gllora.io.formats import (
    diffusers as _diffusers,
)
from gllora.io.formats import (
    kohya as _kohya,
)
from gllora.io.formats import (
    peft as _peft,
)

__all__ = ["AdapterInfo", "ModuleInfo", "inspect", "load_adapter"]

_LEGACY_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """One module as its file describes it.

    Attributes:
      name: the module name (see the module docstring).
      kind: ``lora``, ``loha`` or ``lokr``.
      layout: ``linear``, ``conv``, ``conv1d``, ``embedding`` or ``flat``.
      shape: ``(n, m)``, the shapes of ``u [n, r]`` and ``v [m, r]``.
      rank: ``r`` of the ``(u, v)`` form (``r1*r2`` for LoHa, ``k1*k2`` for LoKr).
      scale: the scale folded into ``u`` (``alpha / r``, ``alpha / sqrt(r)``, ...).
      alpha: the alpha the scale came from, or None (none in the file or config).
      base_shape: the delta in the base weight's layout, e.g. ``(out, in, kh, kw)``,
        when the file tells; None for ``flat``.
      extras: ``{kind: shape}`` of per-module extra inputs (``{"magnitude": (out,)}``).
      keys: the tensor keys the module is read from.
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


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What :func:`inspect` learns from an adapter's header (and config), no factor data.

    Attributes:
      path: the path given.
      weights: the safetensors file read.
      format: ``peft``, ``diffusers``, ``kohya``, ``kohya_locon`` (a conv kernel larger
        than 1x1), ``lycoris_loha``, ``lycoris_lokr``, or ``lycoris`` (mixed).
      modules: name -> :class:`ModuleInfo`, in natural order.
      metadata: the raw safetensors ``__metadata__`` (strings).
      parsed_metadata: the same with obvious numbers, booleans, ``None`` and JSON
        objects/lists parsed (kohya's ``ss_num_train_images``, ``ss_tag_frequency``).
      config: the PEFT ``adapter_config.json``; for diffusers the
        ``lora_adapter_metadata`` per component (``{"unet": {...}}``); else None.
      file_size: size of ``weights`` in bytes.
    """

    path: str
    weights: str
    format: str
    modules: dict[str, ModuleInfo]
    metadata: dict[str, str]
    parsed_metadata: dict[str, Any]
    config: dict[str, Any] | None
    file_size: int

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
    config: dict[str, Any] | None


def _legacy_magic(path: str) -> bool:
    """A torch zip archive or a raw pickle (protocol 2-5)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"
    )


def _read_header(path: str) -> Header:
    if path.lower().endswith(_LEGACY_SUFFIXES):
        raise _peft.legacy_error(path)
    try:
        return read_header(path)
    except ValueError:
        if _legacy_magic(path):
            raise _peft.legacy_error(path) from None
        raise


def _family(header: Header) -> str:
    """``peft``, ``kohya`` or ``diffusers``, from the keys; raises on none or a mix."""
    if not header.entries:
        raise ValueError(f"{header.path}: holds no tensors")
    seen: dict[str, str] = {}
    for key in header.entries:
        if _peft.is_peft_key(key):
            seen.setdefault("peft", key)
        elif _kohya.is_kohya_key(key):
            seen.setdefault("kohya", key)
        elif _diffusers.is_diffusers_key(key):
            seen.setdefault("diffusers", key)
    if len(seen) == 1:
        return next(iter(seen))
    if not seen:
        keys = ", ".join(repr(k) for k in list(header.entries)[:3])
        raise ValueError(
            f"{header.path}: not a PEFT, diffusers, kohya or LyCORIS LoRA file (keys: {keys} ...)"
        )
    mix = ", ".join(f"{fam} ({key!r})" for fam, key in seen.items())
    raise ValueError(f"{header.path}: mixes the key styles of {mix}")


def _plan(path: str | os.PathLike) -> _Planned:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such adapter file or folder", path)
    if os.path.isdir(path):
        config_path, weights = _peft.resolve_folder(path)
        config = _peft.read_config(config_path)
        header = _read_header(weights)
        return _Planned(path, header, "peft", _peft.plan(header, config, config_path), config)
    header = _read_header(path)
    family = _family(header)
    if family == "peft":
        config_path = _peft.find_config(path)
        config = _peft.read_config(config_path)
        return _Planned(path, header, "peft", _peft.plan(header, config, config_path), config)
    with TensorReader(header) as reader:
        if family == "kohya":
            plans = _kohya.plan(header, reader.read_scalar)
            return _Planned(path, header, _kohya.format_name(plans), plans, None)
        plans = _diffusers.plan(header, reader.read_scalar)
        return _Planned(
            path, header, "diffusers", plans, _diffusers.component_configs(header) or None
        )


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
    planned = _plan(path)
    modules = {}
    for p in planned.plans:
        extras = {"magnitude": (p.magnitude_size,)} if p.magnitude else {}
        keys = tuple(p.tensors.values()) + ((p.magnitude,) if p.magnitude else ())
        modules[p.name] = ModuleInfo(
            name=p.name,
            kind=p.kind,
            layout=p.layout,
            shape=(p.n, p.m),
            rank=p.rank,
            scale=p.scale,
            alpha=p.alpha,
            base_shape=p.base_shape,
            extras=extras,
            keys=keys,
        )
    metadata = dict(planned.header.metadata)
    return AdapterInfo(
        path=planned.path,
        weights=planned.header.path,
        format=planned.format,
        modules=modules,
        metadata=metadata,
        parsed_metadata=parse_metadata(metadata),
        config=planned.config,
        file_size=planned.header.file_size,
    )


def _fetch(reader: TensorReader, plan: _common.ModulePlan, role: str) -> np.ndarray:
    return _read_checked(reader, plan.tensors[role], plan.name)


def _read_checked(reader: TensorReader, key: str, module: str) -> np.ndarray:
    x = reader.read(key)
    finite = np.isfinite(x)
    if not finite.all():
        raise _common.fail(
            reader.header.path,
            f"tensor {key!r} {list(x.shape)} has {x.size - int(finite.sum())} NaN/Inf values",
            module,
        )
    return x.astype(np.float64)


def load_adapter(path: str | os.PathLike) -> Lora:
    """Loads an adapter as a :class:`gllora.Lora` (float32; module order as ``inspect``).

    Args:
      path: a PEFT folder or a ``.safetensors`` adapter file.

    Returns:
      A ``Lora`` with ``u [n, r]``, ``v [m, r]`` per module (``u @ v.T`` the delta in
      the base weight's layout, scale folded into ``u``) and, for DoRA adapters,
      ``extras["magnitude"][name]`` ``[out]``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: naming the file and module, for malformed input or NaN/Inf factors.
    """
    planned = _plan(path)
    factors, magnitudes = {}, {}
    with TensorReader(planned.header) as reader:
        for p in planned.plans:
            fetch = functools.partial(_fetch, reader, p)
            u, v = p.build(p, fetch)
            if u.shape != (p.n, p.rank) or v.shape != (p.m, p.rank):
                raise _common.fail(
                    reader.header.path,
                    f"built u {list(u.shape)}, v {list(v.shape)}; expected [{p.n}, {p.rank}], "
                    f"[{p.m}, {p.rank}] from the header",
                    p.name,
                )
            with np.errstate(over="ignore"):
                u, v = u.astype(np.float32), v.astype(np.float32)
            if not (np.isfinite(u).all() and np.isfinite(v).all()):
                raise _common.fail(
                    reader.header.path, f"the factors overflow float32 (scale {p.scale})", p.name
                )
            factors[p.name] = (u, v)
            if p.magnitude:
                mag = _read_checked(reader, p.magnitude, p.name).reshape(-1)
                magnitudes[p.name] = mag.astype(np.float32)
    extras = {"magnitude": magnitudes} if magnitudes else None
    return Lora.from_factors(factors, extras=extras, dtype=np.float32)
