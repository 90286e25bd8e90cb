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

Learning rates per leaf are optimizer groups (`lr_labels`, `partition_optimizer`); layer-wise
decay (`layer_decay_mults`) is BEiT's (Bao et al. 2021, microsoft/unilm ``beit/optim_factory.py``)
as MAE ships it (facebookresearch/mae ``util/lr_decay.py``), over pattern-defined layer groups.
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
        hits, asked_for_none = _hits(pattern, paths, layers)
        if not hits and not asked_for_none:
            layer_list = sorted({layer_of(p) for p in paths})
            raise ValueError(f"Pattern {pattern!r} matches no parameter. Layers: {layer_list}.")
        chosen |= hits
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_of(kp) in chosen, params)


def _hits(pattern: str, paths: Sequence[str], layers: Sequence[str] | None) -> tuple[set, bool]:
    """(paths ``pattern`` matches, whether it asked for no layers at all, as ``first:0`` does)."""
    layer_set = None
    if pattern.startswith(("first:", "last:")):
        if layers is None:
            raise ValueError(f"Pattern {pattern!r} needs the network's layer order.")
        layer_set = _layer_pattern(pattern, layers)
    hits = {p for p in paths if _matches(pattern, p, layer_set)}
    return hits, layer_set is not None and not layer_set


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


def lr_label(mult: float) -> str:
    """The optimizer group label of a learning-rate multiplier: ``'trained'`` or ``'lr_x<m>'``.

    Args:
      mult: the multiplier.

    Returns:
      ``'trained'`` for 1, else ``'lr_x'`` and the multiplier, short (``lr_x0.1``) when that
      reads back as the same float and ``repr`` otherwise: `partition_optimizer` scales by the
      number in the label, so it must be exact (layer decay's 0.75**12, for one).
    """
    mult = float(mult)
    if mult == 1.0:
        return TRAINED
    short = f"{mult:g}"
    return f"lr_x{short if float(short) == mult else repr(mult)}"


def lr_labels(
    params: Params,
    frozen: Mask,
    lr_mults: Mapping[str, float],
    layers=None,
    base_mults: Params | None = None,
) -> Params:
    """Optimizer group label of every leaf: ``'frozen'``, ``'trained'`` or ``'lr_x<mult>'``.

    Args:
      params: params pytree (or shapes).
      frozen: selection of frozen leaves.
      lr_mults: pattern -> learning-rate multiplier; a later pattern wins over an earlier one.
      layers: forward layer order, for ``first:``/``last:`` patterns.
      base_mults: optional pytree of the params' structure holding a multiplier per leaf (e.g.
        `layer_decay_mults`); a leaf's ``lr_mults`` multiplier multiplies it.

    Returns:
      A pytree of strings of the params' structure.
    """
    if base_mults is None:
        base = jax.tree.map(lambda _: 1.0, frozen)
    else:
        base = jax.tree.map(float, base_mults)
    mults = base
    for pattern, mult in lr_mults.items():
        chosen = select(params, pattern, layers)
        mults = jax.tree.map(
            lambda old, c, b, m=float(mult): b * m if c else old, mults, chosen, base
        )
    return jax.tree.map(lambda f, m: FROZEN if f else lr_label(m), frozen, mults)


def default_layer_groups(layers: Sequence[str]) -> list[list[str]]:
    """The layer-decay groups of a network, from its layers in forward order.

    A group is a *numbered module*, the path up to the first component that ends in a number
    (``encoder/block3``, ``stage2``, ``feature/conv_0``), or a run of consecutive layers
    without a number (``stem``; a ViT's class token, position and patch embeddings; its final
    norm and head). So a ViT gives BEiT's groups (embeddings, each block, norm + head), a
    ResNet ``stem, stage1 .. stage4, head`` and the digit network one group per layer.

    Args:
      layers: layer paths in forward order (`layer_order`).

    Returns:
      The groups, in forward order, each a list of layer paths.
    """
    groups: list[list[str]] = []
    position: dict[str, int] = {}
    previous_unnumbered = False
    for layer in layers:
        module = _numbered_module(layer)
        if module is None:
            if not previous_unnumbered:
                groups.append([])
            groups[-1].append(layer)
        else:
            if module not in position:
                position[module] = len(groups)
                groups.append([])
            groups[position[module]].append(layer)
        previous_unnumbered = module is None
    return groups


def _numbered_module(layer: str) -> str | None:
    parts = layer.split("/") if layer else []
    for index, part in enumerate(parts):
        if re.search(r"\d$", part):
            return "/".join(parts[: index + 1])
    return None


def layer_group_masks(
    params: Params, groups: Sequence[str | Sequence[str]], layers: Sequence[str] | None = None
) -> list[Mask]:
    """The selections of layer-decay groups given as patterns, in forward order.

    Args:
      params: params pytree (or shapes).
      groups: one entry per group: a pattern or a list of patterns (`select`). An entry with
        ``{i}`` stands for one group per number that makes it match, in numeric order:
        ``'encoder/block{i}'`` is ``encoder/block0``, ``encoder/block1``, ...
      layers: forward layer order, for ``first:``/``last:`` patterns.

    Returns:
      One selection per group. A leaf in several keeps only the last (as in ``lr_mults``);
      leaves in none are left to the caller.

    Raises:
      ValueError: a pattern matches nothing (for ``{i}``: for no number).
    """
    paths = leaf_paths(params)
    numbers = sorted({int(n) for path in paths for n in re.findall(r"\d+", path)})
    owner: dict[str, int] = {}
    count = 0
    for entry in groups:
        patterns = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any("{i}" in p for p in patterns):
            expanded = [patterns]
        else:
            expanded = [tuple(p.replace("{i}", str(n)) for p in patterns) for n in numbers]
            expanded = [g for g in expanded if any(_hits(p, paths, layers)[0] for p in g)]
            if not expanded:
                raise ValueError(f"Layer group {entry!r} matches no parameter for any {{i}}.")
        for group in expanded:
            for path in selected_paths(select(params, group, layers)):
                owner[path] = count
            count += 1
    return [
        jax.tree_util.tree_map_with_path(lambda kp, _, g=g: owner.get(path_of(kp)) == g, params)
        for g in range(count)
    ]


def layer_decay_mults(
    params: Params,
    decay: float,
    groups: Sequence[str | Sequence[str]] = (),
    layers: Sequence[str] | None = None,
) -> Params:
    """Layer-wise learning-rate decay (BEiT, MAE): the last group x1, each earlier x ``decay``.

    With G groups in forward order, group k trains at ``decay ** (G - 1 - k)``: the head at
    the full rate, the embedding at the smallest. This is BEiT's ``layer_decay ** (num_layers -
    layer_id)`` with its layer ids (0 the embeddings, 1 + i block i, the rest last).

    Args:
      params: params pytree (or shapes).
      decay: the per-group factor, in (0, 1].
      groups: the groups as patterns (`layer_group_masks`); leaves in none form one last group.
        Empty: `default_layer_groups` of ``layers``.
      layers: forward layer order (needed for the default and ``first:``/``last:``).

    Returns:
      A pytree of float multipliers of the params' structure.

    Raises:
      ValueError: ``decay`` outside (0, 1], no layer order for the default, or a pattern that
        matches nothing.
    """
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
        raise ValueError(f"transfer.layer_decay={decay!r}: must be a number in (0, 1], e.g. 0.75.")
    if groups:
        masks = layer_group_masks(params, groups, layers)
    else:
        if layers is None:
            raise ValueError("Default layer-decay groups need the network's layer order.")
        masks = [
            jax.tree_util.tree_map_with_path(
                lambda kp, _, g=frozenset(group): layer_of(path_of(kp)) in g, params
            )
            for group in default_layer_groups(layers)
        ]
    # Each leaf's group number; the leaves of no group form one more, last group.
    group = jax.tree.map(lambda _: len(masks), params)
    for k, mask in enumerate(masks):
        group = jax.tree.map(lambda old, chosen, k=k: k if chosen else old, group, mask)
    num_groups = len(masks) + any(k == len(masks) for k in jax.tree.leaves(group))
    return jax.tree.map(lambda k: float(decay) ** (num_groups - 1 - k), group)


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
        group = _describe_groups([leaf[3] for leaf in leaves], sizes)
        shape_text = ", ".join(f"{name}{list(shape)}" for name, shape, _, _ in leaves)
        rows.append(f"| {layer} | {shape_text} | {sum(sizes):,} | {origin} | {group} |")
        for (_, _, leaf_origin, leaf_group), size in zip(leaves, sizes, strict=True):
            key = f"{leaf_origin}, {leaf_group}"
            totals[key] = totals.get(key, 0) + size
    total = count(params)
    rows.append(f"| total | | {total:,} | | |")
    breakdown = "; ".join(f"{key}: {value:,}" for key, value in sorted(totals.items()))
    trainable = sum(value for key, value in totals.items() if not key.endswith(FROZEN))
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    return "\n".join(rows) + f"\n{breakdown}\ntrainable: {trainable:,} of {total:,}{share}"


def _describe(values: set[str]) -> str:
    return "/".join(sorted(values)) if len(values) > 1 else next(iter(values))


def _describe_groups(groups: list[str], sizes: list[int]) -> str:
    """One group's name, or each group with its size when a layer mixes them (e.g. LoRA)."""
    by_group: dict[str, int] = {}
    for group, size in zip(groups, sizes, strict=True):
        by_group[group] = by_group.get(group, 0) + size
    if len(by_group) == 1:
        return groups[0]
    return ", ".join(f"{group} {size:,}" for group, size in sorted(by_group.items()))
