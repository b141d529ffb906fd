"""Command: `python -m dialogpt_zh.feedback export` (people's judgements -> a training corpus). The records, the
appender and the export itself are in `dialogpt_zh.judging.feedback`."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dialogpt_zh.cli import field_help, make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.judging.feedback import export, summary_line

# ------------------------------------------------------------------------------------------- export

@dataclass
class ExportArgs:
    output: str = field(default="", metadata=field_help(
        "directory to write (train.txt + stats.json); created atomically (required)"))
    overwrite: bool = field(default=False, metadata=field_help("replace --output if it exists"))

    def __post_init__(self) -> None:
        if not self.output:
            raise UserError("--output DIR is required", field="output")


EXPORT_EXAMPLES = """
  python -m dialogpt_zh.feedback export feedback.jsonl --output data/feedback_corpus
  python -m dialogpt_zh.feedback export web.jsonl chat.jsonl --output data/fb --overwrite
  # then: python -m dialogpt_zh.preprocess data/fb --vocab checkpoints/default/forward --output data/fb_store
  #       (a directory: its stats.json is skipped by name; data/fb/train.txt alone does the same)
"""


USAGE = """usage: python -m dialogpt_zh.feedback export FILE [FILE ...] --output DIR [--overwrite]

Turn people's judgements (interact/web `--feedback FILE`) into a training corpus plus statistics.
Run `python -m dialogpt_zh.feedback export --help` for details."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "export":
        print(f"{USAGE}\nerror: unknown command {argv[0]!r} (the only one is 'export')", file=sys.stderr)
        return 2
    parser = make_parser([ExportArgs], prog="python -m dialogpt_zh.feedback export",
                         description="Judged turns (feedback JSON Lines) -> train.txt corpus + stats.json.",
                         examples=EXPORT_EXAMPLES)
    parser.add_argument("files", nargs="+", metavar="FILE", help="feedback JSON Lines files")

    def body() -> int:
        args, extra = parse(parser, argv[1:])
        stats = export(extra.files, args.output, args.overwrite)
        print(summary_line(stats))
        print(f"wrote {Path(args.output) / 'train.txt'} and stats.json")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
