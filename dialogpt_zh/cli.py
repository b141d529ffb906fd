"""Shared command-line plumbing: arguments are dataclasses, parsed once, with defaults and examples in --help.

Every face (preprocess, train, interact, evaluate, web, benchmarks) builds its parser here, so a setting
such as `top_p` is declared once (in its dataclass) and means the same everywhere. Only plumbing lives here:
the settings and `BotArguments` are in `dialogpt_zh.settings`, `load_bot` in `dialogpt_zh.engine.bot`.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import loads_json
from dialogpt_zh.settings import (
    NULL_IN_RUN_FILES,
    field_help,  # noqa: F401  (re-exported: every CLI's dataclasses use it)
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the hand-formatted examples in the epilog."""


CONFIG_FLAG = "--config"
# what argparse reads as a negative number (a value), not a flag: -1, -1.5, -.5, -1e3, -1E-3, -inf, -nan
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def make_parser(dataclass_types: Sequence[type], prog: str, description: str, examples: str = ""):
    """An argument parser built from dataclasses (field metadata `help` becomes the flag's help).

    Every parser also takes `--config RUN.json`: settings from a JSON file, overridden by the flags given.
    """
    from transformers import HfArgumentParser  # well-kept dataclass -> argparse mapping

    epilog = "examples:\n" + examples.strip("\n") if examples else None
    parser = HfArgumentParser(list(dataclass_types), prog=prog, description=description, epilog=epilog,
                              formatter_class=_HelpFormatter)
    # argparse takes only -1 and -.5 as negative numbers: `--length_weight -1e3` (a valid value) was refused
    # as a missing argument, `--top_p -inf` as well instead of by the setting's own check
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    # default=SUPPRESS: no `config` attribute unless given (parse() removes it), so callers of
    # parse_args_into_dataclasses still get exactly their dataclasses back
    parser.add_argument(CONFIG_FLAG, metavar="RUN.json", default=argparse.SUPPRESS, help=(
        "take settings from this JSON file (an object of setting: value, or a file with such an object under "
        "\"config\", e.g. a model's dialogpt_zh.json or a store's manifest.json); flags given on the command "
        "line override it"))
    return parser


def parse(parser, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse argv into one instance per dataclass; unknown flags are an error (exit 2).

    With `--config FILE` the file's settings become the defaults first (the command line still wins).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_path(argv)
    if config is not None:
        _apply_config_file(parser, Path(config))
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:  # HfArgumentParser raises ValueError (a traceback, exit 1); argparse's error exits 2
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    if parsed and isinstance(parsed[-1], argparse.Namespace):  # extra (non-dataclass) arguments
        if vars(parsed[-1]).pop("config", None) is not None and config is None:
            parser.error(f"write {CONFIG_FLAG} in full (an abbreviation of it was given)")
        if not vars(parsed[-1]):
            parsed.pop()
    return tuple(parsed)


def config_path(argv: Sequence[str]) -> str | None:
    """The FILE of `--config FILE` in argv, else None (an input of the run: never to be written over)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # `--c x` may be another flag
    probe.add_argument(CONFIG_FLAG, default=None)
    return probe.parse_known_args(list(argv))[0].config


# a config, a card or a manifest is kilobytes; reading stops past this (`--config /dev/zero` grew without end)
MAX_CONFIG_BYTES = 16 << 20


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a --config file: a JSON object, or the object under its "config" key. A UTF-8 BOM (as
    some Windows editors save) is read past, as the project's other JSON readers do."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"over {MAX_CONFIG_BYTES >> 20} MiB: too large for a config file (a JSON object of "
                            "setting: value)", path=path)
        data = loads_json(raw.decode("utf-8-sig"))
    except FileNotFoundError as e:
        raise UserError("config file not found", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the config file: {getattr(e, 'strerror', None) or e}", path=path) from e
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from e
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError("a config file holds a JSON object of setting: value", path=path)
    return data


def _apply_config_file(parser, path: Path) -> None:
    """Make the file's values the parser's defaults, checked and converted as if typed on the command line."""
    actions = {}
    for action in parser._actions:  # the typed action of each setting (not the --no_X twin of a bool)
        if action.dest not in actions or action.type is not None:
            actions[action.dest] = action
    defaults = {}
    for key, value in read_config_file(path).items():
        action = actions.get(key)
        if action is None or key in ("help", "config"):
            raise UserError(f"unknown setting {key!r} for {parser.prog}", path=path, field=key)
        defaults[key] = _config_value(action, value, path, key)
        action.required = False  # the file gives it
        if not action.option_strings and action.nargs == "+":
            action.nargs = "*"  # a positional list (preprocess inputs) may now come from the file alone
    parser.set_defaults(**defaults)


def _config_value(action, value: Any, path: Path, key: str) -> Any:
    if value is None:
        if action.default is None and not action.required:  # an Optional setting
            return None
        if key in NULL_IN_RUN_FILES:
            return NULL_IN_RUN_FILES[key]
        raise UserError("null is not allowed for this setting", path=path, field=key)
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise UserError(f"expected a list, got {value!r}", path=path, field=key)
        return [_config_scalar(action, v, path, key) for v in value]
    return _config_scalar(action, value, path, key)


def _config_scalar(action, value: Any, path: Path, key: str) -> Any:
    convert = action.type or str
    is_bool = getattr(convert, "__name__", "") == "string_to_bool"
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and not is_bool):
        raise UserError(f"{value!r} is not a valid value", path=path, field=key)
    if isinstance(value, str) and "\0" in value:  # a command line cannot hold one; the os calls would raise
        raise UserError("a NUL character is not allowed in a setting", path=path, field=key)
    try:  # a bool as JSON true/false, else read like the command line's (1, "yes", ...)
        converted = convert(value if isinstance(value, bool) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{value!r} is not a valid value ({e})", path=path, field=key) from e
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{value!r} is not one of {list(action.choices)}", path=path, field=key)
    return converted


class Terminated(KeyboardInterrupt):
    """SIGTERM (plain `kill`, `timeout`, a container stop), raised like Ctrl-C so cleanup code runs."""


_stop_signal: int | None = None  # the SIGINT/SIGTERM received during run_main, if any
_running = False                 # run_main's stop handlers are installed
_holding = False                 # hold_stops() was called: a stop is recorded, not raised


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_stop_signal(signum, frame) -> None:
    global _stop_signal
    _stop_signal = signum
    if not _holding:
        raise _stop_exception(signum)


def hold_stops() -> None:
    """From now until run_main returns, Ctrl-C / SIGTERM are recorded instead of raised, and run_main returns
    the body's own exit code. For the last moments of a run whose output is complete (putting it in place,
    printing a summary): a stop then could only leave a half-done rename, or a false "outputs left as they
    were" beside the new output, while finishing takes moments. No effect outside run_main."""
    global _holding
    _holding = _running


def _quiet_swallowed_stop(unraisable) -> None:
    """A stop signal's exception that the interpreter could not raise is acted on by raise_if_stopped();
    everything else is reported as usual."""
    if _stop_signal is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def raise_if_stopped() -> None:
    """Raise Ctrl-C / SIGTERM again if one was received. A signal's exception can be swallowed when it
    lands inside an interpreter callback (e.g. logging's after-fork hook when a worker pool starts: Python
    only prints "Exception ignored"); long jobs call this between batches and before they commit outputs,
    so a stop request is never lost."""
    if _stop_signal is not None and not _holding:
        raise _stop_exception(_stop_signal)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a CLI body: UserError -> one clear line on stderr and its exit code; Ctrl-C -> exit 130;
    SIGTERM -> the same cleanup as Ctrl-C (temp files removed, previous outputs kept), exit 143."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    global _stop_signal, _running, _holding
    _stop_signal, _holding = None, False
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        _running = True
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_swallowed_stop
    try:
        code = main()
        if _stop_signal is not None:  # held (hold_stops): it came when only finishing was left
            print("stop received while the run was finishing; it finished", file=sys.stderr)
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
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)
        if previous:
            _running = _holding = False
        sys.unraisablehook = previous_hook
    return int(code or 0)
