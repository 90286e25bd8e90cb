"""Entropy minimisation on the target (Grandvalet & Bengio, NeurIPS 2005), a term of the DA base.

"Semi-supervised Learning by Entropy Minimization": unlabelled examples should be classified
confidently, so the term is the mean Shannon entropy of the target predictions,

  loss = mean_n H(softmax(target_logits_n)),   H(p) = -sum_c p_c log p_c.

Checked against Transfer-Learning-Library's ``tllib/modules/entropy.py`` (``entropy`` with
``reduction='mean'``; tests/test_regularizer_terms.py transcribes it). Deviation: TLlib computes
``-p * log(p + 1e-5)``; here ``log p`` comes from ``jax.nn.log_softmax`` of the logits, which is
exact, needs no epsilon, and keeps the gradient finite for confident predictions whose
probabilities underflow to 0 (the two differ by at most C * 1e-5 nats).
"""

import jax
import jax.numpy as jnp
import ml_collections

from tljax.methods import adaptation


def prediction_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) per example, in nats.

    Args:
      logits: [N, C] class logits.

    Returns:
      [N] entropies, each in [0, log C].
    """
    log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(log_probabilities) * log_probabilities).sum(axis=-1)


def _loss(outputs: adaptation.Outputs):
    loss = prediction_entropy(outputs.target_logits).mean()
    return loss, {"entropy_loss": loss}


DEFAULTS = {}

TERM = adaptation.Term("entropy", _loss)


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """The entropy-minimisation term; it has no settings.

    Args:
      config: the experiment config.

    Returns:
      `TERM`.
    """
    del config
    return TERM
