"""The four MLP baselines of section 3.2: raw factors, O-aligned factors, singular values,
dense products. Each takes ONE LoRA and returns ``[num_outputs]``.

All share the authors' MLP: ``(Linear -> LayerNorm -> Dropout -> ReLU) x depth -> Linear``.
The first Linear is a :class:`~gllora.layers.GroupedDense` over the module groups.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gllora import features, layers
from gllora.lora import Lora

Array = jax.Array


def _mlp(module: nn.Module, inputs: list[tuple[str, Array]], lora: Lora, train: bool) -> Array:
    extras = layers.extras_features(lora)
    if extras is not None:
        inputs = [*inputs, extras]
    h = layers.GroupedDense(module.hidden, name="first")(inputs)
    return layers.MlpTail(
        module.hidden, module.depth, module.num_outputs, module.dropout, name="tail"
    )(h, train)


def _extra_keys(lora: Lora) -> list[str]:
    extras = layers.extras_features(lora)
    return [] if extras is None else [extras[0]]


class Mlp(nn.Module):
    """MLP on the flattened raw factors ``u, v``. NOT invariant (the negative control).

    Fixed to the rank it was initialised with.
    """

    num_outputs: int
    hidden: int = 256
    depth: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Array:
        layers.check_input(self, lora, extra_keys=_extra_keys(lora))
        for g, u in zip(lora.spec.groups, lora.u):
            if u.shape[-1] != layers.init_rank(self, g):
                raise ValueError(
                    f"Mlp: modules {g.describe()} have rank {u.shape[-1]}, the model was "
                    f"initialised with rank {layers.init_rank(self, g)}; the raw-factor MLP takes "
                    "one rank only (pad with Lora.pad_rank, or use an invariant model)"
                )
        inputs = [
            (g.key, jnp.concatenate([u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)], 1))
            for g, u, v in zip(lora.spec.groups, lora.u, lora.v)
        ]
        return _mlp(self, inputs, lora, train)


class MlpOAlign(nn.Module):
    """MLP on factors aligned to a template by orthogonal Procrustes (eq. 3).

    Invariant to an independent ``g_i`` in O(r) per module (almost everywhere), NOT to
    GL(r): a scaling ``g = a I`` changes the aligned factors' norms.

    Attributes:
      template: the LoRA to align to (e.g. one drawn from the training split). It is
        stored in the ``"template"`` collection at init, so the variables returned by
        ``init`` carry it into checkpoints. ``None``: use the LoRA given to ``init``.
    """

    num_outputs: int
    template: Any = None
    hidden: int = 256
    depth: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Array:
        layers.check_input(self, lora, extra_keys=_extra_keys(lora))
        template = self.template if self.template is not None else lora
        if self.is_initializing() and template.spec.groups != lora.spec.groups:
            raise ValueError(
                "MlpOAlign: the template's modules differ from the input's: "
                + "; ".join(lora.spec.diff(template.spec))
            )
        inputs = []
        for i, (g, u, v) in enumerate(zip(lora.spec.groups, lora.u, lora.v)):
            u_t = self.variable(
                "template", f"u_{g.key}", lambda i=i: jnp.asarray(template.u[i])
            ).value
            v_t = self.variable(
                "template", f"v_{g.key}", lambda i=i: jnp.asarray(template.v[i])
            ).value
            ua, va = features.oalign(u, v, u_t, v_t)
            inputs.append(
                (
                    g.key,
                    jnp.concatenate([ua.reshape(ua.shape[0], -1), va.reshape(va.shape[0], -1)], 1),
                )
            )
        return _mlp(self, inputs, lora, train)


class MlpSvd(nn.Module):
    """MLP on the singular values of each ``u_i v_i^T`` (GL(r)-invariant, not expressive).

    Attributes:
      rank: number of singular values per module; inputs of higher rank are truncated
        to the top ``rank`` values, lower ranks zero-padded (section 5.4). ``None``: the
        rank of the LoRA given to ``init``.
    """

    num_outputs: int
    rank: int | None = None
    hidden: int = 256
    depth: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Array:
        layers.check_input(self, lora, extra_keys=_extra_keys(lora))
        inputs = []
        for g, u, v in zip(lora.spec.groups, lora.u, lora.v):
            r = self.rank or layers.init_rank(self, g)
            inputs.append((g.key, features.singular_values(u, v, rank=r)))
        return _mlp(self, inputs, lora, train)


class MlpDense(nn.Module):
    """MLP on the flattened dense products ``u_i v_i^T`` (GL(r)-invariant, expressive, O(nmr)).

    Takes any rank. The authors' hidden width is 16: the first layer alone has
    ``sum_i n_i m_i x hidden`` weights.
    """

    num_outputs: int
    hidden: int = 16
    depth: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Array:
        layers.check_input(self, lora, extra_keys=_extra_keys(lora))
        inputs = [
            (g.key, features.dense(u, v).reshape(u.shape[0], -1))
            for g, u, v in zip(lora.spec.groups, lora.u, lora.v)
        ]
        return _mlp(self, inputs, lora, train)
