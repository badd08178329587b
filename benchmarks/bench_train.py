"""Is the input pipeline the bottleneck? GL-net training on a dataset folder of
Qwen2-1.5B-k/v-shaped LoRAs (56 modules, u [256, 4], v [1536, 4], 1.6 MB each).

Prints LoRAs/s of the whole training loop (reading from the memory-mapped shards,
batching, the step) streamed by the background thread, the same loop with the
training split held in device memory, and the jitted step alone on one batch already
in memory, side by side in one run.

    python -m benchmarks.bench_train [--num 2000] [--rounds 3] [--dir /tmp/bench_train]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_models import NUM_LAYERS, M, N, R
from experiments.configs import default
from gllora import parallel
from gllora.io import dataset
from gllora.lora import split_seeds
from gllora.train import loop, tasks
from gllora.train import steps as steps_lib
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
    config.log_every_steps = 8
    return config


def loop_rate(path: str, workdir: str, in_memory_gb: float) -> float:
    """LoRAs/s of the training loop: the median over the intervals that ``metrics.jsonl``
    logs (every 8 steps), leaving out the first (compilation) and the ones that hold a
    validation pass or a checkpoint (the median does)."""
    shutil.rmtree(workdir, ignore_errors=True)
    loop.train_and_evaluate(config_for(path, 2, in_memory_gb), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["steps_per_second"] for r in map(json.loads, f) if r["split"] == "train"]
    return 32 * float(np.median(rates[1:]))


def time_step_alone(path: str, steps: int) -> float:
    ds = dataset.open(path)
    config = config_for(path, 1, 0.0)
    train = np.sort(ds.splits["train"])
    targets = tasks.resolve(ds, ("score",), train)
    setup = steps_lib.make_setup(config, targets, 100)
    mesh = parallel.make_mesh()
    state, placed = state_lib.initial(config, ds, train, ds.max_ranks(), [0], setup, mesh)
    batch = ds.batch(train[:32], layout=setup.layout)
    batch = jax.device_put(split_seeds(batch, 1, setup.layout))
    y, w = jnp.zeros((1, 32, 1)), jnp.ones((1, 32))
    train_step = jax.jit(functools.partial(steps_lib.train_step, setup), donate_argnums=0)
    state, loss = train_step(state, batch, y, w)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = train_step(state, batch, y, w)
    jax.block_until_ready(loss)
    return steps * 32 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/gllora_bench_train")
    args = parser.parse_args()
    data = os.path.join(args.dir, "data")
    write_dataset(data, args.num)
    gb = dataset.open(data).num_examples * 56 * (N + M) * R * 4 / 1e9
    rates = {"stream": [], "memory": [], "step": []}
    for _ in range(args.rounds):  # alternate, so load changes hit every path alike
        rates["stream"].append(loop_rate(data, os.path.join(args.dir, "run_stream"), 0.0))
        rates["memory"].append(loop_rate(data, os.path.join(args.dir, "run_memory"), 100.0))
        rates["step"].append(time_step_alone(data, 40))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    print(
        f"jax {jax.__version__}; {args.num} LoRAs ({gb:.1f} GB), GL-net width 16, 2 layers, "
        f"head 256, batch 32; median of {args.rounds} alternating rounds"
    )
    print(f"{'path':<44} {'LoRAs/s':>9} {'vs step alone':>14}")
    for key, name in (
        ("stream", "whole loop, streamed from the shards"),
        ("memory", "whole loop, training split in memory"),
        ("step", "train step alone (one batch, in memory)"),
    ):
        print(f"{name:<44} {med[key]:>9,.0f} {med[key] / med['step']:>13.2f}x")


if __name__ == "__main__":
    main()
