"""gllora: Learning on LoRAs in JAX/Flax.

Models whose input is the LoRA adapter of a finetuned model: the LoRA weight space
(:class:`Lora`), its GL(r) symmetry (:mod:`gllora.group`), featurizers, the paper's
five LoL models (:mod:`gllora.models`), adapter readers and dataset folders
(:mod:`gllora.io`), and symmetry checks (:mod:`gllora.testing`).
"""

from gllora import features, group, models, ops, testing
from gllora.lora import Lora, LoraSpec, in_axes, stack, to_layout
from gllora.train import Predictor

__all__ = [
    "Lora",
    "LoraSpec",
    "Predictor",
    "features",
    "group",
    "in_axes",
    "models",
    "ops",
    "stack",
    "testing",
    "to_layout",
]
