"""Checkpoints made elsewhere: GPT2-chitchat, CDial-GPT2 and uer/gpt2-chinese look-alikes (tests/lookalikes.py)
load as they are, chat, rerank, convert with exact logits, fine-tune, and meet the arena; unsafe or damaged
files are refused naming them; nothing is downloaded."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lookalikes import KINDS, REAL_CHITCHAT_VOCAB, bert_vocab, make_lookalike

from dialogpt_zh.errors import UserError

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "corpus" / "fixtures" / "chitchat_train.txt"
HISTORY = ["你好", "你好呀，在干嘛"]
LAYOUT_OF = {"chitchat": "chitchat", "cdial": "cdial", "uer": "chitchat", "chitchat-real": "chitchat"}
# every look-alike; "chitchat-real" has GPT2-chitchat's own 13,317-line vocab.txt (when the shared corpus is here)
ALL = [*KINDS, "chitchat-real"]


@pytest.fixture(scope="module")
def bots(tmp_path_factory) -> dict[str, Path]:
    """A bot directory (forward/ + backward/, random weights, the real file layouts) per kind."""
    root = tmp_path_factory.mktemp("lookalikes")
    for kind in KINDS:
        make_lookalike(root / kind / "forward", kind, seed=0)
        make_lookalike(root / kind / "backward", kind, seed=1)
    out = {kind: root / kind for kind in KINDS}
    if REAL_CHITCHAT_VOCAB.is_file():
        for direction, seed in (("forward", 0), ("backward", 1)):
            make_lookalike(root / "chitchat-real" / direction, "chitchat", seed=seed, vocab_file=REAL_CHITCHAT_VOCAB)
        out["chitchat-real"] = root / "chitchat-real"
    return out


def _need(bots: dict[str, Path], kind: str) -> Path:
    if kind not in bots:
        pytest.skip(f"GPT2-chitchat's vocab.txt not found at {REAL_CHITCHAT_VOCAB} (the shared corpus)")
    return bots[kind]


def _bot(path=None, **kw):
    from dialogpt_zh.engine.bot import ChatBot

    return ChatBot.from_pretrained(path, **kw)


# ------------------------------------------------------------------------------------------- the layouts

def test_cdial_layout_is_cdial_gpts_own_input():
    """Layout("cdial") builds what CDial-GPT's build_input_from_segments builds (written out here by hand)."""
    from dialogpt_zh.sequence import Layout

    cls, sep, s1, s2 = 0, 2, 98, 99
    layout = Layout("cdial", cls, sep, (s1, s2))
    ids, types = layout.sequence([[10, 11], [20], [30, 31, 32]], "forward")
    assert ids == [cls, s1, 10, 11, s2, 20, s1, 30, 31, 32, sep]
    assert types == [cls, s1, s1, s1, s2, s2, s1, s1, s1, s1, s1]
    ids, types = layout.sequence([[10, 11], [20]], "backward")           # the reply first, speaker1
    assert ids == [cls, s1, 20, s2, 10, 11, sep] and types == [cls, s1, s1, s2, s2, s2, s2]
    prompt, prompt_types, reply_type = layout.prompt([[10, 11], [20]])   # the reply is the 3rd turn: speaker1
    assert prompt == [cls, s1, 10, 11, s2, 20, s1] and prompt_types == [cls, s1, s1, s1, s2, s2, s1]
    assert reply_type == s1 and layout.prompt([[10]])[2] == s2
    # MMI scores everything after "[CLS] [speaker1] reply [speaker2]": the context's tokens and the final [SEP]
    turns = [[10, 11], [20]]
    assert layout.first_turn_length(turns, "backward") == 4
    assert len(layout.sequence(turns, "backward")[0]) - 4 == sum(len(u) + 1 for u in turns[:-1])
    assert layout.sequence_length([2, 1]) == len(layout.sequence(turns, "forward")[0])

    chitchat = Layout("chitchat", cls, sep)
    assert chitchat.sequence(turns, "forward") == ([cls, 10, 11, sep, 20, sep], None)
    assert chitchat.prompt(turns) == ([cls, 10, 11, sep, 20, sep], None, None)
    assert chitchat.first_turn_length(turns, "backward") == 3


def test_layout_is_inferred_from_the_vocabulary_or_given(bots):
    for kind in KINDS:
        bot = _bot(bots[kind])
        assert (bot.forward_layout.name, bot.backward_layout.name) == (LAYOUT_OF[kind], LAYOUT_OF[kind])
        assert bot.mmi_active() and bot.notices == []
    assert _bot(bots["cdial"], layout="chitchat").forward_layout.name == "chitchat"   # --layout wins
    with pytest.raises(UserError, match=r"needs the tokens \[speaker1\], \[speaker2\]"):
        _bot(bots["chitchat"], layout="cdial")
    from dialogpt_zh.settings import BotArguments, SettingsError

    with pytest.raises(SettingsError, match="unknown layout"):
        BotArguments(layout="gpt3")


# ---------------------------------------------------------------------------------------- load and chat

@pytest.mark.parametrize("kind", ALL)
def test_lookalike_chats_and_reranks(bots, kind):
    bot = _bot(_need(bots, kind))
    reply = bot.reply(HISTORY, seed=0, num_candidates=6, max_length=8)
    assert reply.mmi and reply.candidates and reply.text == reply.candidates[0].text
    assert all(c.backward_logprob is not None and c.num_tokens >= 2 for c in reply.candidates)
    specials = {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "[speaker1]", "[speaker2]"}
    assert not any(s in c.text for c in reply.candidates for s in specials)   # only the layout places them
    unused = {i for t, i in bot.tokenizer.get_vocab().items() if t.startswith("[unused")}
    assert unused <= set(bot.banned_ids) and (kind == "cdial" or unused)   # BERT placeholders are no text
    assert bot.reply(HISTORY, seed=0, num_candidates=6, max_length=8).text == reply.text   # seeded
    together = bot.reply_many([bot.prepare_reply(HISTORY, seed=0, num_candidates=6, max_length=8),
                               bot.prepare_reply(["晚上吃什么"], seed=1, num_candidates=3, max_length=8)])
    assert [c.text for c in together[0].candidates] == [c.text for c in reply.candidates]
    assert together[1].candidates and together[1].context == ["晚上吃什么"]
    ranked = bot.rerank(HISTORY, ["在看书呢", "我刚下班，准备做饭", "好的"])
    assert [c.rank for c in ranked] == [1, 2, 3] and ranked[0].score >= ranked[-1].score
    assert {c.text for c in ranked} == {"在看书呢", "我刚下班，准备做饭", "好的"}


def _reference_logprob(model, ids: list[int], types: list[int] | None, first_scored: int) -> float:
    """Sum of log P(ids[t] | ids[:t]) for t >= first_scored, one plain transformers forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]),
                       token_type_ids=torch.tensor([types]) if types is not None else None).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(first_scored, len(ids))))


@pytest.mark.parametrize("kind", ["chitchat", "cdial"])
def test_scores_are_those_of_the_models_own_input(bots, kind):
    """forward_logprobs / backward_logprobs equal a plain forward over the sequence spelled out by hand in each
    model's own input format (for cdial: CDial-GPT's, speaker tokens and token types); MMI counts context
    tokens only."""
    from dialogpt_zh.tokenizer import encode

    history = ["你好", "你好呀在干嘛"]     # text the cleaner keeps as it is (it would make "，" ",")
    bot = _bot(bots[kind], quantize="none")
    tok = bot.tokenizer
    ctx, reply = [encode(tok, u) for u in history], encode(tok, "在看书呢")
    cls, sep = tok.cls_token_id, tok.sep_token_id
    if kind == "cdial":
        s1, s2 = tok.convert_tokens_to_ids(["[speaker1]", "[speaker2]"])
        fwd_ids = [cls, s1, *ctx[0], s2, *ctx[1], s1, *reply, sep]
        fwd_types = [cls] + [s1] * (len(ctx[0]) + 1) + [s2] * (len(ctx[1]) + 1) + [s1] * (len(reply) + 2)
        bwd_ids = [cls, s1, *reply, s2, *ctx[1], s1, *ctx[0], sep]
        bwd_types = [cls] + [s1] * (len(reply) + 1) + [s2] * (len(ctx[1]) + 1) + [s1] * (len(ctx[0]) + 2)
        fwd_first, bwd_first = len(fwd_ids) - len(reply) - 1, len(reply) + 3
    else:
        fwd_ids, fwd_types = [cls, *ctx[0], sep, *ctx[1], sep, *reply, sep], None
        bwd_ids, bwd_types = [cls, *reply, sep, *ctx[1], sep, *ctx[0], sep], None
        fwd_first, bwd_first = len(fwd_ids) - len(reply) - 1, len(reply) + 2
    (fwd, n), = bot.forward_logprobs(history, ["在看书呢"])
    assert n == len(reply) + 1
    assert fwd == pytest.approx(_reference_logprob(bot.forward_model, fwd_ids, fwd_types, fwd_first), abs=1e-4)
    (bwd, n_ctx), = bot.backward_logprobs(history, ["在看书呢"], backward_context_turns=0)   # every turn
    assert n_ctx == sum(len(u) + 1 for u in ctx) == len(bwd_ids) - bwd_first
    assert bwd == pytest.approx(_reference_logprob(bot.backward_model, bwd_ids, bwd_types, bwd_first), abs=1e-4)
    # the candidates' forward scores, collected while sampling, are the same quantity
    cand = bot.reply(history, seed=3, num_candidates=4, max_length=6).candidates[0]
    (again, _), = bot.forward_logprobs(history, [cand.text])
    assert cand.forward_logprob == pytest.approx(again, abs=1e-3)


# contexts of 1 to 4 turns: the cdial reply speaker alternates ([speaker2] after one turn, [speaker1] after two)
PARITIES = [["你好"], ["你好", "你好呀在干嘛"], ["晚上吃什么", "面条", "好的"], ["在吗", "在", "干嘛", "没事"]]


def _lean_and_transformers(path, **kw):
    """The same bot twice: through the lean forward, and through transformers' (`use_lean_forward = False`)."""
    from dialogpt_zh.engine.lean_gpt2 import LeanGPT2

    lean = _bot(path, **kw)
    hf = copy.copy(lean)
    hf.use_lean_forward = False
    for model in (lean.forward_model, lean.backward_model):
        assert isinstance(lean._lean(model), LeanGPT2) and hf._lean(model) is None
    return lean, hf


def _same_candidates(a, b) -> None:
    """The same texts in the same ranks, the same scores up to float rounding."""
    assert [(c.text, c.token_ids, c.count, c.rank) for c in a] == [(c.text, c.token_ids, c.count, c.rank) for c in b]
    for x, y in zip(a, b):
        for f in ("forward_logprob", "backward_logprob", "score"):
            want = getattr(y, f)
            assert (getattr(x, f) is None) == (want is None)
            if want is not None:
                assert getattr(x, f) == pytest.approx(want, rel=1e-4, abs=1e-4), f


@pytest.mark.parametrize("quantize", ["none", "fp16"])
def test_cdial_runs_the_lean_forward_with_the_transformers_results(bots, quantize):
    """cdial models (token types) go through the lean forward and its batching: with a fixed seed, single
    replies and a reply_many batch mixing contexts of odd and even turn counts (different reply speakers in
    one batch), MMI on and off, rerank and the teacher-forced forward scores give the candidates, ranks and
    scores of transformers' forward."""
    lean, hf = _lean_and_transformers(bots["cdial"], quantize=quantize)
    assert lean.decode_batch().joins_running_batches
    kw = dict(num_candidates=6, max_length=8, min_length=0)
    for use_mmi in (True, False):
        many = [bot.reply_many([bot.prepare_reply(h, seed=i, use_mmi=use_mmi, **kw) for i, h in enumerate(PARITIES)])
                for bot in (lean, hf)]
        assert many[0][0].batch_size == len(PARITIES) and many[1][0].batch_size == 1   # lean: one batch
        for i, h in enumerate(PARITIES):
            single = [bot.reply(h, seed=i, use_mmi=use_mmi, **kw) for bot in (lean, hf)]
            assert single[0].mmi == use_mmi
            _same_candidates(single[0].candidates, single[1].candidates)
            _same_candidates(many[0][i].candidates, single[1].candidates)
            _same_candidates(many[1][i].candidates, single[1].candidates)
    for h in PARITIES[:2]:
        _same_candidates(lean.rerank(h, ["在看书呢", "好的", "我刚下班准备做饭"]),
                         hf.rerank(h, ["在看书呢", "好的", "我刚下班准备做饭"]))
    # the teacher-forced pass of retrieved replies, pairs of both parities in one batch
    pairs = [([lean._encode(u) for u in h], lean._encode(r)) for h in PARITIES for r in ("好的", "在看书呢")]
    for got, want in zip(lean._forward_scores_pairs(pairs), hf._forward_scores_pairs(pairs)):
        assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-4)


@torch.inference_mode()
def test_cdial_requests_joining_a_running_batch_get_the_transformers_replies(bots):
    """Continuous batching over a cdial model: requests of odd and even turn counts join a running
    DecodeBatch; each one's candidates and forward scores are those the transformers forward gives it alone."""
    lean, hf = _lean_and_transformers(bots["cdial"])
    batch = lean.decode_batch()
    settings = [dict(seed=i, num_candidates=2 + i % 3, max_length=5 + 2 * (i % 3), min_length=0) for i in range(8)]
    jobs = [lean.prepare_reply(PARITIES[i % len(PARITIES)], **kw) for i, kw in enumerate(settings)]
    done, joined, step = {}, 0, 0
    while joined < len(jobs) or len(batch):
        if joined < len(jobs) and step % 2 == 0:
            batch.admit(jobs[joined:joined + 2])
            joined += 2
        for request in batch.step():
            done[id(request.job)] = request.samples()
        step += 1
    for i, (job, kw) in enumerate(zip(jobs, settings)):
        alone = hf._generate([hf.prepare_reply(PARITIES[i % len(PARITIES)], **kw)])[0].samples()
        assert [tokens for tokens, _ in done[id(job)]] == [tokens for tokens, _ in alone]
        assert [f for _, f in done[id(job)]] == pytest.approx([f for _, f in alone], rel=1e-4, abs=1e-4)


def test_any_forward_pairs_with_any_backward_of_the_same_vocabulary(bots, tmp_path):
    bot = _bot(forward=bots["chitchat"] / "forward", backward=bots["uer"] / "backward")   # same vocab.txt
    assert bot.reply(HISTORY, seed=1, num_candidates=3, max_length=5).mmi
    other = bert_vocab()
    other[-1] = "额外"
    make_lookalike(tmp_path / "other", "chitchat", vocab=other)
    first = rf"first difference at id {len(other) - 1}: 'hello' vs '额外'"
    with pytest.raises(UserError, match=rf"tokenizer differs.*{first}"):
        _bot(forward=bots["chitchat"] / "forward", backward=tmp_path / "other")
    with pytest.raises(UserError, match="tokenizer differs"):
        _bot(forward=bots["chitchat"] / "forward", backward=bots["cdial"] / "backward")


def test_real_gpt2_chitchat_vocabulary(bots):
    """GPT2-chitchat's own vocab.txt: real Chinese text spelled without [UNK] (transformers 5's BertTokenizer(
    vocab_file=...) would give all [UNK]; the directory is loaded through from_pretrained)."""
    from conftest import read_fixture_sessions

    from dialogpt_zh.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(_need(bots, "chitchat-real") / "forward")
    assert len(tok) == 13317 and tok.cls_token_id == 101 and tok.sep_token_id == 102
    ids = [i for s in read_fixture_sessions() for u in s for i in encode(tok, u)]
    assert len(ids) > 300 and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(encode(tok, "今天天气不错")) == list("今天天气不错")


# ------------------------------------------------------------------------------------------ unsafe files

class _Payload:
    """Unpickling this runs code: it writes `marker` (what an attacker's pytorch_model.bin would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path, capsys):
    model_dir = make_lookalike(tmp_path / "evil", "chitchat")
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    control, marker = tmp_path / "control_ran", tmp_path / "payload_ran"
    torch.save({**state, "x": _Payload(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)   # the payload is live: a plain unpickle runs it
    assert control.read_text() == "pwned"
    torch.save({**state, "x": _Payload(marker)}, model_dir / "pytorch_model.bin")

    with pytest.raises(UserError, match="refused: this pickle asks for more than tensors") as e:
        _bot(model_dir)
    assert str(model_dir / "pytorch_model.bin") in str(e.value) and "exec" in str(e.value)
    from dialogpt_zh.convert import main as convert_main

    assert convert_main([str(model_dir), "--output", str(tmp_path / "out")]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert not marker.exists()


def test_a_plain_pickle_is_refused_with_our_message_alone(tmp_path):
    """pickle.dump writes protocol 4 (torch.save writes 2): torch warns about that before refusing; the refusal
    is the user's message, so the warning is not shown beside it."""
    import pickle
    import warnings

    model_dir = make_lookalike(tmp_path / "evil", "chitchat")
    marker = tmp_path / "payload_ran"
    with open(model_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="refused: this pickle asks for more than tensors"):
            _bot(model_dir)
    assert not [w for w in caught if "pickle protocol" in str(w.message)]
    assert not marker.exists()


def _rename_tensors(d: Path, prefix: str) -> None:
    """The weights saved under prefixed names, as torch.nn.DataParallel's state_dict() has them."""
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({prefix + k: v for k, v in state.items()}, d / "pytorch_model.bin")


def _mismatched_vocab(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 7
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_weights(change):
    def edit(d: Path) -> None:
        state = torch.load(d / "pytorch_model.bin", weights_only=True)
        change(state)
        torch.save(state, d / "pytorch_model.bin")
    return edit


def _as_safetensors(change=lambda state: None):
    """The look-alike's weights as one model.safetensors (as save_pretrained writes it), `change`d first."""
    def edit(d: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in torch.load(d / "pytorch_model.bin", weights_only=True).items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        change(state)
        save_file(state, str(d / "model.safetensors"))
        (d / "pytorch_model.bin").unlink()
    return edit


DAMAGE = [
    ("vocab_size", _mismatched_vocab, r"transformer.wte.weight is \[\d+, 32\] in the file but config.json"),
    ("dataparallel names", lambda d: _rename_tensors(d, "module."), r"start with 'module.'.*model.module"),
    ("card direction", lambda d: (d / "dialogpt_zh.json").write_text('{"direction": "sideways"}', encoding="utf-8"),
     r"dialogpt_zh.json.*direction.*must be 'forward' or 'backward', got 'sideways'"),
    ("truncated", lambda d: (d / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes()[:500]),
     "unreadable weights"),
    ("not a state dict", lambda d: torch.save([torch.zeros(2)], d / "pytorch_model.bin"), "expected a state dict"),
    ("missing tensor", lambda d: torch.save({k: v for k, v in torch.load(d / "pytorch_model.bin").items()
                                             if "h.1.mlp" not in k}, d / "pytorch_model.bin"),
     "tensors config.json needs are missing"),
    ("integer weights", lambda d: torch.save({k: v.long() if k.endswith("ln_f.weight") else v
                                              for k, v in torch.load(d / "pytorch_model.bin").items()},
                                             d / "pytorch_model.bin"), "not floating point"),
    ("nan", lambda d: torch.save({k: v.fill_(float("nan")) if k.endswith("ln_f.bias") else v
                                  for k, v in torch.load(d / "pytorch_model.bin").items()},
                                 d / "pytorch_model.bin"), "NaN or infinite"),
    ("no weights", lambda d: (d / "pytorch_model.bin").unlink(), "expected model.safetensors or pytorch_model.bin"),
    ("no vocab", lambda d: (d / "vocab.txt").unlink(), "needs tokenizer.json or a BERT-style vocab.txt"),
    ("another vocab", lambda d: (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n你\n", encoding="utf-8"),
     "vocab_size is 25[0-9] but the vocabulary has 5 ids: is this the model's own vocab.txt"),
    # config.json values transformers takes and fails on later (or reports without the field)
    ("negative n_embd", _edit_config(n_embd=-32),
     r"config.json \(field 'n_embd'\): must be a positive integer, got -32"),
    ("vocab_size 0", _edit_config(vocab_size=0), r"config.json \(field 'vocab_size'\): must be a positive integer"),
    ("n_layer a string", _edit_config(n_layer="2"), r"\(field 'n_layer'\): must be a positive integer, got '2'"),
    ("unknown model_type", _edit_config(model_type="gpt-2"),   # not transformers' list of every model type
     r"\(field 'model_type'\): unknown model_type 'gpt-2' \(a GPT-2 checkpoint says \"gpt2\"\)$"),
    ("bad torch_dtype", _edit_config(torch_dtype="fp16"), r"\(field 'torch_dtype'\): 'fp16' is not a torch dtype"),
    ("sparse tensor", _edit_weights(lambda s: s.update({"transformer.ln_f.bias": s[
        "transformer.ln_f.bias"].to_sparse()})),
     "tensor transformer.ln_f.bias is a sparse_coo tensor; expected a dense one"),
    # model.safetensors is held to what pytorch_model.bin is
    ("safetensors", _as_safetensors(), None),
    ("safetensors integer weights", _as_safetensors(lambda s: s.update({"transformer.ln_f.weight": s[
        "transformer.ln_f.weight"].long()})), "tensor transformer.ln_f.weight is I64, not floating point"),
    ("safetensors extra tensor", _as_safetensors(lambda s: s.update({"transformer.extra": torch.zeros(3)})),
     r"1 tensors are not in a gpt2 model of this config.json \(first: transformer.extra\)"),
    ("safetensors misshapen tensor", _as_safetensors(lambda s: s.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(
        32, 64)})), r"tensor transformer.h.0.mlp.c_fc.weight is \[32, 64\] in the file but config.json makes it "
                    r"\[32, 128\]"),
]


@pytest.mark.parametrize("name,damage,expected", DAMAGE, ids=[n for n, _, _ in DAMAGE])
def test_damaged_foreign_files_are_clear_errors(tmp_path, name, damage, expected):
    model_dir = make_lookalike(tmp_path / "m", "chitchat")
    damage(model_dir)
    if expected is None:   # the undamaged control of its neighbours
        assert _bot(model_dir).reply(HISTORY, seed=0, num_candidates=2, max_length=4).candidates
        return
    with pytest.raises(UserError, match=expected) as e:
        _bot(model_dir)
    assert str(model_dir) in str(e.value)


def test_vocab_txt_with_a_bom_loads_and_repeated_lines_are_reported(tmp_path, caplog):
    """A vocab.txt saved by a Windows editor (UTF-8 BOM, CRLF) means the same ids (before: "vocab lacks the special
    tokens ['[PAD]']", the BOM being read as part of line 1); a token on two lines leaves an id without a token,
    which is said (before: nothing)."""
    import logging

    from dialogpt_zh.tokenizer import load_tokenizer

    plain = load_tokenizer(make_lookalike(tmp_path / "plain", "chitchat")).get_vocab()
    windows = make_lookalike(tmp_path / "windows", "chitchat")
    text = (windows / "vocab.txt").read_text(encoding="utf-8").replace("\n", "\r\n")
    (windows / "vocab.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_tokenizer(windows).get_vocab() == plain and _bot(windows).reply(HISTORY, seed=0).candidates
    repeated = make_lookalike(tmp_path / "repeated", "chitchat")
    lines = (repeated / "vocab.txt").read_text(encoding="utf-8").split("\n")
    lines[20] = lines[21]
    (repeated / "vocab.txt").write_text("\n".join(lines), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="dialogpt_zh.tokenizer"):
        load_tokenizer(repeated)
    assert f"{repeated / 'vocab.txt'}:22: 1 lines repeat an earlier token (first: {lines[21]!r}, already on line " \
        "21)" in caplog.text


def test_both_weight_files_say_which_one_is_read(tmp_path, caplog):
    """model.safetensors wins over pytorch_model.bin (as in transformers); the other one is not dropped silently."""
    import logging

    model_dir = make_lookalike(tmp_path / "m", "chitchat")
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    _as_safetensors()(model_dir)
    torch.save(state, model_dir / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="dialogpt_zh.checkpoint"):
        _bot(model_dir)
    assert f"{model_dir}: reading model.safetensors; the pytorch_model.bin beside it is not read" in caplog.text


def test_a_hub_id_offline_says_how_to_download(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"offline .*hf download uer/gpt2-chinese-cluecorpussmall --local-dir"):
        _bot("uer/gpt2-chinese-cluecorpussmall")
    from dialogpt_zh.interact import main as interact_main

    assert interact_main(["--model", "thu-coai/CDial-GPT2_LCCC-base"]) == 2
    assert "git clone https://huggingface.co/thu-coai/CDial-GPT2_LCCC-base" in capsys.readouterr().err
    with pytest.raises(UserError, match="model path not found"):
        _bot(tmp_path / "missing")                 # a path that is not a hub id: no download attempted


def test_an_empty_model_path_is_refused_naming_the_flag(capsys):
    """--model "" is not the current directory."""
    from dialogpt_zh.interact import main as interact_main

    assert interact_main(["--model", ""]) == 2
    assert "model: empty; give a model directory" in capsys.readouterr().err


def test_a_file_given_for_a_model_directory_names_the_directory(bots, tmp_path, capsys):
    """--model, --backward, convert's SRC or train --init pointing at a file of the model: one message, naming the
    file and the directory to give instead (before: "not a model directory (no config.json)" of config.json,
    or "tokenizer directory not found" of a vocab.txt that is there)."""
    from dialogpt_zh.convert import main as convert_main

    forward, backward = bots["chitchat"] / "forward", bots["chitchat"] / "backward"
    for kw in ({"path": forward / "config.json"}, {"forward": forward, "backward": backward / "vocab.txt"}):
        with pytest.raises(UserError, match=r"a file, not a model directory; give the directory that holds it"):
            _bot(**kw)
    assert convert_main([str(forward / "pytorch_model.bin"), "--output", str(tmp_path / "out")]) == 2
    assert f"({forward})" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ convert

@pytest.mark.parametrize("kind", ALL)
def test_convert_keeps_logits_exactly(bots, kind, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dialogpt_zh.checkpoint import load_model
    from dialogpt_zh.convert import main as convert_main
    from dialogpt_zh.sequence import Layout
    from dialogpt_zh.tokenizer import encode, load_tokenizer

    src, out = _need(bots, kind) / "backward", tmp_path / "converted"
    assert convert_main([str(src), "--output", str(out), "--direction", "backward"]) == 0
    assert "logits equal" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    card = json.loads((out / "dialogpt_zh.json").read_text(encoding="utf-8"))
    assert card["direction"] == "backward" and card["layout"] == LAYOUT_OF[kind] and card["licence"] == "unknown"
    assert card["source"]["given"] == str(src) and set(card["source"]["files_sha256"]) >= {"config.json",
                                                                                         "pytorch_model.bin",
                                                                                         "vocab.txt"}
    # plain transformers loads it; the ids mean the same tokens; the logits are the source's, bit for bit
    theirs, ours = load_tokenizer(src), AutoTokenizer.from_pretrained(str(out))
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs)
    layout = Layout.for_tokenizer(LAYOUT_OF[kind], theirs)
    ids, types = layout.sequence([encode(theirs, u) for u in HISTORY + ["在看书呢"]], "forward")
    kw = {"input_ids": torch.tensor([ids]), "token_type_ids": torch.tensor([types]) if types else None}
    with torch.no_grad():
        before = load_model(src)(**kw).logits
        after = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(**kw).logits
    assert torch.equal(before, after)
    # the converted directory is a bot half like any other: it pairs with its source's forward model
    bot = _bot(forward=bots[kind] / "forward", backward=out)
    assert bot.backward_layout.name == LAYOUT_OF[kind]
    assert _bot(forward=bots[kind] / "forward", backward=src).rerank(HISTORY, ["好的"])[0].backward_logprob == \
        pytest.approx(bot.rerank(HISTORY, ["好的"])[0].backward_logprob, abs=1e-5)


def test_convert_records_the_licence_and_refuses_bad_requests(bots, tmp_path, capsys):
    from dialogpt_zh.convert import main as convert_main

    out = tmp_path / "fwd"
    assert convert_main([str(bots["cdial"] / "forward"), "--output", str(out), "--licence", "MIT"]) == 0
    card = json.loads((out / "dialogpt_zh.json").read_text(encoding="utf-8"))
    assert card["licence"] == "MIT" and card["direction"] == "forward" and card["layout"] == "cdial"
    capsys.readouterr()
    assert convert_main([str(bots["cdial"] / "forward"), "--output", str(out)]) == 2     # exists
    assert "--overwrite" in capsys.readouterr().err
    assert convert_main([str(out), "--output", str(tmp_path / "again"), "--direction", "backward"]) == 2
    assert "card says it is a forward model" in capsys.readouterr().err
    assert convert_main([str(bots["cdial"] / "forward"), "--output", str(bots["cdial"] / "forward" / "x")]) == 2
    assert "overlap" in capsys.readouterr().err
    for name in ("-", str(tmp_path / "a\nb")):   # no file name one means: nothing is written
        assert convert_main([str(bots["cdial"] / "forward"), "--output", name]) == 2
        assert "output" in capsys.readouterr().err and not Path(name).exists()


# -------------------------------------------------------------------------------------- fine-tune + arena

def _preprocess(vocab_dir: Path, out: Path, capsys) -> dict:
    from dialogpt_zh.preprocess import main as preprocess_main

    assert preprocess_main([str(FIXTURE), "--output", str(out), "--vocab", str(vocab_dir), "--no_progress",
                            "--valid_ratio", "0.2", "--test_ratio", "0.0"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert f"vocabulary of {vocab_dir}: {manifest['vocab_size']:,d} tokens; [UNK] train " in printed
    assert manifest["unk_rate"]["train"] < 0.01
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("kind,directions", [("chitchat", ("forward", "backward")),
                                             ("cdial", ("forward", "backward")), ("uer", ("forward",)),
                                             ("chitchat-real", ("backward",))])
def test_fine_tune_from_a_lookalike(bots, kind, directions, tmp_path, capsys):
    from dialogpt_zh.train import main as train_main

    _need(bots, kind)
    manifest = _preprocess(bots[kind] / "forward", tmp_path / "store", capsys)
    assert manifest["tokenizer"]["kind"] == "vocab" and manifest["tokenizer"]["vocab_sha256"]
    assert manifest["vocab_size"] == json.loads((bots[kind] / "forward" / "config.json").read_text())["vocab_size"]
    for direction in directions:
        out = tmp_path / "bot" / direction
        assert train_main(["--data", str(tmp_path / "store"), "--output", str(out), "--init",
                           str(bots[kind] / direction), "--direction", direction, "--max_steps", "3",
                           "--eval_every", "3", "--batch_tokens", "256", "--lr", "1e-3", "--device", "cpu",
                           "--replies_only"]) == 0, capsys.readouterr().err
        card = json.loads((out / "dialogpt_zh.json").read_text(encoding="utf-8"))
        assert card["direction"] == direction and card["layout"] == LAYOUT_OF[kind]
        assert card["init"] == str(bots[kind] / direction) and card["steps"] == 3
    if "forward" in directions:    # the bot directory: forward/ (+ backward/)
        bot = _bot(tmp_path / "bot")
    else:                          # a fine-tuned backward model pairs with its source's forward model
        bot = _bot(forward=bots[kind] / "forward", backward=tmp_path / "bot" / "backward")
    assert bot.forward_layout.name == LAYOUT_OF[kind] and bot.mmi_active() == ("backward" in directions)
    assert bot.reply(HISTORY, seed=0, num_candidates=3, max_length=6).candidates


def test_train_layout_overrides_the_store_vocabulary(bots, tmp_path, capsys):
    """A store with speaker tokens trains in cdial unless --layout chitchat says otherwise; the card records
    what was used and the engine reads it; --layout cdial on a vocabulary without speakers is refused first."""
    from dialogpt_zh.train import main as train_main

    _need(bots, "cdial")
    _preprocess(bots["cdial"] / "forward", tmp_path / "store", capsys)
    common = ["--data", str(tmp_path / "store"), "--preset", "tiny", "--max_steps", "2", "--eval_every", "2",
              "--device", "cpu"]
    for layout in (None, "chitchat"):
        out = tmp_path / f"bot_{layout}" / "forward"
        flags = common + ["--output", str(out)] + (["--layout", layout] if layout else [])
        assert train_main(flags) == 0, capsys.readouterr().err
        card = json.loads((out / "dialogpt_zh.json").read_text(encoding="utf-8"))
        assert card["layout"] == (layout or "cdial")
        assert _bot(out.parent).forward_layout.name == (layout or "cdial")
    _preprocess(bots["chitchat"] / "forward", tmp_path / "plain", capsys)
    code = train_main(["--data", str(tmp_path / "plain"), "--output", str(tmp_path / "refused"), "--preset", "tiny",
                       "--max_steps", "1", "--device", "cpu", "--layout", "cdial"])
    err = capsys.readouterr().err
    assert code == 2 and "--layout" in err and "[speaker1]" in err and not (tmp_path / "refused").exists()


def test_cdial_batches_carry_token_types(bots, tmp_path, capsys):
    from dialogpt_zh.data.store import TokenStore
    from dialogpt_zh.sequence import Layout
    from dialogpt_zh.training.batches import IGNORE_INDEX, collate

    _preprocess(bots["cdial"] / "forward", tmp_path / "store", capsys)
    store = TokenStore(tmp_path / "store")
    split, tok = store.split("train"), store.tokenizer()
    layout = Layout.for_tokenizer("cdial", tok)
    batch = collate(split, [0, 1], "backward", tok.pad_token_id, replies_only=True, layout=layout)
    ids, types = layout.sequence(split.turns(0), "backward")
    assert batch.input_ids[0, :len(ids)].tolist() == ids and batch.token_type_ids[0, :len(ids)].tolist() == types
    skip = layout.first_turn_length(split.turns(0), "backward")
    assert (batch.labels[0, :skip] == IGNORE_INDEX).all() and batch.labels[0, skip] == ids[skip]
    assert split.lengths(layout.extra_tokens)[0] == len(ids)


@pytest.mark.slow
def test_the_arena_pairs_two_lookalikes(bots, tmp_path, capsys):
    from dialogpt_zh.arena import main as arena_main

    pairs = tmp_path / "pairs.json"
    code = arena_main(["--a", str(bots["chitchat"]), "--b", str(bots["cdial"]), "--data",
                       str(REPO / "corpus" / "fixtures" / "heldout.json"), "--split", "valid", "--pairs", "2",
                       "--a_set", "max_length=6", "num_candidates=3", "--b_set", "max_length=6", "num_candidates=3",
                       "--make", str(pairs), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(pairs.read_text(encoding="utf-8"))
    key = json.loads((tmp_path / "pairs.key.json").read_text(encoding="utf-8"))
    assert len(doc["pairs"]) == 2 and all(p["a"] is not None and p["b"] is not None for p in doc["pairs"])
    assert key["systems"]["A"]["model"] == str(bots["chitchat"]) and key["systems"]["B"]["model"] == str(bots["cdial"])


def test_the_arena_pairs_a_forward_model_with_a_backward_model_given_apart(bots, tmp_path, capsys):
    """GPT2-chitchat ships dialogue_model/ and mmi_model/ side by side, not forward/ + backward/: --a_backward
    pairs them (with MMI); without it A has no backward model; the key names both."""
    from dialogpt_zh.arena import main as arena_main

    forward, backward = bots["chitchat"] / "forward", bots["chitchat"] / "backward"
    pairs = tmp_path / "pairs.json"
    code = arena_main(["--a", str(forward), "--a_backward", str(backward), "--b", str(forward), "--data",
                       str(REPO / "corpus" / "fixtures" / "heldout.json"), "--split", "valid", "--pairs", "2",
                       "--a_set", "max_length=6", "num_candidates=3", "--b_set", "max_length=6", "num_candidates=3",
                       "--make", str(pairs), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    systems = json.loads((tmp_path / "pairs.key.json").read_text(encoding="utf-8"))["systems"]
    assert systems["A"]["backward"] is not None and systems["A"]["backward"]["path"] == str(backward)
    assert systems["B"]["backward"] is None and systems["A"]["forward"] == systems["B"]["forward"]
    verdicts = tmp_path / "v.txt"
    verdicts.write_text("p001 a\np002 b\n", encoding="utf-8")
    capsys.readouterr()
    assert arena_main(["--score", str(pairs), str(verdicts)]) == 0
    assert f"A ({forward} + {backward} " in capsys.readouterr().out   # the tally names the pairing
    code = arena_main(["--b_backward", str(backward), "--data", str(REPO / "corpus" / "fixtures" / "heldout.json"),
                       "--make", str(tmp_path / "no.json")])
    assert code == 2 and "--b_backward needs --b" in capsys.readouterr().err and not (tmp_path / "no.json").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_measures_a_lookalike_pair(bots, kind, tmp_path, capsys):
    """evaluate on a look-alike bot (forward + backward, its own layout): perplexity, MMI decoding and response
    selection all run; that the engine's scores are the model's own input's is test_scores_are_those_...'s."""
    import math

    from dialogpt_zh.evaluate import main as evaluate_main

    out = tmp_path / "report.json"
    code = evaluate_main(["--data", str(REPO / "corpus" / "fixtures" / "heldout.json"), "--model", str(bots[kind]),
                          "--decoders", "mmi", "--num_candidates", "3", "--max_length", "6", "--limit", "4",
                          "--seed", "0", "--output", str(out), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["cases"] > 0 and set(report["decoding"]) == {"mmi"}
    assert {"forward", "backward", "mmi"} <= set(report["selection"])
    assert math.isfinite(report["ppl"]) and report["ppl"] > 1 and report["reference_tokens"] > 0


def test_init_with_fewer_positions_than_the_windows_names_its_config(tmp_path, capsys):
    """The positions are the --init model's (before: "no train or valid window fits in 8 positions" of the store,
    the warning's advice being --n-positions, which does not size an --init model)."""
    from dialogpt_zh.train import main as train_main

    model = make_lookalike(tmp_path / "short", "chitchat", n_positions=8)
    _preprocess(model, tmp_path / "store", capsys)
    code = train_main(["--data", str(tmp_path / "store"), "--output", str(tmp_path / "out"), "--init", str(model),
                       "--max_steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"the --init model's 8 positions (n_positions in {model / 'config.json'}); preprocess with a smaller " \
           "--max-tokens" in err, err


def test_a_store_of_another_vocabulary_refuses_init(bots, tmp_path, capsys):
    from dialogpt_zh.train import main as train_main

    _preprocess(bots["chitchat"] / "forward", tmp_path / "store", capsys)
    code = train_main(["--data", str(tmp_path / "store"), "--output", str(tmp_path / "out"), "--init",
                       str(bots["cdial"] / "forward"), "--max_steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary" in err and "--vocab" in err and not (tmp_path / "out").exists()


def test_an_unreadable_tokenizer_config_is_reported_and_the_defaults_used(tmp_path, caplog):
    """uer ships tokenizer_config.json: a damaged one is not silently skipped (the BERT defaults are still
    what such a model was trained with, so it loads)."""
    import logging

    model_dir = make_lookalike(tmp_path / "uer", "uer")
    (model_dir / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        bot = _bot(model_dir)
    assert f"{model_dir / 'tokenizer_config.json'}: unreadable" in caplog.text
    assert bot.reply(HISTORY, seed=0, num_candidates=2, max_length=4).candidates
