"""The retrieval index's costs: size on disk, load time, memory added, search time, and the bot's load time
with and without it.

    python benchmarks/retrieval_index.py --model /tmp/bot          # BOT/retrieval, fixture contexts
    python benchmarks/retrieval_index.py --model /tmp/bot --heldout ../shared/corpus/lccc-sample/toy_data.json \
        --heldout_split valid --contexts 200 --loads 5

Prints: the index's files and pairs; RetrievalIndex.load seconds (min / median of --loads, the tokenizer check
included) and the RSS the first load added (VmRSS before and after, in this process); the search time per
query for K = --k (the engine asks for 3K + 5 hits and skips echoes and overlong replies; min / p50 / p95);
and ChatBot.from_pretrained seconds with the index (the bot directory) and without it (forward= / backward=),
alternating, min / median of --bot_loads each. Figures taken while other jobs share the cores are pessimistic.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dialogpt_zh.cli import field_help, make_parser, parse, run_main  # noqa: E402
from dialogpt_zh.errors import UserError  # noqa: E402


@dataclass
class IndexBenchArgs:
    model: str = field(default="", metadata=field_help(
        "bot directory with forward/, backward/ and retrieval/ (required)"))
    heldout: str | None = field(default=None, metadata=field_help(
        "held-out corpus file whose contexts are the queries (default: the hand-written chitchat fixture)"))
    heldout_split: str = field(default="valid", metadata=field_help("split of --heldout ('all' = every session)"))
    contexts: int = field(default=100, metadata=field_help("queries timed (contexts of up to 3 turns)"))
    k: int = field(default=10, metadata=field_help("retrieved replies per query, as --retrieval_candidates"))
    loads: int = field(default=5, metadata=field_help("index loads timed"))
    bot_loads: int = field(default=3, metadata=field_help("bot loads timed with and without the index, each"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def contexts(args: IndexBenchArgs) -> list[list[str]]:
    from dialogpt_zh.data.readers import iter_clean_sessions

    path = args.heldout or str(REPO / "corpus" / "fixtures" / "chitchat_train.txt")
    out = []
    for s in iter_clean_sessions([path]):
        if args.heldout and args.heldout_split != "all" and s.split not in args.heldout_split.split(","):
            continue
        out += [list(s.turns[max(0, t - 3):t]) for t in range(1, len(s.turns))]
        if len(out) >= args.contexts:
            break
    if not out:
        raise UserError(f"no multi-turn session (split {args.heldout_split!r})", path=path, field="heldout")
    return out[:args.contexts]


def pct(values: list[float], q: int) -> float:
    values = sorted(values)
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv=None) -> int:
    parser = make_parser([IndexBenchArgs], prog="python benchmarks/retrieval_index.py",
                         description=__doc__.split("\n\n")[0], examples=__doc__.split("\n\n")[1])

    def body() -> int:
        (args,) = parse(parser, argv)
        if not args.model:
            raise UserError("--model BOT_DIR is required", field="model")
        bot_dir = Path(args.model)
        from transformers.utils import logging as hf_logging

        from dialogpt_zh.data.retrieval import RETRIEVAL_DIR, RetrievalIndex
        from dialogpt_zh.engine.bot import ChatBot
        from dialogpt_zh.engine.retrieval import pick_hits
        from dialogpt_zh.tokenizer import encode, load_tokenizer

        hf_logging.disable_progress_bar()
        directory = bot_dir / RETRIEVAL_DIR
        tokenizer = load_tokenizer(bot_dir / "forward")
        queries = contexts(args)
        base = rss_mb()
        t = time.perf_counter()
        index = RetrievalIndex.load(directory, tokenizer)
        first, added = time.perf_counter() - t, rss_mb() - base
        times = [first]
        for _ in range(args.loads - 1):
            t = time.perf_counter()
            RetrievalIndex.load(directory, tokenizer)
            times.append(time.perf_counter() - t)
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(f"# index {directory}: {index.size:,d} pairs, {len(index.terms):,d} terms, "
              f"{len(index.postings):,d} postings; files {size / 1e6:.1f} MB "
              f"({', '.join(f'{p.name} {p.stat().st_size / 1e6:.1f} MB' for p in sorted(directory.iterdir()))})")
        print(f"load: min {min(times):.3f} s, median {statistics.median(times):.3f} s over {len(times)} loads; "
              f"RSS added by the first load {added:.0f} MB")
        encoded = [[encode(tokenizer, u) for u in q] for q in queries]
        for q in encoded[:5]:  # warm-up
            index.search(q, 3 * args.k + 5)
        search = []
        for q, ctx in zip(encoded, queries):
            t = time.perf_counter()
            pick_hits(index, q, ctx[-1], args.k, 25, [])
            search.append(time.perf_counter() - t)
        print(f"search + pick of K={args.k} over {len(search)} queries: min {min(search) * 1000:.2f} ms, "
              f"p50 {pct(search, 50) * 1000:.2f} ms, p95 {pct(search, 95) * 1000:.2f} ms")
        with_index, without = [], []
        for _ in range(args.bot_loads):  # alternating, so drift hits both alike
            t = time.perf_counter()
            ChatBot.from_pretrained(bot_dir, quantize="fp16")
            with_index.append(time.perf_counter() - t)
            t = time.perf_counter()
            ChatBot.from_pretrained(forward=bot_dir / "forward", backward=bot_dir / "backward", quantize="fp16")
            without.append(time.perf_counter() - t)
        print(f"bot load (fp16): with the index min {min(with_index):.3f} s / median "
              f"{statistics.median(with_index):.3f} s; without min {min(without):.3f} s / median "
              f"{statistics.median(without):.3f} s ({args.bot_loads} each, alternating)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
