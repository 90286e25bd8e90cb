"""AdaBN: a trained network's BatchNorm statistics recomputed on the images of another domain.

  python -m tljax.adabn --workdir=runs/source --data=embedded_digits/mnist_m [--split=train] \\
      [--step=N] [--out=DIR] [--data_dir=DIR] [--batch_size=256]

Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation" (AdaBN, ICLR
workshop 2017, arXiv:1603.04779): a network trained on the source domain adapts to a target
domain by replacing every BatchNorm layer's source statistics with the target's, with no
training and no target labels. Reference implementation: KaiyangZhou/Dassl.pytorch
``dassl/engine/da/adabn.py`` (reset the running statistics, forward the target images in
training mode). Here each layer gets the *exact* mean and unbiased variance of its inputs over
all the given images, layer by layer in forward order, each layer's inputs computed with the
earlier layers' new statistics: what PyTorch's cumulative pass (``momentum=None``) estimates
from per-batch statistics, without the per-batch noise. It costs one pass over the images per
BatchNorm layer (20 for ResNet-18, 53 for ResNet-50), all with one compiled program.

The run at ``--workdir`` must be a classifier run whose network has BatchNorm running statistics
(``model.norm='batch'``, `tljax.models.batch_norm`): train the source model with
``method='classifier'`` (configs/pretrain.py or configs/finetune.py) and ``model.norm='batch'``.
Its recorded ``config.json`` rebuilds the network and its newest checkpoint (or ``--step``'s)
gives the params, as ``transfer.init_from`` reads them (`tljax.transfer.load_pretrained`).
``--data`` is any dataset name `tljax.data.load_split` reads (``folder:<path>`` included, at the
run's image size and with its ``data.folder`` options); its labels are used only to report the
accuracy before and after.

The result is a checkpoint in ``--out`` (default ``<workdir>/adabn/<data>_<split>``), in the
trainer's layout (``checkpoints/<step>/`` with an integrity record), holding the params with the
new statistics: fine-tune or evaluate from it with ``transfer.init_from=<out>`` and
``model.norm='batch'``. ``<out>/adabn.json`` records where it came from; one summary line is
printed. Bad input ends with one ``Error: ...`` line and exit status 2 (`tljax.cli`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from tljax import cli, validate

Params = Any
SUMMARY_FILE = "adabn.json"


# -------------------------------------------------------------- statistics ----


def batch_norm_layers(apply_fn: Callable[[Params, Any], Any], params: Params, example) -> list[str]:
    """Paths of the BatchNorm layers ``apply_fn`` calls, in the order it first calls them.

    Args:
      apply_fn: (params, images) -> outputs, running a Flax network.
      params: its params (arrays or shapes).
      example: a batch of images (array or ``ShapeDtypeStruct``); traced only.

    Returns:
      Layer paths such as ``stage1/block0/norm1``.
    """
    import flax.linen as nn
    import jax

    from tljax.models.batch_norm import BatchNorm

    called: list[str] = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
            called.append("/".join(context.module.scope.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        # A fresh wrapper: eval_shape caches traces by function, and a cached trace would not
        # run the calls this records.
        jax.eval_shape(lambda p, x: apply_fn(p, x), params, example)
    return list(dict.fromkeys(called))


def _moments_fn(apply_fn: Callable[[Params, Any], Any], layers: Sequence[str]):
    """Jitted (params, images, mask) -> {layer: (count, mean, M2)} of each BatchNorm's inputs.

    M2 is the sum of squared deviations from the batch mean, per channel; masked rows (padding)
    count for nothing.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from tljax.models.batch_norm import BatchNorm

    wanted = set(layers)

    def moments(params, images, mask):
        inputs: dict[str, list] = {}

        def capture(next_fun, args, kwargs, context):
            if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
                path = "/".join(context.module.scope.path)
                if path in wanted:
                    inputs.setdefault(path, []).append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            apply_fn(params, images)
        # Every call of a layer counts (a network may run one BatchNorm on several inputs):
        # its inputs, flattened to [positions, C], with each position's mask weight.
        out = {}
        for path in layers:
            rows, weights = [], []
            for x in inputs[path]:
                per_row = x.size // (x.shape[0] * x.shape[-1])
                rows.append(x.astype(jnp.float32).reshape(-1, x.shape[-1]))
                weights.append(jnp.repeat(mask, per_row)[:, None])
            x, w = jnp.concatenate(rows), jnp.concatenate(weights)
            count = jnp.sum(w)
            mean = jnp.sum(x * w, axis=0) / jnp.maximum(count, 1.0)
            out[path] = (count, mean, jnp.sum(jnp.square(x - mean) * w, axis=0))
        return out

    return jax.jit(moments)


def _combine(a, b):
    """Chan et al.'s parallel update of (count, mean, M2) per channel, in float64."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    if n == 0:
        return a
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + np.square(delta) * (n_a * n_b / n)


def _batches(images, batch_size: int):
    """(uint8 batch padded to ``batch_size`` rows, [batch_size] mask of real rows) pairs."""
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size])
        real = len(batch)
        if real < batch_size:
            # Padded to the others' shape so the program compiles once; the mask drops it.
            pad = np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        mask = np.zeros(batch_size, np.float32)
        mask[:real] = 1.0
        yield batch, mask


def recompute_statistics(
    apply_fn: Callable[[Params, Any], Any], params: Params, images, batch_size: int
) -> Params:
    """Every BatchNorm's running statistics replaced by those of its inputs on ``images``.

    Layer by layer in forward order: layer k's inputs are computed with the new statistics of
    layers 0..k-1, and it gets their exact mean and unbiased variance over all images (and all
    positions), per channel. One pass over ``images`` per layer.

    Args:
      apply_fn: (params, images) -> outputs: the network with ``train=False`` BatchNorm (it
        normalises with the running statistics, so each image's output is its own); e.g.
        ``lambda p, x: model.apply({"params": p}, preprocess(x))`` with the evaluation network.
        Its BatchNorm layers must not run inside Flax lifted transforms (``nn.scan``, ...).
      params: the network's params (nested dicts) with ``running_mean`` / ``running_var``.
      images: [N, ...] images as ``apply_fn`` takes them (NumPy, or anything sliced into NumPy
        batches, such as `tljax.data.folders.FolderImages`).
      batch_size: images per forward pass.

    Returns:
      The params (host NumPy arrays) with every BatchNorm's statistics recomputed; the other
      leaves are unchanged.

    Raises:
      ValueError: no images, ``batch_size`` below 1, or a network without BatchNorm layers.
    """
    import jax
    from flax import traverse_util

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if len(images) == 0:
        raise ValueError("AdaBN needs at least one image.")
    batch_size = min(batch_size, len(images))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    dtype = np.asarray(images[:1]).dtype
    example = jax.ShapeDtypeStruct((batch_size, *np.shape(images)[1:]), dtype)
    layers = batch_norm_layers(apply_fn, params, example)
    if not layers:
        raise ValueError(
            "The network has no BatchNorm layer with running statistics (model.norm='batch')."
        )
    moments = _moments_fn(apply_fn, layers)
    for layer in layers:
        channels = flat[f"{layer}/running_mean"].shape
        total = (0.0, np.zeros(channels), np.zeros(channels))
        current = jax.device_put(traverse_util.unflatten_dict(flat, sep="/"))
        for batch, mask in _batches(images, batch_size):
            count, mean, m2 = jax.device_get(moments(current, batch, mask)[layer])
            total = _combine(total, (float(count), np.float64(mean), np.float64(m2)))
        count, mean, m2 = total
        for name, value in (("running_mean", mean), ("running_var", m2 / max(count - 1.0, 1.0))):
            leaf = flat[f"{layer}/{name}"]
            flat[f"{layer}/{name}"] = value.astype(leaf.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


# --------------------------------------------------------------------- run ----


def load_run(workdir: str, step: int | None = None) -> tuple[Any, str, int, Params]:
    """The recorded config, checkpoint directory, step and params of a run with BatchNorm.

    Args:
      workdir: the run's workdir.
      step: a checkpoint step; None: the newest.

    Returns:
      (config, checkpoints directory, step, params as host arrays).

    Raises:
      tljax.validate.DataError: not a run's workdir, no such checkpoint, or params that are
        not the network's.
      tljax.validate.ConfigError: the run's network has no BatchNorm running statistics.
    """
    import ml_collections

    from tljax import checkpoints, transfer
    from tljax import workdir as workdirs
    from tljax.models.classifiers import batch_norm_mode

    if not os.path.isdir(workdir):
        raise validate.DataError(f"--workdir={workdir} is not a directory; expected a run's.")
    recorded, _ = workdirs.recorded_config(workdir)
    if recorded is None:
        raise validate.DataError(f"--workdir={workdir} has no config.json: not a tljax run.")
    config = ml_collections.ConfigDict(recorded)
    model = config.get("model") or {}
    if config.get("method") != "classifier" or batch_norm_mode(model) is None:
        raise validate.ConfigError(
            f"--workdir={workdir} is a {config.get('method')!r} run of model "
            f"{model.get('name', 'digits')!r} with model.norm={model.get('norm', 'affine')!r}; "
            "AdaBN needs a classifier run of a ResNet with model.norm='batch' (BatchNorm with "
            "running statistics)."
        )
    try:
        directory, found = transfer.checkpoint_directory(workdir)
    except FileNotFoundError:
        raise validate.DataError(
            f"--workdir={workdir} holds no checkpoint (checkpoints/<step>/): has the run finished?"
        ) from None
    if step is not None:
        steps = sorted(checkpoints.step_directories(directory))
        if step not in steps:
            raise validate.DataError(f"--step={step}: {directory} holds steps {steps}.")
        found = step
    params = transfer.load_pretrained(os.path.join(directory, str(found)))
    return config, directory, found, params


def _check_params(params: Params, shapes: Params, workdir: str) -> None:
    from flax import traverse_util

    found = traverse_util.flatten_dict(params, sep="/")
    wanted = traverse_util.flatten_dict(shapes, sep="/")
    differing = sorted(
        path
        for path in found.keys() | wanted.keys()
        if path not in found or path not in wanted or found[path].shape != wanted[path].shape
    )
    if differing:
        raise validate.DataError(
            f"--workdir={workdir}: its checkpoint does not hold the params of the network its "
            f"config.json describes ({len(differing)} arrays differ, e.g. {differing[0]})."
        )


def _accuracy(forward, params, images, labels, batch_size: int) -> float:
    """Accuracy of the network's argmax on labelled images."""
    import jax

    batch_size = min(batch_size, len(images))
    correct = 0
    for (batch, mask), start in zip(
        _batches(images, batch_size), range(0, len(images), batch_size), strict=True
    ):
        logits = np.asarray(jax.device_get(forward(params, batch)))
        real = int(mask.sum())
        correct += int(np.sum(logits[:real].argmax(-1) == labels[start : start + real]))
    return correct / len(labels)


def default_out(workdir: str, data_name: str, split: str) -> str:
    """``<workdir>/adabn/<data>_<split>``, the name made of letters, digits, ``._-``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{data_name}_{split}").strip("_")
    return os.path.join(workdir, "adabn", slug)


def write_checkpoint(out: str, step: int, params: Params) -> str:
    """Saves ``{"params": params}`` as ``<out>/checkpoints/<step>`` (with integrity record).

    Args:
      out: the output directory (``transfer.init_from`` reads it).
      step: the step to file it under (the source checkpoint's).
      params: host params.

    Returns:
      The checkpoints directory.

    Raises:
      tljax.validate.ConfigError: ``out`` already holds a checkpoint.
    """
    import orbax.checkpoint as ocp

    from tljax import checkpoints

    directory = os.path.join(os.path.abspath(out), "checkpoints")
    if checkpoints.step_directories(directory):
        raise validate.ConfigError(
            f"--out={out} already holds checkpoints ({directory}); remove them or choose "
            "another --out."
        )
    options = ocp.CheckpointManagerOptions(create=True)
    with checkpoints.CheckpointManager(directory, options=options) as manager:
        manager.save(step, args=ocp.args.StandardSave({"params": params}))
        manager.wait_until_finished()
    return directory


def adapt(
    workdir: str,
    data_name: str,
    split: str = "train",
    out: str | None = None,
    step: int | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """AdaBN of the run at ``workdir`` on a dataset's split; writes the adapted checkpoint.

    Args:
      workdir: a classifier run with ``model.norm='batch'``.
      data_name: dataset name (`tljax.data.load_split`).
      split: its split.
      out: output directory (default `default_out`).
      step: source checkpoint step (default: the newest).
      data_dir: exported splits or tfds directory (default: the run's ``data.data_dir``).
      batch_size: images per forward pass.

    Returns:
      The summary also written to ``<out>/adabn.json``: workdir, step, data, split, images,
      layers, accuracy_before / accuracy_after (None without usable labels), out, checkpoint.

    Raises:
      tljax.validate.InputError: see `load_run`, `write_checkpoint`; a split that cannot be
        loaded or images the network does not take.
    """
    import jax

    from tljax import data
    from tljax.data import folders
    from tljax.methods import image_model_fns
    from tljax.models import make_classifier

    config, _, found, params = load_run(workdir, step)
    model = make_classifier(config.model, for_eval=True)
    preprocess, init_params = image_model_fns(model, config.model)
    _check_params(params, jax.eval_shape(init_params, jax.random.key(0)), workdir)
    if data_dir is None:
        data_dir = (config.get("data") or {}).get("data_dir")
    try:
        with folders.reading(folders.FolderOptions.from_config(config)):
            arrays = data.load_split(data_name, split, data_dir)
    except (data.DatasetUnavailableError, ValueError) as error:
        raise validate.DataError(f"--data={data_name} split {split!r}: {error}") from None
    # Decoded once: AdaBN runs over the images once per BatchNorm layer.
    images, labels = np.asarray(arrays["image"]), np.asarray(arrays["label"])
    _check_images(config.model, images, data_name)

    def apply_fn(p, x):
        return model.apply({"params": p}, preprocess(x))

    forward = jax.jit(apply_fn)
    # Labels of the network's own classes only report how the accuracy moves; others (another
    # label space) are ignored.
    labelled = bool(labels.min() >= 0 and labels.max() < config.model.num_classes)
    before = _accuracy(forward, params, images, labels, batch_size) if labelled else None
    adapted = recompute_statistics(apply_fn, params, images, batch_size)
    after = _accuracy(forward, adapted, images, labels, batch_size) if labelled else None
    out = out or default_out(workdir, data_name, split)
    directory = write_checkpoint(out, found, adapted)
    layers = batch_norm_layers(apply_fn, params, images[:1])
    summary = dict(
        workdir=os.path.abspath(workdir),
        step=found,
        data=data_name,
        split=split,
        images=len(images),
        layers=len(layers),
        accuracy_before=before,
        accuracy_after=after,
        out=os.path.abspath(out),
        checkpoint=os.path.join(directory, str(found)),
    )
    with open(os.path.join(out, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _check_images(model_config, images: np.ndarray, data_name: str) -> None:
    height, width, channels = images.shape[1:]
    if (height, width) != tuple(model_config.image_size) or channels not in (
        1,
        model_config.channels,
    ):
        raise validate.DataError(
            f"--data={data_name}: images are {height}x{width}x{channels}; the run's network "
            f"takes {'x'.join(map(str, model_config.image_size))} images of 1 or "
            f"{model_config.channels} channels."
        )


def summary_line(summary: dict[str, Any]) -> str:
    """One line: what was adapted, on what, the accuracy before and after, where it went."""
    accuracy = ""
    if summary["accuracy_before"] is not None:
        accuracy = (
            f"; accuracy on them {summary['accuracy_before']:.4f} -> "
            f"{summary['accuracy_after']:.4f}"
        )
    return (
        f"AdaBN: {summary['layers']} BatchNorm layers of {summary['workdir']} (step "
        f"{summary['step']}) recomputed on {summary['images']} images of {summary['data']} "
        f"({summary['split']}){accuracy}; wrote {summary['checkpoint']} "
        f"(transfer.init_from={summary['out']})."
    )


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as the program."""
    flags.DEFINE_string("workdir", None, "Workdir of a classifier run with model.norm='batch'.")
    flags.DEFINE_string("data", None, "Dataset whose images give the new statistics.")
    flags.DEFINE_string("split", "train", "Its split.")
    flags.DEFINE_string("out", None, "Output directory (default <workdir>/adabn/<data>_<split>).")
    flags.DEFINE_integer("step", None, "Checkpoint step of the run (default: the newest).")
    flags.DEFINE_string("data_dir", None, "Exported splits or tfds directory (default: the run's).")
    flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if not args.workdir:
        raise validate.ConfigError("--workdir is required: a classifier run's workdir.")
    if not args.data:
        raise validate.ConfigError("--data is required: the dataset of the new domain.")
    if args.batch_size < 1:
        raise validate.ConfigError(f"--batch_size={args.batch_size} must be positive.")
    if args.verbosity < 1:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tljax import run_log

        run_log.quiet_library_logs()
    summary = adapt(
        args.workdir, args.data, args.split, args.out, args.step, args.data_dir, args.batch_size
    )
    print(summary_line(summary))


if __name__ == "__main__":
    define_flags()
    app.run(cli.exit_cleanly(main))
