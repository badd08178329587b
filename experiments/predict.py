"""Predictions of a trained run for a folder of adapter files or a dataset folder.

    python -m experiments.predict --workdir=W --inputs=PATH --out=predictions.csv

``PATH`` is searched recursively for adapters (PEFT folders, diffusers / kohya /
LyCORIS ``.safetensors`` files), or is a dataset folder (every example is predicted).
One CSV row per input, keyed as the labels are: ``path`` (the adapter's path relative
to ``PATH``, as ``experiments.import_adapters`` keys the labels table) or, for a dataset
folder, ``id`` (as its ``labels.csv``), so predictions join with the labels. Every input
that could not be predicted is listed with its reason, and the exit status is 1 if
there was any (unless ``--allow_failures``); a user error (no such run directory or
inputs) prints one line and exits with status 2 (``--debug``: the traceback).

Batches are split over this process's devices. On several hosts (same flags as
``experiments.train``: ``--distributed``, ...) each process reads and predicts its own
contiguous share of the sorted inputs and process 0 merges the shares into ``--out``
(which must be on a filesystem every host sees), in the order one process would write.
"""

import os
import sys

from absl import flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
_INPUTS = flags.DEFINE_string("inputs", None, "Folder of adapter files, or a dataset folder.")
_OUT = flags.DEFINE_string("out", "predictions.csv", "CSV file to write.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "LoRAs per jitted call (over all local devices).")
_ALLOW = flags.DEFINE_bool(
    "allow_failures", False, "Exit 0 even if some inputs could not be predicted."
)
flags.mark_flags_as_required(["workdir", "inputs"])
cli.define_distributed_flags()


def main(argv):
    del argv  # cli.run refuses positional arguments
    if not os.path.exists(_INPUTS.value):
        raise FileNotFoundError(f"--inputs={_INPUTS.value}: no such folder")
    cli.initialize_distributed()  # before anything touches a device
    from gllora import parallel
    from gllora.train.predictor import Predictor, predict_inputs, write_predictions

    logging.set_verbosity(logging.WARNING)
    predictor = Predictor.from_workdir(_WORKDIR.value)
    rows, failures = predict_inputs(predictor, _INPUTS.value, _BATCH.value)
    count, failures = write_predictions(rows, failures, _OUT.value)
    if parallel.is_main_process():
        print(f"wrote {count} predictions to {_OUT.value}")
        if failures:
            print(f"{len(failures)} input(s) could not be predicted:", file=sys.stderr)
            for key, reason in failures:
                print(f"  {key}: {reason}", file=sys.stderr)
    if failures and not _ALLOW.value:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
