"""Demo: GL-net against a plain MLP on a GL-invariant target of synthetic LoRAs.

Writes synthetic LoRAs whose factors were moved by random GL(r) elements, with targets
that depend only on the products ``u_i v_i^T`` (``data_gen.synthetic``), trains each
model with the library's engine (:func:`gllora.train.train_and_evaluate`, the ``tiny``
preset of ``experiments/configs/default.py``) and prints their test errors beside a
constant predictor. The same run from the command line, one model at a time, is
``python -m data_gen.synthetic`` then ``python -m experiments.train``.

    python -m experiments.demo [--num=1200 --epochs=6 --target=log_norm --models=mlp,glnet]
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import flags

from experiments import cli

_NUM = flags.DEFINE_integer("num", 1200, "Synthetic LoRAs (80/10/10 train/validation/test).")
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Training epochs per model.")
_TARGET = flags.DEFINE_string("target", "log_norm", "Regression target of data_gen.synthetic.")
_MODELS = flags.DEFINE_list("models", ["mlp", "glnet"], "Models to train.")
_OUT = flags.DEFINE_string(
    "out", None, "Folder for the dataset and the runs (default: a temporary one, removed)."
)


def constant_mse(path: str, target: str) -> float:
    """Test MSE, in standardised units, of predicting the training mean of ``target``."""
    import numpy as np

    from gllora.io import dataset

    ds = dataset.open(path)
    y = ds.labels[target]
    mu, sd = y[ds.splits["train"]].mean(), y[ds.splits["train"]].std()
    return float(np.mean(((y[ds.splits["test"]] - mu) / sd) ** 2))


def run(root: str) -> None:
    from data_gen import synthetic
    from experiments.configs import default
    from gllora import models
    from gllora.train import train_and_evaluate

    regression = [n for n, t in synthetic.targets().items() if t["task"] == "regression"]
    cli.check_choices("target", [_TARGET.value], regression)
    cli.check_choices("models", _MODELS.value, models.names())
    data = synthetic.write(os.path.join(root, "synthetic"), _NUM.value, overwrite=True)
    print(
        f"{_NUM.value} synthetic LoRAs, target {_TARGET.value!r} (GL-invariant), "
        f"{_EPOCHS.value} epochs each; test MSE in standardised units"
    )
    print(f"{'model':<10} {'test MSE':>9} {'seconds':>8}")
    print(f"{'constant':<10} {constant_mse(data, _TARGET.value):>9.3f} {'-':>8}")
    for name in _MODELS.value:
        config = default.get_config("tiny")
        config.update(dataset=data, targets=(_TARGET.value,), model=name, progress=False)
        config.num_epochs = _EPOCHS.value
        start = time.perf_counter()
        results = train_and_evaluate(config, os.path.join(root, "runs", name))
        mse = results["summary"]["test"][_TARGET.value]["mse"]["mean"]
        print(f"{name:<10} {mse:>9.3f} {time.perf_counter() - start:>8.1f}")


def main(argv):
    del argv  # cli.run refuses positional arguments
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    if _OUT.value:
        run(_OUT.value)
        return
    with tempfile.TemporaryDirectory(prefix="gllora_demo_") as root:
        run(root)


if __name__ == "__main__":
    cli.run(main)
