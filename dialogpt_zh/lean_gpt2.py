"""A lean GPT-2 forward pass for the reply engine: plain torch ops over a loaded GPT2LMHeadModel's own weights.

Why: at the default model's size (4 layers x 256, batch 10, one token per step) the arithmetic of a decoding
step is tiny, and most of the time of transformers' GPT2 forward goes to per-call machinery (cache objects,
mask creation, output classes, module dispatch). This forward does the same maths with a preallocated KV
cache tensor that the caller manages (repeat the context to N rows once, drop finished rows by index).

It reads the weights from the model's modules at construction (no copy), so build a `LeanGPT2` per call
(cheap) rather than keeping one around a model whose modules may be replaced. Projections that are HF
`Conv1D` run as `x @ W + b` (`torch.addmm`, as Conv1D does); any other module (the `nn.Linear` / dynamic
int8 `Linear` that `engine.quantize_int8` puts in their place) is simply called. `LeanGPT2.wrap` returns None
for models it does not cover (not GPT-2, cross-attention, training mode, unusual attention options), and
the engine then uses the transformers forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer in two preallocated tensors (layers, rows, heads, capacity, head_dim);
    `length` columns are filled, the same for all rows (they decode in lockstep).

    Rows of different contexts (replies of several requests in one batch, `LeanGPT2.prompt_rows`) keep each
    context at columns 0..L-1 and decode from the common column `width` on; `gap` (rows,) = width - L shifts
    each row's positions back, and `valid` (rows, capacity) masks the unused columns L..width-1."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int = 0,
                 gap: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> None:
        self.k, self.v, self.length = k, v, length
        self.gap, self.valid = gap, valid

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def repeat_rows(self, n: int) -> None:
        """A one-row cache becomes n identical rows (the context, encoded once, shared by n candidates)."""
        assert self.rows == 1
        self.k = self.k.expand(-1, n, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, n, -1, -1, -1).contiguous()

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (indices), in that order: finished candidates leave the cache."""
        self.k = self.k.index_select(1, keep)
        self.v = self.v.index_select(1, keep)
        if self.gap is not None:
            self.gap, self.valid = self.gap.index_select(0, keep), self.valid.index_select(0, keep)


def _projection(module):
    """A function of a 2-D input: HF Conv1D as addmm over its own (in, out) weight, anything else called."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight, bias = module.weight, module.bias
        return lambda x: torch.addmm(bias, x, weight)
    return module


class LeanGPT2:
    """Final hidden states (after ln_f) and logits of a GPT2LMHeadModel, with an optional `KVCache`."""

    def __init__(self, model) -> None:
        cfg = model.config
        t = model.transformer
        self.n_layer, self.n_head, self.d = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.head_dim = self.d // self.n_head
        self.eps = cfg.layer_norm_epsilon
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.lm_head = model.get_output_embeddings()
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        act = cfg.activation_function
        self.act = ((lambda x: F.gelu(x, approximate="tanh")) if act in ("gelu_new", "gelu_pytorch_tanh")
                    else t.h[0].mlp.act)
        base_scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        self.layers = []
        for i, block in enumerate(t.h):
            scale = base_scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base_scale
            self.layers.append((
                (block.ln_1.weight, block.ln_1.bias), _projection(block.attn.c_attn),
                _projection(block.attn.c_proj), (block.ln_2.weight, block.ln_2.bias),
                _projection(block.mlp.c_fc), _projection(block.mlp.c_proj), scale))

    @classmethod
    def wrap(cls, model) -> "LeanGPT2 | None":
        """A LeanGPT2 over `model`, or None when this forward does not cover it (use the HF forward then)."""
        cfg = getattr(model, "config", None)
        if (cfg is None or getattr(cfg, "model_type", None) != "gpt2" or model.training
                or not hasattr(model, "transformer") or getattr(cfg, "add_cross_attention", False)
                or getattr(cfg, "reorder_and_upcast_attn", False)
                or getattr(cfg, "activation_function", None) not in ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
                or cfg.n_embd % cfg.n_head):
            return None
        return cls(model)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        shape = (self.n_layer, rows, self.n_head, capacity, self.head_dim)
        return KVCache(self.wte.new_empty(shape), self.wte.new_empty(shape))

    def prompt_rows(self, contexts: list[list[int]], counts: list[int], capacity: int) -> tuple[KVCache, torch.Tensor]:
        """A cache of sum(counts) rows, `counts[i]` rows holding context i, with room for `capacity` more
        columns; and the logits (rows, V) of each row's last context position.

        The contexts are encoded together in one right-padded pass (one batch of matmuls over their real
        tokens, not one small pass per context), then each context's keys/values are repeated to its rows."""
        device = self.wte.device
        lengths = torch.tensor([len(c) for c in contexts])
        width, n_ctx = int(lengths.max()), len(contexts)
        ids = torch.zeros(n_ctx, width, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        # new_empty is safe: this pass writes every column < width (the padding's keys/values as zeros: masked
        # columns still enter the attention matmuls, where garbage NaN/inf bit patterns would give NaN), and
        # decoding writes each later column before attention reads it
        one = self.new_cache(n_ctx, width + capacity)
        hidden = self.hidden(ids.to(device), one, mask=mask.to(device))
        last = self.logits(hidden[torch.arange(n_ctx, device=device), (lengths - 1).to(device)])  # (n_ctx, V)
        owner = torch.repeat_interleave(torch.arange(n_ctx), torch.tensor(counts)).to(device)  # context of each row
        cache = KVCache(one.k.index_select(1, owner), one.v.index_select(1, owner), length=width)
        row_lengths = lengths.to(device).index_select(0, owner)
        columns = torch.arange(width + capacity, device=device)
        cache.gap = width - row_lengths
        cache.valid = (columns[None, :] < row_lengths[:, None]) | (columns[None, :] >= width)
        return cache, last.index_select(0, owner)

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, d) for `ids` (B, T) at positions cache.length .. + T - 1.

        Without a cache, or with an empty one, the batch is causal from position 0; right padding is then
        harmless for the real tokens (they never see later positions), and with `mask` (B, T, 1 = real token,
        right padding only) the matmuls run on the real tokens only (the padding's hidden states are returned
        as zeros, its cached keys/values are zeros).
        With a cache, the new keys/values are written into it at positions cache.length.. and attention runs
        over everything cached so far; cache.length advances.
        """
        b, t = ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {t} > {cache.capacity}")
        d, h, hd = self.d, self.n_head, self.head_dim
        attn_mask = None
        if cache is not None and cache.gap is not None:  # rows of different contexts: own positions, own keys
            if t != 1:
                raise ValueError("a cache of rows with different contexts decodes one token at a time")
            positions = start - cache.gap[:, None]          # (b, 1)
            if int(positions.max()) >= self.wpe.shape[0]:
                raise ValueError(f"sequence longer than the model's {self.wpe.shape[0]} positions")
            x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
            attn_mask = cache.valid[:, None, None, :start + 1]
        else:
            if start + t > self.wpe.shape[0]:
                raise ValueError(f"sequence longer than the model's {self.wpe.shape[0]} positions")
            x = F.embedding(ids, self.wte) + self.wpe[start:start + t]
            if cache is not None and start > 0 and t > 1:   # new tokens see the whole cache + themselves causally
                attn_mask = torch.ones(t, start + t, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        packed = None                                   # flat indices of the real tokens among the b * t
        if (cache is None or start == 0) and mask is not None and not bool(mask.all()):
            packed = mask.reshape(-1).nonzero().squeeze(1)
            x = x.reshape(b * t, d).index_select(0, packed)
        x = x.reshape(-1, d)                            # (tokens, d): the rows every matmul runs on
        for i, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj, scale) in enumerate(self.layers):
            qkv = c_attn(F.layer_norm(x, (d,), ln_1[0], ln_1[1], self.eps))
            if packed is not None:                      # back to (b, t) rows for attention; padding = zeros
                qkv = qkv.new_zeros(b * t, 3 * d).index_copy_(0, packed, qkv)
            qkv = qkv.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)     # (3, B, H, T, hd)
            q, k, v = qkv[0], qkv[1], qkv[2]
            if cache is not None:
                cache.k[i, :, :, start:start + t] = k
                cache.v[i, :, :, start:start + t] = v
                k, v = cache.k[i, :, :, :start + t], cache.v[i, :, :, :start + t]
            if t == 1 or attn_mask is not None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            a = a.transpose(1, 2).reshape(b * t, d)
            if packed is not None:
                a = a.index_select(0, packed)
            x = x + c_proj(a)
            x = x + mlp_proj(self.act(c_fc(F.layer_norm(x, (d,), ln_2[0], ln_2[1], self.eps))))
        if cache is not None:
            cache.length = start + t
        x = F.layer_norm(x, (d,), self.ln_f[0], self.ln_f[1], self.eps)
        if packed is not None:
            x = x.new_zeros(b * t, d).index_copy_(0, packed, x)
        return x.view(b, t, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over (any shape of) final hidden states."""
        return self.lm_head(hidden)
