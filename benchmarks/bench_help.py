r"""Wall time of ``--help`` of every entrypoint, beside importing JAX, alternated.

    python benchmarks/bench_help.py [--repeats=5] [--compare=OTHER_TREE]

``--compare`` also runs each command in another checkout of gllora (e.g. one exported
with ``git archive REV | tar -x -C DIR``), in the same rounds, and prints its medians
beside this tree's.

Each round runs every command once, in turn (so a burst of load on the shared machine
hits all of them alike), and prints per command the median and the worst of the rounds
and the ratio of the median to ``python -c "import jax"``'s (what a ``--help`` that
loads the library would at least cost). The load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seconds(args: list[str], cwd: str = ROOT) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": cwd}  # that tree's packages, not the installed ones
    subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, check=False, timeout=300
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", default=None, help="another gllora checkout")
    parsed = parser.parse_args()
    repeats, other = parsed.repeats, parsed.compare
    commands = {"import jax": ["-c", "import jax"]}
    commands.update({m: ["-m", m, "--help"] for m in cli.entrypoints()})
    times: dict[str, list[float]] = {name: [] for name in commands}
    before: dict[str, list[float]] = {name: [] for name in commands}
    load = os.getloadavg()
    for _ in range(repeats):
        for name, args in commands.items():
            times[name].append(_seconds(args))
            if other:
                before[name].append(_seconds(args, other))
    base = statistics.median(times["import jax"])
    print(f"load average {load[0]:.1f} (1 min) at the start; {repeats} rounds, alternated")
    extra = " other tree (s) | this / other |" if other else ""
    print("| command | median (s) | worst (s) | median / import jax |" + extra)
    print("|---|---|---|---|" + ("---|---|" if other else ""))
    for name, t in times.items():
        shown = name if name == "import jax" else f"{name} --help"
        med = statistics.median(t)
        row = f"| {shown} | {med:.2f} | {max(t):.2f} | {med / base:.2f} |"
        if other:
            old = statistics.median(before[name])
            row += f" {old:.2f} | {med / old:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
