"""Trainer: learning, exact resume, direction reversal, loss masking, HF loading, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_fixture_store
from dialogpt_zh.batching import IGNORE_INDEX, collate, plan_batches
from dialogpt_zh.store import TokenStore
from dialogpt_zh.tokenizer import encode
from dialogpt_zh.train import TrainConfig, main, train

TINY = dict(preset="tiny", lr=3e-3, batch_tokens=256, seed=0, device="cpu", eval_windows=0)


def _config(store: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(store), output=str(out), **{**TINY, **kw})


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory, fixture_store):
    out = tmp_path_factory.mktemp("fwd") / "model"
    metrics = train(_config(fixture_store, out, max_steps=30, eval_every=10, dropout=0.0))
    return out, metrics


def test_loss_decreases_and_outputs_are_written(forward_run, fixture_store):
    out, metrics = forward_run
    train_losses = [h[1] for h in metrics["history"]["train"]]
    valid_losses = [h[1] for h in metrics["history"]["valid"]]
    assert len(train_losses) == 30 and metrics["stopped"] == "max_steps"
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 0.5
    assert valid_losses[-1] < valid_losses[0]
    assert metrics["valid_ppl"] == pytest.approx(np.exp(metrics["valid_loss"]))
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_s"] > 0
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["step"] == 30 and on_disk["best_valid_loss"] == min(valid_losses)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((out / "dialogpt_zh.json").read_text(encoding="utf-8"))
    assert card["direction"] == "forward" and card["preset"] == "tiny" and card["seed"] == 0
    assert card["data_manifest_sha256"] == __import__("hashlib").sha256(
        (fixture_store / "manifest.json").read_bytes()).hexdigest()
    assert card["command"].startswith("python -m dialogpt_zh.train --data ")
    assert card["model_config"]["n_layer"] == 2


def test_checkpoint_loads_with_plain_transformers(forward_run, fixture_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = forward_run
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    store = TokenStore(fixture_store)
    assert tok.get_vocab() == store.tokenizer().get_vocab()
    # the saved model is the best one: its loss on the valid split reproduces the recorded best valid loss
    valid = store.split("valid")
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(valid)):
            ids = torch.tensor([valid.sequence(i, "forward")])
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert total / n == pytest.approx(metrics["best_valid_loss"], rel=1e-4)


def test_resume_continues_exactly(tmp_path, fixture_store):
    from safetensors.torch import load_file

    common = dict(max_steps=12, eval_every=5, grad_accum=2, dropout=0.1, batch_tokens=128)
    straight = train(_config(fixture_store, tmp_path / "straight", **common))
    first = train(_config(fixture_store, tmp_path / "split", **common), interrupt_at_step=7)
    assert first["stopped"] == "interrupted" and first["step"] == 7
    assert (tmp_path / "split" / "model.safetensors").is_file()  # the best model so far is already there
    resumed = train(_config(fixture_store, tmp_path / "split", resume=True, **common))
    assert resumed["step"] == 12 and resumed["stopped"] == "max_steps"
    assert resumed["history"]["train"] == straight["history"]["train"]  # same losses and lrs, step by step
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    a = load_file(tmp_path / "straight" / "resume" / "model.safetensors")
    b = load_file(tmp_path / "split" / "resume" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_backward_batches_are_reversed_windows(fixture_store, fixture_sessions, fixture_tokenizer):
    store = TokenStore(fixture_store)
    train_split = store.split("train")
    sessions = [s for k, s in enumerate(fixture_sessions) if k % 5 != 0]
    windows = [s[:n] for s in sessions for n in range(2, len(s) + 1)]
    assert len(windows) == len(train_split)
    cls, sep = fixture_tokenizer.cls_token_id, fixture_tokenizer.sep_token_id
    idx = [0, 3, len(windows) - 1]
    fwd = collate(train_split, idx, "forward", fixture_tokenizer.pad_token_id)
    bwd = collate(train_split, idx, "backward", fixture_tokenizer.pad_token_id)
    for row, i in enumerate(idx):
        turns = [encode(fixture_tokenizer, u) for u in windows[i]]
        expected_b = [cls] + [t for u in reversed(turns) for t in u + [sep]]
        expected_f = [cls] + [t for u in turns for t in u + [sep]]
        n = len(expected_b)
        assert bwd.input_ids[row, :n].tolist() == expected_b
        assert fwd.input_ids[row, :n].tolist() == expected_f
        assert bwd.attention_mask[row].sum() == n


def test_replies_only_masks_the_first_turn(fixture_store, fixture_tokenizer):
    split = TokenStore(fixture_store).split("train")
    pad = fixture_tokenizer.pad_token_id
    for direction in ("forward", "backward"):
        full = collate(split, [0, 1, 2], direction, pad)
        masked = collate(split, [0, 1, 2], direction, pad, replies_only=True)
        for row, i in enumerate([0, 1, 2]):
            turns = split.turns(i)
            first = turns[0] if direction == "forward" else turns[-1]
            skip = len(first) + 2  # [CLS] + first turn + its [SEP]
            length = int(full.attention_mask[row].sum())
            assert (masked.labels[row, :skip] == IGNORE_INDEX).all()
            assert masked.labels[row, skip:length].tolist() == full.input_ids[row, skip:length].tolist()
            assert (full.labels[row, 1:length] != IGNORE_INDEX).all() and full.labels[row, 0] == IGNORE_INDEX
            assert (full.labels[row, length:] == IGNORE_INDEX).all()  # padding never counts
        assert masked.num_targets == full.num_targets - sum(
            len(split.turns(i)[0 if direction == "forward" else -1]) + 1 for i in [0, 1, 2])


def test_length_grouped_plan_covers_every_window_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=2000)
    plan = plan_batches(lengths, batch_tokens=2048, batch_size=0, seed=1, epoch=0)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(2000))
    assert all(len(b) * lengths[b].max() <= 2048 or len(b) == 1 for b in plan)
    padded = sum(len(b) * lengths[b].max() for b in plan)
    naive = sum(16 * lengths[c].max() for c in np.array_split(rng.permutation(2000), 2000 // 16))
    assert padded < 0.7 * naive
    assert [b.tolist() for b in plan] == [b.tolist() for b in plan_batches(lengths, 2048, 0, seed=1, epoch=0)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in plan_batches(lengths, 2048, 0, seed=1, epoch=1)]


def _run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_bad_data_dirs_exit_2(tmp_path, capsys):
    code, err = _run_cli(["--data", tmp_path / "nope", "--output", tmp_path / "out"], capsys)
    assert code == 2 and "data directory not found" in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"format": "something else"}')
    code, err = _run_cli(["--data", tmp_path / "foreign", "--output", tmp_path / "out"], capsys)
    assert code == 2 and "not a dialogpt_zh token store" in err
    assert not (tmp_path / "out").exists()


def test_empty_split_and_forward_only_store_exit_2(tmp_path, capsys, fixture_tokenizer, fixture_sessions):
    empty = build_fixture_store(tmp_path / "empty", fixture_tokenizer, fixture_sessions[:1])  # only a valid session
    code, err = _run_cli(["--data", empty, "--output", tmp_path / "out", "--preset", "tiny"], capsys)
    assert code == 2 and "train split is empty" in err
    fwd_only = build_fixture_store(tmp_path / "fwd_only", fixture_tokenizer, fixture_sessions, directions=["forward"])
    code, err = _run_cli(["--data", fwd_only, "--output", tmp_path / "out", "--direction", "backward"], capsys)
    assert code == 2 and "directions" in err and "backward" in err
    assert not (tmp_path / "out").exists()


def test_init_vocab_mismatch_exit_2(tmp_path, capsys, fixture_store):
    from dialogpt_zh.model import build_model, save_checkpoint
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars

    other = build_char_tokenizer(count_chars(["完全不同的词表"]))
    save_checkpoint(build_model("tiny", other), other, tmp_path / "foreign_model", {})
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "out", "--init", tmp_path / "foreign_model"],
                         capsys)
    assert code == 2 and "vocabulary" in err and "foreign_model" in err
    assert not (tmp_path / "out").exists()


def test_init_from_a_matching_model_trains(tmp_path, forward_run, fixture_store):
    out, _ = forward_run
    metrics = train(_config(fixture_store, tmp_path / "ft", init=str(out), max_steps=3, eval_every=3, lr=1e-4))
    assert metrics["step"] == 3
    card = json.loads((tmp_path / "ft" / "dialogpt_zh.json").read_text(encoding="utf-8"))
    assert card["preset"] == "init" and card["init"] == str(out)


def test_output_and_resume_guards_exit_2(tmp_path, capsys, forward_run, fixture_store):
    out, _ = forward_run
    before = (out / "model.safetensors").read_bytes()
    code, err = _run_cli(["--data", fixture_store, "--output", out, "--preset", "tiny"], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "fresh", "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    code, err = _run_cli(["--data", fixture_store, "--output", out, "--preset", "tiny", "--resume",
                          "--lr", "0.1", "--seed", "0", "--batch-tokens", "256", "--device", "cpu",
                          "--eval-windows", "0"], capsys)
    assert code == 2 and "--lr" in err
    assert (out / "model.safetensors").read_bytes() == before


def test_out_of_memory_is_a_clear_error(tmp_path, capsys, fixture_store, monkeypatch):
    import dialogpt_zh.train as train_module

    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_module, "_batch_loss", oom)
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "out", "--preset", "tiny",
                          "--max-steps", "2", "--device", "cpu"], capsys)
    assert code == 2 and "out of memory" in err and "--batch-tokens" in err
    assert not (tmp_path / "out").exists()


def test_help_shows_defaults_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--direction" in text and "--resume" in text and "examples:" in text and "torchrun" in text
