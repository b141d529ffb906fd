"""People judge the replies: the feedback record, its safe appender, and `export` to a training corpus.

A *judgement* is made where people chat (interact `/pick N` and `/better TEXT`, the web page's candidates
table): the person marks the candidate they would have chosen, or writes a better reply. With `--feedback
FILE` each judgement becomes one JSON line (`make_record`): the context, every candidate with its scores and
rank, the pick or the written reply, settings, seed, model ids and a UTC time; no browser or session ids.
Personal data is masked with the preprocessor's own rules (`cleaning.normalize_many`) before writing.

    python -m dialogpt_zh.feedback export feedback.jsonl --output data/feedback_corpus

writes `train.txt` (GPT2-chitchat layout: the context utterances + the chosen reply, blank line between
sessions; `python -m dialogpt_zh.preprocess` reads it) and `stats.json` (how often MMI's first choice was the
picked one, the picked candidate's mean rank, counts, and every skipped line with its file:line reason).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import check_jsonl_output, loads_json, repeated_file

log = logging.getLogger(__name__)

FORMAT = "dialogpt_zh.feedback"


VERSION = 1


KINDS = ("pick", "better")
# the longest written reply a judgement takes (training cuts utterances far shorter; more is no chat reply)
MAX_BETTER_CHARS = 500


class JsonlAppender:
    """Appends one JSON line per record, whole, even with many writers (threads or processes) at once.

    Each record is ONE `os.write` on an O_APPEND descriptor, under a thread lock and an exclusive `flock`
    (so writers in other processes that use this class never interleave); it is fsynced, so a verdict or a
    pick is on disk when the call returns (Ctrl-C, a closed browser or a crash right after lose nothing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_jsonl_output(self.path)
        self._fd = self._open()
        self._lock = threading.Lock()

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"cannot open for appending: {e.strerror}", path=self.path) from e

    def _reopen_if_replaced(self) -> None:
        """A file deleted, moved or replaced while a server holds it open (a person tidying up, log
        rotation): records appended to the old descriptor would go where nobody finds them."""
        try:
            now, ours = os.stat(self.path), os.fstat(self._fd)
            if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                return
        except FileNotFoundError:
            pass
        old, self._fd = self._fd, self._open()
        os.close(old)
        log.warning("%s was deleted or replaced while open: appending to it anew", self.path)

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            self._reopen_if_replaced()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(self._fd).st_size
                if size and os.pread(self._fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a hand-edited file without a final newline: keep records apart
                try:
                    written = os.write(self._fd, data)
                    while written < len(data):  # only on a signal or a full disk; still under the lock
                        written += os.write(self._fd, data[written:])
                    os.fsync(self._fd)
                except OSError as e:  # a full disk: a message naming the file, not a traceback, and no half line
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, size)
                    raise UserError(f"cannot append to it: {e.strerror or e}", path=self.path) from e
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: such scores (a -inf log-prob) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_id(model_dir: str | Path | None) -> dict[str, str] | None:
    """A model directory's id: its path and a hash of its config.json + training card (dialogpt_zh.json)."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("config.json", "dialogpt_zh.json"):
        p = model_dir / name
        digest.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"(missing)") + b"\0")
    return {"path": str(model_dir), "sha256": digest.hexdigest()[:16]}


def bot_model_ids(bot) -> dict[str, Any]:
    return {"forward": model_id(getattr(bot, "forward_dir", None)),
            "backward": model_id(getattr(bot, "backward_dir", None))}


@dataclass
class Judgement:
    """What the person chose for the last turn: a candidate (`rank`) or a reply they wrote (`rank` None)."""

    kind: str            # "pick" or "better"
    text: str
    rank: int | None


def choose(reply, pick: int | None = None, better: str | None = None) -> Judgement:
    """The person's choice for `reply`: candidate number `pick` (its rank, as /debug and the table show
    them) or the written reply `better`. Bad numbers and empty text are UserErrors."""
    if (pick is None) == (better is None):
        raise ValueError("give exactly one of pick, better")
    if pick is not None:
        ranks = {c.rank: c for c in reply.candidates}
        if pick not in ranks:
            raise UserError(f"no candidate {pick}: the last turn has candidates 1..{len(reply.candidates)}",
                            field="pick")
        return Judgement("pick", ranks[pick].text, pick)
    from dialogpt_zh.data.cleaning import normalize_text, strip_controls

    # escape sequences would reach the terminal when interact repeats the reply; the chat's next line
    text = " ".join(strip_controls(better).split())
    if not text:
        raise UserError("the better reply is empty", field="better")
    if len(text) > MAX_BETTER_CHARS:   # refused, not cut: a judgement is kept as the person wrote it
        raise UserError(f"the better reply has {len(text):,d} characters; a chat reply has at most "
                        f"{MAX_BETTER_CHARS}", field="better")
    # a lone link or zero-width space is no reply: the bot would be given an empty line, saved or not
    if not normalize_text(text):
        raise UserError("the better reply is empty after cleaning (only a link or invisible characters?)",
                        field="better")
    return Judgement("better", text, None)


def make_record(history: Sequence[str], reply, judgement: Judgement, settings: dict[str, Any],
                models: dict[str, Any], source: str) -> dict[str, Any]:
    """One feedback line, personal data masked. `history`: the utterances the bot was given (user's last
    message last); `settings`: every generation + MMI setting the reply was made with."""
    from dialogpt_zh.data.cleaning import normalize_many

    texts = normalize_many([*history, *(c.text for c in reply.candidates), judgement.text])
    context, rest = texts[:len(history)], texts[len(history):]
    candidates = [{"rank": c.rank, "text": text, "forward_logprob": c.forward_logprob,
                   "backward_logprob": c.backward_logprob, "score": c.score, "num_tokens": c.num_tokens,
                   "num_context_tokens": c.num_context_tokens, "count": c.count,
                   "source": getattr(c, "source", "sampled"), "similarity": getattr(c, "similarity", None)}
                  for c, text in zip(reply.candidates, rest)]
    chosen = rest[-1]
    if not chosen:
        raise UserError("the reply is empty after cleaning (only a link or control characters?)",
                        field=judgement.kind)
    rank = judgement.rank
    if rank is None:  # a written reply that is one of the candidates counts as that candidate's rank
        rank = next((c["rank"] for c in candidates if c["text"] == chosen), None)
    return {
        "format": FORMAT, "version": VERSION, "time": utc_now(), "source": source,
        "kind": judgement.kind, "context": context, "reply": chosen, "picked_rank": rank,
        "mmi_reply": candidates[0]["text"] if candidates else None,
        "candidates": candidates, "mmi": bool(reply.mmi), "seed": reply.seed,
        "model_context_turns": len(getattr(reply, "context", []) or []),
        "settings": dict(settings), "models": models,
    }


MAX_LISTED_SKIPS = 200


def _check_record(rec: Any) -> str | None:
    """Why a parsed line is not a usable judgement (None when it is)."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if rec.get("format") != FORMAT:
        return f"not a feedback record (format {rec.get('format')!r}, expected {FORMAT!r})"
    if rec.get("version") != VERSION:  # another version's fields may mean other things: never guess
        return f"feedback record version {rec.get('version')!r}; this version reads version {VERSION}"
    if rec.get("kind") not in KINDS:
        return f"field 'kind' must be one of {list(KINDS)}, got {rec.get('kind')!r}"
    ctx = rec.get("context")
    if not isinstance(ctx, list) or not ctx or not all(isinstance(u, str) for u in ctx):
        return "field 'context' must be a non-empty list of strings"
    if not isinstance(rec.get("reply"), str) or not rec["reply"].strip():
        return "field 'reply' must be a non-empty string"
    rank = rec.get("picked_rank")
    if rec["kind"] == "pick" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        return f"a pick needs an integer 'picked_rank' >= 1, got {rank!r}"
    # a written reply has the rank of the candidate it matches, or none
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        return f"field 'picked_rank' must be an integer >= 1 or null, got {rank!r}"
    cands = rec.get("candidates")
    if not isinstance(cands, list):
        return "field 'candidates' must be a list"
    # the statistics count the rank picked among these candidates and whether MMI ranked them
    # (compared one by one: a candidate's rank may be any JSON, a list too, which no set can hold)
    if rank is not None and not any(isinstance(c, dict) and c.get("rank") == rank for c in cands):
        return f"'picked_rank' {rank} is the rank of none of its {len(cands)} candidates"
    if not isinstance(rec.get("mmi", False), bool):
        return f"field 'mmi' must be true or false, got {rec['mmi']!r}"
    return None


def read_feedback(paths: Sequence[str | Path], counts: Counter, skipped: list[str]) -> list[dict[str, Any]]:
    """Usable records of feedback files, in order; every bad line is counted and listed as file:line: why."""
    records = []
    twice = repeated_file(paths)
    if twice:  # its judgements would be counted twice in the statistics
        raise UserError(f"given twice (as {twice[1]})", path=twice[0], field="files")
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError("feedback file not found" if not path.exists() else "not a file", path=path)
        try:
            records += _read_feedback_file(path, counts, skipped)
        except OSError as e:  # no read permission, an I/O error: a message naming the file, not a traceback
            raise UserError(f"cannot read: {e.strerror or e}", path=path) from e
    return records


def _read_feedback_file(path: Path, counts: Counter, skipped: list[str]) -> list[dict[str, Any]]:
    """One feedback file's usable records (see `read_feedback`)."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            counts["lines"] += 1
            try:  # a BOM (a file saved again by a Windows editor) would make its first record "not JSON"
                rec = loads_json(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                why = _check_record(rec)
            except UnicodeDecodeError as e:
                why = f"not UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                why = f"not JSON ({e.msg} at column {e.colno})"
            if why:
                counts["skipped_bad_lines"] += 1
                skipped.append(f"{path}:{lineno}: {why}")
                continue
            rec["_where"] = f"{path}:{lineno}"
            records.append(rec)
    return records


def feedback_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the person's choices relate to MMI's ranking (the data to re-tune the MMI weights on)."""
    picks = [r for r in records if r["kind"] == "pick"]
    ranked = [r for r in records if isinstance(r.get("picked_rank"), int)]
    mmi_picks = [r for r in picks if r.get("mmi")]
    hist = Counter(r["picked_rank"] for r in ranked)

    def rate(rs):
        return round(sum(r["picked_rank"] == 1 for r in rs) / len(rs), 4) if rs else None

    return {
        "judgements": len(records),
        "picks": len(picks),
        "better": sum(r["kind"] == "better" for r in records),
        "better_matching_a_candidate": sum(r["kind"] == "better" and r.get("picked_rank") is not None
                                           for r in records),
        "first_choice_picked_rate": rate(picks),
        "mmi_first_choice_picked_rate": rate(mmi_picks),
        "picks_with_mmi_on": len(mmi_picks),
        "picked_rank_mean": round(sum(r["picked_rank"] for r in picks) / len(picks), 4) if picks else None,
        "picked_rank_histogram": {str(k): hist[k] for k in sorted(hist)},
        "candidates_per_turn_mean": round(sum(len(r["candidates"]) for r in records) / len(records), 4)
        if records else None,
    }


def judged_sessions(records: Sequence[dict[str, Any]], counts: Counter, skipped: list[str]) -> list[list[str]]:
    """One session per judgement (context + chosen reply), normalised as the preprocessor would; exact
    duplicates and sessions that are the start of a longer judged session (the same chat, judged again
    later) are left out, since the longer one already trains every turn of it."""
    from dialogpt_zh.data.cleaning import normalize_many

    sessions: list[tuple[str, ...]] = []
    for rec in records:
        turns = normalize_many([*rec["context"], rec["reply"]])
        if not turns[-1]:
            counts["skipped_empty_reply"] += 1
            skipped.append(f"{rec['_where']}: the reply is empty after cleaning")
            continue
        kept = [t for t in turns if t]
        if len(kept) < 2:  # the reply alone: no session to train on (the preprocessor drops it as too short)
            counts["skipped_empty_context"] += 1
            skipped.append(f"{rec['_where']}: the context is empty after cleaning")
            continue
        counts["context_utterances_empty_dropped"] += len(turns) - len(kept)
        sessions.append(tuple(kept))
    prefixes = {s[:k] for s in sessions for k in range(1, len(s))}
    out, seen = [], set()
    for s in sessions:
        if s in seen:
            counts["sessions_duplicate"] += 1
        elif s in prefixes:
            counts["sessions_contained_in_longer"] += 1
        else:
            out.append(list(s))
        seen.add(s)
    return out


def export(paths: Sequence[str], output: str, overwrite: bool = False) -> dict[str, Any]:
    """Feedback files -> OUTPUT/train.txt + OUTPUT/stats.json (atomic); returns the statistics."""
    from dialogpt_zh.fsutil import atomic_directory, check_output_name

    if not paths:
        raise UserError("give at least one feedback file", field="files")
    if not output:
        raise UserError("--output DIR is required", field="output")
    check_output_name(output, "output")  # "-" made a directory named "-", a newline one named over two lines
    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError("output exists; pass --overwrite to replace it", path=out)
    if out.exists() and not out.is_dir():
        raise UserError("output exists and is not a directory", path=out)
    for p in paths:  # never replace a directory that holds an input
        if out.resolve() in Path(p).resolve().parents:
            raise UserError(f"the output directory contains the input {p}; choose another --output", path=out)
    if out.is_dir() and any(out.iterdir()) and not (out / "stats.json").is_file():  # as preprocess and index do
        raise UserError("exists and is not a feedback export (no stats.json); refusing to replace it, even with "
                        "--overwrite: choose another --output", path=out, field="output")
    counts: Counter = Counter()
    skipped: list[str] = []
    records = read_feedback(paths, counts, skipped)
    sessions = judged_sessions(records, counts, skipped)
    for line in skipped[:20]:
        print(f"warning: skipped {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"warning: ... and {len(skipped) - 20} more skipped lines (all in stats.json)", file=sys.stderr)
    if not sessions:
        raise UserError(f"no usable judgement in {', '.join(map(str, paths))} "
                        f"({counts['lines']} lines, {counts['skipped_bad_lines']} bad)", field="files")
    stats = {"inputs": [str(p) for p in paths], **feedback_stats(records),
             "sessions_written": len(sessions), "utterances_written": sum(map(len, sessions)),
             "counts": dict(sorted(counts.items())),
             "skipped": skipped[:MAX_LISTED_SKIPS], "skipped_not_listed": max(0, len(skipped) - MAX_LISTED_SKIPS)}
    with atomic_directory(out, replace_existing=overwrite) as tmp:
        (tmp / "train.txt").write_text("\n\n".join("\n".join(s) for s in sessions) + "\n", encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return stats


def summary_line(stats: dict[str, Any]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    mean = stats["picked_rank_mean"]
    return (f"{stats['judgements']} judgements ({stats['picks']} picks, {stats['better']} written replies), "
            f"{stats['counts'].get('skipped_bad_lines', 0)} bad lines skipped -> {stats['sessions_written']} "
            f"sessions; MMI's first choice picked {pct(stats['mmi_first_choice_picked_rate'])} of "
            f"{stats['picks_with_mmi_on']} picks with MMI on; picked rank mean "
            f"{'n/a' if mean is None else f'{mean:.2f}'}")
