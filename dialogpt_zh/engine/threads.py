"""How many intra-op (OpenMP) threads one reply gets: the cores other processes leave free, shared by the
replies in flight in this process (docs/engine.md, Threads).

Why: on a 2-core machine 2 threads per reply are the fastest while it is idle, but when another process keeps
one core busy OpenMP's threads wait for each other at every small op and a reply gets several times slower,
while 1 thread does not notice (docs/engine.md, "Under load", has the figures). Several replies at once (the
web page) do the same to each other.

    policy = ThreadPolicy()            # auto; ThreadPolicy(1): always 1 thread
    with policy.use() as n:            # one reply: counted in flight, torch.set_num_threads(n) in THIS thread
        ...

torch's thread count is per calling thread once that thread has run a parallel op (and a new thread starts
from the last count set anywhere), so every reply thread sets its own count on entry.

`CpuMonitor` estimates the cores OTHER processes keep busy: /proc/stat's per-CPU busy time on our CPUs
minus this process's own CPU time, since the previous sample, smoothed (EWMA); a sample is two small file
reads taken at most every `min_interval_s`, never a sleep on the reply path. Its readers are plain
functions over parsed numbers (`parse_proc_stat`, `others_busy_cores`), so tests feed it fake /proc text.
No torch import here except inside `use()` (the settings-only modules stay torch-free).
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

MARGIN = 0.25           # free cores are rounded down after adding this: 1.8 free -> 2 threads, 1.7 -> 1
MIN_INTERVAL_S = 0.05   # at most one /proc sample per 50 ms
SMOOTHING_S = 0.5       # EWMA time constant of the busy-cores estimate


# ------------------------------------------------------------------------------------------ cores

def cpu_max_cores(text: str) -> int | None:
    """Cores allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD"); None when unlimited. A
    fractional quota rounds down (at least 1): more threads than the quota get throttled together."""
    parts = text.split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1]) if len(parts) > 1 else 100000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, quota // period)


def _cgroup_cpu_max_files() -> list[Path]:
    """cpu.max of this process's cgroup v2 and of its parents (any of them may set the quota)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return []
    here = Path("/sys/fs/cgroup") / rel.lstrip("/")
    return [d / "cpu.max" for d in (here, *here.parents) if d == Path("/sys/fs/cgroup") or
            Path("/sys/fs/cgroup") in d.parents]


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """CPUs in our affinity set, capped by a cgroup v2 `cpu.max` quota when one is set."""
    cores = len(affinity_cpus())
    for path in _cgroup_cpu_max_files():
        try:
            cap = cpu_max_cores(path.read_text())
        except OSError:
            continue
        if cap is not None:
            cores = min(cores, cap)
    return max(1, cores)


# ------------------------------------------------------------------------------------ CPU monitor

@dataclass(frozen=True)
class CpuSample:
    busy: float    # seconds our CPUs spent busy (total - idle - iowait), all processes
    total: float   # seconds our CPUs accounted in all states (elapsed time x CPUs)
    own: float     # this process's CPU time (user + system), seconds


def parse_proc_stat(text: str, cpus: set[int], ticks_per_s: float) -> tuple[float, float] | None:
    """(busy, total) seconds summed over the `cpuN` lines of `cpus` in /proc/stat text; None if none found.
    Columns: user nice system idle iowait irq softirq steal [guest guest_nice] (guest is already in user)."""
    busy = total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            values = [int(v) for v in fields[:8]]
        except ValueError:
            continue
        if cpu not in cpus or len(values) < 4:
            continue
        values += [0] * (8 - len(values))
        line_total = sum(values)
        busy += line_total - values[3] - values[4]
        total += line_total
        found = True
    return (busy / ticks_per_s, total / ticks_per_s) if found else None


def others_busy_cores(prev: CpuSample, cur: CpuSample, n_cpus: int) -> float | None:
    """Average cores kept busy by other processes between two samples (0..n_cpus); None if no time passed."""
    elapsed = (cur.total - prev.total) / n_cpus
    if elapsed <= 0:
        return None
    busy = (cur.busy - prev.busy) - (cur.own - prev.own)
    return min(float(n_cpus), max(0.0, busy / elapsed))


def read_proc_stat() -> str | None:
    try:
        with open("/proc/stat", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def own_cpu_seconds() -> float:
    """This process's CPU time, all threads (the utime + stime of /proc/self/stat, through times(2))."""
    t = os.times()
    return t.user + t.system


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class CpuMonitor:
    """Smoothed estimate of the cores other processes keep busy on our CPUs. Thread-safe."""

    def __init__(self, *, read_stat: Callable[[], str | None] = read_proc_stat,
                 read_own: Callable[[], float] = own_cpu_seconds,
                 read_loadavg: Callable[[], float | None] = load_average,
                 clock: Callable[[], float] = time.monotonic, cpus: set[int] | None = None,
                 ticks_per_s: float | None = None, min_interval_s: float = MIN_INTERVAL_S,
                 smoothing_s: float = SMOOTHING_S, initial_wait_s: float = 0.05) -> None:
        self.read_stat, self.read_own, self.read_loadavg, self.clock = read_stat, read_own, read_loadavg, clock
        self.cpus = set(cpus) if cpus is not None else affinity_cpus()
        if ticks_per_s is None:
            try:
                ticks_per_s = float(os.sysconf("SC_CLK_TCK"))
            except (AttributeError, ValueError, OSError):
                ticks_per_s = 100.0
        self.ticks_per_s = ticks_per_s
        self.min_interval_s, self.smoothing_s = min_interval_s, smoothing_s
        self._lock = threading.Lock()
        self.estimate: float | None = None
        self._prev = self._sample()
        self._prev_own = self._prev.own if self._prev is not None else self.read_own()
        self._prev_time = self.clock()
        if initial_wait_s > 0:   # one short first measurement, so the first reply has an estimate
            time.sleep(initial_wait_s)
            self.busy_cores()

    def _sample(self) -> CpuSample | None:
        text = self.read_stat()
        parsed = parse_proc_stat(text, self.cpus, self.ticks_per_s) if text is not None else None
        return CpuSample(*parsed, own=self.read_own()) if parsed is not None else None

    def _measure(self, cur: CpuSample | None, own: float, dt: float) -> float | None:
        """Others' busy cores since the previous sample: from /proc/stat, else the 1-minute load average
        less our own cores in use, else 0 (assume idle)."""
        if cur is not None and self._prev is not None:
            return others_busy_cores(self._prev, cur, len(self.cpus))
        load = self.read_loadavg()
        if load is None:
            return 0.0
        return min(float(len(self.cpus)), max(0.0, load - (own - self._prev_own) / dt))

    def busy_cores(self) -> float:
        """Cores other processes keep busy (smoothed); takes a new sample when the last is old enough."""
        with self._lock:
            now = self.clock()
            dt = now - self._prev_time
            if dt <= 0 or (self.estimate is not None and dt < self.min_interval_s):
                return self.estimate or 0.0
            cur = self._sample()
            own = cur.own if cur is not None else self.read_own()
            value = self._measure(cur, own, dt)
            if value is None:        # no CPU time accounted yet (samples too close): keep the last estimate
                return self.estimate or 0.0
            # EWMA weighted by the time the sample covers: a sample after a long pause replaces the estimate
            weight = 1.0 - math.exp(-dt / self.smoothing_s)
            self.estimate = value if self.estimate is None else self.estimate + weight * (value - self.estimate)
            self._prev, self._prev_own, self._prev_time = cur, own, now
            return self.estimate


_shared_monitor: CpuMonitor | None = None
_shared_lock = threading.Lock()


def shared_monitor() -> CpuMonitor:
    """One monitor per process (every bot's policy reads the same machine)."""
    global _shared_monitor
    with _shared_lock:
        if _shared_monitor is None:
            _shared_monitor = CpuMonitor()
        return _shared_monitor


# ------------------------------------------------------------------------------------------ policy

class InFlight:
    """The calls running now in this process and the threads they hold (shared by every bot's policy, since
    they share the cores)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.threads_held = 0
        self.nested = threading.local()   # a call inside a call (same thread) keeps the outer call's threads


_shared_in_flight = InFlight()


class ThreadPolicy:
    """Intra-op threads per reply: `fixed` > 0 always; 0 = auto, the cores others leave free shared by the
    replies in flight (at least 1 each, never more in total than the free cores unless each has only 1)."""

    def __init__(self, fixed: int = 0, *, monitor: CpuMonitor | None = None, cores: int | None = None,
                 margin: float = MARGIN, in_flight: InFlight | None = None) -> None:
        if isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 0:
            raise ValueError(f"threads must be an int >= 0, got {fixed!r}")
        self.fixed = fixed
        self.cores = cores if cores is not None else usable_cores()
        self.margin = margin
        if monitor is None and not fixed:
            monitor = shared_monitor()
        self.monitor = monitor             # None when fixed: nothing to measure
        self.flight = in_flight if in_flight is not None else _shared_in_flight

    def __deepcopy__(self, memo) -> "ThreadPolicy":
        return self  # a copied bot shares its policy: the cores and the calls in flight are the process's

    @property
    def in_flight(self) -> int:
        return self.flight.count

    def free_cores(self) -> int:
        """Whole cores free for this process: usable cores less others' busy cores, plus the margin."""
        if self.monitor is None:
            return self.cores
        free = min(float(self.cores), len(self.monitor.cpus) - self.monitor.busy_cores())
        return max(0, min(self.cores, math.floor(free + self.margin)))

    def threads_for(self, in_flight: int, held_by_others: int = 0) -> int:
        """Threads for one reply when `in_flight` replies (this one included) run and the others hold
        `held_by_others` threads: its fair share of the free cores, no more than they leave, at least 1."""
        if self.fixed:
            return self.fixed
        free = self.free_cores()
        share = free // max(1, in_flight)
        return max(1, min(share, free - held_by_others))

    @contextmanager
    def use(self) -> Iterator[int]:
        """One reply: counted in flight while inside; torch.set_num_threads(n) in the calling thread; yields n."""
        flight = self.flight
        outer = getattr(flight.nested, "threads", None)
        if outer is not None:
            yield outer
            return
        import torch  # lazy: this module stays importable without torch

        with flight.lock:
            n = self.threads_for(flight.count + 1, flight.threads_held)
            flight.count += 1
            flight.threads_held += n
        try:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
            flight.nested.threads = n
            yield n
        finally:
            flight.nested.threads = None
            with flight.lock:
                flight.count -= 1
                flight.threads_held -= n

    def describe(self) -> str:
        if self.fixed:
            return f"{self.fixed} thread(s) per reply (fixed)"
        return f"auto: free cores of {self.cores} shared by the replies in flight"
