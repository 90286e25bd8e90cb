"""Maximum Classifier Discrepancy (MCD, Saito et al., CVPR 2018), a term of the DA base.

"Maximum Classifier Discrepancy for Unsupervised Domain Adaptation": two classifiers F1, F2 on
shared features G both fit the source; on the target the classifiers are pushed apart
(maximise their discrepancy, exposing target features far from the source support) while G is
pushed to make them agree (minimise it). The discrepancy is the mean absolute difference of
the two softmaxes,

  d(p1, p2) = mean_{n, k} |p1_nk - p2_nk|.

F1 is the network's classifier (whose predictions are evaluated), F2 the base's auxiliary
classifier. The term is

  loss = CE(F2(G(x_s)), y_s)
         + entropy_weight * (B(F1(G(x_t))) + B(F2(G(x_t))))
         - discrepancy_weight * d(F1(R(G(x_t))), F2(R(G(x_t)))),

where R is a gradient reversal of fixed strength ``grl_coefficient`` (1) and
B(p) = -mean_k log(mean_n p_nk + 1e-6) is TLlib's MCD ``entropy`` (a class-balance term on the
batch's mean prediction). Minimising it, the classifiers ascend d and, through R, the features
descend it; F1's own source cross-entropy is the base's.

Deviation: the original alternates three optimiser steps per batch (A: G, F1, F2 fit the
source; B: F1, F2 maximise d with G fixed; C: G minimises d, ``num_k`` = 4 times). Here the
three happen in one step, the min-max written with a gradient reversal layer as DANN writes
its own (a reformulation, not the authors' procedure): the classifiers descend
-discrepancy_weight * d and the features +grl_coefficient * discrepancy_weight * d, in the
same update as the source losses. Per batch the classifiers get one update where the
original gives them two (A and B), and G one update on d where it gives four (C); raising
``grl_coefficient`` strengthens G's side. No dropout in the heads (TLlib's have it).

Checked against Transfer-Learning-Library's ``tllib/alignment/mcd.py``
(``classifier_discrepancy``, ``entropy``) and ``examples/.../mcd.py`` (steps A-C);
tests/test_adversarial_terms.py transcribes them. TLlib's defaults: trade_off 1 and
trade_off_entropy 0.01; on digits 0.3 and 0.03.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tljax import validate
from tljax.methods import adaptation
from tljax.models.grl import gradient_reversal

# TLlib's offset inside MCD's class-balance log.
BALANCE_LOG_OFFSET = 1e-6

DEFAULTS = {"discrepancy_weight": 1.0, "entropy_weight": 0.01, "grl_coefficient": 1.0}


def classifier_discrepancy(probabilities_1: jax.Array, probabilities_2: jax.Array) -> jax.Array:
    """MCD's discrepancy: the mean absolute difference of two classifiers' probabilities.

    Args:
      probabilities_1: [N, C] probabilities of one classifier.
      probabilities_2: [N, C] probabilities of the other on the same examples.

    Returns:
      Scalar in [0, 2 / C].
    """
    return jnp.abs(probabilities_1 - probabilities_2).mean()


def class_balance_entropy(probabilities: jax.Array) -> jax.Array:
    """TLlib's MCD ``entropy``: -mean_k log(mean_n p_nk + 1e-6).

    Small when the batch's mean prediction spreads over the classes; it keeps the classifiers
    from predicting one class for the whole target batch.

    Args:
      probabilities: [N, C] class probabilities.

    Returns:
      Scalar, at least log C (up to the offset).
    """
    return -jnp.log(probabilities.mean(0) + BALANCE_LOG_OFFSET).mean()


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """MCD from ``config.mcd`` (discrepancy and entropy weights, reversal strength).

    Args:
      config: the experiment config.

    Returns:
      The MCD `Term` (it trains the auxiliary classifier as the second classifier).

    Raises:
      tljax.validate.ConfigError: a negative weight or strength.
    """
    settings = config.mcd
    for field in ("discrepancy_weight", "entropy_weight", "grl_coefficient"):
        if not settings[field] >= 0:
            raise validate.ConfigError(f"mcd.{field}={settings[field]!r}; it must be >= 0.")
    discrepancy_weight = float(settings.discrepancy_weight)
    entropy_weight = float(settings.entropy_weight)
    grl_coefficient = float(settings.grl_coefficient)

    def loss(outputs: adaptation.Outputs):
        softmax = lambda logits: jax.nn.softmax(logits.astype(jnp.float32), -1)
        auxiliary_source = outputs.auxiliary(outputs.source_features)
        auxiliary_loss = optax.softmax_cross_entropy_with_integer_labels(
            auxiliary_source, outputs.source_labels
        ).mean()
        balance = class_balance_entropy(softmax(outputs.target_logits)) + class_balance_entropy(
            softmax(outputs.auxiliary(outputs.target_features))
        )
        reversed_target = gradient_reversal(
            outputs.target_features, jnp.asarray(grl_coefficient, outputs.target_features.dtype)
        )
        discrepancy = classifier_discrepancy(
            softmax(outputs.classify(reversed_target)),
            softmax(outputs.auxiliary(reversed_target)),
        )
        value = auxiliary_loss + entropy_weight * balance - discrepancy_weight * discrepancy
        return value, {
            "mcd_loss": value,
            "mcd_auxiliary_loss": auxiliary_loss,
            "mcd_auxiliary_accuracy": (auxiliary_source.argmax(-1) == outputs.source_labels).mean(),
            "mcd_discrepancy": discrepancy,
            "mcd_class_balance": balance,
        }

    return adaptation.Term("mcd", loss, auxiliary_classifier=True)
