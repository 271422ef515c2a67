"""Making the next batches in one background thread while the current one trains.

What a batch costs the host (gathering its images from a memory map, which may fault pages in
from disk; the uint8-to-float conversion; pinning for a GPU copy) is NumPy and torch work that
releases the GIL, so a plain thread overlaps it with the training step, without the processes,
pickling and shared memory of DataLoader workers. The thread runs the producer's iterator in
order and hands over what it yields unchanged: prefetching changes when a batch is made, never
what it holds, so training stays bit-for-bit repeatable.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

THREAD_NAME = "pipeline-prefetch"
_POLL_S = 0.05  # how soon a producer waiting on a full queue notices that it was stopped
_END = object()


class _Failure:
    """An exception raised by the producer, on its way to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetched(Generic[T]):
    """Iterates `produce` in a daemon thread, at most `depth` items ahead of the consumer.

    An exception in `produce` is raised by the consumer's next `next()`. `close()` stops the
    thread (it finishes the item it is making, then ends) and waits for it; it is called when
    the items run out, on a producer error, and by whoever abandons the iteration early
    (`TensorBatches.close`: a Lightning run stopped by an exception or a batch limit).
    """

    def __init__(self, produce: Iterator[T], *, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # The thread holds the producer, the queue and the event, never `self`: an abandoned
        # Prefetched can be garbage-collected, which stops its thread (`__del__`).
        self._thread = threading.Thread(target=_fill, args=(produce, self._queue, self._stop),
                                        name=THREAD_NAME, daemon=True)
        self._done = False
        self._thread.start()

    def __iter__(self) -> Prefetched[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()  # interruptible: Ctrl+C reaches the main thread here too
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait (up to `timeout` s) until it has ended; idempotent."""
        self._done = True
        self._stop.set()
        if threading.current_thread() is self._thread:  # closed from its own producer: it is ending
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a read (a hung network file system): it is a daemon
            log.warning("The batch prefetch thread did not stop within %.0f s; leaving it to end with the process.",
                        timeout)

    def __del__(self) -> None:
        self._stop.set()


def _fill(produce: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in produce:
            if not _put(out, item, stop):
                return
        _put(out, _END, stop)
    except BaseException as err:  # handed to the consumer, which re-raises it
        _put(out, _Failure(err), stop)
    finally:
        close = getattr(produce, "close", None)
        if close is not None:
            close()


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` once there is room; False if stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
