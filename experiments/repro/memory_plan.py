"""Figure 5's memory plan: what each measured program holds, read from XLA itself.

Each phase of a measurement (:mod:`experiments.repro.timing`) is compiled from abstract
shapes first; its buffer assignment (``compiled.memory_analysis()``: arguments, outputs,
temporaries), plus a stated allowance for the GEMM libraries' own scratch, is what it
needs. The largest batch whose need fits under the cap is run, with that very compiled
program; nothing is estimated from a formula of the model.
"""

from __future__ import annotations

RANK = 4
MB = 1 << 20


#: Buffers that XLA's buffer assignment does not see: the CPU runtime's GEMM libraries
#: (Eigen, YNNPACK) pack operand blocks into scratch of their own. Measured on this
#: machine (jaxlib 0.10.2) as the peak above the compiled program's buffers: see
#: BUILD_NOTES.md, "Figure 5's memory plan".
SCRATCH_FRACTION, SCRATCH_MB = 0.10, 256
BATCHES = (64, 32, 16, 8, 4, 2, 1)


def abstract_inputs(model: str, layers: int, d: int, count: int):
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
    (arguments, outputs, temporaries) and the libraries' scratch (``SCRATCH_*``)."""
    m = compiled.memory_analysis()
    held = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    held -= m.alias_size_in_bytes
    return int(held * (1 + SCRATCH_FRACTION) + SCRATCH_MB * MB)


def plan_programs(
    model: str,
    layers: int,
    d: int,
    cap: float,
    inputs: int,
    batch: int,
    hparams,
    phases=("preprocess", "forward"),
):
    """:func:`plan` of ``phases``, and the compiled programs it chose (``None``: none fits)."""
    import jax

    net, spec, variables, u, v, rank = abstract_inputs(model, layers, d, inputs)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(variables))
    lora_bytes = 2 * layers * d * RANK * 4
    out = {"params_mb": params / MB, "inputs_mb": inputs * lora_bytes / MB, "cap_mb": cap / MB}
    programs = {}
    i = jax.ShapeDtypeStruct((), "int32")
    programs_of = {
        "forward": (batch, lambda b: _forward_program(net, spec, b), (variables, u, v, rank, i)),
        "preprocess": (inputs, lambda b: _preprocess_program(model, b), (u, v, i)),
    }
    held = {"forward": params + inputs * lora_bytes, "preprocess": inputs * lora_bytes}
    for phase in phases:
        most, make, args = programs_of[phase]
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
    return plan_programs(model, layers, d, cap, inputs, batch, hparams)[0]
