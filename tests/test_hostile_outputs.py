"""Outputs pointed somewhere they must not go: a device or pipe, a file of another kind, two outputs on one
file, an input reached through a hard link, a full disk. Each refused with a message, nothing half written."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from dialogpt_zh import fsutil, interact, rerank, webapp
from dialogpt_zh.errors import UserError
from dialogpt_zh.judging.feedback import JsonlAppender


def _no_load(monkeypatch) -> None:
    import dialogpt_zh.engine.bot as engine_bot

    def no_load(*args, **kwargs):
        raise AssertionError("the bot was loaded: the output check did not run first")

    monkeypatch.setattr(engine_bot, "load_bot", no_load)


def _is_fifo(path: Path) -> bool:
    return stat.S_ISFIFO(os.lstat(path).st_mode)


# ------------------------------------------------------------------------------------- devices and pipes

def test_an_atomic_write_never_renames_a_file_over_a_device_or_pipe(tmp_path):
    """`--output /dev/null` (as root) had a regular file renamed over the system's /dev/null; a pipe stands in
    for the device here (no root needed): it must stay a pipe, with no temp file beside it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for write in (lambda: fsutil.atomic_write_text(fifo, "x"), lambda: fsutil.atomic_write_many({fifo: b"x"}),
                  lambda: fsutil.check_output_file(fifo, "output")):
        with pytest.raises(UserError, match="a device, a pipe or a socket"):
            write()
        assert _is_fifo(fifo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_rerank_output_a_pipe_or_a_directory_is_refused_before_the_bot_loads(tmp_path, monkeypatch, capsys):
    """A directory as --output (with --overwrite) gave an IsADirectoryError traceback once every record was
    reranked; a pipe was replaced by a regular file."""
    _no_load(monkeypatch)
    (tmp_path / "in.jsonl").write_text('{"context": ["你好"], "candidates": ["嗯"]}\n', encoding="utf-8")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, words in (("fifo", "a device, a pipe or a socket"), ("dir", "is a directory")):
        code = rerank.main([str(tmp_path / "in.jsonl"), "--output", str(tmp_path / name), "--overwrite"])
        assert code == 2 and words in capsys.readouterr().err
    assert _is_fifo(tmp_path / "fifo") and (tmp_path / "dir").is_dir()


def test_interact_feedback_on_a_pipe_is_refused_at_start(tmp_path, monkeypatch, capsys):
    """Appending to a pipe gave an fsync traceback at the first /pick (to /dev/full: a no-space traceback)."""
    _no_load(monkeypatch)
    os.mkfifo(tmp_path / "fifo")
    assert interact.main(["--feedback", str(tmp_path / "fifo")]) == 2
    assert "a device, a pipe or a socket" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- one file, two outputs

def test_interact_transcript_and_feedback_on_one_file_is_refused(random_bot_dir, tmp_path, monkeypatch, capsys):
    """The transcript, rewritten after each turn, replaced the file the feedback was appended to: "saved"
    judgements were lost."""
    _no_load(monkeypatch)
    same = tmp_path / "same.jsonl"
    assert interact.main(["--model", str(random_bot_dir), "--transcript", str(same), "--feedback",
                          str(tmp_path / "." / "same.jsonl")]) == 2
    assert "is the --transcript file" in capsys.readouterr().err
    assert not same.exists()


def test_web_arena_verdicts_are_not_appended_to_the_pairs_or_the_feedback(random_bot_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """--arena_verdicts was appended to whatever it named: the --arena_pairs file (an input) or the feedback
    file (two kinds of records in one file)."""
    _no_load(monkeypatch)
    pairs = tmp_path / "pairs.json"
    pairs.write_text('{"format": "x"}\n', encoding="utf-8")
    base = ["--model", str(random_bot_dir), "--arena_pairs", str(pairs)]
    assert webapp.main([*base, "--arena_verdicts", str(pairs)]) == 2
    assert "would write over or inside the input" in capsys.readouterr().err
    fb = tmp_path / "fb.jsonl"
    assert webapp.main([*base, "--arena_verdicts", str(fb), "--feedback", str(fb)]) == 2
    assert "is the --feedback file" in capsys.readouterr().err
    assert pairs.read_text(encoding="utf-8") == '{"format": "x"}\n' and not fb.exists()


def test_an_input_reached_through_a_hard_link_is_an_input(tmp_path):
    """Appending to a hard link of an input grows the input itself."""
    src = tmp_path / "pairs.json"
    src.write_text("{}\n", encoding="utf-8")
    os.link(src, tmp_path / "link.jsonl")
    with pytest.raises(UserError, match="would write over or inside the input"):
        fsutil.refuse_inputs(tmp_path / "link.jsonl", "verdicts", [src])


# ------------------------------------------------------------------------------ files of another kind

@pytest.mark.parametrize("content", [b'{\n  "report": 1\n}\n', b"PK\x03\x04\x00\xff binary", b"just text\n"])
def test_records_are_not_appended_to_a_file_of_another_kind(tmp_path, content):
    """A feedback or verdicts path naming a report, a config or a binary file had JSON lines appended to it."""
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not JSON Lines"):
        JsonlAppender(path)
    with pytest.raises(UserError, match="is not JSON Lines"):
        webapp.TranscriptWriter(path)
    assert path.read_bytes() == content


def test_records_are_appended_to_json_lines_with_a_bom_or_to_an_empty_file(tmp_path):
    for content in (b"", b'\xef\xbb\xbf{"a": 1}\n'):
        path = tmp_path / "fb.jsonl"
        path.write_bytes(content)
        writer = JsonlAppender(path)
        writer.append({"b": 2})
        writer.close()
        assert path.read_bytes() == content + b'{"b": 2}\n'


def test_interact_transcript_never_replaces_a_file_of_another_kind(tmp_path, monkeypatch, capsys):
    """The transcript is rewritten after each turn: naming a notes file replaced it with the conversation."""
    _no_load(monkeypatch)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    assert interact.main(["--transcript", str(notes)]) == 2
    assert "is not JSON Lines" in capsys.readouterr().err
    assert notes.read_text(encoding="utf-8") == "my notes\n"


# ------------------------------------------------------------------------------------------ a full disk

def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_a_message_and_the_previous_file_stays(tmp_path, monkeypatch):
    """No space left while writing a file output was an OSError traceback."""
    out = tmp_path / "report.json"
    out.write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(fsutil.os, "fsync", _full)
    for write in (lambda: fsutil.atomic_write_text(out, "new"), lambda: fsutil.atomic_write_many({out: b"new"})):
        with pytest.raises(UserError, match="No space left on device") as e:
            write()
        assert str(out) in str(e.value)
        assert out.read_text(encoding="utf-8") == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_full_disk_inside_a_directory_output_is_a_message(tmp_path):
    with pytest.raises(UserError, match="No space left on device"):
        with fsutil.atomic_directory(tmp_path / "out"):
            _full()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_appending_is_a_message_and_leaves_no_half_line(tmp_path, monkeypatch):
    """The feedback of /pick on a full disk was an OSError traceback, and a half-written record stayed."""
    path = tmp_path / "fb.jsonl"
    path.write_text('{"a": 1}\n', encoding="utf-8")
    writer = JsonlAppender(path)
    real_write = os.write

    def half(fd, data):
        real_write(fd, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(UserError, match="No space left on device"):
        writer.append({"b": 2})
    monkeypatch.setattr(os, "write", real_write)
    writer.close()
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"a": 1}]


# ------------------------------------------------------------------------------------------ option files

def test_a_config_file_with_a_bom_is_read(tmp_path):
    """A BOM (Windows editors) was "not valid JSON: Unexpected UTF-8 BOM"; the project's other JSON readers
    read past it."""
    from dialogpt_zh.cli import read_config_file

    path = tmp_path / "run.json"
    path.write_bytes(b'\xef\xbb\xbf{"top_p": 0.9}')
    assert read_config_file(path) == {"top_p": 0.9}


def test_a_config_file_without_end_is_refused_not_read_into_memory(tmp_path, monkeypatch):
    """`--config /dev/zero` read without end (memory grew until the machine gave out)."""
    from dialogpt_zh import cli

    monkeypatch.setattr(cli, "MAX_CONFIG_BYTES", 1000)
    path = tmp_path / "big.json"
    path.write_text("{" + " " * 2000 + "}", encoding="utf-8")
    with pytest.raises(UserError, match="too large for a config file"):
        cli.read_config_file(path)
    with pytest.raises(UserError, match="too large for a config file"):
        cli.read_config_file(Path("/dev/zero"))


def test_feedback_export_output_dash_is_refused(tmp_path, capsys):
    """`--output -` made a directory named "-" in the current directory."""
    from dialogpt_zh import feedback

    (tmp_path / "fb.jsonl").write_text("", encoding="utf-8")
    assert feedback.main(["export", str(tmp_path / "fb.jsonl"), "--output", "-"]) == 2
    assert "got '-'" in capsys.readouterr().err


# ----------------------------------------------------------------- --overwrite of a directory of another kind

def test_feedback_export_overwrite_never_replaces_a_directory_of_another_kind(tmp_path, capsys):
    """`--output ~/notes --overwrite` replaced the whole directory with train.txt + stats.json (preprocess and
    index refuse a directory that is not theirs even with --overwrite)."""
    from dialogpt_zh import feedback
    from dialogpt_zh.judging.feedback import FORMAT

    fb = tmp_path / "fb.jsonl"
    fb.write_text(json.dumps({"format": FORMAT, "version": 1, "kind": "pick", "context": ["你好"], "reply": "嗯",
                              "picked_rank": 1, "candidates": [{"rank": 1, "text": "嗯"}], "mmi": False,
                              "settings": {}, "models": {}}, ensure_ascii=False) + "\n", encoding="utf-8")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n", encoding="utf-8")
    assert feedback.main(["export", str(fb), "--output", str(notes), "--overwrite"]) == 2
    assert "is not a feedback export" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    assert feedback.main(["export", str(fb), "--output", str(tmp_path / "out")]) == 0
    assert feedback.main(["export", str(fb), "--output", str(tmp_path / "out"), "--overwrite"]) == 0  # its own


def test_convert_overwrite_never_replaces_a_directory_of_another_kind(random_bot_dir, tmp_path, capsys):
    from dialogpt_zh.convert import main as convert_main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n", encoding="utf-8")
    assert convert_main([str(random_bot_dir / "forward"), "--output", str(notes), "--overwrite"]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_a_file_written_whole_gets_the_umasks_permissions(tmp_path):
    """atomic_open's temp file comes from mkstemp (0600); renamed into place, a report was owner-only where
    open() would have given the umask's permissions."""
    from dialogpt_zh import fsutil

    with fsutil.atomic_open(tmp_path / "report.json", "w") as f:
        f.write("{}")
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~fsutil._UMASK
    assert 0o666 & ~fsutil._UMASK != 0o600   # else this test could not fail: umask 066 or more is unusual


@pytest.mark.parametrize("name", ["a" * 300, "好" * 80])
def test_an_output_name_too_long_for_the_file_system_is_refused(tmp_path, name):
    """A name part over the file system's 255 bytes (or too long for the temp name beside it) was an
    ENAMETOOLONG traceback from inside the output checks."""
    from dialogpt_zh.errors import UserError
    from dialogpt_zh.fsutil import check_output_file

    with pytest.raises(UserError, match=r"has \d+ bytes; at most 223 fit"):
        check_output_file(tmp_path / name / "out.jsonl", "output")
    check_output_file(tmp_path / ("a" * 200), "output")   # long, but room for its temp name
