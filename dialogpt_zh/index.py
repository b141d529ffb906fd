"""Command: a token store's train split -> a retrieval index of human replies (`python -m dialogpt_zh.index
--help`). Building: `dialogpt_zh.data.retrieval_build`; the format: `dialogpt_zh.data.retrieval`; how the bot
uses it: docs/retrieval.md.

Put the index in a bot directory as BOT_DIR/retrieval and the bot loads it (`ChatBot.from_pretrained`); then
`--retrieval_candidates K` adds the K most similar human replies to the sampled candidates, all ranked by MMI.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from typing import Sequence

from dialogpt_zh.cli import make_parser, parse, run_main
from dialogpt_zh.data.retrieval import IndexSettings
from dialogpt_zh.errors import UserError
from dialogpt_zh.settings import field_help

EXAMPLES = """
  python -m dialogpt_zh.index --data runs/store --output checkpoints/mybot/retrieval
  python -m dialogpt_zh.index --data runs/store --output /tmp/bot/retrieval --exclude_sources kdconv \\
      --blocklist blocklist.txt --max_reply_chars 25 --overwrite
  # the store must share the bot's vocabulary: make it with --vocab BOT_DIR/forward
  python -m dialogpt_zh.preprocess ../shared/corpus/lccc-sample --vocab checkpoints/default/forward \\
      --output /tmp/rstore && python -m dialogpt_zh.index --data /tmp/rstore --output /tmp/bot/retrieval
"""


@dataclass
class IndexArgs:
    data: str = field(default="", metadata=field_help(
        "token store directory (python -m dialogpt_zh.preprocess) whose train split is indexed (required)"))
    output: str = field(default="", metadata=field_help(
        "index directory to write, usually BOT_DIR/retrieval (required; written whole or not at all)"))
    overwrite: bool = field(default=False, metadata=field_help("replace --output if it holds an index"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser([IndexArgs, IndexSettings], prog="python -m dialogpt_zh.index",
                         description=__doc__.split("\n\n")[0].replace("\n", " "), examples=EXAMPLES)

    def body() -> int:
        args, settings = parse(parser, argv)
        if not args.data:
            raise UserError("--data STORE (a token store directory) is required", field="data")
        if not args.output:
            raise UserError("--output DIR (e.g. BOT_DIR/retrieval) is required", field="output")
        from dialogpt_zh.data.retrieval_build import build_index, summary

        command = "python -m dialogpt_zh.index " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        card = build_index(args.data, args.output, settings, command, overwrite=args.overwrite)
        print(summary(card))
        print(f"wrote {args.output} in {card['_seconds']:.1f} s", file=sys.stderr)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
