"""The digit network of Ganin & Lempitsky 2015 (MNIST -> MNIST-M)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models import layers
from tljax.models.grl import gradient_reversal


class DigitFeatures(nn.Module):
    """conv5x5x32 -> ReLU -> maxpool2 -> conv5x5x48 -> ReLU -> maxpool2 -> flatten.

    Attributes:
      conv_impl: conv/pool lowering (see ``tljax.models.layers``).
      conv_operands: the convolutions' matmul operand dtype (``layers.CONV_OPERANDS``).
      dtype: computation dtype.
      microbatch: rows per pass through the layers (``layers.resolve_microbatch``; ``'auto'``:
        cache-sized chunks on CPU, one pass elsewhere). Does not change the result.
    """

    conv_impl: str = "auto"
    conv_operands: str = "float32"
    dtype: Any = None
    microbatch: int | str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        convs = [
            layers.Conv(
                width,
                (5, 5),
                padding="VALID",
                impl=self.conv_impl,
                operands=self.conv_operands,
                dtype=self.dtype,
                name=f"conv_{i}",
            )
            for i, width in enumerate((32, 48))
        ]

        def trunk(x):
            for conv in convs:
                # relu(maxpool(x)) == maxpool(relu(x)) exactly (ReLU is monotone), and pooling
                # first runs the ReLU and its backward on 4x fewer elements.
                x = nn.relu(layers.max_pool(conv(x), (2, 2), impl=self.conv_impl))
            return x.reshape(x.shape[0], -1)

        return layers.microbatched(trunk, x, layers.resolve_microbatch(self.microbatch))


class MLPHead(nn.Module):
    """Dense-ReLU stack ending in a linear layer of `widths[-1]` outputs."""

    widths: tuple[int, ...]
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


class DANNDigitNet(nn.Module):
    """Feature extractor, label predictor and (reversed) domain classifier.

    Params are `{'feature': ..., 'label': ..., 'domain': ...}` so that transfer
    and freezing patterns can address each part by path.
    """

    num_classes: int = 10
    label_widths: tuple[int, ...] = (100, 100)
    domain_widths: tuple[int, ...] = (100,)
    conv_impl: str = "auto"
    conv_operands: str = "float32"
    dtype: Any = None
    microbatch: int | str = "auto"

    def setup(self):
        self.feature = DigitFeatures(
            conv_impl=self.conv_impl,
            conv_operands=self.conv_operands,
            dtype=self.dtype,
            microbatch=self.microbatch,
        )
        self.label = MLPHead((*self.label_widths, self.num_classes), dtype=self.dtype)
        self.domain = MLPHead((*self.domain_widths, 1), dtype=self.dtype)

    def __call__(self, images: jax.Array, grl_scale: jax.Array | float = 1.0):
        """Runs every branch on `images` (used for initialisation).

        Args:
          images: float images, NHWC.
          grl_scale: gradient reversal strength lambda.

        Returns:
          (class_logits [N, num_classes], domain_logits [N]).
        """
        features = self.features(images)
        return self.classify(features), self.discriminate(features, grl_scale)

    def features(self, images: jax.Array) -> jax.Array:
        """Flattened features of `images`, [N, 768] for 28x28 inputs."""
        return self.feature(images)

    def classify(self, features: jax.Array) -> jax.Array:
        """Class logits [N, num_classes], computed in float32."""
        return self.label(features).astype(jnp.float32)

    def discriminate(self, features: jax.Array, grl_scale: jax.Array | float) -> jax.Array:
        """Domain logits [N] behind the gradient reversal layer, in float32."""
        reversed_features = gradient_reversal(features, jnp.asarray(grl_scale, features.dtype))
        return self.domain(reversed_features)[:, 0].astype(jnp.float32)


class DigitClassifier(nn.Module):
    """The digit network's feature extractor and label predictor, without a domain head.

    Its params (``{'feature': ..., 'label': ...}``) have the paths of `DANNDigitNet`'s, so
    either network's checkpoint transfers into the other.
    """

    num_classes: int = 10
    label_widths: tuple[int, ...] = (100, 100)
    conv_impl: str = "auto"
    conv_operands: str = "float32"
    dtype: Any = None

    def setup(self):
        self.feature = DigitFeatures(
            conv_impl=self.conv_impl, conv_operands=self.conv_operands, dtype=self.dtype
        )
        self.label = MLPHead((*self.label_widths, self.num_classes), dtype=self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Class logits [N, num_classes] of float images (NHWC)."""
        return self.classify(self.features(images))

    def features(self, images: jax.Array) -> jax.Array:
        """Flattened features of `images`, [N, 768] for 28x28 inputs."""
        return self.feature(images)

    def classify(self, features: jax.Array) -> jax.Array:
        """Class logits [N, num_classes], computed in float32."""
        return self.label(features).astype(jnp.float32)
