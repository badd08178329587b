"""Accuracy of the LAPACK-free singular-value features against float64 numpy.

For ranks 1-64 and condition numbers 1 to 1e4 (a factor's singular values log-spaced
from 1 down to ``1 / cond``), the largest relative error over every singular value of
``u v^T`` of ``features.singular_values`` with each ``refine`` (which factors are read
twice), beside the float32 LAPACK route it replaced (thin QRs and an SVD of the core,
``jnp.linalg``), all in float32. Two cases: the LoRA-typical one (``u`` trained from
zero, ill-conditioned; ``v`` a random init, condition ~1) and both factors
ill-conditioned.

    python -m benchmarks.accuracy_svd [--batch 64]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from gllora import features


def factor(rng, batch: int, n: int, r: int, cond: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(batch, n, r)))
    w, _ = np.linalg.qr(rng.normal(size=(batch, r, r)))
    s = np.logspace(0, -np.log10(cond), r) if r > 1 else np.ones(1)
    return (q * s) @ np.swapaxes(w, -1, -2)


def lapack_route(u, v):
    _, r1 = jnp.linalg.qr(u)
    _, r2 = jnp.linalg.qr(v)
    return jnp.linalg.svd(r1 @ jnp.swapaxes(r2, -1, -2), compute_uv=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("max relative error of any singular value of u v^T (u [4r, r], v [8r, r], float32)")
    head = f"{'rank':>4} {'cond':>6} {'case':>9} {'none':>8} {'u':>8} {'both':>8} {'LAPACK':>8}"
    print(head)
    for r in (1, 2, 4, 8, 16, 32, 64):
        for cond in (1.0, 1e2, 1e3, 1e4):
            for case in ("u only", "both"):
                u = factor(rng, args.batch, 4 * r, r, cond)
                v = factor(rng, args.batch, 8 * r, r, 1.0 if case == "u only" else cond)
                want = np.linalg.svd(u @ np.swapaxes(v, -1, -2), compute_uv=False)[..., :r]
                u32, v32 = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
                rel = lambda got: (np.abs(np.asarray(got, np.float64) - want) / want).max()
                errs = [rel(features.singular_values(u32, v32, refine=m)) for m in features.REFINE]
                errs.append(rel(lapack_route(u32, v32)))
                cells = " ".join(f"{e:>8.1e}" for e in errs)
                print(f"{r:>4} {cond:>6.0e} {case:>9} {cells}", flush=True)


if __name__ == "__main__":
    main()
