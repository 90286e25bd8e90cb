"""Rule-based conversion of a PyTorch ``state_dict`` to Flax params, with complete error reports.

The ConvNeXt (``tljax.models.convnext_convert``) and VGG (``tljax.models.vgg_convert``)
converters are tables over this module: a model family says, for each tljax module path of its
params template, which PyTorch module holds its tensors and how each param leaf is made from
one tensor (a ``LeafMap``). This module does the rest, the same way for every family:

* walks the template's modules (the parents of its leaves), skipping those under ``exclude``;
* checks the checkpoint against the template and reports, in one ``ValueError``, every key that
  is missing, every key left over, and every shape that differs (with the template leaf, its
  shape, and the PyTorch-layout shape it implies);
* converts each leaf (a transpose or reshape of one tensor) to the template leaf's dtype.

The layout of ``tljax.models.torch_convert`` (ResNet, which folds four BatchNorm tensors into
two params) predates it and is not expressed here.

Reference layouts: ``torch.nn.Conv2d.weight`` is (out, in / groups, kh, kw) and
``torch.nn.Linear.weight`` is (out, in); Flax's ``nn.Conv`` kernel is (kh, kw, in / groups, out)
and ``nn.Dense`` kernel is (in, out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

__all__ = [
    "CONV",
    "CONV_KERNEL",
    "DENSE",
    "DENSE_KERNEL",
    "LAYER_NORM",
    "SAME",
    "LeafMap",
    "Locate",
    "Transform",
    "convert",
    "torch_shapes",
]

Shape = tuple[int, ...]
StateDict = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one checkpoint tensor becomes one param leaf.

    Attributes:
      torch_shape: template leaf shape -> the checkpoint tensor shape it needs.
      convert: (checkpoint tensor, template leaf shape) -> the leaf's value.
    """

    torch_shape: Callable[[Shape], Shape]
    convert: Callable[[np.ndarray, Shape], np.ndarray]


SAME = Transform(lambda shape: shape, lambda array, shape: array)
# (kh, kw, in, out) <- (out, in, kh, kw); depthwise kernels (kh, kw, 1, C) <- (C, 1, kh, kw) too.
CONV_KERNEL = Transform(
    lambda shape: (shape[3], shape[2], shape[0], shape[1]),
    lambda array, shape: array.transpose(2, 3, 1, 0),
)
DENSE_KERNEL = Transform(lambda shape: shape[::-1], lambda array, shape: array.T)

# tljax leaf name -> (PyTorch parameter name within the module, transform).
LeafMap = Mapping[str, tuple[str, Transform]]
CONV: LeafMap = {"kernel": ("weight", CONV_KERNEL), "bias": ("bias", SAME)}
DENSE: LeafMap = {"kernel": ("weight", DENSE_KERNEL), "bias": ("bias", SAME)}
LAYER_NORM: LeafMap = {"scale": ("weight", SAME), "bias": ("bias", SAME)}

# tljax module path -> (PyTorch module name, its LeafMap); raises ValueError for an unknown path.
Locate = Callable[[str], tuple[str, LeafMap]]


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One template module and where its tensors are in the checkpoint."""

    module_path: str
    torch_name: str
    leaves: Mapping[str, Any]  # leaf name -> template leaf (anything with shape and dtype)
    leaf_map: LeafMap

    def fields(self) -> dict[str, tuple[str, Transform, Shape, Shape]]:
        """Leaf name -> (checkpoint key, transform, template shape, checkpoint shape needed)."""
        fields = {}
        for leaf_name, leaf in self.leaves.items():
            if leaf_name not in self.leaf_map:
                raise ValueError(
                    f"Template leaf {self.module_path}/{leaf_name} has no checkpoint counterpart "
                    f"(module {self.torch_name!r} provides {sorted(self.leaf_map)})."
                )
            torch_field, transform = self.leaf_map[leaf_name]
            shape = tuple(leaf.shape)
            key = f"{self.torch_name}.{torch_field}"
            fields[leaf_name] = (key, transform, shape, tuple(transform.torch_shape(shape)))
        return fields


def _layers(params_template: Mapping[str, Any], locate: Locate) -> list[_Layer]:
    """The template's modules (parents of its leaves) in the template's order."""
    if "params" in params_template:
        raise ValueError(
            "params_template has a 'params' key: pass variables['params'], not the variables."
        )
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(params_template, sep="/").items():
        module_path, _, leaf_name = path.rpartition("/")
        modules.setdefault(module_path, {})[leaf_name] = leaf
    layers = []
    for module_path, leaves in modules.items():
        torch_name, leaf_map = locate(module_path)
        layers.append(_Layer(module_path, torch_name, leaves, leaf_map))
    return layers


def torch_shapes(params_template: Mapping[str, Any], locate: Locate) -> dict[str, Shape]:
    """The checkpoint keys a template needs and their PyTorch-layout shapes.

    Args:
      params_template: params (or their ``jax.eval_shape``) of the model.
      locate: the family's module path -> (PyTorch module, LeafMap) function.

    Returns:
      Checkpoint key -> shape, in the template's order: what ``model.state_dict()`` of the
      matching PyTorch model holds.
    """
    return {
        key: torch_shape
        for layer in _layers(params_template, locate)
        for key, _, _, torch_shape in layer.fields().values()
    }


def convert(
    state_dict: StateDict,
    params_template: Mapping[str, Any],
    locate: Locate,
    *,
    exclude: Sequence[str] = (),
    family: str,
    exclude_hint: str = "exclude=('head',)",
) -> dict[str, Any]:
    """Converts a ``state_dict`` to params shaped like ``params_template``.

    Args:
      state_dict: checkpoint key -> array (``tljax.validate.read_state_dict``).
      params_template: params of the model; leaves need ``shape`` and ``dtype`` only
        (``jax.eval_shape`` output will do) except under ``exclude``, whose leaves are returned
        as they are.
      locate: the family's module path -> (PyTorch module, LeafMap) function.
      exclude: module paths (``'head'``, ``'stage4'``) whose params are kept from the template;
        their checkpoint tensors are not read (nor reported missing or mis-shaped).
      family: the model family, for messages (e.g. ``'ConvNeXt'``).
      exclude_hint: how a caller excludes the head, suggested when the head's shape differs.

    Returns:
      A new nested dict with the template's structure; converted leaves are NumPy arrays in the
      template leaves' dtypes.

    Raises:
      ValueError: the template is not this family's params, or, listing every problem at once,
        checkpoint keys are missing, keys are left over, or shapes differ from the template.
    """
    layers = _layers(params_template, locate)
    loaded = [layer for layer in layers if not _is_excluded(layer.module_path, exclude)]
    problems = _problems(state_dict, layers, loaded, exclude_hint)
    if problems:
        excluding = f" (excluding {list(exclude)})" if exclude else ""
        raise ValueError(f"Cannot convert the checkpoint to this {family}{excluding}:\n{problems}")
    flat = traverse_util.flatten_dict(params_template, sep="/")
    for layer in loaded:
        for leaf_name, (key, transform, shape, _) in layer.fields().items():
            value = transform.convert(np.asarray(state_dict[key]), shape)
            dtype = layer.leaves[leaf_name].dtype
            flat[f"{layer.module_path}/{leaf_name}"] = np.ascontiguousarray(value, dtype=dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def _is_excluded(module_path: str, exclude: Sequence[str]) -> bool:
    return any(module_path == prefix or module_path.startswith(prefix + "/") for prefix in exclude)


def _problems(
    state_dict: StateDict, layers: Sequence[_Layer], loaded: Sequence[_Layer], exclude_hint: str
) -> str:
    """Every missing key, leftover key and wrong shape, as report sections; empty if none."""
    # Keys of excluded modules are known (not leftovers) but not read.
    known = {key for layer in layers for key, *_ in layer.fields().values()}
    missing, mismatched = [], []
    for layer in loaded:
        for leaf_name, (key, _, shape, torch_shape) in layer.fields().items():
            if key not in state_dict:
                missing.append(key)
            elif tuple(np.shape(state_dict[key])) != torch_shape:
                mismatched.append(
                    f"{layer.module_path}/{leaf_name}: template {shape} needs {key} of shape "
                    f"{torch_shape}, checkpoint has {tuple(np.shape(state_dict[key]))}"
                )
    unexpected = [key for key in state_dict if key not in known]
    sections = []
    if missing:
        sections.append(_listing(f"{len(missing)} keys missing from the checkpoint", missing))
    if unexpected:
        title = (
            f"{len(unexpected)} checkpoint keys have no place in the template (a different "
            "architecture or depth?)"
        )
        sections.append(_listing(title, unexpected))
    if mismatched:
        hint = ""
        if any(line.startswith("head/") for line in mismatched):
            hint = (
                " The head differs (a different number of classes?): exclude it so that it is "
                f"re-initialised (transfer.reinit=('head',), or {exclude_hint})."
            )
        sections.append(_listing(f"{len(mismatched)} shapes differ.{hint}", mismatched))
    return "\n".join(sections)


def _listing(title: str, items: Sequence[str]) -> str:
    return "  " + title + "\n" + "\n".join(f"    {item}" for item in items)
