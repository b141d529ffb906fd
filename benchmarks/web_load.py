"""Load test of the Gradio page: N concurrent gradio_client clients x T turns each against one app,
with and without cross-user batching (each mode on a fresh app).

Every client is its own browser-like session (own session hash, own gr.State history). The script counts
errors, checks that each client's chat holds exactly the messages it sent (no history leaking between
sessions), and prints p50/p95 latency: end to end as the client sees it (queue wait included) and the
engine's own reply time (from the page's status line). Figures are printed, never asserted.

  python benchmarks/web_load.py                               # embedded checkpoints/default, 20 x 10, both modes
  python benchmarks/web_load.py --modes batched --max_batch 4 --batch_window_ms 2
  python benchmarks/web_load.py --model runs/bot --clients 20 --turns 10 --modes alone --alone_concurrency 2
  python benchmarks/web_load.py --url http://127.0.0.1:7860/  # against an app that is already running
  python benchmarks/web_load.py --no_app_process --modes batched  # app and clients in one process
  python benchmarks/web_load.py --client gradio_client       # one full gradio_client.Client per user
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

try:
    import dialogpt_zh  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dialogpt_zh.cli import field_help, make_parser, parse, run_main  # noqa: E402
from dialogpt_zh.engine.bot import load_bot  # noqa: E402
from dialogpt_zh.errors import UserError  # noqa: E402
from dialogpt_zh.judging.metrics import percentile  # noqa: E402
from dialogpt_zh.settings import BotArguments  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OPENERS = REPO / "corpus" / "fixtures" / "chitchat_train.txt"


@dataclass
class LoadArguments:
    url: str | None = field(default=None, metadata=field_help("load an app that is already running at this URL"))
    clients: int = field(default=20, metadata=field_help("concurrent clients (sessions)"))
    turns: int = field(default=30, metadata=field_help(
        "turns per client (30: with 10, a run lasts 4-8 s on 2 cores and its rate varies by about 30%%)"))
    modes: str = field(default="batched,alone", metadata=field_help(
        "comma list: batched (replies of different users share batches: webapp --max_batch) and/or alone "
        "(each reply computed on its own: --max_batch 1)"))
    concurrency: int = field(default=0, metadata=field_help(
        "webapp --concurrency in the batched mode (0 = the page's auto: 32 when batched)"))
    max_batch: int = field(default=8, metadata=field_help("webapp --max_batch in the batched mode"))
    batch_window_ms: float = field(default=5.0, metadata=field_help("webapp --batch_window_ms in the batched mode"))
    batch_workers: int = field(default=2, metadata=field_help("webapp --batch_workers in the batched mode"))
    continuous_batching: bool = field(default=False, metadata=field_help(
        "webapp --continuous_batching in the batched mode (requests join running batches)"))
    engine_process: bool = field(default=True, metadata=field_help(
        "webapp --engine_process in the batched mode (replies computed in a child process of the app); "
        "--no_engine_process passes --no_engine_process"))
    alone_concurrency: int = field(default=4, metadata=field_help(
        "webapp --concurrency in the alone mode (4 was the best on 2 cores before batching)"))
    client: Literal["light", "gradio_client"] = field(default="light", metadata=field_help(
        "light: each simulated user is a thread speaking Gradio's queue protocol over httpx (the payload "
        "gradio_client sends, recorded from one real gradio_client call), so the load generator costs little "
        "CPU beside the app; gradio_client: a full gradio_client.Client per user (heavier: 20 of them use "
        "most of a core)"))
    app_process: bool = field(default=True, metadata=field_help(
        "serve the app from its own process (`python -m dialogpt_zh.webapp`), as it is deployed; "
        "--no_app_process serves it from this one, where the 20 clients' Python competes with the server "
        "for one interpreter lock (the figures before this option existed)"))


def user_texts(chat: list[dict]) -> list[str]:
    return ["".join(p["text"] for p in m["content"]) for m in chat if m["role"] == "user"]


class QueueTemplate:
    """The payload one real gradio_client call of /chat sends, recorded once, so light clients send the same."""

    def __init__(self, url: str) -> None:
        from gradio_client import Client
        from gradio_client import client as client_module

        seen: dict = {}
        original = client_module.Client.send_data

        def record(self_, data, hash_data, protocol, request_headers):
            seen.setdefault("data", json.loads(json.dumps(data)))
            return original(self_, data, hash_data, protocol, request_headers)

        client_module.Client.send_data = record
        try:
            client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
            client.predict("你好", api_name="/chat")
            client.close()
        finally:
            client_module.Client.send_data = original
        if "data" not in seen:
            raise UserError("could not record the /chat payload (gradio_client sent nothing)", field="client")
        self.payload = seen["data"]
        self.message_index = self.payload["data"].index("你好")

    def body(self, message: str, session_hash: str) -> dict:
        data = list(self.payload["data"])
        data[self.message_index] = message
        return {**self.payload, "data": data, "session_hash": session_hash}


def light_predict(http, url: str, template: QueueTemplate, message: str, session_hash: str):
    """One /chat call over Gradio's queue protocol: join, then read the session's event stream until this
    event completes. Returns (chat messages, table, status) found in the outputs by their shape."""
    root = url.rstrip("/") + "/gradio_api/queue/"
    r = http.post(root + "join", json=template.body(message, session_hash))
    r.raise_for_status()
    event_id = r.json()["event_id"]
    with http.stream("GET", root + "data", params={"session_hash": session_hash}) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("event_id") != event_id or msg.get("msg") != "process_completed":
                continue
            if not msg.get("success", False):
                raise RuntimeError(f"app error: {msg.get('output', {}).get('error')}")
            outputs = msg["output"]["data"]
            chat = next(o for o in outputs if isinstance(o, list) and o and isinstance(o[0], dict) and "role" in o[0])
            table = next((o for o in outputs if isinstance(o, dict) and "data" in o), {})
            status = next((o for o in outputs if isinstance(o, str) and ("本轮" in o or "出错" in o)), None)
            return chat, table, status
    raise RuntimeError("event stream ended before the reply")


def run_user(url: str, index: int, turns: int, utterances: list[str], start: threading.Barrier, out: dict,
             template: "QueueTemplate | None" = None, session_hash: str | None = None) -> None:
    """One simulated user: `turns` messages in its own session, each checked; a light client (Gradio's queue
    protocol over httpx, `template`'s payload; `session_hash`: default a fresh one) or, with template None,
    a full gradio_client.Client."""
    import uuid

    errors, mismatches, e2e, engine = [], 0, [], []
    with contextlib.ExitStack() as stack:
        try:
            if template is None:
                from gradio_client import Client

                client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
                stack.callback(client.close)

                def ask(message: str):
                    return client.predict(message, api_name="/chat")[1:]
            else:
                import httpx

                http = stack.enter_context(httpx.Client(timeout=httpx.Timeout(300.0)))
                session = session_hash or uuid.uuid4().hex[:11]

                def ask(message: str):
                    return light_predict(http, url, template, message, session)
        except Exception as e:  # noqa: BLE001 - counted, not raised: this is a load test
            start.wait()
            out[index] = dict(errors=[f"connect: {type(e).__name__}: {e}"] * turns, mismatches=0, e2e=[], engine=[])
            return
        start.wait()
        sent: list[str] = []
        for turn in range(turns):
            message = utterances[(index * 7 + turn) % len(utterances)]
            t0 = time.perf_counter()
            try:
                chat, table, status = ask(message)
            except Exception as e:  # noqa: BLE001
                errors.append(f"turn {turn}: {type(e).__name__}: {e}")
                continue
            e2e.append(time.perf_counter() - t0)
            if not isinstance(status, str) or "出错" in status or not table.get("data"):
                errors.append(f"turn {turn}: error on the page: {status!r}")
                continue
            sent.append(message)
            if user_texts(chat) != sent:
                mismatches += 1
            m = re.search(r"本轮用时 ([0-9.]+) 秒", status)
            if m:
                engine.append(float(m.group(1)))
    out[index] = dict(errors=errors, mismatches=mismatches, e2e=e2e, engine=engine)


def run_load(url: str, args: LoadArguments, utterances: list[str]) -> dict:
    """args.clients concurrent clients x args.turns turns against `url`; prints and returns the figures."""
    results: dict[int, dict] = {}
    barrier = threading.Barrier(args.clients + 1)
    # light: one real gradio_client call records the payload (a warm-up turn in a session of its own)
    template = QueueTemplate(url) if args.client == "light" else None
    threads = [threading.Thread(target=run_user, args=(url, i, args.turns, utterances, barrier, results, template))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    errors = [e for r in results.values() for e in r["errors"]]
    mismatches = sum(r["mismatches"] for r in results.values())
    crossed = sum(1 for r in results.values() if r["mismatches"])
    e2e = [x for r in results.values() for x in r["e2e"]]
    engine = [x for r in results.values() for x in r["engine"]]
    total = args.clients * args.turns
    print(f"clients {args.clients} x turns {args.turns} = {total} requests in {wall:.1f} s "
          f"({len(e2e) / wall:.2f} replies/s)")
    print(f"errors: {len(errors)}; clients whose chat was not exactly their own messages: {crossed} "
          f"({mismatches} turns)")
    for e in errors[:5]:
        print("  e.g.", e)
    if e2e:
        print(f"end-to-end latency (queue wait included): p50 {percentile(e2e, 50):.2f} s, "
              f"p95 {percentile(e2e, 95):.2f} s, max {max(e2e):.2f} s")
        # every client's first turn arrives at once (the barrier): the rest shows the steady state
        later = [x for r in results.values() for x in r["e2e"][1:]]
        if later:
            print(f"  after each client's first turn: p50 {percentile(later, 50):.2f} s, "
                  f"p95 {percentile(later, 95):.2f} s")
    if engine:
        print(f"engine reply time (batch wait included): p50 {percentile(engine, 50):.3f} s, "
              f"p95 {percentile(engine, 95):.3f} s, mean {statistics.mean(engine):.3f} s", flush=True)
    return dict(rate=len(e2e) / wall, p50=percentile(e2e, 50) if e2e else float("nan"),
                p95=percentile(e2e, 95) if e2e else float("nan"), errors=len(errors), crossed=crossed,
                failed=bool(errors or mismatches))


def print_summary(summary: dict[str, dict]) -> int:
    """The modes side by side; exit status 1 when any had errors or crossed histories."""
    if len(summary) > 1:
        print("\n| mode | replies/s | e2e p50 s | e2e p95 s | errors | crossed histories |\n|---|---|---|---|---|---|")
        for mode, r in summary.items():
            print(f"| {mode} | {r['rate']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['errors']} | {r['crossed']} |")
    return 1 if any(r["failed"] for r in summary.values()) else 0


def changed_settings(*settings) -> list[str]:
    """Command-line flags for the fields of these settings dataclasses that differ from their defaults."""
    import dataclasses

    argv = []
    for obj in settings:
        for f in dataclasses.fields(obj):
            value, default = getattr(obj, f.name), getattr(type(obj)(), f.name)
            if value != default:
                argv += [f"--{f.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


@contextlib.contextmanager
def app_process(bot_args: BotArguments, gen, mmi, concurrency: int, max_queue: int, max_batch: int,
                batch_window_ms: float, batch_workers: int = 2, engine_process: bool = True,
                continuous_batching: bool = False, timeout_s: float = 300.0):
    """`python -m dialogpt_zh.webapp` in its own process on a free port; yields its URL, stops it after."""
    import subprocess
    import urllib.request

    from dialogpt_zh.webapp import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "dialogpt_zh.webapp", "--port", str(port), "--concurrency", str(concurrency),
           "--max_queue", str(max_queue), "--max_batch", str(max_batch), "--batch_window_ms", str(batch_window_ms),
           "--batch_workers", str(batch_workers), "--engine_process" if engine_process else "--no_engine_process",
           *(["--continuous_batching"] if continuous_batching else []), *changed_settings(bot_args, gen, mmi)]
    print("app:", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise UserError(f"the app exited with {proc.returncode} before serving: "
                                f"{proc.stderr.read()[-2000:]}", field="app_process")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise UserError(f"the app did not answer at {url} within {timeout_s:.0f} s",
                                    field="app_process") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None) -> int:
    def body() -> int:
        import logging

        from dialogpt_zh.settings import GenerationSettings, MMISettings

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise

        bot_args, args, gen, mmi = parse(make_parser([BotArguments, LoadArguments, GenerationSettings, MMISettings],
                                                     prog="web_load.py",
                                           description=__doc__.split("\n")[0], examples=__doc__.split("\n\n")[-1]),
                               argv)
        text = OPENERS.read_text(encoding="utf-8")
        utterances = [u.strip() for u in text.splitlines() if u.strip()]
        if args.url is not None:
            return 1 if run_load(args.url, args, utterances)["failed"] else 0
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = sorted(set(modes) - {"batched", "alone"})
        if unknown or not modes:
            raise UserError(f"unknown mode(s) {unknown}; use batched and/or alone", field="modes")
        from dialogpt_zh import webapp

        summary = {}
        if args.app_process:
            for mode in modes:
                batched = mode == "batched"
                concurrency = webapp.resolve_concurrency(args.concurrency if batched else args.alone_concurrency,
                                                         args.max_batch if batched else 1)
                print(f"\n## {mode}: app in its own process; concurrency {concurrency}, max_batch "
                      f"{args.max_batch if batched else 1}"
                      + (f", window {args.batch_window_ms:g} ms, {args.batch_workers} worker(s)"
                         + (", engine process" if args.engine_process else "")
                         + (", continuous batching" if args.continuous_batching else ", batch by batch")
                         if batched else "")
                      + f"; cpus {os.cpu_count()}", flush=True)
                with app_process(bot_args, gen, mmi, concurrency, max(64, args.clients * 2),
                                 args.max_batch if batched else 1, args.batch_window_ms,
                                 args.batch_workers, batched and args.engine_process,
                                 args.continuous_batching) as url:
                    summary[mode] = run_load(url, args, utterances)
            return print_summary(summary)
        bot = load_bot(bot_args, gen, mmi)
        for mode in modes:
            batched = mode == "batched"
            concurrency = webapp.resolve_concurrency(args.concurrency if batched else args.alone_concurrency,
                                                     args.max_batch if batched else 1)
            demo = webapp.build_app(bot, concurrency=concurrency, max_queue=max(64, args.clients * 2),
                                    max_batch=args.max_batch if batched else 1,
                                    batch_window_ms=args.batch_window_ms, batch_workers=args.batch_workers,
                                    continuous_batching=args.continuous_batching)
            url = webapp.launch_in_background(demo)
            print(f"\n## {mode}: serving {bot.forward_dir} (+ {bot.backward_dir}) at {url}; concurrency "
                  f"{concurrency}, max_batch {args.max_batch if batched else 1}"
                  + (f", window {args.batch_window_ms:g} ms, {args.batch_workers} worker(s)" if batched else "")
                  + f"; num_candidates {bot.settings()[0].num_candidates}, max_length {bot.generation.max_length}; "
                  f"threads: {bot.thread_policy.describe()}, "
                  f"cpus {os.cpu_count()}", flush=True)
            try:
                summary[mode] = run_load(url, args, utterances)
                batcher = getattr(demo, "reply_batcher", None)
                if batcher is not None and batcher.batches:
                    print(f"batches: {batcher.batches}, mean {batcher.requests / batcher.batches:.2f} replies "
                          f"per batch")
            finally:
                if getattr(demo, "reply_batcher", None) is not None:
                    demo.reply_batcher.close()
                demo.close()
        return print_summary(summary)

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
