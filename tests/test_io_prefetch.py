"""Tests of gllora.io.dataset.prefetched, the one read-ahead thread (dataset iteration and
the training pipeline both use it)."""

from __future__ import annotations

import threading
import time

import pytest

from gllora.io.dataset import prefetched


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gllora-prefetch"]


def test_results_in_order_and_errors_where_they_happen():
    assert list(prefetched(lambda x: x * x, range(7), depth=2)) == [0, 1, 4, 9, 16, 25, 36]
    assert list(prefetched(lambda x: x, iter(()), depth=1)) == []

    def fn(x):
        if x == 3:
            raise KeyError(f"item {x}")
        return x

    got = []
    with pytest.raises(KeyError, match="item 3"):
        for y in prefetched(fn, range(10), depth=2):
            got.append(y)  # noqa: PERF402 - what arrived before the error
    assert got == [0, 1, 2]  # every item before the failing one, none after
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(prefetched(fn, range(3), depth=0))


def test_reads_at_most_depth_ahead_and_leaving_early_joins_the_thread():
    depth = 3
    calls = []

    def fn(x):
        calls.append(x)
        return x

    gen = prefetched(fn, range(100), depth=depth)
    assert next(gen) == 0
    # The consumer holds item 0; the queue holds `depth` more, and the worker has computed
    # one further item that waits for room: depth + 2 calls, and no more however long we wait.
    deadline = time.monotonic() + 30
    while len(calls) < depth + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(calls) == depth + 2
    assert len(_prefetch_threads()) == 1
    gen.close()  # what `break` out of a for loop does
    assert _prefetch_threads() == []
    assert len(calls) == depth + 2
    # Consumed to the end, the same read-ahead computes every item once.
    assert list(prefetched(fn, range(10), depth=depth)) == list(range(10))
