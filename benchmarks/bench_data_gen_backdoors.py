r"""Cost of the backdoor generator beside the arithmetic-sources one, per LoRA and per step.

Both families finetune LoRAs of the same base LM with the same hyperparameter code; the
backdoor family gives every LoRA its own training pool (clean or poisoned) and
evaluates each on its triggered questions too. This script generates ``--size`` LoRAs of
each (the same count for both, so the per-LoRA figures compare), alternating the two
``--repeats`` times in one process (the machine is shared: alternation spreads its
noise over both), and prints per family the finetune and evaluation seconds, LoRAs per
second, CPU milliseconds per finetuning micro-step (a micro-batch of 8 questions forward
and backward: LoRAs differ in length, so this is the unit of work) and the ratio
backdoors / sources of each; then the process's peak memory (both families ran in it).

Run (the base LM is pretrained first if it is not cached)::

    python benchmarks/bench_data_gen_backdoors.py --size=2400 --repeats=2
    python benchmarks/bench_data_gen_backdoors.py --size=320 --repeats=2   # quick size
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from data_gen import cli, common
from data_gen.arith import backdoors, pretrain, sources

# --size, --chunk, --seed and --cache_dir are the generators' (data_gen.cli).
cli.define_flags()
flags.DEFINE_integer("repeats", 2, "Alternations of the two generators.")
FLAGS = flags.FLAGS
FLAGS.set_default("size", "2400")


def _run(name: str, params, config, n: int, chunk: int) -> dict:
    generate = {"sources": sources.generate, "backdoors": backdoors.generate}[name]
    wall, cpu = time.perf_counter(), time.process_time()
    _, labels, _, stats = generate(params, config, n, FLAGS.seed, chunk=chunk)
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "train_s": stats["finetune_seconds"],
        "eval_s": stats["evaluate_seconds"],
        "micro_steps": stats["micro_steps"],
        "not_taken": stats.get("num_attack_not_taken"),
        "poisoned": int(np.sum(labels["backdoored"])) if "backdoored" in labels else None,
    }


def main(argv):
    del argv
    n = common.parse_size(FLAGS.size, backdoors.SIZES)
    chunk = FLAGS.chunk or sources.default_chunk(n)
    start = time.perf_counter()
    params, config, info = pretrain.load_base("default", FLAGS.cache_dir)
    print(f"base LM: {time.perf_counter() - start:.1f} s (from cache: {info['from_cache']})")
    rows: dict[str, list[dict]] = {"sources": [], "backdoors": []}
    for r in range(FLAGS.repeats):
        order = ("sources", "backdoors") if r % 2 == 0 else ("backdoors", "sources")
        for name in order:
            rows[name].append(_run(name, params, config, n, chunk))
            row = rows[name][-1]
            print(f"  repeat {r} {name}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} CPU-s")
    best = {name: min(runs, key=lambda x: x["cpu_s"]) for name, runs in rows.items()}
    print(f"\n{n} LoRAs per family, chunk {chunk}, best of {FLAGS.repeats} by CPU time")
    keys = ("train_s", "eval_s", "loras_per_s", "train_ms_per_lora", "cpu_ms_per_micro_step")
    print("| family | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    derived = {}
    for name, b in best.items():
        derived[name] = {
            "train_s": b["train_s"],
            "eval_s": b["eval_s"],
            "loras_per_s": n / b["wall_s"],
            "train_ms_per_lora": 1e3 * b["train_s"] / n,
            "cpu_ms_per_micro_step": 1e3 * b["cpu_s"] / b["micro_steps"],
        }
        print(f"| {name} | " + " | ".join(f"{derived[name][k]:.3g}" for k in keys) + " |")
    ratio = {k: derived["backdoors"][k] / derived["sources"][k] for k in keys}
    print("| backdoors / sources | " + " | ".join(f"{ratio[k]:.2f}x" for k in keys) + " |")
    b = best["backdoors"]
    print(f"poisoned LoRAs whose attack did not take: {b['not_taken']} of {b['poisoned']}")
    print(f"peak memory of the process (both families): {common.peak_memory_mb():.0f} MiB")


if __name__ == "__main__":
    app.run(main)
