"""Train a forward (P(reply | context)) or backward (P(context | reply), the MMI scorer) GPT-2 on a token store.

One flat loop on top of `accelerate.Accelerator` (which brings the device and torchrun/DDP without code
changes). Our own parts are small: length-grouped (or packed) batches prepared ahead of the step
(training.batches, training.prefetch), a token-weighted loss over the targets only (training.objective),
the precision (autocast; fp16 loss scaling), and a resume state that continues exactly (weights, AdamW,
schedule, RNG, data position). Checks and building blocks are in training.setup; the output directory is
written by training.outputs through dialogpt_zh.checkpoint, replaced atomically at every save, so it always
holds a complete best model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from dialogpt_zh.checkpoint import RUN_CONFIG_FILE, RunState, load_resume_weights, remove_stale_temp
from dialogpt_zh.cli import Terminated
from dialogpt_zh.errors import UserError
from dialogpt_zh.training.batches import Batch, collate, collate_rows, plan_batches, plan_packed_batches, shard_batches
from dialogpt_zh.training.config import Schedule, TrainConfig, for_device, make_schedule, run_config, validate_config
from dialogpt_zh.training.objective import NextTokenLoss, fast_activations
from dialogpt_zh.training.outputs import run_metrics, save_run, training_card
from dialogpt_zh.training.prefetch import Position, Prefetcher, step_batches
from dialogpt_zh.training.setup import (
    check_output,
    keep_freed_memory,
    make_model,
    make_optimizer,
    open_store,
    read_resume_state,
    input_layout,
    resolve_device,
    restore_training_state,
    usable_windows,
)

log = logging.getLogger("dialogpt_zh.train")


@dataclass
class _Run:
    """What the loop works with (set up by `_setup`)."""
    config: TrainConfig           # with the device's defaults filled in (training.config.for_device)
    output: Path
    device: str
    precision: str
    store: Any
    train_split: Any
    valid_split: Any
    tokenizer: Any
    state: RunState
    accelerator: Any
    layout: Any = None            # how windows become inputs (dialogpt_zh.sequence.Layout)
    lm: Any = None                # the Hugging Face model: validated and saved
    loss_model: Any = None        # NextTokenLoss(lm)
    ddp_model: Any = None         # loss_model as accelerate prepared it (DDP under torchrun)
    step_model: Any = None        # what a training step calls: ddp_model, compiled with --compile on
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None            # fp16 loss scaling (None in fp32 / bf16)
    schedule: Optional[Schedule] = None
    epoch_plan: Optional[Callable[[int], list]] = None  # this process's batches of an epoch, as window indices
    valid_batches: list = field(default_factory=list)    # this process's validation batches
    position: Optional[Position] = None                  # the data position after the last recorded step
    extra: dict = field(default_factory=dict)            # figures for metrics.json


# ------------------------------------------------------------------------------------------------- setup

def _make_accelerator(device: str):
    """accelerate for the device and the processes. Precision stays ours (`_autocast`, the fp16 scaler), so
    accelerate's once-per-process state is the same for every in-process run on a device."""
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    except ValueError as e:
        raise UserError(f"accelerate cannot run this process on {device}: {e}", field="--device") from e
    if accelerator.device.type != device:  # accelerate keeps the first run's device for the whole process
        raise UserError(f"this process already trained on {accelerator.device.type}: start a new process for "
                        f"--device {device}", field="--device")
    return accelerator


def _setup(config: TrainConfig) -> _Run:
    """Every check first: nothing is written before every setting, input and the output place are known good."""
    validate_config(config)
    output = check_output(config)
    device, precision = resolve_device(config)
    config = for_device(config, device)
    store, train_split, valid_split, tokenizer = open_store(config)
    state = read_resume_state(output, config) if config.resume else RunState(config=run_config(config))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    reused_memory = device == "cpu" and keep_freed_memory()
    accelerator = _make_accelerator(device)
    if config.resume and state.world_size != accelerator.num_processes:
        raise UserError(f"the run was saved with {state.world_size} processes, not {accelerator.num_processes}: "
                        "the data position would not match", path=output / "resume")
    state.world_size = accelerator.num_processes
    if accelerator.is_main_process:
        for p in remove_stale_temp(output):
            log.info("removed %s (left by an earlier run that was killed)", p)
    accelerator.wait_for_everyone()
    run = _Run(config, output, device, precision, store, train_split, valid_split, tokenizer, state, accelerator)
    _setup_model_and_data(run)
    _setup_optimizer(run)
    run.extra["malloc_keeps_freed_memory"] = reused_memory
    return run


def _check_pack(config: TrainConfig, max_len: int, train_len: np.ndarray, store_path: Path) -> None:
    if config.pack > max_len:
        raise UserError(f"must be at most the model's {max_len} positions, got {config.pack}", field="--pack")
    longest = int(train_len.max())
    if longest > config.pack:
        raise UserError(f"the longest train window has {longest} tokens and a packed row holds {config.pack}: "
                        f"use --pack {longest} or more (or 0)", path=store_path, field="--pack")


def _setup_model_and_data(run: _Run) -> None:
    config, state = run.config, run.state
    torch.manual_seed(config.seed)
    run.lm = make_model(config, run.tokenizer, state.model_config if config.resume else None)
    state.model_config = run.lm.config.to_dict()
    if config.resume:
        load_resume_weights(run.lm, run.output)
    fast_activations(run.lm)
    run.layout = input_layout(config, run.tokenizer)
    max_len = run.lm.config.n_positions
    train_idx, train_len, train_skipped = usable_windows(run.train_split, max_len, run.layout)
    valid_idx, valid_len, valid_skipped = usable_windows(run.valid_split, max_len, run.layout)
    # an --init model's positions are its config.json's (--n-positions sizes only a new model)
    where = (f"the --init model's {max_len} positions (n_positions in {Path(config.init) / 'config.json'})"
             if config.init and not config.resume else f"the model's {max_len} positions")
    fix = "preprocess with a smaller --max-tokens" if config.init and not config.resume else \
        "use --n-positions or shorter windows in the preprocessor"
    if train_skipped or valid_skipped:
        log.warning("skipping windows longer than %s: %d train, %d valid (%s)", where, train_skipped, valid_skipped,
                    fix)
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise UserError(f"no train or valid window fits in {where}; {fix}", path=run.store.path)
    if config.pack:
        _check_pack(config, max_len, train_len, run.store.path)
    if config.eval_windows and len(valid_idx) > config.eval_windows:
        pick = np.sort(np.random.default_rng(config.seed).choice(len(valid_idx), config.eval_windows, replace=False))
        valid_idx, valid_len = valid_idx[pick], valid_len[pick]
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    valid_plan = plan_batches(valid_len, config.batch_tokens, config.batch_size, seed=0, epoch=0, group_batches=1 << 30)
    run.valid_batches = [valid_idx[b] for b in valid_plan[rank::world]]

    def epoch_plan(epoch: int) -> list:
        if config.pack:
            plan = [[train_idx[r] for r in rows]
                    for rows in plan_packed_batches(train_len, config.pack, config.batch_tokens, config.seed, epoch)]
        else:
            plan = [train_idx[b] for b in plan_batches(train_len, config.batch_tokens, config.batch_size,
                                                       config.seed, epoch)]
        plan = shard_batches(plan, rank, world)
        if not plan:
            raise UserError(f"the train split has too few batches for {world} processes", path=run.store.path)
        return plan

    run.epoch_plan = epoch_plan
    run.schedule = make_schedule(config, len(epoch_plan(0)))
    run.extra = {"train_windows": int(len(train_idx)), "valid_windows_evaluated": int(len(valid_idx)),
                 "skipped_too_long": {"train": train_skipped, "valid": valid_skipped}}


def _setup_optimizer(run: _Run) -> None:
    config, accelerator = run.config, run.accelerator
    fused_head = run.device == "cpu" and run.precision == "fp32" and config.compile == "off"
    run.loss_model = NextTokenLoss(run.lm, fused_head=fused_head)
    optimizer = make_optimizer(run.lm, config, run.device)
    run.ddp_model, run.optimizer = accelerator.prepare(run.loss_model, optimizer)
    schedule = run.schedule
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(getattr(run.optimizer, "optimizer", run.optimizer),
                                                      lambda step: schedule.factor(step))
    run.scaler = torch.amp.GradScaler(run.device) if run.precision == "fp16" else None
    if config.resume:
        restore_training_state(run.output, run.optimizer, run.scheduler, run.scaler, accelerator.process_index)
    else:
        torch.manual_seed(config.seed + accelerator.process_index)  # dropout stream; per process
    if config.compile == "on":
        # padded batches change shape every step: one dynamic graph from the start instead of a recompile;
        # packed ones keep theirs (torch marks what varies dynamic after the first change)
        run.step_model = torch.compile(run.ddp_model, dynamic=None if config.pack else True)
    else:
        run.step_model = run.ddp_model
    n_params = sum(p.numel() for p in run.lm.parameters())
    run.extra.update({"parameters": n_params, "total_steps": run.schedule.total_steps, "device": run.device,
                      "precision": run.precision, "processes": accelerator.num_processes,
                      "batch_tokens": config.batch_tokens, "pack": config.pack, "compile": config.compile,
                      "fused_adamw": bool(optimizer.defaults.get("fused")), "fused_head": fused_head})
    if accelerator.is_main_process:
        log.info("training %s %s (%.2fM parameters) on %d windows, %d processes, %s/%s, %d steps of %s",
                 config.direction, "init" if config.init else config.preset, n_params / 1e6,
                 run.extra["train_windows"], accelerator.num_processes, run.device, run.precision,
                 run.schedule.total_steps, f"{config.batch_size} windows" if config.batch_size else
                 f"{config.batch_tokens} tokens" + (f" (rows of {config.pack})" if config.pack else ""))


# ------------------------------------------------------------------------------------------ steps, validation

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


def _step_error(config: TrainConfig, batch: Batch, e: Exception) -> Optional[UserError]:
    """The clear error for a failed forward/backward, or None to let it through as it is."""
    if _is_oom(e):
        shape = tuple(batch.input_ids.shape)
        return UserError(f"out of memory on a micro-batch of {shape[0]} rows x {shape[1]} tokens; lower "
                         f"--batch-tokens (now {config.batch_tokens}) or --batch-size and raise --grad-accum to "
                         "keep the effective batch", field="batch_tokens")
    if config.compile == "on" and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return UserError(f"torch.compile failed ({type(e).__name__}: {first}); train with --compile off",
                         field="compile")
    return None


def _autocast(run: _Run):
    if run.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(run.device, dtype=torch.bfloat16 if run.precision == "bf16" else torch.float16)


def _batch_loss(model, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over the target positions of a batch (model: a NextTokenLoss)."""
    return model(batch.input_ids, batch.target_index, batch.target_ids, batch.position_ids, batch.token_type_ids)


def _collate_step(run: _Run, micro: list) -> list[Batch]:
    """A step's micro-batches (plan entries) as tensors, pinned for an asynchronous copy to a GPU."""
    config, split, pad = run.config, run.train_split, run.tokenizer.pad_token_id
    if config.pack:
        batches = [collate_rows(split, rows, config.direction, pad, config.replies_only, packed=True,
                                layout=run.layout) for rows in micro]
    else:
        batches = [collate(split, windows, config.direction, pad, config.replies_only, run.layout)
                   for windows in micro]
    return [b.pin_memory() for b in batches] if run.device == "cuda" else batches


def _train_step(run: _Run, batches: list[Batch]) -> tuple[float, torch.Tensor]:
    """Forward/backward over the micro-batches, clip, one AdamW update. Returns the lr used and, on the device
    (not read back here, so the host can go on to the next step), [tokens, targets, padded tokens, summed
    loss], summed over processes."""
    accelerator, config = run.accelerator, run.config
    targets = sum(b.num_targets for b in batches)
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for k, batch in enumerate(batches):
        batch = batch.to(accelerator.device, non_blocking=True)
        sync = contextlib.nullcontext() if k == len(batches) - 1 else accelerator.no_sync(run.ddp_model)
        try:
            with sync:
                with _autocast(run):
                    loss_sum = _batch_loss(run.step_model, batch)
                scaled = loss_sum / max(1, targets)
                accelerator.backward(run.scaler.scale(scaled) if run.scaler else scaled)
        except Exception as e:  # noqa: BLE001
            error = _step_error(config, batch, e)
            if error is not None:
                raise error from e
            raise
        step_loss += loss_sum.detach().double()
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(run.lm.parameters(), config.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    sizes = torch.tensor([sum(b.num_tokens for b in batches), targets, sum(b.input_ids.numel() for b in batches)],
                         dtype=torch.float64)
    if run.device == "cuda":  # a copy from pageable memory would wait for the GPU to finish the step
        sizes = sizes.pin_memory()
    counts = torch.cat([sizes.to(accelerator.device, non_blocking=True), step_loss.reshape(1)])
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    return lr, counts


def validation_loss(run: _Run) -> float:
    """Token-weighted mean loss (nats/token) over the run's validation windows, sharded over processes."""
    model, accelerator, config = run.loss_model, run.accelerator, run.config
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for windows in run.valid_batches:
            batch = collate(run.valid_split, windows, config.direction, run.tokenizer.pad_token_id,
                            config.replies_only, run.layout).to(accelerator.device)
            try:
                with _autocast(run):
                    total[0] += _batch_loss(model, batch).double()
            except Exception as e:  # noqa: BLE001
                error = _step_error(config, batch, e)
                if error is not None:
                    raise error from e
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


# ------------------------------------------------------------------------------------------------- the loop

class _Progress:
    """Records finished steps into the run state and shows them (tqdm on the main process)."""

    def __init__(self, run: _Run) -> None:
        from tqdm.auto import tqdm

        self.run = run
        self.bar = tqdm(total=run.schedule.total_steps, initial=run.state.step, desc=f"train {run.config.direction}",
                        unit="step", dynamic_ncols=True,
                        disable=not run.accelerator.is_main_process or bool(os.environ.get("TQDM_DISABLE")))
        self.t_start, self.tokens_at_start = time.perf_counter(), run.state.tokens_seen
        self.wall_at_start = run.state.wall_time_s

    def record(self, lr: float, counts: torch.Tensor, position: Position) -> None:
        tokens, targets, padded, loss = counts.tolist()  # waits for the step to finish
        state = self.run.state
        state.step += 1
        state.epoch, state.batch_index = position.epoch, position.batch_index
        self.run.position = position
        state.tokens_seen += int(tokens)
        state.targets_seen += int(targets)
        state.padded_tokens_seen += int(padded)
        state.train_history.append([state.step, float(loss / max(1.0, targets)), lr])
        elapsed = time.perf_counter() - self.t_start
        state.wall_time_s = self.wall_at_start + elapsed
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.train_history[-1][1]:.3f}", lr=f"{lr:.2e}", epoch=state.epoch,
                             tok_s=f"{(state.tokens_seen - self.tokens_at_start) / max(1e-9, elapsed):.0f}")


def _last_epoch(config: TrainConfig) -> Optional[int]:
    return None if config.max_steps > 0 else config.epochs - 1


def _ends_run(config: TrainConfig, step: int, position: Position) -> bool:
    """Whether step `step`, leaving the data at `position`, ends the run by --max-steps or --epochs."""
    if config.max_steps > 0:
        return step >= config.max_steps
    return position.epoch + (position.batch_index >= position.epoch_batches) >= config.epochs


def _evaluate_and_save(run: _Run, stopped: Optional[str], progress: _Progress) -> Optional[str]:
    """Validate, save the output directory; returns why the run stops (early stopping may start here)."""
    config, state = run.config, run.state
    loss = validation_loss(run)
    improved = _validate(state, loss)
    stopped = stopped or _stop_reason(config, state, run.position.epoch_batches)  # patience
    training_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
    if run.scaler:
        training_state["scaler"] = run.scaler.state_dict()
    save_run(run.output, run.accelerator, run.lm, run.tokenizer, training_state, state,
             training_card(config, state, run.store, run.schedule, run.layout.name),
             run_metrics(state, config, stopped, run.extra), improved)
    if run.accelerator.is_main_process:
        progress.bar.write(f"step {state.step}: valid loss {loss:.4f} (ppl {math.exp(min(50, loss)):.1f}), "
                           f"best {state.best_valid_loss:.4f} at {state.best_step}")
    return stopped


def _loop(run: _Run, should_stop: Optional[Callable[[int], bool]]) -> tuple[Optional[str], Optional[str]]:
    """One optimizer step per turn; validate and save every --eval-every steps and at the end. A step's figures
    are read back only after the next step is under way (no wait for the device in between), except at the
    steps where the run may stop or save. Returns (why it stopped, the signal that asked)."""
    config, state = run.config, run.state
    run.position = Position(state.epoch, state.batch_index, len(run.epoch_plan(state.epoch)))
    stopped = _stop_reason(config, state, run.position.epoch_batches)  # not None: a finished run was resumed
    progress = _Progress(run)
    source = step_batches(run.epoch_plan, state.epoch, state.batch_index, config.grad_accum, _last_epoch(config))
    run.loss_model.train()
    step, pending = state.step, None
    with _StopFlag() as stop, Prefetcher(source, lambda item: (_collate_step(run, item[0]), item[1]),
                                         0 if stopped else config.prefetch) as steps:
        while stopped is None:
            micro, position = next(steps)
            lr, counts = _train_step(run, micro)
            step += 1
            if pending is not None:
                progress.record(*pending)
            pending = (lr, counts, position)
            asked = _any_process(stop.requested or bool(should_stop and should_stop(step)), run.accelerator)
            if not (asked or step % config.eval_every == 0 or _ends_run(config, step, position)):
                continue
            progress.record(*pending)
            pending = None
            stopped = _stop_reason(config, state, position.epoch_batches) or ("interrupted" if asked else None)
            if stopped or state.step % config.eval_every == 0:
                stopped = _evaluate_and_save(run, stopped, progress)
    progress.bar.close()
    return stopped, stop.signal


def train(config: TrainConfig, should_stop: Optional[Callable[[int], bool]] = None) -> dict[str, Any]:
    """Train as configured; returns the metrics dict also written to OUTPUT/metrics.json.

    `should_stop(step)` is asked after every optimizer step (its argument: the steps done); when it returns
    True the run stops as on Ctrl-C: it validates, saves the best model and the resume state, and reports
    stopped="interrupted". For callers that run training in a thread, a notebook or a test.
    """
    run = _setup(config)
    stopped, stop_signal = _loop(run, should_stop)
    run.accelerator.wait_for_everyone()
    state, output = run.state, run.output
    metrics = {**run_metrics(state, run.config, stopped, run.extra), "signal": stop_signal}
    if run.accelerator.is_main_process:
        best = state.best_valid_loss if state.best_valid_loss is not None else float("nan")
        log.info(f"{stopped} at step {state.step}: best valid loss {best:.4f} "
                 f"(ppl {math.exp(min(50, best)):.1f}) at step {state.best_step}; "
                 f"{state.tokens_seen:,} tokens in {state.wall_time_s:.0f}s "
                 f"({metrics['tokens_per_s'] or 0:.0f} tokens/s); best model in {output}")
        if stopped == "interrupted":
            log.info("resume with: %s", shlex.join(["python", "-m", "dialogpt_zh.train", "--config",
                                                    str(output / RUN_CONFIG_FILE), "--resume"]))
    return metrics
