"""Deep CORAL (Sun & Saenko, ECCV 2016 workshops): match the domains' feature statistics.

The term penalises the difference between the source and target features' first and second
moments, in Transfer-Learning-Library's form (commit c4aa59e, ``tllib/alignment/coral.py``,
``CorrelationAlignmentLoss``):

  loss = mean_k (mu_s - mu_t)_k^2 + mean_kl (C_s - C_t)_kl^2
       = |mu_s - mu_t|^2 / d + |C_s - C_t|_F^2 / d^2,

with C the unbiased (n - 1) covariance of a batch's d-dimensional features. The run's loss is
CE(source) + weight * loss. tests/test_statistics_terms.py holds a numpy transcription of
TLlib's code.

Deviation from the paper, on purpose and as TLlib: the paper's loss is |C_s - C_t|_F^2 / (4 d^2)
with no mean term. TLlib's covariance part is 4 times the paper's, and it adds the squared
mean difference, so that a shift of the features' mean, which covariances cannot see, is
aligned too. The paper's form is 0.25 * ``coral_covariance``, logged as a metric. The
covariances use the highest matmul precision and float32 whatever the model's dtype. TLlib
puts a 256-d bottleneck before the loss; here the features are the network's own (768-d for
the digit net).
"""

import jax
import jax.numpy as jnp
import ml_collections

from tljax.methods import adaptation

DEFAULTS = {}


def mean_and_covariance(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A batch's feature mean and unbiased covariance.

    Args:
      features: [n, d] features, n >= 2.

    Returns:
      ([d] mean, [d, d] covariance with the 1 / (n - 1) normalisation), in float32.
    """
    features = features.astype(jnp.float32)
    mean = features.mean(axis=0)
    centred = features - mean
    # A reduced-precision matmul (TPU bf16 passes, GPU TF32) would blur small covariances.
    product = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    return mean, product / (len(features) - 1)


def correlation_alignment(
    source: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TLlib's CORAL loss between two batches of features.

    Args:
      source: [n_s, d] source features (n_s >= 2).
      target: [n_t, d] target features (n_t >= 2).

    Returns:
      (loss, mean part, covariance part): loss = mean part + covariance part, the mean
      squared differences of the means ([d]) and of the covariances ([d, d]).
    """
    mean_s, covariance_s = mean_and_covariance(source)
    mean_t, covariance_t = mean_and_covariance(target)
    mean_part = jnp.mean(jnp.square(mean_s - mean_t))
    covariance_part = jnp.mean(jnp.square(covariance_s - covariance_t))
    return mean_part + covariance_part, mean_part, covariance_part


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """Deep CORAL's term on the source and target features; it has no settings.

    Args:
      config: the experiment config.

    Returns:
      The `adaptation.Term`, metrics ``coral`` (the loss), ``coral_mean`` and
      ``coral_covariance`` (its two parts).
    """
    del config

    def loss(outputs: adaptation.Outputs):
        value, mean_part, covariance_part = correlation_alignment(
            outputs.source_features, outputs.target_features
        )
        return value, {"coral": value, "coral_mean": mean_part, "coral_covariance": covariance_part}

    return adaptation.Term("coral", loss)
