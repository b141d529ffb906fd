"""Trainer: learning, exact resume, direction reversal, loss masking, HF loading, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_fixture_store

from dialogpt_zh.data.store import TokenStore
from dialogpt_zh.errors import UserError
from dialogpt_zh.tokenizer import encode
from dialogpt_zh.train import main
from dialogpt_zh.training.batches import IGNORE_INDEX, collate, plan_batches
from dialogpt_zh.training.config import TrainConfig, for_device
from dialogpt_zh.training.loop import train

TINY = dict(preset="tiny", lr=3e-3, batch_tokens=256, seed=0, device="cpu", eval_windows=0)


def _config(store: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(store), output=str(out), **{**TINY, **kw})


STORE_CONFIG = {"max_turns": 8, "max_tokens": 256, "mask_pii": True, "seed": 42}  # as a preprocessor writes it
CORPORA = [{"path": "corpus/fixtures/chitchat_train.txt", "licence": "written for this project"}]


@pytest.fixture(scope="module")
def carded_store(tmp_path_factory, fixture_tokenizer, fixture_sessions) -> Path:
    """The fixture store, its manifest also recording the cleaning options and the corpora's licences."""
    return build_fixture_store(tmp_path_factory.mktemp("carded") / "store", fixture_tokenizer, fixture_sessions,
                               config=STORE_CONFIG, corpora=CORPORA)


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory, carded_store):
    out = tmp_path_factory.mktemp("fwd") / "model"
    metrics = train(_config(carded_store, out, max_steps=30, eval_every=10, dropout=0.0))
    return out, metrics


def test_loss_decreases_and_outputs_are_written(forward_run, carded_store):
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
        (carded_store / "manifest.json").read_bytes()).hexdigest()
    assert card["store_config"] == STORE_CONFIG and card["corpora"] == CORPORA
    assert card["command"] == f"python -m dialogpt_zh.train --config {out / 'run.json'}"
    assert json.loads((out / "run.json").read_text(encoding="utf-8")) == card["config"]
    assert card["config"]["max_steps"] == 30 and card["config"]["data"] == str(carded_store)
    assert card["schedule"]["total_steps"] == 30 and card["schedule"]["warmup_steps"] == 1
    assert card["model_config"]["n_layer"] == 2


def test_checkpoint_loads_with_plain_transformers(forward_run, carded_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = forward_run
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    store = TokenStore(carded_store)
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


RESUME_OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"pack": 64, "prefetch": 0}, id="packed-rows-no-prefetch"),
    pytest.param({"precision": "bf16", "prefetch": 3}, id="bf16-autocast"),
    pytest.param({"compile": "on"}, id="compiled", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options", RESUME_OPTIONS)
def test_resume_continues_exactly(tmp_path, fixture_store, options):
    """Stopped at step 7 (by should_stop, as Ctrl-C would) and resumed: the same updates as a run never stopped,
    with every speed setting (each also runs in-process after runs of other precisions: no accelerate reset)."""
    from safetensors.torch import load_file

    common = dict(max_steps=12, eval_every=5, grad_accum=2, dropout=0.1, batch_tokens=128, **options)
    straight = train(_config(fixture_store, tmp_path / "straight", **common))
    asked = []
    first = train(_config(fixture_store, tmp_path / "split", **common),
                  should_stop=lambda step: asked.append(step) or step == 7)
    assert first["stopped"] == "interrupted" and first["step"] == 7 and asked == list(range(1, 8))
    assert (tmp_path / "split" / "model.safetensors").is_file()  # the best model so far is already there
    resumed = train(_config(fixture_store, tmp_path / "split", resume=True, **common))
    assert resumed["step"] == 12 and resumed["stopped"] == "max_steps"
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["precision"] == options.get("precision", "fp32")
    a = load_file(tmp_path / "straight" / "resume" / "model.safetensors")
    b = load_file(tmp_path / "split" / "resume" / "model.safetensors")
    assert a.keys() == b.keys()
    if options.get("compile") == "on":
        # compiled CPU kernels are not bit-reproducible from run to run (two identical compiled runs already
        # differ by ~1e-8 relative from step 2): the same batches and lrs, losses and weights equal to rounding
        assert [h[2] for h in resumed["history"]["train"]] == [h[2] for h in straight["history"]["train"]]
        assert [h[1] for h in resumed["history"]["train"]] == pytest.approx(
            [h[1] for h in straight["history"]["train"]], rel=1e-5)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3  # Adam magnifies rounding: lr is 3e-3
    else:
        assert resumed["history"]["train"] == straight["history"]["train"]  # same losses and lrs, step by step
        assert all(torch.equal(a[k], b[k]) for k in a)
    if options.get("pack"):
        assert straight["padding_share"] < 0.5 and straight["pack"] == options["pack"]


def test_packed_and_padded_runs_learn_alike(tmp_path, fixture_store):
    """Same windows, same schedule, no dropout: packing changes which windows share a batch, not what is learnt."""
    common = dict(max_steps=20, eval_every=20, dropout=0.0, batch_tokens=128)
    padded = train(_config(fixture_store, tmp_path / "padded", **common))
    packed = train(_config(fixture_store, tmp_path / "packed", pack=64, **common))
    assert packed["valid_loss"] == pytest.approx(padded["valid_loss"], abs=0.15)
    assert packed["padding_share"] < padded["padding_share"] or padded["padding_share"] < 0.05
    assert packed["history"]["train"][-1][1] < packed["history"]["train"][0][1] - 0.5


def test_a_run_saved_before_packing_existed_resumes(tmp_path, fixture_store):
    """resume/state.json of an older version has no "pack" in its config: it resumes as an unpacked run."""
    common = dict(max_steps=6, eval_every=3, batch_tokens=128)
    train(_config(fixture_store, tmp_path / "old", **common), should_stop=lambda step: step == 3)
    path = tmp_path / "old" / "resume" / "state.json"
    state = json.loads(path.read_text(encoding="utf-8"))
    for key in ("pack", "compile", "prefetch"):
        del state["config"][key]
    state["config"]["batch_tokens"] = 128
    path.write_text(json.dumps(state), encoding="utf-8")
    assert train(_config(fixture_store, tmp_path / "old", resume=True, **common))["step"] == 6
    with pytest.raises(UserError, match="--pack 0 -> 64"):
        train(_config(fixture_store, tmp_path / "old", resume=True, pack=64, **{**common, "max_steps": 9}))


def test_device_defaults_fill_in_what_was_not_given():
    base = TrainConfig(data="d", output="o")
    assert base.batch_tokens is None and base.compile == "auto"
    cpu, cuda = for_device(base, "cpu"), for_device(base, "cuda")
    assert (cpu.batch_tokens, cpu.compile) == (4096, "off")
    assert (cuda.batch_tokens, cuda.compile) == (32768, "on")
    given = TrainConfig(data="d", output="o", batch_tokens=1000, compile="off")
    assert for_device(given, "cuda") == given
    assert for_device(TrainConfig(data="d", output="o", pack=8192), "cpu").batch_tokens == 8192


def test_pack_shorter_than_a_window_is_refused(tmp_path, capsys, fixture_store):
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "out", "--preset", "tiny", "--pack", "16",
                          "--device", "cpu"], capsys)
    assert code == 2 and "--pack" in err and "longest train window has 36 tokens" in err, err
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "out", "--preset", "tiny", "--pack", "512",
                          "--device", "cpu"], capsys)
    assert code == 2 and "--pack" in err and "256 positions" in err, err
    assert not (tmp_path / "out").exists()


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
    from dialogpt_zh.checkpoint import save_checkpoint
    from dialogpt_zh.tokenizer import build_char_tokenizer, count_chars
    from dialogpt_zh.training.presets import build_model

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
    # --overwrite replaces a training run, never another directory (here a bot's forward/ + backward/)
    bot = tmp_path / "bot"
    (bot / "forward").mkdir(parents=True)
    (bot / "forward" / "config.json").write_text("{}", encoding="utf-8")
    code, err = _run_cli(["--data", fixture_store, "--output", bot, "--preset", "tiny", "--overwrite"], capsys)
    assert code == 2 and "is not a training output" in err
    assert (bot / "forward" / "config.json").is_file()


def test_out_of_memory_is_a_clear_error(tmp_path, capsys, fixture_store, monkeypatch):
    import dialogpt_zh.training.loop as train_module

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


# ------------------------------------------------------------------ run configs replay (--config)

def replayed_schedule(card: dict, metrics: dict):
    """The LR schedule that the card's config replays to (through `--config`, as a recipe would),
    or a reason why it cannot be derived here."""
    from dialogpt_zh.cli import make_parser, parse
    from dialogpt_zh.training.config import make_schedule

    with __import__("tempfile").TemporaryDirectory() as tmp:
        path = Path(tmp) / "card.json"
        path.write_text(json.dumps(card), encoding="utf-8")
        (config,) = parse(make_parser([TrainConfig], "train", ""), ["--config", str(path)])
    batches_per_epoch = card.get("schedule", {}).get("batches_per_epoch")
    if batches_per_epoch is None and config.max_steps == 0:
        return config, None  # an old card of an --epochs run: its length needs the store, which is not recorded
    return config, make_schedule(config, batches_per_epoch or 0)


def assert_schedule_matches(config: TrainConfig, schedule, card: dict, metrics: dict) -> None:
    lrs = [(step, lr) for step, _, lr in metrics["history"]["train"]]
    assert len(lrs) == card["trained_steps"] > 0
    for step, lr in lrs:  # the lr of step s (1-based) is the schedule's factor at s - 1: warmup, decay, floor
        assert lr == pytest.approx(config.lr * schedule.factor(step - 1), rel=1e-9), step
    if "total_steps" in metrics:
        assert metrics["total_steps"] == schedule.total_steps
    if "schedule" in card:
        assert card["schedule"]["warmup_steps"] == schedule.warmup_steps
        assert card["schedule"]["total_steps"] == schedule.total_steps


def test_run_config_replays_the_run_and_its_schedule(tmp_path, forward_run, carded_store):
    from dialogpt_zh.cli import make_parser, parse

    out, metrics = forward_run
    card = json.loads((out / "dialogpt_zh.json").read_text(encoding="utf-8"))
    (replayed,) = parse(make_parser([TrainConfig], "train", ""), ["--config", str(out / "run.json")])
    # run.json records the device's defaults as they were filled in (--compile auto -> off on CPU)
    assert replayed == for_device(_config(carded_store, out, max_steps=30, eval_every=10, dropout=0.0), "cpu")
    assert replayed.compile == "off" and replayed.batch_tokens == TINY["batch_tokens"]
    (overridden,) = parse(make_parser([TrainConfig], "train", ""),
                          ["--config", str(out / "run.json"), "--output", "elsewhere", "--lr", "0.01"])
    assert overridden.output == "elsewhere" and overridden.lr == 0.01 and overridden.max_steps == 30
    config, schedule = replayed_schedule(card, metrics)
    assert_schedule_matches(config, schedule, card, metrics)
    # an --epochs run: the card records batches per epoch, so the length replays without the store
    epochs_run = train(_config(carded_store, tmp_path / "ep", epochs=2, eval_every=1000, grad_accum=3,
                               warmup_steps=-1, batch_tokens=512))
    ep_card = json.loads((tmp_path / "ep" / "dialogpt_zh.json").read_text(encoding="utf-8"))
    config, schedule = replayed_schedule(ep_card, epochs_run)
    assert schedule.total_steps == -(-2 * ep_card["schedule"]["batches_per_epoch"] // 3) == epochs_run["step"]
    assert_schedule_matches(config, schedule, ep_card, epochs_run)
    # an old-format card (no "schedule") of a --max-steps run replays from its config alone
    old_card = {k: v for k, v in card.items() if k != "schedule"}
    config, schedule = replayed_schedule(old_card, metrics)
    assert_schedule_matches(config, schedule, old_card, metrics)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_committed_card_config_replays_to_the_recorded_schedule(direction):
    model_dir = Path(__file__).resolve().parent.parent / "checkpoints" / "default" / direction
    card = json.loads((model_dir / "dialogpt_zh.json").read_text(encoding="utf-8"))
    metrics = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    if "averaged" in card:  # two runs averaged (corpus/recipes/average_models.py): each run's card and figures
        runs = [(card["averaged"]["first"]["card"], metrics["averaged"]["first"]),
                (card, metrics["averaged"]["second"])]
    else:
        runs = [(card, metrics)]
    for run_card, run_metrics in runs:
        config, schedule = replayed_schedule(run_card, run_metrics)
        if schedule is None:
            pytest.skip(f"{model_dir} holds an old card of an --epochs run (epochs={config.epochs}): its schedule "
                        "length depends on its store, which the card does not record")
        assert config.direction == direction
        assert_schedule_matches(config, schedule, run_card, run_metrics)


def test_resuming_a_finished_run_changes_nothing(tmp_path, forward_run):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(forward_run[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    metrics = main(["--config", str(out / "run.json"), "--output", str(out), "--resume"])
    assert metrics == 0
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["history"]["valid"] == forward_run[1]["history"]["valid"]  # no duplicate validation entry
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------ hostile input: refused up front, named

BAD_SETTINGS = [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--dropout", "2"], "--dropout"), (["--dropout", "-0.5"], "--dropout"), (["--dropout", "1"], "--dropout"),
    (["--n-head", "3"], "--n-head"), (["--n-embd", "100", "--n-head", "3"], "--n-head"),
    (["--n-layer", "0"], "--n-layer"), (["--n-embd", "-8"], "--n-embd"), (["--n-positions", "0"], "--n-positions"),
    (["--eval-windows", "-1"], "--eval-windows"), (["--eval-every", "0"], "--eval-every"),
    (["--batch-size", "-5"], "--batch-size"), (["--batch-tokens", "-1"], "--batch-tokens"),
    (["--batch-tokens", "0", "--batch-size", "0"], "--batch-tokens"),
    (["--weight-decay", "-5"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"), (["--max-grad-norm", "inf"], "--max-grad-norm"),
    (["--grad-accum", "0"], "--grad-accum"), (["--warmup-steps", "-2"], "--warmup-steps"),
    (["--epochs", "-1"], "--epochs"), (["--epochs", "0", "--max-steps", "0"], "--epochs"),
    (["--max-steps", "-3"], "--max-steps"), (["--patience", "-1"], "--patience"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"), (["--threads", "100000"], "--threads"),
    (["--threads", "-2"], "--threads"), (["--pack", "-1"], "--pack"), (["--prefetch", "-1"], "--prefetch"),
    (["--pack", "64", "--batch-size", "4"], "--pack"), (["--pack", "512", "--batch-tokens", "256"], "--batch-tokens"),
]


@pytest.mark.parametrize("flags,named", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_up_front(tmp_path, capsys, fixture_store, flags, named):
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "out", "--preset", "tiny", *flags], capsys)
    assert code == 2 and err.startswith(f"error: {named}: ") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_refused_up_front(tmp_path, capsys, fixture_store):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = _run_cli(["--data", fixture_store, "--output", tmp_path / "out", "--device", "cuda"], capsys)
    assert code == 2 and "--device" in err and "no GPU" in err
    assert not (tmp_path / "out").exists()


def test_bad_config_files_are_named(tmp_path, capsys, fixture_store):
    cases = {"not json": ("{", "not valid JSON"), "list": ("[1]", "JSON object"),
             "unknown": ('{"lrr": 1}', "unknown setting"), "type": ('{"lr": "fast"}', "'fast'"),
             "choice": ('{"direction": "sideways"}', "sideways"), "bool for int": ('{"epochs": true}', "True"),
             "bad value": ('{"lr": -1}', "--lr")}
    for name, (text, expected) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        code, err = _run_cli(["--config", path, "--data", fixture_store, "--output", tmp_path / "out"], capsys)
        assert code == 2 and expected in err and "Traceback" not in err, (name, err)
        assert str(path) in err or expected == "--lr", (name, err)
    code, err = _run_cli(["--config", tmp_path / "missing.json"], capsys)
    assert code == 2 and "missing.json" in err and "not found" in err


def test_bad_outputs_are_refused_before_training(tmp_path, capsys, fixture_store, forward_run, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me", encoding="utf-8")
    base = ["--data", fixture_store, "--preset", "tiny", "--max-steps", "2", "--device", "cpu"]
    code, err = _run_cli([*base, "--output", a_file], capsys)
    assert code == 2 and "not a directory" in err and "a_file" in err
    code, err = _run_cli([*base, "--output", a_file / "model"], capsys)
    assert code == 2 and "is not a directory" in err and "a_file" in err
    assert a_file.read_text(encoding="utf-8") == "keep me"
    manifest = (fixture_store / "manifest.json").read_bytes()
    for output in (fixture_store, fixture_store / "model", fixture_store.parent):  # over or around the input
        code, err = _run_cli([*base, "--output", output, "--overwrite"], capsys)
        assert code == 2 and "--data overlap" in err, err
    assert (fixture_store / "manifest.json").read_bytes() == manifest and not (fixture_store / "model").exists()
    code, err = _run_cli([*base, "--output", forward_run[0], "--init", forward_run[0], "--overwrite"], capsys)
    assert code == 2 and "--init overlap" in err
    # a parent we may not write in (simulated: root may write anywhere)
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    code, err = _run_cli([*base, "--output", tmp_path / "ro" / "model"], capsys)
    assert code == 2 and "cannot write" in err and "permission denied" in err and str(tmp_path) in err


def test_read_only_parent_is_refused_before_training(tmp_path, capsys, fixture_store):
    import os

    if os.geteuid() == 0:
        pytest.skip("root may write into a read-only directory")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, err = _run_cli(["--data", fixture_store, "--output", parent / "model", "--preset", "tiny"], capsys)
    finally:
        parent.chmod(0o755)
    assert code == 2 and "cannot write" in err and not (parent / "model").exists()


def _damage_random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_nan(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})


def _damage_evil_pickle(path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (eval, ("__import__('os').system('touch /tmp/dialogpt_zh_pwned')",))

    # protocol 2, as torch.save writes: a file that looks like ours (no "unusual protocol" warning on the way)
    path.write_bytes(pickle.dumps({"optimizer": Evil(), "scheduler": {}}, protocol=2))


def _damage_random_seed(seed: int):
    """4 KiB of random bytes from `seed`: different seeds break the unpickler in different ways."""
    return lambda path: path.write_bytes(np.random.default_rng(seed).bytes(4096))


# Random bytes that make torch's weights-only unpickler raise something other than UnpicklingError (found by
# trying seeds: IndexError "pop from empty list", IndexError, KeyError, UnicodeDecodeError).
UNPICKLER_CRASH_SEEDS = [17, 21, 62, 76]


RESUME_DAMAGE = [
    ("state.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    ("state.json", lambda p: p.write_text('{"step": "seven"}'), "'step'"),
    ("state.json", lambda p: p.write_text('{"step": 3}'), "missing"),
    ("state.json", lambda p: p.write_text('{"step": 3, "batch_index": -1, "epoch": 0, "config": {}, '
                                          '"model_config": {}}'), "negative"),
    ("state.json", lambda p: p.write_text('{"step": 3, "spam": 1}'), "'spam'"),
    ("state.json", lambda p: p.write_text('{"step": '), "damaged resume state"),
    ("model.safetensors", lambda p: p.unlink(), "resume weights are missing"),
    ("model.safetensors", _damage_truncate, "damaged resume weights"),
    ("model.safetensors", _damage_random, "damaged resume weights"),
    ("model.safetensors", _damage_nan, "NaN"),
    ("optimizer.pt", _damage_random, "damaged resume optimizer state"),
    ("optimizer.pt", _damage_random_seed(UNPICKLER_CRASH_SEEDS[0]), "damaged resume optimizer state"),
    ("optimizer.pt", _damage_truncate, "damaged resume optimizer state"),
    ("optimizer.pt", _damage_evil_pickle, "damaged resume optimizer state"),
    ("optimizer.pt", lambda p: torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}, p),
     "does not fit"),
    ("optimizer.pt", lambda p: p.unlink(), "optimizer state is missing"),
    ("rng_0.pt", lambda p: p.unlink(), "random-number state is missing"),
    ("rng_0.pt", _damage_random, "damaged resume random-number state"),
    ("rng_0.pt", lambda p: torch.save({"torch": torch.zeros(3)}, p), "random-number state"),
]


@pytest.mark.parametrize("name,damage,expected", RESUME_DAMAGE,
                         ids=[f"{n}-{e}" for n, _, e in RESUME_DAMAGE])
def test_damaged_resume_state_is_a_clear_error(tmp_path, capsys, forward_run, name, damage, expected):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(forward_run[0], out)
    damage(out / "resume" / name)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = _run_cli(["--config", out / "run.json", "--output", out, "--resume", "--max-steps", "32"], capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert str(out / "resume") in err, err  # names the file (or resume/ itself)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
    assert not Path("/tmp/dialogpt_zh_pwned").exists()


INIT_DAMAGE = [(_damage_truncate, "cannot load the model"), (_damage_random, "cannot load the model"),
               (_damage_nan, "NaN")]


@pytest.mark.parametrize("damage,expected", INIT_DAMAGE, ids=[e for _, e in INIT_DAMAGE])
def test_damaged_init_model_is_a_clear_error(tmp_path, capsys, forward_run, carded_store, damage, expected):
    import shutil

    init = tmp_path / "init"
    shutil.copytree(forward_run[0], init, ignore=shutil.ignore_patterns("resume"))
    damage(init / "model.safetensors")
    code, err = _run_cli(["--data", carded_store, "--output", tmp_path / "out", "--init", init], capsys)
    assert code == 2 and expected in err and str(init / "model.safetensors") in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_like_ctrl_c_and_kill_9_leaves_the_output_intact(tmp_path, fixture_store):
    import os
    import signal
    import subprocess
    import sys
    import time

    from dialogpt_zh.checkpoint import load_model, read_card, read_run_state

    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "dialogpt_zh.train", "--data", str(fixture_store), "--output", str(out),
           "--preset", "tiny", "--max-steps", "100000", "--eval-every", "3", "--batch-tokens", "256",
           "--device", "cpu", "--eval-windows", "0", "--seed", "0", "--threads", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def start_and_wait_for_a_save(extra: list[str], after_step: int) -> subprocess.Popen:
        proc = subprocess.Popen(cmd + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1200  # generous: a loaded CI box starts torch slowly
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "metrics.json").read_text(encoding="utf-8"))["step"] > after_step:
                    return proc
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        proc.kill()
        raise AssertionError(proc.communicate()[0].decode())

    proc = start_and_wait_for_a_save([], 0)
    proc.send_signal(signal.SIGTERM)  # what `kill` and `timeout` send
    log = proc.communicate(timeout=900)[0].decode()
    assert proc.returncode == 143, log
    assert "SIGTERM" in log and "resume with" in log and "Traceback" not in log
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["stopped"] == "interrupted" and read_run_state(out).step == metrics["step"]
    load_model(out)

    # kill -9 while it runs (maybe mid-save): the last complete output stays readable
    proc = start_and_wait_for_a_save(["--resume"], metrics["step"])
    proc.kill()
    proc.communicate(timeout=300)
    load_model(out)
    step = read_run_state(out).step
    assert read_card(out)["trained_steps"] == step > metrics["step"]
    (tmp_path / ".model.tmp-4000000-0123abcd").mkdir()  # what a kill during a save leaves (a dead pid)
    (tmp_path / ".model.rng").mkdir(exist_ok=True)  # the kill may already have left it
    args = cmd[3:]
    args[args.index("100000")] = str(step + 1)
    code = main(args + ["--resume"])
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert read_run_state(out).step == step + 1


@pytest.mark.parametrize("seed", UNPICKLER_CRASH_SEEDS + list(range(100, 140)))
def test_random_bytes_in_resume_tensor_files_are_a_clear_error(tmp_path, seed):
    """Whatever the unpickler trips on in a damaged optimizer.pt / rng_0.pt, the error names the file."""
    from dialogpt_zh.checkpoint import RESUME_DIR, load_resume_optimizer, load_resume_rng
    from dialogpt_zh.errors import UserError

    resume = tmp_path / RESUME_DIR
    resume.mkdir()
    for name, load in (("optimizer.pt", load_resume_optimizer), ("rng_0.pt", lambda out: load_resume_rng(out, 0))):
        _damage_random_seed(seed)(resume / name)
        with pytest.raises(UserError, match="damaged resume") as e:
            load(tmp_path)
        assert e.value.path is not None and Path(e.value.path) == resume / name
