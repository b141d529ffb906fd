"""Rerank candidates from anywhere (another bot's outputs, a retrieval system's) with the engine's MMI scorer.

Reads JSON Lines of `{"context": ["u1", ..., "uk"], "candidates": ["r1", "r2", ...]}` (a candidate may also be
an object with a "text" field, so this command's own output can be fed back) and writes each record back,
streaming, with every other field kept and each candidate as
`{"text", "rank", "score", "forward_logprob", "backward_logprob", "num_tokens", "num_context_tokens", "source",
"similarity"}` (input order, other fields of a candidate object kept; rank 1 = the best; "source" "given", or
"given+retrieved" when the bot's index returned that text too) plus "best" (the rank-1 text) and "mmi"
(whether the backward model scored them). With `--retrieval_candidates K` (a bot with an index,
docs/retrieval.md) the index's K replies for the context are ranked with them and follow the given ones
(source "retrieved", with their "similarity").
Every score comes from `ChatBot.rerank` (one batch per record); this file never scores anything itself.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from dialogpt_zh.cli import make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import atomic_open, check_output_file, loads_json
from dialogpt_zh.settings import BotArguments, GenerationSettings, MMISettings, field_help

EXAMPLES = """
  python -m dialogpt_zh.rerank candidates.jsonl --output reranked.jsonl
  python -m dialogpt_zh.rerank other_bot.jsonl --output - --skip_bad_lines | head
  python -m dialogpt_zh.rerank cands.jsonl --output out.jsonl --model runs/mybot --forward_weight 0.5
  python -m dialogpt_zh.rerank cands.jsonl --output out.jsonl --model /tmp/bot --retrieval_candidates 10
  # one input line: {"context": ["你喜欢什么运动"], "candidates": ["喜欢", "我喜欢打篮球"]}
"""


@dataclass
class RerankArgs:
    output: str = field(default="", metadata=field_help(
        "JSON Lines file to write (temp file, renamed at the end), or '-' for stdout (required)"))
    overwrite: bool = field(default=False, metadata=field_help("replace --output if it exists"))
    skip_bad_lines: bool = field(default=False, metadata=field_help(
        "skip (and count, with file:line reasons) lines that are not a valid record instead of stopping"))
    progress: bool = field(default=True, metadata=field_help("show a progress bar (--no_progress to hide)"))

    def __post_init__(self) -> None:
        if not self.output:
            raise UserError("--output FILE (or '-' for stdout) is required", field="output")


def _no_constant(name: str) -> Any:
    # Python reads NaN / Infinity (and 1e999 as inf), which JSON has not: kept in the record, they made an
    # output line that other JSON readers refuse
    raise ValueError(f"not JSON ({name} is no JSON value)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is beyond a float's range")
    return value


def parse_record(line: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(record, context, candidate texts) of one input line; ValueError says what is wrong."""
    try:
        rec = loads_json(line, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    context = rec.get("context")
    if isinstance(context, str):
        context = [context]
    if not isinstance(context, list) or not context or not all(isinstance(u, str) for u in context):
        raise ValueError("field 'context' must be a non-empty list of strings (oldest first)")
    cands = rec.get("candidates")
    if not isinstance(cands, list):
        raise ValueError("field 'candidates' must be a list")
    texts = []
    for i, c in enumerate(cands):
        text = c.get("text") if isinstance(c, dict) else c
        if not isinstance(text, str):
            raise ValueError(f"candidate {i} must be a string or an object with a 'text' string")
        texts.append(text)
    return rec, context, texts


def rerank_record(bot, rec: dict[str, Any], context: list[str], texts: list[str]) -> dict[str, Any]:
    """`rec` with its candidates scored and ranked by `bot.rerank`, in input order; with the bot's
    `retrieval_candidates` K > 0, the index's replies that are not among them follow (source "retrieved")."""
    ranked = bot.rerank(context, texts)  # none given: the index's replies alone, with K > 0
    slots: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        slots.setdefault(t, []).append(i)
    out: list[dict[str, Any] | None] = [None] * len(texts)
    added = []
    for c in ranked:  # ranked is sorted by rank; equal texts fill their input positions in order
        scores = {"text": c.text, "rank": c.rank, "score": c.score, "forward_logprob": c.forward_logprob,
                  "backward_logprob": c.backward_logprob, "num_tokens": c.num_tokens,
                  "num_context_tokens": c.num_context_tokens, "source": c.source, "similarity": c.similarity}
        if c.source == "retrieved":
            added.append(scores)
            continue
        i = slots[c.text].pop(0)
        given = rec["candidates"][i]
        out[i] = {**(given if isinstance(given, dict) else {}), **scores}
    return {**rec, "candidates": out + added, "best": ranked[0].text if ranked else None,
            "mmi": bool(ranked and ranked[0].backward_logprob is not None)}


def iter_lines(path: str) -> Iterator[tuple[int, bytes | str]]:
    """(line number, raw line) of `path` or stdin ('-'): bytes, decoded per line by `decode_line` (stdin's own
    decoding turned a bad byte into a surrogate, reported as 'not valid Unicode' deep in the engine); str
    only where a text stream stands in for stdin (tests, embedding)."""
    if path == "-":
        yield from enumerate(getattr(sys.stdin, "buffer", sys.stdin), 1)
        return
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def decode_line(raw: bytes | str, lineno: int) -> str:
    """A line's text; ValueError when it is not UTF-8 (a bad line like any other: --skip_bad_lines skips it)."""
    if isinstance(raw, str):
        return raw
    try:  # a BOM (Windows editors write one) would make the first record "not JSON"
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def rerank_file(bot, path: str, out: TextIO, skip_bad_lines: bool = False, progress: bool = True,
                counts: Counter | None = None, skipped: list[str] | None = None) -> Counter:
    """Stream `path` (JSON Lines, '-' = stdin) through `bot.rerank` into `out`; returns the counts."""
    from tqdm import tqdm

    counts = counts if counts is not None else Counter()
    skipped = skipped if skipped is not None else []
    where = "<stdin>" if path == "-" else path
    with tqdm(total=count_lines(path), unit="line", desc="rerank", disable=not progress,
              file=sys.stderr) as bar:
        for lineno, raw in iter_lines(path):
            bar.update(1)
            try:
                line = decode_line(raw, lineno)
                if not line.strip():
                    counts["blank_lines"] += 1
                    continue
                rec, context, texts = parse_record(line)
                result = rerank_record(bot, rec, context, texts)
            except (ValueError, UserError) as e:
                if not skip_bad_lines:
                    raise UserError(f"{e} (--skip_bad_lines to skip such lines)", path=where, line=lineno) from e
                counts["skipped_bad_lines"] += 1
                skipped.append(f"{where}:{lineno}: {e}")
                continue
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            counts["records"] += 1
            counts["candidates"] += len(texts)
            counts["retrieved"] += len(result["candidates"]) - len(texts)
    return counts


@contextlib.contextmanager
def open_output(output: str, overwrite: bool):
    """stdout for '-', else a temp file beside `output` that replaces it only when the run succeeds."""
    if output == "-":
        yield sys.stdout
        return
    final = Path(output)
    if final.exists() and not overwrite:
        raise UserError("output exists; pass --overwrite to replace it", path=final)
    with atomic_open(final, "w", encoding="utf-8") as f:
        yield f


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser([BotArguments, RerankArgs, GenerationSettings, MMISettings],
                         prog="python -m dialogpt_zh.rerank", description=__doc__.split("\n\n")[0],
                         examples=EXAMPLES)
    parser.add_argument("input", metavar="INPUT", help="JSON Lines of {context, candidates}; '-' = stdin")

    def body() -> int:
        bot_args, args, gen, mmi, extra = parse(parser, argv)
        if extra.input != "-" and not Path(extra.input).is_file():
            raise UserError("is a directory, not a JSON Lines file" if Path(extra.input).is_dir()
                            else "input file not found", path=extra.input)
        from transformers.utils import logging as hf_logging

        from dialogpt_zh.engine.bot import load_bot
        from dialogpt_zh.engine.loading import bot_input_dirs, check_outputs_apart

        check_outputs_apart({"output": args.output}, [*([Path(extra.input)] if extra.input != "-" else []),
                                                      *bot_input_dirs(bot_args.model, bot_args.backward)])
        if args.output != "-":  # before the bot loads: a directory gave a traceback once the work was done
            check_output_file(args.output, "output")
            if Path(args.output).exists() and not args.overwrite:
                raise UserError("output exists; pass --overwrite to replace it", path=args.output)

        hf_logging.disable_progress_bar()
        bot = load_bot(bot_args, gen, mmi)
        for n in bot.notices:
            print(f"note: {n}", file=sys.stderr)
        t0 = time.perf_counter()
        skipped: list[str] = []
        with open_output(args.output, args.overwrite) as out:
            counts = rerank_file(bot, extra.input, out, args.skip_bad_lines, args.progress, skipped=skipped)
        for line in skipped:
            print(f"warning: skipped {line}", file=sys.stderr)
        dt = time.perf_counter() - t0
        retrieved = f" + {counts['retrieved']} retrieved" if counts["retrieved"] else ""
        print(f"reranked {counts['records']} records ({counts['candidates']} candidates{retrieved}) in {dt:.1f} s; "
              f"{counts['skipped_bad_lines']} bad lines skipped, {counts['blank_lines']} blank lines"
              + ("" if args.output == "-" else f" -> {args.output}"), file=sys.stderr)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
