"""Builds a LoRA dataset folder from a directory of adapters and a labels table.

    python -m experiments.import_adapters --adapters=DIR --labels=labels.csv --out=DATASET \
        [--target=quality:regression:clip_score --target=tags:multilabel:tag.*] \
        [--metadata_columns=ss_num_train_images,ss_learning_rate,ss_tag_frequency] \
        [--on_mismatch=error|majority|intersect] [--allow_skipped] [--overwrite]

Adapters are found recursively under ``--adapters`` (a PEFT folder with its
``adapter_config.json`` is one adapter; any other ``.safetensors`` file is one); the
labels table (CSV with a header, or ``.jsonl``) is keyed by each adapter's path
relative to ``--adapters`` in its ``--key_column``. Header metadata named by
``--metadata_columns`` becomes label columns (``ss_tag_frequency``: one bool column
``tag.<tag>`` per tag), never model input. The rules are in :mod:`gllora.io.importer`.

Exit status: 0 when every adapter was imported; 1 when any was skipped (the dataset of
the others is still written, and every skipped file is listed with its reason) unless
``--allow_skipped``, or when none could be imported; 2 when the import cannot go on
(adapters of different structures under ``--on_mismatch=error``, a bad labels table
or target, a flag that does not parse), with the reason on one line (``--debug``: the
traceback).
"""

from __future__ import annotations

import sys

from absl import flags

from experiments import cli
from gllora.io import importer

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines this entrypoint's flags on ``fv`` (only when run, never on import)."""
    flags.DEFINE_string(
        "adapters", None, "Folder searched recursively for adapters.", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Dataset folder to write.", flag_values=fv)
    flags.DEFINE_string(
        "labels",
        None,
        "Labels table: CSV with a header, or .jsonl; keyed by adapter path.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "key_column",
        "path",
        "The labels table's column of adapter paths (relative to --adapters).",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "target",
        [],
        "name:task[:col1,col2,...] (task: regression, binary, multilabel, "
        "categorical; columns may be patterns like tag.*). Repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "metadata_columns",
        [],
        "Header metadata keys to make label columns "
        "(ss_tag_frequency: one bool column tag.<tag> per tag).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "min_tag_adapters",
        1,
        "Tags of ss_tag_frequency used by fewer adapters get no column.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "on_mismatch",
        "error",
        importer.MISMATCH_POLICIES,
        "Adapters of different modules/shapes: error (list the differences), majority "
        "(import the most common structure, skip the rest), intersect (import all, keeping "
        "only the modules every adapter has with the same shape).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "allow_skipped", False, "Exit 0 even if some adapters were skipped.", flag_values=fv
    )
    flags.DEFINE_string(
        "split_column",
        None,
        "A labels column naming each adapter's split (train, ...); default: a seeded shuffle.",
        flag_values=fv,
    )
    flags.DEFINE_integer("split_seed", 0, "Seed of the stored split.", flag_values=fv)
    flags.DEFINE_list(
        "fractions", ["0.8", "0.1", "0.1"], "Train, validation, test fractions.", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing dataset folder.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show progress bars on stderr.", flag_values=fv)
    flags.mark_flags_as_required(["adapters", "out"], flag_values=fv)


def run(fv: flags.FlagValues = FLAGS) -> int:
    """Runs the import with parsed flags ``fv``; returns the exit status."""
    try:
        result = importer.import_adapters(
            fv.adapters,
            fv.out,
            labels=fv.labels,
            key_column=fv.key_column,
            targets=fv.target,
            metadata_columns=fv.metadata_columns,
            min_tag_adapters=fv.min_tag_adapters,
            on_mismatch=fv.on_mismatch,
            split_column=fv.split_column,
            split_seed=fv.split_seed,
            fractions=[float(x) for x in fv.fractions],
            overwrite=fv.overwrite,
            progress=fv.progress,
        )
    except (importer.ImportAdaptersError, FileNotFoundError) as e:
        if "debug" in fv and fv.debug:
            raise
        print(f"import_adapters: error: {cli.one_line(e)}", file=sys.stderr)
        return 2
    print(result.summary())
    if result.out is None:
        print("import_adapters: no adapter could be imported", file=sys.stderr)
        return 1
    if result.skipped and not fv.allow_skipped:
        print(
            f"import_adapters: {len(result.skipped)} adapters were skipped (listed above); "
            "exit status 1 (pass --allow_skipped to accept)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str]) -> int:
    del argv  # cli.run refuses positional arguments
    return run()


if __name__ == "__main__":
    define_flags()
    cli.run(main)
