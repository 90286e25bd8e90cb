"""Adaptive Feature Norm (AFN, Xu et al., ICCV 2019), a term of the DA base.

"Larger Norm More Transferable: An Adaptive Feature Norm Approach for Unsupervised Domain
Adaptation": target features with small norms carry little information for the classifier, so
AFN enlarges the feature norms of both domains. Per domain, with ||f_n|| the L2 norm of example
n's features:

  stepwise (SAFN):  mean_n (||f_n|| - (stop_gradient(||f_n||) + delta))^2
  hard (HAFN):      (mean_n ||f_n|| - radius)^2

and the term is the source value plus the target value. SAFN's value is always delta^2 per
domain; what matters is its gradient, which moves every feature vector outwards along itself
(a step of size N / 2 on the mean grows each norm by delta), so the norms keep growing by a
bounded amount per step instead of towards a fixed radius.

Checked against Transfer-Learning-Library's ``tllib/normalization/afn.py``
(``AdaptiveFeatureNorm`` is SAFN; its example adds the source and the target loss) and, for
HAFN, which TLlib does not have, against the authors' ``jihanyang/AFN``
``vanilla/*/HAFN/code/train.py`` (``get_L2norm_loss_self_driven``: the batch's mean norm minus
the radius, squared); tests/test_regularizer_terms.py transcribes both. Deviations: the norm is
``optax.safe_norm``, so an all-zero feature row (possible after a ReLU) has zero gradient
instead of NaN; and the paper's bottleneck (FC-BN-ReLU with L2-preserved dropout, TLlib's
``Block``) is not built: the term acts on the network's ``features`` as they are, so the model
architecture stays the one every other term uses.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tljax import validate
from tljax.methods import adaptation

MODES = ("stepwise", "hard")


def feature_norms(features: jax.Array) -> jax.Array:
    """L2 norm of each row, with a zero (not NaN) gradient for all-zero rows.

    Args:
      features: [N, D] features.

    Returns:
      [N] norms.
    """
    return optax.safe_norm(features.astype(jnp.float32), 0.0, axis=-1)


def stepwise_feature_norm(features: jax.Array, delta: float) -> jax.Array:
    """SAFN: pull each norm towards its own current value plus ``delta``.

    Args:
      features: [N, D] features of one domain.
      delta: how far each step asks the norms to grow.

    Returns:
      Scalar mean squared distance to the enlarged norms (delta^2 in value).
    """
    norms = feature_norms(features)
    goal = jax.lax.stop_gradient(norms) + delta
    return jnp.square(norms - goal).mean()


def hard_feature_norm(features: jax.Array, radius: float) -> jax.Array:
    """HAFN: pull the batch's mean norm to a fixed ``radius``.

    Args:
      features: [N, D] features of one domain.
      radius: the norm R the mean is pulled to.

    Returns:
      Scalar (mean norm - radius)^2.
    """
    return jnp.square(feature_norms(features).mean() - radius)


def adaptive_feature_norm(
    source_features: jax.Array,
    target_features: jax.Array,
    *,
    mode: str = "stepwise",
    delta: float = 1.0,
    radius: float = 25.0,
) -> jax.Array:
    """AFN's loss: the source domain's plus the target domain's.

    Args:
      source_features: [N, D] source features.
      target_features: [M, D] target features.
      mode: 'stepwise' (SAFN, uses ``delta``) or 'hard' (HAFN, uses ``radius``).
      delta: SAFN's per-step norm increment.
      radius: HAFN's target norm.

    Returns:
      The scalar loss.

    Raises:
      ValueError: for an unknown mode.
    """
    if mode == "stepwise":
        per_domain = lambda features: stepwise_feature_norm(features, delta)
    elif mode == "hard":
        per_domain = lambda features: hard_feature_norm(features, radius)
    else:
        raise ValueError(f"AFN mode {mode!r}; expected one of {MODES}.")
    return per_domain(source_features) + per_domain(target_features)


DEFAULTS = {"mode": "stepwise", "delta": 1.0, "radius": 25.0}


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """AFN on the source and target features, from ``config.afn`` (mode, delta, radius).

    Args:
      config: the experiment config (its ``afn`` block).

    Returns:
      The AFN `Term`.

    Raises:
      tljax.validate.ConfigError: for an unknown mode.
    """
    settings = config.afn
    if settings.mode not in MODES:
        raise validate.ConfigError(f"afn.mode={settings.mode!r}; expected one of {MODES}.")
    mode, delta, radius = settings.mode, float(settings.delta), float(settings.radius)

    def loss(outputs: adaptation.Outputs):
        value = adaptive_feature_norm(
            outputs.source_features,
            outputs.target_features,
            mode=mode,
            delta=delta,
            radius=radius,
        )
        return value, {
            "afn_loss": value,
            "source_feature_norm": feature_norms(outputs.source_features).mean(),
            "target_feature_norm": feature_norms(outputs.target_features).mean(),
        }

    return adaptation.Term("afn", loss)
