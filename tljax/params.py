"""The parameter-tree toolkit: name, select, copy, freeze, re-initialise and summarise leaves.

Params are plain nested dicts. Every leaf is named by its path (``feature/conv_0/kernel``) and a
*layer* is a module that owns leaves directly (``feature/conv_0``). A *selection* is a boolean
pytree of the params' structure, built from patterns:

* a glob, matched against each leaf's path and every ancestor path: ``feature/*``,
  ``label/dense_2`` (the whole layer), ``*/bias``, ``*`` (everything);
* ``re:<regex>``, a regular expression that must match a leaf's whole path;
* ``first:N`` / ``last:N``, the first / last N layers in forward order (the order in which the
  network calls its layers, recorded by ``layer_order``), so "the first 3 layers" means the same
  thing for every network; ``first:N@feature`` counts only layers under ``feature``.

A pattern that selects nothing is an error: a typo must never silently transfer nothing.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

Params = Any
Mask = Any

FROZEN = "frozen"
TRAINED = "trained"


def path_of(key_path) -> str:
    """``'a/b/c'`` for a ``jax.tree_util`` key path."""
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def leaf_paths(params: Params) -> list[str]:
    """Paths of all leaves, in ``jax.tree`` order.

    Args:
      params: a params pytree.

    Returns:
      List of ``'module/submodule/leaf'`` strings.
    """
    return [path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]


def layer_of(path: str) -> str:
    """The layer (parent module path) owning the leaf at ``path``."""
    return path.rpartition("/")[0]


def layer_order(init_fn: Callable[..., Params], *args) -> list[str]:
    """Layers of the network built by ``init_fn``, in the order the forward pass calls them.

    Runs ``init_fn(*args)`` abstractly (no FLOPs, no memory) while recording every Flax module
    call. Layers that no recorded call reaches (e.g. params created outside Linen) follow, in the
    params' own order.

    Args:
      init_fn: e.g. a method's ``init_params``; must initialise Flax Linen modules.
      *args: its arguments, e.g. a PRNG key.

    Returns:
      Layer paths (parents of leaves), forward order first.
    """
    called: list[str] = []

    def record(next_fun, fun_args, fun_kwargs, context):
        scope = context.module.scope
        if scope is not None:
            called.append("/".join(scope.path))
        return next_fun(*fun_args, **fun_kwargs)

    with nn.intercept_methods(record):
        # A fresh wrapper each time: eval_shape caches traces by function, and a cached trace
        # would not run the module calls this records.
        shapes = jax.eval_shape(lambda *a: init_fn(*a), *args)
    layers = list(dict.fromkeys(layer_of(p) for p in leaf_paths(shapes)))
    rank = {}
    for position, path in enumerate(called):
        rank.setdefault(path, position)
    return sorted(layers, key=lambda layer: rank.get(layer, len(called) + layers.index(layer)))


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _layer_pattern(pattern: str, layers: Sequence[str]) -> set[str]:
    which, _, rest = pattern.partition(":")
    count, _, scope = rest.partition("@")
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"Pattern {pattern!r}: expected {which}:N or {which}:N@module.") from None
    scoped = [layer for layer in layers if not scope or layer.startswith(scope.rstrip("/") + "/")]
    if n < 0 or n > len(scoped):
        raise ValueError(
            f"Pattern {pattern!r} asks for {n} layers but there are {len(scoped)}"
            f"{' under ' + scope if scope else ''}: {scoped}."
        )
    return set(scoped[:n] if which == "first" else scoped[len(scoped) - n :])


def _matches(pattern: str, path: str, layer_set: set[str] | None) -> bool:
    if layer_set is not None:
        return layer_of(path) in layer_set
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in _ancestors(path))


def select(params: Params, patterns: str | Iterable[str], layers: Sequence[str] | None = None):
    """The selection (boolean pytree) of leaves matched by any of ``patterns``.

    Args:
      params: params pytree (arrays or ``ShapeDtypeStruct``s).
      patterns: one pattern or several (see the module docstring); empty selects nothing.
      layers: forward layer order (``layer_order``); needed only for ``first:``/``last:``.

    Returns:
      A pytree of bools with the structure of ``params``.

    Raises:
      ValueError: a pattern matches no leaf, is malformed, or needs ``layers``.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = leaf_paths(params)
    chosen = set()
    for pattern in patterns:
        layer_set = None
        if pattern.startswith(("first:", "last:")):
            if layers is None:
                raise ValueError(f"Pattern {pattern!r} needs the network's layer order.")
            layer_set = _layer_pattern(pattern, layers)
        hits = {p for p in paths if _matches(pattern, p, layer_set)}
        if not hits and not (layer_set is not None and not layer_set):
            layer_list = sorted({layer_of(p) for p in paths})
            raise ValueError(f"Pattern {pattern!r} matches no parameter. Layers: {layer_list}.")
        chosen |= hits
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_of(kp) in chosen, params)


def mask_and(a: Mask, b: Mask) -> Mask:
    """Leafwise ``a and b``."""
    return jax.tree.map(lambda x, y: bool(x and y), a, b)


def mask_not(a: Mask) -> Mask:
    """Leafwise ``not a``."""
    return jax.tree.map(lambda x: not x, a)


def selected_paths(mask: Mask) -> list[str]:
    """Paths of the leaves a selection holds."""
    return [path_of(kp) for kp, chosen in jax.tree_util.tree_leaves_with_path(mask) if chosen]


def check_copy(target: Params, source: Params, mask: Mask) -> None:
    """Checks that ``source`` holds every selected leaf of ``target`` with the same shape.

    Args:
      target: the new network's params or their shapes (``ShapeDtypeStruct``s will do).
      source: pretrained params; may hold other leaves too (e.g. a head the target lacks).
      mask: selection over ``target`` of the leaves to copy.

    Raises:
      ValueError: listing every selected path that ``source`` lacks or whose shape differs
        (with both shapes).
    """
    source_flat = traverse_util.flatten_dict(source, sep="/")
    target_flat = traverse_util.flatten_dict(target, sep="/")
    chosen = selected_paths(mask)
    missing = [path for path in chosen if path not in source_flat]
    mismatched = [
        f"{path}: pretrained {np.shape(source_flat[path])} vs model {np.shape(target_flat[path])}"
        for path in chosen
        if path in source_flat and np.shape(source_flat[path]) != np.shape(target_flat[path])
    ]
    problems = []
    if missing and len(missing) == len(chosen):
        source_layers = sorted({layer_of(p) for p in source_flat})
        problems.append(
            "none of them exist in the pretrained params, which look like another architecture "
            f"(its layers: {source_layers[:12]}{' ...' if len(source_layers) > 12 else ''})"
        )
    if missing:
        shown = missing[:40] + ([f"... and {len(missing) - 40} more"] if len(missing) > 40 else [])
        problems.append("missing from the pretrained params:\n  " + "\n  ".join(shown))
    if mismatched:
        problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
    if problems:
        raise ValueError(
            "Cannot copy the selected parameters; "
            + "; ".join(problems)
            + "\nRe-initialise these layers instead (transfer.reinit) or narrow transfer.copy."
        )


def copy_params(target: Params, source: Params, mask: Mask) -> Params:
    """``target`` with the selected leaves replaced by ``source``'s leaves of the same path.

    Args:
      target: the new network's params (e.g. freshly initialised).
      source: pretrained params; may hold other leaves too (e.g. a head the target lacks).
      mask: selection over ``target`` of the leaves to copy.

    Returns:
      A new params tree of ``target``'s structure and dtypes.

    Raises:
      ValueError: as `check_copy`.
    """
    check_copy(target, source, mask)
    source_flat = traverse_util.flatten_dict(source, sep="/")

    def pick(key_path, leaf, chosen):
        if not chosen:
            return leaf
        return jax.numpy.asarray(source_flat[path_of(key_path)], dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, target, mask)


def lr_labels(params: Params, frozen: Mask, lr_mults: Mapping[str, float], layers=None) -> Params:
    """Optimizer group label of every leaf: ``'frozen'``, ``'trained'`` or ``'lr_x<mult>'``.

    Args:
      params: params pytree (or shapes).
      frozen: selection of frozen leaves.
      lr_mults: pattern -> learning-rate multiplier; a later pattern wins over an earlier one.
      layers: forward layer order, for ``first:``/``last:`` patterns.

    Returns:
      A pytree of strings of the params' structure.
    """
    labels = jax.tree.map(lambda f: FROZEN if f else TRAINED, frozen)
    for pattern, mult in lr_mults.items():
        chosen = select(params, pattern, layers)
        label = TRAINED if float(mult) == 1.0 else f"lr_x{float(mult):g}"
        labels = jax.tree.map(
            lambda old, c, lab=label: lab if c and old != FROZEN else old, labels, chosen
        )
    return labels


def partition_optimizer(optimizer: optax.GradientTransformation, labels: Params):
    """Applies ``optimizer`` per group: frozen leaves get no update and no optimizer state.

    Args:
      optimizer: the run's optimizer.
      labels: from ``lr_labels``.

    Returns:
      An optax transformation; ``lr_x<m>`` groups have their updates scaled by ``m`` (for SGD
      and Adam that is exactly an ``m`` times larger learning rate).
    """
    groups = set(jax.tree.leaves(labels))
    if groups <= {TRAINED}:
        return optimizer  # A plain run keeps the plain optimizer (and its state layout).
    transforms = {}
    for label in groups:
        if label == FROZEN:
            transforms[label] = optax.set_to_zero()
        elif label == TRAINED:
            transforms[label] = optimizer
        else:
            transforms[label] = optax.chain(optimizer, optax.scale(float(label[len("lr_x") :])))
    return optax.multi_transform(transforms, labels)


def count(tree: Params, mask: Mask | None = None) -> int:
    """Number of scalars in a params pytree (only in the selected leaves, given a mask)."""
    leaves = jax.tree.leaves(tree)
    chosen = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
    return int(sum(np.prod(np.shape(x)) for x, c in zip(leaves, chosen, strict=True) if c))


def summary_table(
    params: Params, copied: Mask, labels: Params, layers: Sequence[str] | None = None
) -> str:
    """A readable table: one row per layer with its origin, optimizer group and size.

    Args:
      params: params pytree (or shapes).
      copied: selection of leaves copied from pretrained params.
      labels: optimizer groups (``lr_labels``).
      layers: layer order for the rows (default: the params' order).

    Returns:
      A multi-line string (markdown table).
    """
    # (leaf name, shape, origin, group) of every leaf, by layer, in jax.tree order.
    by_layer: dict[str, list[tuple[str, tuple, str, str]]] = {}
    for (key_path, leaf), was_copied, label in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(copied),
        jax.tree.leaves(labels),
        strict=True,
    ):
        layer, _, name = path_of(key_path).rpartition("/")
        origin = "copied" if was_copied else "new"
        by_layer.setdefault(layer, []).append((name, np.shape(leaf), origin, label))
    rows = ["| layer | shapes | params | origin | training |", "|---|---|---|---|---|"]
    totals: dict[str, int] = {}
    for layer in list(layers) if layers else list(by_layer):
        leaves = by_layer.get(layer)
        if not leaves:
            continue
        sizes = [int(np.prod(shape)) for _, shape, _, _ in leaves]
        origin = _describe({leaf[2] for leaf in leaves})
        group = _describe({leaf[3] for leaf in leaves})
        shape_text = ", ".join(f"{name}{list(shape)}" for name, shape, _, _ in leaves)
        rows.append(f"| {layer} | {shape_text} | {sum(sizes):,} | {origin} | {group} |")
        for (_, _, leaf_origin, leaf_group), size in zip(leaves, sizes, strict=True):
            key = f"{leaf_origin}, {leaf_group}"
            totals[key] = totals.get(key, 0) + size
    total = count(params)
    rows.append(f"| total | | {total:,} | | |")
    breakdown = "; ".join(f"{key}: {value:,}" for key, value in sorted(totals.items()))
    return "\n".join(rows) + f"\n{breakdown}"


def _describe(values: set[str]) -> str:
    return "/".join(sorted(values)) if len(values) > 1 else next(iter(values))
