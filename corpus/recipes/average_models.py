"""Average the weights of two checkpoints of one model: (1 - w) * FIRST + w * SECOND, written as a checkpoint.

Why: a model fine-tuned on a narrow stage (the default backward model's KdConv-upsampled stage 3) gains on that
data and forgets some of the rest; averaging it with the model it started from keeps most of the gain and
little of the loss (weight-space ensembling). Both must be the same architecture, tokenizer and direction, and
SECOND should have started from FIRST (a fine-tuning of it): averaging unrelated runs gives a useless model.

The output is an ordinary checkpoint (safetensors, the tokenizer, the card): SECOND's card (its config,
store and corpora) with an "averaged" record that names the weight and holds FIRST's card, so both runs
stay replayable. The output directory is written in one rename and must not exist (or pass --overwrite).

    python corpus/recipes/average_models.py runs/default/stage2/backward runs/default/stage3/backward \\
        --weight 0.25 --output runs/default/bot/backward
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dialogpt_zh.errors import UserError  # noqa: E402

IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def _corpora(*cards: dict[str, Any]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for card in cards:
        for corpus in card.get("corpora") or []:
            if corpus.get("path") not in seen:
                seen.add(corpus.get("path"))
                out.append(corpus)
    return out


def average_models(first: str | Path, second: str | Path, weight: float, output: str | Path,
                   overwrite: bool = False) -> Path:
    """Write (1 - weight) * FIRST + weight * SECOND to OUTPUT (float32 weights) and return OUTPUT."""
    import torch

    from dialogpt_zh.checkpoint import load_model, read_card, save_checkpoint
    from dialogpt_zh.engine.loading import same_tokenizer, vocabulary_difference
    from dialogpt_zh.tokenizer import load_tokenizer

    first, second, output = Path(first), Path(second), Path(output)
    if not 0.0 < weight < 1.0:
        raise UserError(f"must be strictly between 0 and 1, got {weight}", field="weight")
    if output.exists() and not overwrite:
        raise UserError("exists; pass --overwrite to replace it", path=output, field="output")
    if output.resolve() in (first.resolve(), second.resolve()):
        raise UserError("would overwrite an input; name another directory", path=output, field="output")
    cards = [read_card(first), read_card(second)]
    directions = [c.get("direction") for c in cards]
    if directions[0] != directions[1]:
        raise UserError(f"a {directions[1]} model cannot be averaged with a {directions[0]} one ({first})",
                        path=second)
    tokenizers = [load_tokenizer(first), load_tokenizer(second)]
    if not same_tokenizer(*tokenizers):  # the engine's own check for a forward/backward pair
        raise UserError(f"its tokenizer differs from {first}'s ({vocabulary_difference(*tokenizers)}): not two "
                        "checkpoints of one model", path=second)
    models = [load_model(first, dtype=torch.float32), load_model(second, dtype=torch.float32)]
    configs = [{k: v for k, v in m.config.to_dict().items() if k not in IGNORED_CONFIG_KEYS} for m in models]
    if configs[0] != configs[1]:
        differ = sorted(k for k in set(configs[0]) | set(configs[1]) if configs[0].get(k) != configs[1].get(k))
        raise UserError(f"its config differs from {first}'s in {', '.join(differ)}", path=second)
    states = [m.state_dict() for m in models]
    averaged = {}
    for name, tensor in states[0].items():
        other = states[1][name]
        if tensor.is_floating_point():
            averaged[name] = (1.0 - weight) * tensor + weight * other  # new tensors: tied weights average once
        elif torch.equal(tensor, other):
            averaged[name] = tensor
        else:  # e.g. a causal-mask buffer: must be the same
            raise UserError(f"non-float tensor {name} differs from {first}'s", path=second)
    models[0].load_state_dict(averaged)
    card = dict(cards[1])
    card["corpora"] = _corpora(*cards)
    card["averaged"] = {
        "formula": "(1 - weight) * first + weight * second",
        "weight": weight,
        "first": {"path": str(first), "card": cards[0]},
        "second": {"path": str(second)},
        "command": " ".join(["python", "corpus/recipes/average_models.py", str(first), str(second),
                             "--weight", str(weight), "--output", str(output)]),
    }
    metrics = {"averaged": {"weight": weight, "first": _metrics(first), "second": _metrics(second)}}
    return save_checkpoint(models[0], tokenizers[0], output, card, metrics=metrics)


def _metrics(model_dir: Path) -> dict[str, Any] | None:
    """The training run's figures (its metrics.json), kept beside the average: an average has no curve of
    its own."""
    from dialogpt_zh.checkpoint import METRICS_FILE

    path = model_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python corpus/recipes/average_models.py", description=__doc__.split("\n\n")[0],
        epilog="example:\n" + __doc__.strip().split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="the model SECOND started from")
    parser.add_argument("second", help="the fine-tuned model")
    parser.add_argument("--weight", type=float, required=True, help="SECOND's share, strictly between 0 and 1")
    parser.add_argument("--output", required=True, help="directory to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    args = parser.parse_args(argv)
    try:
        out = average_models(args.first, args.second, args.weight, args.output, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: (1 - {args.weight}) * {args.first} + {args.weight} * {args.second}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
