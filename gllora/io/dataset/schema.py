"""The schema of a dataset folder (``schema.json``) and the checks made against it.

Module specs to and from their JSON form, the targets and the label kinds their tasks
accept, reading ``schema.json``, and checking a batch of factors and extras before the
writer takes it. The folder format is described in :mod:`gllora.io.dataset`. Errors
are ``ValueError`` naming the file (or folder) at fault.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gllora.spec import GroupSpec, LoraSpec

FORMAT = "gllora.dataset"
VERSION = 1
TASKS = ("regression", "binary", "multilabel", "categorical")
KINDS = ("float", "int", "bool", "str")


# -- module specs -------------------------------------------------------------------


def spec_from_modules(
    modules: Sequence[tuple[str, int, int]] | LoraSpec,
    extras: Mapping[str, Sequence[str]] | None,
    where: str,
) -> LoraSpec:
    if isinstance(modules, LoraSpec):
        if extras:
            raise ValueError(f"{where}: give extras in the LoraSpec, not beside it")
        return modules
    grouped: dict[tuple[int, int], list[str]] = {}
    order = []
    for entry in modules:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError(f"{where}: modules must be (name, n, m) triples, got {entry!r}")
        name, n, m = entry
        if not isinstance(name, str) or not name or name in order:
            raise ValueError(
                f"{where}: module names must be unique non-empty strings, got {name!r}"
            )
        if int(n) <= 0 or int(m) <= 0:
            raise ValueError(f"{where}: module {name!r}: shape [{n}, {m}] must be positive")
        order.append(name)
        grouped.setdefault((int(n), int(m)), []).append(name)
    if not order:
        raise ValueError(f"{where}: a dataset needs at least one module")
    groups = tuple(GroupSpec(tuple(names), n, m) for (n, m), names in grouped.items())
    extras_spec = []
    for kind, names in (extras or {}).items():
        unknown = [name for name in names if name not in order]
        if not isinstance(kind, str) or not kind or unknown:
            raise ValueError(
                f"{where}: extras {kind!r} must name known modules; unknown: {unknown[:5]}"
            )
        extras_spec.append((kind, tuple(name for name in order if name in set(names))))
    return LoraSpec(order=tuple(order), groups=groups, extras=tuple(extras_spec))


def spec_to_json(spec: LoraSpec) -> dict[str, Any]:
    """The JSON form of ``spec``: ``{"modules", "groups", "extras"}`` as in ``schema.json``.

    Args:
      spec: the modules, their grouping by shape and the extras.

    Returns:
      A JSON-serializable dict; :func:`spec_from_json` reads it back.
    """
    shapes = spec.shapes()
    return {
        "modules": [
            {"name": name, "n": shapes[name][0], "m": shapes[name][1]} for name in spec.order
        ],
        "groups": [{"key": g.key, "n": g.n, "m": g.m, "names": list(g.names)} for g in spec.groups],
        "extras": {kind: list(names) for kind, names in spec.extras},
    }


def spec_from_json(d: Mapping[str, Any], where: str) -> LoraSpec:
    """Reads and validates the JSON form written by :func:`spec_to_json`.

    Args:
      d: a mapping with ``"modules"``, ``"groups"`` and optionally ``"extras"`` (other
        keys, such as the rest of a ``schema.json``, are ignored).
      where: the file it came from, named in errors.

    Returns:
      The :class:`LoraSpec`.

    Raises:
      ValueError: naming ``where``, for a malformed list or modules and groups that
        disagree.
    """
    try:
        groups = tuple(
            GroupSpec(tuple(str(x) for x in g["names"]), int(g["n"]), int(g["m"]))
            for g in d["groups"]
        )
        modules = {str(mod["name"]): (int(mod["n"]), int(mod["m"])) for mod in d["modules"]}
        extras = tuple(
            (str(kind), tuple(str(x) for x in names)) for kind, names in d.get("extras", {}).items()
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: malformed module list in the schema ({e!r})") from None
    spec = LoraSpec(order=tuple(modules), groups=groups, extras=extras)
    in_groups = spec.shapes()
    if len(modules) != len(d["modules"]) or in_groups != modules:
        bad = sorted(k for k in set(modules) | set(in_groups) if modules.get(k) != in_groups.get(k))
        raise ValueError(
            f"{where}: the schema's modules and groups disagree (repeated names, or "
            f"names or shapes that differ: {bad[:5]})"
        )
    for kind, names in extras:
        if set(names) - set(modules):
            raise ValueError(f"{where}: extras {kind!r} name unknown modules")
    return spec


# -- targets --------------------------------------------------------------------------


def check_targets(targets: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, dict]:
    out = {}
    for name, t in targets.items():
        if not isinstance(name, str) or not name or not isinstance(t, Mapping):
            raise ValueError(f"{where}: targets must map names to {{'task', 'columns'}}")
        task, cols = t.get("task"), t.get("columns")
        if task not in TASKS:
            raise ValueError(f"{where}: target {name!r} has task {task!r}; known tasks: {TASKS}")
        if (
            not isinstance(cols, (list, tuple))
            or not cols
            or not all(isinstance(c, str) for c in cols)
        ):
            raise ValueError(f"{where}: target {name!r} must list its columns, got {cols!r}")
        if task in ("binary", "categorical") and len(cols) != 1:
            raise ValueError(
                f"{where}: {task} target {name!r} needs exactly one column, got {cols}"
            )
        out[name] = {**t, "columns": list(cols)}
    return out


def check_target_kinds(targets, columns: Mapping[str, str], where: str) -> None:
    """Every target column exists and has a kind its task accepts."""
    for name, t in targets.items():
        for c in t["columns"]:
            if c not in columns:
                raise ValueError(
                    f"{where}: target {name!r} uses unknown column {c!r}; "
                    f"columns: {sorted(columns)}"
                )
            kind = columns[c]
            if t["task"] in ("binary", "multilabel") and kind not in ("bool", "int"):
                raise ValueError(
                    f"{where}: {t['task']} target {name!r}: column {c!r} is {kind}; "
                    "it must be bool (or 0/1 int)"
                )
            if t["task"] == "regression" and kind == "str":
                raise ValueError(f"{where}: regression target {name!r}: column {c!r} is str")


# -- schema.json ----------------------------------------------------------------------


def read_schema(path: str, folder: str) -> dict[str, Any]:
    """Reads ``schema.json`` at ``path`` (of the dataset folder ``folder``) and checks
    its format, version and the types of its entries (not yet the modules).

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: naming ``path``, for anything malformed.
    """
    try:
        with open(path, "rb") as f:
            schema = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {folder} a gllora dataset folder?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: the schema must be a JSON object")
    if schema.get("format") == FORMAT + ".multi":
        raise ValueError(
            f"{path}: {folder} holds LoRAs of several structures; open one of its "
            "structures/<name> folders, or the whole with gllora.io.dataset.multi.MultiDataset"
        )
    if schema.get("format") != FORMAT:
        raise ValueError(f"{path}: format {schema.get('format')!r} is not {FORMAT!r}")
    if schema.get("version") != VERSION:
        raise ValueError(
            f"{path}: version {schema.get('version')} is not supported "
            f"(this gllora reads version {VERSION})"
        )
    problems = []
    for key in ("modules", "groups"):
        if not isinstance(schema.get(key), list) or not schema[key]:
            problems.append(f"{key!r} is missing or not a non-empty JSON list")
    n = schema.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"num_examples {n!r} is not a positive integer")
    for key, kind in (("columns", dict), ("targets", dict), ("shards", list)):
        if not isinstance(schema.get(key), kind):
            problems.append(f"{key!r} is missing or not a JSON {kind.__name__}")
    if not problems:
        for col, kind in schema["columns"].items():
            if kind not in KINDS or col == "id" or not col:
                problems.append(f"column {col!r} has kind {kind!r} (kinds: {KINDS})")
        groups = schema.get("groups")
        num_groups = len(groups) if isinstance(groups, list) else -1
        total = 0
        for s in schema["shards"]:
            ok = (
                isinstance(s, dict)
                and isinstance(s.get("file"), str)
                and isinstance(s.get("num_examples"), int)
                and s["num_examples"] > 0
                and isinstance(s.get("ranks"), list)
                and len(s["ranks"]) == num_groups
                and all(isinstance(r, int) and r > 0 for r in s["ranks"])
            )
            if not ok:
                problems.append(f"malformed shard entry {s!r}")
                break
            total += s["num_examples"]
        if not problems and total != n:
            problems.append(f"the shards hold {total} examples, num_examples says {n}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return schema


# -- what add() is given ----------------------------------------------------------------


def check_factors(path: str, spec: LoraSpec, factors, ranks):
    """Checks an ``add()`` batch of factors (and optional true ranks) against ``spec``.

    Returns:
      ``(arrays, true_ranks, batch)``: ``{name: (u, v)}`` float32 and contiguous,
      ``{name: [B] int32}``, and ``B``.
    """
    if not isinstance(factors, Mapping):
        raise ValueError(f"{path}: factors must be a mapping {{name: (u, v)}}")
    shapes = spec.shapes()
    missing = [n for n in spec.order if n not in factors]
    unknown = [n for n in factors if n not in shapes]
    if missing or unknown:
        raise ValueError(
            f"{path}: add() modules differ from the schema: missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    if ranks is not None and set(ranks) - set(shapes):
        raise ValueError(
            f"{path}: ranks given for unknown modules {sorted(set(ranks) - set(shapes))[:5]}"
        )
    batch = None
    arrays, true_ranks = {}, {}
    for name in spec.order:
        pair = factors[name]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{path}: module {name!r}: expected a pair (u, v)")
        u, v = (np.asarray(x) for x in pair)
        n, m = shapes[name]
        if (
            u.ndim != 3
            or v.ndim != 3
            or u.shape[1] != n
            or v.shape[1] != m
            or u.shape[2] != v.shape[2]
            or u.shape[0] != v.shape[0]
            or u.shape[2] == 0
        ):
            raise ValueError(
                f"{path}: module {name!r}: expected u [B, {n}, r] and "
                f"v [B, {m}, r] with r >= 1, got u {list(u.shape)} and v {list(v.shape)}"
            )
        if batch is None:
            batch = u.shape[0]
        if u.shape[0] != batch:
            raise ValueError(f"{path}: module {name!r} has batch {u.shape[0]}, others {batch}")
        checked = []
        for what, x in (("u", u), ("v", v)):
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(
                    f"{path}: module {name!r}: {what} {list(x.shape)} has dtype "
                    f"{x.dtype}, expected floating point"
                )
            with np.errstate(over="ignore"):
                x = np.ascontiguousarray(x, np.float32)
            if not np.isfinite(x).all():
                raise ValueError(
                    f"{path}: module {name!r}: {what} {list(x.shape)} has NaN/Inf "
                    "entries (in float32)"
                )
            checked.append(x)
        u, v = checked
        r = u.shape[2]
        if ranks is not None and name in ranks:
            rk = np.asarray(ranks[name])
            if rk.shape != (batch,) or not np.issubdtype(rk.dtype, np.integer):
                raise ValueError(
                    f"{path}: module {name!r}: ranks must be [B={batch}] ints, got "
                    f"{rk.dtype} {list(rk.shape)}"
                )
            if batch and (rk.min() < 1 or rk.max() > r):
                raise ValueError(
                    f"{path}: module {name!r}: ranks must be in [1, {r}], got "
                    f"{rk.min()}..{rk.max()}"
                )
            pad = np.arange(r)[None, :] >= rk[:, None]  # [B, r]
            if pad.any():
                bad = ((u != 0) & pad[:, None, :]).any(axis=(1, 2)) | (
                    (v != 0) & pad[:, None, :]
                ).any(axis=(1, 2))
                if bad.any():
                    b = int(np.flatnonzero(bad)[0])
                    raise ValueError(
                        f"{path}: module {name!r}: example {b} of the batch has rank "
                        f"{rk[b]} but non-zero columns past it in u [{n}, {r}] or v "
                        f"[{m}, {r}]"
                    )
            true_ranks[name] = rk.astype(np.int32)
        else:
            true_ranks[name] = np.full(batch, r, np.int32)
        arrays[name] = (u, v)
    return arrays, true_ranks, batch


def check_group(path: str, group: GroupSpec, u, v, rank) -> tuple[np.ndarray, np.ndarray]:
    """Checks one group of a stacked LoRA (``u [B, k, n, r]``, ``v [B, k, m, r]``, true
    ranks ``rank [B, k]``) for the writer: float, finite in float32, zero past each
    module's true rank. Returns ``(u, v)`` float32, cut to the largest true rank."""
    b, k = rank.shape
    if u.shape[:3] != (b, k, group.n) or v.shape[:3] != (b, k, group.m) or u.shape[3] != v.shape[3]:
        raise ValueError(
            f"{path}: group {group.describe()}: u {list(u.shape)}, v {list(v.shape)} do not fit "
            f"[B, {k}, {group.n}, r] and [B, {k}, {group.m}, r]"
        )
    r = u.shape[3]
    if rank.min() < 1 or rank.max() > r:
        raise ValueError(
            f"{path}: group {group.describe()}: true ranks {np.unique(rank).tolist()} must be "
            f"in [1, {r}]"
        )
    out = []
    for what, x in (("u", u), ("v", v)):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{path}: group {group.describe()}: {what} has dtype {x.dtype}")
        with np.errstate(over="ignore"):
            x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            bi, ki = (int(i) for i in np.argwhere(~np.isfinite(x))[0][:2])
            raise ValueError(
                f"{path}: module {group.names[ki]!r}: {what} has NaN/Inf entries (in float32)"
            )
        past = np.arange(r)[None, None, None, :] >= rank[:, :, None, None]
        if (x * past != 0).any():
            bi, ki = (int(i) for i in np.argwhere((x * past != 0).any(axis=(2, 3)))[0])
            raise ValueError(
                f"{path}: module {group.names[ki]!r}: non-zero columns past its true rank "
                f"{rank[bi, ki]}"
            )
        out.append(x[..., : int(rank.max())])
    return out[0], out[1]


def check_extras(path: str, spec: LoraSpec, extra_sizes, extras, batch):
    """Checks an ``add()`` batch of extras against ``spec`` (and ``extra_sizes``
    ``{(kind, name): size}`` of earlier batches, or None); returns them float32."""
    declared = {kind: set(names) for kind, names in spec.extras}
    given = {kind: set(per) for kind, per in extras.items()}
    if declared != given:
        raise ValueError(
            f"{path}: extras {sorted((k, sorted(v)) for k, v in given.items())} "
            f"differ from the declared {sorted((k, sorted(v)) for k, v in declared.items())}"
        )
    out = {}
    for kind, per in extras.items():
        out[kind] = {}
        for name, x in per.items():
            x = np.ascontiguousarray(x, np.float32)
            size = (extra_sizes or {}).get((kind, name))
            if (
                x.ndim != 2
                or x.shape[0] != batch
                or (size is not None and x.shape[1] != size)
                or not np.isfinite(x).all()
            ):
                raise ValueError(
                    f"{path}: module {name!r}: extra {kind!r} must be a finite "
                    f"[B={batch}, {size or 'size'}] array, got {list(x.shape)}"
                )
            out[kind][name] = x
    return out
