"""Command: corpus files -> token store (`python -m dialogpt_zh.preprocess --help`). The passes are in
`dialogpt_zh.data.pipeline`; docs/preprocess.md describes them.
"""
from __future__ import annotations

import logging
import shlex
import sys
from typing import Sequence

from dialogpt_zh.cli import make_parser, parse, run_main
from dialogpt_zh.data.cleaning import CleaningOptions
from dialogpt_zh.data.pipeline import (
    PreprocessArguments,
    run_preprocess,
    summary_table,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- windows


# ---------------------------------------------------------------- split


# ---------------------------------------------------------------- helpers


# ---------------------------------------------------------------- pass 1 in worker processes

_worker_options: CleaningOptions | None = None


# ---------------------------------------------------------------- output


# ---------------------------------------------------------------- pass 1: read + clean


# ---------------------------------------------------------------- pass 2: dedupe + split


# ---------------------------------------------------------------- pass 3: tokenizer


# ---------------------------------------------------------------- pass 4: tokenize, window, write


# ---------------------------------------------------------------- manifest


# ---------------------------------------------------------------- pipeline


EXAMPLES = """
  python -m dialogpt_zh.preprocess ../shared/corpus/lccc-sample ../shared/corpus/kdconv \\
      ../shared/corpus/chatterbot-zh --output data/base
  python -m dialogpt_zh.preprocess train.txt --output data/chitchat \\
      --vocab ../shared/corpus/vocab/gpt2-chitchat-vocab.txt --max-tokens 300
  python -m dialogpt_zh.preprocess corpus/ --output data/x --format tsv --keep-source-splits \\
      --blocklist words.txt --seed 1
  python -m dialogpt_zh.preprocess ../shared/corpus/gpt2-chitchat-50w --output data/uer \
      --vocab models/gpt2-chinese-cluecorpussmall     # a model's own vocabulary, for train --init
  python -m dialogpt_zh.preprocess ../shared/corpus/smile/smile.jsonl.gz chats.zip --output data/chat
  python -m dialogpt_zh.preprocess ../shared/corpus/lccc-base ../shared/corpus/kdconv --upsample kdconv=4 \
      --holdout-source-splits valid,test --output data/kd4
  python -m dialogpt_zh.preprocess ../shared/corpus/smile --subsample smile=0.15 \
      --vocab data/base/tokenizer --output data/smile_pretrain
"""


def build_parser():
    parser = make_parser([PreprocessArguments], prog="python -m dialogpt_zh.preprocess",
                         description="Read Chinese dialogue corpora, clean them, and write a token store "
                                     "(see corpus/README.md).", examples=EXAMPLES)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="corpus files or directories (formats may be mixed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        argv_list = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        args, rest = parse(parser, argv_list)
        command = "python -m dialogpt_zh.preprocess " + shlex.join(argv_list)
        try:
            manifest = run_preprocess(args, rest.inputs, command=command)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.Terminated): the temp dir is gone, the old output kept
            print(f"stopped before the store was complete; {args.output} is as it was", file=sys.stderr)
            raise
        print(summary_table(manifest))
        if args.vocab:  # a given vocabulary: how much of the corpus it cannot spell
            unk = manifest["unk_rate"]
            print(f"\nvocabulary of {args.vocab}: {manifest['tokenizer']['vocab_size']:,d} tokens; [UNK] "
                  + ", ".join(f"{split} {100 * rate:.3f} %" for split, rate in unk.items()) + " of tokens")
        t = manifest["_timing"]
        print(f"\nwrote {args.output} in {t['seconds']:.1f}s "
              f"({manifest['chars_read'] / max(t['seconds'], 1e-9):,.0f} chars/s)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
