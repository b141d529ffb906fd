"""Replies asked for by many threads at about the same time, computed together (the web page's many users).

`ReplyBatcher(bot).reply(history, ...)` has `ChatBot.reply`'s signature and result. The request is prepared
(settings checked, context encoded) in the caller's thread, so bad input fails there, alone; it then waits
in a queue that one worker thread empties batch by batch through `ChatBot.reply_many`: one sampling batch
and one MMI batch for all the requests in it, each with its own history, seed and settings.

Why a hand-written queue and not Gradio's `batch=True`: Gradio hands a batched function lists of inputs
and expects lists back, so one user's bad input or error would fail the whole batch and the per-session
logic of the page (clear counters, transcripts, notices) would have to be rewritten list-wise. Here the
page keeps one handler per request (Gradio's `concurrency_limit` still bounds how many wait) and only the
model work is shared.

While a batch runs, new requests queue up and form the next batch as soon as it ends; an idle batcher
waits `window_s` after a first request for others to join (0: never waits).

With `workers` > 1, that many worker threads take batches from the one queue, so a batch can start while
another runs; the engine's thread policy then gives each running batch its share of the free cores (one
each on 2 cores), which keeps both cores busy through the single-threaded parts of a batch.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from dialogpt_zh.engine import ChatBot, Reply


class ReplyBatcher:
    """`workers` threads running queued reply requests together, up to `max_requests` per batch and about
    `max_rows` candidates (a single request is never split)."""

    def __init__(self, bot: ChatBot, *, window_s: float = 0.005, max_requests: int = 8, max_rows: int = 160,
                 workers: int = 1) -> None:
        if not (0 <= window_s <= 1 and max_requests >= 1 and max_rows >= 1 and workers >= 1):
            raise ValueError("window_s must be in [0, 1] s, max_requests, max_rows and workers at least 1")
        self.bot = bot
        self.window_s, self.max_requests, self.max_rows = window_s, max_requests, max_rows
        self._queue: list[tuple[Any, Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0                 # counters, for benchmarks and tests
        self.requests = 0
        self._workers = [threading.Thread(target=self._run, name=f"reply-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def reply(self, history, *, seed: int | None = None, **settings: Any) -> Reply:
        """`ChatBot.reply`, computed in a batch with whatever other requests are waiting."""
        job = self.bot.prepare_reply(history, seed=seed, **settings)  # bad input raises here, in this thread
        return self.submit(job).result()

    def submit(self, job) -> Future:
        """Queue a prepared request (`ChatBot.prepare_reply`); its Future gets the Reply or the error."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the reply batcher is closed")
            self._queue.append((job, future))
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    def _take_batch(self) -> list[tuple[Any, Future]]:
        """The next batch; [] only once the batcher is closed and its queue drained."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return []
                # an idle batcher gives others a moment to join the first request
                deadline = self._queue[0][0].prepared + self.window_s
                while len(self._queue) < self.max_requests and not self._closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._queue:  # else another worker took them during the wait: wait again
                    break
            batch, rows = [], 0
            while self._queue and len(batch) < self.max_requests:
                n = self._queue[0][0].gen.num_candidates
                if batch and rows + n > self.max_rows:
                    break
                batch.append(self._queue.pop(0))
                rows += n
            self.batches += 1
            self.requests += len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            try:
                replies = self.bot.reply_many([job for job, _ in batch])
            except BaseException as e:  # noqa: BLE001 - handed to the waiting callers
                if len(batch) == 1:
                    batch[0][1].set_exception(e)
                    continue
                for job, future in batch:  # find whose request failed: the others still get their replies
                    job.generator.manual_seed(job.seed)  # the same draws as if the batch had not failed
                    try:
                        future.set_result(self.bot.reply_many([job])[0])
                    except BaseException as e1:  # noqa: BLE001
                        future.set_exception(e1)
                continue
            for (_, future), reply in zip(batch, replies):
                future.set_result(reply)
