"""The four MLP baselines of section 3.2: raw factors, O-aligned factors, singular values,
dense products. Each takes ONE LoRA and returns ``[num_outputs]``.

All share the authors' MLP: ``(Linear -> LayerNorm -> Dropout -> ReLU) x depth -> Linear``,
whose first Linear is a :class:`~gllora.layers.GroupedDense` over the module groups;
they differ only in the per-module features fed to it (:meth:`_MlpOn.features`).

Where those features have no parameters (singular values; O-aligned factors, whose
template is a constant), the engine computes them once per run instead of once per step
(:class:`Featurized`, ``fixed_features``; :mod:`gllora.train.featurized`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gllora import features, layers, product_dense
from gllora.lora import Lora
from gllora.models.featurized import Featurized

Array = jax.Array


def _flatten_pair(u: Array, v: Array) -> Array:
    """``[k, n, r], [k, m, r] -> [k, (n + m) r]``."""
    return jnp.concatenate([u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)], 1)


class _MlpOn(nn.Module):
    """An MLP on per-module features; subclasses define :meth:`features`.

    ``model.apply(variables, lora, features_only=True)`` returns the first layer's inputs
    as a :class:`Featurized`, and ``model.apply(variables, featurized)`` the outputs from
    them: the same as ``model.apply(variables, lora)``. A class whose features have no
    parameters says so with ``fixed_features = True``; the engine then computes them once.
    """

    #: The features are a fixed function of the input (and constant collections such as
    #: O-Align's template), with no parameters: they can be computed once per run.
    fixed_features: ClassVar[bool] = False

    #: Batch layout the engine feeds (gllora.models.layout): per-example Gram matrices,
    #: products and flattened factors contract along n or r, which XLA does fastest with
    #: the batch leading; moving [k, n, B, r] there costs a transpose of the whole batch.
    batch_layout: ClassVar[str] = "leading"

    num_outputs: int
    hidden: int = 256
    depth: int = 2
    dropout: float = 0.1

    def features(self, lora: Lora) -> list[tuple[str, Array]]:
        """``[(group key, [k, F])]``: the first layer's input, one entry per module group."""
        raise NotImplementedError

    @nn.compact
    def __call__(
        self, lora: Lora | Featurized, train: bool = False, features_only: bool = False
    ) -> Array | Featurized:
        if isinstance(lora, Featurized):  # computed ahead by features_only=True
            if self.is_initializing():
                raise ValueError(f"{type(self).__name__}: initialise with a Lora, not Featurized")
            inputs = list(zip(lora.keys, lora.values))
        else:
            extras = layers.extras_features(lora)
            layers.check_input(self, lora, extra_keys=[] if extras is None else [extras[0]])
            inputs = self.features(lora) + ([] if extras is None else [extras])
            if features_only:
                return Featurized(tuple(k for k, _ in inputs), tuple(x for _, x in inputs))
        h = layers.GroupedDense(self.hidden, name="first")(inputs)
        return layers.MlpTail(self.hidden, self.depth, self.num_outputs, self.dropout, name="tail")(
            h, train
        )


class Mlp(_MlpOn):
    """MLP on the flattened raw factors ``u, v``. NOT invariant (the negative control).

    Fixed to the rank it was initialised with.
    """

    def features(self, lora: Lora) -> list[tuple[str, Array]]:
        for g, u in zip(lora.spec.groups, lora.u):
            if u.shape[-1] != layers.init_rank(self, g):
                raise ValueError(
                    f"Mlp: modules {g.describe()} have rank {u.shape[-1]}, the model was "
                    f"initialised with rank {layers.init_rank(self, g)}; the raw-factor MLP takes "
                    "one rank only (pad with Lora.pad_rank, or use an invariant model)"
                )
        return [(g.key, _flatten_pair(u, v)) for g, u, v in zip(lora.spec.groups, lora.u, lora.v)]


class MlpOAlign(_MlpOn):
    """MLP on factors aligned to a template by orthogonal Procrustes (eq. 3).

    Invariant to an independent ``g_i`` in O(r) per module (almost everywhere), NOT to
    GL(r): a scaling ``g = a I`` changes the aligned factors' norms.

    Attributes:
      template: the LoRA to align to (e.g. one drawn from the training split). It is
        stored in the ``"template"`` collection at init, so the variables returned by
        ``init`` carry it into checkpoints. ``None``: use the LoRA given to ``init``.
    """

    template: Any = None
    fixed_features: ClassVar[bool] = True

    def features(self, lora: Lora) -> list[tuple[str, Array]]:
        template = self.template if self.template is not None else lora
        if self.is_initializing() and template.spec.groups != lora.spec.groups:
            raise ValueError(
                "MlpOAlign: the template's modules differ from the input's: "
                + "; ".join(lora.spec.diff(template.spec))
            )
        out = []
        for i, (g, u, v) in enumerate(zip(lora.spec.groups, lora.u, lora.v)):
            u_t = self.variable(
                "template", f"u_{g.key}", lambda i=i: jnp.asarray(template.u[i])
            ).value
            v_t = self.variable(
                "template", f"v_{g.key}", lambda i=i: jnp.asarray(template.v[i])
            ).value
            out.append((g.key, _flatten_pair(*features.oalign(u, v, u_t, v_t))))
        return out


class MlpSvd(_MlpOn):
    """MLP on the singular values of each ``u_i v_i^T`` (GL(r)-invariant, not expressive).

    Attributes:
      rank: number of singular values per module; inputs of higher rank are truncated
        to the top ``rank`` values, lower ranks zero-padded (section 5.4). ``None``: the
        rank of the LoRA given to ``init``.
      refine: which factors the featurizer reads twice for accuracy on small singular
        values (:func:`gllora.features.singular_values`): ``"u"`` (default), ``"both"``,
        ``"none"`` (about 1.3-1.5x faster features, small values to ~``2 eps cond^2``).
    """

    rank: int | None = None
    refine: str = "u"
    fixed_features: ClassVar[bool] = True

    def features(self, lora: Lora) -> list[tuple[str, Array]]:
        return [
            (
                g.key,
                features.singular_values(
                    u, v, rank=self.rank or layers.init_rank(self, g), refine=self.refine
                ),
            )
            for g, u, v in zip(lora.spec.groups, lora.u, lora.v)
        ]


class MlpDense(_MlpOn):
    """MLP on the flattened dense products ``u_i v_i^T`` (GL(r)-invariant, expressive, O(nmr)).

    Takes any rank. The authors' hidden width is 16: the first layer alone has
    ``sum_i n_i m_i x hidden`` weights. The products are never formed: the first layer
    multiplies the factors into its kernel (:func:`gllora.product_dense.product_dense`),
    contracting the longer side of each module in one GEMM. So where ``m > n`` the
    features are ``vec(v_i u_i^T)`` (the same numbers as ``vec(u_i v_i^T)``, permuted),
    and each group's kernel is stored ``[k, (shorter side) * hidden, longer side]`` and
    named ``kernel_<group key>_vu`` or ``_uv`` by its order, so that a checkpoint of
    another layout never loads into it silently.
    """

    hidden: int = 16

    def features(self, lora: Lora) -> list[tuple[str, Array | product_dense.Products]]:
        out = []
        for g, u, v in zip(lora.spec.groups, lora.u, lora.v):
            if g.m > g.n:
                out.append((g.key + "_vu", product_dense.Products(v, u)))
            else:
                out.append((g.key + "_uv", product_dense.Products(u, v)))
        return out
