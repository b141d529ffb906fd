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

By default new requests queue up while a batch runs and form the next batch when it ends. With
`continuous=True` (continuous batching, for models the lean forward covers), a request that arrives while a
batch runs joins it at the next decoding step and leaves it as soon as its own candidates are finished and
scored. On 2 cores with the default model that was no faster: its many small context and MMI passes cost
what the waiting saved (docs/web.md), so it is an option. Either way an idle worker waits `window_s` after a
first request for others to join (0: never waits).

With `workers` > 1, that many worker threads take batches from the one queue, so a batch can start while
another runs; the engine's thread policy then gives each running batch its share of the free cores (one
each on 2 cores), which keeps both cores busy through the single-threaded parts of a batch.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import torch

from dialogpt_zh.engine.bot import ChatBot
from dialogpt_zh.engine.results import Reply


class ReplyBatcher:
    """`workers` threads running queued reply requests together, up to `max_requests` per batch and about
    `max_rows` candidates (a single request is never split); `continuous`: requests join running batches."""

    def __init__(self, bot: ChatBot, *, window_s: float = 0.005, max_requests: int = 8, max_rows: int = 160,
                 workers: int = 1, continuous: bool = False) -> None:
        if not (0 <= window_s <= 1 and max_requests >= 1 and max_rows >= 1 and workers >= 1):
            raise ValueError("window_s must be in [0, 1] s, max_requests, max_rows and workers at least 1")
        self.bot = bot
        self.window_s, self.max_requests, self.max_rows = window_s, max_requests, max_rows
        # joining a running batch needs the lean forward (ChatBot.decode_batch().joins_running_batches)
        self.continuous = continuous and bot.decode_batch().joins_running_batches
        self._queue: list[tuple[Any, Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0                 # counters, for benchmarks and tests
        self.requests = 0
        run = self._run_continuous if self.continuous else self._run
        self._workers = [threading.Thread(target=run, name=f"reply-batcher-{i}", daemon=True)
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
        """The next batch (waiting for one); [] only once the batcher is closed and its queue drained."""
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
            return self._pop(self.max_requests, self.max_rows, may_be_empty=False)

    def _pop(self, max_requests: int, max_rows: int, may_be_empty: bool) -> list[tuple[Any, Future]]:
        """Queued requests from the front, up to the limits (at least one unless `may_be_empty`); under the lock."""
        batch, rows = [], 0
        while self._queue and len(batch) < max_requests:
            n = self._queue[0][0].gen.num_candidates
            if (batch or may_be_empty) and rows + n > max_rows:
                break
            batch.append(self._queue.pop(0))
            rows += n
        if batch:
            self.batches += 1
            self.requests += len(batch)
        return batch

    def _run_continuous(self) -> None:
        """Decode steps over one batch that requests join between steps and leave when done; idle when empty."""
        bot = self.bot
        while True:
            first = self._take_batch()
            if not first:
                return
            # the thread policy counts this worker as one call in flight for as long as its batch is busy
            with bot.thread_policy.use() as threads, torch.inference_mode():
                batch = bot.decode_batch()
                futures: dict[int, tuple[Any, Future]] = {}
                joining = first
                while joining or len(batch):
                    try:
                        if joining:
                            batch.admit([job for job, _ in joining])
                            futures.update((id(job), (job, future)) for job, future in joining)
                            joining = []
                        done = batch.step()
                        replies = bot.finish_replies(done) if done else []
                    except BaseException:  # noqa: BLE001 - every request of the batch is retried alone
                        self._retry_alone(list(futures.values()) + joining)
                        batch, futures, joining = bot.decode_batch(), {}, []
                        continue
                    for request, reply in zip(done, replies):
                        reply.threads = threads
                        futures.pop(id(request.job))[1].set_result(reply)
                    with self._cond:
                        joining = self._pop(self.max_requests - len(batch), self.max_rows - batch.live_rows,
                                            may_be_empty=True)

    def _retry_alone(self, requests: list[tuple[Any, Future]]) -> None:
        """After a failed batch: each request alone, from its seed again (the same draws as if the batch had
        not failed), so only a request that fails by itself gets an error."""
        for job, future in requests:
            job.generator.manual_seed(job.seed)
            try:
                future.set_result(self.bot.reply_many([job])[0])
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(e)

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
                else:  # find whose request failed: the others still get their replies
                    self._retry_alone(batch)
                continue
            for (_, future), reply in zip(batch, replies):
                future.set_result(reply)
