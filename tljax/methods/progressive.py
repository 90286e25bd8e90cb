"""Progressive neural networks (Rusu et al. 2016): one column per task, earlier columns frozen.

A run trains task K of the sequence ``progressive.sequence`` (K = ``progressive.task``) with the
network of `tljax.models.progressive` for tasks 0..K; its loss is the cross-entropy of task K's
head on task K's training split. Tasks 0..K-1 come from the previous run's checkpoint through the
`transfer` block (configs/progressive.py copies and freezes ``column_0 .. column_<K-1>``), so the
earlier tasks' outputs stay bit-identical while task K learns. Every run evaluates every task so
far (``<task>_test/accuracy``), which shows what transfers and what is forgotten.

``progressive.mode``: ``progressive`` (lateral adapters), ``independent`` (a new column without
adapters per task) or ``finetune`` (one trunk fine-tuned on each task in turn, one head per task).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from tljax import data, ops
from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.data.subsets import class_subset
from tljax.methods import Method, image_model_fns, task_classification_sums
from tljax.models.progressive import MODES, ProgressiveNet, param_growth_table
from tljax.validate import Expectations

TASK_FIELDS = {"dataset", "classes"}


def sequence_specs(
    config: ml_collections.ConfigDict,
) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(name, spec) of tasks 0..K of the sequence, K = progressive.task.

    Raises:
      ValueError: the task index is outside the sequence, a task is not described in
        config.tasks, or a task description has an unknown field.
    """
    sequence = tuple(config.progressive.sequence)
    task = config.progressive.task
    if not 0 <= task < len(sequence):
        raise ValueError(
            f"progressive.task={task} is outside the sequence {sequence} (0..{len(sequence) - 1})."
        )
    specs = []
    for name in sequence[: task + 1]:
        if name not in config.tasks:
            raise ValueError(f"Task {name!r} of progressive.sequence is not in config.tasks.")
        spec = config.tasks[name]
        unknown = set(spec.keys()) - TASK_FIELDS
        if unknown:
            raise ValueError(
                f"Unknown field(s) {sorted(unknown)} in tasks.{name}; use {TASK_FIELDS}."
            )
        specs.append((name, spec))
    return specs


def load_task(spec, split: str, data_dir) -> dict[str, np.ndarray]:
    """One task's split, restricted to its classes (relabelled 0..n-1)."""
    arrays = data.load_split(spec.dataset, split, data_dir)
    return class_subset(arrays, spec.classes) if spec.get("classes") else arrays


def make_model(config: ml_collections.ConfigDict, task_classes: tuple[int, ...]) -> ProgressiveNet:
    """The network for tasks 0..K with these class counts (`config.model`, `config.progressive`)."""
    mode = config.progressive.mode
    if mode not in MODES:
        raise ValueError(f"Unknown progressive.mode {mode!r}; use one of {MODES}.")
    conv_ops = ops.conv_from_config(config.model)
    return ProgressiveNet(
        task_classes=task_classes,
        mode=mode,
        conv_widths=tuple(config.model.conv_widths),
        dense_widths=tuple(config.model.dense_widths),
        reduction=config.progressive.adapter_reduction,
        alpha_init=config.progressive.get("adapter_alpha_init", 0.1),
        conv=conv_ops.conv,
        pool=conv_ops.pool,
        dtype=jnp.dtype(config.model.dtype),
    )


def build(config: ml_collections.ConfigDict) -> Method:
    """Trains task `progressive.task` of the sequence; evaluates every task so far.

    Args:
      config: experiment config with `tasks`, `progressive`, `data`, `model` and `train` blocks.

    Returns:
      The `Method`.
    """
    specs = sequence_specs(config)
    current = len(specs) - 1
    train_arrays = load_task(specs[current][1], config.data.train_split, config.data.data_dir)
    eval_arrays = {
        name: load_task(spec, config.data.eval_split, config.data.data_dir) for name, spec in specs
    }
    task_classes = tuple(
        len(spec.classes) if spec.get("classes") else int(eval_arrays[name]["label"].max()) + 1
        for name, spec in specs
    )
    model = make_model(config, task_classes)
    preprocess, init_params = image_model_fns(model, config.model)

    logging.info(
        "Progressive network (%s) for tasks %s; parameters per column:\n%s",
        config.progressive.mode,
        [name for name, _ in specs],
        param_growth_table(jax.eval_shape(init_params, jax.random.key(0))),
    )

    def loss_fn(params, batch, rng, step):
        del rng, step
        logits = model.apply({"params": params}, preprocess(batch["train_image"]))[current]
        labels = batch["train_label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"class_loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}

    def eval_fn(params, batch):
        # One eval function serves every task's test set; each example's `task` picks its head.
        outputs = model.apply({"params": params}, preprocess(batch["image"]))
        return task_classification_sums(outputs, batch["label"], batch["task"], batch["mask"])

    eval_sets = {
        f"{name}_test": {**eval_arrays[name], "task": np.full(len(eval_arrays[name]["label"]), k)}
        for k, (name, _) in enumerate(specs)
    }
    train = Stream("train", train_arrays, config.train.batch_size)
    expects = Expectations(
        image_size=tuple(config.model.image_size),
        channels=config.model.channels,
        num_classes={
            "train": task_classes[current],
            **{f"{name}_test": task_classes[k] for k, (name, _) in enumerate(specs)},
        },
    )
    classifier = Classifier("class_loss", "accuracy", task_classes[current])
    return Method(
        init_params,
        loss_fn,
        eval_fn,
        (train,),
        eval_sets,
        expects=expects,
        classifiers=(classifier,),
    )
