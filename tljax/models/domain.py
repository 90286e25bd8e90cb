"""A classifier network with a domain discriminator attached, for domain adaptation.

The discriminator is a separate module fed whatever its method chooses (features for DANN,
a multilinear map of features and predictions for CDAN), so any classifier that exposes
``features`` and ``classify`` gets one without being edited. The network shares its parent's
scope: its params keep their own paths (``feature/...``, ``label/...``) next to ``domain/...``,
and initialise exactly as they do without the discriminator.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.grl import gradient_reversal


class WithDiscriminator(nn.Module):
    """``classifier`` plus a domain discriminator behind a gradient reversal layer.

    Attributes:
      classifier: a network with ``features(images)`` and ``classify(features)``.
      domain: the discriminator, mapping its input to one logit per row (e.g. ``MLPHead``).
      discriminator_input: (features, class_logits) -> the discriminator's input; used to
        initialise the discriminator at the right input width.
    """

    classifier: nn.Module
    domain: nn.Module
    discriminator_input: Callable[[jax.Array, jax.Array], jax.Array]

    def setup(self):
        nn.share_scope(self, self.classifier)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Runs every branch (used for initialisation).

        Args:
          images: float images, NHWC.

        Returns:
          (class_logits [N, C], domain_logits [N]).
        """
        features = self.features(images)
        logits = self.classify(features)
        return logits, self.discriminate(self.discriminator_input(features, logits), 1.0)

    def features(self, images: jax.Array) -> jax.Array:
        """The network's features of ``images``."""
        return self.classifier.features(images)

    def classify(self, features: jax.Array) -> jax.Array:
        """The network's class logits of ``features``."""
        return self.classifier.classify(features)

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
