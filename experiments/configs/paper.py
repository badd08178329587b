r"""Configs of the section 5 reproduction: ``get_config("EXPERIMENT:MODEL[:SIZE]")``.

EXPERIMENT is one of ``quality``, ``attributes`` (personas), ``membership``,
``dataset_size`` (digit subsets), ``sources``, ``val_loss``, ``challenge_acc``
(arithmetic sources); MODEL one of ``mlp``, ``mlp_oalign``, ``mlp_svd``, ``mlp_dense``,
``glnet`` or the peers ``w2t``, ``spectral``, ``glnet_seq`` (not in the paper; W2T with
its authors' recipe, ``PEER_RECIPES``); SIZE ``paper`` (default), ``quick`` or ``tiny`` (epochs and seeds, see
``PROTOCOL``). The dataset folder is given on the command line. One run by hand::

    python -m data_gen.personas --size=paper --out=out/paper/data/personas
    python -m experiments.train --config=experiments/configs/paper.py:attributes:glnet:paper \
        --config.dataset=out/paper/data/personas --workdir=out/paper/runs/attributes/glnet

The whole section (every experiment, model, table and figure)::

    python -m experiments.reproduce --size=paper --out=out/paper

Protocol (the paper's, REFERENCE_NOTES.md): AdamW, batch 32, constant learning rate,
the model of the epoch with the lowest validation loss, 3 seeds, 80/10/10 splits.
Epochs: the authors' 12 for the persona (CelebA) tasks at paper size and 60 for the
language-model (arithmetic) tasks; 40 for digit subsets (the authors' count is not
published); quick sizes take more epochs of their smaller training splits.

``ARCH`` fixes each pair's architecture (the authors' where they published one);
``HPARAMS`` holds each pair's learning rate and weight decay, chosen on validation loss
by ``python -m experiments.sweep`` (the same sweep for every pair of all eight models,
the peers' included, at quick size, documented in experiments/repro/tuning.py); a pair
it does not hold keeps its family's base (learning rate 1e-3; weight decay 0 for the
diffusion families and 1e-2 for the language-model family, as the authors) or its
authors' recipe.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.configs import default

FAMILY = {
    "quality": "personas",
    "attributes": "personas",
    "membership": "digit_subsets",
    "dataset_size": "digit_subsets",
    "sources": "arith_sources",
    "val_loss": "arith_sources",
    "challenge_acc": "arith_sources",
}
TARGETS = {
    "quality": ("quality",),
    "attributes": ("attributes",),
    "membership": ("membership",),
    "dataset_size": ("dataset_size",),
    "sources": ("membership",),
    "val_loss": ("val_loss",),
    "challenge_acc": ("challenge_acc",),
}
MODELS = ("mlp", "mlp_oalign", "mlp_svd", "mlp_dense", "glnet", "w2t", "spectral", "glnet_seq")
CLASSIFICATION = ("attributes", "membership", "dataset_size", "sources")

#: The peers' own training recipes where they publish one, before tuning (issue 14):
#: W2T: AdamW, weight decay 1e-3, cosine schedule, and (classification only) its
#: permutation / sign-flip augmentation of the rank tokens with probability 0.5.
PEER_RECIPES: dict[str, dict[str, Any]] = {
    "w2t": {"weight_decay": 1e-3, "schedule": "cosine"},
}

#: ``{size: (num_seeds, {family: epochs})}``.
PROTOCOL = {
    "paper": (3, {"personas": 12, "digit_subsets": 40, "arith_sources": 60}),
    "quick": (3, {"personas": 20, "digit_subsets": 40, "arith_sources": 60}),
    "tiny": (2, {"personas": 2, "digit_subsets": 2, "arith_sources": 2}),
}

#: Defaults of a family before tuning: the authors' learning rate and weight decay.
BASE = {
    "personas": {"learning_rate": 1e-3, "weight_decay": 0.0},
    "digit_subsets": {"learning_rate": 1e-3, "weight_decay": 0.0},
    "arith_sources": {"learning_rate": 1e-3, "weight_decay": 1e-2},
}

#: Architectures, fixed (not swept): ``{experiment: {model: {hparam: value}}}``; every
#: other pair keeps the model class's defaults, which are the authors' (the MLPs: hidden
#: 256, two layers, 16 for MLP + Dense; W2T: hidden 128). GL-net follows the authors'
#: scripts (REFERENCE_NOTES.md), where the paper is silent: ONE equivariant layer of width
#: 64 on the diffusion families (their run_celeba.py / run_imagenette.py), width 16 with
#: each product reduced to its mean for the CLIP-score-like quality target (the paper's
#: "hidden dimension 1" variant), and two layers of width 16 on the language-model family.
#: The study ``python -m experiments.glnet_study`` measured these against the other
#: depths, widths and nonlinearities on validation loss (BUILD_NOTES.md, "GL-net's depth
#: and nonlinearity"); ``nonlinearity`` on the language-model family is its result: at
#: two layers the learned gate in residual blocks had validation loss 0.554 +- 0.006
#: against eq. 6's 0.623 +- 0.011 on source membership (3 seeds, quick size), so the
#: language-model family runs two layers of width 16 with that gate, not eq. 6.
_LM_GLNET = {"equiv_depth": 2, "equiv_width": 16, "nonlinearity": "gate", "residual": True}
ARCH: dict[str, dict[str, dict[str, Any]]] = {
    "quality": {"glnet": {"equiv_depth": 1, "equiv_width": 16, "head": "mean"}},
    "attributes": {"glnet": {"equiv_depth": 1, "equiv_width": 64}},
    "membership": {"glnet": {"equiv_depth": 1, "equiv_width": 64}},
    "dataset_size": {"glnet": {"equiv_depth": 1, "equiv_width": 64}},
    "sources": {"glnet": dict(_LM_GLNET)},
    "val_loss": {"glnet": dict(_LM_GLNET)},
    "challenge_acc": {"glnet": dict(_LM_GLNET)},
}

#: ``{experiment: {model: {"learning_rate", "weight_decay", "val_loss", "trials"}}}``:
#: each pair's learning rate and weight decay, chosen on validation loss by
#: ``python -m experiments.sweep`` (the same sweep for every pair, 6 trials, 7 for W2T
#: whose recipe's weight decay is off the grid: experiments/repro/tuning.py), with the
#: chosen trial's mean validation loss over its 2 seeds and the number of trials; every
#: trial is stored in ``sweep_quick.json`` beside this file (and checked against these
#: values by ``tests/test_reproduce.py``). Every pair of all eight models is here; the
#: digit-subset pairs of MLP + O-Align,
#: MLP + SVD and MLP + Dense and dataset size's MLP were swept last, once those models
#: computed their features once per run (their rank-32 trials had taken 2-21 min each).
#: The peers (W2T, Spectral, GL-net-seq) were swept the same way from their starting
#: points (W2T: its authors' recipe, cosine schedule kept; the others: the family's base).
HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "quality": {
        "mlp": {"learning_rate": 0.0005, "weight_decay": 0.0, "val_loss": 0.9719, "trials": 6},
        "mlp_oalign": {
            "learning_rate": 0.005,
            "weight_decay": 0.0,
            "val_loss": 0.6391,
            "trials": 6,
        },
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.6108, "trials": 6},
        "mlp_dense": {
            "learning_rate": 0.0005,
            "weight_decay": 0.01,
            "val_loss": 0.5789,
            "trials": 6,
        },
        "glnet": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.6027, "trials": 6},
        "w2t": {"learning_rate": 0.001, "weight_decay": 0.001, "val_loss": 0.7201, "trials": 7},
        "spectral": {"learning_rate": 0.05, "weight_decay": 0.0, "val_loss": 0.6613, "trials": 6},
        "glnet_seq": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.6186, "trials": 6},
    },
    "attributes": {
        "mlp": {"learning_rate": 0.0005, "weight_decay": 0.01, "val_loss": 0.7108, "trials": 6},
        "mlp_oalign": {
            "learning_rate": 0.001,
            "weight_decay": 0.0,
            "val_loss": 0.4097,
            "trials": 6,
        },
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.6151, "trials": 6},
        "mlp_dense": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.236, "trials": 6},
        "glnet": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.1687, "trials": 6},
        "w2t": {"learning_rate": 0.001, "weight_decay": 0.01, "val_loss": 0.2658, "trials": 7},
        "spectral": {"learning_rate": 0.05, "weight_decay": 0.0, "val_loss": 0.6485, "trials": 6},
        "glnet_seq": {
            "learning_rate": 0.005,
            "weight_decay": 0.01,
            "val_loss": 0.2479,
            "trials": 6,
        },
    },
    "membership": {
        "mlp": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.726, "trials": 6},
        "mlp_oalign": {"learning_rate": 0.0005, "weight_decay": 0.01, "val_loss": 0.5481, "trials": 6},
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.6569, "trials": 6},
        "mlp_dense": {"learning_rate": 0.001, "weight_decay": 0.0, "val_loss": 0.5779, "trials": 6},
        "glnet": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.504, "trials": 6},
        "w2t": {"learning_rate": 0.0005, "weight_decay": 0.01, "val_loss": 0.6892, "trials": 7},
        "spectral": {"learning_rate": 0.01, "weight_decay": 0.01, "val_loss": 0.666, "trials": 6},
        "glnet_seq": {
            "learning_rate": 0.005,
            "weight_decay": 0.01,
            "val_loss": 0.6413,
            "trials": 6,
        },
    },
    "dataset_size": {
        "mlp": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 2.0128, "trials": 6},
        "mlp_oalign": {"learning_rate": 0.0005, "weight_decay": 0.0, "val_loss": 1.8119, "trials": 6},
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 1.0236, "trials": 6},
        "mlp_dense": {"learning_rate": 0.001, "weight_decay": 0.01, "val_loss": 1.9275, "trials": 6},
        "glnet": {"learning_rate": 0.0001, "weight_decay": 0.01, "val_loss": 1.9989, "trials": 6},
        "w2t": {"learning_rate": 0.0005, "weight_decay": 0.01, "val_loss": 1.8272, "trials": 7},
        "spectral": {"learning_rate": 0.05, "weight_decay": 0.0, "val_loss": 1.3811, "trials": 6},
        "glnet_seq": {
            "learning_rate": 0.0005,
            "weight_decay": 0.01,
            "val_loss": 1.9152,
            "trials": 6,
        },
    },
    "sources": {
        "mlp": {"learning_rate": 0.001, "weight_decay": 0.01, "val_loss": 0.7092, "trials": 6},
        "mlp_oalign": {
            "learning_rate": 0.005,
            "weight_decay": 0.01,
            "val_loss": 0.6228,
            "trials": 6,
        },
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.6273, "trials": 6},
        "mlp_dense": {
            "learning_rate": 0.001,
            "weight_decay": 0.01,
            "val_loss": 0.5426,
            "trials": 6,
        },
        "glnet": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.5492, "trials": 6},
        "w2t": {"learning_rate": 0.001, "weight_decay": 0.001, "val_loss": 0.5919, "trials": 7},
        "spectral": {"learning_rate": 0.05, "weight_decay": 0.01, "val_loss": 0.6585, "trials": 6},
        "glnet_seq": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.565, "trials": 6},
    },
    "val_loss": {
        "mlp": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.4532, "trials": 6},
        "mlp_oalign": {
            "learning_rate": 0.005,
            "weight_decay": 0.0,
            "val_loss": 0.0886,
            "trials": 6,
        },
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.048, "trials": 6},
        "mlp_dense": {
            "learning_rate": 0.005,
            "weight_decay": 0.01,
            "val_loss": 0.0342,
            "trials": 6,
        },
        "glnet": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.0618, "trials": 6},
        "w2t": {"learning_rate": 0.001, "weight_decay": 0.01, "val_loss": 0.1398, "trials": 7},
        "spectral": {"learning_rate": 0.05, "weight_decay": 0.01, "val_loss": 0.2048, "trials": 6},
        "glnet_seq": {"learning_rate": 0.001, "weight_decay": 0.0, "val_loss": 0.0504, "trials": 6},
    },
    "challenge_acc": {
        "mlp": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.7124, "trials": 6},
        "mlp_oalign": {
            "learning_rate": 0.001,
            "weight_decay": 0.0,
            "val_loss": 0.2707,
            "trials": 6,
        },
        "mlp_svd": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.2806, "trials": 6},
        "mlp_dense": {"learning_rate": 0.0005, "weight_decay": 0.0, "val_loss": 0.176, "trials": 6},
        "glnet": {"learning_rate": 0.005, "weight_decay": 0.01, "val_loss": 0.2405, "trials": 6},
        "w2t": {"learning_rate": 0.001, "weight_decay": 0.0, "val_loss": 0.386, "trials": 7},
        "spectral": {"learning_rate": 0.0005, "weight_decay": 0.0, "val_loss": 0.5353, "trials": 6},
        "glnet_seq": {"learning_rate": 0.005, "weight_decay": 0.0, "val_loss": 0.2651, "trials": 6},
    },
}


def hparams(experiment: str, model: str, tuned: bool = True) -> dict[str, Any]:
    """One pair's hyperparameters: the family's base, a peer's recipe, the fixed
    architecture, and (``tuned``) the sweep's learning rate and weight decay.

    ``"chosen_by"`` says where the learning rate and weight decay come from.
    """
    out = {**BASE[FAMILY[experiment]], **PEER_RECIPES.get(model, {})}
    out["model"] = dict(ARCH.get(experiment, {}).get(model, {}))
    if model == "w2t" and experiment in CLASSIFICATION:
        out["model"]["token_augment"] = 0.5
    chosen = HPARAMS.get(experiment, {}).get(model) if tuned else None
    if chosen:
        out["learning_rate"] = chosen["learning_rate"]
        out["weight_decay"] = chosen["weight_decay"]
        out["chosen_by"] = (
            f"sweep: {chosen['trials']} trials, validation loss {chosen['val_loss']:.4f}"
        )
    elif model in PEER_RECIPES:
        out["chosen_by"] = "not swept: its authors' recipe"
    else:
        out["chosen_by"] = "not swept: the family's base"
    return out


def parse(arg: str | None) -> tuple[str, str, str]:
    parts = (arg or "").split(":")
    if len(parts) not in (2, 3) or parts[0] not in FAMILY or parts[1] not in MODELS:
        raise ValueError(
            f"paper.py config: expected 'EXPERIMENT:MODEL[:SIZE]' with EXPERIMENT in "
            f"{sorted(FAMILY)} and MODEL in {MODELS}, got {arg!r}"
        )
    size = parts[2] if len(parts) == 3 else "paper"
    if size not in PROTOCOL:
        raise ValueError(f"paper.py config: unknown size {size!r}; sizes: {sorted(PROTOCOL)}")
    return parts[0], parts[1], size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    experiment, model, size = parse(arg)
    config = default.get_config()  # locked: only existing fields can be set
    seeds, epochs = PROTOCOL[size]
    h = hparams(experiment, model)
    config.targets = TARGETS[experiment]
    config.model = model
    config.optimizer = "adamw"
    config.schedule = str(h.get("schedule", "constant"))
    config.batch_size = 32
    config.num_seeds = seeds
    config.num_epochs = epochs[FAMILY[experiment]]
    config.learning_rate = float(h["learning_rate"])
    config.weight_decay = float(h["weight_decay"])
    for key, value in h["model"].items():
        config.models[model][key] = value
    # Four checkpoints per run: resumable, without paying a save every short epoch.
    config.checkpoint_every_epochs = max(1, config.num_epochs // 4)
    return config
