"""Is the input pipeline the bottleneck? GL-net training on a dataset folder of
Qwen2-1.5B-k/v-shaped LoRAs (56 modules, u [256, 4], v [1536, 4], 1.6 MB each).

Prints LoRAs/s of the whole training loop (reading from the memory-mapped shards,
batching, the step) streamed by the background thread, the same loop with the
training split held in device memory, and the jitted step alone on one batch already
in memory, side by side in one run.

    python -m benchmarks.bench_train [--num 2000] [--epochs 2] [--dir /tmp/bench_train]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_models import M, N, NUM_LAYERS, R
from experiments.configs import default
from gllora.io import dataset
from gllora.train import loop, pipeline, tasks
from gllora.train import programs as programs_lib
from gllora.train import state as state_lib


def write_dataset(path: str, num: int) -> None:
    if os.path.exists(os.path.join(path, "schema.json")):
        return
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(NUM_LAYERS) for p in ("k", "v")]
    writer = dataset.DatasetWriter(
        path,
        modules=[(n, N, M) for n in names],
        overwrite=True,
        targets={"score": {"task": "regression", "columns": ["score"]}},
    )
    for start in range(0, num, 100):
        b = min(100, num - start)
        factors = {
            n: (
                (0.01 * rng.normal(size=(b, N, R))).astype(np.float32),
                (0.01 * rng.normal(size=(b, M, R))).astype(np.float32),
            )
            for n in names
        }
        writer.add(factors, {"score": rng.normal(size=b)})
    writer.close(fractions=(0.9, 0.05, 0.05))


def config_for(path: str, epochs: int, in_memory_gb: float):
    config = default.get_config()
    config.dataset, config.targets, config.model = path, ("score",), "glnet"
    config.num_epochs, config.num_seeds, config.batch_size = epochs, 1, 32
    config.in_memory_gb, config.progress = in_memory_gb, False
    config.log_every_steps = 1000
    return config


def time_loop(path: str, workdir: str, epochs: int, in_memory_gb: float) -> tuple[float, int]:
    """Seconds and LoRAs of ``epochs`` training epochs, compile and setup excluded: the
    difference between a run of ``1 + epochs`` epochs and a run of one epoch."""
    seconds = []
    for total in (1, 1 + epochs):
        shutil.rmtree(workdir, ignore_errors=True)
        t0 = time.perf_counter()
        loop.train_and_evaluate(config_for(path, total, in_memory_gb), workdir)
        seconds.append(time.perf_counter() - t0)
    ds = dataset.open(path)
    return seconds[1] - seconds[0], epochs * (len(ds.splits["train"]) // 32) * 32


def time_step_alone(path: str, steps: int) -> float:
    ds = dataset.open(path)
    config = config_for(path, 1, 0.0)
    train = np.sort(ds.splits["train"])
    targets = tasks.resolve(ds, ("score",), train)
    model = programs_lib.build_model(config, 1)
    programs = programs_lib.Programs(
        config, model, targets, programs_lib.make_optimizer(config, 100)
    )
    state = state_lib.initial(config, ds, train, ds.max_ranks(), [0], programs)
    batch = jax.device_put(pipeline.split_seeds(ds.batch(train[:32], layout="rank_major"), 1))
    y, w = jnp.zeros((1, 32, 1)), jnp.ones((1, 32))
    state, loss = programs.train_step(state, batch, y, w)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = programs.train_step(state, batch, y, w)
    jax.block_until_ready(loss)
    return steps * 32 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/gllora_bench_train")
    args = parser.parse_args()
    data = os.path.join(args.dir, "data")
    write_dataset(data, args.num)
    gb = dataset.open(data).num_examples * 56 * (N + M) * R * 4 / 1e9
    stream_s, n = time_loop(data, os.path.join(args.dir, "run_stream"), args.epochs, 0.0)
    memory_s, _ = time_loop(data, os.path.join(args.dir, "run_memory"), args.epochs, 100.0)
    step = time_step_alone(data, 60)
    print(
        f"jax {jax.__version__}; {args.num} LoRAs ({gb:.1f} GB), GL-net width 16, 2 layers, head 256, batch 32"
    )
    print(f"{'path':<44} {'LoRAs/s':>9} {'vs step alone':>14}")
    for name, rate in (
        ("whole loop, streamed from the shards", n / stream_s),
        ("whole loop, training split in memory", n / memory_s),
        ("train step alone (one batch, in memory)", step),
    ):
        print(f"{name:<44} {rate:>9,.0f} {rate / step:>13.2f}x")
    print("(whole-loop figures include one validation pass and one checkpoint per epoch)")


if __name__ == "__main__":
    main()
