"""One worker thread owns the model; requests queue their images (bounded) and the worker runs them in batches.

A full queue is refused at once (:class:`QueueFull`, answered 503) rather than held in memory: the bound is on
images waiting, so memory stays bounded however many clients connect.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds as many images as its bound; the caller should retry later."""


class BatchQueue:
    """Bounded FIFO of images in front of one ``predict_batch`` callable, served by one thread.

    Args:
        predict_batch: list of images → list of results, in order (the predictor's own method).
        capacity: most images waiting (not counting the batch being run).
        max_batch: most images handed to ``predict_batch`` at once.
    """

    def __init__(self, predict_batch: Callable[[list[Any]], Sequence[Any]], capacity: int = 64, max_batch: int = 8):
        if capacity < 1 or max_batch < 1:
            raise ValueError("capacity and max_batch must be at least 1")
        self._predict_batch, self.capacity, self.max_batch = predict_batch, capacity, max_batch
        self._pending: deque[tuple[Any, Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches_run = 0

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="reconad-serve-model", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join()
        for _, fut in self._drain():
            fut.set_exception(RuntimeError("the service is shutting down"))

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, images: Sequence[Any]) -> list[Future]:
        """Queue all of ``images`` (or none: :class:`QueueFull`); one future per image, in order."""
        with self._cond:
            if self._thread is None:
                raise RuntimeError("BatchQueue.start() was not called")
            if len(self._pending) + len(images) > self.capacity:
                raise QueueFull(f"{len(self._pending)} images are waiting (limit {self.capacity}, "
                                "reconad serve --queue); retry shortly")
            futures = [Future() for _ in images]
            self._pending.extend(zip(images, futures))
            self._cond.notify()
        return futures

    def _drain(self) -> list[tuple[Any, Future]]:
        with self._cond:
            items = list(self._pending)
            self._pending.clear()
        return items

    def _next_batch(self) -> list[tuple[Any, Future]] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            n = min(self.max_batch, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [(img, fut) for img, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = list(self._predict_batch([img for img, _ in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"predict_batch returned {len(results)} results for {len(live)} images")
            except Exception as err:  # noqa: BLE001 — handed to every waiting request, which answers 500
                log.exception("prediction failed for a batch of %d images", len(live))
                for _, fut in live:
                    fut.set_exception(err)
                continue
            self.batches_run += 1
            for (_, fut), result in zip(live, results):
                fut.set_result(result)
