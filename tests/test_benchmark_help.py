"""Every benchmark script's --help prints and exits 0 (a help text with a bare '%' made argparse raise)."""
from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO, load_benchmark

SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_zero(name, monkeypatch, capsys):
    module = load_benchmark(name, monkeypatch)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
