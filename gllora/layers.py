"""Flax Linen layers over :class:`gllora.Lora` inputs: thin wrappers that create
parameters and call the pure functions of :mod:`gllora.ops`.

Parameters of a module group are named after the group's key (its shape and a digest
of its module names, see :class:`gllora.lora.GroupSpec`), so a model applied to a LoRA
with other modules fails loudly instead of silently mixing parameters up.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gllora import ops, product_dense
from gllora.lora import GroupSpec, Lora, LoraSpec

Array = jax.Array
SPEC_COLLECTION = "lora_spec"


def _normal_fan_in(fan_in: int):
    """Normal init with variance ``1 / fan_in`` (fan-in may span several parameters)."""
    return nn.initializers.normal(stddev=float(fan_in) ** -0.5)


def _normal_per_module(fan_in: int):
    """:func:`_normal_fan_in`, drawn one module (leading index) at a time.

    The same distribution; the random bits of one module are live at a time instead of
    the whole kernel's (``jax.random.normal`` holds ~3x its output while it runs: 4.5 GB
    beside MLP+Dense's 1.4 GB kernel at the Qwen2-1.5B k/v shape).
    """
    stddev = float(fan_in) ** -0.5

    def init(key, shape, dtype=jnp.float32):
        draw = lambda k: stddev * jax.random.normal(k, shape[1:], dtype)
        return jax.lax.map(draw, jax.random.split(key, shape[0]))

    return init


def check_input(module: nn.Module, lora: Lora, *, extra_keys: Sequence[str] = ()) -> None:
    """Records the input's module groups at init; at apply, rejects a LoRA whose module
    names, shapes or extras differ from those the model was initialised with.

    The record lives in the ``"lora_spec"`` collection: one tiny ``int8 [r]`` array per
    group, keyed by the group key, whose length is the rank seen at init.
    """
    if lora.u[0].ndim != 3:
        raise ValueError(
            f"models take ONE LoRA (u [k, n, r]); got u {list(lora.u[0].shape)}. "
            "Batch with jax.vmap(model.apply, in_axes=(None, 0))."
        )
    keys = [g.key for g in lora.spec.groups] + list(extra_keys)
    if not module.is_initializing():
        stored = set(module.variables.get(SPEC_COLLECTION, {}))
        if stored != set(keys):
            unknown = [
                g.describe() + f" (id {g.key})" for g in lora.spec.groups if g.key not in stored
            ]
            missing = sorted(stored - set(keys))
            raise ValueError(
                f"{type(module).__name__}: the input LoRA's modules differ from those the model was "
                f"initialised with. Groups unknown to the model: {unknown or 'none'}; groups the "
                f"model expects but did not get: {missing or 'none'}. (A group is keyed by its "
                "shape [n, m] and its module names in order.)"
            )
    for g, u in zip(lora.spec.groups, lora.u):
        module.variable(SPEC_COLLECTION, g.key, lambda r=u.shape[-1]: jnp.zeros((r,), jnp.int8))
    for key in extra_keys:
        module.variable(SPEC_COLLECTION, key, lambda: jnp.zeros((1,), jnp.int8))


def init_rank(module: nn.Module, group: GroupSpec) -> int:
    """The rank of ``group`` when the model was initialised (see :func:`check_input`)."""
    return module.get_variable(SPEC_COLLECTION, group.key).shape[0]


def extras_features(lora: Lora) -> tuple[str, Array] | None:
    """All extra inputs flattened, ``[1, F]``, with a key naming their kinds and modules."""
    if not lora.spec.extras:
        return None
    parts = [
        lora.extras[kind][name].reshape(-1) for kind, names in lora.spec.extras for name in names
    ]
    key = GroupSpec(
        tuple(f"{kind}:{name}" for kind, names in lora.spec.extras for name in names),
        1,
        sum(p.shape[0] for p in parts),
    ).key
    return "extras_" + key, jnp.concatenate(parts)[None]


class EquivariantLinear(nn.Module):
    """``(u_i, v_i) -> (Phi_i u_i, Psi_i v_i)`` per module (eq. 4), no bias.

    Equivariant to an independent ``g_i`` in GL(r) per module. Output rows: ``features``
    for both factors of every module, or per group ``out_shapes[i] = (n', m')``.
    """

    features: int | None = None
    out_shapes: tuple[tuple[int, int], ...] | None = None

    @nn.compact
    def __call__(self, lora: Lora) -> Lora:
        if (self.features is None) == (self.out_shapes is None):
            raise ValueError("EquivariantLinear needs exactly one of features and out_shapes")
        groups, us, vs = [], [], []
        for i, (g, u, v) in enumerate(zip(lora.spec.groups, lora.u, lora.v)):
            n_out, m_out = self.out_shapes[i] if self.out_shapes else (self.features,) * 2
            k = len(g.names)
            # Stored [k, n_in, n_out] (Phi transposed): see ops.equivariant_linear.
            phi = self.param(f"phi_{g.key}", _normal_fan_in(g.n), (k, g.n, n_out))
            psi = self.param(f"psi_{g.key}", _normal_fan_in(g.m), (k, g.m, m_out))
            us.append(ops.equivariant_linear(phi, u))
            vs.append(ops.equivariant_linear(psi, v))
            groups.append(GroupSpec(g.names, n_out, m_out))
        spec = LoraSpec(lora.spec.order, tuple(groups), lora.spec.extras)
        return Lora(spec, us, vs, lora.rank, lora.extras)


def gl_nonlinearity(lora: Lora, sigma: str) -> Lora:
    """Eq. 6 on every module (no parameters); ``sigma`` is a key of :data:`ops.SIGMAS`."""
    if sigma not in ops.SIGMAS:
        raise ValueError(f"unknown GL nonlinearity {sigma!r}; known: {sorted(ops.SIGMAS)}")
    pairs = [ops.gl_nonlinearity(u, v, ops.SIGMAS[sigma]) for u, v in zip(lora.u, lora.v)]
    return lora.replace(u=tuple(p[0] for p in pairs), v=tuple(p[1] for p in pairs))


class InvariantGate(nn.Module):
    """:func:`gllora.ops.invariant_gate` on every module, with its parameters.

    Equivariant to an independent ``g_i`` in GL(r) per module. Initialised at the row
    sums (``b = 1 / sqrt(size)``), unit scale and zero shift: a soft gate around 1/2.
    """

    @nn.compact
    def __call__(self, lora: Lora) -> Lora:
        us, vs = [], []
        for g, u, v in zip(lora.spec.groups, lora.u, lora.v):
            k, width = len(g.names), max(g.n, g.m)
            b_u = self.param(f"b_u_{g.key}", nn.initializers.constant(g.m**-0.5), (k, g.m))
            b_v = self.param(f"b_v_{g.key}", nn.initializers.constant(g.n**-0.5), (k, g.n))
            scale = self.param(f"scale_{g.key}", nn.initializers.ones, (2, k, width))
            shift = self.param(f"shift_{g.key}", nn.initializers.zeros, (2, k, width))
            u2, v2 = ops.invariant_gate(u, v, b_u, b_v, scale, shift)
            us.append(u2)
            vs.append(v2)
        return lora.replace(u=tuple(us), v=tuple(vs))


class RowDropout(nn.Module):
    """Drops whole rows of ``u`` and ``v``: commutes with the GL action on columns."""

    rate: float

    @nn.compact
    def __call__(self, lora: Lora, train: bool) -> Lora:
        if self.rate == 0.0 or not train:
            return lora
        drop = nn.Dropout(self.rate, broadcast_dims=(2,), deterministic=False)
        return lora.replace(u=tuple(drop(u) for u in lora.u), v=tuple(drop(v) for v in lora.v))


class GroupedDense(nn.Module):
    """A dense layer on the concatenation of per-group features, without concatenating.

    ``sum_g einsum('kf,kfh->h', x_g, W_g) + b``, one kernel ``W_g [k, F_g, features]``
    per group, named by the group key: equal to one ``Dense`` on the flattened
    concatenation of all modules' features, initialised with the total fan-in.

    A group's features are either an array ``[k, F]`` or a
    :class:`~gllora.product_dense.Products` ``(a [k, I, r], b [k, J, r])`` standing for the
    flattened products ``vec(a_i b_i^T)`` (``F = I * J``), which are never formed (see
    :func:`gllora.product_dense.product_dense`).
    """

    features: int

    @nn.compact
    def __call__(self, inputs: Sequence[tuple[str, Array | product_dense.Products]]) -> Array:
        fan_in = sum(_num_modules(x) * _num_features(x) for _, x in inputs)
        out = self.param("bias", nn.initializers.zeros, (self.features,))
        for key, x in inputs:
            if not isinstance(x, product_dense.Products) and x.ndim != 2:
                raise ValueError(
                    f"GroupedDense: features of {key} must be [k, F], got {list(x.shape)}"
                )
            if isinstance(x, product_dense.Products):
                shape = product_dense.kernel_shape(x, self.features)
            else:
                shape = (x.shape[0], x.shape[1], self.features)
            name = f"kernel_{key}"
            if (
                self.has_variable("params", name)
                and self.get_variable("params", name).shape != shape
            ):
                stored = self.get_variable("params", name).shape
                raise ValueError(
                    f"GroupedDense: modules {key} need a kernel {list(shape)}, the model was "
                    f"initialised with {list(stored)} (a different rank, or another input size)"
                )
            init = _normal_per_module if isinstance(x, product_dense.Products) else _normal_fan_in
            kernel = self.param(name, init(fan_in), shape)
            if isinstance(x, product_dense.Products):
                out = out + product_dense.product_dense(x.a, x.b, kernel)
            else:
                out = out + ops.grouped_dense(x, kernel)
        return out


def _num_modules(x: Array | product_dense.Products) -> int:
    return (x.a if isinstance(x, product_dense.Products) else x).shape[0]


def _num_features(x: Array | product_dense.Products) -> int:
    return x.num_features if isinstance(x, product_dense.Products) else x.shape[1]


class MlpTail(nn.Module):
    """After a first linear layer: ``LayerNorm -> Dropout -> ReLU``, then ``depth - 1`` times
    ``Dense -> LayerNorm -> Dropout -> ReLU``, then ``Dense(num_outputs)``."""

    hidden: int
    depth: int
    num_outputs: int
    dropout: float

    @nn.compact
    def __call__(self, h: Array, train: bool) -> Array:
        for i in range(self.depth):
            if i > 0:
                h = nn.Dense(self.hidden)(h)
            h = nn.LayerNorm()(h)
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
            h = nn.relu(h)
        return nn.Dense(self.num_outputs)(h)
