"""Joint Adaptation Network (JAN, Long et al. ICML 2017): JMMD of features and predictions.

The term is the joint maximum mean discrepancy of the pairs (features, softmax predictions):
its kernel is the product of DAN's multi-Gaussian kernel over the features (bandwidths
following the batch, `tljax.methods.dan.multi_gaussian_kernel`) and one Gaussian kernel of
fixed bandwidth over the predicted class distributions,

  k((z, p), (z', p')) = sum_u k_u(z, z') * exp(-|p - p'|^2 / (2 * 0.92^2)),

weighted into an MMD estimate as DAN's (`tljax.methods.dan.index_matrix`). So the target
distribution is matched class-conditionally as the classifier sees it: with every prediction
equal, JMMD is DAN's MK-MMD. The run's loss is CE(source) + weight * JMMD.

Checked against Transfer-Learning-Library (commit c4aa59e) ``tllib/alignment/jan.py``
(``JointMultipleKernelMaximumMeanDiscrepancy``) as ``examples/domain_adaptation/
image_classification/jan.py`` calls it: feature kernels ``GaussianKernel(alpha=2**k)``,
k = -3..1, prediction kernel ``GaussianKernel(sigma=0.92, track_running_stats=False)`` on
``F.softmax(logits)``, quadratic estimate unless ``--linear``, TLlib's 2 / (n - 1) offset added;
tests/test_statistics_terms.py holds a numpy transcription. The adversarial variant (JAN-A,
TLlib's ``Theta`` layers) is not implemented. The class's own default is ``linear=True``; the
example's (and ``DEFAULTS`` here) is the quadratic estimate. The deviations of
`tljax.methods.dan` (Gram-matrix distances, float32 kernels, no bottleneck) apply here too.
"""

from collections.abc import Sequence

import jax
import ml_collections

from tljax.methods import adaptation, dan

DEFAULTS = {
    "kernel_alphas": dan.DEFAULTS["kernel_alphas"],
    # TLlib's fixed bandwidth of the softmax layer's kernel.
    "prediction_sigma": 0.92,
    "linear": False,
}


def jmmd(
    source: tuple[jax.Array, jax.Array],
    target: tuple[jax.Array, jax.Array],
    alphas: Sequence[float],
    prediction_sigma: float,
    linear: bool = False,
) -> jax.Array:
    """TLlib's joint MMD of (features, predictions) between the domains.

    Args:
      source: ([n, D] features, [n, C] class probabilities) of the source batch.
      target: the same for the target batch.
      alphas: bandwidth multipliers of the feature kernels (bandwidths follow the batch).
      prediction_sigma: the fixed bandwidth of the prediction kernel.
      linear: the linear-time estimate instead of the quadratic one.

    Returns:
      The scalar JMMD estimate (with TLlib's 2 / (n - 1) offset).
    """
    (source_features, source_probs), (target_features, target_probs) = source, target
    feature_kernel = dan.multi_gaussian_kernel(
        dan.concatenate_domains(source_features, target_features), alphas
    )
    prediction_kernel = dan.gaussian_kernel(
        dan.concatenate_domains(source_probs, target_probs), prediction_sigma
    )
    return dan.kernel_discrepancy(feature_kernel * prediction_kernel, linear)


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """JAN's term: JMMD of the (features, softmax predictions) pairs.

    Args:
      config: the experiment config; its ``jan`` block holds ``kernel_alphas``,
        ``prediction_sigma`` and ``linear``.

    Returns:
      The `adaptation.Term`, metric ``jmmd``.
    """
    alphas = tuple(float(alpha) for alpha in config.jan.kernel_alphas)
    sigma = float(config.jan.prediction_sigma)
    linear = bool(config.jan.linear)

    def loss(outputs: adaptation.Outputs):
        value = jmmd(
            (outputs.source_features, jax.nn.softmax(outputs.source_logits)),
            (outputs.target_features, jax.nn.softmax(outputs.target_logits)),
            alphas,
            sigma,
            linear,
        )
        return value, {"jmmd": value}

    return adaptation.Term("jan", loss)
