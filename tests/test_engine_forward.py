"""The engine's forward passes: fp16 and int8 weights, the sampling filters, and the lean GPT-2 forward (same
logits and the same seeded replies as the transformers forward). The reply engine itself: test_engine.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dialogpt_zh.engine.bot import ChatBot
from dialogpt_zh.engine.decoding import cache_argument
from dialogpt_zh.engine.lean_gpt2 import LeanGPT2
from dialogpt_zh.engine.sampling import (
    apply_repetition_penalty,
    banned_ngram_tokens,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)
from dialogpt_zh.errors import UserError
from tests.test_engine import HISTORY, REPLIES, bot, float_bot  # noqa: F401  (shared fixtures)




# ---------------------------------------------------------------------------------------- int8

def test_int8_quantization_really_quantizes(random_bot_dir, float_bot):
    from transformers.pytorch_utils import Conv1D

    q = ChatBot.from_pretrained(random_bot_dir, quantize="int8")
    assert not any(isinstance(m, Conv1D) for m in q.forward_model.modules())
    n_quant = sum(type(m).__name__ == "Linear" and "quantized.dynamic" in type(m).__module__
                  for m in q.forward_model.modules())
    assert n_quant == 4 * q.forward_model.config.n_layer + 1  # c_attn, c_proj, c_fc, mlp c_proj + lm_head
    f_float = float_bot.forward_logprobs(HISTORY, REPLIES)
    f_int8 = q.forward_logprobs(HISTORY, REPLIES)
    for (a, n), (b, m) in zip(f_float, f_int8):
        assert n == m and math.isfinite(b) and abs(a - b) / n < 0.5
    assert q.reply(HISTORY, num_candidates=3, seed=0).text is not None


def test_int8_forward_quantizes_the_sampler_and_keeps_mmi_exact(random_bot_dir, float_bot):
    """--quantize int8-forward: the forward model's matmuls in int8, the backward model untouched, so the
    MMI scores of any given candidates are exactly the float bot's."""
    q = ChatBot.from_pretrained(random_bot_dir, quantize="int8-forward")
    quantized = [sum("quantized.dynamic" in type(m).__module__ for m in model.modules())
                 for model in (q.forward_model, q.backward_model)]
    assert quantized == [4 * q.forward_model.config.n_layer + 1, 0]
    assert q.backward_logprobs(HISTORY, REPLIES) == float_bot.backward_logprobs(HISTORY, REPLIES)
    assert q.forward_logprobs(HISTORY, REPLIES) != float_bot.forward_logprobs(HISTORY, REPLIES)
    assert any("forward model only" in n for n in q.notices)
    r = q.reply(HISTORY, num_candidates=4, seed=0)
    assert r.mmi and all(c.backward_logprob is not None for c in r.candidates)


def test_fp16_weights_round_every_weight_and_score_as_float_does(random_bot_dir, bot, float_bot):
    """--quantize fp16 (the faces' default): every weight rounded to float16 precision, the matmuls in
    fbgemm's fp16-weight kernels on CPU, arithmetic in float32: scores within rounding of float32's."""
    q = ChatBot.from_pretrained(random_bot_dir, quantize="fp16")
    assert q.quantize == "fp16" and float_bot.quantize == "none" and bot.quantize == "fp16" and not q.notices[1:]
    from transformers.pytorch_utils import Conv1D

    from dialogpt_zh.engine.fp16 import Fp16Linear, fbgemm_fp16_available

    assert fbgemm_fp16_available()  # x86 CPU builds of torch have fbgemm: the fast path is the one tested
    for model in (q.forward_model, q.backward_model):
        assert sum(isinstance(m, Fp16Linear) for m in model.modules()) == 4 * model.config.n_layer + 1
        assert not any(isinstance(m, (Conv1D, torch.nn.Linear)) for m in model.modules())
        for name, p in model.named_parameters():  # what stays a plain tensor (embeddings, norms) is rounded too
            assert torch.equal(p, p.half().float()), name
    # an Fp16Linear computes x W^T + b with W at float16 precision, through either kernel (few rows: the
    # direct one; many rows on 2 threads: the supported op), and the two kernels agree bit for bit
    w, b = torch.randn(7, 5), torch.randn(7)
    layer = Fp16Linear(w, b)
    assert layer.packed is not None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for rows in (3, 40):
            x = torch.randn(rows, 5)
            assert torch.allclose(layer(x), x @ w.half().float().t() + b, atol=1e-5)
        x = torch.randn(40, 5)
        assert torch.equal(layer(x), torch.fbgemm_linear_fp16_weight(x, layer.packed, layer.bias))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(layer)
    for ours, theirs in ((q.forward_logprobs, float_bot.forward_logprobs),
                         (q.backward_logprobs, float_bot.backward_logprobs)):
        for (a, n), (b, m) in zip(ours(HISTORY, REPLIES), theirs(HISTORY, REPLIES)):
            assert n == m and abs(a - b) < 1e-3 * abs(b) + 1e-4
    # the lean forward and transformers' forward run the same fp16 modules: the same replies
    lean = q.reply(HISTORY, num_candidates=4, seed=3)
    q.use_lean_forward = False
    hf = q.reply(HISTORY, num_candidates=4, seed=3)
    assert [c.token_ids for c in lean.candidates] == [c.token_ids for c in hf.candidates]
    for a, b in zip(lean.candidates, hf.candidates):
        assert abs(a.score - b.score) < 1e-4 * abs(b.score) + 1e-4
    with pytest.raises(UserError, match="unknown quantization"):
        ChatBot.from_pretrained(random_bot_dir, quantize="fp8")
    assert ChatBot.from_pretrained(random_bot_dir, quantize=None).backward_logprobs(HISTORY, REPLIES) == \
        float_bot.backward_logprobs(HISTORY, REPLIES)
    # the default (as every face loads a bot) is these fp16 weights
    assert [b for b, _ in bot.backward_logprobs(HISTORY, REPLIES)] == \
        pytest.approx([b for b, _ in q.backward_logprobs(HISTORY, REPLIES)], abs=1e-5)


# ---------------------------------------------------------------------------------------- filters

def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    p = torch.softmax(logits, -1)[0].tolist()  # ~[.09, .64, .24, .03]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[True, False, True, True]]
    assert torch.isinf(top_p_filter(logits, p[1] + 0.01)).tolist() == [[True, False, False, True]]
    assert not torch.isinf(top_p_filter(logits, 1.0)).any()
    assert sorted(banned_ngram_tokens([1, 2, 3, 1, 2], 3)) == [3]
    assert banned_ngram_tokens([1, 2, 3], 3) == []
    assert sorted(banned_ngram_tokens([5, 5, 6], 1)) == [5, 6]


def test_repetition_penalty_and_sampling():
    logits = torch.tensor([[2.0, -1.0, 0.5], [1.0, 1.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1], [2, 2]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5], [1.0, 1.0, 0.5]]
    assert logits.tolist()[0] == [2.0, -1.0, 0.5]  # input untouched
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_tokens(torch.tensor([[0.0, 0.0, -50.0, 3.0]]), 1.0, 2, 1.0, g) for _ in range(400)])
    counts = torch.bincount(draws.flatten(), minlength=4).tolist()
    assert counts[2] == 0 and (counts[0] == 0 or counts[1] == 0)  # top-2: index 3 and one of the tied zeros
    assert counts[3] > 300
    draws = torch.stack([sample_tokens(torch.log(torch.tensor([[0.2, 0.8]])), 1.0, 0, 1.0, g) for _ in range(2000)])
    assert 0.75 < draws.float().mean().item() < 0.85  # the exponential race samples the right distribution


# ---------------------------------------------------------------------------------------- lean forward

def cached(model, cache) -> dict:
    """The KV cache keyword this transformers' forward takes (`cache` on newer 5.x: no past_key_values warning)."""
    return {cache_argument(type(model).forward): cache}


def hf_cached_logits(model, ctx, steps):
    """Logits of the transformers forward: ctx (1, L), then the cache repeated to rows and one (rows, 1)
    token per step, keeping the rows `keep` (indices) before each step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = [model(input_ids=ctx, **cached(model, cache), use_cache=True).logits]
    cache.batch_repeat_interleave(steps[0][0].shape[0])
    for ids, keep in steps:
        if keep is not None:
            cache.batch_select_indices(keep)
        out.append(model(input_ids=ids, **cached(model, cache), use_cache=True).logits)
    return out


def lean_cached_logits(lean, ctx, steps, capacity):
    cache = lean.new_cache(1, ctx.shape[1] + capacity)
    out = [lean.logits(lean.hidden(ctx, cache))]
    cache.repeat_rows(steps[0][0].shape[0])
    for ids, keep in steps:
        if keep is not None:
            cache.k, cache.v = cache.k.index_select(1, keep), cache.v.index_select(1, keep)
        out.append(lean.logits(lean.hidden(ids, cache)))
    return out


def test_length_groups():
    from dialogpt_zh.engine.lean_gpt2 import length_groups

    assert length_groups([5, 5, 4]) == [[0, 1, 2]]                                  # one width: one group
    assert length_groups([30, 8, 29, 7, 28, 9, 27, 6, 30, 8]) == [[0, 8, 2, 4, 6], [5, 1, 9, 3, 7]]
    assert length_groups([30, 30, 30, 30, 8, 8, 8]) == [[0, 1, 2, 3, 4, 5, 6]]      # too few short rows to split
    assert length_groups([]) == []


@torch.inference_mode()
def test_packed_pass_in_length_groups_equals_each_row_alone(trained_bot_dir):
    """A right-padded batch of very different lengths (as the hybrid's MMI batch): attention runs per length
    group; every real position's hidden state, and `select`ed ones, equal the row run alone, unpadded."""
    from dialogpt_zh.engine.lean_gpt2 import length_groups

    bot = ChatBot.from_pretrained(trained_bot_dir)
    lean = LeanGPT2.wrap(bot.backward_model)
    gen = torch.Generator().manual_seed(1)
    lengths = [23, 6, 21, 5, 22, 7, 20, 4, 19, 3]
    assert len(length_groups(lengths)) == 2
    ids = torch.full((len(lengths), max(lengths)), bot.pad_id)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(5, bot.backward_model.config.vocab_size, (n,), generator=gen)
        mask[r, :n] = 1
    alone = [lean.hidden(ids[r:r + 1, :n])[0] for r, n in enumerate(lengths)]
    got = lean.hidden(ids, mask=mask)
    for r, n in enumerate(lengths):
        torch.testing.assert_close(got[r, :n], alone[r], atol=1e-5, rtol=1e-5)
        assert not got[r, n:].any()                                   # padding: zeros
    pick = torch.tensor([1 * ids.shape[1] + 5, 0, 9 * ids.shape[1] + 2, 4 * ids.shape[1] + 21])
    torch.testing.assert_close(lean.hidden(ids, mask=mask, select=pick), got.reshape(-1, got.shape[-1])[pick],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@torch.inference_mode()
def test_shared_prefixes_run_once_and_equal_each_row_alone(trained_bot_dir, quantize):
    """A pass without a cache runs each distinct prefix once (rows that begin alike: every backward sequence's
    [CLS], candidates starting with the same characters, a row that is another's prefix, a repeated row), and
    every real position still gets the hidden state of its row run alone, unpadded; `select` too. Token types
    are part of a prefix. With int8 weights a repeated row changes nothing at all, bit for bit: the dynamic
    quantization's scale comes from the input's range, which a repeated prefix leaves as it was."""
    from dialogpt_zh.engine.lean_gpt2 import SharedPrefixes

    bot = ChatBot.from_pretrained(trained_bot_dir, quantize=quantize)
    model = bot.backward_model
    lean = LeanGPT2.wrap(model)
    rows = [[101, 8, 9, 10, 11, 12, 13], [101, 8, 9, 20, 21], [101, 8, 9, 10, 11, 12, 13], [101, 8, 9],
            [101, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41], [101, 8, 9, 10, 50]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), bot.pad_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    distinct = {tuple(row[:c + 1]) for row in rows for c in range(len(row))}
    assert len(SharedPrefixes(ids, mask, None).tokens) == len(distinct) == 22
    got = lean.hidden(ids, mask=mask)
    pick = torch.tensor([5 * width + 4, 0, 1 * width + 3, 2 * width + 6, 4 * width + 12])
    if quantize == "int8":          # without the repeated row 2: bit for bit the same states for the others
        keep = [0, 1, 3, 4, 5]
        assert torch.equal(lean.hidden(ids[keep], mask=mask[keep]), got[keep])
        pick_kept = torch.tensor([4 * width + 4, 0, 1 * width + 3, 0 * width + 6, 3 * width + 12])
        assert torch.equal(lean.hidden(ids[keep], mask=mask[keep], select=pick_kept),
                           lean.hidden(ids, mask=mask, select=pick))
        return
    torch.testing.assert_close(lean.hidden(ids, mask=mask, select=pick), got.reshape(-1, got.shape[-1])[pick],
                               atol=1e-5, rtol=1e-5)
    for r, row in enumerate(rows):
        want = model.base_model(input_ids=torch.tensor([row])).last_hidden_state[0]
        torch.testing.assert_close(got[r, :len(row)], want, atol=1e-5, rtol=1e-5)
        assert not got[r, len(row):].any()                                   # padding: zeros
    types = torch.zeros_like(ids)
    types[2, 3:] = 7                                    # row 2 = row 0 but for its types from position 3 on
    assert len(SharedPrefixes(ids, mask, types).tokens) == 22 + 4
    got = lean.hidden(ids, mask=mask, types=types)
    for r in (0, 2):
        n = len(rows[r])
        want = model.base_model(input_ids=ids[r:r + 1, :n], token_type_ids=types[r:r + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(got[r, :n], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["random", "trained"])
@torch.inference_mode()
def test_lean_forward_matches_transformers(which, random_bot_dir, trained_bot_dir):
    """Same logits as the HF GPT-2 forward: the prompt, cached decode steps with rows dropped on the way,
    a multi-token continuation of a cache (forward_logprobs) and a right-padded batch (MMI scoring)."""
    bot = ChatBot.from_pretrained(random_bot_dir if which == "random" else trained_bot_dir)
    gen = torch.Generator().manual_seed(0)
    for model in (bot.forward_model, bot.backward_model):
        lean = LeanGPT2.wrap(model)
        assert lean is not None
        vocab = model.config.vocab_size
        ctx = torch.randint(5, vocab, (1, 17), generator=gen)
        steps, rows = [], 6
        for keep in (None, None, [0, 2, 3, 4, 5], None, [1, 3], [0]):
            rows = len(keep) if keep is not None else rows
            steps.append((torch.randint(5, vocab, (rows, 1), generator=gen),
                          torch.tensor(keep) if keep is not None else None))
        want = hf_cached_logits(model, ctx, steps)
        got = lean_cached_logits(lean, ctx, steps, capacity=len(steps))
        assert len(got) == len(want) == 7
        for w, g in zip(want, got):
            assert w.shape == g.shape
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        # the logits really depend on position and context (a wrong cache or position would show)
        assert (want[1][0] - want[0][0, -1]).abs().max() > 1e-3
        # several new tokens after a cache (as forward_logprobs feeds the replies)
        from transformers import DynamicCache

        cont = torch.randint(5, vocab, (3, 4), generator=gen)
        cache = DynamicCache(config=model.config)
        model(input_ids=ctx, **cached(model, cache), use_cache=True)
        cache.batch_repeat_interleave(3)
        want = model(input_ids=cont, **cached(model, cache), use_cache=True).logits
        lcache = lean.new_cache(1, ctx.shape[1] + 4)
        lean.hidden(ctx, lcache)
        lcache.repeat_rows(3)
        torch.testing.assert_close(lean.logits(lean.hidden(cont, lcache)), want, atol=1e-5, rtol=1e-5)
        # a right-padded batch without cache: the real positions equal the HF forward with its mask
        ids = torch.randint(5, vocab, (3, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
        ids[mask == 0] = bot.pad_id
        want = model(input_ids=ids, attention_mask=mask).logits
        for got in (lean.logits(lean.hidden(ids)), lean.logits(lean.hidden(ids, mask=mask))):  # padded, packed
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
        # only some positions (`select`, as MMI scoring asks): the same values, in the order asked
        flat = mask.reshape(-1).nonzero().squeeze(1)
        pick = flat[torch.randperm(len(flat), generator=gen)[:7]]
        for m in (None, mask):  # padded, packed
            got = lean.logits(lean.hidden(ids, mask=m, select=pick))
            assert got.shape == (7, vocab)
            torch.testing.assert_close(got, want.reshape(-1, vocab)[pick], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_lean_forward_reads_token_types_as_transformers_does(random_bot_dir):
    """Token type ids (cdial's speakers) are embedded with wte and added, as in transformers' GPT-2: a right-padded
    packed pass with `select` (MMI), contexts encoded together, and `DecodingRows` steps where rows of two
    contexts decode with different reply types (and rows leave, moving slots) give the logits of a plain
    transformers forward over each full sequence."""
    from dialogpt_zh.engine.lean_gpt2 import DecodingRows

    model = ChatBot.from_pretrained(random_bot_dir, quantize="none").forward_model
    lean, vocab = LeanGPT2.wrap(model), model.config.vocab_size
    gen = torch.Generator().manual_seed(3)

    def hf(ids, types):
        return model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0]

    ids = torch.randint(5, vocab, (3, 9), generator=gen)
    types = torch.randint(5, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    want = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    assert (want - model(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-2   # types matter
    pick = mask.reshape(-1).nonzero().squeeze(1)[torch.tensor([0, 4, 10, 16])]
    for m in (None, mask):  # padded, packed
        torch.testing.assert_close(lean.logits(lean.hidden(ids, mask=m, types=types))[mask.bool()],
                                   want[mask.bool()], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lean.logits(lean.hidden(ids, mask=m, select=pick, types=types)),
                                   want.reshape(-1, vocab)[pick], atol=1e-5, rtol=1e-5)
    # two contexts (lengths 7 and 4), 3 and 2 rows, reply types 11 and 12; one step, a row leaves, three steps
    ctx = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (7, 4)]
    ctx_types = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (7, 4)]
    reply_types, owner = [11, 12], [0, 0, 0, 1, 1]
    rows = DecodingRows(lean)
    live, logits = rows.admit(ctx, [3, 2], room=4, token_types=ctx_types, reply_types=reply_types)
    seqs = [list(ctx[o]) for o in owner]
    seq_types = [list(ctx_types[o]) for o in owner]
    alive = list(range(5))
    for step in range(4):
        for j, r in enumerate(alive):
            torch.testing.assert_close(logits[j], hf(seqs[r], seq_types[r])[-1], atol=1e-5, rtol=1e-5)
        if step == 1:   # the first row leaves: the last row moves into its slot
            finished = torch.tensor([j == 0 for j in range(len(alive))])
            live, alive = rows.leave(live, finished), alive[1:]
        new = torch.randint(5, vocab, (len(alive),), generator=gen)
        for j, r in enumerate(alive):
            seqs[r].append(int(new[j]))
            seq_types[r].append(reply_types[owner[r]])
        logits = rows.step(new, live)


def test_gelu_tanh_is_gpt2s_gelu():
    from dialogpt_zh.engine.lean_gpt2 import gelu_tanh

    x = torch.cat([torch.linspace(-12, 12, 4001), torch.randn(1000) * 3, torch.tensor([0.0, -0.0, 50.0, -50.0])])
    torch.testing.assert_close(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=2e-6, rtol=1e-5)
    assert gelu_tanh(x.view(5, -1)).shape == (5, x.numel() // 5)


def test_lean_and_transformers_paths_give_the_same_replies(trained_bot_dir):
    """A seeded reply (rows finishing at different steps, MMI on) and rerank/forward scores are the same
    through the lean forward and the transformers forward."""
    lean_bot = ChatBot.from_pretrained(trained_bot_dir)
    hf_bot = copy.copy(lean_bot)
    hf_bot.use_lean_forward = False
    assert isinstance(lean_bot._decoder(lean_bot.forward_model).lean, LeanGPT2)
    assert not hasattr(hf_bot._decoder(hf_bot.forward_model), "lean")
    for seed in range(3):
        a = lean_bot.reply(HISTORY, num_candidates=8, seed=seed, min_length=0)
        b = hf_bot.reply(HISTORY, num_candidates=8, seed=seed, min_length=0)
        assert [(c.text, c.token_ids, c.count, c.rank) for c in a.candidates] == \
            [(c.text, c.token_ids, c.count, c.rank) for c in b.candidates]
        for x, y in zip(a.candidates, b.candidates):
            assert x.forward_logprob == pytest.approx(y.forward_logprob, abs=1e-4)
            assert x.backward_logprob == pytest.approx(y.backward_logprob, abs=1e-4)
    for x, y in zip(lean_bot.rerank(HISTORY, REPLIES), hf_bot.rerank(HISTORY, REPLIES)):
        assert (x.text, x.rank) == (y.text, y.rank)
        assert x.forward_logprob == pytest.approx(y.forward_logprob, abs=1e-4)
        assert x.backward_logprob == pytest.approx(y.backward_logprob, abs=1e-4)


def test_lean_forward_runs_int8_models(random_bot_dir):
    """int8 models (Conv1D turned into dynamic-int8 Linear) also go through the lean forward, same logits."""
    q = ChatBot.from_pretrained(random_bot_dir, quantize="int8")
    lean = LeanGPT2.wrap(q.forward_model)
    assert lean is not None
    ids = torch.randint(5, q.forward_model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(lean.logits(lean.hidden(ids)), q.forward_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_lean_forward_falls_back_for_other_models(random_bot_dir):
    bot = ChatBot.from_pretrained(random_bot_dir, quantize="none")  # copyable
    model = copy.deepcopy(bot.forward_model)
    model.train()
    assert LeanGPT2.wrap(model) is None             # dropout on: not covered
    model.eval()
    model.config.model_type = "llama"
    assert LeanGPT2.wrap(model) is None
