"""A lean GPT-2 forward pass for the reply engine: plain torch ops over a loaded GPT2LMHeadModel's own weights.

Why: at the default model's size (4 layers x 256, batch 10, one token per step) the arithmetic of a decoding
step is tiny, and most of the time of transformers' GPT2 forward goes to per-call machinery (cache objects,
mask creation, output classes, module dispatch). This forward does the same maths with a preallocated KV
cache tensor that the caller manages (repeat the context to N rows once, drop finished rows by index).

It reads the weights from the model's modules at construction (no copy), so build a `LeanGPT2` per call
(cheap) rather than keeping one around a model whose modules may be replaced. Projections that are HF
`Conv1D` run as `x @ W + b` (`torch.addmm`, as Conv1D does), an `Fp16Linear` (`--quantize fp16`) through its
kernel; any other module (the dynamic int8 `Linear` that `engine.quantize_int8` puts in their place) is
simply called. `LeanGPT2.wrap` returns None
for models it does not cover (not GPT-2, cross-attention, training mode, unusual attention options), and
the engine then uses the transformers forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dialogpt_zh.engine.fp16 import Fp16Linear


class KVCache:
    """Keys and values of every layer in two preallocated tensors (layers, rows, heads, capacity, head_dim);
    `length` columns are filled, the same for all rows (they decode in lockstep).

    Rows of different contexts (replies of several requests in one batch, `DecodingRows`) keep each context
    at columns 0..L-1 and decode from a common column J on (the cache's length when the row joined); `gap`
    (rows,) = J - L shifts each row's positions back, and `valid` (rows, capacity) masks the columns L..J-1."""

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


_GELU_2C = math.sqrt(8 / math.pi)   # 2 * sqrt(2 / pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(c (x + 0.044715 x^3))), as the equal x * sigmoid(2c x (1 + 0.044715
    x^2)): torch's CPU tanh is slow (docs/engine.md, "Lean GPT-2 forward", has the timings); the values agree
    to float rounding (tested)."""
    u = torch.addcmul(x.new_tensor(_GELU_2C), x, x, value=_GELU_2C * 0.044715)   # 2c (1 + 0.044715 x^2)
    return u.mul_(x).sigmoid_().mul_(x)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """Attention of one new token per row (a decoding step) as two batched matmuls: on CPU torch's fused
    kernel (`scaled_dot_product_attention`) was slower at this shape with many rows (docs/engine.md, "Lean
    GPT-2 forward"); same values up to float rounding."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)     # (B, H, 1, L)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


# Length groups of a packed pass (below): a new group starts where the rows get this much shorter than the
# group's widest, if at least MIN_GROUP_ROWS rows are left for it (each group costs a few small ops a layer).
GROUP_WIDTH_RATIO = 0.75
MIN_GROUP_ROWS = 4


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Rows of a right-padded batch (their real lengths) in groups of similar length, longest first, for
    attention over each group's own width instead of the batch's: the padding's attention work is quadratic
    in the width, and the MMI batch's lengths spread (sampled and retrieved replies, several requests)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for n, i in enumerate(order):
        left = len(order) - n
        if (not groups or (lengths[i] <= GROUP_WIDTH_RATIO * lengths[groups[-1][0]] and left >= MIN_GROUP_ROWS
                           and len(groups[-1]) >= MIN_GROUP_ROWS)):
            groups.append([])
        groups[-1].append(i)
    return groups


def _projection(module):
    """A function of a 2-D input: HF Conv1D as addmm over its own (in, out) weight, an `Fp16Linear`'s kernel
    called directly (no module-call overhead: 17 matmuls a step), anything else called."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight, bias = module.weight, module.bias
        return lambda x: torch.addmm(bias, x, weight)
    if isinstance(module, Fp16Linear):
        return module.forward
    return module


class SharedPrefixes:
    """The real tokens of a right-padded batch (ids (B, T), mask 1 = real token, None = all real; token types or
    None) as the nodes of their prefix tree: one node per distinct prefix (ids and types up to and including
    the position), so rows that begin alike share their first nodes.

    tokens, positions, types: per node (types None without token types); node_of (B * T,): each position's
    node, len(tokens) for padding; groups: per length group of rows (`length_groups`), (rows, width, grid,
    cells, nodes): `grid` (rows * width,) the node of each position of the group's right-padded grid (padding:
    the row's first node, any finite values do: a real position never attends to a later one), and each node
    the group computes (the row where it first occurs) at grid position `cells`."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, types: torch.Tensor | None) -> None:
        b, t = ids.shape
        lengths = mask.sum(dim=1).tolist() if mask is not None else [t] * b
        id_rows = ids.tolist()
        type_rows = types.tolist() if types is not None else None
        index: dict[tuple[int, int, int], int] = {}
        tokens, positions, node_types, owner = [], [], [], []
        node_of = [[] for _ in range(b)]
        for r, n in enumerate(lengths):
            parent = -1
            for c in range(n):
                key = (parent, id_rows[r][c], type_rows[r][c] if type_rows is not None else 0)
                node = index.get(key)
                if node is None:
                    node = index[key] = len(tokens)
                    tokens.append(key[1])
                    positions.append(c)
                    node_types.append(key[2])
                    owner.append(r)
                node_of[r].append(node)
                parent = node
        n_nodes = len(tokens)
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.types = torch.tensor(node_types, dtype=torch.long) if types is not None else None
        self.node_of = torch.tensor([row[c] if c < len(row) else n_nodes for row in node_of for c in range(t)],
                                    dtype=torch.long)
        self.groups = []
        for rows in length_groups(lengths):
            rows = [r for r in rows if lengths[r]]      # empty rows: no tokens
            if not rows:
                continue
            width = lengths[rows[0]]
            grid, cells, nodes = [], [], []
            for j, r in enumerate(rows):
                row = node_of[r]
                grid += row + [row[0]] * (width - len(row))
                for c, node in enumerate(row):
                    if owner[node] == r:
                        cells.append(j * width + c)
                        nodes.append(node)
            self.groups.append((len(rows), width, torch.tensor(grid), torch.tensor(cells), torch.tensor(nodes)))


class LeanGPT2:
    """Final hidden states (after ln_f) and logits of a GPT2LMHeadModel, with an optional `KVCache`."""

    def __init__(self, model) -> None:
        cfg = model.config
        t = model.transformer
        self.n_layer, self.n_head, self.d = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.head_dim = self.d // self.n_head
        self.eps = cfg.layer_norm_epsilon
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.lm_head = _projection(model.get_output_embeddings())
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        act = cfg.activation_function
        self.act = gelu_tanh if act in ("gelu_new", "gelu_pytorch_tanh") else t.h[0].mlp.act
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

    def encode_contexts(self, contexts: list[list[int]], token_types: list[list[int]] | None = None
                        ) -> tuple[KVCache, torch.Tensor]:
        """The keys/values of each context in a one-row-per-context cache (columns 0..len-1 of row i, the
        right padding as zeros, no spare column) and the logits (n, V) of each context's last position.
        `token_types`: each context's token type ids (a layout with token types, cdial), else None.

        The contexts are encoded together in one right-padded pass: one batch of matmuls over their real
        tokens, not one small pass per context."""
        device = self.wte.device
        lengths = torch.tensor([len(c) for c in contexts])
        width, n_ctx = int(lengths.max()), len(contexts)
        ids = torch.zeros(n_ctx, width, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        types = None
        if token_types is not None:
            types = torch.zeros(n_ctx, width, dtype=torch.long)
            for i, ty in enumerate(token_types):
                types[i, :len(ty)] = torch.tensor(ty, dtype=torch.long)
            types = types.to(device)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        # new_empty is safe: this pass writes every column (the padding's keys/values as zeros: masked
        # columns still enter the attention matmuls, where garbage NaN/inf bit patterns would give NaN)
        cache = self.new_cache(n_ctx, width)
        hidden = self.hidden(ids.to(device), cache, mask=mask.to(device), types=types)
        return cache, self.logits(hidden[torch.arange(n_ctx, device=device), (lengths - 1).to(device)])

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None,
               mask: torch.Tensor | None = None, select: torch.Tensor | None = None,
               types: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, d) for `ids` (B, T) at positions cache.length .. + T - 1.

        `types` (B, T): token type ids, for a layout that has them (cdial): as in transformers' GPT-2, their
        embeddings (rows of the same `wte`) are added to the token + position embeddings.

        `select` (flat indices into the B * T positions, row-major): return only those positions' hidden
        states, (len(select), d). The last block then runs its attention output, MLP and ln_f on them alone
        (every position still writes its keys/values): the same values up to float rounding (with dynamic
        int8 weights the last block's activation scale then comes from fewer rows, so scores move slightly),
        less work when few positions are needed (MMI scores only the context's positions, not the reply's).

        Without a cache, or with an empty one, the batch is causal from position 0; right padding is then
        harmless for the real tokens (they never see later positions), and with `mask` (B, T, 1 = real token,
        right padding only) the matmuls run on the real tokens only (the padding's hidden states are returned
        as zeros, its cached keys/values are zeros). Without a cache they run once per distinct prefix
        (`_hidden_shared`).
        With a cache, the new keys/values are written into it at positions cache.length.. and attention runs
        over everything cached so far; cache.length advances.
        """
        if cache is None:
            return self._hidden_shared(ids, mask, select, types)
        b, t = ids.shape
        start = cache.length
        if start + t > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {t} > {cache.capacity}")
        d, h, hd = self.d, self.n_head, self.head_dim
        attn_mask = None
        if cache.gap is not None:                        # rows of different contexts: own positions, own keys
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
            if start > 0 and t > 1:                     # new tokens see the whole cache + themselves causally
                attn_mask = torch.ones(t, start + t, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        if types is not None:
            x = x + F.embedding(types, self.wte)
        packed = None                                   # flat indices of the real tokens among the b * t
        if start == 0 and mask is not None and not bool(mask.all()):
            packed = mask.reshape(-1).nonzero().squeeze(1)
            x = x.reshape(b * t, d).index_select(0, packed)
        x = x.reshape(-1, d)                            # (tokens, d): the rows every matmul runs on
        last = len(self.layers) - 1
        for i, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj, scale) in enumerate(self.layers):
            qkv = c_attn(F.layer_norm(x, (d,), ln_1[0], ln_1[1], self.eps))
            if packed is not None:                      # back to (b, t) rows for attention; padding = zeros
                qkv = qkv.new_zeros(b * t, 3 * d).index_copy_(0, packed, qkv)
            qkv = qkv.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)     # (3, B, H, T, hd)
            q, k, v = qkv[0], qkv[1], qkv[2]
            cache.k[i, :, :, start:start + t] = k
            cache.v[i, :, :, start:start + t] = v
            k, v = cache.k[i, :, :, :start + t], cache.v[i, :, :, :start + t]
            if t == 1:
                a = _one_query_attention(q, k, v, attn_mask, scale)
            elif attn_mask is not None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            a = a.transpose(1, 2).reshape(b * t, d)
            if i == last and select is not None:        # from here on, row by row: only the selected rows
                a = a.index_select(0, select)
                x = x.index_select(0, select if packed is None else torch.searchsorted(packed, select))
            elif packed is not None:
                a = a.index_select(0, packed)
            x = x + c_proj(a)
            x = x + mlp_proj(self.act(c_fc(F.layer_norm(x, (d,), ln_2[0], ln_2[1], self.eps))))
        cache.length = start + t
        x = F.layer_norm(x, (d,), self.ln_f[0], self.ln_f[1], self.eps)
        if select is not None:
            return x
        if packed is not None:
            x = x.new_zeros(b * t, d).index_copy_(0, packed, x)
        return x.view(b, t, d)

    def _hidden_shared(self, ids: torch.Tensor, mask: torch.Tensor | None, select: torch.Tensor | None,
                       types: torch.Tensor | None) -> torch.Tensor:
        """`hidden` without a cache: causal from position 0, each distinct prefix run once (`SharedPrefixes`).

        Two rows that begin alike (every row's [CLS], candidates that start with the same characters) have the
        same hidden states, keys and values there (causal: a position sees only its own prefix), so the matmuls
        run once per distinct prefix; the attention runs row by row, in length groups (`length_groups`), over
        the keys and values gathered back from those tokens. With dynamic int8 weights too the results are bit
        for bit those of running every row: the activation scale comes from the input's range, which repeated
        rows leave as it was (any other change of the rows, even one exact in float, moves that scale)."""
        b, t = ids.shape
        d, h, hd = self.d, self.n_head, self.head_dim
        if t > self.wpe.shape[0]:
            raise ValueError(f"sequence longer than the model's {self.wpe.shape[0]} positions")
        tree = SharedPrefixes(ids, mask, types)
        device = ids.device
        x = F.embedding(tree.tokens.to(device), self.wte) + F.embedding(tree.positions.to(device), self.wpe)
        if tree.types is not None:
            x = x + F.embedding(tree.types.to(device), self.wte)
        groups = [tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in g) for g in tree.groups]
        keep = tree.node_of.to(device).index_select(0, select) if select is not None else None
        last = len(self.layers) - 1
        for i, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj, scale) in enumerate(self.layers):
            qkv = c_attn(F.layer_norm(x, (d,), ln_1[0], ln_1[1], self.eps))
            a = qkv.new_empty(len(x), d)
            for rows, width, grid, cells, nodes in groups:
                g = qkv.index_select(0, grid).view(rows, width, 3, h, hd).permute(2, 0, 3, 1, 4)
                ga = F.scaled_dot_product_attention(g[0], g[1], g[2], is_causal=True, scale=scale)
                a.index_copy_(0, nodes, ga.transpose(1, 2).reshape(rows * width, d).index_select(0, cells))
            if i == last and keep is not None:          # from here on, row by row: only the selected positions
                a, x = a.index_select(0, keep), x.index_select(0, keep)
            x = x + c_proj(a)
            x = x + mlp_proj(self.act(c_fc(F.layer_norm(x, (d,), ln_2[0], ln_2[1], self.eps))))
        x = F.layer_norm(x, (d,), self.ln_f[0], self.ln_f[1], self.eps)
        if keep is not None:
            return x
        # every position its prefix's state, the padding zeros (its node index is one past the last)
        x = torch.cat([x, x.new_zeros(1, d)])
        return x.index_select(0, tree.node_of.to(device)).view(b, t, d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over (any shape of) final hidden states."""
        return self.lm_head(hidden)


class DecodingRows:
    """The rows of one KV cache for candidates that join and leave between decoding steps (continuous
    batching): a request's context joins, encoded once and repeated to its rows; a finished row leaves.

    The live rows always fill slots 0..n-1, so every step runs on them alone with plain slices (no dummy
    tokens, no masks over dead rows): a finished row's slot is filled by moving the last live row into it
    (one row's keys/values copied). The caller keeps each live row's slot (a LongTensor, in its own row
    order) and passes it to `step`; `leave` returns the slots after the moves, same order.

    Every row writes its new token at the common column `length`; a row that joined at column J with a
    context of L tokens has its context at columns 0..L-1 (see `KVCache`). When the columns run out (or a
    joining context needs more), the live rows move to new tensors: context first, generated tokens
    right-aligned before the new length, so the columns of rows that left are dropped."""

    def __init__(self, lean: LeanGPT2) -> None:
        self.lean = lean
        self.k = self.v = None              # (layers, slots, heads, columns, head_dim); slots 0..n-1 live
        self.n = self.length = 0
        self.room = 1                       # columns a joining row may need: the largest reply room seen
        self.ctx_len = self.join = torch.zeros(0, dtype=torch.long)   # per slot: context length, join column
        # per slot: the token type id of the row's reply tokens (a layout with token types: cdial's reply
        # speaker, which depends on its own context's turn count), None for a layout without token types
        self.reply_type: torch.Tensor | None = None

    def admit(self, contexts: list[list[int]], counts: list[int], room: int,
              token_types: list[list[int]] | None = None, reply_types: list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context i joins as counts[i] new rows that will decode up to `room` tokens: (the new rows' slots,
        their logits (rows, V) for their first token). The live rows keep their slots. For a layout with
        token types: `token_types` of each context and `reply_types`[i], the type of context i's reply
        tokens (every request of a batch uses token types, or none does)."""
        if (token_types is None) != (reply_types is None) or (
                self.n and (reply_types is None) != (self.reply_type is None)):
            raise ValueError("token types: all the rows of a batch have them, or none")
        self.room = max(self.room, room)
        encoded, last = self.lean.encode_contexts(contexts, token_types)
        width, n_new, device = encoded.capacity, sum(counts), encoded.k.device
        if (self.k is None or self.n + n_new > self.k.shape[1] or self.length < width
                or self.length + room > self.k.shape[3]):
            # a running batch that needs more slots gets twice as many: joins then rarely copy the cache
            grown = 2 * self.k.shape[1] if self.k is not None and self.n + n_new > self.k.shape[1] else 0
            self._reallocate(rows=max(self.n + n_new, grown), min_length=width)
        slots = torch.arange(self.n, self.n + n_new, device=device)
        owner = torch.repeat_interleave(torch.arange(len(contexts)), torch.tensor(counts)).to(device)
        new = slice(self.n, self.n + n_new)
        self.k[:, new, :, :width] = encoded.k.index_select(1, owner)
        self.v[:, new, :, :width] = encoded.v.index_select(1, owner)
        # columns width..length-1 are masked, but masked columns still enter the attention matmuls: zeros, not
        # garbage bit patterns (NaN/inf)
        self.k[:, new, :, width:self.length] = 0.0
        self.v[:, new, :, width:self.length] = 0.0
        self.ctx_len[new] = torch.tensor([len(c) for c in contexts]).index_select(0, owner.cpu())
        self.join[new] = self.length
        if reply_types is not None:
            if self.reply_type is None:
                self.reply_type = torch.zeros(len(self.ctx_len), dtype=torch.long)
            self.reply_type[new] = torch.tensor(reply_types).index_select(0, owner.cpu())
        else:
            self.reply_type = None
        self.n += n_new
        return slots, last.index_select(0, owner)

    def leave(self, live: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Rows leave: `live` (the slots before) without the rows where `finished` (bool, row order) is set;
        returns the remaining rows' slots, 0..n-1 again (the last live rows moved into the freed slots)."""
        keep = live[~finished]
        n = len(keep)
        movers = keep[keep >= n]                            # live rows beyond the new end ...
        if len(movers):
            holes = live[finished]
            holes = holes[holes < n].sort().values            # ... fill the freed slots below it
            movers = movers.sort().values
            cpu_holes, cpu_movers = holes.cpu(), movers.cpu()
            for hole, mover in zip(cpu_holes.tolist(), cpu_movers.tolist()):
                # a plain copy per row: faster than advanced indexing or index_copy_ (docs/engine.md, "Figures
                # behind the code")
                self.k[:, hole, :, :self.length].copy_(self.k[:, mover, :, :self.length])
                self.v[:, hole, :, :self.length].copy_(self.v[:, mover, :, :self.length])
            self.ctx_len[cpu_holes] = self.ctx_len[cpu_movers]
            self.join[cpu_holes] = self.join[cpu_movers]
            if self.reply_type is not None:
                self.reply_type[cpu_holes] = self.reply_type[cpu_movers]
            slot_map = torch.arange(self.k.shape[1], device=live.device)
            slot_map[movers] = holes
            keep = slot_map[keep]
        self.n = n
        return keep

    def step(self, ids: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """One token per live row (ids (n,), the rows' order); logits (n, V) of the next one."""
        n = self.n
        if self.length + 1 > self.k.shape[3]:
            self._reallocate(rows=self.k.shape[1], min_length=0)
        by_slot = torch.empty_like(ids).index_copy_(0, live, ids)
        device = ids.device
        ctx_len, join = self.ctx_len[:n].to(device), self.join[:n].to(device)
        columns = torch.arange(self.length + 1, device=device)[None, :]
        cache = KVCache(self.k[:, :n], self.v[:, :n], length=self.length, gap=join - ctx_len,
                        valid=(columns < ctx_len[:, None]) | (columns >= join[:, None]))
        types = self.reply_type[:n].to(device).view(-1, 1) if self.reply_type is not None else None
        hidden = self.lean.hidden(by_slot.view(-1, 1), cache, types=types)[:, -1, :]
        self.length += 1
        return self.lean.logits(hidden.index_select(0, live))

    def _reallocate(self, rows: int, min_length: int) -> None:
        """New cache tensors with `rows` slots (the live rows stay in 0..n-1): each live row's context at
        columns 0..L-1 and its generated tokens right-aligned before the new length (the longest row, at
        least `min_length`), so the columns a long-running batch no longer needs are dropped; 2 x room spare
        columns."""
        lean, n = self.lean, self.n
        ctx, join = self.ctx_len[:n], self.join[:n]
        gen = self.length - join
        width = max(int((ctx + gen).max()) if n else 0, min_length)
        new_join = width - gen
        shape = (lean.n_layer, max(rows, n), lean.n_head, width + 2 * self.room, lean.head_dim)
        # new_empty is safe: the live rows' columns < width are all copied (masked ones finite), `admit`
        # writes a joining row's, and every later column is written before it is read
        k, v = lean.wte.new_empty(shape), lean.wte.new_empty(shape)
        if n and width:
            cols = torch.arange(width)[None, :]
            # new column -> old column: the context in place, the generated tokens shifted by new_join - join
            # (the masked columns between them copy anything finite)
            src = torch.where(cols < ctx[:, None], cols, join[:, None] + cols - new_join[:, None])
            index = src.clamp_(0, self.length - 1).to(k.device)[None, :, None, :, None]
            index = index.expand(lean.n_layer, n, lean.n_head, width, lean.head_dim)
            k[:, :n, :, :width] = self.k[:, :n].gather(3, index)
            v[:, :n, :, :width] = self.v[:, :n].gather(3, index)
        self.join[:n] = new_join
        grow = shape[1] - len(self.ctx_len)
        if grow > 0:
            self.ctx_len = torch.cat([self.ctx_len, torch.zeros(grow, dtype=torch.long)])
            self.join = torch.cat([self.join, torch.zeros(grow, dtype=torch.long)])
            if self.reply_type is not None:
                self.reply_type = torch.cat([self.reply_type, torch.zeros(grow, dtype=torch.long)])
        self.k, self.v, self.length = k, v, width
