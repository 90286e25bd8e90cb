"""tljax's data layer: splits from tfds, exported NumPy files or image folders.

A ``folder:<path>`` name reads a folder of class folders of images (`tljax.data.folders`),
streamed from the files by worker processes when it is large or augmented.
``load_split`` reads ``<data_dir>/<name>/<split>.npz`` when ``python -m tljax.data.export`` has
written it there (see ``tljax.data.exported``), and otherwise asks tfds, registering tljax's tfds
builders ``mnist_m`` and ``embedded_digits`` (configs ``mnist``, ``mnist_m``, ``optdigits`` and
``syn_digits``: offline digit domains built from installed packages). TensorFlow is
imported only for a tfds load, so the models, the train step, the input pipeline and runs on
exported splits also work where it is not installed (an accelerator image).
"""

from __future__ import annotations

import importlib

import numpy as np

from tljax import validate
from tljax.data import exported, folders

__all__ = ["DatasetUnavailableError", "blend_mnist_m", "load_split"]


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be found, downloaded or prepared."""


def load_split(name: str, split: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Loads one split fully into memory: its export in ``data_dir`` if there is one, else tfds.

    Repeated calls with the same arguments in one process return the cached arrays; they are
    read-only, so copy them before modifying.

    Args:
      name: tfds name, e.g. ``"mnist"``, ``"mnist_m"`` or ``"embedded_digits/mnist_m"``, or
        ``"folder:<path>"`` (read with the options of `tljax.data.folders.reading`).
      split: tfds split spec, e.g. ``"train"`` or ``"test[:10%]"``; 'train', 'test' or 'all'
        for a folder.
      data_dir: a directory of exported splits (``python -m tljax.data.export``) or a tfds data
        directory; None means tfds's default (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).

    Returns:
      ``{"image": uint8 (N, H, W, C), "label": int32 (N,)}``; a streamed folder's images (or
      array_record split's, `tljax.data.records`) are a `tljax.data.folders.FolderImages`
      standing for that array.

    Raises:
      DatasetUnavailableError: if the split is not exported in ``data_dir`` and tfds does not
        know the dataset, cannot prepare it here, or is not installed.
      tljax.validate.DataError: the split is empty or is not labelled (N, H, W, C) images.
    """
    if folders.is_folder(name):
        return validate.checked_split(
            folders.load(name, split), f"Dataset '{name}' split '{split}'"
        )
    if data_dir is not None:
        arrays = exported.load_saved_split(data_dir, name, split)
        if arrays is not None:
            return validate.checked_split(arrays, exported.split_file(data_dir, name, split))
    try:
        loading = importlib.import_module("tljax.data.loading")
    except ModuleNotFoundError as err:
        exports = (
            f"it is not exported in {data_dir}"
            if data_dir is not None
            else "no data_dir of exported splits was given"
        )
        raise DatasetUnavailableError(
            f"Dataset '{name}' split '{split}' cannot be loaded: {exports}, and tfds cannot: "
            f"{err.name} is not installed. Export it where tfds works with "
            "`python -m tljax.data.export --config=<your config> --out=DIR`, copy DIR here and "
            "pass it as config.data.data_dir."
        ) from err
    # Prepared as array_record, a split is read from its records (streamed when large).
    arrays = importlib.import_module("tljax.data.records").load(name, split, data_dir)
    if arrays is None:
        arrays = loading.load_split(name, split, data_dir)
    return validate.checked_split(arrays, f"Dataset '{name}' split '{split}'")


def __getattr__(name: str):
    if name == "blend_mnist_m":
        return importlib.import_module("tljax.data.mnist_m").blend_mnist_m
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
