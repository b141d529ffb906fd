"""Shared command-line plumbing: arguments are dataclasses, parsed once, with defaults and examples in --help.

Every face (preprocess, train, interact, evaluate, web, benchmarks) builds its parser here, so a setting
such as `top_p` is declared once (in its dataclass) and means the same everywhere. Only plumbing lives here:
the settings and `BotArguments` are in `dialogpt_zh.settings`, `load_bot` in `dialogpt_zh.engine`.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Callable, Sequence

from dialogpt_zh.errors import UserError
from dialogpt_zh.settings import field_help  # noqa: F401  (re-exported: every CLI's dataclasses use it)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (plain `kill`, `timeout`, a container stop), raised like Ctrl-C so cleanup code runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_main(main: Callable[[], int | None]) -> int:
    """Run a CLI body: UserError -> one clear line on stderr and its exit code; Ctrl-C -> exit 130;
    SIGTERM -> the same cleanup as Ctrl-C (temp files removed, previous outputs kept), exit 143."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("terminated (SIGTERM); outputs left as they were", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)
