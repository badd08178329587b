"""Memory-mapped, validated reads of safetensors files (numpy only).

The header is checked against the file size before any tensor is touched: its length,
its JSON, every dtype, shape and byte range. Tensors come back as read-only
``np.memmap`` views, so reading a few rows of a large file touches only those pages.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on header size


def read_header(path: str) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parses and validates a safetensors header.

    Returns:
      ``(tensors, metadata, data_start)``: ``{name: {"dtype", "shape", "data_offsets"}}``,
      the ``__metadata__`` string map, and the byte offset where tensor data starts.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file, for any truncation or inconsistency.
    """
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(
            f"{path}: {size} bytes is too short for a safetensors file (empty or truncated)"
        )
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError(
                f"{path}: header length {length} runs past the end of the "
                f"{size}-byte file (truncated or not a safetensors file)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ is not a JSON object")
    data_start = 8 + length
    data_size = size - data_start
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        itemsize = (
            2
            if dtype == "BF16"
            else (np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else None)
        )
        if itemsize is None:
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
            raise ValueError(
                f"{path}: tensor {name!r}: byte range [{start}, {end}) lies outside "
                f"the {data_size} data bytes (truncated file?)"
            )
        if end - start != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(
                f"{path}: tensor {name!r}: {end - start} bytes do not hold {dtype} {shape}"
            )
    return header, metadata, data_start


def memmap_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as read-only memory maps (BF16 is not mapped)."""
    header, _, data_start = read_header(path)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r}: dtype {info['dtype']} cannot be memory-mapped"
            )
        shape = tuple(info["shape"])
        start = data_start + info["data_offsets"][0]
        if int(np.prod(shape, dtype=np.int64)) == 0:
            out[name] = np.zeros(shape, _DTYPES[info["dtype"]])
        else:
            out[name] = np.memmap(
                path, dtype=_DTYPES[info["dtype"]], mode="r", offset=start, shape=shape
            )
    return out
