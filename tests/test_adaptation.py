"""The domain-adaptation base: a method is a loss term; streams, discriminator, GRL shared."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models
from tljax.methods import adaptation, dann, image_model_fns


def _batch(size: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "source_image": rng.integers(0, 255, (size, 28, 28, 3), dtype=np.uint8),
        "source_label": rng.integers(0, 10, (size,)).astype(np.int32),
        "target_image": rng.integers(0, 255, (size, 28, 28, 3), dtype=np.uint8),
    }


def _target_entropy(outputs: adaptation.Outputs):
    probs = jax.nn.softmax(outputs.target_logits)
    entropy = -(probs * jnp.log(probs)).sum(-1).mean()
    return entropy, {"target_entropy": entropy}


ENTROPY = adaptation.Term("entropy", _target_entropy)


def test_a_term_adds_its_weighted_loss_to_the_source_cross_entropy(tiny_dann_config):
    source_only = adaptation.build(tiny_dann_config, [])
    with_entropy = adaptation.build(tiny_dann_config, [(ENTROPY, 0.3)])
    params = source_only.init_params(jax.random.key(0))
    batch = _batch()
    base_loss, base_metrics = source_only.loss_fn(params, batch, None, 2)
    loss, metrics = with_entropy.loss_fn(params, batch, None, 2)

    net = models.make_classifier(tiny_dann_config.model)
    preprocess, _ = image_model_fns(net, tiny_dann_config.model)
    probs = jax.nn.softmax(net.apply({"params": params}, preprocess(batch["target_image"])))
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    np.testing.assert_allclose(metrics["target_entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(loss, base_loss + 0.3 * entropy, rtol=1e-6)
    assert metrics["class_loss"] == base_metrics["class_loss"]
    assert "grl_lambda" not in metrics  # No discriminator was asked for.


def test_source_only_loads_no_target_batch(tiny_dann_config):
    method = adaptation.build(tiny_dann_config, [])
    assert [stream.name for stream in method.train_streams] == ["source"]
    with_target = adaptation.build(tiny_dann_config, [(ENTROPY, 1.0)])
    target = with_target.train_streams[1]
    assert target.name == "target" and target.keys == ("image",)  # Never the target's labels.
    assert set(method.eval_sets) == {"source_test", "target_test"}


def test_the_discriminator_adds_params_without_changing_the_networks(tiny_dann_config):
    rng = jax.random.key(3)
    plain = adaptation.build(tiny_dann_config, []).init_params(rng)
    adversarial = adaptation.build(tiny_dann_config, [(dann.TERM, 1.0)]).init_params(rng)
    assert set(adversarial) == {"feature", "label", "domain"}
    chex.assert_trees_all_equal({k: adversarial[k] for k in plain}, plain)
    chex.assert_shape(adversarial["domain"]["dense_0"]["kernel"], (768, 100))
    chex.assert_shape(adversarial["domain"]["dense_1"]["kernel"], (100, 1))


def test_the_discriminator_takes_whatever_input_its_term_builds(tiny_dann_config):
    """A CDAN-style term conditions on predictions: its discriminator sees features x classes."""
    outer = lambda features, logits: jnp.einsum(
        "nc,nd->ncd", jax.nn.softmax(logits), features
    ).reshape(len(features), -1)

    def conditional_loss(outputs):
        source = outputs.discriminate(outer(outputs.source_features, outputs.source_logits))
        target = outputs.discriminate(outer(outputs.target_features, outputs.target_logits))
        loss, _ = dann.domain_adversarial_loss(source, target)
        return loss, {}

    term = adaptation.Term("conditional", conditional_loss, discriminator_input=outer)
    method = adaptation.build(tiny_dann_config, [(term, 1.0)])
    params = method.init_params(jax.random.key(0))
    chex.assert_shape(params["domain"]["dense_0"]["kernel"], (768 * 10, 100))
    loss, metrics = method.loss_fn(params, _batch(), None, 3)
    assert np.isfinite(loss) and 0.0 < metrics["grl_lambda"] < 1.0


def test_one_discriminator_per_run(tiny_dann_config):
    with pytest.raises(ValueError, match="each want a domain discriminator"):
        adaptation.build(tiny_dann_config, [(dann.TERM, 1.0), (dann.TERM, 0.5)])


def test_domain_adversarial_loss_matches_the_reference_computation():
    """TLlib's DomainAdversarialLoss labels source 1 and averages the two halves' BCE."""
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=6), rng.normal(size=6)
    loss, accuracy = dann.domain_adversarial_loss(jnp.asarray(source), jnp.asarray(target))

    # TLlib's discriminator outputs P(source) = sigmoid(-our logit).
    p_source_s, p_source_t = 1 / (1 + np.exp(source)), 1 / (1 + np.exp(target))
    reference = 0.5 * (-np.log(p_source_s).mean() - np.log(1 - p_source_t).mean())
    reference_accuracy = 0.5 * ((p_source_s >= 0.5).mean() + (p_source_t < 0.5).mean())
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    np.testing.assert_allclose(accuracy, reference_accuracy, rtol=1e-6)
