"""The static structure of a LoRA: module names, same-shape groups, extras (numpy-free).

A LoRA's structure is what does not change between finetunes of one base model: the
module names in order, their shapes ``(n, m)``, how same-shaped modules are stacked
into groups, and which modules carry extra inputs. It is static (hashable, no arrays),
so it is the treedef of the :class:`gllora.Lora` pytree and the ``modules``/``groups``
part of a dataset's ``schema.json``. This module imports nothing but the standard
library, so readers and dataset folders can use it without JAX.

:func:`check_match` is THE check that a LoRA has the structure a consumer expects (a
dataset writer, a trained model, an evaluation): one function, one message format.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping

#: Names of the two batch layouts (:func:`gllora.stack`, :func:`gllora.in_axes`,
#: :meth:`gllora.io.dataset.Dataset.batch`). ``"leading"``: ``u [B, k, n, r]`` (the
#: natural one). ``"rank_major"``: ``u [k, n, B, r]``, the batch axis beside the rank
#: axis, so that ``Phi @ u`` over a batch is one plain matrix product over ``B * r``
#: columns (several times faster on CPU).
LAYOUTS = ("leading", "rank_major")


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`; a ``ValueError`` naming them otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; known: {LAYOUTS}")
    return layout


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
    """Static structure of a LoRA: module order, groups and extras (no ranks, no arrays).

    Attributes:
      order: module names in order.
      groups: same-shaped modules, in order of first appearance.
      extras: ``((kind, (module names, in module order)), ...)``.
    """

    order: tuple[str, ...]
    groups: tuple[GroupSpec, ...]
    extras: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_shapes(
        cls,
        shapes: Iterable[tuple[str, int, int]],
        extras: Mapping[str, Iterable[str]] | None = None,
    ) -> LoraSpec:
        """The spec of modules ``[(name, n, m), ...]`` in that order, grouped by shape.

        Modules of the same ``(n, m)`` form one group, in order of appearance; this is
        the grouping :meth:`gllora.Lora.from_factors` and dataset folders use. Names
        must be unique; ``extras`` names must be modules (kept in module order). Inputs
        are trusted: callers validate names and shapes with their own messages.
        """
        grouped: dict[tuple[int, int], list[str]] = {}
        order = []
        for name, n, m in shapes:
            order.append(name)
            grouped.setdefault((int(n), int(m)), []).append(name)
        groups = tuple(GroupSpec(tuple(names), n, m) for (n, m), names in grouped.items())
        extras_spec = []
        for kind, names in (extras or {}).items():
            wanted = set(names)
            extras_spec.append((kind, tuple(name for name in order if name in wanted)))
        return cls(order=tuple(order), groups=groups, extras=tuple(extras_spec))

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (g.n, g.m) for g in self.groups for name in g.names}

    def matches(self, other: LoraSpec, extras: bool = False) -> bool:
        """Same modules, order and grouping (and, with ``extras``, the same extras)."""
        same = self.order == other.order and self.groups == other.groups
        return same and (not extras or self.extras == other.extras)

    def diff(self, other: LoraSpec) -> list[str]:
        """Human-readable differences of ``other`` from ``self`` (empty if they match)."""
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
        if not lines and (self.groups != other.groups or self.order != other.order):
            lines.append("the same modules in a different order")
        if not lines and self.extras != other.extras:
            lines.append(f"extra inputs differ: expected {self.extras}, got {other.extras}")
        return sorted(lines)


def check_match(
    expected: LoraSpec,
    got: LoraSpec,
    context: str,
    *,
    extras: bool = False,
    limit: int = 8,
) -> None:
    """Raises unless ``got`` has the structure ``expected`` (modules, order, grouping).

    Every consumer of LoRAs of one fixed structure (a dataset writer, a trained model,
    an evaluation on a dataset) checks with this one function, so the message always
    lists the differences the same way.

    Args:
      expected: the structure wanted.
      got: the structure found.
      context: the start of the message, naming what was compared, e.g.
        ``f"{path}: the LoRA's modules differ from those the model was trained on"``.
      extras: also require the same extra inputs (kinds and modules).
      limit: at most this many differences are listed.

    Raises:
      ValueError: ``"{context}: difference; difference; ... (N more)"``.
    """
    if expected.matches(got, extras=extras):
        return
    lines = expected.diff(got)
    shown = "; ".join(lines[:limit])
    more = f"; ... ({len(lines) - limit} more)" if len(lines) > limit else ""
    raise ValueError(f"{context}: {shown}{more}")
