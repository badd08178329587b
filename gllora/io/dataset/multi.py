"""Dataset folders holding LoRAs of several structures (other base models, depths, targets).

One folder, the examples grouped by structure on disk, each group a complete
single-structure dataset folder of its own::

    DIR/schema.json                    {"format": "gllora.dataset.multi", "version": 1,
                                        "num_examples", "structures": [{"name", "folder",
                                        "num_examples"}], "columns", "targets", "provenance"}
    DIR/structures/<name>/             a dataset folder (gllora.io.dataset): its own
                                       schema, labels, splits and shards

An example's id in the whole folder is its structure's offset (the examples of the
structures before it) plus its id in its structure; labels are the structures' labels
concatenated in that order, and a split is the union of the structures' splits. Every
structure must have the same label columns and targets. Because each group is a
dataset folder, a single-structure model trains on one of them as it is
(``--config.dataset=DIR/structures/<name>``), on the same splits, and a structure whose
examples are all in its ``test`` split is held out from training.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from gllora.io.dataset.reader import Dataset
from gllora.io.dataset.schema import VERSION

FORMAT = "gllora.dataset.multi"
SPLITS = ("train", "validation", "test")


def is_multi(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a multi-structure dataset folder (by its schema's format)."""
    try:
        with open(os.path.join(os.fspath(path), "schema.json")) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class MultiDataset:
    """A multi-structure dataset folder opened for reading (see the module docstring).

    Attributes:
      path, schema, provenance, columns, targets: as :class:`Dataset` (the targets and
        columns are every structure's).
      structures: ``[(name, Dataset)]`` in order.
      offsets: ``[S + 1]`` int64: structure ``s`` holds ids ``offsets[s]:offsets[s + 1]``.
      num_examples, labels, splits: over the whole folder (global ids).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        where = os.path.join(self.path, "schema.json")
        try:
            with open(where) as f:
                self.schema = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: missing; is {self.path} a dataset folder?") from None
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if self.schema.get("format") != FORMAT or self.schema.get("version") != VERSION:
            raise ValueError(
                f"{where}: format {self.schema.get('format')!r} version "
                f"{self.schema.get('version')!r} is not {FORMAT!r} version {VERSION}"
            )
        entries = self.schema.get("structures")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: 'structures' must be a non-empty list")
        self.structures: list[tuple[str, Dataset]] = []
        for e in entries:
            folder = e.get("folder", "") if isinstance(e, dict) else ""
            if not folder or os.path.isabs(folder) or os.path.normpath(folder).startswith(".."):
                raise ValueError(
                    f"{where}: structure entry {e!r} needs a folder inside {self.path}"
                )
            ds = Dataset(os.path.join(self.path, folder))
            if ds.num_examples != e.get("num_examples"):
                raise ValueError(
                    f"{where}: structure {e.get('name')!r} has {ds.num_examples} examples, the "
                    f"schema says {e.get('num_examples')}"
                )
            self.structures.append((str(e["name"]), ds))
        first = self.structures[0][1]
        for name, ds in self.structures[1:]:
            if ds.columns != first.columns or ds.targets != first.targets:
                keys = set(ds.columns) | set(first.columns) | set(ds.targets) | set(first.targets)
                differ = sorted(
                    k
                    for k in keys
                    if ds.columns.get(k) != first.columns.get(k)
                    or ds.targets.get(k) != first.targets.get(k)
                )
                raise ValueError(
                    f"{ds.path}: label columns or targets {differ[:5]} differ from those of "
                    f"{first.path} (every structure of {self.path} must have the same)"
                )
        self.columns, self.targets = first.columns, first.targets
        self.provenance: dict[str, Any] = self.schema.get("provenance", {})
        sizes = [ds.num_examples for _, ds in self.structures]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_examples = int(self.offsets[-1])
        self.labels = {
            c: np.concatenate([ds.labels[c] for _, ds in self.structures]) for c in self.columns
        }
        self.splits = {}
        for split in sorted({s for _, ds in self.structures for s in ds.splits}):
            self.splits[split] = np.concatenate(
                [
                    ds.splits[split] + off
                    for (_, ds), off in zip(self.structures, self.offsets)
                    if split in ds.splits
                ]
            ).astype(np.int64)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {ds.num_examples}" for n, ds in self.structures)
        return f"MultiDataset({self.path!r}, {self.num_examples} LoRAs in {parts})"

    def __len__(self) -> int:
        return self.num_examples

    def names(self) -> list[str]:
        return [name for name, _ in self.structures]

    def structure_of(self, ids: np.ndarray) -> np.ndarray:
        """The structure index of each global id, ``[*ids.shape]``."""
        return np.searchsorted(self.offsets, np.asarray(ids), side="right") - 1

    def local_ids(self, ids: np.ndarray, s: int) -> np.ndarray:
        """Global ids of structure ``s`` as its own ids (raises if any is another's)."""
        ids = np.asarray(ids)
        if (self.structure_of(ids) != s).any():
            raise ValueError(f"{self.path}: ids outside structure {self.structures[s][0]!r}")
        return ids - self.offsets[s]

    def target_values(self, name: str) -> np.ndarray:
        return np.concatenate([ds.target_values(name) for _, ds in self.structures])

    def unmap(self) -> None:
        for _, ds in self.structures:
            ds.unmap()


def combine(
    out: str | os.PathLike,
    parts: Mapping[str, str | os.PathLike],
    *,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Makes a multi-structure folder at ``out`` from single-structure dataset folders.

    The folders are moved (renamed) into ``out/structures/<name>``; their labels,
    splits and shards are kept as they are.

    Args:
      parts: ``{structure name: dataset folder}``, in the order wanted.
      provenance: free JSON (the generator's arguments).
      overwrite: replace an existing multi-structure folder at ``out``.

    Returns:
      ``out``.

    Raises:
      ValueError: an existing ``out`` that may not be replaced, a bad name, or parts
        whose label columns or targets differ (checked by opening the result).
    """
    out = os.path.normpath(os.fspath(out))
    replaceable = overwrite and os.path.isfile(os.path.join(out, "schema.json"))
    if os.path.exists(out) and os.listdir(out) and not replaceable:
        raise ValueError(
            f"{out}: exists; pass overwrite=True to replace a dataset folder (one with a "
            "schema.json)"
        )
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "structures"))
    entries = []
    for name, folder in parts.items():
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"{out}: bad structure name {name!r}")
        ds = Dataset(folder)
        rel = os.path.join("structures", name)
        os.replace(os.fspath(folder), os.path.join(tmp, rel))
        entries.append({"name": name, "folder": rel, "num_examples": ds.num_examples})
    schema = {
        "format": FORMAT,
        "version": VERSION,
        "num_examples": sum(e["num_examples"] for e in entries),
        "structures": entries,
        "provenance": dict(provenance or {}),
    }
    with open(os.path.join(tmp, "schema.json"), "w") as f:
        json.dump(schema, f, indent=1)
    MultiDataset(tmp)  # every check before the folder appears
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
