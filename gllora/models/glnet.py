"""GL-net (section 3.3): GL-equivariant layers followed by an invariant head.

The trunk, :class:`GLNetTrunk`, is an equivariant map from LoRAs to LoRAs (eq. 2);
:class:`GLNet` adds the invariant head ``MLP(cat[u_i v_i^T])``.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from gllora import features, layers
from gllora.lora import Lora

Array = jax.Array


#: GL nonlinearities of the trunk: eq. 6 with a scalar function (``gllora.ops.SIGMAS``),
#: or ``"gate"``, a learned gate on a normalised invariant (``gllora.ops.invariant_gate``).
NONLINEARITIES = ("gate", "relu_sign", "sigmoid", "softplus", "tanh")


class GLNetTrunk(nn.Module):
    """Equivariant LoRA -> LoRA map: ``EquivariantLinear``, then ``depth - 1`` times
    ``GL nonlinearity -> row dropout -> EquivariantLinear`` (with ``residual``, each of
    those blocks is added to its input: ``x + block(x)``, factor by factor).

    Equivariant to an independent ``g_i`` in GL(r) per module: ``trunk(x . g) ==
    trunk(x) . g`` (a sum of equivariant maps is equivariant). Output modules have
    ``width`` rows in both factors, or, with ``width=None``, the input's own shapes (a map
    of the LoRA space to itself).
    """

    width: int | None = 16
    depth: int = 2
    nonlinearity: str = "relu_sign"
    row_dropout: float = 0.1
    residual: bool = False

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Lora:
        if self.depth < 1:
            raise ValueError(f"GLNetTrunk needs depth >= 1, got {self.depth}")
        shapes = None if self.width else tuple((g.n, g.m) for g in lora.spec.groups)
        x = layers.EquivariantLinear(self.width, None if self.width else shapes, name="equiv_0")(
            lora
        )
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"unknown GL nonlinearity {self.nonlinearity!r}; known: {NONLINEARITIES}"
            )
        for i in range(1, self.depth):
            if self.nonlinearity == "gate":
                h = layers.InvariantGate(name=f"gate_{i}")(x)
            else:
                h = layers.gl_nonlinearity(x, self.nonlinearity)
            h = layers.RowDropout(self.row_dropout, name=f"row_dropout_{i}")(h, train)
            h = layers.EquivariantLinear(
                self.width, None if self.width else shapes, name=f"equiv_{i}"
            )(h)
            if self.residual:
                h = h.replace(
                    u=tuple(a + b for a, b in zip(x.u, h.u)),
                    v=tuple(a + b for a, b in zip(x.v, h.v)),
                )
            x = h
        return x


class GLNet(nn.Module):
    """GL-net: equivariant trunk, then ``MLP(cat[u_i v_i^T])`` on the narrowed modules.

    Invariant to an independent ``g_i`` in GL(r) per module, and takes any rank. The
    ``"mean"`` head reduces each product ``u_i v_i^T`` to its mean (the paper's CLIP-score
    variant, "hidden dimension 1"); ``"dense"`` keeps all ``width^2`` entries per module.
    """

    #: Batch layout the engine feeds (gllora.models.layout): with the batch beside the
    #: rank axis, ``Phi @ u`` over a batch is one matrix product over ``B * r`` columns.
    batch_layout: ClassVar[str] = "rank_major"

    num_outputs: int
    equiv_width: int = 16
    equiv_depth: int = 2
    nonlinearity: str = "relu_sign"
    head: str = "dense"
    head_width: int = 256
    head_depth: int = 1
    dropout: float = 0.1
    row_dropout: float = 0.1
    residual: bool = False

    @nn.compact
    def __call__(self, lora: Lora, train: bool = False) -> Array:
        if self.head not in ("dense", "mean"):
            raise ValueError(f"GLNet head must be 'dense' or 'mean', got {self.head!r}")
        extras = layers.extras_features(lora)
        layers.check_input(self, lora, extra_keys=[] if extras is None else [extras[0]])
        x = GLNetTrunk(
            self.equiv_width,
            self.equiv_depth,
            self.nonlinearity,
            self.row_dropout,
            self.residual,
            name="trunk",
        )(lora, train)
        inputs = []
        for g, u, v in zip(x.spec.groups, x.u, x.v):
            prod = features.dense(u, v)  # [k, d, d]: u_i v_i^T of the narrowed factors
            prod = (
                prod.mean(axis=(1, 2))[:, None]
                if self.head == "mean"
                else prod.reshape(u.shape[0], -1)
            )
            inputs.append((g.key, prod))
        if extras is not None:
            inputs.append(extras)
        inputs = [(key, nn.Dropout(self.dropout, deterministic=not train)(f)) for key, f in inputs]
        h = layers.GroupedDense(self.head_width, name="head_first")(inputs)
        return layers.MlpTail(
            self.head_width, self.head_depth, self.num_outputs, self.dropout, name="head"
        )(h, train)
