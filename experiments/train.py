"""Trains a model: ``python -m experiments.train --config=CONFIG[:preset] --workdir=W``.

See ``experiments/configs/default.py`` for the fields; ``--config.x=y`` overrides one.
Started again with the same command, a run resumes from its last checkpoint (on any
number of devices).

The run uses every device it sees (``--config.num_devices=N``: the first N), with
``config.batch_size`` as the global batch. On several hosts, start the same command on
each; ``jax.distributed`` starts by itself under SLURM and on multi-host TPU slices,
elsewhere with ``--distributed=on --coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (see ``experiments/cli.py``).

A user error (a misspelt config field, an unknown dataset, target or model, a workdir
that holds another run) prints one line and exits with status 2; ``--debug`` shows the
traceback.
"""

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file[:preset].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, results).")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_distributed_flags()


def main(argv):
    del argv  # cli.run refuses positional arguments
    cli.initialize_distributed()  # before anything touches a device
    from experiments import report
    from gllora import parallel, train

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if parallel.is_main_process():
        print(report.summary_table(results))
        print(f"results: {_WORKDIR.value}/results.json")


if __name__ == "__main__":
    cli.run(main)
