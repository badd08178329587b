"""Trains a model: ``python -m experiments.train --config=CONFIG[:preset] --workdir=W``.

See ``experiments/configs/default.py`` for the fields; ``--config.x=y`` overrides one.
Started again with the same command, a run resumes from its last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import report
from gllora import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file[:preset].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, results).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(report.summary_table(results))
    print(f"results: {_WORKDIR.value}/results.json")


if __name__ == "__main__":
    app.run(main)
