"""The import driver: :func:`import_adapters` and what it returns.

It inspects every adapter, applies the labels table, header metadata and the
``on_mismatch`` policy, and writes the dataset folder; :mod:`gllora.io.importer`
describes the rules and re-exports the public names.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm

from gllora.io import adapters, dataset
from gllora.io.importer.inputs import (
    TAG_PREFIX,
    TAGS_KEY,
    ImportAdaptersError,
    expand_targets,
    find_adapters,
    natural_key,
    read_labels_table,
    read_metadata,
    scalar_kind,
)
from gllora.io.importer.structures import (
    Module,
    differences,
    extras_spec,
    intersection,
    mismatch_report,
    structure,
)

MISMATCH_POLICIES = ("error", "majority", "intersect")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An adapter that was not imported: its key and why."""

    path: str
    reason: str


@dataclasses.dataclass
class ImportResult:
    """What :func:`import_adapters` did.

    Attributes:
      out: the dataset folder, or None when nothing could be imported.
      imported: keys of the imported adapters, in dataset order (example id = index).
      skipped: every adapter not imported, with its reason.
      dropped: ``on_mismatch="intersect"``: the modules (and extras) left out.
      unused_labels: keys of labels-table rows that matched no adapter.
      columns: the dataset's label columns and their kinds.
    """

    out: str | None
    imported: list[str]
    skipped: list[Skipped]
    dropped: list[str]
    unused_labels: list[str]
    columns: dict[str, str]

    def summary(self) -> str:
        """A human-readable report: counts, then every skipped adapter and its reason."""
        lines = [
            f"imported {len(self.imported)} adapters"
            + (f" into {self.out}" if self.out else " (no dataset written)")
            + f"; skipped {len(self.skipped)}"
        ]
        if self.dropped:
            lines.append(
                f"dropped from every adapter ({len(self.dropped)}): " + ", ".join(self.dropped)
            )
        if self.unused_labels:
            shown = ", ".join(self.unused_labels[:10])
            more = f" ... ({len(self.unused_labels)} rows)" if len(self.unused_labels) > 10 else ""
            lines.append(f"labels rows without an adapter: {shown}{more}")
        if self.skipped:
            lines.append("skipped:")
            lines.extend(f"  {s.path}: {s.reason}" for s in self.skipped)
        return "\n".join(lines)


# -- the import -------------------------------------------------------------------


def _convert(value: Any, kind: str) -> Any:
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    return value if isinstance(value, str) else str(value)


def import_adapters(
    adapters_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    key_column: str = "path",
    targets: Sequence[str | tuple[str, Mapping[str, Any]]] = (),
    metadata_columns: Sequence[str] = (),
    min_tag_adapters: int = 1,
    on_mismatch: str = "error",
    split_column: str | None = None,
    split_seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Builds the dataset folder ``out`` from the adapters under ``adapters_dir``.

    See :mod:`gllora.io.importer` for how adapters, labels, metadata, skipping and
    ``on_mismatch`` work.

    Args:
      adapters_dir: the folder searched (recursively) for adapters.
      out: the dataset folder to write (see :class:`gllora.io.dataset.DatasetWriter`).
      labels: a CSV or JSON-lines labels table keyed by adapter path; None: no table
        (only metadata columns and the path).
      key_column: the table's column of adapter paths; also the dataset's path column.
      targets: ``"name:task:col1,col2"`` strings (columns may be ``fnmatch`` patterns;
        ``"name:task"`` means the column ``name``), or ``(name, {"task", "columns"})``.
      metadata_columns: header metadata keys to turn into label columns.
      min_tag_adapters: ``ss_tag_frequency`` tags used by fewer adapters get no column.
      on_mismatch: ``"error"``, ``"majority"`` or ``"intersect"``.
      split_column: a table column naming each adapter's split (``train``, ...); it
        becomes the stored splits instead of a label. Default: a seeded shuffle.
      split_seed, fractions: the seeded shuffle's seed and train/validation/test cut.
      overwrite: replace an existing dataset folder at ``out``.
      progress: show progress bars (on stderr).

    Returns:
      An :class:`ImportResult`; ``out`` is None if no adapter could be imported.

    Raises:
      FileNotFoundError: ``adapters_dir`` or ``labels`` does not exist.
      ImportAdaptersError: mismatched structures under ``on_mismatch="error"``, a bad
        labels table, a target naming no column, clashing column names.
    """
    if on_mismatch not in MISMATCH_POLICIES:
        raise ImportAdaptersError(
            f"on_mismatch must be one of {MISMATCH_POLICIES}, got {on_mismatch!r}"
        )
    root = os.fspath(adapters_dir)
    keys = find_adapters(root)
    out = os.fspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:  # say so before the scan
        raise ImportAdaptersError(
            f"{out}: folder exists and is not empty (pass --overwrite, or overwrite=True, "
            "to replace a dataset folder)"
        )
    table = read_labels_table(labels, key_column) if labels is not None else None
    table_columns = dict(table.columns) if table else {}
    if split_column is not None and split_column not in table_columns:
        raise ImportAdaptersError(f"split column {split_column!r} is not a column of {labels}")
    table_columns.pop(split_column, None)
    scalar_keys = [k for k in metadata_columns if k != TAGS_KEY]
    clash = set(scalar_keys) & (set(table_columns) | {key_column})
    if clash:
        raise ImportAdaptersError(
            f"metadata columns {sorted(clash)} are also columns of the labels table"
        )
    if len(set(metadata_columns)) != len(metadata_columns):
        raise ImportAdaptersError(f"metadata columns repeat: {list(metadata_columns)}")

    skipped: list[Skipped] = []
    infos: dict[str, adapters.AdapterInfo] = {}
    metadata: dict[str, dict[str, Any]] = {}
    tags: dict[str, set[str]] = {}
    for key in tqdm(keys, desc="inspect", unit="file", disable=not progress, file=sys.stderr):
        reason = None
        try:
            info = adapters.inspect(os.path.join(root, key))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            reason = _reason(e, os.path.join(root, key))
        if reason is None and table is not None and key not in table.rows:
            reason = f"no row for it in the labels table {table.path}"
        if reason is None and table is not None:
            empty = [c for c, x in table.rows[key].items() if x is None]
            if empty:
                reason = f"missing labels in {table.path}: {empty}"
        if reason is None:
            reason = read_metadata(info, metadata_columns, metadata.setdefault(key, {}), tags, key)
        if reason is not None:
            skipped.append(Skipped(key, reason))
            metadata.pop(key, None)
            continue
        infos[key] = info

    # Structures: one, or a policy.
    structs = {key: structure(info) for key, info in infos.items()}
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for key, s in structs.items():
        groups[s].append(key)
    dropped: list[str] = []
    modules: list[Module] = list(next(iter(groups))) if groups else []
    if len(groups) > 1:
        if on_mismatch == "error":
            also = (
                f"\n(besides, {len(skipped)} files were skipped: "
                + "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
                + (" ..." if len(skipped) > 5 else "")
                + ")"
                if skipped
                else ""
            )
            raise ImportAdaptersError(mismatch_report(groups) + also)
        if on_mismatch == "majority":
            best = max(groups.values(), key=len)  # dicts keep order: ties go to the first
            ref = structs[best[0]]
            modules = list(ref)
            for key in list(infos):
                if structs[key] != ref:
                    diff = "; ".join(differences(ref, structs[key], limit=4))
                    skipped.append(
                        Skipped(
                            key,
                            f"its modules differ from the majority's ({len(best)} adapters): {diff}",
                        )
                    )
                    del infos[key]
        else:
            modules, dropped = intersection(list(groups))
            if not modules:
                raise ImportAdaptersError(
                    "on_mismatch='intersect': the adapters have no module in common with the "
                    "same shape\n" + mismatch_report(groups)
                )
    kept = list(infos)

    # Columns: the table's, the metadata's, the path.
    columns: dict[str, str] = {key_column: "str", **table_columns}
    for k in scalar_keys:
        columns[k] = scalar_kind([metadata[key][k] for key in kept]) if kept else "str"
    tag_columns = {}
    if TAGS_KEY in metadata_columns:
        counts = collections.Counter(t for key in kept for t in tags[key])
        for tag in sorted(t for t, c in counts.items() if c >= min_tag_adapters):
            name = TAG_PREFIX + tag
            if name in columns:
                raise ImportAdaptersError(f"tag column {name!r} clashes with a label column")
            tag_columns[name] = tag
            columns[name] = "bool"
    expanded = expand_targets(targets, columns)
    rows = {}
    for key in kept:
        row = {key_column: key}
        for c, kind in table_columns.items():
            row[c] = _convert(table.rows[key][c], kind)
        for k in scalar_keys:
            row[k] = _convert(metadata[key][k], columns[k])
        for name, tag in tag_columns.items():
            row[name] = tag in tags[key]
        rows[key] = row
    for name, t in expanded.items():  # a whole-table problem, not one adapter's
        for c in t["columns"]:
            if t["task"] in ("binary", "multilabel") and columns[c] == "int":
                bad = sorted({r[c] for r in rows.values()} - {0, 1})
                if bad:
                    raise ImportAdaptersError(
                        f"{t['task']} target {name!r}: column {c!r} has values {bad[:5]}, not 0/1"
                    )

    result = ImportResult(None, [], skipped, dropped, [], columns)
    if table is not None:
        found = set(keys)
        result.unused_labels = sorted((k for k in table.rows if k not in found), key=natural_key)
    if not kept:
        skipped.sort(key=lambda s: natural_key(s.path))
        return result
    make_writer = functools.partial(
        dataset.DatasetWriter,
        out,
        modules=[(m[0], m[1], m[2]) for m in modules],
        extras=extras_spec(modules),
        targets=expanded,
        provenance={
            "importer": "gllora.io.importer",
            "adapters": os.path.abspath(root),
            "labels": os.path.abspath(labels) if labels is not None else None,
            "key_column": key_column,
            "metadata_columns": list(metadata_columns),
            "on_mismatch": on_mismatch,
            "dropped_modules": dropped,
            "formats": dict(collections.Counter(infos[k].format for k in kept)),
            "skipped": [dataclasses.asdict(s) for s in skipped],
        },
        overwrite=overwrite,
    )
    try:
        writer = make_writer()
    except ValueError as e:
        raise ImportAdaptersError(str(e)) from None
    splits: dict[str, list[int]] = collections.defaultdict(list)
    try:
        for key in tqdm(kept, desc="import", unit="adapter", disable=not progress, file=sys.stderr):
            try:
                _add(writer, os.path.join(root, key), modules, rows[key])
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                skipped.append(Skipped(key, _reason(e, os.path.join(root, key))))
                continue
            if split_column is not None:
                splits[str(table.rows[key][split_column])].append(len(result.imported))
            result.imported.append(key)
        if not result.imported:
            writer.abort()
            skipped.sort(key=lambda s: natural_key(s.path))
            return result
        skipped.sort(key=lambda s: natural_key(s.path))
        writer.provenance["skipped"] = [dataclasses.asdict(s) for s in skipped]
        result.out = writer.close(
            splits=dict(splits) if split_column is not None else None,
            split_seed=split_seed,
            fractions=fractions,
        )
    except BaseException:
        writer.abort()
        raise
    return result


def _reason(e: BaseException, path: str) -> str:
    text = str(e) or type(e).__name__
    if text.startswith(path + ": "):  # the key is shown beside the reason already
        text = text[len(path) + 2 :]
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def _add(writer: dataset.DatasetWriter, path: str, modules: Sequence[Module], row) -> None:
    """Loads one adapter and adds its ``modules`` and labels to ``writer``.

    One host-side path: :func:`~gllora.io.load_adapter` gives numpy arrays already
    stacked by shape; only when the import keeps fewer modules (``intersect``) are they
    selected again; :meth:`~gllora.io.dataset.DatasetWriter.add_lora` checks the
    structure against the schema (:func:`gllora.spec.check_match`) and writes the group
    arrays as they are.
    """
    lora = adapters.load_adapter(path)
    names = [m[0] for m in modules]
    extras = extras_spec(modules)
    have = {kind: list(per) for kind, per in lora.extras.items()}
    if list(lora.names) != names or have != extras:
        missing = [n for n in names if n not in lora.shapes]
        if missing:
            raise ValueError(
                f"{path}: modules {missing[:5]} are missing (its header said otherwise)"
            )
        lora = lora.select(names, extras)
    writer.add_lora(lora, row)
