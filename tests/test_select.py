"""tljax.select: exact picks over synthetic sweeps, rank correlations, errors, the CLI."""

import json
import math
import os
import subprocess
import sys

import pytest
from scipy import stats

from tljax import select, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = math.nan


def _entry(step, acc, **scores):
    return {
        "step": step,
        "target_test/accuracy": acc,
        "source_test/accuracy": 0.9,
        **{f"validator/{name}": value for name, value in scores.items()},
    }


# run -> history. Designed so that: snd ties across runs at 3.0 (the earlier run wins),
# entropy ties within a run (the later step wins), dev's NaN is the first point a naive max
# would meet, dev's best score is in the collapsed run (never picked), and the oracle is not
# any validator's pick.
SWEEP = {
    "lr_0.1/seed_0": [
        _entry(100, 0.50, snd=1.0, dev=-2.0, entropy=-0.3),
        _entry(200, 0.70, snd=3.0, dev=NAN, entropy=-0.3),
    ],
    "lr_0.1/seed_1": [
        _entry(100, 0.60, snd=2.0, dev=-2.5, entropy=-0.9),
        _entry(200, 0.65, snd=3.0, dev=-0.5, entropy=-0.4),
    ],
    "lr_1.0": [
        _entry(100, 0.30, snd=0.5, dev=-0.1, entropy=-1.0),
        _entry(200, 0.25, snd=0.2, dev=-3.0, entropy=-2.0),
    ],
}


def _write_run(directory, history, status="ok", name="results.json"):
    os.makedirs(directory, exist_ok=True)
    results = {"status": status, "history": history, "final": history[-1] if history else {}}
    with open(os.path.join(directory, name), "w") as f:
        json.dump(results, f)  # NaN is written as the bare NaN that json.load reads back.


@pytest.fixture
def sweep(tmp_path):
    for run, history in SWEEP.items():
        _write_run(tmp_path / run, history, status="collapsed" if run == "lr_1.0" else "ok")
        # A run's own sub-directories are not runs.
        os.makedirs(tmp_path / run / "checkpoints" / "200", exist_ok=True)
    # An unfinished run whose scores would win every selection if it were read.
    _write_run(
        tmp_path / "lr_0.01",
        [_entry(100, 0.99, snd=99.0, dev=99.0, entropy=99.0)],
        name="results.partial.json",
    )
    return str(tmp_path)


def _by_validator(selection):
    return {entry["validator"]: entry for entry in selection["selections"]}


def test_load_points_reads_every_finished_run_sorted(sweep, capsys):
    points = select.load_points(sweep)
    assert [(p["run"], p["step"]) for p in points] == [
        ("lr_0.1/seed_0", 100),
        ("lr_0.1/seed_0", 200),
        ("lr_0.1/seed_1", 100),
        ("lr_0.1/seed_1", 200),
        ("lr_1.0", 100),
        ("lr_1.0", 200),
    ]
    assert points[4]["status"] == "collapsed"
    assert points[1]["target_test/accuracy"] == 0.70
    assert "skipping run 'lr_0.01'" in capsys.readouterr().err


def test_select_picks_exact_points(sweep):
    selection = select.select(sweep)
    assert selection["points"] == 6
    assert selection["workdir"] == os.path.abspath(sweep)
    # validators.NAMES order, then the oracle.
    assert [e["validator"] for e in selection["selections"]] == ["entropy", "snd", "dev", "oracle"]
    picks = {
        name: (e["run"], e["step"], e["score"], e["target_accuracy"])
        for name, e in _by_validator(selection).items()
    }
    assert picks == {
        "snd": ("lr_0.1/seed_0", 200, 3.0, 0.70),  # Tie with seed_1 at 200: earlier run.
        "entropy": ("lr_0.1/seed_0", 200, -0.3, 0.70),  # Tie with step 100: later step.
        "dev": ("lr_0.1/seed_1", 200, -0.5, 0.65),  # NaN skipped; the collapsed run too.
        "oracle": ("lr_0.1/seed_0", 200, 0.70, 0.70),
    }


def test_rank_correlation_matches_scipy_on_the_same_numbers(sweep):
    entries = _by_validator(select.select(sweep))
    # Over the runs not collapsed (lr_1.0 is).
    accuracies = [0.50, 0.70, 0.60, 0.65]
    snd = [1.0, 3.0, 2.0, 3.0]
    expected_snd = stats.spearmanr(snd, accuracies).statistic
    assert entries["snd"]["rank_correlation"] == pytest.approx(expected_snd)
    # dev's NaN point (the second) is left out of its correlation.
    dev = [-2.0, -2.5, -0.5]
    expected_dev = stats.spearmanr(dev, accuracies[:1] + accuracies[2:]).statistic
    assert entries["dev"]["rank_correlation"] == pytest.approx(expected_dev)
    assert expected_dev != pytest.approx(expected_snd)
    assert entries["oracle"]["rank_correlation"] is None


def test_rank_correlation_is_none_for_too_few_points_or_a_constant():
    points = [{"run": "a", "step": s, "target_test/accuracy": s / 10, "v": 1.0} for s in (1, 2, 3)]
    assert select.rank_correlation(points, "v") is None  # Constant score.
    assert select.rank_correlation(points[:2], "target_test/accuracy") is None
    assert select.rank_correlation(points, "target_test/accuracy") == pytest.approx(1.0)


def test_validator_filter_keeps_it_and_the_oracle(sweep):
    selection = select.select(sweep, ["snd"])
    assert [e["validator"] for e in selection["selections"]] == ["snd", "oracle"]


def test_unknown_validator_lists_the_available_ones(sweep):
    with pytest.raises(validate.DataError) as error:
        select.select(sweep, ["snf"])
    message = str(error.value)
    assert "Unknown validator 'snf'" in message
    assert "scored entropy, snd, dev" in message
    assert "did you mean 'snd'" in message


def test_a_validator_without_finite_scores_picks_nothing(tmp_path):
    _write_run(tmp_path, [_entry(1, 0.5, im=NAN, snd=1.0), _entry(2, 0.6, im=NAN, snd=0.5)])
    entries = _by_validator(select.select(str(tmp_path)))
    assert entries["im"]["run"] is None and entries["im"]["score"] is None
    # WORKDIR itself is the run.
    assert (entries["snd"]["run"], entries["snd"]["step"]) == (".", 1)


def test_files_and_table(sweep):
    selection = select.select(sweep)
    table = select.write_selection(sweep, selection)
    with open(os.path.join(sweep, "selection.json")) as f:
        assert json.load(f) == json.loads(json.dumps(selection))
    with open(os.path.join(sweep, "selection.md")) as f:
        assert f.read() == table + "\n"
    lines = table.splitlines()
    assert lines[0] == "| validator | run | step | target accuracy | rank correlation |"
    snd_r = _by_validator(selection)["snd"]["rank_correlation"]
    assert f"| snd | lr_0.1/seed_0 | 200 | 0.7000 | {snd_r:+.3f} |" in lines
    assert "| oracle | lr_0.1/seed_0 | 200 | 0.7000 | - |" in lines


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, r"WORKDIR '.*missing' does not exist"),
        (lambda root: os.makedirs(root), r"No results.json under '.*missing'"),
        (
            lambda root: _write_run(root, [_entry(1, 0.5)], name="results.partial.json"),
            r"No results.json under '.*missing' \(only unfinished runs: \.\)",
        ),
        (
            lambda root: _write_run(os.path.join(root, "run"), [{"step": 1, "x/loss": 1.0}]),
            r"not trained with validators \(config eval.validators\)",
        ),
        (
            lambda root: _write_run(root, [{"loss": 1.0}]),
            r"results.json: history\[0\] should be an object with an integer 'step'",
        ),
        (
            lambda root: _write_run(root, [_entry(1, "high", snd=1.0)]),
            r"Run '.', step 1: target_test/accuracy should be a number, got 'high'",
        ),
    ],
)
def test_bad_workdirs_raise_one_clear_error(tmp_path, make, message):
    root = str(tmp_path / "missing")
    make(root)
    with pytest.raises(validate.DataError, match=message):
        select.select(root)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tljax.select", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_and_prints_the_selection(sweep):
    proc = _cli(sweep, "--validator=dev")
    assert proc.returncode == 0, proc.stderr
    assert "| dev | lr_0.1/seed_1 | 200 | 0.6500 | +0.500 |" in proc.stdout
    with open(os.path.join(sweep, "selection.json")) as f:
        assert [e["validator"] for e in json.load(f)["selections"]] == ["dev", "oracle"]


def test_cli_missing_workdir_is_one_error_line_and_status_2(tmp_path):
    missing = str(tmp_path / "nowhere")
    proc = _cli(missing)
    assert proc.returncode == 2
    expected = f"Error: WORKDIR {missing!r} does not exist: expected a run's or sweep's workdir."
    assert proc.stderr == expected + "\n"


def test_a_relaunch_that_retrains_a_selected_step_replaces_its_checkpoint(tmp_path):
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from tljax import selection

    # A launch that died after saving selected/4 but before its next regular checkpoint.
    first = selection.BestCheckpoint(str(tmp_path), "im", [])
    assert first.consider(4, {"validator/im": 0.5}, {"w": jnp.zeros(2)})
    first.wait_until_finished()

    again = selection.BestCheckpoint(str(tmp_path), "im", [])
    assert again.consider(4, {"validator/im": 0.4}, {"w": jnp.ones(2)})
    again.wait_until_finished()
    restored = ocp.CheckpointManager(tmp_path / "selected").restore(4)
    np.testing.assert_array_equal(restored["w"], [1.0, 1.0])
