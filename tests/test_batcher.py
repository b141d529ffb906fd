"""Cross-user batching: replies asked for at the same time share batches and stay each caller's own."""
from __future__ import annotations

import threading

import pytest

from dialogpt_zh.engine.batcher import ReplyBatcher
from dialogpt_zh.engine.bot import ChatBot
from dialogpt_zh.engine.decoding import DecodeBatch
from dialogpt_zh.errors import UserError

REQUESTS = [(["你好"], dict(seed=1)), (["你好呀，在干嘛", "在看电影呢"], dict(seed=2, num_candidates=3)),
            (["今天好冷啊"], dict(seed=3, temperature=0.7, use_mmi=False)), (["晚饭吃什么"], dict(seed=4, top_k=3)),
            (["你好"], dict(seed=5))]


@pytest.fixture(scope="module")
def bot(trained_bot_dir) -> ChatBot:
    return ChatBot.from_pretrained(trained_bot_dir)


@pytest.fixture(params=[True, False], ids=["continuous", "batch-by-batch"])
def continuous(request) -> bool:
    """Both ways of batching: requests join running batches, or wait for the next batch."""
    return request.param


def call_together(batcher: ReplyBatcher, requests) -> list:
    """Every request from its own thread, released at once; results (or exceptions) in request order."""
    out: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int, history, kw) -> None:
        start.wait()
        try:
            out[i] = batcher.reply(history, **kw)
        except Exception as e:  # noqa: BLE001 - returned for the test to check
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, h, kw)) for i, (h, kw) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def key(reply):
    return reply.text, [(c.text, c.rank, round(c.forward_logprob, 3)) for c in reply.candidates], reply.seed


def test_concurrent_requests_share_batches_and_get_their_own_replies(bot, continuous):
    batcher = ReplyBatcher(bot, window_s=0.5, max_requests=8, continuous=continuous)
    assert batcher.continuous == continuous
    try:
        got = call_together(batcher, REQUESTS)
    finally:
        batcher.close()
    assert batcher.requests == len(REQUESTS) and batcher.batches < len(REQUESTS)  # some shared a batch
    assert max(r.batch_size for r in got) > 1
    for (history, kw), reply in zip(REQUESTS, got):
        assert key(reply) == key(bot.reply(history, **kw))
        assert reply.context[-1] == history[-1]


def test_batches_respect_the_request_and_row_limits(bot, continuous):
    batcher = ReplyBatcher(bot, window_s=0.5, max_requests=2, max_rows=1000, continuous=continuous)
    try:
        got = call_together(batcher, REQUESTS)
    finally:
        batcher.close()
    assert all(r.batch_size <= 2 for r in got) and batcher.batches >= 3
    # one request per batch at most
    batcher = ReplyBatcher(bot, window_s=0.5, max_requests=8, max_rows=1, continuous=continuous)
    try:
        got = call_together(batcher, REQUESTS[:3])
    finally:
        batcher.close()
    assert [r.batch_size for r in got] == [1, 1, 1]


def test_two_workers_both_take_batches_and_stay_alive(bot, continuous):
    """With two workers, one can empty the queue while the other waits out its window; that other must go
    back to waiting, not stop (it did: an empty take was read as "closed")."""
    batcher = ReplyBatcher(bot, window_s=0.2, max_requests=2, max_rows=1000, workers=2, continuous=continuous)
    seen: set[str] = set()
    alone = [key(bot.reply(history, **kw)) for history, kw in REQUESTS]
    real = bot.finish_replies

    def note_worker(requests):
        seen.add(threading.current_thread().name)
        return real(requests)

    bot.finish_replies = note_worker  # instance attribute: both ways of batching end in bot.finish_replies
    try:
        for _ in range(3):  # rounds: a worker that stopped in one would be missing after it
            got = call_together(batcher, REQUESTS)
            assert all(w.is_alive() for w in batcher._workers)
            assert [key(reply) for reply in got] == alone
    finally:
        del bot.finish_replies
        batcher.close()
    assert seen == {"reply-batcher-0", "reply-batcher-1"}
    assert not any(w.is_alive() for w in batcher._workers)
    with pytest.raises(ValueError):
        ReplyBatcher(bot, workers=0)


def test_bad_input_fails_alone_and_a_failed_batch_is_retried_per_request(bot, monkeypatch, continuous):
    batcher = ReplyBatcher(bot, window_s=0.3, continuous=continuous)
    real = DecodeBatch.step

    def fails_in_company(self):  # a batch with more than one request fails; alone they work
        if len(self) > 1:
            raise RuntimeError("simulated batch failure")
        return real(self)

    try:
        got = call_together(batcher, [(["你好"], dict(seed=1)), (["   "], dict(seed=2)),
                                      (["你好"], dict(seed=1, num_candidates=0))])
        assert not isinstance(got[0], Exception)
        assert isinstance(got[1], UserError) and isinstance(got[2], UserError)
        monkeypatch.setattr(DecodeBatch, "step", fails_in_company)
        got = call_together(batcher, REQUESTS[:3])
    finally:
        batcher.close()
    monkeypatch.undo()
    for (history, kw), reply in zip(REQUESTS[:3], got):
        alone = bot.reply(history, **kw)
        assert key(reply) == key(alone)  # the same draws as if the batch had not failed
        assert reply.notices == alone.notices  # the failed attempt left nothing behind
    with pytest.raises(RuntimeError, match="closed"):
        batcher.reply(["你好"])
    with pytest.raises(ValueError):
        ReplyBatcher(bot, window_s=-1)


def test_batch_throughput_benchmark_smoke(monkeypatch, capsys, random_bot_dir):
    """benchmarks/batch_throughput.py runs end to end on a tiny bot and refuses bad lists by field name."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("batch_throughput", monkeypatch)
    code = bench.main(["--model", str(random_bot_dir), "--batch_sizes", "1,3", "--requests", "3", "--rounds", "1",
                       "--clients", "3", "--turns", "2", "--workers", "1,2", "--max_length", "3",
                       "--num_candidates", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split("|")[0].strip() for line in out.splitlines() if "|" in line and "replies/s" not in line]
    assert rows == ["1", "3"]
    loops = [line for line in out.splitlines() if line.startswith("closed loop")]
    assert len(loops) == 2 and "1 worker(s)" in loops[0] and "2 worker(s)" in loops[1]
    for flag, bad in (("--batch_sizes", "0"), ("--workers", "x"), ("--requests", "0")):
        assert bench.main(["--model", str(random_bot_dir), flag, bad]) == 2
        assert flag.lstrip("-") in capsys.readouterr().err
