"""The engine in a child process (webapp --engine_process): same replies, errors per request, no hang on a crash."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dialogpt_zh.engine.bot import ChatBot
from dialogpt_zh.engine.process import EngineProcess
from dialogpt_zh.errors import UserError
from dialogpt_zh.settings import BotArguments, GenerationSettings, MMISettings
from tests.conftest import load_benchmark

REQUESTS = [(["你好"], dict(seed=1)), (["你好呀，在干嘛", "在看电影呢"], dict(seed=2, num_candidates=3)),
            (["今天好冷啊"], dict(seed=3, temperature=0.7, use_mmi=False)), (["晚饭吃什么"], dict(seed=4, top_k=3))]


def key(reply):
    return reply.text, [(c.text, c.rank, round(c.forward_logprob, 3)) for c in reply.candidates], reply.seed


@pytest.fixture(scope="module")
def engine(trained_bot_dir):
    process = EngineProcess(BotArguments(model=str(trained_bot_dir)), window_s=0.2, max_requests=8, workers=2)
    yield process
    process.close()


def test_replies_from_the_child_are_the_bots_replies(engine, trained_bot_dir):
    bot = ChatBot.from_pretrained(trained_bot_dir, quantize=BotArguments().quantize)  # loaded as the child does
    out: list = [None] * len(REQUESTS)

    def ask(i: int) -> None:
        history, kw = REQUESTS[i]
        out[i] = engine.reply(history, **kw)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert max(r.batch_size for r in out) > 1  # they did share batches in the child
    for (history, kw), reply in zip(REQUESTS, out):
        assert key(reply) == key(bot.reply(history, **kw))


def test_bad_input_fails_only_its_request_with_the_same_message(engine, trained_bot_dir):
    bot = ChatBot.from_pretrained(trained_bot_dir)
    with pytest.raises(UserError) as remote:
        engine.reply(["   "], seed=1)
    with pytest.raises(UserError) as local:
        bot.reply(["   "], seed=1)
    assert str(remote.value) == str(local.value)
    with pytest.raises(UserError, match="num_candidates"):
        engine.reply(["你好"], num_candidates=0)
    assert engine.reply(["你好"], seed=1).text == bot.reply(["你好"], seed=1).text  # still serving


def test_a_dead_child_fails_requests_instead_of_hanging(trained_bot_dir):
    process = EngineProcess(BotArguments(model=str(trained_bot_dir)), window_s=0.0)
    try:
        assert process.reply(["你好"], seed=1).text
        process._process.kill()
        process._reader.join(30)
        with pytest.raises(RuntimeError, match="engine process stopped"):
            process.reply(["你好"], seed=1)
    finally:
        process.close()


def test_a_bad_model_fails_at_start(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "missing")):
        EngineProcess(BotArguments(model=str(tmp_path / "missing")))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the child process")
def test_the_deployed_app_serves_from_its_engine_process_and_stops_it(trained_bot_dir, monkeypatch):
    """`python -m dialogpt_zh.webapp --engine_process` as web_load starts it: light clients get their own
    replies; the app has a child process while it serves, and stopping the app (SIGTERM) stops the child."""
    pytest.importorskip("gradio")
    web_load = load_benchmark("web_load", monkeypatch)
    with web_load.app_process(BotArguments(model=str(trained_bot_dir)), GenerationSettings(), MMISettings(), 4, 16,
                              8, 5.0, 2, engine_process=True) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]
        apps = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has_port(p, port)]
        assert len(apps) == 1
        children = _children(apps[0])
        assert children and all(_running(c) for c in children)
        result = web_load.run_load(url, web_load.LoadArguments(clients=2, turns=2), ["你好", "今天好冷啊"])
        assert result["errors"] == 0 and result["crossed"] == 0 and not result["failed"]
    deadline = time.monotonic() + 30
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(c) for c in children)


def _cmdline_has_port(proc: Path, port: str) -> bool:
    try:
        args = proc.joinpath("cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"dialogpt_zh.webapp" in args and port.encode() in args
