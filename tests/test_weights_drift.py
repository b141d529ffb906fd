"""benchmarks/weights_drift.py: float32 vs fp16 / int8 next-token distributions of both directions."""
from __future__ import annotations

from tests.conftest import load_benchmark


def test_weights_drift_reports_both_directions_and_refuses_unknown_precisions(monkeypatch, capsys, trained_bot_dir):
    bench = load_benchmark("weights_drift", monkeypatch)
    assert bench.main(["--model", str(trained_bot_dir), "--precisions", "fp16,int8"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.replace("|", " ").split()
        if cells[:1] in (["forward"], ["backward"]):
            rows[cells[0], cells[1]] = [float(c.rstrip("%")) for c in cells[2:]]
    assert set(rows) == {(d, p) for d in ("forward", "backward") for p in ("fp16", "int8")}
    for direction in ("forward", "backward"):
        fp16, int8 = rows[direction, "fp16"], rows[direction, "int8"]
        assert fp16[0] == int8[0] > 0                       # the same token positions
        assert 0 <= fp16[1] < 1e-5 and int8[1] > 10 * fp16[1]  # KL: fp16 rounding is far below int8's
        assert fp16[4] == int8[4]                           # the float32 perplexity column is the reference
        assert abs(fp16[5] / fp16[4] - 1) < 1e-3
    assert bench.main(["--model", str(trained_bot_dir), "--precisions", "fp8"]) == 2
    assert "precisions" in capsys.readouterr().err
