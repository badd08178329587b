"""Reading ahead in a background thread: the one prefetcher of gllora (standard library only).

:meth:`gllora.io.dataset.Dataset.iterate` reads batches of a dataset folder ahead with
it, and the training input pipeline (:func:`gllora.train.pipeline.prefetch`) reads and
puts batches on the devices ahead of each step with it. Reading a memory-mapped shard
and copying rows releases the GIL, so the consumer's work (a jitted step) overlaps it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetched(fn: Callable[[Any], T], items: Iterable[Any], depth: int) -> Iterator[T]:
    """``fn(x)`` for each ``x`` of ``items``, in order, computed up to ``depth`` ahead.

    One daemon thread runs ``fn`` (and draws ``items``, which may be a generator) while
    the caller consumes; an exception in it is raised in the caller at the item where
    it happened. Closing the generator early (``break``, an exception in the caller)
    stops the thread after the item it is computing and joins it, so no thread outlives
    the loop.

    Args:
      fn: the work per item (reading a batch).
      items: what to compute, in order.
      depth: results held ahead at most (``>= 1``): memory grows by that many results.
    """
    if depth < 1:
        raise ValueError(f"prefetched: depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = threading.Event()

    def put(item) -> bool:
        while not done.is_set():  # a timeout, so a full queue cannot outlive the consumer
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def work():
        try:
            for x in items:
                if not put((True, fn(x))):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))
            return
        put((False, None))

    thread = threading.Thread(target=work, daemon=True, name="gllora-prefetch")
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        done.set()
        thread.join()
