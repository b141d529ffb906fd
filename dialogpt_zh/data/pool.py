"""The cleaning worker pool: raw sessions are cleaned in worker processes in order-preserving units; a worker
dies with its parent, and a stop signal ends the pool promptly."""

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


def init_clean_worker(options: CleaningOptions, parent_pid: int) -> None:
    global _worker_options
    _worker_options = options
    die_with_parent(parent_pid)
    # the parent handles Ctrl-C (sent to the whole process group) and SIGTERM, and stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent while it forked us


def clean_unit(batches: list[list[list]], options: CleaningOptions | None = None
               ) -> tuple[str, bytes, list[int], int, Counter]:
    """Clean raw sessions (in batches): (temp-file text, one session per line with turns joined by TAB;
    their 8-byte hashes; cleaned pieces per raw session; chars; counters)."""
    options = options or _worker_options
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


class InlinePool:
    """The single-process stand-in for a worker pool."""

    def __init__(self, options: CleaningOptions) -> None:
        self.options = options

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def clean_pool(workers: int, options: CleaningOptions):
    if workers <= 1:
        return InlinePool(options)
    import multiprocessing as mp

    # fork: workers start in milliseconds and inherit the imported modules (spawn where fork is missing)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # Ctrl-C / SIGTERM wait while the workers are forked: one landing inside the interpreter's after-fork
    # hooks is swallowed ("Exception ignored"), one raised inside Pool() leaves its workers unjoined.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return ctx.Pool(workers, initializer=init_clean_worker, initargs=(options, os.getpid()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def ordered_map(pool, units: Iterator[tuple[int, list[list[list]], list]], workers: int
                 ) -> Iterator[tuple[int, list, tuple]]:
    """(file index, splits, clean_unit result) per unit, in input order; at most 2 units per worker in
    flight, so memory stays bounded however big the corpus (Pool.imap would read the whole input ahead)."""
    if isinstance(pool, InlinePool):
        for fi, batches, splits in units:
            yield fi, splits, clean_unit(batches, pool.options)
        return
    from collections import deque

    pending: deque = deque()
    for fi, batches, splits in units:
        pending.append((fi, splits, pool.apply_async(clean_unit, (batches,))))
        if len(pending) >= 2 * workers:
            fi0, splits0, res = pending.popleft()
            yield fi0, splits0, res.get()
    while pending:
        fi0, splits0, res = pending.popleft()
        yield fi0, splits0, res.get()


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


