"""MLP+Dense at the Qwen2-1.5B k/v LoRA shape: gllora against the authors' PyTorch recipe.

The authors' recipe (../shared/REFERENCE_NOTES.md; written here, not copied): the dense
products ``u_i v_i^T`` of the 56 modules (``u [256, 4]``, ``v [1536, 4]``), flattened,
then ``Linear -> LayerNorm -> Dropout(0.1) -> ReLU`` twice (hidden 16) and ``Linear(1)``:
352,321,905 parameters, 1.41 GB of them in the first layer. Batch 8, AdamW. The PyTorch
side computes the products in the timed call (one batched ``matmul``, the fast way to
write it; the authors' data loader does it per module).

gllora runs ``models.build("mlp_dense")`` (per-example model code, batched by ``vmap``)
two ways: the public API (``jax.vmap(model.apply, in_axes=(None, 0))`` on a leading
batch, ``jax.grad`` of the mean loss, ``optax.adamw``), and the engine's jitted train step
(``gllora.train.steps.train_step``: seeds x examples, the model's batch layout, donated
state). Every (side, phase) runs in its own process, so each peak resident memory
(``ru_maxrss``) is that phase's alone; rounds alternate the sides, since the machine is
shared. Also measured, in a process of its own: the read bandwidth (a sum over the
kernel, 1.41 GB) and a large matmul's FLOP/s, the two limits a step can meet.

PyTorch is not a dependency of gllora: point ``--torch_python`` at an interpreter that
has it (``pip install torch==2.13.0`` in a separate venv).

``--device=gpu`` runs both sides on the GPU (JAX's default device there, ``cuda`` for
PyTorch, synchronised after each call) and reports device memory instead of resident
memory: PyTorch's peak allocated since the phase began, JAX's peak in use since the
process began (JAX has no reset, so its figure includes building the model and its
state). Products are full float32 on both sides (the JAX children run with
``JAX_DEFAULT_MATMUL_PRECISION=highest``: a GPU may otherwise take TensorFloat-32 on the
JAX side only). On a machine whose ``python3`` holds both JAX and PyTorch:

    python -m benchmarks.bench_dense [--seconds 6] [--rounds 3] [--torch_python PYTHON]
    python3 -m benchmarks.bench_dense --device=gpu --torch_python=python3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np

B, K, N, M, R, H = 8, 56, 256, 1536, 4, 16
GB = 1e9
KERNEL_BYTES = K * N * M * H * 4
PRODUCTS_BYTES = B * K * N * M * 4  # one batch of dense products


def _factors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``u [B, K, N, R]``, ``v [B, K, M, R]``: LoRA entries of ~1e-2."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(B, K, N, R)).astype(np.float32) * 0.01
    v = rng.normal(size=(B, K, M, R)).astype(np.float32) * 0.01
    return u, v


def _rate(fn, seconds: float) -> float:
    """LoRAs/s of ``fn`` (one batch per call), after a warm-up call, over >= 3 calls; the
    phase's memory peak starts before the warm-up (compilation and first-call buffers)."""
    _reset_peak()
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 3:
        fn()
        calls += 1
    return B * calls / (time.perf_counter() - t0)


#: "cpu" or "gpu" (``--device``), set once per process before any measurement.
_DEVICE = ["cpu"]


def _reset_peak() -> None:
    """Starts the phase's peak afresh (Linux: ``5`` to ``clear_refs`` resets ``VmHWM`` to
    the current resident size), so set-up transients (a random initialiser) do not count;
    first drops what set-up left resident (arrays in reference cycles; freed memory that
    glibc keeps, ``malloc_trim``), on both sides alike. On the JAX side also the compiled
    set-up programs: XLA folds the random initialiser's counters into constants, so the
    init executable alone holds several GB while it is cached."""
    if _DEVICE[0] == "gpu":  # a child is one side: JAX's (no reset there) or PyTorch's
        if "jax" not in sys.modules:
            sys.modules["torch"].cuda.reset_peak_memory_stats()
        return
    _SETUP_PEAK[0] = _hwm_gb()  # ru_maxrss too: clear_refs resets both
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_SETUP_PEAK = [0.0]


def _hwm_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) * 1024 / GB


def _peaks() -> dict:
    """``peak_gb``: the most resident since :func:`_reset_peak` (everything resident counts:
    parameters, optimiser state, inputs, the runtime); ``setup_peak_gb``: before it
    (building the model and its state; ``ru_maxrss`` up to then)."""
    if _DEVICE[0] == "gpu":
        if "jax" not in sys.modules:
            return {"peak_gb": sys.modules["torch"].cuda.max_memory_allocated() / GB}
        stats = sys.modules["jax"].devices()[0].memory_stats() or {}
        return {"peak_gb": stats.get("peak_bytes_in_use", float("nan")) / GB}
    return {"peak_gb": _hwm_gb(), "setup_peak_gb": _SETUP_PEAK[0]}


# -- the authors' recipe in PyTorch ------------------------------------------------------


def torch_side(phase: str, seconds: float) -> dict:
    import torch

    torch.manual_seed(0)
    dev = "cuda" if _DEVICE[0] == "gpu" else "cpu"
    u, v = (torch.from_numpy(x).to(dev) for x in _factors())
    layers, width = [], K * N * M
    for _ in range(2):
        layers += [torch.nn.Linear(width, H), torch.nn.LayerNorm(H), torch.nn.Dropout(0.1)]
        layers.append(torch.nn.ReLU())
        width = H
    net = torch.nn.Sequential(*layers, torch.nn.Linear(H, 1)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    y = torch.zeros(B, 1, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else lambda: None

    def forward():
        return net(torch.matmul(u, v.transpose(-1, -2)).reshape(B, -1))

    def infer():
        net.eval()
        with torch.no_grad():
            forward()
        sync()

    def train():
        net.train()
        opt.zero_grad()
        torch.mean((forward() - y) ** 2).backward()
        opt.step()
        sync()

    rate = _rate(infer if phase == "infer" else train, seconds)
    return {"rate": rate, **_peaks(), "threads": torch.get_num_threads()}


# -- gllora ------------------------------------------------------------------------------


def _gllora_model(u: np.ndarray | None = None, v: np.ndarray | None = None):
    """``(model, variables, one LoRA, u, v)``: MLP+Dense built on the LoRAs ``u [B, K, N,
    R]``, ``v [B, K, M, R]`` (default :func:`_factors`), returned in the model's module
    order."""
    import jax

    from gllora import Lora, models

    if u is None or v is None:
        u, v = _factors()
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(K // 2) for p in ("k", "v")]
    one = Lora.from_factors({n: (u[0, i], v[0, i]) for i, n in enumerate(names)})
    model = models.build("mlp_dense", num_outputs=1)
    variables = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0), one))
    # The LoRAs in the model's module order (from_factors groups them by shape).
    order = [names.index(n) for n in one.spec.groups[0].names]
    return model, variables, one, u[:, order], v[:, order]


def gllora_public(phase: str, seconds: float) -> dict:
    """``jax.vmap(model.apply, in_axes=(None, 0))`` on a leading batch; grad; optax.adamw."""
    import jax
    import jax.numpy as jnp
    import optax

    model, variables, one, u, v = _gllora_model()
    batch = one.replace(
        u=(jax.device_put(u),), v=(jax.device_put(v),), rank=(jnp.full((B, K), R, jnp.int32),)
    )
    params = variables["params"]
    rest = {k: x for k, x in variables.items() if k != "params"}
    if phase == "infer":
        infer = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))
        full = {"params": params, **rest}
        rate = _rate(lambda: jax.block_until_ready(infer(full, batch)), seconds)
        return {"rate": rate, **_peaks()}
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    y = jnp.zeros((B, 1))

    def step(p, s, key):
        def loss_fn(p):
            out = jax.vmap(
                lambda x, k: model.apply({"params": p, **rest}, x, train=True, rngs={"dropout": k})
            )(batch, jax.random.split(key, B))
            return jnp.mean((out - y) ** 2)

        updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = {"p": params, "s": jax.block_until_ready(tx.init(params)), "i": 0}
    step = jax.jit(step, donate_argnums=(0, 1))

    def train():
        state["p"], state["s"] = step(state["p"], state["s"], jax.random.key(state["i"]))
        state["i"] += 1
        jax.block_until_ready(state["p"])

    del variables, params
    return {"rate": _rate(train, seconds), **_peaks()}


def gllora_engine(phase: str, seconds: float) -> dict:
    """The engine's jitted train step / prediction: one seed, the model's batch layout."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from gllora import models
    from gllora.lora import split_seeds, to_layout
    from gllora.train import steps, tasks

    model, variables, one, u, v = _gllora_model()
    del variables  # the engine initialises its own
    layout = models.layout("mlp_dense")
    setup = steps.Setup(
        model=model,
        tx=optax.adamw(1e-3, weight_decay=1e-2),
        targets=(tasks.Target("y", "regression", ("y",)),),
        layout=layout,
    )
    leading = one.replace(
        u=(jnp.asarray(u),), v=(jnp.asarray(v),), rank=(jnp.full((B, K), R, jnp.int32),)
    )
    batch = jax.device_put(to_layout(leading, "leading", layout))
    scales = (np.ones(2, np.float32),)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 1))
    templates = jax.tree_util.tree_map(lambda x: x[None], one)
    create = jax.jit(functools.partial(steps.create_train_state, setup))
    state = jax.block_until_ready(create(keys, templates, scales))
    if phase == "infer":
        predict = jax.jit(functools.partial(steps.predict, setup, layout=layout))
        p, c = state["params"], state["consts"]
        del state
        rate = _rate(lambda: jax.block_until_ready(predict(p, c, batch)), seconds)
        return {"rate": rate, **_peaks(), "layout": layout}
    seeded = split_seeds(batch, 1, layout)
    y, w = jnp.zeros((1, B, 1)), jnp.ones((1, B))
    step = jax.jit(functools.partial(steps.train_step, setup), donate_argnums=0)
    box = [state]

    def train():
        box[0], loss = step(box[0], seeded, y, w)
        jax.block_until_ready(loss)

    del state
    return {"rate": _rate(train, seconds), **_peaks(), "layout": layout}


def machine(seconds: float) -> dict:
    """Read bandwidth over a kernel-sized buffer and a 2048^2 matmul's FLOP/s."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args):
        jax.block_until_ready(fn(*args))
        out, t0 = float("inf"), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out = min(out, time.perf_counter() - t)
        return out

    # A reduction: writing a fresh output each call would time page faults, not reads.
    big = jnp.ones((KERNEL_BYTES // 4,), jnp.float32)
    read = KERNEL_BYTES / best(jax.jit(jnp.sum), big)
    del big
    a = jnp.ones((2048, 2048), jnp.float32)
    flops = 2 * 2048**3 / best(jax.jit(lambda x: x @ x), a)
    return {"read_gb_s": read / GB, "matmul_gflop_s": flops / 1e9}


CHILDREN = {
    "torch": torch_side,
    "gllora_public": gllora_public,
    "gllora_engine": gllora_engine,
}
LABELS = {
    "torch": "authors' recipe (PyTorch)",
    "gllora_public": "gllora, public API",
    "gllora_engine": "gllora, engine step",
}


def _child(args, name: str, phase: str) -> dict:
    python = args.torch_python if name == "torch" else sys.executable
    cmd = [python, "-m", "benchmarks.bench_dense", f"--only={name}:{phase}"]
    cmd += [f"--seconds={args.seconds}", f"--device={args.device}"]
    # On a GPU, full float32 products on both sides: PyTorch's default for float32
    # matmuls; JAX's default there may take TensorFloat-32 (not like with like). The CPU
    # runs keep JAX's default, which the figures in BUILD_NOTES.md were measured with.
    env = None
    if args.device == "gpu":
        env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch_python", default=sys.executable)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _DEVICE[0] = args.device
    if args.only:  # a child process: one JSON line
        name, phase = args.only.split(":")
        fn = machine if name == "machine" else CHILDREN[name]
        out = fn(args.seconds) if name == "machine" else fn(phase, args.seconds)
        print(json.dumps(out))
        return
    check = subprocess.run(
        [args.torch_python, "-c", "import torch"], check=False, capture_output=True
    )
    if check.returncode != 0:
        raise SystemExit(
            f"{args.torch_python} cannot import torch: install it in a separate venv "
            "(pip install torch==2.13.0) and pass --torch_python=that/venv/bin/python"
        )
    limits = _child(args, "machine", "-")
    results = {(n, p): [] for n in CHILDREN for p in ("infer", "train")}
    for r in range(args.rounds):  # alternate, so a change in load hits every side alike
        for phase in ("infer", "train"):
            for name in CHILDREN:
                out = _child(args, name, phase)
                results[(name, phase)].append(out)
                print(f"round {r + 1} {phase:5s} {LABELS[name]:26s} {out['rate']:7.2f} LoRAs/s, "
                      f"peak {out['peak_gb']:.2f} GB", flush=True)  # fmt: skip
    report(results, limits)


def report(results: dict, limits: dict) -> None:
    med = lambda name, phase, key: float(np.median([o[key] for o in results[(name, phase)]]))
    print(f"\nmachine: read {limits['read_gb_s']:.1f} GB/s (sum over {KERNEL_BYTES / GB:.2f} GB), "
          f"matmul {limits['matmul_gflop_s']:.0f} GFLOP/s (2048^2)")  # fmt: skip
    print(f"batch {B}; medians of {len(results[('torch', 'infer')])} alternating rounds\n")
    print(f"| | {' | '.join(LABELS.values())} | public / torch | engine / torch |")
    print("|---|" + "---:|" * (len(CHILDREN) + 2))
    for phase, label in (("infer", "inference (LoRAs/s)"), ("train", "train step (LoRAs/s)")):
        rates = [med(n, phase, "rate") for n in CHILDREN]
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in rates)
              + f" | {rates[1] / rates[0]:.2f}x | {rates[2] / rates[0]:.2f}x |")  # fmt: skip
    for phase in ("infer", "train"):
        peaks = [med(n, phase, "peak_gb") for n in CHILDREN]
        kind = "device memory" if _DEVICE[0] == "gpu" else "memory"
        print(f"| peak {kind}, {phase} (GB) | " + " | ".join(f"{x:.2f}" for x in peaks)
              + f" | {peaks[1] / peaks[0]:.2f}x | {peaks[2] / peaks[0]:.2f}x |")  # fmt: skip
    # What a step must hold: the model's state, and one batch of products for comparison.
    params = KERNEL_BYTES / GB  # the first layer; the rest is ~1 KB
    bound = 4 * params + PRODUCTS_BYTES / GB
    print(f"\nparameters {params:.2f} GB; + gradients + AdamW moments = {4 * params:.2f} GB; "
          f"+ one batch of products ({PRODUCTS_BYTES / GB:.2f} GB) = {bound:.2f} GB")  # fmt: skip
    print(f"gllora training peak over parameters + gradients + moments: public API "
          f"+{med('gllora_public', 'train', 'peak_gb') - 4 * params:.2f} GB, engine "
          f"+{med('gllora_engine', 'train', 'peak_gb') - 4 * params:.2f} GB (its state also "
          f"keeps a best-epoch copy of the parameters, {params:.2f} GB)")  # fmt: skip
    read_s = KERNEL_BYTES / (limits["read_gb_s"] * GB)
    gemm = 2 * B * R * K * N * M * H  # the factored first layer: one GEMM over B*r columns
    gemm_s = gemm / (limits["matmul_gflop_s"] * 1e9)
    print(f"inference limits per batch: reading the kernel {read_s * 1e3:.0f} ms "
          f"(-> {B / read_s:.0f} LoRAs/s); the first layer's GEMM, {gemm / 1e9:.1f} GFLOP, "
          f"{gemm_s * 1e3:.0f} ms at the matmul rate (-> {B / gemm_s:.0f} LoRAs/s); measured "
          f"{B / med('gllora_public', 'infer', 'rate') * 1e3:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
