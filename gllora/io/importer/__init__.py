"""Building a dataset folder from adapter files and a labels table.

::

    from gllora.io import importer
    result = importer.import_adapters(
        "adapters/", "datasets/mine", labels="labels.csv",
        targets=["quality:regression:clip_score"],
        metadata_columns=["ss_num_train_images", "ss_learning_rate"],
    )
    result.imported, result.skipped

The command line is ``python -m experiments.import_adapters`` (same options).

**Adapters** are found recursively under the adapters folder: a folder holding an
``adapter_config.json`` is one PEFT adapter (its contents are not searched further);
any other ``*.safetensors`` file is one adapter (diffusers, kohya, LyCORIS, ...), and
legacy ``*.bin`` / ``*.pt`` / ``*.pth`` / ``*.ckpt`` files are listed so that they are
reported as skipped rather than silently ignored. Hidden files and folders are not
searched. An adapter's *key* is its path relative to the adapters folder, with ``/``
separators (``peft/run_3``, ``sd/style_a.safetensors``); examples are written in
natural order of their keys (``run_2`` before ``run_10``).

**Labels** come from a table keyed by that path: a CSV file with a header (the key
column, ``path`` by default, and any label columns) or JSON lines (``.jsonl``; one
object per line with the key and the labels). A CSV column's kind is inferred from
all its cells: ``true``/``false`` -> bool, integers -> int, numbers -> float, else
str; an empty cell, or ``nan`` in a numeric column, is a missing label. JSON values
keep their JSON type (ints and floats mixed -> float; ``null`` is missing). The
dataset gets every table column, plus the key column (str) for auditing.

**Header metadata** (kohya's ``ss_*`` keys, parsed: ``"1e-4"`` -> float) becomes label
columns named by ``metadata_columns``: a scalar key becomes one column of the same
name; ``ss_tag_frequency`` (``{folder: {tag: count}}``) becomes one bool column
``tag.<tag>`` per tag used by at least ``min_tag_adapters`` adapters (``True`` where
the adapter was trained with the tag; pick them all with the target column pattern
``tag.*``). Metadata is only ever written to the labels table: a model's input is the
factors ``(u, v)`` alone, exactly as :func:`gllora.io.load_adapter` reads them.

**Skipping**: a file that cannot be read, has no labels row, a missing label or
metadata value, or (``on_mismatch="majority"``) a different structure is skipped;
the others are imported. :attr:`ImportResult.skipped` lists each with its reason.

**Structures** (module names, shapes, extra inputs; ranks may differ, they are
padded exactly when batched) must agree across adapters. ``on_mismatch`` chooses:

- ``"error"`` (default): raise :class:`ImportAdaptersError` listing every distinct
  structure, how many adapters have it, and how it differs from the most common one;
  nothing is written.
- ``"majority"``: keep the adapters with the most common structure (ties: the one of
  the first adapter in key order); skip the others, each with its differences.
- ``"intersect"``: keep every adapter but only the modules that all of them have with
  the same shape (in the first adapter's order); an extra input (DoRA magnitude) is
  kept for a module only if every adapter has it with the same size. The dropped
  modules are listed in :attr:`ImportResult.dropped` and the dataset's provenance.
"""

from __future__ import annotations

from gllora.io.importer.driver import MISMATCH_POLICIES, ImportResult, Skipped, import_adapters
from gllora.io.importer.inputs import (
    ImportAdaptersError,
    LabelsTable,
    find_adapters,
    parse_target,
    read_labels_table,
)

__all__ = [
    "MISMATCH_POLICIES",
    "ImportAdaptersError",
    "ImportResult",
    "LabelsTable",
    "Skipped",
    "find_adapters",
    "import_adapters",
    "parse_target",
    "read_labels_table",
]
