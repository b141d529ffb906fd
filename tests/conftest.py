"""Shared fixtures: hand-written corpus fixtures and tiny model checkpoints built in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "corpus" / "fixtures"
SHARED_CORPUS = REPO.parent / "shared" / "corpus"


def read_fixture_sessions(name: str = "chitchat_train.txt") -> list[list[str]]:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return [[u for u in block.splitlines() if u.strip()] for block in text.split("\n\n") if block.strip()]


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

    from dialogpt_zh.model import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("random_bot")
    for i, direction in enumerate(("forward", "backward")):
        torch.manual_seed(i)
        model = build_model("tiny", fixture_tokenizer, dropout=0.0)
        save_checkpoint(model, fixture_tokenizer, root / direction,
                        {"direction": direction, "preset": "tiny", "trained": False})
    return root
