"""Domain adaptation from config: term lists, recipes, validators and the selected checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import shrink

from configs import da as da_config
from tljax import selection, sweep, train, validate, validators
from tljax.methods import da

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_term_lists_parse_in_order_with_default_weight_one():
    assert da.parse_terms("dann:1,mcc:0.5") == [("dann", 1.0), ("mcc", 0.5)]
    assert da.parse_terms("dann") == [("dann", 1.0)]
    assert da.parse_terms("") == [] and da.parse_terms("none") == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dan_n:1", "unknown term 'dan_n'"),
        ("dann:x", "the weight of 'dann' must be a number, got 'x'"),
        ("dann:1,dann:2", "lists a term twice"),
    ],
)
def test_bad_term_lists_are_refused_naming_the_field(spec, message):
    with pytest.raises(validate.ConfigError, match="da.terms=") as error:
        da.parse_terms(spec)
    assert message in str(error.value)


def test_every_recipe_builds_a_config_whose_terms_exist():
    for recipe, (terms, _, module) in da_config.RECIPES.items():
        config = da_config.get_config(f"method={recipe}")
        assert config.method == module and config.da.recipe == recipe
        assert [name for name, _ in da.parse_terms(config.da.terms)] == [
            name for name, _ in da.parse_terms(terms)
        ]


def test_scale_multiplies_every_weight_and_short_names_map_to_the_offline_domains():
    config = da_config.get_config("method=bsp,scale=0.5,source=syn_digits,target=mnist")
    assert da.parse_terms(config.da.terms) == [("cdan", 0.5), ("bsp", 0.00005)]
    assert (config.data.source, config.data.target) == (
        "embedded_digits/syn_digits",
        "embedded_digits/mnist",
    )
    assert da_config.get_config("source=my_tfds_name").data.source == "my_tfds_name"


def test_the_default_is_the_recommended_recipe_with_its_validator():
    config = da_config.get_config()
    recipe, validator = da_config.RECOMMENDED
    assert config.da.recipe == recipe and config.eval.select_by == validator
    assert validator in validators.NAMES


@pytest.mark.parametrize("arg, message", [("method=all", "--sweep"), ("method=x", "choose one")])
def test_bad_methods_are_refused(arg, message):
    with pytest.raises(validate.ConfigError, match=message):
        da_config.get_config(arg)


def test_the_sweep_covers_every_recipe_scale_and_seed():
    points = da_config.get_sweep("seeds=2,scales=0.3+1")
    names = {point["name"] for point in points}
    assert "source_only_x1_seed1" in names and "source_only_x0.3_seed0" not in names
    assert "cdan_e_x0.3_seed0" in names and "cdan_e_x1_seed1" in names
    with_terms = sum(1 for _, (terms, _, _) in da_config.RECIPES.items() if terms)
    without = len(da_config.RECIPES) - with_terms
    assert len(points) == 2 * (2 * with_terms + without)
    assert len(da_config.get_sweep("method=dann,seeds=3")) == 6


def test_select_by_needs_a_known_validator():
    with pytest.raises(validate.ConfigError, match="expected one of"):
        selection.check_select_by("accuracy", validators.NAMES)
    with pytest.raises(validate.ConfigError, match="scores no validators"):
        selection.check_select_by("snd", None)
    selection.check_select_by(None, None)


def test_best_entry_picks_the_highest_finite_score_latest_on_ties():
    history = [
        {"step": 1, "validator/snd": 0.5, "target_test/accuracy": 0.1},
        {"step": 2, "validator/snd": float("nan"), "target_test/accuracy": 0.9},
        {"step": 3, "validator/snd": 0.7, "target_test/accuracy": 0.3},
        {"step": 4, "validator/snd": 0.7, "target_test/accuracy": 0.4},
    ]
    best = selection.best_entry(history, "snd")
    assert best["step"] == 4 and best["metrics"]["target_test/accuracy"] == 0.4
    assert selection.best_entry(history, "bnm") is None


def test_a_run_scores_validators_and_keeps_the_checkpoint_its_validator_picks(
    tiny_da_config, tmp_path
):
    config = tiny_da_config
    config.train.steps, config.eval.every, config.checkpoint.every = 6, 2, 6
    config.eval.select_by = "im"
    results = train.train_and_evaluate(config, str(tmp_path))

    history = results["history"]
    assert [entry["step"] for entry in history] == [2, 4, 6]
    for entry in history:
        assert {f"validator/{name}" for name in validators.NAMES} <= set(entry)
        assert np.isfinite([entry[f"validator/{name}"] for name in validators.NAMES]).all()
    scores = [entry["validator/im"] for entry in history]
    best = history[int(np.argmax(scores))]
    selected = results["selected"]
    assert selected["validator"] == "im" and selected["step"] == best["step"]
    assert selected["metrics"]["target_test/accuracy"] == best["target_test/accuracy"]
    assert os.listdir(tmp_path / "selected") == [str(best["step"])]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["selected"] == selected


def test_source_only_recipe_trains_without_target_batches(tiny_da_config):
    tiny_da_config.da.terms = ""
    method = da.build(tiny_da_config)
    assert [stream.name for stream in method.train_streams] == ["source"]
    # The validators still see unlabelled target images (never their labels).
    assert set(method.validation_sets["target_unlabelled"]) == {"image"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(da_config.RECIPES))
def test_every_recipe_trains_a_few_steps_and_scores_its_validators(recipe, data_dir, tmp_path):
    config = shrink(da_config.get_config(f"method={recipe}"), data_dir, steps=4, eval_every=2)
    config.eval.validator_examples = 64
    config.eval.batch_size = 200
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["status"] == "ok" and [e["step"] for e in results["history"]] == [2, 4]
    final = results["final"]
    assert np.isfinite(final["train/loss"])
    assert {f"validator/{name}" for name in validators.NAMES} <= set(final)
    # Each term (and SHOT's stages) logs its own losses beside the base's.
    base = {"train/loss", "train/class_loss", "train/source_accuracy", "train/lr"}
    own = {key for key in final if key.startswith("train/")} - base - {"train/grl_lambda"}
    assert bool(own) == (recipe != "source_only"), own
    assert np.isfinite([final[key] for key in own]).all()
    assert results["selected"]["validator"] == da_config.RECOMMENDED[1]


def test_the_sweep_and_select_commands_pick_a_run_and_step(data_dir, tmp_path):
    workdir = str(tmp_path / "sweep")
    overrides = {
        "data.data_dir": data_dir,
        "train.steps": 4,
        "train.batch_size": 16,
        "eval.every": 2,
        "checkpoint.every": 4,
        "eval.batch_size": 200,
        "eval.validator_examples": 64,
    }
    results = sweep.run_sweep(
        "configs/da.py:method=dann,seeds=1,scales=0.3+1", workdir, overrides, log=lambda _: None
    )
    assert sorted(results) == ["dann_x0.3_seed0", "dann_x1_seed0"]
    completed = subprocess.run(
        [sys.executable, "-m", "tljax.select", workdir, "--validator=im"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    chosen = json.loads((tmp_path / "sweep" / "selection.json").read_text())
    by_validator = {entry["validator"]: entry for entry in chosen["selections"]}
    assert set(by_validator) == {"im", "oracle"} and chosen["points"] == 4
    points = [
        (entry["validator/im"], entry["step"], name)
        for name, run in results.items()
        for entry in run["history"]
    ]
    score, step, run = max(points)
    assert (by_validator["im"]["run"], by_validator["im"]["step"]) == (run, step)
