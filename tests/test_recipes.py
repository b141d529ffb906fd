"""The recipes (corpus/recipes): the default models' recipe chains committed configs only, each stage's
config is a complete run of today's trainer (the last stages are the installed cards' own), the recipe runs
end to end on tiny settings, and installing a bot is atomic and writes through checkpoint.py."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "corpus" / "recipes"
FIXTURES = REPO / "corpus" / "fixtures"
CARDS = REPO / "checkpoints" / "default"

# stage config -> (the store it reads, the stage it starts from); the last stages are the installed models
STAGES = {
    "default_stage1_forward.json": ("default_store.json", None),
    "default_stage1_backward.json": ("default_store.json", None),
    "default_stage2_forward.json": ("default_store.json", "default_stage1_forward.json"),
    "default_stage2_backward.json": ("default_store.json", "default_stage1_backward.json"),
    "default_stage3_forward.json": ("default_store_stage3.json", "default_stage2_forward.json"),
    "default_stage3_backward.json": ("default_store_stage3.json", "default_stage2_backward.json"),
}
# the runs whose configs the installed cards record; the installed backward model averages stages 2 and 3
FINAL = {"forward": "default_stage3_forward.json", "backward": "default_stage3_backward.json"}
AVERAGED_FIRST = "default_stage2_backward.json"


def _json(name: str) -> dict:
    return json.loads((RECIPES / name).read_text(encoding="utf-8"))


def _train_config(name: str):
    """The stage config as the trainer builds it from `--config` (validated in TrainConfig.__post_init__)."""
    from dialogpt_zh.cli import make_parser, parse
    from dialogpt_zh.training.config import TrainConfig

    (config,) = parse(make_parser([TrainConfig], "train", ""), ["--config", str(RECIPES / name)])
    return config


def _pick_default():
    spec = importlib.util.spec_from_file_location("pick_default", RECIPES / "pick_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_replays_committed_configs_only():
    """Every store and stage of default.sh is a config committed beside it; none reads the installed models
    (checkpoints/default moves when a new default is installed)."""
    code = [line for line in (RECIPES / "default.sh").read_text(encoding="utf-8").splitlines()
            if not line.lstrip().startswith(("#", "echo"))]
    used = {name.replace("$direction", d) for line in code
            for name in re.findall(r'"\$HERE/(default_[a-z0-9_$]+\.json)"', line) for d in ("forward", "backward")}
    assert used == set(STAGES) | {"default_store.json", "default_store_stage3.json"}
    assert all((RECIPES / name).is_file() for name in used)
    assert not any("checkpoints/" in line for line in code)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_configs_chain_and_replay_with_the_trainer(name):
    """Each stage config is a complete TrainConfig whose recorded data/init are the outputs of the store and
    the stage before it: the chain is in the files, not in prose."""
    from dialogpt_zh.training.config import TrainConfig

    recorded = _json(name)["config"]
    assert set(recorded) == {f.name for f in dataclasses.fields(TrainConfig)}  # nothing left to a default
    config = _train_config(name)
    assert config.direction in name
    store, previous = STAGES[name]
    assert config.data == _json(store)["output"]
    assert config.init == (_json(previous)["config"]["output"] if previous else None)


def _installed_card(direction: str) -> dict:
    return json.loads((CARDS / direction / "dialogpt_zh.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_last_stage_is_the_installed_models_run(direction):
    """The last stage's config is the installed card's, and replays to the schedule the card recorded."""
    assert_card_replays(_installed_card(direction), FINAL[direction])


def test_installed_backward_model_is_the_recipes_average():
    """The installed backward model is default.sh's average: its card holds stage 2's card (which replays
    stage 2's config) and the weight default.sh passes."""
    averaged = _installed_card("backward")["averaged"]
    assert_card_replays(averaged["first"]["card"], AVERAGED_FIRST)
    weight = re.search(r"^BACKWARD_STAGE3_WEIGHT=([0-9.]+)$", (RECIPES / "default.sh").read_text(encoding="utf-8"),
                       re.M)
    assert weight and float(weight.group(1)) == averaged["weight"]
    assert "averaged" not in _installed_card("forward")


def assert_card_replays(card: dict, stage: str) -> None:
    from dialogpt_zh.training.config import make_schedule

    config = _train_config(stage)
    moved = {"data", "output", "init"}  # where the run read and wrote: the recipe's own paths
    # settings that came after the card was written: the recipe must state what the run did without them
    # (no packing, the layout of the store's vocabulary; compile and prefetch change no update)
    later = set(dataclasses.asdict(config)) - set(card["config"])
    assert later <= {"pack", "compile", "prefetch", "layout"}
    if "pack" in later:
        assert config.pack == 0
    if "layout" in later:
        assert config.layout is None
    assert {k: v for k, v in dataclasses.asdict(config).items() if k not in moved | later} == \
        {k: v for k, v in card["config"].items() if k not in moved}
    schedule = make_schedule(config, card["schedule"]["batches_per_epoch"])
    assert dataclasses.asdict(schedule) == card["schedule"]
    assert schedule.total_steps == card["trained_steps"]


def test_store_configs_are_complete_and_differ_only_by_the_upsampling():
    from dialogpt_zh.cli import parse
    from dialogpt_zh.data.pipeline import PreprocessArguments, parse_upsample
    from dialogpt_zh.preprocess import build_parser

    base, stage3 = _json("default_store.json"), _json("default_store_stage3.json")
    assert set(base) - {"inputs"} == {f.name for f in dataclasses.fields(PreprocessArguments)} - {"overwrite"}
    differs = {k for k in set(base) | set(stage3) if base.get(k) != stage3.get(k)}
    assert differs <= {"output", "overwrite", "upsample"}
    assert parse_upsample(stage3["upsample"], [Path(p).name for p in stage3["inputs"]]) == {"kdconv": 8}
    args, rest = parse(build_parser(), ["--config", str(RECIPES / "default_store.json")])
    assert dataclasses.asdict(args) == {**dataclasses.asdict(PreprocessArguments(output="")),
                                        **{k: v for k, v in base.items() if k != "inputs"}}
    assert rest.inputs == base["inputs"]


def tiny_corpus(root: Path) -> Path:
    """The shared corpus's layout as default_store.json and default.sh's evaluations expect it, made of the
    hand-written fixtures (a few dozen sessions)."""
    files = {"lccc-sample/toy_data.json": "heldout.json", "lccc-base/train.tsv": "lccc_pairs.tsv",
             "gpt2-chitchat-50w/train.txt": "chitchat_train.txt", "kdconv/film/train.json": "kdconv_dev.json",
             "kdconv/film/test.json": "kdconv_dev.json", "chatterbot-zh/ai.yml": "chatterbot.yml"}
    for dest, src in files.items():
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / src, root / dest)
    assert {Path(p).name for p in _json("default_store.json")["inputs"]} == {p.name for p in root.iterdir()}
    return root


@pytest.mark.slow
def test_default_recipe_runs_end_to_end_on_tiny_settings(tmp_path):
    """corpus/recipes/default.sh as written (every store, stage and evaluation) on the fixtures, with its
    smoke-test overrides: a tiny preset, 2 steps a stage, 2 evaluation sessions."""
    corpus, out = tiny_corpus(tmp_path / "corpus"), tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PRESET": "tiny", "MAX_STEPS": "2", "EVAL_LIMIT": "2",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(["bash", str(RECIPES / "default.sh"), str(corpus), str(out), "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("stage1/forward", "stage1/backward", "stage2/forward", "stage2/backward", "stage3/backward",
                  "bot/forward", "bot/backward"):
        assert (out / stage / "model.safetensors").is_file(), stage
    cards = {d: json.loads((out / "bot" / d / "dialogpt_zh.json").read_text(encoding="utf-8"))
             for d in ("forward", "backward")}
    assert cards["forward"]["init"] == str(out / "stage2" / "forward")
    assert cards["backward"]["init"] == str(out / "stage2" / "backward")  # stage 3's card, averaged with stage 2
    assert cards["backward"]["averaged"]["first"]["path"] == str(out / "stage2" / "backward")
    assert cards["backward"]["averaged"]["first"]["card"]["init"] == str(out / "stage1" / "backward")
    assert cards["forward"]["config"]["lr"] == _train_config(FINAL["forward"]).lr  # the committed config ran
    for name in ("heldout_lccc", "heldout_kdconv"):
        report = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert report["sessions"] == 2 and set(report["decoding"]) == {"plain", "mmi", "greedy", "retrieval", "hybrid"}
    index = json.loads((out / "bot" / "retrieval" / "index.json").read_text(encoding="utf-8"))
    assert index["counts"]["pairs"] > 0 and index["settings"]["exclude_sources"] == ["gpt2-chitchat-50w"]
    assert f"pick_default.py --install {out / 'bot'} checkpoints/default" in done.stdout


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


def test_install_brings_the_index_and_keeps_the_model_card(tmp_path, random_bot_dir):
    pick = _pick_default()
    dest, new = tmp_path / "default", tmp_path / "new"
    shutil.copytree(random_bot_dir, dest)
    (dest / "README.md").write_text("card", encoding="utf-8")
    (dest / "retrieval").mkdir()
    (dest / "retrieval" / "old.npz").write_bytes(b"old")
    shutil.copytree(random_bot_dir, new)
    (new / "retrieval").mkdir()
    (new / "retrieval" / "index.json").write_text("{}", encoding="utf-8")
    pick.install(new, dest)
    assert sorted(p.name for p in (dest / "retrieval").iterdir()) == ["index.json"]
    assert (dest / "README.md").read_text(encoding="utf-8") == "card"


def test_install_in_fp16_writes_through_the_checkpoint_writer(tmp_path, random_bot_dir):
    """Weights stored at float16 (half the bytes), the card and figures kept, and the bot loads and scores
    as the float32 one does within float16 rounding."""
    from safetensors import safe_open

    from dialogpt_zh.engine.bot import ChatBot

    pick = _pick_default()
    pick.install(random_bot_dir, tmp_path / "bot", half=True)
    for direction in ("forward", "backward"):
        src, dst = random_bot_dir / direction, tmp_path / "bot" / direction
        with safe_open(str(dst / "model.safetensors"), "pt") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
        assert (dst / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size
        assert json.loads((dst / "dialogpt_zh.json").read_text(encoding="utf-8")) == \
            json.loads((src / "dialogpt_zh.json").read_text(encoding="utf-8"))
    history, replies = ["你好"], ["你好呀", "在干嘛"]
    half = ChatBot.from_pretrained(tmp_path / "bot", quantize="none").backward_logprobs(history, replies)
    full = ChatBot.from_pretrained(random_bot_dir, quantize="fp16").backward_logprobs(history, replies)
    assert [h for h, _ in half] == pytest.approx([f for f, _ in full], abs=1e-3)


def test_pretrain_smile_recipe_is_valid_bash_and_replays_existing_configs():
    script = RECIPES / "pretrain_smile.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    assert '"$HERE/default_stage1_$1.json"' in text  # both stages, per direction, replay stage 1's config
    for direction in ("forward", "backward"):
        assert (RECIPES / f"default_stage1_{direction}.json").is_file()
    assert "--subsample \"smile=$SHARE\"" in text and "--vocab \"$STORE/tokenizer\"" in text


def _average_module():
    spec = importlib.util.spec_from_file_location("average_models", RECIPES / "average_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finetuned_copy(src: Path, dest: Path, seed: int) -> Path:
    """SRC's model with every weight moved a little (a stand-in for a fine-tuning of it), card copied."""
    import torch

    from dialogpt_zh.checkpoint import load_model, read_card, save_checkpoint
    from dialogpt_zh.tokenizer import load_tokenizer

    model = load_model(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_checkpoint(model, load_tokenizer(src), dest, {**read_card(src), "tuned": seed})


def test_average_models_writes_the_weighted_mean_once_per_tied_weight(tmp_path, random_bot_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dialogpt_zh.checkpoint import load_model, read_card

    first = random_bot_dir / "backward"
    second = _finetuned_copy(first, tmp_path / "second", seed=3)
    out = _average_module().average_models(first, second, 0.25, tmp_path / "avg")
    a, b, m = (load_model(p, dtype=torch.float32) for p in (first, second, out))
    sa, sb = a.state_dict(), b.state_dict()
    for name, value in m.state_dict().items():  # lm_head.weight is tied to wte: averaged once, not twice
        torch.testing.assert_close(value, 0.75 * sa[name] + 0.25 * sb[name], rtol=0, atol=1e-6)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    card = read_card(out)
    assert card["tuned"] == 3 and card["direction"] == "backward"  # SECOND's card, with the record
    assert card["averaged"]["weight"] == 0.25 and card["averaged"]["first"]["card"] == read_card(first)
    hf = AutoModelForCausalLM.from_pretrained(out)  # a plain HF checkpoint
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.unk_token_id not in tokenizer("你好", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(hf(ids).logits, m(ids).logits)


def test_average_models_refuses_what_is_not_two_checkpoints_of_one_model(tmp_path, random_bot_dir):
    from dialogpt_zh.errors import UserError

    avg = _average_module()
    first = random_bot_dir / "backward"
    second = _finetuned_copy(first, tmp_path / "second", seed=4)
    with pytest.raises(UserError, match="forward model cannot be averaged with a backward"):
        avg.average_models(first, random_bot_dir / "forward", 0.5, tmp_path / "o1")
    for weight in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="strictly between 0 and 1"):
            avg.average_models(first, second, weight, tmp_path / "o2")
    with pytest.raises(UserError, match="would overwrite an input"):
        avg.average_models(first, second, 0.5, second, overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="--overwrite"):
        avg.average_models(first, second, 0.5, tmp_path / "taken")
    other = tmp_path / "other_shape"
    from dialogpt_zh.checkpoint import read_card, save_checkpoint
    from dialogpt_zh.tokenizer import load_tokenizer
    from dialogpt_zh.training.presets import build_model

    tokenizer = load_tokenizer(first)
    save_checkpoint(build_model("tiny", tokenizer, dropout=0.0, n_layer=1), tokenizer, other, read_card(first))
    with pytest.raises(UserError, match="config differs .* n_layer"):
        avg.average_models(first, other, 0.5, tmp_path / "o3")
    from dialogpt_zh.tokenizer import build_char_tokenizer

    other_vocab = tmp_path / "other_vocab"
    small = build_char_tokenizer({"你": 3, "好": 2})
    save_checkpoint(build_model("tiny", small, dropout=0.0), small, other_vocab, read_card(first))
    with pytest.raises(UserError, match="tokenizer differs .* first difference at id"):
        avg.average_models(first, other_vocab, 0.5, tmp_path / "o3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert avg.main([str(first), str(second), "--weight", "2", "--output", str(tmp_path / "o4")]) == 2
