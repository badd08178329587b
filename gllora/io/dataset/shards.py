"""The shard files of a dataset folder (``shards/NNNNN.safetensors``).

Writing a shard from buffered blocks, checking a shard's header against the schema,
mapping a shard into memory, and copying a batch's rows out of the mapped shards in
either batch layout. The folder format is described in :mod:`gllora.io.dataset`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gllora.io import _safetensors
from gllora.spec import LoraSpec

# rank_major batches are transposed through a buffer of _CHUNK_BYTES for _BLOCK_EXAMPLES
# examples at a time (measured best of 8-128 examples, 0.5-4 MB, at Qwen2 k/v shapes).
_CHUNK_BYTES = 2 << 20
_ALIGN = 64  # bytes: XLA's CPU buffers are 64-byte aligned
_BLOCK_EXAMPLES = 16


# -- writing ----------------------------------------------------------------------------


def write_blocks(path: str, blocks: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Writes blocks of rows as one safetensors file, each tensor the blocks concatenated.

    The same bytes as ``safetensors.numpy.save_file`` of the concatenated tensors, without
    concatenating them in memory first (a shard is written straight from its buffer).
    """
    names = {"<f4": "F32", "<i4": "I32", "<i8": "I64"}
    keys = sorted(blocks[0], key=lambda k: (-blocks[0][k].dtype.itemsize, k))
    header, offset = {}, 0
    for key in keys:
        first = blocks[0][key]
        rows = sum(b[key].shape[0] for b in blocks)
        size = sum(b[key].nbytes for b in blocks)
        header[key] = {
            "dtype": names[first.dtype.str],
            "shape": [rows, *first.shape[1:]],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in keys:
            f.writelines(np.ascontiguousarray(b[key]).data for b in blocks)


# -- reading ------------------------------------------------------------------------


def check_shard(folder: str, spec: LoraSpec, entry: Mapping[str, Any]) -> _safetensors.Header:
    """Validates one shard's header against the schema (reads no tensor data)."""
    rel = entry["file"]
    if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
        raise ValueError(
            f"{os.path.join(folder, 'schema.json')}: shard file {rel!r} is not inside "
            "the dataset folder"
        )
    file = os.path.join(folder, rel)
    try:
        header = _safetensors.read_header(file)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{file}: missing (listed in {os.path.join(folder, 'schema.json')})"
        ) from None
    if "bytes" in entry and header.file_size != entry["bytes"]:
        raise ValueError(
            f"{file}: {header.file_size} bytes, the schema says {entry['bytes']}; the shard "
            "was truncated or changed"
        )
    num = entry["num_examples"]
    want = {"ids": ("I64", (num,))}
    for gi, (group, r) in enumerate(zip(spec.groups, entry["ranks"])):
        k = len(group.names)
        want[f"g{gi}.u"] = ("F32", (num, k, group.n, r))
        want[f"g{gi}.v"] = ("F32", (num, k, group.m, r))
        want[f"g{gi}.rank"] = ("I32", (num, k))
    for kind, names in spec.extras:
        for name in names:
            want[f"extra.{kind}.{name}"] = ("F32", None)
    got = header.entries
    if set(got) != set(want):
        raise ValueError(
            f"{file}: tensors differ from the schema: unexpected "
            f"{sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}"
        )
    for key, (dtype, shape) in want.items():
        e = got[key]
        if shape is None:  # an extra: [N_s, size]
            ok = len(e.shape) == 2 and e.shape[0] == num
            shape_text = f"[{num}, size]"
        else:
            ok = e.shape == shape
            shape_text = str(list(shape))
        if not ok or e.dtype != dtype:
            what = ""
            if key.startswith("g") and "." in key:
                what = f" for modules {spec.groups[int(key[1:].split('.')[0])].describe()}"
            raise ValueError(
                f"{file}: tensor {key!r} is {e.dtype} {list(e.shape)}, the schema says "
                f"{dtype} {shape_text}{what}"
            )
    return header


_NUMPY_DTYPES = {"F32": "<f4", "I32": "<i4", "I64": "<i8"}  # the dtypes a shard holds


class Mapped:
    """One shard's file mapped read-only, with its tensors as numpy views of the map."""

    def __init__(self, header: _safetensors.Header):
        with open(header.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.tensors = {}
        for key, e in header.entries.items():
            dtype = np.dtype(_NUMPY_DTYPES[e.dtype])
            count = math.prod(e.shape)
            self.tensors[key] = np.frombuffer(self.map, dtype, count=count, offset=e.start).reshape(
                e.shape
            )
        self.entries = header.entries

    def willneed(self, key: str, rows: np.ndarray) -> None:
        """Asks the kernel to start reading the given rows of ``key`` (cold page cache)."""
        e = self.entries[key]
        n = e.shape[0]
        row_bytes = (e.end - e.start) // n if n else 0
        for row in rows.tolist():
            start = e.start + row * row_bytes
            aligned = start - start % mmap.PAGESIZE
            self.map.madvise(mmap.MADV_WILLNEED, aligned, start + row_bytes - aligned)


def consecutive_runs(rows: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, dst, length)`` runs where both rows and destinations are consecutive."""
    if len(rows) == 1:
        return [(int(rows[0]), int(dst[0]), 1)]
    cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(rows)]])
    return [(int(rows[s]), int(dst[s]), int(e - s)) for s, e in zip(starts, ends)]


def aligned_empty(shape: tuple[int, ...], dtype=np.float32, zero: bool = False) -> np.ndarray:
    """An uninitialised (or zeroed) array whose data starts on a 64-byte boundary.

    ``jax.device_put`` on a CPU can then use the buffer as it is instead of copying it:
    for a 51 MB batch of 32 Qwen2-1.5B k/v LoRAs, 0.6 ms instead of 34 ms here
    (numpy's own allocations are only 16-byte aligned).
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    out = raw[offset : offset + nbytes].view(dtype).reshape(shape)
    if zero:
        out.fill(0)
    return out


def gather_leading(plan, gi, what, B, k, size, r) -> np.ndarray:
    """Factor ``what`` (``"u"`` or ``"v"``) of group ``gi`` for a batch in the leading
    layout, ``[B, k, size, r]``, from ``plan``: ``(shard, Mapped, runs, batch
    positions, rows)`` per shard read."""
    out = aligned_empty((B, k, size, r), zero=True)
    for si, mapped, runs, _, _ in plan:
        src = mapped.tensors[f"g{gi}.{what}"]
        rs = src.shape[-1]
        for row, dst, n in runs:
            if rs == r:
                out[dst : dst + n] = src[row : row + n]
            else:
                out[dst : dst + n, ..., :rs] = src[row : row + n]
    return out


def gather_rank_major(plan, ranks, gi, what, B, k, size, r) -> np.ndarray:
    """As :func:`gather_leading`, in the rank-major layout ``[k, size, B, r]``;
    ``ranks [S, groups]`` are the stored ranks of every shard."""
    # [k, size, B, r] is [K, B, r] with K = k * size rows; each example's factors are
    # one contiguous [K, rs] block in its shard. For each block of at most
    # _BLOCK_EXAMPLES examples, rows are copied through an L2-sized [block, chunk, r]
    # buffer, then moved by one transposing copy per chunk, each row of r floats as
    # one opaque element (numpy copies those several times faster than r floats).
    K = k * size
    out = aligned_empty((k, size, B, r))
    row_type = np.dtype((np.void, 4 * r))
    dst = out.reshape(K, B, r).view(row_type)[..., 0]  # [K, B]
    sources = [
        (mapped.tensors[f"g{gi}.{what}"].reshape(-1, K, ranks[si, gi]), runs)
        for si, mapped, runs, _, _ in plan
    ]
    for b0 in range(0, B, _BLOCK_EXAMPLES):
        b1 = min(B, b0 + _BLOCK_EXAMPLES)
        pieces = []  # (source, row, buffer row, length, stored rank) inside [b0, b1)
        for src, runs in sources:
            for row, d, n in runs:
                lo, hi = max(d, b0), min(d + n, b1)
                if lo < hi:
                    pieces.append((src, row + lo - d, lo - b0, hi - lo, src.shape[-1]))
        chunk = min(K, max(1, _CHUNK_BYTES // (4 * r * (b1 - b0))))
        buf = np.zeros((b1 - b0, chunk, r), np.float32)  # columns past rs stay zero
        buf_rows = buf.view(row_type)[..., 0]  # [block, chunk]
        for c in range(0, K, chunk):
            e = min(K, c + chunk)
            for src, row, d, n, rs in pieces:
                if rs == r:
                    buf[d : d + n, : e - c] = src[row : row + n, c:e]
                else:
                    buf[d : d + n, : e - c, :rs] = src[row : row + n, c:e]
            dst[c:e, b0:b1] = buf_rows[:, : e - c].T
    return out
