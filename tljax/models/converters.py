"""PyTorch-layout checkpoint converters, by model family.

``transfer.init_from=<file>.safetensors|.npz`` converts the file with the converter of the
model's family (the longest key of `CONVERTERS` that ``model.name`` starts with). Each converter
takes ``(state_dict, params_template, exclude=...)`` and returns params shaped like the template
(see `tljax.models.torch_convert.convert_resnet`, the first of them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tljax.models import convnext_convert, torch_convert, vgg_convert, vit_convert

# model.name prefix -> (converter, what the file must hold, for messages).
CONVERTERS: dict[str, tuple[Callable[..., Any], str]] = {
    "resnet": (torch_convert.convert_resnet, "a torchvision ResNet state_dict"),
    "convnext": (convnext_convert.convert_convnext, "a timm ConvNeXt state_dict"),
    "vgg": (vgg_convert.convert_vgg, "a torchvision VGG state_dict"),
    "vit": (vit_convert.convert_vit, "a timm ViT state_dict or a big_vision / AugReg ViT .npz"),
}


def converter_for(model_name: str) -> tuple[Callable[..., Any], str]:
    """The converter for a model name and a description of the file it reads.

    Args:
      model_name: ``model.name``, e.g. 'resnet50'.

    Returns:
      (convert, description).

    Raises:
      ValueError: no converter reads PyTorch checkpoints for this model.
    """
    matches = [prefix for prefix in CONVERTERS if model_name.startswith(prefix)]
    if not matches:
        raise ValueError(
            f"model.name={model_name!r} cannot start from a PyTorch checkpoint; the families "
            f"that can are {sorted(CONVERTERS)} (a tljax workdir works for every model)."
        )
    return CONVERTERS[max(matches, key=len)]
