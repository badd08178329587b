"""MLP+Dense's first layer: the factored GEMM gllora uses against products formed in row tiles.

Issue 17's open question. The first layer is ``h = sum_k vec(u_k v_k^T) @ W_k`` at the
Qwen2-1.5B k/v shape (56 modules, ``u [256, 4]``, ``v [1536, 4]``, ``W_k [256 * 1536, 16]``).
Two ways to compute it for a batch of ``B`` LoRAs:

- factored (:func:`gllora.product_dense.product_dense`, what the model runs, on the
  rank-major batch the engine feeds it): ``T = W^T u`` per module, ``2 B r I J h`` FLOPs: 22.5 GFLOP per batch of 8, whatever the batch;
- products in row tiles (a prototype here, not in the library): for each module and each
  tile of ``T`` rows of ``u``, the products ``[B, T, J]`` (small enough to stay in cache)
  then one ``[B, T J] @ [T J, h]`` GEMM: ``2 B I J (r + h)`` FLOPs, ``r h / (r + h) = 3.2``
  times fewer, and the kernel read once per batch. It needs the kernel in the dense
  ``[k, I J, h]`` layout (:func:`gllora.product_dense.as_dense_kernel`), not the model's.

Prints LoRAs per second of each (jitted, the two alternating round after round in one
process) at each batch size, their ratio, and the largest relative difference of the
outputs (float32 sums in another order: ~1e-7 relative to the largest output).

``--skinny`` measures instead the product route's bound on its own: the contraction of
a batch's products with the kernel, ``[B, I J] @ [I J, h]`` per module (``B = 8``,
``h = 16``, ``I J = 393,216``), which reads each kernel entry once and does 4 FLOPs per
4 bytes read, so it should run at the machine's read bandwidth. Each way to write it
(jitted; and numpy's BLAS) is timed on 8 modules (200 MB, past the cache) beside a plain
jitted sum over the same kernel, and printed as GB/s of kernel read and the LoRAs/s
that rate would give at 56 modules, products excluded.

    python -m benchmarks.bench_dense_tiles [--batches 8,32] [--tiles 16,32] [--rounds 2]
    python -m benchmarks.bench_dense_tiles --skinny
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gllora import product_dense

K, I, J, R, H = 56, 256, 1536, 4, 16


def factored(u: jax.Array, v: jax.Array, kernel: jax.Array) -> jax.Array:
    """``u [K, I, B, R]``, ``v [K, J, B, R]`` (rank-major, the layout the engine feeds
    MLP+Dense, where the batched GEMM needs no transpose), ``kernel [K, J H, I]`` ->
    ``[B, H]``."""
    return jax.vmap(product_dense.product_dense, in_axes=(2, 2, None))(u, v, kernel)


def tiled_products(u: jax.Array, v: jax.Array, dense: jax.Array, tile: int) -> jax.Array:
    """The same sum from products formed ``tile`` rows at a time; ``dense [K, I J, H]``."""
    batch = u.shape[0]
    # [K, I / tile, B, tile, R]: one module's tiles in turn, each with the whole batch.
    u_tiles = jnp.moveaxis(u, 1, 0).reshape(K, batch, I // tile, tile, R).swapaxes(1, 2)
    kernel_tiles = dense.reshape(K, I // tile, tile * J, H)

    def module(args):
        u_k, v_k, w_k = args  # [I / tile, B, tile, R], [B, J, R], [I / tile, tile J, H]

        def one_tile(tile_args):
            u_t, w_t = tile_args
            p = jnp.einsum("bir,bjr->bij", u_t, v_k).reshape(batch, -1)  # [B, tile J]
            return p @ w_t

        return lax.map(one_tile, (u_k, w_k)).sum(0)

    return lax.map(module, (u_tiles, jnp.moveaxis(v, 1, 0), kernel_tiles)).sum(0)


def _rate(fn, args, batch: int, seconds: float) -> float:
    jax.block_until_ready(fn(*args))
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 3:
        jax.block_until_ready(fn(*args))
        calls += 1
    return batch * calls / (time.perf_counter() - t0)


def skinny(seconds: float, batch: int = 8, modules: int = 8) -> None:
    """GB/s of kernel read of each way to write ``[B, I J] @ [I J, h]`` (see the module
    docstring), beside a streaming sum over the same kernel."""
    rng = np.random.default_rng(0)
    feats = I * J
    p = rng.normal(size=(modules, batch, feats)).astype(np.float32)
    w = rng.normal(size=(modules, feats, H)).astype(np.float32)
    w_t = np.ascontiguousarray(np.swapaxes(w, 1, 2))  # [m, h, I J]
    p_t = np.ascontiguousarray(np.swapaxes(p, 1, 2))  # [m, I J, B]

    def chunks(p, w, size=J):  # a batched dot over chunks of the contraction, then a sum
        n = feats // size
        dims = (((3,), (2,)), ((0, 2), (0, 1)))
        pc, wc = p.reshape(modules, batch, n, size), w.reshape(modules, n, size, H)
        return lax.dot_general(pc, wc, dims).sum(1)

    ways = {
        "streaming sum over the kernel": (lambda p, w: jnp.sum(w, axis=1), (p, w)),
        "[B, IJ] @ [IJ, h]": (lambda p, w: jnp.einsum("mbk,mkc->mbc", p, w), (p, w)),
        "[B, IJ] . [h, IJ] (both IJ-minor)": (
            lambda p, w: jnp.einsum("mbk,mck->mbc", p, w), (p, w_t)),
        "[h, IJ] @ [IJ, B]": (lambda p, w: jnp.einsum("mkb,mck->mbc", p, w), (p_t, w_t)),
        f"batched dot over chunks of {J}": (chunks, (p, w)),
        "broadcast product, summed": (
            lambda p, w: jnp.sum(p[..., None] * w[:, None], axis=2), (p, w)),
    }  # fmt: skip
    for name, (fn, args) in ways.items():
        _report_skinny(name, jax.jit(fn), [jnp.asarray(x) for x in args], seconds, w.nbytes, batch)

    def blas(p, w):
        return [p[m] @ w[m] for m in range(modules)]

    _report_skinny("numpy (BLAS) [B, IJ] @ [IJ, h]", blas, (p, w), seconds, w.nbytes, batch)


def _report_skinny(name: str, fn, args, seconds: float, kernel_bytes: int, batch: int) -> None:
    dt = 1 / _rate(fn, args, 1, seconds)  # seconds per call
    modules = kernel_bytes // (I * J * H * 4)
    rate = batch / (dt * K / modules)  # LoRAs/s at K modules
    print(f"{name:36s} {dt * 1e3:7.1f} ms for {modules} modules: {kernel_bytes / dt / 1e9:5.1f} "
          f"GB/s of kernel, {rate:6.1f} LoRAs/s at {K} modules", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--tiles", default="16,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skinny", action="store_true", help="the product route's GEMM alone")
    args = parser.parse_args()
    if args.skinny:
        skinny(args.seconds)
        return
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(K, J * H, I)).astype(np.float32) * 1e-3)
    dense = jax.block_until_ready(product_dense.as_dense_kernel(kernel, J))
    for batch in (int(b) for b in args.batches.split(",")):
        u = jnp.asarray(rng.normal(size=(batch, K, I, R)).astype(np.float32) * 1e-2)
        v = jnp.asarray(rng.normal(size=(batch, K, J, R)).astype(np.float32) * 1e-2)
        rank_major = jax.block_until_ready((jnp.moveaxis(u, 0, 2), jnp.moveaxis(v, 0, 2)))
        fns = {"factored": (jax.jit(factored), (*rank_major, kernel))}
        for tile in (int(t) for t in args.tiles.split(",")):
            fn = jax.jit(lambda u, v, w, tile=tile: tiled_products(u, v, w, tile))
            fns[f"tiles of {tile} rows"] = (fn, (u, v, dense))
        ref = fns["factored"][0](*fns["factored"][1])
        rates: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in fns if r % 2 == 0 else reversed(fns):
                fn, fn_args = fns[name]
                rates[name].append(_rate(fn, fn_args, batch, args.seconds))
        base = float(np.median(rates["factored"]))
        for name, (fn, fn_args) in fns.items():
            rel = float(jnp.max(jnp.abs(fn(*fn_args) - ref)) / jnp.max(jnp.abs(ref)))
            rate = float(np.median(rates[name]))
            print(f"batch {batch}: {name}: {rate:.1f} LoRAs/s ({rate / base:.2f}x factored), "
                  f"max relative difference {rel:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
