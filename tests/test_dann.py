"""DANN building blocks: gradient reversal, schedules, model shapes, loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import optim
from tljax.methods import dann, image_model_fns
from tljax.models import make_classifier
from tljax.models.grl import gradient_reversal, grl_lambda


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_grl_is_identity_forward_and_negates_scaled_gradient(lam):
    x = jax.random.normal(jax.random.key(0), (4, 7))
    g = jax.random.normal(jax.random.key(1), (4, 7))
    out, vjp = jax.vjp(lambda v: gradient_reversal(v, lam), x)
    chex.assert_trees_all_equal(out, x)
    chex.assert_trees_all_close(vjp(g)[0], -lam * g)


def test_grl_gives_no_gradient_to_lambda():
    grad = jax.grad(lambda lam: gradient_reversal(jnp.ones(3), lam).sum())(0.5)
    assert grad == 0.0


@pytest.mark.parametrize(
    "p, expected", [(0.0, 0.0), (0.5, 2 / (1 + np.exp(-5)) - 1), (1.0, 2 / (1 + np.exp(-10)) - 1)]
)
def test_grl_lambda_schedule(p, expected):
    np.testing.assert_allclose(grl_lambda(p, 10.0), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "step, expected", [(0, 0.01), (500, 0.01 / 6**0.75), (1000, 0.01 / 11**0.75)]
)
def test_dann_lr_annealing(step, expected):
    schedule = optim.dann_annealing(0.01, 10.0, 0.75, total_steps=1000)
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)


def test_digit_net_shapes_and_param_tree(tiny_dann_config):
    params = dann.build(tiny_dann_config).init_params(jax.random.key(0))
    assert set(params) == {"feature", "label", "domain"}
    chex.assert_shape(params["feature"]["conv_0"]["kernel"], (5, 5, 3, 32))
    chex.assert_shape(params["feature"]["conv_1"]["kernel"], (5, 5, 32, 48))
    chex.assert_shape(params["label"]["dense_0"]["kernel"], (768, 100))
    chex.assert_shape(params["label"]["dense_2"]["kernel"], (100, 10))
    chex.assert_shape(params["domain"]["dense_1"]["kernel"], (100, 1))


def _random_dann_batch(source_channels: int, size: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "source_image": rng.integers(0, 255, (size, 28, 28, source_channels), dtype=np.uint8),
        "source_label": rng.integers(0, 10, (size,)).astype(np.int32),
        "target_image": rng.integers(0, 255, (size, 28, 28, 3), dtype=np.uint8),
    }


def test_domain_head_gradient_reverses_into_features(tiny_dann_config):
    """The feature extractor gets -lambda times the domain loss gradient."""
    tiny_dann_config.model.conv_impl = "xla"  # The gradient path, not the lowering, is tested.
    method = dann.build(tiny_dann_config)
    params = method.init_params(jax.random.key(0))
    batch = _random_dann_batch(source_channels=1)
    step = tiny_dann_config.train.steps // 2
    grads, metrics = jax.jit(jax.grad(method.loss_fn, has_aux=True), static_argnums=3)(
        params, batch, None, step
    )
    assert np.isfinite(metrics["domain_loss"])
    np.testing.assert_allclose(metrics["grl_lambda"], grl_lambda(0.5), rtol=1e-6)
    # Turning the domain loss weight to zero must change only through the GRL path.
    tiny_dann_config.dann.domain_weight = 0.0
    no_domain = dann.build(tiny_dann_config)
    grads_no_domain, _ = jax.jit(jax.grad(no_domain.loss_fn, has_aux=True), static_argnums=3)(
        params, batch, None, step
    )
    chex.assert_trees_all_close(grads["label"], grads_no_domain["label"])
    assert not np.allclose(
        grads["feature"]["conv_0"]["kernel"], grads_no_domain["feature"]["conv_0"]["kernel"]
    )


def test_eval_counts_correct_predictions_of_the_trained_network(tiny_dann_config):
    """eval_fn (one pass, no micro-batches) scores exactly the network that training applies."""
    tiny_dann_config.model.microbatch = "4"
    method = dann.build(tiny_dann_config)
    params = method.init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 28, 28, 3), dtype=np.uint8)
    model = make_classifier(tiny_dann_config.model)  # The micro-batched training network.
    preprocess, _ = image_model_fns(model, tiny_dann_config.model)
    logits = model.apply({"params": params}, preprocess(images))
    labels = np.array(logits.argmax(-1))
    labels[:3] = (labels[:3] + 1) % 10  # Three wrong labels.
    sums = method.eval_fn(
        params, {"image": images, "label": labels, "mask": np.ones(10, np.float32)}
    )
    assert int(sums["count"]) == 10
    assert int(sums["accuracy"]) == 7  # A count; the trainer divides by 'count'.


def test_bfloat16_conv_operands_train_the_same_network_to_bf16_precision(tiny_dann_config):
    """model.conv_operands=bfloat16 changes the convolutions' rounding, not the network."""
    method = dann.build(tiny_dann_config)
    params = method.init_params(jax.random.key(0))
    batch = _random_dann_batch(source_channels=3)
    tiny_dann_config.model.conv_operands = "bfloat16"
    bf16_method = dann.build(tiny_dann_config)
    grad_fn = jax.jit(jax.grad(method.loss_fn, has_aux=True), static_argnums=3)
    bf16_grad_fn = jax.jit(jax.grad(bf16_method.loss_fn, has_aux=True), static_argnums=3)
    grads, metrics = grad_fn(params, batch, None, 1)
    bf16_grads, bf16_metrics = bf16_grad_fn(params, batch, None, 1)
    for key in ("class_loss", "domain_loss"):
        np.testing.assert_allclose(bf16_metrics[key], metrics[key], rtol=1e-2)
    chex.assert_trees_all_close(bf16_grads, grads, rtol=5e-2, atol=5e-3)
    kernel_grad = grads["feature"]["conv_0"]["kernel"]
    assert not np.allclose(bf16_grads["feature"]["conv_0"]["kernel"], kernel_grad, rtol=1e-6)


def test_unknown_conv_operands_fail_at_build(tiny_dann_config):
    tiny_dann_config.model.conv_operands = "float16"
    with pytest.raises(ValueError, match="conv_operands='float16'.*bfloat16"):
        dann.build(tiny_dann_config)
