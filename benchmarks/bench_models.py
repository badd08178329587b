"""Throughput of the LoL models at the Qwen2-1.5B key/value LoRA shape, and the machine's limits.

56 modules (28 k_proj + 28 v_proj), u [256, 4], v [1536, 4]: one group of 56 modules.
Prints LoRAs/s for GL-net inference and a full training step (forward, backward, adam)
at batch 32 in both batch layouts, the SVD featurizer's throughput, compile times, and
the machine's large-matmul FLOP/s and memory bandwidth for scale.

    python -m benchmarks.bench_models [--batch 32] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gllora import Lora, features, in_axes, models, stack

NUM_LAYERS, N, M, R = 28, 256, 1536, 4


def qwen_kv_lora(seed: int) -> Lora:
    rng = np.random.default_rng(seed)
    return Lora.from_factors(
        {
            f"model.layers.{i}.self_attn.{p}_proj": (
                rng.normal(size=(N, R)).astype(np.float32) * 0.01,
                rng.normal(size=(M, R)).astype(np.float32) * 0.01,
            )
            for i in range(NUM_LAYERS)
            for p in ("k", "v")
        }
    )


def timeit(fn, *args, seconds: float) -> tuple[float, float]:
    """(compile + first call seconds, steady seconds per call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(fn(*args))
        calls += 1
    return first, (time.perf_counter() - t0) / calls


def machine_limits(seconds: float) -> tuple[float, float]:
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    _, t = timeit(mm, a, seconds=seconds)
    flops = 2 * 2048**3 / t
    # Read bandwidth: a reduction over 256 MB (writing a fresh output buffer each call
    # would measure page faults, not memory).
    big = jnp.ones((64 << 20,), jnp.float32)
    _, t = timeit(jax.jit(jnp.sum), big, seconds=seconds)
    return flops, big.nbytes / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    B = args.batch
    loras = [qwen_kv_lora(i) for i in range(B)]
    model = models.build("glnet", num_outputs=1, equiv_width=16, equiv_depth=2, head_width=256)
    variables = model.init(jax.random.key(0), loras[0])
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s); "
        f"GL-net width 16, 2 equivariant layers, head 256: {n_params / 1e6:.2f}M parameters; batch {B}"
    )
    y = jnp.zeros((B, 1))
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    rows = []
    for layout in ("leading", "rank_major"):
        batch = jax.device_put(stack(loras, layout=layout))
        axes = in_axes(batch, layout)

        def predict(p, x, axes=axes):
            return jax.vmap(lambda xi: model.apply({"params": p, **rest}, xi), in_axes=(axes,))(x)

        def train_step(p, s, x, key, axes=axes):
            def loss_fn(p):
                out = jax.vmap(
                    lambda xi, k: model.apply(
                        {"params": p, **rest}, xi, train=True, rngs={"dropout": k}
                    ),
                    in_axes=(axes, 0),
                )(x, jax.random.split(key, B))
                return jnp.mean((out - y) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        c_inf, t_inf = timeit(jax.jit(predict), params, batch, seconds=args.seconds)
        step = jax.jit(train_step)
        c_tr, t_tr = timeit(
            lambda *a: step(*a)[2],
            params,
            opt_state,
            batch,
            jax.random.key(1),
            seconds=args.seconds,
        )
        rows.append((layout, B / t_inf, B / t_tr, c_inf, c_tr))

    print(
        f"\n{'layout':<11} {'inference LoRAs/s':>18} {'train step LoRAs/s':>19} "
        f"{'compile inf (s)':>16} {'compile train (s)':>18}"
    )
    for layout, inf, tr, ci, ct in rows:
        print(f"{layout:<11} {inf:>18,.0f} {tr:>19,.0f} {ci:>16.2f} {ct:>18.2f}")
    print(
        f"rank_major / leading: inference x{rows[1][1] / rows[0][1]:.2f}, train x{rows[1][2] / rows[0][2]:.2f}"
    )

    batch = jax.device_put(stack(loras))
    svd = jax.jit(lambda b: features.singular_values(b.u[0], b.v[0]))
    c_svd, t_svd = timeit(svd, batch, seconds=args.seconds)
    print(
        f"\nSVD featurizer (thin QRs + r x r SVD, 56 modules): {B / t_svd:,.0f} LoRAs/s "
        f"(compile {c_svd:.2f} s)"
    )

    flops, bandwidth = machine_limits(args.seconds)
    # GL-net forward FLOPs per LoRA: the two equivariant layers and the head.
    per_lora = (
        2 * 56 * R * 16 * (N + M) + 2 * 56 * R * 16 * 32 + 2 * 56 * 16 * 16 * R + 2 * 56 * 256 * 256
    )
    read = 56 * (N + M) * R * 4
    inf = rows[1][1]
    print(
        f"\nmachine: {flops / 1e9:,.0f} GFLOP/s (2048^2 fp32 matmul), {bandwidth / 1e9:,.1f} GB/s (streaming read)"
    )
    print(
        f"GL-net forward: {per_lora / 1e6:.1f} MFLOP and {read / 1e6:.2f} MB of factors per LoRA -> "
        f"at {inf:,.0f} LoRAs/s: {inf * per_lora / 1e9:,.1f} GFLOP/s ({inf * per_lora / flops:.0%} of matmul peak), "
        f"{inf * read / 1e9:,.1f} GB/s ({inf * read / bandwidth:.0%} of bandwidth)"
    )


if __name__ == "__main__":
    main()
