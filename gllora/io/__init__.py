"""Reading adapter files and LoRA dataset folders (numpy + safetensors; no JAX tracing)."""

from gllora.io import dataset
from gllora.io.adapters import AdapterInfo, inspect, load_adapter

__all__ = ["AdapterInfo", "dataset", "inspect", "load_adapter"]
