"""python -m dialogpt_zh.rerank: JSON Lines in, the engine's scores and ranks out."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dialogpt_zh.rerank import main


@pytest.fixture(scope="module")
def bot(random_bot_dir):
    from dialogpt_zh.engine.bot import ChatBot

    return ChatBot.from_pretrained(random_bot_dir)


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


RECORDS = [
    {"id": 1, "context": ["你喜欢什么运动"], "candidates": ["喜欢", "我喜欢打篮球", "喜欢", "不知道"]},
    {"id": 2, "context": ["你好", "你好呀", "在干嘛"], "candidates": [{"text": "在看书", "src": "x"}, "睡觉"]},
    {"id": 3, "context": "单句上文", "candidates": []},
]


def test_rerank_cli_matches_the_engine(random_bot_dir, bot, tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", [RECORDS[0], "", RECORDS[1], RECORDS[2]])
    out = tmp_path / "out.jsonl"
    # the CLI and the API load the same weights by default (fp16): the scores must match to 1e-5
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"]) == 0
    assert "reranked 3 records (6 candidates)" in capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3]
    for g, rec in zip(got, RECORDS):
        texts = [c if isinstance(c, str) else c["text"] for c in rec["candidates"]]
        assert [c["text"] for c in g["candidates"]] == texts            # input order kept
        ctx = rec["context"] if isinstance(rec["context"], list) else [rec["context"]]
        want = {c.text: c for c in bot.rerank(ctx, texts)} if texts else {}
        for c in g["candidates"]:
            assert c["score"] == pytest.approx(want[c["text"]].score, abs=1e-5)
            assert c["forward_logprob"] == pytest.approx(want[c["text"]].forward_logprob, abs=1e-4)
            assert c["backward_logprob"] == pytest.approx(want[c["text"]].backward_logprob, abs=1e-4)
        ranks = sorted(c["rank"] for c in g["candidates"])
        assert ranks == list(range(1, len(texts) + 1))
        by_rank = sorted(g["candidates"], key=lambda c: c["rank"])
        assert [c["score"] for c in by_rank] == sorted((c["score"] for c in by_rank), reverse=True)
        assert g["best"] == (by_rank[0]["text"] if by_rank else None)
    assert got[0]["candidates"][0]["score"] == got[0]["candidates"][2]["score"]   # duplicates: equal scores
    assert got[0]["mmi"] is True and got[2]["candidates"] == []
    assert got[1]["candidates"][0]["src"] == "x"                                  # extra fields kept

    # refuses to overwrite; --overwrite replaces; the weights flags reach the engine
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress", "--overwrite",
                 "--no_use_mmi"]) == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert got[0]["mmi"] is False and got[0]["candidates"][0]["backward_logprob"] is None


def test_bad_lines_stop_with_file_line_or_are_counted(random_bot_dir, tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", [RECORDS[0], "{oops", {"context": [], "candidates": ["a"]},
                                        {"context": ["a"], "candidates": [3]}, RECORDS[1]])
    out = tmp_path / "out.jsonl"
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress"]) == 2
    assert f"error: {src}:2: not JSON" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))     # no half-written output
    assert main([str(src), "--output", str(out), "--model", str(random_bot_dir), "--no_progress",
                 "--skip_bad_lines"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:3: field 'context'" in err and f"{src}:4: candidate 0" in err
    assert "3 bad lines skipped" in err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    assert main([str(src), "--output", str(src), "--model", str(random_bot_dir), "--overwrite"]) == 2
    assert "would write over or inside the input" in capsys.readouterr().err
    # nor into the model it reads, even with --overwrite
    config = random_bot_dir / "forward" / "config.json"
    before = config.read_bytes()
    assert main([str(src), "--output", str(config), "--model", str(random_bot_dir), "--overwrite",
                 "--skip_bad_lines"]) == 2
    assert f"would write over or inside the input {random_bot_dir.resolve()}" in capsys.readouterr().err
    assert config.read_bytes() == before


def test_rerank_streams_stdin_to_stdout(random_bot_dir):
    r = subprocess.run([sys.executable, "-m", "dialogpt_zh.rerank", "-", "--output", "-", "--model",
                        str(random_bot_dir)], input=json.dumps(RECORDS[1], ensure_ascii=False) + "\n",
                       text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert json.loads(line)["best"] in ("在看书", "睡觉")
    assert "reranked 1 records" in r.stderr
