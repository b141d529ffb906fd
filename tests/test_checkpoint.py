"""The checkpoint format (dialogpt_zh.checkpoint): one writer, and damaged model files refused at load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dialogpt_zh.checkpoint import load_model, read_card, remove_stale_temp, save_checkpoint
from dialogpt_zh.errors import UserError


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(8192))


def _edit_tensors(edit):
    def damage(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return damage


def _first(tensors: dict) -> str:
    return sorted(k for k in tensors if tensors[k].is_floating_point())[0]


DAMAGE = [
    ("model.safetensors", _truncate, "cannot load the model"),
    ("model.safetensors", _random_bytes, "cannot load the model"),
    ("model.safetensors", lambda p: p.write_bytes(b""), "cannot load the model"),
    ("model.safetensors",
     _edit_tensors(lambda t: t.__setitem__(_first(t), torch.full_like(t[_first(t)], float("nan")))),
     "NaN or infinite"),
    ("model.safetensors", _edit_tensors(lambda t: t[_first(t)].view(-1).__setitem__(0, float("inf"))),
     "NaN or infinite"),
    ("model.safetensors", _edit_tensors(lambda t: t.pop(sorted(t)[-1])), "missing or of another shape"),
    ("model.safetensors", _edit_tensors(lambda t: t.__setitem__(_first(t), t[_first(t)][:1].clone())),
     "is [1] in the file but config.json makes it"),
    ("config.json", lambda p: p.write_text('{"model_type": "gpt2", ', encoding="utf-8"), "config.json"),
]


@pytest.mark.parametrize("name,damage,expected", DAMAGE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGE)])
def test_damaged_model_files_are_refused_at_load_naming_the_file(tmp_path, random_bot_dir, name, damage, expected):
    from dialogpt_zh.engine.bot import ChatBot

    bot = tmp_path / "bot"
    shutil.copytree(random_bot_dir, bot)
    damage(bot / "forward" / name)
    for load in (lambda: load_model(bot / "forward"), lambda: ChatBot.from_pretrained(bot)):
        with pytest.raises(UserError) as e:
            load()
        assert expected in str(e.value) and str(bot / "forward") in str(e.value), str(e.value)


def test_the_writer_is_atomic_and_keeps_the_previous_model(tmp_path, fixture_tokenizer):
    from dialogpt_zh.training.presets import build_model

    torch.manual_seed(0)
    out = tmp_path / "m"
    save_checkpoint(build_model("tiny", fixture_tokenizer), fixture_tokenizer, out, {"direction": "forward"},
                    run_config={"lr": 1.0}, metrics={"step": 1}, curve_png=b"png")
    weights = (out / "model.safetensors").read_bytes()
    # model=None: a new card and figures, the previous model's files kept as they were
    save_checkpoint(None, fixture_tokenizer, out, {"direction": "forward", "steps": 2}, metrics={"step": 2})
    assert (out / "model.safetensors").read_bytes() == weights and read_card(out)["steps"] == 2
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == {"step": 2}
    assert not (out / "run.json").exists()  # extras belong to the save that wrote them
    assert load_model(out).config.n_layer == 2

    class Boom(Exception):
        pass

    def failing_save(*a, **k):
        raise Boom

    model = build_model("tiny", fixture_tokenizer)
    model.save_pretrained = failing_save
    with pytest.raises(Boom):
        save_checkpoint(model, fixture_tokenizer, out, {"direction": "forward", "steps": 3})
    assert (out / "model.safetensors").read_bytes() == weights and read_card(out)["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp directory left
    with pytest.raises(ValueError):
        save_checkpoint(None, fixture_tokenizer, tmp_path / "empty", {})


def test_stale_temp_is_removed_only_for_that_output(tmp_path):
    (tmp_path / "out").mkdir()
    dead = 4_000_000  # above Linux's default pid_max for 2^22: no live process
    litter = [tmp_path / f".out.tmp-{dead}-0123abcd", tmp_path / ".out.rng", tmp_path / f".out.old-{dead}"]
    keep = [tmp_path / f".other.tmp-{dead}-0123abcd", tmp_path / "out.tmp", tmp_path / ".outer.rng",
            tmp_path / f".out.tmp-{__import__('os').getpid()}-0123abcd"]  # a live run's
    for p in litter + keep:
        p.mkdir()
    assert sorted(remove_stale_temp(tmp_path / "out")) == sorted(litter)
    assert sorted(tmp_path.iterdir()) == sorted(keep + [tmp_path / "out"])


def test_saving_and_loading_print_no_progress_bars(tmp_path, fixture_tokenizer, capfd):
    """transformers' "Writing model shards" / "Loading weights" bars never reach a face's output."""
    from dialogpt_zh.training.presets import build_model

    save_checkpoint(build_model("tiny", fixture_tokenizer), fixture_tokenizer, tmp_path / "m", {"direction": "forward"})
    load_model(tmp_path / "m")
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err and "Loading weights" not in out + err
