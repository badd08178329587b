r"""Speed and memory of the built-in dataset generators (``data_gen/``).

For each family, in a fresh child process (so that its peak memory is its own):

1. generates the dataset at ``--size`` (default: the paper's counts) into a temporary
   folder, with the base models from the cache (``--regenerate`` to time pretraining
   too), and reports LoRAs finetuned per second (compilation included, and steady
   state after the first chunk), the time to measure the labels, the total, and the
   peak resident memory;
2. times the same compiled finetuning code on the same LoRAs as one vmapped chunk
   against one LoRA at a time (chunk 1, compiled once), alternating the two
   ``--repeats`` times, and reports the speed-up (best of the repeats for each).

The machine may be shared: compare the ratios printed side by side, not absolute
rates across runs.

Run::

    python benchmarks/bench_data_gen.py [--families=personas,digit_subsets] [--size=paper]
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time

from absl import app, flags

FAMILIES = ("personas", "digit_subsets")


def _speedup(module, n_single: int, repeats: int, cache_dir: str | None) -> dict:
    """Steady-state LoRAs/s of one chunk of the family's size vs one LoRA at a time."""
    import jax
    import numpy as np

    from data_gen.images import finetune, pretrain

    params, config, _ = pretrain.load_base("default", cache_dir)
    ft = module.finetune_config()
    chunk = module.DEFAULT_CHUNK
    # LoRAs of one step count, as generation's chunks are (sorted by steps).
    _, data, hparams = module.finetune_inputs(8 * chunk, seed=123)
    same = np.flatnonzero(hparams["steps"] == hparams["steps"][0])[:chunk]
    if len(same) < chunk:
        raise ValueError(f"{module.__name__}: too few LoRAs of one step count for a chunk")
    args = {k: v[same] for k, v in {**data, **hparams}.items()}
    one = {k: v[:1] for k, v in args.items()}

    def call(items):
        return jax.block_until_ready(
            finetune.finetune_chunk(params["denoiser"], **items, config=config, ft=ft)
        )

    call(args)  # compile both first
    singles = [{k: v[i : i + 1] for k, v in args.items()} for i in range(n_single)]
    call(one)
    best_chunk, best_single = np.inf, np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call(args)
        best_chunk = min(best_chunk, (time.perf_counter() - start) / chunk)
        start = time.perf_counter()
        for items in singles:
            call(items)
        best_single = min(best_single, (time.perf_counter() - start) / n_single)
    return {
        "timed_steps": int(args["steps"][0]),
        "chunk": chunk,
        "chunk_rate": 1 / best_chunk,
        "single_rate": 1 / best_single,
        "speedup": best_single / best_chunk,
    }


def _bench_family(name: str, size: str, regenerate: bool, cache_dir, n_single, repeats):
    import importlib

    from data_gen import common

    module = importlib.import_module(f"data_gen.images.{name}")
    with tempfile.TemporaryDirectory() as tmp:
        stats = module.run(
            os.path.join(tmp, name), size=size, cache_dir=cache_dir, regenerate=regenerate
        )
    stats["peak_memory_mb"] = common.peak_memory_mb()  # generation only
    stats.update(_speedup(module, n_single, repeats, cache_dir))
    return stats


FLAGS = flags.FLAGS


def _define_flags():
    # Not at import: the spawned children import this file, and the generators they
    # import define flags of the same names.
    flags.DEFINE_list("families", list(FAMILIES), "Families to benchmark.")
    flags.DEFINE_string("size", "paper", "Dataset size: 'quick', 'paper' or a count.")
    flags.DEFINE_bool("regenerate", False, "Pretrain the base models again (and time it).")
    flags.DEFINE_string("cache_dir", None, "Base-model cache (see data_gen.common.cache_root).")
    flags.DEFINE_integer("single", 32, "LoRAs timed one at a time.")
    flags.DEFINE_integer("repeats", 2, "Alternating repeats of the chunk-vs-single timing.")


def main(argv):
    del argv
    rows = []
    context = multiprocessing.get_context("spawn")
    for name in FLAGS.families:
        if name not in FAMILIES:
            raise app.UsageError(f"unknown family {name!r}; known: {FAMILIES}")
        with context.Pool(1) as pool:
            stats = pool.apply(
                _bench_family,
                (name, FLAGS.size, FLAGS.regenerate, FLAGS.cache_dir, FLAGS.single, FLAGS.repeats),
            )
        rows.append((name, stats))
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})
        sys.stdout.flush()
    print()
    print(
        "| family | LoRAs | base models (s) | finetune (s) | LoRAs/s incl. compile | "
        "LoRAs/s steady | measure labels (s) | total (s) | peak memory (GB) | "
        "vmapped chunk vs one at a time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        base = f"{s['base_seconds']:.1f}" + (" (cached)" if s["base_from_cache"] else "")
        print(
            f"| {name} | {s['num_loras']} | {base} | {s['finetune_seconds']:.1f} | "
            f"{s['num_loras'] / s['finetune_seconds']:.0f} | {s['finetune_steady_rate']:.0f} | "
            f"{s['measure_seconds']:.1f} | {s['total_seconds']:.1f} | "
            f"{s['peak_memory_mb'] / 1024:.2f} | {s['speedup']:.1f}x "
            f"({s['chunk_rate']:.0f}/s in chunks of {s['chunk']} vs {s['single_rate']:.0f}/s) |"
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
