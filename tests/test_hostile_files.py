"""Hostile files handed to the faces (arena pairs, keys and verdicts; feedback JSON Lines; rerank input): a
clear message naming the file and line or field, never a traceback, a verdict silently ignored or counted
twice. (Deep nesting and surrogates: test_hostile_faces.py.)"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dialogpt_zh import arena
from dialogpt_zh.errors import UserError
from dialogpt_zh.judging import arena as arena_lib

BOM = b"\xef\xbb\xbf"


# ------------------------------------------------------------------------------------------------ arena

@pytest.fixture
def pairs(tmp_path) -> Path:
    """A pairs file of three pairs (p1: a is A's, p2 and p3: a is B's) and its key beside it; no bot."""
    items = [{"id": f"p{i}", "context": ["你好"], "a": f"回复{i}a", "b": f"回复{i}b"} for i in (1, 2, 3)]
    systems = {s: {"model": s.lower(), "settings": {}} for s in "AB"}
    path = tmp_path / "pairs.json"
    arena_lib.write_pairs(path, arena_lib.default_key_path(path), items, {"p1": "AB", "p2": "BA", "p3": "BA"},
                          systems, {})
    return path


def score(*argv: str | Path) -> tuple[int, str]:
    out = io.StringIO()
    return arena.main(["--score", *map(str, argv)], stdin=io.StringIO(), stdout=out), out.getvalue()


@pytest.mark.parametrize("body", [b"p1 a\r\np2 a\r\n",
                                  b'{"pair": "p1", "verdict": "a"}\n{"pair": "p2", "verdict": "a"}\n'])
def test_verdicts_with_a_bom_are_read(pairs, tmp_path, capsys, body):
    # a Windows editor's BOM stuck to the first id ('\ufeffp1': "unknown pair id") or hid the JSON line
    verdicts = tmp_path / "v.txt"
    verdicts.write_bytes(BOM + body)
    code, out = score(pairs, verdicts)
    assert code == 0, capsys.readouterr().err
    assert "A (a): 1 wins" in out and "B (b): 1 wins" in out


def test_json_verdicts_of_another_run_are_refused_when_scoring(pairs, tmp_path, capsys):
    # the ids p1.. are the same in every pairs file: only the run tells a verdict made for other pairs
    verdicts = tmp_path / "v.jsonl"
    verdicts.write_text('{"pair": "p1", "verdict": "a", "run": "0123456789abcdef"}\n', encoding="utf-8")
    assert score(pairs, verdicts)[0] == 2
    assert f"{verdicts}:1: this verdict belongs to another arena run" in capsys.readouterr().err


def test_the_same_verdicts_file_twice_is_not_two_judges(pairs, tmp_path, capsys):
    verdicts = tmp_path / "v.txt"
    verdicts.write_text("p1 a\np2 b\n", encoding="utf-8")
    other = tmp_path / "sub" / ".." / "v.txt"
    (tmp_path / "sub").mkdir()
    assert score(pairs, verdicts, other)[0] == 2
    assert f"the verdicts file {other} is given twice (as {verdicts})" in capsys.readouterr().err


def test_a_verdicts_path_that_is_a_directory_is_a_message(pairs, tmp_path, capsys):
    out = io.StringIO()
    for argv in (["--score", str(pairs), str(tmp_path)], ["--judge", str(pairs), "--verdicts", str(tmp_path)]):
        assert arena.main(argv, stdin=io.StringIO(), stdout=out) == 2
        assert f"error: {tmp_path}: cannot read the verdicts file: Is a directory" in capsys.readouterr().err


def edit_pairs(path: Path, edit) -> None:
    """Edit the pairs and give them a matching run id (as a hand-made pairs file would have)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    edit(doc["pairs"])
    doc["run"] = arena_lib.run_id(doc["pairs"])
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("edit,message", [
    (lambda ps: ps[1].update(id="p1"), "pair 1: id 'p1' is used by an earlier pair"),  # took p1's verdict
    (lambda ps: ps[0].update(id="#p1"), "pair 0: id '#p1' must be one word"),  # its text verdict is a comment
    (lambda ps: ps[0].update(id="p 1"), "pair 0: id 'p 1' must be one word"),
    (lambda ps: ps[0].update(id=""), "pair 0: id '' must be one word"),
    (lambda ps: ps[0].update(context=["你好", None]), r"pair 0 needs 'id', 'context' \(a list of strings\)"),
    (lambda ps: ps.clear(), "holds no pairs"),
])
def test_pairs_a_verdict_cannot_name_are_refused(pairs, tmp_path, edit, message):
    edit_pairs(pairs, edit)
    with pytest.raises(UserError, match=message) as e:
        arena_lib.load_pairs(pairs)
    assert e.value.path == str(pairs) and e.value.field == "pairs"


@pytest.mark.parametrize("edit,field", [
    (lambda k: k["order"].pop("p2"), "order"),      # KeyError in the tally
    (lambda k: k["order"].update(p9="AB"), "order"),  # a key for other pairs
    (lambda k: k["order"].update(p2="XY"), "order"),  # the verdict counted for no system
    (lambda k: k.pop("order"), "order"),
    (lambda k: k.pop("systems"), "systems"),
    (lambda k: k["systems"]["A"].update(settings=None), "systems"),
    (lambda k: k.update(sources="x"), "sources"),
])
def test_a_key_that_does_not_fit_the_pairs_is_refused(pairs, tmp_path, capsys, edit, field):
    key_path = arena_lib.default_key_path(pairs)
    key = json.loads(key_path.read_text(encoding="utf-8"))
    edit(key)
    key_path.write_text(json.dumps(key), encoding="utf-8")
    verdicts = tmp_path / "v.txt"
    verdicts.write_text("p1 a\np2 a\n", encoding="utf-8")
    assert score(pairs, verdicts)[0] == 2
    err = capsys.readouterr().err
    assert f"error: {key_path} (field '{field}'): " in err and "Traceback" not in err


def test_the_key_is_not_the_make_file_and_verdicts_are_not_appended_to_pairs_or_key(pairs, tmp_path, capsys):
    out = io.StringIO()
    target = tmp_path / "new.json"
    # the pairs, written after the key, replaced it; refused before any bot is loaded
    assert arena.main(["--make", str(target), "--key", str(target)], stdin=io.StringIO(), stdout=out) == 2
    assert f"{target} (field 'key'): is the --make file" in capsys.readouterr().err and not target.exists()
    key = arena_lib.default_key_path(pairs)
    for verdicts in (pairs, key):
        before = verdicts.read_bytes()
        assert arena.main(["--judge", str(pairs), "--verdicts", str(verdicts)], stdin=io.StringIO("a\n"),
                          stdout=out) == 2
        assert "(field 'verdicts'): would write over or inside the input" in capsys.readouterr().err
        assert verdicts.read_bytes() == before


def test_pairs_and_key_saved_with_a_bom_are_read_and_a_directory_is_named(pairs, tmp_path, capsys):
    key = arena_lib.default_key_path(pairs)
    for path in (pairs, key):  # opened and saved again in a Windows editor: "Unexpected UTF-8 BOM"
        path.write_bytes(BOM + path.read_bytes())
    verdicts = tmp_path / "v.txt"
    verdicts.write_text("p1 a\n", encoding="utf-8")
    code, out = score(pairs, verdicts)
    assert code == 0 and "A (a): 1 wins" in out, capsys.readouterr().err
    folder = tmp_path / "folder"
    folder.mkdir()
    assert score(folder, verdicts)[0] == 2  # was "pairs file not found"
    assert f"error: {folder}: cannot read the pairs file: Is a directory" in capsys.readouterr().err
    assert score(pairs, verdicts, "--key", folder)[0] == 2
    assert f"error: {folder}: cannot read the key file: Is a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- feedback

def feedback_line(**fields) -> str:
    from dialogpt_zh.judging.feedback import FORMAT, VERSION

    rec = {"format": FORMAT, "version": VERSION, "kind": "pick", "context": ["你好"], "reply": "候选1",
           "picked_rank": 1, "candidates": [{"rank": 1, "text": "候选1"}, {"rank": 2, "text": "候选2"}],
           "mmi": True, **fields}
    return json.dumps(rec, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("fields,why", [
    ({"version": 2}, "feedback record version 2; this version reads version 1"),  # was read as version 1
    # both went into the rank histogram
    ({"kind": "better", "picked_rank": True}, "field 'picked_rank' must be an integer >= 1 or null, got True"),
    ({"kind": "better", "picked_rank": -3}, "field 'picked_rank' must be an integer >= 1 or null, got -3"),
    ({"picked_rank": 7}, "'picked_rank' 7 is the rank of none of its 2 candidates"),  # rank mean 7 of 2
    # a candidate's rank that is a list: a set of the ranks was a TypeError traceback
    ({"candidates": [{"rank": [1], "text": "候选1"}]}, "'picked_rank' 1 is the rank of none of its 1 candidates"),
    ({"mmi": "false"}, "field 'mmi' must be true or false, got 'false'"),  # counted as a pick with MMI on
])
def test_feedback_records_the_statistics_would_misread_are_skipped_with_the_reason(tmp_path, fields, why):
    from collections import Counter

    from dialogpt_zh.judging.feedback import read_feedback

    path = tmp_path / "f.jsonl"
    path.write_text(feedback_line(context=["早"]) + feedback_line(**fields), encoding="utf-8")
    counts, skipped = Counter(), []
    assert len(read_feedback([path], counts, skipped)) == 1
    assert skipped == [f"{path}:2: {why}"] and counts["skipped_bad_lines"] == 1


def test_feedback_export_reads_a_bom_and_refuses_a_file_given_twice(tmp_path, capsys):
    from dialogpt_zh.feedback import main

    path = tmp_path / "f.jsonl"
    path.write_bytes(BOM + feedback_line().encode("utf-8"))  # line 1 was skipped as "not JSON"
    out = tmp_path / "out"
    assert main(["export", str(path), "--output", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["judgements"] == 1 and stats["counts"].get("skipped_bad_lines", 0) == 0
    # the same file twice counted every judgement twice in the statistics
    again = tmp_path / "." / "f.jsonl"
    assert main(["export", str(path), str(again), "--output", str(out), "--overwrite"]) == 2
    assert f"error: {again} (field 'files'): given twice (as {path})" in capsys.readouterr().err


def test_feedback_export_skips_a_judgement_whose_context_cleans_to_nothing(tmp_path):
    # the reply alone was written to train.txt as a one-utterance "session" and counted as one
    from dialogpt_zh.feedback import main

    path = tmp_path / "f.jsonl"
    path.write_text(feedback_line(context=["\u200b", "http://example.com"]) + feedback_line(), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["export", str(path), "--output", str(out)]) == 0
    assert (out / "train.txt").read_text(encoding="utf-8") == "你好\n候选1\n"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["sessions_written"] == 1 and stats["counts"]["skipped_empty_context"] == 1
    assert stats["skipped"] == [f"{path}:1: the context is empty after cleaning"]


# ----------------------------------------------------------------------------------------------- rerank

def test_rerank_reads_a_bom_and_a_line_not_utf8_is_a_bad_line(random_bot_dir, tmp_path, capsys):
    from dialogpt_zh.rerank import main

    good = json.dumps({"context": ["你好"], "candidates": ["好"]}, ensure_ascii=False).encode("utf-8")
    src = tmp_path / "in.jsonl"
    src.write_bytes(BOM + good + b"\n" + good.replace("好".encode(), b"\xff", 1) + b"\n" + good + b"\n")
    out = tmp_path / "out.jsonl"
    argv = [str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"]
    assert main(argv) == 2  # line 1 was "not JSON (Unexpected UTF-8 BOM"
    assert f"error: {src}:2: not UTF-8 text (invalid start byte at byte 17)" in capsys.readouterr().err
    assert main([*argv, "--skip_bad_lines"]) == 0  # the bad byte stopped the run even so
    err = capsys.readouterr().err
    assert f"skipped {src}:2: not UTF-8 text" in err and "reranked 2 records" in err


def test_rerank_stdin_not_utf8_is_named_as_such(random_bot_dir, monkeypatch, capsys):
    from dialogpt_zh.rerank import main

    # as Python's own stdin decodes: the byte became a surrogate, refused deep in the engine as "not valid
    # Unicode text (an unpaired surrogate U+DCFF", which the person never typed
    line = json.dumps({"context": ["你好"], "candidates": ["好"]}, ensure_ascii=False).encode("utf-8")
    stdin = io.TextIOWrapper(io.BytesIO(line.replace("你".encode(), b"\xff") + b"\n"), encoding="utf-8",
                             errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["-", "--output", "-", "--model", str(random_bot_dir), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "error: <stdin>:1: not UTF-8 text (invalid start byte at byte 14)" in err


def test_rerank_scores_thousands_of_candidates_in_bounded_batches(random_bot_dir, monkeypatch):
    # all given candidates went through the LM head in one batch: a vocabulary-wide row per scored token
    # (2,000 candidates of 30 characters took 3.7 GB; a few thousand more, all memory)
    from dialogpt_zh.engine import bot as bot_module
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.engine.decoding import SCORE_BATCH_TOKENS

    bot = ChatBot.from_pretrained(random_bot_dir)
    scored_at_once: list[int] = []
    real = bot_module.token_logprobs

    def spy(model, hidden, targets):
        scored_at_once.append(hidden.shape[0])
        return real(model, hidden, targets)

    monkeypatch.setattr(bot_module, "token_logprobs", spy)
    chars = "你好我是谁今天天气很不错吃饭了吗喜欢看电影打篮球睡觉工作学习"
    candidates = [chars[i % 7:] + chars[:i % 5] for i in range(600)]  # about 20,000 tokens in all
    ranked = bot.rerank(["你喜欢什么运动"], candidates)
    assert sorted(c.rank for c in ranked) == list(range(1, 601))
    assert max(scored_at_once) <= SCORE_BATCH_TOKENS and sum(scored_at_once) > 2 * SCORE_BATCH_TOKENS
    by_text = {c.text: c for c in ranked}
    for text in candidates[:3]:  # a batch scores each row alone: the same scores as one candidate at a time
        (alone,) = bot.rerank(["你喜欢什么运动"], [text])
        assert by_text[text].forward_logprob == pytest.approx(alone.forward_logprob, abs=1e-4)
        assert by_text[text].backward_logprob == pytest.approx(alone.backward_logprob, abs=1e-4)


def test_score_batches_keep_the_padded_size_within_the_budget():
    from dialogpt_zh.engine.decoding import score_batches

    assert score_batches([]) == []
    assert score_batches([3, 3, 3, 3], budget=6) == [slice(0, 2), slice(2, 4)]
    assert score_batches([2, 2, 9, 2], budget=6) == [slice(0, 2), slice(2, 3), slice(3, 4)]  # too long: alone
    assert score_batches([1, 5, 1], budget=10) == [slice(0, 2), slice(2, 3)]  # padded: 2 rows x 5


@pytest.mark.parametrize("empty", ["", "   ", "\u200b"])
def test_an_empty_candidate_is_refused_not_ranked_best(random_bot_dir, tmp_path, capsys, empty):
    # scored as [SEP] alone, an empty reply is short enough to rank first: rerank wrote "best": ""
    from dialogpt_zh.rerank import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"context": ["你好"], "candidates": ["你好啊", empty]}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"]) == 2
    assert f"error: {src}:1: candidates: candidate 1 is empty after cleaning" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ corpus files (--data)

def test_a_corpus_file_reached_through_two_inputs_is_refused(tmp_path):
    # read twice, every session counted twice: evaluate's cases (and a case's "other session" distractor could
    # be its own copy), the arena's draw
    from dialogpt_zh.data.readers import scan_inputs

    folder = tmp_path / "held"
    folder.mkdir()
    data = folder / "heldout.txt"
    data.write_text("你好\n你也好\n\n在吗\n在的\n", encoding="utf-8")
    for inputs in ([data, data], [folder, data], [data, tmp_path / "held" / ".." / "held"]):
        with pytest.raises(UserError, match=f"would read {folder}.*heldout.txt a second time") as e:
            scan_inputs(inputs)
        assert e.value.path == str(inputs[1])
    with pytest.raises(UserError, match="a second time"):
        arena_lib.draw_contexts([str(data), str(data)], 2, 0, split="all")
    assert len(arena_lib.draw_contexts([str(data)], 2, 0, split="all")) == 2


def test_the_arena_says_why_it_drew_fewer_pairs_than_asked(tmp_path, caplog):
    # 3 of 5 sessions malformed: "wrote 2 blinded pairs" for --pairs 5, the 3 dropped without a word
    data = tmp_path / "mixed.json"
    data.write_text('[["你好", "你也好"], [1, 2], ["在吗", null], "x", ["吃了吗", "吃了"]]', encoding="utf-8")
    with caplog.at_level("INFO"):
        assert len(arena_lib.draw_contexts([str(data)], 5, 0, split="all")) == 2
    assert f"only 2 usable multi-turn sessions in {data} with split 'all', so 2 pairs, not 5" in caplog.text
    assert "record_malformed 3" in caplog.text
    with pytest.raises(UserError, match=r"no usable multi-turn session .* with split 'test' \(.*"
                                        r"record_malformed 3, session_not_in_split \(None\) 2"):
        arena_lib.draw_contexts([str(data)], 5, 0, split="test")


@pytest.mark.parametrize("value,why", [("NaN", "not JSON (NaN is no JSON value)"),
                                       ("-Infinity", "not JSON (-Infinity is no JSON value)"),
                                       ("1e999", "the number 1e999 is beyond a float's range")])
def test_rerank_refuses_numbers_json_has_not(random_bot_dir, tmp_path, capsys, value, why):
    # Python's reader takes them; kept in the record, they were written out as NaN / Infinity: no JSON
    from dialogpt_zh.rerank import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"context": ["你好"], "candidates": ["好"], "weight": %s}\n' % value, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"]) == 2
    assert f"error: {src}:1: {why}" in capsys.readouterr().err and not out.exists()


def test_rerank_a_directory_as_input_is_named_as_such(tmp_path, capsys):
    from dialogpt_zh.rerank import main

    assert main([str(tmp_path), "--output", "-"]) == 2  # was "input file not found"
    assert f"error: {tmp_path}: is a directory, not a JSON Lines file" in capsys.readouterr().err


def test_full_width_verdicts_of_a_chinese_input_method_are_read(pairs, tmp_path, capsys):
    # 'ａ' looks like 'a': it was refused ("verdict must be a, b, = or s, got 'ａ'"), or asked again at the prompt
    verdicts = tmp_path / "v.txt"
    verdicts.write_text("p1　ａ\np2 Ｂ\np3 ＝\n", encoding="utf-8")  # an ideographic space, too
    code, out = score(pairs, verdicts)
    assert code == 0, capsys.readouterr().err
    assert "A (a): 2 wins" in out and "B (b): 0 wins" in out and "ties: 1" in out  # p2: b is A's
    judged = tmp_path / "j.jsonl"
    out_text = io.StringIO()
    assert arena.main(["--judge", str(pairs), "--verdicts", str(judged)], stdin=io.StringIO("ｂ\n＝\nｑ\n"),
                      stdout=out_text) == 0
    assert "please answer" not in out_text.getvalue()
    assert [json.loads(x)["verdict"] for x in judged.read_text(encoding="utf-8").splitlines()] == ["b", "="]
