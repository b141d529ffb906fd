"""What a training run writes: the loss curve, metrics.json, the training card, and the save itself (through
dialogpt_zh.checkpoint, one atomic rename of the output directory)."""
from __future__ import annotations

import hashlib
import io
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dialogpt_zh.checkpoint import (
    RUN_CONFIG_FILE,
    ResumeFiles,
    RunState,
    remove_stale_temp,
    rng_staging_dir,
    save_checkpoint,
    save_rng_state,
)
from dialogpt_zh.data.store import MANIFEST
from dialogpt_zh.training.config import Schedule, TrainConfig

SEQUENCE_FORMATS = {
    "chitchat": "[CLS] u1 [SEP] u2 [SEP] ... (reversed for backward)",
    "cdial": "[CLS] [speaker1] u1 [speaker2] u2 ... [SEP], token types = speakers (reversed for backward)"}


def loss_curve_png(state: RunState) -> bytes:
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


def run_metrics(state: RunState, config: TrainConfig, stopped: Optional[str], extra: dict) -> dict[str, Any]:
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


def training_card(config: TrainConfig, state: RunState, store, schedule: Schedule,
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


def save_run(output: Path, accelerator, lm, tokenizer, training_state: dict[str, Any], state: RunState, card: dict,
             metrics: dict, improved: bool) -> None:
    """Write the output directory in one atomic rename (main process); RNG files come from every process.
    `lm` is the Hugging Face model; `training_state` the optimizer/scheduler (/scaler) state dicts."""
    rng_dir = rng_staging_dir(output)
    save_rng_state(rng_dir, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        keep_best = not improved and (output / "config.json").is_file()  # the previous best model stays
        resume = ResumeFiles(lm, training_state, rng_dir, state)
        save_checkpoint(None if keep_best else lm, tokenizer, output, card, run_config=state.config,
                        metrics=metrics, curve_png=loss_curve_png(state), resume=resume)
        remove_stale_temp(output)  # the RNG staging directory
    accelerator.wait_for_everyone()
