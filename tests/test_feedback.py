"""Judgements: /pick and /better in interact, the feedback record and its appender, `feedback export`."""
from __future__ import annotations

import io
import json
import multiprocessing
import re
import subprocess
import sys
import threading

import pytest

from dialogpt_zh.feedback import main as feedback_main
from dialogpt_zh.interact import InteractArgs, chat
from dialogpt_zh.judging.feedback import FORMAT, JsonlAppender


def run_cli(args, stdin: str, timeout: int = 600):  # a hang guard, generous for a loaded machine
    return subprocess.run([sys.executable, "-m", "dialogpt_zh.interact", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout)


def debug_tables(stderr: str) -> list[dict[int, str]]:
    """rank -> text of every /debug table in the output, in order."""
    tables, current = [], None
    for line in stderr.splitlines():
        if re.match(r"\s+rank\s+score", line):
            current = {}
            tables.append(current)
            continue
        # rank, score, fwd ('-': not computed), bwd ('-' with MMI off), tok, ctx ('-' with MMI off), n, source,
        # sim, text
        m = re.match(r"\s+(\d+)\s+-?[\d.]+\s+(?:-?[\d.]+|-)\s+(?:-?[\d.]+|-)\s+\d+\s+(?:\d+|-)\s+\d+\s+\S+\s+"
                     r"(?:[\d.]+|-)  (.*)$", line)
        if m and current is not None:
            current[int(m.group(1))] = m.group(2)
    return tables


def test_piped_interact_pick_and_better_write_feedback(random_bot_dir, tmp_path):
    """The real entry point, piped: /pick and /better are commands, judgements land in --feedback."""
    fb = tmp_path / "fb" / "feedback.jsonl"
    flags = ["--model", str(random_bot_dir), "--seed", "3", "--num_candidates", "4", "--max_length", "6",
             "--debug", "--feedback", str(fb)]
    r = run_cli(flags, "你好\n/pick 2\n在干嘛\n/better 我的电话是13812345678\n/pick 99\n/frob\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2                   # commands print nothing on stdout
    assert "no candidate 99" in r.stderr and "unknown command /frob" in r.stderr
    tables = debug_tables(r.stderr)
    assert len(tables) == 2 and len(tables[0]) >= 2
    records = [json.loads(line) for line in fb.read_text(encoding="utf-8").splitlines()]
    assert [rec["kind"] for rec in records] == ["pick", "better"]
    pick, better = records
    assert pick["format"] == FORMAT and pick["source"] == "interact"
    assert pick["context"] == ["你好"] and pick["picked_rank"] == 2 and pick["reply"] == tables[0][2]
    assert [c["rank"] for c in pick["candidates"]] == list(range(1, len(tables[0]) + 1))
    assert [c["text"] for c in pick["candidates"]] == [tables[0][k] for k in sorted(tables[0])]
    assert all(c["backward_logprob"] is not None for c in pick["candidates"]) and pick["mmi"] is True
    assert pick["seed"] == 3 and pick["settings"]["num_candidates"] == 4 and pick["settings"]["max_length"] == 6
    assert pick["models"]["forward"]["path"].endswith("forward") and len(pick["models"]["forward"]["sha256"]) == 16
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", pick["time"])
    assert not {"session", "session_hash", "ip", "user_agent"} & set(pick)
    # the chat continued with the picked candidate: it is in the second judgement's context
    assert better["context"] == ["你好", tables[0][2], "在干嘛"]
    assert better["reply"] == "我的电话是【电话】" and better["picked_rank"] is None  # masked
    assert "13812345678" not in fb.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bot(random_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings

    return ChatBot.from_pretrained(random_bot_dir, generation=GenerationSettings(num_candidates=3, max_length=6))


def test_history_continues_with_the_choice_and_nothing_saved_without_feedback(bot, monkeypatch, tmp_path):
    seen = []
    real_reply = bot.reply

    def spy(history, **kw):
        seen.append(list(history))
        reply = real_reply(history, **kw)
        seen.append(reply)
        return reply

    monkeypatch.setattr(bot, "reply", spy)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    chat(bot, InteractArgs(seed=0), stdin=io.StringIO("/pick 1\n一\n/better 好的呀\n/better 不对\n二\n/pick 1\n三\n"),
         stdout=out, stderr=err)
    assert "nothing to judge yet" in err.getvalue()
    assert seen[2] == ["一", "不对", "二"]                    # the second judgement replaced the first
    second = seen[3]
    assert seen[4] == ["一", "不对", "二", second.candidates[0].text, "三"]
    assert "not saved: no --feedback" in err.getvalue()
    assert list(tmp_path.iterdir()) == []


def _append_many(path: str, worker: int, n: int) -> None:
    w = JsonlAppender(path)
    for i in range(n):
        w.append({"worker": worker, "i": i, "text": "长" * (2000 + worker)})  # > PIPE_BUF, to test the lock
    w.close()


def test_appender_keeps_lines_whole_across_threads_and_processes(tmp_path):
    path = tmp_path / "fb.jsonl"
    path.write_text('{"hand": "edited, no final newline"}', encoding="utf-8")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 30)) for w in range(3)]
    threads = [threading.Thread(target=_append_many, args=(str(path), 10 + w, 30)) for w in range(3)]
    for t in procs + threads:
        t.start()
    for t in procs + threads:
        t.join()
    assert all(p.exitcode == 0 for p in procs)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[0] == {"hand": "edited, no final newline"}
    got = sorted((r["worker"], r["i"]) for r in records[1:])
    assert got == sorted((w, i) for w in (0, 1, 2, 10, 11, 12) for i in range(30))
    assert all(r["text"] == "长" * (2000 + r["worker"]) for r in records[1:])


def record(context, reply, kind="pick", rank=1, mmi=True, n=3):
    cands = [{"rank": k, "text": f"候选{k}", "forward_logprob": -1.0 * k, "backward_logprob": -2.0,
              "score": -k} for k in range(1, n + 1)]
    return {"format": FORMAT, "version": 1, "kind": kind, "context": context, "reply": reply,
            "picked_rank": rank, "candidates": cands, "mmi": mmi, "settings": {}, "models": {}}


def write_lines(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False)) + "\n"
                            for ln in lines), encoding="utf-8")


def test_export_writes_corpus_and_stats(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_lines(a, [
        record(["你好"], "候选2", rank=2),
        "{broken json",
        record(["你好", "候选2", "在干嘛"], "候选1", rank=1),           # continues the first: it is contained
        {"format": "other"},
        record(["吃了吗"], "吃过了 邮箱 a.b@example.com", kind="better", rank=None),
        record(["晚安"], "候选3", rank=3, mmi=False),
    ])
    write_lines(b, [record(["吃了吗"], "吃过了 邮箱 a.b@example.com", kind="better", rank=None),  # duplicate
                    record(["x"], "y", kind="pick", rank=0)])
    out = tmp_path / "corpus"
    assert feedback_main(["export", str(a), str(b), "--output", str(out)]) == 0
    text = (out / "train.txt").read_text(encoding="utf-8")
    assert text == "你好\n候选2\n在干嘛\n候选1\n\n吃了吗\n吃过了 邮箱 【邮箱】\n\n晚安\n候选3\n"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["picks"] == 3 and stats["better"] == 2 and stats["judgements"] == 5
    assert stats["first_choice_picked_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert stats["mmi_first_choice_picked_rate"] == 0.5 and stats["picks_with_mmi_on"] == 2
    assert stats["picked_rank_mean"] == 2.0 and stats["picked_rank_histogram"] == {"1": 1, "2": 1, "3": 1}
    assert stats["counts"]["skipped_bad_lines"] == 3
    assert stats["counts"]["sessions_duplicate"] == 1 and stats["counts"]["sessions_contained_in_longer"] == 1
    assert stats["sessions_written"] == 3
    assert stats["skipped"][0].startswith(f"{a}:2: not JSON")
    assert stats["skipped"][1].startswith(f"{a}:4: not a feedback record")
    assert stats["skipped"][2].startswith(f"{b}:2: a pick needs an integer 'picked_rank'")
    assert f"{a}:2" in capsys.readouterr().err

    # the preprocessor's own reader reads the corpus back as the same sessions
    from collections import Counter

    from dialogpt_zh.data.readers import iter_clean_sessions

    sessions = [s.turns for s in iter_clean_sessions(out / "train.txt", counters=Counter())]
    assert sessions == [["你好", "候选2", "在干嘛", "候选1"], ["吃了吗", "吃过了 邮箱 【邮箱】"], ["晚安", "候选3"]]

    before = (out / "train.txt").read_bytes()
    assert feedback_main(["export", str(a), "--output", str(out)]) == 2      # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err and (out / "train.txt").read_bytes() == before
    assert feedback_main(["export", str(b), "--output", str(out), "--overwrite"]) == 0
    assert (out / "train.txt").read_text(encoding="utf-8") == "吃了吗\n吃过了 邮箱 【邮箱】\n"


def test_exported_directory_is_preprocessed_as_a_directory(tmp_path, capsys, caplog):
    """`feedback export --output DIR` then `preprocess DIR`: the corpus is read, the export's stats.json beside
    it is skipped by name (and the run says so), and the result is a token store."""
    import logging

    from dialogpt_zh import preprocess
    from dialogpt_zh.data.store import TokenStore

    fb = tmp_path / "fb.jsonl"
    write_lines(fb, [record([f"第{i}句你好", f"候选{i}"], f"回答{i}", rank=1 + i % 3) for i in range(12)])
    out = tmp_path / "corpus"
    assert feedback_main(["export", str(fb), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "train.txt"]
    caplog.set_level(logging.INFO)
    store = tmp_path / "store"
    code = preprocess.main([str(out), "--output", str(store), "--no_progress", "--valid_ratio", "0.25",
                            "--test_ratio", "0"])
    assert code == 0, capsys.readouterr().err
    assert f"skipped {out / 'stats.json'}: the statistics" in caplog.text
    opened = TokenStore(store)
    (given,) = opened.manifest["inputs"]
    assert [f["path"] for f in given["files"]] == [str(out / "train.txt")]
    assert given["skipped_files"] == [str(out / "stats.json")]
    written = json.loads((out / "stats.json").read_text(encoding="utf-8"))["sessions_written"]
    assert written == 12 and sum(st["sessions"] for st in opened.manifest["counts"]["by_split"].values()) == written


def test_export_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    write_lines(bad, ["not json", "[1, 2]"])
    assert feedback_main(["export", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "no usable judgement" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert feedback_main(["export", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "missing.jsonl: feedback file not found" in capsys.readouterr().err
    inside = tmp_path / "o2"
    inside.mkdir()
    write_lines(inside / "fb.jsonl", [record(["a"], "b")])
    assert feedback_main(["export", str(inside / "fb.jsonl"), "--output", str(inside), "--overwrite"]) == 2
    assert "contains the input" in capsys.readouterr().err and (inside / "fb.jsonl").is_file()
    assert feedback_main(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as e:
        feedback_main(["export", "--help"])
    assert e.value.code == 0 and "--overwrite" in capsys.readouterr().out


@pytest.mark.slow
def test_round_trip_feedback_to_fine_tuned_bot(random_bot_dir, tmp_path, monkeypatch):
    """README's round trip with tiny numbers: chat with judgements -> export -> preprocess with the bot's
    vocabulary -> `train --init` its forward model for 2 steps -> the result loads and chats."""
    from dialogpt_zh import preprocess, train
    from dialogpt_zh.engine.bot import ChatBot

    monkeypatch.chdir(tmp_path)
    bot = ChatBot.from_pretrained(random_bot_dir)
    out, err = io.StringIO(), io.StringIO()
    chat(bot, InteractArgs(seed=0, feedback="fb.jsonl"), stdin=io.StringIO(
        "你好\n/pick 1\n今天天气好\n/better 是啊，出去走走吧\n/reset\n晚安\n/better 晚安，明天见\n"
        "你喜欢什么\n/better 喜欢看电影\n"), stdout=out, stderr=err)
    assert len((tmp_path / "fb.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    assert feedback_main(["export", "fb.jsonl", "--output", "corpus"]) == 0
    assert preprocess.main(["corpus/train.txt", "--vocab", str(random_bot_dir / "forward"), "--valid_ratio", "0.3",
                            "--test_ratio", "0", "--output", "store", "--no_progress"]) == 0
    assert train.main(["--data", "store", "--direction", "forward", "--init", str(random_bot_dir / "forward"),
                       "--output", "ft/forward", "--max_steps", "2", "--eval_every", "2", "--lr", "1e-4",
                       "--warmup_steps", "0", "--device", "cpu"]) == 0
    tuned = ChatBot.from_pretrained(forward="ft/forward", backward=random_bot_dir / "backward")
    reply = tuned.reply(["你好"], seed=0)
    assert reply.mmi and reply.candidates
    import torch
    from safetensors.torch import load_file

    before = load_file(random_bot_dir / "forward" / "model.safetensors")
    after = load_file(tmp_path / "ft" / "forward" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)           # the weights really moved


def test_a_written_reply_longer_than_a_chat_reply_is_refused_not_cut():
    """/better (interact and the web page both judge through `choose`): a 100,000-character text is refused
    with its length, never saved cut; the longest allowed is kept whole."""
    from types import SimpleNamespace

    from dialogpt_zh.errors import UserError
    from dialogpt_zh.judging.feedback import MAX_BETTER_CHARS, choose

    reply = SimpleNamespace(candidates=[])
    with pytest.raises(UserError, match="100,000 characters; a chat reply has at most"):
        choose(reply, better="好" * 100_000)
    assert choose(reply, better="好" * MAX_BETTER_CHARS).text == "好" * MAX_BETTER_CHARS


def test_a_feedback_file_that_cannot_be_read_is_named(tmp_path, capsys):
    """An I/O error reading a feedback file (or no permission, for a user who is not root) is a message
    naming it, not a traceback; /proc/self/mem is a file whose read fails even for root."""
    unreadable = tmp_path / "feedback.jsonl"
    unreadable.symlink_to("/proc/self/mem")
    out = tmp_path / "out"
    assert feedback_main(["export", str(unreadable), "--output", str(out)]) == 2
    assert f"{unreadable}: cannot read: Input/output error" in capsys.readouterr().err
    assert not out.exists()


def test_an_appender_whose_file_was_deleted_or_replaced_appends_to_the_new_one(tmp_path):
    """A server holds its feedback / verdicts file open for days: deleted or moved meanwhile, the records went
    to the old descriptor, where nobody would find them."""
    from dialogpt_zh.judging.feedback import JsonlAppender

    path = tmp_path / "verdicts.jsonl"
    writer = JsonlAppender(path)
    writer.append({"n": 1})
    path.rename(tmp_path / "moved.jsonl")
    writer.append({"n": 2})
    assert [json.loads(x)["n"] for x in path.read_text(encoding="utf-8").splitlines()] == [2]
    path.unlink()
    writer.append({"n": 3})
    writer.append({"n": 4})
    writer.close()
    assert [json.loads(x)["n"] for x in path.read_text(encoding="utf-8").splitlines()] == [3, 4]
    assert [json.loads(x)["n"] for x in (tmp_path / "moved.jsonl").read_text(encoding="utf-8").splitlines()] == [1]
