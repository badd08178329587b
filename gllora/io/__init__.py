"""Reading adapter files and LoRA dataset folders, with numpy and safetensors alone.

Nothing here imports JAX (a test checks it in a fresh interpreter): adapters and
dataset batches are :class:`gllora.Lora` objects of numpy arrays, which reach a device
only when a model runs. One folder per concern:

- :mod:`gllora.io.adapters` (re-exported here): :func:`inspect` (header only) and
  :func:`load_adapter` for PEFT, diffusers, kohya, LyCORIS and ComfyUI-style files, one
  reader per file family in :mod:`gllora.io.formats`;
- :mod:`gllora.io.dataset`: dataset folders (:func:`gllora.io.dataset.open`,
  :class:`gllora.io.dataset.DatasetWriter`);
- :mod:`gllora.io.importer`: a folder of adapters plus a labels table to a dataset folder
  (``python -m experiments.import_adapters``).
"""

from gllora.io import dataset
from gllora.io.adapters import AdapterInfo, ModuleInfo, NonLora, inspect, load_adapter

__all__ = ["AdapterInfo", "ModuleInfo", "NonLora", "dataset", "inspect", "load_adapter"]
