"""MLP+Dense's first layer: the factored GEMM gllora uses against the dense products.

Issue 17's open question. The first layer is ``h = sum_k vec(a_k b_k^T) @ W_k`` at the
Qwen2-1.5B k/v shape (56 modules, ``W_k [I * J, 16]``), in the model's own orientation:
``a = v [I = 1536, 4]``, the longer side, which the factored GEMM contracts, and
``b = u [J = 256, 4]`` (:class:`gllora.models.mlp.MLPDense` stores the kernel
``[k, J h, I]``). Ways to compute it for a batch of ``B`` LoRAs:

- factored (:func:`gllora.product_dense.product_dense`, what the model runs, on the
  rank-major batch the engine feeds it): ``T = W^T a`` per module, ``2 B r I J h``
  FLOPs: 22.5 GFLOP per batch of 8;
- the products of one module at a time (a prototype here, not in the library), then one
  ``[B, I J] @ [I J, h]`` GEMM per module, in ``lax.scan``: ``2 B I J (r + h)`` FLOPs,
  ``r h / (r + h) = 3.2`` times fewer, the kernel read once per batch;
- the products in row tiles of ``a`` (``[B, T, J]``, small enough to stay in cache),
  each tile contracted with its slice of the kernel;
- the products laid out ``[k, J, B, I]`` and contracted with the model's own kernel
  ``[k, J, h, I]`` as a batched dot over ``(k, J)``: ``k J`` small GEMMs
  ``[B, I] @ [I, h]``, each reading one 98 KB slab of the kernel once, no copy of it.

Beside them, the whole model (``jax.vmap(model.apply)`` of ``models.build("mlp_dense")``,
as ``benchmarks/bench_dense.py`` times it) on the same LoRAs, to show how much of its
time the first layer is.

The module and tile routes need the kernel in the dense ``[k, I J, h]`` layout
(:func:`gllora.product_dense.as_dense_kernel`), not the model's. Each route is compiled
twice: as XLA compiles it by default (jax 0.10.2 hands dots and some fusions to
YNNPACK), and with YNNPACK's fusions off (the compile option
``xla_cpu_experimental_ynn_fusion_type=""``, which sends dots to XLA's Eigen path).

Prints LoRAs per second of each (jitted, alternating round after round in one process)
at each batch size, the ratio to the factored GEMM, and the largest relative difference
of the outputs (float32 sums in another order: ~1e-6 relative to the largest output).

``--skinny`` measures instead the product route's bound on its own: the contraction of
a batch's products with the kernel, ``[B, I J] @ [I J, h]`` per module (``B = 8``,
``h = 16``, ``I J = 393,216``), which reads each kernel entry once and does ``2 B = 16``
FLOPs per 4-byte entry, so it should run at the machine's read bandwidth. Each way to
write it (jitted, both compilations; and numpy's BLAS) is timed on 8 modules (200 MB,
past the cache) beside a plain jitted sum over the same kernel, and printed as GB/s of
kernel read and the LoRAs/s that rate would give at 56 modules, products excluded.

    python -m benchmarks.bench_dense_tiles [--batches 8,32] [--tiles 32] [--rounds 2]
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

K, I, J, R, H = 56, 1536, 256, 4, 16

#: The compile options of each compilation: XLA's default, and YNNPACK's fusions off.
COMPILATIONS = {"": {}, ", YNNPACK off": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def factored(a: jax.Array, b: jax.Array, kernel: jax.Array) -> jax.Array:
    """``a [K, I, B, R]``, ``b [K, J, B, R]`` (rank-major, the layout the engine feeds
    MLP+Dense, where the batched GEMM needs no transpose), ``kernel [K, J H, I]`` ->
    ``[B, H]``."""
    return jax.vmap(product_dense.product_dense, in_axes=(2, 2, None))(a, b, kernel)


def module_products(a: jax.Array, b: jax.Array, dense: jax.Array) -> jax.Array:
    """The same sum from one module's products at a time: ``a [K, B, I, R]``,
    ``b [K, B, J, R]``, ``dense [K, I J, H]``."""
    batch = a.shape[1]

    def step(total, args):
        a_k, b_k, w_k = args
        p = jnp.einsum("bir,bjr->bij", a_k, b_k).reshape(batch, I * J)
        return total + p @ w_k, None

    return lax.scan(step, jnp.zeros((batch, H), dense.dtype), (a, b, dense))[0]


def tiled_products(a: jax.Array, b: jax.Array, dense: jax.Array, tile: int) -> jax.Array:
    """The same sum from products formed ``tile`` rows of ``a`` at a time (layouts as
    :func:`module_products`)."""
    batch = a.shape[1]
    # [K, I / tile, B, tile, R]: one module's tiles in turn, each with the whole batch.
    a_tiles = a.reshape(K, batch, I // tile, tile, R).swapaxes(1, 2)
    kernel_tiles = dense.reshape(K, I // tile, tile * J, H)

    def module(args):
        a_k, b_k, w_k = args  # [I / tile, B, tile, R], [B, J, R], [I / tile, tile J, H]

        def one_tile(tile_args):
            a_t, w_t = tile_args
            p = jnp.einsum("bir,bjr->bij", a_t, b_k).reshape(batch, -1)  # [B, tile J]
            return p @ w_t

        return lax.map(one_tile, (a_k, w_k)).sum(0)

    return lax.map(module, (a_tiles, b, kernel_tiles)).sum(0)


def slab_products(a: jax.Array, b: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same sum as a batched dot over ``(k, J)`` on the model's kernel layout:
    ``a [K, I, B, R]``, ``b [K, J, B, R]`` (rank-major), ``kernel [K, J H, I]``."""
    p = jnp.einsum("kjbr,kibr->kjbi", b, a)  # [K, J, B, I]
    w = kernel.reshape(K, J, H, I)
    return lax.dot_general(p, w, (((3,), (3,)), ((0, 1), (0, 1)))).sum((0, 1))


def whole_model(a: np.ndarray, b: np.ndarray):
    """``(apply, args)``: MLP+Dense's inference on the LoRAs ``u = b``, ``v = a``
    (``a [K, B, I, R]``, ``b [K, B, J, R]``), through the public API, built as
    ``benchmarks/bench_dense.py`` builds it."""
    from benchmarks import bench_dense

    u, v = np.swapaxes(b, 0, 1), np.swapaxes(a, 0, 1)  # [B, K, rows, R]
    model, variables, one, u, v = bench_dense._gllora_model(u, v)
    rank = jnp.full(u.shape[:2], R, jnp.int32)
    lora = one.replace(u=(jnp.asarray(u),), v=(jnp.asarray(v),), rank=(rank,))
    return jax.vmap(model.apply, in_axes=(None, 0)), (variables, lora)


def _compiled(fn, args, options: dict):
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


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
    on_device = {id(x): jnp.asarray(x) for x in (p, w, w_t, p_t)}  # each array copied once
    for suffix, options in COMPILATIONS.items():
        for name, (fn, args) in ways.items():
            args = [on_device[id(x)] for x in args]
            compiled = _compiled(fn, args, options)
            _report_skinny(name + suffix, compiled, args, seconds, w.nbytes, batch)

    def blas(p, w):
        return [p[m] @ w[m] for m in range(modules)]

    _report_skinny("numpy (BLAS) [B, IJ] @ [IJ, h]", blas, (p, w), seconds, w.nbytes, batch)


def _report_skinny(name: str, fn, args, seconds: float, kernel_bytes: int, batch: int) -> None:
    dt = 1 / _rate(fn, args, 1, seconds)  # seconds per call
    modules = kernel_bytes // (I * J * H * 4)
    rate = batch / (dt * K / modules)  # LoRAs/s at K modules
    print(f"{name:48s} {dt * 1e3:7.1f} ms for {modules} modules: {kernel_bytes / dt / 1e9:5.1f} "
          f"GB/s of kernel, {rate:6.1f} LoRAs/s at {K} modules", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--tiles", default="32")
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
        a = rng.normal(size=(K, batch, I, R)).astype(np.float32) * 1e-2
        b = rng.normal(size=(K, batch, J, R)).astype(np.float32) * 1e-2
        leading = (jnp.asarray(a), jnp.asarray(b))
        rank_major = (jnp.asarray(a.transpose(0, 2, 1, 3)), jnp.asarray(b.transpose(0, 2, 1, 3)))
        routes = {"factored": (factored, (*rank_major, kernel))}
        routes["slabs of the model's kernel"] = (slab_products, (*rank_major, kernel))
        routes["one module's products at a time"] = (module_products, (*leading, dense))
        for tile in (int(t) for t in args.tiles.split(",")):
            fn = lambda a, b, w, tile=tile: tiled_products(a, b, w, tile)  # noqa: E731
            routes[f"tiles of {tile} rows"] = (fn, (*leading, dense))
        fns = {
            name + suffix: (_compiled(fn, fn_args, options), fn_args)
            for name, (fn, fn_args) in routes.items()
            for suffix, options in COMPILATIONS.items()
        }
        model_fn, model_args = whole_model(a, b)
        fns["whole model (public API)"] = (_compiled(model_fn, model_args, {}), model_args)
        ref = fns["factored"][0](*fns["factored"][1])
        rates: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in fns if r % 2 == 0 else reversed(fns):
                fn, fn_args = fns[name]
                rates[name].append(_rate(fn, fn_args, batch, args.seconds))
        base = float(np.median(rates["factored"]))
        for name, (fn, fn_args) in fns.items():
            rate = float(np.median(rates[name]))
            line = f"batch {batch}: {name}: {rate:.1f} LoRAs/s ({rate / base:.2f}x factored)"
            if not name.startswith("whole model"):  # its own kernel: outputs differ
                rel = float(jnp.max(jnp.abs(fn(*fn_args) - ref)) / jnp.max(jnp.abs(ref)))
                line += f", max relative difference {rel:.1e}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
