"""Checkpoints carry an integrity record; damaged or incomplete ones are skipped on resume.

The unit tests save a small trainer-shaped state (params, optax momentum, step, rng; replicated
over the 4 test devices) and damage the newest of two checkpoints on disk: truncating, deleting
and overwriting files, as a full disk, an interrupted copy or bad storage would. The slow tests
do the same to a real DANN run and compare its result with resuming from the older checkpoint.
"""

import glob
import json
import logging
import os
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import shrink

from tljax import checkpoints, parallel, train, validate

STEPS = (3, 6)


def _state(seed: int, width: int = 64):
    """A state shaped like the trainer's, replicated over all devices."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "feature": {"kernel": jax.random.normal(keys[0], (width, width))},
        "label": {"bias": jax.random.normal(keys[1], (10,))},
    }
    state = {
        "params": params,
        "opt_state": optax.sgd(0.1, momentum=0.9).init(params),
        "step": jnp.int32(seed),
        "rng": jax.random.key_data(keys[2]),
    }
    state["opt_state"] = jax.tree.map(lambda x: x + 1.0, state["opt_state"])
    return jax.device_put(state, parallel.replicated(parallel.make_data_mesh()))


def _config(max_to_keep=2):
    return ml_collections.ConfigDict(dict(checkpoint=dict(max_to_keep=max_to_keep)))


def _manager(workdir):
    return checkpoints.checkpoint_manager(str(workdir), _config())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with checkpoints at steps 3 and 6 of `_state`."""
    workdir = tmp_path_factory.mktemp("saved")
    manager = _manager(workdir)
    for step in STEPS:
        manager.save(step, args=ocp.args.StandardSave(_state(step)))
    manager.wait_until_finished()
    return workdir


@pytest.fixture
def workdir(saved, tmp_path):
    """A fresh copy of `saved` to damage."""
    copy = tmp_path / "run"
    shutil.copytree(saved, copy)
    return copy


def _step_dir(workdir, step=6):
    return str(workdir / "checkpoints" / str(step))


def _data_file(step_dir):
    # The largest array file of the step: the 64x64 kernel.
    files = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*"))
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _overwrite(path, data=b"\x00not what was saved" * 8):
    with open(path, "r+b") as f:
        f.write(data)


def _random_bytes_inside(path):
    size = os.path.getsize(path)
    assert size > 2048, "the data file must hold the 1 KB written into it"
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(np.random.default_rng(0).bytes(1024))


def _arrays_of_step_3(step_dir):
    shutil.rmtree(f"{step_dir}/default")
    shutil.copytree(f"{os.path.dirname(step_dir)}/3/default", f"{step_dir}/default")


def _empty_step_dir(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


# Each damages step 6's directory; the reason the warning and the error give for it.
DAMAGE = {
    "truncated_data_file": (lambda d: _truncate(_data_file(d)), "cannot be read"),
    "deleted_data_file": (lambda d: os.remove(_data_file(d)), "cannot be read"),
    # Where the bytes land decides: inside a compressed chunk's header they fail to decode,
    # elsewhere they decode to other values, which only the digests catch.
    "random_bytes_in_data_file": (
        lambda d: _random_bytes_inside(_data_file(d)),
        "(arrays differ from its integrity record|cannot be read)",
    ),
    # Readable files holding other values (step 3's arrays under step 6's record).
    "arrays_of_another_step": (
        _arrays_of_step_3,
        "arrays differ from its integrity record: params/feature/kernel; params/label/bias",
    ),
    "deleted_METADATA": (lambda d: os.remove(f"{d}/default/_METADATA"), "cannot be read"),
    "garbled_METADATA": (lambda d: _overwrite(f"{d}/default/_METADATA"), "cannot be read"),
    "deleted_manifest": (lambda d: os.remove(f"{d}/default/manifest.ocdbt"), "cannot be read"),
    "garbled_manifest": (lambda d: _overwrite(f"{d}/default/manifest.ocdbt"), "cannot be read"),
    "empty_step_dir": (_empty_step_dir, "no commit_success.txt"),
    "no_commit_marker": (lambda d: os.remove(f"{d}/commit_success.txt"), "no commit_success.txt"),
    "deleted_record": (
        lambda d: os.remove(f"{d}/_CHECKPOINT_METADATA"),
        "no _CHECKPOINT_METADATA, so no integrity record",
    ),
    "garbled_record": (
        lambda d: _overwrite(f"{d}/_CHECKPOINT_METADATA"),
        "_CHECKPOINT_METADATA cannot be read",
    ),
}


def _restore(workdir, target=None):
    return checkpoints.restore_latest(_manager(workdir), target or _state(0))


def test_every_save_records_each_arrays_digest(saved):
    with open(_step_dir(saved) + "/_CHECKPOINT_METADATA") as f:
        record = json.load(f)["custom_metadata"][checkpoints.RECORD_KEY]
    assert record == checkpoints.integrity_record(_state(6))
    assert set(record["leaves"]) == {
        "params/feature/kernel",
        "params/label/bias",
        "opt_state/0/trace/feature/kernel",
        "opt_state/0/trace/label/bias",
        "step",
        "rng",
    }
    assert record["leaves"]["params/feature/kernel"]["shape"] == [64, 64]


def test_intact_checkpoints_resume_from_the_newest_bit_exactly(workdir):
    state, step = _restore(workdir)
    assert step == 6
    chex.assert_trees_all_equal(state, _state(6))
    assert not (workdir / checkpoints.REJECTED_DIR).exists()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_older_one(workdir, damage, caplog):
    make_damage, reason = DAMAGE[damage]
    make_damage(_step_dir(workdir))
    with caplog.at_level(logging.WARNING):
        state, step = _restore(workdir)

    assert step == 3
    chex.assert_trees_all_equal(state, _state(3))  # exactly what resuming from step 3 gives
    warnings = [r.getMessage() for r in caplog.records if "Skipping checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and _step_dir(workdir) in warnings[0]
    assert re.search(reason, warnings[0]), warnings[0]
    # Out of Orbax's way, kept for inspection.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    assert os.listdir(workdir / checkpoints.REJECTED_DIR) == ["6"]


def test_checkpoint_without_a_record_is_skipped(workdir, caplog):
    # E.g. written by plain Orbax, or by a tljax from before integrity records.
    shutil.rmtree(_step_dir(workdir))
    with ocp.CheckpointManager(workdir / "checkpoints") as plain:
        plain.save(6, args=ocp.args.StandardSave(_state(6)))
    with caplog.at_level(logging.WARNING):
        _, step = _restore(workdir)
    assert step == 3
    assert any("no integrity record" in r.getMessage() for r in caplog.records)


def test_a_rejected_step_is_saved_again_and_max_to_keep_still_holds(workdir):
    _arrays_of_step_3(_step_dir(workdir))
    manager = _manager(workdir)
    _, step = checkpoints.restore_latest(manager, _state(0))
    assert step == 3
    for new_step in (6, 9):
        manager.save(new_step, args=ocp.args.StandardSave(_state(new_step)))
    manager.wait_until_finished()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "9"]
    state, step = _restore(workdir)
    assert step == 9
    chex.assert_trees_all_equal(state, _state(9))


def test_no_good_checkpoint_stops_listing_every_step_and_why(workdir):
    _arrays_of_step_3(_step_dir(workdir, 6))
    os.remove(_step_dir(workdir, 3) + "/commit_success.txt")
    with pytest.raises(checkpoints.NoUsableCheckpointError) as caught:
        _restore(workdir)
    message = str(caught.value)
    assert str(workdir / "checkpoints") in message
    assert "step 3: no commit_success.txt" in message
    assert "step 6: its arrays differ from its integrity record" in message
    # Nothing moved: the next launch must not quietly start from scratch.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert not (workdir / checkpoints.REJECTED_DIR).exists()


def test_a_config_mismatch_has_its_own_message(workdir):
    with pytest.raises(checkpoints.CheckpointMismatchError) as caught:
        _restore(workdir, target=_state(0, width=32))
    message = str(caught.value)
    assert "holds other arrays than this config's model/optimizer" in message
    assert "params/feature/kernel: checkpoint (64, 64) float32 vs this config (32, 32)" in message
    assert "Use a new --workdir or the config that wrote it" in message
    assert "damaged" not in message and "integrity" not in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_empty_checkpoint_directory_starts_from_scratch(tmp_path):
    fresh = _state(0)
    state, step = _restore(tmp_path, fresh)
    assert step == 0 and state is fresh


@pytest.mark.parametrize("value", [0, -1])
def test_max_to_keep_below_one_is_refused(tmp_path, value):
    with pytest.raises(validate.ConfigError, match=f"checkpoint.max_to_keep={value}: keep at"):
        checkpoints.checkpoint_manager(str(tmp_path), _config(value))
    assert not (tmp_path / "checkpoints").exists()


def test_max_to_keep_none_keeps_every_checkpoint(tmp_path):
    manager = checkpoints.checkpoint_manager(str(tmp_path), _config(None))
    for step in (1, 2, 3):
        manager.save(step, args=ocp.args.StandardSave({"x": np.arange(3) + step}))
    manager.wait_until_finished()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]


def test_trainer_refuses_max_to_keep_zero_before_any_work(tiny_dann_config, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached after the max_to_keep check")

    monkeypatch.setattr(train, "create_train_state", must_not_run)
    tiny_dann_config.checkpoint.max_to_keep = 0
    with pytest.raises(validate.ConfigError, match="checkpoint.max_to_keep=0"):
        train.train_and_evaluate(tiny_dann_config, str(tmp_path))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------ a real DANN run ----


@pytest.fixture(scope="module")
def dann_run(data_dir, tmp_path_factory):
    """A finished 6-step DANN run with checkpoints at steps 3 and 6 (max_to_keep=2)."""
    from configs import dann

    config = shrink(dann.get_config(), data_dir, steps=6, eval_every=3, eval_batch_size=200)
    workdir = tmp_path_factory.mktemp("dann")
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


def _final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())["params"]


@pytest.mark.slow
def test_dann_run_resumes_from_the_older_checkpoint_as_if_the_newest_never_was(
    dann_run, tmp_path, caplog
):
    config, finished = dann_run
    damaged, reference = tmp_path / "damaged", tmp_path / "reference"
    shutil.copytree(finished, damaged)
    shutil.copytree(finished, reference)
    # 1 KB of random bytes inside the step-6 checkpoint's largest array file: it still reads.
    _random_bytes_inside(_data_file(_step_dir(damaged)))
    shutil.rmtree(_step_dir(reference))  # resuming from step 3 on purpose

    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(config, str(damaged))
    expected = train.train_and_evaluate(config, str(reference))

    assert any("Skipping checkpoint" in r.getMessage() for r in caplog.records)
    assert results["resumed_from_step"] == expected["resumed_from_step"] == 3
    assert results["final"] == expected["final"]
    chex.assert_trees_all_equal(_final_params(damaged), _final_params(reference))
    assert os.listdir(damaged / checkpoints.REJECTED_DIR) == ["6"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_data_file", "garbled_manifest", "empty_step_dir"])
def test_dann_run_skips_unreadable_or_incomplete_newest_checkpoint(dann_run, tmp_path, damage):
    config, finished = dann_run
    shutil.copytree(finished, tmp_path / "run")
    DAMAGE[damage][0](_step_dir(tmp_path / "run"))
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(finished / "results.json") as f:
        uninterrupted = json.load(f)
    # Same-seed runs are bit-identical, so resuming from step 3 reproduces the whole run.
    assert results["resumed_from_step"] == 3
    assert results["final"] == uninterrupted["final"]
