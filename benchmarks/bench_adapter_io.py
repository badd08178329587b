"""Reading adapters from disk: ``io.load_adapter`` against ``safetensors`` alone, and ``io.inspect``.

Writes ``--num`` Qwen2-1.5B k/v-shaped PEFT adapters (56 modules: 28 layers x
{k_proj, v_proj}; ``lora_A [4, 1536]``, ``lora_B [256, 4]``, float32; 1.6 MB each, the
shape of the paper's Qwen2-ARC-LoRA) with distinct random factors into a temporary
folder, then times, alternating the two in each round so the machine's noise hits both:

- ``safetensors``: ``safetensors.numpy.load_file`` of every weights file (the raw read:
  every tensor as a numpy array, nothing else);
- ``load_adapter``: ``gllora.io.load_adapter`` of every folder (config, header checks,
  scales, transposes, stacking by shape, NaN/Inf check: a ``Lora`` ready for a model);

both warm (files in the page cache) and cold (each file's pages dropped before its read
with ``posix_fadvise(POSIX_FADV_DONTNEED)``, after an ``fsync``, so the bytes come from
the disk again), printing files/s, GB/s and the ratio (goal: load >= 0.8 of raw). Then
``io.inspect`` (header and config only) files/s: as it runs (adapters of one base model
and config have byte-identical headers, which are parsed and planned once) and with the
header and plan caches off (every header parsed and planned again; goal >= 5,000/s for
the first).

    python benchmarks/bench_adapter_io.py [--num 1000 --rounds 3 --dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file

from gllora import io
from gllora.io import _safetensors, adapters

LAYERS, RANK, HIDDEN, KV = 28, 4, 1536, 256
CONFIG = {
    "peft_type": "LORA",
    "r": RANK,
    "lora_alpha": 8,
    "target_modules": ["k_proj", "v_proj"],
    "task_type": "CAUSAL_LM",
}


def write_adapters(root: str, num: int, seed: int = 0) -> list[str]:
    """``num`` PEFT folders under ``root``; returns their paths (fsync'ed to disk)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        folder = os.path.join(root, f"run_{i:04d}")
        os.makedirs(folder)
        tensors = {}
        for layer in range(LAYERS):
            for proj in ("k_proj", "v_proj"):
                key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = rng.standard_normal((RANK, HIDDEN), np.float32)
                tensors[f"{key}.lora_B.weight"] = rng.standard_normal((KV, RANK), np.float32)
        weights = os.path.join(folder, "adapter_model.safetensors")
        save_file(tensors, weights, metadata={"format": "pt"})
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(CONFIG, f)
        paths.append(folder)
    os.sync()  # clean pages: DONTNEED can then drop them
    return paths


def drop_cache(paths: list[str]) -> None:
    for folder in paths:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw_read(folder: str) -> None:
    load_file(os.path.join(folder, "adapter_model.safetensors"))


def timed(fn, paths: list[str], cold: bool) -> float:
    if cold:
        drop_cache(paths)
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return time.perf_counter() - start


def set_caches(on: bool) -> None:
    adapters._PLAN_CACHE.clear()
    _safetensors._HEADER_CACHE.clear()
    adapters._PLAN_CACHE_SIZE = 256 if on else 0
    _safetensors._HEADER_CACHE_SIZE = 256 if on else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the adapters (default: tmp)")
    parser.add_argument("--no_cold", action="store_true", help="skip the cold-cache rounds")
    args = parser.parse_args()

    root = tempfile.mkdtemp(dir=args.dir, prefix="bench_adapter_io_")
    try:
        start = time.perf_counter()
        paths = write_adapters(root, args.num)
        size = sum(
            os.path.getsize(os.path.join(p, f))
            for p in paths
            for f in ("adapter_model.safetensors", "adapter_config.json")
        )
        print(
            f"{len(paths)} PEFT adapters ({LAYERS * 2} modules, lora_A [{RANK}, {HIDDEN}], "
            f"lora_B [{KV}, {RANK}]), {size / 1e9:.2f} GB in {root}, written in "
            f"{time.perf_counter() - start:.0f} s (cpus: {os.cpu_count()})"
        )
        lora = io.load_adapter(paths[0])  # the same numbers as the raw read, checked once
        raw = load_file(os.path.join(paths[0], "adapter_model.safetensors"))
        key = "base_model.model.model.layers.3.self_attn.v_proj"
        want = raw[f"{key}.lora_B.weight"].astype(np.float64) @ raw[f"{key}.lora_A.weight"] * 2
        u, v = (np.asarray(x, np.float64) for x in lora.factors(key[len("base_model.model.") :]))
        np.testing.assert_allclose(u @ v.T, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

        for cold in [False] if args.no_cold else [False, True]:
            kind = "cold (pages dropped)" if cold else "warm (page cache)"
            rows = []
            for _ in range(args.rounds):  # alternate, so noise hits both
                t_raw = timed(raw_read, paths, cold)
                t_load = timed(io.load_adapter, paths, cold)
                rows.append((t_raw, t_load))
            print(f"\n{kind}, {args.rounds} rounds alternating, best and median ratio:")
            for name, col in (("safetensors", 0), ("load_adapter", 1)):
                best = min(r[col] for r in rows)
                print(
                    f"  {name:13s} {len(paths) / best:8.0f} files/s  {size / best / 1e9:6.2f} GB/s"
                    f"  ({best / len(paths) * 1e3:.3f} ms/file)"
                )
            ratios = sorted(r[0] / r[1] for r in rows)
            print(
                f"  load_adapter / safetensors throughput: best {ratios[-1]:.2f}, median "
                f"{ratios[len(ratios) // 2]:.2f} (goal >= 0.80)"
            )

        print("\nio.inspect (header and config only), warm:")
        for on in (True, False):
            set_caches(on)
            best = min(timed(io.inspect, paths, False) for _ in range(args.rounds))
            label = "as it runs (one parse per distinct header)" if on else "caches off"
            print(f"  {label:44s} {len(paths) / best:8.0f} files/s")
        set_caches(True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
