"""Splits saved as NumPy files, so that a run needs neither TensorFlow nor tfds to read them.

``python -m tljax.data.export`` writes every split a config loads to ``<dir>/<name>/<split>.npz``;
``tljax.data.load_split(name, split, data_dir=<dir>)`` then reads that file instead of asking
tfds. This is how a machine without TensorFlow (e.g. an accelerator image) trains on the same
data: export where tfds works, copy the directory, pass it as ``config.data.data_dir``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
import zipfile

import numpy as np

from tljax.validate import DataError

_KEYS = ("image", "label")


def split_file(root: str | os.PathLike, name: str, split: str) -> str:
    """Where the export of ``name``'s ``split`` lives under ``root``.

    Args:
      root: the export directory.
      name: tfds name, e.g. ``"embedded_digits/mnist_m"`` (its ``/`` makes a subdirectory).
      split: tfds split spec, e.g. ``"test[:10%]"`` (percent-encoded into a file name).

    Returns:
      The ``.npz`` path.
    """
    return os.path.join(
        os.fspath(root), *name.split("/"), urllib.parse.quote(split, safe="") + ".npz"
    )


def save_split(
    root: str | os.PathLike, name: str, split: str, arrays: dict[str, np.ndarray]
) -> str:
    """Writes one split's ``{"image", "label"}`` arrays to ``split_file(root, name, split)``.

    Args:
      root: the export directory (created if needed).
      name: tfds name.
      split: tfds split spec.
      arrays: as returned by ``tljax.data.load_split``.

    Returns:
      The path written.

    Raises:
      ValueError: ``root`` is a URL (e.g. ``gs://``).
    """
    if _is_url(root):  # os.makedirs would make a local "gs:" directory and report success.
        raise ValueError(f"Exports go to a local directory, got {root}; copy it afterwards.")
    path = split_file(root, name, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **{key: np.asarray(arrays[key]) for key in _KEYS})
    return path


def load_saved_split(
    root: str | os.PathLike, name: str, split: str
) -> dict[str, np.ndarray] | None:
    """The exported split, or None if ``root`` has no export of it.

    Like tfds loads, repeated calls return the same read-only arrays.

    Args:
      root: a directory that may hold exports.
      name: tfds name.
      split: tfds split spec.

    Returns:
      ``{"image": uint8 (N, H, W, C), "label": int32 (N,)}``, or None.

    Raises:
      tljax.validate.DataError: the file exists but does not hold a split (not an .npz,
        missing arrays, wrong dtypes).
    """
    if _is_url(root):  # e.g. a tfds data_dir in a bucket: exports are local files only.
        return None
    path = split_file(root, name, split)
    if not os.path.isfile(path):
        return None
    return dict(_read(path))


def _is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


@functools.lru_cache(maxsize=8)
def _read(path: str) -> dict[str, np.ndarray]:
    # numpy reads any other file as a pickle and then advises loading it unsafely.
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an exported split: it is not an .npz (zip) archive.")
    try:
        saved = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:  # numpy's message omits the path.
        raise DataError(
            f"{path} is not an exported split: numpy cannot read it ({error})."
        ) from None
    with saved:
        missing = [key for key in _KEYS if key not in saved.files]
        if missing:
            raise DataError(f"{path} is not an exported split: it lacks {missing}.")
        image, label = saved["image"], saved["label"]
    if image.dtype != np.uint8 or image.ndim != 4 or label.dtype != np.int32 or label.ndim != 1:
        raise DataError(
            f"{path} is not an exported split: expected uint8 (N, H, W, C) images and int32 (N,) "
            f"labels, got {image.dtype} {image.shape} and {label.dtype} {label.shape}."
        )
    if len(image) != len(label):
        raise DataError(f"{path}: {len(image)} images but {len(label)} labels.")
    image.setflags(write=False)
    label.setflags(write=False)
    return {"image": image, "label": label}


@contextlib.contextmanager
def _recording_loads(out_dir: str, written: list[str]):
    """Within the block, every ``tljax.data.load_split`` also saves its split to ``out_dir``."""
    import tljax.data

    load = tljax.data.load_split

    def load_and_save(name, split, data_dir=None):
        arrays = load(name, split, data_dir)
        path = split_file(out_dir, name, split)
        if path not in written:
            written.append(save_split(out_dir, name, split, arrays))
        return arrays

    # Methods look load_split up on the module at build time, so this reaches all of them.
    tljax.data.load_split = load_and_save
    try:
        yield
    finally:
        tljax.data.load_split = load


def export_splits(config, out_dir: str) -> list[str]:
    """Builds ``config``'s method and saves every split it loads under ``out_dir``.

    Args:
      config: an experiment config (see configs/).
      out_dir: the export directory; pass it as ``config.data.data_dir`` to read the splits
        back without tfds.

    Returns:
      The ``.npz`` paths written, in load order.

    Raises:
      ValueError: if ``out_dir`` is the config's own data_dir (the export would shadow it) or
        not a local directory.
    """
    from tljax import methods

    source_dir = config.data.get("data_dir")
    if source_dir and os.path.abspath(source_dir) == os.path.abspath(out_dir):
        raise ValueError(f"--out must differ from config.data.data_dir ({source_dir}).")
    written: list[str] = []
    with _recording_loads(out_dir, written):
        methods.build(config)
    return written
