"""The steps' batches, in order, prepared ahead of the step that uses them.

`step_batches` walks the batch plans from a data position (a pure function of the plans: resuming starts it at
the saved position); `Prefetcher` runs it in a background thread, collating (and on CUDA pinning) up to
`depth` steps ahead, so the accelerator does not wait for the host between steps. The order and content of
the batches do not depend on the thread: a run with `--prefetch 0` makes the same updates.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional


@dataclass(frozen=True)
class Position:
    """Where the data stands after a step: the epoch, the next micro-batch of its plan, and the plan's length."""
    epoch: int
    batch_index: int
    epoch_batches: int


def step_batches(epoch_plan: Callable[[int], list], epoch: int, batch_index: int, grad_accum: int,
                 last_epoch: Optional[int]) -> Iterator[tuple[list, Position]]:
    """Each optimizer step's micro-batches (plan entries; a step may run into the next epoch) with the position
    after it. With `last_epoch` (an --epochs run) the walk ends with that epoch, the last step maybe short."""
    plan = epoch_plan(epoch)
    while True:
        micro: list = []
        while len(micro) < grad_accum:
            if batch_index >= len(plan):
                if last_epoch is not None and epoch >= last_epoch:
                    break
                epoch, batch_index = epoch + 1, 0
                plan = epoch_plan(epoch)
            micro.append(plan[batch_index])
            batch_index += 1
        if not micro:
            return
        yield micro, Position(epoch, batch_index, len(plan))


_DONE = object()


class Prefetcher:
    """Iterate `make(item)` for the items of `source`, computed `depth` items ahead in a daemon thread
    (`depth` 0: computed on demand, in the caller's thread). Errors reach the caller at the item where they
    happened. Use as a context manager: leaving it stops the thread."""

    def __init__(self, source: Iterator, make: Callable[[Any], Any], depth: int) -> None:
        self._source, self._make, self._depth = source, make, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._finished: Optional[BaseException] = None  # what every later next() raises once the end is reached

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _produce(self) -> None:
        try:
            for item in self._source:
                made = (self._make(item), None)
                if not self._put(made):
                    return
            self._put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, e))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._finished is not None:
            raise self._finished
        if self._depth == 0:
            try:
                return self._make(next(self._source))
            except Exception as e:  # noqa: BLE001 - StopIteration included: kept for every later call
                self._finished = e
                raise
        if self._thread is None:  # started on first use: a run that has nothing to do starts no thread
            self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self._thread.start()
        value, error = self._queue.get()
        if error is not None or value is _DONE:
            self._finished = error if error is not None else StopIteration()
            raise self._finished
        return value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
