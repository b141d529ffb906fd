"""Command: a checkpoint made elsewhere -> our checkpoint format (`python -m dialogpt_zh.convert --help`).

Reads GPT2-chitchat, CDial-GPT2 or uer/gpt2-chinese directories as they are downloaded (config.json +
pytorch_model.bin or safetensors + vocab.txt; pickles read with weights_only=True only), or a hub id, and
writes a model directory of ours (dialogpt_zh.checkpoint): safetensors weights, the tokenizer saved beside
them (AutoTokenizer loads it), and a card naming the source, its files' SHA-256, the direction, the input
layout and the licence. Before the output is put in place, its logits on a probe dialogue are checked to be
exactly the source's. docs/foreign_checkpoints.md.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dialogpt_zh.cli import field_help, make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import check_output_name, file_sha256

EXAMPLES = """
  python -m dialogpt_zh.convert models/gpt2-chitchat/dialogue_model --output runs/chitchat/forward --licence MIT
  python -m dialogpt_zh.convert models/gpt2-chitchat/mmi_model --output runs/chitchat/backward \\
      --direction backward --licence MIT
  python -m dialogpt_zh.convert models/CDial-GPT2_LCCC-base --output runs/cdial/forward --licence MIT
  python -m dialogpt_zh.convert uer/gpt2-chinese-cluecorpussmall --output runs/uer --licence unknown   # with network
"""
# what the logits are compared on: two turns of everyday chit-chat (any text in the vocabulary would do)
PROBE_DIALOGUE = ("你好，今天过得怎么样", "还不错，刚下班，准备去吃饭")
SOURCE_FILES = ("config.json", "pytorch_model.bin", "model.safetensors", "vocab.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class ConvertArgs:
    output: str = field(metadata=field_help("model directory to write (our checkpoint format)"))
    direction: Optional[str] = field(default=None, metadata=field_help(
        "forward (a dialogue model: P(reply | context)) or backward (an MMI model: P(context | reply)); default: "
        "the source card's, else forward. GPT2-chitchat's MMI model is a backward model"))
    layout: Optional[str] = field(default=None, metadata=field_help(
        "input layout: chitchat or cdial; default: the source card's, else its vocabulary's ([speaker1]/[speaker2] "
        "present: cdial)"))
    licence: str = field(default="unknown", metadata=field_help(
        "the source model's licence, recorded on the card (e.g. MIT for GPT2-chitchat and CDial-GPT); "
        "'unknown' when not given"))
    overwrite: bool = field(default=False, metadata=field_help("replace an existing OUTPUT directory"))


def build_parser():
    parser = make_parser([ConvertArgs], prog="python -m dialogpt_zh.convert",
                         description="Convert a GPT-2 checkpoint made elsewhere (GPT2-chitchat, CDial-GPT2, "
                                     "uer/gpt2-chinese) into this project's checkpoint format.", examples=EXAMPLES)
    parser.add_argument("source", metavar="SRC", help="the model directory (or a Hugging Face hub id)")
    return parser




def _check_paths(source: Path, output: Path, overwrite: bool) -> None:
    check_output_name(output, "output")
    here, there = output.resolve(), source.resolve()
    if here == there or here.is_relative_to(there) or there.is_relative_to(here):
        raise UserError(f"--output and the source ({source}) overlap; the output would be written over its input",
                        path=output, field="output")
    if output.exists() and not output.is_dir():
        raise UserError("the output exists and is not a directory", path=output, field="output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError("the output directory exists; pass --overwrite to replace it", path=output, field="output")
    if output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file():  # as preprocess does
        raise UserError("exists and is not a model directory (no config.json); refusing to replace it, even with "
                        "--overwrite: choose another --output", path=output, field="output")


def _direction(args: ConvertArgs, source_card: dict, source: Path) -> str:
    carded = source_card.get("direction")
    direction = args.direction or carded or "forward"
    if direction not in ("forward", "backward"):
        raise UserError(f"must be forward or backward, got {direction!r}", field="direction")
    if carded and direction != carded:
        raise UserError(f"the source's card says it is a {carded} model, not {direction}", path=source,
                        field="direction")
    return direction


def probe_logits(model, layout, tokenizer, direction: str):
    """Logits of the probe dialogue in the model's own layout (float32, CPU)."""
    import torch

    from dialogpt_zh.tokenizer import encode

    turns = [encode(tokenizer, t) for t in PROBE_DIALOGUE]
    ids, types = layout.sequence(turns, direction)
    with torch.no_grad():
        return model.float()(input_ids=torch.tensor([ids]),
                             token_type_ids=torch.tensor([types]) if types is not None else None).logits


def convert(source_spec: str, args: ConvertArgs, command: str) -> dict[str, Any]:
    """Write the converted model to args.output; returns its card."""
    import torch

    from dialogpt_zh.checkpoint import load_model, model_layout, read_card, save_checkpoint
    from dialogpt_zh.engine.loading import check_vocabulary_size
    from dialogpt_zh.foreign import resolve_model_dir, weights_dtype
    from dialogpt_zh.fsutil import atomic_directory
    from dialogpt_zh.tokenizer import load_tokenizer

    source = resolve_model_dir(source_spec, "source")
    output = Path(args.output)
    _check_paths(source, output, args.overwrite)
    if not (source / "config.json").is_file():
        raise UserError("not a model directory (no config.json)", path=source)
    source_card = read_card(source)
    direction = _direction(args, source_card, source)
    tokenizer = load_tokenizer(source)
    model = load_model(source, "cpu")
    check_vocabulary_size(model, tokenizer, source)
    layout = model_layout(source, tokenizer, args.layout)
    before = probe_logits(model, layout, tokenizer, direction)
    # the ids our layouts place, not GPT-2's 50256 (GPT2-chitchat's config keeps it); the logits do not change
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        generation = model.generation_config
        generation.bos_token_id, generation.eos_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        generation.pad_token_id = tokenizer.pad_token_id
    stored = weights_dtype(source)
    files = {name: file_sha256(source / name) for name in SOURCE_FILES if (source / name).is_file()}
    card = {"direction": direction, "layout": layout.name, "preset": "converted",
            "source": {"given": source_spec, "path": str(source.resolve()), "files_sha256": files,
                       "model_type": model.config.model_type, "card": source_card or None},
            "licence": args.licence, "command": command,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_dtype": str(stored).replace("torch.", "") if stored is not None else None,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    if stored in (torch.float16, torch.bfloat16):  # keep the source's precision (and size)
        model = model.to(stored)
    with atomic_directory(output, replace_existing=args.overwrite) as tmp:
        staged = save_checkpoint(model, tokenizer, tmp / "staged", card)
        after = probe_logits(load_model(staged, "cpu"), layout, load_tokenizer(staged), direction)
        if not torch.equal(before, after):
            diff = float((before - after).abs().max())
            raise UserError(f"the converted model's logits differ from the source's (max |diff| {diff:.3g}); "
                            "nothing was written", path=source)
        for f in list(staged.iterdir()):
            f.rename(tmp / f.name)
        staged.rmdir()
    return card


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        argv_list = list(sys.argv[1:] if argv is None else argv)
        args, rest = parse(build_parser(), argv_list)
        command = "python -m dialogpt_zh.convert " + shlex.join(argv_list)
        card = convert(rest.source, args, command)
        print(f"wrote {args.output}: a {card['direction']} model, layout {card['layout']}, "
              f"{card['parameters'] / 1e6:.2f} M parameters, licence {card['licence']}; logits equal to the "
              f"source's on the probe dialogue")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
