"""Domain-adversarial training (DANN, Ganin & Lempitsky 2015), a term of the DA base.

A domain discriminator on the features learns to tell source from target, behind a gradient
reversal layer whose strength follows lambda_p = 2 / (1 + exp(-gamma p)) - 1
(`tljax.methods.adaptation` owns the streams, the discriminator and the schedule):

  loss = CE(source) + domain_weight * BCE(discriminator on source and target features).

Checked against Transfer-Learning-Library's ``tllib/alignment/dann.py``
(``DomainAdversarialLoss``: the mean binary cross-entropy of the two halves, source labelled
1 there and 0 here, which gives the same loss with the discriminator's logit negated;
tests/test_dann.py holds that computation). With `dann.adversarial=False` the same network
trains on the source alone (the source-only baseline); pointing `data.source` at the target
domain gives the train-on-target upper bound.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tljax.methods import Method, adaptation


def domain_adversarial_loss(
    source_logits: jax.Array, target_logits: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The discriminator's binary cross-entropy, target labelled 1, and its accuracy.

    Args:
      source_logits: [N] domain logits of source examples.
      target_logits: [M] domain logits of target examples.

    Returns:
      (mean BCE over all N + M examples, fraction classified correctly).
    """
    logits = jnp.concatenate([source_logits, target_logits])
    is_target = jnp.concatenate([jnp.zeros(len(source_logits)), jnp.ones(len(target_logits))])
    loss = optax.sigmoid_binary_cross_entropy(logits, is_target).mean()
    return loss, ((logits > 0) == is_target).mean()


def _loss(outputs: adaptation.Outputs):
    loss, accuracy = domain_adversarial_loss(
        outputs.discriminate(outputs.source_features),
        outputs.discriminate(outputs.target_features),
    )
    return loss, {"domain_loss": loss, "domain_accuracy": accuracy}


DEFAULTS = {}

TERM = adaptation.Term("dann", _loss, discriminator_input=lambda features, logits: features)


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """DANN's term for a composition of terms (`tljax.methods.da`); it has no settings.

    Args:
      config: the experiment config.

    Returns:
      `TERM`.
    """
    del config
    return TERM


def build(config: ml_collections.ConfigDict) -> Method:
    """DANN (or its source-only / train-on-target baselines) from config.

    Args:
      config: experiment config with `data`, `model`, `train` and `dann` (adversarial, gamma,
        domain_weight) blocks.

    Returns:
      The `Method`.
    """
    terms = [(TERM, config.dann.domain_weight)] if config.dann.adversarial else []
    return adaptation.build(config, terms, grl_gamma=config.dann.gamma)
