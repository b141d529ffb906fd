"""The interact CLI: piped stdin (one reply per line), commands, transcript, errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from dialogpt_zh.interact import InteractArgs, chat


def run_cli(args, stdin: str, timeout: int = 120):
    return subprocess.run([sys.executable, "-m", "dialogpt_zh.interact", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout)


def test_piped_two_turn_conversation(random_bot_dir):
    """The real entry point, as a user pipes it: one reply per non-empty line, hints on stderr."""
    flags = ["--model", str(random_bot_dir), "--seed", "0", "--num_candidates", "3", "--max_length", "8"]
    r = run_cli(flags, "你好\n\n吃了吗\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(lines)
    assert "empty line ignored" in r.stderr
    # --seed makes the conversation reproducible: the same replies in-process
    from dialogpt_zh.interact import main

    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        sys_stdin, sys.stdin = sys.stdin, io.StringIO("你好\n\n吃了吗\n")
        try:
            assert main(flags) == 0
        finally:
            sys.stdin = sys_stdin
    assert out.getvalue().splitlines() == lines


def test_cli_errors_exit_2(tmp_path, capsys):
    from dialogpt_zh.interact import main

    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "model path not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--no_such_flag"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def bot(random_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings

    return ChatBot.from_pretrained(random_bot_dir, generation=GenerationSettings(num_candidates=3, max_length=6))


def run_chat(bot, stdin: str, **args):
    out, err = io.StringIO(), io.StringIO()
    assert chat(bot, InteractArgs(**args), stdin=io.StringIO(stdin), stdout=out, stderr=err) == 0
    return out.getvalue().splitlines(), err.getvalue()


def test_commands_debug_reset_quit_and_transcript(bot, tmp_path):
    transcript = tmp_path / "chat.jsonl"
    out, err = run_chat(bot, "你好\n/debug\n在干嘛\n/reset\n𠀀😀\n/quit\n不会被读到\n", seed=5,
                        transcript=str(transcript))
    assert len(out) == 3                                  # three utterances before /quit, then stop
    assert "debug on" in err and "rank" in err and "fwd" in err and "bwd" in err
    assert "conversation reset" in err
    records = [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines()]
    assert [r.get("user") for r in records] == ["你好", "在干嘛", None, "𠀀😀"]
    assert [r["seed"] for r in records if "seed" in r] == [5, 6, 7]
    assert records[2] == {"event": "reset"}


def test_history_is_kept_and_reset(bot, monkeypatch):
    seen = []
    real_reply = bot.reply

    def spy(history, **kw):
        seen.append(list(history))
        return real_reply(history, **kw)

    monkeypatch.setattr(bot, "reply", spy)
    run_chat(bot, "一\n二\n/reset\n三\n", seed=0)
    assert len(seen[0]) == 1 and len(seen[1]) == 3 and seen[1][0] == "一" and seen[1][2] == "二"
    assert seen[2] == ["三"]


def test_overlong_input_truncated_with_notice(bot):
    out, err = run_chat(bot, "好" * 50 + "\n", seed=0, max_input_chars=10)
    assert len(out) == 1 and "input truncated from 50 to 10 characters" in err


# ------------------------------------------------------------------------------------ hostile inputs
# Each is refused up front (before a model is loaded), exit 2, one line naming the field, no traceback.
HOSTILE_FLAGS = [
    (["--num_candidates", "100000"], "num_candidates"), (["--num_candidates", "0"], "num_candidates"),
    (["--max_length", "100000"], "max_length"), (["--max_context_tokens", "10000000"], "max_context_tokens"),
    (["--max_history", "0"], "max_history"), (["--min_length", "30"], "max_length"),
    (["--temperature", "inf"], "temperature"), (["--temperature", "nan"], "temperature"),
    (["--temperature", "-1"], "temperature"), (["--top_p", "0"], "top_p"), (["--top_p", "2"], "top_p"),
    (["--top_k", "-1"], "top_k"), (["--repetition_penalty", "0"], "repetition_penalty"),
    (["--backward_weight", "nan"], "backward_weight"), (["--forward_weight", "inf"], "forward_weight"),
    (["--length_weight=-inf"], "length_weight"), (["--no_repeat_ngram_size", "-2"], "no_repeat_ngram_size"),
    (["--device", "cuda"], "device"), (["--device", "cuda:3"], "device"), (["--device", "toaster"], "device"),
    (["--threads", "-1"], "threads"), (["--quantize", "int4"], "quantize"), (["--backward", "b"], "backward"),
    (["--max_input_chars", "0"], "max_input_chars"), (["--transcript", "{tmp}"], "transcript"),
    (["--transcript", "{tmp}/afile/chat.jsonl"], "transcript"), (["--model", "{tmp}/missing"], "model path"),
]


@pytest.mark.parametrize("flags,field", HOSTILE_FLAGS, ids=[" ".join(f) for f, _ in HOSTILE_FLAGS])
def test_hostile_flags_are_refused_up_front(flags, field, tmp_path, capsys):
    from dialogpt_zh.interact import main

    (tmp_path / "afile").write_text("x")
    code = main([f.replace("{tmp}", str(tmp_path)) for f in flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and field in err and "Traceback" not in err


def test_normalize_choice_is_checked_by_the_parser(capsys):
    from dialogpt_zh.interact import main

    with pytest.raises(SystemExit) as e:
        main(["--normalize", "median"])
    assert e.value.code == 2 and "normalize" in capsys.readouterr().err


def test_invalid_utf8_line_is_skipped_and_the_chat_goes_on(bot):
    stdin = io.TextIOWrapper(io.BytesIO("你好\n".encode() + b"\xff\xfe\xe4\xbd\n" + "吃了吗\n".encode()),
                             encoding="utf-8")  # strict, as sys.stdin is
    out, err = io.StringIO(), io.StringIO()
    assert chat(bot, InteractArgs(seed=0), stdin=stdin, stdout=out, stderr=err) == 0
    assert len(out.getvalue().splitlines()) == 2              # both valid lines got a reply
    assert "not valid UTF-8" in err.getvalue()


def test_regular_install_without_default_model_says_what_to_pass(tmp_path):
    """A non-editable install has the package but not checkpoints/default beside it."""
    import shutil
    from pathlib import Path

    import dialogpt_zh

    site = tmp_path / "site"
    shutil.copytree(Path(dialogpt_zh.__file__).parent, site / "dialogpt_zh",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "dialogpt_zh.interact"], input="你好\n", text=True, cwd=tmp_path,
                       capture_output=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert r.returncode == 2, r.stderr
    assert "error: model: no default model" in r.stderr and "pass --model DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_debug_switched_on_shows_the_last_turn_at_once(bot):
    """/pick N after /debug picks from a table the person has seen: /debug shows the last turn's candidates."""
    out, err = run_chat(bot, "你好\n/debug\n/pick 2\n", seed=0)
    assert len(out) == 1
    shown = err.split("(debug on)")[1].split("(the chat continues with candidate 2")[0]
    rows = [line.split() for line in shown.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(rows) + 1)] and len(rows) >= 2
    picked = err.split("(the chat continues with candidate 2: ")[1].split(" — ")[0]
    assert rows[1][-1] == picked                               # the row numbered 2 is what /pick 2 took
    out, err = run_chat(bot, "/debug\n", seed=0)               # nothing to show yet: just the switch
    assert err.strip() == "(debug on)"


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_debug_table_adds_up_to_the_score(bot, normalize):
    """Every row's score is the legend's formula applied to the row's own columns (rounding aside)."""
    from dialogpt_zh.interact import format_candidates
    from dialogpt_zh.settings import MMISettings

    mmi = MMISettings(forward_weight=0.5, backward_weight=1.5, length_weight=0.25, normalize=normalize)
    reply = bot.reply(["你好", "你好呀", "吃了吗"], seed=3, mmi=mmi)
    lines = format_candidates(reply).splitlines()
    header, rows = lines[0].split(), [line.split() for line in lines[1:] if line.strip()[:1].isdigit()]
    legend = next(line for line in lines if line.strip().startswith("score ="))
    f_name, b_name = ("fwd/tok", "bwd/ctx") if normalize == "mean" else ("fwd", "bwd")
    assert header[:7] == ["rank", "score", f_name, b_name, "tok", "ctx", "n"]
    assert f"score = 0.5·{f_name} + 1.5·{b_name} + 0.25·tok" in legend
    assert len(rows) == len(reply.candidates)
    for row, c in zip(rows, reply.candidates):
        score, fwd, bwd, tok = float(row[1]), float(row[2]), float(row[3]), int(row[4])
        assert score == pytest.approx(0.5 * fwd + 1.5 * bwd + 0.25 * tok, abs=0.005)
        assert score == pytest.approx(c.score, abs=0.0005)
        divisor = (c.num_tokens, c.num_context_tokens) if normalize == "mean" else (1, 1)
        assert fwd == pytest.approx(c.forward_logprob / divisor[0], abs=0.0005)   # the unit the header names
        assert bwd == pytest.approx(c.backward_logprob / divisor[1], abs=0.0005)


def test_dropped_history_is_said_once_per_conversation_in_plain_words(bot):
    lines = "一\n二\n三\n四\n五\n/reset\n六\n七\n八\n"
    out, err = run_chat(bot, lines, seed=0)                  # max_history 3: from the third line on
    assert len(out) == 8
    assert "history:" not in err and "max_history)" not in err   # not the engine's per-turn wording
    before, after = err.split("(conversation reset)")
    assert before.count("the bot reads only the last 3 lines") == 1
    assert after.count("the bot reads only the last 3 lines") == 1   # a new conversation is told again
    _, err = run_chat(bot, "一\n二\n", seed=0)
    assert "reads only" not in err                            # nothing dropped, nothing said


def test_debug_table_shows_the_retrieval_bonus_when_a_reply_was_retrieved():
    """A retrieved reply gets retrieved_bonus: the formula line names it, and its row adds up with it; a forward
    log-prob not computed (its weight 0) shows as '-' and adds nothing."""
    from dialogpt_zh.engine.results import Candidate, Reply
    from dialogpt_zh.interact import format_candidates
    from dialogpt_zh.settings import mmi_score

    weights, bonus = (0.0, 1.0, 0.0), 0.1
    cands = [Candidate(text="生成的", token_ids=[], forward_logprob=-6.0, backward_logprob=-9.0, num_tokens=3,
                       num_context_tokens=4, score=0.0, source="sampled"),
             Candidate(text="检索的", token_ids=[], forward_logprob=None, backward_logprob=-8.0, num_tokens=4,
                       num_context_tokens=4, score=0.0, count=0, source="retrieved", similarity=0.8)]
    for c in cands:
        c.score = float(mmi_score(c.forward_logprob or 0.0, c.backward_logprob, c.num_tokens, c.num_context_tokens,
                                  *weights, "mean", "retrieved" in c.source, bonus))
    for rank, c in enumerate(sorted(cands, key=lambda c: -c.score), 1):
        c.rank = rank
    reply = Reply(text="", candidates=sorted(cands, key=lambda c: c.rank), latency_s=0.0,
                  timings={"encode": 0.0, "generate": 0.0, "score": 0.0}, mmi=True, notices=[], weights=weights,
                  retrieved_bonus=bonus)
    lines = format_candidates(reply).splitlines()
    assert "score = 0·fwd/tok + 1·bwd/ctx + 0·tok + 0.1·retrieved" in lines[-2]
    for row in (line.split() for line in lines[1:3]):
        fwd = 0.0 if row[2] == "-" else float(row[2])
        assert float(row[1]) == pytest.approx(0 * fwd + float(row[3]) + bonus * ("retrieved" in row[7]), abs=0.002)
    assert any(row.split()[2] == "-" for row in lines[1:3])


def test_transcript_or_feedback_inside_the_bot_is_refused(random_bot_dir, tmp_path, capsys):
    """The files interact appends to are outputs: never inside the bot directory it reads."""
    from dialogpt_zh.interact import main

    for flag in ("--transcript", "--feedback"):
        target = random_bot_dir / "backward" / "notes.jsonl"
        assert main(["--model", str(random_bot_dir), flag, str(target)]) == 2
        assert f"would write over or inside the input {random_bot_dir.resolve()}" in capsys.readouterr().err
        assert not target.exists()
