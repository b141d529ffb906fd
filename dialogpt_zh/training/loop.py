"""Train a forward (P(reply | context)) or backward (P(context | reply), the MMI scorer) GPT-2 on a token store.

One flat loop on top of `accelerate.Accelerator` (which brings CUDA, bf16/fp16 and torchrun/DDP without
code changes). Our own parts are small: length-grouped batches (dialogpt_zh.training.batches), a token-weighted
loss, and a resume state that continues exactly (weights, AdamW, schedule, RNG, data position).
The output directory is written by dialogpt_zh.checkpoint (layout there), replaced atomically at every
save, so it always holds a complete best model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dialogpt_zh.checkpoint import (
    RUN_CONFIG_FILE,
    ResumeFiles,
    RunState,
    load_model,
    load_resume_optimizer,
    load_resume_rng,
    load_resume_weights,
    model_layout,
    read_run_state,
    remove_stale_temp,
    rng_staging_dir,
    save_checkpoint,
    save_rng_state,
)
from dialogpt_zh.cli import Terminated
from dialogpt_zh.data.store import MANIFEST, TokenStore
from dialogpt_zh.errors import UserError
from dialogpt_zh.foreign import resolve_model_dir
from dialogpt_zh.sequence import Layout
from dialogpt_zh.training.batches import Batch, collate, plan_batches, shard_batches
from dialogpt_zh.training.config import (
    MUST_MATCH_ON_RESUME,
    Schedule,
    TrainConfig,
    make_schedule,
    run_config,
    validate_config,
)
from dialogpt_zh.training.presets import build_model

log = logging.getLogger("dialogpt_zh.train")

SEQUENCE_FORMATS = {
    "chitchat": "[CLS] u1 [SEP] u2 [SEP] ... (reversed for backward)",
    "cdial": "[CLS] [speaker1] u1 [speaker2] u2 ... [SEP], token types = speakers (reversed for backward)"}


def check_output(config: TrainConfig) -> Path:
    """Refuse an output we must not or cannot write, before any work is done."""
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
    parent = output.resolve().parent  # every save is a temp directory here, renamed into place
    while not parent.exists():  # missing folders are created: the first existing one must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is not a directory", path=output, field="output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output's directory (permission denied in {parent})", path=output,
                        field="output")
    return output


def _resolve_device(config: TrainConfig) -> tuple[str, str]:
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


def _open_store(config: TrainConfig):
    store = TokenStore(config.data)
    if config.direction not in store.directions:
        raise UserError(f"the store was made for directions {store.directions}, not {config.direction!r}; "
                        "re-run the preprocessor with both directions", path=store.path / MANIFEST,
                        field="directions")
    train, valid = store.split("train"), store.split("valid")
    for split in (train, valid):
        if len(split) == 0:
            raise UserError(f"the {split.name} split is empty (0 windows)", path=store.path / MANIFEST,
                            field="store_splits")
    tokenizer = store.tokenizer()
    if len(tokenizer) != store.manifest.get("vocab_size"):
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the manifest says "
                        f"{store.manifest.get('vocab_size')}",
                        path=store.path / MANIFEST, field="vocab_size")
    return store, train, valid, tokenizer


def _read_resume_state(output: Path, config: TrainConfig) -> RunState:
    state = read_run_state(output)
    changed = [k for k in MUST_MATCH_ON_RESUME if state.config.get(k) != getattr(config, k)]
    if changed:
        raise UserError("--resume needs the settings of the saved run; changed: " + ", ".join(
            f"--{k.replace('_', '-')} {state.config.get(k)!r} -> {getattr(config, k)!r}" for k in changed),
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


def _make_model(config: TrainConfig, tokenizer, saved_model_config: Optional[dict]):
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


def _input_layout(config: TrainConfig, tokenizer) -> Layout:
    """The layout windows are built in (dialogpt_zh.sequence): the --init model's (its card, else its
    vocabulary's), else the store vocabulary's (cdial when it has [speaker1]/[speaker2]); the card records it,
    the engine reads it there."""
    init_dir = resolve_model_dir(config.init, "init") if config.init else None
    return model_layout(init_dir, tokenizer)


def _usable_windows(split, max_len: int, layout: Layout) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices and lengths of the windows that fit the model; the rest are counted, never silently dropped."""
    lengths = split.lengths(layout.extra_tokens)
    keep = np.flatnonzero(lengths <= max_len)
    return keep, lengths[keep], int(len(lengths) - len(keep))


def _optimizer(model, config: TrainConfig):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _restore_optimizer_and_rng(output: Path, optimizer, scheduler, rank: int) -> None:
    saved = load_resume_optimizer(output)
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
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


def _loss_curve_png(state: RunState) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if state.train_history:
        steps = np.array([h[0] for h in state.train_history])
        loss = np.array([h[1] for h in state.train_history])
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        k = max(1, len(loss) // 50)
        if k > 1:
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"train ({k}-step mean)")
    if state.valid_history:
        ax.plot([h[0] for h in state.valid_history], [h[1] for h in state.valid_history], "o-",
                color="tab:orange", label="valid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _metrics(state: RunState, config: TrainConfig, stopped: Optional[str], extra: dict) -> dict[str, Any]:
    since = state.valid_history[-2][0] if len(state.valid_history) > 1 else 0
    recent = [h[1] for h in state.train_history if h[0] > since] or [h[1] for h in state.train_history[-1:]]
    valid = state.valid_history[-1][1] if state.valid_history else None

    def ppl(x: Optional[float]) -> Optional[float]:
        return math.exp(min(x, 50.0)) if x is not None else None

    return {
        "direction": config.direction, "step": state.step, "epoch": state.epoch,
        "train_loss": float(np.mean(recent)) if recent else None,
        "train_ppl": ppl(float(np.mean(recent))) if recent else None,
        "valid_loss": valid, "valid_ppl": ppl(valid),
        "best_valid_loss": state.best_valid_loss, "best_valid_ppl": ppl(state.best_valid_loss),
        "best_step": state.best_step,
        "tokens_seen": state.tokens_seen, "target_tokens_seen": state.targets_seen,
        "padded_tokens_seen": state.padded_tokens_seen,
        "padding_share": (1 - state.tokens_seen / state.padded_tokens_seen) if state.padded_tokens_seen else None,
        "wall_time_s": round(state.wall_time_s, 2),
        "tokens_per_s": round(state.tokens_seen / state.wall_time_s, 1) if state.wall_time_s else None,
        "stopped": stopped, **extra,
        "history": {"train": state.train_history, "valid": state.valid_history},
    }


def _card(config: TrainConfig, state: RunState, store, schedule: Schedule,
          layout: str = "chitchat") -> dict[str, Any]:
    """The training card (dialogpt_zh.json): what was trained on what, and how to replay it."""
    card = {"direction": config.direction, "preset": "init" if config.init else config.preset,
            "init": config.init, "model_config": state.model_config, "data": str(store.path),
            "data_manifest_sha256": hashlib.sha256((store.path / MANIFEST).read_bytes()).hexdigest(),
            # the cleaning options the store was made with: the engine cleans user input the same way
            "store_config": store.manifest.get("config")}
    if "corpora" in store.manifest:
        card["corpora"] = store.manifest["corpora"]
    card.update({
        "command": shlex.join(["python", "-m", "dialogpt_zh.train", "--config",
                               str(Path(config.output) / RUN_CONFIG_FILE)]),
        "argv": sys.argv, "seed": config.seed, "replies_only": config.replies_only,
        "steps": state.best_step, "trained_steps": state.step, "best_valid_loss": state.best_valid_loss,
        "tokens_seen": state.tokens_seen, "layout": layout, "sequence_format": SEQUENCE_FORMATS[layout],
        "schedule": asdict(schedule), "config": state.config,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}})
    return card


def _save(output: Path, accelerator, model, tokenizer, optimizer, scheduler, state: RunState, card: dict,
          metrics: dict, improved: bool) -> None:
    """Write the output directory in one atomic rename (main process); RNG files come from every process."""
    rng_dir = rng_staging_dir(output)
    save_rng_state(rng_dir, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        keep_best = not improved and (output / "config.json").is_file()  # the previous best model stays
        resume = ResumeFiles(unwrapped, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                             rng_dir, state)
        save_checkpoint(None if keep_best else unwrapped, tokenizer, output, card, run_config=state.config,
                        metrics=metrics, curve_png=_loss_curve_png(state), resume=resume)
        remove_stale_temp(output)  # the RNG staging directory
    accelerator.wait_for_everyone()


class _StopFlag:
    """Ctrl-C / SIGTERM ask to stop at the next step boundary (a second one stops at once, without saving)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: Optional[str] = None  # "SIGINT" / "SIGTERM": which one asked
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.requested, self.signal = True, signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after this step (saving resume state); Ctrl-C again to abort "
              "without saving", file=sys.stderr)

    def __enter__(self) -> "_StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _oom_error(config: TrainConfig, batch: Batch) -> UserError:
    shape = tuple(batch.input_ids.shape)
    return UserError(f"out of memory on a micro-batch of {shape[0]} windows x {shape[1]} tokens; lower "
                     f"--batch-tokens (now {config.batch_tokens}) or --batch-size and raise --grad-accum to keep "
                     "the effective batch", field="batch_tokens")


def _batch_loss(model, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over the target positions of a batch."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   token_type_ids=batch.token_type_ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch.labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def validation_loss(model, split, indices: np.ndarray, lengths: np.ndarray, config: TrainConfig, pad_id: int,
             accelerator, layout: Optional[Layout] = None) -> float:
    """Token-weighted mean loss (nats/token) over the given windows, sharded over processes."""
    batches = plan_batches(lengths, config.batch_tokens, config.batch_size, seed=0, epoch=0,
                           group_batches=1 << 30)
    batches = batches[accelerator.process_index::accelerator.num_processes]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for b in batches:
            batch = collate(split, indices[b], config.direction, pad_id, config.replies_only,
                            layout).to(accelerator.device)
            try:
                with accelerator.autocast():
                    total[0] += _batch_loss(model, batch).double()
            except Exception as e:  # noqa: BLE001
                if _is_oom(e):
                    raise _oom_error(config, batch) from e
                raise
            total[1] += batch.num_targets
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / max(1.0, float(total[1])))


def _stop_reason(config: TrainConfig, state: RunState, plan_length: int) -> Optional[str]:
    """Why the run is finished at this point, or None (the one place the stopping rules live)."""
    if config.max_steps > 0:
        if state.step >= config.max_steps:
            return "max_steps"
    elif state.epoch + (state.batch_index >= plan_length) >= config.epochs:
        return "epochs"
    if config.patience and state.evals_without_improvement >= config.patience:
        return "early_stopping"
    return None


def _next_micro_batches(config: TrainConfig, state: RunState, plan: list, epoch_plan) -> tuple[list, list]:
    """The next optimizer step's micro-batches (they may run into the next epoch); advances the data position."""
    micro: list[np.ndarray] = []
    while len(micro) < config.grad_accum:
        if state.batch_index >= len(plan):
            if config.max_steps <= 0 and state.epoch + 1 >= config.epochs:
                break  # the last epoch ends inside this step
            state.epoch, state.batch_index = state.epoch + 1, 0
            plan = epoch_plan(state.epoch)
        micro.append(plan[state.batch_index])
        state.batch_index += 1
    return micro, plan


def _train_step(model, batches: list[Batch], optimizer, scheduler, accelerator, config: TrainConfig):
    """Forward/backward over the micro-batches, clip, one AdamW update; returns (lr used, counts over processes)
    where counts = [tokens, target tokens, padded tokens, summed loss]."""
    targets = sum(b.num_targets for b in batches)
    step_loss = 0.0
    for k, batch in enumerate(batches):
        batch = batch.to(accelerator.device)
        sync = contextlib.nullcontext() if k == len(batches) - 1 else accelerator.no_sync(model)
        try:
            with sync:
                loss_sum = _batch_loss(model, batch)
                accelerator.backward(loss_sum / max(1, targets))
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                raise _oom_error(config, batch) from e
            raise
        step_loss += float(loss_sum.detach())
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    counts = torch.tensor([sum(b.num_tokens for b in batches), targets, sum(b.input_ids.numel() for b in batches),
                           step_loss], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    return lr, counts


def _validate(state: RunState, loss: float) -> bool:
    """Record a validation; returns whether it is the best so far."""
    state.valid_history.append([state.step, loss])
    improved = state.best_valid_loss is None or loss < state.best_valid_loss
    if improved:
        state.best_valid_loss, state.best_step, state.evals_without_improvement = loss, state.step, 0
    else:
        state.evals_without_improvement += 1
    return improved


def _any_process(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def train(config: TrainConfig, interrupt_at_step: Optional[int] = None) -> dict[str, Any]:
    """Train as configured; returns the metrics dict also written to OUTPUT/metrics.json.

    `interrupt_at_step` (for tests) behaves like Ctrl-C arriving during that step.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    # -- checks first: nothing is written before every setting, input and the output place are known good
    validate_config(config)
    output = check_output(config)
    device, precision = _resolve_device(config)
    store, train_split, valid_split, tokenizer = _open_store(config)
    state = _read_resume_state(output, config) if config.resume else RunState(config=run_config(config))

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(cpu=device == "cpu",
                              mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision])
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.resume and state.world_size != world:
        raise UserError(f"the run was saved with {state.world_size} processes, not {world}: the data position "
                        "would not match", path=output / "resume")
    state.world_size = world
    if accelerator.is_main_process:
        for p in remove_stale_temp(output):
            log.info("removed %s (left by an earlier run that was killed)", p)
    accelerator.wait_for_everyone()

    # -- model, data, optimizer, schedule
    torch.manual_seed(config.seed)
    model = _make_model(config, tokenizer, state.model_config if config.resume else None)
    state.model_config = model.config.to_dict()
    layout = _input_layout(config, tokenizer)
    if config.resume:
        load_resume_weights(model, output)
    max_len = model.config.n_positions
    train_idx, train_len, train_skipped = _usable_windows(train_split, max_len, layout)
    valid_idx, valid_len, valid_skipped = _usable_windows(valid_split, max_len, layout)
    if train_skipped or valid_skipped:
        log.warning("skipping windows longer than the model's %d positions: %d train, %d valid "
                    "(use --n-positions or shorter windows in the preprocessor)", max_len, train_skipped,
                    valid_skipped)
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise UserError(f"no train or valid window fits in {max_len} positions", path=store.path)
    if config.eval_windows and len(valid_idx) > config.eval_windows:
        pick = np.sort(np.random.default_rng(config.seed).choice(len(valid_idx), config.eval_windows, replace=False))
        valid_idx, valid_len = valid_idx[pick], valid_len[pick]

    def epoch_plan(epoch: int) -> list[np.ndarray]:
        plan = shard_batches(plan_batches(train_len, config.batch_tokens, config.batch_size, config.seed, epoch),
                             rank, world)
        if not plan:
            raise UserError(f"the train split has too few batches for {world} processes", path=store.path)
        return plan

    schedule = make_schedule(config, len(epoch_plan(0)))
    optimizer = _optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(getattr(optimizer, "optimizer", optimizer),
                                                  lambda step: schedule.factor(step))
    if config.resume:
        _restore_optimizer_and_rng(output, optimizer, scheduler, rank)
    else:
        torch.manual_seed(config.seed + rank)  # dropout stream; per process

    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    extra = {"parameters": n_params, "train_windows": int(len(train_idx)),
             "valid_windows_evaluated": int(len(valid_idx)),
             "skipped_too_long": {"train": train_skipped, "valid": valid_skipped},
             "total_steps": schedule.total_steps, "device": device, "precision": precision, "processes": world}
    if accelerator.is_main_process:
        log.info("training %s %s (%.2fM parameters) on %d windows, %d processes, %s/%s, %d steps",
                 config.direction, "init" if config.init else config.preset, n_params / 1e6, len(train_idx), world,
                 device, precision, schedule.total_steps)

    # -- the loop: one optimizer step per turn; validate + save every --eval-every steps and at the end
    plan = epoch_plan(state.epoch)
    stopped = _stop_reason(config, state, len(plan))  # not None: a finished run was resumed; nothing to do
    bar = tqdm(total=schedule.total_steps, initial=state.step, desc=f"train {config.direction}", unit="step",
               disable=not accelerator.is_main_process or bool(os.environ.get("TQDM_DISABLE")), dynamic_ncols=True)
    t_start, tokens_at_start, wall_at_start = time.perf_counter(), state.tokens_seen, state.wall_time_s
    model.train()
    with _StopFlag() as stop:
        while stopped is None:
            micro, plan = _next_micro_batches(config, state, plan, epoch_plan)
            batches = [collate(train_split, train_idx[b], config.direction, tokenizer.pad_token_id,
                               config.replies_only, layout) for b in micro]
            lr, counts = _train_step(model, batches, optimizer, scheduler, accelerator, config)

            state.step += 1
            state.tokens_seen += int(counts[0])
            state.targets_seen += int(counts[1])
            state.padded_tokens_seen += int(counts[2])
            state.train_history.append([state.step, float(counts[3] / max(1.0, float(counts[1]))), lr])
            state.wall_time_s = wall_at_start + time.perf_counter() - t_start
            speed = (state.tokens_seen - tokens_at_start) / max(1e-9, time.perf_counter() - t_start)
            bar.update(1)
            bar.set_postfix(loss=f"{state.train_history[-1][1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}",
                            epoch=state.epoch)

            if interrupt_at_step is not None and state.step == interrupt_at_step:
                stop.requested = True
            stopped = _stop_reason(config, state, len(plan))
            if stopped is None and _any_process(stop.requested, accelerator):
                stopped = "interrupted"
            if stopped or state.step % config.eval_every == 0:
                loss = validation_loss(accelerator.unwrap_model(model), valid_split, valid_idx, valid_len, config,
                                tokenizer.pad_token_id, accelerator, layout)
                improved = _validate(state, loss)
                stopped = stopped or _stop_reason(config, state, len(plan))  # patience
                _save(output, accelerator, model, tokenizer, optimizer, scheduler, state,
                      _card(config, state, store, schedule, layout.name), _metrics(state, config, stopped, extra),
                      improved)
                if accelerator.is_main_process:
                    bar.write(f"step {state.step}: valid loss {loss:.4f} (ppl {math.exp(min(50, loss)):.1f}), "
                              f"best {state.best_valid_loss:.4f} at {state.best_step}")
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.use_distributed:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)  # let the next in-process run pick its settings
        GradientState._reset_state()

    metrics = {**_metrics(state, config, stopped, extra), "signal": stop.signal}
    if accelerator.is_main_process:
        log.info(f"{stopped} at step {state.step}: best valid loss {state.best_valid_loss:.4f} "
                 f"(ppl {math.exp(min(50, state.best_valid_loss)):.1f}) at step {state.best_step}; "
                 f"{state.tokens_seen:,} tokens in {state.wall_time_s:.0f}s "
                 f"({metrics['tokens_per_s'] or 0:.0f} tokens/s); best model in {output}")
        if stopped == "interrupted":
            log.info("resume with: %s", shlex.join(["python", "-m", "dialogpt_zh.train", "--config",
                                                    str(output / RUN_CONFIG_FILE), "--resume"]))
    return metrics
