"""GPT-2 model presets (the checkpoint format, reading and writing, is dialogpt_zh.checkpoint)."""
from __future__ import annotations

from typing import Any

from dialogpt_zh.errors import UserError

# tiny: seconds, for tests. small: ~1 h on 2 CPU cores on the shared corpus (the default models). mid, large:
# the larger shapes the serving budget was measured for (README, "Default models"). base: GPT2-chitchat's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
    "small": dict(n_layer=4, n_embd=256, n_head=4, n_positions=512),
    "mid": dict(n_layer=6, n_embd=384, n_head=6, n_positions=512),
    "large": dict(n_layer=8, n_embd=512, n_head=8, n_positions=512),
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
