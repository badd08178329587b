"""The one ``run`` of every built-in family: base model, LoRAs, provenance, folder, stats.

A family (:mod:`data_gen.images.personas`, :mod:`data_gen.images.digit_subsets`,
:mod:`data_gen.arith.sources`, ...) declares a :class:`Family`: its names, sizes and
targets, how to load its pretrained base model (a :class:`Base`) and how to finetune and
measure ``n`` LoRAs of it (a :class:`Generated`). :meth:`Family.run` is what is the same
for every family: the ``--size`` and ``--rank`` defaults, timing the base model, the
provenance every dataset folder carries (generator, family, seed, size, rank, the base
model's cache key, preset, config and metrics), writing the folder with its stored split
(seeded by the dataset seed), and the run's statistics.

A new family over an existing base model reuses that base model's loader (for example
:func:`data_gen.arith.pretrain.base`) and writes only its ``generate``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from data_gen import common


@dataclasses.dataclass(frozen=True)
class Base:
    """A pretrained base model, as a family's ``generate`` uses it.

    Attributes:
      params: its parameters (a pytree of arrays).
      config: the config that built it (a frozen dataclass; it keys the cache).
      info: :func:`data_gen.common.cached`'s info: ``config``, ``metrics``,
        ``from_cache``, ...
      cache_key: the cache entry (:func:`data_gen.common.cache_key`).
      modules: the LoRA targets ``[(name, n, m)]``, ``n`` output and ``m`` input features.
    """

    params: Any
    config: Any
    info: Mapping[str, Any]
    cache_key: str
    modules: Sequence[tuple[str, int, int]]


@dataclasses.dataclass
class Generated:
    """``n`` finetuned and measured LoRAs, in memory.

    Attributes:
      factors: ``{name: (u [n, d_out, r], v [n, d_in, r])}`` numpy, in ``Base.modules``.
      labels: ``{column: [n]}``.
      stats: timings and counts (``chunk`` at least); :meth:`Family.run` adds its own.
      provenance: the family's own provenance fields (after ``rank``).
      base_model: fields added to the provenance's ``base_model`` entry.
      extra: provenance fields written after ``base_model``.
    """

    factors: Mapping[str, tuple[Any, Any]]
    labels: Mapping[str, Any]
    stats: dict[str, Any]
    provenance: Mapping[str, Any]
    base_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
    """A built-in dataset family.

    Attributes:
      name: the family (``personas``); its datasets' ``provenance["family"]``.
      command: the module that ``python -m`` runs (``data_gen.personas``), stored as
        ``provenance["generator"]`` (the reproduction reuses a folder by it).
      analogue_of: the paper's dataset this family stands in for.
      sizes: the named ``--size`` values (``quick``, ``paper``) in LoRAs.
      default_rank: the rank without ``--rank``.
      targets: the dataset's targets (see :class:`gllora.io.dataset.DatasetWriter`).
      load_base: ``(preset, cache_dir, regenerate) -> Base``.
      generate: ``(base, n, seed, rank, chunk) -> Generated``; ``chunk`` is ``None``
        without ``--chunk`` (the family's default).
    """

    name: str
    command: str
    analogue_of: str
    sizes: Mapping[str, int]
    default_rank: int
    targets: Mapping[str, Mapping[str, Any]]
    load_base: Callable[[str, str | None, bool], Base]
    generate: Callable[[Base, int, int, int, int | None], Generated]

    def run(
        self,
        out: str,
        size: str | int = "quick",
        seed: int = 0,
        rank: int | None = None,
        cache_dir: str | None = None,
        regenerate: bool = False,
        chunk: int | None = None,
        base_config: str = "default",
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Generates the family's dataset folder ``out``.

        Args:
          out: the dataset folder.
          size: a name in :attr:`sizes` or a number of LoRAs.
          seed: the dataset seed (same seed, same folder bit for bit on one machine).
          rank: the LoRA rank (default :attr:`default_rank`).
          cache_dir, regenerate: the base-model cache (:func:`data_gen.common.cached`).
          chunk: LoRAs finetuned in one compiled call (default: the family's).
          base_config: the base model's preset (``default``; ``tiny`` for tests).
          overwrite: replace an existing dataset folder.

        Returns:
          Timings and counts: the family's ``stats`` plus ``num_loras``,
          ``base_seconds``, ``base_from_cache``, ``total_seconds``, ``peak_memory_mb``.
        """
        n = common.parse_size(size, self.sizes)
        rank = self.default_rank if rank is None else rank
        start = time.perf_counter()
        base = self.load_base(base_config, cache_dir, regenerate)
        base_seconds = time.perf_counter() - start
        made = self.generate(base, n, seed, rank, chunk)
        provenance = {
            "generator": self.command,
            "family": self.name,
            "analogue_of": self.analogue_of,
            "seed": seed,
            "size": str(size),
            "num_loras": n,
            "rank": rank,
            **made.provenance,
            "base_model": {
                "cache_key": base.cache_key,
                "preset": base_config,
                "config": base.info["config"],
                "metrics": base.info["metrics"],
                **made.base_model,
            },
            **made.extra,
        }
        common.write_dataset(
            out,
            base.modules,
            made.factors,
            made.labels,
            self.targets,
            provenance,
            split_seed=seed,
            overwrite=overwrite,
        )
        stats = dict(made.stats)
        stats.update(
            num_loras=n,
            base_seconds=base_seconds,
            base_from_cache=base.info["from_cache"],
            total_seconds=time.perf_counter() - start,
            peak_memory_mb=common.peak_memory_mb(),
        )
        logging.info("%s: wrote %d LoRAs to %s: %s", self.name, n, out, stats)
        return stats
