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
        spec = dataset_lib._spec_from_json(meta["spec"], os.path.join(workdir, "targets.json"))
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


__all__ = ["Predictor"]
