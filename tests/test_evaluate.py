"""The evaluator end to end on tiny checkpoints and the hand-written held-out fixture corpus/fixtures/heldout.json."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dialogpt_zh import evaluate as E
from dialogpt_zh.errors import UserError
from dialogpt_zh.judging import metrics as M
from dialogpt_zh.judging import report as R
from dialogpt_zh.settings import mmi_score

HELDOUT = Path(__file__).resolve().parent.parent / "corpus" / "fixtures" / "heldout.json"
# heldout.json "valid": 11 sessions, one of them a single turn (dropped by cleaning); turns of the other 10:
VALID_TURNS = [4, 3, 3, 3, 4, 2, 3, 4, 2, 3]
FAST = ["--max_length", "6", "--num_candidates", "4", "--no_progress", "--threads", "1"]


def run_cli(tmp_path: Path, model: Path, *extra: str, name: str = "report") -> tuple[int, Path]:
    out = tmp_path / f"{name}.json"
    code = E.main(["--data", str(HELDOUT), "--model", str(model), "--output", str(out),
                   "--samples", str(tmp_path / f"{name}.jsonl"), "--markdown", str(tmp_path / f"{name}.md"),
                   *FAST, *extra])
    return code, out


@pytest.fixture(scope="module")
def bot_dir(trained_bot_dir):
    return trained_bot_dir  # trained tiny models: more realistic outputs than random weights


# ------------------------------------------------------------------------------------------- pure parts
def _session(turns):
    return SimpleNamespace(turns=turns, source="s", path="p", line=1, split=None)


def test_build_cases_every_turn_or_last():
    sessions = [_session(["a", "b", "c"]), _session(["d", "e"])]
    cases = E.build_cases(sessions, last_turn_only=False)
    assert [(c.session, c.turn, c.context, c.reference) for c in cases] == [
        (0, 1, ["a"], "b"), (0, 2, ["a", "b"], "c"), (1, 1, ["d"], "e")]
    last = E.build_cases(sessions, last_turn_only=True)
    assert [(c.context, c.reference) for c in last] == [(["a", "b"], "c"), (["d"], "e")]


def test_distractors_come_from_other_sessions_and_are_deterministic():
    sessions = [_session([f"s{i}t{j}" for j in range(3)]) for i in range(6)] + [_session(["x", "s0t1"])]
    cases = E.build_cases(sessions, last_turn_only=False)
    d1 = E.draw_distractors(cases, sessions, seed=3)
    assert d1 == E.draw_distractors(cases, sessions, seed=3)
    assert d1 != E.draw_distractors(cases, sessions, seed=4)
    for case, ds in zip(cases, d1):
        assert ds is not None and len(ds) == 9 and len(set(ds)) == 9
        assert case.reference not in ds
        others = {t for i, s in enumerate(sessions) if i != case.session for t in s.turns}
        assert set(ds) <= others  # "s0t1" may be drawn for session 0: session 6 says it too
    # too few other sessions: no selection for that case (None), never a short list
    few = [_session(["a", "b"]), _session(["c", "d"])]
    assert E.draw_distractors(E.build_cases(few, False), few, seed=0) == [None, None]


def test_sweep_hand_computed():
    # 2 cases x 3 candidates (true reply in column 0), context 10 tokens.
    fwd = np.array([[-4.0, -2.0, -9.0], [-6.0, -3.0, -3.0]])
    bwd = np.array([[-10.0, -30.0, -20.0], [-40.0, -20.0, -30.0]])
    n = np.array([[2.0, 2.0, 3.0], [3.0, 1.0, 3.0]])
    nctx = np.full((2, 3), 10.0)
    grid = {"forward_weight": [0.0, 1.0], "backward_weight": [0.0, 1.0], "length_weight": {"sum": [0.0]},
            "normalize": ["sum"]}
    rows = {(r["forward_weight"], r["backward_weight"]): r for r in R.sweep_selection(fwd, bwd, n, nctx, grid)}
    assert (0.0, 0.0) not in rows                 # a constant score is not a weighting
    # forward only: case 1 true -4 < -2 -> rank 2; case 2 true -6 below both -> rank 3
    assert rows[(1.0, 0.0)]["r10@1"] == 0.0 and rows[(1.0, 0.0)]["mrr"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    # backward only: case 1 rank 1; case 2 -40 below -20, -30 -> rank 3
    assert rows[(0.0, 1.0)]["r10@1"] == 50.0 and rows[(0.0, 1.0)]["r10@2"] == 50.0
    # both: case 1: -14, -32, -29 -> rank 1; case 2: -46, -23, -33 -> rank 3
    assert rows[(1.0, 1.0)]["r10@1"] == 50.0
    # equals metrics.selection_metrics on the same scores
    both = mmi_score(fwd, bwd, n, nctx, 1.0, 1.0, 0.0, "sum")
    assert M.selection_metrics(both)["mrr"] == pytest.approx(rows[(1.0, 1.0)]["mrr"])


def test_sweep_counts_a_nan_score_as_the_worst():
    # the true reply's backward score is NaN: it must rank last, never a lucky first (the old sweep did)
    fwd = np.array([[-1.0, -2.0, -3.0]])
    bwd = np.array([[np.nan, -5.0, -6.0]])
    n, nctx = np.ones((1, 3)), np.full((1, 3), 4.0)
    grid = {"forward_weight": [0.0], "backward_weight": [1.0], "length_weight": {"sum": [0.0]}, "normalize": ["sum"]}
    (row,) = R.sweep_selection(fwd, bwd, n, nctx, grid)
    assert row["r10@1"] == 0.0 and row["mrr"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------------------------------- the CLI

def test_cli_end_to_end_report_shape(tmp_path, bot_dir):
    code, out = run_cli(tmp_path, bot_dir, "--decoders", "plain,mmi,greedy", "--sweep")
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["sessions"] == 10
    assert report["cases"] == sum(n - 1 for n in VALID_TURNS)
    assert report["ppl"] > 1.0 and report["reference_tokens"] > report["cases"]
    keys = {"bleu2", "bleu4", "dist1", "dist2", "entropy4", "avg_len", "repeat3", "bland_top20",
            "bleu2_word", "dist1_word"}
    assert set(report["decoding"]) == {"plain", "mmi", "greedy"}
    for m in report["decoding"].values():
        assert keys <= set(m)
        assert 0.0 <= m["bleu2"] <= 100.0 and 0.0 <= m["dist1"] <= 100.0
    for name in ("forward", "backward", "mmi"):
        sel = report["selection"][name]
        assert set(sel) == {"r10@1", "r10@2", "mrr"}
        assert 0.0 <= sel["r10@1"] <= sel["r10@2"] <= 100.0
    assert report["selection"]["cases"] == report["cases"]
    # the sweep's row for "backward alone" ranks as the selection's backward row does (two code paths)
    sweep = report["sweep"]
    (row,) = [r for r in sweep["results"] if (r["normalize"], r["forward_weight"], r["backward_weight"],
                                               r["length_weight"]) == ("mean", 0.0, 1.0, 0.0)]
    assert {k: row[k] for k in ("r10@1", "r10@2", "mrr")} == pytest.approx(report["selection"]["backward"])
    assert sweep["engine_settings"]["r10@1"] == report["selection"]["mmi"]["r10@1"]
    # nothing dropped silently: the train-split session and the one-turn session are counted
    counts = report["skipped"]["reading_and_cleaning"]
    assert counts["session_not_in_split (train)"] == 1 and counts["session_too_short"] == 1
    s = report["settings"]
    assert s["generation"]["max_length"] == 6 and s["mmi"]["backward_weight"] == 1.0
    assert s["eval"]["num_candidates_mmi"] == 4 and s["eval"]["seed"] == 0
    assert report["timing"]["cases_per_s"] > 0

    samples = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == report["cases"]
    first = samples[0]
    assert first["context"][0].startswith("你好") and len(first["context"]) == 1
    assert first["reference"].startswith("还不错")
    assert set(first["outputs"]) == {"plain", "mmi", "greedy"}
    assert 1 <= len(first["candidates"]["mmi"]) <= 4
    assert [c["rank"] for c in first["candidates"]["mmi"]] == list(range(1, len(first["candidates"]["mmi"]) + 1))
    assert first["outputs"]["mmi"] == first["candidates"]["mmi"][0]["text"]
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| mmi |" in md and "R10@1" in md and "sweep" in md


def test_deterministic_for_a_seed(tmp_path, bot_dir):
    args = ["--limit", "4"]
    assert run_cli(tmp_path, bot_dir, *args, name="a")[0] == 0
    assert run_cli(tmp_path, bot_dir, *args, name="b")[0] == 0
    assert run_cli(tmp_path, bot_dir, *args, "--seed", "5", name="c")[0] == 0

    def load(name):
        r = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
        r.pop("timing")
        r["settings"].pop("command")
        for key in ("samples", "markdown", "output"):
            r["settings"]["eval"].pop(key)
        for m in r["decoding"].values():
            m.pop("seconds")
        r["selection"].pop("seconds")
        return r

    assert load("a") == load("b")
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8") == (tmp_path / "b.jsonl").read_text(encoding="utf-8")
    out_a = [json.loads(x)["outputs"] for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    out_c = [json.loads(x)["outputs"] for x in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    assert out_a != out_c  # another seed samples other replies
    assert load("a")["cases"] == sum(n - 1 for n in VALID_TURNS[:4])


def test_forward_model_only_has_no_mmi_rows(tmp_path, bot_dir):
    code, out = run_cli(tmp_path, bot_dir / "forward", "--limit", "5", "--last_turn_only", "--sweep")
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["decoding"]) == {"plain"}
    assert set(report["selection"]) >= {"forward"} and "mmi" not in report["selection"]
    assert "backward" not in report["selection"] and "sweep" not in report
    assert "no backward model" in report["absent"]["decoding.mmi"]
    assert "no backward model" in report["absent"]["selection.mmi"]
    assert report["settings"]["model"]["backward"] is None
    assert report["cases"] == 5 and report["selection"]["cases"] == 5
    assert "decoding.mmi absent: no backward model" in (tmp_path / "report.md").read_text(encoding="utf-8")


def _fails(tmp_path, capsys, data: Path, *extra: str) -> str:
    out = tmp_path / "bad.json"
    code = E.main(["--data", str(data), "--output", str(out), *FAST, *extra])
    assert code == 2
    assert not out.exists()  # no report that looks complete
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys, bot_dir):
    empty = tmp_path / "empty.json"
    empty.write_text("", encoding="utf-8")
    assert "empty.json" in _fails(tmp_path, capsys, empty, "--model", str(bot_dir))

    one_turn = tmp_path / "single_valid.json"
    one_turn.write_text(json.dumps([["只有一句"], ["也只有一句"]], ensure_ascii=False), encoding="utf-8")
    err = _fails(tmp_path, capsys, one_turn, "--model", str(bot_dir))
    assert "no usable multi-turn session" in err and "session_too_short: 2" in err

    train_only = tmp_path / "train.txt"
    train_only.write_text("你好\n你好呀\n", encoding="utf-8")
    assert "--split all" in _fails(tmp_path, capsys, train_only, "--model", str(bot_dir))

    assert "missing.json: no such file" in _fails(tmp_path, capsys, tmp_path / "missing.json", "--model", str(bot_dir))
    assert "decoders" in _fails(tmp_path, capsys, HELDOUT, "--model", str(bot_dir), "--decoders", "beam")
    assert "model" in _fails(tmp_path, capsys, HELDOUT, "--model", str(tmp_path / "nomodel"))
    assert "output" in _fails(tmp_path, capsys, HELDOUT, "--model", str(bot_dir), "--output", "")


def test_run_config_replays_to_the_same_settings(tmp_path, bot_dir):
    """report.run.json holds every setting of every dataclass of the parser; --config parses it back exactly."""
    from dataclasses import fields

    from dialogpt_zh.cli import parse

    extra = ["--limit", "2", "--last_turn_only", "--decoders", "plain", "--seed", "3", "--top_p", "0.9",
             "--backward_weight", "1.5", "--normalize", "sum", "--no_selection", "--split", "valid"]
    code, out = run_cli(tmp_path, bot_dir, *extra)
    assert code == 0
    run_file = tmp_path / "report.run.json"
    assert run_file == E.run_config_path(out)
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    argv = ["--data", str(HELDOUT), "--model", str(bot_dir), "--output", str(out),
            "--samples", str(tmp_path / "report.jsonl"), "--markdown", str(tmp_path / "report.md"), *FAST, *extra]
    given = parse(E.build_parser(), argv)
    assert [type(x).__name__ for x in given] == ["BotArguments", "EvalArgs", "GenerationSettings", "MMISettings"]
    assert set(saved) == {f.name for x in given for f in fields(x)}           # flat, every setting, no extras
    replayed = parse(E.build_parser(), ["--config", str(run_file)])
    for want, got in zip(given, replayed):
        for f in fields(want):
            assert getattr(got, f.name) == getattr(want, f.name), f.name
        assert got == want
    assert replayed[2].top_p == 0.9 and replayed[3].normalize == "sum" and replayed[1].selection is False
    assert replayed[1].data == [str(HELDOUT)] and replayed[0].threads == 1
    # the report's own settings block is unchanged in shape
    assert json.loads(out.read_text(encoding="utf-8"))["settings"]["eval"]["seed"] == 3


def test_run_config_flags_override_the_file(tmp_path):
    from dialogpt_zh.cli import parse
    from dialogpt_zh.settings import BotArguments, GenerationSettings, MMISettings

    run_file = tmp_path / "r.run.json"
    args = E.EvalArgs(data=[str(HELDOUT)], output=str(tmp_path / "r.json"), limit=4, seed=7)
    config = E.run_config(BotArguments(model="m", threads=2), args, GenerationSettings(top_k=5, max_length=9),
                          MMISettings(use_mmi=False, length_weight=0.25))
    run_file.write_text(json.dumps(config), encoding="utf-8")
    bot, ev, gen, mmi = parse(E.build_parser(), ["--config", str(run_file), "--seed", "8", "--top_k", "2",
                                                 "--use_mmi", "--output", str(tmp_path / "r2.json")])
    assert (ev.seed, gen.top_k, mmi.use_mmi, ev.output) == (8, 2, True, str(tmp_path / "r2.json"))  # flags win
    assert (ev.limit, gen.max_length, mmi.length_weight, bot.model, bot.threads) == (4, 9, 0.25, "m", 2)  # file
    assert bot.quantize == "fp16"  # the default when the file does not say
    # run files from before fp16 became the default wrote null for the float32 weights: replayed as such
    run_file.write_text(json.dumps({**config, "quantize": None}), encoding="utf-8")
    assert parse(E.build_parser(), ["--config", str(run_file)])[0].quantize == "none"


def test_run_config_is_checked_before_the_work(tmp_path, capsys):
    """The run file beside the report is checked like the other outputs: not a directory, not an input."""
    out = tmp_path / "r.json"
    base = ["--data", str(HELDOUT), "--output", str(out), "--model", str(tmp_path / "no_model_here"),
            "--no_progress"]
    (tmp_path / "r.run.json").mkdir()
    assert E.main(base) == 2
    err = capsys.readouterr().err
    assert "r.run.json" in err and "is a directory" in err and not out.exists()
    (tmp_path / "r.run.json").rmdir()
    # replaying a run into the same report would write over the --config file read: refused, file untouched
    config = tmp_path / "r.run.json"
    config.write_text(json.dumps({"seed": 1}), encoding="utf-8")
    assert E.main(["--config", str(config), *base]) == 2
    err = capsys.readouterr().err
    assert "would write over or inside the input" in err and "r.run.json" in err
    assert config.read_text(encoding="utf-8") == json.dumps({"seed": 1}) and not out.exists()
    assert E.run_config_path("a/report") == Path("a/report.run.json")
    assert E.run_config_path("a/r.v2.json") == Path("a/r.v2.run.json")


def test_help_lists_engine_flags(capsys):
    with pytest.raises(SystemExit) as e:
        E.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--last_turn_only", "--top_p", "--backward_weight", "--normalize", "--sweep", "examples:"):
        assert flag in text


# ------------------------------------------------------------------------------------ hostile inputs
# Refused before any model is loaded or any case evaluated (the model path does not exist, so an error
# about anything else proves the order), exit 2, one line naming the field, no report written.
HOSTILE_FLAGS = [
    (["--num_candidates", "100000"], "num_candidates"), (["--max_length", "100000"], "max_length"),
    (["--temperature", "inf"], "temperature"), (["--backward_weight", "nan"], "backward_weight"),
    (["--forward_weight=-inf"], "forward_weight"), (["--top_p", "0"], "top_p"),
    (["--max_history", "0"], "max_history"), (["--repetition_penalty", "nan"], "repetition_penalty"),
    (["--device", "cuda"], "device"), (["--candidates", "5"], "now --num_candidates"),
    (["--output", "{tmp}"], "is a directory"), (["--output", "{tmp}/afile/r.json"], "afile"),
    (["--markdown", "{tmp}/outdir"], "markdown"), (["--samples", "{tmp}/r.json"], "same file as --output"),
    (["--output", str(HELDOUT)], "input"), (["--limit", "-1"], "limit"), (["--decoders", "beam"], "decoders"),
    (["--split", "test"], "split(s) train, valid"),
]


@pytest.mark.parametrize("flags,words", HOSTILE_FLAGS, ids=[" ".join(f) for f, _ in HOSTILE_FLAGS])
def test_hostile_flags_are_refused_before_the_work(flags, words, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "outdir").mkdir()
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    # no model at this path: an error about anything else shows it was found before loading (or evaluating)
    model = str(tmp_path / "no_model_here")
    argv = ["--data", str(HELDOUT), "--output", str(tmp_path / "r.json"), "--model", model, "--no_progress", *flags]
    code = E.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_evaluate_keeps_the_callers_bot_settings(bot_dir, tmp_path):
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import GenerationSettings

    bot = ChatBot.from_pretrained(bot_dir, generation=GenerationSettings(num_candidates=3, max_length=5))
    before = (bot.generation, bot.mmi_settings)
    args = E.EvalArgs(data=[str(HELDOUT)], output=str(tmp_path / "r.json"), limit=2, decoders="mmi",
                      selection=False, progress=False)
    report = E.evaluate(args, bot=bot)
    assert (bot.generation, bot.mmi_settings) == before                   # not replaced
    assert report["settings"]["generation"]["num_candidates"] == 3        # the bot's settings were evaluated
    run = json.loads((tmp_path / "r.run.json").read_text(encoding="utf-8"))  # and recorded, with its models
    assert (run["num_candidates"], run["max_length"], run["decoders"]) == (3, 5, "mmi")
    assert (run["model"], run["backward"]) == (str(bot.forward_dir), str(bot.backward_dir))
    other = E.evaluate(args, GenerationSettings(num_candidates=2, max_length=4), bot=bot, write=False)
    assert other["settings"]["generation"]["num_candidates"] == 2 and bot.generation == before[0]


def test_sigterm_leaves_previous_outputs_and_no_temp_files(bot_dir, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from dialogpt_zh.engine.bot import ChatBot

    for name in ("r.json", "r.md", "r.jsonl"):
        (tmp_path / name).write_text("previous run\n")
    calls = []
    real = ChatBot.reply

    def reply_then_sigterm(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:  # mid-run, as `kill PID` or `timeout` would
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    monkeypatch.setattr(ChatBot, "reply", reply_then_sigterm)
    code = E.main(["--data", str(HELDOUT), "--model", str(bot_dir), "--output", str(tmp_path / "r.json"),
                   "--markdown", str(tmp_path / "r.md"), "--samples", str(tmp_path / "r.jsonl"), *FAST])
    assert code == 143 and "terminated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.jsonl", "r.md"]   # no temp litter
    assert all((tmp_path / n).read_text() == "previous run\n" for n in ("r.json", "r.md", "r.jsonl"))
    assert signal.getsignal(signal.SIGTERM) is not None and len(calls) == 3


def test_outputs_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    import os

    from dialogpt_zh import fsutil

    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    real_replace = os.replace

    def fail_on_b(src, dst):
        if str(dst).endswith("b"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", fail_on_b)
    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write_many({tmp_path / "b": b"new b", tmp_path / "a": b"new a"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_text() == "old a" and (tmp_path / "b").read_text() == "old b"


def test_arguments_are_checked_when_made():
    for bad, name in ((dict(decoders="beam"), "decoders"), (dict(limit=-1), "limit")):
        with pytest.raises(UserError) as e:
            E.EvalArgs(data=[str(HELDOUT)], **bad)
        assert e.value.field == name
    assert E.EvalArgs(data=str(HELDOUT)).data == [str(HELDOUT)]  # one path, not its characters


def test_outputs_inside_the_bot_are_refused(random_bot_dir, capsys):
    """The report (and samples, markdown) never go into the bot directory the evaluation reads."""
    report = random_bot_dir / "forward" / "report.json"
    code = E.main(["--data", str(Path(__file__).parent.parent / "corpus" / "fixtures" / "heldout.json"),
                   "--model", str(random_bot_dir), "--output", str(report), "--no_progress"])
    assert code == 2 and "would write over or inside the input" in capsys.readouterr().err
    assert not report.exists()
