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
    from dialogpt_zh.engine import ChatBot

    return ChatBot.from_pretrained(random_bot_dir, num_candidates=3, max_length=6)


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
