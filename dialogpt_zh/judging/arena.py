"""The arena: a blind comparison of two bots (or one bot with two settings), judged by a person.

Contexts are drawn (seeded) from held-out sessions in any format the preprocessor reads; each context gets
one reply from A and one from B (same seed for both), shown in a random order as (a) and (b) without
labels. The judge answers `a`, `b`, `=` (tie) or `s` (skip). Every verdict is appended to the verdicts file
as it is made (`feedback.JsonlAppender`), so Ctrl-C or a closed browser loses nothing, and a rerun with the
same arguments continues where it stopped. At the end: A wins / B wins / ties and the share of decided
pairs A won with a 95 % Wilson interval.

Files:
- PAIRS.json (`--make`): the blinded pairs, `{"run", "pairs": [{"id", "context", "a", "b"}]}`; nothing
  in it says which bot wrote which reply.
- the key (`--key`, default PAIRS.key.json): `{"run", "systems": {"A": ..., "B": ...}, "order": {id: "AB"|"BA"},
  "sources": {id: {"A": source, "B": source}}}` ("AB": reply a is A's; a source is where each reply came from:
  "sampled", "retrieved" (a human reply from the bot's index) or "sampled+retrieved"). Keep it away from the
  judge: only the key, never the pairs, says which reply was retrieved.
- verdicts: JSON Lines `{"pair": id, "verdict": "a"|"b"|"="|"s", "run": ...}` as written here, or plain text
  lines `ID VERDICT` (a judge's own file); `#` comments and blank lines are ignored, a later verdict for the
  same pair replaces an earlier one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import loads_json
from dialogpt_zh.judging.feedback import JsonlAppender, utc_now

log = logging.getLogger(__name__)

Z95 = 1.959963984540054
PAIRS_FORMAT = "dialogpt_zh.arena.pairs"


KEY_FORMAT = "dialogpt_zh.arena.key"


VERDICTS = {"a": "a", "b": "b", "=": "=", "tie": "=", "s": "s", "skip": "s"}


def answer_word(text: str) -> str:
    """A typed answer as VERDICTS (and q) spell it: NFKC, so the full-width ａ, ｂ, ＝ of a Chinese input method
    (which look like a, b, =, and were refused as if they were something else) read as a, b, =."""
    return unicodedata.normalize("NFKC", text).strip().lower()


def draw_contexts(paths: Sequence[str], n: int, seed: int, fmt: str = "auto", split: str = "auto"
                  ) -> list[dict[str, Any]]:
    """`n` held-out contexts (a session without its last turn), drawn uniformly (reservoir, seeded),
    read and cleaned by the preprocessor's readers; in file order."""
    from dialogpt_zh.data.readers import iter_clean_sessions
    from dialogpt_zh.judging.heldout import split_wanted

    if not paths:
        raise UserError("give held-out files or directories to draw contexts from (--data)", field="data")
    if n < 1:
        raise UserError(f"must be >= 1, got {n}", field="pairs")
    rng = random.Random(seed)
    counts: Counter = Counter()
    chosen: list[tuple[int, Any]] = []
    seen = 0
    for s in iter_clean_sessions(list(paths), fmt=fmt, counters=counts):
        if not split_wanted(s.split, split):
            counts[f"session_not_in_split ({s.split})"] += 1
            continue
        if len(chosen) < n:
            chosen.append((seen, s))
        else:
            j = rng.randrange(seen + 1)
            if j < n:
                chosen[j] = (seen, s)
        seen += 1
    # what was read and what was left out, and why (malformed records, one-turn sessions, other splits)
    why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "nothing read"
    if not chosen:
        raise UserError(f"no usable multi-turn session in {', '.join(paths)} with split {split!r} ({why})",
                        field="data")
    if len(chosen) < n:
        log.warning("only %d usable multi-turn sessions in %s with split %r, so %d pairs, not %d (%s)", len(chosen),
                    ", ".join(paths), split, len(chosen), n, why)
    else:
        log.info("drew %d contexts from %d usable sessions (reading/cleaning counts: %s)", n, seen, why)
    chosen.sort(key=lambda x: x[0])
    return [{"context": s.turns[:-1], "where": f"{s.path}:{s.line}"} for _, s in chosen]


def pair_seed(seed: int, index: int) -> int:
    from dialogpt_zh.judging.heldout import case_seed

    return case_seed(seed, index)


def make_pairs(contexts: Sequence[dict[str, Any]], bots: dict[str, Any], settings: dict[str, dict[str, Any]],
               seed: int, progress: bool = True, sources: dict[str, dict[str, str]] | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Blinded pairs and their order key. Pair i: A and B reply with the same seed; a fair coin (seeded by
    (seed, i)) decides which is shown first. `sources`, when given, gets each pair's {"A": source, "B":
    source} (the key's, never the pairs')."""
    from tqdm import tqdm

    pairs, order = [], {}
    width = max(3, len(str(len(contexts))))
    for i, ctx in enumerate(tqdm(contexts, desc="arena replies", unit="pair", disable=not progress,
                                 file=sys.stderr)):
        s = pair_seed(seed, i)
        made = {name: bots[name].reply(ctx["context"], seed=s, **settings[name]) for name in ("A", "B")}
        replies = {name: r.text for name, r in made.items()}
        first = "A" if random.Random(s).random() < 0.5 else "B"
        second = "B" if first == "A" else "A"
        pid = f"p{i + 1:0{width}d}"
        pairs.append({"id": pid, "context": list(ctx["context"]), "a": replies[first], "b": replies[second]})
        order[pid] = first + second
        if sources is not None:
            sources[pid] = {name: reply_source(r) for name, r in made.items()}
    return pairs, order


def reply_source(reply) -> str:
    """Where a reply's chosen candidate came from ("none": no candidate was left)."""
    return getattr(reply.candidates[0], "source", "sampled") if reply.candidates else "none"


def run_id(pairs: Sequence[dict[str, Any]]) -> str:
    """Identifies a set of pairs (content, not file name): verdicts and keys must belong to it."""
    blob = json.dumps([[p["id"], p["context"], p["a"], p["b"]] for p in pairs], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def default_key_path(pairs_path: str | Path) -> Path:
    p = Path(pairs_path)
    return p.with_name(p.name[:-5] + ".key.json" if p.name.endswith(".json") else p.name + ".key.json")


def _read_json(path: Path, what: str, hint: str = "") -> Any:
    if not path.exists():
        raise UserError(f"{what} not found{hint}", path=path)
    try:  # utf-8-sig: a file saved again by a Windows editor starts with a BOM
        return loads_json(path.read_text(encoding="utf-8-sig"))
    except OSError as e:  # a directory, no permission
        raise UserError(f"cannot read the {what}: {e.strerror}", path=path) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not a JSON {what} ({e})", path=path) from e


def load_pairs(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    path = Path(path)
    doc = _read_json(path, "pairs file")
    if not isinstance(doc, dict) or doc.get("format") != PAIRS_FORMAT or not isinstance(doc.get("pairs"), list):
        raise UserError(f"not an arena pairs file (expected format {PAIRS_FORMAT!r})", path=path)
    if not doc["pairs"]:
        raise UserError("holds no pairs", path=path, field="pairs")
    seen: set[str] = set()
    for i, p in enumerate(doc["pairs"]):
        if not (isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("context"), list)
                and all(isinstance(u, str) for u in p["context"])
                and isinstance(p.get("a"), str) and isinstance(p.get("b"), str)):
            raise UserError(f"pair {i} needs 'id', 'context' (a list of strings), 'a' and 'b'", path=path,
                            field="pairs")
        pid = p["id"]
        # a verdict names its pair by id: a second pair with the id would take the first one's verdict, and an
        # id a text verdicts line cannot give (blank, with spaces, a '#' comment) could never be judged
        if pid.split() != [pid] or pid.startswith("#"):
            raise UserError(f"pair {i}: id {pid!r} must be one word, not starting with '#'", path=path,
                            field="pairs")
        if pid in seen:
            raise UserError(f"pair {i}: id {pid!r} is used by an earlier pair", path=path, field="pairs")
        seen.add(pid)
    if run_id(doc["pairs"]) != doc.get("run"):
        raise UserError("the pairs were edited (their run id does not match); make them again", path=path)
    return doc["pairs"], doc["run"]


def load_key(path: str | Path, run: str, pair_ids: Iterable[str]) -> dict[str, Any]:
    """The key of the pairs `run` (ids `pair_ids`): its order names exactly these pairs, each "AB" or "BA" (the
    tally reads every verdict's pair through it), and its systems and sources are what the tally prints."""
    path = Path(path)
    key = _read_json(path, "key file", " (--key; written by --make beside the pairs)")
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise UserError(f"not an arena key file (expected format {KEY_FORMAT!r})", path=path)
    if key.get("run") != run:
        raise UserError(f"this key belongs to other pairs (run {key.get('run')}, the pairs are run {run})", path=path)
    order, ids = key.get("order"), set(pair_ids)
    if not isinstance(order, dict) or set(order) != ids or any(v not in ("AB", "BA") for v in order.values()):
        raise UserError("must map each pair id of the pairs file, and no other, to \"AB\" or \"BA\"", path=path,
                        field="order")
    systems = key.get("systems")
    if not (isinstance(systems, dict) and all(isinstance(systems.get(s), dict)
                                               and isinstance(systems[s].get("model"), str)
                                               and isinstance(systems[s].get("settings"), dict) for s in "AB")):
        raise UserError("must give A and B, each with 'model' and 'settings'", path=path, field="systems")
    sources = key.get("sources")
    if sources is not None and not (isinstance(sources, dict) and all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in sources.values())):
        raise UserError("must map pair ids to {\"A\": source, \"B\": source}", path=path, field="sources")
    return key


def write_pairs(path: str | Path, key_path: str | Path, pairs: list[dict[str, Any]], order: dict[str, str],
                systems: dict[str, Any], meta: dict[str, Any], overwrite: bool = False,
                sources: dict[str, dict[str, str]] | None = None) -> str:
    from dialogpt_zh.fsutil import atomic_write_json

    for p in (Path(path), Path(key_path)):
        if p.exists() and not overwrite:
            raise UserError("exists; pass --overwrite to replace it", path=p)
    run = run_id(pairs)
    atomic_write_json(key_path, {"format": KEY_FORMAT, "run": run, "systems": systems, "order": order,
                                 **({"sources": sources} if sources is not None else {})})
    atomic_write_json(path, {"format": PAIRS_FORMAT, "version": 1, "run": run, "created": utc_now(),
                             **meta, "pairs": pairs})
    return run


def read_verdicts(path: str | Path, pair_ids: Iterable[str], run: str | None = None,
                  missing_ok: bool = False) -> tuple[dict[str, str], Counter]:
    """pair id -> verdict (a, b, =, s) of a verdicts file: JSON Lines {"pair", "verdict"} or text lines
    `ID VERDICT`. A later verdict for a pair replaces an earlier one. Bad lines are UserErrors (file:line)."""
    path = Path(path)
    counts: Counter = Counter()
    if not path.exists():
        if missing_ok:
            return {}, counts
        raise UserError("verdicts file not found", path=path)
    ids = set(pair_ids)
    verdicts: dict[str, str] = {}
    try:
        f = open(path, "rb")
    except OSError as e:  # a directory, no permission
        raise UserError(f"cannot read the verdicts file: {e.strerror}", path=path) from e
    with f:
        for lineno, raw in enumerate(f, 1):
            try:  # a BOM (Windows editors write one) would stick to the first pair id or hide its JSON
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 ({e.reason})", path=path, line=lineno) from e
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    rec = loads_json(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"not JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from e
                if run is not None and rec.get("run") not in (None, run):
                    raise UserError(f"this verdict belongs to another arena run ({rec.get('run')}; these pairs "
                                    f"are run {run}): use another verdicts file", path=path, line=lineno)
                pid, answer = rec.get("pair"), rec.get("verdict")
            else:
                parts = line.split()
                if len(parts) != 2:
                    raise UserError("expected 'PAIR_ID VERDICT' (e.g. 'p01 a')", path=path, line=lineno)
                pid, answer = parts
            if not isinstance(pid, str) or pid not in ids:  # a JSON line may give a list (unhashable) or a number
                raise UserError(f"unknown pair id {pid!r}", path=path, line=lineno)
            verdict = VERDICTS.get(answer_word(answer)) if isinstance(answer, str) else None
            if verdict is None:
                raise UserError(f"verdict must be a, b, = or s, got {answer!r}", path=path, line=lineno)
            if pid in verdicts:
                counts["verdicts_replaced"] += 1
            verdicts[pid] = verdict
    return verdicts, counts


def majority_verdicts(judges: Sequence[dict[str, str]]) -> dict[str, str]:
    """One verdict per pair from several judges of the same pairs file (so the same a/b positions): the side
    more than half of the judges who judged the pair chose, else a tie. Skips ("s") count as not judged."""
    out: dict[str, str] = {}
    for pid in sorted({pid for j in judges for pid in j}):
        votes = Counter(j[pid] for j in judges if j.get(pid) in ("a", "b", "="))
        if not votes:
            out[pid] = "s"
            continue
        side, n = max(((v, votes[v]) for v in ("a", "b")), key=lambda x: x[1])
        out[pid] = side if n > sum(votes.values()) / 2 else "="
    return out


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (None for n = 0)."""
    if n == 0:
        return None
    p = wins / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def tally(verdicts: dict[str, str], order: dict[str, str], total: int,
          sources: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Verdicts (display positions) -> wins per system via the key, with the 95 % interval for A; with the
    key's `sources`, per system and reply source: replies, decided pairs and wins."""
    t = Counter()
    by_source = {s: {} for s in ("A", "B")} if sources else None
    for pid, v in verdicts.items():
        winner = order[pid][0 if v == "a" else 1] if v in ("a", "b") else None
        if winner:
            t[f"{winner}_wins"] += 1
        else:
            t["ties" if v == "=" else "skipped"] += 1
        for system in by_source or ():
            row = by_source[system].setdefault(sources.get(pid, {}).get(system, "unknown"),
                                               {"judged": 0, "decided": 0, "wins": 0})
            row["judged"] += 1
            row["decided"] += winner is not None
            row["wins"] += winner == system
    decided = t["A_wins"] + t["B_wins"]
    ci = wilson_interval(t["A_wins"], decided)
    return {"pairs": total, "judged": len(verdicts), "not_judged": total - len(verdicts),
            "A_wins": t["A_wins"], "B_wins": t["B_wins"], "ties": t["ties"], "skipped": t["skipped"],
            "decided": decided, "A_preference": round(t["A_wins"] / decided, 4) if decided else None,
            "A_preference_ci95": [round(ci[0], 4), round(ci[1], 4)] if ci else None,
            **({"by_source": by_source} if by_source is not None else {})}


def format_tally(result: dict[str, Any], systems: dict[str, Any] | None = None) -> str:
    def name(s):
        if not systems:
            return s
        d = systems[s]
        extra = " ".join(f"{k}={v}" for k, v in d["settings"].items())
        backward = (d.get("backward") or {}).get("path")
        # a backward model given apart (--a_backward), not the bot directory's own backward/
        apart = f" + {backward}" if backward and Path(d["model"]) not in Path(backward).parents else ""
        return f"{s} ({d['model']}{apart}{' ' + extra if extra else ''})"

    lines = [f"{name('A')}: {result['A_wins']} wins",
             f"{name('B')}: {result['B_wins']} wins",
             f"ties: {result['ties']}   skipped: {result['skipped']}   not judged: {result['not_judged']}"
             f"   (of {result['pairs']} pairs)"]
    if result["decided"]:
        lo, hi = result["A_preference_ci95"]
        lines.append(f"A preferred in {100 * result['A_preference']:.1f} % of the {result['decided']} decided pairs "
                     f"(95 % Wilson interval {100 * lo:.1f}–{100 * hi:.1f} %)")
    else:
        lines.append("no decided pairs yet: no preference to report")
    for system, rows in (result.get("by_source") or {}).items():
        if any(src != "sampled" for src in rows):  # only worth a line when some reply was not sampled
            lines.append(f"{system}'s judged replies by source: " + ", ".join(
                f"{src} {r['judged']} (won {r['wins']} of {r['decided']} decided)" for src, r in sorted(rows.items())))
    return "\n".join(lines)


def show_pair(pair: dict[str, Any], number: int, total: int, out: TextIO) -> None:
    print(f"\n[{number}/{total}] {pair['id']} — context:", file=out)
    for u in pair["context"]:
        print(f"    > {u}", file=out)
    print(f"  (a) {pair['a']}\n  (b) {pair['b']}", file=out)
    if pair["a"] == pair["b"]:
        print("  (the two replies are the same text)", file=out)


def judge(pairs: Sequence[dict[str, Any]], run: str, verdicts_path: str | Path, stdin: TextIO, out: TextIO
          ) -> dict[str, str]:
    """Ask for a verdict on every pair not yet in the verdicts file; each is appended as soon as given.
    Stops at end of input or `q`. Returns all verdicts (earlier ones included)."""
    done, _ = read_verdicts(verdicts_path, [p["id"] for p in pairs], run, missing_ok=True)
    todo = [p for p in pairs if p["id"] not in done]
    if done:
        print(f"(resuming: {len(done)} of {len(pairs)} pairs already judged in {verdicts_path})", file=out)
    if not todo:
        return done
    writer = JsonlAppender(verdicts_path)
    interactive = stdin.isatty()
    lineno = 0
    print("answer a or b (the better reply), = (as good), s (skip), q (stop; rerun to resume)", file=out)
    try:
        for pair in todo:
            show_pair(pair, len(done) + 1, len(pairs), out)
            while True:
                if interactive:
                    try:
                        answer = answer_word(input("verdict [a/b/=/s/q]: "))
                    except EOFError:
                        return done
                else:
                    line, lineno = stdin.readline(), lineno + 1
                    if not line:
                        return done
                    if not line.strip():  # a blank line answers nothing
                        continue
                    answer = answer_word(line)
                    if answer not in VERDICTS and answer not in ("q", "quit"):
                        # nobody reads a prompt on piped input: asking again would give this pair the next
                        # line's verdict and shift every later one
                        raise UserError(f"{line.strip()!r} is no verdict (a, b, =, s or q); the {len(done)} "
                                        f"verdicts before it are saved in {verdicts_path}: rerun to resume",
                                        path="<stdin>", line=lineno)
                if answer in ("q", "quit"):
                    return done
                if answer in VERDICTS:
                    break
                print("  please answer a, b, = or s (q to stop)", file=out)
            writer.append({"pair": pair["id"], "verdict": VERDICTS[answer], "run": run, "time": utc_now()})
            done[pair["id"]] = VERDICTS[answer]
    except KeyboardInterrupt:  # every verdict so far is on disk: show the tally, rerun to resume
        print("\n(stopped; rerun the same command to continue)", file=out)
    finally:
        writer.close()
    return done
