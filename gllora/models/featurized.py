"""Model inputs computed ahead of the model, for models whose features have no parameters.

A model with ``fixed_features = True`` returns its first layer's inputs from
``model.apply(variables, lora, features_only=True)`` as a :class:`Featurized` and takes
one back in place of the LoRA; the engine computes them once per run
(:mod:`gllora.train.featurized`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

Array = jax.Array


@flax.struct.dataclass
class Featurized:
    """The first layer's inputs of ONE LoRA (or a batch of them, on leading axes).

    ``keys`` name the entries (static); ``values[i]`` is ``[..., k_i, F_i]`` for the MLPs
    (one entry per module group; :mod:`gllora.models.mlp`), one entry per module type
    for Spectral (``[..., 5 or 10]``), and ``U, V, s, live`` per group for W2T.
    ``spec``: the LoRA's structure, for models that need its module names (W2T), else None.
    """

    keys: tuple[str, ...] = flax.struct.field(pytree_node=False)
    values: tuple[Array, ...]
    spec: Any = flax.struct.field(pytree_node=False, default=None)
