"""Predictions of a trained run: ``Predictor.from_workdir(W)(lora)``, jitted.

The predictor holds every seed's best model; it averages their outputs (an ensemble)
and returns them in the targets' own units: regression values, label probabilities,
class labels and probabilities.

>>> predictor = Predictor.from_workdir("runs/glnet")
>>> predictor(lora)                 # one LoRA: {"quality": array(0.31), ...}
>>> predictor(batch)                # a batch with a leading axis: {"quality": [B], ...}
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from gllora import lora as lora_lib
from gllora.io import dataset as dataset_lib
from gllora.lora import Lora
from gllora.train import loop, tasks


class Predictor:
    """A trained run's best models, ready to predict. Build with :meth:`from_workdir`."""

    def __init__(
        self,
        workdir: str,
        programs: loop.Programs,
        spec: lora_lib.LoraSpec,
        ranks: list[int],
        params,
        consts,
        seeds: list[int],
    ):
        self.workdir, self.config, self.targets = workdir, programs.config, programs.targets
        self.spec, self.ranks, self.seeds = spec, ranks, seeds
        self.params, self.consts = params, consts
        self._programs = programs
        self._leading = jax.jit(self._apply_leading)

    @classmethod
    def from_workdir(cls, workdir: str) -> "Predictor":
        """Loads the best model of every seed from a finished (or checkpointed) run."""
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
        model = loop.build_model(config, sum(t.num_outputs for t in targets))
        steps = 1  # the optimizer's structure does not depend on the schedule length
        programs = loop.Programs(config, model, targets, loop.make_optimizer(config, steps))
        abstract = loop.abstract_state(
            programs, spec, ranks, meta["extras_sizes"], len(meta["seeds"])
        )
        manager = loop._checkpoint_manager(workdir)
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint yet; train first")
        state = loop._restore(manager, abstract)
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
        out = np.asarray(self._leading(self.params, self.consts, batch))
        return out[:, 0] if single else out

    def __call__(self, lora: Lora) -> dict[str, Any]:
        """Predictions averaged over seeds, in the targets' units (see :func:`tasks.decode`)."""
        return tasks.decode(self.targets, self.outputs(lora).mean(axis=0))


def predict_inputs(
    predictor: Predictor, inputs: str, batch_size: int = 64
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Predictions for a dataset folder (every example) or a folder of adapter files.

    Adapter folders are searched recursively (PEFT folders and ``.safetensors`` files of
    any format :func:`gllora.io.load_adapter` reads). A file that cannot be read, or whose
    modules differ from those the model was trained on, is not predicted and is
    returned with its reason.

    Returns:
      ``(rows, failures)``: one row per input, ``{"input": key, <prediction columns>}``,
      in a deterministic order; ``[(key, reason)]``.
    """
    from gllora import io
    from gllora.io import importer

    if os.path.exists(os.path.join(inputs, "schema.json")):
        ds = dataset_lib.open(inputs)
        keys, batches = [], []
        for ids in np.array_split(
            np.arange(ds.num_examples), max(1, -(-ds.num_examples // batch_size))
        ):
            batch = ds.batch(
                ids, ranks=[max(a, b) for a, b in zip(ds.max_ranks(), predictor.ranks)]
            )
            keys.extend(str(i) for i in ids)
            batches.append(batch)
        return _rows(predictor, keys, batches), []
    loaded, failures = [], []
    for key in importer.find_adapters(inputs):
        try:
            lora = io.load_adapter(os.path.join(inputs, key))
            if lora.spec.order != predictor.spec.order or lora.spec.groups != predictor.spec.groups:
                raise ValueError(
                    "modules differ from those the model was trained on: "
                    + "; ".join(predictor.spec.diff(lora.spec)[:5])
                )
            loaded.append((key, lora))
        except (ValueError, OSError) as e:
            failures.append((key, str(e)))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        ranks = [
            max([predictor.ranks[g]] + [l.u[g].shape[-1] for _, l in chunk])
            for g in range(len(predictor.ranks))
        ]
        batch = lora_lib.stack([l.pad_rank(ranks) for _, l in chunk])
        rows.extend(_rows(predictor, [k for k, _ in chunk], [batch]))
    return rows, failures


def _rows(predictor: Predictor, keys: list[str], batches: list[Lora]) -> list[dict[str, Any]]:
    decoded = [predictor(b) for b in batches]
    columns = {c: np.concatenate([d[c] for d in decoded]) for c in decoded[0]} if decoded else {}
    return [{"input": key, **{c: v[i] for c, v in columns.items()}} for i, key in enumerate(keys)]


__all__ = ["Predictor", "predict_inputs"]
