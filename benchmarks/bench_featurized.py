"""Training with the features computed once per run against computing them at every step.

MLP + SVD, MLP + O-Align, Spectral and W2T (the models whose features have no
parameters) train on a dataset folder with ``config.precompute_features`` on and off,
the two alternating in one process, round after round; each run is a whole
``train_and_evaluate`` (data, compilation, epochs, the final evaluation) in a fresh
workdir. Prints each run's wall time, the median per setting and their ratio, and the
test loss of both (they must agree: the same run, computed in another place).

    python -m benchmarks.bench_featurized --dataset=DIR [--target=membership]
        [--models=mlp_svd,mlp_oalign] [--epochs=5] [--rounds=2]

A rank-32 digit-subset dataset (``python -m data_gen.digit_subsets --size=quick``) is
where the per-step Jacobi solves cost the most. ``--featurizers_only`` times just the
two featurizers (jitted, a batch of 32 random LoRAs of the digit-subset shape: 4 modules,
``[128, 32]`` factors) beside a Gram matrix of the same factors, no dataset needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from experiments.configs import default
from gllora import features, linalg
from gllora.train import train_and_evaluate


def time_featurizers(batch: int = 32, rounds: int = 5) -> None:
    rng = np.random.default_rng(0)
    u = jax.numpy.asarray(rng.normal(size=(batch, 4, 128, 32)), jax.numpy.float32)
    v = jax.numpy.asarray(rng.normal(size=(batch, 4, 128, 32)), jax.numpy.float32)
    u_t, v_t = u[0], v[0]
    fns = {
        "singular values (refine=u)": lambda u, v: features.singular_values(u, v),
        "O-Align (Procrustes + rotation)": lambda u, v: features.oalign(u, v, u_t, v_t),
        "Gram matrices alone": lambda u, v: (linalg.gram(u), linalg.gram(v)),
    }
    for name, fn in fns.items():
        fn = jax.jit(fn)
        jax.block_until_ready(fn(u, v))
        t0 = time.perf_counter()
        for _ in range(rounds):
            jax.block_until_ready(fn(u, v))
        ms = (time.perf_counter() - t0) / rounds * 1e3
        print(f"{name}: {ms:.1f} ms per batch of {batch} LoRAs", flush=True)


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
    parser.add_argument("--dataset")
    parser.add_argument("--featurizers_only", action="store_true")
    parser.add_argument("--target", default="membership")
    parser.add_argument("--models", default="mlp_svd,mlp_oalign")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.featurizers_only:
        time_featurizers()
        return
    if not args.dataset:
        parser.error("--dataset is required (or --featurizers_only)")
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
