"""Figure 5: preprocessing and forward time and peak memory of every model at the shapes
of the GPT-3 family (one rank-4 LoRA on one ``[d, d]`` attention matrix per layer).

Each (size, model) is measured in its own process (``python -m
experiments.repro.timing --gpt3=13B --model=glnet``), pinned to one CPU core (see
:mod:`experiments.repro.workers`) and capped at ``--cap_gb`` of memory above what
the interpreter and JAX hold after start-up (``RLIMIT_DATA``). Before allocating, the
worker compiles each phase's program from abstract shapes and reads what it will hold
from XLA's buffer assignment (:func:`plan`); a phase that cannot fit under the cap
even with a batch of 1 is not run.

- preprocessing: the featurisation of 64 inputs that the paper runs before its MLPs
  (O-Align: Procrustes to a template; SVD: singular values from thin QRs; Dense: the
  products ``u v^T``); none for the MLP on raw factors and for GL-net;
- forward: 512 inputs through the model in batches of up to 64 (smaller where the
  memory cap requires). gllora's models featurise inside their forward, so the
  forward time includes the featurisation;
- memory: the peak resident memory of each phase above the start-up baseline.

Each record has a ``status``: ``"ok"``; ``"oom"``, a measured or planned out of memory,
with ``oom_kind`` ``"planned"`` (the compiled programs do not fit under the cap; see
``plan``), ``"allocation"`` (an allocation failed: MemoryError, XLA's
``RESOURCE_EXHAUSTED``) or ``"killed"`` (SIGKILL, as the OOM killer sends);
``"error"``, any other failure; ``"timeout"``. Failures carry ``error_type``, ``error``
(the message), ``reason`` (one line) and ``stderr_tail`` (the process's stderr).

Times exclude compilation (one warm-up call first); the hyperparameters are the model
classes' defaults (the authors' widths).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
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
#: Bumped when what a record means changes, so that stale records are measured again.
VERSION = 2


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Resets VmHWM (Linux: ``5`` to ``clear_refs``), so each phase has its own peak.

    First drops what the previous phase left resident: arrays in reference cycles
    (``gc``) and freed memory the C allocator keeps (``malloc_trim``; XLA's CPU runtime
    frees many buffers below glibc's mmap threshold, hundreds of MB after a big phase).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


#: Buffers that XLA's buffer assignment does not see: the CPU runtime's GEMM libraries
#: (Eigen, YNNPACK) pack operand blocks into scratch of their own. Measured on this
#: machine (jaxlib 0.10.2) as the peak above the compiled program's buffers: see
#: BUILD_NOTES.md, "Figure 5's memory plan".
SCRATCH_FRACTION, SCRATCH_MB = 0.10, 256
BATCHES = (64, 32, 16, 8, 4, 2, 1)


def _abstract(model: str, layers: int, d: int, count: int):
    """``(net, spec, abstract variables, abstract u, v, rank of count inputs)``."""
    import jax

    from gllora import Lora, models
    from gllora.lora import GroupSpec, LoraSpec

    names = tuple(f"layers.{i}.attn" for i in range(layers))
    spec = LoraSpec(names, (GroupSpec(names, d, d),))
    factor = jax.ShapeDtypeStruct((layers, d, RANK), "float32")
    one = Lora(spec, [factor], [factor], [jax.ShapeDtypeStruct((layers,), "int32")])
    net = models.build(model, num_outputs=1)
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), one)
    u = jax.ShapeDtypeStruct((count, layers, d, RANK), "float32")
    rank = jax.ShapeDtypeStruct((count, layers), "int32")
    return net, spec, variables, u, u, rank


def _take(x, i, size: int):
    import jax

    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)


def _forward_program(net, spec, size: int):
    """Applies the model to inputs ``[i * size, (i + 1) * size)`` of ``u, v, rank``."""
    import jax

    from gllora import Lora

    def forward(var, uu, vv, rr, i):
        batch = Lora(spec, [_take(uu, i, size)], [_take(vv, i, size)], [_take(rr, i, size)])
        return jax.vmap(lambda x: net.apply(var, x))(batch)

    return jax.jit(forward)


def _preprocess_program(model: str, size: int):
    """The featurisation the paper runs before its MLPs, on one chunk (None: no such step)."""
    import jax

    from gllora import features

    featurize = {
        "mlp_oalign": lambda uu, vv: features.oalign(uu, vv, uu[0], vv[0]),
        "mlp_svd": lambda uu, vv: features.singular_values(uu, vv),
        "mlp_dense": lambda uu, vv: features.dense(uu, vv),
    }.get(model)
    if featurize is None:
        return None
    # Inputs are arguments (never closed over: a closed-over array is copied into the
    # executable); each call featurises one chunk and materialises its output.
    return jax.jit(lambda uu, vv, i: featurize(_take(uu, i, size), _take(vv, i, size)))


def _needed(compiled) -> int:
    """Bytes a compiled program holds while it runs: XLA's own buffer assignment
    (arguments, outputs, temporaries) plus the libraries' scratch (``SCRATCH_*``)."""
    m = compiled.memory_analysis()
    held = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    held -= m.alias_size_in_bytes
    return int(held * (1 + SCRATCH_FRACTION) + SCRATCH_MB * MB)


def _plan(model: str, layers: int, d: int, cap: float, inputs: int, batch: int, hparams):
    """:func:`plan`, and the compiled programs it chose (``None`` where nothing fits)."""
    import jax

    net, spec, variables, u, v, rank = _abstract(model, layers, d, inputs)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(variables))
    lora_bytes = 2 * layers * d * RANK * 4
    out = {"params_mb": params / MB, "inputs_mb": inputs * lora_bytes / MB, "cap_mb": cap / MB}
    programs = {}
    i = jax.ShapeDtypeStruct((), "int32")
    phases = {
        "forward": (batch, lambda b: _forward_program(net, spec, b), (variables, u, v, rank, i)),
        "preprocess": (inputs, lambda b: _preprocess_program(model, b), (u, v, i)),
    }
    held = {"forward": params + inputs * lora_bytes, "preprocess": inputs * lora_bytes}
    for phase, (most, make, args) in phases.items():
        key = "forward_batch" if phase == "forward" else "preprocess_chunk"
        out[key], programs[phase] = 0, None
        if make(1) is None:  # no preprocessing for this model
            out[key] = most
            continue
        if held[phase] > cap:  # not even the arguments fit: do not compile
            out[f"{phase}_planned_mb"] = held[phase] / MB
            continue
        for b in (b for b in BATCHES if b <= most and inputs % b == 0):
            compiled = make(b).lower(*args).compile()
            out[f"{phase}_planned_mb"] = _needed(compiled) / MB
            if _needed(compiled) <= cap:
                out[key], programs[phase] = b, compiled
                break
    return out, programs


def plan(model: str, layers: int, d: int, cap: float, inputs: int, batch: int, hparams):
    """The memory each phase of :func:`measure` needs and the largest batches that fit.

    Read from the compiled programs themselves (``memory_analysis``: every buffer XLA
    assigns, with ``SCRATCH_*`` for the GEMM libraries' own), never from a formula of
    the model: a program that does not fit under ``cap`` bytes is not run. Returns
    ``params_mb``, ``inputs_mb``, ``cap_mb``; ``forward_batch`` and
    ``preprocess_chunk`` (0: nothing fits) with ``forward_planned_mb`` and
    ``preprocess_planned_mb`` (the need at that size, or at 1 where nothing fits).
    """
    return _plan(model, layers, d, cap, inputs, batch, hparams)[0]


def _variables(variables, one):
    """Concrete variables of the shapes ``variables`` without running the initialisers:
    parameters set to a constant (time does not depend on their values, and random
    initialisers need several times the parameters' memory), O-Align's template set to
    ``one`` (as in training, a LoRA of the inputs)."""
    import jax
    import jax.numpy as jnp

    def fill(path, leaf):
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys[0] == "template":
            return (one[0] if keys[-1].startswith("u_") else one[1])[0]
        if keys[0] == "params":
            return jnp.full(leaf.shape, 0.01, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, variables)


def measure(model: str, name: str, cap_gb: float, pre_n: int, fwd_n: int, batch: int) -> dict:
    """Measures one model at one GPT-3 size (call in a fresh process)."""
    import jax
    import jax.numpy as jnp

    layers, d = GPT3[name]
    out = {"model": model, "gpt3": name, "layers": layers, "d": d, "cap_gb": cap_gb}
    jax.numpy.zeros(1).block_until_ready()  # start the runtime before the baseline
    base_data = _status_kb("VmData") * 1024
    out["baseline_mb"] = _status_kb("VmRSS") / 1024
    cap = int(cap_gb * (1 << 30))
    if hasattr(resource, "RLIMIT_DATA"):
        resource.setrlimit(resource.RLIMIT_DATA, (base_data + cap, resource.RLIM_INFINITY))
    est, programs = _plan(model, layers, d, cap, pre_n, batch, {})
    out["plan"] = est
    if est["forward_batch"] == 0 or est["preprocess_chunk"] == 0:
        need = max(est.get("forward_planned_mb", 0), est.get("preprocess_planned_mb", 0))
        reason = f"the compiled programs need {need / 1024:.1f} GB (cap {cap_gb:g} GB)"
        return {**out, "status": "oom", "oom_kind": "planned", "reason": reason}
    ku, kv = jax.random.split(jax.random.key(0))
    u = 0.01 * jax.random.normal(ku, (pre_n, layers, d, RANK), jnp.float32)
    v = 0.01 * jax.random.normal(kv, (pre_n, layers, d, RANK), jnp.float32)
    rank = jnp.full((pre_n, layers), RANK, jnp.int32)
    jax.block_until_ready((u, v))

    def timed(fn, calls):
        jax.block_until_ready(fn(0))  # warm up (the programs are compiled already)
        start = time.perf_counter()
        for c in range(calls):
            jax.block_until_ready(fn(c))
        return time.perf_counter() - start

    _reset_peak()
    if programs["preprocess"] is None:
        out["preprocess_s"], out["preprocess_peak_mb"] = 0.0, 0.0
    else:
        chunk, step = est["preprocess_chunk"], programs["preprocess"]
        pre_calls = pre_n // chunk
        out["preprocess_s"] = timed(lambda c: step(u, v, jnp.int32(c % pre_calls)), pre_calls)
        out["preprocess_chunk"] = chunk
        out["preprocess_peak_mb"] = _peak_mb() - out["baseline_mb"]
    _reset_peak()
    _, _, shapes, *_ = _abstract(model, layers, d, 1)
    variables = _variables(shapes, (u, v))
    fb, apply = est["forward_batch"], programs["forward"]
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
        "version": VERSION,
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
            result = from_process(proc.returncode, proc.stdout, proc.stderr)
        except subprocess.TimeoutExpired:
            text = f"over {timeout_s:.0f} s"
            result = {"status": "timeout", "error_type": "timeout", "error": text, "reason": text}
        finally:
            free.put(core)
        result.update(model=model, gpt3=name, settings=settings)
        result["wall_s"] = time.perf_counter() - start
        shown_cmd = "python " + " ".join(args[1:])
        log.record("figure5", f"figure5/{name}_{model}", shown_cmd, result["wall_s"], "measured")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        ok = result["status"] == "ok"
        shown = f"forward {result['forward_s']:.2f} s" if ok else result.get("reason", "")[:120]
        log.say(f"  figure 5 {name} {model}: {result['status']} {shown}")
        return result

    pairs = [(name, model) for name in size.gpt3 for model in models]
    with cf.ThreadPoolExecutor(max(1, len(cores))) as pool:
        return list(pool.map(lambda p: one(*p), pairs))


#: Messages of a failed allocation: Python's, XLA's (``RESOURCE_EXHAUSTED``), the OS's.
_ALLOCATION_FAILED = ("RESOURCE_EXHAUSTED", "Out of memory", "Cannot allocate memory")
#: What the CPU runtime's libraries write to stderr when their own allocation fails:
#: YNNPACK before XLA raises ``INTERNAL: YNNPACK operation failed``, Eigen's C++
#: ``bad_alloc`` (which aborts the process).
_LIBRARY_ALLOCATION_FAILED = re.compile(r"allocate of <\d+> failed|std::bad_alloc")


def failure(exc: BaseException) -> dict:
    """The record of a measurement that raised: ``status`` ``"oom"`` (``oom_kind``
    ``"allocation"``) only when the error says an allocation failed; any other error is
    ``"error"``. Both keep the exception's type and message (``error_type``, ``error``).
    """
    text = str(exc)
    record = {"error_type": type(exc).__name__, "error": text[:2000], "reason": text[:300]}
    if isinstance(exc, MemoryError) or any(s in text for s in _ALLOCATION_FAILED):
        return {**record, "status": "oom", "oom_kind": "allocation"}
    return {**record, "status": "error"}


def from_process(returncode: int, stdout: str, stderr: str) -> dict:
    """The record of one measuring process: its ``RESULT`` line, or what killed it.

    A process killed by ``SIGKILL`` before reporting is counted as out of memory
    (``oom_kind`` ``"killed"``: what the kernel's OOM killer does). An error, reported or
    not (a crash, an abort, a non-zero exit), is an out of memory (``"allocation"``, with
    the line as ``oom_evidence``) only where a library said on stderr that its allocation
    failed: YNNPACK raises an opaque ``INTERNAL`` error after ``allocate of <...> failed``,
    Eigen aborts on ``std::bad_alloc``. Every failure keeps ``stderr_tail``.
    """
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    tail = stderr[-1000:]
    if lines:
        result = json.loads(lines[-1][len("RESULT ") :])
        if result.get("status") != "ok":
            result["stderr_tail"] = tail
    else:
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        result = {"status": "error", "error_type": how, "error": f"no result ({how}): {tail}"}
        result.update(reason=result["error"][:300], stderr_tail=tail)
        if returncode == -9:
            return {**result, "status": "oom", "oom_kind": "killed"}
    evidence = [x for x in stderr.splitlines() if _LIBRARY_ALLOCATION_FAILED.search(x)]
    if result.get("status") == "error" and evidence:
        result.update(status="oom", oom_kind="allocation", oom_evidence=evidence[-1][:200])
    return result


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
    except Exception as e:  # noqa: BLE001  # any failure is recorded, never raised
        result = failure(e)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv)
