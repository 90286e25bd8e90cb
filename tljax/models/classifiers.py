"""The classifier networks a config's ``model`` block names, with the configured CPU ops."""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tljax import ops
from tljax.models import convnext, vgg, vit
from tljax.models.convnet import ConvNet8
from tljax.models.digits import DigitNet
from tljax.models.resnet import RESNETS

CLASSIFIERS = ("digits", "convnet8", *RESNETS, *convnext.CONVNEXTS, *vgg.VGGS, *vit.VITS)


def make_classifier(
    model_config: Mapping[str, Any], *, num_classes: int | None = None, for_eval: bool = False
) -> nn.Module:
    """The classifier network described by a config's ``model`` block.

    Every network returned exposes ``features(images)`` and ``classify(features)`` (float32
    logits), and ``__call__(images)`` gives the logits. The convolution and pooling are
    ``tljax.ops.conv_from_config(model_config)``'s; the digit network's feature extractor also
    runs in its micro-batches (a CPU speed-up that leaves params and outputs unchanged).

    Args:
      model_config: a config's ``model`` block: ``name`` (one of ``CLASSIFIERS``, default
        ``'digits'``), ``num_classes``, ``dtype``, the ``conv_from_config`` fields, and optional
        ``label_widths`` (digits; default (100, 100)), ``width`` (ResNets; 64 is torchvision's)
        and ``norm`` (ResNets; ``'affine'``: frozen BatchNorm, what pretrained checkpoints
        convert to; ``'group'``: GroupNorm, for training from scratch).
      num_classes: overrides ``model_config.num_classes`` (e.g. one network per task).
      for_eval: build the network for evaluation: no micro-batches, since they pay off under
        differentiation only and one pass compiles faster.

    Returns:
      The unbound network.

    Raises:
      ValueError: an unknown ``name``, or an invalid ``conv_from_config`` field.
    """
    name = model_config.get("name", "digits")
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown model.name {name!r}; use one of {CLASSIFIERS}.")
    conv, pool, microbatch = ops.conv_from_config(model_config)
    common = dict(
        num_classes=model_config["num_classes"] if num_classes is None else num_classes,
        conv=conv,
        pool=pool,
        dtype=jnp.dtype(model_config["dtype"]),
    )
    if name == "convnet8":
        return ConvNet8(**common)
    if name in vit.VITS:  # model.name='vit' takes its size from a model.vit block (tests).
        return vit.vit_from_config(
            model_config, num_classes=common["num_classes"], dtype=common["dtype"]
        )
    if name in convnext.CONVNEXTS:  # model.depths / model.dims shrink it (tests).
        return convnext.from_config(model_config, **common)
    if name in vgg.VGGS:  # model.blocks / model.hidden shrink it (tests).
        return vgg.from_config(model_config, **common)
    if name in RESNETS:
        return RESNETS[name](
            width=model_config.get("width", 64), norm=model_config.get("norm", "affine"), **common
        )
    net = DigitNet(label_widths=tuple(model_config.get("label_widths", (100, 100))), **common)
    if for_eval or not microbatch:
        return net
    return ops.MicrobatchedFeatures(net, microbatch)
