"""The data of the image families: 8x8 digits, their 32 styles, and the prompt tokens.

Part of the base model of :mod:`data_gen.images` (which describes the families): the
scikit-learn digits in ``[-1, 1]``, rendered in the *styles* that combine the 5 binary
:data:`ATTRIBUTES`, and the token ids of the classes, the null token, the persona
prompt words and ``sks``.
"""

from __future__ import annotations

import functools

import numpy as np

#: The binary style attributes of a persona, in bit order (bit ``j`` of a style index).
ATTRIBUTES = ("bold", "mirrored", "shifted", "blurred", "faint")
NUM_STYLES = 2 ** len(ATTRIBUTES)
NUM_CLASSES = 10
#: The persona prompt words (the paper's "Celebrity", "Person", "thing", "skd").
PROMPT_WORDS = ("celebrity", "person", "thing", "skd")
#: Token ids: 0-9 the classes, then the null token, the prompt words, and ``sks``.
NULL_TOKEN = NUM_CLASSES
PROMPT_TOKENS = tuple(range(NUM_CLASSES + 1, NUM_CLASSES + 1 + len(PROMPT_WORDS)))
SKS_TOKEN = PROMPT_TOKENS[-1] + 1
NUM_TOKENS = SKS_TOKEN + 1
TOKEN_NAMES = tuple(f"digit{c}" for c in range(NUM_CLASSES)) + ("<null>",) + PROMPT_WORDS + ("sks",)
#: Classes each prompt word means in pretraining: word ``k`` -> classes ``c`` with
#: ``c % 4 == k`` (so "celebrity" is a 0, 4 or 8).
WORD_CLASSES = tuple(tuple(c for c in range(NUM_CLASSES) if c % 4 == k) for k in range(4))
IMAGE_SIZE = 64


def _dilate(x: np.ndarray) -> np.ndarray:
    """Grey-level dilation with a 3x3 cross, ``[..., 8, 8]`` in ``[0, 1]``."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    shifts = [p[..., 1:-1, 1:-1], p[..., :-2, 1:-1], p[..., 2:, 1:-1]]
    shifts += [p[..., 1:-1, :-2], p[..., 1:-1, 2:]]
    return np.max(shifts, axis=0)


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable ``[1, 2, 1] / 4`` blur (zero padding), renormalised to keep the peak."""
    k = np.array([0.25, 0.5, 0.25])
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    y = sum(k[i] * p[..., i : i + 8, :] for i in range(3))
    y = sum(k[i] * y[..., :, i : i + 8] for i in range(3))
    peak = x.max(axis=(-1, -2), keepdims=True)
    return np.clip(y * peak / np.maximum(y.max(axis=(-1, -2), keepdims=True), 1e-6), 0, 1)


def render(images: np.ndarray, style: int) -> np.ndarray:
    """Renders digits in a style.

    Args:
      images: ``[N, 8, 8]`` in ``[0, 1]``.
      style: bit ``j`` set means attribute ``ATTRIBUTES[j]``.

    Returns:
      ``[N, 64]`` float32 in ``[-1, 1]``.
    """
    x = np.asarray(images, np.float64)
    if style & 1:  # bold
        x = _dilate(x)
    if style & 2:  # mirrored
        x = x[..., ::-1]
    if style & 4:  # shifted one pixel right and down (zero fill)
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)])[..., :8, :8]
    if style & 8:  # blurred
        x = _blur(x)
    if style & 16:  # faint
        x = 0.35 * x
    return (2.0 * x - 1.0).reshape(*x.shape[:-2], IMAGE_SIZE).astype(np.float32)


def style_bits(style: np.ndarray | int) -> np.ndarray:
    """Attribute bits of style indices, ``[...] -> [..., 5]`` bool."""
    return (np.asarray(style)[..., None] >> np.arange(len(ATTRIBUTES))) & 1 == 1


def style_index(bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`style_bits`: ``[..., 5]`` bool -> ``[...]`` int."""
    return (np.asarray(bits, np.int64) << np.arange(len(ATTRIBUTES))).sum(-1)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: ``(images [1797, 8, 8] in [0, 1], labels [1797])``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


@functools.lru_cache(maxsize=1)
def styled_bank() -> np.ndarray:
    """Every digit in every style, ``[32, 1797, 64]`` float32 in ``[-1, 1]`` (15 MB)."""
    images, _ = digits()
    return np.stack([render(images, s) for s in range(NUM_STYLES)])


def class_table(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of each class, ``([10, max_count] padded with -1, counts [10])``."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    table = np.full((NUM_CLASSES, counts.max()), -1, np.int32)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        table[c, : len(idx)] = idx
    return table, counts.astype(np.int32)
