"""What is in adapter files, for people auditing a folder, read from the headers alone.

    python -m experiments.inspect PATH [PATH ...] [--json]

Each PATH is an adapter (a PEFT folder or a ``.safetensors`` file) or a folder searched
for adapters as ``experiments/import_adapters.py`` does. For every adapter it prints
the format, the modules (count, shapes, ranks, kinds, the alpha/scale rule), the
dtypes, every tensor that is not a low-rank delta (full weight copies, vector
differences) and what it is, notes (dense differences, pruned ranks, DoRA per input
column), or why gllora refuses the file. No factor data is read (kohya ``alpha``
scalars aside), and JAX is not imported. ``--json`` prints one JSON object per adapter.

Exit status: 0 when every adapter can be read; 1 when some adapter is refused (listed
with the reason); 2 for a usage error (no PATH, a PATH that does not exist).
"""

from __future__ import annotations

import collections
import json
import os
import sys

from absl import flags

from experiments import cli
from gllora.io import adapters
from gllora.io.importer import find_adapters

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines this entrypoint's flags on ``fv`` (only when run, never on import)."""
    flags.DEFINE_bool("json", False, "One JSON object per adapter instead of text.", flag_values=fv)


def targets(paths: list[str]) -> list[str]:
    """The adapters named by ``paths``: each file or PEFT folder, and those under folders.

    Raises:
      FileNotFoundError: a path does not exist.
    """
    out = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        is_peft = os.path.isfile(os.path.join(path, "adapter_config.json"))
        if os.path.isdir(path) and not is_peft:
            out.extend(os.path.join(path, key) for key in find_adapters(path))
        else:
            out.append(path)
    return out


def describe(info: adapters.AdapterInfo) -> dict:
    """The report of one adapter as plain data (what ``--json`` prints)."""
    header_dtypes = collections.Counter()
    groups: dict[tuple, list[str]] = {}
    for name, mod in info.modules.items():
        key = (mod.kind, mod.layout, mod.shape, mod.rank, mod.scale, mod.alpha)
        groups.setdefault(key, []).append(name)
    from gllora.io._safetensors import read_header  # the dtypes of the factor tensors

    entries = read_header(info.weights).entries
    for mod in info.modules.values():
        for key in mod.keys:
            header_dtypes[entries[key].dtype] += 1
    return {
        "path": info.path,
        "format": info.format,
        "file_bytes": info.file_size,
        "modules": len(info.modules),
        "shapes": len(set(info.shapes.values())),
        "dtypes": dict(header_dtypes),
        "module_groups": [
            {
                "count": len(names),
                "kind": kind,
                "layout": layout,
                "shape": list(shape),
                "rank": rank,
                "scale": scale,
                "alpha": alpha,
                "first": names[0],
            }
            for (kind, layout, shape, rank, scale, alpha), names in groups.items()
        ],
        "extras": {
            kind: sum(kind in m.extras for m in info.modules.values())
            for kind in sorted({k for m in info.modules.values() for k in m.extras})
        },
        "not_low_rank": [
            {"key": x.key, "dtype": x.dtype, "shape": list(x.shape), "what": x.what}
            for x in info.non_lora
        ],
        "notes": sorted({note for m in info.modules.values() for note in m.notes}),
        "metadata_keys": len(info.metadata),
    }


def _scale_rule(g: dict) -> str:
    if g["alpha"] is None:
        return f"scale {g['scale']:g} (no alpha)"
    return f"scale {g['scale']:g} (alpha {g['alpha']:g})"


def render(report: dict) -> str:
    """The text report of one adapter."""
    lines = [
        report["path"],
        f"  format {report['format']}: {report['modules']} modules in {report['shapes']} "
        f"shapes, {report['file_bytes'] / 1e6:.2f} MB, dtypes "
        + ", ".join(f"{d} x{n}" for d, n in sorted(report["dtypes"].items())),
    ]
    for g in report["module_groups"]:
        n, m = g["shape"]
        lines.append(
            f"  {g['count']:4d} x {g['kind']} {g['layout']} [{n}, {m}] rank {g['rank']}, "
            f"{_scale_rule(g)}  e.g. {g['first']}"
        )
    for kind, count in report["extras"].items():
        lines.append(f"  extra input {kind!r} on {count} modules")
    for x in report["not_low_rank"]:
        lines.append(f"  not a low-rank delta: {x['key']} {x['dtype']} {x['shape']}: {x['what']}")
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def run(paths: list[str], as_json: bool) -> int:
    """Inspects ``paths``; returns the exit status (see the module docstring)."""
    if not paths:
        print("inspect: error: give at least one adapter file or folder", file=sys.stderr)
        return 2
    try:
        found = targets(paths)
    except FileNotFoundError as e:
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    if not found:
        print(f"inspect: error: no adapters under {', '.join(paths)}", file=sys.stderr)
        return 2
    refused = 0
    for path in found:
        try:
            report = describe(adapters.inspect(path))
        except (ValueError, OSError) as e:
            refused += 1
            reason = str(e).removeprefix(f"{path}: ")
            report = {"path": path, "refused": reason}
            text = f"{path}\n  REFUSED: {reason}"
        else:
            text = render(report)
        try:
            print(json.dumps(report) if as_json else text, flush=True)
        except BrokenPipeError:  # the reader (head, less) has gone: stop quietly
            sys.stderr.close()
            return 0
    if refused:
        print(
            f"inspect: {refused} of {len(found)} adapters cannot be read (listed above)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str]) -> int:
    return run(argv[1:], FLAGS.json)


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=True)  # the paths
