"""The reply engine against its reference (dialogpt_zh/engine/reference.py): context-only MMI, scores and
ranks, seeded samples, KV-cached and batched generation, history bounds, seeded determinism, duplicates,
special tokens, the MMI-off path, settings and their overrides, errors. Quantized weights and the lean
forward: test_engine_forward.py."""
from __future__ import annotations

import copy

import pytest
import torch

import dialogpt_zh.engine.decoding as decoding_module
from dialogpt_zh.engine import reference
from dialogpt_zh.engine.bot import ChatBot
from dialogpt_zh.engine.lean_gpt2 import DecodingRows
from dialogpt_zh.errors import UserError
from dialogpt_zh.sequence import build_sequence
from dialogpt_zh.settings import GenerationSettings, MMISettings
from dialogpt_zh.tokenizer import encode

HISTORY = ["你好", "你好呀，在干嘛", "在看电影呢"]
REPLIES = ["好看吗", "我也想看", "嗯", "今天天气真好，我们去公园吧"]


# the engine tests' bots, shared with tests/test_engine_forward.py (which imports them from here)
@pytest.fixture(scope="module")
def bot(random_bot_dir) -> ChatBot:
    """Loaded as every face loads it: fp16 weights (the one default)."""
    return ChatBot.from_pretrained(random_bot_dir)


@pytest.fixture(scope="module")
def float_bot(random_bot_dir) -> ChatBot:
    """The float32 weights as saved: what the quantized bots are compared with, and copyable (deepcopy)."""
    return ChatBot.from_pretrained(random_bot_dir, quantize="none")


def context_of(bot, history, gen: GenerationSettings | None = None) -> list[list[int]]:
    """The context turns' token ids as the engine feeds them to the models."""
    gen = gen or bot.generation
    return bot.prepare_context(history, gen, gen.max_length, [])[0]


def assert_scores_equal_reference(bot, history, candidates, mmi: MMISettings, gen=None, abs_tol=1e-3) -> int:
    """Each engine `Candidate`'s scores equal the reference's for its token ids; returns how many compared."""
    want = reference.score_replies(bot.forward_model, bot.backward_model, bot.tokenizer, context_of(bot, history, gen),
                                   [c.token_ids for c in candidates], mmi)
    for c, w in zip(candidates, want):
        assert (c.num_tokens, c.num_context_tokens) == (w["num_tokens"], w["num_context_tokens"])
        assert c.forward_logprob == pytest.approx(w["forward_logprob"], abs=abs_tol)
        if w["backward_logprob"] is None:
            assert c.backward_logprob is None
        else:
            assert c.backward_logprob == pytest.approx(w["backward_logprob"], abs=abs_tol)
        assert c.score == pytest.approx(w["score"], abs=abs_tol)
    return len(want)


def ids_of(bot, texts):
    """Token ids as the engine sees them (normalised like the training data, then encoded)."""
    from dialogpt_zh.data.cleaning import normalize_text

    return [encode(bot.tokenizer, normalize_text(t)) for t in texts]


# ------------------------------------------------------------------------------------------ MMI mask

def test_backward_score_is_context_tokens_only(bot):
    context = ids_of(bot, HISTORY)
    n_ctx = sum(len(u) + 1 for u in context)
    got = bot.backward_logprobs(HISTORY, REPLIES, backward_context_turns=0)  # every turn
    for reply_ids, (score, n) in zip(ids_of(bot, REPLIES), got):
        seq = build_sequence(context + [reply_ids], "backward", bot.cls_id, bot.sep_id)
        assert seq[:len(reply_ids) + 2] == [bot.cls_id, *reply_ids, bot.sep_id]
        start = len(reply_ids) + 2                       # first token of u_k, after "[CLS] reply [SEP]"
        assert n == n_ctx == len(seq) - start
        assert score == pytest.approx(reference.logprob_sum(bot.backward_model, seq, start), abs=1e-4)
        # GPT2-chitchat's quantity (all tokens after [CLS], reply included) is a different number
        whole = reference.logprob_sum(bot.backward_model, seq, 1)
        assert abs(whole - score) > 1e-2


def test_backward_score_ignores_how_well_the_reply_predicts_itself(float_bot):
    """Make the backward model certain of the reply's own tokens (哈 after 哈...): whole-sequence scoring
    (GPT2-chitchat) rewards that, our context-only score does not move. The hook lives on the transformers
    forward, so this runs the engine's transformers path (the lean forward gives the same hidden states:
    test_lean_forward_matches_transformers)."""
    bot = copy.copy(float_bot)
    bot.use_lean_forward = False
    model = bot.backward_model
    reply = "哈哈哈哈"
    reply_ids = ids_of(bot, [reply])[0]
    seq = build_sequence(ids_of(bot, HISTORY) + [reply_ids], "backward", bot.cls_id, bot.sep_id)
    start = len(reply_ids) + 2
    before = bot.backward_logprobs(HISTORY, [reply], backward_context_turns=0)[0][0]
    whole_before = reference.logprob_sum(model, seq, 1)
    ha = model.get_output_embeddings().weight[reply_ids[0]].detach()

    def make_reply_certain(module, inputs, output):
        # final hidden states at positions 0..start-2 predict the reply tokens (and the reply's [SEP])
        output.last_hidden_state[:, :start - 2] = 5000 * ha
    handle = model.base_model.register_forward_hook(make_reply_certain)
    try:
        after = bot.backward_logprobs(HISTORY, [reply], backward_context_turns=0)[0][0]
        whole_after = reference.logprob_sum(model, seq, 1)
    finally:
        handle.remove()
    assert whole_after > whole_before + 5        # whole-sequence scoring is fooled by self-prediction
    assert after == pytest.approx(before, abs=1e-4)


# ------------------------------------------------------------------------------------ batching equivalence

def test_batched_scores_equal_one_by_one(bot):
    fwd = bot.forward_logprobs(HISTORY, REPLIES)
    bwd = bot.backward_logprobs(HISTORY, REPLIES)
    for i, r in enumerate(REPLIES):
        (f1, nf1), = bot.forward_logprobs(HISTORY, [r])
        (b1, nb1), = bot.backward_logprobs(HISTORY, [r])
        assert fwd[i][0] == pytest.approx(f1, abs=1e-4) and fwd[i][1] == nf1
        assert bwd[i][0] == pytest.approx(b1, abs=1e-4) and bwd[i][1] == nb1


@pytest.mark.parametrize("mmi", [MMISettings(), MMISettings(backward_context_turns=0, forward_weight=0.7,
                                                             length_weight=0.05, normalize="sum"),
                                 MMISettings(use_mmi=False)])
def test_scores_and_ranks_equal_the_reference(bot, mmi):
    """rerank (batched forward and backward scores, the ranking score, the order) equals the reference's
    one-at-a-time full forward passes; forward_logprobs returns the same forward numbers."""
    ranked = bot.rerank(HISTORY, REPLIES, mmi=mmi)
    by_text = {c.text: c for c in ranked}
    assert assert_scores_equal_reference(bot, HISTORY, [by_text[t] for t in REPLIES], mmi, abs_tol=1e-4) == 4
    want = reference.score_replies(bot.forward_model, bot.backward_model, bot.tokenizer, context_of(bot, HISTORY),
                                   ids_of(bot, REPLIES), mmi)
    assert [c.text for c in ranked] == [t for _, t in sorted(zip(want, REPLIES), key=lambda p: -p[0]["score"])]
    assert [c.rank for c in ranked] == list(range(1, len(REPLIES) + 1))
    fwd = bot.forward_logprobs(HISTORY, REPLIES)
    assert [n for _, n in fwd] == [w["num_tokens"] for w in want]
    assert [f for f, _ in fwd] == pytest.approx([w["forward_logprob"] for w in want], abs=1e-4)


def check_cached_generation(bot, seed: int) -> set[int]:
    r = bot.reply(HISTORY, num_candidates=8, seed=seed, max_length=12, min_length=0)
    assert assert_scores_equal_reference(bot, HISTORY, r.candidates, bot.mmi_settings) >= 2
    return {c.num_tokens for c in r.candidates}


def test_kv_cached_generation_matches_full_recomputation(bot):
    """Candidates' scores (forward log-probs collected during cached batched decoding, MMI in one batch)
    equal the reference's full uncached run of each candidate on its own (so the shared, repeated context
    cache is correct)."""
    check_cached_generation(bot, seed=3)


SAMPLING = [dict(), dict(temperature=1.3, top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0),
            dict(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.5, no_repeat_ngram_size=2, min_length=3),
            dict(temperature=0.0, max_length=6)]


@pytest.mark.parametrize("settings", SAMPLING)
def test_seeded_samples_equal_the_reference(trained_bot_dir, settings):
    """With one candidate the engine's seeded sample is the reference's: the same filters, the same draws
    from the same generator. (With N > 1 the batched sampler draws step by step across the candidates and
    the reference candidate by candidate, so the samples differ; their scores are compared instead, in
    test_kv_cached_generation_matches_full_recomputation and test_row_dropping_with_a_trained_bot.)"""
    bot = ChatBot.from_pretrained(trained_bot_dir, quantize="none")
    gen = GenerationSettings(num_candidates=1, **settings)
    lengths = set()
    for seed in range(4):
        (got,) = bot.reply(HISTORY, generation=gen, seed=seed).candidates
        want = reference.sample_reply(bot.forward_model, bot.tokenizer, context_of(bot, HISTORY, gen), gen,
                                      torch.Generator().manual_seed(seed))
        assert got.token_ids == want
        lengths.add(len(want))
        assert assert_scores_equal_reference(bot, HISTORY, [got], bot.mmi_settings, gen) == 1
    assert gen.temperature == 0 or len(lengths) > 1  # the draws really differ between seeds


@pytest.mark.parametrize("forward,compact_share", [("lean", None), ("transformers", 0.0),
                                                   ("transformers", 0.5), ("transformers", 1.0)])
def test_row_dropping_with_a_trained_bot(trained_bot_dir, forward, compact_share, monkeypatch):
    """A trained model ends replies at different lengths, so rows leave the batch mid-way: with the lean
    forward the last live row moves into a finished row's slot at once; with transformers' cache rows leave
    it at once (share 0), once half the cache rows are finished (0.5, the default), or never (1.0: they
    decode a dummy token to the end). The scores must still equal the reference's."""
    bot = ChatBot.from_pretrained(trained_bot_dir)
    if forward == "transformers":
        monkeypatch.setattr(decoding_module, "COMPACT_DEAD_SHARE", compact_share)
        bot.use_lean_forward = False
    else:  # rows really moved: a finished row's slot taken by a later one
        moves = []
        real = DecodingRows.leave
        monkeypatch.setattr(DecodingRows, "leave", lambda self, live, finished: moves.append(
            bool((live[~finished] >= int((~finished).sum())).any())) or real(self, live, finished))
    lengths = set()
    for seed in range(3):
        lengths |= check_cached_generation(bot, seed)
    assert len(lengths) > 1 and min(lengths) < 13  # rows did finish early, at different steps
    if forward == "lean":
        assert any(moves)


JOINERS = [["你好"], ["你好呀，在干嘛", "在看电影呢"], ["今天好冷啊，我都不想出门了，你那边冷不冷？要不要一起去吃火锅"],
           ["晚饭吃什么"], ["嗯"], ["你好", "你好呀，在干嘛", "在看电影呢", "好看吗", "还行吧，就是有点长"]]


@torch.inference_mode()
def test_requests_joining_a_running_batch_get_the_replies_they_get_alone(trained_bot_dir):
    """Continuous batching: requests join a DecodeBatch every other step (longer and shorter contexts than
    the columns used so far, so the cache grows and re-lays its columns out) and rows leave as they finish;
    each request's candidates and forward scores are those it gets alone."""
    from dialogpt_zh.engine.decoding import DecodeBatch

    bot = ChatBot.from_pretrained(trained_bot_dir)
    batch = DecodeBatch(bot)
    assert batch.joins_running_batches
    settings = [dict(seed=i, num_candidates=3 + i % 4, max_length=6 + 3 * (i % 3), min_length=0,
                     temperature=1.3, top_k=0) for i in range(12)]
    jobs = [bot.prepare_reply(JOINERS[i % len(JOINERS)], **kw) for i, kw in enumerate(settings)]
    done, joined, step, most = {}, 0, 0, 0
    while joined < len(jobs) or len(batch):
        if joined < len(jobs) and step % 2 == 0:
            batch.admit(jobs[joined:joined + 1 + joined % 2])
            joined += 1 + joined % 2
        most = max(most, len(batch))
        for request in batch.step():
            done[id(request.job)] = request.samples()
        step += 1
    assert most >= 3 and len(done) == len(jobs)
    lengths = set()
    for job, kw in zip(jobs, settings):
        alone = bot._generate([bot.prepare_reply(JOINERS[jobs.index(job) % len(JOINERS)], **kw)])[0].samples()
        got = done[id(job)]
        assert [tokens for tokens, _ in got] == [tokens for tokens, _ in alone]
        assert [f for _, f in got] == pytest.approx([f for _, f in alone], abs=1e-3)
        lengths |= {len(tokens) for tokens, _ in got}
    assert len(lengths) > 2  # rows really finished at different steps


def test_rerank_matches_reply_scores(bot):
    r = bot.reply(HISTORY, num_candidates=6, seed=1)
    reranked = {c.text: c for c in bot.rerank(HISTORY, [c.text for c in r.candidates])}
    compared = 0
    for c in r.candidates:
        if encode(bot.tokenizer, c.text) != c.token_ids:
            continue  # text does not round-trip (e.g. case); not comparable
        other = reranked[c.text]
        assert other.forward_logprob == pytest.approx(c.forward_logprob, abs=1e-3)
        assert other.backward_logprob == pytest.approx(c.backward_logprob, abs=1e-3)
        assert other.score == pytest.approx(c.score, abs=1e-4)
        compared += 1
    assert compared >= 3  # most of them round-trip: the comparison really happened


def test_backward_context_turns_scores_only_the_latest_turns(bot):
    assert len(HISTORY) >= 3
    whole = {c.text: c for c in bot.rerank(HISTORY, REPLIES, backward_context_turns=0)}  # every turn
    for k in (1, 2):
        # the same sequence, cut after k turns
        alone = bot.backward_logprobs(HISTORY[-k:], REPLIES, backward_context_turns=0)
        cut = {c.text: c for c in bot.rerank(HISTORY, REPLIES, backward_context_turns=k)}
        for text, (bwd, n_ctx) in zip(REPLIES, alone):
            assert cut[text].backward_logprob == pytest.approx(bwd, abs=1e-3)
            assert cut[text].num_context_tokens == n_ctx < whole[text].num_context_tokens
            assert cut[text].forward_logprob == pytest.approx(whole[text].forward_logprob, abs=1e-4)
        r = bot.reply(HISTORY, num_candidates=4, seed=3, backward_context_turns=k)
        for c in r.candidates:
            assert c.num_context_tokens == n_ctx
    default = {c.text: c for c in bot.rerank(HISTORY, REPLIES)}  # the default: the latest turn only
    assert all(default[t].num_context_tokens == len(encode(bot.tokenizer, HISTORY[-1])) + 1 for t in REPLIES)
    big = {c.text: c for c in bot.rerank(HISTORY, REPLIES, backward_context_turns=len(HISTORY) + 5)}
    assert all(big[t].backward_logprob == pytest.approx(whole[t].backward_logprob, abs=1e-4) for t in REPLIES)
    with pytest.raises(UserError, match="backward_context_turns"):
        bot.rerank(HISTORY, REPLIES, backward_context_turns=-1)


# ---------------------------------------------------------------------------------------- ranking

def test_mmi_off_without_backward_model(random_bot_dir):
    bot = ChatBot.from_pretrained(random_bot_dir / "forward")
    assert bot.backward_model is None and any("MMI off" in n for n in bot.notices)
    r = bot.reply(HISTORY, num_candidates=5, seed=0)
    assert not r.mmi and any("MMI off" in n for n in r.notices)
    assert all(c.backward_logprob is None for c in r.candidates)
    assert [c.score for c in r.candidates] == pytest.approx(
        sorted((c.forward_logprob / c.num_tokens for c in r.candidates), reverse=True))
    with pytest.raises(UserError, match="no backward model"):
        bot.backward_logprobs(HISTORY, ["嗯"])


def test_use_mmi_false_skips_backward(bot):
    r = bot.reply(HISTORY, num_candidates=4, seed=0, use_mmi=False)
    assert not r.mmi and all(c.backward_logprob is None for c in r.candidates)


def test_blocklist_removes_candidates(bot, tmp_path):
    r = bot.reply(HISTORY, num_candidates=6, seed=2)
    word = r.candidates[0].text[:1]
    blocklist = tmp_path / "block.txt"
    blocklist.write_text(f"# comment\n{word}\n", encoding="utf-8")
    r2 = bot.reply(HISTORY, num_candidates=6, seed=2, blocklist=str(blocklist))
    assert all(word not in c.text for c in r2.candidates)
    assert any("blocklist removed" in n for n in r2.notices)
    with pytest.raises(UserError, match="blocklist file not found"):
        bot.reply(HISTORY, blocklist=str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------- generation

def test_seeded_replies_are_reproducible(bot):
    a = bot.reply(HISTORY, num_candidates=5, seed=42)
    b = bot.reply(HISTORY, num_candidates=5, seed=42)
    c = bot.reply(HISTORY, num_candidates=5, seed=43)
    assert a.seed == 42
    assert [(x.text, x.score) for x in a.candidates] == [(x.text, x.score) for x in b.candidates]
    assert [x.text for x in a.candidates] != [x.text for x in c.candidates]
    # the seed of an unseeded reply reproduces it
    d = bot.reply(HISTORY, num_candidates=3)
    e = bot.reply(HISTORY, num_candidates=3, seed=d.seed)
    assert [x.text for x in d.candidates] == [x.text for x in e.candidates]


def test_duplicates_are_collapsed(bot):
    r = bot.reply(HISTORY, num_candidates=5, temperature=0.0, seed=0)  # greedy: 5 identical samples
    assert len(r.candidates) == 1 and r.candidates[0].count == 5
    r = bot.reply(HISTORY, num_candidates=12, top_k=2, max_length=3, seed=0)
    texts = [c.text for c in r.candidates]
    assert len(texts) == len(set(texts)) and sum(c.count for c in r.candidates) == 12


def test_never_emits_special_tokens_and_respects_lengths(float_bot):
    """Even when the model strongly prefers [UNK]/[PAD]/[CLS]/[SEP], they are not emitted (nor [SEP]
    before min_length), and no reply exceeds max_length."""
    bot = float_bot
    tok = bot.tokenizer
    forced = copy.deepcopy(bot)
    model = forced.forward_model
    head = torch.nn.Linear(model.config.n_embd, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.zero_()
        for i in (tok.unk_token_id, tok.pad_token_id, tok.cls_token_id, tok.mask_token_id, tok.sep_token_id):
            head.bias[i] = 30.0
    model.set_output_embeddings(head)
    r = forced.reply(HISTORY, num_candidates=8, min_length=3, max_length=7, seed=0, top_k=0)
    specials = set(tok.all_special_ids)
    for c in r.candidates:
        assert not specials & set(c.token_ids)
        assert 3 <= len(c.token_ids) <= 7 and c.num_tokens == len(c.token_ids) + 1
    assert all(len(c.token_ids) == 3 for c in r.candidates)  # [SEP] is taken as soon as it is allowed


def test_max_length_cuts_replies(bot):
    r = bot.reply(HISTORY, num_candidates=6, max_length=4, min_length=0, seed=0)
    assert all(len(c.token_ids) <= 4 for c in r.candidates)


# ---------------------------------------------------------------------------------------- history

def test_history_bounded_by_turns(bot):
    long_history = ["第一句", "第二句", "第三句", "第四句", "第五句"]
    r = bot.reply(long_history, num_candidates=2, seed=0, max_history=2)
    assert r.context == ["第四句", "第五句"]
    assert any("kept the last 2 of 5" in n for n in r.notices)


def test_history_bounded_by_tokens_oldest_first(bot):
    history = ["一二三四五六七八九十", "你好", "在干嘛"]  # 11 + 3 + 4 context tokens with [SEP]s
    r = bot.reply(history, num_candidates=2, seed=0, max_history=10, max_context_tokens=8)
    assert r.context == ["你好", "在干嘛"]
    assert any("dropped the 1 oldest" in n for n in r.notices)
    r = bot.reply(history, num_candidates=2, seed=0, max_history=10, max_context_tokens=4)
    assert r.context == ["在干嘛"]


def test_overlong_message_keeps_its_last_tokens(bot):
    text = "你好" * 300  # longer than the tiny model's 256 positions
    r = bot.reply([text], num_candidates=2, seed=0, max_length=10)
    assert any("input truncated" in n for n in r.notices)
    n_kept = len(encode(bot.tokenizer, r.context[0]))
    assert n_kept + 1 <= 256 - 10 - 2
    # and the budget is honoured by scoring too
    assert bot.rerank([text], ["嗯", "好的"])


def test_out_of_vocab_input_becomes_unk_context(bot):
    """Characters outside the vocabulary reach the model as [UNK]; it still replies, never with [UNK]."""
    r = bot.reply(["𠀀😀ЖΩ"], num_candidates=3, seed=0)
    assert r.context == ["𠀀😀ЖΩ"]
    context = context_of(bot, r.context)
    assert context == [[bot.tokenizer.unk_token_id] * 4]
    assert r.candidates and r.text == r.candidates[0].text
    assert all(c.token_ids and bot.tokenizer.unk_token_id not in c.token_ids for c in r.candidates)


# ---------------------------------------------------------------------------------------- errors

def test_bad_history_and_settings_are_user_errors(bot):
    with pytest.raises(UserError, match="non-empty"):
        bot.reply([])
    with pytest.raises(UserError, match="empty"):
        bot.reply(["你好", "   "])
    with pytest.raises(UserError, match="unknown setting"):
        bot.reply(HISTORY, top_kk=3)
    with pytest.raises(UserError, match="top_p"):
        bot.reply(HISTORY, top_p=0.0)
    with pytest.raises(UserError, match="normalize"):
        bot.rerank(HISTORY, ["嗯"], normalize="median")


def test_loading_errors(random_bot_dir, tmp_path, fixture_tokenizer):
    from dialogpt_zh.checkpoint import save_checkpoint
    from dialogpt_zh.tokenizer import build_char_tokenizer
    from dialogpt_zh.training.presets import build_model

    with pytest.raises(UserError, match="not found"):
        ChatBot.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="backward model but it was given as the forward"):
        ChatBot.from_pretrained(forward=random_bot_dir / "backward")
    other_tok = build_char_tokenizer({"甲": 1, "乙": 1})
    save_checkpoint(build_model("tiny", other_tok), other_tok, tmp_path / "other", {"direction": "backward"})
    with pytest.raises(UserError, match="tokenizer differs"):
        ChatBot.from_pretrained(forward=random_bot_dir / "forward", backward=tmp_path / "other")
    with pytest.raises(UserError, match="int8"):
        ChatBot.from_pretrained(random_bot_dir, quantize="int4")


def test_settings_dataclasses_have_help():
    import dataclasses

    for cls in (GenerationSettings, MMISettings):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_typed_special_token_text_stays_text(random_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot

    bot = ChatBot.from_pretrained(random_bot_dir)
    sep, cls = bot.tokenizer.sep_token_id, bot.tokenizer.cls_token_id
    ids = bot._encode("你好[SEP][CLS]")
    assert sep not in ids and cls not in ids and len(ids) == 12


# ---------------------------------------------------------------------------------------- settings

def test_settings_are_bounded_when_called_from_python(bot):
    from dialogpt_zh.settings import SettingsError

    for bad in (dict(num_candidates=100_000), dict(max_length=100_000), dict(temperature=float("inf")),
                dict(backward_weight=float("nan"))):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            bot.reply(HISTORY, **bad)
    with pytest.raises(SettingsError, match="num_candidates"):
        bot.rerank(HISTORY, ["嗯"], generation=GenerationSettings(num_candidates=0))
    with pytest.raises(TypeError, match="GenerationSettings"):
        ChatBot(bot.forward_model, bot.tokenizer, generation={"num_candidates": 3})
    # in bounds, but longer than these models can hold: refused when the bot is made, not on every reply
    with pytest.raises(UserError, match=r"max_length: must be at most 252 for these models \(256 positions\)"):
        ChatBot(bot.forward_model, bot.tokenizer, generation=GenerationSettings(max_length=1000))


def test_user_input_is_cleaned_with_the_cards_store_options(random_bot_dir, tmp_path):
    import json
    import shutil

    default = ChatBot.from_pretrained(random_bot_dir)
    assert default.cleaning == {"max_repeat": 4, "mask_pii": True}      # an old card: the defaults
    bot_dir = tmp_path / "bot"
    shutil.copytree(random_bot_dir, bot_dir)
    card_path = bot_dir / "forward" / "dialogpt_zh.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["store_config"] = {"max_repeat": 2, "mask_pii": False, "max_utterance_chars": 120}
    card_path.write_text(json.dumps(card), encoding="utf-8")
    bot = ChatBot.from_pretrained(bot_dir)
    assert bot.cleaning == {"max_repeat": 2, "mask_pii": False}
    text = "哈哈哈哈哈哈 13812345678"
    seen = bot.reply([text], num_candidates=1, max_length=2, seed=0).context[-1]
    assert seen.startswith("哈哈 ") and "13812345678" in seen                 # capped at 2, number kept
    seen_default = default.reply([text], num_candidates=1, max_length=2, seed=0).context[-1]
    assert seen_default.startswith("哈哈哈哈 ") and "13812345678" not in seen_default


# ------------------------------------------------------------------------------ replies of many requests

BATCH_REQUESTS = [  # different context lengths, seeds, candidate counts and settings, one with MMI off
    (["你好"], dict(seed=1, num_candidates=6, min_length=0)),
    (HISTORY, dict(seed=2, num_candidates=3, temperature=0.7, top_k=5, repetition_penalty=1.3, min_length=0)),
    (["在看电影呢，你呢", "我在家"], dict(seed=3, num_candidates=5, top_p=0.8, max_length=6, use_mmi=False)),
    (["今天天气真好我们去公园吧"], dict(seed=4, num_candidates=4, no_repeat_ngram_size=2, min_length=3)),
]


def assert_same_reply(got, want) -> None:
    assert [(c.text, c.token_ids, c.count, c.rank) for c in got.candidates] == \
        [(c.text, c.token_ids, c.count, c.rank) for c in want.candidates]
    for x, y in zip(got.candidates, want.candidates):
        assert x.forward_logprob == pytest.approx(y.forward_logprob, abs=1e-4)
        if y.backward_logprob is None:
            assert x.backward_logprob is None
        else:
            assert x.backward_logprob == pytest.approx(y.backward_logprob, abs=1e-4)
    assert (got.text, got.seed, got.mmi, got.context) == (want.text, want.seed, want.mmi, want.context)


def test_requests_batched_together_get_the_replies_they_get_alone(trained_bot_dir):
    """reply_many: each request keeps its own history, seed and settings in the shared sampling and MMI
    batches (rows of different context lengths: own positions, own keys), whether it runs with others or alone."""
    bot = ChatBot.from_pretrained(trained_bot_dir)
    alone = [bot.reply(history, **kw) for history, kw in BATCH_REQUESTS]
    together = bot.reply_many([bot.prepare_reply(history, **kw) for history, kw in BATCH_REQUESTS])
    assert len({len(r.candidates) for r in alone}) > 1
    for got, want in zip(together, alone):
        assert_same_reply(got, want)
        assert got.batch_size == len(BATCH_REQUESTS) and want.batch_size == 1
    assert together[2].mmi is False and all(c.backward_logprob is None for c in together[2].candidates)
    assert all(len(c.token_ids) <= 6 for c in together[2].candidates)
    # the same through the transformers forward, which runs the requests one by one
    hf_bot = copy.copy(bot)
    hf_bot.use_lean_forward = False
    for got, want in zip(hf_bot.reply_many([hf_bot.prepare_reply(h, **kw) for h, kw in BATCH_REQUESTS]), alone):
        assert_same_reply(got, want)


def test_batched_scores_equal_the_reference(trained_bot_dir):
    """The scores each batched candidate carries equal the reference's uncached run of that candidate alone."""
    bot = ChatBot.from_pretrained(trained_bot_dir)
    jobs = [bot.prepare_reply(h, **kw) for h, kw in BATCH_REQUESTS]
    for (history, _), job, reply in zip(BATCH_REQUESTS, jobs, bot.reply_many(jobs)):
        assert assert_scores_equal_reference(bot, history, reply.candidates, job.mmi, job.gen) >= 1


def test_scoring_calls_apply_or_refuse_every_override(bot):
    """A setting given to a scoring call either changes what it computes or is refused: none is dropped."""
    from dialogpt_zh.settings import SettingsError

    every = bot.backward_logprobs(HISTORY, REPLIES, backward_context_turns=0)
    latest = bot.backward_logprobs(HISTORY, REPLIES)  # the bot's default: the latest turn only
    assert latest == bot.backward_logprobs(HISTORY, REPLIES, mmi=MMISettings(backward_context_turns=1))
    assert [n for _, n in latest] == [len(encode(bot.tokenizer, HISTORY[-1])) + 1] * len(REPLIES)
    assert all(n_all > n for (_, n_all), (_, n) in zip(every, latest))
    assert bot.backward_logprobs(HISTORY, REPLIES, max_history=1) == latest  # only the latest turn seen
    for call, setting in ((bot.backward_logprobs, dict(backward_weight=2.0)), (bot.backward_logprobs,
                          dict(top_k=3)), (bot.forward_logprobs, dict(use_mmi=False)),
                          (bot.forward_logprobs, dict(num_candidates=3)), (bot.rerank, dict(blocklist="x.txt")),
                          (bot.rerank, dict(temperature=0.5))):
        with pytest.raises(SettingsError, match=f"does not use {next(iter(setting))}"):
            call(HISTORY, REPLIES, **setting)
    with pytest.raises(SettingsError, match="unknown setting"):
        bot.forward_logprobs(HISTORY, REPLIES, top_kk=3)
