"""The five LoL models of the paper, and the peers users compare them with, behind one registry.

>>> model = build("glnet", num_outputs=3)             # also "mlp", "mlp_oalign", "mlp_svd", "mlp_dense"
>>> variables = model.init(key, lora)                 # ONE example
>>> y = model.apply(variables, lora)                  # [num_outputs]

Peers (not in the paper): ``w2t`` (Weight2Token's canonical rank tokens and transformers),
``spectral`` (spectral statistics per module type and a linear head) and ``glnet_seq``
(GL-invariant module tokens and a transformer across modules, for LoRAs of any
structure). :func:`any_structure` says which models take LoRAs of several structures
with one set of parameters.

Training mode (dropout) is ``model.apply(variables, lora, train=True,
rngs={"dropout": key})``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from gllora.models.featurized import Featurized
from gllora.models.glnet import GLNet, GLNetTrunk
from gllora.models.glnet_seq import GLNetSeq
from gllora.models.mlp import Mlp, MlpDense, MlpOAlign, MlpSvd
from gllora.models.spectral import Spectral
from gllora.models.w2t import W2T

#: name -> (class, symmetry of its output). "gl": invariant to GL(r)^L; "o": to O(r)^L only.
REGISTRY: dict[str, tuple[type[nn.Module], str | None]] = {
    "mlp": (Mlp, None),
    "mlp_oalign": (MlpOAlign, "o"),
    "mlp_svd": (MlpSvd, "gl"),
    "mlp_dense": (MlpDense, "gl"),
    "glnet": (GLNet, "gl"),
    # Peers (not in the paper).
    "w2t": (W2T, "gl"),
    "spectral": (Spectral, "gl"),
    "glnet_seq": (GLNetSeq, "gl"),
}

#: The paper's five models, in the order of its tables.
PAPER_MODELS = ("mlp", "mlp_oalign", "mlp_svd", "mlp_dense", "glnet")


def names() -> tuple[str, ...]:
    """Registered model names."""
    return tuple(REGISTRY)


def invariance(name: str) -> str | None:
    """The group a registered model is invariant to: ``"gl"``, ``"o"`` or ``None``."""
    return _lookup(name)[1]


def layout(name: str) -> str:
    """The batch layout the engine feeds a registered model (``gllora.LAYOUTS``).

    A model's output does not depend on it (models take ONE example); its speed does: a
    class attribute ``batch_layout`` says which is fastest for that model.
    """
    return _lookup(name)[0].batch_layout


def any_structure(name: str) -> bool:
    """Whether one set of the model's parameters takes LoRAs of different structures
    (other depths, missing modules): its parameters are per module type and shape, not
    per module (``glnet_seq``, ``spectral``)."""
    return bool(getattr(_lookup(name)[0], "any_structure", False))


def fixed_features(name: str) -> bool:
    """Whether a registered model's input features have no parameters, so that the engine
    may compute them once per run (``model.apply(variables, lora, features_only=True)``
    gives a :class:`Featurized`, which ``model.apply`` takes in place of the LoRA):
    ``mlp_svd`` and ``mlp_oalign``, whose Jacobi solves cost more than the rest of a step."""
    return bool(getattr(_lookup(name)[0], "fixed_features", False))


def _lookup(name: str) -> tuple[type[nn.Module], str | None]:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, num_outputs: int, **hparams: Any) -> nn.Module:
    """Builds a registered model.

    Args:
      name: one of :func:`names`.
      num_outputs: size of the output vector.
      **hparams: the model's attributes (e.g. ``equiv_width``, ``hidden``, ``template``).

    Raises:
      ValueError: unknown model name or hyperparameter.
    """
    cls, _ = _lookup(name)
    fields = set(cls.__dataclass_fields__) - {"parent", "name", "num_outputs"}
    unknown = set(hparams) - fields
    if unknown:
        raise ValueError(
            f"model {name!r} has no hyperparameters {sorted(unknown)}; "
            f"it takes: {', '.join(sorted(fields))}"
        )
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
    return cls(num_outputs=num_outputs, **hparams)


__all__ = [
    "PAPER_MODELS",
    "REGISTRY",
    "W2T",
    "Featurized",
    "GLNet",
    "GLNetSeq",
    "GLNetTrunk",
    "Mlp",
    "MlpDense",
    "MlpOAlign",
    "MlpSvd",
    "Spectral",
    "any_structure",
    "build",
    "fixed_features",
    "invariance",
    "layout",
    "names",
]
