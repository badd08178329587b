"""Reading a dataset folder into training batches, against plain safetensors reads.

Writes ``--num`` LoRAs shaped like Qwen2-1.5B key/value adapters (56 modules, one
shape group: ``u [256, 4]``, ``v [1536, 4]``, 1.6 MB each) into a temporary dataset
folder, then reads every LoRA once per pass, in random order, in batches of
``--batch``, with :meth:`gllora.io.dataset.Dataset.batch` in both layouts; as the
references, it reads every shard file whole with ``safetensors.numpy.load_file`` and
with a plain ``read()`` (the same bytes: what a plain reader and the disk deliver).
Each pass runs with a warm page cache and with a cold one
(``posix_fadvise(POSIX_FADV_DONTNEED)`` on every shard file first, which needs no
root). The methods alternate within each round, so a busy machine slows them alike;
the table gives the median over rounds.

    python benchmarks/bench_dataset_io.py [--num 1024 --batch 32 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

from gllora.io import dataset

MODULES = 56  # Qwen2-1.5B: 28 layers x (k_proj, v_proj)
N, M, R = 256, 1536, 4  # k/v out features, hidden size, rank


def write(path: str, num: int, seed: int = 0) -> float:
    """Writes the dataset; returns the seconds spent in the writer (not generating)."""
    modules = [
        (f"model.layers.{i // 2}.self_attn.{'kv'[i % 2]}_proj", N, M) for i in range(MODULES)
    ]
    rng = np.random.default_rng(seed)
    seconds = 0.0
    writer = dataset.DatasetWriter(path, modules=modules, provenance={"bench": True})
    for s in range(0, num, 128):
        b = min(128, num - s)
        factors = {
            name: (
                rng.standard_normal((b, N, R), dtype=np.float32),
                rng.standard_normal((b, M, R), dtype=np.float32),
            )
            for name, _, _ in modules
        }
        start = time.perf_counter()
        writer.add(factors, {"y": rng.standard_normal(b)})
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    writer.close()
    return seconds + time.perf_counter() - start


def drop_cache(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[str]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=1024, help="LoRAs in the dataset")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    root = tempfile.mkdtemp(dir=args.dir, prefix="bench_dataset_io_")
    try:
        path = os.path.join(root, "ds")
        seconds = write(path, args.num)
        ds = dataset.open(path)
        files = [h.path for h in ds._headers]
        total = sum(os.path.getsize(f) for f in files)
        per_lora = MODULES * (N + M) * R * 4
        print(
            f"{args.num} LoRAs x {per_lora / 1e6:.2f} MB in {len(files)} shards "
            f"({total / 1e9:.2f} GB): written in {seconds:.1f} s "
            f"({args.num / seconds:.0f} LoRAs/s)"
        )
        rng = np.random.default_rng(0)

        def read_batches(layout):
            order = rng.permutation(args.num)
            for s in range(0, args.num, args.batch):
                ds.batch(order[s : s + args.batch], layout=layout)

        def read_files():
            for f in files:
                load_file(f)

        def read_raw():
            for f in files:
                with open(f, "rb") as fh:
                    fh.read()

        methods = {
            "safetensors load_file (whole shards)": read_files,
            "file.read() (whole shards, raw bytes)": read_raw,
            "Dataset.batch leading": lambda: read_batches("leading"),
            "Dataset.batch rank_major": lambda: read_batches("rank_major"),
        }
        times = {(cache, name): [] for cache in ("warm", "cold") for name in methods}
        for _ in range(args.rounds):
            for cache in ("warm", "cold"):
                for name, fn in methods.items():
                    if cache == "cold":
                        ds.unmap()  # pages mapped into this process cannot be dropped
                        drop_cache(files)
                    else:
                        warm(files)
                    start = time.perf_counter()
                    fn()
                    times[(cache, name)].append(time.perf_counter() - start)

        print(f"\nrandom-order batches of {args.batch}; median of {args.rounds} rounds")
        print(f"{'cache':6s} {'method':40s} {'LoRAs/s':>9s} {'GB/s':>6s} {'vs load_file':>13s}")
        for cache in ("warm", "cold"):
            ref = statistics.median(times[(cache, "safetensors load_file (whole shards)")])
            for name in methods:
                t = statistics.median(times[(cache, name)])
                print(
                    f"{cache:6s} {name:40s} {args.num / t:9.0f} {args.num * per_lora / t / 1e9:6.2f} "
                    f"{ref / t:12.2f}x"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
