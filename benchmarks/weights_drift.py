"""How far a weight precision moves the models from their float32 weights, on held-out replies.

    python benchmarks/weights_drift.py                                     # checkpoints/default, fp16
    python benchmarks/weights_drift.py --heldout ../shared/corpus/lccc-sample/toy_data.json --heldout_split valid
    python benchmarks/weights_drift.py --model runs/bot --precisions fp16,int8

For each model direction (forward: context -> reply, backward: reply -> context) and each --precisions
entry it runs the float32 model and the same model loaded at that precision (`--quantize`, as the faces
load it) over each (context, reply) pair, teacher-forced, and prints per token position:
  mean KL(float32 || other) of the next-token distributions, in nats (how much sampling can move: by
  Pinsker's inequality a T-token reply's distribution moves by a total variation of at most
  sqrt(T * KL / 2));
  the share of positions where both give the same most likely token;
  the largest change of any log-probability;
  the perplexity of all tokens of the sequences under each.
Without --heldout the pairs come from the hand-written fixture (few: use --heldout for figures to quote).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from latency import fixture_contexts_with_replies, heldout_pairs  # noqa: E402

from dialogpt_zh.checkpoint import load_model  # noqa: E402
from dialogpt_zh.cli import field_help, make_parser, parse, run_main  # noqa: E402
from dialogpt_zh.engine.fp16 import weights_fp16  # noqa: E402
from dialogpt_zh.engine.loading import default_bot_dir, quantize_int8  # noqa: E402
from dialogpt_zh.errors import UserError  # noqa: E402
from dialogpt_zh.sequence import build_sequence  # noqa: E402
from dialogpt_zh.tokenizer import encode, load_tokenizer  # noqa: E402

CONVERT = {"fp16": weights_fp16, "int8": quantize_int8}


@dataclass
class DriftArgs:
    model: str | None = field(default=None, metadata=field_help(
        "bot directory (forward/ + backward/); default: checkpoints/default"))
    precisions: str = field(default="fp16", metadata=field_help(f"comma list of: {', '.join(CONVERT)}"))
    heldout: str | None = field(default=None, metadata=field_help(
        "held-out corpus file (any format the preprocessor reads); default: the hand-written fixture"))
    heldout_split: str = field(default="valid", metadata=field_help("split of --heldout ('all' = every session)"))
    heldout_pairs: int = field(default=400, metadata=field_help("(context, reply) pairs scored"))
    threads: int = field(default=1, metadata=field_help("intra-op threads"))


@torch.inference_mode()
def drift(reference, other, sequences: list[list[int]]) -> dict[str, float]:
    kl_sum = positions = same = 0
    most = nll_ref = nll_other = 0.0
    for seq in sequences:
        ids = torch.tensor([seq])
        a = torch.log_softmax(reference(ids).logits[0, :-1].float(), -1)
        b = torch.log_softmax(other(ids).logits[0, :-1].float(), -1)
        kl_sum += float((a.exp() * (a - b)).sum())
        positions += a.shape[0]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        most = max(most, float((a - b).abs().max()))
        target = ids[0, 1:, None]
        nll_ref -= float(a.gather(-1, target).sum())
        nll_other -= float(b.gather(-1, target).sum())
    return {"kl": kl_sum / positions, "same_argmax": same / positions, "max_dlogprob": most,
            "ppl_float32": math.exp(nll_ref / positions), "ppl_other": math.exp(nll_other / positions),
            "positions": positions}


def main(argv=None) -> int:
    parser = make_parser([DriftArgs], prog="weights_drift.py", description=__doc__.split("\n")[0])

    def body() -> int:
        (args,) = parse(parser, argv)
        torch.set_num_threads(args.threads)
        root = Path(args.model) if args.model else default_bot_dir()
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        for p in precisions:
            if p not in CONVERT:
                raise UserError(f"unknown precision {p!r}; use one of {', '.join(CONVERT)}", field="precisions")
        if args.heldout:
            pairs, what = heldout_pairs(args.heldout, args.heldout_split, args.heldout_pairs)
        else:
            pairs = fixture_contexts_with_replies(50)
            what = f"{len(pairs)} fixture replies"
        tokenizer = load_tokenizer(root / "forward")  # the ids only: each model is loaded below, per direction
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        print(f"# {root}: {what}")
        print(f"{'model':>8} {'precision':>9} | {'positions':>9} {'mean KL nats':>12} {'same argmax':>11} "
              f"{'max |dlogp|':>11} | {'PPL float32':>11} {'PPL other':>10}")
        for direction in ("forward", "backward"):
            if not (root / direction).is_dir():
                continue
            sequences = [build_sequence([encode(tokenizer, u) for u in context + [reply]], direction, cls_id,
                                        sep_id) for context, reply in pairs]
            reference = load_model(root / direction, "cpu")
            for p in precisions:
                d = drift(reference, CONVERT[p](load_model(root / direction, "cpu")), sequences)
                print(f"{direction:>8} {p:>9} | {d['positions']:>9} {d['kl']:12.2e} {d['same_argmax'] * 100:10.3f}% "
                      f"{d['max_dlogprob']:11.2e} | {d['ppl_float32']:11.4f} {d['ppl_other']:10.4f}", flush=True)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
