"""The reply engine in a process of its own, for the web page: `EngineProcess(...).reply(history, ...)` has
`ReplyBatcher.reply`'s signature and result.

Why: Gradio's event loop and handler threads run Python in the app's process. Beside them, the batcher's
threads wait for the interpreter lock between the many small torch calls of a batch (docs/web.md, "The app
in its own process", measured what that costs). In a child process the engine
has an interpreter of its own; only the request (history, seed, settings) and the finished Reply cross the
pipe, pickled between our own two processes (nothing from a user's file is unpickled).

The child loads the bot from the same `BotArguments` and settings, runs a `ReplyBatcher`, and answers each
request with (request id, Reply) or (request id, error). Bad input fails only its request, as a UserError
with the same message. If the child dies, every waiting and later request fails with a RuntimeError (the
page shows its generic error) instead of hanging.
"""
from __future__ import annotations

import itertools
import multiprocessing
import threading
from concurrent.futures import Future
from typing import Any

from dialogpt_zh.engine.results import Reply
from dialogpt_zh.errors import UserError
from dialogpt_zh.settings import BotArguments, GenerationSettings, MMISettings


def _portable_error(e: BaseException) -> tuple[str, str]:
    """An error as (kind, message): UserError stays a UserError in the parent, anything else a RuntimeError."""
    if isinstance(e, UserError):
        return "user", str(e)
    return "other", f"{type(e).__name__}: {e}"


def _serve(conn, bot_args: BotArguments, generation: GenerationSettings | None, mmi: MMISettings | None,
           batcher_options: dict[str, Any]) -> None:
    """The child: load the bot, then answer requests until the parent sends None or goes away."""
    import signal

    from dialogpt_zh.engine.batcher import ReplyBatcher
    from dialogpt_zh.engine.bot import load_bot

    # Ctrl-C reaches the whole process group: the parent stops the child (close(), or the pipe's end when the
    # parent dies), so the child neither prints a traceback nor drops requests half-way on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        bot = load_bot(bot_args, generation, mmi)
        batcher = ReplyBatcher(bot, **batcher_options)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", _portable_error(e)))
        return
    conn.send(("ready", None))
    send_lock = threading.Lock()

    def answer(rid: int, ok: bool, value: Any) -> None:
        with send_lock:
            conn.send((rid, ok, value))

    def done(rid: int, future: Future) -> None:
        error = future.exception()
        answer(rid, error is None, future.result() if error is None else _portable_error(error))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        rid, history, seed, settings = message
        try:
            job = bot.prepare_reply(history, seed=seed, **settings)
            batcher.submit(job).add_done_callback(lambda f, rid=rid: done(rid, f))
        except BaseException as e:  # noqa: BLE001 - this request's error, sent back
            answer(rid, False, _portable_error(e))
    batcher.close()


class EngineProcess:
    """A `ReplyBatcher` over `load_bot(bot_args, generation, mmi)` in a child process."""

    def __init__(self, bot_args: BotArguments, generation: GenerationSettings | None = None,
                 mmi: MMISettings | None = None, *, start_timeout_s: float = 300.0, **batcher_options: Any) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_conn, bot_args, generation, mmi, batcher_options),
                                    name="dialogpt-zh-engine", daemon=True)
        self._process.start()
        child_conn.close()
        if not self._conn.poll(start_timeout_s):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            status, detail = self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the engine process exited with {self._process.exitcode} while starting") from None
        if status != "ready":
            kind, text = detail
            raise UserError(text) if kind == "user" else RuntimeError(f"the engine process failed to start: {text}")
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def reply(self, history, *, seed: int | None = None, **settings: Any) -> Reply:
        """`ChatBot.reply`, computed in the child's batches."""
        future: Future = Future()
        with self._lock:
            if self._dead is not None:
                raise RuntimeError(self._dead)
            rid = next(self._ids)
            self._pending[rid] = future
            try:
                self._conn.send((rid, list(history), seed, settings))
            except (OSError, ValueError) as e:
                del self._pending[rid]
                raise RuntimeError(f"the engine process is gone: {e}") from None
        return future.result()

    def _read(self) -> None:
        while True:
            try:
                rid, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(rid, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                kind, text = value
                future.set_exception(UserError(text) if kind == "user" else RuntimeError(text))
        self._process.join(2)  # its exit code, for the message
        with self._lock:  # the child is gone: nobody waits forever
            self._dead = f"the engine process stopped (exit code {self._process.exitcode})"
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(RuntimeError(self._dead))

    def close(self) -> None:
        """Let the child finish what it has, then stop it."""
        with self._lock:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
