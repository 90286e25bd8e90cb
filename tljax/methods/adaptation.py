"""Domain adaptation: a labelled source, an unlabelled target, one base for every method.

The base owns what every domain-adaptation method shares: the labelled-source and
unlabelled-target training streams (the target's labels never enter a batch), the source and
target test sets, the network split into ``features`` and ``classify``, the extra heads a
method may ask for (a domain discriminator behind a gradient reversal layer with its schedule,
an auxiliary classifier), the source classification loss, and the label-free validators scored
at every evaluation (`tljax.validators`, on the source validation split and unlabelled target
images). A method is a `Term`: a pure function of the batch's `Outputs` that returns its loss
and metrics. The run's loss is

  CE(source) + sum_k weight_k * term_k(outputs)

so terms compose (`tljax.methods.da` reads them from config, e.g. ``da.terms='dann:1,mcc:1'``),
and a new method is its loss plus a config, with the trainer and the models untouched. With no
terms the same network trains on the source alone (the source-only baseline), and no target
batch is loaded. Methods whose loss is not of this form (SHOT's source-free stage) build their
own loss on the same `network` and `method` pieces.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tljax import data, models, optim, validators
from tljax.collapse import Classifier
from tljax.data import folders
from tljax.data.pipeline import Stream
from tljax.methods import Method, classification_sums, image_model_fns
from tljax.models.digits import MLPHead
from tljax.models.domain import WithHeads
from tljax.models.grl import gradient_reversal, grl_lambda

# Unlabelled target images the validators score at each evaluation, unless config says.
VALIDATOR_EXAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the network computed on one training batch, as a term sees it.

    Attributes:
      source_features: [N, D] features of the labelled source images.
      source_logits: [N, C] class logits of the source images.
      source_labels: [N] source labels.
      target_features: [M, D] features of the unlabelled target images.
      target_logits: [M, C] class logits of the target images.
      progress: training progress p in [0, 1].
      rng: a key for terms that draw random numbers.
      discriminate: inputs [K, E] -> domain logits [K] through the gradient reversal layer
        at the scheduled strength; None unless a term asked for a discriminator.
      classify: features [K, D] -> class logits [K, C] of the network's classifier.
      auxiliary: features [K, D] -> class logits [K, C] of the auxiliary classifier; None
        unless a term asked for one.
      reverse: x -> x with its gradient reversed and scaled by the scheduled strength
        lambda_p (identity in the forward pass).
      target_images: the target batch as it came (uint8 NHWC), for terms that look at other
        views of it (augmentation).
      forward: uint8 images -> (features, class logits), for such views.
    """

    source_features: jax.Array
    source_logits: jax.Array
    source_labels: jax.Array
    target_features: jax.Array
    target_logits: jax.Array
    progress: jax.Array
    rng: jax.Array
    discriminate: Callable[[jax.Array], jax.Array] | None = None
    classify: Callable[[jax.Array], jax.Array] | None = None
    auxiliary: Callable[[jax.Array], jax.Array] | None = None
    reverse: Callable[[jax.Array], jax.Array] | None = None
    target_images: jax.Array | None = None
    forward: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None


@dataclasses.dataclass(frozen=True)
class Term:
    """One domain-adaptation loss term.

    Attributes:
      name: the term's name (for messages).
      loss: `Outputs` -> (scalar loss, metrics dict of scalars).
      discriminator_input: (features, class_logits) -> the domain discriminator's input, for
        adversarial terms; None for terms without a discriminator. At most one term of a run
        may have one.
      auxiliary_classifier: whether the term trains a second classifier over the features
        (`Outputs.auxiliary`); terms that ask share one.
    """

    name: str
    loss: Callable[[Outputs], tuple[jax.Array, dict[str, jax.Array]]]
    discriminator_input: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    auxiliary_classifier: bool = False


@dataclasses.dataclass(frozen=True)
class Network:
    """The network of a domain-adaptation run, with the heads its terms asked for.

    Attributes:
      apply: (params, *args, method=name) -> the training network's output (``features``,
        ``classify``, ``classify_auxiliary``, ``discriminate``).
      preprocess: uint8 images -> the model's float input.
      init_params: rng -> params.
      eval_apply: as ``apply`` for the evaluation network (no micro-batching).
      has_discriminator: whether ``discriminate`` exists.
      has_auxiliary: whether ``classify_auxiliary`` exists.
    """

    apply: Callable[..., Any]
    preprocess: Callable[[jax.Array], jax.Array]
    init_params: Callable[[jax.Array], Any]
    eval_apply: Callable[..., Any]
    has_discriminator: bool
    has_auxiliary: bool


def network(
    config: ml_collections.ConfigDict,
    terms: Sequence[Term] = (),
    *,
    discriminator_widths: Sequence[int] = (100,),
    auxiliary_widths: Sequence[int] = (100, 100),
) -> Network:
    """The classifier of ``config.model`` with the heads ``terms`` ask for.

    Args:
      config: experiment config (its ``model`` block).
      terms: the run's terms.
      discriminator_widths: hidden widths of the domain discriminator (one logit out).
      auxiliary_widths: hidden widths of the auxiliary classifier (num_classes out).

    Returns:
      The `Network`.

    Raises:
      ValueError: if more than one term asks for a discriminator.
      tljax.validate.ConfigError: ``model.norm='batch'`` with ``model.batch_stats='update'``:
        these methods do not update running statistics.
    """
    models.refuse_statistics_updates(config.model, "the domain-adaptation methods")
    adversarial = [term for term in terms if term.discriminator_input is not None]
    if len(adversarial) > 1:
        raise ValueError(
            f"Terms {[t.name for t in adversarial]} each want a domain discriminator; "
            "a run has one."
        )
    has_auxiliary = any(term.auxiliary_classifier for term in terms)
    dtype = jnp.dtype(config.model.dtype)

    def with_heads(classifier):
        if not adversarial and not has_auxiliary:
            return classifier
        return WithHeads(
            classifier,
            domain=MLPHead((*discriminator_widths, 1), dtype=dtype) if adversarial else None,
            discriminator_input=adversarial[0].discriminator_input if adversarial else None,
            auxiliary=(
                MLPHead((*auxiliary_widths, config.model.num_classes), dtype=dtype)
                if has_auxiliary
                else None
            ),
        )

    net = with_heads(models.make_classifier(config.model))
    # Micro-batches pay off under differentiation only (a chunk's activations stay in cache
    # from its forward to its backward pass); evaluation runs in one pass.
    eval_net = with_heads(models.make_classifier(config.model, for_eval=True))
    preprocess, init_params = image_model_fns(net, config.model)

    def apply(params, *args, method, module=net):
        return module.apply({"params": params}, *args, method=method)

    return Network(
        apply=apply,
        preprocess=preprocess,
        init_params=init_params,
        eval_apply=lambda params, *args, method: apply(
            params, *args, method=method, module=eval_net
        ),
        has_discriminator=bool(adversarial),
        has_auxiliary=has_auxiliary,
    )


def build(
    config: ml_collections.ConfigDict,
    terms: Sequence[tuple[Term, float]],
    *,
    grl_gamma: float = 10.0,
    discriminator_widths: Sequence[int] = (100,),
    auxiliary_widths: Sequence[int] = (100, 100),
) -> Method:
    """A domain-adaptation method: source cross-entropy plus weighted terms.

    Args:
      config: experiment config with `data` (source, target, eval_split, data_dir), `model`,
        `train` (steps, batch_size: per domain) and `eval` blocks.
      terms: (term, weight) pairs; empty for the source-only baseline.
      grl_gamma: steepness of the reversal schedule 2 / (1 + exp(-gamma p)) - 1.
      discriminator_widths: hidden widths of the domain discriminator (one logit out).
      auxiliary_widths: hidden widths of the auxiliary classifier.

    Returns:
      The `Method`: two-stream batch layout (source labelled, target unlabelled) and
      evaluation on the source and target test splits.

    Raises:
      ValueError: if more than one term asks for a discriminator.
    """
    net = network(
        config,
        [term for term, _ in terms],
        discriminator_widths=discriminator_widths,
        auxiliary_widths=auxiliary_widths,
    )
    total_steps = config.train.steps

    def loss_fn(params, batch, rng, step):
        labels = batch["source_label"]
        features = lambda images: net.apply(params, net.preprocess(images), method="features")
        classify = lambda feats: net.apply(params, feats, method="classify")

        def forward(images):
            image_features = features(images)
            return image_features, classify(image_features)

        source_features = features(batch["source_image"])
        source_logits = classify(source_features)
        class_loss = optax.softmax_cross_entropy_with_integer_labels(source_logits, labels).mean()
        loss = class_loss
        metrics = {
            "class_loss": class_loss,
            "source_accuracy": (source_logits.argmax(-1) == labels).mean(),
        }
        if not terms:
            return loss, metrics
        progress = optim.progress(step, total_steps)
        lam = grl_lambda(progress, grl_gamma)
        discriminate = None
        if net.has_discriminator:
            discriminate = lambda inputs: net.apply(params, inputs, lam, method="discriminate")
            metrics["grl_lambda"] = lam
        auxiliary = None
        if net.has_auxiliary:
            auxiliary = lambda feats: net.apply(params, feats, method="classify_auxiliary")
        target_features = features(batch["target_image"])
        outputs = Outputs(
            source_features=source_features,
            source_logits=source_logits,
            source_labels=labels,
            target_features=target_features,
            target_logits=classify(target_features),
            progress=progress,
            rng=rng,
            discriminate=discriminate,
            classify=classify,
            auxiliary=auxiliary,
            reverse=lambda x: gradient_reversal(x, jnp.asarray(lam, x.dtype)),
            target_images=batch["target_image"],
            forward=forward,
        )
        for term, weight in terms:
            term_loss, term_metrics = term.loss(outputs)
            loss = loss + weight * term_loss
            metrics |= term_metrics
        return loss, metrics

    return method(config, net, loss_fn, with_target=bool(terms))


def method(
    config: ml_collections.ConfigDict, net: Network, loss_fn: Callable, *, with_target: bool
) -> Method:
    """The `Method` of a domain-adaptation loss on ``net``: streams, evaluation, validators.

    Args:
      config: experiment config (`data`, `model`, `train`, `eval` blocks; `eval.validators`
        turns the label-free validators on).
      net: the run's `Network`.
      loss_fn: (params, batch, rng, step) -> (loss, metrics) over batches with
        ``source_image``, ``source_label`` and, ``with_target``, ``target_image``.
      with_target: whether training batches carry unlabelled target images.

    Returns:
      The `Method`.
    """

    def eval_fn(params, batch):
        features = net.eval_apply(params, net.preprocess(batch["image"]), method="features")
        logits = net.eval_apply(params, features, method="classify")
        return classification_sums(logits, batch["label"], batch["mask"])

    def predict_fn(params, batch):
        features = net.eval_apply(params, net.preprocess(batch["image"]), method="features")
        logits = net.eval_apply(params, features, method="classify")
        return {"features": features.astype(jnp.float32), "logits": logits}

    streams, eval_sets = _streams_and_eval_sets(config, with_target)
    validation = {}
    if config.eval.get("validators", False):
        validation = _validation_sets(config)
    source_classifier = Classifier("class_loss", "source_accuracy", config.model.num_classes)
    return Method(
        net.init_params,
        loss_fn,
        eval_fn,
        streams,
        eval_sets,
        classifiers=(source_classifier,),
        predict_fn=predict_fn if validation else None,
        validation_sets=validation,
        validate_fn=score_validators if validation else None,
    )


def score_validators(outputs: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """The label-free validators of one evaluation (`tljax.validators.score_all`).

    Args:
      outputs: 'source_val' -> {'features', 'logits', 'label'} and 'target_unlabelled' ->
        {'features', 'logits'}: the network's outputs on the validation sets.

    Returns:
      validator name -> score (higher is better).
    """
    source, target = outputs["source_val"], outputs["target_unlabelled"]
    return validators.score_all(
        source["features"],
        source["logits"],
        source["label"],
        target["features"],
        target["logits"],
    )


def _load(config, name: str, split: str):
    return data.load_split(name, split, config.data.data_dir)


def _streams_and_eval_sets(config, with_target: bool):
    folders.check_domains_match(
        {"data.source": config.data.source, "data.target": config.data.target}
    )
    streams = [
        Stream("source", _load(config, config.data.source, "train"), config.train.batch_size)
    ]
    if with_target:
        # The target's labels never enter a training batch.
        target = _load(config, config.data.target, "train")
        streams.append(Stream("target", target, config.train.batch_size, ("image",)))
    eval_sets = {
        "source_test": _load(config, config.data.source, config.data.eval_split),
        "target_test": _load(config, config.data.target, config.data.eval_split),
    }
    return tuple(streams), eval_sets


def _validation_sets(config) -> dict[str, dict[str, np.ndarray]]:
    """The labelled source validation split and a fixed sample of unlabelled target images."""
    source_split = config.data.get("source_val_split") or config.data.eval_split
    target = _load(config, config.data.target, "train")
    count = min(config.eval.get("validator_examples", VALIDATOR_EXAMPLES), len(target["image"]))
    # A fixed sample (not the run's seed), so every run of a sweep is scored on the same images.
    rows = np.sort(np.random.default_rng(0).permutation(len(target["image"]))[:count])
    return {
        "source_val": dict(_load(config, config.data.source, source_split)),
        # Only images: the validators never see a target label.
        "target_unlabelled": {"image": target["image"][rows]},
    }
