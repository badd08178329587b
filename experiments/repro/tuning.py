"""The hyperparameter sweep of the section 5 models (``python -m experiments.sweep``).

Every (experiment, model) pair is tuned the same way, on the validation split of the
quick-size datasets, each trial with 2 seeds and the quick protocol's epochs
(``experiments/configs/paper.py``), from the pair's architecture (``paper.ARCH``: the
authors' where they published one, else the model's defaults) and the family's base
(``paper.BASE``, and for a peer its authors' recipe, ``paper.PEER_RECIPES``):

1. learning rate in the paper's grid {5e-5, 1e-4, 5e-4, 1e-3, 5e-3} (the linear spectral
   head a decade higher: {5e-4, 1e-3, 5e-3, 1e-2, 5e-2}: it moves ~lr per step);
2. weight decay {0, 1e-2} at the best learning rate, and the pair's starting weight
   decay where it is neither (W2T's recipe: 1e-3), so that the second stage compares
   against the first stage's winner and the final pick is the best of all trials.

Each stage keeps the value with the lowest mean validation loss (the loss of each
seed's best epoch): 6 trials per pair (7 where the starting weight decay is off the
grid), every trial stored (``DIR/sweep.json``, and each run's folder under
``DIR/trials``). Architectures are not swept: they follow the authors
(GL-net's depth and width per family are settled by the study of
``python -m experiments.glnet_study``).
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The paper's learning-rate grid (REFERENCE_NOTES.md: the authors' sweep).
LEARNING_RATES = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3)
#: The linear spectral head's: the same grid a decade higher.
LINEAR_LEARNING_RATES = (5e-4, 1e-3, 5e-3, 1e-2, 5e-2)
WEIGHT_DECAYS = (0.0, 1e-2)
SWEEP_SEEDS = 2


def weight_decays(start: float) -> tuple[float, ...]:
    """The second stage's grid: :data:`WEIGHT_DECAYS` and the pair's starting value."""
    return tuple(sorted({*WEIGHT_DECAYS, float(start)}))


def tag(h: dict[str, Any]) -> str:
    """A folder name for one trial's hyperparameters."""
    model = "_".join(f"{k}{v}" for k, v in sorted(h["model"].items()))
    return f"lr{h['learning_rate']:g}_wd{h['weight_decay']:g}_{model}".rstrip("_")


def sweep_pair(experiment: str, model: str, data: str, out: str) -> dict[str, Any]:
    """The coordinate sweep of one model on one experiment (run it in a worker of
    :mod:`experiments.repro.workers`). Finished trials are reused.

    Returns:
      ``{"trials": {tag: {"hparams", "val_loss", "val_loss_std", "test", "seconds"}},
      "chosen": hparams, "val_loss": float}``.
    """
    from experiments.configs import paper
    from experiments.repro import runner, workers

    # The family's base, a peer's recipe and the pair's fixed architecture.
    best = paper.hparams(experiment, model, tuned=False)
    best.pop("chosen_by")  # the sweep's result says how it was chosen
    trials: dict[str, dict] = {}

    def trial(h: dict) -> float:
        name = tag(h)
        if name not in trials:
            overrides = {
                "num_seeds": SWEEP_SEEDS,
                "learning_rate": float(h["learning_rate"]),
                "weight_decay": float(h["weight_decay"]),
                "schedule": str(h.get("schedule", "constant")),
                "model": h["model"],
            }
            config = workers.make_config(experiment, model, "quick", data, overrides)
            workdir = os.path.join(out, "trials", experiment, model, name)
            results, seconds, _ = runner.run_training(config, workdir)
            val = results["summary"]["validation"]["loss"]
            trials[name] = {
                "hparams": json.loads(json.dumps(h)),
                "val_loss": val["mean"],
                "val_loss_std": val["std"],
                "test": runner.headline(results),
                "seconds": round(seconds, 1),
            }
            print(f"  {experiment}/{model}/{name}: val loss {val['mean']:.4f}", flush=True)
        return trials[name]["val_loss"]

    rates = LINEAR_LEARNING_RATES if model == "spectral" else LEARNING_RATES
    decays = weight_decays(best["weight_decay"])
    for key, values in (("learning_rate", rates), ("weight_decay", decays)):
        candidates = []
        for value in values:
            h = json.loads(json.dumps(best))
            h[key] = value
            candidates.append((trial(h), h))
        best = min(candidates, key=lambda c: c[0])[1]
    return {"trials": trials, "chosen": best, "val_loss": trial(best)}
