"""timm ConvNeXt checkpoints (``convnext_tiny``) to ``tljax.models.convnext`` params.

Reference: huggingface/pytorch-image-models ``timm/models/convnext.py`` (module names of
``ConvNeXt``; ``checkpoint_filter_fn`` maps the original facebookresearch/ConvNeXt checkpoints to
these names, so a timm ``state_dict`` is what this reads). Weights are never downloaded at run
time: the file is a local ``.safetensors`` or ``.npz`` holding ``model.state_dict()`` of a timm
``convnext_tiny`` (BUILD.md, "Pretrained backbones: ViT, ConvNeXt, VGG").

Key mapping (tljax module -> timm module; conv weights (out, in/groups, kh, kw) -> kernel
(kh, kw, in/groups, out), Linear weights (out, in) -> kernel (in, out), LayerNorm weight ->
scale)::

    stem/conv, stem/norm                      stem.0, stem.1
    stage{i}/downsample/{norm,conv}           stages.{i-1}.downsample.{0,1}
    stage{i}/block{j}/conv_dw                 stages.{i-1}.blocks.{j}.conv_dw   (depthwise)
    stage{i}/block{j}/norm                    stages.{i-1}.blocks.{j}.norm
    stage{i}/block{j}/mlp/fc{1,2}             stages.{i-1}.blocks.{j}.mlp.fc{1,2}
    stage{i}/block{j}/layer_scale/gamma       stages.{i-1}.blocks.{j}.gamma
    final_norm                                head.norm
    head                                      head.fc

Every problem (missing keys, keys left over, shapes that differ) is reported in one
``ValueError`` (``tljax.models.torch_rules``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tljax.models import torch_rules

__all__ = ["CONVNEXT", "convert_convnext", "convnext_torch_shapes"]

_BLOCK, _TIMM_BLOCK = r"stage(?P<stage>\d+)/block(?P<block>\d+)/", "stages.{stage}.blocks.{block}."
_STAGE = r"stage(?P<stage>\d+)/"


def _stage_from_zero(groups: dict[str, str]) -> dict[str, str]:
    """tljax counts stages from 1 (stage1, like ResNet's), timm from 0."""
    if "stage" in groups:
        groups["stage"] = str(int(groups["stage"]) - 1)
    return groups


CONVNEXT = torch_rules.Family(
    name="ConvNeXt",
    counterpart="timm ConvNeXt",
    model="tljax.models.convnext.ConvNeXt",
    exclude_hint="convert_convnext(..., exclude=('head',))",
    locate=torch_rules.pattern_locator(
        [
            ("stem/conv", "stem.0", torch_rules.CONV),
            ("stem/norm", "stem.1", torch_rules.LAYER_NORM),
            (_STAGE + "downsample/norm", "stages.{stage}.downsample.0", torch_rules.LAYER_NORM),
            (_STAGE + "downsample/conv", "stages.{stage}.downsample.1", torch_rules.CONV),
            (_BLOCK + "conv_dw", _TIMM_BLOCK + "conv_dw", torch_rules.CONV),
            (_BLOCK + "norm", _TIMM_BLOCK + "norm", torch_rules.LAYER_NORM),
            (_BLOCK + "mlp/fc(?P<fc>[12])", _TIMM_BLOCK + "mlp.fc{fc}", torch_rules.DENSE),
            # timm keeps the layer scale in the block itself.
            (
                _BLOCK + "layer_scale",
                "stages.{stage}.blocks.{block}",
                torch_rules.kind("layer_scale", gamma=("gamma", torch_rules.SAME)),
            ),
            ("final_norm", "head.norm", torch_rules.LAYER_NORM),
            ("head", "head.fc", torch_rules.DENSE),
        ],
        rename=_stage_from_zero,
    ),
)


def convnext_torch_shapes(params_template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The timm ``state_dict`` keys and shapes a ConvNeXt template needs.

    Args:
      params_template: params (or their ``jax.eval_shape``) of a ``ConvNeXt``.

    Returns:
      Key -> PyTorch-layout shape.
    """
    return torch_rules.torch_shapes(params_template, CONVNEXT)


def convert_convnext(
    state_dict: Mapping[str, np.ndarray],
    params_template: Mapping[str, Any],
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a timm ConvNeXt ``state_dict`` to params shaped like ``params_template``.

    Args:
      state_dict: key -> array (``tljax.validate.read_state_dict``).
      params_template: params of a ``tljax.models.convnext.ConvNeXt`` (``jax.eval_shape``
        output will do, except under ``exclude``).
      exclude: module paths (``'head'``, ``'stage4'``) kept from the template, unread.

    Returns:
      Params with the template's structure; converted leaves are NumPy arrays.

    Raises:
      ValueError: the template is not a ConvNeXt's, or (all listed at once) keys are missing,
        left over, or mis-shaped.
    """
    return torch_rules.convert(state_dict, params_template, CONVNEXT, exclude=exclude)
