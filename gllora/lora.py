"""The LoRA weight space: a pytree of per-module low-rank factors.

One adapted weight matrix ("module") is a pair ``u [n, r]``, ``v [m, r]`` with
``delta = u @ v.T`` of shape ``[n, m]`` (``n`` output features, ``m`` input
features; a conv kernel is flattened to ``m = in * kh * kw``). A :class:`Lora`
holds an ordered set of named modules, possibly of different shapes and ranks,
with optional leading batch axes.

Modules of the same ``(n, m)`` are stored stacked, as one *group*:
``u [*batch, k, n, r]``, ``v [*batch, k, m, r]``, so models process each group
with one batched contraction and run time and compile time scale with the number
of distinct shapes, not the number of modules. Modules of one group with
different ranks are zero-padded to the group's largest rank; zero columns leave
``u @ v.T`` unchanged, so padding is exact. The true rank of every module is kept
in ``rank [*batch, k]`` (an array, so LoRAs of different ranks can be padded to a
common rank and batched).

A ``Lora`` is a JAX pytree whose structure is the module names; stacking LoRAs
with ``jax.tree_util.tree_map(lambda *a: jnp.stack(a), *loras)`` makes a batch.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Names of the two batch layouts understood by :func:`stack` and :func:`in_axes`.
#: ``"leading"``: ``u [B, k, n, r]`` (the natural one). ``"rank_major"``:
#: ``u [k, n, B, r]``, the batch axis beside the rank axis, so that ``Phi @ u`` over a
#: batch is one plain matrix product over ``B * r`` columns (several times faster on CPU).
LAYOUTS = ("leading", "rank_major")


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Static description of one group of same-shaped modules."""

    names: tuple[str, ...]
    n: int
    m: int

    @property
    def key(self) -> str:
        """A stable identifier: the shape and a digest of the module names in order."""
        digest = zlib.crc32("\n".join(self.names).encode()) & 0xFFFFFFFF
        return f"g{self.n}x{self.m}_{digest:08x}"

    def describe(self, max_names: int = 3) -> str:
        shown = ", ".join(self.names[:max_names])
        more = f", ... ({len(self.names)} modules)" if len(self.names) > max_names else ""
        return f"[{self.n}, {self.m}]: {shown}{more}"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static structure of a LoRA: module order, groups and extras (no ranks, no arrays)."""

    order: tuple[str, ...]
    groups: tuple[GroupSpec, ...]
    extras: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (g.n, g.m) for g in self.groups for name in g.names}

    def diff(self, other: "LoraSpec") -> list[str]:
        """Human-readable differences between two specs (empty if they match)."""
        lines = []
        mine, theirs = self.shapes(), other.shapes()
        for name in mine.keys() - theirs.keys():
            lines.append(f"module {name!r} {list(mine[name])} is missing from the other LoRA")
        for name in theirs.keys() - mine.keys():
            lines.append(f"module {name!r} {list(theirs[name])} is not expected")
        for name in sorted(mine.keys() & theirs.keys()):
            if mine[name] != theirs[name]:
                lines.append(
                    f"module {name!r}: expected shape {list(mine[name])}, got {list(theirs[name])}"
                )
        if not lines and self.groups != other.groups:
            lines.append("the same modules in a different order")
        if not lines and self.extras != other.extras:
            lines.append(f"extra inputs differ: expected {self.extras}, got {other.extras}")
        return sorted(lines)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"module names must be non-empty strings, got {name!r}")
    return name


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(name: str, what: str, x: Any) -> None:
    if _is_concrete(x):
        arr = np.asarray(x)
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"module {name!r}: {what} {list(arr.shape)} has {bad} NaN/Inf entries")


@jax.tree_util.register_pytree_with_keys_class
class Lora:
    """An ordered set of named LoRA modules, stacked by shape. See the module docstring.

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

    # -- pytree protocol ------------------------------------------------------
    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        children = (
            (keys("u"), self.u),
            (keys("v"), self.v),
            (keys("rank"), self.rank),
            (keys("extras"), self.extras),
        )
        return children, self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        u, v, rank, extras = children
        return cls(spec, u, v, rank, extras)

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_factors(
        cls,
        factors: Mapping[str, tuple[Any, Any]],
        extras: Mapping[str, Mapping[str, Any]] | None = None,
        dtype: Any = None,
    ) -> "Lora":
        """Builds a LoRA from ``{name: (u [*batch, n, r], v [*batch, m, r])}``.

        Modules keep the given order; modules of the same ``(n, m)`` are stacked in order
        of appearance, and zero-padded to the group's largest rank if their ranks differ.

        Args:
          factors: module name -> ``(u, v)``; ``delta = u @ v.T``.
          extras: optional ``{kind: {module: [*batch, size]}}`` invariant extra inputs.
          dtype: cast factors to this dtype (default: keep a float dtype, else float32).

        Raises:
          ValueError: naming the module and shapes, for mismatched ranks or batch axes,
            wrong number of axes, empty dimensions, non-float or NaN/Inf factors.
        """
        if not factors:
            raise ValueError("a LoRA needs at least one module; got an empty mapping")
        checked = {}
        batch_shape = None
        for name, pair in factors.items():
            _check_name(name)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(
                    f"module {name!r}: expected a pair (u, v), got {type(pair).__name__}"
                )
            u, v = (x if isinstance(x, jax.Array) else np.asarray(x) for x in pair)
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
                batch_shape = u.shape[:-2]
            elif u.shape[:-2] != batch_shape:
                raise ValueError(
                    f"module {name!r}: batch axes {list(u.shape[:-2])} differ from "
                    f"{list(batch_shape)} of the first module"
                )
            for what, x in (("u", u), ("v", v)):
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise ValueError(
                        f"module {name!r}: {what} {list(x.shape)} has dtype {x.dtype}, "
                        "expected floating point"
                    )
                _check_finite(name, what, x)
            checked[name] = (u, v)

        target = (
            jnp.dtype(dtype)
            if dtype is not None
            else jnp.result_type(*[x.dtype for pair in checked.values() for x in pair])
        )
        grouped: dict[tuple[int, int], list[str]] = {}
        for name, (u, v) in checked.items():
            grouped.setdefault((u.shape[-2], v.shape[-2]), []).append(name)

        groups, us, vs, ranks = [], [], [], []
        for (n, m), names in grouped.items():
            r_max = max(checked[name][0].shape[-1] for name in names)
            # Stack numpy inputs in numpy: one transfer per group instead of per module.
            xp = np if all(isinstance(x, np.ndarray) for n_ in names for x in checked[n_]) else jnp
            for out, j in ((us, 0), (vs, 1)):
                stacked = xp.stack([_pad_last(checked[name][j], r_max) for name in names], axis=-3)
                out.append(jnp.asarray(stacked, target))
            r = jnp.asarray([checked[name][0].shape[-1] for name in names], jnp.int32)
            ranks.append(jnp.broadcast_to(r, (*batch_shape, len(names))))
            groups.append(GroupSpec(tuple(names), n, m))

        extras_checked = _check_extras(extras, checked, batch_shape, target)
        spec = LoraSpec(
            order=tuple(checked),
            groups=tuple(groups),
            extras=tuple((kind, tuple(per)) for kind, per in extras_checked.items()),
        )
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

    def factors(self, name: str) -> tuple[Array, Array]:
        """``(u [*batch, n, r], v [*batch, m, r])`` of one module.

        ``r`` is the stored rank of the module's group: a module padded to a larger rank
        returns its zero-padded factors (``u @ v.T`` is unchanged; ``rank_of`` gives the
        true rank).
        """
        gi, i = self._locate(name)
        return self.u[gi][..., i, :, :], self.v[gi][..., i, :, :]

    def delta(self, name: str) -> Array:
        """``u @ v.T``, ``[*batch, n, m]``."""
        u, v = self.factors(name)
        return jnp.einsum("...nr,...mr->...nm", u, v)

    def rank_of(self, name: str) -> Array:
        """True rank of a module, ``[*batch]`` int32."""
        gi, i = self._locate(name)
        return self.rank[gi][..., i]

    def replace(self, **changes: Any) -> "Lora":
        """A copy with some of ``u``, ``v``, ``rank``, ``extras`` replaced (no checks)."""
        fields = dict(u=self.u, v=self.v, rank=self.rank, extras=self.extras)
        fields.update(changes)
        return Lora(self.spec, **fields)

    def astype(self, dtype: Any) -> "Lora":
        return self.replace(
            u=tuple(x.astype(dtype) for x in self.u),
            v=tuple(x.astype(dtype) for x in self.v),
            extras=jax.tree_util.tree_map(lambda x: x.astype(dtype), self.extras),
        )

    def pad_rank(self, rank: int | Sequence[int]) -> "Lora":
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
            u=tuple(_pad_last(x, r) for x, r in zip(self.u, ranks)),
            v=tuple(_pad_last(x, r) for x, r in zip(self.v, ranks)),
        )

    def __repr__(self) -> str:
        groups = "; ".join(
            f"{len(g.names)} x [{g.n}, {g.m}] r={u.shape[-1]}"
            for g, u in zip(self.spec.groups, self.u)
        )
        batch = f" batch={list(self.u[0].shape[:-3])}" if self.u[0].ndim > 3 else ""
        extras = f" extras={[kind for kind, _ in self.spec.extras]}" if self.spec.extras else ""
        return f"Lora({self.num_modules} modules: {groups}{batch}{extras})"


def _pad_last(x: Any, r: int) -> Any:
    """Zero-pads the last axis of ``x`` to ``r`` (no-op if already ``r``)."""
    extra = r - x.shape[-1]
    if extra == 0:
        return x
    widths = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
    return jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(x, widths)


def _check_extras(extras, checked, batch_shape, dtype) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind, per_module in (extras or {}).items():
        _check_name(kind)
        out[kind] = {}
        for name in checked:  # module order, so the pytree order is deterministic
            if name not in per_module:
                continue
            x = jnp.asarray(per_module[name], dtype)
            if x.ndim != len(batch_shape) + 1 or x.shape[:-1] != batch_shape:
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


# -- batches ------------------------------------------------------------------


def stack(loras: Iterable[Lora], layout: str = "leading") -> Lora:
    """Stacks single LoRAs of the same structure into a batch.

    LoRAs whose groups have different ranks are zero-padded to the largest rank of
    each group first (exact). ``layout`` picks where the batch axis goes: see ``LAYOUTS``.
    Use :func:`in_axes` to ``vmap`` a per-example function over the result.
    """
    loras = list(loras)
    if not loras:
        raise ValueError("stack: no LoRAs given")
    first = loras[0]
    for i, lora in enumerate(loras[1:], 1):
        if lora.spec != first.spec:
            raise ValueError(
                f"stack: LoRA {i} differs from LoRA 0: " + "; ".join(first.spec.diff(lora.spec))
            )
        if lora.batch_shape:
            raise ValueError(f"stack: LoRA {i} is already batched {list(lora.batch_shape)}")
    ranks = [max(l.u[g].shape[-1] for l in loras) for g in range(len(first.u))]
    loras = [l.pad_rank(ranks) for l in loras]
    batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *loras)
    return to_layout(batch, "leading", layout)


def to_layout(batch: Lora, src: str, dst: str) -> Lora:
    """Moves the (single) batch axis of ``batch`` from layout ``src`` to ``dst``."""
    for layout in (src, dst):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown batch layout {layout!r}; known: {LAYOUTS}")
    if src == dst:
        return batch
    src_axes, dst_axes = in_axes(batch, src), in_axes(batch, dst)
    return jax.tree_util.tree_map(lambda x, a, b: jnp.moveaxis(x, a, b), batch, src_axes, dst_axes)


def in_axes(batch: Lora, layout: str = "leading") -> Lora:
    """The ``vmap`` ``in_axes`` pytree for a batch in ``layout`` (a Lora of ints).

    ``"leading"``: every leaf has the batch at axis 0. ``"rank_major"``: factors have it
    at -2 (``[k, n, B, r]``), ranks and extras at -1 (``[k, B]``, ``[size, B]``).
    """
    if layout == "leading":
        return jax.tree_util.tree_map(lambda _: 0, batch)
    if layout == "rank_major":
        return batch.replace(
            u=tuple(-2 for _ in batch.u),
            v=tuple(-2 for _ in batch.v),
            rank=tuple(-1 for _ in batch.rank),
            extras=jax.tree_util.tree_map(lambda _: -1, batch.extras),
        )
    raise ValueError(f"unknown batch layout {layout!r}; known: {LAYOUTS}")
