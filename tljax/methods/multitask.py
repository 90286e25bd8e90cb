"""Multi-task learning with hard parameter sharing and loss balancing.

Several labelled tasks (``config.tasks``: name -> dataset, class subset, shots, mixing ratio,
fixed weight) train one network whose shared layers are named by path patterns
(``multitask.shared``, see `tljax.models.multitask`). Every batch holds one slice per task, sized
by the tasks' ``mix`` ratios; each task has its own loss, accuracy and test set.

``multitask.balancing`` combines the per-task losses L_i (`tljax.balancing`):

  fixed        sum_i w_i L_i with the tasks' configured ``weight``;
  uncertainty  Kendall et al. 2018: learned log-variances ``balance/log_var``;
  gradnorm     Chen et al. 2018: learned weights ``balance/logits`` (w = T softmax), alpha =
               ``multitask.gradnorm_alpha``, gradient norms on ``multitask.gradnorm_layer``
               (default: the last shared layer);
  pcgrad       Yu et al. 2020: the configured fixed weights, then gradient surgery on the shared
               parameters (task-specific parameters keep their own task's gradient).

The per-task gradients come from one forward pass and a backward pass vectorised over the tasks
(``jax.vmap`` of the VJP over the rows of an identity matrix), inside the jitted, sharded step.
Logged per step: ``task_loss/<task>``, ``accuracy/<task>``, ``weight/<task>`` and the cosine
similarity of every pair of tasks' gradients on the shared parameters,
``grad_cos/<task_a>-<task_b>``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from tljax import balancing, data
from tljax import params as ptree
from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.data.preprocess import to_float_images
from tljax.data.subsets import class_subset, per_class_subset
from tljax.methods import Method, task_classification_sums
from tljax.models import make_classifier, refuse_statistics_updates
from tljax.models.multitask import SHARED, HardSharing, sequence_of, sharing_table
from tljax.validate import Expectations

BALANCING = ("fixed", "uncertainty", "gradnorm", "pcgrad")
TASK_FIELDS = {"dataset", "classes", "shots_per_class", "mix", "weight"}
BALANCE = "balance"


def task_specs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The tasks of `config.tasks` (ordered by name), validated.

    Raises:
      ValueError: no task, an unknown task field, or a non-positive mix ratio.
    """
    tasks = config.get("tasks")
    if not tasks:
        raise ValueError("config.tasks is empty: name at least one task (name -> dataset, ...).")
    for name, spec in tasks.items():
        unknown = set(spec.keys()) - TASK_FIELDS
        if unknown:
            raise ValueError(
                f"Unknown field(s) {sorted(unknown)} in tasks.{name}; use {TASK_FIELDS}."
            )
        if spec.get("mix", 1.0) <= 0:
            raise ValueError(f"tasks.{name}.mix must be positive, got {spec.mix}.")
    return dict(tasks.items())


def slice_sizes(total: int, mixes: dict[str, float]) -> dict[str, int]:
    """Rows of each task in a batch of ``total`` rows, proportional to the mixing ratios.

    Args:
      total: global batch size over all tasks.
      mixes: task -> mixing ratio (positive).

    Returns:
      task -> rows per step, summing to ``total``.

    Raises:
      ValueError: if the ratios do not split ``total`` into whole, non-empty slices.
    """
    norm = sum(mixes.values())
    sizes = {task: total * mix / norm for task, mix in mixes.items()}
    if any(abs(size - round(size)) > 1e-6 or round(size) < 1 for size in sizes.values()):
        raise ValueError(
            f"train.batch_size={total} does not split into whole slices with mixing ratios "
            f"{mixes} (slices {sizes}); choose a batch size or ratios that divide evenly."
        )
    return {task: int(round(size)) for task, size in sizes.items()}


def load_task_split(spec, split: str, data_dir) -> dict[str, np.ndarray]:
    """One task's split, cut to its class subset (and, for training, its shots per class)."""
    arrays = data.load_split(spec.dataset, split, data_dir)
    if spec.get("classes"):
        arrays = class_subset(arrays, spec.classes)
    return arrays


def num_classes_of(spec, arrays) -> int:
    """Classes of a task: its subset's size, or every label its training split holds."""
    return len(spec.classes) if spec.get("classes") else int(arrays["label"].max()) + 1


def _resize_to(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    # Tasks from different datasets (28x28 MNIST, 32x32 SVHN) feed one network.
    if images.shape[1:3] == tuple(size):
        return images
    return jax.image.resize(images, (images.shape[0], *size, images.shape[3]), "bilinear")


def build(config: ml_collections.ConfigDict) -> Method:
    """Multi-task learning from config.

    Args:
      config: experiment config with `tasks`, `multitask`, `data`, `model` and `train` blocks.

    Returns:
      The `Method`: one batch slice per task, one test set per task (``<task>_test``), and a
      `value_and_grad` that balances the per-task gradients.

    Raises:
      ValueError: an unknown balancing method, GradNorm/PCGrad without shared layers, or a
        task configuration that cannot work.
    """
    specs = task_specs(config)
    tasks = tuple(specs)
    block = config.multitask
    method_name = block.balancing
    if method_name not in BALANCING:
        raise ValueError(f"Unknown multitask.balancing {method_name!r}; use one of {BALANCING}.")
    compute_dtype = jnp.dtype(config.model.dtype)
    image_size = tuple(config.model.image_size)

    train_arrays = {}
    for task, spec in specs.items():
        arrays = load_task_split(spec, config.data.train_split, config.data.data_dir)
        if spec.get("shots_per_class"):
            arrays = per_class_subset(arrays, spec.shots_per_class, config.seed)
        train_arrays[task] = arrays
    num_classes = {task: num_classes_of(specs[task], train_arrays[task]) for task in tasks}
    refuse_statistics_updates(config.model, "the multi-task methods")
    templates = {
        task: make_classifier(config.model, num_classes=num_classes[task]) for task in tasks
    }
    example = jnp.zeros((1, *image_size, config.model.channels), compute_dtype)
    sharing = HardSharing(templates, sequence_of(block.shared), example)
    logging.info("Multi-task sharing (%s):\n%s", method_name, sharing_table(sharing))
    if method_name in ("gradnorm", "pcgrad") and not sharing.shared_paths:
        raise ValueError(
            f"multitask.balancing={method_name!r} acts on shared parameters, but "
            "multitask.shared shares none; share some layers or use fixed/uncertainty."
        )

    fixed_weights = jnp.asarray([float(specs[t].get("weight", 1.0)) for t in tasks], jnp.float32)
    initial_losses = jnp.asarray([math.log(num_classes[t]) for t in tasks], jnp.float32)
    gradnorm_layer = block.get("gradnorm_layer") or (
        sharing.shared_layers[-1] if sharing.shared_layers else ""
    )
    if method_name == "gradnorm" and gradnorm_layer not in sharing.shared_layers:
        raise ValueError(
            f"multitask.gradnorm_layer={gradnorm_layer!r} is not a shared layer; "
            f"shared layers: {sharing.shared_layers}."
        )

    def preprocess(images):
        return _resize_to(to_float_images(images, config.model.channels, compute_dtype), image_size)

    def init_params(rng):
        params = sharing.init(rng)
        if method_name == "uncertainty":
            start = float(block.get("initial_log_var", 0.0))
            params[BALANCE] = {"log_var": jnp.full((len(tasks),), start, jnp.float32)}
        elif method_name == "gradnorm":
            params[BALANCE] = {"logits": jnp.zeros((len(tasks),), jnp.float32)}
        return params

    def model_part(params):
        return {key: value for key, value in params.items() if key != BALANCE}

    def task_losses(model_params, batch):
        losses, accuracies = [], []
        for task in tasks:  # A static loop over tasks while tracing; one program for all.
            images = preprocess(batch[f"{task}_image"])
            logits = sharing.apply(model_params, task, images)
            labels = batch[f"{task}_label"]
            losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
            accuracies.append((logits.argmax(-1) == labels).mean())
        return jnp.stack(losses), jnp.stack(accuracies)

    def weights_of(params):
        if method_name == "uncertainty":
            return balancing.uncertainty_weights(params[BALANCE]["log_var"])
        if method_name == "gradnorm":
            return balancing.normalized_weights(params[BALANCE]["logits"])
        return fixed_weights

    def total_loss(params, losses):
        if method_name == "uncertainty":
            return balancing.uncertainty_weighted_loss(losses, params[BALANCE]["log_var"])
        return jnp.sum(jax.lax.stop_gradient(weights_of(params)) * losses)

    def task_metrics(losses, accuracies, weights):
        metrics = {}
        for index, task in enumerate(tasks):
            metrics[f"task_loss/{task}"] = losses[index]
            metrics[f"accuracy/{task}"] = accuracies[index]
            metrics[f"weight/{task}"] = weights[index]
        return metrics

    def loss_fn(params, batch, rng, step):
        """The balanced loss value; its gradients come from `value_and_grad`."""
        del rng, step
        losses, accuracies = task_losses(model_part(params), batch)
        weights = jax.lax.stop_gradient(weights_of(params))
        return total_loss(params, losses), task_metrics(losses, accuracies, weights)

    def value_and_grad(params, batch, rng, step):
        del step
        model_params = model_part(params)
        losses, pullback, accuracies = jax.vjp(
            lambda p: task_losses(p, batch), model_params, has_aux=True
        )
        # Row i of the identity pulls back d L_i: all tasks' gradients in one vmapped backward.
        (task_grads,) = jax.vmap(pullback)(jnp.eye(len(tasks), dtype=losses.dtype))
        weights = weights_of(params)
        metrics = task_metrics(losses, accuracies, weights)
        weighted = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), task_grads)
        grads = dict(weighted)
        shared_flat = None
        if SHARED in task_grads:
            shared_flat = jax.vmap(lambda g: ravel_pytree(g)[0])(task_grads[SHARED])
            metrics |= _cosine_metrics(tasks, balancing.cosine_matrix(shared_flat))
        if method_name == "pcgrad":
            _, unravel = ravel_pytree(jax.tree.map(lambda g: g[0], task_grads[SHARED]))
            surgery, conflicts = balancing.pcgrad(weights[:, None] * shared_flat, rng)
            grads[SHARED] = unravel(surgery)
            pairs = len(tasks) * (len(tasks) - 1)
            metrics["pcgrad_conflict_fraction"] = conflicts.sum() / max(pairs, 1)
        if method_name == "uncertainty":
            log_vars = params[BALANCE]["log_var"]
            grads[BALANCE] = {
                "log_var": jax.grad(balancing.uncertainty_weighted_loss, argnums=1)(
                    jax.lax.stop_gradient(losses), log_vars
                )
            }
        if method_name == "gradnorm":
            layer_norms = _layer_grad_norms(task_grads[SHARED], gradnorm_layer)
            logits = params[BALANCE]["logits"]
            gradnorm_value, logits_grad = jax.value_and_grad(
                lambda z: balancing.gradnorm_loss(
                    balancing.normalized_weights(z),
                    layer_norms,
                    jax.lax.stop_gradient(losses),
                    initial_losses,
                    block.gradnorm_alpha,
                )
            )(logits)
            grads[BALANCE] = {"logits": logits_grad}
            metrics["gradnorm_loss"] = gradnorm_value
            metrics |= {f"grad_norm/{t}": layer_norms[i] for i, t in enumerate(tasks)}
        return (total_loss(params, losses), metrics), grads

    eval_sets = {}
    for index, (task, spec) in enumerate(specs.items()):
        arrays = load_task_split(spec, config.data.eval_split, config.data.data_dir)
        eval_sets[f"{task}_test"] = {**arrays, "task": np.full(len(arrays["label"]), index)}

    def eval_fn(params, batch):
        # One eval function serves every test set; each example's `task` picks its network.
        images = preprocess(batch["image"])
        task_logits = [sharing.apply(model_part(params), task, images) for task in tasks]
        return task_classification_sums(task_logits, batch["label"], batch["task"], batch["mask"])

    sizes = slice_sizes(config.train.batch_size, {t: specs[t].get("mix", 1.0) for t in tasks})
    streams = tuple(Stream(task, train_arrays[task], sizes[task]) for task in tasks)
    # Images of any size are resized to model.image_size; each task has its own classes.
    expects = Expectations(
        channels=config.model.channels,
        num_classes={**num_classes, **{f"{t}_test": num_classes[t] for t in tasks}},
    )
    return Method(
        init_params,
        loss_fn,
        eval_fn,
        streams,
        eval_sets,
        value_and_grad=value_and_grad,
        expects=expects,
        classifiers=tuple(
            Classifier(f"task_loss/{t}", f"accuracy/{t}", num_classes[t]) for t in tasks
        ),
    )


def _cosine_metrics(tasks: tuple[str, ...], cosines: jax.Array) -> dict[str, Any]:
    return {
        f"grad_cos/{tasks[i]}-{tasks[j]}": cosines[i, j]
        for i in range(len(tasks))
        for j in range(i + 1, len(tasks))
    }


def _layer_grad_norms(shared_grads, layer: str) -> jax.Array:
    """[T] norms of each task's gradient on the shared layer ``layer`` (its leaves together)."""
    chosen = ptree.select(shared_grads, layer)
    squares = [
        jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
        for g, keep in zip(jax.tree.leaves(shared_grads), jax.tree.leaves(chosen), strict=True)
        if keep
    ]
    return jnp.sqrt(sum(squares))
