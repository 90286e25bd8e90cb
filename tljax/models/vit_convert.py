"""timm and big_vision ViT checkpoints to ``tljax.models.vit`` params.

Weights are never downloaded at run time: a checkpoint is a local file whose path is
``transfer.init_from`` (BUILD.md shows how to write one). Two layouts are read, told apart by the
checkpoint's keys, not by the file suffix (either may come as ``.npz``):

* **timm** (huggingface/pytorch-image-models, ``timm/models/vision_transformer.py``): a
  ``VisionTransformer`` ``state_dict`` saved with ``safetensors.torch.save_file`` (or
  ``numpy.savez``); dotted keys ``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``,
  ``blocks.{i}.norm1.weight``, ``blocks.{i}.attn.qkv.weight``, ``blocks.{i}.attn.proj.weight``,
  ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``/``fc2``, ``norm``, ``head``. Linear weights
  ``(out, in)`` are transposed, the patch conv ``(D, C, P, P)`` becomes ``(P, P, C, D)``, and the
  fused ``qkv`` (rows: query, key, value) is split in three.
* **big_vision** (google-research/big_vision ``big_vision/models/vit.py`` with
  ``pool_type='tok'``, and the AugReg ``.npz`` files of google-research/vision_transformer that
  it and timm load): flattened Flax names joined by ``/``; any key with a ``/`` selects this
  layout. Keys may sit under ``params/`` (big_vision) or ``opt/target/`` (old Flax optimizer
  checkpoints), found as the prefix of ``embedding/kernel``; keys outside it (optimizer state)
  are ignored, as ``big_vision.utils.load_params`` does. Both block namings are read:
  big_vision's ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0/Dense_{0,1}}`` and vision_transformer's (``..._1``, ``LayerNorm_2``,
  ``MlpBlock_3``). Attention kernels ``(D, heads, D / heads)`` and ``(heads, D / heads, D)`` are
  reshaped to ``(D, D)``. ``pre_logits`` (a representation layer of some old checkpoints) is
  ignored when the head is excluded (as timm does); with the head it is an error, since the
  logits would not be the checkpoint's. Scanned-layer checkpoints
  (``Transformer/encoderblock/...`` with a leading depth axis) are not read.

Position embeddings. big_vision adds them to the patches *before* prepending the class token
(``pos_embedding`` of N entries, the class token has none), timm and old checkpoints after
(``1 + N`` entries, the first the class token's). As ``big_vision.models.vit.fix_old_checkpoints``
does, the layout is told by the count (``1 + g**2`` or ``g**2``); a missing class entry becomes
zeros, which is the same function. When the checkpoint's grid differs from the template's (a
224-pixel checkpoint in a model of another ``model.image_size``) the grid part is resized
bilinearly and the class entry kept (`resample_pos_embedding`, timm's ``resample_abs_pos_embed``
with ``interpolation='bilinear', antialias=False`` as its ``.npz`` loader calls it). Checkpoint
grids are square, as timm and big_vision assume.

Neither layout records the number of heads: a checkpoint must go into the preset it was
trained as (S/16: 6 heads, B/16: 12). big_vision models use Flax's tanh-approximated GELU where
this ViT (like timm) uses the exact one; timm's ports of those checkpoints make the same swap.

Each layout is a table over ``tljax.models.torch_rules``, which reports every problem with a
checkpoint (missing keys, keys left over, shapes that do not fit the template) in one
``ValueError`` that lists all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tljax.models import torch_rules
from tljax.models.torch_rules import SAME, Transform, kind

__all__ = ["LAYOUTS", "convert_vit", "detect_layout", "resample_pos_embedding"]

LAYOUTS = ("timm", "big_vision")

StateDict = Mapping[str, np.ndarray]
Shape = tuple[int, ...]

_BLOCK = r"encoder/block(?P<i>\d+)/"
_QKV = ("query", "key", "value")


# ----------------------------------------------------------------------------------------------
# Position embeddings.


def resample_pos_embedding(
    posemb: np.ndarray, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> np.ndarray:
    """Resizes the square grid part of position embeddings bilinearly, keeping the prefix.

    timm's ``resample_abs_pos_embed(posemb, grid, num_prefix_tokens=...,
    interpolation='bilinear', antialias=False)``: half-pixel-centred bilinear interpolation
    (PyTorch's ``align_corners=False``), computed in float64.

    Args:
      posemb: ``(1, num_prefix_tokens + g * g, D)`` embeddings.
      grid: the new (rows, columns) of patches.
      num_prefix_tokens: leading entries (the class token's) kept as they are.

    Returns:
      ``(1, num_prefix_tokens + rows * columns, D)`` embeddings of ``posemb``'s dtype.

    Raises:
      ValueError: the grid part of ``posemb`` is not square.
    """
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(
            f"Position embeddings of {patches.shape[1]} patches are not a square grid."
        )
    rows, columns = grid
    square = patches.reshape(side, side, -1).astype(np.float64)
    resized = np.einsum(
        "ih,jw,hwd->ijd", _bilinear_matrix(side, rows), _bilinear_matrix(side, columns), square
    )
    resized = resized.reshape(1, rows * columns, -1).astype(posemb.dtype)
    return np.concatenate([prefix, resized], axis=1)


def _bilinear_matrix(old: int, new: int) -> np.ndarray:
    """``(new, old)`` weights of PyTorch's bilinear resize (align_corners=False) along an axis."""
    # PyTorch's source coordinate of output pixel i, clamped at 0 (area_pixel_compute_source_index).
    source = np.maximum((np.arange(new) + 0.5) * (old / new) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), old - 1)
    high = np.minimum(low + 1, old - 1)
    fraction = source - low
    weights = np.zeros((new, old))
    np.add.at(weights, (np.arange(new), low), 1.0 - fraction)
    np.add.at(weights, (np.arange(new), high), fraction)
    return weights


def _has_class_entry(count: int) -> bool:
    """Whether ``count`` position embeddings are a class entry plus a square grid."""
    return count > 1 and math.isqrt(count - 1) ** 2 == count - 1


def _pos_problem(shape: Shape, template: Shape) -> str | None:
    """Why checkpoint position embeddings of ``shape`` cannot become ``template``'s, or None."""
    if tuple(shape) == tuple(template):
        return None
    if len(shape) != 3 or shape[0] != 1 or shape[2] != template[2]:
        return f"(1, 1 + g*g or g*g, {template[2]})"
    count = shape[1]
    if not (_has_class_entry(count) or math.isqrt(count) ** 2 == count):
        return f"(1, 1 + g*g or g*g, {template[2]}) with a square grid g x g"
    if not _has_class_entry(template[1]):
        return (
            f"a grid to resize to the template's {template[1] - 1} patches, which are not a "
            "square grid (a non-square model.image_size)"
        )
    return None


def _convert_pos(posemb: np.ndarray, template: Shape) -> np.ndarray:
    """Checkpoint position embeddings (either layout) as the template's, resized if need be."""
    if not _has_class_entry(posemb.shape[1]):
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    if posemb.shape == tuple(template):
        return posemb
    side = math.isqrt(template[1] - 1)
    return resample_pos_embedding(posemb, (side, side))


# ----------------------------------------------------------------------------------------------
# The layouts: where each template module comes from.

# What every layout shares: the model and messages.
_VIT = dict(
    name="ViT",
    counterpart="ViT",
    model="tljax.models.vit.ViT",
    exclude_hint="convert_vit(..., exclude=('head',))",
)
# Checkpoint position embeddings of another grid, or without the class entry, fit too.
_POS = Transform(lambda shape: lambda found: _pos_problem(found, shape), _convert_pos)


def _embedding(cls: str, pos: str) -> torch_rules.Kind:
    return kind("embedding", cls=(cls, SAME), pos_embedding=(pos, _POS))


def _qkv(index: int) -> torch_rules.Kind:
    """Rows ``[index * D, (index + 1) * D)`` of timm's fused qkv (rows: query, key, value)."""
    rows = lambda width: slice(index * width, (index + 1) * width)
    return kind(
        "qkv",
        kernel=("weight", Transform(lambda s: (3 * s[1], s[0]), lambda w, s: w[rows(s[1])].T)),
        bias=("bias", Transform(lambda s: (3 * s[0],), lambda b, s: b[rows(s[0])])),
    )


_TIMM = torch_rules.Family(
    **_VIT,
    checkpoint="the timm-layout checkpoint (read as timm because no key holds a '/')",
    locate=torch_rules.pattern_locator(
        [
            ("embedding", "", _embedding("cls_token", "pos_embed")),
            ("embedding/patch", "patch_embed.proj", torch_rules.CONV),
            (_BLOCK + "norm(?P<n>[12])", "blocks.{i}.norm{n}", torch_rules.LAYER_NORM),
            *((_BLOCK + f"attn/{n}", "blocks.{i}.attn.qkv", _qkv(j)) for j, n in enumerate(_QKV)),
            (_BLOCK + "attn/out", "blocks.{i}.attn.proj", torch_rules.DENSE),
            (_BLOCK + "mlp/fc(?P<fc>[12])", "blocks.{i}.mlp.fc{fc}", torch_rules.DENSE),
            ("encoder/norm", "norm", torch_rules.LAYER_NORM),
            ("head", "head", torch_rules.DENSE),
        ]
    ),
)


def _split_heads(*axes: str) -> Transform:
    """A ``(D, D)`` kernel or ``(D,)`` bias stored with a heads axis split out.

    Args:
      *axes: the stored tensor's axes, each ``'D'``, ``'heads'`` or ``'D / heads'`` (the number
        of heads is not recorded, so any split of D fits).

    Returns:
      The transform: a reshape to the template's shape.
    """

    def need(shape: Shape) -> Callable[[Shape], str | None]:
        width = shape[-1]
        needed = "(" + ", ".join(axis.replace("D", str(width)) for axis in axes) + ")"

        def check(found: Shape) -> str | None:
            if len(found) != len(axes):
                return needed
            widths = all(n == width for n, axis in zip(found, axes, strict=True) if axis == "D")
            # The split axes multiply to D: heads * (D / heads).
            return None if widths and math.prod(found) == width ** (axes.count("D") + 1) else needed

        return check

    return Transform(need, lambda array, shape: array.reshape(shape))


# Flax keeps names and layouts, but attention kernels keep a heads axis.
_FLAX = kind("flax", **{leaf: (leaf, SAME) for leaf in ("kernel", "scale", "bias")})
_HEADS_IN = kind(
    "attention",
    kernel=("kernel", _split_heads("D", "heads", "D / heads")),
    bias=("bias", _split_heads("heads", "D / heads")),
)
_HEADS_OUT = kind(
    "attention_out", kernel=("kernel", _split_heads("heads", "D / heads", "D")), bias=("bias", SAME)
)


def _big_vision(state_dict: StateDict) -> torch_rules.Family:
    """The big_vision / vision_transformer layout of one checkpoint (its prefix and naming)."""
    embedding = [key for key in state_dict if key.endswith("embedding/kernel")]
    prefix = min(embedding, key=len)[: -len("embedding/kernel")] if embedding else ""
    # vision_transformer numbered a block's sublayers among all of its modules.
    old = any(
        key.startswith(f"{prefix}Transformer/encoderblock_") and "/MlpBlock_3/" in key
        for key in state_dict
    )
    attention, norm2, mlp = (1, 2, 3) if old else (0, 1, 0)
    pos_fields = ("pos_embedding", "Transformer/posembed_input/pos_embedding")
    pos_field = next((f for f in pos_fields if prefix + f in state_dict), pos_fields[0])
    block = "Transformer/encoderblock_{i}/"
    heads = f"{block}MultiHeadDotProductAttention_{attention}/"
    relative = torch_rules.pattern_locator(
        [
            ("embedding", "", _embedding("cls", pos_field)),
            ("embedding/patch", "embedding", _FLAX),
            (_BLOCK + "norm1", block + "LayerNorm_0", _FLAX),
            (_BLOCK + "norm2", block + f"LayerNorm_{norm2}", _FLAX),
            (_BLOCK + "attn/(?P<qkv>query|key|value)", heads + "{qkv}", _HEADS_IN),
            (_BLOCK + "attn/out", heads + "out", _HEADS_OUT),
            (_BLOCK + "mlp/fc1", block + f"MlpBlock_{mlp}/Dense_0", _FLAX),
            (_BLOCK + "mlp/fc2", block + f"MlpBlock_{mlp}/Dense_1", _FLAX),
            ("encoder/norm", "Transformer/encoder_norm", _FLAX),
            ("head", "head", _FLAX),
        ]
    )

    def locate(module_path: str) -> tuple[str, torch_rules.Kind] | None:
        located = relative(module_path)
        if located is None:
            return None
        name, kind_ = located
        return (prefix + name if name else prefix.removesuffix("/")), kind_

    def ignore(key: str, exclude: Sequence[str]) -> bool:
        # Keys outside the params (optimizer state) are skipped, as big_vision's load_params
        # does; pre_logits goes with a re-initialised head, as timm drops it.
        pre_logits = key.startswith(f"{prefix}pre_logits/")
        return not key.startswith(prefix) or (
            pre_logits and torch_rules.is_excluded("head", exclude)
        )

    return torch_rules.Family(
        **_VIT,
        checkpoint=(
            "the big_vision-layout checkpoint (read as big_vision because its keys hold '/')"
        ),
        locate=locate,
        sep="/",
        known=frozenset(prefix + field for field in pos_fields),
        ignore=ignore,
    )


def detect_layout(state_dict: StateDict) -> str:
    """The layout of a checkpoint: 'big_vision' if any key holds a '/', else 'timm'.

    Args:
      state_dict: checkpoint key -> array.

    Returns:
      One of ``LAYOUTS``.
    """
    return "big_vision" if any("/" in key for key in state_dict) else "timm"


# ----------------------------------------------------------------------------------------------
# Conversion.


def convert_vit(
    state_dict: StateDict,
    params_template: Mapping[str, Any],
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a timm or big_vision ViT checkpoint to params shaped like ``params_template``.

    Args:
      state_dict: checkpoint key -> array (``tljax.validate.read_state_dict`` of the file); the
        layout is `detect_layout`'s.
      params_template: ``params`` of a ``tljax.models.vit.ViT``; its leaves need ``shape`` and
        ``dtype`` only (``jax.eval_shape`` output will do) except under ``exclude``, whose
        leaves are returned as they are.
      exclude: module paths (``'head'``, ``'encoder/block11'``, ``'embedding'``) whose params are
        kept from the template; the checkpoint's tensors for them are not read.

    Returns:
      A new nested dict with the template's structure; converted leaves are NumPy arrays in the
      template leaves' dtypes (position embeddings resized to the template's grid).

    Raises:
      ValueError: if the template is not a ViT's params, or, listing every problem at once, if
        checkpoint keys are missing, keys are left over, or shapes do not fit the template.
    """
    family = _big_vision(state_dict) if detect_layout(state_dict) == "big_vision" else _TIMM
    return torch_rules.convert(state_dict, params_template, family, exclude=exclude)
