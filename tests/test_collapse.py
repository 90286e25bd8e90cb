"""The collapse monitor: chance-level training predictions stop the run (tljax/collapse.py)."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from helpers import shrink

from configs import dann
from configs._image_benchmarks import CONFIG_FILES as IMAGE_BENCHMARKS
from tljax import collapse, stopping, train, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(ROOT, "tests", "data", "healthy_train_metrics.json")

TEN = collapse.Classifier("class_loss", "accuracy", 10)
CHANCE = {"train/class_loss": math.log(10), "train/accuracy": 0.1}
LEARNING = {"train/class_loss": 0.9, "train/accuracy": 0.7}


def _monitor(num_steps=1000, classifiers=(TEN,), **settings):
    settings.setdefault("warmup_steps", 0)
    return collapse.Monitor(classifiers, collapse.Settings(**settings), num_steps)


def _fired_at(monitor, intervals, every=100):
    """The steps at which ``observe`` reports a collapse, one interval per ``every`` steps."""
    steps = range(every, every * (len(intervals) + 1), every)
    return [
        step
        for step, metrics in zip(steps, intervals, strict=True)
        if monitor.observe(step, metrics)
    ]


# ------------------------------------------------------------- the logic ----


def test_fires_after_patience_intervals_at_chance_and_only_once():
    monitor = _monitor(patience=3, warmup=0.0)
    assert _fired_at(monitor, [CHANCE] * 6) == [300]
    assert monitor.detected_at == 300 and monitor.stopped_at == 300
    assert monitor.fields() == {
        "status": "collapsed",
        "collapse": {
            "detected_at_step": 300,
            "at_chance_since_step": 100,
            "intervals_at_chance": 6,
        },
    }


def test_intervals_in_the_warmup_do_not_count():
    # warmup 0.25 of 1000 steps: the intervals ending at 100, 200 are not counted.
    monitor = _monitor(patience=2, warmup=0.25)
    assert _fired_at(monitor, [CHANCE] * 4) == [400]


def test_a_short_run_is_not_watched_before_warmup_steps():
    # 10% of a 60-step smoke test would be 6 steps; a network is still near chance there.
    monitor = _monitor(num_steps=60, patience=3, warmup=0.1, warmup_steps=100)
    assert _fired_at(monitor, [CHANCE] * 6, every=10) == []
    monitor = _monitor(num_steps=300, patience=3, warmup=0.1, warmup_steps=100)
    assert _fired_at(monitor, [CHANCE] * 12, every=25) == [175]


def test_a_healthy_interval_resets_the_count():
    monitor = _monitor(patience=3, warmup=0.0)
    intervals = [CHANCE, CHANCE, LEARNING, CHANCE, CHANCE, LEARNING, CHANCE, CHANCE, CHANCE]
    assert _fired_at(monitor, intervals) == [900]
    assert monitor.fields()["collapse"]["at_chance_since_step"] == 700


def test_a_learning_run_is_ok():
    monitor = _monitor(patience=1, warmup=0.0)
    assert _fired_at(monitor, [LEARNING] * 5) == []
    assert monitor.fields() == {"status": "ok"}


def test_chance_means_no_better_than_a_constant():
    settings = collapse.Settings()
    at = lambda loss, accuracy: collapse.at_chance(
        TEN, {"train/class_loss": loss, "train/accuracy": accuracy}, settings
    )
    assert at(2.3026, 0.1)
    assert at(2.25, 0.14)  # Within the margins (ln 10 = 2.303; 1/10).
    assert at(40.0, 0.09)  # A confidently wrong constant: a finite loss far above ln C.
    assert not at(2.0, 0.1)  # The loss has left chance.
    assert not at(2.3, 0.3)  # A few classes are told apart.


def test_one_classifier_at_chance_is_enough():
    tasks = (
        collapse.Classifier("task_loss/a", "accuracy/a", 10),
        collapse.Classifier("task_loss/b", "accuracy/b", 2),
    )
    monitor = _monitor(classifiers=tasks, patience=1, warmup=0.0)
    metrics = {
        "train/task_loss/a": 0.1,
        "train/accuracy/a": 0.98,
        "train/task_loss/b": math.log(2),
        "train/accuracy/b": 0.5,
    }
    assert monitor.observe(100, metrics)
    assert "task_loss/b=0.6931 (ln 2 = 0.6931)" in monitor.warning(100, metrics)
    assert "task_loss/a" not in monitor.warning(100, metrics)


def test_a_misnamed_metric_is_reported():
    monitor = _monitor(classifiers=(collapse.Classifier("class_loss", "acc", 10),), warmup=0.0)
    with pytest.raises(KeyError, match="'acc'"):
        monitor.observe(100, CHANCE)


def test_patience_zero_or_no_classifiers_watch_nothing():
    assert _fired_at(_monitor(patience=0, warmup=0.0), [CHANCE] * 5) == []
    assert _fired_at(_monitor(classifiers=(), warmup=0.0), [CHANCE] * 5) == []


def test_without_stop_the_run_is_marked_but_goes_on():
    monitor = _monitor(patience=2, warmup=0.0, stop=False)
    assert not monitor.update(100, CHANCE)
    assert not monitor.update(200, CHANCE)  # Found, warned, but no stop.
    assert monitor.stopped_at is None and monitor.fields()["status"] == "collapsed"


def test_a_resumed_launch_counts_on():
    first = _monitor(patience=3, warmup=0.0)
    _fired_at(first, [CHANCE, CHANCE])
    previous = {"last_step": 200, **first.fields()}
    config = ml_collections.ConfigDict({"train": {"steps": 1000}})
    resumed = collapse.monitor_for(config, (TEN,), previous, first_step=200)
    assert resumed.observe(300, CHANCE)  # The third in a row, as without the stop.
    # From an older checkpoint, only a collapse found by then is kept.
    older = collapse.monitor_for(config, (TEN,), previous, first_step=100)
    assert not older.observe(300, CHANCE) and older.fields()["collapse"]["intervals_at_chance"] == 1
    found = {"last_step": 500, "collapse": {"detected_at_step": 300, "intervals_at_chance": 5}}
    kept = collapse.monitor_for(config, (TEN,), found, first_step=400)
    assert kept.fields()["status"] == "collapsed"


def test_settings_come_from_the_optional_config_block():
    config = ml_collections.ConfigDict({"train": {"steps": 10}})
    assert collapse.settings_from_config(config) == collapse.Settings()
    config.train.collapse = collapse.config_block(patience=5, stop=False)
    assert collapse.settings_from_config(config) == collapse.Settings(patience=5, stop=False)
    config.train.collapse.warmup = 1.5
    with pytest.raises(validate.ConfigError, match="train.collapse.warmup=1.5"):
        collapse.settings_from_config(config)
    config.train.collapse = ml_collections.ConfigDict({"patiense": 3})
    with pytest.raises(validate.ConfigError, match="patiense"):
        collapse.settings_from_config(config)


# --------------------------------------------- healthy runs of every config ----


def _replay(trace: dict) -> list[int]:
    """The steps at which the default monitor would have fired on a recorded run."""
    classifiers = tuple(collapse.Classifier(**c) for c in trace["classifiers"])
    monitor = collapse.Monitor(classifiers, collapse.Settings(), trace["steps"])
    return [step for step, metrics in trace["intervals"] if monitor.observe(step, metrics)]


def test_the_recorded_healthy_runs_of_every_config_do_not_fire():
    """Replays the train metrics logged by full-length runs of every config in configs/ (on the
    embedded data, recorded by tests/collapse_traces.py) through the default monitor. The image
    benchmarks need datasets that are not shipped, so they have no recorded run."""
    with open(TRACES) as f:
        traces = json.load(f)["runs"]
    recorded = {trace["config"].split(":")[0] for trace in traces}
    configs = {
        name[:-3]
        for name in os.listdir(os.path.join(ROOT, "configs"))
        if name.endswith(".py") and not name.startswith("_")
    }
    assert recorded == configs - set(IMAGE_BENCHMARKS)
    for trace in traces:
        assert trace["status"] == "ok", trace["config"]
        assert _replay(trace) == [], trace["config"]


def test_the_recorded_forced_collapse_fires():
    with open(TRACES) as f:
        collapsed = json.load(f)["collapsed"]
    assert _replay(collapsed)


# ---------------------------------------------------------- end to end ----


def _collapsing_dann(data_dir):
    """A DANN whose domain term (weight 10) drives the classifier to a constant in ~75 steps;
    the monitor counts from step 100 (``warmup_steps``) and stops it at 175."""
    config = shrink(dann.get_config(), data_dir, steps=300, eval_every=100, batch_size=64)
    config.train.log_every = 25
    config.dann.domain_weight = 10.0
    return config


@pytest.mark.slow
def test_a_forced_collapse_stops_the_launch_with_its_results(data_dir, tmp_path):
    workdir = tmp_path / "run"
    config = _collapsing_dann(data_dir)
    overrides = [
        f"--config.train.steps={config.train.steps}",
        f"--config.train.log_every={config.train.log_every}",
        f"--config.eval.every={config.eval.every}",
        f"--config.checkpoint.every={config.checkpoint.every}",
        f"--config.eval.batch_size={config.eval.batch_size}",
        f"--config.dann.domain_weight={config.dann.domain_weight}",
        f"--config.data.data_dir={data_dir}",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config=configs/dann.py",
            *overrides,
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == stopping.EXIT_COLLAPSED, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    stopped = results["collapse"]["detected_at_step"]
    assert results["status"] == "collapsed" and results["last_step"] == stopped < 300
    assert f"COLLAPSE at step {stopped}:" in proc.stderr
    assert f"stopped at step {stopped}" in proc.stderr and "Traceback" not in proc.stderr
    assert str(stopped) in os.listdir(workdir / "checkpoints")
    # The collapsed network's evaluation at the stop: chance on both domains.
    assert results["history"][-1]["step"] == stopped
    assert results["final"]["target_test/accuracy"] < 0.15
    assert math.isfinite(results["final"]["train/loss"])


@pytest.mark.slow
def test_a_collapse_with_stop_false_trains_on_marked_collapsed(data_dir, tmp_path):
    config = _collapsing_dann(data_dir)
    config.train.collapse.stop = False
    results = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert results["last_step"] == 300 and results["status"] == "collapsed"
    assert results["collapse"]["detected_at_step"] < 300


@pytest.mark.slow
def test_a_short_healthy_dann_is_ok(data_dir, tmp_path):
    config = _collapsing_dann(data_dir)
    config.dann.domain_weight = 1.0
    results = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert results["status"] == "ok" and "collapse" not in results
