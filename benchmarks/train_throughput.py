"""Training throughput: our trainer vs. a naive GPT2-chitchat-style loop, and tokens/s per preset.

1. Same model, same store, same number of steps, same windows per step: the naive loop draws random
   batches and pads them to the longest window (as GPT2-chitchat does); our trainer (`dialogpt_zh.training.loop.train`,
   the real code path) groups windows of similar length. Figure: real (non-padding) tokens per second.
2. Our trainer's tokens/s for each preset and the estimated time of one epoch of the train split
   (base: a few steps only).

Prints its figures; nothing is asserted. CPU figures depend on the machine's load (printed too).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dialogpt_zh.cli import field_help, make_parser, parse, run_main

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


def naive_loop(store_path: str, preset: str, steps: int, batch_size: int, seed: int) -> dict:
    """GPT2-chitchat's way: uniformly random batches padded to their longest window; loss via labels."""
    import torch

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
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
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


def main(argv=None) -> int:
    def body() -> int:
        import logging

        import torch

        (args,) = parse(make_parser([BenchArgs], prog="python benchmarks/train_throughput.py",
                                    description=__doc__.split("\n\n")[0],
                                    examples="  python benchmarks/train_throughput.py\n"
                                             "  python benchmarks/train_throughput.py --presets tiny --steps 10"), argv)
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

        print(f"\n== ours vs naive: preset {args.compare_preset}, {args.steps} steps x {args.batch_size} windows ==")
        n = naive_loop(args.data, args.compare_preset, args.steps, args.batch_size, args.seed)
        o = ours(args.data, args.compare_preset, args.steps, args.seed, batch_size=args.batch_size)
        for name, r in (("naive (random, pad to longest)", n), ("ours (length-grouped)", o)):
            print(f"{name:32s} {r['tokens_per_s']:9.0f} real tokens/s  {r['seconds']:7.1f} s  "
                  f"padding {100 * r['padding_share']:4.1f}%")
        print(f"speed-up (real tokens/s): {o['tokens_per_s'] / n['tokens_per_s']:.2f}x   "
              f"(load average now {os.getloadavg()[0]:.1f})")

        print(f"\n== our trainer per preset (--batch-tokens {args.batch_tokens}) ==")
        print(f"{'preset':8s} {'params':>8s} {'steps':>5s} {'tokens/s':>9s} {'epoch (est.)':>13s}")
        from dialogpt_zh.training.presets import build_model

        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            steps = args.base_steps if preset == "base" else args.preset_steps
            r = ours(args.data, preset, steps, args.seed, batch_tokens=args.batch_tokens)
            params = sum(p.numel() for p in build_model(preset, store.tokenizer()).parameters())
            epoch_h = train_tokens / r["tokens_per_s"] / 3600
            print(f"{preset:8s} {params / 1e6:7.1f}M {steps:5d} {r['tokens_per_s']:9.0f} {epoch_h:11.2f} h")
        print(f"(load average at the end {os.getloadavg()[0]:.1f}; 1 epoch = {train_tokens:,} tokens)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
