"""The recipes (corpus/recipes): configs they replay parse with today's flags; installing a bot is atomic."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "corpus" / "recipes"


def _pick_default():
    spec = importlib.util.spec_from_file_location("pick_default", RECIPES / "pick_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_store_config_replays_with_the_preprocessor():
    from dialogpt_zh.cli import parse
    from dialogpt_zh.preprocess import build_parser

    args, rest = parse(build_parser(), ["--config", str(RECIPES / "default_store.json"), "--output", "x"])
    assert args.output == "x" and args.holdout_source_splits == "valid,test" and args.seed == 42
    assert [Path(p).name for p in rest.inputs][:1] == ["lccc-sample"]
    args, rest = parse(build_parser(), ["--config", str(RECIPES / "default_store.json"), "a", "b"])
    assert rest.inputs == ["a", "b"]  # inputs on the command line win


def test_stage3_store_config_is_the_default_store_with_kdconv_upsampled():
    import json

    from dialogpt_zh.cli import parse
    from dialogpt_zh.data.pipeline import parse_upsample
    from dialogpt_zh.preprocess import build_parser

    base = json.loads((RECIPES / "default_store.json").read_text(encoding="utf-8"))
    stage3 = json.loads((RECIPES / "default_store_stage3.json").read_text(encoding="utf-8"))
    differs = {k for k in set(base) | set(stage3) if base.get(k) != stage3.get(k)}
    assert differs <= {"output", "overwrite", "upsample"}
    assert parse_upsample(stage3["upsample"], [Path(p).name for p in stage3["inputs"]]) == {"kdconv": 8}
    args, _ = parse(build_parser(), ["--config", str(RECIPES / "default_store_stage3.json"), "--output", "x"])
    assert args.upsample == "kdconv=8"


@pytest.mark.parametrize("config", ["default_stage1_forward.json", "default_stage1_backward.json",
                                    "default_stage2_forward.json"])
def test_stage_configs_replay_with_the_trainer(config):
    from dialogpt_zh.cli import make_parser, parse
    from dialogpt_zh.training.config import TrainConfig

    (cfg,) = parse(make_parser([TrainConfig], "train", ""),
                   ["--config", str(RECIPES / config), "--data", "s", "--output", "o", "--init", "i"])
    assert cfg.direction in config and cfg.init == "i" and cfg.data == "s"


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_default_cards_replay_with_the_trainer(direction):
    from dialogpt_zh.cli import make_parser, parse
    from dialogpt_zh.training.config import TrainConfig

    card = RECIPES.parent.parent / "checkpoints" / "default" / direction / "dialogpt_zh.json"
    (config,) = parse(make_parser([TrainConfig], "train", ""),
                      ["--config", str(card), "--data", "s", "--output", "o", "--device", "cpu"])
    assert config.direction == direction and config.data == "s" and config.device == "cpu"


def test_install_replaces_the_whole_bot_or_nothing(tmp_path, random_bot_dir):
    pick = _pick_default()
    dest = tmp_path / "default"
    shutil.copytree(random_bot_dir, dest)
    (dest / "forward" / "stale.bin").write_bytes(b"old")  # a file the new bot does not have
    new = tmp_path / "new"
    shutil.copytree(random_bot_dir, new)
    (new / "backward" / "dialogpt_zh.json").write_text('{"direction": "backward", "new": true}', encoding="utf-8")
    (new / "forward" / "resume").mkdir()
    pick.install(new, dest)
    assert not (dest / "forward" / "stale.bin").exists() and not (dest / "forward" / "resume").exists()
    assert '"new": true' in (dest / "backward" / "dialogpt_zh.json").read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "new"]  # no temp left
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    shutil.rmtree(new / "backward")
    with pytest.raises(SystemExit):
        pick.install(new, dest)  # an incomplete bot: DEST untouched
    (dest / "README").write_text("mine", encoding="utf-8")
    with pytest.raises(SystemExit, match="README"):
        pick.install(random_bot_dir, dest)  # never deletes what it does not own
    (dest / "README").unlink()
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before


def test_pretrain_smile_recipe_is_valid_bash_and_replays_existing_configs():
    import subprocess

    script = RECIPES / "pretrain_smile.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    assert '"$HERE/default_stage1_$1.json"' in text  # both stages, per direction, replay stage 1's config
    for direction in ("forward", "backward"):
        assert (RECIPES / f"default_stage1_{direction}.json").is_file()
    assert "--subsample \"smile=$SHARE\"" in text and "--vocab \"$STORE/tokenizer\"" in text
