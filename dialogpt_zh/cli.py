"""Shared command-line plumbing: arguments are dataclasses, parsed once, with defaults and examples in --help.

Every face (preprocess, train, interact, evaluate, web, benchmarks) builds its parser here, so a setting
such as `top_p` is declared once (in its dataclass) and means the same everywhere.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dialogpt_zh.errors import UserError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the hand-formatted examples in the epilog."""


def make_parser(dataclass_types: Sequence[type], prog: str, description: str, examples: str = ""):
    """An argument parser built from dataclasses (field metadata `help` becomes the flag's help)."""
    from transformers import HfArgumentParser  # well-kept dataclass -> argparse mapping

    epilog = "examples:\n" + examples.strip("\n") if examples else None
    return HfArgumentParser(list(dataclass_types), prog=prog, description=description, epilog=epilog,
                            formatter_class=_HelpFormatter)


def parse(parser, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse argv into one instance per dataclass; unknown flags are an error (exit 2)."""
    *parsed, remaining = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None,
                                                            return_remaining_strings=True)
    if remaining:  # HfArgumentParser raises ValueError (a traceback, exit 1); argparse's error exits 2
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(parsed)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a CLI body: UserError -> one clear line on stderr and its exit code; Ctrl-C -> exit 130."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def field_help(text: str, **kw: Any) -> dict:
    """Metadata for a dataclass field: `x: int = field(default=3, metadata=field_help("..."))`."""
    return {"help": text, **kw}


@dataclass
class BotArguments:
    """Which bot to load and where: the flags every face that chats shares (interact, web, evaluate)."""

    model: str | None = field(default=None, metadata=field_help(
        "bot directory (forward/ + backward/, MMI on) or one forward model directory (MMI off); "
        "default: the embedded checkpoints/default"))
    backward: str | None = field(default=None, metadata=field_help(
        "a backward model directory, when --model is a single forward model directory"))
    device: str = field(default="cpu", metadata=field_help("torch device for the models (cpu, cuda, ...)"))
    quantize: str | None = field(default=None, metadata=field_help(
        "'int8': dynamic int8 quantization of the matmuls (CPU only; faster, slightly different scores)"))
    threads: int = field(default=0, metadata=field_help(
        "torch CPU threads (0 = torch's default: all cores); on a machine busy with other jobs 1 is often "
        "several times faster for the small models (docs/engine.md, Threads)"))


def load_bot(args: BotArguments, *settings: Any):
    """The one engine, with the given settings dataclasses (GenerationSettings, MMISettings) as its defaults."""
    from dataclasses import asdict

    from dialogpt_zh.engine import ChatBot

    if args.backward and not args.model:
        raise UserError("--backward needs --model (the forward model directory)", field="backward")
    if args.threads < 0:
        raise UserError(f"must be >= 0, got {args.threads}", field="threads")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # process-wide: a face serves one bot
    merged = {k: v for s in settings for k, v in asdict(s).items()}
    return ChatBot.from_pretrained(args.model, backward=args.backward, device=args.device,
                                   quantize=args.quantize, **merged)
