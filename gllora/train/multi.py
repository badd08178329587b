"""Training on datasets of several structures (:mod:`gllora.io.dataset.multi`).

Batched per structure: every step's batch holds examples of one structure (each seed
its own examples of it), so no module is padded and each structure's step compiles once
(one program per structure, cached by ``jit`` on the batch's pytree structure). The
alternative, one union structure with absent modules masked, computes every module of
every structure for every example: measured in ``benchmarks/bench_peers.py`` (section
"multi-structure batching").

An epoch is every structure's full batches: per structure and seed, the permutation
:func:`gllora.train.pipeline.epoch_order` of that structure's training ids, cut into
batches of ``B`` (the remainder unused), and the order of all these batches shuffled by
``(first seed, epoch)``. Everything is a function of ``(seeds, epoch, position)``, so a
resumed run sees the batches an uninterrupted run would.

Only models whose parameters do not depend on the structure (``models.any_structure``)
train on such datasets; their parameters are the union of the parameters of an init on
each structure (:func:`merge_variables`). Input scales are per module group, keyed by the
group key (unique to a group's names and shape).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gllora.io.dataset.multi import MultiDataset
from gllora.train import pipeline, steps


def merge_variables(trees: Sequence[Any]) -> Any:
    """The union of nested dicts: keys of later trees are added where missing (an entry in
    several trees is taken from the first: the same parameter, initialised once)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, dict) and isinstance(out[key], dict):
                out[key] = merge_variables([out[key], value])
    return out


class MultiSource:
    """One :class:`gllora.train.pipeline.Source` per structure, read with global ids."""

    def __init__(self, ds: MultiDataset, ranks, ids: np.ndarray, fits: bool, mesh, layout: str):
        self.ds = ds
        self.layout = layout
        self.mesh = mesh
        self.sources = []
        for s, (_, sub) in enumerate(ds.structures):
            mine = ids[ds.structure_of(ids) == s] - ds.offsets[s]
            self.sources.append(
                pipeline.Source(sub, ranks[s], mine if fits and len(mine) else None, mesh, layout)
            )

    @property
    def in_memory(self) -> bool:
        return all(s.in_memory for s in self.sources)

    def read(self, ids: np.ndarray, structure: int | None = None):
        """A batch of global ``ids`` ``[B]`` or ``[S, B]`` that all belong to one structure."""
        ids = np.asarray(ids)
        s = int(self.ds.structure_of(ids.reshape(-1)[:1])[0]) if structure is None else structure
        return self.sources[s].read(self.ds.local_ids(ids, s))


def step_batches(
    seeds: Sequence[int], ds: MultiDataset, ids: np.ndarray, batch_size: int, start: int, stop: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(structure, global ids [S, B])`` of global steps ``start..stop-1``."""
    per = [np.sort(ids[ds.structure_of(ids) == s]) for s in range(len(ds.structures))]
    counts = [len(p) // batch_size for p in per]
    per_epoch = sum(counts)
    if per_epoch == 0:
        raise ValueError(f"{ds.path}: no structure has a full training batch of {batch_size}")
    epoch = None
    for step in range(start, stop):
        e, pos = divmod(step, per_epoch)
        if e != epoch:
            epoch = e
            orders = [np.stack([pipeline.epoch_order(sd, e, p) for sd in seeds]) for p in per]
            schedule = [(s, j) for s, c in enumerate(counts) for j in range(c)]
            perm = np.random.default_rng([seeds[0], e, 99]).permutation(len(schedule))
            schedule = [schedule[i] for i in perm]
        s, j = schedule[pos]
        yield s, orders[s][:, j * batch_size : (j + 1) * batch_size]


def steps_per_epoch(ds: MultiDataset, ids: np.ndarray, batch_size: int) -> int:
    return sum(
        int(np.sum(ds.structure_of(ids) == s)) // batch_size for s in range(len(ds.structures))
    )


def read_steps(source: MultiSource, batches) -> Iterator[tuple[np.ndarray, Any]]:
    """``(ids [S, B], batch)`` for each ``(structure, ids)``; read in this thread."""
    for s, ids in batches:
        yield ids, source.read(ids, s)


def input_scales(ds: MultiDataset, train_ids: np.ndarray, ranks, enabled: bool) -> dict:
    """``{group key: [1/rms(u), 1/rms(v)]}`` over every structure's groups."""
    out: dict[str, np.ndarray] = {}
    for s, (_, sub) in enumerate(ds.structures):
        mine = train_ids[ds.structure_of(train_ids) == s] - ds.offsets[s]
        if len(mine) == 0:  # a held-out structure: scale it as it comes
            scales = steps.input_scales(
                sub, np.arange(min(sub.num_examples, 256)), ranks[s], enabled
            )
        else:
            scales = steps.input_scales(sub, mine, ranks[s], enabled)
        for g, sc in zip(sub.spec.groups, scales):
            out.setdefault(g.key, sc)
    return out


def templates(ds: MultiDataset, train_ids: np.ndarray, ranks, seeds) -> tuple:
    """One ``[S, ...]`` LoRA per structure (each seed's template drawn as for one structure)."""
    out = []
    for s, (_, sub) in enumerate(ds.structures):
        mine = train_ids[ds.structure_of(train_ids) == s] - ds.offsets[s]
        pool = mine if len(mine) else np.arange(sub.num_examples)
        ids = np.asarray([np.random.default_rng([sd, 7, s]).choice(pool) for sd in seeds])
        out.append(sub.batch(ids, ranks=ranks[s]))
    return tuple(out)


def spec_json(ds: MultiDataset, ranks) -> list[dict[str, Any]]:
    from gllora.io.dataset import spec_to_json

    return [
        {"name": name, "spec": spec_to_json(sub.spec), "ranks": r}
        for (name, sub), r in zip(ds.structures, ranks)
    ]
