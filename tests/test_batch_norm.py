"""BatchNorm with running statistics: the module against PyTorch, the ResNet and classifier
wiring, the transfer plan, the trainer's step, and end-to-end runs (model.norm='batch')."""

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from helpers import shrink
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import pretrain
from tljax import methods, optim, train, transfer
from tljax import params as ptree
from tljax.models import make_classifier
from tljax.models.batch_norm import BatchNorm, write_statistics
from tljax.validate import ConfigError

CHANNELS = 5


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _bn_params(rng, channels=CHANNELS):
    return {
        "scale": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "bias": rng.normal(size=channels).astype(np.float32),
        "running_mean": rng.normal(size=channels).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def _train_apply(module):
    return lambda params, x: module.apply({"params": params}, x, mutable=["batch_stats"])


# ----------------------------------------------------------------------------------------------
# The module.


def test_train_and_eval_modes_match_torch_batchnorm2d():
    """Outputs, gradients and running statistics over three training steps, then eval mode,
    against torch.nn.BatchNorm2d with the same values (momentum 0.1, eps 1e-5)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = _bn_params(rng)
    reference = torch.nn.BatchNorm2d(CHANNELS, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        for name, ours in (
            ("weight", "scale"),
            ("bias", "bias"),
            ("running_mean", "running_mean"),
            ("running_var", "running_var"),
        ):
            getattr(reference, name).copy_(torch.tensor(params[ours], dtype=torch.float64))
    step = jax.jit(_train_apply(BatchNorm(train=True)))

    def weighted_sum(params, x, weights):
        return jnp.sum(step(params, x)[0] * weights)

    grad = jax.jit(jax.grad(weighted_sum, argnums=(0, 1)))
    reference.train()
    for t in range(3):
        x = rng.normal(loc=t + 1.0, scale=2.0 + t, size=(6, 4, 3, CHANNELS)).astype(np.float32)
        weights = rng.normal(size=x.shape).astype(np.float32)
        x_torch = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
        out_torch = reference(x_torch)
        (out_torch * torch.tensor(weights.transpose(0, 3, 1, 2))).sum().backward()

        y, updates = step(params, x)
        np.testing.assert_allclose(
            y, out_torch.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
        )
        grad_params, grad_x = grad(params, x, weights)
        np.testing.assert_allclose(grad_x, x_torch.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)
        np.testing.assert_allclose(grad_params["scale"], reference.weight.grad.numpy(), rtol=1e-4)
        np.testing.assert_allclose(grad_params["bias"], reference.bias.grad.numpy(), rtol=1e-4)
        # The statistics are never differentiated.
        assert not np.any(grad_params["running_mean"]) and not np.any(grad_params["running_var"])
        reference.weight.grad = reference.bias.grad = None

        params = write_statistics(params, updates["batch_stats"])
        for name in ("running_mean", "running_var"):
            np.testing.assert_allclose(
                params[name], getattr(reference, name).numpy(), rtol=1e-5, err_msg=name
            )

    reference.eval()
    x = rng.normal(size=(3, 4, 4, CHANNELS)).astype(np.float32)
    y = BatchNorm(train=False).apply({"params": params}, x)
    expected = reference(torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64))
    np.testing.assert_allclose(
        y, expected.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
    )
    eval_grads = jax.grad(lambda p: BatchNorm(train=False).apply({"params": p}, x).sum())(params)
    assert not np.any(eval_grads["running_mean"]) and not np.any(eval_grads["running_var"])


def test_batch_statistics_are_float32_whatever_the_compute_dtype():
    """bfloat16 activations with a large mean: a bfloat16 reduction would be off by ~0.4."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(100.0, 0.5, size=(16, 8, 8, CHANNELS)), jnp.bfloat16)
    params = {k: np.asarray(v) for k, v in _bn_params(rng).items()}
    y, updates = _train_apply(BatchNorm(train=True, dtype=jnp.bfloat16))(params, x)
    assert y.dtype == jnp.bfloat16
    values = np.asarray(x, np.float64)
    mean, var = values.mean(axis=(0, 1, 2)), values.var(axis=(0, 1, 2), ddof=1)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(
        stats["running_mean"], 0.9 * params["running_mean"] + 0.1 * mean, rtol=1e-6
    )
    np.testing.assert_allclose(
        stats["running_var"], 0.9 * params["running_var"] + 0.1 * var, rtol=1e-4
    )


def test_statistics_over_four_devices_are_those_of_the_global_batch():
    """Synchronised BatchNorm: with the batch sharded over the 4-device mesh, the statistics are
    the whole batch's, as on one device. Each device's quarter has its own mean, so per-device
    variances would be far smaller than the global one."""
    assert jax.device_count() == 4
    rng = np.random.default_rng(2)
    offsets = np.repeat(np.arange(4.0) * 3.0, 2)[:, None, None, None]
    x = (rng.normal(size=(8, 3, 3, CHANNELS)) + offsets).astype(np.float32)
    params = _bn_params(rng)
    apply = _train_apply(BatchNorm(train=True))
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    assert len(sharded_x.sharding.device_set) == 4
    y4, stats4 = jax.jit(apply, out_shardings=NamedSharding(mesh, PartitionSpec()))(
        jax.device_put(params, NamedSharding(mesh, PartitionSpec())), sharded_x
    )
    y1, stats1 = jax.jit(apply)(*jax.device_put((params, x), jax.devices()[0]))
    np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats4, stats1, rtol=1e-6)
    values = x.astype(np.float64)
    global_var = values.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(
        stats4["batch_stats"]["running_var"],
        0.9 * params["running_var"] + 0.1 * global_var,
        rtol=1e-5,
    )


def test_train_mode_without_the_mutable_collection_is_an_error():
    params = _bn_params(np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\].*batch_stats='frozen'"):
        BatchNorm(train=True).apply({"params": params}, np.ones((2, 2, 2, CHANNELS), np.float32))


def test_write_statistics_refuses_leaves_that_are_not_statistics():
    params = {"norm": _bn_params(np.random.default_rng(4))}
    with pytest.raises(ValueError, match="norm/scale"):
        write_statistics(params, {"norm": {"scale": np.zeros(CHANNELS, np.float32)}})
    with pytest.raises(ValueError, match="other/running_mean"):
        write_statistics(params, {"other": {"running_mean": np.zeros(CHANNELS, np.float32)}})


# ----------------------------------------------------------------------------------------------
# The ResNet and make_classifier.


def _model_config(**fields):
    config = pretrain.get_config().model
    config.update(dict(name="resnet18", width=8, norm="batch", num_classes=10))
    config.update(fields)
    return config


def test_make_classifier_trains_with_batch_statistics_and_evaluates_with_running_ones():
    model_config = _model_config()
    assert make_classifier(model_config).train
    assert not make_classifier(model_config, for_eval=True).train
    assert not make_classifier(_model_config(batch_stats="frozen")).train
    net = make_classifier(model_config)
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((2, 28, 28, 3)))["params"]
    flat = _flat(params)
    norms = sorted({path.rpartition("/")[0] for path in flat if path.endswith("running_var")})
    assert len(norms) == 20  # stem, 2 per BasicBlock x 8, 3 downsample projections
    for norm in norms:
        assert {f"{norm}/{leaf}" for leaf in ("scale", "bias", "running_mean", "running_var")} <= (
            set(flat)
        )
        np.testing.assert_array_equal(flat[f"{norm}/running_mean"], 0.0)
        np.testing.assert_array_equal(flat[f"{norm}/running_var"], 1.0)
    # Each block still starts as the identity: its last norm's scale is zero.
    np.testing.assert_array_equal(params["stage2"]["block1"]["norm2"]["scale"], 0.0)
    np.testing.assert_array_equal(params["stage2"]["block1"]["norm1"]["scale"], 1.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"norm": "batchnorm"}, "model.norm='batchnorm'"), ({"batch_stats": "fixed"}, "batch_stats")],
)
def test_unknown_norm_or_batch_stats_mode_is_a_config_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        make_classifier(_model_config(**fields))


# ----------------------------------------------------------------------------------------------
# Transfer plan and the trainer's step.


def _config(data_dir, steps=4, **model_fields):
    config = shrink(pretrain.get_config(), data_dir, steps=steps, batch_size=16)
    config.model.update(dict(name="resnet18", width=8, norm="batch"))
    config.model.update(model_fields)
    config.optimizer.weight_decay = 0.05
    return config


def test_plan_freezes_statistics_and_copies_them_with_their_layer(data_dir, tmp_path):
    """Statistics are always frozen to the optimizer, shown as such in the layer table, and a
    copy pattern takes them along with their layer's scale and bias."""
    config = _config(data_dir)
    config.transfer.init_from = str(tmp_path)
    config.transfer.copy = ("stem", "stage1")
    method = methods.build(config)
    shapes = jax.eval_shape(method.init_params, jax.random.key(0))
    saved = jax.tree.map(lambda s: np.full(s.shape, 7, s.dtype), shapes)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(3, args=ocp.args.StandardSave({"params": saved}))
        manager.wait_until_finished()

    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    params = _flat(plan.apply(method.init_params(jax.random.key(1)), plan.pretrained))
    assert np.all(params["stem/norm/running_var"] == 7)
    assert np.all(params["stage1/block1/norm2/running_mean"] == 7)
    np.testing.assert_array_equal(params["stage2/block0/norm1/running_mean"], 0.0)
    np.testing.assert_array_equal(params["stage2/block0/norm1/running_var"], 1.0)
    labels = _flat(plan.labels)
    assert {path for path, label in labels.items() if label == ptree.FROZEN} == {
        path for path in labels if path.endswith(("/running_mean", "/running_var"))
    }
    assert "| stem/norm |" in plan.summary and "statistics: frozen 16, trained 16" in plan.summary


def test_train_step_stores_the_statistics_the_training_network_computed(data_dir):
    """One step with weight decay and a large lr: the statistics are exactly what the
    training network's BatchNorm computed on the batch (written after the optimizer update, so
    not decayed), and every weight moved."""
    config = _config(data_dir)
    config.lr.base = 1.0
    method = methods.build(config)
    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    schedule = optim.make_schedule(config.lr, config.train.steps)
    optimizer = ptree.partition_optimizer(
        optim.make_optimizer(config.optimizer, schedule), plan.labels
    )
    params = method.init_params(jax.random.key(0))
    # Statistics that weight decay would visibly shrink; unit last-norm scales, so that every
    # weight has a gradient (zero-initialised ones gate their whole residual branch).
    params = _flat(params)
    for path in params:
        if path.endswith(("running_mean", "running_var")):
            params[path] = params[path] + 2.0
        elif path.endswith("norm2/scale"):
            params[path] = jnp.ones_like(params[path])
    params = traverse_util.unflatten_dict(params, sep="/")
    state = {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (16, 28, 28, 3), dtype=np.uint8)
    batch = {"train_image": images, "train_label": rng.integers(0, 10, 16).astype(np.int32)}
    new_state, metrics = jax.jit(train.make_train_step(method, optimizer, schedule, plan))(
        state, batch
    )
    assert "batch_stats" not in metrics and np.isfinite(metrics["loss"])

    model = make_classifier(config.model)
    preprocess, _ = methods.image_model_fns(model, config.model)
    _, updates = model.apply(
        {"params": params}, preprocess(images), method="features", mutable=["batch_stats"]
    )
    expected = _flat(write_statistics(params, updates["batch_stats"]))
    before, after = _flat(params), _flat(new_state["params"])
    for path in before:
        if path.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(after[path], expected[path], rtol=1e-6, err_msg=path)
            assert not np.allclose(after[path], before[path]), path
        else:
            assert not np.array_equal(after[path], before[path]), path


def test_domain_adaptation_refuses_statistics_it_would_not_update(tiny_da_config):
    tiny_da_config.model.update(dict(name="resnet18", width=8, norm="batch"))
    with pytest.raises(ConfigError, match=r"model\.norm='batch'.*method 'classifier'"):
        methods.build(tiny_da_config)
    # Frozen statistics need no update: the DA methods train with them.
    tiny_da_config.model.batch_stats = "frozen"
    assert methods.build(tiny_da_config).train_streams


# ----------------------------------------------------------------------------------------------
# End to end (configs/pretrain.py).


def _final_params(workdir, step=None):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(step or manager.latest_step())["params"]


def _statistics(params):
    return {path: leaf for path, leaf in _flat(params).items() if path.endswith(("mean", "var"))}


@pytest.fixture(scope="module")
def source_run(data_dir, tmp_path_factory):
    """A ResNet-18 (width 8, norm='batch') trained 6 steps, checkpoints at 3 and 6."""
    config = _config(data_dir, steps=6)
    config.eval.every = config.checkpoint.every = 3
    config.checkpoint.max_to_keep = None
    workdir = str(tmp_path_factory.mktemp("source"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.mark.slow
def test_statistics_move_in_training_and_a_resumed_run_ends_identical(source_run, tmp_path):
    config, workdir = source_run
    final = _statistics(_final_params(workdir))
    assert all(np.all(np.isfinite(leaf)) for leaf in final.values())
    moved = [
        path
        for path, leaf in final.items()
        if not np.allclose(leaf, 0.0 if path.endswith("mean") else 1.0)
    ]
    assert len(moved) == len(final) == 40

    # A run killed after its step-3 checkpoint ends where the uninterrupted one did.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    manager = ocp.CheckpointManager(os.path.join(resumed, "checkpoints"))
    manager.delete(6)
    manager.wait_until_finished()
    results = train.train_and_evaluate(config, resumed)
    assert results["resumed_from_step"] == 3
    chex.assert_trees_all_close(_final_params(workdir), _final_params(resumed), atol=1e-6)


@pytest.mark.slow
def test_frozen_statistics_fine_tune_keeps_them_bit_identical(source_run, data_dir, tmp_path):
    _, source = source_run
    config = _config(data_dir, batch_stats="frozen")
    config.transfer.init_from = source
    config.lr.base = 0.5
    train.train_and_evaluate(config, str(tmp_path))
    start, end = _final_params(source), _final_params(str(tmp_path))
    chex.assert_trees_all_equal(_statistics(end), _statistics(start))
    assert not np.array_equal(end["stem"]["conv"]["kernel"], start["stem"]["conv"]["kernel"])
    assert not np.array_equal(end["stem"]["norm"]["scale"], start["stem"]["norm"]["scale"])


def test_a_batch_norm_checkpoint_starting_an_affine_network_is_folded():
    from tljax.models import batch_norm as bn

    rng = np.random.default_rng(0)
    layer = {
        "scale": rng.uniform(0.5, 2, 4).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
        "running_mean": rng.standard_normal(4).astype(np.float32),
        "running_var": rng.uniform(0.5, 2, 4).astype(np.float32),
    }
    affine = {"norm": {"scale": np.zeros(4, np.float32), "bias": np.zeros(4, np.float32)}}
    folded = bn.fold_into_affine({"norm": layer}, affine)["norm"]
    assert set(folded) == {"scale", "bias"}
    x = rng.standard_normal((3, 4)).astype(np.float32)
    batch_norm_eval = (x - layer["running_mean"]) / np.sqrt(layer["running_var"] + 1e-5)
    expected = batch_norm_eval * layer["scale"] + layer["bias"]
    np.testing.assert_allclose(x * folded["scale"] + folded["bias"], expected, rtol=1e-5, atol=1e-6)
    # A batch-norm target keeps the statistics as they are.
    kept = bn.fold_into_affine({"norm": layer}, {"norm": layer})["norm"]
    np.testing.assert_array_equal(kept["running_var"], layer["running_var"])


def test_multitask_refuses_statistics_updates_before_any_work(data_dir):
    from configs import multitask

    config = multitask.get_config()
    config.data.data_dir = data_dir
    config.model.update(dict(name="resnet18", width=8, norm="batch"))
    with pytest.raises(ConfigError, match="the multi-task methods do not update BatchNorm"):
        methods.build(config)
