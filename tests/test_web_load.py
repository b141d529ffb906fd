"""benchmarks/web_load.py's light clients: they speak Gradio's queue protocol correctly (replies, per-session
state) and its history check catches sessions that share state."""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from dialogpt_zh import webapp  # noqa: E402
from dialogpt_zh.engine.bot import ChatBot  # noqa: E402
from tests.conftest import load_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def web_load():
    return load_benchmark("web_load")


@pytest.fixture(scope="module")
def app_url(random_bot_dir):
    bot = ChatBot.from_pretrained(random_bot_dir, generation=None)
    demo = webapp.build_app(bot)
    url = webapp.launch_in_background(demo)
    yield url
    if getattr(demo, "reply_batcher", None) is not None:
        demo.reply_batcher.close()
    demo.close()


def test_light_clients_get_replies_in_their_own_sessions(web_load, app_url):
    args = web_load.LoadArguments(clients=3, turns=3, client="light")
    result = web_load.run_load(app_url, args, ["你好", "今天天气真好", "你喜欢看电影吗"])
    assert result["errors"] == 0 and result["crossed"] == 0 and not result["failed"]
    assert result["rate"] > 0


def test_a_shared_session_is_caught_as_crossed_history(web_load, app_url):
    template = web_load.QueueTemplate(app_url)
    results: dict[int, dict] = {}
    barrier = threading.Barrier(1)
    # two users forced into one session: the second sees the first's messages in its chat
    web_load.run_user(app_url, 0, 2, ["你好"], barrier, results, template, session_hash="shared12345")
    web_load.run_user(app_url, 1, 2, ["再见"], barrier, results, template, session_hash="shared12345")
    assert results[0]["errors"] == [] and results[0]["mismatches"] == 0
    assert results[1]["errors"] == [] and results[1]["mismatches"] == 2
