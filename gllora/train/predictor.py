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
from jax.sharding import Mesh

from gllora import lora as lora_lib
from gllora import parallel
from gllora.io import dataset as dataset_lib
from gllora.lora import Lora
from gllora.train import programs as programs_lib
from gllora.train import state as state_lib
from gllora.train import tasks


class Predictor:
    """A trained run's best models, ready to predict. Build with :meth:`from_workdir`."""

    def __init__(
        self,
        workdir: str,
        programs: programs_lib.Programs,
        spec: lora_lib.LoraSpec,
        ranks: list[int],
        params,
        consts,
        seeds: list[int],
    ):
        self.workdir, self.config, self.targets = workdir, programs.config, programs.targets
        self.spec, self.ranks, self.seeds = spec, ranks, seeds
        self.params, self.consts = params, consts
        self.mesh = programs.mesh
        self._programs = programs
        self._leading = jax.jit(self._apply_leading, out_shardings=parallel.replicated(self.mesh))

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
        targets = [tasks.Target.from_json(t) for t in meta["targets"]]
        spec = dataset_lib.spec_from_json(meta["spec"], os.path.join(workdir, "targets.json"))
        ranks = meta["ranks"]
        model = programs_lib.build_model(config, sum(t.num_outputs for t in targets))
        steps = 1  # the optimizer's structure does not depend on the schedule length
        mesh = parallel.local_mesh() if mesh is None else mesh
        programs = programs_lib.Programs(
            config, model, targets, programs_lib.make_optimizer(config, steps), mesh
        )
        abstract = state_lib.abstract_state(
            programs, spec, ranks, meta["extras_sizes"], len(meta["seeds"])
        )
        # Restored onto this mesh, kernels split as in training where they divide evenly.
        shardings = programs.place(abstract, strict=False)
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        manager = state_lib.checkpoint_manager(workdir)
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint yet; train first")
        state = state_lib.restore(manager, target)
        return cls(
            workdir, programs, spec, ranks, state["best_params"], state["consts"], meta["seeds"]
        )

    def _apply_leading(self, params, consts, batch: Lora):
        """``[S, B, num_outputs]`` for a batch with a leading axis."""

        def per_seed(p, c):
            return jax.vmap(lambda x: self._programs._apply(p, c, x, False, None))(batch)

        return jax.vmap(per_seed)(params, consts)

    def outputs(self, lora: Lora) -> np.ndarray:
        """Raw model outputs of every seed: ``[S, num_outputs]`` or ``[S, B, num_outputs]``."""
        if lora.spec.order != self.spec.order or lora.spec.groups != self.spec.groups:
            raise ValueError(
                f"{self.workdir}: the LoRA's modules differ from those the model was "
                "trained on: " + "; ".join(self.spec.diff(lora.spec))
            )
        single = not lora.batch_shape
        batch = lora_lib.stack([lora]) if single else lora
        size = batch.batch_shape[0]
        padded = parallel.round_up(size, self.mesh)
        if padded != size:  # copies of the last LoRA, so the batch splits over the devices
            rows = np.r_[np.arange(size), np.full(padded - size, size - 1)]
            batch = jax.tree_util.tree_map(lambda x: x[rows], batch)
        batch = parallel.put(batch, parallel.shardings_along(batch, 0, self.mesh))
        out = parallel.to_host(self._leading(self.params, self.consts, batch))[:, :size]
        return out[:, 0] if single else out

    def __call__(self, lora: Lora) -> dict[str, Any]:
        """Predictions averaged over seeds, in the targets' units (see :func:`tasks.decode`)."""
        return tasks.decode(self.targets, self.outputs(lora).mean(axis=0))


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
      ``(rows, failures)``: one row per input, ``{"input": key, <prediction columns>}``,
      in a deterministic order; ``[(key, reason)]``.
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
            rows.extend(_rows(predictor, chunk, ds.batch(ids, ranks=ranks)))
        return rows, []
    failures = []
    for start in range(0, len(mine), size):
        loaded = []
        for key in mine[start : start + size]:
            try:
                lora = io.load_adapter(os.path.join(inputs, key))
                if (
                    lora.spec.order != predictor.spec.order
                    or lora.spec.groups != predictor.spec.groups
                ):
                    raise ValueError(
                        "modules differ from those the model was trained on: "
                        + "; ".join(predictor.spec.diff(lora.spec)[:5])
                    )
                loaded.append((key, lora))
            except (ValueError, OSError) as e:
                failures.append((key, str(e)))
        if not loaded:
            continue
        ranks = [
            max([predictor.ranks[g]] + [l.u[g].shape[-1] for _, l in loaded])
            for g in range(len(predictor.ranks))
        ]
        padded = [l.pad_rank(ranks) for _, l in loaded]
        padded += padded[-1:] * (size - len(padded))
        rows.extend(_rows(predictor, [k for k, _ in loaded], lora_lib.stack(padded)))
    return rows, failures


def _rows(predictor: Predictor, keys: list[str], batch: Lora) -> list[dict[str, Any]]:
    """Rows for ``keys``, the first ``len(keys)`` LoRAs of ``batch`` (the rest is padding)."""
    decoded = predictor(batch)
    return [{"input": key, **{c: v[i] for c, v in decoded.items()}} for i, key in enumerate(keys)]


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
            writer.writerow(columns or ["input"])
            writer.writerows(cells)
    return len(cells), failures


__all__ = ["Predictor", "input_keys", "predict_inputs", "write_predictions"]
