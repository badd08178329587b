"""Writing a dataset folder: :class:`DatasetWriter` (re-exported by :mod:`gllora.io.dataset`).

The writer checks every batch against the schema, buffers examples by rank signature
and writes a shard when its buffer is full; :meth:`DatasetWriter.close` writes the
labels, the splits and ``schema.json`` and moves the finished folder into place. The
folder format is described in :mod:`gllora.io.dataset`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np

from gllora._lora import Lora
from gllora.io.dataset.labels import check_labels, make_splits, write_labels
from gllora.io.dataset.schema import (
    FORMAT,
    VERSION,
    check_extras,
    check_factors,
    check_group,
    check_target_kinds,
    check_targets,
    spec_from_modules,
    spec_to_json,
)
from gllora.io.dataset.shards import write_blocks
from gllora.spec import LoraSpec, check_match

_SHARD_BYTES = 128 << 20  # target shard size; a shard is written when its buffer reaches it


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
        self.spec = spec_from_modules(modules, extras, self.path)
        self.targets = check_targets(targets or {}, self.path)
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
        arrays, true_ranks, batch = check_factors(self.path, self.spec, factors, ranks)
        if batch == 0:
            return
        new_labels, kinds = check_labels(
            self.path, labels, batch, self._columns, self.targets, self._count
        )
        extras_arrays = check_extras(self.path, self.spec, self._extra_sizes, extras or {}, batch)
        # Group the modules as the schema does: [B, k, n, r_g], r_g the largest in the group.
        us, vs, rks = [], [], []
        for group in self.spec.groups:
            r = max(arrays[name][0].shape[2] for name in group.names)
            u = np.zeros((batch, len(group.names), group.n, r), np.float32)
            v = np.zeros((batch, len(group.names), group.m, r), np.float32)
            for i, name in enumerate(group.names):
                x, y = arrays[name]
                u[:, i, :, : x.shape[2]] = x
                v[:, i, :, : y.shape[2]] = y
            us.append(u)
            vs.append(v)
            rks.append(np.stack([true_ranks[name] for name in group.names], axis=1))
        self._commit(new_labels, kinds, extras_arrays, us, vs, rks)

    def add_lora(self, lora: Lora, labels: Mapping[str, Any]) -> None:
        """Adds one unbatched :class:`Lora` with its labels (scalars), as it is stacked.

        The LoRA's group arrays go into the shard as they are (numpy arrays are not
        copied to regroup them; JAX arrays are brought to the host once), each group cut
        to its largest true rank. Its structure must be the schema's
        (:func:`gllora.spec.check_match`, extras included).

        Raises:
          ValueError: naming the differences from the schema, NaN/Inf, non-zero columns
            past a module's true rank, or labels that do not fit.
        """
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        if lora.batch_shape:
            raise ValueError(f"{self.path}: add_lora takes one LoRA, got batch {lora.batch_shape}")
        check_match(self.spec, lora.spec, f"{self.path}: LoRA differs from the schema", extras=True)
        us, vs, rks = [], [], []
        for group, u, v, rank in zip(self.spec.groups, lora.u, lora.v, lora.rank):
            rank = np.asarray(rank, np.int32).reshape(1, -1)  # [1, k]
            u, v = check_group(self.path, group, np.asarray(u)[None], np.asarray(v)[None], rank)
            us.append(u)
            vs.append(v)
            rks.append(rank)
        new_labels, kinds = check_labels(
            self.path,
            {k: [x] for k, x in labels.items()},
            1,
            self._columns,
            self.targets,
            self._count,
        )
        extras = {
            kind: {name: np.asarray(x)[None] for name, x in per.items()}
            for kind, per in lora.extras.items()
        }
        extras_arrays = check_extras(self.path, self.spec, self._extra_sizes, extras, 1)
        self._commit(new_labels, kinds, extras_arrays, us, vs, rks)

    def _commit(self, new_labels, kinds, extras_arrays, us, vs, rks) -> None:
        """Takes a validated batch of grouped factors (``us[g] [B, k, n, r_g]``, ranks
        ``rks[g] [B, k]``): only now is the writer's state changed."""
        batch = rks[0].shape[0]
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
            sum((u.shape[2] + v.shape[2]) * u.shape[1] * u.shape[3] * 4 for u, v in zip(us, vs))
            or 1
        )
        chunk = max(1, self._shard_bytes // (2 * per_example))
        for start in range(0, batch, chunk):
            sl = slice(start, min(batch, start + chunk))
            self._add_block(
                [u[sl] for u in us],
                [v[sl] for v in vs],
                [r[sl] for r in rks],
                {
                    kind: {name: x[sl] for name, x in per.items()}
                    for kind, per in extras_arrays.items()
                },
            )

    def _add_block(self, us, vs, rks, extras) -> None:
        """Appends ``B`` validated examples, grouped by rank signature, to the buffers."""
        batch = rks[0].shape[0]
        ids = np.arange(self._count, self._count + batch, dtype=np.int64)
        signature = np.stack([r.max(axis=1) for r in rks], axis=1)  # [B, groups]
        keys, inverse = np.unique(signature, axis=0, return_inverse=True)
        for ki, key in enumerate(keys):
            sel = np.flatnonzero(inverse.reshape(-1) == ki)
            whole = len(sel) == batch
            block: dict[str, np.ndarray] = {"ids": ids[sel]}
            for gi, r in enumerate(key):
                r = int(r)
                for what, x in (("u", us[gi]), ("v", vs[gi])):
                    x = x if whole else x[sel]
                    block[f"g{gi}.{what}"] = np.ascontiguousarray(x[..., :r], np.float32)
                block[f"g{gi}.rank"] = rks[gi] if whole else rks[gi][sel]
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
        write_blocks(full, blocks)
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
        split_ids = make_splits(self.path, self._count, splits, split_seed, fractions)
        targets = self._finish_targets()
        for key in list(self._buffers):
            self._flush(key)
        write_labels(
            os.path.join(self._tmp, "labels.csv"), self._columns, self._labels, self._count
        )
        with open(os.path.join(self._tmp, "splits.json"), "w") as f:
            json.dump({k: [int(i) for i in v] for k, v in split_ids.items()}, f)
        schema = {
            "format": FORMAT,
            "version": VERSION,
            "num_examples": self._count,
            **spec_to_json(self.spec),
            "columns": dict(self._columns),
            "targets": targets,
            "shards": self._shards,
            "provenance": self.provenance,
        }
        with open(os.path.join(self._tmp, "schema.json"), "w") as f:
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
        check_target_kinds(self.targets, self._columns, self.path)
        out = {}
        for name, t in self.targets.items():
            entry = dict(t)
            if t["task"] == "categorical":
                entry["classes"] = sorted(set(self._labels[t["columns"][0]]))
            out[name] = entry
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
