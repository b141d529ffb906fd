"""Chat with a bot in the terminal: a thin REPL over `ChatBot` (all sampling and scoring live in the engine).

Interactive (a terminal): prompts, commands /reset /debug /pick /better /help /quit, Ctrl-D or Ctrl-C to
leave. Piped (stdin not a terminal): one user utterance per line in, one reply per line out on stdout; lines
starting with `/` are commands; notices, hints and /debug tables go to stderr so stdout stays one reply per
line. `/pick N` and `/better TEXT` are judgements (dialogpt_zh.feedback): saved only with --feedback FILE.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import TextIO

from dialogpt_zh.cli import make_parser, parse, run_main
from dialogpt_zh.engine.results import HISTORY_NOTICE_PREFIX
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import check_jsonl_output, check_output_file
from dialogpt_zh.judging.feedback import JsonlAppender, bot_model_ids, choose, make_record
from dialogpt_zh.settings import (
    BotArguments,
    GenerationSettings,
    MMISettings,
    check_seed,
    field_help,
    score_formula,
    score_terms,
)

COMMANDS = {
    "/reset": "forget the conversation so far",
    "/debug": "toggle showing every candidate with its scores (switched on: the last turn's at once)",
    "/pick N": "you would have chosen candidate N of the last turn (numbers as /debug shows them); "
               "the chat continues with it",
    "/better TEXT": "you would have replied TEXT to the last turn; the chat continues with it",
    "/help": "show these commands",
    "/quit": "leave (Ctrl-D and Ctrl-C also work)",
}

EXAMPLES = """
  python -m dialogpt_zh.interact                                 # the embedded checkpoints/default
  python -m dialogpt_zh.interact --model runs/mybot --seed 0     # a dir with forward/ and backward/
  python -m dialogpt_zh.interact --model runs/mybot/forward      # forward model only: MMI off
  python -m dialogpt_zh.interact --num_candidates 20 --top_p 0.9 --backward_weight 2 --quantize int8
  printf '你好\\n吃了吗\\n' | python -m dialogpt_zh.interact --seed 0   # piped: one reply per line
  python -m dialogpt_zh.interact --model /tmp/bot --retrieval_candidates 10 --debug   # + 10 human replies
  printf '你好\\n/pick 2\\n/better 我也很好\\n' | python -m dialogpt_zh.interact --feedback fb.jsonl
"""


@dataclass
class InteractArgs:
    seed: int | None = field(default=None, metadata=field_help(
        "make the conversation reproducible: turn i is sampled with seed + i"))
    transcript: str | None = field(default=None, metadata=field_help(
        "write the conversation to this JSONL file (rewritten atomically after every turn)"))
    max_input_chars: int = field(default=300, metadata=field_help(
        "longer user messages are cut to this many characters (with a notice)"))
    debug: bool = field(default=False, metadata=field_help("start with /debug on"))
    feedback: str | None = field(default=None, metadata=field_help(
        "append each /pick and /better judgement to this JSON Lines file (personal data masked; "
        "see `python -m dialogpt_zh.feedback export`); without it judgements are not saved"))

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        if not 1 <= self.max_input_chars <= 100_000:
            raise UserError(f"must be in [1, 100000], got {self.max_input_chars}", field="max_input_chars")
        if self.transcript:  # checked at start, not after the first reply
            check_output_file(self.transcript, field="transcript")
            check_jsonl_output(self.transcript, field="transcript")  # rewritten: never a file of another kind


def format_candidates(reply) -> str:
    """The /debug table: every candidate, best first, with the values its score is computed from (per token
    with --normalize mean, as settings.mmi_score takes them) and where it came from (sampled, retrieved from
    the index with its similarity, or both); below, the formula with this reply's weights."""
    mean = reply.normalize == "mean"
    f_name, b_name = ("fwd/tok", "bwd/ctx") if mean else ("fwd", "bwd")
    lines = [f"  {'rank':>4} {'score':>8} {f_name:>8} {b_name:>8} {'tok':>4} {'ctx':>4} {'n':>2} {'source':>9} "
             f"{'sim':>5}  text"]
    for c in reply.candidates:
        has_fwd, has_bwd = c.forward_logprob is not None, c.backward_logprob is not None
        fwd, bwd = score_terms(c.forward_logprob if has_fwd else 0.0, c.backward_logprob if has_bwd else 0.0,
                               c.num_tokens, c.num_context_tokens, reply.normalize)
        fwd_cell = f"{fwd:8.3f}" if has_fwd else f"{'-':>8}"
        bwd_cell, ctx_cell = (f"{bwd:8.3f}", f"{c.num_context_tokens:>4}") if has_bwd else (f"{'-':>8}", f"{'-':>4}")
        sim = f"{c.similarity:5.2f}" if c.similarity is not None else f"{'-':>5}"
        source = {"sampled+retrieved": "both"}.get(c.source, c.source)
        lines.append(f"  {c.rank:>4} {c.score:8.3f} {fwd_cell} {bwd_cell} {c.num_tokens:>4} {ctx_cell} "
                     f"{c.count:>2} {source:>9} {sim}  {c.text}")
    per = "per token" if mean else "summed"
    retrieved = any("retrieved" in c.source for c in reply.candidates)  # the bonus term matters only then
    formula = score_formula(reply.weights, reply.normalize,
                            retrieved_bonus=reply.retrieved_bonus if retrieved else None)
    lines.append(f"  {formula}   (fwd = ln P(reply | context), bwd = ln P(context | reply), {per} over tok reply / "
                 f"ctx context tokens; n = times sampled; '-': not computed, its weight is 0"
                 + ("; retrieved = 1 when the source is the index" if retrieved else "") + ")")
    t = reply.timings
    retrieve = f", retrieve {t['retrieve'] * 1000:.0f}" if t.get("retrieve") else ""
    lines.append(f"  mmi={'on' if reply.mmi else 'off'} seed={reply.seed} latency={reply.latency_s * 1000:.0f} ms "
                 f"(encode {t['encode'] * 1000:.0f}{retrieve}, generate {t['generate'] * 1000:.0f}, "
                 f"score {t['score'] * 1000:.0f}); context: {' | '.join(reply.context)}")
    return "\n".join(lines)


class Session:
    """The conversation state of one REPL: history, debug flag, transcript."""

    def __init__(self, bot, args: InteractArgs, out: TextIO, info: TextIO) -> None:
        self.bot, self.args, self.out, self.info = bot, args, out, info
        self.history: list[str] = []
        self.typed: list[bool] = []  # per utterance of `history`: did the person type it (not the bot)
        self.history_noted = False   # the "bot reads only the last lines" note was given in this conversation
        self.debug = args.debug
        self.turn = 0
        self.log: list[dict] = []
        self.last = None  # (history given to the bot, Reply) of the last turn: what /pick and /better judge
        self.feedback = JsonlAppender(args.feedback) if args.feedback else None

    def handle(self, line: str) -> bool:
        """Process one input line; False means quit."""
        if not is_valid_text(line):
            print("(notice: that line is not valid UTF-8 text and was skipped; type it again)", file=self.info)
            return True
        text = line.strip()
        if not text:
            print("(empty line ignored: type a message, or /help)", file=self.info)
            return True
        command = text.lower()
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            print("\n".join(f"  {c:13} {h}" for c, h in COMMANDS.items()), file=self.info)
            return True
        if command.split(maxsplit=1)[0] in ("/pick", "/better"):
            self._judge(text)
            return True
        if command == "/reset":
            self.last = None
            self.history.clear()
            self.typed.clear()
            self.history_noted = False
            self.log.append({"event": "reset"})
            self._save()
            print("(conversation reset)", file=self.info)
            return True
        if command == "/debug":
            self.debug = not self.debug
            print(f"(debug {'on' if self.debug else 'off'})", file=self.info)
            if self.debug and self.last is not None:  # the turn /pick refers to: seen before picking
                print(format_candidates(self.last[1]), file=self.info)
            return True
        if command.startswith("/"):
            word = command.split()[0]
            if word in COMMANDS or word == "/exit":  # "/debug on": a known command given an argument it has not
                print(f"({word} takes no argument: type {word} alone)", file=self.info)
                return True
            name = text.split()[0]
            if not name.isprintable():  # escape sequences typed or piped in are shown, not run by the terminal
                name = ascii(name)
            print(f"(unknown command {name}: /help lists the commands)", file=self.info)
            return True
        if len(text) > self.args.max_input_chars:
            print(f"(notice: input truncated from {len(text)} to {self.args.max_input_chars} characters)",
                  file=self.info)
            text = text[:self.args.max_input_chars]
        seed = None if self.args.seed is None else self.args.seed + self.turn
        try:
            reply = self.bot.reply(self.history + [text], seed=seed)
        except UserError as e:  # e.g. a message that is empty after normalisation: say so, keep chatting
            print(f"(cannot reply: {e})", file=self.info)
            return True
        self.turn += 1
        for notice in reply.notices:
            # the bot-level ones were shown once at start; dropped history is said once, in _history_note
            if notice not in self.bot.notices and not notice.startswith(HISTORY_NOTICE_PREFIX):
                print(f"(notice: {notice})", file=self.info)
        self._history_note(reply)
        if self.debug:
            print(format_candidates(reply), file=self.info)
        print(self._prefix() + reply.text, file=self.out, flush=True)
        self.last = (self.history + [text], reply)
        self.history.append(text)
        self.typed.append(True)
        if reply.text:
            self.history.append(reply.text)
            self.typed.append(False)
        self.log.append({"turn": self.turn, "user": text, "reply": reply.text, "seed": reply.seed,
                         "notices": reply.notices})
        self._save()
        return True

    def _judge(self, text: str) -> None:
        """/pick N or /better TEXT: the person's choice replaces the last reply (and is saved if asked)."""
        # split as handle() does, at any whitespace: "/pick\t2 3" or "/pick\u30002" (an IME's space) split at " "
        # gave the command "/pick\t2", taken for /better with the text "3"
        command, arg = (text.split(maxsplit=1) + [""])[:2]
        command, arg = command.lower(), arg.strip()
        if self.last is None:
            print("(nothing to judge yet: /pick and /better refer to the last reply)", file=self.info)
            return
        given, reply = self.last
        try:
            if command == "/pick":
                # isdigit() also passes "²", which int() refuses; int() refuses more than 4300 digits, and no
                # turn has a million candidates
                if not arg.isdecimal() or len(arg) > 6:
                    raise UserError(f"usage: /pick N (N = 1..{len(reply.candidates)}, as /debug shows them)")
                judgement = choose(reply, pick=int(arg))
            else:
                judgement = choose(reply, better=arg)
            record = None
            if self.feedback is not None:
                settings = {**asdict(self.bot.settings()[0]), **asdict(self.bot.mmi_settings)}  # auto resolved
                record = make_record(given, reply, judgement, settings, bot_model_ids(self.bot), "interact")
        except UserError as e:
            print(f"({e})", file=self.info)
            return
        if record is not None:
            self.feedback.append(record)
        # a second judgement of the same turn replaces the first; a written reply is the person's own words
        self.typed = self.typed[:len(given)] + [judgement.kind != "pick"]
        self.history = given + [judgement.text]
        self.log.append({"event": judgement.kind, "rank": judgement.rank, "reply": judgement.text})
        self._save()
        what = f"candidate {judgement.rank}" if judgement.kind == "pick" else "your reply"
        saved = "saved" if record is not None else "not saved: no --feedback"
        print(f"(the chat continues with {what}: {judgement.text} — {saved})", file=self.info)

    def _history_note(self, reply) -> None:
        """Once per conversation, the first time the bot leaves out a line the person typed (max_history or
        the context's token budget): every later turn leaves lines out too, so saying it each time is noise."""
        dropped = len(self.history) + 1 - len(reply.context)  # the model saw the last len(context) lines
        if self.history_noted or dropped <= 0 or not any(self.typed[:dropped]):
            return
        self.history_noted = True
        print(f"(note: the bot reads only the last {len(reply.context)} lines of the conversation, so your "
              f"earlier lines no longer count; --max_history and --max_context_tokens set how much it reads. "
              f"Said once per conversation.)", file=self.info)

    def _prefix(self) -> str:
        return "bot: " if self.out.isatty() else ""

    def _save(self) -> None:
        if self.args.transcript:
            from dialogpt_zh.fsutil import atomic_write_text

            atomic_write_text(self.args.transcript,
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.log))


def is_valid_text(line: str) -> bool:
    """False for a line with undecodable bytes (kept as lone surrogates by errors='surrogateescape')."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def chat(bot, args: InteractArgs, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the REPL until /quit, end of input, or Ctrl-C (streams default to the current sys ones)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):  # one line of invalid UTF-8 is skipped with a notice, not a crash
        stdin.reconfigure(errors="surrogateescape")
    info = stdout if interactive else stderr
    session = Session(bot, args, stdout, info)
    for notice in bot.notices:
        print(f"(notice: {notice})", file=info)
    if interactive:
        print("dialogpt_zh chat — /help for commands, Ctrl-D to leave", file=info)
    try:
        while True:
            if interactive:
                try:
                    line = input("you: ")
                except EOFError:
                    print(file=info)
                    break
            else:
                line = stdin.readline()
                if not line:
                    break
            if not session.handle(line):
                break
    except KeyboardInterrupt:
        print(file=info)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser([BotArguments, InteractArgs, GenerationSettings, MMISettings],
                         prog="python -m dialogpt_zh.interact",
                         description="Chat with a dialogpt_zh bot: N candidates sampled, MMI-reranked.",
                         examples=EXAMPLES)

    def body() -> int:
        bot_args, args, gen, mmi = parse(parser, argv)
        from dialogpt_zh.engine.bot import load_bot
        from dialogpt_zh.engine.loading import bot_input_dirs, check_outputs_apart

        check_outputs_apart({"transcript": args.transcript, "feedback": args.feedback},
                            bot_input_dirs(bot_args.model, bot_args.backward))
        return chat(load_bot(bot_args, gen, mmi), args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
