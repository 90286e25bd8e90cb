"""Margin Disparity Discrepancy (MDD, Zhang et al., ICML 2019), a term of the DA base.

"Bridging Theory and Algorithm for Domain Adaptation": an adversarial classifier f' (the
base's auxiliary classifier) reads the features through a gradient reversal layer and tries
to agree with the main classifier's predictions h_f on the source while disagreeing with them
on the target; the features, through the reversal, work against it. The loss to minimise is

  loss = gamma * mean_s CE(f'(x_s), h_f(x_s)) - mean_t log(1 - softmax(f'(x_t))[h_f(x_t)]),

with the margin gamma (4) and log(1 - p) computed as TLlib's ``shift_log``,
log(min(1 - p + 1e-6, 1)), which bounds it at log(1e-6). The main classifier gets no gradient
from it (its predictions enter as argmax labels).

Checked against Transfer-Learning-Library's ``tllib/alignment/mdd.py``
(``ClassificationMarginDisparityDiscrepancy``, ``shift_log``, and ``GeneralModule``'s
reversal layer; tests/test_adversarial_terms.py transcribes them): the loss is TLlib's
``transfer_loss = -mdd(y_s, y_s_adv, y_t, y_t_adv)``, which its example adds to the source
cross-entropy with weight ``trade_off`` (1). The reversal follows TLlib's
``WarmStartGradientReverseLayer(alpha=1, lo=0, hi=0.1, max_iters=1000)``, stepped once per
iteration: its strength 2 hi / (1 + exp(-alpha i / max_iters)) - hi ramps from 0 to 0.1 over a
few thousand iterations, a tenth of the DANN schedule the base's ``reverse`` follows, so this
term reverses with its own strength (``mdd.grl_hi``, ``mdd.grl_max_iters``), the iteration i
being progress * ``train.steps``. Deviations: TLlib sums the per-example source and target
losses before averaging (it needs equal batch sizes); here each domain is averaged on its
own, which is the same when N = M. The adversarial head is the base's auxiliary classifier
(``da.auxiliary_widths``), not TLlib's bottleneck + 1024-wide head with dropout.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tljax import validate
from tljax.methods import adaptation
from tljax.models.grl import gradient_reversal

# TLlib's shift_log offset: log(1 - p) is floored at log(1e-6).
SHIFT_LOG_OFFSET = 1e-6

DEFAULTS = {"margin": 4.0, "grl_hi": 0.1, "grl_max_iters": 1000}


def warm_start_coefficient(
    step: jax.Array, hi: float = 0.1, lo: float = 0.0, alpha: float = 1.0, max_iters: float = 1000
) -> jax.Array:
    """TLlib's warm-start reversal strength at iteration ``step``.

    Args:
      step: the iteration (float or traced scalar).
      hi: the strength it approaches.
      lo: the strength at step 0.
      alpha: steepness.
      max_iters: the iteration scale of the ramp.

    Returns:
      2 (hi - lo) / (1 + exp(-alpha step / max_iters)) - (hi - lo) + lo, float32.
    """
    step = jnp.asarray(step, jnp.float32)
    span = hi - lo
    return 2.0 * span / (1.0 + jnp.exp(-alpha * step / max_iters)) - span + lo


def shift_log(x: jax.Array, offset: float = SHIFT_LOG_OFFSET) -> jax.Array:
    """log(min(x + offset, 1)): a log of x in [0, 1] that stays finite at 0.

    Args:
      x: values in [0, 1].
      offset: added before the log.

    Returns:
      The shifted log, in [log(offset), 0].
    """
    return jnp.log(jnp.minimum(x + offset, 1.0))


def margin_disparity_loss(
    source_logits: jax.Array,
    source_adversarial_logits: jax.Array,
    target_logits: jax.Array,
    target_adversarial_logits: jax.Array,
    margin: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The adversarial classifier's loss: agree with h_f on the source, disagree on the target.

    Args:
      source_logits: [N, C] main classifier logits of the source (only their argmax is used).
      source_adversarial_logits: [N, C] adversarial classifier logits of the source.
      target_logits: [M, C] main classifier logits of the target (only their argmax is used).
      target_adversarial_logits: [M, C] adversarial classifier logits of the target.
      margin: gamma.

    Returns:
      (the loss, its source cross-entropy CE(f'(x_s), h_f(x_s)), its target term
      -log(1 - softmax(f'(x_t))[h_f(x_t)])), scalars; the loss is TLlib's ``-mdd``.
    """
    source_cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
        source_adversarial_logits, source_logits.argmax(-1)
    ).mean()
    target_probabilities = jax.nn.softmax(target_adversarial_logits.astype(jnp.float32), -1)
    predicted = jnp.take_along_axis(
        target_probabilities, target_logits.argmax(-1)[:, None], axis=-1
    )[:, 0]
    target_term = -shift_log(1.0 - predicted).mean()
    return margin * source_cross_entropy + target_term, source_cross_entropy, target_term


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """MDD from ``config.mdd`` (margin, reversal ramp) and ``config.train.steps``.

    Args:
      config: the experiment config.

    Returns:
      The MDD `Term` (it trains the auxiliary classifier as the adversarial head).

    Raises:
      tljax.validate.ConfigError: a margin or ramp setting that is not positive.
    """
    settings = config.mdd
    for field in ("margin", "grl_hi", "grl_max_iters"):
        if not settings[field] > 0:
            raise validate.ConfigError(f"mdd.{field}={settings[field]!r}; it must be positive.")
    margin, hi, max_iters = float(settings.margin), float(settings.grl_hi), settings.grl_max_iters
    total_steps = config.train.steps

    def loss(outputs: adaptation.Outputs):
        strength = warm_start_coefficient(outputs.progress * total_steps, hi, 0.0, 1.0, max_iters)
        adversarial = lambda features: outputs.auxiliary(
            gradient_reversal(features, strength.astype(features.dtype))
        )
        value, source_cross_entropy, target_term = margin_disparity_loss(
            outputs.source_logits,
            adversarial(outputs.source_features),
            outputs.target_logits,
            adversarial(outputs.target_features),
            margin,
        )
        return value, {
            "mdd_loss": value,
            "mdd_source_cross_entropy": source_cross_entropy,
            "mdd_target_term": target_term,
            "mdd_grl_strength": strength,
        }

    return adaptation.Term("mdd", loss, auxiliary_classifier=True)
