"""timm ConvNeXt checkpoints (``convnext_tiny``) to ``tljax.models.convnext`` params.

Reference: huggingface/pytorch-image-models ``timm/models/convnext.py`` (module names of
``ConvNeXt``; ``checkpoint_filter_fn`` maps the original facebookresearch/ConvNeXt checkpoints to
these names, so a timm ``state_dict`` is what this reads). Weights are never downloaded at run
time: the file is a local ``.safetensors`` or ``.npz`` holding ``model.state_dict()`` of a timm
``convnext_tiny`` (BUILD.md, "Pretrained ConvNeXt-T and VGG-16").

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

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tljax.models import torch_rules

__all__ = ["convert_convnext", "convnext_torch_shapes", "locate"]

_BLOCK = r"stage(?P<stage>\d+)/block(?P<block>\d+)"
_LAYER_SCALE: torch_rules.LeafMap = {"gamma": ("gamma", torch_rules.SAME)}
# (tljax module path pattern, timm module name with {stage} counted from 0, leaf map)
_RULES: tuple[tuple[re.Pattern[str], str, torch_rules.LeafMap], ...] = tuple(
    (re.compile(pattern), torch_name, leaf_map)
    for pattern, torch_name, leaf_map in (
        (r"stem/conv", "stem.0", torch_rules.CONV),
        (r"stem/norm", "stem.1", torch_rules.LAYER_NORM),
        (
            r"stage(?P<stage>\d+)/downsample/norm",
            "stages.{stage}.downsample.0",
            torch_rules.LAYER_NORM,
        ),
        (r"stage(?P<stage>\d+)/downsample/conv", "stages.{stage}.downsample.1", torch_rules.CONV),
        (_BLOCK + r"/conv_dw", "stages.{stage}.blocks.{block}.conv_dw", torch_rules.CONV),
        (_BLOCK + r"/norm", "stages.{stage}.blocks.{block}.norm", torch_rules.LAYER_NORM),
        (
            _BLOCK + r"/mlp/fc(?P<fc>[12])",
            "stages.{stage}.blocks.{block}.mlp.fc{fc}",
            torch_rules.DENSE,
        ),
        (_BLOCK + r"/layer_scale", "stages.{stage}.blocks.{block}", _LAYER_SCALE),
        (r"final_norm", "head.norm", torch_rules.LAYER_NORM),
        (r"head", "head.fc", torch_rules.DENSE),
    )
)


def locate(module_path: str) -> tuple[str, torch_rules.LeafMap]:
    """The timm module holding a tljax ConvNeXt module's tensors.

    Args:
      module_path: e.g. ``'stage2/block0/mlp/fc1'``.

    Returns:
      (timm module name, e.g. ``'stages.1.blocks.0.mlp.fc1'``, its leaf map).

    Raises:
      ValueError: the path is not a ConvNeXt module.
    """
    for pattern, torch_name, leaf_map in _RULES:
        match = pattern.fullmatch(module_path)
        if match:
            groups = match.groupdict()
            if "stage" in groups:
                # tljax counts stages from 1 (stage1, like ResNet's), timm from 0.
                groups["stage"] = str(int(groups["stage"]) - 1)
            return torch_name.format(**groups), leaf_map
    raise ValueError(
        f"Template module {module_path!r} has no timm ConvNeXt counterpart; params_template "
        "must be the params of a tljax.models.convnext.ConvNeXt."
    )


def convnext_torch_shapes(params_template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The timm ``state_dict`` keys and shapes a ConvNeXt template needs.

    Args:
      params_template: params (or their ``jax.eval_shape``) of a ``ConvNeXt``.

    Returns:
      Key -> PyTorch-layout shape.
    """
    return torch_rules.torch_shapes(params_template, locate)


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
    return torch_rules.convert(
        state_dict,
        params_template,
        locate,
        exclude=exclude,
        family="ConvNeXt",
        exclude_hint="convert_convnext(..., exclude=('head',))",
    )
