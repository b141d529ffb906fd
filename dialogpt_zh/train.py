"""Command: train a forward (P(reply | context)) or backward (P(context | reply), the MMI scorer) GPT-2 on a
token store. The loop is `dialogpt_zh.training.loop.train`; its settings `dialogpt_zh.training.config.TrainConfig`.
"""
from __future__ import annotations

import sys
from typing import Optional

from dialogpt_zh.cli import make_parser, parse, run_main
from dialogpt_zh.training.config import TrainConfig
from dialogpt_zh.training.loop import train

EXAMPLES = """
  python -m dialogpt_zh.train --data data/base --direction forward  --output runs/fwd --preset small
  python -m dialogpt_zh.train --data data/base --direction backward --output runs/bwd --preset small
  python -m dialogpt_zh.train --data data/base --output runs/fwd --preset small --resume   # after Ctrl-C
  python -m dialogpt_zh.train --data data/base --output runs/ft --init gpt2_chitchat_dir --lr 5e-5
  torchrun --nproc_per_node 4 -m dialogpt_zh.train --data data/base --output runs/fwd --preset base
  python -m dialogpt_zh.train --config runs/fwd/run.json --output runs/fwd2   # replay a run's settings
"""


def main(argv: Optional[list[str]] = None) -> int:
    def body() -> int:
        parser = make_parser([TrainConfig], prog="python -m dialogpt_zh.train",
                             description="Train a forward (P(reply | context)) or backward (P(context | reply), "
                                         "the MMI scorer) GPT-2 on a token store.", examples=EXAMPLES)
        (config,) = parse(parser, argv)
        metrics = train(config)
        if metrics["stopped"] != "interrupted":
            return 0
        return 143 if metrics["signal"] == "SIGTERM" else 130  # the shells' codes for the two signals

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
