"""Re-evaluates a run's best checkpoint: ``python -m experiments.evaluate --workdir=W``.

``--split`` picks the split (default ``test``), ``--dataset`` another dataset folder of
the same modules. Prints the metrics (mean +- std over seeds) and writes
``W/evaluation_<split>.json``. Batches are split over every device (of every process:
same ``--distributed`` flags as ``experiments.train``); the checkpoint may come from any
number of devices. A user error prints one line and exits with status 2 (``--debug``:
the traceback).
"""

import json
import os

from absl import flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "Dataset folder (default: the one the run trained on)."
)
flags.mark_flags_as_required(["workdir"])
cli.define_distributed_flags()


def main(argv):
    del argv  # cli.run refuses positional arguments
    cli.initialize_distributed()  # before anything touches a device
    from experiments import report
    from gllora import parallel
    from gllora.train import evaluation

    logging.set_verbosity(logging.WARNING)
    result = evaluation.evaluate_workdir(_WORKDIR.value, _SPLIT.value, _DATASET.value)
    if not parallel.is_main_process():
        return
    path = os.path.join(_WORKDIR.value, f"evaluation_{_SPLIT.value}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for line in report.metric_lines(result["summary"], _SPLIT.value):
        print(line)
    print(f"written: {path}")


if __name__ == "__main__":
    cli.run(main)
