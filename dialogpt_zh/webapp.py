"""Gradio chat page over the one reply engine (`ChatBot`): chat panel + the last turn's MMI candidates.

A thin face: sampling and scoring happen in `dialogpt_zh.engine.bot`; this file only turns page controls into
`ChatBot.reply` keywords and the `Reply` into a chat message, a candidates table and a status line.

Each browser session keeps its own history in a `gr.State` (no module-level conversation state), and the
queue runs up to `--concurrency` replies at once (auto: 32 batched, 4 alone). Nothing is written to disk
unless `--transcript` is given.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry or version-check calls
import gradio as gr  # noqa: E402

from dialogpt_zh.cli import make_parser, parse, raise_if_stopped, run_main  # noqa: E402
from dialogpt_zh.engine.results import HISTORY_NOTICE_PREFIX  # noqa: E402
from dialogpt_zh.errors import UserError  # noqa: E402
from dialogpt_zh.fsutil import check_jsonl_output, check_output_file  # noqa: E402
from dialogpt_zh.settings import (  # noqa: E402
    PAGE_RANGES,
    BotArguments,
    GenerationSettings,
    MMISettings,
    SettingsError,
    apply_overrides,
    check_seed,
    field_help,
    resolve_auto,
)
from dialogpt_zh.webui.view import (  # noqa: E402,F401
    CANDIDATE_HEADERS,
    candidate_headers,
    candidates_table,
    checked_textbox,
    history_to_messages,
    score_legend,
)

if TYPE_CHECKING:  # the engine (torch) is imported when a bot is loaded, not with this module
    from dialogpt_zh.engine.results import Reply

log = logging.getLogger(__name__)

TITLE = "中文闲聊机器人 · GPT-2 生成 + MMI 重排"
EXAMPLE_OPENERS = ["你好呀", "今天天气真好，出去玩吗？", "你喜欢看什么电影？", "最近工作好累啊", "晚饭吃什么好呢"]


# --concurrency 0 (auto). Batched: requests held in Gradio's queue reach the batcher only when a slot frees,
# often just after a batch formed, so they wait a batch more (measured, docs/web.md); 32 stays below Gradio's
# 40 worker threads. Alone (--max_batch 1): each admitted request computes, so few at once on few cores.
AUTO_CONCURRENCY_BATCHED = 32
AUTO_CONCURRENCY_ALONE = 4


def resolve_concurrency(concurrency: int, max_batch: int) -> int:
    """The page's concurrency limit: `concurrency` if > 0, else the auto value for `max_batch`."""
    if concurrency > 0:
        return concurrency
    return AUTO_CONCURRENCY_BATCHED if max_batch > 1 else AUTO_CONCURRENCY_ALONE


@dataclass
class WebArguments:
    """Flags of the web face itself; generation and MMI flags come from the engine's dataclasses."""

    host: str = field(default="127.0.0.1", metadata=field_help(
        "address to listen on (0.0.0.0 makes the page reachable from other machines)"))
    port: int = field(default=7860, metadata=field_help("port to listen on"))
    share: bool = field(default=False, metadata=field_help(
        "also open a temporary public *.gradio.live link (needs internet; off by default)"))
    transcript: str | None = field(default=None, metadata=field_help(
        "append every turn (session id, message, reply, candidates) as JSON lines to this file; "
        "without it nothing is written to disk"))
    concurrency: int = field(default=0, metadata=field_help(
        "reply requests handled at once (waiting for or computing a batch); more wait in Gradio's queue. "
        f"0 = auto: {AUTO_CONCURRENCY_BATCHED} with cross-user batching (a request waits in the batcher, not "
        f"in Gradio's queue: a lower p95 than with 16 in 4 of 5 alternating runs of 20 users, docs/web.md), "
        f"{AUTO_CONCURRENCY_ALONE} with --max_batch 1 (each of them computes at once)"))
    max_batch: int = field(default=8, metadata=field_help(
        "replies of different users computed together in one sampling and one MMI batch; 1 = no "
        "cross-user batching (each reply computed on its own, up to --concurrency at once; docs/web.md)"))
    batch_window_ms: float = field(default=5.0, metadata=field_help(
        "an idle server waits this long after a request for others to share its batch (0: never waits; "
        "requests that arrive while a batch runs form the next one, or join it with --continuous_batching)"))
    continuous_batching: bool = field(default=False, metadata=field_help(
        "with --max_batch > 1: a request joins a running batch at its next decoding step and leaves it as "
        "soon as its own reply is ready, instead of waiting for the running batch to end (on 2 cores no "
        "faster than batch by batch, docs/web.md)"))
    engine_process: bool = field(default=True, metadata=field_help(
        "with --max_batch > 1: compute replies in a child process with its own interpreter, so the batches "
        "do not wait for Gradio's Python (more replies/s: docs/web.md); the page's process still "
        "loads the bot for its settings; --no_engine_process computes them in the page's process"))
    batch_workers: int = field(default=2, metadata=field_help(
        "with --max_batch > 1: threads taking batches from the queue, so a batch can start while another "
        "runs (each gets its share of the free cores; on 2 cores 2 beat 1: docs/web.md)"))
    max_queue: int = field(default=64, metadata=field_help(
        "requests allowed to wait; beyond that new requests are refused with 'queue full'"))
    max_input_chars: int = field(default=150, metadata=field_help(
        "longer messages are cut to this many characters, with a notice on the page"))
    seed: int | None = field(default=None, metadata=field_help(
        "seed every reply with this (reproducible demos); default: a fresh random seed per reply, "
        "shown on the page so a reply can be reproduced"))
    feedback: str | None = field(default=None, metadata=field_help(
        "append every judgement (a candidate picked in the table, a better reply written) to this JSON Lines "
        "file, personal data masked, no session ids (python -m dialogpt_zh.feedback export); default: not saved"))
    arena_pairs: str | None = field(default=None, metadata=field_help(
        "add a blind-arena tab judging this PAIRS.json (python -m dialogpt_zh.arena --make)"))
    arena_verdicts: str | None = field(default=None, metadata=field_help(
        "JSON Lines file the arena tab appends verdicts to (needed with --arena_pairs)"))

    def __post_init__(self) -> None:
        for name, lo, hi in (("port", 0, 65535), ("concurrency", 0, 256), ("max_queue", 1, 100_000),
                             ("max_input_chars", 1, 100_000), ("max_batch", 1, 256), ("batch_window_ms", 0, 1000),
                             ("batch_workers", 1, 16)):
            if not lo <= getattr(self, name) <= hi:
                raise UserError(f"must be in [{lo}, {hi}], got {getattr(self, name)}", field=name)
        check_seed(self.seed, "seed")
        if not self.host.strip():  # an empty address makes the server listen on every interface, not none
            raise UserError("must name an address, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                            "interface); an empty one would listen on every interface", field="host")
        if self.transcript:  # found at start, not at the first turn
            check_output_file(self.transcript, field="transcript")


@dataclass
class Control:
    """One slider on the page and the engine setting it overrides; its range is settings.PAGE_RANGES'."""

    name: str          # field of GenerationSettings or MMISettings
    label: str
    info: str = ""

    @property
    def range(self) -> tuple[float, float, float]:
        return PAGE_RANGES[self.name]  # (minimum, maximum, step), inside the settings' own bounds


# MMI weight is the backward model's weight in the final score; 0 ranks by the forward model alone.
CONTROLS: list[Control] = [
    Control("num_candidates", "候选数", "每轮采样多少个候选回复"),
    Control("top_k", "top-k", "只在概率最高的 k 个字里采样（0 = 不限）"),
    Control("top_p", "top-p", "核采样：累计概率阈值（1 = 不限）"),
    Control("temperature", "温度", "越高越发散，越低越保守"),
    Control("repetition_penalty", "重复惩罚", "1 = 不惩罚"),
    Control("backward_weight", "MMI 权重", "后向模型 log P(上文|回复) 的权重（0 = 不用 MMI，按前向分数）"),
    Control("max_history", "历史轮数", "生成时最多看最近几句话"),
]


def is_finite_number(value: Any) -> bool:
    """What a slider may send: an int or float that is finite (JSON true/false, strings, null and NaN are not)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def checked_slider(name: str, *args: Any, **kwargs: Any) -> gr.Slider:
    """A gr.Slider for setting `name` whose value from an API client must be a finite number: gr.Slider compares
    whatever it gets with its range, so a string or null fails inside Gradio as an unnamed error, and NaN passes
    the range check. (The check wraps the instance's preprocess: a gr.Slider subclass would make Gradio write a
    .pyi stub beside this file.)"""
    slider = gr.Slider(*args, **kwargs)
    plain = slider.preprocess

    def preprocess(payload: Any) -> float:
        if not is_finite_number(payload):
            shown = repr(payload) if isinstance(payload, (int, float)) else type(payload).__name__
            raise gr.Error(f"{name}: must be a finite number, got {shown}")
        return plain(payload)

    slider.preprocess = preprocess
    return slider


GENERIC_ERROR = "生成回复时出错（对话未改变，可稍后重试；详情已记录在服务器日志中）"


class ClearGate:
    """Per session: when "clear" was last pressed, and which reply is being delivered. A clear always wins over a
    reply in flight, whatever the timing:

    - a reply whose request reached the page before the latest clear is dropped (`delivery` says so), even if it
      waited in Gradio's queue and started computing after the clear;
    - a reply that passed that check holds the session's delivery lock until Gradio has stored and sent its
      outputs (the reply handler is a generator resumed only after that), and `clear` waits for the lock, so
      the clear's empty chat is stored and sent after it, never before."""

    WAIT_S = 10.0  # longest a clear waits for a reply being delivered (Gradio stores and sends in milliseconds)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cleared: dict[str, float] = {}  # session -> time.monotonic() of its latest clear
        self._delivering: dict[str, threading.Lock] = {}

    def _session_lock(self, session: str) -> threading.Lock:
        with self._lock:
            return self._delivering.setdefault(session, threading.Lock())

    def clear(self, session: str | None) -> None:
        """Record a clear now, then wait until a reply of this session that is being delivered is out."""
        session = session or ""
        with self._lock:
            self._cleared[session] = time.monotonic()
        lock = self._session_lock(session)
        if lock.acquire(timeout=self.WAIT_S):
            lock.release()
        else:
            log.warning("clear: a reply of session %s was still being delivered after %.0f s", session, self.WAIT_S)

    @contextmanager
    def delivery(self, session: str | None, submitted: float) -> Iterator[bool]:
        """True: no clear since `submitted` (time.monotonic() when the request reached the page): deliver the
        reply inside the block (a clear waits for the block to end). False: drop it."""
        session = session or ""
        lock = self._session_lock(session)
        with lock:
            with self._lock:
                current = self._cleared.get(session, float("-inf")) < submitted
            yield current

    def forget(self, session: str | None) -> None:
        with self._lock:
            self._cleared.pop(session or "", None)
            self._delivering.pop(session or "", None)


def submitted_at() -> float:
    """time.monotonic() when the Gradio event now running joined the queue (so a clear pressed while the request
    waited for a free slot counts); now, where Gradio does not say (a handler called directly; a Gradio release
    that keeps its queue differently: tests/test_web.py's queued-request race notices)."""
    try:
        from gradio.context import LocalContext

        blocks = LocalContext.blocks.get(None)
        event = blocks._queue.event_ids_to_events[LocalContext.event_id.get(None)]
        return float(event.enqueue_time)
    except Exception:  # noqa: BLE001 - internals of another package: any change means "not known"
        return time.monotonic()


# ---------------------------------------------------------------------------------------------- transcript

class TranscriptWriter:
    """Appends one JSON line per turn; a lock keeps lines from concurrent sessions whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_jsonl_output(self.path, "transcript")
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot open transcript for appending: {e.strerror}", path=self.path) from e

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as e:  # a full disk: a message naming the file, not a traceback
                raise UserError(f"cannot append to the transcript: {e.strerror or e}", path=self.path) from e

    def close(self) -> None:
        with self._lock:
            self._file.close()


# ------------------------------------------------------------------------------------------ pure helpers

def first_drop_of_typed_lines(history: Sequence[str], context: Sequence[str] | None) -> bool:
    """True on the turn the model first leaves out a line the person typed. `history` alternates person and
    bot lines (the person's at even positions) before this turn's message; the model saw the last
    len(context) lines of history + [message]. Each turn adds two lines, so the first drop of the person's
    first line is a turn that leaves out one or two lines."""
    if context is None:
        return False
    dropped = len(history) + 1 - len(context)
    return 1 <= dropped <= 2


def status_markdown(reply, notices: Sequence[str]) -> str:
    """Latency (with its encode / generate / score split), seed, MMI on/off, how the candidates' final score is
    computed, then one line per notice."""
    t = reply.timings or {}
    names = {"encode": "编码", "retrieve": "检索", "generate": "生成", "score": "打分"}
    split = "，".join(f"{names[k]} {t[k]:.2f}" for k in names if k in t and (t[k] or k != "retrieve"))
    head = f"**本轮用时 {reply.latency_s:.2f} 秒**" + (f"（{split}）" if split else "")
    head += f" · {len(reply.candidates)} 个不同候选 · MMI {'开' if reply.mmi else '关'}"
    if getattr(reply, "seed", None) is not None:
        head += f" · 种子 {reply.seed}"
    legend = [score_legend(reply)] if reply.candidates else []
    return "\n\n".join([head] + legend + [f"提示：{n}" for n in notices])


# ------------------------------------------------------------------------------------------------ the app

class Replier(Protocol):
    """What the page asks for a reply: `ChatBot`, `ReplyBatcher` and `EngineProcess` all are one (so is a
    test's stand-in wrapping a bot). The page also reads the bot's `generation`, `mmi_settings` and `notices`."""

    def reply(self, history: list[str], *, seed: int | None = None, generation: GenerationSettings | None = None,
              mmi: MMISettings | None = None) -> Reply: ...


def make_replier(bot: Replier, replier: Replier | None, max_batch: int, batch_window_ms: float,
                 batch_workers: int, continuous_batching: bool) -> Replier:
    """What computes a reply: the caller's `replier` (e.g. an EngineProcess, closed by whoever launched the
    page), else a `ReplyBatcher` sharing batches between users when `bot` is a `ChatBot` and `max_batch` > 1,
    else the bot itself (a stand-in that is not a ChatBot cannot be batched)."""
    from dialogpt_zh.engine.bot import ChatBot

    if replier is not None:
        return replier
    if max_batch > 1 and isinstance(bot, ChatBot):
        from dialogpt_zh.engine.batcher import ReplyBatcher

        return ReplyBatcher(bot, window_s=batch_window_ms / 1000, max_requests=max_batch, workers=batch_workers,
                            continuous=continuous_batching)
    return bot


@dataclass
class ChatHandlers:
    """The page's chat handlers over one replier: a reply, a clear, a closed tab. Each browser session keeps
    its history in a `gr.State`; `clears` makes a clear win over a reply in flight (`ClearGate`)."""

    replier: Replier
    generation: GenerationSettings
    mmi: MMISettings
    defaults: dict[str, Any]
    bot_notices: list[str]
    writer: TranscriptWriter | None
    max_input_chars: int
    seed: int | None
    clears: ClearGate = field(default_factory=ClearGate)

    # Explicit parameters (not *values) so that the API page and gradio_client show the settings' names.
    # A generator: its one output is stored and sent by Gradio before the generator resumes, and until then the
    # session's delivery lock is held, so a clear (ClearGate) lands after it.
    def reply(self, message: str, history: list[str] | None, request: gr.Request, num_candidates: float,
              top_k: float, top_p: float, temperature: float, repetition_penalty: float,
              backward_weight: float, max_history: float):
        submitted = submitted_at()
        values = dict(num_candidates=num_candidates, top_k=top_k, top_p=top_p, temperature=temperature,
                      repetition_penalty=repetition_penalty, backward_weight=backward_weight,
                      max_history=max_history)
        session = getattr(request, "session_hash", None)
        outputs, record = self.respond(message, list(history or []), session, values)
        with self.clears.delivery(session, submitted) as current:
            if not current:  # cleared after this message was sent: the clear wins
                yield (gr.skip(),) * 6
                return
            if record is not None and self.writer is not None:
                self.write_transcript(*record)
            yield outputs

    def respond(self, message: str, history: list[str], session: str | None, values: dict[str, float]
                ) -> tuple[tuple, tuple | None]:
        """The reply handler's outputs for `message`, and the transcript record's parts (None: no turn)."""
        message = (message or "").strip()
        if not message:
            gr.Info("空消息已忽略。")  # nothing else changes
            return ("", history_to_messages(history), history, gr.skip(), gr.skip(), gr.skip()), None
        notices = []
        if len(message) > self.max_input_chars:
            message = message[:self.max_input_chars]
            notices.append(f"输入过长，只保留了前 {self.max_input_chars} 个字。")
            gr.Warning(notices[-1])
        try:
            overrides = {k: _coerce(self.defaults[k], v, k) for k, v in values.items()}
            gen, mm = apply_overrides(self.generation, self.mmi, overrides)
            # MMI weight 0 means "no MMI": skip the backward pass instead of computing a score weighted by 0.
            mm = apply_overrides(gen, mm, {"use_mmi": mm.use_mmi and mm.backward_weight > 0})[1]
            reply = self.replier.reply(history + [message], seed=self.seed, generation=gen, mmi=mm)
        except Exception as e:  # any failure becomes a message on the page, never a dead page
            # the details go to the server log; a remote user sees only what is meant for users
            if isinstance(e, UserError):  # the person's input, said on the page: one log line, no traceback
                log.warning("reply refused (session %s): %s", session, e)
            else:
                log.exception("reply failed (session %s)", session)
            status = "⚠ " + (f"无法生成回复：{e}" if isinstance(e, UserError) else GENERIC_ERROR)
            return (message, history_to_messages(history), history, gr.skip(), status, gr.skip()), None
        if not reply.candidates:  # e.g. a blocklist removed every candidate: say so, keep the history
            status = "⚠ 这一轮没有可用的回复：" + "；".join(reply.notices or ["没有候选"])
            return (message, history_to_messages(history), history, [], status, None), None
        new_history = history + [message, reply.text]
        # the engine's history notices come every turn once lines are dropped: say it once, in plain words
        notices += [n for n in (reply.notices or []) if n not in self.bot_notices
                    and not n.startswith(HISTORY_NOTICE_PREFIX)]
        if first_drop_of_typed_lines(history, getattr(reply, "context", None)):
            notices.append(f"机器人只读最近 {len(reply.context)} 句对话，更早的句子不再计入"
                           "（“历史长度”可调）。此提示每段对话只出现一次。")
        record = (session, message, reply, new_history, {**overrides, "use_mmi": mm.use_mmi}, notices)
        # the last turn, for the person's judgement (web_judging): what the bot was given and answered
        turn = {"given": history + [message], "reply": reply, "settings": {**asdict(gen), **asdict(mm)}}
        return ("", history_to_messages(new_history), new_history, candidates_table(reply),
                status_markdown(reply, notices), turn), record

    def write_transcript(self, session: str | None, message: str, reply: Reply, new_history: list[str],
                         settings: dict[str, Any], notices: list[str]) -> None:
        self.writer.write({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "session": session,
            "turn": len(new_history) // 2,
            "user": message,
            "reply": reply.text,
            "seed": getattr(reply, "seed", None),
            "settings": settings,
            "latency_s": round(reply.latency_s, 4),
            "notices": notices,
            "candidates": [{"rank": c.rank, "text": c.text, "forward_logprob": c.forward_logprob,
                            "backward_logprob": c.backward_logprob, "score": c.score,
                            "source": getattr(c, "source", "sampled"), "similarity": getattr(c, "similarity", None)}
                           for c in reply.candidates],
        })

    def forget(self, request: gr.Request) -> None:  # the browser tab closed
        self.clears.forget(getattr(request, "session_hash", None))

    def reset(self, request: gr.Request):
        self.clears.clear(getattr(request, "session_hash", None))
        return "", [], [], [], "已清空对话，开始新的聊天吧。", None


def page_intro(transcript_on: bool, feedback_on: bool) -> str:
    """The page's heading text: what it does, and what it keeps (the transcript, the judgements)."""
    intro = ("GPT-2 前向模型每轮采样多个候选回复，后向模型按最大互信息（MMI）给候选打分重排，"
             "选出得分最高的一句。右侧表格列出上一轮的全部候选及其分数。")
    privacy = ("**注意：运营者开启了对话记录，每一轮对话都会写入服务器上的记录文件。**" if transcript_on
               else "对话只保存在本浏览器会话中，服务器不写入磁盘；刷新页面即清空。")
    privacy += ("\n\n点表格里的一行 = 你会选这个候选；或在表格下写一句更好的回复。对话会用你的选择继续"
                "（★ = MMI 的选择，✔ = 你的选择）。"
                + ("**你的选择会被记录（已遮盖个人信息，不含会话标识）。**" if feedback_on else ""))
    return f"# {TITLE}\n{intro}\n\n{privacy}"


def chat_column() -> tuple[gr.Chatbot, gr.Textbox, gr.Button, gr.Button]:
    """The left column's parts (inside a `gr.Column`): the chat, the message box, send and clear."""
    chatbot = gr.Chatbot(label="对话", height=460, render_markdown=False, feedback_options=None,
                         buttons=["copy_all"], placeholder="输入一句话，按回车发送", elem_id="chat")
    with gr.Row():
        textbox = checked_textbox("message", show_label=False, placeholder="说点什么……（回车发送）", scale=6,
                             lines=1, max_lines=4, autofocus=True, elem_id="message")
        send = gr.Button("发送", variant="primary", scale=1, min_width=90, elem_id="send")
        reset = gr.Button("清空对话", scale=1, min_width=100, elem_id="reset")
    gr.Examples(examples=[[e] for e in EXAMPLE_OPENERS], inputs=[textbox], label="试试这些开场白")
    return chatbot, textbox, send, reset


def candidates_column(normalize: str = "mean") -> tuple[gr.Markdown, gr.Dataframe]:
    """The right column's status line and candidates table (the judging controls and then the sliders follow:
    `build_app`); the log-prob columns' headers name the unit the score uses (`normalize`)."""
    status = gr.Markdown("还没有对话。", elem_id="status")
    table = gr.Dataframe(headers=candidate_headers(normalize), value=[], label="上一轮的全部候选（按最终得分排序）",
                         interactive=False, wrap=True, elem_id="candidates",
                         datatype=["number", "str", "str", "number", "number", "number", "number", "number"],
                         column_widths=["7%", "6%", "30%", "14%", "14%", "12%", "8%", "9%"])
    return status, table


def settings_sliders(defaults: dict[str, Any]) -> list[gr.Slider]:
    """One slider per `CONTROLS` entry, starting at the page's settings (`defaults`)."""
    with gr.Accordion("生成设置", open=True):
        return [checked_slider(c.name, c.range[0], c.range[1], value=defaults[c.name], step=c.range[2],
                               label=c.label, info=c.info, elem_id=f"ctl_{c.name}") for c in CONTROLS]


def build_app(bot: Replier, generation: GenerationSettings | None = None, mmi: MMISettings | None = None,
              transcript: str | Path | None = None, *, concurrency: int = 0, max_queue: int = 64,
              max_batch: int = 8, batch_window_ms: float = 5.0, batch_workers: int = 2,
              continuous_batching: bool = False, replier: Replier | None = None,
              max_input_chars: int = 150, seed: int | None = None, feedback: str | Path | None = None,
              arena_pairs: str | Path | None = None, arena_verdicts: str | Path | None = None) -> gr.Blocks:
    """The Gradio page over `bot` (a `dialogpt_zh.engine.bot.ChatBot`, or a `Replier` with its settings).

    Slider defaults and every other setting come from `generation` / `mmi` (the engine's settings
    dataclasses; default: the bot's own). `transcript`: a JSONL file to append each turn to (None: nothing
    is written). `seed`: a fixed seed for every reply (None: the engine draws one per reply).
    `feedback`: a JSONL file for people's judgements (picks, better replies; None: not saved).
    `arena_pairs` + `arena_verdicts`: add the blind-arena tab (dialogpt_zh.webui.judging).
    `max_batch` > 1: replies of different users share batches (`dialogpt_zh.engine.batcher`); 1: each on its own.
    `concurrency`: replies handled at once (0 = auto, `resolve_concurrency`).
    """
    from dialogpt_zh.webui import judging as web_judging

    concurrency = resolve_concurrency(concurrency, max_batch)
    generation = generation if generation is not None else bot.generation
    mmi = mmi if mmi is not None else bot.mmi_settings
    # the sliders show this bot's numbers, not "auto" (-1): the candidate count with or without its index
    generation = resolve_auto(generation, getattr(bot, "retrieval", None) is not None)
    defaults = {c.name: getattr(generation, c.name, getattr(mmi, c.name, None)) for c in CONTROLS}
    writer = TranscriptWriter(transcript) if transcript else None
    bot_notices = list(getattr(bot, "notices", []) or [])
    replier = make_replier(bot, replier, max_batch, batch_window_ms, batch_workers, continuous_batching)
    handlers = ChatHandlers(replier, generation, mmi, defaults, bot_notices, writer, max_input_chars, seed)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(page_intro(writer is not None, bool(feedback)))
        for n in bot_notices:
            gr.Markdown(f"⚠ {n}")
        history_state = gr.State([])
        turn_state = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320):
                chatbot, textbox, send, reset = chat_column()
            with gr.Column(scale=6, min_width=360):
                status, table = candidates_column(mmi.normalize)
                feedback_writer = web_judging.add_judging(bot, feedback, table=table, chatbot=chatbot,
                                                          history_state=history_state, turn_state=turn_state,
                                                          status=status)
                sliders = settings_sliders(defaults)
        inputs = [textbox, history_state, *sliders]
        outputs = [textbox, chatbot, history_state, table, status, turn_state]
        gr.on([textbox.submit, send.click], handlers.reply, inputs, outputs, api_name="chat",
              concurrency_limit=concurrency, concurrency_id="reply", show_progress="minimal")
        reset.click(handlers.reset, None, outputs, api_name="reset", queue=False)
        # The chat panel's own trash icon must forget the history too, not just the bubbles.
        chatbot.clear(handlers.reset, None, outputs, api_visibility="private", queue=False)
        demo.unload(handlers.forget)
    if arena_pairs:
        demo = web_judging.with_arena_tab(demo, TITLE, arena_pairs, arena_verdicts)
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.transcript_writer = writer  # so callers can close it
    demo.feedback_writer = feedback_writer
    demo.reply_batcher = replier if replier is not bot else None
    return demo


def _coerce(default: Any, value: Any, name: str) -> Any:
    """Sliders send floats; integer settings stay integers. A value that is no finite number (NaN from an API
    client) is a SettingsError naming the setting, as the settings' own checks are."""
    if value is None:
        return default
    if not is_finite_number(value):
        raise SettingsError(f"must be a finite number, got {value!r}", field=name)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(round(float(value)))
    return float(value)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_in_background(demo, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start `demo` on a free port without blocking (tests, benchmarks); returns its URL. Stop: demo.close()."""
    demo.launch(server_name=host, server_port=port or free_port(host), prevent_thread_lock=True,
                quiet=True, share=False, show_error=False, ssr_mode=False)
    return demo.local_url


# ---------------------------------------------------------------------------------------------------- CLI

EXAMPLES = """
  dialogpt-zh-web                                    # embedded checkpoints/default on http://127.0.0.1:7860
  python web/app.py --model checkpoints/default --port 8000
  dialogpt-zh-web --host 0.0.0.0 --num_candidates 10 --backward_weight 1.0
  dialogpt-zh-web --transcript chats.jsonl           # operator opts in to keeping a log of every turn
  dialogpt-zh-web --feedback feedback.jsonl          # keep people's picks / better replies (for fine-tuning)
  dialogpt-zh-web --arena_pairs pairs.json --arena_verdicts verdicts.jsonl   # + a blind-arena tab
"""


def make_web_parser():
    return make_parser([BotArguments, WebArguments, GenerationSettings, MMISettings], prog="dialogpt-zh-web",
                       description="Gradio chat page: chat with the bot and see every MMI-reranked candidate.",
                       examples=EXAMPLES)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks, one line each
        bot_args, args, generation, mmi = parse(make_web_parser(), argv)
        from dialogpt_zh.engine.bot import load_bot
        from dialogpt_zh.engine.loading import bot_input_dirs, check_outputs_apart

        check_outputs_apart({"transcript": args.transcript, "feedback": args.feedback,
                             "arena_verdicts": args.arena_verdicts},
                            [*bot_input_dirs(bot_args.model, bot_args.backward),
                             *([Path(args.arena_pairs)] if args.arena_pairs else [])])

        bot = load_bot(bot_args, generation, mmi)
        for n in getattr(bot, "notices", []) or []:
            log.warning("note: %s", n)
        replier = None
        if args.engine_process and args.max_batch > 1:
            from dialogpt_zh.engine.process import EngineProcess

            replier = EngineProcess(bot_args, generation, mmi, window_s=args.batch_window_ms / 1000,
                                    max_requests=args.max_batch, workers=args.batch_workers,
                                    continuous=args.continuous_batching)
            log.info("replies computed in engine process %s", replier.pid)
        try:
            demo = build_app(bot, transcript=args.transcript, concurrency=args.concurrency,
                             max_queue=args.max_queue, max_batch=args.max_batch,
                             batch_window_ms=args.batch_window_ms, batch_workers=args.batch_workers,
                             continuous_batching=args.continuous_batching, replier=replier,
                             max_input_chars=args.max_input_chars, seed=args.seed,
                             feedback=args.feedback, arena_pairs=args.arena_pairs,
                             arena_verdicts=args.arena_verdicts)
            if args.transcript:
                log.info("transcript: appending every turn to %s", args.transcript)
            demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                        ssr_mode=False)
            # gradio's launch catches the Ctrl-C / SIGTERM that stopped it and returns: exit 130 / 143 as every
            # command does, not 0
            raise_if_stopped()
        finally:
            if replier is not None:
                replier.close()
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
