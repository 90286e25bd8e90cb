"""The digit network of Ganin & Lempitsky 2015 (MNIST -> MNIST-M).

Plain Flax: the convolution and the pooling are injected (``conv``, ``pool``), as in the Flax
examples, so ``tljax.models.make_classifier`` can hand in the CPU lowerings of ``tljax.ops``.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any


class DigitFeatures(nn.Module):
    """conv5x5x32 -> ReLU -> maxpool2 -> conv5x5x48 -> ReLU -> maxpool2 -> flatten.

    Attributes:
      conv: the convolution module (``nn.Conv`` or a drop-in such as ``tljax.ops.Conv``).
      pool: max pooling with ``nn.max_pool``'s signature.
      dtype: computation dtype.
    """

    conv: ModuleDef = nn.Conv
    pool: Callable[..., jax.Array] = nn.max_pool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Flattened features of NHWC images, [N, 768] for 28x28 inputs."""
        for i, width in enumerate((32, 48)):
            x = self.conv(width, (5, 5), padding="VALID", dtype=self.dtype, name=f"conv_{i}")(x)
            # relu(maxpool(x)) == maxpool(relu(x)) exactly (ReLU is monotone), and pooling
            # first runs the ReLU and its backward on 4x fewer elements.
            x = nn.relu(self.pool(x, (2, 2), strides=(2, 2)))
        return x.reshape(x.shape[0], -1)


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


class DigitNet(nn.Module):
    """The digit network: feature extractor (``feature``) and label predictor (``label``).

    Params are ``{'feature': {'conv_0', 'conv_1'}, 'label': {'dense_0', ...}}``, so transfer and
    freezing patterns can address each part by path.

    Attributes:
      num_classes: outputs of the label predictor.
      label_widths: hidden widths of the label predictor.
      conv: the convolution module (see ``DigitFeatures``).
      pool: max pooling (see ``DigitFeatures``).
      dtype: computation dtype.
    """

    num_classes: int = 10
    label_widths: tuple[int, ...] = (100, 100)
    conv: ModuleDef = nn.Conv
    pool: Callable[..., jax.Array] = nn.max_pool
    dtype: Any = None

    def setup(self):
        self.feature = DigitFeatures(self.conv, self.pool, self.dtype)
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
