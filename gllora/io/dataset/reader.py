"""Reading a dataset folder: :class:`Dataset` (re-exported by :mod:`gllora.io.dataset`).

Opening checks the small files and every shard's header against the schema; a batch
maps the shards it needs and copies only its rows, in either layout, optionally read
ahead in a thread. The folder format is described in :mod:`gllora.io.dataset`.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Self

import numpy as np

from gllora._lora import Lora
from gllora.io import _safetensors
from gllora.io.dataset.labels import read_labels, read_splits
from gllora.io.dataset.prefetch import prefetched
from gllora.io.dataset.schema import (
    check_target_kinds,
    check_targets,
    read_schema,
    spec_from_json,
)
from gllora.io.dataset.shards import (
    Mapped,
    aligned_empty,
    check_shard,
    consecutive_runs,
    gather_leading,
    gather_rank_major,
)
from gllora.spec import check_layout

_MAX_MAPPED_SHARDS = 64  # shards kept mapped at once (each map holds a file descriptor)


class Dataset:
    """A dataset folder opened for reading (see :mod:`gllora.io.dataset`). Use ``dataset.open``.

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
        self.schema = read_schema(schema_path, self.path)
        self.spec = spec_from_json(self.schema, schema_path)
        self.num_examples = self.schema["num_examples"]
        self.columns: dict[str, str] = self.schema["columns"]
        self.targets: dict[str, dict[str, Any]] = self.schema["targets"]
        self.provenance: dict[str, Any] = self.schema.get("provenance", {})
        check_targets(self.targets, schema_path)
        check_target_kinds(self.targets, self.columns, schema_path)
        self.labels = read_labels(self.path, self.columns, self.targets, self.num_examples)
        self.splits = read_splits(self.path, self.num_examples)
        self._entries = self.schema["shards"]
        self._headers = [check_shard(self.path, self.spec, s) for s in self._entries]
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
        self._mapped: collections.OrderedDict[int, Mapped] = collections.OrderedDict()
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

    # -- reading factors ----------------------------------------------------------
    def _map(self, si: int) -> Mapped:
        with self._lock:
            mapped = self._mapped.get(si)
            if mapped is None:
                mapped = self._mapped[si] = Mapped(self._headers[si])
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
        check_layout(layout)
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
            plan.append((si, self._map(si), consecutive_runs(rows[pos], pos), pos, rows[pos]))
        for si, mapped, runs, pos, rws in plan:
            for gi in range(num_groups):
                for what in ("u", "v"):
                    mapped.willneed(f"g{gi}.{what}", np.unique(rws))
        us, vs, rank_out = [], [], []
        for gi, group in enumerate(self.spec.groups):
            k, r = len(group.names), ranks[gi]
            rank = aligned_empty((B, k), np.int32)
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
                    out = gather_leading(plan, gi, what, B, k, size, r)
                else:
                    out = gather_rank_major(plan, self._ranks, gi, what, B, k, size, r)
                (us if what == "u" else vs).append(out)
            rank_out.append(rank if layout == "leading" else np.ascontiguousarray(rank.T))
        extras = {}
        for kind, names in self.spec.extras:
            extras[kind] = {}
            for name in names:
                key = f"extra.{kind}.{name}"
                size = self._headers[plan[0][0]].entries[key].shape[1]
                x = aligned_empty((B, size))
                for si, mapped, runs, pos, rws in plan:
                    x[pos] = mapped.tensors[key][rws]
                extras[kind][name] = x if layout == "leading" else np.ascontiguousarray(x.T)
        return Lora(self.spec, us, vs, rank_out, extras)

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
        yield from prefetched(read, starts, prefetch)

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


def jax_free_unbatch(batch: Lora) -> Lora:
    """Removes a leading batch axis of size 1 (numpy leaves stay numpy)."""
    return Lora(
        batch.spec,
        [u[0] for u in batch.u],
        [v[0] for v in batch.v],
        [r[0] for r in batch.rank],
        {kind: {name: x[0] for name, x in per.items()} for kind, per in batch.extras.items()},
    )
