"""The spectral detector (arXiv 2602.15195): spectral statistics per module type, a linear head.

Per module, from the singular values ``s_1 >= ... >= s_r`` of ``u v^T`` (thin-QR core,
no LAPACK: :func:`gllora.features.singular_values`), over the module's true rank:

1. ``log s_1`` (top singular value), 2. ``log |u v^T|_F = log sqrt(sum s^2)``,
3. energy share of the top component ``s_1^2 / sum s^2``,
4. spectral entropy ``-sum p log p`` with ``p = s^2 / sum s^2`` (nats),
5. excess kurtosis of the singular values ``m_4 / m_2^2 - 3`` (0 for rank 1).

The two magnitudes enter as logarithms, so that a linear head sees a scale as an offset
(the statistics of real LoRAs span decades). A module whose product is zero (not
trained) is left out of its type's aggregate. Statistics are averaged (and, with
``aggregate="mean_max"``, also maximised) over the modules of each type parsed from the
names (:mod:`gllora.models.module_names`: ``q_proj``, ``k_proj``, ...; other names are their own
type): 5 numbers per type, 20 for the paper's four attention projections. The head is
linear (``sum_type features_type @ W_type + b``); trained with a binary or multi-label
target it is logistic regression.

Because parameters are per type (``kernel_<type>``), not per module, the same
parameters apply to LoRAs with any number of layers: the model takes any structure
whose types it has seen (a type it has not seen is an error).

The statistics have no parameters (``fixed_features``): ``model.apply(variables, lora,
features_only=True)`` returns them per type as a :class:`~gllora.models.featurized.Featurized`
(keys the types, values ``[5 or 10]``), and the engine computes them once per run
instead of a rank-32 Jacobi solve per module at every step.
"""

from __future__ import annotations

import re
import zlib
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gllora import features
from gllora.lora import Lora
from gllora.models import module_names as names_lib
from gllora.models.featurized import Featurized

Array = jax.Array

NUM_STATS = 5
_TINY = 1e-12
TYPES_COLLECTION = "spectral_types"


def spectral_stats(s: Array, rank: Array) -> Array:
    """The five statistics of singular values ``s [..., r]`` (descending) over the first
    ``rank [...]`` of them: ``[..., 5]`` (see the module docstring)."""
    r = s.shape[-1]
    live = jnp.arange(r).reshape((1,) * rank.ndim + (r,)) < rank[..., None]
    s = jnp.where(live, s, 0.0)
    energy = jnp.sum(s * s, axis=-1)
    top = s[..., 0]
    safe = jnp.where(energy > 0, energy, 1.0)
    share = jnp.where(energy > 0, top * top / safe, 0.0)
    p = s * s / safe[..., None]
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    count = jnp.maximum(rank, 1).astype(s.dtype)
    mean = jnp.sum(s, axis=-1) / count
    dev = jnp.where(live, s - mean[..., None], 0.0)
    m2 = jnp.sum(dev**2, axis=-1) / count
    m4 = jnp.sum(dev**4, axis=-1) / count
    # Equal singular values (or rank 1): no spread, kurtosis defined as 0.
    flat = m2 <= 1e-12 * jnp.maximum(mean * mean, _TINY)
    kurt = jnp.where(flat, 0.0, m4 / jnp.where(flat, 1.0, m2 * m2) - 3.0)
    return jnp.stack(
        [jnp.log(top + _TINY), 0.5 * jnp.log(energy + _TINY), share, entropy, kurt], axis=-1
    )


def param_name(module_type: str) -> str:
    """A parameter-safe name for a module type (non-word characters replaced, digest kept)."""
    clean = re.sub(r"\W", "_", module_type)
    if clean == module_type:
        return module_type
    return f"{clean}_{zlib.crc32(module_type.encode()) & 0xFFFFFFFF:08x}"


def type_features(lora: Lora, aggregate: str) -> dict[str, Array]:
    """``{type: [5 or 10]}``: the statistics of one LoRA aggregated per module type."""
    per_type: dict[str, list[tuple[Array, Array]]] = {}
    for g, u, v, rank in zip(lora.spec.groups, lora.u, lora.v, lora.rank):
        s = features.singular_values(u, v)  # [k, r]
        stats = spectral_stats(s, rank)  # [k, 5]
        nonzero = s[:, 0] > 0
        for i, name in enumerate(g.names):
            per_type.setdefault(names_lib.module_type(name), []).append((stats[i], nonzero[i]))
    out = {}
    for t, rows in per_type.items():
        x = jnp.stack([a for a, _ in rows])  # [k_t, 5]
        w = jnp.stack([b for _, b in rows]).astype(x.dtype)[:, None]  # [k_t, 1]
        # Modules whose product is zero (not trained) do not count; none left: zeros.
        mean = jnp.sum(x * w, 0) / jnp.maximum(jnp.sum(w), 1.0)
        parts = [mean]
        if aggregate == "mean_max":
            parts.append(jnp.where(jnp.sum(w) > 0, jnp.max(jnp.where(w > 0, x, -jnp.inf), 0), 0.0))
        out[t] = jnp.concatenate(parts)
    return out


class Spectral(nn.Module):
    """Spectral statistics per module type and a linear (logistic) head.

    Invariant to an independent ``g_i`` in GL(r) per module (singular values only), to
    zero-padding of the rank, and to the order of the modules. Takes any structure whose
    module types it was initialised with (merge the variables of inits on several
    structures to cover more types).

    Attributes:
      aggregate: ``"mean"`` (the published detector: 5 numbers per type) or
        ``"mean_max"`` (also the maximum over the type's modules).
    """

    batch_layout: ClassVar[str] = "leading"
    any_structure: ClassVar[bool] = True
    #: The statistics are a fixed function of the LoRA: the engine may compute them once.
    fixed_features: ClassVar[bool] = True

    num_outputs: int
    aggregate: str = "mean"

    @nn.compact
    def __call__(
        self, lora: Lora | Featurized, train: bool = False, features_only: bool = False
    ) -> Array | Featurized:
        del train  # no dropout: a linear model
        if self.aggregate not in ("mean", "mean_max"):
            raise ValueError(
                f"Spectral: aggregate must be 'mean' or 'mean_max', got {self.aggregate!r}"
            )
        if isinstance(lora, Featurized):  # computed ahead by features_only=True
            if self.is_initializing():
                raise ValueError("Spectral: initialise with a Lora, not Featurized")
            feats = dict(zip(lora.keys, lora.values))
        else:
            if lora.u[0].ndim != 3:
                raise ValueError(
                    f"models take ONE LoRA (u [k, n, r]); got u {list(lora.u[0].shape)}. "
                    "Batch with jax.vmap(model.apply, in_axes=(None, 0))."
                )
            if lora.spec.extras:
                raise ValueError(
                    "Spectral takes no extra inputs (DoRA magnitudes); drop them first"
                )
            feats = type_features(lora, self.aggregate)
        check_types(self, feats)
        if features_only:
            return Featurized(tuple(feats), tuple(feats.values()))
        width = NUM_STATS * (2 if self.aggregate == "mean_max" else 1)
        fan_in = width * len(feats)
        out = self.param("bias", nn.initializers.zeros, (self.num_outputs,))
        for t, x in feats.items():
            kernel = self.param(
                f"kernel_{param_name(t)}",
                nn.initializers.normal(stddev=fan_in**-0.5),
                (width, self.num_outputs),
            )
            out = out + x @ kernel
        return out


def check_types(module: nn.Module, feats: dict[str, Array]) -> None:
    """Records the types at init; at apply, a type the model has no parameters for is an
    error naming it (instead of flax's missing-parameter message)."""
    if not module.is_initializing():
        known = set(module.variables.get(TYPES_COLLECTION, {}))
        unknown = sorted(t for t in feats if param_name(t) not in known)
        if unknown:
            raise ValueError(
                f"{type(module).__name__}: module types {unknown} were not seen when the model "
                f"was initialised (it knows {sorted(known)})"
            )
    for t in feats:
        module.variable(TYPES_COLLECTION, param_name(t), lambda: jnp.zeros((1,), jnp.int8))
