"""Training with the features computed once per run against computing them at every step.

MLP + SVD and MLP + O-Align (the models whose features have no parameters) train on a
dataset folder with ``config.precompute_features`` on and off, the two alternating in
one process, round after round; each run is a whole ``train_and_evaluate`` (data,
compilation, epochs, the final evaluation) in a fresh workdir. Prints each run's wall
time, the median per setting and their ratio, and the test loss of both (they must
agree: the same run, computed in another place).

    python -m benchmarks.bench_featurized --dataset=DIR [--target=membership]
        [--models=mlp_svd,mlp_oalign] [--epochs=5] [--rounds=2]

A rank-32 digit-subset dataset (``python -m data_gen.digit_subsets --size=quick``) is
where the per-step Jacobi solves cost the most.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from experiments.configs import default
from gllora.train import train_and_evaluate


def one_run(dataset: str, target: str, model: str, epochs: int, precompute: bool) -> tuple:
    config = default.get_config()
    config.update(dataset=dataset, targets=(target,), model=model, num_epochs=epochs,
                  progress=False, precompute_features=precompute)  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        results = train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - t0
    return seconds, results["summary"]["test"]["loss"]["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--target", default="membership")
    parser.add_argument("--models", default="mlp_svd,mlp_oalign")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for model in args.models.split(","):
        times = {True: [], False: []}
        losses = {}
        for r in range(args.rounds):
            for precompute in (True, False) if r % 2 == 0 else (False, True):
                seconds, loss = one_run(args.dataset, args.target, model, args.epochs, precompute)
                times[precompute].append(seconds)
                losses[precompute] = loss
                print(f"{model} round {r} precompute={precompute}: {seconds:.1f} s, "
                      f"test loss {loss:.4f}", flush=True)  # fmt: skip
        once, each = statistics.median(times[True]), statistics.median(times[False])
        print(f"{model}: {args.epochs} epochs, median {once:.1f} s computed once, "
              f"{each:.1f} s at every step: {each / once:.2f}x; test loss "
              f"{losses[True]:.4f} vs {losses[False]:.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
