"""Comparing the structures of adapters (module names, shapes, extras) for an import.

A structure per adapter, the differences between two, the report that
``on_mismatch="error"`` raises, and the modules that ``on_mismatch="intersect"`` keeps
(see :mod:`gllora.io.importer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gllora.io import adapters

# A module as import compares them: (name, n, m, ((extra kind, size), ...)).
Module = tuple[str, int, int, tuple[tuple[str, int], ...]]


def structure(info: adapters.AdapterInfo) -> tuple[Module, ...]:
    """The structure of an adapter: its modules, in order, as import compares them."""
    return tuple(
        (
            name,
            mod.shape[0],
            mod.shape[1],
            tuple(sorted((k, int(np.prod(s))) for k, s in mod.extras.items())),
        )
        for name, mod in info.modules.items()
    )


def describe_module(mod: Module) -> str:
    extras = "".join(f" +{k}[{s}]" for k, s in mod[3])
    return f"{mod[0]!r} [{mod[1]}, {mod[2]}]{extras}"


def differences(ref: Sequence[Module], other: Sequence[Module], limit: int = 8) -> list[str]:
    mine, theirs = {m[0]: m for m in ref}, {m[0]: m for m in other}
    lines = []
    missing = [mine[k] for k in mine if k not in theirs]
    extra = [theirs[k] for k in theirs if k not in mine]
    changed = [(mine[k], theirs[k]) for k in mine if k in theirs and mine[k] != theirs[k]]
    for title, items in (("lacks", missing), ("adds", extra)):
        if items:
            shown = ", ".join(describe_module(m) for m in items[:limit])
            more = f", ... ({len(items)} modules)" if len(items) > limit else ""
            lines.append(f"{title} {len(items)} module(s): {shown}{more}")
    for a, b in changed[:limit]:
        lines.append(f"module {describe_module(b)} instead of {describe_module(a)}")
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more modules of another shape")
    if not lines:
        lines.append("the same modules in another order")
    return lines


def mismatch_report(groups: dict[tuple, list[str]]) -> str:
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ref, ref_paths = ordered[0]
    total = sum(len(p) for p in groups.values())
    lines = [
        (
            f"the adapters differ in their modules or shapes: {len(groups)} different "
            f"structures among {total} adapters"
        )
    ]
    for i, (struct, paths) in enumerate(ordered):
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        label = chr(ord("A") + i) if i < 26 else str(i)
        lines.append(
            f"  {label}: {len(paths)} adapter(s) ({shown}): {len(struct)} modules in "
            f"{len({(m[1], m[2]) for m in struct})} shapes"
        )
        if i:
            lines.extend(f"      against A: {d}" for d in differences(ref, struct))
    common = intersection([s for s, _ in ordered])[0]
    lines.append(
        f"Fix the inputs, or choose on_mismatch='majority' (import the {len(ref_paths)} "
        f"adapters of A, skip the rest) or on_mismatch='intersect' (import all, keeping the "
        f"{len(common)} modules they share with the same shape)."
    )
    return "\n".join(lines)


def intersection(structs: Sequence[Sequence[Module]]) -> tuple[list[Module], list[str]]:
    """Modules (and extras) every structure has identically; and what was dropped."""
    first = structs[0]
    maps = [{m[0]: m for m in s} for s in structs]
    kept, dropped = [], []
    for name, n, m, extras in first:
        if not all(name in mp and mp[name][1:3] == (n, m) for mp in maps):
            dropped.append(name)
            continue
        same = tuple(e for e in extras if all(e in mp[name][3] for mp in maps))
        dropped.extend(f"{name} (extra {e[0]})" for e in extras if e not in same)
        kept.append((name, n, m, same))
    names = {m[0] for m in first}
    dropped.extend(sorted({k for mp in maps[1:] for k in mp} - names))
    return kept, dropped


def extras_spec(modules: Sequence[Module]) -> dict[str, list[str]]:
    """``{extra kind: [module names]}`` of ``modules``, as the dataset writer takes them."""
    out: dict[str, list[str]] = {}
    for name, _, _, extras in modules:
        for kind, _ in extras:
            out.setdefault(kind, []).append(name)
    return out
