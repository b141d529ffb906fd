"""Replies per second of the engine when requests are batched together, without a web server in the way.

    python benchmarks/batch_throughput.py                               # embedded checkpoints/default
    python benchmarks/batch_throughput.py --batch_sizes 1,8,20 --rounds 5
    python benchmarks/batch_throughput.py --model runs/bot --clients 20 --turns 10 --max_batch 8

Two measurements, each printed, never asserted:
  batches      `ChatBot.reply_many` on K requests at a time (K = each of --batch_sizes), over the same
               --requests contexts (up to 3 turns each, from the hand-written fixture); the rounds
               interleave the batch sizes, so a slower moment of the machine hits all of them alike;
               printed: replies/s (median and each round) and seconds per batch;
  closed loop  --clients threads, each a user chatting --turns turns through one `ReplyBatcher` (the web
               page's cross-user batching, same queue and batch limits) with no web server: replies/s and
               p50/p95 latency. Beside benchmarks/web_load.py it shows what the web server itself costs.

Run it on an idle machine: other jobs on the cores lower every figure.
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dialogpt_zh.cli import field_help, make_parser, parse, run_main  # noqa: E402
from dialogpt_zh.engine.batcher import ReplyBatcher  # noqa: E402
from dialogpt_zh.engine.bot import load_bot  # noqa: E402
from dialogpt_zh.errors import UserError  # noqa: E402
from dialogpt_zh.judging.metrics import percentile  # noqa: E402
from dialogpt_zh.settings import (  # noqa: E402
    BotArguments,  # noqa: E402
    GenerationSettings,
    MMISettings,
)

FIXTURE = REPO / "corpus" / "fixtures" / "chitchat_train.txt"


@dataclass
class ThroughputArgs:
    batch_sizes: str = field(default="1,4,8,16", metadata=field_help("comma list of requests per reply_many batch"))
    requests: int = field(default=32, metadata=field_help("requests per batch size and round"))
    rounds: int = field(default=3, metadata=field_help("rounds (each runs every batch size once)"))
    clients: int = field(default=20, metadata=field_help("closed loop: concurrent users (0 = skip it)"))
    turns: int = field(default=10, metadata=field_help("closed loop: turns per user"))
    think_s: float = field(default=0.0, metadata=field_help(
        "closed loop: mean pause of a user between a reply and the next message (random, exponential, "
        "seeded); 0 = none, the saturated load of benchmarks/web_load.py"))
    max_batch: int = field(default=8, metadata=field_help(
        "closed loop: ReplyBatcher max_requests (webapp --max_batch)"))
    batch_window_ms: float = field(default=5.0, metadata=field_help("closed loop: ReplyBatcher window"))
    workers: str = field(default="1,2", metadata=field_help(
        "closed loop: comma list of ReplyBatcher worker counts (webapp --batch_workers), each run in turn"))
    batching: str = field(default="batch", metadata=field_help(
        "closed loop: comma list of ReplyBatcher modes, each run in turn for each worker count: batch (batch "
        "by batch, the web page's default) and/or continuous (requests join running batches)"))
    seed: int = field(default=0, metadata=field_help("sampling seeds are seed + request index"))


def fixture_lines() -> list[str]:
    return [line.strip() for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


def contexts(n: int) -> list[list[str]]:
    """n contexts of up to 3 consecutive fixture lines (the page keeps max_history = 3 turns)."""
    lines = fixture_lines()
    return [lines[i % len(lines):i % len(lines) + 3] for i in range(n)]


def time_batches(bot, ctxs: list[list[str]], k: int, seed: int) -> tuple[float, list[float]]:
    """Seconds for all of ctxs in reply_many batches of k, and each batch's seconds."""
    per_batch = []
    t0 = time.perf_counter()
    for i in range(0, len(ctxs), k):
        t = time.perf_counter()
        bot.reply_many([bot.prepare_reply(c, seed=seed + i + j) for j, c in enumerate(ctxs[i:i + k])])
        per_batch.append(time.perf_counter() - t)
    return time.perf_counter() - t0, per_batch


def closed_loop(bot, args: ThroughputArgs, workers: int,
                continuous: bool = False) -> tuple[float, list[float], int, list[int]]:
    """Users chatting at once through one ReplyBatcher: (seconds, each reply's latency, batches, threads)."""
    batcher = ReplyBatcher(bot, window_s=args.batch_window_ms / 1000, max_requests=args.max_batch,
                           workers=workers, continuous=continuous)
    lines = fixture_lines()
    latencies: list[float] = []
    threads: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        history: list[str] = []
        pauses = random.Random(args.seed * 1000 + u)
        try:
            for t in range(args.turns):
                if args.think_s > 0:
                    time.sleep(pauses.expovariate(1 / args.think_s))
                history.append(lines[(u * 7 + t) % len(lines)])
                start = time.perf_counter()
                reply = batcher.reply(history[-3:], seed=args.seed + u * 1000 + t)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    threads.append(reply.threads)
                history.append(reply.text or "嗯")
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)

    users = [threading.Thread(target=user, args=(u,)) for u in range(args.clients)]
    t0 = time.perf_counter()
    for t in users:
        t.start()
    for t in users:
        t.join()
    seconds = time.perf_counter() - t0
    batcher.close()
    if errors:
        raise errors[0]
    return seconds, latencies, batcher.batches, threads


def main(argv=None) -> int:
    parser = make_parser([BotArguments, ThroughputArgs, GenerationSettings, MMISettings],
                         prog="python benchmarks/batch_throughput.py",
                         description=__doc__.split("\n\n")[0], examples=__doc__.split("\n\n")[1])

    def body() -> int:
        bot_args, args, generation, mmi = parse(parser, argv)
        try:
            sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        except ValueError:
            sizes = []
        for name, value in (("requests", args.requests), ("rounds", args.rounds), ("max_batch", args.max_batch),
                            ("turns", args.turns)):
            if value < 1:
                raise UserError(f"must be >= 1, got {value}", field=name)
        if not sizes or min(sizes) < 1:
            raise UserError(f"batch sizes must be >= 1, got {args.batch_sizes!r}", field="batch_sizes")
        if args.think_s < 0:
            raise UserError(f"must be >= 0, got {args.think_s}", field="think_s")
        if args.clients < 0:
            raise UserError(f"must be >= 0, got {args.clients}", field="clients")
        try:
            workers = [int(x) for x in args.workers.split(",") if x.strip()]
        except ValueError:
            workers = []
        if not workers or min(workers) < 1:
            raise UserError(f"worker counts must be whole numbers >= 1, got {args.workers!r}", field="workers")
        modes = [m.strip() for m in args.batching.split(",") if m.strip()]
        if not modes or set(modes) - {"continuous", "batch"}:
            raise UserError(f"use continuous and/or batch, got {args.batching!r}", field="batching")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        bot = load_bot(bot_args, generation, mmi)
        print(f"# batched replies/s; model {bot_args.model or 'checkpoints/default'}, N = "
              f"{bot.settings()[0].num_candidates}, threads: {bot.thread_policy.describe()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}")
        ctxs = contexts(args.requests)
        time_batches(bot, ctxs[:max(sizes)], max(sizes), args.seed)  # warm-up
        rates: dict[int, list[float]] = {k: [] for k in sizes}
        batch_s: dict[int, list[float]] = {k: [] for k in sizes}
        for _ in range(args.rounds):
            for k in sizes:
                seconds, per_batch = time_batches(bot, ctxs, k, args.seed)
                rates[k].append(len(ctxs) / seconds)
                batch_s[k].extend(per_batch)
        print("requests per batch | replies/s median (each round)       | s per batch p50")
        for k in sizes:
            each = " ".join(f"{r:.1f}" for r in rates[k])
            print(f"{k:>18} | {statistics.median(rates[k]):>6.1f} ({each}) | {statistics.median(batch_s[k]):.3f}")
        for w in workers if args.clients else []:
            for mode in modes:
                seconds, lat, batches, threads = closed_loop(bot, args, w, continuous=mode == "continuous")
                print(f"closed loop: {args.clients} users x {args.turns} turns"
                      + (f" (pauses of {args.think_s:g} s on average)" if args.think_s else "")
                      + f" through one ReplyBatcher ({mode}, "
                      f"max_batch {args.max_batch}, window {args.batch_window_ms:g} ms, {w} worker(s)), no web "
                      f"server: {len(lat) / seconds:.2f} replies/s, latency p50 {percentile(lat, 50):.2f} s, "
                      f"p95 {percentile(lat, 95):.2f} s, {len(lat) / batches:.1f} requests per "
                      f"{'admission' if mode == 'continuous' else 'batch'}, threads used {sorted(set(threads))}")
        print(f"# load average at the end {os.getloadavg()[0]:.2f}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
