"""Throughput of the peers (w2t, spectral, glnet_seq) beside GL-net at the Qwen2-1.5B k/v shape,
and per-structure batching against a padded union with a module mask.

56 modules (28 k_proj + 28 v_proj), u [256, 4], v [1536, 4], batch 32; every model with
its registry defaults, fed in its own batch layout (``models.layout``). Prints LoRAs/s
for prediction and for a full training step (forward, backward, AdamW), median over
rounds in which the models alternate, and each model's ratio to GL-net.

Multi-structure batching (glnet_seq): LoRAs of two structures, 28 and 16 layers of the
same widths, half of the examples each. Per-structure batches (what the engine does)
run the 56- and the 32-module program in turn; a padded union runs every example as a
56-module LoRA with the absent modules' rank set to 0 (``glnet_seq.module_mask``).

    python -m benchmarks.bench_peers [--batch 32] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gllora import Lora, in_axes, models, stack

N, M, R = 256, 1536, 4
MODELS = ("glnet", "w2t", "spectral", "glnet_seq")


def kv_lora(seed: int, layers: int = 28) -> Lora:
    rng = np.random.default_rng(seed)
    return Lora.from_factors(
        {
            f"model.layers.{i}.self_attn.{p}_proj": (
                rng.normal(size=(N, R)).astype(np.float32) * 0.01,
                rng.normal(size=(M, R)).astype(np.float32) * 0.01,
            )
            for i in range(layers)
            for p in ("k", "v")
        }
    )


def programs(name: str, loras: list[Lora], layout: str):
    """``(predict, train_step, args)`` of one model on one batch, jitted."""
    B = len(loras)
    model = models.build(name, num_outputs=1)
    variables = model.init(jax.random.key(0), loras[0])
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    batch = jax.device_put(stack(loras, layout=layout))
    axes = in_axes(batch, layout)
    tx = optax.adamw(1e-3)
    y = jnp.zeros((B, 1))

    @jax.jit
    def predict(p, x):
        return jax.vmap(lambda xi: model.apply({"params": p, **rest}, xi), in_axes=(axes,))(x)

    @jax.jit
    def train_step(p, s, x, key):
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

    opt_state = tx.init(params)
    key = jax.random.key(1)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return (
        lambda: predict(params, batch),
        lambda: train_step(params, opt_state, batch, key)[2],
        n_params,
    )


def seconds_per_call(fn, seconds: float) -> float:
    jax.block_until_ready(fn())
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 2:
        jax.block_until_ready(fn())
        calls += 1
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    B = args.batch
    names = args.models.split(",")
    loras = [kv_lora(i) for i in range(B)]
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}; 56 modules, u [256, 4], v [1536, 4], batch {B}"
    )
    progs, compile_s = {}, {}
    for name in names:
        t0 = time.perf_counter()
        pred, step, n_params = programs(name, loras, models.layout(name))
        jax.block_until_ready(pred())
        jax.block_until_ready(step())
        compile_s[name] = time.perf_counter() - t0
        progs[name] = (pred, step, n_params)
    times = {name: ([], []) for name in names}
    for _ in range(args.rounds):  # alternate the models within each round
        for name in names:
            pred, step, _ = progs[name]
            times[name][0].append(seconds_per_call(pred, args.seconds))
            times[name][1].append(seconds_per_call(step, args.seconds))
    base = "glnet" if "glnet" in names else names[0]
    med = {n: (np.median(t[0]), np.median(t[1])) for n, t in times.items()}
    print(
        f"\n{'model':<10} {'layout':<11} {'params':>9} {'predict LoRAs/s':>16} "
        f"{'train LoRAs/s':>14} {'predict / ' + base:>16} {'train / ' + base:>14} {'compile (s)':>12}"
    )
    for name in names:
        p, t = med[name]
        print(
            f"{name:<10} {models.layout(name):<11} {progs[name][2] / 1e6:>8.2f}M {B / p:>16,.0f} "
            f"{B / t:>14,.0f} {med[base][0] / p:>16.2f} {med[base][1] / t:>14.2f} "
            f"{compile_s[name]:>12.1f}"
        )

    if "glnet_seq" not in names:
        return
    print("\nmulti-structure batching (glnet_seq; 28- and 16-layer LoRAs, half each):")
    deep = loras
    shallow = [kv_lora(100 + i, layers=16) for i in range(B)]
    # The union: shallow LoRAs as 56-module LoRAs whose missing modules have rank 0.
    padded = []
    for x in shallow:
        f = {n: x.factors(n) for n in x.names}
        full = Lora.from_factors(
            {
                n: f.get(n, (np.zeros((N, R), np.float32), np.zeros((M, R), np.float32)))
                for n in deep[0].names
            }
        )
        ranks = np.asarray([R if n in f else 0 for n in full.spec.groups[0].names], np.int32)
        padded.append(full.replace(rank=(ranks,)))
    mixed = [padded[i] if i % 2 else deep[i] for i in range(B)]
    p_deep, s_deep, _ = programs("glnet_seq", deep, "leading")
    p_shallow, s_shallow, _ = programs("glnet_seq", shallow, "leading")
    p_pad, s_pad, _ = programs("glnet_seq", mixed, "leading")
    per = ([], [])
    pad = ([], [])
    for _ in range(args.rounds):
        per[0].append(
            (seconds_per_call(p_deep, args.seconds) + seconds_per_call(p_shallow, args.seconds)) / 2
        )
        pad[0].append(seconds_per_call(p_pad, args.seconds))
        per[1].append(
            (seconds_per_call(s_deep, args.seconds) + seconds_per_call(s_shallow, args.seconds)) / 2
        )
        pad[1].append(seconds_per_call(s_pad, args.seconds))
    for what, i in (("predict", 0), ("train step", 1)):
        a, b = np.median(per[i]), np.median(pad[i])
        print(
            f"  {what:<10}: per-structure {B / a:,.0f} LoRAs/s, padded union {B / b:,.0f} LoRAs/s "
            f"(per-structure / padded x{b / a:.2f}; module slots computed {56 + 32} vs {2 * 56})"
        )


if __name__ == "__main__":
    main()
