"""What one forward pass of training computes: the summed next-token loss of a GPT-2 over a batch's targets.

`NextTokenLoss` wraps a `GPT2LMHeadModel` so that the step runs only what the loss needs (docs/training.md,
"Where the time goes", has the profile that picked these):
- the language-model head runs on the target positions only, not on padding, [CLS] or the last position;
- no key/value cache is built (a training forward never reads it back; and with one, transformers would not
  turn packed rows' restarting position ids into the block-diagonal mask);
- no attention mask: rows are right-padded (or packed with restarting position ids), see training/batches.py;
- the input goes in as embeddings, so transformers' "padding without attention mask" check (a device sync
  every step) does not run;
- `fast_activations` swaps GPT-2's `gelu_new`, written as six elementwise torch ops, for the same tanh
  formula as one fused kernel (the saved config still says gelu_new: same function, same checkpoint).

The wrapper is what accelerate prepares (DDP hooks see the whole forward) and what --compile compiles; the
Hugging Face model stays reachable as `.lm` for validation and saving.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class NextTokenLoss(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, target_index: torch.Tensor, target_ids: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum over the targets of -log P(target | tokens before it); `target_index` is a flat index into the
        [rows, width] positions whose next token is `target_ids` (training.batches.Batch)."""
        body = self.lm.transformer
        hidden = body(inputs_embeds=body.wte(input_ids), position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, target_index)
        logits = self.lm.lm_head(hidden)
        return F.cross_entropy(logits.float(), target_ids, reduction="sum")


def fast_activations(lm: torch.nn.Module) -> int:
    """Replace every `gelu_new` activation module with transformers' fused tanh GELU (the same formula); returns
    how many were replaced. Only the modules change: weights and config (what is saved) stay as they are."""
    from transformers.activations import GELUTanh, NewGELUActivation

    replaced = 0
    for module in list(lm.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced
