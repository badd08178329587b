"""Throughput of ``io.inspect`` (header only) vs ``io.load_adapter`` over a directory.

Writes ``--num_files`` adapters into a temporary directory: variants of the real
PEFT, diffusers, kohya and LyCORIS files in ``tests/data/real_loras`` (factors
rescaled by a random factor, kohya files given ``ss_*`` training metadata), then
reads every one with each function and prints files per second.

    python benchmarks/bench_inspect.py --num_files 1000

The files are small (fixture-sized, 7-46 KB, 3-45 modules), so the figures measure
per-file overhead (open, header parse, planning; for load, reading the factors and
stacking them into a numpy ``Lora``), not disk bandwidth; the directory sits in the page
cache after it is written. ``benchmarks/bench_adapter_io.py`` measures full-size
Qwen2 adapters against a plain safetensors read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gllora import io

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "data" / "real_loras"
TEMPLATES = [
    "diffusers_sd/pytorch_lora_weights.safetensors",
    "diffusers_sd_conv/pytorch_lora_weights_mixed_keys.safetensors",
    "kohya_from_diffusers/kohya_lora.safetensors",
    "kohya_lycoris_locon/kohya_lycoris_locon.safetensors",
    "lycoris_loha/lycoris_loha.safetensors",
    "lycoris_lokr/lycoris_lokr.safetensors",
    "peft_gpt2/lora_conv1d",
    "peft_llm/dora",
    "peft_llm/lora_embedding",
    "peft_llm/lora_r8_qkvo_patterns",
]


def _variant(src: Path, dst: Path, rng: np.random.Generator, kohya: bool) -> None:
    """``src`` with every float tensor rescaled, plus kohya-style metadata."""
    tensors = {}
    for key, x in load_file(str(src)).items():
        if x.dtype.kind == "f" and x.ndim:  # leave kohya's 0-d alphas alone
            x = (x * rng.uniform(0.5, 2.0)).astype(x.dtype)
        tensors[key] = x
    with safe_open(str(src), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
    if kohya:
        metadata.update(
            ss_num_train_images=str(int(rng.integers(10, 500))),
            ss_learning_rate=f"{rng.uniform(1e-5, 1e-3):.2e}",
            ss_tag_frequency=json.dumps({"set": {"cat": int(rng.integers(1, 9))}}),
        )
    save_file(tensors, str(dst), metadata=metadata)


def make_directory(root: Path, num_files: int, seed: int = 0) -> list[Path]:
    """Writes ``num_files`` adapters under ``root``; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_files):
        template = TEMPLATES[i % len(TEMPLATES)]
        src = FIXTURES / template
        stem = f"{i:04d}_{template.replace('/', '_').removesuffix('.safetensors')}"
        if src.is_dir():
            dst = root / stem
            dst.mkdir()
            shutil.copy(src / "adapter_config.json", dst)
            _variant(
                src / "adapter_model.safetensors", dst / "adapter_model.safetensors", rng, False
            )
        else:
            dst = root / f"{stem}.safetensors"
            _variant(src, dst, rng, kohya=template.startswith(("kohya", "lycoris")))
        paths.append(dst)
    return paths


def _rate(fn, paths: list[Path]) -> tuple[float, float]:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    seconds = time.perf_counter() - start
    return len(paths) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_files", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_inspect_") as tmp:
        paths = make_directory(Path(tmp), args.num_files)
        size = sum(
            p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir())
            for p in paths
        )
        listed = sorted(Path(tmp).iterdir())  # what an importer would do first
        assert len(listed) == len(paths)
        io.load_adapter(paths[0])  # first-use imports are not per-file cost
        print(f"{len(paths)} adapters, {size / 2**20:.1f} MiB, in {tmp} (cpus: {os.cpu_count()})")
        for name, fn in (("io.inspect", io.inspect), ("io.load_adapter", io.load_adapter)):
            best = max((_rate(fn, listed) for _ in range(args.repeats)), key=lambda r: r[0])
            print(f"{name:16s} {best[0]:9.1f} files/s  ({1e3 / best[0]:.2f} ms/file)")


if __name__ == "__main__":
    main()
