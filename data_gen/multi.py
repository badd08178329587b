"""One dataset of several structures: a family finetuned on several base-model presets.

``python -m data_gen.arith_sources --base_configs=default,deep,wide,mid --holdout=mid
--out=DIR`` runs the family once per preset (dataset seed ``seed + 1000 * i`` for the
``i``-th, so the finetunes differ between base models) and combines the folders into one
multi-structure folder (:mod:`gllora.io.dataset.multi`): ``DIR/structures/<preset>``
each a complete dataset folder with its own 80/10/10 split, except the ``--holdout``
preset, whose LoRAs are all in its ``test`` split (held out from training).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

#: The dataset seed of the i-th base model.
SEED_STRIDE = 1000


def run_multi(
    family,
    out: str,
    base_configs: Sequence[str],
    holdout: str | None = None,
    size: str | int = "quick",
    seed: int = 0,
    rank: int | None = None,
    cache_dir: str | None = None,
    regenerate: bool = False,
    chunk: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs ``family`` (a :class:`data_gen.family.Family`) on each preset into one folder.

    Returns:
      ``{preset: the family's run statistics}``.

    Raises:
      ValueError: fewer than two presets, repeats, or a ``holdout`` not among them.
    """
    from gllora.io.dataset import multi

    base_configs = list(base_configs)
    if len(base_configs) < 2 or len(set(base_configs)) != len(base_configs):
        raise ValueError(f"--base_configs needs two or more distinct presets, got {base_configs}")
    if holdout is not None and holdout not in base_configs:
        raise ValueError(f"--holdout={holdout!r} is not one of --base_configs={base_configs}")
    if holdout is not None and len(base_configs) < 3:
        raise ValueError("--holdout needs at least two other presets to train on")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
    parts_dir = os.path.normpath(out) + ".parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    stats, parts, provenance = {}, {}, {}
    for i, preset in enumerate(base_configs):
        path = os.path.join(parts_dir, preset)
        stats[preset] = family.run(
            path, size, seed + SEED_STRIDE * i, rank, cache_dir, regenerate, chunk, preset, True
        )
        if preset == holdout:
            with open(os.path.join(path, "schema.json")) as f:
                num = json.load(f)["num_examples"]
            with open(os.path.join(path, "splits.json"), "w") as f:
                json.dump({"test": list(range(num))}, f)
        with open(os.path.join(path, "schema.json")) as f:
            sub = json.load(f)["provenance"]
        provenance[preset] = {
            "seed": sub["seed"],
            "base_model": {k: sub["base_model"][k] for k in ("cache_key", "preset", "config")},
        }
        parts[preset] = path
    multi.combine(
        out,
        parts,
        provenance={
            "generator": family.command,
            "family": family.name,
            "seed": seed,
            "size": str(size),
            "rank": family.default_rank if rank is None else rank,
            "base_configs": base_configs,
            "holdout": holdout,
            "seed_stride": SEED_STRIDE,
            "structures": provenance,
        },
        overwrite=overwrite,
    )
    shutil.rmtree(parts_dir, ignore_errors=True)
    return stats
