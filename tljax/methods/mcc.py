"""Minimum Class Confusion (MCC, Jin et al., ECCV 2020), a term of the DA base.

"Minimum Class Confusion for Versatile Domain Adaptation": on the target batch, with
temperature-scaled predictions P = softmax(logits / T) [N, C] and example weights
w_n = N (1 + exp(-H(P_n))) / sum_m (1 + exp(-H(P_m))) (confident examples count more; no
gradient flows through the weights), the class confusion matrix M = P^T diag(w) P [C, C] has
each column divided by its sum, and the loss is its off-diagonal mass per class:

  loss = (sum(M) - trace(M)) / C    (= 1 - trace(M) / C, since every column sums to 1).

Checked against Transfer-Learning-Library's ``tllib/self_training/mcc.py``
(``MinimumClassConfusionLoss``; tests/test_regularizer_terms.py transcribes it). TLlib divides
M by ``torch.sum(M, dim=1)`` (row sums, broadcast over columns); M is symmetric, so that is the
column normalisation written here. Deviation: the entropies of the weights use
``tljax.methods.entropy.prediction_entropy`` (log-softmax, no 1e-5 inside the log); they carry
no gradient, and the loss differs from TLlib's by ~1e-5 relative. TLlib's defaults are
temperature 2.5 and trade-off 1 (also for its digit benchmarks).
"""

import jax
import jax.numpy as jnp
import ml_collections

from tljax import validate
from tljax.methods import adaptation
from tljax.methods.entropy import prediction_entropy


def minimum_class_confusion(logits: jax.Array, temperature: float) -> jax.Array:
    """MCC's class-confusion loss of a batch of (target) logits.

    Args:
      logits: [N, C] class logits.
      temperature: softmax temperature T > 0 (1 gives the plain softmax).

    Returns:
      Scalar loss in [0, (C - 1) / C]: 0 when no two classes share an example.
    """
    batch_size, num_classes = logits.shape
    scaled = logits.astype(jnp.float32) / temperature
    probabilities = jax.nn.softmax(scaled, axis=-1)
    certainty = 1.0 + jnp.exp(-jax.lax.stop_gradient(prediction_entropy(scaled)))
    weights = batch_size * certainty / certainty.sum()
    confusion = (probabilities * weights[:, None]).T @ probabilities
    confusion = confusion / confusion.sum(axis=0, keepdims=True)
    return (confusion.sum() - jnp.trace(confusion)) / num_classes


DEFAULTS = {"temperature": 2.5}


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """MCC on the target logits, with ``config.mcc.temperature``.

    Args:
      config: the experiment config (its ``mcc`` block).

    Returns:
      The MCC `Term`.

    Raises:
      tljax.validate.ConfigError: if the temperature is not positive.
    """
    temperature = float(config.mcc.temperature)
    if temperature <= 0:
        raise validate.ConfigError(f"mcc.temperature={temperature}; it must be positive.")

    def loss(outputs: adaptation.Outputs):
        value = minimum_class_confusion(outputs.target_logits, temperature)
        return value, {"mcc_loss": value}

    return adaptation.Term("mcc", loss)
