"""Domain-adversarial training (DANN, Ganin & Lempitsky 2015).

Each training batch holds a labelled source half and an unlabelled target half.
loss = CE(source) + domain_weight * BCE(domain head on both halves), where the
domain head sits behind a gradient reversal layer of strength
lambda_p = 2 / (1 + exp(-gamma p)) - 1. With `dann.adversarial=False` the same
network trains on the source alone (the source-only baseline); pointing
`data.source` at the target domain gives the train-on-target upper bound.
"""

import jax.numpy as jnp
import ml_collections
import optax

from tljax import data, optim
from tljax.data.pipeline import Stream
from tljax.methods import Method, classification_sums, image_model_fns
from tljax.models import layers
from tljax.models.digits import DANNDigitNet


def grl_lambda(p, gamma: float = 10.0):
    """The paper's reversal schedule, 2 / (1 + exp(-gamma p)) - 1: 0 at p=0, ~1 at p=1.

    Args:
      p: training progress in [0, 1].
      gamma: steepness (10 in the paper).

    Returns:
      lambda_p as float32.
    """
    return 2.0 / (1.0 + jnp.exp(-gamma * jnp.asarray(p, jnp.float32))) - 1.0


def make_model(config: ml_collections.ConfigDict) -> DANNDigitNet:
    """The digit network described by `config.model`."""
    return DANNDigitNet(
        num_classes=config.model.num_classes,
        **layers.conv_options(config.model),
        dtype=jnp.dtype(config.model.dtype),
        microbatch=config.model.get("microbatch", "auto"),
    )


def build(config: ml_collections.ConfigDict) -> Method:
    """DANN (or its source-only / train-on-target baselines) from config.

    Args:
      config: experiment config with `data`, `model`, `dann` and `train` blocks.

    Returns:
      The `Method`: two-stream batch layout (source labelled, target unlabelled),
      evaluation on source and target test splits.
    """
    model = make_model(config)
    adversarial = config.dann.adversarial
    total_steps = config.train.steps
    preprocess, init_params = image_model_fns(model, config.model)

    # Micro-batches pay off under differentiation only (a chunk's activations stay in cache
    # from its forward to its backward pass); evaluation runs XLA's fused inference ops in one
    # pass, which is faster and compiles 5x faster than the chunks of a 500-image batch.
    eval_model = model.clone(microbatch=0)

    def apply(params, *args, method, net=model):
        return net.apply({"params": params}, *args, method=method)

    def loss_fn(params, batch, rng, step):
        del rng  # The network is deterministic (no dropout), as in the paper.
        labels = batch["source_label"]
        source_features = apply(params, preprocess(batch["source_image"]), method="features")
        logits = apply(params, source_features, method="classify")
        class_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {
            "class_loss": class_loss,
            "source_accuracy": (logits.argmax(-1) == labels).mean(),
        }
        loss = class_loss
        if adversarial:
            lam = grl_lambda(optim.progress(step, total_steps), config.dann.gamma)
            target_features = apply(params, preprocess(batch["target_image"]), method="features")
            domain_logits = jnp.concatenate(
                [
                    apply(params, source_features, lam, method="discriminate"),
                    apply(params, target_features, lam, method="discriminate"),
                ]
            )
            is_target = jnp.concatenate(
                [jnp.zeros(len(source_features)), jnp.ones(len(target_features))]
            )
            domain_loss = optax.sigmoid_binary_cross_entropy(domain_logits, is_target).mean()
            loss = loss + config.dann.domain_weight * domain_loss
            metrics |= {
                "domain_loss": domain_loss,
                "domain_accuracy": ((domain_logits > 0) == is_target).mean(),
                "grl_lambda": lam,
            }
        return loss, metrics

    def eval_fn(params, batch):
        features = apply(params, preprocess(batch["image"]), method="features", net=eval_model)
        logits = apply(params, features, method="classify", net=eval_model)
        return classification_sums(logits, batch["label"], batch["mask"])

    load = lambda name, split: data.load_split(name, split, config.data.data_dir)
    streams = [Stream("source", load(config.data.source, "train"), config.train.batch_size)]
    if adversarial:
        # The target's labels never enter a training batch.
        streams.append(
            Stream("target", load(config.data.target, "train"), config.train.batch_size, ("image",))
        )
    eval_sets = {
        "source_test": load(config.data.source, config.data.eval_split),
        "target_test": load(config.data.target, config.data.eval_split),
    }
    return Method(init_params, loss_fn, eval_fn, tuple(streams), eval_sets)
