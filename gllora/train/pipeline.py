"""Input pipeline: batches of LoRAs for several seeds at once, with pinned shapes.

Training batches hold ``S`` seeds x ``B`` examples in the rank-major layout
(``u [k, n, S, B, r]``): the per-seed, per-example model sees ``[k, n, r]`` after two
``vmap``s, and the batch axis sits beside the rank axis, where ``Phi @ u`` is one plain
matrix product. Every group is padded to the dataset's largest rank, so every batch
has the same shapes and the step compiles once.

Two sources of batches:
- in memory: a split small enough (``config.in_memory_gb``) is read once onto the
  device; each step gathers its rows on the device;
- streaming: a background thread reads batches from the memory-mapped shards and
  puts them on the device ahead of the step (bounded memory; a dataset larger than RAM
  trains).

Each seed draws its own permutation of the training split per epoch, from
``(seed, epoch)`` only, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gllora.io.dataset import Dataset
from gllora.lora import Lora


def seed_in_axes(batch: Lora) -> Lora:
    """``vmap`` axes of the seed axis in a ``[k, n, S, B, r]`` batch (ranks ``[k, S, B]``)."""
    return batch.replace(
        u=tuple(-3 for _ in batch.u),
        v=tuple(-3 for _ in batch.v),
        rank=tuple(-2 for _ in batch.rank),
        extras=jax.tree_util.tree_map(lambda _: -2, batch.extras),
    )


def split_seeds(batch: Lora, seeds: int) -> Lora:
    """Reshapes a rank-major batch of ``S * B`` examples into ``[k, n, S, B, r]`` (no copy)."""

    def split(x: np.ndarray, axis: int) -> np.ndarray:
        shape, axis = list(x.shape), axis % x.ndim
        shape[axis : axis + 1] = [seeds, shape[axis] // seeds]
        return x.reshape(shape)

    return batch.replace(
        u=tuple(split(x, -2) for x in batch.u),
        v=tuple(split(x, -2) for x in batch.v),
        rank=tuple(split(x, -1) for x in batch.rank),
        extras=jax.tree_util.tree_map(lambda x: split(x, -1), batch.extras),
    )


def epoch_order(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """The order of ``ids`` that seed ``seed`` trains on in epoch ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(ids)


def step_indices(
    seeds: Sequence[int], ids: np.ndarray, batch_size: int, start: int, stop: int
) -> Iterator[np.ndarray]:
    """Example ids of global steps ``start..stop-1``, one ``[S, B]`` array per step.

    Step ``t`` is position ``t mod E`` of epoch ``t // E`` (``E`` full batches per epoch;
    the remainder of each epoch's permutation is not used).
    """
    per_epoch = len(ids) // batch_size
    epoch = None
    for step in range(start, stop):
        e, pos = divmod(step, per_epoch)
        if e != epoch:
            epoch, orders = e, np.stack([epoch_order(s, e, ids) for s in seeds])
        yield orders[:, pos * batch_size : (pos + 1) * batch_size]


class Source:
    """Batches of one dataset at pinned ranks, from device memory or streamed from disk."""

    def __init__(self, ds: Dataset, ranks: Sequence[int], in_memory_ids: np.ndarray | None):
        self.ds = ds
        self.ranks = list(ranks)
        self._resident: Lora | None = None
        self._position: dict[int, int] = {}
        if in_memory_ids is not None:
            self._resident = jax.device_put(
                ds.batch(in_memory_ids, layout="rank_major", ranks=self.ranks)
            )
            self._position = {int(i): p for p, i in enumerate(in_memory_ids)}
            self._gather = jax.jit(_gather)

    @property
    def in_memory(self) -> bool:
        return self._resident is not None

    def read(self, ids: np.ndarray) -> Lora:
        """A rank-major batch of ``ids`` (any shape; flattened) on the device."""
        flat = np.asarray(ids).reshape(-1)
        if self._resident is not None:
            pos = jnp.asarray([self._position[int(i)] for i in flat], jnp.int32)
            return self._gather(self._resident, pos)
        return jax.device_put(self.ds.batch(flat, layout="rank_major", ranks=self.ranks))

    def read_host(self, ids: np.ndarray) -> Lora:
        """Like :meth:`read`, for streaming from a worker thread (numpy, no device)."""
        return self.ds.batch(np.asarray(ids).reshape(-1), layout="rank_major", ranks=self.ranks)


def _gather(resident: Lora, pos: jax.Array) -> Lora:
    return resident.replace(
        u=tuple(jnp.take(x, pos, axis=-2) for x in resident.u),
        v=tuple(jnp.take(x, pos, axis=-2) for x in resident.v),
        rank=tuple(jnp.take(x, pos, axis=-1) for x in resident.rank),
        extras=jax.tree_util.tree_map(lambda x: jnp.take(x, pos, axis=-1), resident.extras),
    )


def prefetch(
    source: Source, indices: Iterator[np.ndarray], seeds: int, depth: int = 3
) -> Iterator[tuple[np.ndarray, Lora]]:
    """``(ids [S, B], batch)`` pairs, read ahead by a background thread when streaming."""
    if source.in_memory:
        for ids in indices:
            yield ids, split_seeds(source.read(ids), seeds)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def worker():
        try:
            for ids in indices:
                if stop.is_set():
                    return
                q.put((ids, jax.device_put(split_seeds(source.read_host(ids), seeds))))
            q.put(sentinel)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    thread = threading.Thread(target=worker, daemon=True, name="gllora-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
