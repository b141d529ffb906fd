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


class _Workspace:
    """One [rows, vocabulary] buffer kept from step to step for the logits and their gradient: a fresh one of
    that size every step costs more in first-touched pages than the matrix product that fills it."""

    def __init__(self) -> None:
        self.buffer: Optional[torch.Tensor] = None
        self.uses = 0  # which forward the buffer holds: a backward checks it still holds its own

    def take(self, rows: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
        b = self.buffer
        if b is None or b.shape[0] < rows or b.shape[1] != vocab or b.dtype != like.dtype or b.device != like.device:
            grown = rows if b is None or b.shape[1] != vocab else max(rows, b.shape[0] + b.shape[0] // 4)
            self.buffer = b = torch.empty(grown, vocab, dtype=like.dtype, device=like.device)
        self.uses += 1
        return b[:rows]


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i lse(h_i W^T) - (h_i W^T)[t_i] and its gradients, with the logits in the workspace: the logits are
    written once, read once (log-sum-exp), turned into the softmax in place in the backward, and the gradient's
    scale lands on the two small products instead of the [rows, vocabulary] matrix."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                workspace: _Workspace) -> torch.Tensor:
        logits = workspace.take(hidden.shape[0], weight.shape[0], hidden)
        torch.mm(hidden, weight.t(), out=logits)
        lse = torch.logsumexp(logits, dim=1)
        loss = (lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.workspace, ctx.use = workspace, workspace.uses
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        workspace = ctx.workspace
        if workspace.uses != ctx.use:  # another forward took the buffer since: compute the logits again
            logits = workspace.take(hidden.shape[0], weight.shape[0], hidden)
            torch.mm(hidden, weight.t(), out=logits)
        else:
            logits = workspace.buffer[:hidden.shape[0]]
        probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        probs[rows, targets] -= 1
        grad_hidden = torch.mm(probs, weight).mul_(grad)
        grad_weight = torch.mm(probs.t(), hidden).mul_(grad)
        workspace.uses += 1  # the buffer no longer holds logits
        return grad_hidden, grad_weight, None, None


class NextTokenLoss(torch.nn.Module):
    """`fused_head`: the head and the loss as one function over a reused buffer (`_HeadCrossEntropy`; float32
    without autocast or torch.compile: the CPU default); otherwise the head then torch's cross-entropy."""

    def __init__(self, lm: torch.nn.Module, fused_head: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.fused_head = fused_head and getattr(lm.lm_head, "bias", None) is None
        self._workspace = _Workspace()

    def forward(self, input_ids: torch.Tensor, target_index: torch.Tensor, target_ids: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum over the targets of -log P(target | tokens before it); `target_index` is a flat index into the
        [rows, width] positions whose next token is `target_ids` (training.batches.Batch); `token_type_ids`
        for a layout that has them (cdial)."""
        body = self.lm.transformer
        hidden = body(inputs_embeds=body.wte(input_ids), position_ids=position_ids, token_type_ids=token_type_ids,
                      use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, target_index)
        if self.fused_head and torch.is_grad_enabled() and hidden.dtype == torch.float32:
            return _HeadCrossEntropy.apply(hidden, self.lm.lm_head.weight, target_ids, self._workspace)
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
