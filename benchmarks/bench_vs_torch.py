"""GL-net and the singular-value featurizer in gllora against the authors' PyTorch code.

The machine is shared, so absolute figures move with its load; the contenders run in
turn, round after round, and the ratios of their medians are what holds. The PyTorch
side is written here from the architecture described in ../shared/REFERENCE_NOTES.md
(the authors' code is not copied). "authors' code" processes the 56 modules one by one
with their own weights (GL-net), and computes the singular-value features one adapter at
a time (thin QRs of the 56 stacked ``B`` and ``A^T``, then the singular values of the
``4 x 4`` cores), as the authors' data loader does per sample; "batched" is the faster
way to write both in PyTorch (``bmm`` over stacked modules in gllora's rank-major
layout; one batched QR for the whole batch). All at the Qwen2-1.5B k/v LoRA shape
(56 modules, ``u [256, 4]``, ``v [1536, 4]``), batch 32, GL-net width 16, two equivariant
layers, head 256, dropout 0.1, AdamW. Each measurement runs in its own process: XLA's and
PyTorch's thread pools in one process slow each other down.

The gllora process also measures the machine's limits (a 2048^2 float32 matmul, a
streaming read) and prints how far each figure is from them: GL-net's forward is
FLOP-bound (``FLOPS`` per LoRA), the featurizer reads 1.6 MB per LoRA.

MLP+Dense against the authors' recipe (inference, training step and the memory peak of
each) is :mod:`benchmarks.bench_dense`, with the same conventions: each (side, phase)
in its own process, in turn, medians.

Needs PyTorch, which gllora does not depend on: ``pip install torch==2.13.0``.

    python -m benchmarks.bench_vs_torch [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.bench_models import M, N, NUM_LAYERS, R, machine_limits, qwen_kv_lora
from gllora import features, in_axes, models, stack

try:
    import torch
except ImportError as e:  # pragma: no cover - optional benchmark dependency
    raise SystemExit("this benchmark needs PyTorch: pip install torch==2.13.0") from e

K, D, H, B = 2 * NUM_LAYERS, 16, 256, 32


class TorchGLNet(torch.nn.Module):
    """GL-net as described for the authors' code: equivariant linear to width 16, then
    relu(sign(row sums)) gate, row dropout, a 16 x 16 equivariant linear, then
    cat(u v^T) -> Dropout -> Linear(256) -> LayerNorm -> Dropout -> ReLU -> Linear(1)."""

    def __init__(self, batched: bool):
        super().__init__()
        self.batched = batched
        init = lambda *shape: torch.nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)
        self.phi1, self.psi1 = init(K, D, N), init(K, D, M)
        self.phi2, self.psi2 = init(K, D, D), init(K, D, D)
        self.head = torch.nn.Sequential(
            torch.nn.Dropout(0.1),
            torch.nn.Linear(K * D * D, H),
            torch.nn.LayerNorm(H),
            torch.nn.Dropout(0.1),
            torch.nn.ReLU(),
            torch.nn.Linear(H, 1),
        )
        self.row_drop = torch.nn.Dropout(0.1)

    def forward(self, u, v):
        """``u [B, K, N, R]``, ``v [B, K, M, R]`` (per-module loop) or, batched, the
        rank-major ``[K, N, B, R]`` layout gllora feeds its models (``bmm`` over ``B * R``
        columns: the fast way in PyTorch too)."""
        if self.batched:
            k, n, b, r = u.shape
            uu = torch.bmm(self.phi1, u.reshape(k, n, b * r)).reshape(k, D, b, r)
            vv = torch.bmm(self.psi1, v.reshape(k, v.shape[1], b * r)).reshape(k, D, b, r)
            rows = torch.einsum("kdbr,kbr->kdb", uu, vv.sum(1))
            cols = torch.einsum("kdbr,kbr->kdb", vv, uu.sum(1))
            uu = self.row_drop((rows > 0).float().unsqueeze(-1) * uu)
            vv = self.row_drop((cols > 0).float().unsqueeze(-1) * vv)
            uu = torch.bmm(self.phi2, uu.reshape(k, D, b * r)).reshape(k, D, b, r)
            vv = torch.bmm(self.psi2, vv.reshape(k, D, b * r)).reshape(k, D, b, r)
            prods = torch.einsum("kibr,kjbr->bkij", uu, vv).reshape(b, -1)
            return self.head(prods)
        prods = []
        for i in range(K):
            uu, vv = self.phi1[i] @ u[:, i], self.psi1[i] @ v[:, i]  # [B, D, R]
            rows = (uu @ vv.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1)
            cols = (vv @ uu.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1)
            uu = self.row_drop((rows > 0).float().unsqueeze(-1) * uu)
            vv = self.row_drop((cols > 0).float().unsqueeze(-1) * vv)
            uu, vv = self.phi2[i] @ uu, self.psi2[i] @ vv
            prods.append((uu @ vv.transpose(1, 2)).reshape(u.shape[0], -1))
        return self.head(torch.cat(prods, 1))


def torch_svd_features(u, v):
    """Singular values of u v^T from thin QRs of u and v: [*, K, R]."""
    r1 = torch.linalg.qr(u, mode="r")[1]
    r2 = torch.linalg.qr(v, mode="r")[1]
    return torch.linalg.svdvals(r1 @ r2.transpose(-1, -2))


def torch_svd_features_per_sample(u, v):
    """The authors' way: one adapter at a time (its 56 modules stacked)."""
    return torch.stack([torch_svd_features(u[i], v[i]) for i in range(u.shape[0])])


def rate(fn, seconds: float) -> float:
    """LoRAs/s of ``fn`` (one batch per call) after one warm-up call."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return B * calls / (time.perf_counter() - t0)


def measure(contender: str, seconds: float) -> list[float | None]:
    """[train, inference, svd] LoRAs/s of one contender, in this process."""
    loras = [qwen_kv_lora(i) for i in range(B)]
    if contender.startswith("torch"):
        torch.manual_seed(0)
        u_t = torch.from_numpy(np.stack([np.asarray(l.u[0]) for l in loras]))
        v_t = torch.from_numpy(np.stack([np.asarray(l.v[0]) for l in loras]))
        svd_in = (u_t, v_t)
        if contender == "torch_batched":  # rank-major, contiguous: [K, N, B, R]
            u_t, v_t = u_t.permute(1, 2, 0, 3).contiguous(), v_t.permute(1, 2, 0, 3).contiguous()
        y_t = torch.zeros(B, 1)
        net = TorchGLNet(batched=contender == "torch_batched")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)

        def train():
            net.train()
            opt.zero_grad()
            torch.mean((net(u_t, v_t) - y_t) ** 2).backward()
            opt.step()

        def infer():
            net.eval()
            with torch.no_grad():
                net(u_t, v_t)

        featurize = (
            torch_svd_features if contender == "torch_batched" else torch_svd_features_per_sample
        )
        svd = lambda: featurize(*svd_in)
        return [rate(train, seconds), rate(infer, seconds), rate(svd, seconds)]

    model = models.build("glnet", num_outputs=1)
    variables = model.init(jax.random.key(0), loras[0])
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    batch = jax.device_put(stack(loras, layout="rank_major"))
    axes = in_axes(batch, "rank_major")
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    state = {"p": params, "s": tx.init(params), "i": 0}
    y = jnp.zeros((B, 1))

    @jax.jit
    def step(p, s, key):
        def loss_fn(p):
            out = jax.vmap(
                lambda x, k: model.apply({"params": p, **rest}, x, train=True, rngs={"dropout": k}),
                in_axes=(axes, 0),
            )(batch, jax.random.split(key, B))
            return jnp.mean((out - y) ** 2)

        updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, updates), s

    def train():
        state["p"], state["s"] = step(state["p"], state["s"], jax.random.key(state["i"]))
        state["i"] += 1
        jax.block_until_ready(state["p"])

    infer = jax.jit(
        lambda p: jax.vmap(lambda x: model.apply({"params": p, **rest}, x), in_axes=(axes,))(batch)
    )
    leading = jax.device_put(stack(loras))
    svd = jax.jit(lambda b: features.singular_values(b.u[0], b.v[0]))
    return [
        rate(train, seconds),
        rate(lambda: jax.block_until_ready(infer(state["p"])), seconds),
        rate(lambda: jax.block_until_ready(svd(leading)), seconds),
        *machine_limits(min(seconds, 2.0)),
    ]


CONTENDERS = {
    "torch_loop": "authors' code (PyTorch)",
    "torch_batched": "PyTorch, batched",
    "jax": "gllora (JAX)",
}

#: GL-net forward FLOPs per LoRA: the first equivariant layer (both factors), the second
#: (16 x 16), the products u_i v_i^T, the head's first layer and its output.
FLOPS = (
    2 * K * R * D * (N + M) + 2 * 2 * K * R * D * D + 2 * K * D * D * R + 2 * K * D * D * H + 2 * H
)
#: Bytes of factors per LoRA.
BYTES = K * (N + M) * R * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # a child process: print one JSON line
        print(json.dumps(measure(args.only, args.seconds)))
        return
    results = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):  # in turn, so changes in load hit every contender alike
        for name in CONTENDERS:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_vs_torch",
                    f"--only={name}",
                    f"--seconds={args.seconds}",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {
        name: [float(np.median([r[j] for r in rows])) for j in range(len(rows[0]))]
        for name, rows in results.items()
    }
    flops, bandwidth = med["jax"][3:5]
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}; "
        f"Qwen2-1.5B k/v shape: {K} modules u [{N}, {R}], v [{M}, {R}]; batch {B}; "
        f"median of {args.rounds} alternating rounds, one process per measurement; LoRAs/s"
    )
    print(f"{'':<32} {'train step':>11} {'inference':>11} {'SVD features':>13}")
    for name, row in med.items():
        cells = [f"{x:,.0f}" for x in row[:3]]
        print(f"{CONTENDERS[name]:<32} {cells[0]:>11} {cells[1]:>11} {cells[2]:>13}")
    ours = med["jax"][:3]
    for ref in ("torch_loop", "torch_batched"):
        ratios = [f"x{a / b:.2f}" for a, b in zip(ours, med[ref])]
        print(
            f"{'gllora / ' + CONTENDERS[ref]:<32} {ratios[0]:>11} {ratios[1]:>11} {ratios[2]:>13}"
        )
    bound_flops, bound_read = flops / FLOPS, bandwidth / BYTES
    print(
        f"\nmachine (median over the rounds, in the gllora process): {flops / 1e9:,.0f} GFLOP/s "
        f"(2048^2 float32 matmul), {bandwidth / 1e9:,.1f} GB/s (streaming read)"
    )
    print(
        f"GL-net forward: {FLOPS / 1e6:.1f} MFLOP per LoRA -> at most {bound_flops:,.0f} "
        f"LoRAs/s at matmul speed; inference at {ours[1] / bound_flops:.0%} of it"
    )
    print(
        f"features: {BYTES / 1e6:.2f} MB read per LoRA -> at most {bound_read:,.0f} LoRAs/s at "
        f"read speed; at {ours[2] / bound_read:.0%} of it"
    )


if __name__ == "__main__":
    main()
