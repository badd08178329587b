"""LoRA dataset folders: sharded safetensors + a JSON schema + a labels table + splits.

A dataset folder is meant to be inspected by hand::

    DIR/schema.json                 modules and shapes, label columns, targets, shards, provenance
    DIR/labels.csv                  one row per LoRA: ``id`` and every label column
    DIR/splits.json                 {"train": [ids], "validation": [ids], "test": [ids]}
    DIR/shards/NNNNN.safetensors    factors, stacked per module group, example-major

``schema.json`` holds ``format`` (``"gllora.dataset"``), ``version``, ``num_examples``,
``modules`` (``[{"name", "n", "m"}]`` in order), ``groups`` (same-shaped modules, as
:class:`gllora.lora.GroupSpec`), ``extras``, ``columns`` (``{column: "float" | "int" |
"bool" | "str"}``), ``targets`` (``{name: {"task", "columns"[, "classes"]}}``),
``shards`` (``[{"file", "num_examples", "ranks", "bytes"}]``) and ``provenance``.

Each shard holds examples of one *rank signature* (the stored rank of every module
group: the largest true rank among the group's modules), so examples of different
ranks coexist without padding on disk. In a shard, group ``g`` is stored as
``g{g}.u [N_s, k, n, r]``, ``g{g}.v [N_s, k, m, r]`` (float32, columns past a module's
true rank are zero), ``g{g}.rank [N_s, k]`` (int32 true ranks), extras as
``extra.{kind}.{name} [N_s, size]``, and ``ids [N_s]`` (int64 example ids). Reading
maps the shards into memory and copies only the rows a batch needs, so a dataset
larger than memory streams: mapped file pages are page cache, which the kernel
reclaims, not process memory. A batch pads each group to the largest rank in the
batch, which is exact (zero columns), and keeps every module's true rank.

Shapes, names and dtypes are checked against the schema when writing (every
:meth:`DatasetWriter.add`) and when reading (:func:`open` checks every file's header
and the small files; :meth:`Dataset.batch` checks the ranks it reads). Errors are
``ValueError`` (or ``FileNotFoundError``) naming the file at fault.

This module reads and writes numpy: :meth:`Dataset.batch` wraps numpy arrays in a
:class:`gllora.Lora` without copying them to a device.

The code is in one module per part of the folder: ``schema``
(``schema.json``, module specs, targets, the checks of what is written),
``labels`` (``labels.csv``, ``splits.json``), ``shards`` (shard files, memory maps,
copying rows), ``writer``, ``reader`` and ``prefetch`` (reading ahead in a thread, also
used by the training pipeline).
"""

from __future__ import annotations

import os

from gllora.io.dataset.prefetch import prefetched
from gllora.io.dataset.reader import Dataset, jax_free_unbatch
from gllora.io.dataset.schema import FORMAT, KINDS, TASKS, VERSION, spec_from_json, spec_to_json
from gllora.io.dataset.writer import DatasetWriter
from gllora.spec import LAYOUTS

__all__ = [
    "FORMAT",
    "KINDS",
    "LAYOUTS",
    "TASKS",
    "VERSION",
    "Dataset",
    "DatasetWriter",
    "jax_free_unbatch",
    "open",
    "prefetched",
    "spec_from_json",
    "spec_to_json",
]


def open(path: str | os.PathLike) -> Dataset:  # mirrors the builtin on purpose
    """Opens a dataset folder for reading (memory-mapped; validates it against its schema).

    Raises:
      FileNotFoundError: the folder or one of its files is missing (naming it).
      ValueError: naming the file, for anything that disagrees with the schema.
    """
    return Dataset(path)
