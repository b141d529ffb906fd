"""Command: the blind arena (`python -m dialogpt_zh.arena --help`). The pairs, key, verdicts and tally are
in `dialogpt_zh.judging.arena`; this module loads the bots and parses the command line."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from dialogpt_zh.cli import field_help, make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.fsutil import refuse_inputs, repeated_file
from dialogpt_zh.judging.arena import (
    default_key_path,
    draw_contexts,
    format_tally,
    judge,
    load_key,
    load_pairs,
    majority_verdicts,
    make_pairs,
    read_verdicts,
    run_id,
    tally,
    write_pairs,
)
from dialogpt_zh.judging.feedback import model_id
from dialogpt_zh.settings import check_seed

EXAMPLES = """
  # judge in the terminal: the default bot (MMI) against the same bot with one plain sample
  python -m dialogpt_zh.arena --data ../shared/corpus/lccc-sample/toy_data.json --split valid \\
      --a checkpoints/default --b checkpoints/default --b_set num_candidates=1 use_mmi=false \\
      --verdicts runs/arena/verdicts.jsonl            # rerun the same command to resume
  # offline: write blinded pairs (+ PAIRS.key.json), let a judge answer, then score
  python -m dialogpt_zh.arena --data heldout.txt --b runs/mybot --make runs/arena/pairs.json
  python -m dialogpt_zh.arena --judge runs/arena/pairs.json --verdicts runs/arena/judge1.jsonl
  python -m dialogpt_zh.arena --score runs/arena/pairs.json runs/arena/judge1.jsonl
  python -m dialogpt_zh.arena --score runs/arena/pairs.json judge1.jsonl judge2.txt judge3.txt   # a panel
  # GPT2-chitchat's dialogue model reranked by its own MMI model, against the default bot
  python -m dialogpt_zh.arena --data heldout.txt --a models/gpt2-chitchat/dialogue_model \\
      --a_backward models/gpt2-chitchat/mmi_model --make runs/arena/chitchat.json
  # hybrid (10 sampled + 10 retrieved human replies, MMI-ranked) against sampled only; the key and the
  # score say which replies were retrieved
  python -m dialogpt_zh.arena --data ../shared/corpus/lccc-sample/toy_data.json --split valid --a /tmp/bot \
      --a_set retrieval_candidates=10 --b /tmp/bot --make runs/arena/hybrid.json
"""


@dataclass
class ArenaArgs:
    a: str | None = field(default=None, metadata=field_help(
        "bot A: a bot directory (forward/ + backward/) or a forward model directory; default checkpoints/default"))
    b: str | None = field(default=None, metadata=field_help("bot B (as --a); default checkpoints/default"))
    a_backward: str | None = field(default=None, metadata=field_help(
        "backward (MMI) model of A when --a is one forward model directory, e.g. GPT2-chitchat's mmi_model beside "
        "its dialogue_model; any backward model of the same vocabulary"))
    b_backward: str | None = field(default=None, metadata=field_help("backward model of B (as --a_backward)"))
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
        "PAIRS.json VERDICTS [VERDICTS ...]: score a judge's verdicts with the key; with several judges' files "
        "(the same pairs), each judge's tally and the majority's"))
    key: str | None = field(default=None, metadata=field_help("key file (default: PAIRS.key.json beside PAIRS)"))
    overwrite: bool = field(default=False, metadata=field_help("--make: replace existing pairs/key files"))
    device: str = field(default="cpu", metadata=field_help("torch device for the models"))
    threads: int = field(default=0, metadata=field_help(
        "intra-op CPU threads per reply: 0 = the thread policy (auto), N = always N (as --threads of interact)"))
    progress: bool = field(default=True, metadata=field_help("show a progress bar while generating"))

    def __post_init__(self) -> None:
        """Refuse settings that cannot go together, and bad --a_set / --b_set, when the arguments are made."""
        modes = [m for m in ("make", "judge", "score") if getattr(self, m)]
        if len(modes) > 1:
            raise UserError(f"choose one of --make, --judge, --score (got {', '.join(modes)})", field=modes[1])
        if self.score and len(self.score) < 2:
            raise UserError("expects PAIRS.json and one or more VERDICTS files", field="score")
        twice = repeated_file(self.score[1:])  # one judge's file twice would be two votes of the panel
        if twice:
            raise UserError(f"the verdicts file {twice[0]} is given twice (as {twice[1]}); each judge's file counts "
                            "once", field="score")
        if not self.make and not self.score and not self.verdicts:
            raise UserError("--verdicts FILE is needed to keep the verdicts (they are appended as you go)",
                            field="verdicts")
        for side in ("a", "b"):
            if getattr(self, f"{side}_backward") and not getattr(self, side):
                raise UserError(f"--{side}_backward needs --{side} (the forward model directory)",
                                field=f"{side}_backward")
        parse_settings(self.a_set, "a_set")
        parse_settings(self.b_set, "b_set")
        check_seed(self.seed, "seed")


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


# ---------------------------------------------------------------------------------------------- pairs


def load_bots(specs: dict[str, tuple[str | None, str | None]], device: str = "cpu", threads: int = 0
              ) -> dict[str, Any]:
    """One ChatBot per distinct (model, backward) pair (A and B may share one; their settings are per-call
    overrides), loaded the way every face loads its bot (engine.load_bot). `specs`: name -> (--a, --a_backward)."""
    from dialogpt_zh.engine.bot import load_bot
    from dialogpt_zh.engine.loading import default_bot_dir
    from dialogpt_zh.settings import BotArguments

    loaded: dict[tuple[str, str | None], Any] = {}
    bots = {}
    for name, (path, backward) in specs.items():
        key = (str(Path(path or default_bot_dir()).resolve()), str(Path(backward).resolve()) if backward else None)
        if key not in loaded:
            loaded[key] = load_bot(BotArguments(model=path, backward=backward, device=device, threads=threads))
        bots[name] = loaded[key]
    return bots


def describe_system(bot, path: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    from dialogpt_zh.engine.loading import default_bot_dir

    # the counts the replies were made with ("auto" resolved for this bot), which the settings given may not say
    gen = bot.settings(**settings)[0]
    return {"model": str(path or default_bot_dir()), "settings": settings,
            "candidates": {"sampled": gen.num_candidates, "retrieved": gen.retrieval_candidates},
            "forward": model_id(bot.forward_dir), "backward": model_id(bot.backward_dir)}


# ---------------------------------------------------------------------------------------------- CLI

def _generate(args: ArenaArgs) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any], dict[str, Any],
                                        dict[str, dict[str, str]]]:
    settings = {"A": parse_settings(args.a_set, "a_set"), "B": parse_settings(args.b_set, "b_set")}
    contexts = draw_contexts(args.data, args.pairs, args.seed, args.format, args.split)
    bots = load_bots({"A": (args.a, args.a_backward), "B": (args.b, args.b_backward)}, args.device, args.threads)
    for s in ("A", "B"):  # per-call settings: the engine would only add a notice to each reply, and the key would lie
        bots[s].require_index(settings[s].get("retrieval_candidates", 0), field=f"{s.lower()}_set")
    sources: dict[str, dict[str, str]] = {}
    pairs, order = make_pairs(contexts, bots, settings, args.seed, args.progress, sources)
    systems = {s: describe_system(bots[s], getattr(args, s.lower()), settings[s]) for s in ("A", "B")}
    meta = {"data": list(args.data), "split": args.split, "seed": args.seed,
            "sources": [c["where"] for c in contexts]}
    return pairs, order, systems, meta, sources


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    parser = make_parser([ArenaArgs], prog="python -m dialogpt_zh.arena",
                         description="The arena: a blind comparison of two bots (or one bot with two settings), "
                                     "judged by a person.", examples=EXAMPLES)

    def body() -> int:
        (args,) = parse(parser, argv)
        out = stdout or sys.stdout
        if args.score:
            pairs, run = load_pairs(args.score[0])
            key = load_key(args.key or default_key_path(args.score[0]), run, [p["id"] for p in pairs])
            judges = []
            for path in args.score[1:]:
                # a JSON verdict says its run: one made for other pairs with the same ids is refused
                verdicts, counts = read_verdicts(path, [p["id"] for p in pairs], run)
                judges.append(verdicts)
                if len(args.score) > 2:   # a panel: each judge's own tally first
                    r = tally(verdicts, key["order"], len(pairs))
                    share = f"{100 * r['A_preference']:.1f} %" if r["decided"] else "-"
                    print(f"{path}: A {r['A_wins']}, B {r['B_wins']}, ties {r['ties']}, not judged "
                          f"{r['not_judged'] + r['skipped']}; A preferred in {share} of decided pairs", file=out)
                if counts["verdicts_replaced"]:
                    print(f"({path}: {counts['verdicts_replaced']} verdicts were given again; the last one counts)",
                          file=out)
            if len(judges) > 1:
                print(f"the majority of the {len(judges)} judges (a side more than half of them chose, else a tie):",
                      file=out)
            verdicts = majority_verdicts(judges) if len(judges) > 1 else judges[0]
            result = tally(verdicts, key["order"], len(pairs), key.get("sources"))
            print(format_tally(result, key["systems"]), file=out)
            return 0
        if args.make or not (args.score or args.judge):   # files written next to bots being read
            from dialogpt_zh.engine.loading import bot_input_dirs, check_outputs_apart

            check_outputs_apart({"make": args.make, "key": args.key, "verdicts": args.verdicts},
                                [*bot_input_dirs(args.a, args.a_backward), *bot_input_dirs(args.b, args.b_backward),
                                 *map(Path, args.data)])
        if args.make:
            key_path = args.key or default_key_path(args.make)
            if Path(key_path).resolve() == Path(args.make).resolve():  # the pairs, written last, would replace it
                raise UserError(f"is the --make file {args.make}; give the key its own file", path=key_path,
                                field="key")
            for p in (Path(args.make), Path(key_path)):  # fail before the slow part
                if p.exists() and not args.overwrite:
                    raise UserError("exists; pass --overwrite to replace it", path=p)
            pairs, order, systems, meta, sources = _generate(args)
            write_pairs(args.make, key_path, pairs, order, systems, meta, args.overwrite, sources)
            print(f"wrote {len(pairs)} blinded pairs to {args.make} and the key to {key_path} "
                  f"(keep the key from the judge)", file=out)
            return 0
        if args.judge:
            pairs, run = load_pairs(args.judge)
            key_path = Path(args.key or default_key_path(args.judge))
            refuse_inputs(args.verdicts, "verdicts", [args.judge, key_path])  # verdict lines appended to them
            key = load_key(key_path, run, [p["id"] for p in pairs]) if key_path.is_file() else None
        else:
            pairs, order, systems, _, sources = _generate(args)
            run = run_id(pairs)
            key = {"order": order, "systems": systems, "sources": sources}
        verdicts = judge(pairs, run, args.verdicts, stdin or sys.stdin, out)
        print("", file=out)
        if key is None:
            print(f"{len(verdicts)} of {len(pairs)} pairs judged; score them with --score {args.judge} "
                  f"{args.verdicts}", file=out)
        else:
            print(format_tally(tally(verdicts, key["order"], len(pairs), key.get("sources")), key["systems"]),
                  file=out)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
