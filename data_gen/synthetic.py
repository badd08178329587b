"""A small synthetic LoRA dataset family whose targets are GL-invariant functions.

Random LoRAs: each module is switched on with probability 0.8 (an inactive module has
zero factors, as when an adapter targets only some layers), its ``u v^T`` has a
per-LoRA and a per-module scale, and its factors are moved by a random GL(r) element
of condition number <= 4, so the raw factors carry no canonical form. Every target is
computed from the products ``delta_i = u_i v_i^T`` only, exactly, through ``r x r``
Gram matrices:

- ``alignment`` (regression): ``sum_i <A_i, delta_i> / sum_i |A_i| |delta_i|`` for fixed
  random ``A_i``: linear in the deltas and free of their scale;
- ``log_norm`` (regression): ``log sum_i |delta_i|_F`` (mostly the per-LoRA scale);
- ``positive`` (binary): ``sum_i <A_i, delta_i> > 0``;
- ``active`` (multi-label): which modules are switched on;
- ``num_active`` (categorical): how many are;
- ``largest`` (categorical): the module with the largest ``|delta_i|_F``.

For tests and demos (seconds to generate).

    python -m data_gen.synthetic --out=/tmp/synthetic --num=1000 [--seed=0 --rank=4]
"""

from __future__ import annotations

import numpy as np
from absl import flags

#: (name, n, m): two same-shaped "attention" modules per layer and one other shape.
MODULES = (
    ("layers.0.q", 8, 12),
    ("layers.0.v", 8, 12),
    ("layers.1.q", 8, 12),
    ("layers.1.v", 8, 12),
    ("head", 6, 8),
)


def generate(num: int, seed: int = 0, rank: int = 4, modules=MODULES):
    """Returns ``(factors, labels)``: ``{name: (u [num, n, r], v [num, m, r])}`` and columns."""
    rng = np.random.default_rng(seed)
    probe = np.random.default_rng(1234)  # the same A_i for every seed: targets mean the same
    active = rng.random((num, len(modules))) < 0.8
    active[np.arange(num), rng.integers(len(modules), size=num)] = True  # at least one
    # A per-LoRA scale shared by every module (as a learning rate or a step count would
    # be) and a smaller per-module one: norms vary between LoRAs and between modules.
    lora_scale = np.exp(0.5 * rng.normal(size=(num, 1, 1)))
    factors, traces, norms, a_norms = {}, [], [], []
    for i, (name, n, m) in enumerate(modules):
        u = rng.normal(size=(num, n, rank)) / np.sqrt(n)
        v = rng.normal(size=(num, m, rank)) / np.sqrt(m)
        u *= lora_scale * np.exp(0.3 * rng.normal(size=(num, 1, 1))) * active[:, i, None, None]
        v *= active[:, i, None, None]
        g = _random_gl(rng, num, rank)
        u_g = u @ g
        v_g = np.swapaxes(np.linalg.solve(g, np.swapaxes(v, 1, 2)), 1, 2)
        a = probe.normal(size=(n, m))
        # <A, u v^T> = sum_r u[:, r]^T A v[:, r];  |u v^T|_F^2 = tr((u^T u)(v^T v)).
        traces.append(np.einsum("bnr,nm,bmr->b", u, a, v))
        gram = np.einsum("brs,bsr->b", np.swapaxes(u, 1, 2) @ u, np.swapaxes(v, 1, 2) @ v)
        norms.append(np.sqrt(np.maximum(gram, 0.0)))
        a_norms.append(np.linalg.norm(a))
        factors[name] = (u_g.astype(np.float32), v_g.astype(np.float32))
    traces, norms = np.stack(traces, 1), np.stack(norms, 1)
    labels = {
        "alignment": traces.sum(1) / (norms * np.asarray(a_norms)).sum(1),
        "log_norm": np.log(norms.sum(1)),
        "positive": traces.sum(1) > 0,
        "num_active": active.sum(1),
        "largest": norms.argmax(1),
    }
    for (name, _, _), bit in zip(modules, active.T):
        labels[f"active_{name}"] = bit
    labels["seed"] = np.full(num, seed)
    return factors, labels


def _random_gl(rng: np.random.Generator, num: int, rank: int, max_cond: float = 4.0) -> np.ndarray:
    """``[num, r, r]`` random ``Q1 diag(s) Q2^T`` with condition number <= ``max_cond``."""
    q1, _ = np.linalg.qr(rng.normal(size=(num, rank, rank)))
    q2, _ = np.linalg.qr(rng.normal(size=(num, rank, rank)))
    s = np.exp(rng.uniform(-0.5, 0.5, size=(num, 1, rank)) * np.log(max_cond))
    return (q1 * s) @ np.swapaxes(q2, 1, 2)


def targets(modules=MODULES) -> dict:
    return {
        "alignment": {"task": "regression", "columns": ["alignment"]},
        "log_norm": {"task": "regression", "columns": ["log_norm"]},
        "positive": {"task": "binary", "columns": ["positive"]},
        "active": {"task": "multilabel", "columns": [f"active_{name}" for name, _, _ in modules]},
        "num_active": {"task": "categorical", "columns": ["num_active"]},
        "largest": {"task": "categorical", "columns": ["largest"]},
    }


def write(out: str, num: int, seed: int = 0, rank: int = 4, overwrite: bool = False) -> str:
    """Generates ``num`` LoRAs and writes them as a dataset folder at ``out``."""
    from gllora.io import dataset

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
    del argv  # experiments.cli.run refuses positional arguments
    from data_gen import cli

    f = flags.FLAGS
    cli.check_out(f.out, f.overwrite)
    path = write(f.out, f.num, f.seed, f.rank, f.overwrite)
    print(f"wrote {f.num} synthetic LoRAs to {path}")


if __name__ == "__main__":
    from experiments import cli as command_line

    # Flags live here, not at import time, so other entrypoints can import this module.
    flags.DEFINE_string("out", None, "Dataset folder to write.", required=True)
    flags.DEFINE_integer("num", 1000, "Number of LoRAs.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("rank", 4, "LoRA rank.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing folder.")
    command_line.run(main)
