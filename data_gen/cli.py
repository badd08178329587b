"""The command line of the built-in dataset generators: their flags and their one ``main``.

Absl only: ``python -m data_gen.personas --help`` answers before the family's module,
and with it JAX, is imported. Every generator takes the same flags (:func:`define_flags`)
and runs its family's :meth:`data_gen.family.Family.run`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from absl import app, flags


def define_flags() -> None:
    """Defines the common generator flags once (safe to call from every generator).

    ``--out`` (dataset folder), ``--size`` (``quick``, ``paper`` or a count), ``--seed``,
    ``--rank`` (default: the family's), ``--cache_dir``, ``--regenerate``, ``--chunk``,
    ``--base_config`` (``default`` or ``tiny``), ``--overwrite``; ``--base_configs`` and
    ``--holdout`` (several presets into one dataset of several structures,
    :mod:`data_gen.multi`).
    """
    if "out" in flags.FLAGS:
        return
    flags.DEFINE_string("out", None, "Dataset folder to write.")
    flags.DEFINE_string("size", "quick", "'quick' (about a minute), 'paper', or a count.")
    flags.DEFINE_integer("seed", 0, "Dataset seed: same seed, same dataset (same machine).")
    flags.DEFINE_integer("rank", None, "LoRA rank (default: the family's).")
    flags.DEFINE_string(
        "cache_dir", None, "Base-model cache (default: $GLLORA_CACHE, else ~/.cache/gllora)."
    )
    flags.DEFINE_bool("regenerate", False, "Pretrain the base models again, ignoring the cache.")
    flags.DEFINE_integer("chunk", None, "LoRAs finetuned at once (default: the family's).")
    flags.DEFINE_string("base_config", "default", "Base-model preset ('tiny' for tests).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing dataset folder.")
    flags.DEFINE_list(
        "base_configs",
        [],
        "Several base-model presets into one dataset of several structures (data_gen.multi).",
    )
    flags.DEFINE_string(
        "holdout", None, "With --base_configs: the preset whose LoRAs are all test."
    )


def check_out(out: str, overwrite: bool) -> None:
    """Refuses a non-empty ``--out`` without ``--overwrite`` before any work (the dataset
    writer refuses it too, but only once the LoRAs are made, and names its argument)."""
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise app.UsageError(
            f"{out}: folder exists and is not empty (pass --overwrite to replace it)"
        )


def entrypoint(family_module: str) -> Callable[[list[str]], None]:
    """Defines the common flags and returns the absl ``main`` of a generator.

    Args:
      family_module: the module that defines the family's ``FAMILY``
        (a :class:`data_gen.family.Family`), imported when ``main`` runs.
    """
    define_flags()

    def main(argv: list[str]) -> None:
        del argv  # experiments.cli.run refuses positional arguments
        f = flags.FLAGS
        if not f.out:
            raise app.UsageError("--out is required")
        check_out(f.out, f.overwrite)
        family = importlib.import_module(family_module).FAMILY
        if f.base_configs:
            from data_gen import multi

            try:
                multi.run_multi(family, f.out, f.base_configs, f.holdout, f.size, f.seed, f.rank,
                                f.cache_dir, f.regenerate, f.chunk, f.overwrite)  # fmt: skip
            except ValueError as e:
                raise app.UsageError(str(e)) from None
            return
        if f.holdout:
            raise app.UsageError("--holdout needs --base_configs")
        family.run(f.out, f.size, f.seed, f.rank, f.cache_dir, f.regenerate, f.chunk,
                   f.base_config, f.overwrite)  # fmt: skip

    return main
