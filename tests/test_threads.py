"""The thread policy (dialogpt_zh/engine/threads.py): arithmetic from fake /proc readings, the per-thread torch count,
the engine hook, and the latency benchmark's background load."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from dialogpt_zh.engine.threads import (
    CpuMonitor,
    CpuSample,
    InFlight,
    ThreadPolicy,
    cpu_max_cores,
    others_busy_cores,
    parse_proc_stat,
)

TICKS = 100  # USER_HZ


class FakeMachine:
    """A /proc/stat of `cpus` CPUs, this process's CPU time and a clock, advanced by hand."""

    def __init__(self, cpus: int = 2, extra_cpus: int = 0) -> None:
        self.busy = [0] * (cpus + extra_cpus)
        self.idle = [0] * (cpus + extra_cpus)
        self.own = 0.0
        self.now = 100.0
        self.stat_reads = 0
        self.cpus = set(range(cpus))

    def run(self, seconds: float, others: float, own: float = 0.0) -> None:
        """`seconds` pass with `others` cores busy with other processes and `own` with ours (filled CPU by CPU)."""
        load = others + own
        for cpu in range(len(self.busy)):
            share = min(1.0, max(0.0, load - cpu))
            self.busy[cpu] += round(share * seconds * TICKS)
            self.idle[cpu] += round((1 - share) * seconds * TICKS)
        self.own += own * seconds
        self.now += seconds

    def stat(self) -> str:
        self.stat_reads += 1
        lines = [f"cpu  {sum(self.busy)} 0 0 {sum(self.idle)} 0 0 0 0 0 0"]
        # the busy time split over user and system, the idle over idle and iowait (both excluded from busy)
        lines += [f"cpu{i} {b - b // 2} 0 {b // 2} {i_ - i_ // 3} {i_ // 3} 0 0 0 0 0"
                  for i, (b, i_) in enumerate(zip(self.busy, self.idle))]
        return "\n".join(lines + ["intr 1 2 3", "ctxt 5"]) + "\n"

    def monitor(self, **kw) -> CpuMonitor:
        kw.setdefault("read_stat", self.stat)
        return CpuMonitor(read_own=lambda: self.own, clock=lambda: self.now, cpus=self.cpus,
                          ticks_per_s=TICKS, initial_wait_s=0, **kw)

    def policy(self, fixed: int = 0, **kw) -> ThreadPolicy:
        return ThreadPolicy(fixed, monitor=self.monitor(**kw), cores=len(self.cpus), in_flight=InFlight())


def test_parse_proc_stat_sums_our_cpus_only():
    text = ("cpu  90 0 0 90 0 0 0 0 0 0\ncpu0 10 1 2 30 4 1 1 1 5 0\ncpu1 20 0 0 10 0 0 0 0 0 0\n"
            "cpu2 60 0 0 50 0 0 0 0 0 0\nintr 1 2\n")
    busy, total = parse_proc_stat(text, {0, 1}, ticks_per_s=10)
    # cpu0: total 50 (guest 5 not added again), idle 30 + iowait 4 -> busy 16; cpu1: busy 20 of 30
    assert (busy, total) == (pytest.approx(3.6), pytest.approx(8.0))
    assert parse_proc_stat(text, {7}, ticks_per_s=10) is None


def test_others_busy_cores_subtracts_our_own_time():
    a = CpuSample(busy=10.0, total=100.0, own=3.0)
    b = CpuSample(busy=12.0, total=102.0, own=4.5)   # 1 s of 2 CPUs: 2 s busy, 1.5 s of it ours
    assert others_busy_cores(a, b, 2) == pytest.approx(0.5)
    assert others_busy_cores(a, a, 2) is None


@pytest.mark.parametrize("text,cores", [("max 100000", None), ("200000 100000", 2), ("150000 100000", 1),
                                        ("50000 100000", 1), ("400000 100000\n", 4), ("", None)])
def test_cgroup_cpu_max(text, cores):
    assert cpu_max_cores(text) == cores


@pytest.mark.parametrize("others,own,expected", [
    (0.0, 0.0, 2),    # idle 2 cores
    (1.0, 0.0, 1),    # one busy process
    (2.0, 0.0, 1),    # two busy processes: still at least 1
    (0.0, 2.0, 2),    # our own replies keep both cores busy: that is not someone else's load
    (1.0, 1.0, 1),
])
def test_policy_from_fake_proc_stat(others, own, expected):
    machine = FakeMachine(cpus=2, extra_cpus=1)  # a CPU outside our affinity set is never counted
    policy = machine.policy()
    machine.busy[2] += 10_000
    machine.run(2.0, others, own)
    assert policy.monitor.busy_cores() == pytest.approx(others, abs=0.02)
    assert policy.threads_for(1) == expected


def test_replies_in_flight_share_the_free_cores():
    machine = FakeMachine(cpus=2)
    policy = machine.policy()
    machine.run(2.0, 0.0)
    assert policy.threads_for(1) == 2
    assert policy.threads_for(2) == 1                     # two replies on 2 idle cores: 1 each
    assert policy.threads_for(2, held_by_others=2) == 1   # the other took both: this one still gets 1
    four = FakeMachine(cpus=4)
    policy4 = four.policy()
    four.run(2.0, 0.0)
    assert [policy4.threads_for(k) for k in (1, 2, 3, 4, 5)] == [4, 2, 1, 1, 1]
    assert policy4.threads_for(2, held_by_others=3) == 1  # never more in total than the free cores


def test_fixed_overrides_the_measurement():
    machine = FakeMachine(cpus=2)
    policy = machine.policy(fixed=3)
    machine.run(2.0, 2.0)
    assert policy.threads_for(1) == 3 and policy.threads_for(4) == 3
    with pytest.raises(ValueError, match="threads"):
        ThreadPolicy(-1)


def test_monitor_smooths_and_samples_at_most_every_50_ms():
    machine = FakeMachine(cpus=2)
    monitor = machine.monitor()
    machine.run(2.0, 0.0)
    assert monitor.busy_cores() == pytest.approx(0.0)
    reads = machine.stat_reads
    machine.run(0.02, 2.0)
    monitor.busy_cores()
    assert machine.stat_reads == reads                     # too soon: the last estimate, no read
    machine.run(0.08, 2.0)
    first = monitor.busy_cores()
    assert machine.stat_reads == reads + 1 and 0.0 < first < 1.0   # a short burst moves it only a little
    for _ in range(40):
        machine.run(0.1, 2.0)
        monitor.busy_cores()
    assert monitor.busy_cores() == pytest.approx(2.0, abs=0.05)   # a lasting load is seen within seconds


def test_monitor_without_proc_uses_the_load_average_less_our_own_use():
    machine = FakeMachine(cpus=2)
    monitor = machine.monitor(read_stat=lambda: None, read_loadavg=lambda: 1.5)
    machine.run(1.0, 0.0, own=1.0)
    assert monitor.busy_cores() == pytest.approx(0.5)
    idle = machine.monitor(read_stat=lambda: None, read_loadavg=lambda: None)
    machine.run(1.0, 0.0)
    assert idle.busy_cores() == 0.0


def test_use_sets_the_threads_in_the_calling_thread_and_counts_replies_in_flight():
    machine = FakeMachine(cpus=2)
    machine.run(2.0, 0.0)
    auto = machine.policy()
    one = ThreadPolicy(1, in_flight=auto.flight)
    main_threads = torch.get_num_threads()
    seen = {}
    inside = threading.Barrier(2)

    def reply(name: str, policy: ThreadPolicy) -> None:
        with policy.use() as n:
            inside.wait(timeout=10)   # both replies are in flight at once
            seen[name] = (n, torch.get_num_threads())
            inside.wait(timeout=10)

    threads = [threading.Thread(target=reply, args=("one", one)), threading.Thread(target=reply, args=("auto", auto))]
    threads[0].start()
    while auto.in_flight == 0:
        pass
    threads[1].start()
    for t in threads:
        t.join()
    # each thread runs with its own count; the auto reply saw the fixed one in flight: 2 cores, 1 held -> 1
    assert seen == {"one": (1, 1), "auto": (1, 1)}
    assert auto.in_flight == 0 and auto.flight.threads_held == 0
    assert torch.get_num_threads() == main_threads        # the main thread's count is untouched

    with auto.use() as n:                                 # alone on 2 idle cores
        assert n == 2 == torch.get_num_threads() and auto.in_flight == 1
        with auto.use() as inner:                         # a call inside a call: same threads, counted once
            assert inner == 2 and auto.in_flight == 1
    with pytest.raises(RuntimeError):
        with auto.use():
            raise RuntimeError("reply failed")
    assert auto.in_flight == 0 and auto.flight.threads_held == 0
    torch.set_num_threads(main_threads)


# ------------------------------------------------------------------------------------------ engine hook

def test_load_bot_threads_fixed_and_auto(random_bot_dir):
    from dialogpt_zh.engine.bot import load_bot
    from dialogpt_zh.settings import BotArguments

    bot = load_bot(BotArguments(model=str(random_bot_dir), threads=1))
    assert bot.thread_policy.fixed == 1
    reply = bot.reply(["你好"], num_candidates=3, max_length=5, seed=0)
    assert reply.threads == 1 and reply.candidates
    auto = load_bot(BotArguments(model=str(random_bot_dir)))
    assert auto.thread_policy.fixed == 0
    again = auto.reply(["你好"], num_candidates=3, max_length=5, seed=0)
    assert 1 <= again.threads <= len(os.sched_getaffinity(0))
    assert [c.text for c in again.candidates] == [c.text for c in reply.candidates]  # threads change no result
    assert auto.thread_policy.in_flight == 0


def test_every_public_call_runs_inside_the_policy(random_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot

    bot = ChatBot.from_pretrained(random_bot_dir, quantize="none")  # float32 modules can be deep-copied
    calls = []

    class Recording(ThreadPolicy):
        def use(self):
            calls.append(torch.get_num_threads())
            return super().use()

    bot.thread_policy = Recording(1, in_flight=InFlight())
    bot.rerank(["你好"], ["好的", "不好"])
    bot.forward_logprobs(["你好"], ["好的"])
    bot.backward_logprobs(["你好"], ["好的"])
    bot.reply(["你好"], num_candidates=2, max_length=4, seed=0)  # through reply_many
    bot.reply_many([bot.prepare_reply(["你好"], seed=1), bot.prepare_reply(["在吗"], seed=2)])
    assert len(calls) == 5 and bot.thread_policy.in_flight == 0
    import copy

    assert copy.deepcopy(bot).thread_policy is bot.thread_policy  # the process's cores, shared by copies


# ------------------------------------------------------------------------------------------ benchmark

def load_latency_benchmark(monkeypatch):
    from tests.conftest import load_benchmark

    return load_benchmark("latency", monkeypatch)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_background_load_processes_are_killed_even_on_ctrl_c(monkeypatch):
    bench = load_latency_benchmark(monkeypatch)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        with bench.background_load(2) as pids:
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            raise KeyboardInterrupt
    assert not any(_alive(p) for p in pids)


def test_latency_benchmark_background_load_smoke(monkeypatch, capsys, random_bot_dir):
    bench = load_latency_benchmark(monkeypatch)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    code = bench.main(["--model", str(random_bot_dir), "--presets", "model", "--ns", "2", "--contexts", "2",
                       "--max_length", "4", "--background-load", "1", "--thread_settings", "policy,1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "loaded/idle p50" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("2 ")]
    assert [r.split()[1] for r in rows] == ["policy", "1"]
    pids = [int(p) for line in out.splitlines() if "busy process(es): pids" in line
            for p in line.split("pids")[1].split()]
    assert len(pids) == 1 and not _alive(pids[0])
    assert bench.main(["--presets", "model", "--background-load", "1", "--thread_settings", "policy,x"]) == 2
    assert "thread_settings" in capsys.readouterr().err


def test_latency_benchmark_prints_the_candidates_length(monkeypatch, capsys, random_bot_dir):
    """The table's `cand tok`: the mean tokens of the sampled candidates, which MMI's share depends on; random
    weights run every candidate to max_length."""
    bench = load_latency_benchmark(monkeypatch)
    code = bench.main(["--model", str(random_bot_dir), "--presets", "model", "--ns", "2", "--contexts", "2",
                       "--max_length", "4", "--reference", "none", "--no_compare_hf", "--no_time_int8"])
    out = capsys.readouterr().out
    assert code == 0, out
    head = next(line for line in out.splitlines() if "ours p50" in line)
    row = next(line for line in out.splitlines() if line.split()[:2] == ["2", "0"])
    assert head.split("|")[-1].strip() == "cand tok" and 1.0 <= float(row.split("|")[-1]) <= 5.0
