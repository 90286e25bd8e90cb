"""Progressive networks: adapter shapes, column growth, frozen earlier columns, a task sequence."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import conv_operand_dtypes, shrink

from configs import progressive as progressive_config
from tljax import ops, train
from tljax import params as ptree
from tljax.methods.progressive import make_model
from tljax.models.progressive import ProgressiveNet, column_param_counts


def _init(mode, classes=(5, 5, 10), **widths):
    model = ProgressiveNet(task_classes=classes, mode=mode, **widths)
    # Shapes only: no FLOPs spent on initialisation.
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_lateral_adapter_shapes():
    _, params = _init("progressive")
    assert not any(key.startswith("lateral_") for key in params["column_0"])
    column = params["column_2"]
    adapters = sorted(key for key in column if key.startswith("lateral_"))
    # Every layer after the first gets one adapter from each earlier column.
    assert adapters == [
        f"lateral_{j}_{layer}"
        for j in (0, 1)
        for layer in ("conv_1", "dense_0", "dense_1", "head_2")
    ]
    # conv -> conv: 1x1 conv V (32 -> 32/4 channels), 5x5 conv U onto conv_1's 48 channels.
    assert _shapes(column["lateral_1_conv_1"]) == {
        "alpha": (),
        "v": {"kernel": (1, 1, 32, 8), "bias": (8,)},
        "u": {"kernel": (5, 5, 8, 48)},
    }
    # conv -> dense: 1x1 conv V (48 -> 12 channels), flattened 4x4x12, dense U onto 100 units.
    assert _shapes(column["lateral_0_dense_0"]["u"]) == {"kernel": (4 * 4 * 12, 100)}
    assert _shapes(column["lateral_0_head_2"]["v"]) == {"kernel": (100, 25), "bias": (25,)}
    assert _shapes(column["lateral_0_head_2"]["u"]) == {"kernel": (25, 10)}
    assert _shapes(column["head_2"]) == {"kernel": (100, 10), "bias": (10,)}


def test_independent_and_finetune_layouts():
    _, params = _init("independent")
    assert sorted(params) == ["column_0", "column_1", "column_2"]
    assert not any(k.startswith("lateral_") for c in params.values() for k in c)
    _, params = _init("finetune")
    assert sorted(params) == ["column_0"]
    assert {"head_0", "head_1", "head_2"} <= set(params["column_0"])


def test_parameter_growth_per_column():
    _, params = _init("progressive")
    rows = column_param_counts(params)
    assert [row["column"] for row in rows] == [0, 1, 2]
    assert rows[0]["lateral"] == 0
    assert 0 < rows[1]["lateral"] < rows[2]["lateral"]  # Column k has k sets of adapters.
    assert rows[-1]["total"] == ptree.count(params)
    assert rows[1]["own"] == rows[0]["own"]  # Same column architecture, same head width.


def test_earlier_columns_receive_no_gradient():
    model = ProgressiveNet(task_classes=(2, 2, 2), conv_widths=(4, 8), dense_widths=(8,))
    images = jax.random.uniform(jax.random.key(1), (2, 28, 28, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    # Random host values: compiling the PRNG initialisers costs more than this whole test.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images)[-1].sum()))(params)
    for column in ("column_0", "column_1"):
        assert all(not np.any(g) for g in jax.tree.leaves(grads[column]))
    assert np.any(grads["column_2"]["conv_0"]["kernel"])


def test_bfloat16_conv_operands_reach_columns_and_lateral_adapters():
    conv = lambda operands: ops.conv_from_config({"conv_impl": "xla", "conv_operands": operands})
    model, shapes = _init("progressive", classes=(2, 2, 2), conv=conv("float32").conv)
    bf16_model = model.clone(conv=conv("bfloat16").conv)
    # Columns' conv_0 and conv_1, and per (column, earlier column) pair three adapter convs: V
    # (1x1) and U (5x5) into conv_1, V (1x1) on the feature map into dense_0.
    num_convs = sum(len(s.shape) == 4 for s in jax.tree.leaves(shapes))
    assert num_convs == 3 * 2 + 3 * 3
    images = jnp.zeros((2, 28, 28, 3))
    jaxpr = jax.make_jaxpr(bf16_model.apply)({"params": shapes}, images).jaxpr
    assert conv_operand_dtypes(jaxpr) == [jnp.dtype(jnp.bfloat16)] * num_convs
    jaxpr = jax.make_jaxpr(model.apply)({"params": shapes}, images).jaxpr
    assert set(conv_operand_dtypes(jaxpr)) == {jnp.dtype(jnp.float32)}


def _tiny(task, variant, root, data_dir):
    config = progressive_config.get_config(
        f"task={task},variant={variant},init_from={root}/{variant}_task{task - 1}"
    )
    shrink(config, data_dir, steps=3)
    config.model.conv_widths = (8, 16)
    config.model.dense_widths = (32, 32)
    return config


def _run(task, variant, root, data_dir):
    workdir = os.path.join(root, f"{variant}_task{task}")
    config = _tiny(task, variant, root, data_dir)
    return config, train.train_and_evaluate(config, workdir), workdir


def _params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())["params"]


def _logits(config, params, images, classes):
    return make_model(config, classes).apply({"params": params}, images)


@pytest.fixture(scope="module")
def sequence(data_dir, tmp_path_factory):
    """All three tasks of configs/progressive.py, progressive variant; the first task once more
    fine-tuned on the second task (the forgetting baseline)."""
    root = str(tmp_path_factory.mktemp("progressive"))
    runs = [_run(task, "progressive", root, data_dir) for task in range(3)]
    os.symlink(runs[0][2], os.path.join(root, "finetune_task0"))
    finetuned = _run(1, "finetune", root, data_dir)
    return runs, finetuned


@pytest.mark.slow
def test_earlier_tasks_stay_bit_identical(sequence):
    runs, _ = sequence
    (config0, results0, dir0), (config1, results1, dir1), (_, results2, dir2) = runs
    params0, params1, params2 = _params(dir0), _params(dir1), _params(dir2)
    chex.assert_trees_all_equal(params1["column_0"], params0["column_0"])
    chex.assert_trees_all_equal(params2["column_0"], params0["column_0"])
    chex.assert_trees_all_equal(params2["column_1"], params1["column_1"])
    for later in (results1, results2):
        assert (
            later["final"]["digits04_test/accuracy"] == results0["final"]["digits04_test/accuracy"]
        )
    assert (
        results2["final"]["digits59_test/accuracy"] == results1["final"]["digits59_test/accuracy"]
    )
    assert np.isfinite(results2["final"]["mnist_m_test/accuracy"])
    # The frozen columns are counted, and the network grows by one column per task.
    assert results1["num_frozen_params"] == results0["num_params"]
    assert results2["num_frozen_params"] == results1["num_params"]
    # Task 0's outputs themselves, from the one-column and the two-column networks.
    images = jax.random.uniform(jax.random.key(2), (8, 28, 28, 3))
    before = _logits(config0, params0, images, (5,))[0]
    after = _logits(config1, params1, images, (5, 5))[0]
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


@pytest.mark.slow
def test_finetuning_changes_the_shared_trunk(sequence):
    runs, (_, results, workdir) = sequence
    before, after = _params(runs[0][2])["column_0"], _params(workdir)["column_0"]
    assert np.any(after["conv_0"]["kernel"] != before["conv_0"]["kernel"])
    assert results["num_frozen_params"] == 0
    assert set(after) >= {"head_0", "head_1"}


def test_config_mistakes_are_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="task=3; the sequence"):
        progressive_config.get_config("task=3")
    with pytest.raises(ValueError, match="variant='lwf'"):
        progressive_config.get_config("variant=lwf")
    config = _tiny(1, "progressive", str(tmp_path), data_dir)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
