"""The trainer end to end: checkpoints, results.json, resume, sharding, failures."""

import dataclasses
import glob
import json
import logging
import os
import re
import subprocess
import sys
import time
import types

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tljax import run_log, train


def _final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = manager.restore(manager.latest_step())
    return restored["params"]


def test_dann_run_writes_checkpoints_and_results(tiny_dann_config, tmp_path):
    results = train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 6 and saved["num_devices"] == jax.device_count()
    for key in (
        "source_test/accuracy",
        "target_test/accuracy",
        "train/loss",
        "train/domain_loss",
        "train/grl_lambda",
    ):
        assert np.isfinite(saved["final"][key]), key
    assert saved["final"] == pytest.approx(results["final"])
    assert saved["config"]["method"] == "dann"
    assert [h["step"] for h in saved["history"]] == [3, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_dann_config, tmp_path):
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_dann_config, full_dir)

    # Emulate a run killed after its step-3 checkpoint: drop everything after it.
    train.train_and_evaluate(tiny_dann_config, resumed_dir)
    manager = ocp.CheckpointManager(os.path.join(resumed_dir, "checkpoints"))
    manager.delete(6)
    manager.wait_until_finished()
    results = train.train_and_evaluate(tiny_dann_config, resumed_dir)

    assert results["resumed_from_step"] == 3
    chex.assert_trees_all_close(_final_params(full_dir), _final_params(resumed_dir), atol=1e-6)


@pytest.mark.slow
def test_four_devices_match_one_device(tiny_dann_config, tmp_path):
    assert jax.device_count() == 4
    one = train.train_and_evaluate(
        tiny_dann_config, str(tmp_path / "one"), devices=jax.devices()[:1]
    )
    four = train.train_and_evaluate(tiny_dann_config, str(tmp_path / "four"))
    assert one["num_devices"] == 1 and four["num_devices"] == 4
    for key in ("train/loss", "target_test/accuracy", "source_test/loss"):
        np.testing.assert_allclose(one["final"][key], four["final"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_same_seed_gives_same_metrics(tiny_dann_config, tmp_path):
    a = train.train_and_evaluate(tiny_dann_config, str(tmp_path / "a"))
    b = train.train_and_evaluate(tiny_dann_config, str(tmp_path / "b"))
    assert a["final"] == b["final"]


def test_batch_size_not_divisible_by_devices_fails_before_training(
    tiny_dann_config, tmp_path, monkeypatch
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached after the batch size check")

    monkeypatch.setattr(train, "create_train_state", must_not_run)
    monkeypatch.setattr(train, "compile_train_step", must_not_run)
    tiny_dann_config.train.batch_size = 6
    with pytest.raises(ValueError, match="not divisible by the number of devices"):
        train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    assert os.listdir(tmp_path) == []  # no checkpoints, events or results


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_dann_config, tmp_path):
    tiny_dann_config.train.steps = 12
    tiny_dann_config.lr.schedule = "constant"
    tiny_dann_config.lr.base = 1e12  # Diverges within a few steps.
    tiny_dann_config.checkpoint.every = 1
    tiny_dann_config.train.log_every = 1
    with pytest.raises(train.NonFiniteLossError, match=r"step \d+.*last good checkpoint"):
        train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    params = _final_params(str(tmp_path))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_train_step_is_traced_and_compiled_once_per_run(tiny_dann_config, tmp_path, monkeypatch):
    traces, compiles = [], []
    build = train.methods.build
    compile_train_step = train.compile_train_step

    def counting_compile(*args):
        compiles.append(1)
        return compile_train_step(*args)

    def counting_build(config):
        method = build(config)

        def loss_fn(*args):
            traces.append(1)
            return method.loss_fn(*args)

        return dataclasses.replace(method, loss_fn=loss_fn)

    monkeypatch.setattr(train.methods, "build", counting_build)
    monkeypatch.setattr(train, "compile_train_step", counting_compile)
    results = train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    # Six steps, with evaluations and checkpoints in between: one trace, one compilation.
    assert len(traces) == 1
    assert len(compiles) == 1
    assert results["compile_time_s"] > 0


def test_results_split_wall_time_by_phase(tiny_dann_config, tmp_path, monkeypatch):
    evaluate = train.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.25)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    results = train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    timing = results["timing_s"]
    assert set(timing) == {"setup", "compile", "train", "input", "eval", "checkpoint"}
    assert all(seconds >= 0 for seconds in timing.values())
    # Two evaluations (steps 3 and 6) of 0.25 s each are counted as eval, not as training.
    assert timing["eval"] >= 0.5
    assert timing["train"] < results["wall_time_s"] - 0.5
    assert timing["compile"] == pytest.approx(results["compile_time_s"], abs=0.05)
    assert sum(timing.values()) <= results["wall_time_s"]


@pytest.mark.slow
def test_method_value_and_grad_replaces_autodiff(tiny_dann_config, tmp_path, monkeypatch):
    build = train.methods.build

    def halved_gradient_build(config):
        method = build(config)

        def value_and_grad(params, batch, rng, step):
            out, grads = jax.value_and_grad(method.loss_fn, has_aux=True)(params, batch, rng, step)
            return out, jax.tree.map(lambda g: 0.5 * g, grads)

        return dataclasses.replace(method, value_and_grad=value_and_grad)

    tiny_dann_config.optimizer.momentum = 0.0
    tiny_dann_config.train.steps = 1
    tiny_dann_config.checkpoint.every = 1
    baseline = str(tmp_path / "baseline")
    train.train_and_evaluate(tiny_dann_config, baseline)
    monkeypatch.setattr(train.methods, "build", halved_gradient_build)
    train.train_and_evaluate(tiny_dann_config, str(tmp_path / "halved"))
    # One plain-SGD step with half the gradient moves every param half as far.
    start = train.create_train_state(
        build(tiny_dann_config),
        train.optim.make_optimizer(tiny_dann_config.optimizer, lambda _: 0.0),
        tiny_dann_config.seed,
        train.parallel.make_data_mesh(),
    )["params"]
    full_step = jax.tree.map(np.subtract, _final_params(baseline), start)
    half_step = jax.tree.map(np.subtract, _final_params(str(tmp_path / "halved")), start)
    chex.assert_trees_all_close(half_step, jax.tree.map(lambda d: 0.5 * d, full_step), atol=1e-6)


def test_one_off_programs_compile_at_a_lower_cpu_level_with_bit_identical_results(
    tiny_dann_config, monkeypatch
):
    mesh = train.parallel.make_data_mesh()
    assert train.one_off_compiler_options(mesh) == {"xla_backend_optimization_level": 1}
    method = train.methods.build(tiny_dann_config)
    optimizer = train.optim.make_optimizer(tiny_dann_config.optimizer, lambda _: 0.01)
    eval_sets = {"target_test": method.eval_sets["target_test"]}

    def init_and_eval():
        state = train.create_train_state(method, optimizer, 3, mesh)
        eval_step = jax.jit(method.eval_fn, compiler_options=train.one_off_compiler_options(mesh))
        return state, train.evaluate(eval_step, state["params"], eval_sets, 200, mesh)

    lowered = init_and_eval()
    monkeypatch.setattr(train, "one_off_compiler_options", lambda mesh: {})
    default = init_and_eval()
    chex.assert_trees_all_equal(jax.device_get(lowered), jax.device_get(default))


def test_one_off_compiler_options_leave_accelerators_alone():
    gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
    assert train.one_off_compiler_options(gpu_mesh) == {}


_WITHOUT_TENSORFLOW = """
import sys

import jax

for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None  # Importing any of them now raises ImportError.

import tljax.data
from configs import dann

from tljax import methods, optim, parallel, train
from tljax.data import pipeline, synthetic


tljax.data.load_split = synthetic.random_digits_split
config = dann.get_config()
config.train.batch_size = 8
method = methods.build(config)
schedule = optim.make_schedule(config.lr, config.train.steps)
optimizer = optim.make_optimizer(config.optimizer, schedule)
mesh = parallel.make_data_mesh(jax.devices()[:1])
state = train.create_train_state(method, optimizer, 0, mesh)
batches = pipeline.train_batches(method.train_streams, 0, 0, mesh)
batch = next(batches)
step, _ = train.compile_train_step(
    train.make_train_step(method, optimizer, schedule), state, batch, mesh
)
state, metrics = step(state, batch)
batches.close()
print("loss", float(metrics["loss"]))
"""


@pytest.mark.slow
def test_the_train_step_runs_without_tensorflow():
    """Accelerator images without TensorFlow (or clu) can still build and run the step, as
    `benchmarks/speed_dann.py --synthetic` does on a GPU (with its random digits); only tfds
    loading and run logging need them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.isfinite(float(proc.stdout.split("loss")[-1]))


def test_without_clu_metrics_and_phase_times_still_reach_the_log(caplog, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "clu", None)  # Importing clu now raises ImportError.
    # An earlier in-process launch may have quieted absl's logger; this test needs its INFO.
    with caplog.at_level(logging.INFO, logger="absl"):
        log = run_log.make_run_log(str(tmp_path), True, num_steps=4, every_secs=3600.0)
        for step in (1, 2):
            log.step_done(step)
        log.train_metrics(2, {"train/loss": np.float32(0.25)})
        with log.timed("eval"):
            time.sleep(0.05)
        log.eval_metrics(2, {"test/accuracy": 0.5})
        log.close()
    assert "No TensorBoard events for this run: clu is not installed" in caplog.text
    assert re.search(r"Step 2/4 \([\d.]+ steps/s, ETA 0m\d\ds\): train/loss=0.25\n", caplog.text)
    assert "Step 2/4 eval: test/accuracy=0.5\n" in caplog.text
    assert log.phase_seconds()["eval"] >= 0.05
    assert os.listdir(tmp_path) == []


def test_quiet_library_logs_keep_tljax_lines_and_every_warning():
    handler = logging.Handler()
    run_log.quiet_library_logs(handler)

    def passes(path, level):
        return bool(handler.filter(logging.LogRecord("absl", level, path, 1, "m", None, None)))

    library = os.path.join(os.path.dirname(ocp.__file__), "checkpoint_manager.py")
    assert passes(train.__file__, logging.INFO) and passes(run_log.__file__, logging.DEBUG)
    assert not passes(library, logging.INFO)
    assert passes(library, logging.WARNING)


def _results_file(workdir):
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_interrupted_run_keeps_every_evaluation_and_sums_wall_time(
    tiny_dann_config, tmp_path, monkeypatch
):
    class KilledError(Exception):
        pass

    step_done = run_log.RunLog.step_done

    def killed_at_step_5(self, step):
        if step == 5:
            raise KilledError
        step_done(self, step)

    # The first launch evaluates and checkpoints at step 3, then dies at step 5.
    monkeypatch.setattr(run_log.RunLog, "step_done", killed_at_step_5)
    with pytest.raises(KilledError):
        train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()  # sweeps would take it for a finished run
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert [entry["step"] for entry in partial["history"]] == [3]

    monkeypatch.setattr(run_log.RunLog, "step_done", step_done)
    results = train.train_and_evaluate(tiny_dann_config, str(tmp_path))

    assert _results_file(tmp_path) == json.loads(json.dumps(results, default=str))
    assert not (tmp_path / "results.partial.json").exists()
    assert results["resumed_from_step"] == 3 and results["last_step"] == 6
    assert results["history"][0] == partial["history"][0]
    assert [entry["step"] for entry in results["history"]] == [3, 6]
    first, second = results["launches"]
    assert first == partial["launches"][0]
    assert (first["from_step"], first["to_step"], second["from_step"]) == (0, 3, 3)
    assert results["wall_time_s"] == first["wall_time_s"] + second["wall_time_s"]
    for phase, seconds in results["timing_s"].items():
        assert seconds == first["timing_s"][phase] + second["timing_s"][phase], phase


@pytest.mark.slow
def test_resumed_finished_run_keeps_earlier_evaluations(tiny_dann_config, tmp_path):
    first = train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    tiny_dann_config.train.steps = 9  # Continue the finished run for three more steps.
    results = train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    assert results["history"][:2] == first["history"]
    assert [entry["step"] for entry in results["history"]] == [3, 6, 9]
    assert results["wall_time_s"] == first["wall_time_s"] + results["launches"][1]["wall_time_s"]


@pytest.mark.slow
def test_relaunching_a_finished_run_leaves_its_results_intact(
    tiny_dann_config, tmp_path, monkeypatch
):
    train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    saved = (tmp_path / "results.json").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run trained or evaluated again")

    monkeypatch.setattr(train, "compile_train_step", must_not_run)
    monkeypatch.setattr(train, "evaluate", must_not_run)
    results = train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    assert (tmp_path / "results.json").read_text() == saved
    assert results == json.loads(saved)
    assert [entry["step"] for entry in results["history"]] == [3, 6]
    assert "train/loss" in results["final"] and "target_test/accuracy" in results["final"]
