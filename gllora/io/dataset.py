"""LoRA dataset folders: sharded safetensors + a JSON schema + a labels table + splits.

A dataset folder is meant to be inspected by hand::

    DIR/schema.json                 modules and shapes, label columns, targets, shards, provenance
    DIR/labels.csv                  one row per LoRA: ``id`` and every label column
    DIR/splits.json                 {"train": [ids], "validation": [ids], "test": [ids]}
    DIR/shards/NNNNN.safetensors    factors, stacked per module group, example-major

``schema.json`` holds ``format`` (``"gllora.dataset"``), ``version``, ``num_examples``,
``modules`` (``[{"name", "n", "m"}]`` in order), ``groups`` (same-shaped modules, as
:class:`gllora.lora.GroupSpec`), ``extras``, ``columns`` (``{column: "float" | "int" |
"bool" | "str"}``), ``targets`` (``{name: {"task", "columns"[, "classes"]}}``),
``shards`` (``[{"file", "num_examples", "ranks", "bytes"}]``) and ``provenance``.

Each shard holds examples of one *rank signature* (the stored rank of every module
group: the largest true rank among the group's modules), so examples of different
ranks coexist without padding on disk. In a shard, group ``g`` is stored as
``g{g}.u [N_s, k, n, r]``, ``g{g}.v [N_s, k, m, r]`` (float32, columns past a module's
true rank are zero), ``g{g}.rank [N_s, k]`` (int32 true ranks), extras as
``extra.{kind}.{name} [N_s, size]``, and ``ids [N_s]`` (int64 example ids). Reading
maps the shards into memory and copies only the rows a batch needs, so a dataset
larger than memory streams: mapped file pages are page cache, which the kernel
reclaims, not process memory. A batch pads each group to the largest rank in the
batch, which is exact (zero columns), and keeps every module's true rank.

Shapes, names and dtypes are checked against the schema when writing (every
:meth:`DatasetWriter.add`) and when reading (:func:`open` checks every file's header
and the small files; :meth:`Dataset.batch` checks the ranks it reads). Errors are
``ValueError`` (or ``FileNotFoundError``) naming the file at fault.

This module reads and writes numpy: :meth:`Dataset.batch` wraps numpy arrays in a
:class:`gllora.Lora` without copying them to a device.
"""

from __future__ import annotations

import builtins
import collections
import csv
import json
import math
import mmap
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self

import numpy as np

from gllora.io import _safetensors
from gllora.lora import GroupSpec, Lora, LoraSpec

FORMAT = "gllora.dataset"
VERSION = 1
TASKS = ("regression", "binary", "multilabel", "categorical")
LAYOUTS = ("leading", "rank_major")
KINDS = ("float", "int", "bool", "str")
_SHARD_BYTES = 128 << 20  # target shard size; a shard is written when its buffer reaches it
_MAX_MAPPED_SHARDS = 64  # shards kept mapped at once (each map holds a file descriptor)
# rank_major batches are transposed through a buffer of _CHUNK_BYTES for _BLOCK_EXAMPLES
# examples at a time (measured best of 8-128 examples, 0.5-4 MB, at Qwen2 k/v shapes).
_CHUNK_BYTES = 2 << 20
_BLOCK_EXAMPLES = 16


# -- schema helpers -----------------------------------------------------------------


def _spec_from_modules(
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


def _spec_to_json(spec: LoraSpec) -> dict[str, Any]:
    shapes = spec.shapes()
    return {
        "modules": [
            {"name": name, "n": shapes[name][0], "m": shapes[name][1]} for name in spec.order
        ],
        "groups": [{"key": g.key, "n": g.n, "m": g.m, "names": list(g.names)} for g in spec.groups],
        "extras": {kind: list(names) for kind, names in spec.extras},
    }


def _spec_from_json(d: Mapping[str, Any], where: str) -> LoraSpec:
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


def _column_kind(values: np.ndarray, where: str) -> str:
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


def _parse_cell(text: str, kind: str) -> Any:
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


def _format_cell(value: Any, kind: str) -> str:
    if kind == "float":
        return repr(float(value))  # shortest round-trip text: the table is exact
    if kind == "bool":
        return "1" if bool(value) else "0"
    if kind == "int":
        return str(int(value))
    return str(value)


def _check_targets(targets: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, dict]:
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


def _check_target_kinds(targets, columns: Mapping[str, str], where: str) -> None:
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


# -- writing -------------------------------------------------------------------------


class DatasetWriter:
    """Writes a dataset folder, batch by batch, with bounded memory.

    Everything is written to ``path + ".partial"`` and moved to ``path`` by
    :meth:`close`, so a folder at ``path`` is always complete. Use as a context
    manager to close on success and discard the partial folder on an exception.

    Args:
      path: the folder to create. An existing non-empty folder is refused unless
        ``overwrite=True``, and then only if it is a dataset folder (has a
        ``schema.json``); it is replaced when the writer closes.
      modules: ``[(name, n, m), ...]`` in order, or a :class:`LoraSpec`.
      targets: ``{name: {"task": one of TASKS, "columns": [...]}}``: what a model can be
        trained to predict. Binary and multi-label columns must be bool (or 0/1 ints);
        binary and categorical targets have one column.
      provenance: free JSON describing where the data came from.
      extras: ``{kind: [module names]}`` of invariant per-module extra inputs, if any.
      shard_bytes: target shard size in bytes.

    Raises:
      ValueError: naming ``path``, for any of the above that is malformed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        modules: Sequence[tuple[str, int, int]] | LoraSpec,
        targets: Mapping[str, Mapping[str, Any]] | None = None,
        provenance: Mapping[str, Any] | None = None,
        extras: Mapping[str, Sequence[str]] | None = None,
        overwrite: bool = False,
        shard_bytes: int = _SHARD_BYTES,
    ):
        # normpath: "out/" + ".partial" must not land inside "out".
        self.path = os.path.normpath(os.fspath(path))
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise ValueError(f"{self.path}: exists and is not a folder")
            if os.listdir(self.path):
                if not overwrite:
                    raise ValueError(
                        f"{self.path}: folder exists and is not empty (pass overwrite=True "
                        "to replace a dataset folder)"
                    )
                if not os.path.isfile(os.path.join(self.path, "schema.json")):
                    raise ValueError(
                        f"{self.path}: overwrite=True replaces only a dataset folder (one "
                        "with a schema.json); this folder holds something else"
                    )
        self.spec = _spec_from_modules(modules, extras, self.path)
        self.targets = _check_targets(targets or {}, self.path)
        self.provenance = dict(provenance or {})
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: provenance must be JSON-serializable ({e})") from None
        self._shard_bytes = int(shard_bytes)
        self._tmp = self.path + ".partial"
        if os.path.exists(self._tmp):
            shutil.rmtree(self._tmp)
        os.makedirs(os.path.join(self._tmp, "shards"))
        self._buffers: dict[tuple[int, ...], list[dict[str, np.ndarray]]] = {}
        self._buffer_bytes: dict[tuple[int, ...], int] = {}
        self._shards: list[dict[str, Any]] = []
        self._columns: dict[str, str] = {}
        self._labels: dict[str, list[Any]] = {}
        self._extra_sizes: dict[tuple[str, str], int] | None = None
        self._count = 0
        self._closed = False

    @property
    def num_examples(self) -> int:
        """Examples added so far."""
        return self._count

    # -- adding ---------------------------------------------------------------
    def add(
        self,
        factors: Mapping[str, tuple[Any, Any]],
        labels: Mapping[str, Any],
        extras: Mapping[str, Mapping[str, Any]] | None = None,
        ranks: Mapping[str, Any] | None = None,
    ) -> None:
        """Adds a batch of ``B`` LoRAs. A rejected batch leaves the writer unchanged.

        Args:
          factors: ``{name: (u [B, n, r], v [B, m, r])}``, exactly the writer's modules;
            ``r`` may differ between modules. Float; stored as float32.
          labels: ``{column: [B] values}`` (float, int, bool or str); the same columns in
            every call. An int or bool batch may follow a float one, not the reverse.
          extras: ``{kind: {name: [B, size]}}`` for the declared extras.
          ranks: optional ``{name: [B] ints}``, the true rank of each LoRA's module when
            a batch of mixed ranks is given zero-padded to ``r`` columns (the columns
            past the true rank must be zero). Default: ``r``.

        Raises:
          ValueError: naming the module (or column) and shapes, for missing or unknown
            modules, wrong shapes or ranks, NaN/Inf, non-zero padding, changed label
            columns or kinds, labels a target's task cannot take.
        """
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        arrays, true_ranks, batch = self._check_factors(factors, ranks)
        if batch == 0:
            return
        new_labels, kinds = self._check_labels(labels, batch)
        extras_arrays = self._check_extras(extras or {}, batch)
        # Everything is valid: only now is the writer's state changed.
        self._columns.update(kinds)
        for col, values in new_labels.items():
            self._labels.setdefault(col, []).extend(values)
        if self._extra_sizes is None:
            self._extra_sizes = {
                (kind, name): x.shape[1]
                for kind, per in extras_arrays.items()
                for name, x in per.items()
            }
        per_example = (
            sum((u.shape[1] + v.shape[1]) * u.shape[2] * 4 for u, v in arrays.values()) or 1
        )
        chunk = max(1, self._shard_bytes // (2 * per_example))
        for start in range(0, batch, chunk):
            sl = slice(start, min(batch, start + chunk))
            self._add_block(
                {name: (u[sl], v[sl]) for name, (u, v) in arrays.items()},
                {name: r[sl] for name, r in true_ranks.items()},
                {
                    kind: {name: x[sl] for name, x in per.items()}
                    for kind, per in extras_arrays.items()
                },
            )

    def add_lora(self, lora: Lora, labels: Mapping[str, Any]) -> None:
        """Adds one unbatched :class:`Lora` (true ranks kept) with its labels (scalars)."""
        if lora.batch_shape:
            raise ValueError(f"{self.path}: add_lora takes one LoRA, got batch {lora.batch_shape}")
        if lora.spec.order != self.spec.order or lora.spec.groups != self.spec.groups:
            raise ValueError(
                f"{self.path}: LoRA differs from the schema: "
                + "; ".join(self.spec.diff(lora.spec) or ["module order or grouping"])
            )
        factors = {}
        for name in lora.names:
            u, v = (np.asarray(x) for x in lora.factors(name))
            r = int(lora.rank_of(name))
            factors[name] = (u[None, :, :r], v[None, :, :r])
        extras = {
            kind: {name: np.asarray(x)[None] for name, x in per.items()}
            for kind, per in lora.extras.items()
        }
        self.add(factors, {k: [v] for k, v in labels.items()}, extras)

    def _check_factors(self, factors, ranks):
        if not isinstance(factors, Mapping):
            raise ValueError(f"{self.path}: factors must be a mapping {{name: (u, v)}}")
        shapes = self.spec.shapes()
        missing = [n for n in self.spec.order if n not in factors]
        unknown = [n for n in factors if n not in shapes]
        if missing or unknown:
            raise ValueError(
                f"{self.path}: add() modules differ from the schema: missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
        if ranks is not None and set(ranks) - set(shapes):
            raise ValueError(
                f"{self.path}: ranks given for unknown modules {sorted(set(ranks) - set(shapes))[:5]}"
            )
        batch = None
        arrays, true_ranks = {}, {}
        for name in self.spec.order:
            pair = factors[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{self.path}: module {name!r}: expected a pair (u, v)")
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
                    f"{self.path}: module {name!r}: expected u [B, {n}, r] and "
                    f"v [B, {m}, r] with r >= 1, got u {list(u.shape)} and v {list(v.shape)}"
                )
            if batch is None:
                batch = u.shape[0]
            if u.shape[0] != batch:
                raise ValueError(
                    f"{self.path}: module {name!r} has batch {u.shape[0]}, others {batch}"
                )
            checked = []
            for what, x in (("u", u), ("v", v)):
                if not np.issubdtype(x.dtype, np.floating):
                    raise ValueError(
                        f"{self.path}: module {name!r}: {what} {list(x.shape)} has dtype "
                        f"{x.dtype}, expected floating point"
                    )
                with np.errstate(over="ignore"):
                    x = np.ascontiguousarray(x, np.float32)
                if not np.isfinite(x).all():
                    raise ValueError(
                        f"{self.path}: module {name!r}: {what} {list(x.shape)} has NaN/Inf "
                        "entries (in float32)"
                    )
                checked.append(x)
            u, v = checked
            r = u.shape[2]
            if ranks is not None and name in ranks:
                rk = np.asarray(ranks[name])
                if rk.shape != (batch,) or not np.issubdtype(rk.dtype, np.integer):
                    raise ValueError(
                        f"{self.path}: module {name!r}: ranks must be [B={batch}] ints, got "
                        f"{rk.dtype} {list(rk.shape)}"
                    )
                if batch and (rk.min() < 1 or rk.max() > r):
                    raise ValueError(
                        f"{self.path}: module {name!r}: ranks must be in [1, {r}], got "
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
                            f"{self.path}: module {name!r}: example {b} of the batch has rank "
                            f"{rk[b]} but non-zero columns past it in u [{n}, {r}] or v "
                            f"[{m}, {r}]"
                        )
                true_ranks[name] = rk.astype(np.int32)
            else:
                true_ranks[name] = np.full(batch, r, np.int32)
            arrays[name] = (u, v)
        return arrays, true_ranks, batch

    def _check_labels(self, labels, batch: int) -> tuple[dict[str, list], dict[str, str]]:
        if not isinstance(labels, Mapping):
            raise ValueError(f"{self.path}: labels must be a mapping {{column: [B] values}}")
        if "id" in labels:
            raise ValueError(f"{self.path}: label column 'id' is reserved for the example index")
        if self._count and set(labels) != set(self._columns):
            raise ValueError(
                f"{self.path}: label columns changed: missing "
                f"{sorted(set(self._columns) - set(labels))}, new "
                f"{sorted(set(labels) - set(self._columns))} (every add() gives every column)"
            )
        values_out, kinds = {}, {}
        for col, values in labels.items():
            where = f"{self.path}: label {col!r}"
            if not isinstance(col, str) or not col or col != col.strip():
                raise ValueError(
                    f"{self.path}: label column names must be non-empty strings "
                    f"without surrounding spaces, got {col!r}"
                )
            values = np.asarray(values)
            if values.shape != (batch,):
                raise ValueError(f"{where} has shape {list(values.shape)}, expected [{batch}]")
            kind = _column_kind(values, where)
            known = self._columns.get(col, kind)
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
        if not self._count:  # the first batch fixes the columns: check the targets now
            _check_target_kinds(self.targets, kinds, self.path)
        for name, t in self.targets.items():
            if t["task"] in ("binary", "multilabel"):
                for c in t["columns"]:
                    if kinds[c] == "int" and not set(values_out[c]) <= {0, 1}:
                        raise ValueError(
                            f"{self.path}: {t['task']} target {name!r}: column {c!r} has "
                            f"values other than 0/1: {sorted(set(values_out[c]) - {0, 1})[:5]}"
                        )
        return values_out, kinds

    def _check_extras(self, extras, batch):
        declared = {kind: set(names) for kind, names in self.spec.extras}
        given = {kind: set(per) for kind, per in extras.items()}
        if declared != given:
            raise ValueError(
                f"{self.path}: extras {sorted((k, sorted(v)) for k, v in given.items())} "
                f"differ from the declared {sorted((k, sorted(v)) for k, v in declared.items())}"
            )
        out = {}
        for kind, per in extras.items():
            out[kind] = {}
            for name, x in per.items():
                x = np.ascontiguousarray(x, np.float32)
                size = (self._extra_sizes or {}).get((kind, name))
                if (
                    x.ndim != 2
                    or x.shape[0] != batch
                    or (size is not None and x.shape[1] != size)
                    or not np.isfinite(x).all()
                ):
                    raise ValueError(
                        f"{self.path}: module {name!r}: extra {kind!r} must be a finite "
                        f"[B={batch}, {size or 'size'}] array, got {list(x.shape)}"
                    )
                out[kind][name] = x
        return out

    def _add_block(self, arrays, true_ranks, extras) -> None:
        """Appends ``B`` validated examples, grouped by rank signature, to the buffers."""
        batch = next(iter(true_ranks.values())).shape[0]
        ids = np.arange(self._count, self._count + batch, dtype=np.int64)
        group_ranks = [
            np.stack([true_ranks[name] for name in g.names], axis=1) for g in self.spec.groups
        ]  # per group [B, k]
        signature = np.stack([r.max(axis=1) for r in group_ranks], axis=1)  # [B, groups]
        keys, inverse = np.unique(signature, axis=0, return_inverse=True)
        for ki, key in enumerate(keys):
            sel = np.flatnonzero(inverse.reshape(-1) == ki)
            whole = len(sel) == batch
            block: dict[str, np.ndarray] = {"ids": ids[sel]}
            for gi, (group, r) in enumerate(zip(self.spec.groups, key)):
                r = int(r)
                for what, j, size in (("u", 0, group.n), ("v", 1, group.m)):
                    out = np.zeros((len(sel), len(group.names), size, r), np.float32)
                    for i, name in enumerate(group.names):
                        x = arrays[name][j]
                        w = min(r, x.shape[2])
                        out[:, i, :, :w] = (x if whole else x[sel])[:, :, :w]
                    block[f"g{gi}.{what}"] = out
                block[f"g{gi}.rank"] = group_ranks[gi][sel]
            for kind, names in self.spec.extras:
                for name in names:
                    block[f"extra.{kind}.{name}"] = extras[kind][name][sel]
            key_t = tuple(int(r) for r in key)
            self._buffers.setdefault(key_t, []).append(block)
            self._buffer_bytes[key_t] = self._buffer_bytes.get(key_t, 0) + sum(
                x.nbytes for x in block.values()
            )
            if self._buffer_bytes[key_t] >= self._shard_bytes:
                self._flush(key_t)
        self._count += batch
        # Many rank signatures could each hold almost a shard: bound the total.
        while sum(self._buffer_bytes.values()) > 4 * self._shard_bytes:
            self._flush(max(self._buffer_bytes, key=self._buffer_bytes.get))

    def _flush(self, key: tuple[int, ...]) -> None:
        blocks = self._buffers.pop(key, [])
        self._buffer_bytes.pop(key, None)
        if not blocks:
            return
        filename = f"shards/{len(self._shards):05d}.safetensors"
        full = os.path.join(self._tmp, filename)
        _write_blocks(full, blocks)
        self._shards.append(
            {
                "file": filename,
                "num_examples": sum(len(b["ids"]) for b in blocks),
                "ranks": list(key),
                "bytes": os.path.getsize(full),
            }
        )

    # -- closing ----------------------------------------------------------------
    def close(
        self,
        splits: Mapping[str, Sequence[int]] | None = None,
        split_seed: int = 0,
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
    ) -> str:
        """Writes the remaining shards, the labels, the splits and the schema.

        Idempotent: closing a closed writer returns the path.

        Args:
          splits: explicit ``{split name: ids}`` (disjoint, need not cover every id);
            else a deterministic shuffle with ``split_seed`` cut at ``fractions``
            into ``train``, ``validation``, ``test``.
          split_seed: seeds the shuffle.
          fractions: three non-negative numbers summing to 1.

        Returns:
          The dataset folder path.
        """
        if self._closed:
            return self.path
        if self._count == 0:
            raise ValueError(f"{self.path}: no examples were added")
        split_ids = self._make_splits(splits, split_seed, fractions)
        targets = self._finish_targets()
        for key in list(self._buffers):
            self._flush(key)
        with builtins.open(os.path.join(self._tmp, "labels.csv"), "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            cols = list(self._columns)
            writer.writerow(["id", *cols])
            for i in range(self._count):
                writer.writerow(
                    [i, *(_format_cell(self._labels[c][i], self._columns[c]) for c in cols)]
                )
        with builtins.open(os.path.join(self._tmp, "splits.json"), "w") as f:
            json.dump({k: [int(i) for i in v] for k, v in split_ids.items()}, f)
        schema = {
            "format": FORMAT,
            "version": VERSION,
            "num_examples": self._count,
            **_spec_to_json(self.spec),
            "columns": dict(self._columns),
            "targets": targets,
            "shards": self._shards,
            "provenance": self.provenance,
        }
        with builtins.open(os.path.join(self._tmp, "schema.json"), "w") as f:
            json.dump(schema, f, indent=1)
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discards everything written so far (the partial folder); the writer is closed."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._buffers.clear()
        self._closed = True

    def _finish_targets(self) -> dict[str, Any]:
        _check_target_kinds(self.targets, self._columns, self.path)
        out = {}
        for name, t in self.targets.items():
            entry = dict(t)
            if t["task"] == "categorical":
                entry["classes"] = sorted(set(self._labels[t["columns"][0]]))
            out[name] = entry
        return out

    def _make_splits(self, splits, seed, fractions) -> dict[str, np.ndarray]:
        if splits is not None:
            out = {}
            for k, v in splits.items():
                ids = np.asarray(v)
                if (
                    not isinstance(k, str)
                    or ids.ndim != 1
                    or (ids.size and not np.issubdtype(ids.dtype, np.integer))
                ):
                    raise ValueError(f"{self.path}: split {k!r} must be a 1-d list of int ids")
                out[k] = ids.astype(np.int64)
            allv = np.concatenate(list(out.values())) if out else np.zeros(0, np.int64)
            if len(np.unique(allv)) != len(allv) or (
                len(allv) and (allv.min() < 0 or allv.max() >= self._count)
            ):
                raise ValueError(
                    f"{self.path}: splits overlap or name ids outside [0, {self._count})"
                )
            return out
        if len(fractions) != 3 or not math.isclose(sum(fractions), 1.0) or min(fractions) < 0:
            raise ValueError(
                f"{self.path}: fractions must be 3 non-negative numbers summing to 1, "
                f"got {list(fractions)}"
            )
        perm = np.random.default_rng(seed).permutation(self._count)
        # Cut at rounded cumulative fractions, so a zero fraction gives an empty split.
        a, b = (round(float(x) * self._count) for x in np.cumsum(fractions)[:2])
        return {
            "train": np.sort(perm[:a]),
            "validation": np.sort(perm[a:b]),
            "test": np.sort(perm[b:]),
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_blocks(path: str, blocks: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Writes blocks of rows as one safetensors file, each tensor the blocks concatenated.

    The same bytes as ``safetensors.numpy.save_file`` of the concatenated tensors, without
    concatenating them in memory first (a shard is written straight from its buffer).
    """
    names = {"<f4": "F32", "<i4": "I32", "<i8": "I64"}
    keys = sorted(blocks[0], key=lambda k: (-blocks[0][k].dtype.itemsize, k))
    header, offset = {}, 0
    for key in keys:
        first = blocks[0][key]
        rows = sum(b[key].shape[0] for b in blocks)
        size = sum(b[key].nbytes for b in blocks)
        header[key] = {
            "dtype": names[first.dtype.str],
            "shape": [rows, *first.shape[1:]],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors pads it
    with builtins.open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in keys:
            for b in blocks:
                f.write(np.ascontiguousarray(b[key]).data)


# -- reading ------------------------------------------------------------------------


_NUMPY_DTYPES = {"F32": "<f4", "I32": "<i4", "I64": "<i8"}  # the dtypes a shard holds


class _Mapped:
    """One shard's file mapped read-only, with its tensors as numpy views of the map."""

    def __init__(self, header: _safetensors.Header):
        with builtins.open(header.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.tensors = {}
        for key, e in header.entries.items():
            dtype = np.dtype(_NUMPY_DTYPES[e.dtype])
            count = math.prod(e.shape)
            self.tensors[key] = np.frombuffer(self.map, dtype, count=count, offset=e.start).reshape(
                e.shape
            )
        self.entries = header.entries

    def willneed(self, key: str, rows: np.ndarray) -> None:
        """Asks the kernel to start reading the given rows of ``key`` (cold page cache)."""
        e = self.entries[key]
        n = e.shape[0]
        row_bytes = (e.end - e.start) // n if n else 0
        for row in rows.tolist():
            start = e.start + row * row_bytes
            aligned = start - start % mmap.PAGESIZE
            self.map.madvise(mmap.MADV_WILLNEED, aligned, start + row_bytes - aligned)


def _runs(rows: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, dst, length)`` runs where both rows and destinations are consecutive."""
    if len(rows) == 1:
        return [(int(rows[0]), int(dst[0]), 1)]
    cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(rows)]])
    return [(int(rows[s]), int(dst[s]), int(e - s)) for s, e in zip(starts, ends)]


class Dataset:
    """A dataset folder opened for reading (see the module docstring). Use :func:`open`.

    Attributes:
      path: the folder.
      schema: the parsed ``schema.json``.
      num_examples: ``N``.
      spec: the :class:`LoraSpec` of every example.
      targets: ``{name: {"task", "columns"[, "classes"]}}``.
      columns: ``{column: kind}``, kind one of ``float``, ``int``, ``bool``, ``str``.
      provenance: free JSON from the writer.
      labels: ``{column: [N]}`` (float64, int64, bool or str arrays).
      splits: ``{split: [ids]}`` int64 arrays.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: no such dataset folder")
        schema_path = os.path.join(self.path, "schema.json")
        self.schema = self._read_schema(schema_path)
        self.spec = _spec_from_json(self.schema, schema_path)
        self.num_examples = self.schema["num_examples"]
        self.columns: dict[str, str] = self.schema["columns"]
        self.targets: dict[str, dict[str, Any]] = self.schema["targets"]
        self.provenance: dict[str, Any] = self.schema.get("provenance", {})
        _check_targets(self.targets, schema_path)
        _check_target_kinds(self.targets, self.columns, schema_path)
        self.labels = self._read_labels()
        self.splits = self._read_splits()
        self._entries = self.schema["shards"]
        self._headers = [self._check_shard(s) for s in self._entries]
        self._shard_of = np.full(self.num_examples, -1, np.int64)
        self._row_of = np.full(self.num_examples, -1, np.int64)
        for si, header in enumerate(self._headers):
            with _safetensors.TensorReader(header) as reader:
                ids = reader.read("ids")
            if len(ids) and (ids.min() < 0 or ids.max() >= self.num_examples):
                raise ValueError(f"{header.path}: example ids outside [0, {self.num_examples})")
            if (self._shard_of[ids] >= 0).any() or len(np.unique(ids)) != len(ids):
                raise ValueError(f"{header.path}: holds example ids that are stored twice")
            self._shard_of[ids] = si
            self._row_of[ids] = np.arange(len(ids))
        if (self._shard_of < 0).any():
            missing = np.flatnonzero(self._shard_of < 0)
            raise ValueError(
                f"{self.path}: {len(missing)} examples are in no shard "
                f"(first: {missing[:5].tolist()}); the folder is incomplete"
            )
        self._ranks = np.asarray([s["ranks"] for s in self._entries], np.int64)  # [S, groups]
        self._mapped: collections.OrderedDict[int, _Mapped] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Dataset({self.path!r}, {self.num_examples} LoRAs, {len(self.spec.order)} modules, "
            f"targets={sorted(self.targets)})"
        )

    def __len__(self) -> int:
        return self.num_examples

    def unmap(self) -> None:
        """Drops the shards' memory maps (each holds a file descriptor). The dataset stays
        usable: the next batch maps what it reads again. Also called on leaving a
        ``with dataset.open(path) as ds:`` block."""
        with self._lock:
            self._mapped.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (for worker processes): maps and the lock are per process.
        state = dict(self.__dict__)
        state["_mapped"] = collections.OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading the small files ------------------------------------------------
    def _read_schema(self, path: str) -> dict[str, Any]:
        try:
            with builtins.open(path, "rb") as f:
                schema = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: missing; is {self.path} a gllora dataset folder?"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"{path}: the schema must be a JSON object")
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

    def _read_labels(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, "labels.csv")
        try:
            f = builtins.open(path, newline="", encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing from the dataset folder") from None
        expected = ["id", *self.columns]
        values: dict[str, list[Any]] = {c: [] for c in self.columns}
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
                    for col, cell in zip(self.columns, row[1:]):
                        try:
                            values[col].append(_parse_cell(cell, self.columns[col]))
                        except ValueError as e:
                            raise ValueError(
                                f"{path}:{line}: column {col!r} ({self.columns[col]}): {e}"
                            ) from None
                    rows += 1
            except (csv.Error, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a readable CSV table ({e})") from None
        if rows != self.num_examples:
            raise ValueError(f"{path}: {rows} rows, the schema says {self.num_examples}")
        types = {"float": np.float64, "int": np.int64, "bool": np.bool_, "str": np.str_}
        out = {c: np.asarray(v, types[self.columns[c]]) for c, v in values.items()}
        for name, t in self.targets.items():
            if t["task"] in ("binary", "multilabel"):
                for c in t["columns"]:
                    if self.columns[c] == "int" and not np.isin(out[c], (0, 1)).all():
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

    def _read_splits(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, "splits.json")
        try:
            with builtins.open(path, "rb") as f:
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
            bad = ids[(ids < 0) | (ids >= self.num_examples)]
            if len(bad):
                raise ValueError(
                    f"{path}: split {k!r} names ids outside [0, {self.num_examples}): "
                    f"{bad[:5].tolist()}"
                )
            out[k] = ids
        allv = np.concatenate(list(out.values())) if out else np.zeros(0, np.int64)
        if len(np.unique(allv)) != len(allv):
            raise ValueError(f"{path}: splits overlap or repeat ids")
        return out

    def _check_shard(self, entry: Mapping[str, Any]) -> _safetensors.Header:
        """Validates one shard's header against the schema (reads no tensor data)."""
        rel = entry["file"]
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise ValueError(
                f"{os.path.join(self.path, 'schema.json')}: shard file {rel!r} is not inside "
                "the dataset folder"
            )
        file = os.path.join(self.path, rel)
        try:
            header = _safetensors.read_header(file)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{file}: missing (listed in {os.path.join(self.path, 'schema.json')})"
            ) from None
        if "bytes" in entry and header.file_size != entry["bytes"]:
            raise ValueError(
                f"{file}: {header.file_size} bytes, the schema says {entry['bytes']}; the shard "
                "was truncated or changed"
            )
        num = entry["num_examples"]
        want = {"ids": ("I64", (num,))}
        for gi, (group, r) in enumerate(zip(self.spec.groups, entry["ranks"])):
            k = len(group.names)
            want[f"g{gi}.u"] = ("F32", (num, k, group.n, r))
            want[f"g{gi}.v"] = ("F32", (num, k, group.m, r))
            want[f"g{gi}.rank"] = ("I32", (num, k))
        for kind, names in self.spec.extras:
            for name in names:
                want[f"extra.{kind}.{name}"] = ("F32", None)
        got = header.entries
        if set(got) != set(want):
            raise ValueError(
                f"{file}: tensors differ from the schema: unexpected "
                f"{sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}"
            )
        for key, (dtype, shape) in want.items():
            e = got[key]
            if shape is None:  # an extra: [N_s, size]
                ok = len(e.shape) == 2 and e.shape[0] == num
                shape_text = f"[{num}, size]"
            else:
                ok = e.shape == shape
                shape_text = str(list(shape))
            if not ok or e.dtype != dtype:
                what = ""
                if key.startswith("g") and "." in key:
                    what = f" for modules {self.spec.groups[int(key[1:].split('.')[0])].describe()}"
                raise ValueError(
                    f"{file}: tensor {key!r} is {e.dtype} {list(e.shape)}, the schema says "
                    f"{dtype} {shape_text}{what}"
                )
        return header

    # -- reading factors ----------------------------------------------------------
    def _map(self, si: int) -> _Mapped:
        with self._lock:
            mapped = self._mapped.get(si)
            if mapped is None:
                mapped = self._mapped[si] = _Mapped(self._headers[si])
                # Dropping a map closes it once no batch in flight still uses it.
                while len(self._mapped) > _MAX_MAPPED_SHARDS:
                    self._mapped.popitem(last=False)
            else:
                self._mapped.move_to_end(si)
            return mapped

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"{self.path}: batch indices must be a non-empty 1-d list of ints, got "
                f"{idx.dtype} {list(idx.shape)}"
            )
        if idx.min() < 0 or idx.max() >= self.num_examples:
            raise ValueError(f"{self.path}: indices outside [0, {self.num_examples})")
        return idx.astype(np.int64)

    def batch(
        self,
        indices: Sequence[int] | np.ndarray,
        layout: str = "leading",
        ranks: Sequence[int] | None = None,
    ) -> Lora:
        """Reads a batch of LoRAs into numpy arrays wrapped in a :class:`Lora`.

        Each group is zero-padded to one rank for the batch (exact: ``u v^T`` is
        unchanged); ``rank`` keeps every module's true rank.

        Args:
          indices: example ids, ``[B]``, in the order wanted (repeats allowed).
          layout: ``"leading"`` (``u [B, k, n, r]``, ``v [B, k, m, r]``, ``rank [B, k]``,
            extras ``[B, size]``) or ``"rank_major"`` (``u [k, n, B, r]``, ``v [k, m, B,
            r]``, ``rank [k, B]``, extras ``[size, B]``; see :func:`gllora.in_axes`).
          ranks: pad group ``g`` to ``ranks[g]`` (fixed shapes for jit, e.g.
            :meth:`max_ranks`); default: the largest stored rank of the batch per group.

        Returns:
          A :class:`Lora` of fresh numpy arrays (float32 factors, int32 ranks).

        Raises:
          ValueError: for bad indices, layout or ranks (a requested rank below an
            example's stored rank names the example), or a shard whose true ranks
            disagree with its stored rank (naming the shard).
        """
        idx = self._check_indices(indices)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown batch layout {layout!r}; known: {LAYOUTS}")
        shard_ids, rows = self._shard_of[idx], self._row_of[idx]
        stored = self._ranks[shard_ids]  # [B, groups]
        num_groups = len(self.spec.groups)
        if ranks is None:
            ranks = stored.max(axis=0).tolist()
        else:
            ranks = [int(r) for r in ranks]
            if len(ranks) != num_groups:
                raise ValueError(
                    f"{self.path}: {len(ranks)} ranks given for {num_groups} module groups"
                )
            low = stored > np.asarray(ranks)[None, :]
            if low.any():
                b, gi = (int(x) for x in np.argwhere(low)[0])
                raise ValueError(
                    f"{self.path}: example {idx[b]} has rank {stored[b, gi]} in group "
                    f"{self.spec.groups[gi].describe()}, more than the requested {ranks[gi]}"
                )
        B = len(idx)
        # Read each shard's rows in file order, as runs of consecutive rows where possible.
        order = np.lexsort((rows, shard_ids))
        plan = []
        for si in np.unique(shard_ids).tolist():
            pos = order[shard_ids[order] == si]
            plan.append((si, self._map(si), _runs(rows[pos], pos), pos, rows[pos]))
        for si, mapped, runs, pos, rws in plan:
            for gi in range(num_groups):
                for what in ("u", "v"):
                    mapped.willneed(f"g{gi}.{what}", np.unique(rws))
        us, vs, rank_out = [], [], []
        for gi, group in enumerate(self.spec.groups):
            k, r = len(group.names), ranks[gi]
            rank = np.empty((B, k), np.int32)
            for si, mapped, runs, pos, rws in plan:
                got = mapped.tensors[f"g{gi}.rank"][rws]
                rs = int(self._ranks[si, gi])
                if (got < 1).any() or (got > rs).any() or (got.max(axis=1) != rs).any():
                    raise ValueError(
                        f"{self._headers[si].path}: tensor 'g{gi}.rank' holds "
                        f"ranks {np.unique(got).tolist()[:5]} that disagree with the shard's "
                        f"stored rank {rs} for modules {group.describe()}"
                    )
                rank[pos] = got
            for what, size in (("u", group.n), ("v", group.m)):
                if layout == "leading":
                    out = self._gather_leading(plan, gi, what, B, k, size, r)
                else:
                    out = self._gather_rank_major(plan, gi, what, B, k, size, r)
                (us if what == "u" else vs).append(out)
            rank_out.append(rank if layout == "leading" else np.ascontiguousarray(rank.T))
        extras = {}
        for kind, names in self.spec.extras:
            extras[kind] = {}
            for name in names:
                key = f"extra.{kind}.{name}"
                size = self._headers[plan[0][0]].entries[key].shape[1]
                x = np.empty((B, size), np.float32)
                for si, mapped, runs, pos, rws in plan:
                    x[pos] = mapped.tensors[key][rws]
                extras[kind][name] = x if layout == "leading" else np.ascontiguousarray(x.T)
        return Lora(self.spec, us, vs, rank_out, extras)

    def _gather_leading(self, plan, gi, what, B, k, size, r) -> np.ndarray:
        out = np.zeros((B, k, size, r), np.float32)
        for si, mapped, runs, _, _ in plan:
            src = mapped.tensors[f"g{gi}.{what}"]
            rs = src.shape[-1]
            for row, dst, n in runs:
                if rs == r:
                    out[dst : dst + n] = src[row : row + n]
                else:
                    out[dst : dst + n, ..., :rs] = src[row : row + n]
        return out

    def _gather_rank_major(self, plan, gi, what, B, k, size, r) -> np.ndarray:
        # [k, size, B, r] is [K, B, r] with K = k * size rows; each example's factors are
        # one contiguous [K, rs] block in its shard. For each block of at most
        # _BLOCK_EXAMPLES examples, rows are copied through an L2-sized [block, chunk, r]
        # buffer, then moved by one transposing copy per chunk, each row of r floats as
        # one opaque element (numpy copies those several times faster than r floats).
        K = k * size
        out = np.empty((k, size, B, r), np.float32)
        row_type = np.dtype((np.void, 4 * r))
        dst = out.reshape(K, B, r).view(row_type)[..., 0]  # [K, B]
        sources = [
            (mapped.tensors[f"g{gi}.{what}"].reshape(-1, K, self._ranks[si, gi]), runs)
            for si, mapped, runs, _, _ in plan
        ]
        for b0 in range(0, B, _BLOCK_EXAMPLES):
            b1 = min(B, b0 + _BLOCK_EXAMPLES)
            pieces = []  # (source, row, buffer row, length, stored rank) inside [b0, b1)
            for src, runs in sources:
                for row, d, n in runs:
                    lo, hi = max(d, b0), min(d + n, b1)
                    if lo < hi:
                        pieces.append((src, row + lo - d, lo - b0, hi - lo, src.shape[-1]))
            chunk = min(K, max(1, _CHUNK_BYTES // (4 * r * (b1 - b0))))
            buf = np.zeros((b1 - b0, chunk, r), np.float32)  # columns past rs stay zero
            buf_rows = buf.view(row_type)[..., 0]  # [block, chunk]
            for c in range(0, K, chunk):
                e = min(K, c + chunk)
                for src, row, d, n, rs in pieces:
                    if rs == r:
                        buf[d : d + n, : e - c] = src[row : row + n, c:e]
                    else:
                        buf[d : d + n, : e - c, :rs] = src[row : row + n, c:e]
                dst[c:e, b0:b1] = buf_rows[:, : e - c].T
        return out

    def factors(self, indices: Sequence[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{name: (u [B, n, r], v [B, m, r])}`` for ``indices`` (padded to the batch's ranks)."""
        batch = self.batch(indices)
        out = {}
        for gi, group in enumerate(self.spec.groups):
            for i, name in enumerate(group.names):
                out[name] = (batch.u[gi][:, i], batch.v[gi][:, i])
        return out

    def get(self, index: int) -> Lora:
        """One LoRA (unbatched; each group at its stored rank, true ranks in ``rank``)."""
        return jax_free_unbatch(self.batch([index]))

    def iterate(
        self,
        indices: Sequence[int],
        batch_size: int,
        *,
        layout: str = "leading",
        ranks: Sequence[int] | None = None,
        drop_remainder: bool = False,
        prefetch: int = 0,
    ) -> Iterator[tuple[Lora, np.ndarray]]:
        """Yields ``(batch, ids)`` over ``indices`` in order, in batches of ``batch_size``.

        Args:
          indices: example ids in the order wanted (shuffle them for training).
          batch_size: ``B``; the last batch is smaller unless ``drop_remainder``.
          layout, ranks: as :meth:`batch`.
          drop_remainder: skip a last, smaller batch (one shape for jit).
          prefetch: read up to this many batches ahead in a background thread (0: none),
            so reading overlaps the consumer's work; memory grows by that many batches.
        """
        indices = np.asarray(indices, np.int64)
        if batch_size < 1:
            raise ValueError(f"{self.path}: batch_size must be >= 1, got {batch_size}")
        stop = len(indices) - (len(indices) % batch_size if drop_remainder else 0)
        starts = range(0, stop, batch_size)

        def read(start):
            ids = indices[start : start + batch_size]
            return self.batch(ids, layout=layout, ranks=ranks), ids

        if prefetch <= 0:
            for start in starts:
                yield read(start)
            return
        yield from _prefetched(read, starts, prefetch)

    def max_ranks(self) -> list[int]:
        """The largest stored rank of each group over the whole dataset."""
        return self._ranks.max(axis=0).tolist()

    def target_values(self, name: str) -> np.ndarray:
        """Label matrix of a target, ``[N, num_columns]`` (float64; categorical: class index)."""
        if name not in self.targets:
            raise ValueError(
                f"{self.path}: unknown target {name!r}; targets: {sorted(self.targets)}"
            )
        t = self.targets[name]
        if t["task"] == "categorical":
            lookup = {c: i for i, c in enumerate(t["classes"])}
            col = self.labels[t["columns"][0]].tolist()
            return np.asarray([lookup[c] for c in col], np.float64)[:, None]
        return np.stack([self.labels[c].astype(np.float64) for c in t["columns"]], axis=1)


def _prefetched(read, starts, depth: int) -> Iterator[Any]:
    """``read(s)`` for each ``s`` in ``starts``, computed ``depth`` ahead in a thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = threading.Event()

    def put(item) -> bool:
        while not done.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def work():
        try:
            for s in starts:
                if not put((True, read(s))):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))
            return
        put((False, None))

    thread = threading.Thread(target=work, daemon=True, name="gllora-prefetch")
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        done.set()
        thread.join()


def jax_free_unbatch(batch: Lora) -> Lora:
    """Removes a leading batch axis of size 1 (numpy leaves stay numpy)."""
    return Lora(
        batch.spec,
        [u[0] for u in batch.u],
        [v[0] for v in batch.v],
        [r[0] for r in batch.rank],
        {kind: {name: x[0] for name, x in per.items()} for kind, per in batch.extras.items()},
    )


def open(path: str | os.PathLike) -> Dataset:  # mirrors the builtin on purpose
    """Opens a dataset folder for reading (memory-mapped; validates it against its schema).

    Raises:
      FileNotFoundError: the folder or one of its files is missing (naming it).
      ValueError: naming the file, for anything that disagrees with the schema.
    """
    return Dataset(path)
