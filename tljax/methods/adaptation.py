"""Domain adaptation: a labelled source, an unlabelled target, one base for every method.

The base owns what every domain-adaptation method shares: the labelled-source and
unlabelled-target training streams (the target's labels never enter a batch), the source and
target test sets, the network split into ``features`` and ``classify``, the domain
discriminator behind a gradient reversal layer with its schedule, and the source
classification loss. A method is a `Term`: a pure function of the batch's `Outputs` that
returns its loss and metrics. The run's loss is

  CE(source) + sum_k weight_k * term_k(outputs)

so terms compose (a config lists them with their weights), and a new method is its loss plus
a config, with the trainer and the models untouched. With no terms the same network trains on
the source alone (the source-only baseline), and no target batch is loaded.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tljax import data, models, optim
from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.methods import Method, classification_sums, image_model_fns
from tljax.models.digits import MLPHead
from tljax.models.domain import WithDiscriminator
from tljax.models.grl import grl_lambda


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
    """

    source_features: jax.Array
    source_logits: jax.Array
    source_labels: jax.Array
    target_features: jax.Array
    target_logits: jax.Array
    progress: jax.Array
    rng: jax.Array
    discriminate: Callable[[jax.Array], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Term:
    """One domain-adaptation loss term.

    Attributes:
      name: the term's name (for messages).
      loss: `Outputs` -> (scalar loss, metrics dict of scalars).
      discriminator_input: (features, class_logits) -> the domain discriminator's input, for
        adversarial terms; None for terms without a discriminator. At most one term of a run
        may have one.
    """

    name: str
    loss: Callable[[Outputs], tuple[jax.Array, dict[str, jax.Array]]]
    discriminator_input: Callable[[jax.Array, jax.Array], jax.Array] | None = None


def build(
    config: ml_collections.ConfigDict,
    terms: Sequence[tuple[Term, float]],
    *,
    grl_gamma: float = 10.0,
    discriminator_widths: Sequence[int] = (100,),
) -> Method:
    """A domain-adaptation method: source cross-entropy plus weighted terms.

    Args:
      config: experiment config with `data` (source, target, eval_split, data_dir), `model`
        and `train` (steps, batch_size: per domain) blocks.
      terms: (term, weight) pairs; empty for the source-only baseline.
      grl_gamma: steepness of the reversal schedule 2 / (1 + exp(-gamma p)) - 1.
      discriminator_widths: hidden widths of the domain discriminator (one logit out).

    Returns:
      The `Method`: two-stream batch layout (source labelled, target unlabelled) and
      evaluation on the source and target test splits.

    Raises:
      ValueError: if more than one term asks for a discriminator.
    """
    adversarial = [term for term, _ in terms if term.discriminator_input is not None]
    if len(adversarial) > 1:
        raise ValueError(
            f"Terms {[t.name for t in adversarial]} each want a domain discriminator; "
            "a run has one."
        )
    net = models.make_classifier(config.model)
    # Micro-batches pay off under differentiation only (a chunk's activations stay in cache
    # from its forward to its backward pass); evaluation runs in one pass.
    eval_net = models.make_classifier(config.model, for_eval=True)
    if adversarial:
        head = MLPHead((*discriminator_widths, 1), dtype=jnp.dtype(config.model.dtype))
        net = WithDiscriminator(net, head, adversarial[0].discriminator_input)
    preprocess, init_params = image_model_fns(net, config.model)
    total_steps = config.train.steps

    def apply(params, *args, method, module=net):
        return module.apply({"params": params}, *args, method=method)

    def loss_fn(params, batch, rng, step):
        labels = batch["source_label"]
        source_features = apply(params, preprocess(batch["source_image"]), method="features")
        source_logits = apply(params, source_features, method="classify")
        class_loss = optax.softmax_cross_entropy_with_integer_labels(source_logits, labels).mean()
        loss = class_loss
        metrics = {
            "class_loss": class_loss,
            "source_accuracy": (source_logits.argmax(-1) == labels).mean(),
        }
        if not terms:
            return loss, metrics
        progress = optim.progress(step, total_steps)
        discriminate = None
        if adversarial:
            lam = grl_lambda(progress, grl_gamma)
            discriminate = lambda inputs: apply(params, inputs, lam, method="discriminate")
            metrics["grl_lambda"] = lam
        target_features = apply(params, preprocess(batch["target_image"]), method="features")
        outputs = Outputs(
            source_features=source_features,
            source_logits=source_logits,
            source_labels=labels,
            target_features=target_features,
            target_logits=apply(params, target_features, method="classify"),
            progress=progress,
            rng=rng,
            discriminate=discriminate,
        )
        for term, weight in terms:
            term_loss, term_metrics = term.loss(outputs)
            loss = loss + weight * term_loss
            metrics |= term_metrics
        return loss, metrics

    def eval_fn(params, batch):
        features = eval_net.apply({"params": params}, preprocess(batch["image"]), method="features")
        logits = eval_net.apply({"params": params}, features, method="classify")
        return classification_sums(logits, batch["label"], batch["mask"])

    source_classifier = Classifier("class_loss", "source_accuracy", config.model.num_classes)
    return Method(
        init_params,
        loss_fn,
        eval_fn,
        *_streams_and_eval_sets(config, bool(terms)),
        classifiers=(source_classifier,),
    )


def _streams_and_eval_sets(config, with_target: bool):
    load = lambda name, split: data.load_split(name, split, config.data.data_dir)
    streams = [Stream("source", load(config.data.source, "train"), config.train.batch_size)]
    if with_target:
        # The target's labels never enter a training batch.
        target = load(config.data.target, "train")
        streams.append(Stream("target", target, config.train.batch_size, ("image",)))
    eval_sets = {
        "source_test": load(config.data.source, config.data.eval_split),
        "target_test": load(config.data.target, config.data.eval_split),
    }
    return tuple(streams), eval_sets
