"""PyTorch (torchvision-layout) ResNet checkpoints to ``tljax.models.resnet`` params.

Weights are never downloaded at run time: a checkpoint is a local ``.safetensors`` or ``.npz``
file holding a torchvision ``state_dict`` (BUILD.md, "Pretrained ResNets"), whose path is a
config field. The conversion:

* convolutions: ``weight`` (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out);
* ``fc``: ``weight`` (out, in) -> ``head/kernel`` (in, out), ``bias`` -> ``head/bias``;
* BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``, eps 1e-5) is folded into
  the ``norm='affine'`` layers: ``scale = weight / sqrt(running_var + eps)`` and
  ``bias = bias - running_mean * scale``, which is BatchNorm in eval mode exactly;
  ``num_batches_tracked`` is ignored.

The template must come from a ``norm='affine'`` ResNet: GroupNorm has the same parameter names
but folded BatchNorm statistics mean nothing to it.

The conversion is a table over ``tljax.models.torch_rules`` (`RESNET`), which reports every
problem with a checkpoint (missing keys, keys left over, shapes that differ from the template)
in one ``ValueError`` that lists all of them. Reference: pytorch/vision
``torchvision/models/resnet.py`` (module names); He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tljax.models import torch_rules

__all__ = [
    "BATCH_NORM",
    "BATCH_NORM_EPS",
    "RESNET",
    "convert_resnet",
    "load_pretrained_resnet",
    "load_state_dict",
]

# torch.nn.BatchNorm2d's default, used by every torchvision ResNet.
BATCH_NORM_EPS = 1e-5

StateDict = Mapping[str, np.ndarray]

_SUFFIXES = (".safetensors", ".npz")
# For messages: where to read how a checkpoint file is written.
_HOW_TO = "BUILD.md's 'Pretrained' sections show how, for ResNet, ViT, ConvNeXt and VGG"


# ----------------------------------------------------------------------------------------------
# Files.


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``state_dict`` saved as ``.safetensors`` or ``.npz``.

    Args:
      path: local file; ``.safetensors`` (``safetensors.torch.save_file``) or ``.npz``
        (``numpy.savez`` of the tensors as arrays).

    Returns:
      Parameter name (``layer1.0.conv1.weight``) -> array.

    Raises:
      FileNotFoundError: if ``path`` does not exist (nothing is downloaded at run time).
      ValueError: if the extension is neither ``.safetensors`` nor ``.npz``.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"Cannot read checkpoint {path!r}: unknown extension {suffix!r}; expected one of "
            f"{_SUFFIXES} holding the checkpoint's tensors ({_HOW_TO})."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} does not exist. tljax never downloads weights at run time: "
            "write the state_dict to a .safetensors or .npz file once, on a machine with network "
            f"access, and point transfer.init_from at it ({_HOW_TO})."
        )
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    from safetensors.numpy import load_file  # Only needed for this format.

    return load_file(path)


def load_pretrained_resnet(
    path: str | os.PathLike, params_template: Mapping[str, Any], *, exclude_head: bool
) -> dict[str, Any]:
    """Loads a torchvision ResNet checkpoint into params shaped like ``params_template``.

    Args:
      path: ``.safetensors`` or ``.npz`` file with a torchvision ResNet ``state_dict``.
      params_template: ``params`` of a ``norm='affine'`` ``tljax.models.resnet.ResNet`` (from
        ``model.init(...)['params']``).
      exclude_head: keep ``head`` from the template (e.g. re-initialised for a new number of
        classes) and ignore the checkpoint's ``fc``.

    Returns:
      A new params tree with the template's structure, shapes and dtypes.

    Raises:
      FileNotFoundError, ValueError: see ``load_state_dict`` and ``convert_resnet``.
    """
    exclude = ("head",) if exclude_head else ()
    return convert_resnet(load_state_dict(path), params_template, exclude=exclude)


# ----------------------------------------------------------------------------------------------
# The table: which torchvision module each tljax module comes from, and how.


def _fold_batch_norm(arrays: Sequence[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
    """BatchNorm in eval mode as ``x * scale + bias``, computed in float64 before the cast."""
    del shape
    weight, bias, mean, var = (array.astype(np.float64) for array in arrays)
    scale = weight / np.sqrt(var + BATCH_NORM_EPS)
    return [scale, bias - mean * scale]


def _keep_batch_norm(arrays: Sequence[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
    """BatchNorm as it is: weight, bias and the running statistics."""
    del shape
    return list(arrays)


_BATCH_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
# Four tensors of the channels' shape -> a norm='batch' layer's four leaves as they are, or
# norm='affine''s scale and bias folded from them ("norm": the kind's name callers see).
BATCH_NORM = torch_rules.kind(
    "norm",
    torch_rules.Rule(
        ("scale", "bias", "running_mean", "running_var"),
        _BATCH_NORM_TENSORS,
        lambda shape: shape,
        _keep_batch_norm,
    ),
    torch_rules.Rule(("scale", "bias"), _BATCH_NORM_TENSORS, lambda shape: shape, _fold_batch_norm),
)
_BLOCK, _TORCH_BLOCK = r"stage(?P<stage>\d+)/block(?P<block>\d+)/", "layer{stage}.{block}."
RESNET = torch_rules.Family(
    name="ResNet",
    counterpart="torchvision ResNet",
    model="tljax.models.resnet.ResNet with norm='affine' or 'batch'",
    exclude_hint=(
        "load_pretrained_resnet(..., exclude_head=True) or convert_resnet(..., exclude=('head',))"
    ),
    locate=torch_rules.pattern_locator(
        [
            ("stem/conv", "conv1", torch_rules.CONV),
            ("stem/norm", "bn1", BATCH_NORM),
            (_BLOCK + r"conv(?P<i>\d+)", _TORCH_BLOCK + "conv{i}", torch_rules.CONV),
            (_BLOCK + r"norm(?P<i>\d+)", _TORCH_BLOCK + "bn{i}", BATCH_NORM),
            (_BLOCK + "downsample/conv", _TORCH_BLOCK + "downsample.0", torch_rules.CONV),
            (_BLOCK + "downsample/norm", _TORCH_BLOCK + "downsample.1", BATCH_NORM),
            ("head", "fc", torch_rules.DENSE),
        ]
    ),
    # BatchNorm's step counter, which eval mode does not use.
    ignore=lambda key, exclude: key.endswith(".num_batches_tracked"),
)


def convert_resnet(
    state_dict: StateDict,
    params_template: Mapping[str, Any],
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a torchvision ResNet ``state_dict`` to params shaped like ``params_template``.

    Args:
      state_dict: parameter name -> array, as returned by ``load_state_dict``.
      params_template: ``params`` of a ``norm='affine'`` ``tljax.models.resnet.ResNet``; its
        leaves need ``shape`` and ``dtype`` only (``jax.eval_shape`` output will do) except
        under ``exclude``, whose leaves are returned as they are.
      exclude: module paths (``'head'``, ``'stage4'``, ``'stage4/block1/conv2'``) whose params
        are kept from the template; the checkpoint's tensors for them are not read. Excluded
        modules without a torchvision counterpart (a domain discriminator beside the ResNet)
        are fine.

    Returns:
      A new nested dict with the template's structure; converted leaves are NumPy arrays in the
      template leaves' dtypes.

    Raises:
      ValueError: if the template is not a ResNet's params, or, listing every problem at once,
        if checkpoint keys are missing, keys are left over, or shapes differ from the template.
    """
    return torch_rules.convert(state_dict, params_template, RESNET, exclude=exclude)


def _template_layers(
    params_template: Mapping[str, Any], exclude: Sequence[str]
) -> list[torch_rules.Layer]:
    """The template's modules located in a torchvision ResNet (``kind`` 'conv', 'norm', 'dense')."""
    return torch_rules.layers(params_template, RESNET, exclude)
