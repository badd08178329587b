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

from experiments.repro.memory_plan import (  # noqa: F401  # re-exported
    MB,
    RANK,
    SCRATCH_FRACTION,
    SCRATCH_MB,
    abstract_inputs,
    plan,
    plan_programs,
)

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
#: Bumped when what a record means changes, so that stale records are measured again.
VERSION = 3


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


#: The address-space limit of a measuring process, over the cap: allocators map more than
#: they touch (arenas, freed buffers the runtime releases on a thread of its own), so a
#: cap on virtual memory would fail programs whose resident peak fits. The cap is
#: enforced by the plan and by the measured resident peak (:func:`_judge`).
SAFETY_FACTOR = 1.5
#: Each phase is measured in a process of its own: memory a phase frees stays mapped in
#: the C allocator's arenas, and ``RLIMIT_DATA`` counts it against the next phase.
PHASES = ("preprocess", "forward")


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


def measure(
    model: str, name: str, cap_gb: float, pre_n: int, fwd_n: int, batch: int, phase: str
) -> dict:
    """Measures one phase (``"preprocess"`` or ``"forward"``) of one model at one GPT-3
    size; call in a fresh process (see :func:`measure_both`)."""
    import jax
    import jax.numpy as jnp

    layers, d = GPT3[name]
    out = {"model": model, "gpt3": name, "layers": layers, "d": d, "cap_gb": cap_gb}
    cap = int(cap_gb * (1 << 30))
    est, programs = plan_programs(model, layers, d, cap, pre_n, batch, {}, phases=(phase,))
    out["plan"] = est
    # The baseline starts after compiling: what the compiler leaves mapped in the
    # allocator's arenas is not the measured program's memory.
    _reset_peak()
    base_data = _status_kb("VmData") * 1024
    out[f"{phase}_baseline_mb"] = _status_kb("VmRSS") / 1024
    if hasattr(resource, "RLIMIT_DATA"):  # a safety net for the machine, not the cap
        limit = base_data + int(SAFETY_FACTOR * cap)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    size_key = "forward_batch" if phase == "forward" else "preprocess_chunk"
    if est[size_key] == 0:
        need = est[f"{phase}_planned_mb"]
        reason = f"the compiled {phase} needs {need / 1024:.1f} GB (cap {cap_gb:g} GB)"
        return {**out, "status": "oom", "oom_kind": "planned", "reason": reason}
    ku, kv = jax.random.split(jax.random.key(0))
    u = 0.01 * jax.random.normal(ku, (pre_n, layers, d, RANK), jnp.float32)
    v = 0.01 * jax.random.normal(kv, (pre_n, layers, d, RANK), jnp.float32)
    rank = jnp.full((pre_n, layers), RANK, jnp.int32)
    jax.block_until_ready((u, v))

    def run(fn, c):
        # Freed at once: a dropped result can stay alive until Python's cycle collector
        # runs, and two chunks of products then exceed what the plan allowed.
        for x in jax.tree_util.tree_leaves(jax.block_until_ready(fn(c))):
            x.delete()

    def timed(fn, calls):
        run(fn, 0)  # warm up (the programs are compiled already)
        start = time.perf_counter()
        for c in range(calls):
            run(fn, c)
        return time.perf_counter() - start

    if phase == "preprocess":
        if programs["preprocess"] is None:  # the model has no such step
            return {**out, "status": "ok", "preprocess_s": 0.0, "preprocess_peak_mb": 0.0}
        chunk, step = est["preprocess_chunk"], programs["preprocess"]
        _reset_peak()
        calls = pre_n // chunk
        out["preprocess_s"] = timed(lambda c: step(u, v, jnp.int32(c % calls)), calls)
        out["preprocess_chunk"] = chunk
        out["preprocess_peak_mb"] = _peak_mb() - out["preprocess_baseline_mb"]
        return _judge(out, "preprocess", cap_gb)
    _, _, shapes, *_ = abstract_inputs(model, layers, d, 1)
    variables = _variables(shapes, (u, v))
    fb, apply = est["forward_batch"], programs["forward"]
    calls, per_input = fwd_n // fb, pre_n // fb
    _reset_peak()
    out["forward_s"] = timed(
        lambda c: apply(variables, u, v, rank, jnp.int32(c % per_input)), calls
    )
    out["forward_batch"] = fb
    out["forward_peak_mb"] = _peak_mb() - out["forward_baseline_mb"]
    return _judge(out, "forward", cap_gb)


def _judge(out: dict, phase: str, cap_gb: float) -> dict:
    """``"ok"``, or out of memory (``oom_kind`` ``"measured"``) where the phase's resident
    peak went over the cap: the memory a machine of that size would have needed."""
    peak = out[f"{phase}_peak_mb"]
    if peak <= cap_gb * 1024:
        return {**out, "status": "ok"}
    reason = f"the {phase} peaked at {peak / 1024:.2f} GB resident (cap {cap_gb:g} GB)"
    return {**out, "status": "oom", "oom_kind": "measured", "reason": reason}


def merge(records: dict[str, dict]) -> dict:
    """One record from the phases' (``{phase: record}``): the phases' fields and plans
    together, ``status`` ``"ok"`` when every phase is, else the first failure's (in
    ``PHASES`` order) status and fields, with ``failed_phase``."""
    out, plans, failed = {}, {}, None
    for phase in PHASES:
        record = dict(records[phase])
        plans.update(record.pop("plan", {}))
        if record["status"] != "ok" and failed is None:
            failed = {**record, "failed_phase": phase}
        out.update({k: v for k, v in record.items() if k != "status"})
    out.update(failed or {"status": "ok"})
    return {**out, "plan": plans}


def measure_both(model: str, name: str, settings: dict, core=None, timeout_s=1800.0) -> dict:
    """Both phases of one (model, size), each in a fresh process; :func:`merge`d. The
    forward goes first: where it fails, the preprocessing is not measured (the row fails
    as a whole, and the products of the largest sizes take minutes to write)."""
    import subprocess

    records = {}
    for phase in ("forward", "preprocess"):
        if phase == "preprocess" and records["forward"]["status"] != "ok":
            records[phase] = {"status": "ok"}  # not measured
            continue
        args = [sys.executable, "-m", "experiments.repro.timing", f"--model={model}"]
        args += [f"--gpt3={name}", f"--phase={phase}"]
        args += [f"--{k}={v}" for k, v in settings.items() if k != "version"]
        if core is not None:  # the child pins itself: a preexec_fn would fork a JAX process
            args.append(f"--core={core}")
        try:
            proc = subprocess.run(
                args, check=False, capture_output=True, text=True, timeout=timeout_s
            )
            records[phase] = from_process(proc.returncode, proc.stdout, proc.stderr)
        except subprocess.TimeoutExpired:
            text = f"{phase} over {timeout_s:.0f} s"
            records[phase] = {"status": "timeout", "error_type": "timeout", "error": text}
            records[phase]["reason"] = text
    return merge(records)


def run_all(size, out: str, cores: list[int], log, models, timeout_s: float = 1800) -> list[dict]:
    """Measures every (GPT-3 size, model) of a reproduction, ``len(cores)`` at a time,
    each process pinned to one core; finished measurements (``out/figure5/*.json``)
    with the same settings are reused."""
    import concurrent.futures as cf
    import queue

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
        core = free.get()
        start = time.perf_counter()
        try:
            result = measure_both(model, name, settings, core, timeout_s)
        finally:
            free.put(core)
        result.update(model=model, gpt3=name, settings=settings)
        result["wall_s"] = time.perf_counter() - start
        shown_cmd = f"python -m experiments.repro.timing --model={model} --gpt3={name} " + " ".join(
            f"--{k}={v}" for k, v in settings.items() if k != "version"
        )
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
    """``--model --gpt3 [--phase] [--cap_gb --preprocess --forward --batch --core]``:
    one phase in this process, or (no ``--phase``) both, each in a child process."""
    args = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
    if "core" in args and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(args["core"])})  # before JAX starts its threads
    numbers = {"cap_gb": 6.0, "preprocess": 64, "forward": 512, "batch": 64}
    settings = {k: type(v)(args.get(k, v)) for k, v in numbers.items()}
    if "phase" not in args:
        core = int(args["core"]) if "core" in args else None
        result = measure_both(args["model"], args["gpt3"], settings, core)
    else:
        try:
            result = measure(
                args["model"],
                args["gpt3"],
                settings["cap_gb"],
                settings["preprocess"],
                settings["forward"],
                settings["batch"],
                args["phase"],
            )
        except Exception as e:  # noqa: BLE001  # any failure is recorded, never raised
            result = failure(e)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv)
