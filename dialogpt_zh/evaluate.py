"""Batch evaluation on held-out dialogues: a thin face over the reply engine (no sampling or scoring here).

    held-out files --(readers + cleaning, as the preprocessor)--> sessions --> cases (context, reference)
      -> PPL of the references           (ChatBot.forward_logprobs)
      -> decoders plain / mmi / greedy   (ChatBot.reply, same case seed for each)
         + retrieval / hybrid            (the bot's index: the most similar human reply; sampled + retrieved
                                          candidates MMI-ranked, --retrieval_candidates K; docs/retrieval.md)
      -> response selection R10@k, MRR   (ChatBot.rerank of the true reply + 9 replies of other sessions)
      -> metrics (dialogpt_zh.judging.metrics) -> report.json, report.md, samples.jsonl (written when complete)
         + report.run.json: every setting of the run, flat; `--config report.run.json` replays it

A case is a reply turn of a session (every turn after the first, or only the last with --last_turn_only):
the turns before it are the context (the engine bounds it exactly as in chat: max_history, max_context_tokens),
the turn itself is the reference. See docs/evaluation.md for the metric definitions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dialogpt_zh.cli import config_path, make_parser, parse, run_main
from dialogpt_zh.errors import UserError
from dialogpt_zh.judging import metrics
from dialogpt_zh.judging.heldout import case_seed, split_wanted
from dialogpt_zh.judging.report import (
    SELECTION_CANDIDATES,
    Plan,
    Tally,
    _round,
    decoding_report,
    markdown_report,
    selection_report,
)
from dialogpt_zh.settings import BotArguments, GenerationSettings, MMISettings, check_seed, field_help

log = logging.getLogger("dialogpt_zh.evaluate")

DECODERS = ("plain", "mmi", "greedy", "retrieval", "hybrid")
RETRIEVAL_DECODERS = ("retrieval", "hybrid")  # need the bot's retrieval index

EXAMPLES = """
  python -m dialogpt_zh.evaluate --data ../shared/corpus/lccc-sample/toy_data.json --output runs/eval/report.json
  python -m dialogpt_zh.evaluate --data ../shared/corpus/kdconv/film/test.json --model checkpoints/default \\
      --limit 200 --last_turn_only --markdown runs/eval/report.md --samples runs/eval/samples.jsonl
  python -m dialogpt_zh.evaluate --data heldout.json --model runs/mybot --decoders plain,mmi,greedy \\
      --num_candidates 20 --top_p 0.9 --backward_weight 1.5 --seed 1 --output report.json
  python -m dialogpt_zh.evaluate --data heldout.json --decoders none --sweep --output sweep.json  # MMI weights
  python -m dialogpt_zh.evaluate --data ../shared/corpus/lccc-sample/toy_data.json --model /tmp/bot \
      --decoders mmi,retrieval,hybrid --retrieval_candidates 10 --output runs/eval/hybrid.json   # needs BOT/retrieval
  python -m dialogpt_zh.evaluate --config runs/eval/report.run.json --output runs/eval2/report.json  # replay
"""


@dataclass
class EvalArgs:
    data: list[str] = field(default_factory=list, metadata=field_help(
        "held-out corpus files or directories, in any format the preprocessor reads"))
    output: str = field(default="", metadata=field_help(
        "report.json to write (required); every setting of the run is written beside it as report.run.json "
        "(REPORT.json -> REPORT.run.json), which --config replays"))
    format: str = field(default="auto", metadata=field_help(
        "corpus format of --data (auto, chitchat, tsv, lccc-json, kdconv-json, chat-json, chat-jsonl, "
        "chatterbot-yaml, conv; also .gz or in .zip)"))
    split: str = field(default="auto", metadata=field_help(
        "which sessions to use by their split (JSON split key or file name): 'auto' = everything except "
        "'train', 'all', or a comma list such as 'valid,test'"))
    limit: int = field(default=0, metadata=field_help("evaluate only the first N sessions (0 = all)"))
    seed: int = field(default=0, metadata=field_help(
        "seed of everything random (case i is sampled with a seed derived from (seed, i)); same seed, same report"))
    last_turn_only: bool = field(default=False, metadata=field_help(
        "one case per session (its last turn) instead of every turn after the first"))
    decoders: str = field(default="plain,mmi", metadata=field_help(
        "comma list of decoders to run: plain (1 sample), mmi (N candidates reranked), greedy, retrieval (the "
        "most similar human reply of the bot's index), hybrid (N sampled + --retrieval_candidates K retrieved, "
        "MMI-ranked); 'none' = skip"))
    selection: bool = field(default=True, metadata=field_help(
        "run the response-selection task (--no_selection to skip)"))
    sweep: bool = field(default=False, metadata=field_help(
        "also report R10@1 of the selection task for a grid of MMI weights (cheap: reuses the scores)"))
    samples: str | None = field(default=None, metadata=field_help(
        "samples.jsonl to write: context, reference, each decoder's output and candidates"))
    markdown: str | None = field(default=None, metadata=field_help("report.md to write (tables for humans)"))
    progress: bool = field(default=True, metadata=field_help("show a progress bar (--no_progress to hide)"))

    def __post_init__(self) -> None:
        """Refuse a bad setting when the arguments are made (flags, --config or Python), naming it. Whether
        the files exist and may be written is checked when the evaluation starts (`check_outputs`)."""
        if isinstance(self.data, str):
            self.data = [self.data]
        parse_decoders(self.decoders)
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise UserError(f"must be >= 0, got {self.limit}", field="limit")
        check_seed(self.seed, "seed")


@dataclass
class Case:
    index: int
    session: int                   # index into the evaluated sessions
    turn: int                      # index of the reference turn in its session
    context: list[str]
    reference: str
    source: str
    path: str
    line: int


# ------------------------------------------------------------------------------------------------ input

def parse_decoders(spec: str) -> list[str]:
    names = [d.strip() for d in spec.split(",") if d.strip()]
    if names == ["none"]:
        return []
    unknown = [d for d in names if d not in DECODERS]
    if unknown or not names:
        raise UserError(f"unknown decoder(s) {unknown or [spec]}; choose from {list(DECODERS)} or 'none'",
                        field="decoders")
    return list(dict.fromkeys(names))


def load_sessions(args: EvalArgs, counts: Counter) -> list[Any]:
    """Cleaned sessions of --data (the preprocessor's readers and cleaning), filtered by split, limited."""
    from dialogpt_zh.data.readers import iter_clean_sessions

    if not args.data:
        raise UserError("give at least one held-out file or directory", field="data")
    sessions = []
    for s in iter_clean_sessions(args.data, fmt=args.format, counters=counts):
        if not split_wanted(s.split, args.split):
            counts[f"session_not_in_split ({s.split})"] += 1
            continue
        sessions.append(s)
        if args.limit and len(sessions) >= args.limit:
            counts["reading_stopped_at_limit"] = 1  # the rest of --data was not read
            break
    if not sessions:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing read"
        other = sorted(k[len("session_not_in_split ("):-1] for k in counts if k.startswith("session_not_in_split ("))
        hint = (f" (--split {args.split} matched none; the sessions read are in split(s) {', '.join(other)}: "
                f"pass --split {','.join(other)}, or --split all)") if other else ""
        raise UserError(f"no usable multi-turn session in {', '.join(args.data)} ({why}){hint}", field="data")
    return sessions


def build_cases(sessions: Sequence[Any], last_turn_only: bool) -> list[Case]:
    cases: list[Case] = []
    for si, s in enumerate(sessions):
        turns = range(len(s.turns) - 1, len(s.turns)) if last_turn_only else range(1, len(s.turns))
        for t in turns:
            cases.append(Case(len(cases), si, t, list(s.turns[:t]), s.turns[t], s.source, s.path, s.line))
    return cases


def draw_distractors(cases: Sequence[Case], sessions: Sequence[Any], seed: int,
                     k: int = SELECTION_CANDIDATES - 1) -> list[list[str] | None]:
    """For each case, k distinct replies from OTHER sessions, none equal to the reference (None: too few).

    Drawn uniformly from all turns of the evaluated sessions with a generator seeded by `seed`.
    """
    pool_text: list[str] = []
    pool_session: list[int] = []
    for si, s in enumerate(sessions):
        for t in s.turns:
            pool_text.append(t)
            pool_session.append(si)
    pool_session_arr = np.asarray(pool_session)
    rng = np.random.default_rng([seed, 7])
    out: list[list[str] | None] = []
    for case in cases:
        chosen: list[str] = []
        seen = {case.reference}
        for _ in range(20 * k):                       # rejection sampling: almost always done in k draws
            j = int(rng.integers(len(pool_text)))
            if pool_session[j] != case.session and pool_text[j] not in seen:
                chosen.append(pool_text[j])
                seen.add(pool_text[j])
                if len(chosen) == k:
                    break
        if len(chosen) < k:                           # tiny or repetitive data: scan everything, in random order
            for j in rng.permutation(np.nonzero(pool_session_arr != case.session)[0]):
                if pool_text[j] not in seen:
                    chosen.append(pool_text[j])
                    seen.add(pool_text[j])
                    if len(chosen) == k:
                        break
        out.append(chosen if len(chosen) == k else None)
    return out


# ------------------------------------------------------------------------------------------- the run


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("dialogpt_zh", "torch", "transformers", "sacrebleu", "jieba"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def evaluate(args: EvalArgs, generation: GenerationSettings | None = None, mmi: MMISettings | None = None,
             bot=None, write: bool = True, bot_args: BotArguments | None = None,
             config_file: str | None = None) -> dict[str, Any]:
    """Run the whole evaluation and return the report dict; with `write`, write the files named in `args`
    (report, samples, markdown) and the run config beside the report (`run_config_path`) once everything
    is computed (their paths are checked first). `generation` / `mmi`: the settings to evaluate (default:
    `bot`'s own, else the defaults); `bot`: a loaded ChatBot to reuse, never modified; `config_file`: the
    --config file the settings came from (an input: never written over)."""
    if write:
        check_outputs(args, config_file, bot, bot_args)
    generation, mmi = evaluated_settings(generation, mmi, bot)
    report, samples = run_evaluation(args, generation, mmi, bot, bot_args)
    if write:
        bot_args = bot_args or (bot_arguments_of(bot) if bot is not None else BotArguments())
        write_outputs(report, samples, args, run_config(bot_args, args, generation, mmi))
    return report


def run_config_path(output: str | Path) -> Path:
    """Where the run config of the report `output` goes: report.json -> report.run.json (else NAME.run.json)."""
    output = Path(output)
    return output.with_name((output.stem if output.suffix == ".json" else output.name) + ".run.json")


def run_config(bot_args: BotArguments, args: EvalArgs, generation: GenerationSettings,
               mmi: MMISettings) -> dict[str, Any]:
    """Every setting of the run, flat, named as its flag: `--config` parses it back to the same dataclasses."""
    return {**asdict(bot_args), **asdict(args), **asdict(generation), **asdict(mmi)}


def bot_arguments_of(bot) -> BotArguments:
    """The BotArguments that load this bot's models (for a caller that passed a bot, not its arguments;
    threads are not recorded by the bot: their default)."""
    backward = str(bot.backward_dir) if bot.backward_dir else None
    return BotArguments(model=str(bot.forward_dir) if bot.forward_dir else None,
                        backward=backward if bot.forward_dir else None, device=str(bot.device),
                        quantize=bot.quantize)


def evaluated_settings(generation: GenerationSettings | None, mmi: MMISettings | None,
                       bot=None) -> tuple[GenerationSettings, MMISettings]:
    """The caller's settings, else the given bot's own, else the defaults (the bot itself is never changed)."""
    generation = generation if generation is not None else bot.generation if bot is not None else GenerationSettings()
    mmi = mmi if mmi is not None else bot.mmi_settings if bot is not None else MMISettings()
    return generation, mmi


def decoder_counts(bot, generation: GenerationSettings, mmi: MMISettings, decoders: list[str]) -> dict[str, int]:
    """The candidate counts the mmi decoder (sampled) and the hybrid (sampled + retrieved) ran with, "auto" resolved
    for this bot."""
    counts = {"num_candidates_mmi": bot.settings(generation, mmi, **DECODER_OVERRIDES["mmi"])[0].num_candidates}
    if "hybrid" in decoders:
        gen = bot.settings(generation, mmi, **DECODER_OVERRIDES["hybrid"])[0]
        counts.update(num_candidates_hybrid=gen.num_candidates, retrieval_candidates_hybrid=gen.retrieval_candidates)
    return counts


def check_outputs(args: EvalArgs, config_file: str | None = None, bot=None,
                  bot_args: BotArguments | None = None) -> None:
    """Every output (the run config beside the report included) is writable, distinct, and not one of the
    inputs (--data, the --config file, the bot's directories): found before the evaluation runs."""
    from dialogpt_zh.engine.loading import bot_input_dirs
    from dialogpt_zh.fsutil import check_output_file

    if not args.output:
        raise UserError("give the report path (--output report.json)", field="output")
    if bot is not None:   # a loaded bot: its model directories and its index
        bot_dirs = [d for d in (bot.forward_dir, bot.backward_dir,
                                getattr(bot.retrieval, "directory", None)) if d is not None]
    else:
        bot_dirs = bot_input_dirs(*((bot_args.model, bot_args.backward) if bot_args else (None, None)))
    inputs = [*args.data, *([config_file] if config_file else []), *bot_dirs]
    seen: dict[Path, str] = {}
    outputs = [(f"--{name}", name, getattr(args, name)) for name in ("output", "samples", "markdown")]
    outputs.append(("the run config of --output", "output", run_config_path(args.output)))
    for label, name, path in outputs:
        if not path:
            continue
        resolved = check_output_file(path, field=name, inputs=inputs).resolve()
        if resolved in seen:
            raise UserError(f"the same file as {seen[resolved]}", path=path, field=name)
        seen[resolved] = label


# Per decoder: the settings it changes for its calls (the rest are the evaluated settings). Only hybrid
# (and retrieval, which asks the index alone) use --retrieval_candidates; the others stay sampled only.
DECODER_OVERRIDES = {
    "plain": dict(num_candidates=1, use_mmi=False, retrieval_candidates=0),
    "mmi": dict(use_mmi=True, retrieval_candidates=0),
    "greedy": dict(num_candidates=1, temperature=0.0, use_mmi=False, retrieval_candidates=0),
    "retrieval": dict(retrieval_candidates=1),
    "hybrid": dict(use_mmi=True),
}


def plan_run(args: EvalArgs, decoders: list[str], bot, mmi: MMISettings,
             bot_args: BotArguments | None) -> Plan:
    if bot.backward_model is None:
        why = (f"no backward model ({(bot_args and bot_args.model) or 'the model'} has no backward/ directory); "
               f"MMI decoding and backward/MMI selection need one")
    elif not bot.mmi_active(mmi):
        why = "MMI switched off (--no_use_mmi)"
    else:
        why = ""
    absent: dict[str, str] = {}
    if bot.retrieval is None:
        for name in RETRIEVAL_DECODERS:
            if name in decoders:
                absent[f"decoding.{name}"] = (f"no retrieval index ({(bot_args and bot_args.model) or 'the bot'} "
                                              f"has no retrieval/; build one with python -m dialogpt_zh.index)")
        decoders = [d for d in decoders if d not in RETRIEVAL_DECODERS]
    if why:
        for name in ("mmi", "hybrid"):
            if name in decoders:
                absent[f"decoding.{name}"] = why
        if args.selection:
            absent["selection.backward"] = absent["selection.mmi"] = why
        if args.sweep:
            absent["sweep"] = why
    return Plan(decoders=[d for d in decoders if d not in ("mmi", "hybrid") or not why], selection=args.selection,
                sweep=args.sweep and not why, mmi=not why, absent=absent)


def evaluate_case(bot, case: Case, distractors: list[str] | None, plan: Plan, generation: GenerationSettings,
                  mmi: MMISettings, seed: int, tally: Tally) -> dict[str, Any]:
    """Reference log-prob, each decoder's reply, and the selection scores of one case; returns its sample."""
    sample: dict[str, Any] = {"case": case.index, "source": case.source, "path": case.path, "line": case.line,
                              "turn": case.turn, "seed": seed, "context": case.context,
                              "reference": case.reference, "outputs": {}, "candidates": {}}
    t = time.perf_counter()
    (lp, n), = bot.forward_logprobs(case.context, [case.reference], generation=generation)
    tally.ref_logprobs.append(lp)
    tally.ref_tokens.append(n)
    sample["reference_logprob"], sample["reference_tokens"] = lp, n
    tally.seconds["ppl"] += time.perf_counter() - t

    for name in plan.decoders:
        t = time.perf_counter()
        if name == "retrieval":
            hits = bot.retrieve(case.context, generation=generation, **DECODER_OVERRIDES[name])
            text, source = (hits[0].text, "retrieved") if hits else ("", "none")
        else:
            reply = bot.reply(case.context, seed=seed, generation=generation, mmi=mmi, **DECODER_OVERRIDES[name])
            text, source = reply.text, reply.candidates[0].source if reply.candidates else "none"
            sample["model_context"] = reply.context
        tally.seconds[name] += time.perf_counter() - t
        tally.outputs.setdefault(name, []).append(text)
        tally.empty[name] += not text
        tally.sources.setdefault(name, Counter())[source] += 1
        if plan.train_replies is not None:
            tally.verbatim[name] += text in plan.train_replies
        sample["outputs"][name] = text
        if name in ("mmi", "hybrid"):
            sample["candidates"][name] = [
                {"text": c.text, "rank": c.rank, "score": c.score, "forward_logprob": c.forward_logprob,
                 "backward_logprob": c.backward_logprob, "num_tokens": c.num_tokens, "count": c.count,
                 "source": c.source, "similarity": c.similarity}
                for c in reply.candidates]

    if distractors is not None:
        t = time.perf_counter()
        texts = [case.reference] + distractors
        ranked = bot.rerank(case.context, texts, generation=generation, mmi=mmi, use_mmi=plan.mmi,
                            retrieval_candidates=0)
        tally.seconds["selection"] += time.perf_counter() - t
        by_text = {c.text: c for c in ranked}
        row = [by_text[x] for x in texts]          # back to the drawn order: column 0 = the true reply
        arr = {
            "fwd": np.array([c.forward_logprob for c in row], dtype=np.float64),
            "bwd": np.array([c.backward_logprob if c.backward_logprob is not None else np.nan for c in row]),
            "n": np.array([c.num_tokens for c in row], dtype=np.float64),
            "nctx": np.array([c.num_context_tokens for c in row], dtype=np.float64),
            "engine": np.array([c.score for c in row], dtype=np.float64),
        }
        tally.selection_rows.append(arr)
        sample["selection"] = {"candidates": texts, "true_rank_mmi" if plan.mmi else "true_rank_forward":
                               int(metrics.true_reply_ranks(arr["engine"][None])[0])}
    return sample


def run_evaluation(args: EvalArgs, generation: GenerationSettings | None = None, mmi: MMISettings | None = None,
                   bot=None, bot_args: BotArguments | None = None) -> tuple[dict[str, Any], list[dict]]:
    """The evaluation itself, nothing written: read -> cases -> per-case pass -> aggregate -> (report, samples)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    generation, mmi = evaluated_settings(generation, mmi, bot)
    decoders = parse_decoders(args.decoders)
    if "hybrid" in decoders and not generation.retrieval_candidates:
        raise UserError("the hybrid decoder ranks --retrieval_candidates K retrieved replies with the sampled ones: "
                        "give K > 0 (e.g. --retrieval_candidates 10)", field="retrieval_candidates")

    counts: Counter = Counter()
    sessions = load_sessions(args, counts)
    cases = build_cases(sessions, args.last_turn_only)

    t_load = time.perf_counter()
    if bot is None:
        from dialogpt_zh.engine.bot import load_bot

        # the bot's defaults without retrieval: only the hybrid decoder asks for it (per call), and a bot
        # without an index then reports it absent instead of refusing to load
        bot = load_bot(bot_args or BotArguments(), dataclasses.replace(generation, retrieval_candidates=0), mmi)
    load_s = time.perf_counter() - t_load
    plan = plan_run(args, decoders, bot, mmi, bot_args)
    if bot.retrieval is not None and plan.decoders:  # "is this reply a verbatim training utterance"
        plan.train_replies = bot.retrieval.reply_texts()
    distractors = draw_distractors(cases, sessions, args.seed) if plan.selection else [None] * len(cases)

    tally = Tally()
    samples = []
    t_loop = time.perf_counter()
    for case in tqdm(cases, desc="evaluating", unit="case", disable=not args.progress, dynamic_ncols=True):
        samples.append(evaluate_case(bot, case, distractors[case.index], plan, generation, mmi,
                                     case_seed(args.seed, case.index), tally))
    loop_s = time.perf_counter() - t_loop

    selection, sweep = selection_report(tally, plan, mmi)
    skipped_selection = sum(d is None for d in distractors) if plan.selection else 0
    report: dict[str, Any] = {
        "cases": len(cases),
        "sessions": len(sessions),
        "ppl": metrics.perplexity(tally.ref_logprobs, tally.ref_tokens),
        "reference_tokens": int(sum(tally.ref_tokens)),
        "decoding": decoding_report(tally, [c.reference for c in cases], plan),
        "selection": selection,
        "absent": plan.absent,
        "skipped": {
            "reading_and_cleaning": dict(sorted(counts.items())),
            "selection_cases": ({"fewer than 9 distinct replies in other sessions": skipped_selection}
                                if skipped_selection else {}),
        },
        "notices": list(bot.notices),
        "timing": {"wall_s": time.perf_counter() - t_start, "model_load_s": load_s, "cases_loop_s": loop_s,
                   "cases_per_s": len(cases) / loop_s if loop_s > 0 else 0.0, "ppl_s": tally.seconds["ppl"],
                   **{f"{k}_s": v for k, v in tally.seconds.items() if k != "ppl"}},
        "settings": {
            "bot": asdict(bot_args) if bot_args else None,
            "eval": {**asdict(args), **decoder_counts(bot, generation, mmi, plan.decoders),
                     "decoders_run": plan.decoders,
                     "selection_candidates": SELECTION_CANDIDATES},
            "generation": asdict(generation),
            "mmi": asdict(mmi),
            "decoder_overrides": {d: DECODER_OVERRIDES[d] for d in plan.decoders},
            "model": {"forward": str(bot.forward_dir) if bot.forward_dir else None,
                      "backward": str(bot.backward_dir) if bot.backward_dir and plan.mmi else None,
                      "retrieval": retrieval_info(bot)},
            "versions": _versions(),
            "command": ["python", "-m", "dialogpt_zh.evaluate", *sys.argv[1:]],
        },
    }
    if sweep is not None:
        report["sweep"] = sweep
    return _round(report, 6), samples


def retrieval_info(bot) -> dict[str, Any] | None:
    """What the report says about the bot's index: where, how many pairs, from which sources."""
    index = getattr(bot, "retrieval", None)
    if index is None:
        return None
    return {"path": str(index.directory), "pairs": index.size, "settings": index.settings,
            "sources": [{k: s.get(k) for k in ("name", "pairs", "licence")} for s in index.card["sources"]]}


# ------------------------------------------------------------------------------------------ outputs


def write_outputs(report: dict[str, Any], samples: Sequence[dict[str, Any]], args: EvalArgs,
                  config: dict[str, Any] | None = None) -> None:
    """Write samples, markdown, the run `config` (beside the report) and the report: all to temp files
    first, then renamed into place together, so an interrupted run leaves the previous outputs as they were
    and no temp files."""
    from dialogpt_zh.fsutil import atomic_write_many

    files = {args.output: json.dumps(report, ensure_ascii=False, indent=2) + "\n"}
    if config is not None:
        files[run_config_path(args.output)] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    if args.samples:
        files[args.samples] = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    if args.markdown:
        files[args.markdown] = markdown_report(report)
    atomic_write_many({path: text.encode("utf-8") for path, text in files.items()})


# --------------------------------------------------------------------------------------------- CLI

def build_parser():
    return make_parser([BotArguments, EvalArgs, GenerationSettings, MMISettings], prog="python -m dialogpt_zh.evaluate",
                       description=__doc__.split("\n\n")[0] + "\n\nMetric definitions: docs/evaluation.md.",
                       examples=EXAMPLES)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        if any(a == "--candidates" or a.startswith("--candidates=") for a in argv or sys.argv[1:]):
            raise UserError("--candidates is now --num_candidates (one name in every tool)", field="candidates")
        bot_args, args, generation, mmi = parse(build_parser(), argv)
        config_file = config_path(sys.argv[1:] if argv is None else argv)
        report = evaluate(args, generation, mmi, bot_args=bot_args, config_file=config_file)
        print(markdown_report(report))
        print(f"wrote {args.output}, {run_config_path(args.output)}" + (f", {args.markdown}" if args.markdown else "")
              + (f", {args.samples}" if args.samples else ""), file=sys.stderr)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
