"""GPT-2 model presets and checkpoint I/O (Hugging Face format, safetensors only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import atomic_directory

CARD_FILE = "dialogpt_zh.json"

# tiny: seconds, for tests. small: ~1 h on 2 CPU cores on the shared corpus. base: GPT2-chitchat's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
    "small": dict(n_layer=4, n_embd=256, n_head=4, n_positions=512),
    "base": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
}


def build_model(preset: str, tokenizer, dropout: float = 0.1, **overrides: Any):
    """A fresh GPT2LMHeadModel of a preset shape; any GPT2Config field can be overridden."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}", field="preset")
    cfg = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = GPT2Config(vocab_size=len(tokenizer), resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id, **cfg)
    return GPT2LMHeadModel(config)


def save_checkpoint(model, tokenizer, out_dir: str | Path, card: dict[str, Any],
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Save model (safetensors) + tokenizer + training card into `out_dir` atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / CARD_FILE).write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """The training card of a checkpoint ({} for a plain HF model dir, e.g. a GPT2-chitchat model)."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable training card: {e.msg}", path=path, line=e.lineno) from e


def load_model(model_dir: str | Path, device: str = "cpu", dtype=None):
    """Load a causal LM from a HF directory; only safetensors weights (never unpickle user files)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError("not a model directory (no config.json)", path=model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise UserError("no .safetensors weights; convert pickled weights with a trusted tool first "
                        "(we never unpickle files from user paths)", path=model_dir)
    import torch

    # Weights may be stored in half precision to keep checkpoints small; compute in fp32 on CPU.
    if dtype is None and str(device).startswith("cpu"):
        dtype = torch.float32
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return model.to(device).eval()
