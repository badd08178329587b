"""Trainings of the decomposition-heavy models, several at once, unpinned, under a watchdog.

jaxlib 0.10.2's batched LAPACK kernels could deadlock XLA's CPU thread pool when two ran
at once (BUILD_NOTES.md, "Hot paths"): ``mlp_svd`` training stalled at 0% CPU in 8 of 11
tries on persona-shaped LoRAs while other work shared the machine. This runs
``python -m experiments.train`` for each model ``--runs`` times, ``--parallel`` at a time,
without CPU pinning, and watches each run's ``metrics.jsonl`` (a line every 5 steps) and
its CPU time: a run whose file stops growing for ``--stall_seconds`` while the process
uses less than 5% of a core over that window is a stall (the deadlock sat at 0% CPU; a
run that is compiling or evaluating on a loaded machine also adds no metrics line for a
while, but it burns CPU). Its Python stacks (``faulthandler``, on
SIGABRT) and, where ``gdb`` exists, its native threads' stacks are printed, and the
script exits 1.

    python -m benchmarks.stress_hot_paths --dataset=DIR --models=mlp_svd,mlp_oalign \
        --runs=20 --parallel=2 [--target=attributes]

Without ``--dataset`` it writes a synthetic dataset with the persona family's module
shapes (``[128, 128]`` x 3, ``[64, 128]``, rank 4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONA_MODULES = (
    ("denoiser.layers.0", 128, 128),
    ("denoiser.layers.1", 128, 128),
    ("denoiser.layers.2", 128, 128),
    ("denoiser.layers.3", 64, 128),
)


def write_synthetic(path: str, num: int) -> str:
    from data_gen import synthetic
    from gllora.io import dataset

    if not os.path.exists(os.path.join(path, "schema.json")):
        factors, labels = synthetic.generate(num, seed=0, modules=PERSONA_MODULES)
        writer = dataset.DatasetWriter(
            path, modules=PERSONA_MODULES, targets=synthetic.targets(PERSONA_MODULES)
        )
        writer.add(factors, labels)
        writer.close(split_seed=0)
    return path


def _command(dataset: str, model: str, target: str, workdir: str, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/default.py",
        f"--config.dataset={dataset}",
        f"--config.model={model}",
        f"--config.targets=('{target}',)",
        f"--config.num_epochs={epochs}",
        "--config.log_every_steps=5",
        "--config.progress=false",
        f"--workdir={workdir}",
    ]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc; 0 elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _stacks(proc: subprocess.Popen) -> str:
    """Native stacks of every thread (gdb, if installed), then the Python ones (SIGABRT)."""
    out = []
    if shutil.which("gdb"):
        gdb = subprocess.run(
            ["gdb", "-p", str(proc.pid), "-batch", "-ex", "thread apply all bt 12"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out.append(gdb.stdout[-20000:])
    proc.send_signal(signal.SIGABRT)  # faulthandler prints every Python thread
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    out.append(err[-20000:])
    return "\n".join(out)


def stress(
    dataset: str,
    models: list[str],
    runs: int,
    parallel: int,
    target: str,
    epochs: int,
    stall_seconds: float,
    workdir: str,
) -> list[dict]:
    """Runs every training; returns one record per run (``stalled`` with its stacks)."""
    queue = [(m, i) for i in range(runs) for m in models]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONPATH": ROOT}
    # key -> (process, run dir, time of the last metrics growth, metrics size, start time,
    #         CPU seconds at the last metrics growth)
    running: dict[tuple[str, int], tuple] = {}
    records = []
    while queue or running:
        while queue and len(running) < parallel:
            model, i = queue.pop(0)
            run_dir = os.path.join(workdir, f"{model}_{i}")
            shutil.rmtree(run_dir, ignore_errors=True)
            proc = subprocess.Popen(
                _command(dataset, model, target, run_dir, epochs),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            now = time.monotonic()
            running[(model, i)] = (proc, run_dir, now, -1, now, 0.0)
        time.sleep(1.0)
        for key, (proc, run_dir, last_change, size, started, cpu_then) in list(running.items()):
            metrics = os.path.join(run_dir, "metrics.jsonl")
            now_size = os.path.getsize(metrics) if os.path.exists(metrics) else -1
            now, cpu = time.monotonic(), _cpu_seconds(proc.pid)
            if now_size != size:
                last_change, size, cpu_then = now, now_size, cpu
            if proc.poll() is not None:
                _, err = proc.communicate()
                records.append(
                    {
                        "model": key[0],
                        "run": key[1],
                        "seconds": now - started,
                        "returncode": proc.returncode,
                        "stalled": False,
                        "error": err[-3000:] if proc.returncode else "",
                    }
                )
                del running[key]
            elif now - last_change > stall_seconds and cpu - cpu_then < 0.05 * (now - last_change):
                records.append(
                    {
                        "model": key[0],
                        "run": key[1],
                        "seconds": now - started,
                        "returncode": None,
                        "stalled": True,
                        "error": _stacks(proc),
                    }
                )
                del running[key]
            else:
                if now - last_change > stall_seconds:  # busy without progress: a new window
                    last_change, cpu_then = now, cpu
                running[key] = (proc, run_dir, last_change, size, started, cpu_then)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="")
    parser.add_argument("--num", type=int, default=1000, help="synthetic LoRAs, without --dataset")
    parser.add_argument("--models", default="mlp_svd,mlp_oalign")
    parser.add_argument("--target", default="", help="default: attributes, or log_norm (synthetic)")
    parser.add_argument("--runs", type=int, default=3, help="trainings per model")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stall_seconds", type=float, default=30.0)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="gllora_stress_")
    dataset = args.dataset or write_synthetic(os.path.join(work, "data"), args.num)
    target = args.target or ("attributes" if args.dataset else "log_norm")
    t0 = time.monotonic()
    records = stress(
        dataset,
        args.models.split(","),
        args.runs,
        args.parallel,
        target,
        args.epochs,
        args.stall_seconds,
        os.path.join(work, "runs"),
    )
    for model in args.models.split(","):
        mine = [r for r in records if r["model"] == model]
        ok = [r for r in mine if r["returncode"] == 0]
        times = sorted(r["seconds"] for r in ok)
        span = f"{times[0]:.0f}-{times[-1]:.0f} s each" if times else "-"
        print(
            f"{model}: {len(ok)}/{len(mine)} finished ({span}), "
            f"{sum(r['stalled'] for r in mine)} stalled, "
            f"{sum(r['returncode'] not in (0, None) for r in mine)} failed"
        )
    print(
        f"{len(records)} trainings, {args.parallel} at a time, unpinned, in {time.monotonic() - t0:.0f} s"
    )
    bad = [r for r in records if r["returncode"] != 0]
    for r in bad:
        print(
            f"\n--- {r['model']} run {r['run']}: {'STALLED' if r['stalled'] else 'failed'}\n{r['error']}"
        )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
