"""Training configs: ``get_config("preset")``, presets below.

    python -m experiments.train --config=experiments/configs/default.py:tiny \
        --config.dataset=/tmp/synthetic --workdir=/tmp/run_tiny
    python -m experiments.train --config=experiments/configs/default.py \
        --config.dataset=DATASET --config.targets="('quality',)" --config.model=mlp_svd --workdir=W

Every model's hyperparameters live under ``config.models.<name>`` (defaults from the
model classes), so any of them can be overridden from the command line:
``--config.models.glnet.equiv_width=32``. The config is locked: a misspelt field is
an error.

Presets: ``default`` (the paper's protocol: AdamW, batch 32, constant learning rate
1e-3, best epoch on validation), ``tiny`` (seconds on a CPU: for tests and demos).

The same config runs on one CPU, a GPU node or a TPU slice: ``batch_size`` is the global
batch, split over every device (``--config.num_devices=N`` takes the first N);
``--config.shard_params=fan_in`` (or ``fan_out``) also splits the first dense layer of
``mlp`` / ``mlp_dense`` (and GL-net's head) over them. Several hosts: the same command
on each (see ``gllora/parallel.py`` for ``--distributed``).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from gllora import models

#: Attributes that are not hyperparameters (set by the engine).
_NOT_HPARAMS = {"parent", "name", "num_outputs", "template"}


def model_defaults() -> ml_collections.ConfigDict:
    """``{model: {hyperparameter: default}}`` read off the registered model classes."""
    out = ml_collections.ConfigDict()
    for name, (cls, _) in models.REGISTRY.items():
        fields = ml_collections.ConfigDict()
        for f in dataclasses.fields(cls):
            if f.name in _NOT_HPARAMS:
                continue
            fields[f.name] = config_dict.placeholder(int) if f.default is None else f.default
        out[name] = fields
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = ""  # a dataset folder (gllora.io.dataset)
    config.targets = ("quality",)  # dataset targets, or "task:col1,col2"
    config.model = "glnet"
    config.models = model_defaults()

    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.weight_decay = 1e-2
    config.schedule = "constant"
    config.grad_clip = 0.0  # 0: off
    config.batch_size = 32
    config.num_epochs = 60
    config.num_seeds = 3
    config.seed = 0
    # "gl" / "o": act by a random group element on every example; "perm_sign": W2T's random
    # permutation of rank components and joint sign flips (each with probability 0.5).
    config.augment = "none"
    config.augment_max_cond = 4.0
    config.input_scale = True  # scale u, v per module group by 1/RMS on training data
    # "float64" (needs JAX_ENABLE_X64=1): runs that differ only in the order of sums
    # (device count, seeds batched or not) agree to float64 rounding; tests use it.
    config.dtype = "float32"

    config.eval_batch_size = 256
    config.in_memory_gb = 2.0  # splits smaller than this are read onto the device once
    # Models whose features have no parameters (mlp_svd, mlp_oalign) compute them once per
    # run, not at every step, where every split's fit in_memory_gb (gllora.train.featurized).
    config.precompute_features = True
    config.log_every_steps = 50
    config.checkpoint_every_epochs = 1
    config.progress = True

    # Devices (gllora.parallel): config.batch_size is the global batch, split over the
    # devices of a 1-D mesh; both fields may change when a run is resumed.
    config.num_devices = 0  # devices in the mesh; 0: all (of every process)
    config.shard_params = "none"  # "fan_in" / "fan_out": split GroupedDense kernels too

    preset = arg or "default"
    if preset == "tiny":
        # Seconds on a CPU, for tests and demos: the paper's model widths, few epochs, one
        # seed, on e.g. 3,000 synthetic LoRAs (data_gen.synthetic).
        config.targets = ("log_norm", "alignment")
        config.num_epochs = 6
        config.num_seeds = 1
        config.weight_decay = 1e-4
        config.log_every_steps = 20
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; presets: default, tiny")
    config.lock()  # a misspelt field is an error, not a new field
    return config
