"""The checkpoint format: the one module that writes and reads model directories.

A model directory is a Hugging Face directory (`AutoModelForCausalLM.from_pretrained` loads it) plus our extras:
    config.json model.safetensors generation_config.json tokenizer files   the model (the best one, for training)
    dialogpt_zh.json                                                       the training card (`read_card`)
    run.json                                                               the run's full config (`--config run.json`)
    metrics.json loss_curve.png                                            training figures
    resume/  model.safetensors optimizer.pt rng_<rank>.pt state.json       the latest training step, for --resume

Every write replaces the whole directory in one rename (`save_checkpoint`), so a reader (or a killed run)
always sees a complete directory. Loading never unpickles anything but tensors: weights are safetensors (or,
for a checkpoint made elsewhere, a pytorch_model.bin), and every file written with `torch.save` is read with
`weights_only=True`. Damaged files are a `UserError` naming the file.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import atomic_directory, clean_stale_temp_dirs

log = logging.getLogger(__name__)
CARD_FILE = "dialogpt_zh.json"
RUN_CONFIG_FILE = "run.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "loss_curve.png"
RESUME_DIR = "resume"
RESUME_WEIGHTS = "model.safetensors"
RESUME_OPTIMIZER = "optimizer.pt"
RESUME_STATE = "state.json"
# Our extras: when a save keeps the previous best model, every other file is carried over.
_EXTRAS = (CARD_FILE, RUN_CONFIG_FILE, METRICS_FILE, CURVE_FILE)


# ------------------------------------------------------------------------------------------------ writing

@dataclass
class ResumeFiles:
    """What `save_checkpoint` writes under resume/: the latest weights, optimizer, RNG files, run state."""
    model: Any                   # the (unwrapped) model at the latest step
    optimizer: dict              # {"optimizer": state_dict, "scheduler": state_dict}
    rng_dir: Path                # rng_<rank>.pt of every process, written by `save_rng_state`
    state: "RunState"


def save_checkpoint(model, tokenizer, out_dir: str | Path, card: dict[str, Any], *,
                    run_config: Optional[dict] = None, metrics: Optional[dict] = None,
                    curve_png: Optional[bytes] = None, resume: Optional[ResumeFiles] = None,
                    fp16: bool = False) -> Path:
    """Write a model directory in one atomic rename (what the trainer, the recipes and the tests use).

    `model=None` keeps the model files of the existing `out_dir` (hard links, no copy): the trainer's way
    of updating the card, figures and resume state when validation did not improve. `fp16`: store the
    weights at float16 (half the bytes; `load_model` computes in float32 on CPU); `model` is not changed.
    """
    out_dir = Path(out_dir)
    keep_previous = model is None and (out_dir / "config.json").is_file()
    if model is None and not keep_previous:
        raise ValueError(f"{out_dir} has no model to keep; pass the model")
    with atomic_directory(out_dir, replace_existing=True) as tmp:  # the caller decided (train: --overwrite)
        if keep_previous:
            for src in out_dir.iterdir():
                if src.is_file() and src.name not in _EXTRAS:
                    try:
                        os.link(src, tmp / src.name)
                    except OSError:
                        shutil.copy2(src, tmp / src.name)
        else:
            quiet_progress_bars()
            (copy.deepcopy(model).half() if fp16 else model).save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        _write_json(tmp / CARD_FILE, card)
        if run_config is not None:
            _write_json(tmp / RUN_CONFIG_FILE, run_config)
        if metrics is not None:
            _write_json(tmp / METRICS_FILE, metrics)
        if curve_png is not None:
            (tmp / CURVE_FILE).write_bytes(curve_png)
        if resume is not None:
            _write_resume(tmp / RESUME_DIR, resume)
    return out_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _write_resume(resume_dir: Path, files: ResumeFiles) -> None:
    import torch
    from safetensors.torch import save_model

    resume_dir.mkdir()
    save_model(files.model, str(resume_dir / RESUME_WEIGHTS))
    torch.save(files.optimizer, resume_dir / RESUME_OPTIMIZER)
    for f in sorted(files.rng_dir.iterdir()):
        shutil.copy2(f, resume_dir / f.name)
    (resume_dir / RESUME_STATE).write_text(json.dumps(asdict(files.state), indent=1) + "\n", encoding="utf-8")


def rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


def save_rng_state(rng_dir: Path, rank: int) -> None:
    """This process's torch (and CUDA) RNG state, for the next `save_checkpoint(resume=...)`."""
    import torch

    rng_dir.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, rng_dir / rng_file(rank))


def rng_staging_dir(out_dir: Path) -> Path:
    """Where every process puts its RNG file before the main process's save copies them into resume/."""
    return out_dir.parent / f".{out_dir.name}.rng"


def remove_stale_temp(out_dir: str | Path) -> list[Path]:
    """Remove what killed runs left beside `out_dir`: `atomic_directory`'s temp directories (see
    `fsutil.clean_stale_temp_dirs`) and the RNG staging directory. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = clean_stale_temp_dirs(out_dir)
    rng_dir = rng_staging_dir(out_dir)
    if rng_dir.is_dir() and not rng_dir.is_symlink():
        shutil.rmtree(rng_dir, ignore_errors=True)
        removed.append(rng_dir)
    return removed


# ------------------------------------------------------------------------------------------------ reading

def read_card(model_dir: str | Path) -> dict[str, Any]:
    """The training card of a checkpoint ({} for a plain HF model dir, e.g. a GPT2-chitchat model)."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable training card: {e.msg}", path=path, line=e.lineno) from e
    except UnicodeDecodeError as e:
        raise UserError(f"unreadable training card: not UTF-8 ({e.reason})", path=path) from e
    if not isinstance(card, dict):
        raise UserError("a training card is a JSON object", path=path)
    return card


def load_model(model_dir: str | Path, device: str = "cpu", dtype=None):
    """Load a causal LM from a HF directory: safetensors weights, or a `pytorch_model.bin` read with
    `torch.load(weights_only=True)` (dialogpt_zh.foreign: a pickle that asks for more than tensors is refused
    before it runs); no other file is ever unpickled.

    Damaged weights are refused here, naming the file: unreadable files, tensors missing or of the wrong
    shape (transformers would silently re-initialise them), NaN/inf values.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError("not a model directory (no config.json)", path=model_dir)
    # Weights may be stored in half precision to keep checkpoints small; compute in fp32 on CPU.
    if dtype is None and str(device).startswith("cpu"):
        dtype = torch.float32
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        return _load_pickled(model_dir, device, dtype)
    from dialogpt_zh.foreign import OLD_BUFFERS, PICKLED_WEIGHTS, read_config, safetensors_dtypes

    if (model_dir / PICKLED_WEIGHTS).is_file():   # hub downloads often hold both: say which one is read
        log.info("%s: reading %s; the %s beside it is not read", model_dir, ", ".join(w.name for w in weights),
                 PICKLED_WEIGHTS)
    # config.json read as foreign ones are (GPT-2's 50256 as bos/eos beside a Chinese vocabulary is dropped);
    # misshapen tensors come back in the loading info (else transformers raises without naming them)
    kwargs: dict[str, Any] = {"use_safetensors": True, "output_loading_info": True,
                              "config": read_config(model_dir), "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    quiet_progress_bars()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as e:  # noqa: BLE001 - safetensors/transformers raise many types for a damaged file
        where = model_dir / "config.json" if "config" in str(e).lower() and "json" in str(e).lower() else (
            weights[0] if len(weights) == 1 else model_dir)
        raise UserError(f"cannot load the model: {type(e).__name__}: {e}", path=where) from e
    where = weights[0] if len(weights) == 1 else model_dir
    bad = sorted(info.get("missing_keys", ())) + sorted(k if isinstance(k, str) else k[0]
                                                         for k in info.get("mismatched_keys", ()))
    mismatched = sorted((k for k in info.get("mismatched_keys", ()) if not isinstance(k, str)), key=str)
    if mismatched and len(mismatched[0]) == 3:
        name, theirs, ours = mismatched[0]
        raise UserError(f"the weights do not match config.json: tensor {name} is {list(theirs)} in the file but "
                        f"config.json makes it {list(ours)} ({len(bad)} tensors missing or of another shape)",
                        path=where)
    if bad:
        raise UserError(f"the weights do not match config.json: {len(bad)} tensors missing or of another shape "
                        f"(first: {bad[0]})", path=where)
    # as for pytorch_model.bin: a tensor the model has no place for, or an integer tensor for a float weight,
    # is a damaged or foreign file (transformers would drop the one and cast the other without a word)
    extra = sorted(k for k in info.get("unexpected_keys", ()) if not k.endswith(OLD_BUFFERS))
    if extra:
        raise UserError(f"the weights do not match config.json: {len(extra)} tensors are not in a "
                        f"{model.config.model_type} model of this config.json (first: {extra[0]})", path=where)
    floating = {n for n, p in model.named_parameters() if p.is_floating_point()}
    stored = safetensors_dtypes(weights)
    integral = sorted(n for n, dt in stored.items() if n in floating and not dt.startswith(("F", "BF")))
    if integral:
        raise UserError(f"tensor {integral[0]} is {stored[integral[0]]}, not floating point", path=where)
    check_finite(model, where)
    return model.to(device).eval()


def _load_pickled(model_dir: Path, device: str, dtype):
    from dialogpt_zh.foreign import PICKLED_WEIGHTS, load_pickled_model

    path = model_dir / PICKLED_WEIGHTS
    if not path.is_file():
        sharded = sorted(model_dir.glob("pytorch_model-*.bin"))
        raise UserError("no weights: expected model.safetensors or pytorch_model.bin" + (
            " (sharded pickled weights are not read; save the model as safetensors)" if sharded else ""),
            path=model_dir)
    model = load_pickled_model(model_dir, dtype)
    check_finite(model, path)
    return model.to(device).eval()


def quiet_progress_bars() -> None:
    """No transformers progress bars ("Loading weights … 52/52", "Writing model shards") in this process: every
    face loads and saves models through here, and a chat, a web server's log or a training log (which has its
    own bar) is no place for them. Process-wide (the
    switch is transformers' own global), and deliberately so: we never want those bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def check_finite(model, path: Path) -> None:
    """NaN/inf weights make every reply fail later; refuse them at load, naming the file and tensor."""
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise UserError(f"the weights contain NaN or infinite values (tensor {name})", path=path)


def model_layout(model_dir: str | Path | None, tokenizer, requested: Optional[str] = None):
    """The input layout (dialogpt_zh.sequence.Layout) of a model: `requested` (--layout), else its card's
    `layout`, else the one its vocabulary was made for (speaker tokens: cdial; else chitchat)."""
    from dialogpt_zh.sequence import LAYOUTS, Layout, infer_layout

    card = read_card(model_dir) if model_dir is not None else {}
    name = requested or card.get("layout") or infer_layout(tokenizer.get_vocab())
    where = Path(model_dir) / CARD_FILE if model_dir is not None and not requested else None
    if name not in LAYOUTS:
        raise UserError(f"unknown layout {name!r}; use one of {', '.join(LAYOUTS)}", path=where, field="layout")
    try:
        return Layout.for_tokenizer(name, tokenizer)
    except ValueError as e:
        if requested:
            raise UserError(f"{e}: this vocabulary cannot carry --layout {requested} (use a vocabulary with them, "
                            "e.g. preprocess --vocab of a CDial-GPT model)", path=model_dir, field="--layout") from e
        raise UserError(str(e), path=model_dir, field="layout") from e


# ------------------------------------------------------------------------------------------- resume state

@dataclass
class RunState:
    """Everything besides weights/optimizer/RNG that --resume needs; saved as resume/state.json."""
    step: int = 0
    epoch: int = 0
    batch_index: int = 0        # next micro-batch of this epoch's plan
    tokens_seen: int = 0        # real (non-padding) tokens, all processes
    targets_seen: int = 0
    padded_tokens_seen: int = 0
    wall_time_s: float = 0.0
    best_valid_loss: Optional[float] = None
    best_step: int = 0
    evals_without_improvement: int = 0
    train_history: list = field(default_factory=list)   # [step, loss, lr]
    valid_history: list = field(default_factory=list)   # [step, loss]
    config: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    world_size: int = 1


_STATE_TYPES = {"int": (int,), "float": (int, float), "Optional[float]": (int, float, type(None)),
                "list": (list,), "dict": (dict,)}


def read_run_state(output: Path) -> RunState:
    """resume/state.json of `output`, checked field by field (a damaged file is an error naming it)."""
    path = output / RESUME_DIR / RESUME_STATE
    if not path.is_file():
        raise UserError("nothing to resume (no resume/state.json); start without --resume", path=output)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"damaged resume state: {e.msg}", path=path, line=e.lineno) from e
    except UnicodeDecodeError as e:
        raise UserError("damaged resume state: not UTF-8", path=path) from e
    if not isinstance(data, dict):
        raise UserError("damaged resume state: expected a JSON object", path=path)
    known = {f.name: f for f in fields(RunState)}
    for name, value in data.items():
        if name not in known:
            raise UserError("damaged resume state: unknown field", path=path, field=name)
        allowed = _STATE_TYPES[str(known[name].type)]
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise UserError(f"damaged resume state: {value!r} is not a {known[name].type}", path=path, field=name)
    missing = [n for n in ("step", "epoch", "batch_index", "config", "model_config") if n not in data]
    if missing:
        raise UserError(f"damaged resume state: missing {', '.join(missing)}", path=path)
    for k in ("step", "epoch", "batch_index"):
        if data[k] < 0:
            raise UserError(f"damaged resume state: negative {k}", path=path, field=k)
    return RunState(**data)


def load_resume_weights(model, output: Path) -> None:
    """Load resume/model.safetensors into `model` (strict: every tensor, same shapes, finite)."""
    from safetensors.torch import load_model as load_safetensors_model

    path = output / RESUME_DIR / RESUME_WEIGHTS
    if not path.is_file():
        raise UserError("the resume weights are missing; start again without --resume", path=path)
    try:
        load_safetensors_model(model, str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, RuntimeError (shapes/keys), OSError
        raise UserError(f"damaged resume weights: {type(e).__name__}: {e}", path=path) from e
    check_finite(model, path)


def load_resume_optimizer(output: Path) -> dict:
    """resume/optimizer.pt: {"optimizer": ..., "scheduler": ...}; tensors only (weights_only=True)."""
    return _load_tensor_file(output / RESUME_DIR / RESUME_OPTIMIZER, ("optimizer", "scheduler"), "optimizer state")


def load_resume_rng(output: Path, rank: int) -> dict:
    return _load_tensor_file(output / RESUME_DIR / rng_file(rank), ("torch",), "random-number state")


def _load_tensor_file(path: Path, keys: tuple[str, ...], what: str) -> dict:
    from dialogpt_zh.foreign import torch_load_tensors

    if not path.is_file():
        raise UserError(f"the resume {what} is missing; start again without --resume", path=path)
    try:
        data = torch_load_tensors(path)
    except Exception as e:  # noqa: BLE001 - on damaged bytes the unpickler fails in any way (IndexError:
        # pop from empty list, KeyError, UnicodeDecodeError, ... besides UnpicklingError): all mean "damaged"
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"damaged resume {what}: {type(e).__name__}: {first_line}", path=path) from e
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise UserError(f"damaged resume {what}: expected a dict with {', '.join(keys)}", path=path)
    return data
