"""Hard parameter sharing: one network per task whose layers are shared or task-specific.

Every task runs the same *template* network (any Linen module, e.g. `DigitNet`); which
layers all tasks share is a set of path patterns over the template's params, exactly the patterns
of layer transfer (`tljax.params.select`: ``feature``, ``label/dense_0``, ``first:2``, ...). The
multi-task params hold each shared leaf once and each task-specific leaf once per task:

  {'shared': {<template subtree of the shared leaves>},
   'tasks': {<task>: {<template subtree of the task-specific leaves>}, ...}}

so ``shared/feature/conv_1/kernel`` is used by every task and ``tasks/mnist/label/dense_2/kernel``
only by task ``mnist``. Task ``t``'s network is the template applied to the merge of the two
subtrees. This expresses both shapes of hard sharing:

* shared lower layers, task-specific upper layers and heads: ``shared=('feature',)``;
* task-specific input layers, shared middle, task-specific heads:
  ``shared=('feature/conv_1', 'label/dense_0', 'label/dense_1')``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import traverse_util

from tljax import params as ptree

Params = Any

SHARED = "shared"
TASKS = "tasks"


def split_tree(tree: Params, keep: Callable[[str], bool]) -> Params:
    """The nested-dict subtree of the leaves whose path ``keep`` accepts (empty dicts pruned).

    Args:
      tree: nested dicts of leaves.
      keep: path (``'feature/conv_0/kernel'``) -> whether the leaf belongs to the subtree.

    Returns:
      A nested dict holding only the kept leaves.
    """
    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)}, sep="/")


def merge_trees(first: Params, second: Params) -> Params:
    """The union of two nested dicts whose leaf paths are disjoint.

    Raises:
      ValueError: if a path holds a leaf in both.
    """
    out = dict(first)
    for key, value in second.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_trees(out[key], value)
        else:
            raise ValueError(f"Both parameter subtrees hold {key!r}.")
    return out


@dataclasses.dataclass(frozen=True)
class HardSharing:
    """Task networks built from one template, with the layers matched by `shared` shared.

    Attributes:
      templates: task name -> the Linen module of that task (same architecture; heads may differ
        in their number of classes).
      shared_patterns: patterns (`tljax.params.select`) over a template's params naming the
        shared layers; empty shares nothing (independent networks trained together).
      example_input: an input batch used to initialise the templates.
    """

    templates: dict[str, Any]
    shared_patterns: tuple[str, ...]
    example_input: Any

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.templates)

    def _init_template(self, task: str, rng) -> Params:
        return self.templates[task].init(rng, self.example_input)["params"]

    @functools.cached_property
    def layers(self) -> list[str]:
        """The first task's template layers in forward order."""
        task = self.tasks[0]
        return ptree.layer_order(lambda r: self._init_template(task, r), jax.random.key(0))

    @functools.cached_property
    def shared_paths(self) -> frozenset[str]:
        """Template leaf paths that all tasks share.

        Raises:
          ValueError: a pattern matches nothing, or a shared leaf's shape differs between tasks
            (e.g. a shared head for tasks with different numbers of classes).
        """
        if not self.shared_patterns:
            return frozenset()
        shapes = {
            task: jax.eval_shape(lambda r, t=task: self._init_template(t, r), jax.random.key(0))
            for task in self.tasks
        }
        first = self.tasks[0]
        mask = ptree.select(shapes[first], self.shared_patterns, self.layers)
        paths = frozenset(ptree.selected_paths(mask))
        flat = {task: _leaf_shapes(tree) for task, tree in shapes.items()}
        mismatched = [
            f"{path}: " + ", ".join(f"{task} {flat[task][path]}" for task in self.tasks)
            for path in sorted(paths)
            if len({flat[task][path] for task in self.tasks}) > 1
        ]
        if mismatched:
            raise ValueError(
                "Shared layers must have the same shape for every task; these differ:\n  "
                + "\n  ".join(mismatched)
                + "\nKeep them task-specific (leave them out of multitask.shared)."
            )
        return paths

    @functools.cached_property
    def shared_layers(self) -> list[str]:
        """Shared layers (parents of shared leaves), in forward order."""
        shared = {ptree.layer_of(path) for path in self.shared_paths}
        return [layer for layer in self.layers if layer in shared]

    def init(self, rng) -> Params:
        """Multi-task params: shared leaves from the first task's initialisation.

        Args:
          rng: PRNG key; each task's template is initialised with its own key.

        Returns:
          {'shared': ..., 'tasks': {task: ...}}, empty parts left out.
        """
        shared_paths = self.shared_paths
        keys = jax.random.split(rng, len(self.tasks))
        params: dict[str, Any] = {}
        task_params = {}
        for index, task in enumerate(self.tasks):
            full = self._init_template(task, keys[index])
            if index == 0 and shared_paths:
                params[SHARED] = split_tree(full, lambda p: p in shared_paths)
            own = split_tree(full, lambda p: p not in shared_paths)
            if own:
                task_params[task] = own
        if task_params:
            params[TASKS] = task_params
        return params

    def task_params(self, params: Params, task: str) -> Params:
        """Task ``task``'s template params, assembled from the shared and its own leaves."""
        return merge_trees(params.get(SHARED, {}), params.get(TASKS, {}).get(task, {}))

    def apply(self, params: Params, task: str, *args, **kwargs):
        """Runs task ``task``'s network: the template with its assembled params."""
        return self.templates[task].apply(
            {"params": self.task_params(params, task)}, *args, **kwargs
        )


def _leaf_shapes(tree: Params) -> dict[str, tuple[int, ...]]:
    """Leaf path -> shape of a tree of arrays or ``jax.ShapeDtypeStruct``s."""
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(tree, sep="/").items()}


def sharing_table(sharing: HardSharing) -> str:
    """Markdown table of the template's layers: shared by all tasks or one copy per task.

    Args:
      sharing: the hard-sharing layout.

    Returns:
      One row per layer in forward order.
    """
    shared = set(sharing.shared_layers)
    rows = ["| layer | sharing |", "|---|---|"]
    for layer in sharing.layers:
        kind = "shared" if layer in shared else f"per task ({', '.join(sharing.tasks)})"
        rows.append(f"| {layer} | {kind} |")
    return "\n".join(rows)


def sequence_of(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """A config field holding one pattern or several as a tuple of patterns."""
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,) if values else ()
    return tuple(values)
