"""The :class:`Lora` container, importable without JAX (numpy or JAX arrays inside).

This is the class :mod:`gllora.lora` documents and registers as a JAX pytree; it lives
here so that the adapter readers and dataset folders (:mod:`gllora.io`) build and
return LoRAs of numpy arrays without importing JAX. A ``Lora`` holds whatever arrays
it was given: readers give numpy arrays, which reach a device only when a model runs
(``jax.jit`` and ``jax.device_put`` take numpy leaves as they are); JAX code gives JAX
arrays (or tracers), and the methods then compute with ``jax.numpy``. Each method
uses the array namespace of the arrays it holds (``x.__array_namespace__()``), so a
numpy LoRA never touches JAX.

The pytree registration needs JAX, so it is done by importing :mod:`gllora.lora`,
which every gllora module that computes with JAX does; ``gllora.Lora`` also resolves
through it. If JAX is already imported when this module is, it imports
:mod:`gllora.lora` itself. Use :mod:`gllora.lora` (or ``gllora.Lora``) in JAX code.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gllora.spec import GroupSpec, LoraSpec


def _xp(x: Any) -> Any:
    """The array namespace of ``x``: numpy for numpy arrays, ``jax.numpy`` for JAX's."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    return x.__array_namespace__()


def _is_tracer(x: Any) -> bool:
    jax = sys.modules.get("jax")  # a tracer exists only if JAX was imported
    return jax is not None and isinstance(x, jax.core.Tracer)


def _is_float(dtype: Any) -> bool:
    """Floating point, including ``ml_dtypes`` (bfloat16, float8) that numpy calls 'V'."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"module names must be non-empty strings, got {name!r}")
    return name


def _check_finite(name: str, what: str, x: Any) -> None:
    if _is_tracer(x):
        return  # values are unknown while tracing
    arr = np.asarray(x)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise ValueError(f"module {name!r}: {what} {list(arr.shape)} has {bad} NaN/Inf entries")


def pad_last(x: Any, r: int) -> Any:
    """Zero-pads the last axis of ``x`` to ``r`` (no-op if already ``r``)."""
    extra = r - x.shape[-1]
    if extra == 0:
        return x
    return _xp(x).pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class Lora:
    """An ordered set of named LoRA modules, stacked by shape (see :mod:`gllora.lora`).

    Build one with :meth:`from_factors`; the constructor is the raw pytree constructor.

    Attributes:
      spec: static structure (names, groups, extras).
      u: per group ``[*batch, k, n, r]``.
      v: per group ``[*batch, k, m, r]``.
      rank: per group ``[*batch, k]`` int32, the true rank of each module.
      extras: ``{kind: {module: [*batch, size]}}`` invariant per-module inputs that are
        not part of ``u v^T`` (DoRA's magnitude vector, for instance).
    """

    def __init__(
        self,
        spec: LoraSpec,
        u: Sequence[Any],
        v: Sequence[Any],
        rank: Sequence[Any],
        extras: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.spec = spec
        self.u = tuple(u)
        self.v = tuple(v)
        self.rank = tuple(rank)
        self.extras = {kind: dict(per) for kind, per in (extras or {}).items()}

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_factors(
        cls,
        factors: Mapping[str, tuple[Any, Any]],
        extras: Mapping[str, Mapping[str, Any]] | None = None,
        dtype: Any = None,
    ) -> Lora:
        """Builds a LoRA from ``{name: (u [*batch, n, r], v [*batch, m, r])}``.

        Modules keep the given order; modules of the same ``(n, m)`` are stacked in order
        of appearance, and zero-padded to the group's largest rank if their ranks differ.

        Numpy inputs give numpy arrays (nothing is put on a device); if any factor is a
        JAX array or tracer, every array of the result is a JAX array.

        Args:
          factors: module name -> ``(u, v)``; ``delta = u @ v.T``.
          extras: optional ``{kind: {module: [*batch, size]}}`` invariant extra inputs.
          dtype: cast factors to this dtype (default: the common float dtype of the
            factors; JAX then applies its own default, float32 unless x64 is enabled).

        Raises:
          ValueError: naming the module and shapes, for mismatched ranks or batch axes,
            wrong number of axes, empty dimensions, non-float or NaN/Inf factors.
        """
        if not factors:
            raise ValueError("a LoRA needs at least one module; got an empty mapping")
        checked = {}
        batch_shape = None
        host = True
        for name, pair in factors.items():
            _check_name(name)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(
                    f"module {name!r}: expected a pair (u, v), got {type(pair).__name__}"
                )
            u, v = (x if hasattr(x, "__array_namespace__") else np.asarray(x) for x in pair)
            host = host and isinstance(u, np.ndarray) and isinstance(v, np.ndarray)
            if u.ndim < 2 or v.ndim < 2 or u.ndim != v.ndim:
                raise ValueError(
                    f"module {name!r}: u {list(u.shape)} and v {list(v.shape)} must be "
                    "[*batch, n, r] and [*batch, m, r] with the same number of axes (>= 2)"
                )
            if u.shape[-1] != v.shape[-1]:
                raise ValueError(
                    f"module {name!r}: u {list(u.shape)} and v {list(v.shape)} have "
                    f"different ranks ({u.shape[-1]} != {v.shape[-1]})"
                )
            if u.shape[:-2] != v.shape[:-2]:
                raise ValueError(
                    f"module {name!r}: u {list(u.shape)} and v {list(v.shape)} have "
                    "different batch axes"
                )
            if 0 in u.shape or 0 in v.shape:
                raise ValueError(
                    f"module {name!r}: empty dimension in u {list(u.shape)} or v {list(v.shape)}"
                )
            if batch_shape is None:
                batch_shape = tuple(u.shape[:-2])
            elif tuple(u.shape[:-2]) != batch_shape:
                raise ValueError(
                    f"module {name!r}: batch axes {list(u.shape[:-2])} differ from "
                    f"{list(batch_shape)} of the first module"
                )
            for what, x in (("u", u), ("v", v)):
                if not _is_float(x.dtype):
                    raise ValueError(
                        f"module {name!r}: {what} {list(x.shape)} has dtype {x.dtype}, "
                        "expected floating point"
                    )
                _check_finite(name, what, x)
            checked[name] = (u, v)

        if host:
            xp = np
            target = np.dtype(dtype) if dtype is not None else None
        else:
            import jax.numpy as xp  # a JAX array was given, so JAX is loaded already

            target = dtype
        if target is None:
            target = xp.result_type(*[x.dtype for pair in checked.values() for x in pair])
        spec = LoraSpec.from_shapes(
            ((name, u.shape[-2], v.shape[-2]) for name, (u, v) in checked.items()),
            {kind: list(per) for kind, per in (extras or {}).items()},
        )
        us, vs, ranks = [], [], []
        for group in spec.groups:
            r_max = max(checked[name][0].shape[-1] for name in group.names)
            for out, j in ((us, 0), (vs, 1)):
                parts = [pad_last(checked[name][j], r_max) for name in group.names]
                out.append(xp.asarray(xp.stack(parts, axis=-3), target))
            r = xp.asarray([checked[name][0].shape[-1] for name in group.names], xp.int32)
            ranks.append(xp.broadcast_to(r, (*batch_shape, len(group.names))))
        extras_checked = _check_extras(xp, extras, checked, batch_shape, target)
        return cls(spec, us, vs, ranks, extras_checked)

    # -- views ----------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Module names, in the order given at construction."""
        return self.spec.order

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch axes (``()`` for one LoRA; layout ``"leading"`` assumed)."""
        return tuple(self.u[0].shape[:-3])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (n, m)}``."""
        return self.spec.shapes()

    @property
    def num_modules(self) -> int:
        return len(self.spec.order)

    def _locate(self, name: str) -> tuple[int, int]:
        for gi, group in enumerate(self.spec.groups):
            if name in group.names:
                return gi, group.names.index(name)
        raise KeyError(
            f"no module named {name!r}; modules: {', '.join(self.names[:5])}"
            f"{' ...' if self.num_modules > 5 else ''}"
        )

    def factors(self, name: str) -> tuple[Any, Any]:
        """``(u [*batch, n, r], v [*batch, m, r])`` of one module.

        ``r`` is the stored rank of the module's group: a module padded to a larger rank
        returns its zero-padded factors (``u @ v.T`` is unchanged; ``rank_of`` gives the
        true rank).
        """
        gi, i = self._locate(name)
        return self.u[gi][..., i, :, :], self.v[gi][..., i, :, :]

    def delta(self, name: str) -> Any:
        """``u @ v.T``, ``[*batch, n, m]``."""
        u, v = self.factors(name)
        return _xp(u).einsum("...nr,...mr->...nm", u, v)

    def rank_of(self, name: str) -> Any:
        """True rank of a module, ``[*batch]`` int32."""
        gi, i = self._locate(name)
        return self.rank[gi][..., i]

    def replace(self, **changes: Any) -> Lora:
        """A copy with some of ``u``, ``v``, ``rank``, ``extras`` replaced (no checks)."""
        fields = {"u": self.u, "v": self.v, "rank": self.rank, "extras": self.extras}
        fields.update(changes)
        return type(self)(self.spec, **fields)

    def astype(self, dtype: Any) -> Lora:
        return self.replace(
            u=tuple(x.astype(dtype) for x in self.u),
            v=tuple(x.astype(dtype) for x in self.v),
            extras={
                kind: {name: x.astype(dtype) for name, x in per.items()}
                for kind, per in self.extras.items()
            },
        )

    def pad_rank(self, rank: int | Sequence[int]) -> Lora:
        """Zero-pads every group's factors to ``rank`` columns (exact: ``u v^T`` is unchanged).

        Args:
          rank: one rank for every group, or one per group; each >= the stored rank.
        """
        ranks = [rank] * len(self.u) if isinstance(rank, int) else list(rank)
        if len(ranks) != len(self.u):
            raise ValueError(f"pad_rank: got {len(ranks)} ranks for {len(self.u)} module groups")
        for group, u, r in zip(self.spec.groups, self.u, ranks):
            if r < u.shape[-1]:
                raise ValueError(
                    f"pad_rank: cannot pad group {group.describe()} of rank "
                    f"{u.shape[-1]} down to {r}; padding only adds zero columns"
                )
        return self.replace(
            u=tuple(pad_last(x, r) for x, r in zip(self.u, ranks)),
            v=tuple(pad_last(x, r) for x, r in zip(self.v, ranks)),
        )

    def select(self, names: Sequence[str], extras: Mapping[str, Sequence[str]] | None = None):
        """The LoRA restricted to the modules ``names`` (in that order), unbatched only.

        Each group keeps its stored rank cut to the largest true rank among the kept
        modules (the columns cut are zero). ``extras``: ``{kind: names}`` to keep
        (default: every extra of a kept module). Numpy stays numpy.

        Raises:
          KeyError: a name that is not a module of this LoRA.
          ValueError: for a batched LoRA, or an extra this LoRA does not have.
        """
        if self.batch_shape:
            raise ValueError(f"select takes one LoRA, got batch {list(self.batch_shape)}")
        factors = {}
        for name in names:
            gi, i = self._locate(name)
            r = int(self.rank[gi][i])
            factors[name] = (self.u[gi][i, :, :r], self.v[gi][i, :, :r])
        keep = (
            {kind: [n for n in per if n in factors] for kind, per in self.extras.items()}
            if extras is None
            else extras
        )
        chosen: dict[str, dict[str, Any]] = {}
        for kind, per in keep.items():
            for name in per:
                if name not in self.extras.get(kind, {}):
                    raise ValueError(f"module {name!r} has no extra {kind!r}")
                chosen.setdefault(kind, {})[name] = self.extras[kind][name]
        return type(self).from_factors(factors, {k: v for k, v in chosen.items() if v})

    def __repr__(self) -> str:
        groups = "; ".join(
            f"{len(g.names)} x [{g.n}, {g.m}] r={u.shape[-1]}"
            for g, u in zip(self.spec.groups, self.u)
        )
        batch = f" batch={list(self.u[0].shape[:-3])}" if self.u[0].ndim > 3 else ""
        extras = f" extras={[kind for kind, _ in self.spec.extras]}" if self.spec.extras else ""
        return f"Lora({self.num_modules} modules: {groups}{batch}{extras})"


def _check_extras(xp, extras, checked, batch_shape, dtype) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind, per_module in (extras or {}).items():
        _check_name(kind)
        out[kind] = {}
        for name in checked:  # module order, so the pytree order is deterministic
            if name not in per_module:
                continue
            x = xp.asarray(per_module[name], dtype)
            if x.ndim != len(batch_shape) + 1 or tuple(x.shape[:-1]) != batch_shape:
                raise ValueError(
                    f"module {name!r}: extra {kind!r} {list(x.shape)} must be "
                    f"[*batch, size] with batch {list(batch_shape)}"
                )
            _check_finite(name, f"extra {kind!r}", x)
            out[kind][name] = x
        unknown = set(per_module) - set(checked)
        if unknown:
            raise ValueError(f"extra {kind!r} given for unknown modules {sorted(unknown)}")
    return out


__all__ = ["GroupSpec", "Lora", "LoraSpec", "pad_last"]

if "jax" in sys.modules:  # JAX is loaded already: register the pytree now (cheap)
    import gllora.lora  # noqa: F401
