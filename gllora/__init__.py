"""gllora: Learning on LoRAs in JAX/Flax.

Models whose input is the LoRA adapter of a finetuned model: the LoRA weight space
(:class:`Lora`, its static structure :class:`LoraSpec`), its GL(r) symmetry
(:mod:`gllora.group`), featurizers, the paper's five LoL models
(:mod:`gllora.models`), training and prediction (:mod:`gllora.train`,
:class:`Predictor`), adapter readers and dataset folders (:mod:`gllora.io`), and
symmetry checks (:mod:`gllora.testing`).

Every public name is imported on first use (a module-level ``__getattr__``), so
``import gllora.io`` reads adapters and datasets with numpy alone: JAX, Flax and
optax load only when something that needs them is used. The public API is
``__all__``:

- ``Lora``, ``LoraSpec``, ``GroupSpec``, ``LAYOUTS``: the data model
  (:mod:`gllora.lora`, :mod:`gllora.spec`); ``stack``, ``in_axes``, ``to_layout``:
  batches of LoRAs for ``jax.vmap``.
- ``Predictor``: a trained model's predictions (:mod:`gllora.train`).
- the subpackages ``io``, ``spec``, ``lora``, ``group``, ``ops``, ``features``,
  ``layers``, ``models``, ``train``, ``parallel``, ``testing``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> (module, attribute or None for the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "Lora": ("gllora.lora", "Lora"),  # through gllora.lora, so it is a registered pytree
    "LoraSpec": ("gllora.spec", "LoraSpec"),
    "GroupSpec": ("gllora.spec", "GroupSpec"),
    "LAYOUTS": ("gllora.spec", "LAYOUTS"),
    "stack": ("gllora.lora", "stack"),
    "in_axes": ("gllora.lora", "in_axes"),
    "to_layout": ("gllora.lora", "to_layout"),
    "Predictor": ("gllora.train", "Predictor"),
    **{
        name: (f"gllora.{name}", None)
        for name in (
            "features",
            "group",
            "io",
            "layers",
            "lora",
            "models",
            "ops",
            "parallel",
            "spec",
            "testing",
            "train",
        )
    },
}

__all__ = [
    "LAYOUTS",
    "GroupSpec",
    "Lora",
    "LoraSpec",
    "Predictor",
    "features",
    "group",
    "in_axes",
    "io",
    "layers",
    "lora",
    "models",
    "ops",
    "parallel",
    "spec",
    "stack",
    "testing",
    "to_layout",
    "train",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'gllora' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from gllora import (  # noqa: F401
        features,
        group,
        io,
        layers,
        lora,
        models,
        ops,
        parallel,
        spec,
        testing,
        train,
    )
    from gllora.lora import Lora, in_axes, stack, to_layout  # noqa: F401
    from gllora.spec import LAYOUTS, GroupSpec, LoraSpec  # noqa: F401
    from gllora.train import Predictor  # noqa: F401
