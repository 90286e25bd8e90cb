"""torchvision VGG checkpoints (``vgg16``) to ``tljax.models.vgg`` params.

Reference: pytorch/vision ``torchvision/models/vgg.py`` (``VGG.features`` is one
``nn.Sequential`` of conv, ReLU and max-pool modules; ``VGG.classifier`` is Linear, ReLU,
Dropout, Linear, ReLU, Dropout, Linear). Weights are never downloaded at run time: the file is a
local ``.safetensors`` or ``.npz`` holding ``model.state_dict()`` of a torchvision ``vgg16``
(BUILD.md, "Pretrained backbones: ViT, ConvNeXt, VGG").

Key mapping::

    block{b}/conv{k}     features.{index}   index counts every conv and ReLU (2 each) and every
                                            max pool (1) before it: VGG-16's 13 convs are at
                                            0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28
    fc6                  classifier.0       (out, C * 7 * 7), columns in (c, h, w) order
    fc7                  classifier.3
    head                 classifier.6

Conv weights (out, in, kh, kw) become kernels (kh, kw, in, out) and Linear weights (out, in)
kernels (in, out). ``fc6`` also has its input rows permuted from PyTorch's flatten order of
the pooled NCHW map, (c, h, w), to this network's NHWC order, (h, w, c).

Every problem (missing keys, keys left over, shapes that differ) is reported in one
``ValueError`` (``tljax.models.torch_rules``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from tljax.models import torch_rules
from tljax.models.vgg import POOLED_SIZE

__all__ = ["FC6_FROM_CHW", "convert_vgg", "vgg_torch_shapes"]

_CELLS = POOLED_SIZE * POOLED_SIZE


def _fc6_kernel(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(out, C * 7 * 7) PyTorch weight, columns (c, h, w) -> (7 * 7 * C, out), rows (h, w, c)."""
    inputs, out = shape
    channels = inputs // _CELLS
    chw = array.reshape(out, channels, POOLED_SIZE, POOLED_SIZE)
    return chw.transpose(2, 3, 1, 0).reshape(inputs, out)


FC6_FROM_CHW = torch_rules.Transform(lambda shape: shape[::-1], _fc6_kernel)
# tljax module -> (torchvision module, kind); classifier.{1,2,4,5} are ReLU and Dropout.
_CLASSIFIER: dict[str, tuple[str, torch_rules.Kind]] = {
    "fc6": (
        "classifier.0",
        torch_rules.kind("dense", kernel=("weight", FC6_FROM_CHW), bias=("bias", torch_rules.SAME)),
    ),
    "fc7": ("classifier.3", torch_rules.DENSE),
    "head": ("classifier.6", torch_rules.DENSE),
}
_CONV = re.compile(r"block(?P<block>\d+)/conv(?P<conv>\d+)")


def _feature_indices(module_paths: Sequence[str]) -> dict[str, int]:
    """``block{b}/conv{k}`` -> its index in torchvision's ``features`` Sequential."""
    convs: dict[int, set[int]] = {}
    for path in module_paths:
        match = _CONV.fullmatch(path)
        if match:
            convs.setdefault(int(match["block"]), set()).add(int(match["conv"]))
    indices, position = {}, 0
    for block in sorted(convs):
        for conv in sorted(convs[block]):
            indices[f"block{block}/conv{conv}"] = position
            position += 2  # Conv2d, ReLU.
        position += 1  # MaxPool2d.
    return indices


def _family(params_template: Mapping[str, Any]) -> torch_rules.Family:
    """VGG's family for one template: the ``features`` indices depend on its convs per block."""
    paths = [p.rpartition("/")[0] for p in traverse_util.flatten_dict(params_template, sep="/")]
    indices = _feature_indices(paths)

    def locate(module_path: str) -> tuple[str, torch_rules.Kind] | None:
        if module_path in indices:
            return f"features.{indices[module_path]}", torch_rules.CONV
        return _CLASSIFIER.get(module_path)

    return torch_rules.Family(
        name="VGG",
        counterpart="torchvision VGG",
        model="tljax.models.vgg.VGG",
        exclude_hint="convert_vgg(..., exclude=('head',))",
        locate=locate,
    )


def vgg_torch_shapes(params_template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The torchvision ``state_dict`` keys and shapes a VGG template needs.

    Args:
      params_template: params (or their ``jax.eval_shape``) of a ``VGG``.

    Returns:
      Key -> PyTorch-layout shape.
    """
    return torch_rules.torch_shapes(params_template, _family(params_template))


def convert_vgg(
    state_dict: Mapping[str, np.ndarray],
    params_template: Mapping[str, Any],
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a torchvision VGG ``state_dict`` to params shaped like ``params_template``.

    Args:
      state_dict: key -> array (``tljax.validate.read_state_dict``).
      params_template: params of a ``tljax.models.vgg.VGG`` (``jax.eval_shape`` output will do,
        except under ``exclude``).
      exclude: module paths (``'head'``, ``'fc7'``, ``'block5'``) kept from the template,
        unread.

    Returns:
      Params with the template's structure; converted leaves are NumPy arrays.

    Raises:
      ValueError: the template is not a VGG's, or (all listed at once) keys are missing, left
        over, or mis-shaped.
    """
    return torch_rules.convert(
        state_dict, params_template, _family(params_template), exclude=exclude
    )
