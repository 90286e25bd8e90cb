"""Vision Transformers (ViT-S/16, ViT-B/16) with timm's topology, for transfer from checkpoints.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021 (arXiv:2010.11929); the S/16 and B/16 checkpoints are those of Steiner et al., "How to
train your ViT?" (AugReg, arXiv:2106.10270). The topology is that of timm's
``vit_small_patch16_224`` / ``vit_base_patch16_224`` (huggingface/pytorch-image-models,
``timm/models/vision_transformer.py``: ``VisionTransformer`` with ``class_token=True``,
``global_pool='token'``, no ``fc_norm``, no layer scale; ``Block``, ``Mlp``, and ``Attention`` in
``timm/layers/attention.py``), which is also the ``pool_type='tok'`` model of
google-research/big_vision ``big_vision/models/vit.py``. ``tljax.models.vit_convert`` converts
either's checkpoints into these params.

The network: a 16x16/16 patch projection, a class token, learned position embeddings added to
all tokens (index 0 is the class token's, as in timm), ``depth`` pre-LN blocks
``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (LayerNorm eps 1e-6, multi-head self-attention,
MLP with exact erf GELU), a final LayerNorm, and the ``head`` on the class token. Dropout and
stochastic depth are left out: both are 0 in these models' timm defaults.

Parameter paths follow the forward order and address every layer for transfer patterns::

    embedding/cls                         (1, 1, D)       class token (timm: cls_token)
    embedding/pos_embedding               (1, 1 + N, D)   N = (H / P) * (W / P) patches (pos_embed)
    embedding/patch/{kernel,bias}         (P, P, C, D)    patch projection (patch_embed.proj)
    encoder/block{i}/norm1/{scale,bias}   i from 0        (blocks.{i}.norm1)
    encoder/block{i}/attn/{query,key,value,out}/{kernel,bias}
                                          (D, D) kernels  (attn.qkv split in three, attn.proj)
    encoder/block{i}/norm2/{scale,bias}
    encoder/block{i}/mlp/fc1/{kernel,bias}, .../mlp/fc2/{kernel,bias}
    encoder/norm/{scale,bias}             final LayerNorm (norm)
    head/{kernel,bias}                    (D, num_classes)

Query, key and value are separate ``(D, D)`` Dense layers rather than timm's fused ``qkv``, so
patterns can address each (e.g. LoRA on the query and value projections, as in Hu et al. 2021).

Model names (``model.name``) and their configuration:

* ``'vit_s16'``: width 384, depth 12, 6 heads, MLP 1536, patch 16 (22.05M parameters with 1000
  classes at 224x224, as timm's ``vit_small_patch16_224``);
* ``'vit_b16'``: width 768, depth 12, 12 heads, MLP 3072, patch 16 (86.57M, as
  ``vit_base_patch16_224``);
* ``'vit'``: any size, from the ``model.vit`` block, which must hold ``width``, ``depth``,
  ``heads``, ``mlp_dim`` and ``patch`` (e.g. a tiny ViT for tests); the two presets take no such
  block.

The image size is ``model.image_size``: the position embedding has one entry per patch of it, so
it must be a multiple of the patch size. A checkpoint made at another size (224 for the presets)
is converted with its position-embedding grid resized (``vit_convert``).

Precision (``dtype``): parameters stay float32; matmuls run in ``dtype`` (e.g. bfloat16). The
residual stream between blocks stays float32 (a bfloat16 stream would round away updates much
smaller than the activations, block after block), LayerNorm statistics and the attention
softmax are computed in float32, and logits are returned in float32.

Initialisation from scratch follows big_vision (Xavier-uniform Dense kernels, Flax's default
LeCun-normal patch projection, zero class token) with timm's position-embedding scale (normal,
std 0.02), and a zero head, as the ViT paper attaches for fine-tuning; a converted checkpoint
overwrites all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "LAYER_NORM_EPS",
    "VITS",
    "VIT_FIELDS",
    "VIT_SPECS",
    "Embedding",
    "EncoderBlock",
    "Mlp",
    "PatchProjection",
    "SelfAttention",
    "ViT",
    "vit",
    "vit_from_config",
]

Array = jax.Array

# timm's LayerNorm for ViTs (and Flax's default, hence big_vision's).
LAYER_NORM_EPS = 1e-6

# The fields of a ViT's size: of the presets, and of the ``model.vit`` block of model.name='vit'.
VIT_FIELDS = ("width", "depth", "heads", "mlp_dim", "patch")
VIT_SPECS: dict[str, dict[str, int]] = {
    "vit_s16": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch=16),
    "vit_b16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16),
}
VITS = ("vit", *VIT_SPECS)

_DENSE_INIT = nn.initializers.xavier_uniform()
_POS_EMBEDDING_STD = 0.02


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # Flax reduces in float32 and casts the result to ``dtype``.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class PatchProjection(nn.Module):
    """A linear map of each non-overlapping ``patch`` x ``patch`` patch: a conv P x P / P.

    The kernel has a convolution's ``(P, P, C, D)`` layout; the projection is computed as one
    matmul over the flattened patches, which is that convolution exactly.

    Attributes:
      features: output width D.
      patch: patch side P.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    patch: int
    dtype: Any = None

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Projects the patches.

        Args:
          images: ``(N, H, W, C)`` with H and W multiples of ``patch``.

        Returns:
          ``(N, H / P, W / P, D)`` patch embeddings.
        """
        n, height, width, channels = images.shape
        p = self.patch
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (p, p, channels, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
        patches = images.reshape(n, height // p, p, width // p, p, channels)
        # (row, column, channel) order within a patch, the order of the kernel's first axes.
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, height // p, width // p, -1)
        return patches @ kernel.reshape(-1, self.features) + bias


class Embedding(nn.Module):
    """Patch projection, class token and position embeddings: the encoder's input tokens.

    Attributes:
      width: token width D.
      patch: patch side P.
      dtype: computation dtype of the projection; the tokens are float32.
    """

    width: int
    patch: int
    dtype: Any = None

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Embeds the images.

        Args:
          images: ``(N, H, W, C)`` images, H and W multiples of ``patch``.

        Returns:
          ``(N, 1 + H * W / P**2, D)`` float32 tokens, the class token first.

        Raises:
          ValueError: the image size is not a multiple of the patch size, or differs from the
            size the position embeddings were made for.
        """
        n, height, width, _ = images.shape
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"ViT images of {height}x{width} are not whole {self.patch}x{self.patch} "
                "patches: set model.image_size to a multiple of the patch size."
            )
        num_patches = (height // self.patch) * (width // self.patch)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
        pos_shape = (1, 1 + num_patches, self.width)
        _check_pos_embedding(self, pos_shape, height, width)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(_POS_EMBEDDING_STD), pos_shape, jnp.float32
        )
        patches = PatchProjection(self.width, self.patch, dtype=self.dtype, name="patch")(images)
        patches = patches.reshape(n, num_patches, self.width).astype(jnp.float32)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), patches], axis=1)
        return tokens + pos


def _check_pos_embedding(module: nn.Module, shape: tuple[int, ...], height: int, width: int):
    """A clear error for images of another size than the position embeddings' (not Flax's)."""
    if not module.has_variable("params", "pos_embedding"):
        return
    existing = module.get_variable("params", "pos_embedding").shape
    if tuple(existing) != shape:
        raise ValueError(
            f"ViT position embeddings of shape {tuple(existing)} (1 + patches, width) do not fit "
            f"{height}x{width} images ({shape[1] - 1} patches): images must have the "
            "model.image_size the params were made for (a converted checkpoint is resized to it)."
        )


class SelfAttention(nn.Module):
    """Multi-head dot-product self-attention with separate query, key, value and out layers.

    Attributes:
      heads: number of heads; the width must be a multiple of it.
      dtype: computation dtype; the attention logits and softmax are float32.
    """

    heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Attends every token to every token.

        Args:
          x: ``(N, L, D)`` tokens.

        Returns:
          ``(N, L, D)`` output of the ``out`` projection, in the computation dtype.
        """
        n, length, width = x.shape
        head_dim = width // self.heads
        dense = lambda name: nn.Dense(width, dtype=self.dtype, kernel_init=_DENSE_INIT, name=name)
        q, k, v = (
            dense(name)(x).reshape(n, length, self.heads, head_dim)
            for name in ("query", "key", "value")
        )
        logits = jnp.einsum(
            "nqhc,nkhc->nhqk", q * head_dim**-0.5, k, preferred_element_type=jnp.float32
        )
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attended = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, length, width)
        return dense("out")(attended)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as timm's ``Mlp``.

    Attributes:
      hidden: fc1's width.
      dtype: computation dtype.
    """

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the MLP.

        Args:
          x: ``(N, L, D)`` tokens.

        Returns:
          ``(N, L, D)`` output in the computation dtype.
        """
        width = x.shape[-1]
        inits = dict(kernel_init=_DENSE_INIT, bias_init=nn.initializers.normal(1e-6))
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1", **inits)(x)
        # timm's nn.GELU is the exact one; Flax's default is the tanh approximation.
        x = nn.gelu(x, approximate=False)
        return nn.Dense(width, dtype=self.dtype, name="fc2", **inits)(x)


class EncoderBlock(nn.Module):
    """A pre-LN Transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Attributes:
      heads: attention heads.
      mlp_dim: hidden width of the MLP.
      dtype: computation dtype of the branches; the residual stream keeps its dtype.
    """

    heads: int
    mlp_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the block.

        Args:
          x: ``(N, L, D)`` float32 tokens.

        Returns:
          ``(N, L, D)`` tokens of ``x``'s dtype.
        """
        y = SelfAttention(self.heads, dtype=self.dtype, name="attn")(
            _layer_norm(self.dtype, "norm1")(x)
        )
        x = x + y.astype(x.dtype)
        y = Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))
        return x + y.astype(x.dtype)


class Encoder(nn.Module):
    """``depth`` blocks ``block0, block1, ...`` and the final LayerNorm ``norm``.

    Attributes:
      depth: number of blocks.
      heads: attention heads.
      mlp_dim: hidden width of the MLPs.
      dtype: computation dtype.
    """

    depth: int
    heads: int
    mlp_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Encodes the tokens.

        Args:
          x: ``(N, L, D)`` float32 tokens.

        Returns:
          ``(N, L, D)`` normalised tokens in the computation dtype.
        """
        for index in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, dtype=self.dtype, name=f"block{index}")(x)
        return _layer_norm(self.dtype, "norm")(x)


class ViT(nn.Module):
    """A ViT classifying the final-LayerNorm class token with ``head`` (timm's 'token' pool).

    Attributes:
      num_classes: outputs of the head.
      width: token width D.
      depth: number of encoder blocks.
      heads: attention heads (a divisor of ``width``).
      mlp_dim: hidden width of the MLPs.
      patch: patch side P.
      dtype: computation dtype (parameters stay float32; logits are returned in float32).
    """

    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch: int = 16
    dtype: Any = None

    def setup(self):
        _check_sizes(self.width, self.depth, self.heads, self.mlp_dim, self.patch)
        self.embedding = Embedding(self.width, self.patch, dtype=self.dtype)
        self.encoder = Encoder(self.depth, self.heads, self.mlp_dim, dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros)

    def __call__(self, images: Array, *, features_only: bool = False) -> Array:
        """Runs the network.

        Args:
          images: ``(N, H, W, C)`` float images (the AugReg checkpoints expect RGB in [-1, 1];
            DeiT's the ImageNet mean and std).
          features_only: return the features and skip the head (an ``init`` with it set
            creates no ``head`` params).

        Returns:
          ``(N, num_classes)`` float32 logits, or ``(N, width)`` features with ``features_only``.
        """
        features = self.features(images)
        return features if features_only else self.classify(features)

    def features(self, images: Array) -> Array:
        """The class token after the final LayerNorm.

        Args:
          images: ``(N, H, W, C)`` float images.

        Returns:
          ``(N, width)`` features in the computation dtype.
        """
        return self.encoder(self.embedding(images))[:, 0]

    def classify(self, features: Array) -> Array:
        """Class logits of the features.

        Args:
          features: ``(N, width)`` output of ``features``.

        Returns:
          ``(N, num_classes)`` logits in float32.
        """
        return self.head(features).astype(jnp.float32)


def _check_sizes(width: int, depth: int, heads: int, mlp_dim: int, patch: int) -> None:
    sizes = dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=patch)
    bad = [f"{name}={value!r}" for name, value in sizes.items() if not _is_positive_int(value)]
    if bad:
        raise ValueError(f"ViT sizes {', '.join(bad)} must be positive integers.")
    if width % heads:
        raise ValueError(f"ViT width={width} is not a multiple of heads={heads}.")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def vit(name: str, num_classes: int = 1000, **kwargs: Any) -> ViT:
    """A preset ViT by name.

    Args:
      name: a key of ``VIT_SPECS`` ('vit_s16', 'vit_b16').
      num_classes: outputs of the head.
      **kwargs: further ``ViT`` attributes (``dtype``).

    Returns:
      The unbound module.

    Raises:
      ValueError: an unknown name.
    """
    if name not in VIT_SPECS:
        raise ValueError(f"Unknown ViT {name!r}; use one of {sorted(VIT_SPECS)}.")
    return ViT(num_classes=num_classes, **VIT_SPECS[name], **kwargs)


def vit_from_config(model_config: Mapping[str, Any], *, num_classes: int, dtype: Any) -> ViT:
    """The ViT a config's ``model`` block describes.

    Args:
      model_config: ``name`` (one of ``VITS``) and, for ``name='vit'`` only, a ``vit`` block
        with every field of ``VIT_FIELDS``.
      num_classes: outputs of the head.
      dtype: computation dtype.

    Returns:
      The unbound module.

    Raises:
      ValueError: an unknown name, a ``vit`` block with a preset name, or a ``vit`` block with
        missing, unknown or invalid fields.
    """
    name = model_config["name"]
    block = model_config.get("vit")
    if name != "vit":
        if block:
            raise ValueError(
                f"model.vit sets the size of model.name='vit'; model.name={name!r} is a fixed "
                f"preset {VIT_SPECS.get(name)}: remove model.vit or set model.name='vit'."
            )
        return vit(name, num_classes, dtype=dtype)
    sizes = dict(block or {})
    missing = [field for field in VIT_FIELDS if field not in sizes]
    unknown = sorted(set(sizes) - set(VIT_FIELDS))
    if missing or unknown:
        raise ValueError(
            f"model.name='vit' needs a model.vit block with exactly {list(VIT_FIELDS)}"
            f"{f'; missing {missing}' if missing else ''}"
            f"{f'; unknown {unknown}' if unknown else ''} "
            "(or use a preset: model.name='vit_s16' or 'vit_b16')."
        )
    return ViT(num_classes=num_classes, dtype=dtype, **sizes)
