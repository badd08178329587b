"""Model inputs computed once per run, for models whose features have no parameters.

MLP + SVD's singular values and MLP + O-Align's aligned factors are fixed functions of
a LoRA (and of O-Align's template, a constant of each seed): recomputing them every
step and epoch repeats the same Jacobi solves ``num_epochs`` times, and at rank 32 they
cost 100-400 times the Gram matrices of the same factors (BUILD_NOTES.md, "Features
computed once"); so do the peers Spectral (singular-value statistics) and W2T (canonical
tokens). A
:class:`FeatureSource` computes them once for a split, with the run's own jitted
featurizer (:func:`gllora.train.steps.featurize`: the same function the model applies
inline, so the outputs are the same to rounding), keeps them in host memory, and hands
the train step and the evaluation batches of them in place of batches of LoRAs.

It serves what :class:`gllora.train.pipeline.Source` serves (``read``, ``in_memory``,
``layout``, ``mesh``), with one difference: its batches always carry the seed axis,
``[S, B, ...]``, because O-Align's features depend on each seed's template.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from gllora import models, parallel
from gllora.train import pipeline, steps


def feature_bytes(setup: steps.Setup, params, consts, source: pipeline.Source, sample_id) -> int:
    """Host bytes of one LoRA's features for every seed (from abstract shapes only)."""
    one = source.ds.batch(np.asarray([sample_id]), layout=source.layout, ranks=source.ranks)
    out = jax.eval_shape(
        functools.partial(steps.featurize, setup, layout=source.layout), params, consts, one
    )
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(out))


def _shared_by_seeds(tree) -> bool:
    """Whether every leaf of ``tree`` (leading seed axis) is the same for every seed."""
    return all(
        bool(np.all(x == x[:1])) for x in jax.tree_util.tree_leaves(parallel.to_host(tree))
    )


class FeatureSource:
    """The features of one split's LoRAs, for every seed, computed once; batches of them.

    Where every seed's constants are the same (MLP + SVD: only the shared input scales),
    so are the features: they are computed for one seed and shared.

    Args:
      source: the split's LoRAs (in the model's layout).
      ids: the split's example ids.
      setup, params, consts: the run's (``params`` and ``consts`` with a leading ``[S]``;
        the features read only ``consts``).
      batch_size: LoRAs per featurizer call (the Jacobi solves run fastest on batches
        whose arrays stay in cache: 32 LoRAs took half the time per LoRA of 256).
    """

    def __init__(self, source: pipeline.Source, ids: np.ndarray, setup, params, consts,
                 batch_size: int):  # fmt: skip
        self.mesh, self.layout = source.mesh, source.layout
        self.num_seeds = jax.tree_util.tree_leaves(consts)[0].shape[0]
        if _shared_by_seeds(consts):
            params, consts = jax.tree_util.tree_map(lambda x: x[:1], (params, consts))
        fn = jax.jit(
            functools.partial(steps.featurize, setup, layout=source.layout),
            out_shardings=parallel.replicated(self.mesh),
        )
        ids = np.asarray(ids)
        size = parallel.round_up(batch_size, self.mesh)
        chunks = []
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])
            out = parallel.to_host(fn(params, consts, source.read(padded)))
            chunks.append(jax.tree_util.tree_map(lambda x, n=len(chunk): x[:, :n], out))
        # [S or 1, N, ...]
        self._features: models.Featurized = jax.tree_util.tree_map(
            lambda *xs: np.concatenate(xs, axis=1), *chunks
        )
        self._position = {int(i): p for p, i in enumerate(ids)}

    @property
    def in_memory(self) -> bool:
        return True

    def read(self, ids: np.ndarray) -> models.Featurized:
        """The features of ``ids`` ``[B]`` (every seed the same examples) or ``[S, B]`` (each
        seed its own): leaves ``[S, B, ...]`` on the mesh, split along ``B``."""
        ids = np.asarray(ids)
        pos = np.asarray([self._position[int(i)] for i in ids.reshape(-1)]).reshape(ids.shape)
        pos = pos[..., parallel.local_slice(ids.shape[-1], self.mesh)]
        S = self.num_seeds
        if ids.ndim == 1:
            pos = np.broadcast_to(pos, (S, pos.shape[0]))
        seeds = np.arange(S)[:, None] if self._features.values[0].shape[0] == S else 0
        local = jax.tree_util.tree_map(lambda x: x[seeds, pos], self._features)
        shapes = jax.tree_util.tree_map(lambda x: (S, ids.shape[-1], *x.shape[2:]), local)
        sharding = jax.tree_util.tree_map(
            lambda x: parallel.split_along(self.mesh, x.ndim, 1), local
        )
        return parallel.host_to_global(local, sharding, shapes)
