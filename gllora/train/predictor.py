"""Predictions of a trained run: ``Predictor.from_workdir(W)(lora)``, jitted.

The predictor holds every seed's best model; it averages their outputs (an ensemble)
and returns them in the targets' own units: regression values, label probabilities,
class labels and probabilities.

>>> predictor = Predictor.from_workdir("runs/glnet")
>>> predictor(lora)                 # one LoRA: {"quality": array(0.31), ...}
>>> predictor(batch)                # a batch with a leading axis: {"quality": [B], ...}

It runs on a mesh (:mod:`gllora.parallel`; default: this process's devices): batches
are split along their leading axis over its devices, the models replicated.
:func:`predict_inputs` scores a dataset folder or a folder of adapter files; under
``jax.distributed`` each process scores its own share of the inputs, and
:func:`write_predictions` merges the shares into one CSV in the global order.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from gllora import lora as lora_lib
from gllora import parallel
from gllora.io import dataset as dataset_lib
from gllora.lora import Lora, batch_axes
from gllora.spec import LoraSpec, check_match
from gllora.train import state as state_lib
from gllora.train import steps, tasks


class Predictor:
    """A trained run's best models, ready to predict. Build with :meth:`from_workdir`."""

    def __init__(
        self,
        workdir: str,
        config: ml_collections.ConfigDict,
        setup: steps.Setup,
        spec: LoraSpec,
        ranks: list[int],
        params,
        consts,
        seeds: list[int],
        mesh: Mesh,
    ):
        self.workdir, self.config, self.setup = workdir, config, setup
        self.targets = setup.targets
        self.spec, self.ranks, self.seeds = spec, ranks, seeds
        self.params, self.consts = params, consts
        self.mesh = mesh
        self._predict: dict[str, Any] = {}  # layout -> jitted steps.predict

    @classmethod
    def from_workdir(cls, workdir: str, mesh: Mesh | None = None) -> Predictor:
        """Loads the best model of every seed from a finished (or checkpointed) run.

        Args:
          workdir: the run directory.
          mesh: the devices to predict on (default: all of this process's,
            :func:`gllora.parallel.local_mesh`). The checkpoint may have been written on
            any number of devices.
        """
        try:
            with open(os.path.join(workdir, "config.json")) as f:
                config = ml_collections.ConfigDict(json.load(f))
            with open(os.path.join(workdir, "targets.json")) as f:
                meta = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{workdir}: not a gllora run directory ({e.filename} is missing)"
            ) from None
        if meta.get("structures"):
            raise ValueError(
                f"{workdir}: a run on a dataset of several structures; the Predictor restores "
                "runs of one structure only (its results.json holds the metrics per structure)"
            )
        targets = [tasks.Target.from_json(t) for t in meta["targets"]]
        spec = dataset_lib.spec_from_json(meta["spec"], os.path.join(workdir, "targets.json"))
        ranks = meta["ranks"]
        # The optimiser's structure does not depend on the schedule's length.
        setup = steps.make_setup(config, targets, total_steps=1)
        mesh = parallel.local_mesh() if mesh is None else mesh
        abstract = state_lib.abstract_state(
            setup, spec, ranks, meta["extras_sizes"], len(meta["seeds"])
        )
        # Restored onto this mesh, kernels split as in training where they divide evenly.
        placed = parallel.state_shardings(
            abstract, mesh, config.get("shard_params", "none"), strict=False
        )
        manager = state_lib.checkpoint_manager(workdir)
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint yet; train first")
        state = state_lib.restore_onto(manager, abstract, placed)
        return cls(
            workdir,
            config,
            setup,
            spec,
            ranks,
            state["best_params"],
            state["consts"],
            meta["seeds"],
            mesh,
        )

    def predict_fn(self, layout: str):
        """:func:`gllora.train.steps.predict` jitted for batches in ``layout`` on the mesh."""
        if layout not in self._predict:
            from gllora.train.loop import make_predict

            self._predict[layout] = make_predict(self.setup, self.mesh, layout)
        return self._predict[layout]

    def outputs(self, lora, layout: str = "leading") -> np.ndarray:
        """Raw model outputs of every seed: ``[S, num_outputs]`` or ``[S, B, num_outputs]``.

        Args:
          lora: one LoRA, a batch of them (``B`` in ``layout``; :func:`gllora.stack`
            makes one), a list of LoRAs, or a list of adapter paths (read with
            :func:`gllora.io.load_adapter`); lists give ``[S, B, num_outputs]``.
        """
        lora = self._as_lora(lora)
        check_match(
            self.spec,
            lora.spec,
            f"{self.workdir}: the LoRA's modules differ from those the model was trained on",
        )
        if lora.u[0].ndim == 3:  # one LoRA
            return self.outputs(lora_lib.stack([lora]))[:, 0]
        axes = batch_axes(lora, layout)
        size = lora.u[0].shape[axes.u[0]]
        padded = parallel.round_up(size, self.mesh)
        if padded != size:  # copies of the last LoRA, so the batch splits over the devices
            rows = np.r_[np.arange(size), np.full(padded - size, size - 1)]
            lora = jax.tree_util.tree_map(lambda x, a: x.take(rows, axis=a), lora, axes)
        self._warn_if_ranks_unseen(lora)
        batch = parallel.put(lora, parallel.shardings_along(lora, axes, self.mesh))
        out = self.predict_fn(layout)(self.params, self.consts, batch)
        return parallel.to_host(out)[:, :size]

    def _as_lora(self, lora):
        if isinstance(lora, (list, tuple)):
            if not lora:
                raise ValueError("Predictor: an empty list of LoRAs")
            if all(isinstance(x, (str, os.PathLike)) for x in lora):
                from gllora import io

                lora = [io.load_adapter(os.fspath(x)) for x in lora]
            ranks = [
                max([self.ranks[g]] + [x.u[g].shape[-1] for x in lora])
                for g in range(len(self.ranks))
            ]
            return lora_lib.stack([x.pad_rank(ranks) for x in lora])
        if not isinstance(lora, Lora):
            raise TypeError(
                f"Predictor: expected a Lora, a list of Loras or a list of adapter paths, "
                f"got {type(lora).__name__}"
            )
        return lora

    def _warn_if_ranks_unseen(self, batch: Lora) -> None:
        """Warns once per rank signature when inputs exceed the ranks the model trained on."""
        seen = getattr(self, "_warned", set())
        stored = tuple(int(u.shape[-1]) for u in batch.u)
        if stored in seen:
            return
        seen.add(stored)
        self._warned = seen
        over = [
            f"{g.describe()}: rank {r} (trained on {t})"
            for g, r, t in zip(self.spec.groups, stored, self.ranks)
            if r > t
        ]
        if over:
            logging.warning(
                "%s: inputs of ranks the model never saw in training (%s); %s",
                self.workdir,
                "; ".join(over),
                _RANK_NOTE.get(self.config.model, "its predictions there are extrapolations"),
            )

    def __call__(self, lora, layout: str = "leading") -> dict[str, Any]:
        """Predictions averaged over seeds, in the targets' units (see :func:`tasks.decode`)."""
        return tasks.decode(self.targets, self.outputs(lora, layout).mean(axis=0))


#: What a model does with a rank above the one it trained on.
_RANK_NOTE = {
    "mlp_svd": "mlp_svd keeps only the top singular values of the trained rank (truncation)",
    "mlp_oalign": "mlp_oalign aligns to a template of the trained rank and drops the rest",
    "mlp": "the raw-factor MLP takes one rank only",
}


def input_keys(inputs: str) -> list[str]:
    """The keys of every input, in the global order of predictions.

    A dataset folder: its example ids (``"0"``, ``"1"``, ...). A folder of adapters: their
    paths relative to ``inputs`` as :func:`gllora.io.importer.find_adapters` sorts them.
    """
    from gllora.io import importer

    if _is_dataset(inputs):
        return [str(i) for i in range(dataset_lib.open(inputs).num_examples)]
    return importer.find_adapters(inputs)


def _is_dataset(inputs: str) -> bool:
    return os.path.exists(os.path.join(inputs, "schema.json"))


def predict_inputs(
    predictor: Predictor,
    inputs: str,
    batch_size: int = 64,
    process_index: int | None = None,
    num_processes: int | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Predictions for a dataset folder (every example) or a folder of adapter files.

    Adapter folders are searched recursively (PEFT folders and ``.safetensors`` files of
    any format :func:`gllora.io.load_adapter` reads). A file that cannot be read, or whose
    modules differ from those the model was trained on, is not predicted and is
    returned with its reason. Inputs are read ``batch_size`` at a time (bounded memory)
    and every batch is padded to one size (one compile per rank signature).

    With several processes (default: ``jax.process_index()`` of ``jax.process_count()``)
    each predicts only its share of :func:`input_keys`, contiguous
    (:func:`gllora.parallel.shares`): the shares of processes ``0, 1, ...`` in turn make
    up the single-process result.

    Returns:
      ``(rows, failures)``: one row per input, in a deterministic order, keyed as labels
      are: ``{"path": key, <prediction columns>}`` for adapters (their path relative to
      ``inputs``, the key :func:`gllora.io.importer.import_adapters` gives the labels
      table) or ``{"id": example id, ...}`` for a dataset folder (its ``labels.csv``'s
      key); ``[(key, reason)]``.
    """
    from gllora import io

    p = jax.process_index() if process_index is None else process_index
    keys = input_keys(inputs)
    mine = keys[parallel.shares(len(keys), num_processes)[p]]
    size = parallel.round_up(batch_size, predictor.mesh)
    rows: list[dict[str, Any]] = []
    if _is_dataset(inputs):
        ds = dataset_lib.open(inputs)
        ranks = [max(a, b) for a, b in zip(ds.max_ranks(), predictor.ranks)]
        for start in range(0, len(mine), size):
            chunk = mine[start : start + size]
            ids = np.asarray([int(k) for k in chunk])
            ids = np.concatenate([ids, np.repeat(ids[-1:], size - len(ids))])
            layout = predictor.setup.layout
            batch = ds.batch(ids, ranks=ranks, layout=layout)
            rows.extend(_rows(predictor, "id", chunk, batch, layout))
        return rows, []
    failures = []
    for start in range(0, len(mine), size):
        loaded = []
        for key in mine[start : start + size]:
            try:
                lora = io.load_adapter(os.path.join(inputs, key))
                check_match(
                    predictor.spec, lora.spec, "modules differ from those the model was trained on"
                )
                loaded.append((key, lora))
            except (ValueError, OSError) as e:
                failures.append((key, str(e)))
        if not loaded:
            continue
        batch = [lora for _, lora in loaded]
        batch += batch[-1:] * (size - len(batch))  # one batch size: one compile
        rows.extend(_rows(predictor, "path", [k for k, _ in loaded], batch))
    return rows, failures


def _rows(
    predictor: Predictor, column: str, keys: list[str], batch, layout: str = "leading"
) -> list[dict[str, Any]]:
    """Rows ``{column: key, ...}`` for ``keys``, the first ``len(keys)`` LoRAs of ``batch``
    (the rest is padding)."""
    decoded = predictor(batch, layout)
    return [{column: key, **{c: v[i] for c, v in decoded.items()}} for i, key in enumerate(keys)]


def write_predictions(
    rows: list[dict[str, Any]], failures: list[tuple[str, str]], out: str
) -> tuple[int, list[tuple[str, str]]]:
    """Writes ``out`` (CSV, one row per input) from every process's share; all processes call it.

    One process writes ``rows`` directly. Several processes each write their share next to
    ``out`` (``out.part-P-of-N.json``, cells as the CSV text; ``out`` must be on a
    filesystem all of them see), wait for each other, and process 0 concatenates the
    shares in process order (the global order of :func:`predict_inputs`) into ``out`` and
    removes them: the file is the one a single process writes, byte for byte.

    Returns:
      ``(number of rows written, every process's failures in the global order)``, on
      every process.
    """
    columns = list(rows[0]) if rows else None
    cells = [[str(row[c]) for c in columns] for row in rows] if rows else []
    count = jax.process_count()
    if count > 1:
        parts = [f"{out}.part-{p:05d}-of-{count:05d}.json" for p in range(count)]
        mine = parts[jax.process_index()]
        with open(mine + ".tmp", "w") as f:
            json.dump({"columns": columns, "cells": cells, "failures": failures}, f)
        os.replace(mine + ".tmp", mine)
        parallel.sync("gllora.predict: parts written")
        cells, failures = [], []
        for path in parts:
            with open(path) as f:
                part = json.load(f)
            columns = columns or part["columns"]
            cells.extend(part["cells"])
            failures.extend((key, reason) for key, reason in part["failures"])
        parallel.sync("gllora.predict: parts read")
        if parallel.is_main_process():
            for path in parts:
                os.remove(path)
    if parallel.is_main_process():
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns or ["path"])
            writer.writerows(cells)
    return len(cells), failures


__all__ = ["Predictor", "input_keys", "predict_inputs", "write_predictions"]
