"""Finding and loading a bot: the default bot directory, forward/backward pairing checks, the device, int8,
and the card's cleaning options that user input is normalised with."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from dialogpt_zh.checkpoint import CARD_FILE, read_card
from dialogpt_zh.errors import UserError
from dialogpt_zh.foreign import resolve_model_dir
from dialogpt_zh.fsutil import refuse_inputs, refuse_special_file

REPO_ROOT = Path(__file__).resolve().parents[2]


# The default bot lives in the source checkout, not in the package: an editable install finds it beside the
# package, a regular install only when run from a checkout (./checkpoints/default); otherwise --model DIR.
DEFAULT_BOT_DIRS = (REPO_ROOT / "checkpoints" / "default", Path("checkpoints") / "default")


DEFAULT_BOT_DIR = DEFAULT_BOT_DIRS[0]


def normalize_utterance(text: str, max_repeat: int = 4, mask_pii: bool = True) -> str:
    """The preprocessor's per-utterance normaliser, so user input looks like the training data; the options
    are the store's (`cleaning_options`)."""
    from dialogpt_zh.data.cleaning import normalize_many  # lazy: cleaning pulls in its own helpers

    return normalize_many([text], max_repeat=max_repeat, mask_pii=mask_pii)[0]


def cleaning_options(model_dir: Path | None) -> dict[str, Any]:
    """The normaliser options the model's training data was cleaned with: the card's `store_config`
    (the token store manifest's `config`), else the preprocessor's defaults (cards older than that field)."""
    config = (read_card(model_dir).get("store_config") if model_dir is not None else None) or {}
    options: dict[str, Any] = {"max_repeat": 4, "mask_pii": True}
    if isinstance(config, dict):
        if isinstance(config.get("max_repeat"), int) and not isinstance(config["max_repeat"], bool) \
                and config["max_repeat"] >= 1:
            options["max_repeat"] = config["max_repeat"]
        if isinstance(config.get("mask_pii"), bool):
            options["mask_pii"] = config["mask_pii"]
    return options


def check_device(device: str) -> str:
    """A torch device string that exists on this machine, else a UserError saying what is there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"not a torch device: {device!r} ({e})", field="device") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{device!r} asked for, but this machine has no usable CUDA GPU (torch "
                            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu",
                            field="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{device!r}: there are only {torch.cuda.device_count()} CUDA device(s)", field="device")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{device!r} asked for, but MPS is not available here; use --device cpu", field="device")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device type {dev.type!r}; use cpu or cuda", field="device")
    return device


def quantize_int8(model):
    """Dynamic int8 quantization of the matmuls, for CPU.

    HF GPT-2 uses `Conv1D` (a Linear with a transposed weight) for attention and MLP, which
    `quantize_dynamic` does not know; we turn each into an equivalent `nn.Linear` first so that they,
    and the LM head, really are quantized (the embedding stays float).
    """
    from transformers.pytorch_utils import Conv1D

    def convert(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.nx, child.nf, bias=True)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
            else:
                convert(child)

    convert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao (not installed)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _found_default_bot_dir() -> Path | None:
    return next((p for p in DEFAULT_BOT_DIRS if (p / "forward").is_dir()), None)


def default_bot_dir() -> Path:
    """checkpoints/default beside the package (source checkout, editable install) or in the current
    directory; else a UserError that says exactly what to pass."""
    path = _found_default_bot_dir()
    if path is None:
        raise UserError("no default model: checkpoints/default is not beside the package (a regular, "
                        "non-editable install does not contain it) nor in the current directory; pass "
                        "--model DIR, DIR being a bot directory with forward/ and backward/ (such as "
                        "checkpoints/default of a source checkout) or one forward model directory",
                        field="model")
    return path


def bot_input_dirs(model: str | Path | None, backward: str | Path | None = None) -> list[Path]:
    """The local directories a bot is read from (--model, else the default bot; --backward): a run's inputs,
    which its outputs must not overwrite. Hub ids and paths that do not exist are left out (loading reports
    those)."""
    default = _found_default_bot_dir() if model is None else None
    dirs = [default] if default is not None else []
    for spec in (model, backward):
        if spec is not None and Path(spec).exists():
            dirs.append(Path(spec))
    return dirs


def check_outputs_apart(outputs: dict[str, str | Path | None], inputs: list[Path]) -> None:
    """Refuse, before any work, an output (field -> path; None or '-' = none) that is one of the `inputs`
    (bot directories from `bot_input_dirs`, input files) or inside one, a device or pipe, or the file of
    another output (a transcript rewritten over the feedback file lost the judgements appended to it)."""
    seen: dict[Path, str] = {}
    for field, path in outputs.items():
        if path is not None and str(path) != "-":
            refuse_special_file(path, field)
            refuse_inputs(path, field, inputs)
            resolved = Path(path).resolve()
            if resolved in seen:
                raise UserError(f"is the --{seen[resolved]} file; give each output its own file", path=path,
                                field=field)
            seen[resolved] = field


def resolve_bot_dirs(path, forward, backward) -> tuple[Path, Path | None]:
    """(forward dir, backward dir or None) of a bot directory, a model directory or a hub id (downloaded
    where the network allows), or of forward= / backward= given apart."""
    if path is None and forward is None:
        path = default_bot_dir()
    forward = resolve_model_dir(forward, "forward") if forward is not None else None
    backward = resolve_model_dir(backward, "backward") if backward is not None else None
    if path is not None:
        path = resolve_model_dir(path, "model")
        if (path / "forward").is_dir():
            if forward is not None:
                raise UserError("give either a bot directory (with forward/) or forward=, not both", path=path)
            forward = path / "forward"
            if backward is None and (path / "backward").is_dir():
                backward = path / "backward"
        elif (path / "config.json").is_file():
            if forward is not None:
                raise UserError("give either a model directory or forward=, not both", path=path)
            forward = path
        else:
            raise UserError("not a bot directory (forward/ [+ backward/]) nor a model directory (config.json)",
                            path=path)
    return Path(forward), (Path(backward) if backward is not None else None)


def check_direction(model_dir: Path, expected: str) -> None:
    direction = read_card(model_dir).get("direction")
    if direction is not None and direction not in ("forward", "backward"):
        raise UserError(f"must be 'forward' or 'backward', got {direction!r}", path=Path(model_dir) / CARD_FILE,
                        field="direction")
    if direction is not None and direction != expected:
        raise UserError(f"this is a {direction} model but it was given as the {expected} model", path=model_dir)


def same_tokenizer(a, b) -> bool:
    return (a.get_vocab() == b.get_vocab()
            and all(getattr(a, n) == getattr(b, n) for n in ("pad_token_id", "cls_token_id", "sep_token_id")))


def check_vocabulary_size(model, tokenizer, model_dir: Path) -> None:
    """The model's embeddings are its vocabulary's: as many rows as the vocabulary's ids (0 .. highest). Fewer:
    ids without an embedding; more: most likely another vocab.txt than the model's own (every id then means
    another character, and the replies are garbage without any other sign)."""
    ids = max(tokenizer.get_vocab().values()) + 1
    rows = model.config.vocab_size
    if rows < ids:
        raise UserError(f"model vocab ({rows}) is smaller than its tokenizer ({ids} ids)", path=model_dir)
    if rows > ids:
        raise UserError(f"config.json's vocab_size is {rows} but the vocabulary has {ids} ids: is this the model's "
                        "own vocab.txt (or tokenizer)?", path=model_dir)


def vocabulary_difference(a, b) -> str:
    """Why two tokenizers do not give the same ids: sizes, the first id that differs, or the special tokens."""
    va, vb = a.get_vocab(), b.get_vocab()
    ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
    first = next((i for i in range(max(len(ia), len(ib))) if ia.get(i) != ib.get(i)), None)
    if first is not None:
        return (f"{len(va)} vs {len(vb)} tokens; first difference at id {first}: {ia.get(first)!r} vs "
                f"{ib.get(first)!r}")
    return "same tokens, but " + ", ".join(f"{n} {getattr(a, n)} vs {getattr(b, n)}"
                                           for n in ("pad_token_id", "cls_token_id", "sep_token_id")
                                           if getattr(a, n) != getattr(b, n))
