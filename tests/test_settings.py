"""Settings: one validation with real bounds, the one MMI score, and the package's import graph (no cycles)."""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from dialogpt_zh import settings as S
from dialogpt_zh.errors import UserError

PACKAGE = Path(S.__file__).resolve().parent

# (field, hostile value, words the message must contain): every numeric setting, both ends and non-finite.
HOSTILE_SETTINGS = [
    ("num_candidates", 100_000, "[-1, 256]"), ("num_candidates", 0, "-1 (auto) or in [1, 256]"),
    ("num_candidates", -3, "[-1"),
    ("num_candidates", 2.5, "whole number"), ("num_candidates", "10", "number"), ("num_candidates", True, "number"),
    ("max_length", 100_000, "[1, 1024]"), ("max_length", 0, "[1, 1024]"),
    ("min_length", -1, "[0, 1024]"), ("max_history", 0, "[1, 1000]"), ("max_history", 10**9, "[1, 1000]"),
    ("max_context_tokens", 10**7, "[2, 8192]"), ("max_context_tokens", 1, "[2"),
    ("no_repeat_ngram_size", -1, "[0"), ("top_k", -1, "[0"), ("top_k", 10**9, "100000"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", math.nan, "finite"),
    ("temperature", math.inf, "finite"), ("temperature", -1.0, "[0, 100]"), ("temperature", math.nan, "finite"),
    ("temperature", 1e9, "[0, 100]"),
    ("repetition_penalty", 0.0, "[0.01"), ("repetition_penalty", math.inf, "finite"),
    ("repetition_penalty", -math.inf, "finite"),
    ("forward_weight", math.nan, "finite"), ("backward_weight", math.nan, "finite"),
    ("backward_weight", math.inf, "finite"), ("length_weight", -math.inf, "finite"),
    ("length_weight", 1e6, "[-1000, 1000]"), ("backward_weight", "1", "number"),
    ("normalize", "median", "'mean' or 'sum'"), ("use_mmi", "yes", "true or false"), ("blocklist", 3, "file path"),
]


@pytest.mark.parametrize("name,value,words", HOSTILE_SETTINGS)
def test_hostile_setting_is_refused_naming_the_field(name, value, words):
    cls = S.GenerationSettings if name in S.GENERATION_FIELDS else S.MMISettings
    with pytest.raises(S.SettingsError) as e:
        cls(**{name: value})
    assert str(e.value).startswith(f"{name}: ") and words in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    # a per-call override runs the same validation (dataclasses.replace calls __post_init__)
    with pytest.raises(S.SettingsError, match=name):
        S.apply_overrides(S.GenerationSettings(), S.MMISettings(), {name: value})


def test_valid_settings_are_normalised_and_defaults_are_in_bounds():
    gen = S.GenerationSettings(num_candidates=np.int64(7), max_length=30.0, temperature=0)
    assert (gen.num_candidates, gen.max_length, gen.temperature) == (7, 30, 0.0)
    assert type(gen.num_candidates) is int and type(gen.max_length) is int and type(gen.temperature) is float
    with pytest.raises(S.SettingsError, match="max_length: must be >= min_length"):
        S.GenerationSettings(min_length=10, max_length=5)
    with pytest.raises(S.SettingsError, match="unknown setting"):
        S.apply_overrides(S.GenerationSettings(), S.MMISettings(), {"top_kk": 1})
    for name, (lo, hi) in S.BOUNDS.items():
        default = getattr(S.GenerationSettings() if name in S.GENERATION_FIELDS else S.MMISettings(), name)
        assert lo <= default <= hi, name


def test_page_ranges_lie_inside_the_bounds():
    for name, (lo, hi, step) in S.PAGE_RANGES.items():
        blo, bhi = S.BOUNDS[name]
        assert blo <= lo < hi <= bhi and step > 0, name
        cls = S.GenerationSettings if name in S.GENERATION_FIELDS else S.MMISettings
        cls(**{name: lo}), cls(**{name: hi})  # both ends are valid settings


def test_bot_arguments_refuse_bad_combinations():
    with pytest.raises(S.SettingsError, match="backward: --backward needs --model"):
        S.BotArguments(backward="b")
    with pytest.raises(S.SettingsError, match="threads"):
        S.BotArguments(threads=-1)
    with pytest.raises(S.SettingsError, match="quantize"):
        S.BotArguments(quantize="int4")
    # the faces load fp16 weights unless told; the Python API's None means float32 weights
    assert S.BotArguments().quantize == "fp16"
    assert S.BotArguments(quantize=None).quantize == "none"


def test_mmi_score_and_ranking_weights_by_hand():
    # mean: fwd per reply token, bwd per context token; sum: as given
    assert S.mmi_score(-6.0, -20.0, 3, 10, 0.5, 1.0, 0.1, "mean") == pytest.approx(0.5 * -2 - 2 + 0.3)
    assert S.mmi_score(-6.0, -20.0, 3, 10, 0.5, 1.0, 0.1, "sum") == pytest.approx(-3 - 20 + 0.3)
    assert S.mmi_score(-6.0, -20.0, 3, 0, 0.0, 1.0, 0.0, "mean") == pytest.approx(-20.0)  # no context: no /0
    # a retrieved reply gets the bonus, a sampled one does not
    with_bonus = S.mmi_score(-6.0, -20.0, 3, 10, 0.5, 1.0, 0.1, "mean", True, 0.25)
    assert with_bonus == pytest.approx(0.5 * -2 - 2 + 0.3 + 0.25)
    assert S.mmi_score(-6.0, -20.0, 3, 10, 0.5, 1.0, 0.1, "mean", False, 0.25) == pytest.approx(0.5 * -2 - 2 + 0.3)
    # arrays, with weights broadcast across them (the evaluator's sweep scores a grid in one call)
    got = S.mmi_score(np.array([[-6.0, -4.0]]), np.array([[-20.0, -10.0]]), np.array([[3, 2]]), np.array([[10, 0]]),
                      np.array([[0.5], [1.0]]), 1.0, 0.0, "mean")
    assert np.allclose(got, [[-1 - 2, -1 - 10], [-2 - 2, -2 - 10]])
    mmi = S.MMISettings(forward_weight=0.25, backward_weight=2.0, length_weight=0.5)
    assert S.ranking_weights(mmi, True) == (0.25, 2.0, 0.5)
    assert S.ranking_weights(mmi, False) == (1.0, 0.0, 0.5)        # MMI off: the forward score alone
    assert S.mmi_active(mmi, True) and not S.mmi_active(mmi, False)
    assert not S.mmi_active(dataclasses.replace(mmi, use_mmi=False), True)


def test_settings_module_is_pure():
    tree = ast.parse((PACKAGE / "settings.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "transformers", "gradio"}, imported


def test_auto_counts_resolve_by_the_index():
    """-1 (the default) for both counts: K by whether the bot has an index, then N by whether K > 0."""
    auto = S.GenerationSettings()
    assert (auto.num_candidates, auto.retrieval_candidates) == (-1, -1)
    resolved = S.resolve_auto(auto, has_index=True)
    assert (resolved.num_candidates, resolved.retrieval_candidates) == (
        S.AUTO_NUM_CANDIDATES_WITH_RETRIEVAL, S.AUTO_RETRIEVAL_CANDIDATES)
    resolved = S.resolve_auto(auto, has_index=False)
    assert (resolved.num_candidates, resolved.retrieval_candidates) == (S.AUTO_NUM_CANDIDATES, 0)
    off = S.resolve_auto(S.GenerationSettings(retrieval_candidates=0), has_index=True)
    assert (off.num_candidates, off.retrieval_candidates) == (S.AUTO_NUM_CANDIDATES, 0)
    given = S.resolve_auto(S.GenerationSettings(num_candidates=7, retrieval_candidates=3), has_index=False)
    assert (given.num_candidates, given.retrieval_candidates) == (7, 3)


# (command's arguments, field name, keyword arguments that make it otherwise valid): every face's --seed
SEEDED_ARGUMENTS = [
    ("dialogpt_zh.interact:InteractArgs", "seed", {}),
    ("dialogpt_zh.evaluate:EvalArgs", "seed", {}),
    ("dialogpt_zh.arena:ArenaArgs", "seed", {"make": "pairs.json"}),
    ("dialogpt_zh.data.pipeline:PreprocessArguments", "seed", {"output": "store"}),
    ("dialogpt_zh.training.config:TrainConfig", "seed", {"data": "store", "output": "run"}),
]


@pytest.mark.parametrize("target,name,kw", SEEDED_ARGUMENTS)
@pytest.mark.parametrize("value", [-1, 2**64, 10**30])
def test_every_face_refuses_a_seed_its_generators_cannot_take(target, name, kw, value):
    """A negative seed or one beyond what torch / numpy / scikit-learn take was a traceback mid-run (or after
    the first reply); it is refused when the arguments are made, naming the flag."""
    import importlib

    module, cls = target.split(":")
    args_type = getattr(importlib.import_module(module), cls)
    with pytest.raises(UserError, match="seed: must be in \\[0, "):
        args_type(**kw, **{name: value})
    args_type(**kw, **{name: 7})  # a plain seed still passes


def test_check_seed_bounds():
    S.check_seed(None, "seed")
    S.check_seed(0, "seed"), S.check_seed(S.SEED_MAX, "seed"), S.check_seed(np.int64(3), "seed")
    for bad, words in ((-1, "[0, "), (S.SEED_MAX + 1, "[0, "), (1.5, "whole number"), (True, "whole number"),
                       ("3", "whole number")):
        with pytest.raises(S.SettingsError, match="^my_seed: ") as e:
            S.check_seed(bad, "my_seed")
        assert words in str(e.value)
    with pytest.raises(S.SettingsError, match=r"\[0, 4294967295\]"):
        S.check_seed(2**32, "seed", maximum=2**32 - 1)


def _settings_parser():
    from dialogpt_zh import cli

    return cli, cli.make_parser([S.GenerationSettings, S.MMISettings], prog="settings", description="d")


@pytest.mark.parametrize("value,expected", [("-1e3", -1000.0), ("-2.5E-1", -0.25), ("-.5", -0.5), ("-7", -7.0)])
def test_negative_numbers_in_exponent_form_are_values_not_flags(value, expected):
    """argparse took `-1e3` for a flag: a valid weight was refused as "expected one argument"."""
    cli, parser = _settings_parser()
    _, mmi = cli.parse(parser, ["--length_weight", value])
    assert mmi.length_weight == expected


@pytest.mark.parametrize("value", ["-inf", "-1e309", "-nan", "-Infinity"])
def test_negative_non_finite_numbers_reach_the_settings_check(value, capsys):
    cli, parser = _settings_parser()
    with pytest.raises(S.SettingsError, match="^top_p: must be a finite number"):
        cli.parse(parser, ["--top_p", value])


def test_config_file_values_a_command_line_cannot_hold(tmp_path):
    """A number for a bool was an AttributeError traceback; a NUL in a path a ValueError in the os calls."""
    cli, parser = _settings_parser()
    config = tmp_path / "run.json"
    config.write_text('{"use_mmi": 0, "top_p": 0.5}', encoding="utf-8")
    assert cli.parse(parser, ["--config", str(config)])[1].use_mmi is False  # as `--use_mmi 0`
    config.write_text('{"use_mmi": 2}', encoding="utf-8")
    with pytest.raises(UserError, match="field 'use_mmi'.*not a valid value"):
        cli.parse(parser, ["--config", str(config)])
    config.write_text('{"blocklist": "words\\u0000.txt"}', encoding="utf-8")
    with pytest.raises(UserError, match="field 'blocklist'.*NUL"):
        cli.parse(parser, ["--config", str(config)])
