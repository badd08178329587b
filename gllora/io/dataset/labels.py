"""The labels table (``labels.csv``) and the splits (``splits.json``) of a dataset folder.

Label kinds and their exact text form, checking a batch of labels before the writer
takes it, and writing and reading both files. The folder format is described in
:mod:`gllora.io.dataset`. Errors are ``ValueError`` (or ``FileNotFoundError``) naming
the file (or folder) at fault.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gllora.io.dataset.schema import check_target_kinds

# -- label columns ----------------------------------------------------------------------


def column_kind(values: np.ndarray, where: str) -> str:
    if values.dtype == np.bool_:
        return "bool"
    if np.issubdtype(values.dtype, np.integer):
        return "int"
    if np.issubdtype(values.dtype, np.floating):
        return "float"
    if values.dtype.kind == "U":
        return "str"
    if values.dtype == object and all(isinstance(x, str) for x in values.tolist()):
        return "str"
    raise ValueError(
        f"{where}: unsupported label values of dtype {values.dtype} (use float, int, bool or str)"
    )


def parse_cell(text: str, kind: str) -> Any:
    if kind == "float":
        x = float(text)
        if not math.isfinite(x):
            raise ValueError(f"{text!r} is not a finite number")
        return x
    if kind == "int":
        return int(text)
    if kind == "bool":
        if text not in ("0", "1"):
            raise ValueError(f"expected 0 or 1, got {text!r}")
        return text == "1"
    return text


def format_cell(value: Any, kind: str) -> str:
    if kind == "float":
        return repr(float(value))  # shortest round-trip text: the table is exact
    if kind == "bool":
        return "1" if bool(value) else "0"
    if kind == "int":
        return str(int(value))
    return str(value)


def check_labels(
    path: str,
    labels,
    batch: int,
    columns: Mapping[str, str],
    targets: Mapping[str, Mapping[str, Any]],
    count: int,
) -> tuple[dict[str, list], dict[str, str]]:
    """Checks an ``add()`` batch of labels against the ``columns`` (and kinds) of the
    ``count`` examples added before it and against ``targets``.

    Returns:
      ``(values, kinds)``: ``{column: [B] Python values}`` and ``{column: kind}``.
    """
    if not isinstance(labels, Mapping):
        raise ValueError(f"{path}: labels must be a mapping {{column: [B] values}}")
    if "id" in labels:
        raise ValueError(f"{path}: label column 'id' is reserved for the example index")
    if count and set(labels) != set(columns):
        raise ValueError(
            f"{path}: label columns changed: missing "
            f"{sorted(set(columns) - set(labels))}, new "
            f"{sorted(set(labels) - set(columns))} (every add() gives every column)"
        )
    values_out, kinds = {}, {}
    for col, values in labels.items():
        where = f"{path}: label {col!r}"
        if not isinstance(col, str) or not col or col != col.strip():
            raise ValueError(
                f"{path}: label column names must be non-empty strings "
                f"without surrounding spaces, got {col!r}"
            )
        values = np.asarray(values)
        if values.shape != (batch,):
            raise ValueError(f"{where} has shape {list(values.shape)}, expected [{batch}]")
        kind = column_kind(values, where)
        known = columns.get(col, kind)
        if known != kind and not (known == "float" and kind in ("int", "bool")):
            raise ValueError(
                f"{where} was {known}, now {kind} (give the first batch the widest kind)"
            )
        if known == "float":
            values = values.astype(np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"{where} has NaN/Inf values")
        values_out[col] = values.tolist()
        kinds[col] = known
    if not count:  # the first batch fixes the columns: check the targets now
        check_target_kinds(targets, kinds, path)
    for name, t in targets.items():
        if t["task"] in ("binary", "multilabel"):
            for c in t["columns"]:
                if kinds[c] == "int" and not set(values_out[c]) <= {0, 1}:
                    raise ValueError(
                        f"{path}: {t['task']} target {name!r}: column {c!r} has "
                        f"values other than 0/1: {sorted(set(values_out[c]) - {0, 1})[:5]}"
                    )
    return values_out, kinds


# -- labels.csv ---------------------------------------------------------------------------


def write_labels(
    path: str, columns: Mapping[str, str], labels: Mapping[str, Sequence[Any]], count: int
) -> None:
    """Writes ``labels.csv``: the ``id`` column, then ``columns`` in order, ``count`` rows."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        cols = list(columns)
        writer.writerow(["id", *cols])
        for i in range(count):
            writer.writerow([i, *(format_cell(labels[c][i], columns[c]) for c in cols)])


def read_labels(
    folder: str,
    columns: Mapping[str, str],
    targets: Mapping[str, Mapping[str, Any]],
    num_examples: int,
) -> dict[str, np.ndarray]:
    """Reads and checks ``labels.csv`` of ``folder`` against the schema's ``columns``,
    ``targets`` and ``num_examples``: ``{column: [N]}`` (float64, int64, bool or str)."""
    path = os.path.join(folder, "labels.csv")
    try:
        f = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the dataset folder") from None
    expected = ["id", *columns]
    values: dict[str, list[Any]] = {c: [] for c in columns}
    rows = 0
    with f:
        try:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header != expected:
                raise ValueError(
                    f"{path}: header {header} does not match the schema's columns {expected}"
                )
            for line, row in enumerate(reader, 2):
                if len(row) != len(expected) or row[0] != str(rows):
                    raise ValueError(
                        f"{path}:{line}: expected id {rows} and {len(expected)} cells, "
                        f"got {len(row)} cells starting {row[:3]}; a row is missing, "
                        "added or damaged"
                    )
                for col, cell in zip(columns, row[1:]):
                    try:
                        values[col].append(parse_cell(cell, columns[col]))
                    except ValueError as e:
                        raise ValueError(
                            f"{path}:{line}: column {col!r} ({columns[col]}): {e}"
                        ) from None
                rows += 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable CSV table ({e})") from None
    if rows != num_examples:
        raise ValueError(f"{path}: {rows} rows, the schema says {num_examples}")
    types = {"float": np.float64, "int": np.int64, "bool": np.bool_, "str": np.str_}
    out = {c: np.asarray(v, types[columns[c]]) for c, v in values.items()}
    for name, t in targets.items():
        if t["task"] in ("binary", "multilabel"):
            for c in t["columns"]:
                if columns[c] == "int" and not np.isin(out[c], (0, 1)).all():
                    raise ValueError(
                        f"{path}: {t['task']} target {name!r}: column {c!r} is not 0/1"
                    )
        if t["task"] == "categorical":
            classes = t.get("classes")
            col = out[t["columns"][0]].tolist()
            if not isinstance(classes, list) or set(col) - set(classes):
                raise ValueError(
                    f"{path}: categorical target {name!r}: values "
                    f"{sorted(set(col) - set(classes or []))[:5]} are not among the "
                    f"schema's classes"
                )
    return out


# -- splits.json --------------------------------------------------------------------------


def make_splits(path: str, count: int, splits, seed, fractions) -> dict[str, np.ndarray]:
    """The splits of ``count`` examples: ``splits`` checked, or a seeded shuffle cut at
    ``fractions`` into ``train``, ``validation`` and ``test`` (see
    :meth:`DatasetWriter.close`)."""
    if splits is not None:
        out = {}
        for k, v in splits.items():
            ids = np.asarray(v)
            if (
                not isinstance(k, str)
                or ids.ndim != 1
                or (ids.size and not np.issubdtype(ids.dtype, np.integer))
            ):
                raise ValueError(f"{path}: split {k!r} must be a 1-d list of int ids")
            out[k] = ids.astype(np.int64)
        allv = np.concatenate(list(out.values())) if out else np.zeros(0, np.int64)
        if len(np.unique(allv)) != len(allv) or (
            len(allv) and (allv.min() < 0 or allv.max() >= count)
        ):
            raise ValueError(f"{path}: splits overlap or name ids outside [0, {count})")
        return out
    if len(fractions) != 3 or not math.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(
            f"{path}: fractions must be 3 non-negative numbers summing to 1, got {list(fractions)}"
        )
    perm = np.random.default_rng(seed).permutation(count)
    # Cut at rounded cumulative fractions, so a zero fraction gives an empty split.
    a, b = (round(float(x) * count) for x in np.cumsum(fractions)[:2])
    return {
        "train": np.sort(perm[:a]),
        "validation": np.sort(perm[a:b]),
        "test": np.sort(perm[b:]),
    }


def read_splits(folder: str, num_examples: int) -> dict[str, np.ndarray]:
    """Reads and checks ``splits.json`` of ``folder``: ``{split: [ids]}`` int64 arrays."""
    path = os.path.join(folder, "splits.json")
    try:
        with open(path, "rb") as f:
            splits = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the dataset folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: must be a JSON object {{split: [ids]}}")
    out = {}
    for k, v in splits.items():
        if not isinstance(v, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in v
        ):
            raise ValueError(f"{path}: split {k!r} must be a list of integer ids")
        ids = np.asarray(v, np.int64)
        bad = ids[(ids < 0) | (ids >= num_examples)]
        if len(bad):
            raise ValueError(
                f"{path}: split {k!r} names ids outside [0, {num_examples}): {bad[:5].tolist()}"
            )
        out[k] = ids
    allv = np.concatenate(list(out.values())) if out else np.zeros(0, np.int64)
    if len(np.unique(allv)) != len(allv):
        raise ValueError(f"{path}: splits overlap or repeat ids")
    return out
