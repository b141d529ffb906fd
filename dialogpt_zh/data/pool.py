"""The cleaning worker pool: raw sessions are cleaned in worker processes in order-preserving units; a worker
dies with its parent, and a stop signal ends the pool at once (`WorkerPool`)."""

from __future__ import annotations

import hashlib
import os
import signal
from array import array
from collections import Counter
from typing import Any, Iterator, Sequence

from dialogpt_zh.data.cleaning import CleaningOptions, clean_sessions
from dialogpt_zh.data.readers import read_file

CLEAN_BATCH = 1000  # raw sessions per clean_sessions call (as in readers.iter_clean_file)


UNIT_BATCHES = 4    # clean batches per unit of work sent to a worker


PARALLEL_MIN_BYTES = 4 << 20  # --workers 0 (auto) uses one process below this much input


def effective_workers(requested: int, files: Sequence[tuple[int, Any]]) -> int:
    """--workers: N as given; 0 (auto) = 2 when the inputs total PARALLEL_MIN_BYTES or more and two CPUs are
    idle (1-minute load average), else 1. With one core busy, 2 workers were slower than 1 (the extra
    process only adds hand-over cost; docs/preprocess.md has the run), hence the load check."""
    if requested > 0:
        return requested
    import os

    size = sum(cf.path.stat().st_size for _, cf in files)
    try:
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    except (AttributeError, OSError):
        idle = 0.0
    return 2 if size >= PARALLEL_MIN_BYTES and idle >= 1.5 else 1


def clean_batches(items: list) -> list[list]:
    return [items[i:i + CLEAN_BATCH] for i in range(0, len(items), CLEAN_BATCH)]


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this worker when the parent exits, however it exits (a worker left behind
    would wait for tasks forever and hold the parent's stdout/stderr open)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Pool.terminate() in the parent still stops the workers
        return
    if os.getppid() != parent_pid:  # the parent was gone before prctl took effect
        os._exit(1)


def init_clean_worker(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # the parent handles Ctrl-C (sent to the whole process group) and SIGTERM, and stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent while it forked us


def clean_unit(batches: list[list[list]], options: CleaningOptions) -> tuple[str, bytes, list[int], int, Counter]:
    """Clean raw sessions (in batches): (temp-file text, one session per line with turns joined by TAB;
    their 8-byte hashes; cleaned pieces per raw session; chars; counters)."""
    counters: Counter = Counter()
    lines: list[str] = []
    pieces: list[int] = []
    for batch in batches:
        for result in clean_sessions(batch, options, counters):
            pieces.append(len(result))
            lines.extend("\t".join(turns) for turns in result)
    hashes = array("q", map(session_hash, lines))
    n_chars = sum(map(len, lines)) - sum(line.count("\t") for line in lines)
    text = "\n".join(lines) + "\n" if lines else ""
    return text, hashes.tobytes(), pieces, n_chars, counters


def serve_units(tasks, results, options: CleaningOptions, parent_pid: int) -> None:
    """A worker: clean each unit from `tasks`, send (True, result) or (False, the error) to `results`; stop at
    None or when the parent is gone."""
    init_clean_worker(parent_pid)
    while True:
        try:
            unit = tasks.recv()
        except (EOFError, OSError):
            return
        if unit is None:
            return
        try:
            reply: tuple[bool, Any] = (True, clean_unit(unit, options))
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            reply = (False, e)
        try:
            results.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception:  # noqa: BLE001 - an error that does not pickle: send its text instead
            results.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))


class InlinePool:
    """The single-process stand-in for a worker pool."""

    def __init__(self, options: CleaningOptions) -> None:
        self.options = options

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class WorkerPool:
    """`workers` cleaning processes, each with its own pipes: unit i goes to worker i % workers and its result
    comes back from that worker, so results keep the input order with nothing shared between processes.

    Why not multiprocessing.Pool: its terminate() joins a task-handler thread that can be blocked forever
    writing to a pipe no worker reads any more (seen: SIGTERM to `preprocess --workers 2` hung once in 20 runs
    until killed, leaving the temp store behind). Here the end is simple whatever stops the work (a signal,
    an error): the workers are killed at once, and nothing waits on a pipe. A feeder thread per worker sends
    its units, so the main thread, which only reads results, never blocks on a worker that is itself blocked
    sending a result."""

    def __init__(self, workers: int, options: CleaningOptions) -> None:
        import multiprocessing as mp
        import queue
        import threading

        # fork: workers start in milliseconds and inherit the imported modules (spawn where fork is missing)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.workers = workers
        self._procs: list[Any] = []
        self._tasks: list[Any] = []     # parent's sending end, per worker
        self._results: list[Any] = []   # parent's receiving end, per worker
        self._queues: list[Any] = []
        self._feeders: list[threading.Thread] = []
        self._next = 0
        try:
            # Ctrl-C / SIGTERM wait while the workers are forked: one landing inside the interpreter's after-fork
            # hooks is swallowed ("Exception ignored"); it is raised when the mask is restored, below
            previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                for _ in range(workers):
                    task_recv, task_send = ctx.Pipe(duplex=False)
                    result_recv, result_send = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=serve_units, args=(task_recv, result_send, options, os.getpid()),
                                    daemon=True)
                    p.start()
                    # the worker holds its ends alone: its death is EOF to us, and the feeder's write fails
                    task_recv.close()
                    result_send.close()
                    self._procs.append(p)
                    self._tasks.append(task_send)
                    self._results.append(result_recv)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            for conn in self._tasks:  # threads only after every fork
                q: Any = queue.SimpleQueue()  # put() is C code: a signal cannot leave it half done
                t = threading.Thread(target=_feed, args=(q, conn), daemon=True, name="unit-feeder")
                t.start()
                self._queues.append(q)
                self._feeders.append(t)
        except BaseException:
            self.kill()
            raise

    def submit(self, batches: list[list[list]]) -> int:
        """Send a unit to the next worker in turn; returns that worker's index (for `result`)."""
        k = self._next
        self._next = (k + 1) % self.workers
        self._queues[k].put(batches)
        return k

    def result(self, k: int):
        """The oldest result not yet taken from worker `k` (blocks until it is there)."""
        try:
            ok, value = self._results[k].recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"cleaning worker {self._procs[k].pid} stopped unexpectedly "
                               f"(exit code {self._procs[k].exitcode})") from e
        if not ok:
            raise value
        return value

    def kill(self) -> None:
        """Stop every worker now (SIGKILL) and close the pipes: nothing is waited for but dead processes."""
        for p in self._procs:
            if p.exitcode is None:
                p.kill()
        for p in self._procs:
            p.join(timeout=5)
        self._close_pipes()

    def close(self) -> None:
        """The work is done: the workers leave after their last unit (killed if they do not within 5 s)."""
        for q in self._queues:
            q.put(None)
        for t in self._feeders:
            t.join(timeout=5)
        for p in self._procs:
            p.join(timeout=5)
        self.kill()

    def _close_pipes(self) -> None:
        for conn in self._tasks + self._results:
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # an error or a stop signal: nothing of the workers' work is needed any more
            self.kill()


def _feed(units, conn) -> None:
    """Feeder thread: send each unit of the queue to one worker, until None (passed on: the worker leaves)."""
    while True:
        unit = units.get()
        try:
            conn.send(unit)
        except (OSError, ValueError):  # the worker is gone, or the pipe was closed by kill()
            return
        except TypeError:
            # kill() closed the pipe while this thread was inside send (multiprocessing then writes to a None
            # handle): the pool is being torn down and the main thread reports the stop
            if conn.closed:
                return
            raise
        if unit is None:
            return


def clean_pool(workers: int, options: CleaningOptions):
    if workers <= 1:
        return InlinePool(options)
    return WorkerPool(workers, options)


def ordered_map(pool, units: Iterator[tuple[int, list[list[list]], list]], workers: int
                 ) -> Iterator[tuple[int, list, tuple]]:
    """(file index, splits, clean_unit result) per unit, in input order; at most 2 units per worker in
    flight, so memory stays bounded however big the corpus."""
    if isinstance(pool, InlinePool):
        for fi, batches, splits in units:
            yield fi, splits, clean_unit(batches, pool.options)
        return
    from collections import deque

    pending: deque = deque()
    for fi, batches, splits in units:
        pending.append((fi, splits, pool.submit(batches)))
        if len(pending) >= 2 * workers:
            fi0, splits0, k = pending.popleft()
            yield fi0, splits0, pool.result(k)
    while pending:
        fi0, splits0, k = pending.popleft()
        yield fi0, splits0, pool.result(k)


def read_units(files: list[tuple[int, Any]], counters: dict[str, Counter], sources: list[str],
                sessions_read: dict[int, int]) -> Iterator[tuple[int, list[list[list]], list]]:
    """(file index, raw sessions in batches of CLEAN_BATCH, their splits) per unit of cleaning work."""
    for fi, (si, cf) in enumerate(files):
        c = counters[sources[si]]
        before = c["sessions_read"]
        turns, splits = [], []
        for raw in read_file(cf, c):
            turns.append(raw.turns)
            splits.append(raw.split)
            if len(turns) >= CLEAN_BATCH * UNIT_BATCHES:
                yield fi, clean_batches(turns), splits
                turns, splits = [], []
        if turns:
            yield fi, clean_batches(turns), splits
        sessions_read[fi] = c["sessions_read"] - before




def session_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


