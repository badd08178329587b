"""gllora: Learning on LoRAs in JAX/Flax.

Models whose input is the LoRA adapter of a finetuned model: the LoRA weight space,
its GL(r) symmetry, the paper's five LoL models, adapter readers, dataset folders,
training and prediction.
"""

from gllora.lora import Lora

__all__ = ["Lora"]
