"""Pick the default bot from a sweep (corpus/recipes/sweep.sh) by held-out figures, and install it.

Rule (fixed before looking at the results): the lowest held-out forward perplexity wins; a pair whose
perplexity is within 2 % of the best and whose forward model is smaller is preferred (CPU latency).
Writes SWEEP_DIR/choice.json and installs the chosen forward/ and backward/ as DEST (weights stored as fp16
when the fp32 pair would exceed the 60 MB budget; the engine computes in fp32 on CPU).

DEST is replaced as a whole, in one rename: a reader never sees old and new files mixed, and a failure
leaves the old DEST as it was. DEST may hold only forward/ and backward/ (nothing else is deleted).

    python corpus/recipes/pick_default.py SWEEP_DIR DEST
    python corpus/recipes/pick_default.py --install BOT_DIR DEST     # a given forward/ + backward/ pair
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dialogpt_zh.checkpoint import CURVE_FILE, METRICS_FILE, RESUME_DIR, RUN_CONFIG_FILE  # noqa: E402
from dialogpt_zh.fsutil import atomic_directory, atomic_write_json  # noqa: E402

DIRECTIONS = ("forward", "backward")


def n_params(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    d, L, v, p = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
    return 12 * L * d * d + (v + p) * d


def choose(sweep: Path) -> Path:
    """The chosen pair's directory (SWEEP_DIR/NAME); writes SWEEP_DIR/choice.json."""
    rows = []
    for report in sorted(sweep.glob("eval_*.json")):
        name = report.stem[len("eval_"):]
        r = json.loads(report.read_text())
        sel = r.get("selection", {})
        rows.append({"name": name, "ppl": r["ppl"], "params": n_params(sweep / name / "forward"),
                     "r10@1": {k: v.get("r10@1") for k, v in sel.items() if isinstance(v, dict)}})
    if not rows:
        raise SystemExit(f"error: {sweep}: no eval_*.json")
    best = min(r["ppl"] for r in rows)
    near = [r for r in rows if r["ppl"] <= best * 1.02]
    choice = min(near, key=lambda r: (r["params"], r["ppl"]))
    atomic_write_json(sweep / "choice.json", {"rows": rows, "choice": choice["name"]})
    print(json.dumps({"rows": rows, "choice": choice["name"]}, indent=2))
    return sweep / choice["name"]


RETRIEVAL_DIR = "retrieval"
CARD = "README.md"  # the bot's model card: corpora, licences, what the index quotes


def install(bot: Path, dest: Path, half: bool | None = None) -> None:
    """Copy BOT/forward and BOT/backward (without resume/), and BOT/retrieval when there is one, into DEST,
    replacing DEST in one rename (DEST's README.md, the model card, is kept). `half`:
    store the weights at float16 (rewritten by checkpoint.py); None = when the float32 pair is over budget."""
    for direction in DIRECTIONS:
        if not (bot / direction / "config.json").is_file():
            raise SystemExit(f"error: {bot / direction}: not a model directory")
    if dest.exists():
        others = sorted(p.name for p in dest.iterdir() if p.name not in (*DIRECTIONS, RETRIEVAL_DIR, CARD))
        if others:
            raise SystemExit(f"error: {dest}: holds more than forward/, backward/, retrieval/ and README.md "
                             f"({', '.join(others)}); "
                             "move those away first")
    if half is None:
        half = 2 * 4 * n_params(bot / "forward") > 58e6  # fp32 forward + backward over budget -> store fp16
    with atomic_directory(dest, replace_existing=True) as tmp:  # DEST holds only what we replace (checked)
        for direction in DIRECTIONS:
            if half:
                copy_in_fp16(bot / direction, tmp / direction)
            else:
                shutil.copytree(bot / direction, tmp / direction, ignore=shutil.ignore_patterns(RESUME_DIR))
        if (bot / RETRIEVAL_DIR / "index.json").is_file():  # the bot's index of human replies comes along
            shutil.copytree(bot / RETRIEVAL_DIR, tmp / RETRIEVAL_DIR)
        if (dest / CARD).is_file():  # the hand-written model card stays (update it by hand)
            shutil.copy2(dest / CARD, tmp / CARD)
    print(f"installed {bot} as {dest}" + (" (fp16 weights)" if half else ""))


def copy_in_fp16(src: Path, dst: Path) -> None:
    """SRC's model with its weights stored at float16, its card, run config and figures, written by the
    checkpoint writer (resume/ and anything else left out)."""
    from dialogpt_zh.checkpoint import load_model, read_card, save_checkpoint
    from dialogpt_zh.tokenizer import load_tokenizer

    def read_json(name: str) -> dict | None:
        return json.loads((src / name).read_text(encoding="utf-8")) if (src / name).is_file() else None

    curve = src / CURVE_FILE
    save_checkpoint(load_model(src), load_tokenizer(src), dst, read_card(src), run_config=read_json(RUN_CONFIG_FILE),
                    metrics=read_json(METRICS_FILE), curve_png=curve.read_bytes() if curve.is_file() else None,
                    fp16=True)


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) == 3 and argv[0] == "--install":
        install(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 2:
        install(choose(Path(argv[0])), Path(argv[1]))
    else:
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[-2:]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
