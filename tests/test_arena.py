"""The arena: blinded pairs (--make), scoring with the key (--score), interactive judging via stdin, resume."""
from __future__ import annotations

import io
import json

import pytest

from dialogpt_zh import arena
from dialogpt_zh.errors import UserError
from dialogpt_zh.judging import arena as arena_lib
from tests.conftest import FIXTURES

DATA = str(FIXTURES / "chitchat_train.txt")


def test_wilson_interval_known_values():
    lo, hi = arena_lib.wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    lo, hi = arena_lib.wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)
    assert arena_lib.wilson_interval(0, 0) is None


def test_parse_settings_types_and_errors():
    assert arena.parse_settings(["num_candidates=1", "use-mmi=false", "top_p=0.9"], "b_set") == \
        {"num_candidates": 1, "use_mmi": False, "top_p": 0.9}
    for bad, msg in ((["nope=1"], "unknown setting"), (["top_k"], "NAME=VALUE"),
                     (["top_k=x"], "cannot read"), (["top_p=2"], "top_p")):
        with pytest.raises(UserError, match=msg):
            arena.parse_settings(bad, "b_set")


def run(argv, stdin=""):
    out = io.StringIO()
    code = arena.main(argv, stdin=io.StringIO(stdin), stdout=out)
    return code, out.getvalue()


def test_make_is_blind_and_score_uses_the_key(random_bot_dir, tmp_path, capsys):
    pairs_path = tmp_path / "arena" / "pairs.json"
    common = ["--a", str(random_bot_dir), "--b", str(random_bot_dir), "--b_set", "num_candidates=1",
              "use_mmi=false", "--a_set", "max_length=6", "--data", DATA, "--split", "all", "--pairs", "6",
              "--seed", "1", "--no_progress"]
    code, out = run(common + ["--make", str(pairs_path)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(pairs_path.read_text(encoding="utf-8"))
    key = json.loads((tmp_path / "arena" / "pairs.key.json").read_text(encoding="utf-8"))
    assert len(doc["pairs"]) == 6 and doc["run"] == key["run"]
    blob = json.dumps(doc["pairs"], ensure_ascii=False)
    assert str(random_bot_dir) not in blob and "use_mmi" not in blob and "order" not in doc  # nothing leaks
    assert key["systems"]["B"]["settings"] == {"num_candidates": 1, "use_mmi": False}
    assert sorted(set(key["order"].values())) <= ["AB", "BA"] and set(key["order"]) == {p["id"] for p in doc["pairs"]}

    # every reply is the engine's reply for that context and seed, placed as the key says
    from dialogpt_zh.engine.bot import ChatBot
    from dialogpt_zh.settings import BotArguments

    bot = ChatBot.from_pretrained(random_bot_dir, quantize=BotArguments().quantize)  # as every face loads it
    for i, p in enumerate(doc["pairs"]):
        s = arena_lib.pair_seed(1, i)
        want = {"A": bot.reply(p["context"], seed=s, max_length=6).text,
                "B": bot.reply(p["context"], seed=s, num_candidates=1, use_mmi=False).text}
        first, second = key["order"][p["id"]]
        assert (p["a"], p["b"]) == (want[first], want[second])

    # a judge's own text file: verdicts by display position, mapped to systems by the key
    ids = [p["id"] for p in doc["pairs"]]
    verdicts = tmp_path / "judge.txt"
    verdicts.write_text(f"# my verdicts\n{ids[0]} a\n{ids[1]} b\n{ids[2]} =\n{ids[3]}\ts\n{ids[4]} b\n"
                        f"{ids[4]} a\n", encoding="utf-8")
    code, out = run(["--score", str(pairs_path), str(verdicts)])
    assert code == 0
    sys_of = {pid: {"a": key["order"][pid][0], "b": key["order"][pid][1]} for pid in ids}
    wins = [sys_of[ids[0]]["a"], sys_of[ids[1]]["b"], sys_of[ids[4]]["a"]]       # the last verdict counts
    assert f"A ({random_bot_dir} max_length=6): {wins.count('A')} wins" in out
    assert f"B ({random_bot_dir} num_candidates=1 use_mmi=False): {wins.count('B')} wins" in out
    assert "ties: 1   skipped: 1   not judged: 1" in out and "3 decided pairs" in out
    assert "1 verdicts were given again" in out

    # a panel: each judge's tally, then the majority's (a side more than half of the judges chose, else a tie)
    second, third = tmp_path / "judge2.txt", tmp_path / "judge3.txt"
    second.write_text(f"{ids[0]} a\n{ids[1]} a\n{ids[2]} b\n{ids[3]} b\n", encoding="utf-8")
    third.write_text(f"{ids[0]} b\n{ids[1]} a\n{ids[2]} b\n{ids[3]} a\n{ids[5]} =\n", encoding="utf-8")
    code, out = run(["--score", str(pairs_path), str(verdicts), str(second), str(third)])
    assert code == 0 and f"{second}: " in out and f"{third}: " in out and "the majority of the 3 judges" in out
    # p0: a a b -> a; p1: b a a -> a; p2: = b b -> b; p3: (s) b a -> tie; p4: a -> a; p5: = -> tie
    majority = {ids[0]: "a", ids[1]: "a", ids[2]: "b", ids[4]: "a"}
    wins = [sys_of[pid][v] for pid, v in majority.items()]
    assert f"A ({random_bot_dir} max_length=6): {wins.count('A')} wins" in out
    assert "ties: 2   skipped: 0   not judged: 0" in out
    assert arena_lib.majority_verdicts([{"p1": "a"}, {"p1": "b"}]) == {"p1": "="}
    assert arena_lib.majority_verdicts([{"p1": "s"}, {}]) == {"p1": "s"}

    verdicts.write_text(f"{ids[0]} maybe\n", encoding="utf-8")
    assert run(["--score", str(pairs_path), str(verdicts)])[0] == 2
    assert f"{verdicts}:1: verdict must be a, b, = or s" in capsys.readouterr().err
    verdicts.write_text("p99 a\n", encoding="utf-8")
    assert run(["--score", str(pairs_path), str(verdicts)])[0] == 2
    assert "unknown pair id 'p99'" in capsys.readouterr().err
    assert run(common + ["--make", str(pairs_path)])[0] == 2                # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_interactive_judging_saves_each_verdict_and_resumes(random_bot_dir, tmp_path, capsys):
    verdicts = tmp_path / "v.jsonl"
    argv = ["--a", str(random_bot_dir), "--b", str(random_bot_dir), "--b_set", "num_candidates=1",
            "--data", DATA, "--split", "all", "--pairs", "3", "--no_progress", "--verdicts", str(verdicts)]
    # piped: a line that is no verdict stops the run (asking again would shift every later verdict by one)
    code, out = run(argv, stdin="a\nwhat\n=\n")
    assert code == 2
    assert "<stdin>:2: 'what' is no verdict (a, b, =, s or q); the 1 verdicts before it are saved" in \
        capsys.readouterr().err
    assert [json.loads(x)["verdict"] for x in verdicts.read_text(encoding="utf-8").splitlines()] == ["a"]
    code, out = run(argv, stdin="\n=\n")                                     # input ends after the 2nd verdict
    assert code == 0, capsys.readouterr().err
    assert out.count("(a) ") == 2 and "resuming: 1 of 3" in out   # the 3rd was shown, not answered
    lines = [json.loads(x) for x in verdicts.read_text(encoding="utf-8").splitlines()]
    assert [x["verdict"] for x in lines] == ["a", "="]
    assert "not judged: 1" in out

    code, out = run(argv, stdin="b\n")                                       # resumes at the third pair
    assert code == 0
    assert "resuming: 2 of 3 pairs already judged" in out and out.count("(a) ") == 1
    assert "[3/3]" in out and "not judged: 0" in out
    lines = [json.loads(x) for x in verdicts.read_text(encoding="utf-8").splitlines()]
    assert [x["verdict"] for x in lines] == ["a", "=", "b"] and len({x["pair"] for x in lines}) == 3
    assert "ties: 1" in out and "2 decided pairs" in out

    # other settings make other pairs: the verdicts file refuses to mix runs
    code, _ = run(argv[:5] + ["num_candidates=2"] + argv[6:], stdin="a\n")
    assert code == 2 and "another arena run" in capsys.readouterr().err


def test_judge_a_pairs_file_without_the_key(random_bot_dir, tmp_path):
    pairs_path = tmp_path / "p.json"
    assert run(["--a", str(random_bot_dir), "--b", str(random_bot_dir), "--data", DATA, "--split", "all",
                "--pairs", "2", "--no_progress", "--make", str(pairs_path), "--key", str(tmp_path / "k.json")])[0] == 0
    code, out = run(["--judge", str(pairs_path), "--verdicts", str(tmp_path / "v.jsonl")], stdin="s\nb\n")
    assert code == 0 and "2 of 2 pairs judged; score them with --score" in out
    code, out = run(["--score", str(pairs_path), str(tmp_path / "v.jsonl"), "--key", str(tmp_path / "k.json")])
    assert code == 0 and "skipped: 1" in out and "1 decided pairs" in out


def test_arguments_are_checked_when_made():
    from dialogpt_zh.arena import ArenaArgs

    for bad, name in ((dict(make="p.json", judge="p.json"), "judge"), (dict(score=["p.json"]), "score"),
                      (dict(), "verdicts"), (dict(make="p.json", b_set=["top_k=-1"]), "top_k")):
        with pytest.raises(UserError) as e:
            ArenaArgs(**bad)
        assert e.value.field == name


def test_outputs_inside_a_bot_or_the_data_are_refused_before_any_work(random_bot_dir, tmp_path, capsys):
    """--make / --key / --verdicts never go into a bot directory being read, nor over --data (even with
    --overwrite); nothing is written."""
    data = FIXTURES / "heldout.json"
    before = sorted(p.name for p in (random_bot_dir / "forward").iterdir())
    for flag, path in (("--make", random_bot_dir / "forward" / "pairs.json"), ("--key", random_bot_dir / "k.json"),
                       ("--verdicts", data)):
        argv = ["--a", str(random_bot_dir), "--b", str(random_bot_dir), "--data", str(data), "--pairs", "1",
                "--overwrite", flag, str(path)]
        if flag != "--make":
            argv += ["--make", str(tmp_path / "pairs.json")] if flag == "--key" else []
        assert arena.main(argv) == 2, flag
        assert "would write over or inside the input" in capsys.readouterr().err
    assert sorted(p.name for p in (random_bot_dir / "forward").iterdir()) == before
    assert not (random_bot_dir / "k.json").exists() and not (tmp_path / "pairs.json").exists()
