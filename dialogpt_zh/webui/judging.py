"""People judge on the web page: pick a candidate / write a better reply, and the blind arena tab.

The Gradio wiring for `dialogpt_zh.feedback` and `dialogpt_zh.arena`; `webapp.build_app` calls
`add_judging` (under the candidates table) and, with `--arena_pairs`, `with_arena_tab`. The records and
files are the same as the terminal's: one JSON line per judgement or verdict, appended whole
(`feedback.JsonlAppender`), nothing about the browser or session in them.
"""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from dialogpt_zh.errors import UserError
from dialogpt_zh.judging.feedback import JsonlAppender, bot_model_ids, choose, make_record, utc_now
from dialogpt_zh.webui.view import candidates_table, checked_textbox, history_to_messages

log = logging.getLogger(__name__)

PICK_MARK = "✔"  # the person's choice in the 选中 column (★ stays MMI's)
# ASCII punctuation that Markdown may read as markup (CommonMark lets a backslash escape any of it)
MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")


def markdown_literal(text: str) -> str:
    """`text` shown as it is in a gr.Markdown: "*好*" or "1. 对" in a context is what was said, not emphasis
    or a list."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def judged_rows(reply, picked_rank: int | None) -> list[list[Any]]:
    """The candidates table with the person's pick marked beside MMI's ★."""
    rows = candidates_table(reply)
    for row in rows:
        if picked_rank is not None and row[0] == picked_rank:
            row[1] = (row[1] + " " + PICK_MARK).strip()
    return rows


def add_judging(bot, feedback: str | Path | None, *, table, chatbot, history_state, turn_state, status
                ) -> JsonlAppender | None:
    """A row click in `table` = "I would have chosen this one"; the textbox below = "I would have said
    this". Either replaces the bot's last reply, so the chat continues with the person's choice; with
    `feedback` each judgement is appended to that file. `turn_state` holds the last turn
    ({"given", "reply", "settings"}, set by the chat handler)."""
    writer = JsonlAppender(feedback) if feedback else None
    models = bot_model_ids(bot)
    with gr.Row():
        better_box = checked_textbox("better", show_label=False, placeholder="觉得都不好？写下你会怎么回复，回车提交",
                                     scale=6, lines=1, max_lines=3, elem_id="better")
        better_btn = gr.Button("用我的回复", scale=1, min_width=110, elem_id="better_send")

    def apply(turn: dict[str, Any] | None, pick: int | None, better: str | None):
        if not turn:
            gr.Info("还没有可以评判的回复：先聊一句。")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        reply = turn["reply"]
        try:
            judgement = choose(reply, pick=pick, better=better)
            record = make_record(turn["given"], reply, judgement, turn["settings"], models, "web") if writer else None
        except UserError as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠ {e}"
        if record is not None:
            writer.append(record)
        history = turn["given"] + [judgement.text]
        what = f"第 {judgement.rank} 个候选" if judgement.kind == "pick" else "你写的回复"
        saved = "已记录（个人信息已遮盖）" if record is not None else "未记录（运营者没有开启 --feedback）"
        rank = judgement.rank if judgement.kind == "pick" else None
        return "", history_to_messages(history), history, judged_rows(reply, rank), \
            f"已改用{what}，对话从这里继续。{saved}"

    def pick_fn(turn: dict[str, Any] | None, evt: gr.SelectData):
        row = evt.row_value if evt.row_value else None
        try:
            rank = int(row[0]) if row else int(evt.index[0]) + 1
        except (TypeError, ValueError, IndexError):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        # The click names a row of the table the browser shows; the session's turn may be newer (a reply stored
        # before the browser drew its table): the same rank there is another candidate, so the texts must agree.
        shown = row[2] if row and len(row) > 2 else None
        texts = {c.rank: c.text for c in turn["reply"].candidates} if turn else {}
        if shown is not None and rank in texts and texts[rank] != shown:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "⚠ 候选表刚更新，这次点选未采用：请在新表里重新点选。"
        return apply(turn, rank, None)

    def better_fn(text: str, turn: dict[str, Any] | None):
        return apply(turn, None, text or "")

    outputs = [better_box, chatbot, history_state, table, status]
    table.select(pick_fn, [turn_state], outputs, api_visibility="private", queue=False)
    gr.on([better_box.submit, better_btn.click], better_fn, [better_box, turn_state], outputs, api_name="better",
          queue=False)
    return writer


# -------------------------------------------------------------------------------------------- arena tab

def arena_ui(pairs_path: str | Path, verdicts_path: str | Path):
    """The arena tab's components and handlers (call inside a Blocks); returns (load_fn, outputs) to show
    the first pair when the page loads. Pairs already in the verdicts file (from any judge) are skipped."""
    from dialogpt_zh.judging.arena import VERDICTS, load_pairs, read_verdicts

    pairs, run = load_pairs(pairs_path)
    by_id = {p["id"]: p for p in pairs}
    writer = JsonlAppender(verdicts_path)
    gr.Markdown("对每一对回复，选出在这段上文之后更好的一句（两句的来源是随机排列、不标注的）。"
                "每个判断都立即保存；关掉页面后再来，会从没评过的那一对继续。")
    progress = gr.Markdown(elem_id="arena_progress")
    context = gr.Markdown(elem_id="arena_context")
    with gr.Row():
        reply_a = gr.Textbox(label="回复 (a)", interactive=False, elem_id="arena_a")
        reply_b = gr.Textbox(label="回复 (b)", interactive=False, elem_id="arena_b")
    with gr.Row():
        buttons = [(gr.Button(label, elem_id=f"arena_vote_{v}"), v) for label, v in
                   (("(a) 更好", "a"), ("(b) 更好", "b"), ("差不多", "tie"), ("跳过", "skip"))]
    current = gr.State(None)
    # Judges in several tabs are shown the same open pair: whether it is still open and its verdict's append are
    # one step, so a second verdict for it does not silently replace the first (a later verdict wins on reading)
    lock = threading.Lock()

    def show(done: dict[str, str], note: str = ""):
        todo = [p for p in pairs if p["id"] not in done]
        if not todo:
            return note + f"全部 {len(pairs)} 对已评完。计分：`python -m dialogpt_zh.arena --score PAIRS VERDICTS`", \
                "", "", "", None
        p = todo[0]
        ctx = "\n".join(f"> {markdown_literal(u)}" for u in p["context"]) or "（无）"
        return note + f"第 {len(done) + 1} / {len(pairs)} 对（{p['id']}）", f"**上文**\n\n{ctx}", p["a"], p["b"], \
            p["id"]

    def unreadable(e: UserError):
        # a line edited by hand, a verdict of another run: the operator's to fix; its path is not the judge's
        log.warning("arena tab: %s", e)
        return "⚠ 评判记录文件读取出错，暂时不能继续评判，请告知运营者（详情在服务器日志里）。", "", "", "", None

    def show_next():
        try:
            return show(read_verdicts(verdicts_path, by_id, run, missing_ok=True)[0])
        except UserError as e:
            return unreadable(e)

    def verdict_fn(pid: str | None, verdict: str):
        note = ""
        with lock:
            try:
                done, _ = read_verdicts(verdicts_path, by_id, run, missing_ok=True)
            except UserError as e:
                return unreadable(e)
            if pid in done:
                note = "上一对刚被别的评判者评过，你的这次选择未记录。\n\n"
            elif pid is not None and pid in by_id:
                writer.append({"pair": pid, "verdict": VERDICTS[verdict], "run": run, "time": utc_now()})
                done[pid] = VERDICTS[verdict]
        return show(done, note)

    outputs = [progress, context, reply_a, reply_b, current]
    for button, v in buttons:
        button.click(lambda pid, v=v: verdict_fn(pid, v), [current], outputs, api_visibility="private",
                     queue=False)
    return show_next, outputs


def with_arena_tab(chat_demo: gr.Blocks, title: str, pairs_path: str | Path, verdicts_path: str | Path
                   ) -> gr.Blocks:
    """A page with two tabs: the chat page as built, and the arena over `pairs_path`."""
    if not verdicts_path:
        raise UserError("--arena_verdicts FILE is needed with --arena_pairs (verdicts are appended there)",
                        field="arena_verdicts")
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        with gr.Tabs():
            with gr.Tab("聊天", id="chat_tab"):
                chat_demo.render()
            with gr.Tab("盲评 Arena", id="arena_tab", elem_id="arena_tab"):
                load_fn, outputs = arena_ui(pairs_path, verdicts_path)
        page.load(load_fn, None, outputs, api_visibility="private", queue=False)
    return page
