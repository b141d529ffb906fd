"""Before a training run starts: the checks (settings, output, device, store, resume state) and the pieces it
is built from (the model, the usable windows, the optimizer and its restored state). Nothing here writes."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dialogpt_zh.checkpoint import (
    RESUME_DIR,
    RunState,
    load_model,
    load_resume_optimizer,
    load_resume_rng,
    model_layout,
    read_run_state,
)
from dialogpt_zh.data.store import MANIFEST, TokenStore
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import check_output_name
from dialogpt_zh.foreign import resolve_model_dir
from dialogpt_zh.sequence import Layout
from dialogpt_zh.training.config import MUST_MATCH_ON_RESUME, RESUME_DEFAULTS, TrainConfig
from dialogpt_zh.training.presets import build_model

log = logging.getLogger("dialogpt_zh.train")


def check_output(config: TrainConfig) -> Path:
    """Refuse an output we must not or cannot write, before any work is done."""
    check_output_name(config.output, "output")
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UserError("the output exists and is not a directory; name a directory", path=output, field="output")
    here = output.resolve()
    for flag, other in (("data", config.data), ("init", config.init)):
        there = Path(other).resolve() if other else None
        if there is not None and (here == there or here.is_relative_to(there) or there.is_relative_to(here)):
            raise UserError(f"--output and --{flag} overlap ({other}); the output would be written over an input",
                            path=output, field="output")
    if config.resume:
        read_run_state(output)  # nothing to resume / damaged: say so now
    elif output.is_dir() and any(output.iterdir()) and not config.overwrite:
        raise UserError("output directory exists; pass --resume to continue it or --overwrite to replace it",
                        path=output)
    elif output.is_dir() and any(output.iterdir()) and not ((output / "config.json").is_file()
                                                            or (output / RESUME_DIR).is_dir()):
        # --overwrite replaces a training run's directory, never another (a bot's forward/ + backward/, data)
        raise UserError("exists and is not a training output (no config.json or resume/); refusing to replace "
                        "it, even with --overwrite: choose another --output", path=output, field="output")
    parent = output.resolve().parent  # every save is a temp directory here, renamed into place
    while not parent.exists():  # missing folders are created: the first existing one must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is not a directory", path=output, field="output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output's directory (permission denied in {parent})", path=output,
                        field="output")
    return output


def resolve_device(config: TrainConfig) -> tuple[str, str]:
    """The device and precision that "auto" stands for here; refuses what this machine cannot do."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA requested but torch sees no GPU; use --device cpu (or auto)", field="--device")
    precision = config.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp16" and device == "cpu":
        raise UserError("fp16 needs CUDA; use --precision bf16 or fp32 on CPU", field="--precision")
    return device, precision


def open_store(config: TrainConfig) -> tuple[TokenStore, Any, Any, Any]:
    """The store, its train and valid splits and tokenizer, checked against the run's direction."""
    store = TokenStore(config.data)
    if config.direction not in store.directions:
        raise UserError(f"the store was made for directions {store.directions}, not {config.direction!r}; "
                        "re-run the preprocessor with both directions", path=store.path / MANIFEST,
                        field="directions")
    train, valid = store.nonempty_split("train"), store.nonempty_split("valid")
    tokenizer = store.tokenizer()  # checked against the manifest
    return store, train, valid, tokenizer


def read_resume_state(output: Path, config: TrainConfig) -> RunState:
    """The saved run state, refused when a setting that fixes the updates changed."""
    state = read_run_state(output)
    saved = {k: state.config.get(k, RESUME_DEFAULTS.get(k)) for k in MUST_MATCH_ON_RESUME}
    changed = [k for k in MUST_MATCH_ON_RESUME if saved[k] != getattr(config, k)]
    if changed:
        raise UserError("--resume needs the settings of the saved run; changed: " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed),
            path=output / "resume" / "state.json")
    return state


def _check_vocab(model, tokenizer, init_dir: Path) -> None:
    """An --init model must use the store's vocabulary: same size and, where it has a tokenizer, same tokens."""
    from dialogpt_zh.tokenizer import load_tokenizer

    rows = model.get_input_embeddings().num_embeddings
    if rows != len(tokenizer):
        raise UserError(f"the model's vocabulary has {rows} tokens but the store's tokenizer has {len(tokenizer)}; "
                        "preprocess with this model's vocab.txt (--vocab) so ids mean the same tokens",
                        path=init_dir, field="vocab_size")
    has_tokenizer = any((init_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    if not has_tokenizer:
        log.warning("%s has no tokenizer files: only the vocabulary size (%d) could be checked", init_dir, rows)
        return
    theirs, ours = load_tokenizer(init_dir).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:5]
        raise UserError(f"the model's tokenizer differs from the store's (first differing token/id pairs: {diff}); "
                        "preprocess with this model's vocabulary", path=init_dir, field="vocab")


def make_model(config: TrainConfig, tokenizer, saved_model_config: Optional[dict]) -> torch.nn.Module:
    """The GPT-2 to train: the resumed run's architecture, an --init model, or a fresh preset."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if saved_model_config:  # resume: the exact architecture of the run; weights come from resume/
        return GPT2LMHeadModel(GPT2Config.from_dict(saved_model_config))
    if config.init:
        init_dir = resolve_model_dir(config.init, "init")  # a directory in any layout, or a hub id
        model = load_model(init_dir)  # refuses damaged or NaN weights, naming the file
        if model.config.model_type != "gpt2":
            raise UserError(f"--init expects a GPT-2 model, got model_type={model.config.model_type!r}",
                            path=init_dir / "config.json", field="model_type")
        _check_vocab(model, tokenizer, init_dir)
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            setattr(model.config, name, config.dropout)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = config.dropout
        model.config.bos_token_id = tokenizer.cls_token_id
        model.config.eos_token_id = tokenizer.sep_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.train()
    return build_model(config.preset, tokenizer, dropout=config.dropout, n_layer=config.n_layer,
                       n_embd=config.n_embd, n_head=config.n_head, n_positions=config.n_positions)


def input_layout(config: TrainConfig, tokenizer) -> Layout:
    """The layout windows are built in (dialogpt_zh.sequence): --layout, else the --init model's (its card, else
    its vocabulary's), else the store vocabulary's (cdial when it has [speaker1]/[speaker2]); the card records
    it, the engine reads it there."""
    init_dir = resolve_model_dir(config.init, "init") if config.init else None
    return model_layout(init_dir, tokenizer, config.layout)


def usable_windows(split, max_len: int, layout: Layout) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices and lengths of the windows that fit the model; the rest are counted, never silently dropped."""
    lengths = split.lengths(layout.extra_tokens)
    keep = np.flatnonzero(lengths <= max_len)
    return keep, lengths[keep], int(len(lengths) - len(keep))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing big blocks back to the system.

    A CPU training step allocates and frees the same large tensors every step (logits, activations, their
    gradients); by default glibc maps each big one fresh from the system, and touching new pages costs
    about as much as a matrix product of that size (docs/training.md, "Where the time goes"). Nothing is
    computed differently. Process-wide and kept after the run; False (nothing changed) where the C library
    is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (and its mallopt settings)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    keep = 1 << 30  # blocks up to 1 GiB come from, and go back to, the reusable heap
    return bool(mallopt(m_mmap_threshold, keep)) and bool(mallopt(m_trim_threshold, keep))


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95, no decay on biases and LayerNorm), fused into one kernel where torch has one for
    the device (CPU and CUDA: same update, fewer passes over the weights)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def restore_training_state(output: Path, optimizer, scheduler, scaler, rank: int) -> None:
    """AdamW, schedule, fp16 loss scale and this process's RNG from OUTPUT/resume."""
    saved = load_resume_optimizer(output)
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"the resume optimizer state does not fit this model: {e}",
                        path=output / "resume" / "optimizer.pt") from e
    rng = load_resume_rng(output, rank)
    try:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"damaged random-number state: {e}", path=output / "resume" / f"rng_{rank}.pt") from e
