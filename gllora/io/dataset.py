"""LoRA dataset folders: sharded safetensors + a JSON schema + a labels table + splits.

A dataset folder is meant to be inspected by hand::

    DIR/schema.json                 modules and shapes, label columns, targets, shards, provenance
    DIR/labels.csv                  one row per LoRA: ``id`` and every label column
    DIR/splits.json                 {"train": [ids], "validation": [ids], "test": [ids]}
    DIR/shards/NNNNN.safetensors    factors, stacked per module group, example-major

Each shard holds examples of one *rank signature* (the stored rank of every module
group), so examples of different ranks coexist without padding on disk. In a shard,
group ``g`` is stored as ``g{g}.u [N_s, k, n, r]``, ``g{g}.v [N_s, k, m, r]``,
``g{g}.rank [N_s, k]`` (true ranks) and ``ids [N_s]`` (example ids). Reading maps the
shards into memory (``np.memmap``) and copies only the rows a batch needs, so a dataset
larger than memory streams. A batch pads each group to the largest rank in the batch,
which is exact (zero columns).

This module imports no JAX: it reads and writes numpy; :meth:`Dataset.batch` wraps the
numpy arrays in a :class:`gllora.Lora` without copying them to a device.
"""

from __future__ import annotations

import builtins
import csv
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gllora.io import _safetensors
from gllora.lora import GroupSpec, Lora, LoraSpec

FORMAT = "gllora.dataset"
VERSION = 1
TASKS = ("regression", "binary", "multilabel", "categorical")
_SHARD_BYTES = 128 << 20  # target shard size; a shard is written when its buffer reaches it


def _spec_from_modules(
    modules: Sequence[tuple[str, int, int]] | LoraSpec,
    extras: Mapping[str, Sequence[str]] | None = None,
) -> LoraSpec:
    if isinstance(modules, LoraSpec):
        return modules
    grouped: dict[tuple[int, int], list[str]] = {}
    seen = set()
    for entry in modules:
        if len(entry) != 3:
            raise ValueError(f"modules must be (name, n, m) triples, got {entry!r}")
        name, n, m = entry
        if not isinstance(name, str) or not name or name in seen:
            raise ValueError(f"module names must be unique non-empty strings, got {name!r}")
        if int(n) <= 0 or int(m) <= 0:
            raise ValueError(f"module {name!r}: shape [{n}, {m}] must be positive")
        seen.add(name)
        grouped.setdefault((int(n), int(m)), []).append(name)
    groups = tuple(GroupSpec(tuple(names), n, m) for (n, m), names in grouped.items())
    extras_spec = tuple((kind, tuple(names)) for kind, names in (extras or {}).items())
    return LoraSpec(order=tuple(e[0] for e in modules), groups=groups, extras=extras_spec)


def _spec_to_json(spec: LoraSpec) -> dict[str, Any]:
    return {
        "modules": [
            {"name": name, "n": n, "m": m}
            for name, (n, m) in ((name, spec.shapes()[name]) for name in spec.order)
        ],
        "groups": [{"key": g.key, "n": g.n, "m": g.m, "names": list(g.names)} for g in spec.groups],
        "extras": {kind: list(names) for kind, names in spec.extras},
    }


def _spec_from_json(d: Mapping[str, Any], where: str) -> LoraSpec:
    try:
        groups = tuple(GroupSpec(tuple(g["names"]), int(g["n"]), int(g["m"])) for g in d["groups"])
        order = tuple(mod["name"] for mod in d["modules"])
        extras = tuple((kind, tuple(names)) for kind, names in d.get("extras", {}).items())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed module list in schema: {e!r}") from None
    spec = LoraSpec(order=order, groups=groups, extras=extras)
    if sorted(order) != sorted(n for g in groups for n in g.names):
        raise ValueError(f"{where}: schema modules and groups disagree")
    return spec


def _column_kind(values: np.ndarray) -> str:
    if values.dtype == np.bool_:
        return "bool"
    if np.issubdtype(values.dtype, np.integer):
        return "int"
    if np.issubdtype(values.dtype, np.floating):
        return "float"
    if values.dtype.kind in "US" or values.dtype == object:
        return "str"
    raise ValueError(f"unsupported label dtype {values.dtype}")


def _parse_cell(text: str, kind: str) -> Any:
    if kind == "float":
        return float(text)
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


class DatasetWriter:
    """Writes a dataset folder, batch by batch, with bounded memory.

    Args:
      path: the folder to create. An existing non-empty folder is refused unless
        ``overwrite=True`` (then it is replaced when the writer closes).
      modules: ``[(name, n, m), ...]`` in order, or a :class:`LoraSpec`.
      targets: ``{name: {"task": one of TASKS, "columns": [...]}}``: what a model can be
        trained to predict. Binary and multi-label columns must be bool (or 0/1 ints).
      provenance: free JSON describing where the data came from.
      extras: ``{kind: [module names]}`` of invariant per-module extra inputs, if any.
      shard_bytes: target shard size in bytes.
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
        self.path = os.fspath(path)
        if os.path.exists(self.path) and os.listdir(self.path) and not overwrite:
            raise ValueError(f"{self.path}: folder exists and is not empty (pass overwrite=True)")
        self.spec = _spec_from_modules(modules, extras)
        self.targets = {name: dict(t) for name, t in (targets or {}).items()}
        for name, t in self.targets.items():
            if t.get("task") not in TASKS:
                raise ValueError(
                    f"{self.path}: target {name!r} has task {t.get('task')!r}; known tasks: {TASKS}"
                )
            if not t.get("columns"):
                raise ValueError(f"{self.path}: target {name!r} lists no columns")
            if t["task"] in ("regression", "binary", "categorical") and len(t["columns"]) != 1:
                if t["task"] != "regression":
                    raise ValueError(
                        f"{self.path}: {t['task']} target {name!r} needs exactly one column"
                    )
        self.provenance = dict(provenance or {})
        self._tmp = self.path + ".partial"
        if os.path.exists(self._tmp):
            shutil.rmtree(self._tmp)
        os.makedirs(os.path.join(self._tmp, "shards"))
        self._shard_bytes = shard_bytes
        self._buffers: dict[tuple[int, ...], list[dict[str, np.ndarray]]] = {}
        self._buffer_bytes: dict[tuple[int, ...], int] = {}
        self._shards: list[dict[str, Any]] = []
        self._columns: dict[str, str] = {}
        self._labels: dict[str, list[Any]] = {}
        self._count = 0
        self._closed = False

    # -- adding ---------------------------------------------------------------
    def add(
        self,
        factors: Mapping[str, tuple[Any, Any]],
        labels: Mapping[str, Any],
        extras: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Adds a batch of ``B`` LoRAs.

        Args:
          factors: ``{name: (u [B, n, r], v [B, m, r])}``, exactly the writer's modules.
          labels: ``{column: [B] values}``; the same columns in every call.
          extras: ``{kind: {name: [B, size]}}`` for the declared extras.
        """
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        shapes = self.spec.shapes()
        missing = [n for n in self.spec.order if n not in factors]
        unknown = [n for n in factors if n not in shapes]
        if missing or unknown:
            raise ValueError(
                f"{self.path}: add() modules differ from the schema: missing "
                f"{missing[:5]}, unexpected {unknown[:5]}"
            )
        batch = None
        arrays = {}
        for name in self.spec.order:
            u, v = (np.asarray(x) for x in factors[name])
            n, m = shapes[name]
            if (
                u.ndim != 3
                or v.ndim != 3
                or u.shape[1] != n
                or v.shape[1] != m
                or u.shape[2] != v.shape[2]
                or u.shape[0] != v.shape[0]
            ):
                raise ValueError(
                    f"{self.path}: module {name!r}: expected u [B, {n}, r] and "
                    f"v [B, {m}, r], got u {list(u.shape)} and v {list(v.shape)}"
                )
            if batch is None:
                batch = u.shape[0]
            if u.shape[0] != batch:
                raise ValueError(
                    f"{self.path}: module {name!r} has batch {u.shape[0]}, others {batch}"
                )
            for what, x in (("u", u), ("v", v)):
                if not np.issubdtype(x.dtype, np.floating):
                    raise ValueError(f"{self.path}: module {name!r}: {what} has dtype {x.dtype}")
                if not np.all(np.isfinite(x)):
                    raise ValueError(
                        f"{self.path}: module {name!r}: {what} {list(x.shape)} has NaN/Inf entries"
                    )
            arrays[name] = (u.astype(np.float32, copy=False), v.astype(np.float32, copy=False))
        self._add_labels(labels, batch)
        extras_arrays = self._check_extras(extras or {}, batch)
        for b in range(batch):
            self._add_one(
                {name: (u[b], v[b]) for name, (u, v) in arrays.items()},
                {
                    kind: {name: x[b] for name, x in per.items()}
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
                + "; ".join(self.spec.diff(lora.spec))
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
                x = np.asarray(x, np.float32)
                if x.ndim != 2 or x.shape[0] != batch or not np.all(np.isfinite(x)):
                    raise ValueError(
                        f"{self.path}: module {name!r}: extra {kind!r} must be a finite "
                        f"[B={batch}, size] array, got {list(x.shape)}"
                    )
                out[kind][name] = x
        return out

    def _add_labels(self, labels: Mapping[str, Any], batch: int) -> None:
        if "id" in labels:
            raise ValueError(f"{self.path}: 'id' is reserved for the example index")
        if self._columns and set(labels) != set(self._columns):
            raise ValueError(
                f"{self.path}: label columns {sorted(labels)} differ from the first "
                f"batch's {sorted(self._columns)}"
            )
        for col, values in labels.items():
            values = np.asarray(values)
            if values.shape != (batch,):
                raise ValueError(
                    f"{self.path}: label {col!r} has shape {list(values.shape)}, expected [{batch}]"
                )
            kind = _column_kind(values)
            known = self._columns.setdefault(col, kind)
            if known != kind and not (known == "float" and kind in ("int", "bool")):
                raise ValueError(f"{self.path}: label {col!r} was {known}, now {kind}")
            if kind == "float" and not np.all(np.isfinite(values.astype(float))):
                raise ValueError(f"{self.path}: label {col!r} has NaN/Inf values")
            self._labels.setdefault(col, []).extend(values.tolist())

    def _add_one(self, factors, extras) -> None:
        example: dict[str, np.ndarray] = {"ids": np.asarray(self._count, np.int64)}
        signature = []
        for gi, group in enumerate(self.spec.groups):
            ranks = [factors[name][0].shape[-1] for name in group.names]
            r = max(ranks)
            pad = lambda x: np.pad(x, [(0, 0), (0, r - x.shape[-1])])
            example[f"g{gi}.u"] = np.stack([pad(factors[name][0]) for name in group.names])
            example[f"g{gi}.v"] = np.stack([pad(factors[name][1]) for name in group.names])
            example[f"g{gi}.rank"] = np.asarray(ranks, np.int32)
            signature.append(r)
        for kind, per in extras.items():
            for name in self._extra_names(kind):
                example[f"extra.{kind}.{name}"] = per[name]
        key = tuple(signature)
        self._buffers.setdefault(key, []).append(example)
        self._buffer_bytes[key] = self._buffer_bytes.get(key, 0) + sum(
            x.nbytes for x in example.values()
        )
        self._count += 1
        if self._buffer_bytes[key] >= self._shard_bytes:
            self._flush(key)

    def _extra_names(self, kind):
        return dict(self.spec.extras)[kind]

    def _flush(self, key: tuple[int, ...]) -> None:
        examples = self._buffers.pop(key, [])
        self._buffer_bytes.pop(key, None)
        if not examples:
            return
        tensors = {name: np.stack([e[name] for e in examples]) for name in examples[0]}
        filename = f"shards/{len(self._shards):05d}.safetensors"
        save_file(tensors, os.path.join(self._tmp, filename))
        self._shards.append({"file": filename, "num_examples": len(examples), "ranks": list(key)})

    # -- closing ----------------------------------------------------------------
    def close(
        self,
        splits: Mapping[str, Sequence[int]] | None = None,
        split_seed: int = 0,
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
    ) -> str:
        """Writes the remaining shards, the labels, the splits and the schema.

        Args:
          splits: explicit ``{"train": ids, "validation": ids, "test": ids}``; else a
            deterministic shuffle with ``split_seed`` cut at ``fractions``.

        Returns:
          The dataset folder path.
        """
        if self._closed:
            return self.path
        if self._count == 0:
            raise ValueError(f"{self.path}: no examples were added")
        for key in list(self._buffers):
            self._flush(key)
        targets = self._finish_targets()
        split_ids = self._make_splits(splits, split_seed, fractions)
        with builtins.open(os.path.join(self._tmp, "labels.csv"), "w", newline="") as f:
            writer = csv.writer(f)
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

    def _finish_targets(self) -> dict[str, Any]:
        out = {}
        for name, t in self.targets.items():
            cols = list(t["columns"])
            for c in cols:
                if c not in self._columns:
                    raise ValueError(
                        f"{self.path}: target {name!r} uses unknown column {c!r}; "
                        f"columns: {sorted(self._columns)}"
                    )
                kind = self._columns[c]
                values = np.asarray(self._labels[c])
                if t["task"] in ("binary", "multilabel") and not (
                    kind == "bool" or (kind == "int" and set(np.unique(values)) <= {0, 1})
                ):
                    raise ValueError(
                        f"{self.path}: {t['task']} target {name!r}: column {c!r} "
                        f"must be bool or 0/1, got {kind}"
                    )
                if t["task"] == "regression" and kind not in ("float", "int", "bool"):
                    raise ValueError(
                        f"{self.path}: regression target {name!r}: column {c!r} is {kind}"
                    )
            entry = {**t, "columns": cols}
            if t["task"] == "categorical":
                entry["classes"] = sorted(set(self._labels[cols[0]]))
            out[name] = entry
        return out

    def _make_splits(self, splits, seed, fractions) -> dict[str, np.ndarray]:
        if splits is not None:
            out = {k: np.asarray(v, np.int64) for k, v in splits.items()}
            allv = np.concatenate(list(out.values())) if out else np.zeros(0, np.int64)
            if len(np.unique(allv)) != len(allv) or (
                len(allv) and (allv.min() < 0 or allv.max() >= self._count)
            ):
                raise ValueError(
                    f"{self.path}: splits overlap or name ids outside [0, {self._count})"
                )
            return out
        if len(fractions) != 3 or not math.isclose(sum(fractions), 1.0) or min(fractions) < 0:
            raise ValueError(f"{self.path}: fractions must be 3 non-negative numbers summing to 1")
        perm = np.random.default_rng(seed).permutation(self._count)
        n_train = int(round(fractions[0] * self._count))
        n_val = int(round(fractions[1] * self._count))
        return {
            "train": np.sort(perm[:n_train]),
            "validation": np.sort(perm[n_train : n_train + n_val]),
            "test": np.sort(perm[n_train + n_val :]),
        }

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)


class Dataset:
    """A dataset folder opened for reading (see the module docstring). Use :func:`open`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        schema_path = os.path.join(self.path, "schema.json")
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: no such dataset folder")
        try:
            with builtins.open(schema_path) as f:
                self.schema = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{schema_path}: missing; is {self.path} a gllora dataset folder?"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{schema_path}: not valid JSON ({e})") from None
        if self.schema.get("format") != FORMAT:
            raise ValueError(
                f"{schema_path}: format {self.schema.get('format')!r} is not {FORMAT!r}"
            )
        if self.schema.get("version") != VERSION:
            raise ValueError(
                f"{schema_path}: version {self.schema.get('version')} is not supported "
                f"(this gllora reads version {VERSION})"
            )
        self.spec = _spec_from_json(self.schema, schema_path)
        self.num_examples = int(self.schema["num_examples"])
        self.targets: dict[str, dict[str, Any]] = self.schema.get("targets", {})
        self.columns: dict[str, str] = self.schema.get("columns", {})
        self.provenance: dict[str, Any] = self.schema.get("provenance", {})
        self.labels = self._read_labels()
        self.splits = self._read_splits()
        self._shards = [self._open_shard(s) for s in self.schema["shards"]]
        self._shard_of = np.full(self.num_examples, -1, np.int64)
        self._row_of = np.full(self.num_examples, -1, np.int64)
        for si, shard in enumerate(self._shards):
            ids = np.asarray(shard["ids"])
            if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.num_examples:
                raise ValueError(f"{shard['file']}: example ids outside [0, {self.num_examples})")
            self._shard_of[ids] = si
            self._row_of[ids] = np.arange(len(ids))
        if (self._shard_of < 0).any():
            missing = np.flatnonzero(self._shard_of < 0)
            raise ValueError(
                f"{self.path}: {len(missing)} examples are in no shard "
                f"(first: {missing[:5].tolist()}); the folder is incomplete"
            )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.path!r}, {self.num_examples} LoRAs, {len(self.spec.order)} modules, "
            f"targets={sorted(self.targets)})"
        )

    # -- reading the small files ------------------------------------------------
    def _read_labels(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, "labels.csv")
        try:
            f = builtins.open(path, newline="")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing from the dataset folder") from None
        with f:
            reader = csv.reader(f)
            header = next(reader, None)
            expected = ["id", *self.columns]
            if header != expected:
                raise ValueError(
                    f"{path}: header {header} does not match the schema's columns {expected}"
                )
            values: dict[str, list[Any]] = {c: [] for c in self.columns}
            for line, row in enumerate(reader, 2):
                if len(row) != len(expected) or row[0] != str(line - 2):
                    raise ValueError(
                        f"{path}:{line}: expected id {line - 2} and {len(expected)} cells, got {row[:3]}..."
                    )
                for col, cell in zip(self.columns, row[1:]):
                    try:
                        values[col].append(_parse_cell(cell, self.columns[col]))
                    except ValueError as e:
                        raise ValueError(f"{path}:{line}: column {col!r}: {e}") from None
        if len(next(iter(values.values()), [])) != self.num_examples and self.columns:
            raise ValueError(
                f"{path}: {len(next(iter(values.values())))} rows, schema says {self.num_examples}"
            )
        types = {"float": np.float64, "int": np.int64, "bool": np.bool_, "str": np.str_}
        return {c: np.asarray(v, types[self.columns[c]]) for c, v in values.items()}

    def _read_splits(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, "splits.json")
        try:
            with builtins.open(path) as f:
                splits = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing from the dataset folder") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        out = {k: np.asarray(v, np.int64) for k, v in splits.items()}
        for k, v in out.items():
            if len(v) and (v.min() < 0 or v.max() >= self.num_examples):
                raise ValueError(f"{path}: split {k!r} names ids outside [0, {self.num_examples})")
        return out

    def _open_shard(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        file = os.path.join(self.path, entry["file"])
        tensors = _safetensors.memmap(_safetensors.read_header(file))
        expected = {"ids"}
        for gi, (group, r) in enumerate(zip(self.spec.groups, entry["ranks"])):
            k = len(group.names)
            want = {f"g{gi}.u": (k, group.n, r), f"g{gi}.v": (k, group.m, r), f"g{gi}.rank": (k,)}
            for key, shape in want.items():
                if key not in tensors:
                    raise ValueError(f"{file}: tensor {key!r} missing (group {group.describe()})")
                got = tensors[key].shape
                if got[1:] != shape or got[0] != entry["num_examples"]:
                    raise ValueError(
                        f"{file}: tensor {key!r} has shape {list(got)}, expected "
                        f"[{entry['num_examples']}, {', '.join(map(str, shape))}] "
                        f"for modules {group.describe()}"
                    )
            expected |= set(want)
        for kind, names in self.spec.extras:
            expected |= {f"extra.{kind}.{name}" for name in names}
        if set(tensors) != expected:
            raise ValueError(
                f"{file}: unexpected tensors {sorted(set(tensors) - expected)[:5]}, "
                f"missing {sorted(expected - set(tensors))[:5]}"
            )
        return {"file": file, "tensors": tensors, "ranks": entry["ranks"], "ids": tensors["ids"]}

    # -- reading factors ----------------------------------------------------------
    def factors(self, indices: Sequence[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{name: (u [B, n, r], v [B, m, r])}`` for ``indices`` (padded to the batch's ranks)."""
        batch = self.batch(indices)
        out = {}
        for gi, group in enumerate(self.spec.groups):
            for i, name in enumerate(group.names):
                out[name] = (batch.u[gi][:, i], batch.v[gi][:, i])
        return out

    def get(self, index: int) -> Lora:
        """One LoRA (unbatched, at its stored ranks)."""
        batch = self.batch([index])
        return jax_free_unbatch(batch)

    def batch(
        self, indices: Sequence[int], layout: str = "leading", ranks: Sequence[int] | None = None
    ) -> Lora:
        """Reads a batch of LoRAs into numpy arrays wrapped in a :class:`Lora`.

        Args:
          indices: example ids, ``[B]``.
          layout: ``"leading"`` (``u [B, k, n, r]``) or ``"rank_major"`` (``u [k, n, B, r]``).
          ranks: pad group ``g`` to ``ranks[g]`` (fixed shapes for jit); default: the
            largest stored rank of the batch per group.
        """
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or len(indices) == 0:
            raise ValueError(f"{self.path}: batch indices must be a non-empty 1-d list")
        if indices.min() < 0 or indices.max() >= self.num_examples:
            raise ValueError(f"{self.path}: indices outside [0, {self.num_examples})")
        if layout not in ("leading", "rank_major"):
            raise ValueError(f"unknown batch layout {layout!r}")
        shard_ids = self._shard_of[indices]
        rows = self._row_of[indices]
        present = np.unique(shard_ids)
        if ranks is None:
            ranks = [
                max(self._shards[s]["ranks"][gi] for s in present)
                for gi in range(len(self.spec.groups))
            ]
        B = len(indices)
        us, vs, rs = [], [], []
        for gi, group in enumerate(self.spec.groups):
            k, r = len(group.names), int(ranks[gi])
            if layout == "leading":
                u = np.zeros((B, k, group.n, r), np.float32)
                v = np.zeros((B, k, group.m, r), np.float32)
            else:
                u = np.zeros((k, group.n, B, r), np.float32)
                v = np.zeros((k, group.m, B, r), np.float32)
            rank = np.zeros((B, k), np.int32)
            for s in present:
                sel = np.flatnonzero(shard_ids == s)
                tensors, rs_ = self._shards[s]["tensors"], self._shards[s]["ranks"][gi]
                if rs_ > r:
                    raise ValueError(
                        f"{self.path}: example {indices[sel[0]]} has rank {rs_} in "
                        f"group {group.describe()}, more than the requested {r}"
                    )
                rows_s = rows[sel]
                order = np.argsort(rows_s)  # read rows in file order
                src_u = tensors[f"g{gi}.u"][rows_s[order]]
                src_v = tensors[f"g{gi}.v"][rows_s[order]]
                dst = sel[order]
                if layout == "leading":
                    u[dst, :, :, :rs_] = src_u
                    v[dst, :, :, :rs_] = src_v
                else:
                    u[:, :, dst, :rs_] = src_u.transpose(1, 2, 0, 3)
                    v[:, :, dst, :rs_] = src_v.transpose(1, 2, 0, 3)
                rank[dst] = tensors[f"g{gi}.rank"][rows_s[order]]
            us.append(u)
            vs.append(v)
            rs.append(rank if layout == "leading" else rank.T.copy())
        extras = {}
        for kind, names in self.spec.extras:
            extras[kind] = {}
            for name in names:
                key = f"extra.{kind}.{name}"
                size = self._shards[present[0]]["tensors"][key].shape[1]
                x = np.zeros((B, size), np.float32)
                for s in present:
                    sel = np.flatnonzero(shard_ids == s)
                    x[sel] = self._shards[s]["tensors"][key][rows[sel]]
                extras[kind][name] = x if layout == "leading" else x.T.copy()
        return Lora(self.spec, us, vs, rs, extras)

    def iterate(
        self,
        indices: Sequence[int],
        batch_size: int,
        *,
        layout: str = "leading",
        ranks: Sequence[int] | None = None,
    ) -> Iterator[tuple[Lora, np.ndarray]]:
        """Yields ``(batch, ids)`` over ``indices`` in order, in batches of ``batch_size``."""
        indices = np.asarray(indices, np.int64)
        for start in range(0, len(indices), batch_size):
            ids = indices[start : start + batch_size]
            yield self.batch(ids, layout=layout, ranks=ranks), ids

    def max_ranks(self) -> list[int]:
        """The largest stored rank of each group over the whole dataset."""
        return [max(s["ranks"][gi] for s in self._shards) for gi in range(len(self.spec.groups))]

    def target_values(self, name: str) -> np.ndarray:
        """Label matrix of a target, ``[N, num_columns]`` (float64; categorical: class index)."""
        if name not in self.targets:
            raise ValueError(
                f"{self.path}: unknown target {name!r}; targets: {sorted(self.targets)}"
            )
        t = self.targets[name]
        if t["task"] == "categorical":
            classes = t["classes"]
            lookup = {c: i for i, c in enumerate(classes)}
            col = self.labels[t["columns"][0]]
            return np.asarray(
                [lookup[c.item() if hasattr(c, "item") else c] for c in col], np.float64
            )[:, None]
        return np.stack([self.labels[c].astype(np.float64) for c in t["columns"]], axis=1)


def jax_free_unbatch(batch: Lora) -> Lora:
    """Removes a leading batch axis of size 1 (numpy leaves stay numpy)."""
    return Lora(
        batch.spec,
        [u[0] for u in batch.u],
        [v[0] for v in batch.v],
        [r[0] for r in batch.rank],
        {kind: {name: x[0] for name, x in per.items()} for kind, per in batch.extras.items()},
    )


def open(path: str | os.PathLike) -> Dataset:  # noqa: A001 - mirrors the builtin on purpose
    """Opens a dataset folder for reading (memory-mapped; validates it against its schema)."""
    return Dataset(path)
