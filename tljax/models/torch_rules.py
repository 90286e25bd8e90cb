"""Checkpoint tensors to Flax params by rule tables, with complete error reports.

Every checkpoint converter (ResNet ``tljax.models.torch_convert``, ViT ``vit_convert``,
ConvNeXt ``convnext_convert``, VGG ``vgg_convert``) is a `Family` over this module: a table
saying, for each tljax module path of the params template, which checkpoint module holds its
tensors and what kind of layer it is (a `Kind`: its `Rule`\\ s, each making one or several of
the module's leaves from one or several of its tensors). A rule may fold several tensors into
several leaves (BatchNorm's four into ``scale`` and ``bias``), take a slice of a shared tensor
(ViT's fused ``qkv`` into ``query``, ``key`` and ``value``), or accept more than one shape (a
position-embedding grid to resample, a heads axis of unknown size). This module does the rest,
the same way for every family:

* walks the template's modules (the parents of its leaves); those under ``exclude`` are kept from
  the template and their tensors are not read (an excluded module the family does not know, such
  as a domain discriminator beside the backbone, is fine);
* reports template modules (or leaves) the family has no counterpart for, all at once;
* checks the checkpoint against the template and reports, in one ``ValueError``, every key that
  is missing, every key left over, and every shape that does not fit (with the template leaf,
  its shape, and the checkpoint shape it needs; one line per checkpoint key, however many leaves
  read it);
* converts the leaves, computing in the rule's precision and casting to the template's dtype.

Reference layouts: ``torch.nn.Conv2d.weight`` is (out, in / groups, kh, kw) and
``torch.nn.Linear.weight`` is (out, in); Flax's ``nn.Conv`` kernel is (kh, kw, in / groups, out)
and ``nn.Dense`` kernel is (in, out).
"""

from __future__ import annotations

import dataclasses
import re
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
    "Family",
    "Kind",
    "Layer",
    "Locate",
    "Rule",
    "Transform",
    "convert",
    "is_excluded",
    "kind",
    "layers",
    "pattern_locator",
    "torch_shapes",
]

Shape = tuple[int, ...]
StateDict = Mapping[str, np.ndarray]
# What a checkpoint tensor's shape must be: exactly a shape, or a check of the found shape that
# returns None when it will do and otherwise the shape needed, in words.
Need = Shape | Callable[[Shape], str | None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How some leaves of a module are made from some tensors of its checkpoint module.

    Attributes:
      leaves: the leaf names it makes, e.g. ``('kernel',)`` or ``('scale', 'bias')``.
      fields: the checkpoint tensor names it reads, within the checkpoint module.
      need: template shape of the first leaf -> what each field's shape must be.
      make: (the fields' arrays, template shape of the first leaf) -> the leaves' values.
    """

    leaves: tuple[str, ...]
    fields: tuple[str, ...]
    need: Callable[[Shape], Need]
    make: Callable[[Sequence[np.ndarray], Shape], Sequence[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one checkpoint tensor becomes one leaf (the common case of a `Rule`).

    Attributes:
      need: template leaf shape -> what the tensor's shape must be.
      convert: (tensor, template leaf shape) -> the leaf's value.
    """

    need: Callable[[Shape], Need]
    convert: Callable[[np.ndarray, Shape], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of layer: a name (for callers that tell layers apart) and its rules."""

    name: str
    rules: tuple[Rule, ...]


def kind(name: str, *rules: Rule, **leaves: tuple[str, Transform]) -> Kind:
    """A `Kind` of ``rules`` plus one-tensor rules ``leaf=(field, transform)``.

    Args:
      name: the kind's name, e.g. ``'conv'``.
      *rules: rules of several tensors or leaves.
      **leaves: leaf name -> (checkpoint field, `Transform`).

    Returns:
      The kind.
    """

    def one(leaf: str, field: str, transform: Transform) -> Rule:
        make = lambda arrays, shape: (transform.convert(arrays[0], shape),)
        return Rule((leaf,), (field,), transform.need, make)

    return Kind(name, rules + tuple(one(leaf, *spec) for leaf, spec in leaves.items()))


SAME = Transform(lambda shape: shape, lambda array, shape: array)
# (kh, kw, in, out) <- (out, in, kh, kw); depthwise kernels (kh, kw, 1, C) <- (C, 1, kh, kw) too.
CONV_KERNEL = Transform(
    lambda shape: (shape[3], shape[2], shape[0], shape[1]),
    lambda array, shape: array.transpose(2, 3, 1, 0),
)
DENSE_KERNEL = Transform(lambda shape: shape[::-1], lambda array, shape: array.T)
CONV = kind("conv", kernel=("weight", CONV_KERNEL), bias=("bias", SAME))
DENSE = kind("dense", kernel=("weight", DENSE_KERNEL), bias=("bias", SAME))
LAYER_NORM = kind("layer_norm", scale=("weight", SAME), bias=("bias", SAME))

# tljax module path -> (checkpoint module name, its kind), or None if the family has none.
Locate = Callable[[str], tuple[str, Kind] | None]


def pattern_locator(
    rows: Sequence[tuple[str, str, Kind]],
    rename: Callable[[dict[str, str]], dict[str, str]] = dict,
) -> Locate:
    """A `Locate` from a table of module path patterns.

    Args:
      rows: (regular expression matching the whole tljax module path, checkpoint module name
        with ``{group}`` fields of the expression, kind); the first match wins.
      rename: the matched groups -> the values filled in (e.g. stages counted from 0).

    Returns:
      The locate function.
    """
    table = [(re.compile(pattern), name, kind_) for pattern, name, kind_ in rows]

    def locate(module_path: str) -> tuple[str, Kind] | None:
        for pattern, name, kind_ in table:
            match = pattern.fullmatch(module_path)
            if match:
                return name.format(**rename(match.groupdict())), kind_
        return None

    return locate


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family and a checkpoint layout: where the template's params come from.

    Attributes:
      name: the model, for messages (``'ResNet'``).
      counterpart: what the checkpoint modules are (``'torchvision ResNet'``).
      model: the tljax class whose params the template must be.
      exclude_hint: how a caller excludes the head, suggested when the head's shape differs.
      locate: tljax module path -> (checkpoint module, kind), or None.
      sep: what joins a checkpoint module name and a field into a key (``''`` modules: none).
      checkpoint: the checkpoint, for messages.
      known: keys the family reads besides the rules' (alternative names of one tensor).
      ignore: (key no rule reads, exclude) -> whether it is left out silently.
    """

    name: str
    counterpart: str
    model: str
    exclude_hint: str
    locate: Locate
    sep: str = "."
    checkpoint: str = "the checkpoint"
    known: frozenset[str] = frozenset()
    ignore: Callable[[str, Sequence[str]], bool] = lambda key, exclude: False


@dataclasses.dataclass(frozen=True)
class _Part:
    """A rule applied to one module: the keys it reads and the shapes they need."""

    rule: Rule
    keys: tuple[str, ...]
    shape: Shape  # Template shape of the rule's first leaf.
    need: Need

    @property
    def label(self) -> str:
        leaves = self.rule.leaves
        return leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One template module located in the checkpoint.

    Attributes:
      module_path: the tljax module path (``'stage1/block0/conv1'``).
      kind: the name of its `Kind`.
      parts: its rules with their checkpoint keys.
    """

    module_path: str
    kind: str
    parts: tuple[_Part, ...]

    def expected_torch_shapes(self) -> dict[str, tuple[str, Shape, Need]]:
        """Checkpoint key -> (the leaf or leaves it makes, template shape, shape it needs)."""
        return {key: (p.label, p.shape, p.need) for p in self.parts for key in p.keys}


def is_excluded(module_path: str, exclude: Sequence[str]) -> bool:
    """Whether ``module_path`` is one of ``exclude`` or inside one."""
    return any(module_path == prefix or module_path.startswith(prefix + "/") for prefix in exclude)


def layers(
    params_template: Mapping[str, Any], family: Family, exclude: Sequence[str] = ()
) -> list[Layer]:
    """The template's modules, located in the checkpoint, in the template's order.

    Args:
      params_template: params (or their ``jax.eval_shape``) of the family's model.
      family: the family.
      exclude: module paths that may have no counterpart (they are left out then).

    Returns:
      One `Layer` per module with a counterpart.

    Raises:
      ValueError: the template is a variables dict, or modules or leaves outside ``exclude``
        have no counterpart (all named).
    """
    if "params" in params_template:
        raise ValueError(
            "params_template has a 'params' key: pass variables['params'], not the variables."
        )
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(params_template, sep="/").items():
        module_path, _, leaf_name = path.rpartition("/")
        modules.setdefault(module_path, {})[leaf_name] = leaf
    found, strangers = [], []
    for module_path, leaves in modules.items():
        layer, uncovered = _locate(module_path, leaves, family.locate(module_path), family.sep)
        if not is_excluded(module_path, exclude):
            strangers.extend(uncovered)
        elif uncovered:
            continue  # Kept from the template whole: nothing is read, no key is known for it.
        if layer is not None:
            found.append(layer)
    if strangers:
        what, listed = f"Template path {strangers[0]!r} has", ""
        if len(strangers) > 1:
            what = f"{len(strangers)} template paths have"
            listed = f" ({strangers})" if len(strangers) <= 3 else f" (e.g. {strangers[:3]})"
        raise ValueError(
            f"{what} no {family.counterpart} counterpart{listed}; params_template must be the "
            f"params of a {family.model}."
        )
    return found


def _locate(
    module_path: str, leaves: Mapping[str, Any], located: tuple[str, Kind] | None, sep: str
) -> tuple[Layer | None, list[str]]:
    """The module's layer (None if not located) and the paths nothing makes."""
    if located is None:
        return None, [module_path]
    name, kind_ = located
    parts, made = [], set()
    for rule in kind_.rules:
        # The first rule that makes a leaf wins (a kind may offer several forms of one layer).
        if set(rule.leaves) <= set(leaves) and not made & set(rule.leaves):
            shape = tuple(leaves[rule.leaves[0]].shape)
            keys = tuple(f"{name}{sep}{field}" if name else field for field in rule.fields)
            parts.append(_Part(rule, keys, shape, rule.need(shape)))
            made.update(rule.leaves)
    uncovered = [f"{module_path}/{leaf}" for leaf in leaves if leaf not in made]
    return Layer(module_path, kind_.name, tuple(parts)), uncovered


def torch_shapes(params_template: Mapping[str, Any], family: Family) -> dict[str, Shape]:
    """The checkpoint keys a template needs and their shapes.

    Args:
      params_template: params (or their ``jax.eval_shape``) of the family's model.
      family: a family whose rules need exact shapes.

    Returns:
      Checkpoint key -> shape, in the template's order: what ``model.state_dict()`` of the
      matching PyTorch model holds.
    """
    return {
        key: need
        for layer in layers(params_template, family)
        for key, (_, _, need) in layer.expected_torch_shapes().items()
    }


def convert(
    state_dict: StateDict,
    params_template: Mapping[str, Any],
    family: Family,
    *,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Converts a checkpoint to params shaped like ``params_template``.

    Args:
      state_dict: checkpoint key -> array (``tljax.validate.read_state_dict``).
      params_template: params of the family's model; leaves need ``shape`` and ``dtype`` only
        (``jax.eval_shape`` output will do) except under ``exclude``, whose leaves are returned
        as they are.
      family: the family and checkpoint layout.
      exclude: module paths (``'head'``, ``'stage4'``) whose params are kept from the template;
        their checkpoint tensors are not read (nor reported missing or mis-shaped).

    Returns:
      A new nested dict with the template's structure; converted leaves are NumPy arrays in the
      template leaves' dtypes.

    Raises:
      ValueError: the template is not this family's params, or, listing every problem at once,
        checkpoint keys are missing, keys are left over, or shapes do not fit the template.
    """
    every = layers(params_template, family, exclude)
    loaded = [layer for layer in every if not is_excluded(layer.module_path, exclude)]
    problems = _problems(state_dict, every, loaded, family, exclude)
    if problems:
        excluding = f" (excluding {list(exclude)})" if exclude else ""
        raise ValueError(
            f"Cannot convert {family.checkpoint} to this {family.name}{excluding}:\n{problems}"
        )
    flat = traverse_util.flatten_dict(params_template, sep="/")
    for layer in loaded:
        for part in layer.parts:
            arrays = [np.asarray(state_dict[key]) for key in part.keys]
            values = part.rule.make(arrays, part.shape)
            for leaf, value in zip(part.rule.leaves, values, strict=True):
                path = f"{layer.module_path}/{leaf}"
                flat[path] = np.ascontiguousarray(value, dtype=flat[path].dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def _unmet(need: Need, found: Shape) -> str | None:
    """None if ``found`` fits ``need``, else the shape needed, in words."""
    if callable(need):
        return need(found)
    return None if found == tuple(need) else str(tuple(need))


def _problems(
    state_dict: StateDict,
    every: Sequence[Layer],
    loaded: Sequence[Layer],
    family: Family,
    exclude: Sequence[str],
) -> str:
    """Every missing key, leftover key and wrong shape, as report sections; empty if none."""
    # Keys of excluded modules are known (not leftovers) but not read.
    known = {key for layer in every for part in layer.parts for key in part.keys} | family.known
    reads = [(layer, part, key) for layer in loaded for part in layer.parts for key in part.keys]
    missing = list(dict.fromkeys(key for *_, key in reads if key not in state_dict))
    unexpected = [k for k in state_dict if k not in known and not family.ignore(k, exclude)]
    mismatched: dict[str, str] = {}  # One line per key, however many leaves read it.
    for layer, part, key in reads:
        if key in state_dict and key not in mismatched:
            found = tuple(np.shape(state_dict[key]))
            needed = _unmet(part.need, found)
            if needed is not None:
                mismatched[key] = (
                    f"{layer.module_path}/{part.label}: template {part.shape} needs {key} of "
                    f"shape {needed}, checkpoint has {found}"
                )
    sections = []
    if missing:
        sections.append(_listing(f"{len(missing)} keys missing from the checkpoint", missing))
    if unexpected:
        title = (
            f"{len(unexpected)} checkpoint keys have no place in the template (another "
            "architecture, depth or pooling, or a template initialised without its head?)"
        )
        sections.append(_listing(title, unexpected))
    if mismatched:
        hint = ""
        if any(line.startswith("head/") for line in mismatched.values()):
            hint = (
                " The head differs (a different number of classes?): exclude it so that it is "
                f"re-initialised (transfer.reinit=('head',), or {family.exclude_hint})."
            )
        sections.append(_listing(f"{len(mismatched)} shapes differ.{hint}", mismatched.values()))
    return "\n".join(sections)


def _listing(title: str, items: Sequence[str]) -> str:
    return "  " + title + "\n" + "\n".join(f"    {item}" for item in items)
