"""A classifier network with the extra heads domain-adaptation methods train beside it.

Two kinds of head, each optional: a domain discriminator fed whatever its method chooses
(features for DANN, a multilinear map of features and predictions for CDAN) and an auxiliary
classifier over the features (MCD's second classifier, MDD's adversarial classifier). Any
classifier that exposes ``features`` and ``classify`` gets them without being edited. The
network shares its parent's scope: its params keep their own paths (``feature/...``,
``label/...``) next to ``domain/...`` and ``auxiliary/...``, and initialise exactly as they do
without the heads.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.grl import gradient_reversal


class WithHeads(nn.Module):
    """``classifier`` plus an optional domain discriminator and auxiliary classifier.

    Attributes:
      classifier: a network with ``features(images)`` and ``classify(features)``.
      domain: the discriminator, mapping its input to one logit per row (e.g. ``MLPHead``),
        or None.
      discriminator_input: (features, class_logits) -> the discriminator's input; used to
        initialise the discriminator at the right input width.
      auxiliary: a second classifier over the features (class logits out), or None.
    """

    classifier: nn.Module
    domain: nn.Module | None = None
    discriminator_input: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    auxiliary: nn.Module | None = None

    def setup(self):
        nn.share_scope(self, self.classifier)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Runs every branch (used for initialisation).

        Args:
          images: float images, NHWC.

        Returns:
          Class logits [N, C] (the heads' outputs are computed and dropped).
        """
        features = self.features(images)
        logits = self.classify(features)
        if self.domain is not None:
            self.discriminate(self.discriminator_input(features, logits), 1.0)
        if self.auxiliary is not None:
            self.classify_auxiliary(features)
        return logits

    def features(self, images: jax.Array) -> jax.Array:
        """The network's features of ``images``."""
        return self.classifier.features(images)

    def classify(self, features: jax.Array) -> jax.Array:
        """The network's class logits of ``features``."""
        return self.classifier.classify(features)

    def classify_auxiliary(self, features: jax.Array) -> jax.Array:
        """The auxiliary classifier's float32 class logits of ``features``."""
        return self.auxiliary(features).astype(jnp.float32)

    def discriminate(self, inputs: jax.Array, grl_scale: jax.Array | float) -> jax.Array:
        """Domain logits [N] of ``inputs``, behind a gradient reversal of strength ``grl_scale``.

        Args:
          inputs: [N, D] discriminator inputs.
          grl_scale: the reversal strength lambda.

        Returns:
          float32 logits, one per row.
        """
        reversed_inputs = gradient_reversal(inputs, jnp.asarray(grl_scale, inputs.dtype))
        return self.domain(reversed_inputs)[:, 0].astype(jnp.float32)
