"""Reply latency: our engine vs. the GPT2-chitchat algorithm, same weights, same contexts, one run.

    python benchmarks/latency.py                       # random-weight small + base shapes, ~13k-token vocab
    python benchmarks/latency.py --model checkpoints/default --presets model
    python benchmarks/latency.py --presets small --ns 10 --contexts 3 --reference none   # quick
    python benchmarks/latency.py --model checkpoints/default --presets model \
        --heldout ../shared/corpus/lccc-sample/toy_data.json --heldout_split valid   # int8 held-out perplexity
    python benchmarks/latency.py --model checkpoints/default --presets model --ns 10 --contexts 15 \
        --background-load 1 --thread_settings policy,1,2   # idle vs one busy process, per thread setting
    python benchmarks/latency.py --model /tmp/bot --presets model --ns 10 --ks 0,10 --contexts 15 \
        --reference none --no_time_int8   # N = 10 alone beside N = 10 + K = 10 retrieved (BOT/retrieval)

For each N (candidates per reply) it prints p50 / p95 seconds per reply of
  ours         ChatBot.reply: context encoded once, KV cache shared by N rows, finished rows dropped,
               MMI = one padded batch through the backward model, context tokens only; GPT-2 runs through
               the engine's lean forward (dialogpt_zh/engine/lean_gpt2.py);
  ours (HF)    the same engine forced onto the transformers forward (bot.use_lean_forward = False);
  chitchat     GPT2-chitchat's interact_mmi algorithm: the N candidates in one batch but no KV cache (the whole
               sequence re-run every step, finished rows kept until all are done), then each candidate scored
               on its own by the backward model with the loss averaged over the whole sequence;
  reference    our algorithm stated plainly (dialogpt_zh/engine/reference.py): each candidate sampled on its
               own with the whole sequence re-run every step, then scored on its own by the backward model
               over the context tokens only: what the cache and the batches buy;
plus the MMI scoring share of our reply time (with --ks, each N also with K retrieved human replies from the
bot's index: the retrieval time and the added scoring show in the same columns), the mean length of the
sampled candidates in tokens (`cand tok`, with the final [SEP]: short candidates are cheap to sample while MMI
still reads every context token, so the share is larger with them) and the int8 dynamic
quantization speed-up with the perplexity change it causes (on --heldout sessions when given, else on the
hand-written fixtures). Threads: the engine's thread policy (dialogpt_zh/engine/threads.py) unless
--threads N; the references run with the threads ours chose.
Weights: --quantize as in the faces (default fp16: every weight at float16 precision, float32 arithmetic);
the references run on the very models ours loaded, so on the same weights and the same matmul kernels.

With --background-load K it instead times ours idle and then beside K busy processes (pure-Python loops,
killed at the end, also on Ctrl-C), for each --thread_settings entry (policy = the thread policy, N = N
threads), and prints idle vs loaded p50/p95, the loaded/idle p50 ratio, the MMI share and the threads used.

Without --model the weights are random (speed does not depend on them, but random models never say [SEP]
early, so every candidate runs to max_length: no early-finish savings for anyone; that is the worst case
for our row dropping). Figures taken while other jobs share the cores are pessimistic.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dialogpt_zh.cli import field_help, make_parser, parse, run_main  # noqa: E402
from dialogpt_zh.engine.bot import ChatBot  # noqa: E402
from dialogpt_zh.engine.reference import reference_reply  # noqa: E402
from dialogpt_zh.engine.sampling import NEG_INF, top_k_filter, top_p_filter  # noqa: E402
from dialogpt_zh.engine.threads import ThreadPolicy  # noqa: E402
from dialogpt_zh.sequence import build_sequence  # noqa: E402
from dialogpt_zh.settings import GenerationSettings, MMISettings  # noqa: E402


@dataclass
class LatencyArgs:
    model: str | None = field(default=None, metadata=field_help(
        "a bot directory (forward/ + backward/) to time instead of random weights (use with --presets model)"))
    presets: str = field(default="small,base", metadata=field_help(
        "comma list of shapes to time: tiny, small, mid, large, base (dialogpt_zh.training.presets.PRESETS, "
        "random weights), model (--model)"))
    ns: str = field(default="1,5,10,20", metadata=field_help("candidate counts N"))
    ks: str = field(default="0", metadata=field_help(
        "retrieval candidates K (comma list): each N is timed with each K; K > 0 needs --model with an index "
        "(BOT/retrieval, docs/retrieval.md); the references and int8 run at K = 0"))
    contexts: int = field(default=5, metadata=field_help("contexts (from corpus/fixtures) timed per N"))
    base_contexts: int = field(default=2, metadata=field_help("contexts for the slow 12-layer base shape"))
    reference: str = field(default="chitchat,reference", metadata=field_help(
        "reference algorithms to time: chitchat (GPT2-chitchat's), reference (ours without cache or batches: "
        "dialogpt_zh/engine/reference.py), none"))
    reference_max_n: int = field(default=20, metadata=field_help("skip the references above this N"))
    base_reference_ns: str = field(default="10", metadata=field_help(
        "N values at which the base shape runs the references"))
    max_length: int = field(default=25, metadata=field_help("reply length cap (GPT2-chitchat's max_len)"))
    vocab_size: int = field(default=13317, metadata=field_help(
        "vocab of the random-weight models (13317 = GPT2-chitchat's vocab_small.txt)"))
    quantize: str = field(default="fp16", metadata=field_help(
        "weights of the timed bot, as the faces' --quantize (fp16 = their default, none = float32); the "
        "references run on the same loaded models, so on the same weights"))
    time_int8: bool = field(default=True, metadata=field_help("also time --quantize int8 at N=10 against --quantize"))
    heldout: str | None = field(default=None, metadata=field_help(
        "held-out corpus file for the int8 perplexity change (any format the preprocessor reads)"))
    heldout_split: str = field(default="valid", metadata=field_help(
        "split of --heldout to use ('all' = every session)"))
    heldout_pairs: int = field(default=400, metadata=field_help("(context, reply) pairs of --heldout scored"))
    compare_hf: bool = field(default=True, metadata=field_help(
        "also time our engine on the transformers forward (use_lean_forward=False)"))
    threads: int = field(default=0, metadata=field_help(
        "intra-op threads per reply: 0 = the engine's thread policy (auto), N = always N (docs/engine.md)"))
    background_load: int = field(default=0, metadata=field_help(
        "K > 0: time ours idle and then beside K busy processes, per --thread_settings (no references)"))
    thread_settings: str = field(default="policy,1,2", metadata=field_help(
        "with --background-load: comma list of thread settings to compare (policy = the thread policy, N = N)"))
    seed: int = field(default=0, metadata=field_help("seed of weights and sampling"))

    def __post_init__(self) -> None:
        from dialogpt_zh.errors import UserError

        for name in ("threads", "background_load"):
            if getattr(self, name) < 0:
                raise UserError(f"must be >= 0, got {getattr(self, name)}", field=name)
        unknown = sorted({r for r in self.reference.split(",") if r} - {"chitchat", "reference", "none"})
        if unknown:
            raise UserError(f"unknown reference(s) {unknown}; use chitchat, reference or none", field="reference")
        if self.background_load:
            for s in self.thread_settings.split(","):
                policy_for(s.strip())  # a bad setting is an error now, not after the idle phase
        from dialogpt_zh.settings import BOUNDS

        lo, hi = BOUNDS["retrieval_candidates"]
        try:
            ks = [int(x) for x in self.ks.split(",")]
        except ValueError:
            raise UserError(f"expected a comma list of whole numbers, got {self.ks!r}", field="ks") from None
        if not all(lo <= k <= hi for k in ks):
            raise UserError(f"each K must be in [{lo}, {hi}], got {self.ks!r}", field="ks")


def fixture_sessions() -> list[list[str]]:
    """The hand-written chitchat fixture's sessions (raw turns), read by the project's own reader."""
    from dialogpt_zh.data.readers import read_file, scan_input

    return [raw.turns for cf in scan_input(REPO / "corpus" / "fixtures" / "chitchat_train.txt").files
            for raw in read_file(cf)]


def fixture_contexts(n: int) -> list[list[str]]:
    sessions = [s for s in fixture_sessions() if len(s) >= 2]
    return [s[:-1][-3:] for s in sessions[:n]]  # up to 3 turns of context, like max_history=3


def random_bot(preset: str, vocab_size: int, seed: int, tmp: Path) -> Path:
    """A bot dir with random-weight forward/backward models of a preset shape and a ~vocab_size char vocab."""
    from dialogpt_zh.checkpoint import save_checkpoint
    from dialogpt_zh.tokenizer import build_char_tokenizer
    from dialogpt_zh.training.presets import build_model

    chars = Counter((REPO / "corpus" / "fixtures" / "chitchat_train.txt").read_text(encoding="utf-8"))
    cp = 0x4E00
    while len(chars) < vocab_size - 5:
        chars[chr(cp)] += 1
        cp += 1
    tok = build_char_tokenizer(Counter({c: n for c, n in chars.items() if not c.isspace()}))
    root = tmp / preset
    for i, direction in enumerate(("forward", "backward")):
        torch.manual_seed(seed + i)
        save_checkpoint(build_model(preset, tok, dropout=0.0), tok, root / direction, {"direction": direction})
    return root


# ------------------------------------------------------------------------- the GPT2-chitchat reference

@torch.inference_mode()
def chitchat_generate(model, ctx_ids: list[int], n: int, bot: ChatBot, max_length: int,
                      generator: torch.Generator) -> list[list[int]]:
    """GPT2-chitchat interact_mmi: n rows, no cache, the whole sequence re-run every step, rows kept until
    all have said [SEP]; repetition penalty, temperature, [UNK] ban, top-k / top-p as there."""
    gen = bot.generation
    cur = torch.tensor([ctx_ids] * n)
    generated: list[list[int]] = []
    finished: set[int] = set()
    for _ in range(max_length):
        logits = model(input_ids=cur).logits[:, -1, :].float()
        for row in range(n):
            for t in {step[row] for step in generated}:
                logits[row, t] /= gen.repetition_penalty
        logits = logits / gen.temperature
        logits[:, bot.tokenizer.unk_token_id] = NEG_INF
        logits = top_p_filter(top_k_filter(logits, gen.top_k), gen.top_p)
        next_ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        finished |= {i for i, t in enumerate(next_ids[:, 0].tolist()) if t == bot.sep_id}
        if len(finished) == n:
            break
        generated.append(next_ids[:, 0].tolist())
        cur = torch.cat([cur, next_ids], dim=-1)
    replies = []
    for row in range(n):
        reply = []
        for step in generated:
            if step[row] == bot.sep_id:
                break
            reply.append(step[row])
        replies.append(reply)
    return replies


@torch.inference_mode()
def chitchat_mmi(mmi_model, context: list[list[int]], replies: list[list[int]], bot: ChatBot) -> list[float]:
    """GPT2-chitchat's MMI: each candidate on its own, loss averaged over the WHOLE sequence (reply included)."""
    losses = []
    for reply in replies:
        ids = torch.tensor([build_sequence(list(context) + [reply], "backward", bot.cls_id, bot.sep_id)])
        logits = mmi_model(input_ids=ids).logits  # the mean next-token loss, as `labels=ids` computes it
        losses.append(float(F.cross_entropy(logits[0, :-1], ids[0, 1:])))
    return losses


def chitchat_reply(bot: ChatBot, context: list[list[int]], n: int, max_length: int,
                   generator: torch.Generator) -> float:
    """Seconds for one GPT2-chitchat reply."""
    t0 = time.perf_counter()
    ctx_ids = build_sequence(context, "forward", bot.cls_id, bot.sep_id)
    replies = chitchat_generate(bot.forward_model, ctx_ids, n, bot, max_length, generator)
    losses = chitchat_mmi(bot.backward_model, context, replies, bot)
    _ = replies[min(range(n), key=lambda i: losses[i])]
    return time.perf_counter() - t0


def our_reference_reply(bot: ChatBot, context: list[list[int]], n: int, max_length: int,
                        generator: torch.Generator) -> float:
    """Seconds for one reply of our algorithm without cache or batches (dialogpt_zh/engine/reference.py)."""
    t0 = time.perf_counter()
    gen = dataclasses.replace(bot.generation, num_candidates=n, max_length=max_length)
    reference_reply(bot.forward_model, bot.backward_model, bot.tokenizer, context, gen, bot.mmi_settings, generator)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ timing

def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class Timed(NamedTuple):
    totals: list[float]     # seconds per reply
    shares: list[float]     # MMI's share of each reply
    threads: list[int]      # threads each reply ran with
    lengths: list[float]    # mean tokens of each reply's sampled candidates (+ [SEP]): MMI's share depends on it


def time_ours(bot: ChatBot, contexts, n: int, max_length: int, seed: int, k: int = 0) -> Timed:
    """Each reply's seconds, MMI share, threads and sampled-candidate length (after 2 warm-up replies); `k`
    retrieved candidates join the N sampled ones."""
    for ctx in contexts[:2]:
        bot.reply(ctx, num_candidates=n, seed=seed, max_length=max_length, retrieval_candidates=k)  # warm-up
    timed = Timed([], [], [], [])
    for i, ctx in enumerate(contexts):
        r = bot.reply(ctx, num_candidates=n, seed=seed + i, max_length=max_length, retrieval_candidates=k)
        timed.totals.append(r.latency_s)
        timed.shares.append(r.timings["score"] / r.latency_s)
        timed.threads.append(r.threads)
        sampled = [c.num_tokens for c in r.candidates if c.count]
        timed.lengths.append(sum(sampled) / len(sampled) if sampled else 0.0)
    return timed


def time_reference(bot: ChatBot, contexts, n: int, max_length: int, seed: int, which: str) -> list[float]:
    """Seconds per reply of a reference algorithm: `which` is chitchat or reference."""
    run = chitchat_reply if which == "chitchat" else our_reference_reply
    totals = []
    for i, ctx in enumerate(contexts):
        turns = bot.prepare_context(ctx, bot.generation, max_length, [])[0]  # the turns ours would see
        g = torch.Generator().manual_seed(seed + i)
        with bot.thread_policy.use():  # the same threads as ours would get now
            totals.append(run(bot, turns, n, max_length, g))
    return totals


def threads_used(threads: list[int]) -> str:
    """'2', or 'ThreadsxCount ...' when replies used different counts."""
    counts = Counter(threads)
    return str(threads[0]) if len(counts) == 1 else " ".join(f"{t}x{c}" for t, c in sorted(counts.items()))


# ---------------------------------------------------------------------------------- background load

BUSY_LOOP = """import os
parent = os.getppid()
while os.getppid() == parent:  # ends by itself if the benchmark dies without cleaning up
    for _ in range(1_000_000):
        pass
"""


@contextmanager
def background_load(k: int):
    """K busy processes (one core each) while inside; always killed and reaped on the way out."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(k):
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # let them start, and the thread policy see them (as it would a load that was there)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def policy_for(setting: str) -> ThreadPolicy:
    from dialogpt_zh.errors import UserError

    if setting == "policy":
        return ThreadPolicy()
    if not setting.isdigit() or int(setting) < 1:
        raise UserError(f"thread setting {setting!r}: expected 'policy' or a number >= 1", field="thread_settings")
    return ThreadPolicy(int(setting))


def bench_load(name: str, bot_dir: Path, contexts, ns: list[int], args: LatencyArgs) -> None:
    """Ours idle, then beside --background-load busy processes, for each thread setting."""
    settings = [s.strip() for s in args.thread_settings.split(",") if s.strip()]
    policies = {s: policy_for(s) for s in settings}
    bot = ChatBot.from_pretrained(bot_dir, quantize=args.quantize,
                                  generation=GenerationSettings(max_length=args.max_length), mmi=args.mmi)
    cfg = bot.forward_model.config
    print(f"\n## {name}: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, weights {args.quantize}; "
          f"{len(contexts)} contexts, max_length {args.max_length}; idle vs {args.background_load} busy "
          f"process(es)")
    results: dict[tuple[str, int, str], Timed] = {}

    def measure(phase: str) -> None:
        monitor = policies.get("policy", ThreadPolicy()).monitor
        print(f"# {phase}: load average {os.getloadavg()[0]:.2f}, other processes' busy cores (the policy's "
              f"estimate) {monitor.busy_cores():.2f}", flush=True)
        for n in ns:
            for setting, policy in policies.items():
                bot.thread_policy = policy
                results[setting, n, phase] = time_ours(bot, contexts, n, args.max_length, args.seed)

    measure("idle")
    with background_load(args.background_load) as pids:
        print(f"# started {len(pids)} busy process(es): pids {' '.join(map(str, pids))}", flush=True)
        measure("loaded")
    print(f"{'N':>3} {'threads':>8} | {'idle p50':>8} {'p95':>7} {'MMI':>6} {'thr':>7} | "
          f"{'loaded p50':>10} {'p95':>7} {'MMI':>6} {'thr':>7} | {'loaded/idle p50':>15}")
    for n in ns:
        for setting in settings:
            row = f"{n:>3} {setting:>8}"
            for phase in ("idle", "loaded"):
                totals, shares, threads, _ = results[setting, n, phase]
                width = 8 if phase == "idle" else 10
                row += (f" | {pct(totals, 50):{width}.3f} {pct(totals, 95):7.3f} "
                        f"{statistics.median(shares) * 100:5.1f}% {threads_used(threads):>7}")
            ratio = pct(results[setting, n, "loaded"][0], 50) / pct(results[setting, n, "idle"][0], 50)
            print(f"{row} | {ratio:14.2f}x", flush=True)


def bench_shape(name: str, bot_dir: Path, contexts, ns: list[int], refs: list[str], ref_ns: set[int],
                args: LatencyArgs, ks: tuple[int, ...] = (0,)) -> None:
    import copy

    bot = ChatBot.from_pretrained(bot_dir, quantize=args.quantize,
                                  generation=GenerationSettings(max_length=args.max_length), mmi=args.mmi)
    bot.thread_policy = ThreadPolicy(args.threads)
    hf_bot = copy.copy(bot)
    hf_bot.use_lean_forward = False
    cfg = bot.forward_model.config
    print(f"\n## {name}: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, weights {args.quantize}; "
          f"{len(contexts)} contexts, max_length {args.max_length}; threads: {bot.thread_policy.describe()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    if any(ks) and bot.retrieval is None:
        from dialogpt_zh.errors import UserError

        raise UserError(f"--ks {args.ks}: {bot_dir} has no retrieval index (build BOT/retrieval with "
                        f"python -m dialogpt_zh.index)", field="ks")
    head = f"{'N':>3} {'K':>3} | {'ours p50':>9} {'p95':>7} | {'MMI share':>9} | {'threads':>7} | {'cand tok':>8}"
    if args.compare_hf:
        head += f" | {'ours (HF) p50':>13} {'p95':>7}"
    for ref in refs:
        head += f" | {ref + ' p50':>16} {'p95':>7} {'speed-up':>8}"
    print(head)
    for n, k in ((n, k) for n in ns for k in ks):
        ours, shares, threads, lengths = time_ours(bot, contexts, n, args.max_length, args.seed, k)
        row = (f"{n:>3} {k:>3} | {pct(ours, 50):9.3f} {pct(ours, 95):7.3f} | {statistics.median(shares) * 100:8.1f}% | "
               f"{threads_used(threads):>7} | {statistics.mean(lengths):8.1f}")
        if args.compare_hf:
            hf = time_ours(hf_bot, contexts, n, args.max_length, args.seed, k).totals
            row += f" | {pct(hf, 50):13.3f} {pct(hf, 95):7.3f}"
        for ref in refs:
            if n in ref_ns and not k:
                t = time_reference(bot, contexts, n, args.max_length, args.seed, ref)
                row += f" | {pct(t, 50):16.3f} {pct(t, 95):7.3f} {pct(t, 50) / pct(ours, 50):7.1f}x"
            else:
                row += f" | {'-':>16} {'-':>7} {'-':>8}"
        print(row, flush=True)
    if args.time_int8:
        q = ChatBot.from_pretrained(bot_dir, quantize="int8", generation=GenerationSettings(max_length=args.max_length),
                                    mmi=args.mmi)
        q.thread_policy = bot.thread_policy
        f32 = time_ours(bot, contexts, 10, args.max_length, args.seed).totals
        i8 = time_ours(q, contexts, 10, args.max_length, args.seed).totals
        # perplexity of the real next turns under the forward model, float vs int8
        if args.heldout:
            pairs, what = heldout_pairs(args.heldout, args.heldout_split, args.heldout_pairs)
        else:
            pairs = fixture_contexts_with_replies(len(contexts))
            what = f"{len(pairs)} fixture replies"
        ppl = [perplexity(b, pairs) for b in (bot, q)]
        print(f"int8 at N=10: p50 {pct(i8, 50):.3f} s vs {args.quantize} {pct(f32, 50):.3f} s = "
              f"speed {pct(f32, 50) / pct(i8, 50):.2f}x the {args.quantize} model's (above 1: int8 faster); "
              f"perplexity of {what}: {args.quantize} {ppl[0]:.3f} -> int8 "
              f"{ppl[1]:.3f} ({(ppl[1] / ppl[0] - 1) * 100:+.3f}%)")


def fixture_contexts_with_replies(n: int) -> list[tuple[list[str], str]]:
    return [(s[:-1][-3:], s[-1]) for s in fixture_sessions() if len(s) >= 2][:max(n, 10)]


def heldout_pairs(path: str, split: str, limit: int) -> tuple[list[tuple[list[str], str]], str]:
    """(context of up to 3 turns, next turn) pairs from held-out sessions, read and cleaned like training data."""
    from dialogpt_zh.data.readers import iter_clean_sessions
    from dialogpt_zh.errors import UserError

    pairs = []
    for s in iter_clean_sessions(path):
        if split != "all" and s.split not in {x.strip() for x in split.split(",")}:
            continue
        pairs += [(list(s.turns[max(0, t - 3):t]), s.turns[t]) for t in range(1, len(s.turns))]
        if len(pairs) >= limit:
            break
    if not pairs:
        raise UserError(f"no multi-turn session of split {split!r}", path=path, field="heldout")
    pairs = pairs[:limit]
    return pairs, f"{len(pairs)} held-out replies ({Path(path).name}, split {split})"


def perplexity(bot: ChatBot, pairs) -> float:
    total, count = 0.0, 0
    for ctx, reply in pairs:
        (lp, n), = bot.forward_logprobs(ctx, [reply])
        total, count = total + lp, count + n
    return float(torch.exp(torch.tensor(-total / count)))


def main(argv=None) -> int:
    parser = make_parser([LatencyArgs, MMISettings], prog="python benchmarks/latency.py",
                         description=__doc__.split("\n\n")[0], examples=__doc__.split("\n\n")[1])

    def body() -> int:
        args, args.mmi = parse(parser, argv)  # MMI flags (e.g. --backward_context_turns) set the bot's ranking
        import tempfile

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        ns = [int(x) for x in args.ns.split(",")]
        ks = tuple(int(x) for x in args.ks.split(","))
        refs = [r for r in args.reference.split(",") if r and r != "none"]
        print(f"# latency per reply (seconds); torch {torch.__version__}, threads: "
              f"{ThreadPolicy(args.threads).describe()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}")

        def bench(name: str, bot_dir: Path, contexts, ref_ns: set[int]) -> None:
            if args.background_load:
                bench_load(name, bot_dir, contexts, ns, args)
            else:
                bench_shape(name, bot_dir, contexts, ns, refs, ref_ns, args,
                            ks if name.startswith("model") else (0,))
        with tempfile.TemporaryDirectory() as tmp:
            for preset in args.presets.split(","):
                if preset == "model":
                    if not args.model:
                        print("skip 'model': no --model given")
                        continue
                    bench(f"model {args.model}", Path(args.model), fixture_contexts(args.contexts),
                          {n for n in ns if n <= args.reference_max_n})
                    continue
                bot_dir = random_bot(preset, args.vocab_size, args.seed, Path(tmp))
                is_base = preset == "base"
                contexts = fixture_contexts(args.base_contexts if is_base else args.contexts)
                ref_ns = ({int(x) for x in args.base_reference_ns.split(",")} if is_base
                          else {n for n in ns if n <= args.reference_max_n})
                bench(f"{preset} (random weights)", bot_dir, contexts, ref_ns)
        print(f"# load average at the end {os.getloadavg()[0]:.2f}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
