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
- the key (`--key`, default PAIRS.key.json): `{"run", "systems": {"A": ..., "B": ...}, "order": {id: "AB"|"BA"}}`
  ("AB": reply a is A's). Keep it away from the judge.
- verdicts: JSON Lines `{"pair": id, "verdict": "a"|"b"|"="|"s", "run": ...}` as written here, or plain text
  lines `ID VERDICT` (a judge's own file); `#` comments and blank lines are ignored, a later verdict for the
  same pair replaces an earlier one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from dialogpt_zh.cli import field_help, make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.feedback import JsonlAppender, model_id, utc_now

PAIRS_FORMAT = "dialogpt_zh.arena.pairs"
KEY_FORMAT = "dialogpt_zh.arena.key"
VERDICTS = {"a": "a", "b": "b", "=": "=", "tie": "=", "s": "s", "skip": "s"}
Z95 = 1.959963984540054

EXAMPLES = """
  # judge in the terminal: the default bot (MMI) against the same bot with one plain sample
  python -m dialogpt_zh.arena --data ../shared/corpus/lccc-sample/toy_data.json --split valid \\
      --a checkpoints/default --b checkpoints/default --b_set num_candidates=1 use_mmi=false \\
      --verdicts runs/arena/verdicts.jsonl            # rerun the same command to resume
  # offline: write blinded pairs (+ PAIRS.key.json), let a judge answer, then score
  python -m dialogpt_zh.arena --data heldout.txt --b runs/mybot --make runs/arena/pairs.json
  python -m dialogpt_zh.arena --judge runs/arena/pairs.json --verdicts runs/arena/judge1.jsonl
  python -m dialogpt_zh.arena --score runs/arena/pairs.json runs/arena/judge1.jsonl
"""


@dataclass
class ArenaArgs:
    a: str | None = field(default=None, metadata=field_help(
        "bot A: a bot directory (forward/ + backward/) or a forward model directory; default checkpoints/default"))
    b: str | None = field(default=None, metadata=field_help("bot B (as --a); default checkpoints/default"))
    a_set: list[str] = field(default_factory=list, metadata=field_help(
        "settings of A as NAME=VALUE (any generation or MMI setting), e.g. num_candidates=20 top_p=0.9"))
    b_set: list[str] = field(default_factory=list, metadata=field_help(
        "settings of B as NAME=VALUE, e.g. num_candidates=1 use_mmi=false (plain sampling)"))
    data: list[str] = field(default_factory=list, metadata=field_help(
        "held-out corpus files or directories (any format the preprocessor reads) to draw contexts from"))
    format: str = field(default="auto", metadata=field_help("corpus format of --data (auto, chitchat, ...)"))
    split: str = field(default="auto", metadata=field_help(
        "sessions to use by their split: 'auto' = all but 'train', 'all', or a list such as 'valid,test'"))
    pairs: int = field(default=30, metadata=field_help("number of contexts (pairs) to draw"))
    seed: int = field(default=0, metadata=field_help(
        "seed of the context draw, the replies and the order of each pair (same seed, same pairs)"))
    verdicts: str | None = field(default=None, metadata=field_help(
        "JSON Lines file the verdicts are appended to as they are made (interactive and --judge)"))
    make: str | None = field(default=None, metadata=field_help(
        "write the blinded pairs to this PAIRS.json (and the key to --key) instead of judging"))
    judge: str | None = field(default=None, metadata=field_help("judge the pairs of this PAIRS.json"))
    score: list[str] = field(default_factory=list, metadata=field_help(
        "PAIRS.json VERDICTS: score a judge's verdicts with the key"))
    key: str | None = field(default=None, metadata=field_help("key file (default: PAIRS.key.json beside PAIRS)"))
    overwrite: bool = field(default=False, metadata=field_help("--make: replace existing pairs/key files"))
    device: str = field(default="cpu", metadata=field_help("torch device for the models"))
    threads: int = field(default=0, metadata=field_help(
        "intra-op CPU threads per reply: 0 = the thread policy (auto), N = always N (as --threads of interact)"))
    progress: bool = field(default=True, metadata=field_help("show a progress bar while generating"))


# ------------------------------------------------------------------------------------------- settings

def parse_settings(items: Sequence[str], flag: str) -> dict[str, Any]:
    """NAME=VALUE strings -> engine settings, typed by the settings dataclasses and validated by the engine."""
    from dialogpt_zh.settings import GenerationSettings, MMISettings, split_overrides

    defaults = {**dataclasses.asdict(GenerationSettings()), **dataclasses.asdict(MMISettings())}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UserError(f"expected NAME=VALUE, got {item!r}", field=flag)
        if name not in defaults:
            raise UserError(f"unknown setting {name!r}; known: {', '.join(sorted(defaults))}", field=flag)
        default, raw = defaults[name], raw.strip()
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value: Any = raw.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = None if raw.lower() in ("", "none") else raw
        except ValueError:
            raise UserError(f"{name}: cannot read {raw!r} as {type(default).__name__}", field=flag) from None
        out[name] = value
    split_overrides(out)  # validates ranges (UserError names the field)
    return out


# ------------------------------------------------------------------------------------------- contexts

def draw_contexts(paths: Sequence[str], n: int, seed: int, fmt: str = "auto", split: str = "auto"
                  ) -> list[dict[str, Any]]:
    """`n` held-out contexts (a session without its last turn), drawn uniformly (reservoir, seeded),
    read and cleaned by the preprocessor's readers; in file order."""
    from dialogpt_zh.evaluate import split_wanted
    from dialogpt_zh.readers import iter_clean_sessions

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
            continue
        if len(chosen) < n:
            chosen.append((seen, s))
        else:
            j = rng.randrange(seen + 1)
            if j < n:
                chosen[j] = (seen, s)
        seen += 1
    if not chosen:
        raise UserError(f"no usable multi-turn session in {', '.join(paths)} with split {split!r}", field="data")
    chosen.sort(key=lambda x: x[0])
    return [{"context": s.turns[:-1], "where": f"{s.path}:{s.line}"} for _, s in chosen]


# ---------------------------------------------------------------------------------------------- pairs

def pair_seed(seed: int, index: int) -> int:
    from dialogpt_zh.evaluate import case_seed

    return case_seed(seed, index)


def load_bots(specs: dict[str, str | None], device: str = "cpu", threads: int = 0) -> dict[str, Any]:
    """One ChatBot per distinct directory (A and B may share one; their settings are per-call overrides),
    loaded the way every face loads its bot (engine.load_bot)."""
    from dialogpt_zh.engine import default_bot_dir, load_bot
    from dialogpt_zh.settings import BotArguments

    loaded: dict[str, Any] = {}
    bots = {}
    for name, path in specs.items():
        key = str(Path(path or default_bot_dir()).resolve())
        if key not in loaded:
            loaded[key] = load_bot(BotArguments(model=path, device=device, threads=threads))
        bots[name] = loaded[key]
    return bots


def describe_system(bot, path: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    from dialogpt_zh.engine import default_bot_dir

    return {"model": str(path or default_bot_dir()), "settings": settings,
            "forward": model_id(bot.forward_dir), "backward": model_id(bot.backward_dir)}


def make_pairs(contexts: Sequence[dict[str, Any]], bots: dict[str, Any], settings: dict[str, dict[str, Any]],
               seed: int, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Blinded pairs and their order key. Pair i: A and B reply with the same seed; a fair coin (seeded by
    (seed, i)) decides which is shown first."""
    from tqdm import tqdm

    pairs, order = [], {}
    width = max(3, len(str(len(contexts))))
    for i, ctx in enumerate(tqdm(contexts, desc="arena replies", unit="pair", disable=not progress,
                                 file=sys.stderr)):
        s = pair_seed(seed, i)
        replies = {name: bots[name].reply(ctx["context"], seed=s, **settings[name]).text for name in ("A", "B")}
        first = "A" if random.Random(s).random() < 0.5 else "B"
        second = "B" if first == "A" else "A"
        pid = f"p{i + 1:0{width}d}"
        pairs.append({"id": pid, "context": list(ctx["context"]), "a": replies[first], "b": replies[second]})
        order[pid] = first + second
    return pairs, order


def run_id(pairs: Sequence[dict[str, Any]]) -> str:
    """Identifies a set of pairs (content, not file name): verdicts and keys must belong to it."""
    blob = json.dumps([[p["id"], p["context"], p["a"], p["b"]] for p in pairs], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def default_key_path(pairs_path: str | Path) -> Path:
    p = Path(pairs_path)
    return p.with_name(p.name[:-5] + ".key.json" if p.name.endswith(".json") else p.name + ".key.json")


def _read_json(path: Path, what: str, hint: str = "") -> Any:
    if not path.is_file():
        raise UserError(f"{what} not found{hint}", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not a JSON {what} ({e})", path=path) from e


def load_pairs(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    path = Path(path)
    doc = _read_json(path, "pairs file")
    if not isinstance(doc, dict) or doc.get("format") != PAIRS_FORMAT or not isinstance(doc.get("pairs"), list):
        raise UserError(f"not an arena pairs file (expected format {PAIRS_FORMAT!r})", path=path)
    for i, p in enumerate(doc["pairs"]):
        if not (isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("context"), list)
                and isinstance(p.get("a"), str) and isinstance(p.get("b"), str)):
            raise UserError(f"pair {i} needs 'id', 'context', 'a' and 'b'", path=path, field="pairs")
    if run_id(doc["pairs"]) != doc.get("run"):
        raise UserError("the pairs were edited (their run id does not match); make them again", path=path)
    return doc["pairs"], doc["run"]


def load_key(path: str | Path, run: str) -> dict[str, Any]:
    path = Path(path)
    key = _read_json(path, "key file", " (--key; written by --make beside the pairs)")
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise UserError(f"not an arena key file (expected format {KEY_FORMAT!r})", path=path)
    if key.get("run") != run:
        raise UserError(f"this key belongs to other pairs (run {key.get('run')}, the pairs are run {run})", path=path)
    return key


def write_pairs(path: str | Path, key_path: str | Path, pairs: list[dict[str, Any]], order: dict[str, str],
                systems: dict[str, Any], meta: dict[str, Any], overwrite: bool = False) -> str:
    from dialogpt_zh.fsutil import atomic_write_json

    for p in (Path(path), Path(key_path)):
        if p.exists() and not overwrite:
            raise UserError("exists; pass --overwrite to replace it", path=p)
    run = run_id(pairs)
    atomic_write_json(key_path, {"format": KEY_FORMAT, "run": run, "systems": systems, "order": order})
    atomic_write_json(path, {"format": PAIRS_FORMAT, "version": 1, "run": run, "created": utc_now(),
                             **meta, "pairs": pairs})
    return run


# ------------------------------------------------------------------------------------------- verdicts

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
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 ({e.reason})", path=path, line=lineno) from e
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
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
            if pid not in ids:
                raise UserError(f"unknown pair id {pid!r}", path=path, line=lineno)
            verdict = VERDICTS.get(str(answer).lower()) if isinstance(answer, str) else None
            if verdict is None:
                raise UserError(f"verdict must be a, b, = or s, got {answer!r}", path=path, line=lineno)
            if pid in verdicts:
                counts["verdicts_replaced"] += 1
            verdicts[pid] = verdict
    return verdicts, counts


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (None for n = 0)."""
    if n == 0:
        return None
    p = wins / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def tally(verdicts: dict[str, str], order: dict[str, str], total: int) -> dict[str, Any]:
    """Verdicts (display positions) -> wins per system via the key, with the 95 % interval for A."""
    t = Counter()
    for pid, v in verdicts.items():
        if v in ("a", "b"):
            t["A_wins" if order[pid][0 if v == "a" else 1] == "A" else "B_wins"] += 1
        else:
            t["ties" if v == "=" else "skipped"] += 1
    decided = t["A_wins"] + t["B_wins"]
    ci = wilson_interval(t["A_wins"], decided)
    return {"pairs": total, "judged": len(verdicts), "not_judged": total - len(verdicts),
            "A_wins": t["A_wins"], "B_wins": t["B_wins"], "ties": t["ties"], "skipped": t["skipped"],
            "decided": decided, "A_preference": round(t["A_wins"] / decided, 4) if decided else None,
            "A_preference_ci95": [round(ci[0], 4), round(ci[1], 4)] if ci else None}


def format_tally(result: dict[str, Any], systems: dict[str, Any] | None = None) -> str:
    def name(s):
        if not systems:
            return s
        d = systems[s]
        extra = " ".join(f"{k}={v}" for k, v in d["settings"].items())
        return f"{s} ({d['model']}{' ' + extra if extra else ''})"

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
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- judging

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
    print("answer a or b (the better reply), = (as good), s (skip), q (stop; rerun to resume)", file=out)
    try:
        for pair in todo:
            show_pair(pair, len(done) + 1, len(pairs), out)
            while True:
                if interactive:
                    try:
                        answer = input("verdict [a/b/=/s/q]: ").strip().lower()
                    except EOFError:
                        return done
                else:
                    line = stdin.readline()
                    if not line:
                        return done
                    answer = line.strip().lower()
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


# ---------------------------------------------------------------------------------------------- CLI

def _generate(args: ArenaArgs) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any], dict[str, Any]]:
    settings = {"A": parse_settings(args.a_set, "a_set"), "B": parse_settings(args.b_set, "b_set")}
    contexts = draw_contexts(args.data, args.pairs, args.seed, args.format, args.split)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bots = load_bots({"A": args.a, "B": args.b}, args.device, args.threads)
    pairs, order = make_pairs(contexts, bots, settings, args.seed, args.progress)
    systems = {s: describe_system(bots[s], getattr(args, s.lower()), settings[s]) for s in ("A", "B")}
    meta = {"data": list(args.data), "split": args.split, "seed": args.seed,
            "sources": [c["where"] for c in contexts]}
    return pairs, order, systems, meta


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    parser = make_parser([ArenaArgs], prog="python -m dialogpt_zh.arena",
                         description=__doc__.split("\n\n")[0], examples=EXAMPLES)

    def body() -> int:
        (args,) = parse(parser, argv)
        out = stdout or sys.stdout
        modes = [m for m in ("make", "judge", "score") if getattr(args, m)]
        if len(modes) > 1:
            raise UserError(f"choose one of --make, --judge, --score (got {', '.join(modes)})", field=modes[1])
        if args.score:
            if len(args.score) != 2:
                raise UserError("expects two files: PAIRS.json VERDICTS", field="score")
            pairs, run = load_pairs(args.score[0])
            key = load_key(args.key or default_key_path(args.score[0]), run)
            verdicts, counts = read_verdicts(args.score[1], [p["id"] for p in pairs])
            result = tally(verdicts, key["order"], len(pairs))
            print(format_tally(result, key["systems"]), file=out)
            if counts["verdicts_replaced"]:
                print(f"({counts['verdicts_replaced']} verdicts were given again; the last one counts)", file=out)
            return 0
        if args.make:
            key_path = args.key or default_key_path(args.make)
            for p in (Path(args.make), Path(key_path)):  # fail before the slow part
                if p.exists() and not args.overwrite:
                    raise UserError("exists; pass --overwrite to replace it", path=p)
            pairs, order, systems, meta = _generate(args)
            write_pairs(args.make, key_path, pairs, order, systems, meta, args.overwrite)
            print(f"wrote {len(pairs)} blinded pairs to {args.make} and the key to {key_path} "
                  f"(keep the key from the judge)", file=out)
            return 0
        if not args.verdicts:
            raise UserError("--verdicts FILE is needed to keep the verdicts (they are appended as you go)",
                            field="verdicts")
        if args.judge:
            pairs, run = load_pairs(args.judge)
            key_path = Path(args.key or default_key_path(args.judge))
            key = load_key(key_path, run) if key_path.is_file() else None
        else:
            pairs, order, systems, _ = _generate(args)
            run = run_id(pairs)
            key = {"order": order, "systems": systems}
        verdicts = judge(pairs, run, args.verdicts, stdin or sys.stdin, out)
        print("", file=out)
        if key is None:
            print(f"{len(verdicts)} of {len(pairs)} pairs judged; score them with --score {args.judge} "
                  f"{args.verdicts}", file=out)
        else:
            print(format_tally(tally(verdicts, key["order"], len(pairs)), key["systems"]), file=out)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
