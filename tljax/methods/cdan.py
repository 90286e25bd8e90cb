"""Conditional adversarial domain adaptation (CDAN / CDAN+E, Long et al., NeurIPS 2018).

"Conditional Adversarial Domain Adaptation": the domain discriminator sees the features f
conditioned on the classifier's predictions g = softmax(logits), through the multilinear map

  T(f, g) = g (x) f, flattened to [C * D],

or, when C * D is large, the randomized multilinear map with fixed Gaussian matrices
R_f [D, d] and R_g [C, d],

  T(f, g) = (f R_f) * (g R_g) / sqrt(d).

The loss is the discriminator's binary cross-entropy over source and target (behind the
base's gradient reversal layer, `tljax.methods.adaptation`). CDAN+E (``cdan.entropy=True``)
weights each example by w = 1 + exp(-H(g)), normalised to sum to the batch size, so confident
predictions count more in the alignment.

Checked against Transfer-Learning-Library's ``tllib/alignment/cdan.py``
(``ConditionalDomainAdversarialLoss``, ``MultiLinearMap``, ``RandomizedMultiLinearMap``;
tests/test_adversarial_terms.py transcribes them): the predictions and so the entropy weights
carry no gradient (TLlib detaches g); the row layout of T is TLlib's (class-major). Deviations:

- TLlib labels the source 1; here the target is 1 (`tljax.methods.dann` convention), the same
  loss with the discriminator's logit negated.
- The reversal strength is the run's DANN schedule (``da.grl_gamma`` over ``train.steps``,
  as in the CDAN authors' code, which ramps 2 / (1 + exp(-10 i / 10000)) - 1); TLlib's example
  ramps over a fixed 1,000 iterations instead (``WarmStartGradientReverseLayer``).
- ``randomized='auto'`` (the default) uses the randomized map when C * D > 4096, the paper's
  rule; TLlib leaves the choice to a flag. The random matrices come from a constant key
  derived from ``config.seed`` (TLlib draws them from the run's torch seed), so they are the
  same in initialisation and in every step of a run, and its resumptions.
- The entropies of the weights use log-softmax (no 1e-5 inside the log as in TLlib's
  ``entropy``); they carry no gradient and differ by ~1e-5 relative.
- The discriminator is the base's (``da.discriminator_widths``), not TLlib's 1024-wide one.

CDAN+E follows TLlib, not the authors' code (thuml/CDAN ``pytorch/loss.py``), which
normalises the weights within each domain and sends a reversed gradient through the entropy
into the classifier.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tljax import validate
from tljax.methods import adaptation
from tljax.methods.entropy import prediction_entropy

# The paper's rule: above this many multilinear outputs (C * D) the randomized map is used.
AUTO_RANDOMIZED_ABOVE = 4096
# Folded into the run's seed so the random matrices do not reuse the parameters' key.
_RANDOM_MAP_STREAM = 0xCDA

DEFAULTS = {"entropy": False, "randomized": "auto", "randomized_dim": 1024}


def multilinear_map(features: jax.Array, predictions: jax.Array) -> jax.Array:
    """The outer product of predictions and features per example, flattened.

    Args:
      features: [N, D] features.
      predictions: [N, C] class probabilities.

    Returns:
      [N, C * D], row n holding predictions[n, c] * features[n, d] at c * D + d.
    """
    outer = jnp.einsum("nc,nd->ncd", predictions, features)
    return outer.reshape(len(features), -1)


@functools.cache
def random_matrices(
    features_dim: int, num_classes: int, dim: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed Gaussian matrices of the randomized multilinear map.

    Cached and computed eagerly, so a traced step embeds them as constants rather than
    drawing 800k Gaussians at every step.

    Args:
      features_dim: D.
      num_classes: C.
      dim: d, the map's output width.
      seed: the run's seed.

    Returns:
      (R_f [D, d], R_g [C, d]) float32, standard normal.
    """
    with jax.ensure_compile_time_eval():
        key = jax.random.fold_in(jax.random.key(seed), _RANDOM_MAP_STREAM)
        features_key, predictions_key = jax.random.split(key)
        return (
            np.asarray(jax.random.normal(features_key, (features_dim, dim), jnp.float32)),
            np.asarray(jax.random.normal(predictions_key, (num_classes, dim), jnp.float32)),
        )


def randomized_multilinear_map(
    features: jax.Array, predictions: jax.Array, rf: jax.Array, rg: jax.Array
) -> jax.Array:
    """(f R_f) * (g R_g) / sqrt(d), an unbiased estimate of the multilinear map's inner products.

    Args:
      features: [N, D] features.
      predictions: [N, C] class probabilities.
      rf: [D, d] random matrix.
      rg: [C, d] random matrix.

    Returns:
      [N, d].
    """
    return (features @ rf) * (predictions @ rg) / np.sqrt(rf.shape[1])


def entropy_weights(logits: jax.Array) -> jax.Array:
    """CDAN+E's example weights 1 + exp(-H(softmax(logits))), normalised to sum to N.

    Args:
      logits: [N, C] class logits (source and target together).

    Returns:
      [N] weights with no gradient, summing to N.
    """
    certainty = 1.0 + jnp.exp(-prediction_entropy(jax.lax.stop_gradient(logits)))
    return certainty / certainty.sum() * len(logits)


def weighted_domain_loss(
    source_domain_logits: jax.Array,
    target_domain_logits: jax.Array,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The discriminator's binary cross-entropy (target labelled 1), per-example weighted.

    Args:
      source_domain_logits: [N] domain logits of source examples.
      target_domain_logits: [M] domain logits of target examples.
      weights: [N + M] example weights (source first), or None for 1.

    Returns:
      (mean of weight * BCE over all N + M examples, fraction classified correctly).
    """
    logits = jnp.concatenate([source_domain_logits, target_domain_logits])
    is_target = jnp.concatenate(
        [jnp.zeros(len(source_domain_logits)), jnp.ones(len(target_domain_logits))]
    )
    losses = optax.sigmoid_binary_cross_entropy(logits, is_target)
    if weights is not None:
        losses = weights * losses
    return losses.mean(), ((logits > 0) == is_target).mean()


def conditional_map(
    randomized: bool | None, randomized_dim: int, seed: int
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The discriminator's input T(f, softmax(logits)), predictions detached.

    Args:
      randomized: True for the randomized map, False for the full one, None to pick by size
        (randomized when C * D > `AUTO_RANDOMIZED_ABOVE`).
      randomized_dim: d of the randomized map.
      seed: the run's seed (fixes the random matrices).

    Returns:
      (features [N, D], logits [N, C]) -> [N, C * D] or [N, d].
    """

    def discriminator_input(features: jax.Array, logits: jax.Array) -> jax.Array:
        # As in TLlib, the discriminator may not push the classifier: only features adapt.
        predictions = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), -1))
        features_dim, num_classes = features.shape[-1], logits.shape[-1]
        use_random = randomized
        if use_random is None:
            use_random = features_dim * num_classes > AUTO_RANDOMIZED_ABOVE
        if not use_random:
            return multilinear_map(features, predictions)
        rf, rg = random_matrices(features_dim, num_classes, randomized_dim, seed)
        return randomized_multilinear_map(features, predictions, rf, rg)

    return discriminator_input


def parse_randomized(value) -> bool | None:
    """Reads ``cdan.randomized``: 'auto' (None), or a boolean (also 'true'/'false').

    Args:
      value: the config value.

    Returns:
      True, False, or None for 'auto'.

    Raises:
      tljax.validate.ConfigError: for anything else.
    """
    if isinstance(value, bool):
        return value
    spelled = str(value).strip().lower()
    choices = {"auto": None, "true": True, "false": False}
    if spelled not in choices:
        raise validate.ConfigError(
            f"cdan.randomized={value!r}; expected 'auto', 'true' or 'false'."
        )
    return choices[spelled]


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """CDAN (or CDAN+E with ``cdan.entropy``) from ``config.cdan``.

    Args:
      config: the experiment config (its ``cdan`` block and ``seed``).

    Returns:
      The CDAN `Term`, with its conditional discriminator input.

    Raises:
      tljax.validate.ConfigError: a bad ``randomized`` or ``randomized_dim``.
    """
    settings = config.cdan
    randomized = parse_randomized(settings.randomized)
    randomized_dim = settings.randomized_dim
    if not isinstance(randomized_dim, int) or randomized_dim < 1:
        raise validate.ConfigError(
            f"cdan.randomized_dim={randomized_dim!r}; it must be a positive integer."
        )
    discriminator_input = conditional_map(randomized, randomized_dim, config.get("seed", 0))
    entropy_conditioning = bool(settings.entropy)

    def loss(outputs: adaptation.Outputs):
        weights = None
        if entropy_conditioning:
            weights = entropy_weights(
                jnp.concatenate([outputs.source_logits, outputs.target_logits])
            )
        value, accuracy = weighted_domain_loss(
            outputs.discriminate(
                discriminator_input(outputs.source_features, outputs.source_logits)
            ),
            outputs.discriminate(
                discriminator_input(outputs.target_features, outputs.target_logits)
            ),
            weights,
        )
        return value, {"domain_loss": value, "domain_accuracy": accuracy}

    return adaptation.Term("cdan", loss, discriminator_input=discriminator_input)
