"""The classifier networks a config's ``model`` block names, with the configured CPU ops."""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tljax import ops
from tljax.models import convnext, vgg, vit
from tljax.models.convnet import ConvNet8
from tljax.models.digits import DigitNet
from tljax.models.resnet import NORMS, RESNETS
from tljax.validate import ConfigError

CLASSIFIERS = ("digits", "convnet8", *RESNETS, *convnext.CONVNEXTS, *vgg.VGGS, *vit.VITS)
# model.batch_stats with model.norm='batch': what training does to the running statistics.
BATCH_STATS = ("update", "frozen")


def batch_norm_mode(model_config: Mapping[str, Any]) -> str | None:
    """What training does to the BatchNorm running statistics of a ``model`` block's network.

    Args:
      model_config: a config's ``model`` block.

    Returns:
      ``'update'`` (normalise with batch statistics, update the running ones: the method must
      apply the network with ``mutable=["batch_stats"]``), ``'frozen'`` (normalise with the
      running statistics, which stay as they are), or None: the network has no BatchNorm with
      running statistics (not a ResNet with ``model.norm='batch'``).

    Raises:
      tljax.validate.ConfigError: an unknown ``model.norm`` or ``model.batch_stats``.
    """
    name = model_config.get("name", "digits")
    norm = model_config.get("norm", "affine")
    mode = model_config.get("batch_stats", "update")
    if name in RESNETS and norm not in NORMS:
        raise ConfigError(f"model.norm={norm!r}; use one of {', '.join(NORMS)}.")
    if mode not in BATCH_STATS:
        raise ConfigError(
            f"model.batch_stats={mode!r}; use 'update' (BatchNorm statistics follow the training "
            "batches) or 'frozen' (normalise with the running statistics, never change them)."
        )
    return mode if name in RESNETS and norm == "batch" else None


def refuse_statistics_updates(model_config: Mapping[str, Any], methods: str) -> None:
    """Refuses ``model.batch_stats='update'`` for methods that do not store the updates.

    Such a method would normalise with batch statistics in training and evaluate with running
    statistics that never moved: refused before any work instead.

    Args:
      model_config: a config's ``model`` block.
      methods: what the refused methods are called in the message, e.g. 'the multi-task method'.

    Raises:
      tljax.validate.ConfigError: the block asks for BatchNorm statistics updates.
    """
    if batch_norm_mode(model_config) == "update":
        raise ConfigError(
            f"model.norm='batch' with model.batch_stats='update': {methods} do not update "
            "BatchNorm running statistics. Train with method 'classifier' (configs/pretrain.py, "
            "configs/finetune.py; for AdaBN then python -m tljax.adabn), or set "
            "model.batch_stats='frozen' (normalise with the running statistics) or "
            "model.norm='affine'."
        )


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
        ``label_widths`` (digits; default (100, 100)), ``width`` (ResNets; 64 is torchvision's),
        ``norm`` (ResNets; ``'affine'``: frozen BatchNorm, what pretrained checkpoints
        convert to; ``'batch'``: BatchNorm with running statistics; ``'group'``: GroupNorm, for
        training from scratch) and ``batch_stats`` (with ``norm='batch'``: ``'update'``, the
        default, or ``'frozen'``; see `batch_norm_mode`).
      num_classes: overrides ``model_config.num_classes`` (e.g. one network per task).
      for_eval: build the network for evaluation: no micro-batches, since they pay off under
        differentiation only and one pass compiles faster; BatchNorm uses its running
        statistics. The training network's BatchNorm uses batch statistics with
        ``batch_stats='update'`` (so its method applies it with ``mutable=["batch_stats"]``).

    Returns:
      The unbound network.

    Raises:
      ValueError: an unknown ``name``, or an invalid ``conv_from_config`` field.
      tljax.validate.ConfigError: an unknown ``norm`` or ``batch_stats``.
    """
    name = model_config.get("name", "digits")
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown model.name {name!r}; use one of {CLASSIFIERS}.")
    batch_stats = batch_norm_mode(model_config)
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
            width=model_config.get("width", 64),
            norm=model_config.get("norm", "affine"),
            train=batch_stats == "update" and not for_eval,
            **common,
        )
    net = DigitNet(label_widths=tuple(model_config.get("label_widths", (100, 100))), **common)
    if for_eval or not microbatch:
        return net
    return ops.MicrobatchedFeatures(net, microbatch)
