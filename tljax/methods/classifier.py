"""Supervised classification: pretraining a source model and fine-tuning it on a target.

One labelled training split (optionally a class subset and/or k examples per class), any number
of labelled eval splits. With a `transfer` block (see `tljax.transfer`) the run starts from a
pretrained checkpoint, and the `conservative` block adds the penalties of
`tljax.regularizers`, measured against the network the run started from:

  l2sp_alpha, l2sp_beta   L2-SP on transferred / new weights;
  output_weight, temperature   distillation KL between the two networks' predictions;
  feature_weight          squared L2 between the two networks' features.

With BatchNorm running statistics (``model.norm='batch'``, `tljax.models.batch_norm`) and
``model.batch_stats='update'``, the loss runs the training network with batch statistics and
returns the updated running statistics as ``metrics["batch_stats"]``, which the trainer stores
into the params after the step. Evaluation and the starting network of the penalties use the
evaluation network (running statistics, nothing updated).
"""

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from tljax import data, regularizers
from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.data.subsets import class_subset, per_class_subset
from tljax.methods import Method, classification_sums, image_model_fns
from tljax.models import make_classifier
from tljax.models.batch_norm import COLLECTION, STATS_KEY, is_statistic
from tljax.models.classifiers import batch_norm_mode

PENALTIES = ("l2sp_alpha", "l2sp_beta", "output_weight", "temperature", "feature_weight")


def load_training_split(config: ml_collections.ConfigDict) -> dict:
    """The training split of `config.data`, cut to its class subset and k shots per class."""
    arrays = data.load_split(config.data.train, config.data.train_split, config.data.data_dir)
    if config.data.get("classes"):
        arrays = class_subset(arrays, config.data.classes)
    if config.data.get("shots_per_class"):
        arrays = per_class_subset(arrays, config.data.shots_per_class, config.data.shots_seed)
    return arrays


def _weights_only(tree):
    """``tree`` without its BatchNorm running statistics (a params-structured pytree)."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    kept = {path: leaf for path, leaf in flat.items() if not is_statistic(path)}
    return traverse_util.unflatten_dict(kept, sep="/") if len(kept) < len(flat) else tree


def _penalty_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    block = config.get("conservative") or ml_collections.ConfigDict()
    unknown = set(block.keys()) - set(PENALTIES)
    if unknown:
        raise ValueError(f"Unknown conservative field(s) {sorted(unknown)}; use {PENALTIES}.")
    weights = {name: float(block.get(name, 0.0)) for name in PENALTIES}
    weights["temperature"] = float(block.get("temperature", 1.0))
    needs_start = weights["l2sp_alpha"] or weights["output_weight"] or weights["feature_weight"]
    transfer = config.get("transfer") or {}
    if needs_start and not transfer.get("init_from"):
        raise ValueError(
            "conservative.l2sp_alpha / output_weight / feature_weight pull towards a pretrained "
            "network: set transfer.init_from."
        )
    return weights


def build(config: ml_collections.ConfigDict) -> Method:
    """Classification of `config.data.train`, evaluated on `config.data.eval_sets`.

    Args:
      config: experiment config with `data`, `model`, `train` and optional `transfer` and
        `conservative` blocks.

    Returns:
      The `Method`.
    """
    model = make_classifier(config.model)
    eval_model = make_classifier(config.model, for_eval=True)
    updates_statistics = batch_norm_mode(config.model) == "update"
    weights = _penalty_weights(config)
    preprocess, init_params = image_model_fns(model, config.model)
    classes = config.data.get("classes")
    if classes and len(classes) != config.model.num_classes:
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but data.classes has {len(classes)}."
        )

    def features(params, images, net=eval_model):
        return net.apply({"params": params}, preprocess(images), method="features")

    def classify(params, feats):
        return model.apply({"params": params}, feats, method="classify")

    def train_features(params, images):
        """(features of the training network, its running-statistics updates or None)."""
        if not updates_statistics:
            return features(params, images, net=model), None
        feats, updates = model.apply(
            {"params": params}, preprocess(images), method="features", mutable=[COLLECTION]
        )
        return feats, updates[COLLECTION]

    def loss_fn(params, batch, rng, step, anchor=None):
        del rng, step
        images = batch["train_image"]
        feats, statistics = train_features(params, images)
        logits = classify(params, feats)
        labels = batch["train_label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {"class_loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}
        if statistics is not None:
            metrics[STATS_KEY] = statistics
        if anchor is None:
            return loss, metrics
        penalty, penalty_metrics = conservative_penalty(params, feats, logits, images, anchor)
        return loss + penalty, metrics | penalty_metrics

    def conservative_penalty(params, feats, logits, images, anchor):
        total, metrics = jnp.zeros((), jnp.float32), {}
        if weights["l2sp_alpha"] or weights["l2sp_beta"]:
            # Running statistics are not weights: no pull towards the start, no decay.
            drift, new = regularizers.l2_sp(
                _weights_only(params),
                _weights_only(anchor.params),
                _weights_only(anchor.transferred),
                weights["l2sp_alpha"],
                weights["l2sp_beta"],
            )
            total += drift + new
            metrics |= {"l2sp_drift": drift, "l2sp_new": new}
        if weights["output_weight"] or weights["feature_weight"]:
            start_feats = features(anchor.params, images)
        if weights["feature_weight"]:
            feature_term = regularizers.feature_l2(feats, start_feats)
            total += weights["feature_weight"] * feature_term
            metrics["feature_l2"] = feature_term
        if weights["output_weight"]:
            output_term = regularizers.distillation_kl(
                logits, classify(anchor.params, start_feats), weights["temperature"]
            )
            total += weights["output_weight"] * output_term
            metrics["output_kl"] = output_term
        return total, metrics

    def eval_fn(params, batch):
        logits = classify(params, features(params, batch["image"]))
        return classification_sums(logits, batch["label"], batch["mask"])

    def eval_split(name):
        arrays = data.load_split(name, config.data.eval_split, config.data.data_dir)
        return class_subset(arrays, classes) if classes else arrays

    train = Stream("train", load_training_split(config), config.train.batch_size)
    eval_sets = {key: eval_split(name) for key, name in config.data.eval_sets.items()}
    uses_penalty = any(weights[k] for k in PENALTIES if k != "temperature")
    watched = (Classifier("class_loss", "accuracy", config.model.num_classes),)
    options = dict(anchored=uses_penalty, classifiers=watched)
    return Method(init_params, loss_fn, eval_fn, (train,), eval_sets, **options)
