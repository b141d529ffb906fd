"""Pick the default bot from a sweep (corpus/recipes/sweep.sh) by held-out figures, and pack it.

Rule (fixed before looking at the results): the lowest held-out forward perplexity wins; a pair whose
perplexity is within 2 % of the best and whose forward model is smaller is preferred (CPU latency).
Writes SWEEP_DIR/choice.json and copies the chosen forward/ and backward/ into DEST (weights stored as fp16
when the fp32 pair would exceed the 60 MB budget; the engine computes in fp32 on CPU).

    python corpus/recipes/pick_default.py SWEEP_DIR DEST
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def n_params(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    d, L, v, p = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
    return 12 * L * d * d + (v + p) * d


def main() -> int:
    sweep, dest = Path(sys.argv[1]), Path(sys.argv[2])
    rows = []
    for report in sorted(sweep.glob("eval_*.json")):
        name = report.stem[len("eval_"):]
        r = json.loads(report.read_text())
        sel = r.get("selection", {})
        rows.append({"name": name, "ppl": r["ppl"], "params": n_params(sweep / name / "forward"),
                     "r10@1": {k: v.get("r10@1") for k, v in sel.items() if isinstance(v, dict)}})
    if not rows:
        print("no eval_*.json in", sweep)
        return 1
    best = min(r["ppl"] for r in rows)
    near = [r for r in rows if r["ppl"] <= best * 1.02]
    choice = min(near, key=lambda r: (r["params"], r["ppl"]))
    (sweep / "choice.json").write_text(json.dumps({"rows": rows, "choice": choice["name"]}, indent=2))
    print(json.dumps({"rows": rows, "choice": choice["name"]}, indent=2))
    half = 2 * 4 * choice["params"] > 58e6  # fp32 forward + backward over budget -> store fp16
    for direction in ("forward", "backward"):
        src, dst = sweep / choice["name"] / direction, dest / direction
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("resume"), dirs_exist_ok=True)
        if half:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
            model.half().save_pretrained(str(dst), safe_serialization=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
