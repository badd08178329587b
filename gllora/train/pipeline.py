"""Input pipeline: batches of LoRAs for several seeds at once, with pinned shapes.

Training batches hold ``S`` seeds x ``B`` examples in the model's batch layout
(:func:`gllora.models.layout`): ``"rank_major"`` (``u [k, n, S, B, r]``: the batch axis
beside the rank axis, where GL-net's ``Phi @ u`` is one plain matrix product) or
``"leading"`` (``u [S, B, k, n, r]``: per-example contractions such as Gram matrices and
flattened factors). The per-seed, per-example model sees ``[k, n, r]`` after two
``vmap``s either way (:func:`gllora.lora.batch_axes` says where the axes are). Every
group is padded to the dataset's largest rank, so every batch has the same shapes and
the step compiles once.

Batches live on a device mesh (:mod:`gllora.parallel`): the example axis ``B`` is split
over its devices; with one device that is a plain ``device_put``.

Two sources of batches:
- in memory: a split small enough (``config.in_memory_gb``, per device) is read once
  onto every device (replicated; every process reads it whole); each step gathers its
  rows on the devices, each device only the rows it holds;
- streaming: a background thread reads batches from the memory-mapped shards and
  puts them on the devices ahead of the step (bounded memory; a dataset larger than RAM
  trains). Each process reads only the rows of its own devices
  (:func:`gllora.parallel.local_slice`: a function of the step and the process index).

Each seed draws its own permutation of the training split per epoch, from
``(seed, epoch)`` only, so a resumed run sees exactly the batches an uninterrupted run
would have seen, on any number of devices and processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gllora import parallel
from gllora.io.dataset import Dataset, prefetched
from gllora.lora import Lora, batch_axes, split_seeds, take_examples
from gllora.spec import check_layout


def batch_shardings(batch: Lora, mesh: Mesh, layout: str, *, seeds: bool = False) -> Lora:
    """A batch in ``layout`` (with a seed axis if ``seeds``) split along ``B``."""
    return parallel.shardings_along(batch, batch_axes(batch, layout, seeds=seeds), mesh)


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
    """Batches of one dataset at pinned ranks, in one layout, on a mesh: from device
    memory or streamed."""

    def __init__(
        self,
        ds: Dataset,
        ranks: Sequence[int],
        in_memory_ids: np.ndarray | None,
        mesh: Mesh | None = None,
        layout: str = "rank_major",
    ):
        self.ds = ds
        self.ranks = list(ranks)
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        self.layout = check_layout(layout)
        self._resident: Lora | None = None
        self._position: dict[int, int] = {}
        if in_memory_ids is not None:
            host = ds.batch(in_memory_ids, layout=self.layout, ranks=self.ranks)
            self._resident = parallel.put(host, parallel.replicated(self.mesh))
            self._position = {int(i): p for p, i in enumerate(in_memory_ids)}
            self._gathers: dict = {}  # one jitted gather per ids shape

    @property
    def in_memory(self) -> bool:
        return self._resident is not None

    def read(self, ids: np.ndarray) -> Lora:
        """A batch of ``ids`` ``[B]`` or ``[S, B]`` on the mesh, split along ``B``.

        The ids' axes take the place of the example axis of :attr:`layout` (``u [*ids,
        k, n, r]`` or ``[k, n, *ids, r]``); every process passes the same ``ids`` and
        (when streaming) reads only its own devices' rows.
        """
        ids = np.asarray(ids)
        if self._resident is None:
            return self.to_global(self.read_host(ids), ids.shape)
        pos = np.asarray([self._position[int(i)] for i in ids.reshape(-1)], np.int32)
        return self._gather(ids.shape)(self._resident, pos.reshape(ids.shape))

    def _gather(self, shape: tuple[int, ...]):
        if shape not in self._gathers:
            gather = lambda resident, pos: take_examples(resident, pos, self.layout)
            abstract = jax.eval_shape(
                gather, self._resident, jax.ShapeDtypeStruct(shape, jnp.int32)
            )
            shardings = batch_shardings(abstract, self.mesh, self.layout, seeds=len(shape) == 2)
            self._gathers[shape] = jax.jit(gather, out_shardings=shardings)
        return self._gathers[shape]

    def read_host(self, ids: np.ndarray) -> Lora:
        """This process's rows of the batch ``ids`` (``[B]`` or ``[S, B]``): numpy, no device.

        For streaming from a worker thread; :meth:`to_global` puts the result on the mesh.
        """
        ids = np.asarray(ids)
        mine = ids[..., parallel.local_slice(ids.shape[-1], self.mesh)]
        batch = self.ds.batch(mine.reshape(-1), layout=self.layout, ranks=self.ranks)
        return split_seeds(batch, ids.shape[0], self.layout) if ids.ndim == 2 else batch

    def to_global(self, local: Lora, shape: tuple[int, ...]) -> Lora:
        """Global arrays from every process's :meth:`read_host` of a batch of ``shape`` ids."""
        seeds = len(shape) == 2
        axes = batch_axes(local, self.layout, seeds=seeds)
        shardings = parallel.shardings_along(local, axes, self.mesh)
        global_shapes = jax.tree_util.tree_map(
            lambda x, axis: _with_size(x.shape, axis, shape[-1]), local, axes
        )
        return parallel.host_to_global(local, shardings, global_shapes)


def _with_size(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis % len(shape)] = size
    return tuple(out)


def prefetch(
    source: Source, indices: Iterator[np.ndarray], depth: int = 3
) -> Iterator[tuple[np.ndarray, Lora]]:
    """``(ids [S, B], batch)`` pairs, read ahead by a background thread when streaming
    (:func:`gllora.io.dataset.prefetched`, the one prefetcher)."""
    if source.in_memory:
        for ids in indices:
            yield ids, source.read(ids)
        return
    read = lambda ids: (ids, source.to_global(source.read_host(ids), ids.shape))
    yield from prefetched(read, indices, depth)
