"""A small synthetic LoRA dataset family whose targets are GL-invariant functions.

Random LoRAs (each module ``u v^T`` with a random per-module scale, its factors moved by
a random GL(r) element so that the raw factors carry no canonical form) and targets
computed from the products ``delta_i = u_i v_i^T`` only, exactly and cheaply through
``r x r`` Gram matrices:

- ``log_norm`` (regression): ``log sum_i |delta_i|_F``;
- ``trace`` (regression): ``sum_i <A_i, delta_i>`` for fixed random ``A_i``;
- ``positive`` (binary): ``trace > 0``;
- ``bits`` (multi-label): one bit per module, ``<A_i, delta_i> > 0``;
- ``largest`` (categorical): the module with the largest ``|delta_i|_F``.

For tests and demos (seconds to generate) until the built-in datasets are used.

    python -m data_gen.synthetic --out=/tmp/synthetic --num=1000 [--seed=0 --rank=4]
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from gllora.io import dataset

#: (name, n, m): two same-shaped "attention" modules per layer and one other shape.
MODULES = (
    ("layers.0.q", 16, 24),
    ("layers.0.v", 16, 24),
    ("layers.1.q", 16, 24),
    ("layers.1.v", 16, 24),
    ("head", 8, 12),
)


def generate(num: int, seed: int = 0, rank: int = 4, modules=MODULES):
    """Returns ``(factors, labels)``: ``{name: (u [num, n, r], v [num, m, r])}`` and columns."""
    rng = np.random.default_rng(seed)
    probe = np.random.default_rng(1234)  # the same A_i for every seed: targets mean the same
    factors, traces, norms = {}, [], []
    for name, n, m in modules:
        u = rng.normal(size=(num, n, rank)) / np.sqrt(n)
        v = rng.normal(size=(num, m, rank)) / np.sqrt(m)
        u *= np.exp(rng.normal(size=(num, 1, 1)))  # per-module scale: varied norms
        g = rng.normal(size=(num, rank, rank)) + 2 * np.eye(rank)  # invertible a.s.
        u_g = u @ g
        v_g = np.swapaxes(np.linalg.solve(g, np.swapaxes(v, 1, 2)), 1, 2)
        a = probe.normal(size=(n, m))
        # <A, u v^T> = sum_r u[:, r]^T A v[:, r];  |u v^T|_F^2 = tr((u^T u)(v^T v)).
        traces.append(np.einsum("bnr,nm,bmr->b", u, a, v))
        norms.append(
            np.sqrt(np.einsum("brs,bsr->b", np.swapaxes(u, 1, 2) @ u, np.swapaxes(v, 1, 2) @ v))
        )
        factors[name] = (u_g.astype(np.float32), v_g.astype(np.float32))
    traces, norms = np.stack(traces, 1), np.stack(norms, 1)
    labels = {
        "log_norm": np.log(norms.sum(1)),
        "trace": traces.sum(1),
        "positive": traces.sum(1) > 0,
        "largest": norms.argmax(1),
    }
    for (name, _, _), bit in zip(modules, (traces > 0).T):
        labels[f"bit_{name}"] = bit
    labels["seed"] = np.full(num, seed)
    return factors, labels


def targets(modules=MODULES) -> dict:
    return {
        "log_norm": {"task": "regression", "columns": ["log_norm"]},
        "trace": {"task": "regression", "columns": ["trace"]},
        "positive": {"task": "binary", "columns": ["positive"]},
        "bits": {"task": "multilabel", "columns": [f"bit_{name}" for name, _, _ in modules]},
        "largest": {"task": "categorical", "columns": ["largest"]},
    }


def write(out: str, num: int, seed: int = 0, rank: int = 4, overwrite: bool = False) -> str:
    """Generates ``num`` LoRAs and writes them as a dataset folder at ``out``."""
    factors, labels = generate(num, seed, rank)
    writer = dataset.DatasetWriter(
        out,
        modules=MODULES,
        targets=targets(),
        overwrite=overwrite,
        provenance={"generator": "data_gen.synthetic", "num": num, "seed": seed, "rank": rank},
    )
    writer.add(factors, labels)
    return writer.close(split_seed=seed)


def main(argv):
    del argv
    f = flags.FLAGS
    path = write(f.out, f.num, f.seed, f.rank, f.overwrite)
    print(f"wrote {f.num} synthetic LoRAs to {path}")


if __name__ == "__main__":
    # Flags live here, not at import time, so other entrypoints can import this module.
    flags.DEFINE_string("out", None, "Dataset folder to write.", required=True)
    flags.DEFINE_integer("num", 1000, "Number of LoRAs.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("rank", 4, "LoRA rank.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing folder.")
    app.run(main)
