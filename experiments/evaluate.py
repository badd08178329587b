"""Re-evaluates a run's best checkpoint: ``python -m experiments.evaluate --workdir=W [--split=test]``.

Prints the metrics (mean +- std over seeds) and writes ``W/evaluation_<split>.json``.
Batches are split over every device (of every process: same ``--distributed`` flags as
``experiments.train``); the checkpoint may come from any number of devices.
"""

import json
import os

from absl import app, flags, logging

from gllora import parallel
from gllora.train import evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "Dataset folder (default: the one the run trained on)."
)
flags.mark_flags_as_required(["workdir"])
parallel.define_flags()


def main(argv):
    del argv
    parallel.initialize_from_flags()  # before anything touches a device
    logging.set_verbosity(logging.WARNING)
    result = evaluation.evaluate_workdir(_WORKDIR.value, _SPLIT.value, _DATASET.value)
    if not parallel.is_main_process():
        return
    path = os.path.join(_WORKDIR.value, f"evaluation_{_SPLIT.value}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for target, metrics in result["summary"].items():
        if "mean" in metrics:  # the summed loss, not a target
            continue
        cells = ", ".join(
            f"{k} {v['mean']:.4f} +- {v['std']:.4f}"
            for k, v in metrics.items()
            if isinstance(v, dict) and "mean" in v
        )
        print(f"{_SPLIT.value} {target}: {cells}")
    print(f"written: {path}")


if __name__ == "__main__":
    app.run(main)
