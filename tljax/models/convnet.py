"""An 8-layer convnet for layer-transfer ablations (Yosinski et al. 2014 use AlexNet's 8 layers).

Five conv layers and three dense layers, each a separately named module (``conv1`` ... ``conv5``,
``fc6``, ``fc7``, ``fc8``) owning its own params, so ``first:N`` transfer patterns count exactly
these layers in forward order and "transfer the first n layers" means what it does in the paper.
Sized for small images (28x28 digits, 32x32 CIFAR).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# 2x2 max-pools after these convs: 28x28 inputs reach fc6 as 3x3 maps, 32x32 ones as 4x4.
POOL_AFTER = (1, 3, 5)

# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any


class ConvNet8(nn.Module):
    """conv1-conv5 (3x3 SAME, ReLU; 2x2 max-pool after conv1, 3, 5) -> fc6 -> fc7 -> fc8.

    Attributes:
      num_classes: outputs of ``fc8``.
      widths: channels of conv1..conv5.
      hidden: units of fc6 and fc7.
      conv: the convolution module (``nn.Conv`` or a drop-in such as ``tljax.ops.Conv``).
      pool: max pooling with ``nn.max_pool``'s signature.
      dtype: compute dtype (params stay float32).
    """

    num_classes: int = 10
    widths: tuple[int, int, int, int, int] = (32, 32, 64, 64, 64)
    hidden: int = 256
    conv: ModuleDef = nn.Conv
    pool: Callable[..., jax.Array] = nn.max_pool
    dtype: Any = None

    def setup(self):
        self.convs = [
            self.conv(width, (3, 3), padding="SAME", dtype=self.dtype, name=f"conv{i}")
            for i, width in enumerate(self.widths, start=1)
        ]
        self.fc6 = nn.Dense(self.hidden, dtype=self.dtype)
        self.fc7 = nn.Dense(self.hidden, dtype=self.dtype)
        self.fc8 = nn.Dense(self.num_classes, dtype=self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Class logits [N, num_classes] of float NHWC images."""
        return self.classify(self.features(images))

    def features(self, images: jax.Array) -> jax.Array:
        """fc7's activations [N, hidden]: everything but the classifier layer."""
        x = images
        for i, conv in enumerate(self.convs, start=1):
            x = nn.relu(conv(x))
            if i in POOL_AFTER:
                x = self.pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(self.fc6(x.reshape(x.shape[0], -1)))
        return nn.relu(self.fc7(x))

    def classify(self, features: jax.Array) -> jax.Array:
        """Logits [N, num_classes] in float32."""
        return self.fc8(features).astype(jnp.float32)
