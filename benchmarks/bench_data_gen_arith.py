r"""Speed of the arithmetic-sources generator: LoRAs per second, vmapped vs one at a time.

Generates the family at ``--size`` (default ``paper``, 2,000 LoRAs) with the default
chunk (``--chunk`` to change it), timing finetuning and evaluation separately (the first chunk of each includes
compilation), then the same code one LoRA at a time (``chunk=1``) on ``--single`` LoRAs
of the same distribution, and prints LoRAs per second, micro-steps per second (a
micro-batch of 8 questions through forward and backward: the unit of work, since LoRAs
differ in length), the speed-up of the vmapped chunk, CPU time and peak memory; then
the cost of one micro-step per LoRA at fixed length for chunk sizes ``--sweep``.

Run (the base LM is pretrained first if it is not cached)::

    python benchmarks/bench_data_gen_arith.py [--size=paper --chunk=64 --single=16]
        [--out=/tmp/arith_paper  # also write the dataset, e.g. for probe_datasets.py]
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from data_gen import cli, common
from data_gen.arith import lm, pretrain, sources, tasks

# --size, --chunk, --seed, --cache_dir and --out are the generators' (data_gen.cli).
cli.define_flags()
flags.DEFINE_integer("single", 16, "LoRAs to finetune one at a time (0: skip).")
flags.DEFINE_list("sweep", ["1", "64", "256"], "Chunk sizes for the per-step cost sweep.")
FLAGS = flags.FLAGS
FLAGS.set_default("size", "paper")


def _timed_generate(params, config, n, seed, chunk):
    wall, cpu = time.perf_counter(), time.process_time()
    factors, labels, info, stats = sources.generate(params, config, n, seed, chunk=chunk)
    stats["wall_seconds"] = time.perf_counter() - wall
    stats["cpu_seconds"] = time.process_time() - cpu
    return factors, labels, info, stats


def _rates(name: str, n: int, stats: dict, labels: dict) -> dict:
    train, evaluate = stats["finetune_seconds"], stats["evaluate_seconds"]
    steady_train = train - stats["finetune_first_chunk_seconds"]
    # Micro-steps per LoRA; chunks run longest first, so the first chunk (with the
    # compile) holds the `chunk` longest LoRAs.
    micro = np.sort(labels["num_updates"] * labels["batch_size"] // sources.MICRO_BATCH)
    steady_micro = micro[::-1][stats["chunk"] :].sum()
    row = {
        "name": name,
        "loras": n,
        "chunk": stats["chunk"],
        "train_s": train,
        "eval_s": evaluate,
        "loras_per_s": n / (train + evaluate),
        "micro_steps_per_s": stats["micro_steps"] / train,
        "steady_micro_steps_per_s": steady_micro / steady_train if steady_train > 0 else 0.0,
        "cpu_s": stats["cpu_seconds"],
    }
    chunks = -(-n // stats["chunk"])
    if chunks > 1:  # the first chunk holds the compile: rates after it
        done = n - stats["chunk"]
        steady_eval = evaluate - stats["evaluate_first_chunk_seconds"]
        row["steady_loras_per_s"] = done / (steady_train + steady_eval)
        row["compile_s~"] = stats["finetune_first_chunk_seconds"] - steady_train / (chunks - 1)
    return row


def per_step_cost(params, config, chunk: int, steps: int = 40) -> tuple[float, float]:
    """Wall and CPU milliseconds per LoRA micro-step of :func:`finetune_chunk` at ``chunk``.

    Every LoRA runs exactly ``steps`` micro-steps (no step-count padding), enough
    repetitions to cover 256 LoRAs, best of two; compile excluded. CPU time is the
    robust figure on a shared machine; wall time counts threads that got a core.
    """
    questions = tasks.make_questions(0, config.seq_len)
    data = sources.device_data(questions, sources.EVAL_BATCH)
    train = {k: data[k] for k in ("train_tokens", "train_read_pos", "train_target")}
    rng = np.random.default_rng(0)
    num_modules = len(lm.lora_modules(config))
    max_steps = sources.max_micro_steps(len(questions["train_source"]))
    full = lambda value, dtype: np.full(chunk, value, dtype)
    hp = {
        "a_init": rng.uniform(-0.1, 0.1, (chunk, num_modules, config.width, 4)).astype(np.float32),
        "lr": full(1e-2, np.float32),
        "weight_decay": full(1e-4, np.float32),
        "dropout": full(0.05, np.float32),
        "accum": full(2, np.int32),
        "num_micro_steps": full(steps, np.int32),
        "num_updates": full(steps // 2, np.int32),
        "epochs": full(2, np.int32),
        "seed": np.arange(chunk, dtype=np.uint32),
        "order": rng.integers(0, len(questions["train_source"]), (chunk, max_steps, 8)).astype(
            np.int32
        ),
    }
    jax.block_until_ready(sources.finetune_chunk(config, params, train, hp))
    reps = max(1, 256 // chunk)
    best = (np.inf, np.inf)
    for _ in range(2):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            jax.block_until_ready(sources.finetune_chunk(config, params, train, hp))
        scale = 1e3 / (reps * chunk * steps)
        run = ((time.perf_counter() - wall) * scale, (time.process_time() - cpu) * scale)
        best = min(best, run)
    return best


def main(argv):
    del argv
    n = common.parse_size(FLAGS.size, sources.SIZES)
    start = time.perf_counter()
    params, config, info = pretrain.load_base("default", FLAGS.cache_dir)
    print(f"base LM: {time.perf_counter() - start:.1f} s (from cache: {info['from_cache']})")
    rows = []
    chunk = FLAGS.chunk or sources.default_chunk(n)
    factors, labels, data_info, stats = _timed_generate(params, config, n, FLAGS.seed, chunk)
    rows.append(_rates("vmapped", n, stats, labels))
    if FLAGS.out:
        common.write_dataset(
            FLAGS.out,
            [(name, *u.shape[1:2], v.shape[1]) for name, (u, v) in factors.items()],
            factors,
            labels,
            sources.TARGETS,
            {"generator": "benchmarks/bench_data_gen_arith.py", "seed": FLAGS.seed, **data_info},
            split_seed=FLAGS.seed,
            overwrite=True,
        )
    if FLAGS.single:
        _, one_labels, _, single = _timed_generate(params, config, FLAGS.single, FLAGS.seed, 1)
        rows.append(_rates("one at a time", FLAGS.single, single, one_labels))
    keys = ["name", "loras", "chunk", "train_s", "eval_s", "loras_per_s"]
    keys += ["steady_loras_per_s", "micro_steps_per_s", "steady_micro_steps_per_s"]
    keys += ["compile_s~", "cpu_s"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells))
    if len(rows) == 2:
        print(
            f"speed-up of the vmapped chunk over one at a time: "
            f"{rows[0]['steady_micro_steps_per_s'] / rows[1]['steady_micro_steps_per_s']:.1f}x "
            f"(finetuning micro-steps per second after the first chunk, i.e. without compile)"
        )
    print(
        f"val_loss {labels['val_loss'].min():.2f}-{labels['val_loss'].max():.2f} "
        f"(base {data_info['base_val_loss']:.2f}), challenge_acc "
        f"{labels['challenge_acc'].min():.3f}-{labels['challenge_acc'].max():.3f} "
        f"(base {data_info['base_challenge_acc']:.3f})"
    )
    print(f"peak memory: {common.peak_memory_mb():.0f} MiB")
    costs = {int(c): per_step_cost(params, config, int(c)) for c in FLAGS.sweep}
    print("| chunk | wall ms / LoRA micro-step | CPU ms / LoRA micro-step |\n|---|---|---|")
    for c, (wall, cpu) in costs.items():
        print(f"| {c} | {wall:.3f} | {cpu:.3f} |")
    if 1 in costs and len(costs) > 1:
        best = min((cpu, c) for c, (_, cpu) in costs.items() if c > 1)
        print(
            f"CPU time per LoRA step, one at a time / chunk {best[1]}: "
            f"{costs[1][1] / best[0]:.2f}x; wall: {costs[1][0] / costs[best[1]][0]:.2f}x"
        )


if __name__ == "__main__":
    app.run(main)
