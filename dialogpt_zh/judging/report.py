"""The evaluation report: per-decoder metrics, the selection (R10@k, MRR) metrics, the MMI-weight sweep, and
the Markdown table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dialogpt_zh.judging import metrics
from dialogpt_zh.settings import MMISettings, mmi_score, ranking_weights

SWEEP_GRID = {
    "forward_weight": [0.0, 0.25, 0.5, 0.75, 1.0],
    "backward_weight": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
    # per-token scores are a few nats, summed ones tens: the length weight's useful range differs
    "length_weight": {"mean": [-0.05, 0.0, 0.02, 0.05, 0.1, 0.2], "sum": [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0]},
    "normalize": ["mean", "sum"],
}


def sweep_selection(fwd: np.ndarray, bwd: np.ndarray, num_tokens: np.ndarray, num_context_tokens: np.ndarray,
                    grid: dict = SWEEP_GRID) -> list[dict[str, Any]]:
    """R10@1 / R10@2 / MRR of the selection task for every weighting in `grid` (true reply in column 0).

    All arrays are [cases, 10]; every weighting is scored at once in numpy. Weightings whose score is the
    same for all candidates (all weights 0) are left out. Sorted best first (R10@1, then MRR).
    """
    rows: list[dict[str, Any]] = []
    for normalize in grid["normalize"]:
        combos = np.array([(f, b, n) for f in grid["forward_weight"] for b in grid["backward_weight"]
                           for n in grid["length_weight"][normalize] if (f, b, n) != (0.0, 0.0, 0.0)],
                          dtype=np.float64)
        if len(combos) == 0 or fwd.size == 0:
            continue
        w = combos[:, :, None, None]                    # [K, 3, 1, 1]
        scores = mmi_score(fwd[None], bwd[None], num_tokens[None], num_context_tokens[None],
                            w[:, 0], w[:, 1], w[:, 2], normalize)   # [K, cases, 10]
        by_k = metrics.rank_metrics(metrics.true_reply_ranks(scores))  # [K] each: the one ranking, NaN = worst
        for (f, b, n), a, c, m in zip(combos, by_k["r10@1"], by_k["r10@2"], by_k["mrr"]):
            rows.append({"normalize": normalize, "forward_weight": float(f), "backward_weight": float(b),
                         "length_weight": float(n), "r10@1": float(a), "r10@2": float(c), "mrr": float(m)})
    rows.sort(key=lambda r: (-r["r10@1"], -r["mrr"]))
    return rows


def _round(x: Any, nd: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, nd) for v in x]
    return x


@dataclass
class Tally:
    """What the per-case pass collects for the aggregate pass."""

    ref_logprobs: list[float] = field(default_factory=list)
    ref_tokens: list[int] = field(default_factory=list)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    empty: Counter = field(default_factory=Counter)
    selection_rows: list[dict[str, np.ndarray]] = field(default_factory=list)  # per case: fwd, bwd, n, nctx, engine
    seconds: Counter = field(default_factory=Counter)
    sources: dict[str, Counter] = field(default_factory=dict)  # per decoder: where its replies came from
    verbatim: Counter = field(default_factory=Counter)         # per decoder: replies equal to an index reply


def decoding_report(tally: Tally, references: list[str], plan: Plan) -> dict[str, Any]:
    decoding = {}
    for name in plan.decoders:
        m = metrics.generation_metrics(tally.outputs.get(name, []), references)
        m["empty_replies"] = tally.empty[name]
        m["seconds"] = tally.seconds[name]
        n = len(tally.outputs.get(name, []))
        sources = tally.sources.get(name, Counter())
        m["reply_sources"] = dict(sorted(sources.items()))
        # share of replies (in %) whose chosen candidate came from the index (also when it was sampled too)
        m["retrieved_pct"] = 100.0 * sum(v for k, v in sources.items() if "retrieved" in k) / n if n else None
        # share of replies (in %) that are verbatim a reply of the index (a training utterance)
        m["verbatim_train_pct"] = (100.0 * tally.verbatim[name] / n if n and plan.train_replies is not None
                                   else None)
        decoding[name] = m
    return decoding


def selection_report(tally: Tally, plan: Plan, mmi: MMISettings) -> tuple[dict[str, Any], dict | None]:
    """R10@k / MRR ranked by forward, backward and the engine's MMI score; the weight sweep when asked."""
    rows = tally.selection_rows
    if not rows:
        return {}, None
    F, B, N, NC, engine = (np.stack([r[k] for r in rows]) for k in ("fwd", "bwd", "n", "nctx", "engine"))
    selection: dict[str, Any] = {
        "forward": metrics.selection_metrics(mmi_score(F, 0.0, N, NC, *ranking_weights(mmi, False), mmi.normalize))}
    sweep = None
    if plan.mmi:
        # with "mean" the context length is the same for all 10 candidates, so sum and mean rank alike
        selection["backward"] = metrics.selection_metrics(mmi_score(F, B, N, NC, 0.0, 1.0, 0.0, mmi.normalize))
        selection["mmi"] = metrics.selection_metrics(engine)
        if plan.sweep:
            results = sweep_selection(F, B, N, NC)
            sweep = {"metric": "r10@1", "grid": SWEEP_GRID, "best": results[0] if results else None,
                     "engine_settings": {"forward_weight": mmi.forward_weight,
                                         "backward_weight": mmi.backward_weight,
                                         "length_weight": mmi.length_weight, "normalize": mmi.normalize,
                                         **selection["mmi"]},
                     "results": results}
    selection["cases"] = len(rows)
    selection["candidates_per_case"] = SELECTION_CANDIDATES
    selection["seconds"] = tally.seconds["selection"]
    return selection, sweep


def _fmt(x: Any, nd: int = 2) -> str:
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else "—"


def markdown_report(report: dict[str, Any]) -> str:
    """Tables for humans: decoding (char and word level), selection, and what was skipped."""
    s = report["settings"]
    lines = [f"# Evaluation: {', '.join(s['eval']['data'])}", "",
             f"model `{s['model']['forward']}`" + (f" + backward `{s['model']['backward']}`"
                                                    if s["model"]["backward"] else " (no backward model)")
             + f"; {report['sessions']} sessions, {report['cases']} cases, seed {s['eval']['seed']}, "
             f"N = {s['eval']['num_candidates_mmi']} candidates for mmi"
             + (f", N = {s['eval']['num_candidates_hybrid']} sampled + K = {s['eval']['retrieval_candidates_hybrid']}"
                " retrieved for hybrid" if "num_candidates_hybrid" in s["eval"] else "") + ". "
             f"PPL of the references: **{_fmt(report['ppl'])}**.", ""]
    if report["decoding"]:
        lines += ["| decoder | BLEU-2 | BLEU-4 | Dist-1 | Dist-2 | Entropy-4 | avg len | repeat-3 % | bland % |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, m in report["decoding"].items():
            lines.append(f"| {name} | {_fmt(m['bleu2'])} | {_fmt(m['bleu4'])} | {_fmt(m['dist1'])} | "
                         f"{_fmt(m['dist2'])} | {_fmt(m['entropy4'])} | {_fmt(m['avg_len'], 1)} | "
                         f"{_fmt(m['repeat3'], 1)} | {_fmt(m['bland_top20'], 1)} |")
        lines += ["", "Word level (jieba):", "",
                  "| decoder | BLEU-2 | BLEU-4 | Dist-1 | Dist-2 | Entropy-4 | avg words |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in report["decoding"].items():
            lines.append(f"| {name} | {_fmt(m['bleu2_word'])} | {_fmt(m['bleu4_word'])} | {_fmt(m['dist1_word'])} | "
                         f"{_fmt(m['dist2_word'])} | {_fmt(m['entropy4_word'])} | {_fmt(m['avg_len_words'], 1)} |")
        lines.append("")
        rows = [(name, m) for name, m in report["decoding"].items() if m.get("verbatim_train_pct") is not None]
        if rows:
            lines += ["Where the replies come from (the bot's retrieval index):", "",
                      "| decoder | retrieved % | verbatim training reply % |", "|---|---|---|"]
            lines += [f"| {name} | {_fmt(m['retrieved_pct'], 1)} | {_fmt(m['verbatim_train_pct'], 1)} |"
                      for name, m in rows]
            lines.append("")
    if report["selection"]:
        sel = report["selection"]
        lines += [f"Response selection ({sel['cases']} cases, true reply + 9 from other sessions):", "",
                  "| ranked by | R10@1 | R10@2 | MRR |", "|---|---|---|---|"]
        for name in ("forward", "backward", "mmi"):
            if name in sel:
                m = sel[name]
                lines.append(f"| {name} | {_fmt(m['r10@1'])} | {_fmt(m['r10@2'])} | {_fmt(m['mrr'])} |")
        lines.append("")
    if "sweep" in report:
        sw = report["sweep"]
        e = sw["engine_settings"]
        lines += [f"MMI weight sweep on the selection task (engine now: forward {e['forward_weight']}, backward "
                  f"{e['backward_weight']}, length {e['length_weight']}, {e['normalize']}: R10@1 "
                  f"{_fmt(e['r10@1'])}); best 10:", "",
                  "| normalize | forward_weight | backward_weight | length_weight | R10@1 | R10@2 | MRR |",
                  "|---|---|---|---|---|---|---|"]
        for r in sw["results"][:10]:
            lines.append(f"| {r['normalize']} | {r['forward_weight']} | {r['backward_weight']} | "
                         f"{r['length_weight']} | {_fmt(r['r10@1'])} | {_fmt(r['r10@2'])} | {_fmt(r['mrr'])} |")
        lines.append("")
    for key, why in report["absent"].items():
        lines.append(f"- {key} absent: {why}")
    skipped = {k: v for k, v in report["skipped"]["reading_and_cleaning"].items() if v}
    if skipped:
        lines.append("- reading/cleaning counts: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    for k, v in report["skipped"]["selection_cases"].items():
        lines.append(f"- selection skipped for {v} cases: {k}")
    t = report["timing"]
    lines += [f"- wall time {t['wall_s']:.1f} s, {t['cases_per_s']:.2f} cases/s "
              f"(model load {t['model_load_s']:.1f} s)", ""]
    return "\n".join(lines)


SELECTION_CANDIDATES = 10          # the true reply + 9 distractors: R10@k


@dataclass
class Plan:
    """What this run measures, and why not the rest (`absent`: report key -> reason)."""

    decoders: list[str]
    selection: bool
    sweep: bool
    mmi: bool
    absent: dict[str, str]
    train_replies: set[str] | None = None  # the index's replies, when the bot has one


