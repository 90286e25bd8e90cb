"""SHOT: source-free domain adaptation by hypothesis transfer (Liang et al., ICML 2020).

"Do We Really Need to Access the Source Data? Source Hypothesis Transfer for Unsupervised Domain
Adaptation". Two stages on one network, switched by the step (``jax.lax.cond``, so a step
computes only its own stage):

1. steps < ``source_steps``: the source model, cross-entropy with label smoothing
   (``label_smoothing`` 0.1) on the labelled source batch.
2. later steps: only the unlabelled target batch. The classifier head (the params the ``head``
   pattern selects, `tljax.params.select`; ``'label'`` is the digit net's whole label MLP) is
   frozen, the hypothesis transferred from the source, and the features learn to fit it:

     loss = im_weight * IM + pseudo_weight * CE(logits, clustering pseudo-labels),
     IM = mean_n H(p_n) - H(mean_n p_n)

   (information maximisation: confident and diverse predictions), with pseudo-labels from
   prediction-weighted centroids of the L2-normalised features (`cluster_pseudo_labels`).

With ``source_steps=0`` the run is stage 2 alone: the source-free setting proper, starting from a
source model's checkpoint (``transfer.init_from``, e.g. a ``configs/da.py:method=source_only``
run, which trains the same network).

Checked against the authors' code (github:tim-learn/SHOT: ``object/image_target.py``
``train_target`` and ``obtain_label``, ``digit/uda_digit.py``, ``*/loss.py``
``CrossEntropyLabelSmooth`` and ``Entropy``); tests/test_shot.py transcribes ``obtain_label``
and the losses. Deviations:

* clustering is per target batch, not over the whole target set once per epoch: a train step
  sees one batch, and a pass over the target set each epoch would be a second data pipeline.
  The centroids are noisier and a class absent from a batch has none (as SHOT's
  ``labelset``, classes nobody is assigned to are skipped); larger target batches approach the
  original. The labels come from the network being trained, in the same forward pass, under
  stop_gradient (SHOT: the network at the epoch's start, in eval mode).
* the head is frozen by stop_gradient inside the loss, so its gradient is 0; the run's
  optimizer still carries momentum from stage 1 into the first stage-2 steps (and weight decay,
  if configured, still applies). SHOT builds a fresh optimizer for stage 2. Use
  ``transfer.freeze`` with the same pattern for a strictly frozen head (source-free runs).
* SHOT freezes only the last layer (its bottleneck trains); ``head='label'`` freezes the digit
  net's whole label MLP, so stage 2 adapts the convolutional features; ``head='label/dense_2'``
  is SHOT's split. Clustering uses the features the head takes in (``features``).
* the entropies are exact, from log-probabilities; SHOT computes -p log(p + 1e-5) (the two
  differ by at most C * 1e-5 nats).
* one run, one learning-rate schedule across both stages (SHOT restarts its schedule).
* the source batch still streams during stage 2 (the base's two-stream batch layout) but never
  enters the loss: stage-2 gradients do not depend on it (tests/test_shot.py checks).

Metrics: ``class_loss`` and ``label_accuracy`` are the cross-entropy and accuracy against the
labels of the current stage (source labels, then the pseudo-labels; the collapse monitor
watches them), ``im_loss`` is IM (0 in stage 1, which does not compute it) and
``target_stage`` is 1 in stage 2 (its mean over a log interval: the share of stage-2 steps).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from tljax import params as ptree
from tljax import validate
from tljax.collapse import Classifier
from tljax.methods import Method, adaptation
from tljax.methods.entropy import prediction_entropy

DEFAULTS = {
    # Stage-1 steps: a fraction of train.steps if below 1, else a step count; 0 is source-free.
    # Half: SHOT trains the digit source model and adapts for the same number of epochs.
    "source_steps": 0.5,
    # Stage 1: SHOT's label smoothing of the source cross-entropy.
    "label_smoothing": 0.1,
    # Stage 2: weights of IM (SHOT's ent_par) and the pseudo-label cross-entropy (cls_par,
    # 0.3 in the authors' object/run.sh; their digit/digit.sh uses 0.1).
    "im_weight": 1.0,
    "pseudo_weight": 0.3,
    # The frozen hypothesis: a tljax.params pattern (or comma-separated patterns).
    "head": "label",
}

# SHOT's obtain_label: centroids from the soft predictions, then one refinement from the labels.
CLUSTER_ROUNDS = 2


def information_maximization_loss(logits: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SHOT's IM loss: mean prediction entropy minus the entropy of the mean prediction.

    Args:
      logits: [M, C] class logits.

    Returns:
      (mean_n H(p_n) - H(mean_n p_n), {'entropy': the first, 'diversity': the second}), in nats.
    """
    log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = prediction_entropy(logits).mean()
    # log of the mean prediction, from the log-probabilities: no probability underflows to 0.
    log_marginal = jax.nn.logsumexp(log_probabilities, axis=0) - jnp.log(logits.shape[0])
    diversity = -(jnp.exp(log_marginal) * log_marginal).sum()
    return entropy - diversity, {"entropy": entropy, "diversity": diversity}


def cluster_pseudo_labels(features: jax.Array, logits: jax.Array) -> jax.Array:
    """SHOT's pseudo-labels: nearest class centroid of the features, in cosine distance.

    As ``obtain_label`` (object/image_target.py), over the given batch: features get a constant
    1 appended and are L2-normalised; class centroids are the features weighted by the softmax
    predictions; each example takes its nearest centroid among the classes some example is
    assigned to; then once more with the centroids of those hard labels.

    Args:
      features: [M, D] features (no gradient flows through the labels).
      logits: [M, C] class logits of the same examples.

    Returns:
      [M] int32 pseudo-labels.
    """
    features = jax.lax.stop_gradient(features).astype(jnp.float32)
    probabilities = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    num_classes = probabilities.shape[-1]
    features = jnp.concatenate([features, jnp.ones((features.shape[0], 1))], axis=1)
    features = _unit_rows(features)
    labels = probabilities.argmax(axis=-1)
    weights = probabilities
    for _ in range(CLUSTER_ROUNDS):
        centroids = weights.T @ features / (1e-8 + weights.sum(axis=0)[:, None])
        assigned = jax.nn.one_hot(labels, num_classes).sum(axis=0) > 0
        similarity = features @ _unit_rows(centroids).T
        labels = jnp.where(assigned, similarity, -jnp.inf).argmax(axis=-1)
        weights = jax.nn.one_hot(labels, num_classes)
    return labels.astype(jnp.int32)


def source_step_count(value: float, total_steps: int) -> int:
    """Stage-1 steps from the ``shot.source_steps`` setting.

    Args:
      value: a fraction of the run in [0, 1), or a whole number of steps >= 1.
      total_steps: the run's ``train.steps``.

    Returns:
      The number of source steps.

    Raises:
      tljax.validate.ConfigError: a negative value or a fractional count >= 1.
    """
    if value < 0 or (value >= 1 and value != int(value)):
        raise validate.ConfigError(
            f"shot.source_steps={value!r}: give a fraction of train.steps in [0, 1) or a whole "
            "number of steps."
        )
    return int(round(value * total_steps)) if value < 1 else int(value)


def build(config: ml_collections.ConfigDict) -> Method:
    """SHOT from config: a source stage, then source-free adaptation with a frozen head.

    Args:
      config: experiment config with `data`, `model`, `train`, `eval` and `shot` (`DEFAULTS`'
        fields) blocks, and optionally `transfer` (``init_from`` for a source-free run).

    Returns:
      The `Method`.

    Raises:
      tljax.validate.ConfigError: bad ``source_steps`` or a ``head`` pattern matching nothing.
    """
    settings = config.shot
    net = adaptation.network(config)
    total_steps = config.train.steps
    source_steps = source_step_count(settings.source_steps, total_steps)
    head = _head_patterns(settings.head)
    _check_head(net, head)
    if source_steps == 0 and not (config.get("transfer") or {}).get("init_from"):
        logging.warning(
            "shot.source_steps=0 without transfer.init_from adapts a network that never saw "
            "the source; set transfer.init_from to a source model's run."
        )

    def forward(params, images):
        features = net.apply(params, net.preprocess(images), method="features")
        return features, net.apply(params, features, method="classify")

    def source_stage(params, batch):
        labels = batch["source_label"]
        _, logits = forward(params, batch["source_image"])
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, logits.shape[-1]), settings.label_smoothing
        )
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, {
            "class_loss": loss,
            "label_accuracy": (logits.argmax(-1) == labels).mean(),
            "im_loss": jnp.zeros(()),
            "target_stage": jnp.zeros(()),
        }

    def target_stage(params, batch):
        frozen = ptree.select(params, head)
        params = jax.tree.map(
            lambda p, is_head: jax.lax.stop_gradient(p) if is_head else p, params, frozen
        )
        features, logits = forward(params, batch["target_image"])
        im_loss, _ = information_maximization_loss(logits)
        pseudo_labels = cluster_pseudo_labels(features, logits)
        pseudo_loss = optax.softmax_cross_entropy_with_integer_labels(logits, pseudo_labels).mean()
        loss = settings.im_weight * im_loss + settings.pseudo_weight * pseudo_loss
        return loss, {
            "class_loss": pseudo_loss,
            "label_accuracy": (logits.argmax(-1) == pseudo_labels).mean(),
            "im_loss": im_loss,
            "target_stage": jnp.ones(()),
        }

    def loss_fn(params, batch, rng, step):
        del rng
        if source_steps >= total_steps:
            return source_stage(params, batch)
        if source_steps == 0:
            return target_stage(params, batch)
        return jax.lax.cond(step < source_steps, source_stage, target_stage, params, batch)

    method = adaptation.method(config, net, loss_fn, with_target=source_steps < total_steps)
    watched = Classifier("class_loss", "label_accuracy", config.model.num_classes)
    return dataclasses.replace(method, classifiers=(watched,))


def _unit_rows(x: jax.Array) -> jax.Array:
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norms, jnp.finfo(x.dtype).tiny)


def _head_patterns(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def _check_head(net: adaptation.Network, head: tuple[str, ...]) -> None:
    shapes = jax.eval_shape(net.init_params, jax.random.key(0))
    try:
        frozen = ptree.select(shapes, head)
    except ValueError as error:
        raise validate.ConfigError(f"shot.head={','.join(head)!r}: {error}") from None
    if not head or all(jax.tree.leaves(frozen)):
        raise validate.ConfigError(
            f"shot.head={','.join(head)!r} must select the classifier head: some parameters, "
            "not none or all."
        )
