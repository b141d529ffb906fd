"""Training throughput: our trainer vs. a naive GPT2-chitchat-style loop, and tokens/s per preset.

1. Same model, same store, same number of steps, same windows per step: the naive loop draws random
   batches and pads them to the longest window (as GPT2-chitchat does); our trainer (`dialogpt_zh.training.loop.train`,
   the real code path) groups windows of similar length. Figure: real (non-padding) tokens per second.
2. Our trainer's tokens/s for each preset and the estimated time of one epoch of the train split
   (base: a few steps only).

3. With --baseline (a checkout of another version, or a git ref checked out for the run into a temporary
   worktree): that version's trainer and this one, side by side in alternating runs (A B B A ...), each a
   separate process with the same settings (--baseline-steps steps of --batch-tokens, --threads): tokens/s
   of every run, and how close the loss curves are (the batches are the same; dropout masks too while the
   weights agree). --variants adds runs of this version with other settings (e.g. "pack=512;compile=on").

Prints its figures; nothing is asserted. CPU figures depend on the machine's load (printed too).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dialogpt_zh.cli import field_help, make_parser, parse, run_main
from dialogpt_zh.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@dataclass
class BenchArgs:
    data: str = field(default=str(REPO / "data" / "base"), metadata=field_help("token store"))
    compare_preset: str = field(default="small", metadata=field_help("model of the ours-vs-naive comparison"))
    steps: int = field(default=20, metadata=field_help("optimizer steps per comparison run"))
    batch_size: int = field(default=16, metadata=field_help("windows per step, both loops"))
    presets: str = field(default="tiny,small,base", metadata=field_help("presets to time (comma-separated)"))
    preset_steps: int = field(default=10, metadata=field_help("steps per preset (base: --base-steps)"))
    base_steps: int = field(default=3, metadata=field_help("steps for the base preset"))
    batch_tokens: int = field(default=4096, metadata=field_help("micro-batch budget for the per-preset timing"))
    threads: int = field(default=2, metadata=field_help("torch CPU threads"))
    seed: int = field(default=0, metadata=field_help("seed"))
    sections: str = field(default="naive,presets", metadata=field_help(
        "what to run, comma-separated: naive (ours vs naive), presets (tokens/s per preset), baseline "
        "(needs --baseline), plain (ours vs a plain loop of the same model: the GPU reference)"))
    baseline: str = field(default="", metadata=field_help(
        "another version to run side by side: a directory holding dialogpt_zh/, or a git ref of this repository"))
    baseline_steps: int = field(default=200, metadata=field_help("optimizer steps per side-by-side run"))
    baseline_preset: str = field(default="small", metadata=field_help("model of the side-by-side runs"))
    repeats: int = field(default=2, metadata=field_help("side-by-side rounds (each: baseline, this, this, baseline)"))
    variants: str = field(default="", metadata=field_help(
        "extra side-by-side runs of this version, ';'-separated, each comma-separated setting=value"))
    device: str = field(default="auto", metadata=field_help("plain section: cuda, cpu or auto (cuda when present)"))
    plain_preset: str = field(default="base", metadata=field_help("plain section: the model of both loops"))
    plain_steps: int = field(default=50, metadata=field_help("plain section: timed steps of each loop"))
    plain_warmup: int = field(default=10, metadata=field_help(
        "plain section: steps before the timing starts (torch.compile compiles in them)"))
    plain_rows: int = field(default=64, metadata=field_help("plain section: rows of the plain loop's batch"))
    plain_width: int = field(default=256, metadata=field_help("plain section: tokens per row of the plain loop"))
    plain_compile: bool = field(default=True, metadata=field_help(
        "plain section: also time the plain loop under torch.compile (the reference to compare with)"))


def naive_loop(store_path: str, preset: str, steps: int, batch_size: int, seed: int) -> dict:
    """GPT2-chitchat's way: uniformly random batches padded to their longest window."""
    import torch
    import torch.nn.functional as F

    from dialogpt_zh.data.store import TokenStore
    from dialogpt_zh.training.batches import collate
    from dialogpt_zh.training.presets import build_model

    store = TokenStore(store_path)
    split, tok = store.split("train"), store.tokenizer()
    torch.manual_seed(seed)
    model = build_model(preset, tok).train()
    keep = np.flatnonzero(split.lengths() <= model.config.n_positions)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    rng = np.random.default_rng(seed)
    real = padded = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = collate(split, rng.choice(keep, batch_size, replace=False), "forward", tok.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # the mean next-token loss over the labelled positions (what `labels=` computes, without its warning)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += batch.num_tokens
        padded += batch.input_ids.numel()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": real / dt, "seconds": dt, "real_tokens": real, "padding_share": 1 - real / padded}


def ours(store_path: str, preset: str, steps: int, seed: int, batch_size: int = 0, batch_tokens: int = 4096) -> dict:
    """Our trainer, the real code path; wall time covers the training steps (not the final save)."""
    from dialogpt_zh.training.config import TrainConfig
    from dialogpt_zh.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        m = train(TrainConfig(data=store_path, output=str(Path(tmp) / "out"), preset=preset, max_steps=steps,
                              eval_every=10 ** 9, eval_windows=50, batch_size=batch_size, batch_tokens=batch_tokens,
                              seed=seed, device="cpu"))
    return {"tokens_per_s": m["tokens_per_s"], "seconds": m["wall_time_s"], "real_tokens": m["tokens_seen"],
            "padding_share": m["padding_share"]}


def naive_vs_ours(args: BenchArgs) -> None:
    print(f"\n== ours vs naive: preset {args.compare_preset}, {args.steps} steps x {args.batch_size} windows ==")
    n = naive_loop(args.data, args.compare_preset, args.steps, args.batch_size, args.seed)
    o = ours(args.data, args.compare_preset, args.steps, args.seed, batch_size=args.batch_size)
    for name, r in (("naive (random, pad to longest)", n), ("ours (length-grouped)", o)):
        print(f"{name:32s} {r['tokens_per_s']:9.0f} real tokens/s  {r['seconds']:7.1f} s  "
              f"padding {100 * r['padding_share']:4.1f}%")
    print(f"speed-up (real tokens/s): {o['tokens_per_s'] / n['tokens_per_s']:.2f}x   "
          f"(load average now {os.getloadavg()[0]:.1f})")


def per_preset(args: BenchArgs, store, train_tokens: int) -> None:
    from dialogpt_zh.training.presets import build_model

    print(f"\n== our trainer per preset (--batch-tokens {args.batch_tokens}) ==")
    print(f"{'preset':8s} {'params':>8s} {'steps':>5s} {'tokens/s':>9s} {'epoch (est.)':>13s}")
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        steps = args.base_steps if preset == "base" else args.preset_steps
        r = ours(args.data, preset, steps, args.seed, batch_tokens=args.batch_tokens)
        params = sum(p.numel() for p in build_model(preset, store.tokenizer()).parameters())
        epoch_h = train_tokens / r["tokens_per_s"] / 3600
        print(f"{preset:8s} {params / 1e6:7.1f}M {steps:5d} {r['tokens_per_s']:9.0f} {epoch_h:11.2f} h")
    print(f"(load average at the end {os.getloadavg()[0]:.1f}; 1 epoch = {train_tokens:,} tokens)")


def plain_loop(args: BenchArgs, device: str, compiled: bool) -> float:
    """The GPU reference for the trainer: a twenty-line loop of the same Hugging Face GPT-2 over the store's
    train tokens cut into plain_rows x plain_width (no windows, no masks), bf16 autocast on CUDA, fused AdamW.
    Returns tokens/s over the steps after the warm-up."""
    import torch
    import torch.nn.functional as F

    from dialogpt_zh.data.store import TokenStore
    from dialogpt_zh.training.presets import build_model

    store = TokenStore(args.data)
    stream, tok = store.split("train").ids, store.tokenizer()
    torch.manual_seed(args.seed)
    model = build_model(args.plain_preset, tok).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=True)
    forward = torch.compile(model) if compiled else model
    span = args.plain_rows * (args.plain_width + 1)
    if len(stream) < span + 1:
        raise UserError(f"the train split has {len(stream)} tokens, fewer than one batch ({span})", field="data")
    t0 = 0.0
    for i in range(args.plain_warmup + args.plain_steps):
        if i == args.plain_warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        start = (i * span) % (len(stream) - span)
        chunk = torch.from_numpy(np.asarray(stream[start:start + span], dtype=np.int64))
        chunk = chunk.view(args.plain_rows, -1).to(device, non_blocking=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = forward(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return args.plain_rows * args.plain_width * args.plain_steps / (time.perf_counter() - t0)


def against_plain_loop(args: BenchArgs) -> None:
    """Our trainer (this checkout, the device's defaults: batch tokens, precision, compile) against the plain
    loop on the same model and device. Ours is timed by two runs of warm-up and warm-up + steps steps (each
    in its own process): the difference of their tokens and training wall time leaves out start-up and
    compilation, as the plain loop's warm-up does."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\n== our trainer vs a plain loop: preset {args.plain_preset} on {device}, {args.plain_steps} timed steps "
          f"after {args.plain_warmup} ==")
    eager = plain_loop(args, device, compiled=False)
    print(f"plain loop, eager ({args.plain_rows} x {args.plain_width}, fused AdamW"
          f"{', bf16' if device == 'cuda' else ''}): {eager:,.0f} tokens/s", flush=True)
    reference = eager
    if args.plain_compile:
        reference = plain_loop(args, device, compiled=True)
        print(f"plain loop, torch.compile: {reference:,.0f} tokens/s", flush=True)
    common = dict(data=str(Path(args.data).resolve()), preset=args.plain_preset, eval_every=10 ** 9,
                  eval_windows=50, seed=args.seed, device=device, threads=args.threads)
    short = run_once(REPO, {**common, "max_steps": args.plain_warmup})
    full = run_once(REPO, {**common, "max_steps": args.plain_warmup + args.plain_steps})
    ours_speed = (full["tokens_seen"] - short["tokens_seen"]) / max(1e-9, full["wall_time_s"] - short["wall_time_s"])
    print(f"our trainer (device defaults): {ours_speed:,.0f} real tokens/s (whole runs: {short['tokens_per_s']:,.0f} "
          f"and {full['tokens_per_s']:,.0f})")
    print(f"ours / plain {'compiled' if args.plain_compile else 'eager'}: {ours_speed / reference:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f})")


# One side-by-side run, in its own process so that each version imports its own dialogpt_zh.
RUNNER = """
import json, logging, sys, tempfile
from pathlib import Path
from dialogpt_zh.training.config import TrainConfig
from dialogpt_zh.training.loop import train
logging.getLogger("dialogpt_zh.train").setLevel(logging.WARNING)
with tempfile.TemporaryDirectory() as tmp:
    m = train(TrainConfig(output=str(Path(tmp) / "out"), **json.loads(sys.argv[1])))
keys = ("tokens_per_s", "wall_time_s", "tokens_seen", "padding_share", "valid_loss")
import dialogpt_zh
print("RESULT " + json.dumps({**{k: m[k] for k in keys}, "train": [h[1] for h in m["history"]["train"]],
                              "code": str(Path(dialogpt_zh.__file__).parent.parent)}))
"""


@contextlib.contextmanager
def checkout(baseline: str):
    """A directory holding the baseline's dialogpt_zh/: the given one, or a temporary git worktree of a ref."""
    if (Path(baseline) / "dialogpt_zh").is_dir():
        yield Path(baseline), baseline
        return
    tmp = Path(tempfile.mkdtemp(prefix="train_baseline_")) / "checkout"
    made = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp), baseline],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise UserError(f"not a checkout nor a git ref of {REPO}: {made.stderr.strip()}", field="baseline")
    commit = subprocess.run(["git", "-C", str(tmp), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    try:
        yield tmp, f"{baseline} ({commit})"
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp)], capture_output=True)
        shutil.rmtree(tmp.parent, ignore_errors=True)


def parse_variants(text: str) -> list[dict]:
    """ "pack=512,compile=on;prefetch=0" -> [{"pack": 512, "compile": "on"}, {"prefetch": 0}]"""
    variants = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        settings = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"expected setting=value, got {item!r}", field="variants")
            value = value.strip()
            settings[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
        variants.append(settings)
    return variants


def run_once(code_dir: Path, settings: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir), "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    # cwd too: `python -c` puts the working directory before PYTHONPATH on sys.path
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(settings)], env=env, cwd=code_dir,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise UserError(f"the run in {code_dir} failed:\n{done.stderr[-3000:]}", field="baseline")
    result = json.loads(lines[-1][len("RESULT "):])
    if Path(result["code"]).resolve() != Path(code_dir).resolve():
        raise UserError(f"the run meant for {code_dir} imported dialogpt_zh from {result['code']}", field="baseline")
    return {**result, "load": load}


def side_by_side(args: BenchArgs) -> None:
    """Baseline vs this checkout (and --variants), alternating; every run is printed."""
    common = dict(data=str(Path(args.data).resolve()), preset=args.baseline_preset, max_steps=args.baseline_steps,
                  eval_every=10 ** 9, eval_windows=200, batch_tokens=args.batch_tokens, seed=args.seed,
                  threads=args.threads, device="cpu")
    variants = parse_variants(args.variants)
    with checkout(args.baseline) as (base_dir, label):
        arms = [("baseline", base_dir, {})] + [("this", REPO, {})] + [
            ("this " + ",".join(f"{k}={v}" for k, v in v.items()), REPO, v) for v in variants]
        print(f"\n== side by side: baseline {label} vs this checkout ({REPO}): {args.baseline_preset}, "
              f"{args.baseline_steps} steps of {args.batch_tokens} tokens, {args.threads} threads ==")
        print(f"{'run':>3} {'code':28s} {'tokens/s':>9} {'seconds':>8} {'load':>5} {'loss 1-10':>9} "
              f"{'loss last 50':>12} {'valid':>7}")
        results: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
        order = [a for r in range(args.repeats) for a in (arms if r % 2 == 0 else arms[::-1])]
        for n, (name, code_dir, extra) in enumerate(order, 1):
            r = run_once(code_dir, {**common, **extra})
            results[name].append(r)
            print(f"{n:3d} {name:28s} {r['tokens_per_s']:9.0f} {r['wall_time_s']:8.1f} {r['load']:5.1f} "
                  f"{np.mean(r['train'][:10]):9.4f} {np.mean(r['train'][-50:]):12.4f} {r['valid_loss']:7.4f}",
                  flush=True)
    base = results["baseline"][0]["train"]
    base_speed = float(np.median([r["tokens_per_s"] for r in results["baseline"]]))
    print(f"\n{'code':28s} {'median tokens/s':>15} {'vs baseline':>11} {'mean |loss - baseline run 1| per step':>38}")
    for name, runs in results.items():
        speed = float(np.median([r["tokens_per_s"] for r in runs]))
        gap = np.mean([np.mean(np.abs(np.array(r["train"]) - np.array(base))) for r in runs])
        print(f"{name:28s} {speed:15.0f} {speed / base_speed:10.2f}x {gap:38.4f}")
    spread = [np.mean(np.abs(np.array(a["train"]) - np.array(b["train"])))
              for a, b in zip(results["baseline"], results["baseline"][1:])]
    if spread:
        print(f"(baseline run vs baseline run: {np.mean(spread):.4f} per step — what the same code gives twice)")


def main(argv=None) -> int:
    def body() -> int:
        import logging

        import torch

        (args,) = parse(make_parser([BenchArgs], prog="python benchmarks/train_throughput.py",
                                    description=__doc__.split("\n\n")[0],
                                    examples="  python benchmarks/train_throughput.py\n"
                                             "  python benchmarks/train_throughput.py --presets tiny --steps 10\n"
                                             "  python benchmarks/train_throughput.py --sections baseline "
                                             "--baseline ce10fe3 --variants 'pack=512;compile=on'"), argv)
        sections = {s.strip() for s in args.sections.split(",") if s.strip()}
        if sections - {"naive", "presets", "baseline", "plain"}:
            raise UserError(f"unknown sections {sorted(sections - {'naive', 'presets', 'baseline', 'plain'})}",
                            field="sections")
        if "baseline" in sections and not args.baseline:
            raise UserError("the baseline section needs --baseline DIR_OR_GIT_REF", field="baseline")
        logging.getLogger("dialogpt_zh.train").setLevel(logging.WARNING)
        os.environ.setdefault("TQDM_DISABLE", "1")
        torch.set_num_threads(args.threads)
        if not (Path(args.data) / "manifest.json").is_file():
            print(f"no token store at {args.data}: make one with `python -m dialogpt_zh.preprocess ... --output "
                  f"{args.data}` (the shared corpus store is what the figures in docs/training.md use)")
            return 1
        from dialogpt_zh.data.store import TokenStore

        store = TokenStore(args.data)
        train_tokens = int(store.split("train").lengths().sum())
        print(f"store {args.data}: {len(store.split('train')):,} train windows, {train_tokens:,} tokens "
              f"(with [CLS]/[SEP]); torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
        if "naive" in sections:
            naive_vs_ours(args)
        if "presets" in sections:
            per_preset(args, store, train_tokens)
        if "baseline" in sections:
            side_by_side(args)
        if "plain" in sections:
            against_plain_loop(args)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
