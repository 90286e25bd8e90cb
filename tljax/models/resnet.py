"""ResNet-18/34/50 with torchvision's topology, for transfer from ImageNet checkpoints.

The layer structure, strides and paddings are those of ``torchvision.models.resnet`` (ResNet v1.5:
the Bottleneck block strides on its 3x3 convolution), so a torchvision checkpoint converted by
``tljax.models.torch_convert`` computes the same logits here as in PyTorch.

Parameter paths follow the forward order and address every layer for transfer patterns::

    stem/conv/kernel                      conv 7x7/2 (torchvision: conv1)
    stem/norm/{scale,bias}                (bn1)
    stage{i}/block{j}/conv{k}/kernel      i = 1..4, j from 0, k = 1..2 (Basic) or 1..3 (Bottleneck)
    stage{i}/block{j}/norm{k}/{scale,bias}
    stage{i}/block{j}/downsample/conv/kernel, .../downsample/norm/{scale,bias}
    head/{kernel,bias}                    (fc)

With ``norm='batch'`` every norm also holds ``running_mean`` and ``running_var``.

Normalisation (``norm``):

* ``'affine'`` (default): a per-channel ``x * scale + bias``. A converted checkpoint folds each
  BatchNorm's running statistics into ``scale`` and ``bias``, which is exactly BatchNorm in eval
  mode; fine-tuning then keeps the statistics frozen (the usual practice with small batches), and
  no image's output depends on the rest of its batch.
* ``'batch'``: BatchNorm with its running statistics (`tljax.models.batch_norm.BatchNorm`,
  PyTorch's conventions): with ``train=True`` it normalises with the (global) batch statistics
  and writes updated running statistics to the ``"batch_stats"`` collection (apply with
  ``mutable=["batch_stats"]``); with ``train=False`` it uses the running statistics. For
  fine-tuning with statistics that follow the new data, and for AdaBN (`tljax.adabn`).
* ``'group'``: GroupNorm (32 groups, fewer when a layer has fewer than 32 channels), for training
  from scratch, where an affine layer alone would not normalise anything.

All expose ``scale`` and ``bias`` per channel, equal to torchvision's BatchNorm ``weight`` and
``bias``, so parameter counts match torchvision's (``'batch'`` adds the two running statistics,
which torchvision counts as buffers, not parameters).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.batch_norm import BatchNorm

__all__ = [
    "NORMS",
    "RESNETS",
    "Affine",
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "ResNet",
    "ResidualBlock",
    "Stage",
    "Stem",
    "resnet",
    "resnet18",
    "resnet34",
    "resnet50",
]

NORMS = ("affine", "batch", "group")

Array = jax.Array
# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_MAX_GROUPS = 32


class Affine(nn.Module):
    """Per-channel ``y = x * scale + bias``: frozen BatchNorm with its statistics folded in.

    Attributes:
      scale_init: initializer of ``scale`` (ones, or zeros for the last layer of a block).
      dtype: computation dtype (``None``: inferred from inputs and params).
      param_dtype: parameter dtype.
    """

    scale_init: Callable[..., Array] = nn.initializers.ones
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Scales and shifts the last (channel) axis of ``x``.

        Args:
          x: ``(..., C)`` input.

        Returns:
          ``(..., C)`` output.
        """
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        return x * scale + bias


def _norm_layer(
    kind: str, channels: int, *, zero_init: bool, train: bool, dtype: Any, name: str
) -> nn.Module:
    """The normalisation layer ``kind`` (one of ``NORMS``) for ``channels`` channels."""
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if kind == "affine":
        return Affine(scale_init=scale_init, dtype=dtype, name=name)
    if kind == "batch":
        return BatchNorm(train=train, scale_init=scale_init, dtype=dtype, name=name)
    if kind == "group":
        return nn.GroupNorm(
            num_groups=math.gcd(_MAX_GROUPS, channels),
            scale_init=scale_init,
            dtype=dtype,
            name=name,
        )
    raise ValueError(f"Unknown norm {kind!r}; expected one of {NORMS}.")


class _ConvNormLayer(nn.Module):
    """Attributes and layer factories shared by the stem, the blocks and the shortcut projection.

    Attributes:
      features: base number of channels of the module.
      strides: stride of the module's spatial downsampling.
      norm: one of ``NORMS``.
      train: with ``norm='batch'``, normalise with batch statistics and update the running
        ones (True) or use the running statistics (False); other norms ignore it.
      conv: the convolution module (``nn.Conv`` or a drop-in such as ``tljax.ops.Conv``).
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    strides: int = 1
    norm: str = "affine"
    train: bool = False
    conv: ModuleDef = nn.Conv
    dtype: Any = None

    def _conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
        # Explicit symmetric padding, as in PyTorch: 'SAME' would pad a stride-2 3x3 convolution
        # of an even-sized input by (0, 1) instead of (1, 1), shifting the features by a pixel
        # against the pretrained weights.
        return self.conv(
            features,
            (kernel, kernel),
            strides=strides,
            padding=kernel // 2,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_CONV_INIT,
            name=name,
        )

    def _norm(self, channels: int, name: str, *, zero_init: bool = False) -> nn.Module:
        return _norm_layer(
            self.norm,
            channels,
            zero_init=zero_init,
            train=self.train,
            dtype=self.dtype,
            name=name,
        )


class Stem(_ConvNormLayer):
    """conv7x7/2 (padding 3) -> norm -> relu -> maxpool 3x3/2 (padding 1).

    Attributes:
      pool: max pooling with ``nn.max_pool``'s signature.
    """

    pool: Callable[..., Array] = nn.max_pool

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Applies the stem.

        Args:
          images: ``(N, H, W, C)`` images.

        Returns:
          ``(N, H / 4, W / 4, features)`` feature map (sizes rounded up).
        """
        x = self._conv(self.features, 7, self.strides, "conv")(images)
        x = nn.relu(self._norm(self.features, "norm")(x))
        return self.pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Downsample(_ConvNormLayer):
    """The projection shortcut of a block that changes shape: strided conv1x1 -> norm."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Projects ``x`` to ``features`` channels at the block's stride.

        Args:
          x: ``(N, H, W, C)`` input of the block.

        Returns:
          ``(N, H / strides, W / strides, features)`` shortcut.
        """
        x = self._conv(self.features, 1, self.strides, "conv")(x)
        return self._norm(self.features, "norm")(x)


class ResidualBlock(_ConvNormLayer):
    """A residual block ``relu(branch(x) + shortcut(x))``; subclasses define ``_branch``.

    Its output has ``features * expansion`` channels.
    """

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the block.

        Args:
          x: ``(N, H, W, C)`` input.

        Returns:
          ``(N, H / strides, W / strides, features * expansion)`` output.
        """
        # Each block type defines ``_branch(x)``: its residual branch, ending in ``_last_norm``.
        return nn.relu(self._branch(x) + self._shortcut(x))

    def _last_norm(self, channels: int, name: str) -> nn.Module:
        # The last norm of the residual branch starts with zero scale (Goyal et al. 2017), so
        # every block starts as the identity. Without batch statistics (norm='affine' from
        # scratch) nothing else keeps the activations from growing with depth; with GroupNorm or
        # BatchNorm it still makes the first steps better conditioned. Converted checkpoints
        # overwrite it.
        return self._norm(channels, name, zero_init=True)

    def _shortcut(self, x: Array) -> Array:
        out_channels = self.features * self.expansion
        if self.strides == 1 and x.shape[-1] == out_channels:
            return x
        return Downsample(
            out_channels,
            strides=self.strides,
            norm=self.norm,
            train=self.train,
            conv=self.conv,
            dtype=self.dtype,
            name="downsample",
        )(x)


class BasicBlock(ResidualBlock):
    """conv3x3 (strided) -> norm -> relu -> conv3x3 -> norm, plus the shortcut, then relu."""

    expansion: ClassVar[int] = 1

    def _branch(self, x: Array) -> Array:
        y = self._conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(self._norm(self.features, "norm1")(y))
        y = self._conv(self.features, 3, 1, "conv2")(y)
        return self._last_norm(self.features, "norm2")(y)


class Bottleneck(ResidualBlock):
    """conv1x1 -> conv3x3 (strided, torchvision v1.5) -> conv1x1 to 4x the width, plus shortcut."""

    expansion: ClassVar[int] = 4

    def _branch(self, x: Array) -> Array:
        out_channels = self.features * self.expansion
        y = self._conv(self.features, 1, 1, "conv1")(x)
        y = nn.relu(self._norm(self.features, "norm1")(y))
        y = self._conv(self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(self._norm(self.features, "norm2")(y))
        y = self._conv(out_channels, 1, 1, "conv3")(y)
        return self._last_norm(out_channels, "norm3")(y)


class Stage(_ConvNormLayer):
    """``num_blocks`` residual blocks ``block0, block1, ...``; the first one strides.

    Attributes:
      block: the residual block class.
      num_blocks: number of blocks.
    """

    block: type[ResidualBlock] = BasicBlock
    num_blocks: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the blocks in order.

        Args:
          x: ``(N, H, W, C)`` input.

        Returns:
          ``(N, H / strides, W / strides, features * block.expansion)`` output.
        """
        for index in range(self.num_blocks):
            x = self.block(
                self.features,
                strides=self.strides if index == 0 else 1,
                norm=self.norm,
                train=self.train,
                conv=self.conv,
                dtype=self.dtype,
                name=f"block{index}",
            )(x)
        return x


class ResNet(nn.Module):
    """ResNet with torchvision's topology: stem, four stages, global average pool, ``head``.

    Attributes:
      stage_sizes: number of blocks in each stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block: ``BasicBlock`` or ``Bottleneck``.
      num_classes: outputs of the ``head`` Dense layer.
      width: channels of the stem and base width of the first stage (64 in torchvision); each
        later stage doubles it. Smaller values give cheap networks of the same layout (tests).
      norm: one of ``NORMS``: ``'affine'`` (frozen BatchNorm, for pretrained weights),
        ``'batch'`` (BatchNorm with running statistics) or ``'group'`` (GroupNorm, for training
        from scratch).
      train: with ``norm='batch'``: normalise with batch statistics and write the updated
        running statistics to ``"batch_stats"`` (True; apply with ``mutable=["batch_stats"]``),
        or normalise with the running statistics (False: evaluation, frozen BatchNorm).
      conv: the convolution module (``nn.Conv`` or a drop-in such as ``tljax.ops.Conv``).
      pool: the stem's max pooling, with ``nn.max_pool``'s signature.
      dtype: computation dtype (parameters stay float32; logits are returned in float32).
    """

    stage_sizes: tuple[int, ...]
    block: type[ResidualBlock] = BasicBlock
    num_classes: int = 1000
    width: int = 64
    norm: str = "affine"
    train: bool = False
    conv: ModuleDef = nn.Conv
    pool: Callable[..., Array] = nn.max_pool
    dtype: Any = None

    def setup(self):
        layer_kwargs = {
            "norm": self.norm,
            "train": self.train,
            "conv": self.conv,
            "dtype": self.dtype,
        }
        self.stem = Stem(self.width, strides=2, pool=self.pool, **layer_kwargs)
        for index, num_blocks in enumerate(self.stage_sizes):
            # Assigned by name, not as a list, so that the params read stage1, stage2, ...
            # rather than stages_0, stages_1, ...: the names torchvision users know as layer1...
            stage = Stage(
                self.width * 2**index,
                strides=1 if index == 0 else 2,
                block=self.block,
                num_blocks=num_blocks,
                **layer_kwargs,
            )
            setattr(self, _stage_name(index), stage)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def __call__(self, images: Array, *, features_only: bool = False) -> Array:
        """Runs the network.

        Args:
          images: ``(N, H, W, C)`` float images (ImageNet checkpoints expect RGB normalised with
            the ImageNet mean and std).
          features_only: return the pooled features and skip the head (an ``init`` with it set
            creates no ``head`` params).

        Returns:
          ``(N, num_classes)`` float32 logits, or ``(N, C)`` features with ``features_only``.
        """
        features = self.features(images)
        return features if features_only else self.classify(features)

    def features(self, images: Array) -> Array:
        """Globally average-pooled features of the last stage.

        Args:
          images: ``(N, H, W, C)`` float images.

        Returns:
          ``(N, width * 8 * block.expansion)`` features (512 for ResNet-18/34, 2048 for
          ResNet-50), in the computation dtype.
        """
        x = self.stem(images)
        for index in range(len(self.stage_sizes)):
            x = getattr(self, _stage_name(index))(x)
        return jnp.mean(x, axis=(1, 2))

    def classify(self, features: Array) -> Array:
        """Class logits of pooled features.

        Args:
          features: ``(N, C)`` output of ``features``.

        Returns:
          ``(N, num_classes)`` logits in float32.
        """
        return self.head(features).astype(jnp.float32)


def _stage_name(index: int) -> str:
    return f"stage{index + 1}"


# name -> (blocks per stage, block type); parameter counts with 1000 classes.
_SPECS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),  # 11.7M parameters
    "resnet34": ((3, 4, 6, 3), BasicBlock),  # 21.8M
    "resnet50": ((3, 4, 6, 3), Bottleneck),  # 25.6M, v1.5
}


def resnet(name: str, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """A torchvision-topology ResNet by name.

    Args:
      name: 'resnet18', 'resnet34' or 'resnet50'.
      num_classes: outputs of the head.
      **kwargs: further ``ResNet`` attributes (``norm``, ``train``, ``conv``, ``pool``,
        ``dtype``, ``width``).

    Returns:
      The unbound module.

    Raises:
      ValueError: an unknown name.
    """
    if name not in _SPECS:
        raise ValueError(f"Unknown ResNet {name!r}; use one of {sorted(_SPECS)}.")
    stage_sizes, block = _SPECS[name]
    return ResNet(stage_sizes, block, num_classes=num_classes, **kwargs)


resnet18 = functools.partial(resnet, "resnet18")
resnet34 = functools.partial(resnet, "resnet34")
resnet50 = functools.partial(resnet, "resnet50")
RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}
