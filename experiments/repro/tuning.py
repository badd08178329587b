"""The hyperparameter sweep of the section 5 models (``python -m experiments.sweep``).

For every experiment and model, a small coordinate sweep on the validation split of
the quick-size datasets, each trial with 2 seeds and the quick protocol's epochs
(``experiments/configs/paper.py``):

1. learning rate in {3e-4, 1e-3, 3e-3} (weight decay, width and depth at their defaults);
2. width at the best learning rate: MLP hidden {128, 256, 512} (MLP + Dense {8, 16, 32}:
   its first layer has ``sum n m x hidden`` weights), GL-net equivariant width {8, 16, 32};
3. depth: MLP layers {1, 2, 3}, GL-net equivariant layers {1, 2};
4. weight decay {0, 1e-2}.

Peers (not in the paper): W2T hidden {64, 128, 256} and module layers {1, 2}, starting
from its authors' recipe (``PEER_RECIPES``); GL-net-seq width {8, 16, 32} and
transformer layers {1, 2}; the spectral detector's learning rates a decade higher
(a linear model) and its aggregate (mean, mean and max) in place of a width.

Each stage keeps the value with the lowest mean validation loss (the loss of each
seed's best epoch): 7-8 trials per pair.
"""

from __future__ import annotations

import json
import os
from typing import Any

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
WIDTHS = {
    "mlp": ("hidden", (128, 256, 512)),
    "mlp_oalign": ("hidden", (128, 256, 512)),
    "mlp_svd": ("hidden", (128, 256, 512)),
    "mlp_dense": ("hidden", (8, 16, 32)),
    "glnet": ("equiv_width", (8, 16, 32)),
    "w2t": ("hidden", (64, 128, 256)),
    "spectral": ("aggregate", ("mean", "mean_max")),  # a linear model: its features
    "glnet_seq": ("width", (8, 16, 32)),
}
DEPTHS = {
    "mlp": ("depth", (1, 2, 3)),
    "mlp_oalign": ("depth", (1, 2, 3)),
    "mlp_svd": ("depth", (1, 2, 3)),
    "mlp_dense": ("depth", (1, 2, 3)),
    "glnet": ("equiv_depth", (1, 2)),
    "w2t": ("module_depth", (1, 2)),
    "spectral": None,  # no depth
    "glnet_seq": ("depth", (1, 2)),
}
#: Learning rates of the linear spectral head: it moves ~lr per step, so its grid is
#: a decade higher.
LINEAR_LEARNING_RATES = (1e-3, 3e-3, 1e-2)
WEIGHT_DECAYS = (0.0, 1e-2)
SWEEP_SEEDS = 2


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
    from experiments.configs import default, paper
    from experiments.repro import runner, workers

    base = paper.BASE[paper.FAMILY[experiment]]
    width_key, widths = WIDTHS[model]
    depth_key, depths = DEPTHS[model] or (None, ())
    defaults = default.model_defaults()[model]
    # The family's base and, for a peer, its authors' recipe (not earlier sweep choices).
    best = {**base, **paper.PEER_RECIPES.get(model, {})}
    best["model"] = {width_key: defaults[width_key]}
    if model == "w2t" and experiment in paper.CLASSIFICATION:
        best["model"]["token_augment"] = 0.5
    if depth_key:
        best["model"][depth_key] = defaults[depth_key]
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
    stages = [
        ("learning_rate", False, rates),
        (width_key, True, widths),
        *([(depth_key, True, depths)] if depth_key else []),
        ("weight_decay", False, WEIGHT_DECAYS),
    ]
    for key, in_model, values in stages:
        candidates = []
        for value in values:
            h = json.loads(json.dumps(best))
            (h["model"] if in_model else h)[key] = value
            candidates.append((trial(h), h))
        best = min(candidates, key=lambda c: c[0])[1]
    return {"trials": trials, "chosen": best, "val_loss": trial(best)}
