"""One module per transfer-learning method.

A method module exposes `build(config) -> Method`. The trainer owns everything
else (optimizer, schedules, jit, sharding, checkpoints, logging), so adding a
method means adding a module here and a config, never touching the trainer.
"""

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.validate import Expectations

Params = Any
Metrics = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method contributes to a run.

    Attributes:
      init_params: rng -> params pytree (plain nested dicts).
      loss_fn: (params, batch, rng, step) -> (scalar loss, metrics dict of scalars).
      eval_fn: (params, batch) -> dict of per-batch *sums* over examples whose
        batch['mask'] is 1, including 'count'; the trainer divides by the count.
      train_streams: the training batch layout.
      eval_sets: name -> {'image', 'label'} arrays, evaluated every eval_every steps.
      summarize_eval: optional; the sums of `eval_fn` over a whole eval set (numpy) ->
        dict of float metrics. Default: every sum divided by 'count'. Needed for metrics
        that are not means over examples (e.g. per-class mean accuracy).
      anchored: whether ``loss_fn`` measures the params against the network the run
        started from (conservative penalties): the trainer then keeps that network in its
        state and calls ``loss_fn(params, batch, rng, step, anchor)`` with an `Anchor`, so the
        penalty reuses the loss's own forward pass.
      value_and_grad: optional replacement for ``jax.value_and_grad(loss_fn, has_aux=True)``,
        (params, batch, rng, step) -> ((loss, metrics), grads), for methods that shape the
        gradient itself (e.g. multi-task gradient surgery); the trainer still runs the
        optimizer. Not combined with ``anchored``.
      expects: what the streams' and eval sets' images and labels must be, checked before
        training (`tljax.validate.Expectations`: image size, channels, classes per set, whether
        the method trains at all). None: what the config's ``model`` block says (image_size,
        channels, and num_classes for every labelled set).
      classifiers: the classifiers the loss trains, by the train metrics that report their
        cross-entropy and accuracy (`tljax.collapse.Classifier`); the trainer's collapse
        monitor stops a run whose classifiers sit at chance level. Empty: nothing watched.
      predict_fn: optional (params, batch) -> dict of per-example outputs (e.g. 'features',
        'logits') over a batch of ``validation_sets``; with ``validate_fn`` it scores
        label-free validators at every evaluation.
      validation_sets: name -> arrays that ``predict_fn`` runs over (their labels, when they
        have any, are handed to ``validate_fn`` beside the outputs, never to the network).
      validate_fn: set name -> {output name -> numpy [N, ...] rows, plus 'label' where the set
        has labels} -> dict of float scores, reported as 'validator/<name>' with each
        evaluation (``eval.select_by`` keeps the checkpoint one of them ranks best).
    """

    init_params: Callable[..., Params]
    loss_fn: Callable[..., tuple[Any, Metrics]]
    eval_fn: Callable[..., Metrics]
    train_streams: tuple[Stream, ...]
    eval_sets: Mapping[str, Mapping[str, Any]]
    summarize_eval: Callable[[dict[str, Any]], dict[str, float]] | None = None
    anchored: bool = False
    value_and_grad: Callable[..., tuple[tuple[Any, Metrics], Params]] | None = None
    expects: Expectations | None = None
    classifiers: tuple[Classifier, ...] = ()
    predict_fn: Callable[..., Metrics] | None = None
    validation_sets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    validate_fn: Callable[[dict[str, dict[str, Any]]], dict[str, float]] | None = None

    def __post_init__(self):
        if self.anchored and self.value_and_grad is not None:
            raise ValueError("A method with its own value_and_grad cannot also be anchored.")


@dataclasses.dataclass(frozen=True)
class Anchor:
    """The network a run started from, for penalties that hold the params near it.

    Attributes:
      params: the params the run started from (pretrained values on transferred leaves).
      transferred: bool pytree of the params' structure: the leaves copied from the
        pretrained network (all False without a transfer).
    """

    params: Params
    transferred: Params


def classification_sums(logits, labels, mask) -> Metrics:
    """Eval sums of a classifier over one padded batch (see `Method.eval_fn`).

    Args:
      logits: [N, C] class logits.
      labels: [N] integer labels.
      mask: [N] 1.0 for real examples, 0.0 for padding.

    Returns:
      {'accuracy': correct count, 'loss': summed cross-entropy, 'count': real examples}.
    """
    import optax

    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "accuracy": ((logits.argmax(-1) == labels) * mask).sum(),
        "loss": (losses * mask).sum(),
        "count": mask.sum(),
    }


def task_classification_sums(task_logits, labels, task_ids, mask) -> Metrics:
    """Eval sums over a batch mixing several tasks' test sets: each row scored by its task's logits.

    Args:
      task_logits: one [N, C_t] logits array per task, all computed on the whole batch.
      labels: [N] labels, each in its own task's label space.
      task_ids: [N] index of each row's task in ``task_logits``.
      mask: [N] 1.0 for real examples, 0.0 for padding.

    Returns:
      Sums as `classification_sums` (accuracy, loss, count) over every row with its own task.
    """
    import jax.numpy as jnp

    total = None
    for index, logits in enumerate(task_logits):
        # Rows of other tasks may carry labels beyond this head; they are masked out anyway.
        in_range = jnp.minimum(labels, logits.shape[-1] - 1)
        sums = classification_sums(logits, in_range, mask * (task_ids == index))
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
    return total


def image_model_fns(model, model_config) -> tuple[Callable, Callable]:
    """The input preprocessing and params initialiser of an image model described by config.

    Args:
      model: a Flax module taking float NHWC images.
      model_config: the `model` config block (image_size, channels, dtype, optional normalize).

    Returns:
      (preprocess: uint8 images -> float images of the compute dtype, normalised as
      `model.normalize` says; init_params: rng -> params).
    """
    import jax.numpy as jnp

    from tljax.data.preprocess import normalize, to_float_images

    compute_dtype = jnp.dtype(model_config.dtype)
    normalization = model_config.get("normalize", "none")
    example = jnp.zeros((1, *model_config.image_size, model_config.channels), compute_dtype)

    def preprocess(images):
        images = to_float_images(images, model_config.channels, compute_dtype)
        return normalize(images, normalization)

    def init_params(rng):
        return model.init(rng, example)["params"]

    return preprocess, init_params


def mean_over_count(sums: dict[str, Any]) -> dict[str, float]:
    """The default eval summary: each sum divided by the example count.

    Args:
      sums: eval_fn outputs summed over an eval set, including 'count'.

    Returns:
      metric name -> mean over the set's examples.
    """
    count = float(sums["count"])
    return {key: float(value) / count for key, value in sums.items() if key != "count"}


def build(config) -> Method:
    """Builds the method named by `config.method` (a module of this package).

    Args:
      config: the experiment config.

    Returns:
      The method's `Method`.

    Raises:
      ValueError: if no module `tljax.methods.<config.method>` exists.
    """
    try:
        module = importlib.import_module(f"{__name__}.{config.method}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{config.method}":
            raise
        raise ValueError(
            f"Unknown method {config.method!r}: no module tljax/methods/{config.method}.py"
        ) from None
    return module.build(config)
