"""Hostile input to the chat faces (engine API, rerank, interact, the web handlers, arena and feedback files):
each case ends in a clear message naming the field or file:line, never a traceback or a dead page."""
from __future__ import annotations

import io
import json
import math
from collections import Counter

import pytest

from dialogpt_zh.errors import UserError
from dialogpt_zh.interact import InteractArgs, Session

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser recurses


@pytest.fixture(scope="module")
def bot(random_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings

    return ChatBot.from_pretrained(random_bot_dir, generation=GenerationSettings(num_candidates=2, max_length=5))


# ------------------------------------------------------------------------------------------------ engine

@pytest.mark.parametrize("call", ["reply", "rerank"])
def test_an_unpaired_surrogate_is_refused_naming_the_utterance(bot, call):
    # JSON "\ud800" (rerank input, the web API) is a str that the tokenizer cannot read: it failed deep inside
    # it with a TypeError
    with pytest.raises(UserError, match=r"utterance 1 is not valid Unicode text.*U\+D800"):
        bot.reply(["你好", "\ud800好"]) if call == "reply" else bot.rerank(["你好", "\ud800好"], ["好"])


@pytest.mark.parametrize("candidates,message", [
    (["好", "\udc80"], r"candidate 1 is not valid Unicode text.*U\+DC80"),
    (["好", None], "candidate 1 is NoneType, not str"),
    ("好不好", "candidates must be a list of strings, got str"),  # was scored as three one-character candidates
    (None, "candidates must be a list of strings, got NoneType"),  # was an empty ranking
])
def test_bad_candidates_are_refused_naming_the_candidate(bot, candidates, message):
    with pytest.raises(UserError, match=message):
        bot.rerank(["你好"], candidates)
    with pytest.raises(UserError, match=message):
        bot.forward_logprobs(["你好"], candidates)


def test_a_candidate_too_long_for_the_models_is_named_not_blamed_on_max_length(bot):
    from dialogpt_zh.engine.decoding import n_positions
    from dialogpt_zh.tokenizer import decode

    positions = n_positions(bot.forward_model)
    chars = sorted(t for t in bot.tokenizer.get_vocab() if len(t) == 1 and "\u4e00" <= t <= "\u9fff")
    fits = "".join(chars[i % len(chars)] for i in range(positions))
    ids = bot._encode(fits)
    limit = positions - bot.forward_layout.extra_tokens - 1 - 2
    assert len(ids) > limit
    with pytest.raises(UserError, match=f"candidate 1 has {len(ids)} tokens; at most {limit} fit") as e:
        bot.rerank(["你好"], ["好", fits])
    assert e.value.field == "candidates"
    # the longest that fits is scored
    longest = decode(bot.tokenizer, ids[:limit])
    assert len(bot._encode(longest)) == limit
    assert len(bot.rerank(["你好"], [longest])) == 1


# ------------------------------------------------------------------------------------------------ rerank

def test_rerank_deeply_nested_json_is_a_bad_line_not_a_traceback(random_bot_dir, tmp_path, capsys):
    from dialogpt_zh.rerank import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"context": ["你好"], "candidates": ["好"]}) + "\n" + DEEP_JSON + "\n"
                   + json.dumps({"context": ["你好"], "candidates": ["\ud800"]}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code = main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {src}:2: not JSON (nested too deeply" in err and "Traceback" not in err
    assert not out.exists()  # whole or not at all
    code = main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress",
                 "--skip_bad_lines"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    assert f"{src}:2: not JSON (nested too deeply" in err and f"{src}:3: " in err and "U+D800" in err
    assert "2 bad lines skipped" in err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


def test_other_json_readers_say_nested_too_deeply(tmp_path):
    from dialogpt_zh.cli import read_config_file
    from dialogpt_zh.judging.arena import read_verdicts
    from dialogpt_zh.judging.feedback import read_feedback

    deep = tmp_path / "deep.json"
    deep.write_text("{\"pair\": " + DEEP_JSON + "}\n", encoding="utf-8")
    with pytest.raises(UserError, match="nested too deeply"):
        read_config_file(deep)
    with pytest.raises(UserError, match=f"{deep}:1: not JSON \\(nested too deeply"):
        read_verdicts(deep, ["p1"])
    counts, skipped = Counter(), []
    assert read_feedback([deep], counts, skipped) == []
    assert counts["skipped_bad_lines"] == 1 and "nested too deeply" in skipped[0]


@pytest.mark.parametrize("pair", [[1], {"a": 1}, 7])
def test_a_verdict_naming_no_pair_id_is_refused_with_its_line(tmp_path, pair):
    from dialogpt_zh.judging.arena import read_verdicts

    path = tmp_path / "v.jsonl"
    path.write_text("p1 a\n" + json.dumps({"pair": pair, "verdict": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:2: unknown pair id"):  # a list or dict was a TypeError
        read_verdicts(path, ["p1"])


# ----------------------------------------------------------------------------------------------- interact

def session(bot) -> tuple[Session, io.StringIO]:
    info = io.StringIO()
    return Session(bot, InteractArgs(seed=0), io.StringIO(), info), info


@pytest.mark.parametrize("arg", ["²", "①", "٣x"])
def test_pick_with_a_digit_int_cannot_read_is_a_usage_message(bot, arg):
    s, info = session(bot)
    assert s.handle("你好\n")
    assert s.handle(f"/pick {arg}\n")  # "²".isdigit() is True, int("²") a ValueError: the REPL died
    assert "usage: /pick N" in info.getvalue()


def test_pick_accepts_full_width_digits(bot):
    s, info = session(bot)
    s.handle("你好\n")
    s.handle("/pick １\n")
    assert "the chat continues with candidate 1" in info.getvalue()


def test_pick_with_thousands_of_digits_is_a_usage_message(bot):
    s, info = session(bot)
    s.handle("你好\n")
    assert s.handle("/pick " + "1" * 5000 + "\n")  # int() refuses over 4300 digits: a ValueError ended the REPL
    assert "usage: /pick N" in info.getvalue()


@pytest.mark.parametrize("line,said", [
    ("/pick\t2 3", "usage: /pick N"),                      # was a better reply "3" recorded in place of the pick
    ("/pick\u30002", "the chat continues with candidate 2"),  # an IME's space: was "the better reply is empty"
    ("/better\t我也好 你呢", "the chat continues with your reply: 我也好 你呢 —"),  # was only "你呢"
])
def test_a_judging_command_split_at_any_whitespace(bot, line, said):
    s, info = session(bot)
    s.handle("你好\n")
    s.handle(line + "\n")
    assert said in info.getvalue()


def test_better_with_escape_sequences_is_kept_without_them(bot):
    s, info = session(bot)
    s.handle("你好\n")
    s.handle("/better 好\x1b[2J\x1b]0;title\x07的\x00\n")  # the echo cleared the screen and set its title
    assert "the chat continues with your reply: 好的 —" in info.getvalue() and "\x1b" not in info.getvalue()
    assert s.history[-1] == "好的"


@pytest.mark.parametrize("text", ["\x00", "\u200b", "\u200f\u202e", "http://example.com"])
def test_better_that_cleans_to_nothing_is_refused_with_or_without_feedback(bot, tmp_path, text):
    # saved only with --feedback, the same reply was refused there and taken without: the bot then read an
    # empty line as its own last reply
    for feedback in (None, str(tmp_path / "fb.jsonl")):
        info = io.StringIO()
        s = Session(bot, InteractArgs(seed=0, feedback=feedback), io.StringIO(), info)
        s.handle("你好\n")
        given = list(s.history)
        s.handle(f"/better {text}\n")
        assert "the better reply is empty" in info.getvalue() and s.history == given


def test_an_unknown_command_with_escapes_is_shown_escaped(bot):
    s, info = session(bot)
    s.handle("/\x1b[2J\n")
    assert "(unknown command '/\\x1b[2J': /help lists the commands)" in info.getvalue()


@pytest.mark.parametrize("line", ["/debug on", "/reset now", "/help me", "/quit please"])
def test_a_known_command_with_an_argument_is_not_called_unknown(bot, line):
    s, info = session(bot)
    assert s.handle(line + "\n")
    word = line.split()[0]
    assert f"({word} takes no argument: type {word} alone)" in info.getvalue()
    assert "unknown command" not in info.getvalue()


# ------------------------------------------------------------------------------------------------- web

@pytest.fixture(scope="module")
def handlers(bot):
    pytest.importorskip("gradio")
    from dialogpt_zh import webapp

    app = webapp.build_app(bot, max_batch=1)
    return app, webapp.ChatHandlers(bot, bot.generation, bot.mmi_settings,
                                    {"num_candidates": 2, "top_k": 8, "top_p": 1.0, "temperature": 1.0,
                                     "repetition_penalty": 1.2, "backward_weight": 1.0, "max_history": 3},
                                    [], None, 150, 0)


VALUES = {"num_candidates": 2, "top_k": 8, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.2,
          "backward_weight": 1.0, "max_history": 3}


@pytest.mark.parametrize("name", ["num_candidates", "max_history", "top_p"])
def test_web_a_nan_setting_is_a_message_naming_it(handlers, name):
    # NaN passes Gradio's range check (JSON NaN through the API); int(round(nan)) raised outside the handler's
    # error path, so the person got Gradio's bare "error"
    _, h = handlers
    outputs, record = h.respond("你好", ["早", "早啊"], "s1", {**VALUES, name: math.nan})
    assert record is None and outputs[2] == ["早", "早啊"]
    assert name in outputs[4] and "finite number" in outputs[4]


@pytest.mark.parametrize("value,shown", [("abc", "str"), (None, "NoneType"), ([1], "list"), (True, "True"),
                                         (math.nan, "nan")])
def test_web_sliders_refuse_values_that_are_no_number_naming_the_setting(handlers, value, shown):
    import gradio as gr

    app, _ = handlers
    sliders = {b.elem_id: b for b in app.blocks.values() if isinstance(b, gr.Slider)}
    slider = sliders["ctl_top_k"]
    with pytest.raises(gr.Error, match=f"top_k: must be a finite number, got {shown}"):
        slider.preprocess(value)  # gr.Slider's own: a TypeError inside Gradio, an unnamed error on the page
    assert slider.preprocess(5) == 5
    with pytest.raises(gr.Error, match="greater than maximum"):  # Gradio's range check still applies
        slider.preprocess(10 ** 9)


def test_web_an_input_error_is_logged_without_a_traceback(handlers, caplog):
    _, h = handlers
    with caplog.at_level("WARNING"):
        outputs, _ = h.respond("\x00", [], "s2", VALUES)
    assert "the latest utterance is empty" in outputs[4]
    assert "reply refused (session s2)" in caplog.text
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("elem_id,name", [("message", "message"), ("better", "better")])
@pytest.mark.parametrize("value,shown", [(["你好"], "list"), ({"a": 1}, "dict"), (12345, "int"), (True, "bool")])
def test_web_text_boxes_refuse_values_that_are_no_text_naming_the_box(handlers, elem_id, name, value, shown):
    import gradio as gr

    app, _ = handlers
    (box,) = [b for b in app.blocks.values() if isinstance(b, gr.Textbox) and b.elem_id == elem_id]
    with pytest.raises(gr.Error, match=f"{name}: must be text, got {shown}"):
        box.preprocess(value)  # gr.Textbox's own str(): ["你好"] was chatted with, or saved, as "['你好']"
    assert box.preprocess("你好") == "你好" and box.preprocess(None) is None


def test_web_a_click_on_a_table_older_than_the_turn_is_not_recorded_for_another_candidate(bot, tmp_path):
    # The reply handler stores the new turn before the browser draws its table: a click in that moment named
    # rank 2 of the old table and was recorded (and continued the chat) as rank 2 of the new turn
    import dataclasses

    import gradio as gr

    from dialogpt_zh import webapp
    from dialogpt_zh.webui.view import candidates_table

    feedback = tmp_path / "fb.jsonl"
    app = webapp.build_app(bot, max_batch=1, feedback=feedback)
    (pick,) = [f.fn for f in app.fns.values() if any(t[1] == "select" for t in f.targets)]
    old = bot.reply(["你好"], seed=0)
    new = dataclasses.replace(old, candidates=[dataclasses.replace(c, text=c.text + "新") for c in old.candidates])
    turn = {"given": ["你好"], "reply": new, "settings": {}}
    shown = candidates_table(old)[1]  # the old table's row 2, as the browser sends it
    outputs = pick(turn, gr.SelectData(None, {"index": [1, 2], "value": shown[2], "row_value": shown}))
    assert "重新点选" in outputs[-1] and feedback.read_text(encoding="utf-8") == ""
    current = candidates_table(new)[1]
    outputs = pick(turn, gr.SelectData(None, {"index": [1, 2], "value": current[2], "row_value": current}))
    assert outputs[2] == ["你好", new.candidates[1].text]
    assert json.loads(feedback.read_text(encoding="utf-8"))["picked_rank"] == 2


@pytest.fixture
def arena_page(bot, tmp_path):
    """The page with an arena tab over three pairs: its load handler and its verdict buttons' handlers."""
    from dialogpt_zh import webapp
    from dialogpt_zh.judging.arena import write_pairs

    pairs = [{"id": f"p{i}", "context": ["*星星* 和 _月亮_", "1. 好"], "a": f"a{i}", "b": f"b{i}"} for i in range(3)]
    write_pairs(tmp_path / "pairs.json", tmp_path / "pairs.key.json", pairs, {p["id"]: "AB" for p in pairs},
                {s: {"model": s, "settings": {}} for s in "AB"}, {})
    verdicts = tmp_path / "verdicts.jsonl"
    app = webapp.build_app(bot, max_batch=1, arena_pairs=tmp_path / "pairs.json", arena_verdicts=verdicts)
    (load,) = [f.fn for f in app.fns.values() if f.fn.__name__ == "show_next"]
    ids = {i: str(getattr(app.blocks.get(i), "elem_id", "")) for f in app.fns.values() for i, _ in f.targets}
    vote = {ids[t[0]][len("arena_vote_"):]: f.fn for f in app.fns.values() for t in f.targets
            if ids[t[0]].startswith("arena_vote_")}
    return load, vote, verdicts


def test_web_arena_two_judges_voting_on_one_pair_keep_the_first_verdict(arena_page):
    load, vote, verdicts = arena_page
    first, second = load(), load()  # two tabs shown the same open pair
    assert first[-1] == second[-1] == "p0"
    assert vote["a"](first[-1])[-1] == "p1"
    shown = vote["b"](second[-1])  # was appended too: on reading, the later verdict replaced the first judge's
    assert "刚被别的评判者评过" in shown[0] and shown[-1] == "p1"
    assert [json.loads(line)["verdict"] for line in verdicts.read_text(encoding="utf-8").splitlines()] == ["a"]


def test_web_arena_a_verdicts_file_broken_while_serving_is_a_message_not_an_error(arena_page, caplog):
    load, vote, verdicts = arena_page
    verdicts.write_text("p0 maybe\n", encoding="utf-8")  # edited by hand: read_verdicts' UserError escaped
    for shown in (load(), vote["a"]("p1")):
        assert "评判记录文件读取出错" in shown[0] and shown[-1] is None
    assert "verdict must be a, b, = or s" in caplog.text
    assert verdicts.read_text(encoding="utf-8") == "p0 maybe\n"


def test_web_arena_context_is_shown_as_said_not_as_markdown(arena_page):
    load, _, _ = arena_page
    assert load()[1] == "**上文**\n\n> \\*星星\\* 和 \\_月亮\\_\n> 1\\. 好"  # was emphasis and a list
