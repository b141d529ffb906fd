"""Where a training step's time goes: the real trainer (`dialogpt_zh.training.loop.train`) under torch.profiler.

Profiles the steps after --warmup-steps of a short run and prints the operators by self CPU time, and the same
time summed into a few groups (matrix products, elementwise, attention, loss, optimizer, ...). It profiles
whichever dialogpt_zh is importable, so an older checkout can be profiled the same way:

    python benchmarks/train_profile.py --data data/base
    PYTHONPATH=/path/to/old/checkout python benchmarks/train_profile.py --data data/base

Only settings that every version of TrainConfig has are passed. Prints its figures; nothing is asserted.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dialogpt_zh.cli import field_help, make_parser, parse, run_main

REPO = Path(__file__).resolve().parent.parent

# operator name -> group, first match wins (the names are aten's)
GROUPS = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("loss (log-softmax, cross-entropy)", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "aten::exp",
                                           "aten::gather")),
    ("attention", ("scaled_dot_product", "_softmax", "aten::softmax", "baddbmm")),
    ("dropout", ("bernoulli", "dropout", "native_dropout")),
    ("layer norm", ("layer_norm",)),
    ("GELU and other elementwise", ("aten::mul", "aten::add", "aten::pow", "aten::tanh", "aten::gelu", "aten::div",
                                    "aten::where", "aten::sub", "aten::neg")),
    ("optimizer", ("adam", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt", "norm")),
    ("copies, fills, views", ("aten::copy_", "aten::fill_", "aten::zero", "aten::clone", "aten::cat", "aten::index",
                              "aten::slice", "aten::empty", "aten::to", "aten::contiguous", "aten::masked",
                              "aten::scatter", "aten::gather", "aten::sum", "aten::embedding")),
]


@dataclass
class ProfileArgs:
    data: str = field(default=str(REPO / "data" / "base"), metadata=field_help("token store"))
    preset: str = field(default="small", metadata=field_help("model preset"))
    batch_tokens: int = field(default=4096, metadata=field_help("micro-batch budget in tokens"))
    warmup_steps: int = field(default=3, metadata=field_help("steps run before profiling starts"))
    steps: int = field(default=10, metadata=field_help("steps profiled"))
    threads: int = field(default=2, metadata=field_help("torch CPU threads"))
    rows: int = field(default=25, metadata=field_help("operators listed"))
    seed: int = field(default=0, metadata=field_help("seed"))


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main(argv=None) -> int:
    def body() -> int:
        import logging

        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.profiler import ProfilerActivity, profile

        import dialogpt_zh
        from dialogpt_zh.training.config import TrainConfig
        from dialogpt_zh.training.loop import train

        (args,) = parse(make_parser([ProfileArgs], prog="python benchmarks/train_profile.py",
                                    description=__doc__.split("\n\n")[0],
                                    examples="  python benchmarks/train_profile.py --data data/base --steps 10"), argv)
        logging.getLogger("dialogpt_zh.train").setLevel(logging.WARNING)
        os.environ.setdefault("TQDM_DISABLE", "1")
        if not (Path(args.data) / "manifest.json").is_file():
            print(f"no token store at {args.data}")
            return 1
        total = args.warmup_steps + args.steps
        prof = profile(activities=[ProfilerActivity.CPU])
        updates = []

        # The profile covers the updates after the warm-up ones, up to the last one (not the final validation
        # and save): an optimizer step hook counts the updates.
        def count_steps(optimizer, args_, kwargs_) -> None:
            updates.append(1)
            if len(updates) == args.warmup_steps:
                prof.__enter__()
            elif len(updates) == total:
                prof.__exit__(None, None, None)

        handle = register_optimizer_step_post_hook(count_steps)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                metrics = train(TrainConfig(data=args.data, output=str(Path(tmp) / "out"), preset=args.preset,
                                            max_steps=total, eval_every=10 ** 9, eval_windows=50, seed=args.seed,
                                            batch_tokens=args.batch_tokens, threads=args.threads, device="cpu"))
        finally:
            handle.remove()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        spent = sum(e.self_cpu_time_total for e in events)
        print(f"dialogpt_zh from {Path(dialogpt_zh.__file__).parent}; torch {torch.__version__}, "
              f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
        print(f"{args.preset}, --batch-tokens {args.batch_tokens}: {metrics['tokens_per_s']:.0f} tokens/s over the "
              f"whole run of {total} steps; profiled: steps {args.warmup_steps + 1}-{total}, {spent / 1e6:.1f} s of "
              "operator time")
        groups: dict[str, float] = defaultdict(float)
        for e in events:
            groups[group_of(e.key)] += e.self_cpu_time_total
        print("\nby group (self CPU time):")
        for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {name:36s} {100 * t / spent:5.1f} %")
        print(f"\ntop {args.rows} operators (self CPU time):")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"  {e.key[:60]:60s} {100 * e.self_cpu_time_total / spent:5.1f} %  {e.count:6d} calls")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
