"""Pretrain -> fine-tune through the trainer: copy, freeze, re-init, penalties, errors."""

import json
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import shrink

from configs import finetune, pretrain
from tljax import methods, train, transfer
from tljax import params as ptree


def _shrink(config, data_dir):
    return shrink(config, data_dir, steps=4)


def _state(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    train.train_and_evaluate(_shrink(pretrain.get_config(), data_dir), workdir)
    return workdir


def _finetune(arg, pretrained, data_dir, workdir):
    config = _shrink(finetune.get_config(f"{arg},init_from={pretrained}"), data_dir)
    return config, train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_freeze_keeps_frozen_layers_bit_identical(pretrained, data_dir, tmp_path):
    _, results = _finetune("variant=freeze,layers=2,shots=2", pretrained, data_dir, tmp_path)
    source = _state(pretrained)["params"]
    tuned = _state(str(tmp_path))
    chex.assert_trees_all_equal(tuned["params"]["feature"], source["feature"])
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), tuned["params"]["label"], source["label"]
    )
    assert all(jax.tree.leaves(changed))
    assert results["num_frozen_params"] == 2432 + 38448
    # The optimizer keeps no state (momentum) for the frozen convolutions.
    momentum = [x for x in jax.tree.leaves(tuned["opt_state"]) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in momentum) == results["num_params"] - (2432 + 38448)


@pytest.mark.slow
def test_copy_first_layers_reinitialises_the_rest(pretrained, data_dir, tmp_path):
    config = _shrink(finetune.get_config(f"variant=copy,layers=1,init_from={pretrained}"), data_dir)
    config.conservative.l2sp_alpha = 0.1  # Keeps start_params in the state, for inspection.
    train.train_and_evaluate(config, str(tmp_path))
    source = _state(pretrained)["params"]
    start = _state(str(tmp_path))["start_params"]
    chex.assert_trees_all_equal(start["feature"]["conv_0"], source["feature"]["conv_0"])
    assert np.any(start["feature"]["conv_1"]["kernel"] != source["feature"]["conv_1"]["kernel"])
    assert np.any(start["label"]["dense_2"]["kernel"] != source["label"]["dense_2"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, metric",
    [("l2sp", "train/l2sp_drift"), ("output", "train/output_kl"), ("feature", "train/feature_l2")],
)
def test_conservative_penalties_are_logged(pretrained, data_dir, tmp_path, variant, metric):
    _, results = _finetune(f"variant={variant},shots=1", pretrained, data_dir, tmp_path)
    assert np.isfinite(results["final"][metric])
    assert results["final"]["train/loss"] > results["final"]["train/class_loss"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["data"]["shots_per_class"] == 1


def test_missing_checkpoint_is_a_clear_error(data_dir, tmp_path):
    config = _shrink(finetune.get_config(f"init_from={tmp_path / 'nowhere'}"), data_dir)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*configs/pretrain.py"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_head_shape_mismatch_lists_paths_and_reinit_fixes_it(data_dir, tmp_path):
    five = str(tmp_path / "five")
    train.train_and_evaluate(_shrink(pretrain.get_config("classes=0-4"), data_dir), five)
    config = _shrink(finetune.get_config(f"init_from={five}"), data_dir)
    with pytest.raises(ValueError, match=r"label/dense_2/kernel: pretrained \(100, 5\) vs model"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))
    config.transfer.reinit = ("label/dense_2",)
    results = train.train_and_evaluate(config, str(tmp_path / "good"))
    assert np.isfinite(results["final"]["target_test/accuracy"])


def test_config_mistakes_are_named(pretrained, data_dir, tmp_path):
    config = _shrink(finetune.get_config(f"init_from={pretrained}"), data_dir)
    config.transfer.freez = ("feature",)
    with pytest.raises(ValueError, match="Unknown transfer field.*freez"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    config = _shrink(finetune.get_config("variant=scratch"), data_dir)
    config.conservative.l2sp_alpha = 0.1
    with pytest.raises(ValueError, match="set transfer.init_from"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    config = _shrink(finetune.get_config("variant=scratch"), data_dir)
    config.transfer.reinit = ("label",)
    with pytest.raises(ValueError, match="reinit needs transfer.init_from"):
        train.train_and_evaluate(config, str(tmp_path / "c"))


def test_checkpoint_directory_accepts_workdir_checkpoints_or_step(pretrained):
    directory, step = transfer.checkpoint_directory(pretrained)
    assert directory.endswith("checkpoints") and step == 4
    assert transfer.checkpoint_directory(directory) == (directory, 4)
    assert transfer.checkpoint_directory(os.path.join(directory, "4")) == (directory, 4)


def test_freezing_everything_is_an_error(pretrained, data_dir, tmp_path):
    config = _shrink(finetune.get_config(f"variant=freeze,init_from={pretrained}"), data_dir)
    config.transfer.freeze = ("feature", "label")
    with pytest.raises(ValueError, match="freezes every parameter"):
        train.train_and_evaluate(config, str(tmp_path))


def test_checkpoint_of_another_architecture_lists_missing_paths(pretrained, data_dir, tmp_path):
    config = _shrink(finetune.get_config(f"init_from={pretrained}"), data_dir)
    config.model.name, config.model.width = "resnet18", 8
    with pytest.raises(
        ValueError, match="(?s)another architecture.*feature/conv_0.*missing.*head/kernel"
    ):
        train.train_and_evaluate(config, str(tmp_path))


def test_plan_copies_reinitialises_and_freezes_what_the_transfer_block_names(data_dir, tmp_path):
    """transfer.make_plan on its own (the trainer tests above are slow): from a saved
    checkpoint, `copy` minus `reinit` is copied, the rest keeps its fresh init, and only the
    `freeze` layers get the optimizer's frozen label."""
    config = _shrink(finetune.get_config(f"variant=freeze,layers=1,init_from={tmp_path}"), data_dir)
    config.transfer.reinit = ("label/dense_2",)
    method = methods.build(config)
    shapes = jax.eval_shape(method.init_params, jax.random.key(0))
    saved = jax.tree.map(lambda s: np.full(s.shape, 7, s.dtype), shapes)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(3, args=ocp.args.StandardSave({"params": saved}))
        manager.wait_until_finished()

    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    params = plan.apply(method.init_params(jax.random.key(1)), plan.pretrained)
    is_saved = {
        ptree.path_of(path): bool(np.all(leaf == 7))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    assert is_saved == {path: not path.startswith("label/dense_2/") for path in is_saved}
    labels = {
        ptree.path_of(path): label
        for path, label in jax.tree_util.tree_leaves_with_path(plan.labels)
    }
    assert labels == {
        path: "frozen" if path.startswith("feature/conv_0/") else "trained" for path in labels
    }


def test_a_checkpoint_saved_on_four_devices_loads_on_one(tmp_path):
    """Pretraining and fine-tuning may run on different device counts (Orbax would refuse)."""
    import subprocess
    import sys

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    kernel = jax.device_put(
        np.arange(8.0, dtype=np.float32).reshape(4, 2), NamedSharding(mesh, PartitionSpec("data"))
    )
    manager = ocp.CheckpointManager(
        str(tmp_path), options=ocp.CheckpointManagerOptions(create=True)
    )
    manager.save(3, args=ocp.args.StandardSave({"params": {"kernel": kernel}, "step": 3}))
    manager.wait_until_finished()
    code = (
        "import jax, sys; jax.config.update('jax_num_cpu_devices', 1);"
        "from tljax import transfer;"
        f"p = transfer.load_pretrained({str(tmp_path)!r});"
        "print(type(p['kernel']).__name__, p['kernel'].sum())"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["ndarray", "28.0"]
