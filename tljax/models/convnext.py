"""ConvNeXt-T with timm's ``convnext_tiny`` topology, for transfer from ImageNet checkpoints.

Paper: Liu et al., "A ConvNet for the 2020s", CVPR 2022 (arXiv:2201.03545). Reference
implementation: huggingface/pytorch-image-models ``timm/models/convnext.py`` (``ConvNeXt``,
``ConvNeXtStage``, ``ConvNeXtBlock`` with ``conv_mlp=False``) and ``NormMlpClassifierHead`` in
``timm/layers/classifier.py``. With the same weights (``tljax.models.convnext_convert``) this
network computes timm's logits.

Topology (NHWC here, NCHW in timm; every LayerNorm normalises the channels, eps 1e-6)::

    stem        conv 4x4/4 -> LayerNorm
    stage1..4   [stage i > 1: LayerNorm -> conv 2x2/2] then ``depths[i]`` blocks of width
                ``dims[i]``: depthwise conv 7x7 (padding 3) -> LayerNorm -> Linear(4 dims) ->
                exact (erf) GELU -> Linear(dims) -> layer scale ``gamma`` (init 1e-6) -> + input
    head        global average pool -> LayerNorm (``final_norm``) -> Linear (``head``)

Parameter paths (timm ``state_dict`` keys in brackets; stages count from 1, blocks from 0)::

    stem/conv/{kernel,bias}                          [stem.0]
    stem/norm/{scale,bias}                           [stem.1]
    stage{i}/downsample/norm/{scale,bias}            [stages.{i-1}.downsample.0]  (i >= 2)
    stage{i}/downsample/conv/{kernel,bias}           [stages.{i-1}.downsample.1]
    stage{i}/block{j}/conv_dw/{kernel,bias}          [stages.{i-1}.blocks.{j}.conv_dw]
    stage{i}/block{j}/norm/{scale,bias}              [...norm]
    stage{i}/block{j}/mlp/fc1/{kernel,bias}          [...mlp.fc1]
    stage{i}/block{j}/mlp/fc2/{kernel,bias}          [...mlp.fc2]
    stage{i}/block{j}/layer_scale/gamma              [...gamma]
    final_norm/{scale,bias}                          [head.norm]
    head/{kernel,bias}                               [head.fc]

The layer scale is its own module (timm keeps ``gamma`` on the block) so that every module with
params holds only leaves: no layer path is the prefix of another, which is what transfer
patterns and ``exclude`` address.

``features`` is the pooled, normalised 768-d vector (timm's ``forward_head(pre_logits=True)``);
``classify`` is the last Linear. ``depths`` and ``dims`` (any equal number of stages) give small
networks of the same layout for tests; the defaults are ConvNeXt-T's (28.6M parameters with
1000 classes). Each stage after the first halves the feature map (floor, as PyTorch), so four
stages need images of at least 32x32; a smaller image is an error that names the size.

Differences from timm, none of which changes the function computed from a checkpoint:
stochastic depth (drop-path) is omitted: the trainer passes no dropout randomness, and with
timm's default ``drop_path_rate=0`` it is the identity anyway. The stem and downsampling convs
are the injected ``conv`` (``tljax.ops.Conv`` under ``make_classifier``: CPU lowerings); the
depthwise conv is Flax's ``nn.Conv`` with ``feature_group_count`` because ``tljax.ops.Conv``
has no feature groups (so ``model.conv_operands`` does not reach it). Initialisation follows
timm (truncated normal, std 0.02, zero biases) except that Flax truncates at 2 std rather than
at +-2 absolute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "CONVNEXTS",
    "CONVNEXT_T_DEPTHS",
    "CONVNEXT_T_DIMS",
    "LAYER_NORM_EPS",
    "LAYER_SCALE_INIT",
    "Block",
    "ConvNeXt",
    "Downsample",
    "LayerScale",
    "Stage",
    "Stem",
    "convnext_t",
    "from_config",
]

Array = jax.Array
# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any

CONVNEXT_T_DEPTHS = (3, 3, 9, 3)
CONVNEXT_T_DIMS = (96, 192, 384, 768)
LAYER_NORM_EPS = 1e-6  # timm.layers.LayerNorm / LayerNorm2d default, used by convnext_tiny.
LAYER_SCALE_INIT = 1e-6  # timm's ls_init_value.
MLP_RATIO = 4
DW_KERNEL = 7
PATCH = 4

_INIT = nn.initializers.truncated_normal(0.02)  # timm: trunc_normal_(std=.02), zero biases.


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance: E[x^2] - E[x]^2 loses digits when the mean is large against the spread,
    # and PyTorch computes the two-pass form.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _check_spatial(x: Array, what: str) -> None:
    """Fails clearly where PyTorch would fail too: a strided patch larger than the map."""
    if min(x.shape[1:3]) < 2:
        raise ValueError(
            f"ConvNeXt {what} needs a feature map of at least 2x2, got {x.shape[1]}x{x.shape[2]}: "
            "the images are too small for this many stages (each halves the map after the 4x "
            "stem); use larger model.image_size or fewer stages (model.depths / model.dims)."
        )


class Stem(nn.Module):
    """conv 4x4/4 (a patch embedding) -> LayerNorm.

    Attributes:
      features: output channels (``dims[0]``).
      conv: the convolution module (``nn.Conv`` or a drop-in such as ``tljax.ops.Conv``).
      dtype: computation dtype.
    """

    features: int
    conv: ModuleDef = nn.Conv
    dtype: Any = None

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Embeds 4x4 patches.

        Args:
          images: ``(N, H, W, C)`` images, H and W at least 4.

        Returns:
          ``(N, H // 4, W // 4, features)``.
        """
        if min(images.shape[1:3]) < PATCH:
            raise ValueError(
                f"ConvNeXt needs images of at least {PATCH}x{PATCH}, got "
                f"{images.shape[1]}x{images.shape[2]} (model.image_size)."
            )
        x = self.conv(
            self.features,
            (PATCH, PATCH),
            strides=PATCH,
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_INIT,
            name="conv",
        )(images)
        return _layer_norm(self.dtype, "norm")(x)


class Downsample(nn.Module):
    """LayerNorm -> conv 2x2/2: the start of every stage after the first.

    Attributes:
      features: output channels.
      conv: the convolution module.
      dtype: computation dtype.
    """

    features: int
    conv: ModuleDef = nn.Conv
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Halves the map (floor) and changes the width.

        Args:
          x: ``(N, H, W, C)``, H and W at least 2.

        Returns:
          ``(N, H // 2, W // 2, features)``.
        """
        _check_spatial(x, "downsampling")
        x = _layer_norm(self.dtype, "norm")(x)
        return self.conv(
            self.features,
            (2, 2),
            strides=2,
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_INIT,
            name="conv",
        )(x)


class LayerScale(nn.Module):
    """Per-channel ``x * gamma`` (CaiT's layer scale; timm's ``ConvNeXtBlock.gamma``).

    Attributes:
      init_value: initial value of every ``gamma`` entry.
      dtype: computation dtype.
    """

    init_value: float = LAYER_SCALE_INIT
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Scales the last (channel) axis.

        Args:
          x: ``(..., C)``.

        Returns:
          ``(..., C)``.
        """
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32
        )
        x, gamma = nn.dtypes.promote_dtype(x, gamma, dtype=self.dtype)
        return x * gamma


class Mlp(nn.Module):
    """Linear(4 C) -> exact GELU -> Linear(C) over the channels (timm's ``Mlp``).

    Attributes:
      hidden: width of the hidden layer.
      dtype: computation dtype.
    """

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the MLP to every position.

        Args:
          x: ``(..., C)``.

        Returns:
          ``(..., C)``.
        """
        channels = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_INIT, name="fc1")(x)
        # timm's 'gelu' is torch.nn.GELU(), the erf form, not the tanh approximation.
        x = nn.gelu(x, approximate=False)
        return nn.Dense(channels, dtype=self.dtype, kernel_init=_INIT, name="fc2")(x)


class Block(nn.Module):
    """ConvNeXt block: dwconv 7x7 -> LayerNorm -> MLP -> layer scale, plus the input.

    Attributes:
      dtype: computation dtype.
    """

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the block.

        Args:
          x: ``(N, H, W, C)``.

        Returns:
          ``(N, H, W, C)``.
        """
        channels = x.shape[-1]
        y = nn.Conv(
            channels,
            (DW_KERNEL, DW_KERNEL),
            padding=DW_KERNEL // 2,
            feature_group_count=channels,
            dtype=self.dtype,
            kernel_init=_INIT,
            name="conv_dw",
        )(x)
        y = _layer_norm(self.dtype, "norm")(y)
        y = Mlp(MLP_RATIO * channels, dtype=self.dtype, name="mlp")(y)
        return x + LayerScale(dtype=self.dtype, name="layer_scale")(y)


class Stage(nn.Module):
    """An optional ``downsample`` then ``depth`` blocks ``block0, block1, ...``.

    Attributes:
      features: width of the stage.
      depth: number of blocks.
      downsample_first: whether the stage starts with ``Downsample`` (every stage but the
        first).
      conv: the convolution module of the downsampling.
      dtype: computation dtype.
    """

    features: int
    depth: int
    downsample_first: bool
    conv: ModuleDef = nn.Conv
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the stage.

        Args:
          x: ``(N, H, W, C)``.

        Returns:
          ``(N, H', W', features)``; H' = H // 2 with ``downsample_first``, else H.
        """
        if self.downsample_first:
            x = Downsample(self.features, conv=self.conv, dtype=self.dtype, name="downsample")(x)
        for index in range(self.depth):
            x = Block(dtype=self.dtype, name=f"block{index}")(x)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt with timm's topology: stem, stages, pooled LayerNorm, ``head``.

    Attributes:
      depths: blocks per stage; ConvNeXt-T: (3, 3, 9, 3).
      dims: width of each stage; ConvNeXt-T: (96, 192, 384, 768).
      num_classes: outputs of ``head``.
      conv: the stem's and downsampling layers' convolution (``nn.Conv`` or a drop-in such as
        ``tljax.ops.Conv``).
      dtype: computation dtype (parameters stay float32; logits are returned in float32).
    """

    depths: Sequence[int] = CONVNEXT_T_DEPTHS
    dims: Sequence[int] = CONVNEXT_T_DIMS
    num_classes: int = 1000
    conv: ModuleDef = nn.Conv
    dtype: Any = None

    def setup(self):
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(
                f"ConvNeXt depths={tuple(self.depths)} and dims={tuple(self.dims)} must have "
                "the same, non-zero length (one entry per stage)."
            )
        self.stem = Stem(self.dims[0], conv=self.conv, dtype=self.dtype)
        for index, (depth, width) in enumerate(zip(self.depths, self.dims, strict=True)):
            # Assigned by name so that the params read stage1, stage2, ...
            stage = Stage(width, depth, index > 0, conv=self.conv, dtype=self.dtype)
            setattr(self, _stage_name(index), stage)
        self.final_norm = _layer_norm(self.dtype, None)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_INIT)

    def __call__(self, images: Array, *, features_only: bool = False) -> Array:
        """Runs the network.

        Args:
          images: ``(N, H, W, C)`` float images (ImageNet checkpoints expect RGB normalised with
            the ImageNet mean and std: ``model.normalize='imagenet'``).
          features_only: return the features and skip the head (an ``init`` with it set creates
            no ``head`` params).

        Returns:
          ``(N, num_classes)`` float32 logits, or ``(N, dims[-1])`` features.
        """
        features = self.features(images)
        return features if features_only else self.classify(features)

    def features(self, images: Array) -> Array:
        """Globally average-pooled, LayerNorm-ed features of the last stage.

        Args:
          images: ``(N, H, W, C)`` float images.

        Returns:
          ``(N, dims[-1])`` features (768 for ConvNeXt-T), in the computation dtype.
        """
        x = self.stem(images)
        for index in range(len(self.depths)):
            x = getattr(self, _stage_name(index))(x)
        return self.final_norm(jnp.mean(x, axis=(1, 2)))

    def classify(self, features: Array) -> Array:
        """Class logits of the features.

        Args:
          features: ``(N, dims[-1])`` output of ``features``.

        Returns:
          ``(N, num_classes)`` logits in float32.
        """
        return self.head(features).astype(jnp.float32)


def _stage_name(index: int) -> str:
    return f"stage{index + 1}"


def convnext_t(num_classes: int = 1000, **kwargs: Any) -> ConvNeXt:
    """ConvNeXt-T (timm ``convnext_tiny``).

    Args:
      num_classes: outputs of the head.
      **kwargs: further ``ConvNeXt`` attributes (``conv``, ``dtype``; ``depths`` and ``dims``
        to shrink it).

    Returns:
      The unbound module.
    """
    return ConvNeXt(num_classes=num_classes, **kwargs)


CONVNEXTS = {"convnext_t": convnext_t}


def from_config(
    model_config: Mapping[str, Any],
    *,
    num_classes: int,
    conv: ModuleDef,
    dtype: Any,
    pool: Any = None,
) -> ConvNeXt:
    """The ConvNeXt a config's ``model`` block describes (``make_classifier``'s branch).

    Args:
      model_config: the ``model`` block: ``name`` (a key of ``CONVNEXTS``) and optional
        ``depths`` / ``dims`` (per-stage block counts and widths; default ConvNeXt-T's).
      num_classes: outputs of the head.
      conv: the configured convolution (``tljax.ops.conv_from_config``).
      dtype: computation dtype.
      pool: the configured max pooling; unused (ConvNeXt pools only globally, by the mean).

    Returns:
      The unbound module.

    Raises:
      ValueError: ``depths`` and ``dims`` differ in length.
    """
    del pool
    depths = tuple(int(d) for d in model_config.get("depths", CONVNEXT_T_DEPTHS))
    dims = tuple(int(d) for d in model_config.get("dims", CONVNEXT_T_DIMS))
    if len(depths) != len(dims) or not depths:
        raise ValueError(
            f"model.depths={depths} and model.dims={dims} must have the same, non-zero length."
        )
    return CONVNEXTS[model_config["name"]](
        num_classes=num_classes, depths=depths, dims=dims, conv=conv, dtype=dtype
    )
