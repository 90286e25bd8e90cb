"""Multi-task learning: sharing masks, loss balancing, gradient surgery, end-to-end runs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import shrink

from configs import multitask as multitask_config
from tljax import balancing, methods, train
from tljax.methods import multitask
from tljax.models.digits import DigitNet
from tljax.models.multitask import HardSharing


def _sharing(patterns, classes=(10, 10)):
    templates = {f"t{i}": DigitNet(num_classes=c) for i, c in enumerate(classes)}
    return HardSharing(templates, patterns, jnp.zeros((1, 28, 28, 3)))


def _layers(tree):
    return sorted({path.rpartition("/")[0] for path in _paths(tree)})


def _paths(tree):
    return {"/".join(str(k.key) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_shared_lower_layers_and_task_heads():
    sharing = _sharing(("feature",))
    params = sharing.init(jax.random.key(0))
    assert set(params["shared"]) == {"feature"}
    assert set(params["shared"]["feature"]) == {"conv_0", "conv_1"}
    for task in ("t0", "t1"):
        assert set(params["tasks"][task]) == {"label"}
        assert set(params["tasks"][task]["label"]) == {"dense_0", "dense_1", "dense_2"}
    # Every task's network sees the very same shared arrays and its own head.
    first, second = sharing.task_params(params, "t0"), sharing.task_params(params, "t1")
    assert first["feature"] is second["feature"]
    assert np.any(first["label"]["dense_2"]["kernel"] != second["label"]["dense_2"]["kernel"])
    logits = sharing.apply(params, "t1", jnp.zeros((2, 28, 28, 3)))
    assert logits.shape == (2, 10)


def test_task_specific_input_layers_shared_middle():
    shared = ("feature/conv_1", "label/dense_0", "label/dense_1")
    sharing = _sharing(shared)
    params = sharing.init(jax.random.key(0))
    assert _layers(params["shared"]) == ["feature/conv_1", "label/dense_0", "label/dense_1"]
    for task in ("t0", "t1"):
        assert sorted(_paths(params["tasks"][task])) == [
            "feature/conv_0/bias",
            "feature/conv_0/kernel",
            "label/dense_2/bias",
            "label/dense_2/kernel",
        ]
    assert sharing.shared_layers == ["feature/conv_1", "label/dense_0", "label/dense_1"]
    # The layer-order patterns of layer transfer work too: the first two layers are the convs.
    assert _sharing(("first:2",)).shared_layers == ["feature/conv_0", "feature/conv_1"]


def test_shared_head_with_different_class_counts_is_an_error():
    with pytest.raises(ValueError, match=r"(?s)same shape.*label/dense_2/kernel: t0 \(100, 10\)"):
        _sharing(("label",), classes=(10, 5)).init(jax.random.key(0))


def test_uncertainty_gradient_matches_hand_computation():
    losses = jnp.array([0.7, 2.0])
    log_vars = jnp.array([0.3, -0.5])
    grad = jax.grad(balancing.uncertainty_weighted_loss, argnums=1)(losses, log_vars)
    # d/ds [exp(-s) L + s/2] = -exp(-s) L + 1/2.
    np.testing.assert_allclose(grad, -np.exp(-np.array([0.3, -0.5])) * [0.7, 2.0] + 0.5, rtol=1e-6)
    np.testing.assert_allclose(balancing.uncertainty_weights(log_vars), np.exp([-0.3, 0.5]))


def test_pcgrad_projects_conflicting_gradients():
    grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    total, conflicts = balancing.pcgrad(grads, jax.random.key(0))
    # g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2 - (g2.g1/|g1|^2) g1 = (0, 1).
    np.testing.assert_allclose(total, [0.5, 1.5], atol=1e-6)
    np.testing.assert_array_equal(conflicts, [[False, True], [True, False]])
    agreeing = jnp.array([[1.0, 0.2], [0.5, 1.0], [0.3, 0.3]])
    total, conflicts = balancing.pcgrad(agreeing, jax.random.key(1))
    np.testing.assert_allclose(total, agreeing.sum(0), rtol=1e-6)
    assert not conflicts.any()


def test_gradnorm_weights_stay_normalised_and_move_towards_balance():
    logits = jax.random.normal(jax.random.key(0), (4,)) * 3
    np.testing.assert_allclose(balancing.normalized_weights(logits).sum(), 4.0, rtol=1e-6)
    # Equal training rates, task 0's gradient twice task 1's: GradNorm lowers w_0, raises w_1.
    grad = jax.grad(
        lambda z: balancing.gradnorm_loss(
            balancing.normalized_weights(z), jnp.array([2.0, 1.0]), jnp.ones(2), jnp.ones(2), 1.0
        )
    )(jnp.zeros(2))
    assert grad[0] > 0 > grad[1]


def test_cosine_matrix():
    cosines = balancing.cosine_matrix(jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(cosines[0, 1], 1 / np.sqrt(2), rtol=1e-6)
    assert cosines[2, 0] == 0


def test_slice_sizes_follow_the_mixing_ratio():
    assert multitask.slice_sizes(64, {"a": 3.0, "b": 1.0}) == {"a": 48, "b": 16}
    with pytest.raises(ValueError, match="does not split into whole slices"):
        multitask.slice_sizes(10, {"a": 1.0, "b": 2.0})


def _tiny(arg, data_dir):
    return shrink(multitask_config.get_config(arg), data_dir, steps=4)


def _small_batch(method, rows=4):
    batch = {}
    for stream in method.train_streams:
        for key in stream.keys:
            batch[f"{stream.name}_{key}"] = jnp.asarray(stream.arrays[key][:rows])
    return batch


def test_vectorised_per_task_gradients_equal_the_plain_gradient(data_dir):
    method = methods.build(_tiny("balancing=fixed,sharing=middle", data_dir))
    params = method.init_params(jax.random.key(0))
    batch = _small_batch(method)
    rng, step = jax.random.key(1), jnp.zeros((), jnp.int32)
    (loss, metrics), grads = jax.jit(method.value_and_grad)(params, batch, rng, step)
    (plain_loss, _), plain_grads = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True))(
        params, batch, rng, step
    )
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, plain_grads, rtol=1e-4, atol=1e-6)
    assert -1.0 <= metrics["grad_cos/mnist-mnist_m"] <= 1.0


def test_gradnorm_and_balancing_errors_are_named(data_dir):
    with pytest.raises(ValueError, match="shares none"):
        methods.build(_tiny("balancing=gradnorm,sharing=none", data_dir))
    config = _tiny("balancing=gradnorm", data_dir)
    config.multitask.gradnorm_layer = "label/dense_0"
    with pytest.raises(ValueError, match="gradnorm_layer='label/dense_0' is not a shared layer"):
        methods.build(config)
    config = _tiny("", data_dir)
    config.multitask.balancing = "dwa"
    with pytest.raises(ValueError, match="Unknown multitask.balancing 'dwa'"):
        methods.build(config)
    with pytest.raises(ValueError, match="tasks \\['svhn'\\] unknown for data=embedded"):
        multitask_config.get_config("tasks=mnist/svhn")


@pytest.mark.slow
@pytest.mark.parametrize(
    "arg", ["balancing=gradnorm,sharing=middle", "balancing=pcgrad", "balancing=uncertainty"]
)
def test_end_to_end_runs_log_per_task_metrics(data_dir, tmp_path, arg):
    results = train.train_and_evaluate(_tiny(arg, data_dir), str(tmp_path))
    final = results["final"]
    for task in ("mnist", "mnist_m"):
        for key in (f"train/task_loss/{task}", f"train/weight/{task}", f"{task}_test/accuracy"):
            assert np.isfinite(final[key]), key
    assert -1.0 <= final["train/grad_cos/mnist-mnist_m"] <= 1.0
    if "gradnorm" in arg:
        # The step's weights (not a mean of means) sum to T = 2 at every step.
        np.testing.assert_allclose(final["train/weight/mnist"] + final["train/weight/mnist_m"], 2.0)
        assert final["train/gradnorm_loss"] >= 0
    if "pcgrad" in arg:
        assert 0.0 <= final["train/pcgrad_conflict_fraction"] <= 1.0
    if "uncertainty" in arg:
        # Both tasks' losses exceed 1/2, so their log-variances rise and weights fall below 1.
        assert final["train/weight/mnist"] < 1.0 and final["train/weight/mnist_m"] < 1.0
