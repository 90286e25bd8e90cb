"""python -m tljax.rank: two tiny trained candidates ranked on a few target shots."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import shrink

from configs import pretrain
from tljax import cli, rank, ranking, train
from tljax.data.subsets import per_class_subset
from tljax.models import make_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "embedded_digits/mnist_m"
SHOTS = 3


@pytest.fixture(scope="module")
def candidates(data_dir, tmp_path_factory):
    """Workdirs of two 4-step classifier runs: all ten digits, and digits 0-4 (5 classes)."""
    root = tmp_path_factory.mktemp("candidates")
    paths = []
    for name, arg in (("all", ""), ("low", "classes=0-4")):
        workdir = str(root / name)
        train.train_and_evaluate(shrink(pretrain.get_config(arg), data_dir, steps=4), workdir)
        paths.append(workdir)
    return paths


@pytest.fixture(scope="module")
def target(data_dir):
    return rank.load_target(TARGET, "train", data_dir, SHOTS, shots_seed=0)


def direct_outputs(workdir, images):
    """Features and softmax computed without tljax.rank: orbax restore, the training network."""
    with open(os.path.join(workdir, "config.json")) as f:
        model_config = json.load(f)["model"]
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    params = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())["params"]
    model = make_classifier(model_config)

    @jax.jit
    def forward(params, floats):
        features = model.apply({"params": params}, floats, method="features")
        logits = model.apply({"params": params}, features, method="classify")
        return features, jax.nn.softmax(logits)

    floats = np.repeat(images, 3 // images.shape[-1], axis=-1).astype(np.float32) / 255.0
    return tuple(np.asarray(x) for x in forward(params, floats))


def test_target_shots_are_the_finetune_draw(data_dir, target):
    from tljax import data

    split = data.load_split(TARGET, "train", data_dir)
    expected = per_class_subset(split, SHOTS, seed=0)
    np.testing.assert_array_equal(target["label"], expected["label"])
    np.testing.assert_array_equal(target["image"], expected["image"])
    assert len(target["label"]) == 10 * SHOTS


def test_rows_are_the_scores_recomputed_directly(candidates, target):
    checked = [rank.check_candidate(path) for path in candidates]
    rows = rank.rank(checked, target, tuple(rank.SCORES))
    assert [row["logme"] for row in rows] == sorted((row["logme"] for row in rows), reverse=True)
    by_name = {row["candidate"]: row for row in rows}
    assert set(by_name) == set(candidates)
    for workdir in candidates:
        features, probs = direct_outputs(workdir, target["image"])
        labels = target["label"]
        row = by_name[workdir]
        assert row["logme"] == pytest.approx(ranking.logme(features, labels), rel=1e-4)
        assert row["leep"] == pytest.approx(ranking.leep(probs, labels), rel=1e-4)
        nce = ranking.negative_conditional_entropy(probs.argmax(1), labels)
        assert row["nce"] == pytest.approx(nce, rel=1e-4)
    # The 5-class candidate's LEEP / NCE live in its own 5-class label space.
    low = next(c for c in checked if c.name.endswith("low"))
    assert rank.source_outputs(low, target["image"])[1].shape == (10 * SHOTS, 5)


def test_h_score_of_the_features_rank_computes(candidates, target):
    # The H-score inverts a rank-deficient covariance (30 examples, 768 dimensions), so it is
    # checked on rank's own features rather than across two float32 forward passes.
    candidate = rank.check_candidate(candidates[0])
    features, probs = rank.source_outputs(candidate, target["image"])
    expected = ranking.h_score(features, target["label"])
    [row] = rank.rank([candidate], target, ("hscore",))
    assert row["hscore"] == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_table_names_each_scores_pick():
    rows = [
        {"candidate": "a", "logme": 2.0, "leep": -1.0},
        {"candidate": "b", "logme": 1.0, "leep": -0.5},
    ]
    table = rank.format_table(rows, ("logme", "leep"))
    assert table.splitlines()[:4] == [
        "| candidate | logme | leep |",
        "|---|---:|---:|",
        "| a | 2.0000 | -1.0000 |",
        "| b | 1.0000 | -0.5000 |",
    ]
    assert "logme picks a" in table and "leep picks b" in table


def test_scores_equal_up_to_rounding_pick_nobody():
    rows = [
        {"candidate": "a", "hscore": 9.0 + 3e-12, "logme": 0.1},
        {"candidate": "b", "hscore": 9.0 - 2e-12, "logme": 0.1 + 1e-3},
    ]
    assert rank.picks(rows, ("hscore", "logme")) == {"hscore": None, "logme": "b"}
    assert "hscore ties for every candidate: no pick" in rank.format_table(rows, ("hscore",))


def test_parse_scores():
    assert rank.parse_scores("all") == ("logme", "leep", "nce", "hscore")
    assert rank.parse_scores("hscore,logme") == ("logme", "hscore")
    with pytest.raises(rank.RankInputError, match="--score=lgome: choose 'all' or any of"):
        rank.parse_scores("lgome")


def _write_config(workdir, config):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)


def test_bad_candidates_are_named(tmp_path):
    with pytest.raises(rank.RankInputError, match="nowhere is not a directory"):
        rank.check_candidate(str(tmp_path / "nowhere"))
    with pytest.raises(rank.RankInputError, match="no config.json or results.json"):
        rank.check_candidate(str(tmp_path))
    dann = str(tmp_path / "dann")
    _write_config(dann, {"method": "dann", "model": {"num_classes": 10}})
    with pytest.raises(rank.RankInputError, match="is a 'dann' run .* ranks classifier runs"):
        rank.check_candidate(dann)
    untrained = str(tmp_path / "untrained")
    _write_config(untrained, pretrain.get_config().to_dict() | {"data": {}})
    with pytest.raises(rank.RankInputError, match="untrained holds no checkpoint"):
        rank.check_candidate(untrained)


def test_bad_targets_are_named(data_dir, tmp_path):
    with pytest.raises(rank.RankInputError, match="--target=embedded_digits/nothing split"):
        rank.load_target("embedded_digits/nothing", "train", data_dir, None, 0)
    with pytest.raises(rank.RankInputError, match="fewer than 5000 shots"):
        rank.load_target(TARGET, "train", data_dir, 5000, 0)
    with pytest.raises(rank.RankInputError, match="--data_dir=.*missing is not a directory"):
        rank.load_target(TARGET, "train", str(tmp_path / "missing"), None, 0)


def test_images_the_network_does_not_take_are_refused(candidates):
    candidate = rank.check_candidate(candidates[0])
    with pytest.raises(rank.RankInputError, match=r"takes 28x28 images .* are 32x32x3"):
        rank.check_images(candidate, np.zeros((2, 32, 32, 3), np.uint8))


def _rank_cli(*args):
    # The candidates were saved on this process's 4 CPU devices; the command runs on one.
    return subprocess.run(
        [sys.executable, "-m", "tljax.rank", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_prints_and_writes_the_ranking(candidates, target, data_dir, tmp_path):
    out = tmp_path / "ranking.json"
    proc = _rank_cli(
        f"--target={TARGET}",
        f"--candidates={','.join(candidates)}",
        f"--shots={SHOTS}",
        f"--data_dir={data_dir}",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    expected = rank.rank([rank.check_candidate(p) for p in candidates], target, tuple(rank.SCORES))
    assert [row["candidate"] for row in report["candidates"]] == [
        row["candidate"] for row in expected
    ]
    for got, want in zip(report["candidates"], expected, strict=True):
        for name in ("logme", "leep", "nce"):
            assert got[name] == pytest.approx(want[name], rel=1e-5)
    assert report["picks"] == rank.picks(report["candidates"], rank.SCORES)
    assert report["examples"] == 10 * SHOTS
    assert f"logme picks {report['picks']['logme']}" in proc.stdout
    assert "| candidate | logme | leep | nce | hscore |" in proc.stdout


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path):
    proc = _rank_cli(f"--target={TARGET}", f"--candidates={tmp_path / 'nowhere'}")
    assert proc.returncode == cli.EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [
        f"Error: Candidate {tmp_path / 'nowhere'} is not a directory; expected a finished run's "
        "workdir."
    ]


@pytest.mark.slow
def test_a_folder_target_is_read_at_the_candidates_image_size(candidates, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (tmp_path / "target" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "target" / name / f"{i}.png")
    out = tmp_path / "ranking.json"
    proc = _rank_cli(
        f"--target=folder:{tmp_path / 'target'}",
        f"--candidates={candidates[0]}",
        "--shots=2",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["examples"] == 6
