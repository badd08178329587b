"""Defensive safetensors header parsing and tensor reads (numpy only, no JAX).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON (``{"__metadata__": {str: str}, key: {"dtype", "shape", "data_offsets"}}``), then
the tensor bytes. Everything in the header is checked here against the file size
BEFORE any tensor byte is read: a truncated, empty or random file, a header length
that runs past the end, a header that is not JSON, unknown dtypes, shapes that do
not match their byte ranges, and overlapping or out-of-range offsets all raise a
``ValueError`` that names the file (and the tensor key where there is one).

Tensors are then read with a plain ``seek`` + ``read`` of their byte range, so
tensors a reader does not need (PEFT's saved ``base_layer.weight``) are never read.
numpy has no bfloat16: ``BF16`` bytes are widened to float32 here (exact).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import struct
import threading
from typing import Any, NamedTuple, Self

import numpy as np

#: safetensors caps the header at 100 MB; a larger length is corruption, not a header.
_MAX_HEADER_BYTES = 100_000_000

#: dtype name -> (bits per element, numpy dtype or None when numpy cannot hold it).
_DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "?"),
    "U8": (8, "u1"),
    "I8": (8, "i1"),
    "U16": (16, "<u2"),
    "I16": (16, "<i2"),
    "U32": (32, "<u4"),
    "I32": (32, "<i4"),
    "U64": (64, "<u8"),
    "I64": (64, "<i8"),
    "F16": (16, "<f2"),
    "BF16": (16, None),
    "F32": (32, "<f4"),
    "F64": (64, "<f8"),
    "C64": (64, "<c8"),
    "F8_E4M3": (8, None),
    "F8_E5M2": (8, None),
    "F8_E8M0": (8, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "F4": (4, None),
}

_BITS = {name: bits for name, (bits, _) in _DTYPES.items()}

#: dtypes a LoRA factor may have (read as float32 or float64).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class TensorEntry(NamedTuple):
    """One tensor of the header: its dtype name, shape and absolute byte range."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    Attributes:
      path: the file.
      entries: tensor key -> entry, in header order.
      metadata: the raw ``__metadata__`` dict (``{}`` when absent).
      file_size: size of the file in bytes.
      raw: the header's JSON bytes (what makes two headers the same).
    """

    path: str
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int
    raw: bytes | None = None


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


#: bytes read at once for a header: most adapter headers fit, so one read() suffices
_FIRST_READ = 1 << 16


def read_header(path: str | os.PathLike) -> Header:
    """Reads and validates the header of a safetensors file; reads no tensor bytes.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: naming the file (and tensor key), for anything that is not a
        well-formed safetensors file.
    """
    path = os.fspath(path)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, _FIRST_READ))
        length = _header_length(path, head, size)
        if 8 + length > len(head):
            head += f.read(8 + length - len(head))
    if len(head) < 8 + length:
        raise _fail(path, f"truncated while reading the {length}-byte header")
    return parse_header(path, memoryview(head)[8 : 8 + length], size)


def read_file(
    path: str | os.PathLike, reuse: ReadBuffer | None = None
) -> tuple[Header, np.ndarray]:
    """The validated header and every byte of the file, read with one ``readinto``.

    Args:
      path: the file.
      reuse: read into this buffer (grown as needed) instead of a new array, which
        spares the page faults of fresh memory; the result is then only valid until
        the buffer's next use.

    Returns:
      ``(header, data)``: ``data`` is a ``uint8`` array of the whole file (64-byte
      aligned), so that :func:`view` gives each tensor without a copy.
    """
    path = os.fspath(path)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = _aligned_bytes(size) if reuse is None else reuse.get(size)
        got = f.readinto(data)
        while got < size:  # readinto may return short reads on some filesystems
            more = f.readinto(memoryview(data)[got:])
            if not more:
                break
            got += more
    if got < size:
        raise _fail(path, f"the file is shorter than its size ({got} of {size} bytes read)")
    length = _header_length(path, data[:8].tobytes(), size)
    return parse_header(path, memoryview(data)[8 : 8 + length], size), data


class ReadBuffer(threading.local):
    """A per-thread byte buffer that :func:`read_file` reads into, reused across files."""

    def __init__(self):
        self._data = _aligned_bytes(0)

    def get(self, size: int) -> np.ndarray:
        if self._data.size < size:
            self._data = _aligned_bytes(max(size, 2 * self._data.size))
        return self._data[:size]


def _aligned_bytes(size: int) -> np.ndarray:
    raw = np.empty(size + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset : offset + size]


def _header_length(path: str, head: bytes, size: int) -> int:
    if size < 8:
        what = "is empty" if size == 0 else f"has only {size} bytes"
        raise _fail(path, f"not a safetensors file: it {what} (a header length takes 8)")
    (length,) = struct.unpack("<Q", head[:8])
    if length == 0 or length > size - 8 or length > _MAX_HEADER_BYTES:
        raise _fail(
            path,
            f"not a safetensors file or truncated: the header length {length} runs past "
            f"the end of the file ({size} bytes)"
            if length > size - 8
            else f"not a safetensors file: implausible header length {length}",
        )
    return length


def _count_keys(header: dict[str, Any]) -> int:
    """The keys of a header object and of the objects one level inside it (a
    well-formed header nests no deeper; a deeper one only takes the slow path)."""
    return len(header) + sum(len(v) for v in header.values() if type(v) is dict)


#: Parsed headers by their exact bytes and the file size: adapters of one base model
#: and trainer have byte-identical headers, so a folder of them is parsed once. Only
#: successful parses are kept (errors name their file); the entries are shared between
#: the Header objects returned and must not be changed.
_HEADER_CACHE: dict[tuple[bytes, int], tuple[dict[str, TensorEntry], dict[str, str]]] = {}
_HEADER_CACHE_SIZE = 256


def parse_header(path: str, raw: bytes | memoryview, size: int) -> Header:
    """Validates the JSON header ``raw`` of a file of ``size`` bytes (see :func:`read_header`)."""
    raw = bytes(raw)
    cached = _HEADER_CACHE.get((raw, size))
    if cached is not None:
        return Header(path, cached[0], cached[1], size, raw)
    header = _parse_header(path, raw, size)
    if _HEADER_CACHE_SIZE:
        if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
            _HEADER_CACHE.pop(next(iter(_HEADER_CACHE)))  # the oldest
        _HEADER_CACHE[(raw, size)] = (header.entries, header.metadata)
    return header


def _parse_header(path: str, raw: bytes, size: int) -> Header:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"not a safetensors file: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header is JSON but not an object ({type(header).__name__})")
    # json.loads keeps the last of repeated keys. Every key in the text is followed by
    # '":' and a '":' inside a string is always escaped ('\":'), so the text holds exactly
    # as many keys as the parsed objects unless one repeats (or unusual spacing, escapes
    # or nesting make the count differ): then parse again, slowly, to name the repeat.
    if raw.count(b'":') - raw.count(b'\\":') != _count_keys(header):
        try:
            header = json.loads(raw, object_pairs_hook=_no_duplicates)
        except ValueError as e:
            raise _fail(path, f"not a safetensors file: the header is not JSON ({e})") from None

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")

    data_start = 8 + len(raw)
    data_len = size - data_start
    bits = _BITS
    entries: dict[str, TensorEntry] = {}
    spans = []
    for key, spec in header.items():
        # The fast path of a well-formed entry; anything else is explained below.
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            count = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise TypeError
                count *= d
            if (
                not key
                or type(begin) is not int
                or type(end) is not int
                or not 0 <= begin <= end <= data_len
                or bits[dtype] * count != 8 * (end - begin)
            ):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            _explain_entry(path, key, spec, data_len)
            raise AssertionError("unreachable") from None
        entries[key] = TensorEntry(key, dtype, tuple(shape), data_start + begin, data_start + end)
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    for (_, prev_end, prev_key), (start, _, key) in itertools.pairwise(spans):
        if start < prev_end:
            raise _fail(path, f"tensors {prev_key!r} and {key!r} overlap in the file")
    return Header(path, entries, dict(metadata), size, raw)


def _explain_entry(path: str, key: str, spec: Any, data_len: int) -> None:
    """Raises the precise error for an entry that failed the fast check."""
    where = f"tensor {key!r}"
    if not key:
        raise _fail(path, "a tensor has an empty key")
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise _fail(path, f"{where}: header entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _fail(path, f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(
            path, f"{where}: data_offsets {offsets!r} must be [begin, end], 0 <= begin <= end"
        )
    begin, end = offsets
    if end > data_len:
        raise _fail(
            path,
            f"{where}: bytes [{begin}, {end}) run past the end of the data ({data_len} bytes); "
            "the file is truncated",
        )
    bits = _DTYPES[dtype][0] * math.prod(shape)
    raise _fail(
        path,
        f"{where}: {dtype} {shape} needs {bits / 8:g} bytes but data_offsets give {end - begin}",
    )


def view(header: Header, data: np.ndarray, key: str) -> np.ndarray:
    """Tensor ``key`` of a file read by :func:`read_file`, as a view of ``data``
    (no copy; ``BF16`` is widened to a float32 copy, exactly).

    Raises:
      ValueError: naming the file and key, for a dtype numpy cannot hold.
    """
    entry = header.entries[key]
    np_dtype = _DTYPES[entry.dtype][1]
    raw = data[entry.start : entry.end]
    if np_dtype is not None:
        return raw.view(np_dtype).reshape(entry.shape)
    if entry.dtype == "BF16":
        # bfloat16 is the top half of a float32: shifting the bits up is exact.
        bits = raw.view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(entry.shape)
    raise _fail(header.path, f"tensor {key!r}: dtype {entry.dtype} is not supported for reading")


class TensorReader:
    """Reads tensors of one validated file; opens it on first use. Use as a context manager."""

    def __init__(self, header: Header):
        self.header = header
        self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a numpy array (``BF16`` widened to float32).

        Raises:
          ValueError: naming the file and key, for a dtype numpy cannot hold or a file
            that shrank since its header was read.
        """
        entry = self.header.entries[key]
        path = self.header.path
        np_dtype = _DTYPES[entry.dtype][1]
        if np_dtype is None and entry.dtype != "BF16":
            raise _fail(path, f"tensor {key!r}: dtype {entry.dtype} is not supported for reading")
        if self._file is None:
            # Kept open across reads of one file; closed by __exit__.
            self._file = open(path, "rb")  # noqa: SIM115
        self._file.seek(entry.start)
        nbytes = entry.end - entry.start
        buf = self._file.read(nbytes)
        if len(buf) != nbytes:
            raise _fail(path, f"tensor {key!r}: the file is shorter than its header says")
        if entry.dtype == "BF16":
            # bfloat16 is the top half of a float32: shifting the bits up is exact.
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(entry.shape)
        return np.frombuffer(buf, dtype=np_dtype).reshape(entry.shape)

    def read_scalar(self, key: str) -> float:
        """A tensor with one element (kohya's ``alpha``, any dtype) as a Python float."""
        self._check_scalar(key)
        return float(self.read(key).reshape(()))

    def scalar_of(self, x: np.ndarray, key: str) -> float:
        """As :meth:`read_scalar`, for the tensor ``x`` already read."""
        self._check_scalar(key)
        return float(x.reshape(()))

    def _check_scalar(self, key: str) -> None:
        entry = self.header.entries[key]
        if entry.dtype == "C64" or entry.dtype not in _DTYPES:
            raise _fail(
                self.header.path, f"tensor {key!r}: dtype {entry.dtype} is not a real number"
            )
        if math.prod(entry.shape) != 1:
            raise _fail(
                self.header.path,
                f"tensor {key!r} should hold one number, has shape {list(entry.shape)}",
            )


def memmap(header: Header) -> dict[str, np.ndarray]:
    """Every tensor of a validated file as a read-only memory map; no byte is read now.

    Reading rows of a map touches only their pages, so a dataset shard much larger
    than memory can be sampled. ``BF16`` and sub-byte dtypes cannot be mapped.
    """
    out = {}
    for key, entry in header.entries.items():
        np_dtype = _DTYPES[entry.dtype][1]
        if np_dtype is None:
            raise _fail(header.path, f"tensor {key!r}: dtype {entry.dtype} cannot be memory-mapped")
        if math.prod(entry.shape) == 0:
            out[key] = np.zeros(entry.shape, np_dtype)
        else:
            out[key] = np.memmap(
                header.path, dtype=np_dtype, mode="r", offset=entry.start, shape=entry.shape
            )
    return out


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_WORDS = {"None": None, "null": None, "True": True, "true": True, "False": False, "false": False}


def _parse_value(raw: str) -> Any:
    """A metadata string as a number, bool, None or JSON value where that is obvious."""
    text = raw.strip()
    if text in _WORDS:
        return _WORDS[text]
    if _NUMBER.fullmatch(text):
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return raw
    return raw


def parse_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """``__metadata__`` with obvious values parsed: kohya writes ``"12"``, ``"1e-4"``,
    ``"None"``, ``"True"`` and JSON objects (``ss_tag_frequency``) as strings."""
    return {key: _parse_value(value) for key, value in metadata.items()}
