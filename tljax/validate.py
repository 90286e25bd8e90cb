"""Checks of a run's input before any compile or training work: config values, splits, files.

Bad input fails with one line that names the config field, split or file and what was
expected, raised as an `InputError` (a ``ValueError``): `ConfigError` for config values,
`DataError` for splits and files. ``launch.py`` prints such an error as that one line and exits
with status 2 (`tljax.cli.EXIT_BAD_INPUT`); every other exception keeps its traceback, since it
is a bug rather than a mistake in the input.

The trainer calls `check_config` first (before any data is loaded) and `check_method_inputs`
right after ``methods.build`` (before the first compile); ``tljax.data.load_split`` runs
`checked_split` on every split it returns. This module imports neither JAX nor TensorFlow, so
``launch.py`` can run the config checks before those load.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import weakref
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# What the trainer reads from every config: (block, field) -> the smallest allowed value.
# steps may be 0 here: closed-form methods train nothing (see `Expectations.trains`).
_INT_MINIMUMS = {
    ("train", "batch_size"): 1,
    ("train", "log_every"): 1,
    ("eval", "every"): 1,
    ("eval", "batch_size"): 1,
    ("checkpoint", "every"): 1,
    ("train", "steps"): 0,
}


class InputError(ValueError):
    """The run's input (config, flags, data, files) cannot work; the message says why."""


class ConfigError(InputError):
    """A config value or flag that cannot work; the message names the field."""


class DataError(InputError):
    """A split or file that does not hold what the run needs; the message names it."""


@dataclasses.dataclass(frozen=True)
class Expectations:
    """What a method's training streams and eval sets must hold (``Method.expects``).

    Attributes:
      image_size: (H, W) of every ``image`` array; None accepts any size (the method resizes
        images, or sizes its model from the data).
      channels: channels the model turns images into; images may have 1 (repeated) or this
        many (`tljax.data.preprocess.to_float_images`). None accepts any number.
      num_classes: stream or eval set name -> how many classes its labels index, so every
        label must lie in [0, n). A labelled set not named here only needs labels >= 0.
      trains: False for a closed-form method, whose run must have train.steps=0; otherwise a
        run needs train.steps >= 1.
    """

    image_size: tuple[int, int] | None = None
    channels: int | None = None
    num_classes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    trains: bool = True


# ----------------------------------------------------------------- config ----


def check_config(config) -> None:
    """Checks the config values every run needs, before any data is loaded.

    Args:
      config: an experiment config (see configs/).

    Raises:
      ConfigError: a missing or mistyped field, a step count, batch size or interval that is
        not positive (train.steps may be 0 for closed-form methods), or a ``data.data_dir``
        that does not exist.
    """
    _check_int("seed", _field(config, "seed"), minimum=None)
    for (block, name), minimum in _INT_MINIMUMS.items():
        _check_int(f"{block}.{name}", _field(config, block, name), minimum)
    _check_positive_number(_field(config, "train", "log_every_secs"), "train.log_every_secs")
    data = config.get("data")
    data_dir = data.get("data_dir") if data is not None else None
    if data_dir is not None:
        _check_data_dir(os.fspath(data_dir))


def _field(config, *path: str) -> Any:
    value = config
    for depth, name in enumerate(path):
        if name not in value:
            parent = ".".join(path[:depth]) or "the config"
            raise ConfigError(
                with_suggestion(
                    f"{'.'.join(path)} is missing: {parent} has no field {name!r}",
                    name,
                    value.keys(),
                )
            )
        value = value[name]
    return value


def _check_int(name: str, value, minimum: int | None) -> None:
    # bool is an int subclass, but True steps or batch sizes are always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}={value!r} must be an integer, got {type(value).__name__}.")
    if minimum is not None and value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{name}={value} must be {bound}.")


def _check_positive_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ConfigError(f"{name}={value!r} must be a number, got {type(value).__name__}.")
    if not value > 0:
        raise ConfigError(f"{name}={value} must be positive.")


def _check_data_dir(data_dir: str) -> None:
    # tfds would create a missing directory and download into it, so a typo in the path
    # silently fills a new tree instead of reading the prepared one.
    if "://" in data_dir:  # A bucket (gs://...): tfds reads it; nothing local to check.
        return
    if not os.path.exists(data_dir):
        raise ConfigError(
            f"data.data_dir={data_dir!r} does not exist: expected a directory of exported "
            "splits or a tfds data directory (create it first if tfds should prepare datasets "
            "there, or leave data_dir unset for tfds's default)."
        )
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data.data_dir={data_dir!r} is a file, not a directory.")


def check_steps(steps: int, expects: Expectations) -> None:
    """Checks train.steps against what the method trains.

    Args:
      steps: ``config.train.steps`` (already known to be an integer >= 0).
      expects: the method's expectations.

    Raises:
      ConfigError: a trainable method with no steps, or a closed-form one with some.
    """
    if expects.trains and steps < 1:
        raise ConfigError(
            f"train.steps={steps} must be positive: this method trains its model (with 0 steps "
            "the run would evaluate untrained weights)."
        )
    if not expects.trains and steps != 0:
        raise ConfigError(f"train.steps={steps}: this method is closed form; set train.steps=0.")


# ------------------------------------------------------------------ data ----


def checked_split(arrays: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The split itself, once it is known to be a non-empty set of labelled images.

    Args:
      arrays: ``{"image": (N, H, W, C), "label": (N,)}`` as a loader returns them.
      where: the split's name for messages, e.g. its file or tfds name and split.

    Returns:
      ``arrays`` as a dict (the same arrays).

    Raises:
      DataError: a missing key, an empty split, images that are not (N, H, W, C) uint8 or
        floats, labels that are not (N,) integers.
    """
    missing = [key for key in ("image", "label") if key not in arrays]
    if missing:
        raise DataError(f"{where} lacks {missing}: expected 'image' and 'label' arrays.")
    _check_images(arrays["image"], where)
    _check_labels(arrays["label"], where, len(arrays["image"]), None)
    if not len(arrays["label"]):
        raise DataError(f"{where} is empty: expected at least one example.")
    for array in arrays.values():
        _remember_origin(array, where)
    return dict(arrays)


# id(array) -> (weak reference, where it was loaded from): lets a later message about a
# stream or eval set name the file behind it, as long as the method kept the loaded arrays.
_ORIGINS: dict[int, tuple[weakref.ref, str]] = {}


def _remember_origin(array: np.ndarray, where: str) -> None:
    key = id(array)
    # The callback runs as the array is freed, before its id can be reused.
    _ORIGINS[key] = (weakref.ref(array, lambda _: _ORIGINS.pop(key, None)), where)


def _origin(arrays: Mapping[str, Any]) -> str | None:
    """Where the first of ``arrays`` that came straight from a loaded split was read."""
    for array in arrays.values():
        entry = _ORIGINS.get(id(array))
        if entry is not None and entry[0]() is array:
            return entry[1]
    return None


def check_method_inputs(config, method) -> None:
    """Checks a built method's training streams and eval sets against its model and config.

    Called by the trainer right after ``methods.build``: the splits are loaded, nothing is
    compiled yet.

    Args:
      config: the experiment config.
      method: the `tljax.methods.Method` built from it; its ``expects`` (or, when None, the
        config's ``model.image_size``, ``model.channels`` and ``model.num_classes``) say what
        the images and labels must be.

    Raises:
      ConfigError: train.steps does not fit the method (see `check_steps`).
      DataError: an empty stream or eval set, images of another size or of channels the model
        cannot take, non-integer labels, or labels outside [0, number of classes).
    """
    expects, classes_field = _expectations(config, method)
    check_steps(config.train.steps, expects)
    for stream in method.train_streams:
        arrays = {key: stream.arrays[key] for key in stream.keys if key in stream.arrays}
        absent = sorted(set(stream.keys) - set(arrays))
        if absent:
            raise DataError(f"Training stream {stream.name!r} lacks {absent}.")
        _check_set(f"Training stream {stream.name!r}", arrays, stream.name, expects, classes_field)
    for name, arrays in method.eval_sets.items():
        _check_set(f"Eval set {name!r}", arrays, name, expects, classes_field)


def _expectations(config, method) -> tuple[Expectations, str | None]:
    """The method's own expectations, or those its config's model block describes."""
    if method.expects is not None:
        return method.expects, None
    model = config.get("model") or {}
    image_size = model.get("image_size")
    num_classes = model.get("num_classes")
    labelled = [s.name for s in method.train_streams if "label" in s.keys]
    labelled += [name for name, arrays in method.eval_sets.items() if "label" in arrays]
    expects = Expectations(
        image_size=tuple(image_size) if image_size is not None else None,
        channels=model.get("channels"),
        num_classes={name: num_classes for name in labelled} if num_classes else {},
    )
    return expects, "model.num_classes" if num_classes else None


def _check_set(where: str, arrays, name: str, expects: Expectations, classes_field) -> None:
    origin = _origin(arrays)
    if origin is not None:
        where = f"{where} ({origin})"
    sizes = {key: len(value) for key, value in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"{where} has arrays of different lengths: {sizes}.")
    if not any(sizes.values()):
        raise DataError(f"{where} is empty: expected at least one example.")
    if "image" in arrays:
        _check_images(arrays["image"], where)
        _check_image_layout(arrays["image"], where, expects)
    if "label" in arrays:
        num_classes = expects.num_classes.get(name)
        bound = None if num_classes is None else (num_classes, classes_field)
        _check_labels(arrays["label"], where, len(arrays["label"]), bound)


def _check_images(images, where: str) -> None:
    images = np.asarray(images) if not hasattr(images, "dtype") else images
    if images.ndim != 4:
        raise DataError(
            f"{where}: images of shape {tuple(images.shape)}; expected (N, height, width, "
            "channels)."
        )
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{where}: images of dtype {images.dtype}; expected uint8 or floats.")


def _check_image_layout(images, where: str, expects: Expectations) -> None:
    height, width, channels = images.shape[1:]
    if expects.image_size is not None and (height, width) != tuple(expects.image_size):
        want = "x".join(str(size) for size in expects.image_size)
        raise DataError(
            f"{where}: images are {height}x{width}, expected {want} (model.image_size); resize "
            "the data or set model.image_size."
        )
    if expects.channels is not None and channels not in (1, expects.channels):
        raise DataError(
            f"{where}: images have {channels} channels; the model takes {expects.channels} "
            f"(model.channels), from images of 1 or {expects.channels} channels."
        )


def _check_labels(labels, where: str, count: int, bound: tuple[int, str | None] | None) -> None:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(
            f"{where}: labels of shape {labels.shape} for {count} examples; expected ({count},)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels of dtype {labels.dtype}; expected integers.")
    if not len(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(
            f"{where}: label {low} is negative; expected class indices 0, 1, ...; "
            f"{int((labels < 0).sum())} of {len(labels)} labels are negative."
        )
    if bound is not None and high >= bound[0]:
        num_classes, field = bound
        named = f" ({field}={num_classes})" if field else ""
        raise DataError(
            f"{where}: label {high} is outside [0, {num_classes}) for {num_classes} "
            f"classes{named}; {int((labels >= num_classes).sum())} of {len(labels)} labels are "
            "out of range."
        )


# ----------------------------------------------------------------- files ----


def read_state_dict(path: str, field: str = "transfer.init_from") -> dict[str, np.ndarray]:
    """A PyTorch ``state_dict`` file's tensors, or an error naming the file when it is not one.

    Args:
      path: a ``.safetensors`` or ``.npz`` file.
      field: the config field that named the file (for messages).

    Returns:
      Tensor name -> array (at least one, all numeric).

    Raises:
      FileNotFoundError: no file at ``path``.
      DataError: the file cannot be read as its format, or holds no numeric tensors.
    """
    from tljax.models import torch_convert

    expected = (
        "expected a PyTorch state_dict (torchvision ResNet or VGG, timm ConvNeXt or ViT) or a "
        "big_vision ViT's params, saved with safetensors.torch.save_file (.safetensors) or "
        "numpy.savez (.npz); BUILD.md's 'Pretrained' sections show how, by model family"
    )
    where = f"{field}={os.fspath(path)!r}"
    # numpy reads any other file as a pickle and then advises loading it unsafely.
    if str(path).endswith(".npz") and os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise DataError(f"{where} is not an .npz (zip) archive: {expected}.")
    try:
        tensors = torch_convert.load_state_dict(path)
    except FileNotFoundError:
        raise
    # Unreadable files fail inside numpy, zipfile or safetensors' Rust code, with messages
    # that do not name the file; any failure to parse is reported as a bad file.
    except Exception as error:  # noqa: BLE001
        raise DataError(f"{where} cannot be read ({_first_line(error)}): {expected}.") from error
    if not tensors:
        raise DataError(f"{where} holds no tensors: {expected}.")
    odd = sorted(name for name, value in tensors.items() if not _is_numeric(value))
    if odd:
        raise DataError(f"{where}: {odd[:3]} are not numeric tensors: {expected}.")
    return tensors


def _is_numeric(value) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and (np.issubdtype(dtype, np.number) or dtype == np.bool_)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def with_suggestion(message: str, name: str, choices: Iterable[str]) -> str:
    """``message`` ended by the choices closest to ``name``: "...; did you mean 'x'?" or ".".

    Args:
      message: what is wrong, without a final full stop.
      name: the unknown name that was given.
      choices: the names that exist.

    Returns:
      The finished message.
    """
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=3)
    if not close:
        return f"{message}."
    return f"{message}; did you mean {' or '.join(repr(c) for c in close)}?"
