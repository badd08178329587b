"""Building a dataset folder from adapter files and a labels table.

::

    from gllora.io import importer
    result = importer.import_adapters(
        "adapters/", "datasets/mine", labels="labels.csv",
        targets=["quality:regression:clip_score"],
        metadata_columns=["ss_num_train_images", "ss_learning_rate"],
    )
    result.imported, result.skipped

The command line is ``python -m experiments.import_adapters`` (same options).

**Adapters** are found recursively under the adapters folder: a folder holding an
``adapter_config.json`` is one PEFT adapter (its contents are not searched further);
any other ``*.safetensors`` file is one adapter (diffusers, kohya, LyCORIS, ...), and
legacy ``*.bin`` / ``*.pt`` / ``*.pth`` / ``*.ckpt`` files are listed so that they are
reported as skipped rather than silently ignored. Hidden files and folders are not
searched. An adapter's *key* is its path relative to the adapters folder, with ``/``
separators (``peft/run_3``, ``sd/style_a.safetensors``); examples are written in
natural order of their keys (``run_2`` before ``run_10``).

**Labels** come from a table keyed by that path: a CSV file with a header (the key
column, ``path`` by default, and any label columns) or JSON lines (``.jsonl``; one
object per line with the key and the labels). A CSV column's kind is inferred from
all its cells: ``true``/``false`` -> bool, integers -> int, numbers -> float, else
str; an empty cell, or ``nan`` in a numeric column, is a missing label. JSON values
keep their JSON type (ints and floats mixed -> float; ``null`` is missing). The
dataset gets every table column, plus the key column (str) for auditing.

**Header metadata** (kohya's ``ss_*`` keys, parsed: ``"1e-4"`` -> float) becomes label
columns named by ``metadata_columns``: a scalar key becomes one column of the same
name; ``ss_tag_frequency`` (``{folder: {tag: count}}``) becomes one bool column
``tag.<tag>`` per tag used by at least ``min_tag_adapters`` adapters (``True`` where
the adapter was trained with the tag; pick them all with the target column pattern
``tag.*``). Metadata is only ever written to the labels table: a model's input is the
factors ``(u, v)`` alone, exactly as :func:`gllora.io.load_adapter` reads them.

**Skipping**: a file that cannot be read, has no labels row, a missing label or
metadata value, or (``on_mismatch="majority"``) a different structure is skipped;
the others are imported. :attr:`ImportResult.skipped` lists each with its reason.

**Structures** (module names, shapes, extra inputs; ranks may differ, they are
padded exactly when batched) must agree across adapters. ``on_mismatch`` chooses:

- ``"error"`` (default): raise :class:`ImportAdaptersError` listing every distinct
  structure, how many adapters have it, and how it differs from the most common one;
  nothing is written.
- ``"majority"``: keep the adapters with the most common structure (ties: the one of
  the first adapter in key order); skip the others, each with its differences.
- ``"intersect"``: keep every adapter but only the modules that all of them have with
  the same shape (in the first adapter's order); an extra input (DoRA magnitude) is
  kept for a module only if every adapter has it with the same size. The dropped
  modules are listed in :attr:`ImportResult.dropped` and the dataset's provenance.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import fnmatch
import functools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from gllora.io import adapters, dataset

__all__ = [
    "MISMATCH_POLICIES",
    "ImportAdaptersError",
    "ImportResult",
    "LabelsTable",
    "Skipped",
    "find_adapters",
    "import_adapters",
    "parse_target",
    "read_labels_table",
]

MISMATCH_POLICIES = ("error", "majority", "intersect")
_LEGACY = (".bin", ".pt", ".pth", ".ckpt")
_TAGS_KEY = "ss_tag_frequency"
_TAG_PREFIX = "tag."


class ImportAdaptersError(ValueError):
    """The import as a whole cannot go on (mismatched structures, a bad labels table or
    target, nothing to import); the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An adapter that was not imported: its key and why."""

    path: str
    reason: str


@dataclasses.dataclass
class ImportResult:
    """What :func:`import_adapters` did.

    Attributes:
      out: the dataset folder, or None when nothing could be imported.
      imported: keys of the imported adapters, in dataset order (example id = index).
      skipped: every adapter not imported, with its reason.
      dropped: ``on_mismatch="intersect"``: the modules (and extras) left out.
      unused_labels: keys of labels-table rows that matched no adapter.
      columns: the dataset's label columns and their kinds.
    """

    out: str | None
    imported: list[str]
    skipped: list[Skipped]
    dropped: list[str]
    unused_labels: list[str]
    columns: dict[str, str]

    def summary(self) -> str:
        """A human-readable report: counts, then every skipped adapter and its reason."""
        lines = [
            f"imported {len(self.imported)} adapters"
            + (f" into {self.out}" if self.out else " (no dataset written)")
            + f"; skipped {len(self.skipped)}"
        ]
        if self.dropped:
            lines.append(
                f"dropped from every adapter ({len(self.dropped)}): " + ", ".join(self.dropped)
            )
        if self.unused_labels:
            shown = ", ".join(self.unused_labels[:10])
            more = f" ... ({len(self.unused_labels)} rows)" if len(self.unused_labels) > 10 else ""
            lines.append(f"labels rows without an adapter: {shown}{more}")
        if self.skipped:
            lines.append("skipped:")
            lines.extend(f"  {s.path}: {s.reason}" for s in self.skipped)
        return "\n".join(lines)


# -- finding adapters ---------------------------------------------------------------


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _key(path: str) -> str:
    """A table key or relative path in one canonical form (``a/b``, no ``./``)."""
    text = path.strip().replace("\\", "/")
    return os.path.normpath(text).replace(os.sep, "/") if text else text


def find_adapters(root: str | os.PathLike) -> list[str]:
    """Keys (paths relative to ``root``) of the adapters under ``root``, natural order.

    A folder with an ``adapter_config.json`` is one adapter; other ``.safetensors``
    files (and legacy ``.bin``/``.pt``/``.pth``/``.ckpt`` files, to be reported) are one
    adapter each. Hidden entries are skipped; symbolic links to folders are not followed.

    Raises:
      FileNotFoundError: ``root`` is not a folder.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such adapters folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if "adapter_config.json" in filenames:
            found.append(_key(rel))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith((".safetensors", *_LEGACY)):
                found.append(_key(os.path.join(rel, name)))
    return sorted(found, key=_natural_key)


# -- labels tables ------------------------------------------------------------------


@dataclasses.dataclass
class LabelsTable:
    """A labels table: ``rows[key][column]`` (None where missing), ``columns[column]`` kind."""

    path: str
    key_column: str
    columns: dict[str, str]
    rows: dict[str, dict[str, Any]]


_INT = re.compile(r"[-+]?\d+")


def _csv_kind(cells: Iterable[str]) -> str:
    kinds = set()
    for cell in cells:
        if cell == "" or cell.lower() == "nan":
            continue
        if cell.lower() in ("true", "false"):
            kinds.add("bool")
        elif _INT.fullmatch(cell):
            kinds.add("int")
        else:
            try:
                float(cell)
                kinds.add("float")
            except ValueError:
                return "str"
    if not kinds:
        return "float"
    if len(kinds) == 1:
        return kinds.pop()
    return "float" if kinds == {"int", "float"} else "str"


def _csv_value(cell: str, kind: str) -> Any:
    if cell == "" or (kind in ("int", "float") and cell.lower() == "nan"):
        return None
    if kind == "bool":
        return cell.lower() == "true"
    if kind == "int":
        return int(cell)
    if kind == "float":
        x = float(cell)
        return x if math.isfinite(x) else None
    return cell


def _json_kind(values: list[Any], where: str, column: str) -> str:
    kinds = set()
    for x in values:
        if x is None:
            continue
        if isinstance(x, bool):
            kinds.add("bool")
        elif isinstance(x, int):
            kinds.add("int")
        elif isinstance(x, float):
            kinds.add("float")
        elif isinstance(x, str):
            kinds.add("str")
        else:
            raise ImportAdaptersError(
                f"{where}: column {column!r} holds a {type(x).__name__}; labels must be "
                "numbers, booleans or strings"
            )
    if len(kinds) > 1 and kinds != {"int", "float"}:
        raise ImportAdaptersError(f"{where}: column {column!r} mixes {sorted(kinds)} values")
    return "float" if len(kinds) != 1 else kinds.pop()


def read_labels_table(path: str | os.PathLike, key_column: str = "path") -> LabelsTable:
    """Reads a labels table: CSV with a header, or JSON lines (``.jsonl`` / ``.ndjson``).

    Raises:
      FileNotFoundError: the file does not exist.
      ImportAdaptersError: naming the file (and line), for a table that cannot be
        read: no key column, a row without a key, a repeated key, malformed JSON.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such labels table")
    raw: list[tuple[int, dict[str, Any]]] = []
    jsonl = path.lower().endswith((".jsonl", ".ndjson"))
    with open(path, newline="", encoding="utf-8-sig") as f:
        if jsonl:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    raise ImportAdaptersError(f"{path}:{line}: not a JSON object ({e})") from None
                if not isinstance(obj, dict):
                    raise ImportAdaptersError(f"{path}:{line}: not a JSON object")
                raw.append((line, obj))
            names = list(dict.fromkeys(k for _, obj in raw for k in obj))
        else:
            try:
                reader = csv.reader(f, strict=True)
                header = next(reader, None)
                if not header:
                    raise ImportAdaptersError(f"{path}: empty table (no header row)")
                names = [h.strip() for h in header]
                if len(set(names)) != len(names) or "" in names:
                    raise ImportAdaptersError(f"{path}: repeated or empty column names {names}")
                for line, row in enumerate(reader, 2):
                    if not row:
                        continue
                    if len(row) != len(names):
                        raise ImportAdaptersError(
                            f"{path}:{line}: {len(row)} cells, the header has {len(names)}"
                        )
                    raw.append((line, dict(zip(names, row))))
            except csv.Error as e:
                raise ImportAdaptersError(f"{path}: not a readable CSV table ({e})") from None
    if key_column not in names:
        raise ImportAdaptersError(
            f"{path}: no key column {key_column!r} (columns: {names}); it must hold each "
            "adapter's path relative to the adapters folder"
        )
    columns = [c for c in names if c != key_column]
    if jsonl:
        kinds = {c: _json_kind([obj.get(c) for _, obj in raw], path, c) for c in columns}
    else:
        kinds = {c: _csv_kind(obj[c].strip() for _, obj in raw) for c in columns}
    rows: dict[str, dict[str, Any]] = {}
    for line, obj in raw:
        key = obj.get(key_column)
        if not isinstance(key, str) or not _key(key):
            raise ImportAdaptersError(f"{path}:{line}: no adapter path in column {key_column!r}")
        key = _key(key)
        if key in rows:
            raise ImportAdaptersError(f"{path}:{line}: adapter {key!r} has a second row")
        if jsonl:
            values = {}
            for c in columns:
                x = obj.get(c)
                if isinstance(x, float) and not math.isfinite(x):
                    x = None
                values[c] = float(x) if kinds[c] == "float" and x is not None else x
        else:
            values = {c: _csv_value(obj[c].strip(), kinds[c]) for c in columns}
        rows[key] = values
    return LabelsTable(path, key_column, kinds, rows)


# -- targets ----------------------------------------------------------------------


def parse_target(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:task:col1,col2"`` (or ``"name:task"`` for one column called ``name``).

    Columns may be ``fnmatch`` patterns (``tag.*``), expanded against the dataset's
    columns by :func:`import_adapters`.
    """
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or parts[1] not in dataset.TASKS:
        raise ImportAdaptersError(
            f"target {text!r}: expected name:task[:col1,col2,...] with task one of "
            f"{', '.join(dataset.TASKS)}"
        )
    cols = [c.strip() for c in parts[2].split(",")] if len(parts) == 3 else [parts[0]]
    if not all(cols):
        raise ImportAdaptersError(f"target {text!r}: an empty column name")
    return parts[0], {"task": parts[1], "columns": cols}


def _expand_targets(targets, columns: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for item in targets or ():
        name, t = parse_target(item) if isinstance(item, str) else item
        cols = []
        for pattern in t["columns"]:
            matched = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
            if not matched:
                raise ImportAdaptersError(
                    f"target {name!r}: no column matches {pattern!r}; columns: "
                    f"{sorted(columns)[:20]}{' ...' if len(columns) > 20 else ''}"
                )
            cols.extend(c for c in matched if c not in cols)
        if name in out:
            raise ImportAdaptersError(f"target {name!r} is given twice")
        out[name] = {**t, "columns": cols}
    try:
        dataset._check_targets(out, "targets")
        dataset._check_target_kinds(out, columns, "targets")
    except ValueError as e:
        raise ImportAdaptersError(str(e)) from None
    return out


# -- structures -------------------------------------------------------------------

# A module as import compares them: (name, n, m, ((extra kind, size), ...)).
_Module = tuple[str, int, int, tuple[tuple[str, int], ...]]


def _structure(info: adapters.AdapterInfo) -> tuple[_Module, ...]:
    return tuple(
        (
            name,
            mod.shape[0],
            mod.shape[1],
            tuple(sorted((k, int(np.prod(s))) for k, s in mod.extras.items())),
        )
        for name, mod in info.modules.items()
    )


def _describe_module(mod: _Module) -> str:
    extras = "".join(f" +{k}[{s}]" for k, s in mod[3])
    return f"{mod[0]!r} [{mod[1]}, {mod[2]}]{extras}"


def _differences(ref: Sequence[_Module], other: Sequence[_Module], limit: int = 8) -> list[str]:
    mine, theirs = {m[0]: m for m in ref}, {m[0]: m for m in other}
    lines = []
    missing = [mine[k] for k in mine if k not in theirs]
    extra = [theirs[k] for k in theirs if k not in mine]
    changed = [(mine[k], theirs[k]) for k in mine if k in theirs and mine[k] != theirs[k]]
    for title, items in (("lacks", missing), ("adds", extra)):
        if items:
            shown = ", ".join(_describe_module(m) for m in items[:limit])
            more = f", ... ({len(items)} modules)" if len(items) > limit else ""
            lines.append(f"{title} {len(items)} module(s): {shown}{more}")
    for a, b in changed[:limit]:
        lines.append(f"module {_describe_module(b)} instead of {_describe_module(a)}")
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more modules of another shape")
    if not lines:
        lines.append("the same modules in another order")
    return lines


def _mismatch_report(groups: dict[tuple, list[str]]) -> str:
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
            lines.extend(f"      against A: {d}" for d in _differences(ref, struct))
    common = _intersection([s for s, _ in ordered])[0]
    lines.append(
        f"Fix the inputs, or choose on_mismatch='majority' (import the {len(ref_paths)} "
        f"adapters of A, skip the rest) or on_mismatch='intersect' (import all, keeping the "
        f"{len(common)} modules they share with the same shape)."
    )
    return "\n".join(lines)


def _intersection(structs: Sequence[Sequence[_Module]]) -> tuple[list[_Module], list[str]]:
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


# -- metadata ---------------------------------------------------------------------


def _tags(value: Any) -> set[str] | None:
    """The tags of a parsed ``ss_tag_frequency`` (``{folder: {tag: count}}``), or None."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        return None
    return {
        str(tag).strip()
        for per in value.values()
        for tag, count in per.items()
        if str(tag).strip() and count
    }


def _scalar_kind(values: list[Any]) -> str:
    if all(isinstance(x, bool) for x in values):
        return "bool"
    if all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        return "int"
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
        return "float"
    return "str"


# -- the import -------------------------------------------------------------------


def _convert(value: Any, kind: str) -> Any:
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    return value if isinstance(value, str) else str(value)


def import_adapters(
    adapters_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    key_column: str = "path",
    targets: Sequence[str | tuple[str, Mapping[str, Any]]] = (),
    metadata_columns: Sequence[str] = (),
    min_tag_adapters: int = 1,
    on_mismatch: str = "error",
    split_column: str | None = None,
    split_seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Builds the dataset folder ``out`` from the adapters under ``adapters_dir``.

    See the module docstring for how adapters, labels, metadata, skipping and
    ``on_mismatch`` work.

    Args:
      adapters_dir: the folder searched (recursively) for adapters.
      out: the dataset folder to write (see :class:`gllora.io.dataset.DatasetWriter`).
      labels: a CSV or JSON-lines labels table keyed by adapter path; None: no table
        (only metadata columns and the path).
      key_column: the table's column of adapter paths; also the dataset's path column.
      targets: ``"name:task:col1,col2"`` strings (columns may be ``fnmatch`` patterns;
        ``"name:task"`` means the column ``name``), or ``(name, {"task", "columns"})``.
      metadata_columns: header metadata keys to turn into label columns.
      min_tag_adapters: ``ss_tag_frequency`` tags used by fewer adapters get no column.
      on_mismatch: ``"error"``, ``"majority"`` or ``"intersect"``.
      split_column: a table column naming each adapter's split (``train``, ...); it
        becomes the stored splits instead of a label. Default: a seeded shuffle.
      split_seed, fractions: the seeded shuffle's seed and train/validation/test cut.
      overwrite: replace an existing dataset folder at ``out``.
      progress: show progress bars (on stderr).

    Returns:
      An :class:`ImportResult`; ``out`` is None if no adapter could be imported.

    Raises:
      FileNotFoundError: ``adapters_dir`` or ``labels`` does not exist.
      ImportAdaptersError: mismatched structures under ``on_mismatch="error"``, a bad
        labels table, a target naming no column, clashing column names.
    """
    if on_mismatch not in MISMATCH_POLICIES:
        raise ImportAdaptersError(
            f"on_mismatch must be one of {MISMATCH_POLICIES}, got {on_mismatch!r}"
        )
    root = os.fspath(adapters_dir)
    keys = find_adapters(root)
    out = os.fspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:  # say so before the scan
        raise ImportAdaptersError(f"{out}: folder exists and is not empty (overwrite it?)")
    table = read_labels_table(labels, key_column) if labels is not None else None
    table_columns = dict(table.columns) if table else {}
    if split_column is not None and split_column not in table_columns:
        raise ImportAdaptersError(f"split column {split_column!r} is not a column of {labels}")
    table_columns.pop(split_column, None)
    scalar_keys = [k for k in metadata_columns if k != _TAGS_KEY]
    clash = set(scalar_keys) & (set(table_columns) | {key_column})
    if clash:
        raise ImportAdaptersError(
            f"metadata columns {sorted(clash)} are also columns of the labels table"
        )
    if len(set(metadata_columns)) != len(metadata_columns):
        raise ImportAdaptersError(f"metadata columns repeat: {list(metadata_columns)}")

    skipped: list[Skipped] = []
    infos: dict[str, adapters.AdapterInfo] = {}
    metadata: dict[str, dict[str, Any]] = {}
    tags: dict[str, set[str]] = {}
    for key in tqdm(keys, desc="inspect", unit="file", disable=not progress, file=sys.stderr):
        reason = None
        try:
            info = adapters.inspect(os.path.join(root, key))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            reason = _reason(e, os.path.join(root, key))
        if reason is None and table is not None and key not in table.rows:
            reason = f"no row for it in the labels table {table.path}"
        if reason is None and table is not None:
            empty = [c for c, x in table.rows[key].items() if x is None]
            if empty:
                reason = f"missing labels in {table.path}: {empty}"
        if reason is None:
            reason = _read_metadata(info, metadata_columns, metadata.setdefault(key, {}), tags, key)
        if reason is not None:
            skipped.append(Skipped(key, reason))
            metadata.pop(key, None)
            continue
        infos[key] = info

    # Structures: one, or a policy.
    structs = {key: _structure(info) for key, info in infos.items()}
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for key, s in structs.items():
        groups[s].append(key)
    dropped: list[str] = []
    modules: list[_Module] = list(next(iter(groups))) if groups else []
    if len(groups) > 1:
        if on_mismatch == "error":
            also = (
                f"\n(besides, {len(skipped)} files were skipped: "
                + "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
                + (" ..." if len(skipped) > 5 else "")
                + ")"
                if skipped
                else ""
            )
            raise ImportAdaptersError(_mismatch_report(groups) + also)
        if on_mismatch == "majority":
            best = max(groups.values(), key=len)  # dicts keep order: ties go to the first
            ref = structs[best[0]]
            modules = list(ref)
            for key in list(infos):
                if structs[key] != ref:
                    diff = "; ".join(_differences(ref, structs[key], limit=4))
                    skipped.append(
                        Skipped(
                            key,
                            f"its modules differ from the majority's ({len(best)} adapters): {diff}",
                        )
                    )
                    del infos[key]
        else:
            modules, dropped = _intersection(list(groups))
            if not modules:
                raise ImportAdaptersError(
                    "on_mismatch='intersect': the adapters have no module in common with the "
                    "same shape\n" + _mismatch_report(groups)
                )
    kept = list(infos)

    # Columns: the table's, the metadata's, the path.
    columns: dict[str, str] = {key_column: "str", **table_columns}
    for k in scalar_keys:
        columns[k] = _scalar_kind([metadata[key][k] for key in kept]) if kept else "str"
    tag_columns = {}
    if _TAGS_KEY in metadata_columns:
        counts = collections.Counter(t for key in kept for t in tags[key])
        for tag in sorted(t for t, c in counts.items() if c >= min_tag_adapters):
            name = _TAG_PREFIX + tag
            if name in columns:
                raise ImportAdaptersError(f"tag column {name!r} clashes with a label column")
            tag_columns[name] = tag
            columns[name] = "bool"
    expanded = _expand_targets(targets, columns)
    rows = {}
    for key in kept:
        row = {key_column: key}
        for c, kind in table_columns.items():
            row[c] = _convert(table.rows[key][c], kind)
        for k in scalar_keys:
            row[k] = _convert(metadata[key][k], columns[k])
        for name, tag in tag_columns.items():
            row[name] = tag in tags[key]
        rows[key] = row
    for name, t in expanded.items():  # a whole-table problem, not one adapter's
        for c in t["columns"]:
            if t["task"] in ("binary", "multilabel") and columns[c] == "int":
                bad = sorted({r[c] for r in rows.values()} - {0, 1})
                if bad:
                    raise ImportAdaptersError(
                        f"{t['task']} target {name!r}: column {c!r} has values {bad[:5]}, not 0/1"
                    )

    result = ImportResult(None, [], skipped, dropped, [], columns)
    if table is not None:
        found = set(keys)
        result.unused_labels = sorted((k for k in table.rows if k not in found), key=_natural_key)
    if not kept:
        skipped.sort(key=lambda s: _natural_key(s.path))
        return result
    make_writer = functools.partial(
        dataset.DatasetWriter,
        out,
        modules=[(m[0], m[1], m[2]) for m in modules],
        extras=_extras_spec(modules),
        targets=expanded,
        provenance={
            "importer": "gllora.io.importer",
            "adapters": os.path.abspath(root),
            "labels": os.path.abspath(labels) if labels is not None else None,
            "key_column": key_column,
            "metadata_columns": list(metadata_columns),
            "on_mismatch": on_mismatch,
            "dropped_modules": dropped,
            "formats": dict(collections.Counter(infos[k].format for k in kept)),
            "skipped": [dataclasses.asdict(s) for s in skipped],
        },
        overwrite=overwrite,
    )
    try:
        writer = make_writer()
    except ValueError as e:
        raise ImportAdaptersError(str(e)) from None
    splits: dict[str, list[int]] = collections.defaultdict(list)
    try:
        for key in tqdm(kept, desc="import", unit="adapter", disable=not progress, file=sys.stderr):
            try:
                _add(writer, os.path.join(root, key), modules, rows[key])
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                skipped.append(Skipped(key, _reason(e, os.path.join(root, key))))
                continue
            if split_column is not None:
                splits[str(table.rows[key][split_column])].append(len(result.imported))
            result.imported.append(key)
        if not result.imported:
            writer.abort()
            skipped.sort(key=lambda s: _natural_key(s.path))
            return result
        skipped.sort(key=lambda s: _natural_key(s.path))
        writer.provenance["skipped"] = [dataclasses.asdict(s) for s in skipped]
        result.out = writer.close(
            splits=dict(splits) if split_column is not None else None,
            split_seed=split_seed,
            fractions=fractions,
        )
    except BaseException:
        writer.abort()
        raise
    return result


def _reason(e: BaseException, path: str) -> str:
    text = str(e) or type(e).__name__
    if text.startswith(path + ": "):  # the key is shown beside the reason already
        text = text[len(path) + 2 :]
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def _read_metadata(info, metadata_columns, into: dict, tags: dict, key: str) -> str | None:
    """Fills ``into`` with the requested metadata of one adapter; a reason if it cannot."""
    parsed = info.parsed_metadata
    for k in metadata_columns:
        value = parsed.get(k)
        if value is None:
            return f"header metadata {k!r} is {'missing' if k not in parsed else 'None'}"
        if k == _TAGS_KEY:
            found = _tags(value)
            if found is None:
                return f"header metadata {k!r} is not a {{folder: {{tag: count}}}} object"
            tags[key] = found
            continue
        if isinstance(value, (dict, list)):
            return f"header metadata {k!r} is a JSON {type(value).__name__}, not a single value"
        if isinstance(value, float) and not math.isfinite(value):
            return f"header metadata {k!r} is {value}"
        into[k] = value
    return None


def _extras_spec(modules: Sequence[_Module]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, _, _, extras in modules:
        for kind, _ in extras:
            out.setdefault(kind, []).append(name)
    return out


def _add(writer: dataset.DatasetWriter, path: str, modules: Sequence[_Module], row) -> None:
    """Loads one adapter and adds its ``modules`` (true ranks) and labels to ``writer``."""
    lora = adapters.load_adapter(path)
    factors, extras = {}, {}
    for name, n, m, extra in modules:
        u, v = (np.asarray(x) for x in lora.factors(name))
        r = int(lora.rank_of(name))
        if u.shape[0] != n or v.shape[0] != m:
            raise ValueError(
                f"{path}: module {name!r} loads as u {list(u.shape)}, v {list(v.shape)}; "
                f"its header said [{n}, {m}]"
            )
        factors[name] = (u[None, :, :r], v[None, :, :r])
        for kind, _ in extra:
            extras.setdefault(kind, {})[name] = np.asarray(lora.extras[kind][name])[None]
    writer.add(factors, {c: [x] for c, x in row.items()}, extras or None)
