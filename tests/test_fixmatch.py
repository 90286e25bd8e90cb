"""FixMatch's confidence-masked self-training term (tljax/methods/fixmatch.py)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tljax import train
from tljax.data import augment
from tljax.methods import adaptation, fixmatch


def _reference_loss(strong_logits, weak_logits, threshold):
    """TLlib's ConfidenceBasedSelfTrainingLoss (tllib/self_training/pseudo_label.py) in numpy."""
    weak = np.exp(weak_logits - weak_logits.max(1, keepdims=True))
    weak /= weak.sum(1, keepdims=True)
    confidence, pseudo_labels = weak.max(1), weak.argmax(1)
    mask = (confidence > threshold).astype(np.float64)
    shifted = strong_logits - strong_logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    cross_entropy = -log_softmax[np.arange(len(pseudo_labels)), pseudo_labels]
    return (cross_entropy * mask).mean(), mask


def test_masked_loss_by_hand():
    weak = jnp.log(jnp.asarray([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98]]))
    strong = jnp.log(jnp.asarray([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]]))
    loss, mask = fixmatch.confidence_masked_loss(strong, weak, threshold=0.9)
    # Rows 0 and 2 are confident (pseudo-labels 0 and 2); the mean is over all three rows.
    np.testing.assert_array_equal(mask, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(loss, (-math.log(0.6) - math.log(0.5)) / 3, rtol=1e-6)


def test_masked_loss_matches_tllib():
    rng = np.random.default_rng(0)
    strong, weak = rng.normal(size=(32, 10)) * 3, rng.normal(size=(32, 10)) * 3
    loss, mask = fixmatch.confidence_masked_loss(jnp.asarray(strong), jnp.asarray(weak), 0.7)
    reference, reference_mask = _reference_loss(strong, weak, 0.7)
    assert 0 < reference_mask.sum() < 32  # Both kinds of rows are exercised.
    np.testing.assert_array_equal(mask, reference_mask)
    np.testing.assert_allclose(loss, reference, rtol=1e-5)


def test_temperature_sharpens_the_weak_prediction():
    weak = jnp.asarray([[2.0, 0.0, 0.0]])  # max softmax e^2 / (e^2 + 2) = 0.787.
    strong = jnp.zeros((1, 3))
    _, mask = fixmatch.confidence_masked_loss(strong, weak, threshold=0.9)
    assert mask[0] == 0.0
    # At T = 0.5 the logits double: e^4 / (e^4 + 2) = 0.965.
    loss, mask = fixmatch.confidence_masked_loss(strong, weak, threshold=0.9, temperature=0.5)
    assert mask[0] == 1.0
    np.testing.assert_allclose(loss, math.log(3), rtol=1e-6)


def test_only_the_strong_view_gets_gradient():
    rng = np.random.default_rng(1)
    strong, weak = jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, 4)) * 5)
    loss = lambda s, w: fixmatch.confidence_masked_loss(s, w, threshold=0.5)[0]
    strong_grad, weak_grad = jax.grad(loss, argnums=(0, 1))(strong, weak)
    assert np.any(strong_grad != 0.0)
    np.testing.assert_array_equal(weak_grad, 0.0)


def _settings(**overrides):
    return ml_collections.ConfigDict({"fixmatch": {**fixmatch.DEFAULTS, **overrides}})


def test_the_term_trains_the_strong_view_on_the_weak_views_labels():
    """The term's views are augment.weak / augment.strong with the two halves of its key."""
    images = np.random.default_rng(2).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(28 * 28 * 3, 5)) / 3000.0)
    term = fixmatch.term(_settings(threshold=0.0))
    assert term.name == "fixmatch"

    def forward(batch):
        features = batch.reshape(len(batch), -1).astype(jnp.float32)
        return features, features @ weights

    @jax.jit  # One compilation of the augmentations instead of op-by-op dispatch.
    def term_and_reference(images, rng):
        seen = []
        recording_forward = lambda batch: seen.append(batch) or forward(batch)
        outputs = adaptation.Outputs(
            *(None,) * 5, progress=0.5, rng=rng, target_images=images, forward=recording_forward
        )
        loss, metrics = term.loss(outputs)
        weak_rng, strong_rng = jax.random.split(rng)
        weak, strong = augment.weak(weak_rng, images), augment.strong(strong_rng, images)
        expected, _ = fixmatch.confidence_masked_loss(forward(strong)[1], forward(weak)[1], 0.0)
        return loss, metrics, seen, jnp.concatenate([weak, strong]), expected

    loss, metrics, seen, views, expected = term_and_reference(images, jax.random.key(7))
    assert len(seen) == 1  # One forward pass over both views.
    np.testing.assert_array_equal(seen[0], views)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert metrics["fixmatch_loss"] == loss and metrics["fixmatch_mask_ratio"] == 1.0


def test_a_few_steps_train_through_da_build(tiny_da_config, tmp_path):
    config = tiny_da_config
    config.da.terms = "fixmatch:1"
    config.fixmatch.threshold = 0.0  # Every target example gets a pseudo-label.
    config.eval.every = config.checkpoint.every = config.train.steps
    config.eval.validators = False
    config.eval.select_by = None
    results = train.train_and_evaluate(config, str(tmp_path))
    final = results["final"]
    assert results["last_step"] == config.train.steps
    assert final["train/fixmatch_mask_ratio"] == pytest.approx(1.0)
    assert np.isfinite(final["train/fixmatch_loss"]) and final["train/fixmatch_loss"] > 0
    assert 0.0 <= final["target_test/accuracy"] <= 1.0
