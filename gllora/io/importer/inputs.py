"""What an import reads besides the factors: the adapter files under a folder, the
labels table, the targets, and the labels found in header metadata.

Used by :func:`gllora.io.importer.import_adapters`; :mod:`gllora.io.importer`
describes the rules (adapter keys, label kinds, tag columns) and re-exports the
public names.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from gllora.io import dataset
from gllora.io.dataset import schema as _dataset_schema

_LEGACY = (".bin", ".pt", ".pth", ".ckpt")
TAGS_KEY = "ss_tag_frequency"
TAG_PREFIX = "tag."


class ImportAdaptersError(ValueError):
    """The import as a whole cannot go on (mismatched structures, a bad labels table or
    target, nothing to import); the message says what and how to fix it."""


# -- finding adapters ---------------------------------------------------------------


def natural_key(text: str) -> list[Any]:
    """Sort key of natural order: ``run_2`` before ``run_10``."""
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
    return sorted(found, key=natural_key)


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


def expand_targets(targets, columns: Mapping[str, str]) -> dict[str, dict[str, Any]]:
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
        _dataset_schema.check_targets(out, "targets")
        _dataset_schema.check_target_kinds(out, columns, "targets")
    except ValueError as e:
        raise ImportAdaptersError(str(e)) from None
    return out


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


def scalar_kind(values: list[Any]) -> str:
    """The column kind of metadata values: bool, int, float (ints and floats), else str."""
    if all(isinstance(x, bool) for x in values):
        return "bool"
    if all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        return "int"
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
        return "float"
    return "str"


def read_metadata(info, metadata_columns, into: dict, tags: dict, key: str) -> str | None:
    """Fills ``into`` with the requested metadata of one adapter; a reason if it cannot."""
    parsed = info.parsed_metadata
    for k in metadata_columns:
        value = parsed.get(k)
        if value is None:
            return f"header metadata {k!r} is {'missing' if k not in parsed else 'None'}"
        if k == TAGS_KEY:
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
