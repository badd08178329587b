"""The sharded path against the plain one, on ONE device, side by side in one run.

gllora always runs on a :mod:`gllora.parallel` mesh; with one device that path should
cost nothing over plain ``jax.device_put`` + ``jit``. This measures both on the same
data and programs, the methods alternating within each round so that a busy machine
slows them alike (the table gives the median over rounds):

- training step, batches from device memory: the plain path is the engine before
  meshes (``device_put`` of the split, a jitted gather, a ``jit`` without shardings);
  the sharded one is :class:`gllora.train.pipeline.Source` with ``out_shardings`` and
  :func:`gllora.train.steps.train_step` jitted onto the state's shardings, as the loop does;
- training step, batches streamed from disk (read, put, step), likewise;
- prediction of an evaluation batch (``eval_batch_size``);
- :func:`data_gen.common.run_chunked` against its loop without a mesh (numpy in, jitted
  vmapped chunk function, ``device_get`` out).

Virtual CPU devices share the same cores, so this measures overhead only, never a
speed-up.

    python benchmarks/bench_parallel.py [--model glnet --num 2000 --steps 40 --rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_gen import common, synthetic
from experiments.configs import default
from gllora import parallel
from gllora.io import dataset
from gllora.lora import split_seeds, take_examples
from gllora.train import loop, pipeline, tasks
from gllora.train import state as state_lib
from gllora.train import steps as steps_lib


def _plain_gather(layout):
    """The engine's gather before meshes: flat positions, no output sharding."""
    return jax.jit(lambda resident, pos: take_examples(resident, pos, layout))


def training_steps(args, path: str) -> dict[str, float]:
    """Seconds per training step of each method (median over rounds)."""
    config = default.get_config()
    config.dataset, config.model = path, args.model
    config.targets = ("log_norm", "alignment")
    ds = dataset.open(path)
    splits = loop.read_splits(ds)
    targets = tasks.resolve(ds, tuple(config.targets), splits["train"])
    labels = tasks.encode(ds, targets)
    seeds = [0, 1, 2][: config.num_seeds]
    S, B, ranks = len(seeds), config.batch_size, ds.max_ranks()
    mesh = parallel.make_mesh(1)
    setup = steps_lib.make_setup(config, targets, 1000)
    layout = setup.layout
    replicated = parallel.replicated(mesh)
    train = splits["train"]
    rows = parallel.local_slice(B, mesh)
    ysh, wsh = parallel.split_along(mesh, 3, 1), parallel.split_along(mesh, 2, 1)

    # Sharded: the engine as it is.
    sources = {
        "memory": pipeline.Source(ds, ranks, train, mesh, layout),
        "stream": pipeline.Source(ds, ranks, None, mesh, layout),
    }
    w_sharded = parallel.put(np.ones((S, B), np.float32), wsh)
    step_fn = functools.partial(steps_lib.train_step, setup)

    def sharded(kind):
        state, placed = state_lib.initial(config, ds, train, ranks, seeds, setup, mesh)
        train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(placed, replicated))

        def step(state, ids):
            y = parallel.host_to_global(labels[ids[:, rows]], ysh, (S, B, labels.shape[-1]))
            return train_step(state, sources[kind].read(ids), y, w_sharded)

        return state, step

    # Plain: the engine before meshes.
    plain_step = jax.jit(step_fn, donate_argnums=0)
    resident = jax.device_put(ds.batch(train, layout=layout, ranks=ranks))
    position = {int(i): p for p, i in enumerate(train)}
    gather = _plain_gather(layout)
    y_dev, w_dev = jnp.asarray(labels), jnp.ones((S, B), jnp.float32)

    def read_plain(kind, ids):
        if kind == "memory":
            pos = jnp.asarray([position[int(i)] for i in ids.reshape(-1)], jnp.int32)
            return split_seeds(gather(resident, pos), S, layout)
        host = ds.batch(ids.reshape(-1), layout=layout, ranks=ranks)
        return jax.device_put(split_seeds(host, S, layout))

    def plain(kind):
        state = jax.device_put(jax.device_get(sharded(kind)[0]))

        def step(state, ids):
            return plain_step(state, read_plain(kind, ids), y_dev[ids], w_dev)

        return state, step

    methods = {
        f"{path_} / {kind}": (make, kind)
        for kind in ("memory", "stream")
        for path_, make in (("plain", plain), ("sharded", sharded))
    }
    states, steps = {}, {}
    for name, (make, kind) in methods.items():
        states[name], steps[name] = make(kind)
    order = list(pipeline.step_indices(seeds, train, B, 0, args.steps + 1))
    for name in methods:  # compile
        states[name], loss = steps[name](states[name], order[0])
        jax.block_until_ready(loss)
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name in methods:
            start = time.perf_counter()
            for ids in order[1:]:
                states[name], loss = steps[name](states[name], ids)
            jax.block_until_ready((states[name], loss))
            times[name].append((time.perf_counter() - start) / args.steps)
    # The methods train the same model on the same batches: the same parameters.
    a = jax.device_get(states["plain / memory"]["params"])
    b = jax.device_get(states["sharded / memory"]["params"])
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

    # Prediction of one evaluation batch.
    params, consts = states["sharded / memory"]["params"], states["sharded / memory"]["consts"]
    eval_ids = train[: config.eval_batch_size]  # from the resident split
    predict_fn = functools.partial(steps_lib.predict, setup, layout=layout)
    plain_predict = jax.jit(predict_fn)
    sharded_predict = jax.jit(predict_fn, out_shardings=replicated)

    def read_eval_plain():
        pos = jnp.asarray([position[int(i)] for i in eval_ids], jnp.int32)
        return gather(resident, pos)

    pred = {
        "plain / predict": lambda: np.asarray(plain_predict(params, consts, read_eval_plain())),
        "sharded / predict": lambda: parallel.to_host(
            sharded_predict(params, consts, sources["memory"].read(eval_ids))
        ),
    }
    _ = [f() for f in pred.values()]
    for name in pred:
        times[name] = []
    for _ in range(args.rounds):
        for name, f in pred.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[name].append((time.perf_counter() - start) / args.steps)
    return {name: statistics.median(t) for name, t in times.items()}


@jax.jit
def _finetune_chunk(base, lr, x):
    """A stand-in for a data_gen chunk: 30 gradient steps of a per-item linear map."""

    def one(lr, x):
        def body(_, w):
            g = jax.grad(lambda w: jnp.sum((jnp.tanh(x @ w) - x) ** 2))(w)
            return w - lr * g

        return jax.lax.fori_loop(0, 30, body, base)

    return {"w": jax.vmap(one)(lr, x)}


def _run_chunked_plain(fn, per_item, chunk, shared):
    """run_chunked before meshes: numpy slices in, device_get out (no padding needed here)."""
    n = len(next(iter(per_item.values())))
    parts = []
    for c in range(0, n, chunk):
        items = {k: v[c : c + chunk] for k, v in per_item.items()}
        parts.append(jax.device_get(fn(*shared, **items)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def chunked(args) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n, chunk, d = 512, 64, 32
    items = {
        "lr": rng.uniform(1e-3, 1e-2, n).astype(np.float32),
        "x": rng.normal(size=(n, 16, d)).astype(np.float32),
    }
    base = (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
    mesh = parallel.make_mesh(1)
    methods = {
        "plain / run_chunked": lambda: _run_chunked_plain(_finetune_chunk, items, chunk, (base,)),
        "sharded / run_chunked": lambda: common.run_chunked(
            _finetune_chunk, items, chunk, shared=(base,), mesh=mesh
        )[0],
    }
    results = {name: f() for name, f in methods.items()}  # compile
    np.testing.assert_array_equal(
        results["plain / run_chunked"]["w"], results["sharded / run_chunked"]["w"]
    )
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, f in methods.items():
            start = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - start) / (n // chunk))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glnet")
    parser.add_argument("--num", type=int, default=2000, help="synthetic LoRAs")
    parser.add_argument("--steps", type=int, default=40, help="steps (calls) per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} device(s): {jax.devices()[0].device_kind}")
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        path = synthetic.write(os.path.join(tmp, "synthetic"), num=args.num, seed=0)
        times = training_steps(args, path)
    times.update(chunked(args))
    print(
        f"\nmodel {args.model}, default preset (3 seeds x batch 32); median of {args.rounds} rounds"
    )
    print("| what | plain (ms) | sharded (ms) | sharded / plain |")
    print("|---|---:|---:|---:|")
    labels = {
        "memory": "train step, batches in device memory",
        "stream": "train step, batches streamed from disk",
        "predict": "predict one eval batch (256)",
        "run_chunked": "data_gen chunk (64 LoRAs)",
    }
    for key, label in labels.items():
        a, b = times[f"plain / {key}"], times[f"sharded / {key}"]
        print(f"| {label} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
