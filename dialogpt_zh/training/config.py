"""The training run's settings (`TrainConfig`, validated in `__post_init__`) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Optional

from dialogpt_zh.cli import field_help
from dialogpt_zh.errors import UserError
from dialogpt_zh.settings import SEED_MAX
from dialogpt_zh.training.presets import PRESETS

# Settings that fix the exact sequence of updates: a --resume run must use the same ones.
MUST_MATCH_ON_RESUME = ("direction", "replies_only", "seed", "lr", "warmup_steps", "weight_decay", "grad_accum",
                        "max_grad_norm", "batch_tokens", "batch_size", "eval_windows", "pack", "layout")
# what a run saved before a setting existed did, for the settings above that came later
RESUME_DEFAULTS = {"pack": 0, "layout": None}

# --batch-tokens when not given: a GPU needs large batches to be busy; on a CPU larger ones only mean fewer steps
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}


MIN_LR_RATIO = 0.1  # the cosine decay ends at 10 % of --lr


@dataclass
class TrainConfig:
    data: str = field(metadata=field_help("token store directory made by `python -m dialogpt_zh.preprocess`"))
    output: str = field(metadata=field_help("checkpoint directory to write (a Hugging Face model directory)"))
    direction: Literal["forward", "backward"] = field(
        default="forward",
        metadata=field_help("forward: P(reply | context); backward: P(context | reply), the MMI scorer"))
    preset: Literal["tiny", "small", "mid", "large", "base"] = field(
        default="small", metadata=field_help(f"model shape: {', '.join(f'{k}={v}' for k, v in PRESETS.items())}"))
    n_layer: Optional[int] = field(default=None, metadata=field_help("override the preset's layer count"))
    n_embd: Optional[int] = field(default=None, metadata=field_help("override the preset's hidden size"))
    n_head: Optional[int] = field(default=None, metadata=field_help("override the preset's attention heads"))
    n_positions: Optional[int] = field(default=None,
                                       metadata=field_help("override the preset's maximum sequence length"))
    dropout: float = field(default=0.1, metadata=field_help("dropout (residual, embedding, attention)"))
    init: Optional[str] = field(default=None, metadata=field_help(
        "start from this GPT-2 directory (ours, or GPT2-chitchat / CDial-GPT2 / uer/gpt2-chinese as downloaded: "
        "pytorch_model.bin or safetensors + vocab.txt; or a hub id) instead of random weights; its vocabulary "
        "must be the store's (preprocess --vocab MODEL_DIR); the preset and shape overrides are then ignored"))
    layout: Optional[Literal["chitchat", "cdial"]] = field(default=None, metadata=field_help(
        "input layout: chitchat ([CLS] u1 [SEP] u2 [SEP] ...) or cdial (speaker tokens + token types; the store's "
        "vocabulary must hold [speaker1]/[speaker2]); default: the --init model's, else the store vocabulary's"))
    lr: float = field(default=5e-4, metadata=field_help("peak learning rate of AdamW"))
    warmup_steps: int = field(default=-1, metadata=field_help(
        "linear warmup steps, then cosine decay to 10%% of --lr; -1: 5%% of the total steps"))
    weight_decay: float = field(default=0.01, metadata=field_help("AdamW weight decay (not on biases/LayerNorm)"))
    grad_accum: int = field(default=1, metadata=field_help("micro-batches per optimizer step"))
    max_grad_norm: float = field(default=1.0, metadata=field_help("gradient clipping norm (0: off)"))
    batch_tokens: Optional[int] = field(default=None, metadata=field_help(
        "micro-batch size in padded tokens; windows of similar length are grouped; default "
        + ", ".join(f"{v} on {k}" for k, v in DEFAULT_BATCH_TOKENS.items())))
    batch_size: int = field(default=0,
                            metadata=field_help("fixed windows per micro-batch instead (0: use --batch-tokens)"))
    pack: int = field(default=0, metadata=field_help(
        "pack windows end to end into rows of this many tokens (each window attends only to itself; the loss is "
        "the same as padded) so every batch has one shape; 0: length-grouped padded rows (measured faster on "
        "CPU, docs/training.md)"))
    epochs: int = field(default=3, metadata=field_help("passes over the train split (ignored with --max-steps)"))
    max_steps: int = field(default=0, metadata=field_help("stop after this many optimizer steps (0: use --epochs)"))
    eval_every: int = field(default=500, metadata=field_help("validate and save every N steps"))
    eval_windows: int = field(default=2000, metadata=field_help(
        "validate on this many valid windows (a fixed seeded sample; 0: all)"))
    patience: int = field(default=0, metadata=field_help("stop after N validations without improvement (0: off)"))
    replies_only: bool = field(default=False, metadata=field_help(
        "no loss on the first utterance of each window ([CLS] + first turn + its [SEP])"))
    resume: bool = field(default=False, metadata=field_help("continue the run saved in OUTPUT/resume exactly"))
    overwrite: bool = field(default=False, metadata=field_help("replace an existing OUTPUT (at the first save)"))
    seed: int = field(default=42, metadata=field_help("seed for weights, batch order and dropout"))
    threads: int = field(default=0, metadata=field_help(
        "CPU threads for torch (0: torch's default); 1 is often faster on a CPU shared with other jobs"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=field_help("auto: cuda when present"))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata=field_help(
        "auto: fp32 on CPU, bf16 on CUDA (fp16 where bf16 is unsupported)"))
    compile: Literal["auto", "on", "off"] = field(default="auto", metadata=field_help(
        "torch.compile the training forward/backward; auto: on with CUDA, off on CPU (slower there, "
        "docs/training.md)"))
    prefetch: int = field(default=2, metadata=field_help(
        "steps' batches prepared ahead in a background thread (pinned memory on CUDA); 0: inside the step"))

    def __post_init__(self) -> None:
        validate_config(self)


def validate_config(config: TrainConfig) -> None:
    """Refuse settings that torch would take silently or crash on, naming the flag."""
    def refuse(name: str, why: str) -> None:
        raise UserError(f"{why}, got {getattr(config, name)!r}", field="--" + name.replace("_", "-"))

    def number(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
               integer: bool = False) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            refuse(name, "must be " + ("an integer" if integer else "a number"))
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high \
                or (high_open and value == high):
            bounds = ", ".join(f"{b:g}" if isinstance(b, float) else str(b) for b in (low, high))  # ints in full
            refuse(name, f"must be in {'(' if low_open else '['}{bounds}{')' if high_open else ']'}")

    for name, choices in (("direction", ("forward", "backward")), ("preset", tuple(PRESETS)),
                          ("device", ("auto", "cpu", "cuda")), ("precision", ("auto", "fp32", "bf16", "fp16")),
                          ("compile", ("auto", "on", "off"))):
        if getattr(config, name) not in choices:
            refuse(name, f"must be one of {', '.join(choices)}")
    for name in ("data", "output"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            refuse(name, "a path is required")
    number("lr", 0, 10, low_open=True)
    number("dropout", 0, 1, high_open=True)
    number("weight_decay", 0)
    number("max_grad_norm", 0)
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        if getattr(config, name) is not None:
            number(name, 1, integer=True)
    for name, low in (("warmup_steps", -1), ("grad_accum", 1), ("batch_size", 0), ("epochs", 0),
                      ("max_steps", 0), ("eval_every", 1), ("eval_windows", 0), ("patience", 0), ("pack", 0),
                      ("prefetch", 0)):
        number(name, low, integer=True)
    number("seed", 0, SEED_MAX, integer=True)  # torch.manual_seed takes no more
    number("threads", 0, 1024, integer=True)   # as the chat faces' --threads: more only piles up idle threads
    if config.batch_tokens is not None:
        number("batch_tokens", 0, integer=True)
    if config.batch_tokens == 0 and config.batch_size == 0:
        refuse("batch_tokens", "give a positive --batch-tokens or --batch-size")
    if config.pack and config.batch_size:
        refuse("pack", "packed batches are cut by tokens (--batch-tokens); leave --batch-size at 0")
    if config.pack and config.batch_tokens is not None and config.batch_tokens < config.pack:
        refuse("batch_tokens", f"must hold at least one packed row of --pack {config.pack} tokens")
    if config.max_steps == 0 and config.epochs == 0:
        refuse("epochs", "give a positive --epochs or --max-steps")
    if config.init is None:
        shape = {**PRESETS[config.preset], **{k: getattr(config, k) for k in ("n_embd", "n_head")
                                               if getattr(config, k) is not None}}
        if shape["n_embd"] % shape["n_head"]:
            refuse("n_head", f"must divide the hidden size {shape['n_embd']} (--n-embd)")


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to --lr, then cosine decay to `min_lr_ratio` * --lr at `total_steps` (flat after)."""
    total_steps: int
    warmup_steps: int
    batches_per_epoch: int      # micro-batches in epoch 0's plan, per process (an --epochs run's length)
    min_lr_ratio: float = MIN_LR_RATIO

    def factor(self, step: int) -> float:
        """LR multiplier of optimizer step `step` (0-based: the first update uses factor(0))."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(config: TrainConfig, batches_per_epoch: int) -> Schedule:
    """The LR schedule, a pure function of the settings and the number of micro-batches per epoch."""
    if config.max_steps > 0:
        total = config.max_steps
    else:
        total = math.ceil(config.epochs * batches_per_epoch / config.grad_accum)
    warmup = config.warmup_steps if config.warmup_steps >= 0 else max(1, total // 20)
    return Schedule(total, warmup, batches_per_epoch)


def for_device(config: TrainConfig, device: str) -> TrainConfig:
    """The settings with the device's defaults filled in (--batch-tokens, --compile), as the run records them:
    replaying run.json on another device repeats the same batches."""
    batch_tokens = config.batch_tokens
    if batch_tokens is None:
        batch_tokens = max(DEFAULT_BATCH_TOKENS[device], config.pack)
    compile_ = config.compile if config.compile != "auto" else ("on" if device == "cuda" else "off")
    return replace(config, batch_tokens=batch_tokens, compile=compile_)


def run_config(config: TrainConfig) -> dict[str, Any]:
    """The run's full settings, as saved in OUTPUT/run.json and the card: `--config` replays them."""
    return {**asdict(config), "resume": False, "overwrite": False}
