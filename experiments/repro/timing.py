"""Figure 5: preprocessing and forward time and peak memory of every model at the shapes
of the GPT-3 family (one rank-4 LoRA on one ``[d, d]`` attention matrix per layer).

Each (size, model) is measured in its own process (``python -m
experiments.repro.timing --gpt3=13B --model=glnet``), pinned to one CPU core (see
:mod:`experiments.repro.workers`) and capped at ``--cap_gb`` of memory above what
the interpreter and JAX hold after start-up (``RLIMIT_DATA``). Before allocating, the
worker sizes the model's parameters with ``jax.eval_shape`` and the inputs and
features by arithmetic; a measurement that cannot fit under the cap (even with a
forward batch of 1) is recorded as out of memory with the estimate, and one that fails
on allocation anyway is recorded the same way.

- preprocessing: the featurisation of 64 inputs that the paper runs before its MLPs
  (O-Align: Procrustes to a template; SVD: singular values from thin QRs; Dense: the
  products ``u v^T``); none for the MLP on raw factors and for GL-net;
- forward: 512 inputs through the model in batches of up to 64 (smaller where the
  memory cap requires). gllora's models featurise inside their forward, so the
  forward time includes the featurisation;
- memory: the peak resident memory of each phase above the start-up baseline.

Times exclude compilation (one warm-up call first); the hyperparameters are the model
classes' defaults (the authors' widths).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

#: GPT-3 family (Brown et al. 2020, Table 2.1): name -> (layers, d_model).
GPT3 = {
    "125M": (12, 768),
    "350M": (24, 1024),
    "760M": (24, 1536),
    "1.3B": (24, 2048),
    "2.7B": (32, 2560),
    "6.7B": (32, 4096),
    "13B": (40, 5140),
    "175B": (96, 12288),
}
GPT3_PARAMS = {
    "125M": 125e6, "350M": 350e6, "760M": 760e6, "1.3B": 1.3e9,
    "2.7B": 2.7e9, "6.7B": 6.7e9, "13B": 13e9, "175B": 175e9,
}  # fmt: skip
RANK = 4
MB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Resets VmHWM (Linux: ``5`` to ``clear_refs``), so each phase has its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def plan(model: str, layers: int, d: int, cap: float, inputs: int, batch: int, hparams):
    """Memory estimates (bytes) and the largest batches that fit under ``cap`` bytes."""
    import jax

    from gllora import Lora, models
    from gllora.lora import GroupSpec, LoraSpec

    names = tuple(f"layers.{i}.attn" for i in range(layers))
    spec = LoraSpec(names, (GroupSpec(names, d, d),))
    one = Lora(
        spec,
        [jax.ShapeDtypeStruct((layers, d, RANK), "float32")],
        [jax.ShapeDtypeStruct((layers, d, RANK), "float32")],
        [jax.ShapeDtypeStruct((layers,), "int32")],
    )
    net = models.build(model, num_outputs=1, **hparams)
    shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), one)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
    lora_bytes = 2 * layers * d * RANK * 4
    per_example = layers * d * d * 4 if model == "mlp_dense" else 4 * lora_bytes
    fixed = inputs * lora_bytes + params
    fits = lambda b: fixed + 2 * b * per_example <= cap
    forward = max((b for b in (64, 32, 16, 8, 4, 2, 1) if b <= batch and fits(b)), default=0)
    pre = max((b for b in (64, 32, 16, 8, 4, 2, 1) if b <= inputs and fits(b)), default=0)
    return {
        "params_mb": params / MB,
        "inputs_mb": inputs * lora_bytes / MB,
        "per_example_mb": per_example / MB,
        "forward_batch": forward,
        "preprocess_chunk": pre,
    }


def _variables(net, one):
    """The model's variables without running its initialisers: parameters set to a
    constant (time does not depend on their values, and random initialisers need
    several times the parameters' memory), O-Align's template set to ``one`` (as in
    training, a LoRA of the inputs)."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), one)

    def fill(path, leaf):
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys[0] == "template":
            return (one.u if keys[-1].startswith("u_") else one.v)[0]
        if keys[0] == "params":
            return jnp.full(leaf.shape, 0.01, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def measure(model: str, name: str, cap_gb: float, pre_n: int, fwd_n: int, batch: int) -> dict:
    """Measures one model at one GPT-3 size (call in a fresh process)."""
    import jax
    import jax.numpy as jnp

    from gllora import Lora, features, models
    from gllora.lora import GroupSpec, LoraSpec

    layers, d = GPT3[name]
    out = {"model": model, "gpt3": name, "layers": layers, "d": d, "cap_gb": cap_gb}
    jax.numpy.zeros(1).block_until_ready()  # start the runtime before the baseline
    base_data = _status_kb("VmData") * 1024
    out["baseline_mb"] = _status_kb("VmRSS") / 1024
    cap = int(cap_gb * (1 << 30))
    if hasattr(resource, "RLIMIT_DATA"):
        resource.setrlimit(resource.RLIMIT_DATA, (base_data + cap, resource.RLIM_INFINITY))
    est = plan(model, layers, d, cap, pre_n, batch, {})
    out["estimate"] = est
    if est["forward_batch"] == 0:
        need = (est["params_mb"] + est["inputs_mb"] + 2 * est["per_example_mb"]) / 1024
        return {**out, "status": "oom", "reason": f"needs >= {need:.1f} GB (cap {cap_gb} GB)"}
    names = tuple(f"layers.{i}.attn" for i in range(layers))
    spec = LoraSpec(names, (GroupSpec(names, d, d),))
    ku, kv = jax.random.split(jax.random.key(0))
    u = 0.01 * jax.random.normal(ku, (pre_n, layers, d, RANK), jnp.float32)
    v = 0.01 * jax.random.normal(kv, (pre_n, layers, d, RANK), jnp.float32)
    rank = jnp.full((pre_n, layers), RANK, jnp.int32)
    jax.block_until_ready((u, v))

    def take(x, i, size):
        return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)

    def timed(fn, calls):
        jax.block_until_ready(fn(0))  # compile and warm up
        start = time.perf_counter()
        for c in range(calls):
            jax.block_until_ready(fn(c))
        return time.perf_counter() - start

    featurize = {
        "mlp_oalign": lambda uu, vv: features.oalign(uu, vv, uu[0], vv[0]),
        "mlp_svd": lambda uu, vv: features.singular_values(uu, vv),
        "mlp_dense": lambda uu, vv: features.dense(uu, vv),
    }.get(model)
    _reset_peak()
    if featurize is None:
        out["preprocess_s"], out["preprocess_peak_mb"] = 0.0, 0.0
    else:
        # Inputs are arguments (never closed over: a closed-over array is copied into
        # the executable); each call featurises one chunk and materialises its output.
        chunk = est["preprocess_chunk"]
        step = jax.jit(lambda uu, vv, i: featurize(take(uu, i, chunk), take(vv, i, chunk)))
        pre_calls = pre_n // chunk
        out["preprocess_s"] = timed(lambda c: step(u, v, jnp.int32(c % pre_calls)), pre_calls)
        out["preprocess_chunk"] = chunk
        out["preprocess_peak_mb"] = _peak_mb() - out["baseline_mb"]
    _reset_peak()
    net = models.build(model, num_outputs=1)
    variables = _variables(net, Lora(spec, [u[0]], [v[0]], [rank[0]]))
    fb = est["forward_batch"]

    def forward(var, uu, vv, rr, i):
        batch = Lora(spec, [take(uu, i, fb)], [take(vv, i, fb)], [take(rr, i, fb)])
        return jax.vmap(lambda x: net.apply(var, x))(batch)

    apply = jax.jit(forward)
    calls, per_input = fwd_n // fb, pre_n // fb
    out["forward_s"] = timed(
        lambda c: apply(variables, u, v, rank, jnp.int32(c % per_input)), calls
    )
    out["forward_batch"] = fb
    out["forward_peak_mb"] = _peak_mb() - out["baseline_mb"]
    return {**out, "status": "ok"}


def run_all(size, out: str, cores: list[int], log, models, timeout_s: float = 1800) -> list[dict]:
    """Measures every (GPT-3 size, model) of a reproduction, ``len(cores)`` at a time,
    each process pinned to one core; finished measurements (``out/figure5/*.json``)
    with the same settings are reused."""
    import concurrent.futures as cf
    import queue
    import subprocess

    folder = os.path.join(out, "figure5")
    os.makedirs(folder, exist_ok=True)
    settings = {
        "preprocess": size.preprocess_inputs,
        "forward": size.forward_inputs,
        "batch": size.forward_batch,
        "cap_gb": size.memory_cap_gb,
    }
    free: queue.Queue = queue.Queue()
    for core in cores or [None]:
        free.put(core)

    def one(name: str, model: str) -> dict:
        path = os.path.join(folder, f"{name}_{model}.json")
        if os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("settings") == settings:
                log.record("figure5", f"figure5/{name}_{model}", "", 0.0, "reused")
                return cached
        args = [sys.executable, "-m", "experiments.repro.timing", f"--model={model}"]
        args += [f"--gpt3={name}"] + [f"--{k}={v}" for k, v in settings.items()]
        core = free.get()
        if core is not None:  # the child pins itself: a preexec_fn would fork this JAX process
            args.append(f"--core={core}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                args, check=False, capture_output=True, text=True, timeout=timeout_s
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][len("RESULT ") :])
            else:  # killed: on allocation, XLA may abort instead of raising
                tail = proc.stderr[-400:]
                oom = proc.returncode < 0 or "memory" in tail.lower()
                result = {"status": "oom" if oom else "error", "reason": tail}
        except subprocess.TimeoutExpired:
            result = {"status": "timeout", "reason": f"over {timeout_s:.0f} s"}
        finally:
            free.put(core)
        result.update(model=model, gpt3=name, settings=settings)
        result["wall_s"] = time.perf_counter() - start
        shown_cmd = "python " + " ".join(args[1:])
        log.record("figure5", f"figure5/{name}_{model}", shown_cmd, result["wall_s"], "measured")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        shown = f"forward {result['forward_s']:.2f} s" if result["status"] == "ok" else ""
        log.say(f"  figure 5 {name} {model}: {result['status']} {shown}")
        return result

    pairs = [(name, model) for name in size.gpt3 for model in models]
    with cf.ThreadPoolExecutor(max(1, len(cores))) as pool:
        return list(pool.map(lambda p: one(*p), pairs))


def main(argv: list[str]) -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
    if "core" in args and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(args["core"])})  # before JAX starts its threads
    try:
        result = measure(
            args["model"],
            args["gpt3"],
            float(args.get("cap_gb", 6)),
            int(args.get("preprocess", 64)),
            int(args.get("forward", 512)),
            int(args.get("batch", 64)),
        )
    except MemoryError as e:
        result = {"status": "oom", "reason": f"MemoryError: {e}"}
    except Exception as e:  # XLA reports allocation failures as RESOURCE_EXHAUSTED
        text = f"{type(e).__name__}: {e}"
        oom = "RESOURCE_EXHAUSTED" in text or "memory" in text.lower()
        result = {"status": "oom" if oom else "error", "reason": text[:500]}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv)
