"""SHOT (tljax/methods/shot.py): source stage, then source-free IM + clustering pseudo-labels."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import shrink

from tljax import models, train, transfer, validate
from tljax.methods import image_model_fns, shot

# --- transcriptions of the authors' code (github:tim-learn/SHOT) --------------------------------


def _softmax(logits):
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def _reference_im_loss(logits, epsilon=1e-5):
    """object/image_target.py train_target: entropy_loss -= gentropy_loss, with loss.Entropy."""
    softmax_out = _softmax(logits)
    entropy_loss = np.mean(np.sum(-softmax_out * np.log(softmax_out + epsilon), axis=1))
    msoftmax = softmax_out.mean(axis=0)
    return entropy_loss - np.sum(-msoftmax * np.log(msoftmax + epsilon))


def _reference_obtain_label(all_fea, all_output, threshold=0):
    """object/image_target.py obtain_label (distance='cosine'), from features and logits."""
    all_output = _softmax(all_output)
    predict = all_output.argmax(1)
    all_fea = np.concatenate([all_fea, np.ones((len(all_fea), 1))], axis=1)
    all_fea = all_fea / np.linalg.norm(all_fea, axis=1, keepdims=True)
    num_classes = all_output.shape[1]
    aff = all_output
    for _ in range(2):
        initc = aff.T.dot(all_fea)
        initc = initc / (1e-8 + aff.sum(axis=0)[:, None])
        cls_count = np.eye(num_classes)[predict].sum(axis=0)
        labelset = np.where(cls_count > threshold)[0]
        centres = initc[labelset]
        # scipy's cdist(all_fea, centres, 'cosine').
        distances = 1 - (all_fea @ centres.T) / (
            np.linalg.norm(all_fea, axis=1)[:, None] * np.linalg.norm(centres, axis=1)[None]
        )
        predict = labelset[distances.argmin(axis=1)]
        aff = np.eye(num_classes)[predict]
    return predict


def _reference_smoothed_cross_entropy(logits, labels, epsilon=0.1):
    """loss.py CrossEntropyLabelSmooth (size_average=True)."""
    log_probs = np.log(_softmax(logits))
    targets = np.eye(logits.shape[1])[labels]
    targets = (1 - epsilon) * targets + epsilon / logits.shape[1]
    return (-targets * log_probs).mean(0).sum()


# --- the losses ---------------------------------------------------------------------------------


def test_information_maximization_by_hand():
    # p1 = (1/2, 1/2), p2 = (3/4, 1/4); their mean is (5/8, 3/8).
    logits = jnp.asarray([[0.0, 0.0], [math.log(3.0), 0.0]])
    entropy = lambda p: -sum(q * math.log(q) for q in p)
    mean_entropy = (entropy([0.5, 0.5]) + entropy([0.75, 0.25])) / 2
    diversity = entropy([5 / 8, 3 / 8])
    loss, parts = shot.information_maximization_loss(logits)
    # A small difference of two entropies: float32 leaves it about 1e-7 absolute.
    np.testing.assert_allclose(loss, mean_entropy - diversity, atol=1e-6)
    np.testing.assert_allclose(parts["entropy"], mean_entropy, rtol=1e-6)
    np.testing.assert_allclose(parts["diversity"], diversity, rtol=1e-6)


def test_information_maximization_matches_shot():
    logits = np.random.default_rng(0).normal(size=(64, 10)) * 3
    loss, _ = shot.information_maximization_loss(jnp.asarray(logits))
    # SHOT's 1e-5 inside the logs moves each entropy by at most C * 1e-5.
    np.testing.assert_allclose(loss, _reference_im_loss(logits), atol=2e-4)


def test_information_maximization_stays_finite_for_saturated_predictions():
    logits = jnp.asarray([[200.0, 0.0, 0.0], [0.0, 200.0, 0.0]])
    loss, grad = jax.value_and_grad(lambda x: shot.information_maximization_loss(x)[0])(logits)
    np.testing.assert_allclose(loss, -math.log(2), rtol=1e-6)  # Confident, two of three classes.
    assert np.all(np.isfinite(grad))


def _separable_batch(seed=0, num_classes=4, per_class=12, dim=16):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_classes]
    features = 4.0 * directions[labels] + rng.normal(scale=0.5, size=(len(labels), dim))
    # Weakly informative predictions: the classifier's argmax is often wrong.
    logits = 1.0 * np.eye(num_classes)[labels] + rng.normal(scale=1.0, size=labels.shape + (4,))
    return features, logits, labels


def test_clustering_recovers_separable_clusters_the_classifier_gets_wrong():
    features, logits, labels = _separable_batch()
    assert (logits.argmax(1) != labels).mean() > 0.25
    pseudo = shot.cluster_pseudo_labels(jnp.asarray(features), jnp.asarray(logits))
    assert pseudo.dtype == jnp.int32
    np.testing.assert_array_equal(pseudo, labels)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clustering_matches_shots_obtain_label(seed):
    rng = np.random.default_rng(seed)
    features = np.abs(rng.normal(size=(40, 12)))  # Post-ReLU features, as the digit net's.
    logits = rng.normal(size=(40, 6)) * 2
    logits[:, 5] -= 20.0  # A class no example predicts: SHOT skips its centroid.
    pseudo = shot.cluster_pseudo_labels(jnp.asarray(features), jnp.asarray(logits))
    reference = _reference_obtain_label(features, logits)
    assert 5 not in reference
    np.testing.assert_array_equal(pseudo, reference)


@pytest.mark.parametrize(
    "value, steps", [(0.5, 3), (0.0, 0), (0.34, 2), (1000, 1000), (4.0, 4), (1, 1)]
)
def test_source_steps_are_a_fraction_or_a_count(value, steps):
    assert shot.source_step_count(value, 6) == steps


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_bad_source_steps_are_refused(value):
    with pytest.raises(validate.ConfigError, match="shot.source_steps"):
        shot.source_step_count(value, 6)


# --- the method ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_shot_config(data_dir):
    """configs/da.py's SHOT recipe shrunk to 6 steps: 3 source steps, then 3 target steps."""
    from configs import da

    config = da.get_config("method=shot")
    # The module's defaults (the recipe sets the authors' digit values): what the tests compute.
    config.shot.update(shot.DEFAULTS)
    config.eval.validators = False
    config.eval.select_by = None
    return shrink(config, data_dir, steps=6, eval_every=6, eval_batch_size=200)


def _batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return {
        "source_image": rng.integers(0, 255, (size, 28, 28, 1), dtype=np.uint8),
        "source_label": rng.integers(0, 10, (size,)).astype(np.int32),
        "target_image": rng.integers(0, 255, (size, 28, 28, 3), dtype=np.uint8),
    }


def _network(config):
    net = models.make_classifier(config.model)
    preprocess, _ = image_model_fns(net, config.model)
    return net, preprocess


def _gradients(method, params, batch, step):
    grad_fn = jax.jit(jax.grad(method.loss_fn, has_aux=True), static_argnums=3)
    return grad_fn(params, batch, None, step)


def test_the_source_stage_is_label_smoothed_cross_entropy(tiny_shot_config):
    method = shot.build(tiny_shot_config)
    params = method.init_params(jax.random.key(0))
    batch = _batch()
    loss, metrics = method.loss_fn(params, batch, None, 2)  # Steps 0-2 train on the source.

    net, preprocess = _network(tiny_shot_config)
    logits = np.asarray(net.apply({"params": params}, preprocess(batch["source_image"])))
    labels = batch["source_label"]
    by_hand = np.mean(-0.9 * logits[np.arange(8), labels] - 0.01 * logits.sum(1)) + np.mean(
        np.log(np.exp(logits).sum(1))
    )
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
    np.testing.assert_allclose(loss, _reference_smoothed_cross_entropy(logits, labels), rtol=1e-5)
    assert metrics["target_stage"] == 0.0 and metrics["class_loss"] == loss
    np.testing.assert_allclose(metrics["label_accuracy"], np.mean(logits.argmax(1) == labels))
    grads, _ = _gradients(method, params, batch, 2)
    assert np.any(grads["label"]["dense_2"]["kernel"] != 0.0)  # The head trains here.


def test_the_target_stage_is_im_plus_pseudo_label_cross_entropy(tiny_shot_config):
    method = shot.build(tiny_shot_config)
    params = method.init_params(jax.random.key(0))
    batch = _batch()
    loss, metrics = method.loss_fn(params, batch, None, 3)

    net, preprocess = _network(tiny_shot_config)
    features = net.apply({"params": params}, preprocess(batch["target_image"]), method="features")
    logits = np.asarray(net.apply({"params": params}, features, method="classify"), np.float64)
    pseudo = _reference_obtain_label(np.asarray(features, np.float64), logits)
    cross_entropy = np.mean(-np.log(_softmax(logits))[np.arange(8), pseudo])
    np.testing.assert_allclose(
        loss, _reference_im_loss(logits) + 0.3 * cross_entropy, rtol=1e-4, atol=2e-4
    )
    assert metrics["target_stage"] == 1.0
    np.testing.assert_allclose(metrics["class_loss"], cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(metrics["label_accuracy"], np.mean(logits.argmax(1) == pseudo))


def test_the_target_stage_ignores_the_source_and_freezes_the_head(tiny_shot_config):
    tiny_shot_config.model.conv_impl = "xla"  # The gradient path, not the lowering, is tested.
    method = shot.build(tiny_shot_config)
    params = method.init_params(jax.random.key(0))
    batch, other = _batch(seed=0), _batch(seed=1)
    other["target_image"] = batch["target_image"]  # Only the source differs.
    grads, metrics = _gradients(method, params, batch, 3)
    other_grads, other_metrics = _gradients(method, params, other, 3)
    chex.assert_trees_all_equal(grads, other_grads)
    chex.assert_trees_all_equal(metrics, other_metrics)
    chex.assert_trees_all_equal(grads["label"], jax.tree.map(jnp.zeros_like, grads["label"]))
    assert all(np.any(leaf != 0.0) for leaf in jax.tree.leaves(grads["feature"]))


def test_the_head_pattern_selects_what_freezes(tiny_shot_config):
    tiny_shot_config.shot.head = "label/dense_2"  # SHOT's split: only the last layer.
    method = shot.build(tiny_shot_config)
    params = method.init_params(jax.random.key(0))
    grads, _ = _gradients(method, params, _batch(), 3)
    assert not np.any(grads["label"]["dense_2"]["kernel"])
    assert np.any(grads["label"]["dense_1"]["kernel"])


@pytest.mark.parametrize("head", ["classifier", "*"])
def test_a_head_pattern_that_selects_nothing_or_everything_is_refused(tiny_shot_config, head):
    tiny_shot_config.shot.head = head
    with pytest.raises(validate.ConfigError, match="shot.head"):
        shot.build(tiny_shot_config)


def test_streams_follow_the_stages(tiny_shot_config):
    streams = lambda: [s.name for s in shot.build(tiny_shot_config).train_streams]
    assert streams() == ["source", "target"]
    tiny_shot_config.shot.source_steps = 6  # Source training only: no target batch is loaded.
    assert streams() == ["source"]


def test_source_free_from_a_source_models_checkpoint(tiny_shot_config, tmp_path):
    """source_steps=0 with transfer.init_from: stage 2 from the first step, on the copied net."""
    config = tiny_shot_config
    source_params = shot.build(config).init_params(jax.random.key(5))
    manager = ocp.CheckpointManager(str(tmp_path / "source" / "checkpoints"))
    manager.save(4, args=ocp.args.StandardSave({"params": source_params}))
    manager.wait_until_finished()

    config.shot.source_steps = 0
    config.transfer = ml_collections.ConfigDict({"init_from": str(tmp_path / "source")})
    method = shot.build(config)
    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    params = plan.apply(method.init_params(jax.random.key(0)), plan.pretrained)
    chex.assert_trees_all_equal(params, source_params)
    loss, metrics = method.loss_fn(params, _batch(), None, 0)
    assert metrics["target_stage"] == 1.0 and np.isfinite(loss)


def test_a_few_steps_train_through_both_stages(tiny_shot_config, tmp_path):
    config = tiny_shot_config
    assert config.method == "shot"
    results = train.train_and_evaluate(config, str(tmp_path))
    final = results["final"]
    assert results["last_step"] == 6
    assert final["train/target_stage"] == 1.0  # The last log interval: steps 4-6.
    assert np.isfinite(final["train/loss"]) and final["train/im_loss"] <= 0.0
    assert 0.0 <= final["target_test/accuracy"] <= 1.0
