"""The Gradio page, driven over HTTP with gradio_client against an app on a free port (tiny trained bot)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from dialogpt_zh import webapp  # noqa: E402
from dialogpt_zh.engine.bot import ChatBot  # noqa: E402
from dialogpt_zh.settings import (  # noqa: E402
    AUTO_NUM_CANDIDATES,
    AUTO_NUM_CANDIDATES_WITH_RETRIEVAL,
    PAGE_RANGES,  # noqa: E402
    GenerationSettings,
    MMISettings,
)

REPO = Path(__file__).resolve().parent.parent
MAX_CHARS = 20


def client(url: str):
    return gradio_client.Client(url, verbose=False, analytics_enabled=False, download_files=False)


def texts(chat: list[dict], role: str | None = None) -> list[str]:
    """Message texts from the Chatbot value the client receives (content is a list of text parts)."""
    return ["".join(part["text"] for part in m["content"]) for m in chat if role is None or m["role"] == role]


class FlakyBot:
    """A real ChatBot that fails on demand, to check an engine error reaches the page as a message."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.generation, self.mmi_settings, self.notices = bot.generation, bot.mmi_settings, bot.notices

    def reply(self, history, **kw):
        if "坏" in history[-1]:
            raise RuntimeError("simulated engine failure")
        return self.bot.reply(history, **kw)


@pytest.fixture(scope="module")
def bot(trained_bot_dir) -> ChatBot:
    return ChatBot.from_pretrained(trained_bot_dir, generation=GenerationSettings(num_candidates=5, max_length=12))


@pytest.fixture(scope="module")
def app_url(bot):
    demo = webapp.build_app(bot, max_input_chars=MAX_CHARS)
    url = webapp.launch_in_background(demo)
    yield url
    demo.close()


def test_two_turns_return_scored_candidates(app_url, bot):
    c = client(app_url)
    box, chat, table, status = c.predict("你好", api_name="/chat")
    assert box == ""
    assert texts(chat, "user") == ["你好"] and len(chat) == 2
    rows = table["data"]
    assert table["headers"] == webapp.CANDIDATE_HEADERS
    assert 1 <= len(rows) <= 5
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0][1] == "★" and all(r[1] == "" for r in rows[1:])
    assert rows[0][2] == texts(chat, "assistant")[0]          # the chosen candidate is the reply shown
    scores = [r[5] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:                                             # forward and backward (MMI) log-probs present
        assert math.isfinite(r[3]) and r[3] < 0 and math.isfinite(r[4]) and r[4] < 0
    assert "秒" in status and "MMI 开" in status

    box, chat, table, status = c.predict("今天天气不错", num_candidates=3, api_name="/chat")
    assert texts(chat, "user") == ["你好", "今天天气不错"] and len(chat) == 4
    assert 1 <= len(table["data"]) <= 3


def test_histories_are_per_client(app_url):
    a, b = client(app_url), client(app_url)
    a.predict("我是小明", api_name="/chat")
    b.predict("我叫小红", api_name="/chat")
    _, chat_a, _, _ = a.predict("你吃饭了吗", api_name="/chat")
    _, chat_b, _, _ = b.predict("周末去哪玩", api_name="/chat")
    assert texts(chat_a, "user") == ["我是小明", "你吃饭了吗"]
    assert texts(chat_b, "user") == ["我叫小红", "周末去哪玩"]
    _, chat_a, table, status = a.predict(api_name="/reset")
    assert chat_a == [] and table["data"] == []
    _, chat_a, _, _ = a.predict("重新开始", api_name="/chat")
    assert texts(chat_a, "user") == ["重新开始"]
    _, chat_b, _, _ = b.predict("好的", api_name="/chat")
    assert texts(chat_b, "user") == ["我叫小红", "周末去哪玩", "好的"]


def test_empty_input_is_ignored(app_url):
    c = client(app_url)
    c.predict("你好", api_name="/chat")
    box, chat, table, status = c.predict("   ", api_name="/chat")
    assert texts(chat, "user") == ["你好"] and len(chat) == 2   # nothing added, nothing asked of the engine
    assert table == {"__type__": "update"} and status == {"__type__": "update"}  # left as they were


def test_overlong_input_is_truncated_with_notice(app_url):
    c = client(app_url)
    long = "今天天气很好我们一起出去玩吧" * 3
    assert len(long) > MAX_CHARS
    _, chat, table, status = c.predict(long, api_name="/chat")
    assert texts(chat, "user") == [long[:MAX_CHARS]]
    assert f"只保留了前 {MAX_CHARS} 个字" in status
    assert table["data"]


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_candidate_columns_add_up_to_the_final_score(normalize):
    """The table's log-prob columns are in the unit the score uses, and the status line's formula, applied to a
    row's columns, gives the row's final score."""
    from dialogpt_zh.engine.results import Candidate, Reply
    from dialogpt_zh.settings import mmi_score

    weights, bonus = (0.5, 1.5, 0.25), 0.3
    cands = []
    for i, (fwd, bwd, n, n_ctx, source) in enumerate([(-9.0, -16.68, 6, 8, "sampled"), (-4.0, -20.0, 3, 8, "retrieved"),
                                                      (-12.5, -7.5, 10, 5, "sampled+retrieved")]):
        score = float(mmi_score(fwd, bwd, n, n_ctx, *weights, normalize, "retrieved" in source, bonus))
        cands.append(Candidate(text=f"候选{i}", token_ids=[], forward_logprob=fwd, backward_logprob=bwd, num_tokens=n,
                               num_context_tokens=n_ctx, score=score, source=source))
    for rank, c in enumerate(sorted(cands, key=lambda c: -c.score), 1):
        c.rank = rank
    reply = Reply(text=cands[0].text, candidates=cands, latency_s=0.1, timings={}, mmi=True, notices=[],
                  weights=weights, normalize=normalize, retrieved_bonus=bonus)
    headers = webapp.candidate_headers(normalize)
    unit = "每词元平均" if normalize == "mean" else "总和"
    assert unit in headers[3] and unit in headers[4] and headers[5] == "最终得分"
    legend = webapp.status_markdown(reply, [])
    assert "最终得分 = 0.5·前向 + 1.5·后向 + 0.25·词元数 + 0.3·检索" in legend and unit in legend
    rows = webapp.candidates_table(reply)
    for row in rows:
        retrieved = "检索" in row[8]
        assert row[5] == pytest.approx(0.5 * row[3] + 1.5 * row[4] + 0.25 * row[6] + 0.3 * retrieved, abs=0.003)
    if normalize == "mean":   # per token: fwd / reply tokens, bwd / context tokens
        first = next(r for r in rows if r[2] == "候选0")
        assert (first[3], first[4]) == (round(-9.0 / 6, 3), round(-16.68 / 8, 3))


def test_mmi_weight_zero_ranks_by_forward_only(app_url):
    _, _, table, status = client(app_url).predict("你好", backward_weight=0, api_name="/chat")
    assert "MMI 关" in status
    assert all(r[4] is None for r in table["data"])
    scores = [r[5] for r in table["data"]]
    assert scores == sorted(scores, reverse=True)


class SlowBot(FlakyBot):
    """A real ChatBot whose replies take a while, and which says when a reply has started."""

    def __init__(self, bot: ChatBot) -> None:
        super().__init__(bot)
        self.started = threading.Semaphore(0)

    def reply(self, history, **kw):
        self.started.release()
        time.sleep(0.8)
        return self.bot.reply(history, **kw)


def test_clear_wins_over_replies_in_flight(bot):
    slow = SlowBot(bot)
    demo = webapp.build_app(slow)
    url = webapp.launch_in_background(demo)
    try:
        c = client(url)
        for trial in range(3):
            c.predict(f"旧话{trial}", api_name="/chat")
            slow.started.acquire(timeout=30)
            jobs = [c.submit(f"在途{trial}{k}", api_name="/chat") for k in range(2)]
            for _ in jobs:
                assert slow.started.acquire(timeout=30)      # both replies are being computed now
            _, chat, table, _ = c.predict(api_name="/reset")
            assert chat == [] and table["data"] == []
            for job in jobs:
                job.result(timeout=60)
            _, chat, _, _ = c.predict(f"新话{trial}", api_name="/chat")
            slow.started.acquire(timeout=30)
            assert texts(chat, "user") == [f"新话{trial}"], trial   # nothing from before the clear came back
            c.predict(api_name="/reset")
    finally:
        demo.close()


class PacedBot:
    """A stand-in bot whose replies take `delay_s` and which says when a reply has started (no model)."""

    def __init__(self, delay_s: float) -> None:
        self.generation, self.mmi_settings, self.notices = GenerationSettings(), MMISettings(), []
        self.delay_s = delay_s
        self.started = threading.Event()

    def reply(self, history, **kw):
        from dialogpt_zh.engine.results import Candidate, Reply

        self.started.set()
        time.sleep(self.delay_s)
        c = Candidate(text=f"回{len(history)}", token_ids=[], forward_logprob=-2.0, backward_logprob=-3.0,
                      num_tokens=2, num_context_tokens=2, score=-1.5, rank=1)
        return Reply(text=c.text, candidates=[c], latency_s=self.delay_s, timings={}, mmi=True, notices=[],
                     weights=(0.0, 1.0, 0.0))


def _handler(demo, api_name: str):
    (fn,) = [f.fn for f in demo.fns.values() if f.api_name == api_name]
    return fn


def test_clear_always_wins_when_racing_a_reply_being_delivered():
    """The handlers called directly, as Gradio calls them: the reply's outputs are stored a moment after the
    handler gives them (`store_s`, Gradio's own work), and clear is pressed at many moments from the start of
    the reply to after its outputs are stored. Whatever the moment, the chat ends empty."""
    bot = PacedBot(delay_s=0.05)
    demo = webapp.build_app(bot, max_batch=1)
    chat_fn, reset_fn = _handler(demo, "chat"), _handler(demo, "reset")
    sliders = [getattr(bot.generation, c.name, getattr(bot.mmi_settings, c.name, None)) for c in webapp.CONTROLS]
    store_s = 0.05
    is_skip = lambda v: isinstance(v, dict) and v.get("__type__") == "update"  # noqa: E731

    def race(trial: int, clear_after_s: float) -> list[str]:
        request = webapp.gr.Request(session_hash=f"race{trial}")
        page = {"history": ["旧话", "旧回复"]}
        store = threading.Lock()  # Gradio stores one event's outputs at a time

        def apply(outputs):
            with store:
                if not is_skip(outputs[2]):
                    page["history"] = outputs[2]

        def send():
            result = chat_fn("在途", page["history"], request, *sliders)
            outputs = next(result) if hasattr(result, "__next__") else result
            time.sleep(store_s)
            apply(outputs)
            if hasattr(result, "__next__"):
                assert next(result, None) is None  # one output only

        bot.started.clear()
        sender = threading.Thread(target=send)
        sender.start()
        assert bot.started.wait(10)
        time.sleep(clear_after_s)
        apply(reset_fn(request))
        sender.join(10)
        return page["history"]

    span = bot.delay_s + store_s + 0.02  # from the reply's start to after its outputs are stored
    for trial in range(24):
        assert race(trial, trial * span / 23) == [], trial


def test_clear_wins_over_a_reply_still_waiting_in_the_queue():
    """One reply at a time: the second request waits in Gradio's queue while the first computes, the person
    clears, and only then does the second start. Neither may come back."""
    bot = PacedBot(delay_s=0.6)
    demo = webapp.build_app(bot, max_batch=1, concurrency=1)
    url = webapp.launch_in_background(demo)
    try:
        c = client(url)
        first = c.submit("第一句", api_name="/chat")
        assert bot.started.wait(30)
        second = c.submit("第二句", api_name="/chat")
        deadline = time.monotonic() + 30
        while second.status().code != gradio_client.utils.Status.IN_QUEUE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.status().code == gradio_client.utils.Status.IN_QUEUE   # on the server, waiting
        c.predict(api_name="/reset")
        first.result(timeout=60)
        second.result(timeout=60)
        _, chat, _, _ = c.predict("新话", api_name="/chat")
        assert texts(chat, "user") == ["新话"]
    finally:
        demo.close()


def test_api_values_outside_the_page_ranges_are_refused(app_url):
    # Gradio checks slider values sent through the API against the slider's range; keep it so (an
    # upgrade must not let a client ask for 100000 candidates).
    c = client(app_url)
    hi = PAGE_RANGES["num_candidates"][1]
    with pytest.raises(Exception, match=f"num_candidates|{hi}|range|maximum"):
        c.predict("你好", num_candidates=hi + 1, api_name="/chat")
    with pytest.raises(Exception):
        c.predict("你好", temperature=PAGE_RANGES["temperature"][0] / 2, api_name="/chat")
    _, chat, _, _ = c.predict("你好", num_candidates=hi, api_name="/chat")   # the top of the range is fine
    assert texts(chat, "user") == ["你好"]


def test_engine_error_is_a_message_and_transcript_is_opt_in(bot, tmp_path, caplog):
    transcript = tmp_path / "chats.jsonl"
    demo = webapp.build_app(FlakyBot(bot), transcript=transcript)
    url = webapp.launch_in_background(demo)
    try:
        c = client(url)
        c.predict("你好", api_name="/chat")
        box, chat, _, status = c.predict("坏了", api_name="/chat")
        assert box == "坏了"                                    # kept so the user can retry
        assert texts(chat, "user") == ["你好"]                  # history unchanged
        # a remote user sees a generic message; the details are in the server log
        assert "出错" in status and "simulated" not in status and "RuntimeError" not in status
        assert "simulated engine failure" in caplog.text
        _, chat, table, _ = c.predict("再来", api_name="/chat")  # the page still works afterwards
        assert texts(chat, "user") == ["你好", "再来"] and table["data"]
    finally:
        demo.close()
        demo.transcript_writer.close()
    records = [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines()]
    assert [r["user"] for r in records] == ["你好", "再来"]       # the failed turn is not logged as a reply
    assert records[0]["session"] == records[1]["session"]
    assert records[1]["candidates"][0]["rank"] == 1 and records[1]["reply"] == records[1]["candidates"][0]["text"]


def test_controls_default_to_engine_settings(bot):
    gen = GenerationSettings(num_candidates=7, top_p=0.85, max_history=4)
    mmi = MMISettings(backward_weight=1.25)
    demo = webapp.build_app(bot, gen, mmi)
    sliders = {b.elem_id: b for b in demo.blocks.values() if isinstance(b, webapp.gr.Slider)}
    assert set(sliders) == {f"ctl_{c.name}" for c in webapp.CONTROLS}
    for c in webapp.CONTROLS:
        s = sliders[f"ctl_{c.name}"]
        expected = getattr(gen, c.name) if hasattr(gen, c.name) else getattr(mmi, c.name)
        assert s.value == expected, c.name                              # the default is the engine's setting
        assert (s.minimum, s.maximum, s.step) == PAGE_RANGES[c.name]    # the range is the settings module's
    assert sliders["ctl_num_candidates"].value == 7 and sliders["ctl_backward_weight"].value == 1.25
    parser = webapp.make_web_parser()
    bot_args, args, gen, mmi = parser.parse_args_into_dataclasses(
        ["--port", "8000", "--top_p", "0.8", "--transcript", "t", "--model", "m"])
    # num_candidates -1 (auto, the flag's default): the slider shows this bot's count, never -1
    assert gen.num_candidates == -1

    def candidate_slider(bot_with_or_without_index) -> float:
        demo = webapp.build_app(bot_with_or_without_index, gen, mmi)
        return next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ctl_num_candidates")

    assert bot.retrieval is None and candidate_slider(bot) == AUTO_NUM_CANDIDATES
    with_index = copy.copy(bot)
    with_index.retrieval = object()      # only whether there is an index matters here
    assert candidate_slider(with_index) == AUTO_NUM_CANDIDATES_WITH_RETRIEVAL
    assert (args.port, args.host, args.transcript, gen.top_p, bot_args.model) == (8000, "127.0.0.1", "t", 0.8, "m")


def test_concurrency_auto_lets_batched_requests_through(bot):
    """--concurrency 0 (the default): 32 replies in flight with cross-user batching, 4 without; a number given
    is kept. The chat event and the queue's default both get it."""
    def chat_limit(demo):
        (fn,) = [f for f in demo.fns.values() if f.api_name == "chat"]
        return fn.concurrency_limit

    cases = [({}, webapp.AUTO_CONCURRENCY_BATCHED), ({"max_batch": 1}, webapp.AUTO_CONCURRENCY_ALONE),
             ({"concurrency": 7}, 7), ({"concurrency": 3, "max_batch": 1}, 3)]
    for kwargs, expected in cases:
        demo = webapp.build_app(bot, **kwargs)
        try:
            assert chat_limit(demo) == expected, kwargs
        finally:
            if demo.reply_batcher is not None:
                demo.reply_batcher.close()
    assert webapp.WebArguments().concurrency == 0
    assert (webapp.AUTO_CONCURRENCY_BATCHED, webapp.AUTO_CONCURRENCY_ALONE) == (32, 4)


def test_launcher_runs_from_a_fresh_checkout(tmp_path):
    # `python web/app.py` must work without the package installed and from any directory.
    result = subprocess.run([sys.executable, str(REPO / "web" / "app.py"), "--model", str(tmp_path / "missing")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "model path not found" in result.stderr and "Traceback" not in result.stderr


# Refused before a model is loaded or a port opened: exit 2, one line naming the field, no traceback.
HOSTILE_FLAGS = [
    (["--num_candidates", "100000"], "num_candidates"), (["--max_length", "100000"], "max_length"),
    (["--temperature", "inf"], "temperature"), (["--backward_weight", "nan"], "backward_weight"),
    (["--top_p", "1.5"], "top_p"), (["--device", "cuda"], "device"), (["--concurrency", "-1"], "concurrency"),
    (["--max_queue", "0"], "max_queue"), (["--port", "70000"], "port"),
    (["--max_input_chars", "0"], "max_input_chars"), (["--transcript", "{tmp}"], "transcript"),
    (["--threads", "-2"], "threads"), (["--batch_workers", "0"], "batch_workers"), (["--host", ""], "host"),
    (["--host", " "], "host"),
]


@pytest.mark.parametrize("flags,field", HOSTILE_FLAGS, ids=[" ".join(f) for f, _ in HOSTILE_FLAGS])
def test_hostile_flags_are_refused_up_front(flags, field, tmp_path, capsys):
    code = webapp.main(["--model", str(tmp_path / "no_model_here"),
                        *[f.replace("{tmp}", str(tmp_path)) for f in flags]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and field in err and "Traceback" not in err


def test_concurrent_users_share_batches_and_keep_their_own_chats(bot):
    """Replies requested together are computed in one batch (a long batching window makes sure) and each
    client gets the reply the bot gives its own history alone, with the page's fixed seed."""
    demo = webapp.build_app(bot, seed=7, max_batch=8, batch_window_ms=400)
    url = webapp.launch_in_background(demo)
    openers = ["你好", "今天好冷啊", "晚饭吃什么", "周末去哪玩"]
    chats: dict[int, list] = {}
    start = threading.Barrier(len(openers))

    def run(i: int) -> None:
        c = client(url)
        start.wait()
        c.predict(openers[i], api_name="/chat")
        chats[i] = c.predict("真的吗", api_name="/chat")[1]

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(openers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert demo.reply_batcher.batches < demo.reply_batcher.requests == 2 * len(openers)
    finally:
        demo.reply_batcher.close()
        demo.close()
    for i, opener in enumerate(openers):
        assert texts(chats[i], "user") == [opener, "真的吗"]
        first = bot.reply([opener], seed=7)
        second = bot.reply([opener, first.text, "真的吗"], seed=7)
        assert texts(chats[i], "assistant") == [first.text, second.text]


def test_the_page_batches_a_chatbot_and_uses_any_other_replier_as_it_is(bot):
    from dialogpt_zh.engine.batcher import ReplyBatcher

    batched = webapp.make_replier(bot, None, max_batch=8, batch_window_ms=5, batch_workers=1,
                                  continuous_batching=False)
    try:
        assert isinstance(batched, ReplyBatcher)
    finally:
        batched.close()
    assert webapp.make_replier(bot, None, 1, 5, 1, False) is bot              # --max_batch 1: each alone
    stand_in = FlakyBot(bot)                                                    # a Replier, not a ChatBot
    assert webapp.make_replier(stand_in, None, 8, 5, 1, False) is stand_in
    assert webapp.make_replier(bot, stand_in, 8, 5, 1, False) is stand_in     # the caller's replier wins


def test_the_history_note_comes_once_and_only_when_a_typed_line_is_dropped():
    from dialogpt_zh.webapp import first_drop_of_typed_lines

    # max_history 3: the model sees the last 3 lines of history + [message]
    assert not first_drop_of_typed_lines([], ["你好"])
    assert not first_drop_of_typed_lines(["你好", "你好呀"], ["你好", "你好呀", "吃了吗"])
    assert first_drop_of_typed_lines(["你好", "你好呀", "吃了吗", "吃了"], ["吃了吗", "吃了", "你呢"])
    assert not first_drop_of_typed_lines(["a", "b", "c", "d", "e", "f"], ["e", "f", "g"])  # said already
    assert not first_drop_of_typed_lines(["你好"], None)  # a stand-in reply without its context


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_web_command_exits_like_every_command_when_stopped(random_bot_dir, tmp_path, signum, code):
    """gradio's launch swallows the signal that stops it; the command still exits 143 (SIGTERM) / 130 (Ctrl-C),
    not 0, so a supervisor sees how it ended."""
    port = webapp.free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "dialogpt_zh.webapp", "--model", str(random_bot_dir),
                             "--port", str(port), "--threads", "1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out
    assert "Traceback" not in out


def test_transcript_or_feedback_inside_the_bot_is_refused(random_bot_dir, monkeypatch, capsys):
    """The page's transcript and feedback files are outputs: refused inside the bot directory it reads, before
    the bot loads (load_bot fails the test here, so a missing check cannot start a server)."""
    import dialogpt_zh.engine.bot as engine_bot

    def no_load(*args, **kwargs):
        raise AssertionError("the bot was loaded: the output check did not run first")

    monkeypatch.setattr(engine_bot, "load_bot", no_load)
    for flag in ("--transcript", "--feedback"):
        target = random_bot_dir / "forward" / "notes.jsonl"
        assert webapp.main(["--model", str(random_bot_dir), flag, str(target)]) == 2
        assert f"would write over or inside the input {random_bot_dir.resolve()}" in capsys.readouterr().err
        assert not target.exists()
