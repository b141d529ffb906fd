"""Shared fixtures: hand-written corpus fixtures and tiny model checkpoints built in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "corpus" / "fixtures"
SHARED_CORPUS = REPO.parent / "shared" / "corpus"


def read_fixture_sessions(name: str = "chitchat_train.txt", fmt: str = "auto") -> list[list[str]]:
    """Raw turns of each session of a fixture file, read by the project's own reader (no second parser)."""
    from dialogpt_zh.data.readers import read_file, scan_input

    return [raw.turns for cf in scan_input(FIXTURES / name, fmt).files for raw in read_file(cf)]


@pytest.fixture(scope="session")
def fixture_sessions() -> list[list[str]]:
    return read_fixture_sessions()


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    if not SHARED_CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {SHARED_CORPUS}")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def fixture_tokenizer(fixture_sessions):
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars

    return build_char_tokenizer(count_chars(u for s in fixture_sessions for u in s))


@pytest.fixture(scope="session")
def random_bot_dir(tmp_path_factory, fixture_tokenizer) -> Path:
    """checkpoints-like dir with untrained tiny forward/ and backward/ models (shapes and plumbing only)."""
    import torch

    from dialogpt_zh.checkpoint import save_checkpoint
    from dialogpt_zh.training.presets import build_model

    root = tmp_path_factory.mktemp("random_bot")
    for i, direction in enumerate(("forward", "backward")):
        torch.manual_seed(i)
        model = build_model("tiny", fixture_tokenizer, dropout=0.0)
        save_checkpoint(model, fixture_tokenizer, root / direction,
                        {"direction": direction, "preset": "tiny", "trained": False})
    return root


def build_fixture_store(path: Path, tokenizer, sessions: list[list[str]], directions=("forward", "backward"),
                        **manifest) -> Path:
    """A token store from hand-written sessions (every 5th session -> valid); windows: each prefix of >= 2 turns;
    one source ("fixtures"). `manifest`: more manifest fields (e.g. the preprocessor's `config`)."""
    from dialogpt_zh.data.store import StoreWriter
    from dialogpt_zh.tokenizer import encode

    writer = StoreWriter(path, tokenizer, sources=["fixtures"])
    for k, session in enumerate(sessions):
        ids = [encode(tokenizer, u) for u in session]
        writer.add_session("valid" if k % 5 == 0 else "train", ids, [(0, n) for n in range(2, len(ids) + 1)],
                           source=0)
    writer.close({"command": "tests/conftest.py build_fixture_store", "directions": list(directions), **manifest})
    return path


@pytest.fixture(scope="session")
def fixture_store(tmp_path_factory, fixture_tokenizer, fixture_sessions) -> Path:
    """A token store of corpus/fixtures/chitchat_train.txt (both directions)."""
    return build_fixture_store(tmp_path_factory.mktemp("store") / "store", fixture_tokenizer, fixture_sessions)


@pytest.fixture(scope="session")
def trained_bot_dir(tmp_path_factory, fixture_store) -> Path:
    """checkpoints-like dir (ROOT/forward, ROOT/backward) with tiny models trained a few dozen steps on the fixtures."""
    from dialogpt_zh.training.config import TrainConfig
    from dialogpt_zh.training.loop import train

    root = tmp_path_factory.mktemp("trained_bot")
    for direction in ("forward", "backward"):
        train(TrainConfig(data=str(fixture_store), output=str(root / direction), direction=direction, preset="tiny",
                          max_steps=40, eval_every=40, lr=3e-3, batch_tokens=512, dropout=0.0, seed=0, device="cpu"))
    return root


def load_benchmark(name: str, monkeypatch=None):
    """benchmarks/NAME.py as a module (the scripts are not a package). It is registered in sys.modules under
    NAME, because dataclasses look their module up while a class is made; through `monkeypatch` when given,
    so the entry goes away after the test."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    else:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_terminal_summary(terminalreporter) -> None:
    """Skipped browser tests get their own section just above pytest's last line, with the reason (how to run
    them): "N passed, 4 skipped" alone reads as a pass, and -rs lists the reason among every other skip."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if "browser" in getattr(report, "keywords", {}) and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("browser tests skipped", sep="=")
        for reason, count in reasons.items():
            terminalreporter.line(f"{count} skipped: {reason}")
