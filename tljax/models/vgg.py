"""VGG-16 with torchvision's ``vgg16`` topology, for transfer from ImageNet checkpoints.

Paper: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (arXiv:1409.1556), configuration D. Reference implementation:
pytorch/vision ``torchvision/models/vgg.py`` (``VGG``, ``make_layers``, ``cfgs['D']``, no batch
norm). With the same weights (``tljax.models.vgg_convert``) this network computes torchvision's
logits.

Topology (NHWC here, NCHW in torchvision)::

    block1..5   ``blocks[b]`` convs 3x3 (padding 1, bias) each followed by ReLU, then max pool 2x2/2
                VGG-16: (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)
    pool        adaptive average pool to 7x7
    fc6, fc7    Linear(7 * 7 * 512 -> 4096) -> ReLU, Linear(4096 -> 4096) -> ReLU
    head        Linear(4096 -> num_classes)

Parameter paths (torchvision ``state_dict`` keys in brackets; blocks and convs count from 1)::

    block{b}/conv{k}/{kernel,bias}     [features.{index}]  VGG-16: 0, 2, 5, 7, 10, 12, 14, 17, ...
    fc6/{kernel,bias}                  [classifier.0]      kernel rows in (h, w, c) order
    fc7/{kernel,bias}                  [classifier.3]
    head/{kernel,bias}                 [classifier.6]

``features`` is the 4096-d output of ``fc7`` after its ReLU (what transfer uses); ``classify``
is ``head``. ``blocks`` and ``hidden`` give small networks of the same layout for tests (fewer
blocks suit images under 32x32: each block halves the map, floor, as PyTorch does).

The adaptive average pooling is PyTorch's ``AdaptiveAvgPool2d((7, 7))`` exactly for every map
size: output cell ``i`` averages input rows ``floor(i H / 7)`` to ``ceil((i + 1) H / 7) - 1``
(overlapping or repeated rows when H is not a multiple of 7, e.g. a 1x1 map is copied to every
cell). At 224x224 the map is 7x7 and the pooling is the identity.

Flatten order: torchvision flattens the pooled (C, 7, 7) map, this network the (7, 7, C) map;
the converter permutes the rows of ``fc6``'s kernel to match, so ``fc6/kernel`` row
``(h * 7 + w) * C + c`` holds torchvision's input column ``c * 49 + h * 7 + w``.

Differences from torchvision: the two ``Dropout(0.5)`` layers of the classifier are omitted
(identities, as in torchvision's eval mode): the trainer passes no dropout randomness. The convs
and max pools are the injected ``conv`` and ``pool`` (``tljax.ops`` CPU lowerings under
``make_classifier``). Initialisation follows torchvision: Kaiming normal (fan out) convs,
N(0, 0.01) Linear weights, zero biases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "POOLED_SIZE",
    "VGG",
    "VGG16_BLOCKS",
    "VGGS",
    "VGGBlock",
    "adaptive_avg_pool",
    "from_config",
    "vgg16",
]

Array = jax.Array
# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
HIDDEN = 4096
POOLED_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7)).

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") convs, normal(0, 0.01) Linear.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DENSE_INIT = nn.initializers.normal(0.01)


def _pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights of PyTorch's adaptive average pooling along one axis."""
    weights = np.zeros((out, size), np.float64)
    for index in range(out):
        start = (index * size) // out
        end = -(-((index + 1) * size) // out)  # ceil
        weights[index, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: Array, size: int = POOLED_SIZE) -> Array:
    """PyTorch's ``AdaptiveAvgPool2d((size, size))`` on an NHWC map.

    Args:
      x: ``(N, H, W, C)``.
      size: output height and width.

    Returns:
      ``(N, size, size, C)`` in ``x``'s dtype; ``x`` itself when H = W = ``size``.
    """
    height, width = x.shape[1:3]
    if (height, width) == (size, size):
        return x
    # Float32 weights (1/3 is not a bfloat16 number) and HIGHEST precision (on GPUs the default
    # float32 matmul may round operands to TF32): this is an average, not a learned layer.
    rows = jnp.asarray(_pool_matrix(height, size), jnp.float32)
    cols = jnp.asarray(_pool_matrix(width, size), jnp.float32)
    pooled = jnp.einsum("oh,nhwc,pw->nopc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
    return pooled.astype(x.dtype)


class VGGBlock(nn.Module):
    """Convs 3x3 (padding 1) with ReLU, then max pool 2x2/2.

    Attributes:
      widths: output channels of each conv (named ``conv1, conv2, ...``).
      conv: the convolution module (``nn.Conv`` or a drop-in such as ``tljax.ops.Conv``).
      pool: max pooling with ``nn.max_pool``'s signature.
      dtype: computation dtype.
    """

    widths: Sequence[int]
    conv: ModuleDef = nn.Conv
    pool: Callable[..., Array] = nn.max_pool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the block.

        Args:
          x: ``(N, H, W, C)``, H and W at least 2.

        Returns:
          ``(N, H // 2, W // 2, widths[-1])``.
        """
        for index, width in enumerate(self.widths):
            x = self.conv(
                width,
                (3, 3),
                padding=1,
                dtype=self.dtype,
                kernel_init=_CONV_INIT,
                name=f"conv{index + 1}",
            )(x)
            x = nn.relu(x)
        if min(x.shape[1:3]) < 2:
            raise ValueError(
                f"VGG max pooling needs a feature map of at least 2x2, got "
                f"{x.shape[1]}x{x.shape[2]}: the images are too small for this many blocks "
                "(each halves the map); use larger model.image_size or fewer model.blocks."
            )
        return self.pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    """VGG with torchvision's topology: conv blocks, 7x7 adaptive pool, fc6, fc7, ``head``.

    Attributes:
      blocks: conv widths of each block; VGG-16: ``VGG16_BLOCKS``.
      hidden: width of fc6 and fc7 (4096).
      num_classes: outputs of ``head``.
      conv: the convolution module.
      pool: the blocks' max pooling, with ``nn.max_pool``'s signature.
      dtype: computation dtype (parameters stay float32; logits are returned in float32).
    """

    blocks: Sequence[Sequence[int]] = VGG16_BLOCKS
    hidden: int = HIDDEN
    num_classes: int = 1000
    conv: ModuleDef = nn.Conv
    pool: Callable[..., Array] = nn.max_pool
    dtype: Any = None

    def setup(self):
        if not self.blocks or not all(self.blocks):
            raise ValueError(f"VGG blocks={self.blocks} needs at least one conv in every block.")
        for index, widths in enumerate(self.blocks):
            block = VGGBlock(tuple(widths), conv=self.conv, pool=self.pool, dtype=self.dtype)
            # Assigned by name so that the params read block1, block2, ...
            setattr(self, _block_name(index), block)
        dense = dict(dtype=self.dtype, kernel_init=_DENSE_INIT)
        self.fc6 = nn.Dense(self.hidden, **dense)
        self.fc7 = nn.Dense(self.hidden, **dense)
        self.head = nn.Dense(self.num_classes, **dense)

    def __call__(self, images: Array, *, features_only: bool = False) -> Array:
        """Runs the network.

        Args:
          images: ``(N, H, W, C)`` float images (ImageNet checkpoints expect RGB normalised with
            the ImageNet mean and std: ``model.normalize='imagenet'``).
          features_only: return the features and skip the head (an ``init`` with it set creates
            no ``head`` params).

        Returns:
          ``(N, num_classes)`` float32 logits, or ``(N, hidden)`` features.
        """
        features = self.features(images)
        return features if features_only else self.classify(features)

    def features(self, images: Array) -> Array:
        """The output of fc7 after its ReLU.

        Args:
          images: ``(N, H, W, C)`` float images.

        Returns:
          ``(N, hidden)`` features (4096 for VGG-16), in the computation dtype.
        """
        x = images
        for index in range(len(self.blocks)):
            x = getattr(self, _block_name(index))(x)
        x = adaptive_avg_pool(x, POOLED_SIZE)
        x = x.reshape(x.shape[0], -1)  # (h, w, c) order; vgg_convert permutes fc6 to match.
        x = nn.relu(self.fc6(x))
        return nn.relu(self.fc7(x))

    def classify(self, features: Array) -> Array:
        """Class logits of the features.

        Args:
          features: ``(N, hidden)`` output of ``features``.

        Returns:
          ``(N, num_classes)`` logits in float32.
        """
        return self.head(features).astype(jnp.float32)


def _block_name(index: int) -> str:
    return f"block{index + 1}"


def vgg16(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-16 (torchvision ``vgg16``, configuration D, no batch norm).

    Args:
      num_classes: outputs of the head.
      **kwargs: further ``VGG`` attributes (``conv``, ``pool``, ``dtype``; ``blocks`` and
        ``hidden`` to shrink it).

    Returns:
      The unbound module.
    """
    return VGG(num_classes=num_classes, **kwargs)


VGGS = {"vgg16": vgg16}


def from_config(
    model_config: Mapping[str, Any],
    *,
    num_classes: int,
    conv: ModuleDef,
    pool: Callable[..., Array],
    dtype: Any,
) -> VGG:
    """The VGG a config's ``model`` block describes (``make_classifier``'s branch).

    Args:
      model_config: the ``model`` block: ``name`` (a key of ``VGGS``) and optional ``blocks``
        (conv widths per block, default ``VGG16_BLOCKS``) and ``hidden`` (default 4096).
      num_classes: outputs of the head.
      conv: the configured convolution (``tljax.ops.conv_from_config``).
      pool: the configured max pooling.
      dtype: computation dtype.

    Returns:
      The unbound module.

    Raises:
      ValueError: an empty ``blocks`` or block.
    """
    blocks = tuple(
        tuple(int(w) for w in block) for block in model_config.get("blocks", VGG16_BLOCKS)
    )
    if not blocks or not all(blocks):
        raise ValueError(f"model.blocks={blocks} needs at least one conv in every block.")
    return VGGS[model_config["name"]](
        num_classes=num_classes,
        blocks=blocks,
        hidden=int(model_config.get("hidden", HIDDEN)),
        conv=conv,
        pool=pool,
        dtype=dtype,
    )
