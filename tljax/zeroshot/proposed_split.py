"""AwA2 / CUB / SUN (and AwA1 / aPY) in the "proposed split" format of Xian et al. 2017.

"Zero-Shot Learning - The Good, the Bad and the Ugly" published, per dataset, a folder
with two MATLAB files (https://www.mpi-inf.mpg.de/departments/computer-vision-and-machine-
learning/research/zero-shot-learning/zero-shot-learning-the-good-the-bad-and-the-ugly,
archive ``xlsa17.zip``, folders ``xlsa17/data/{AWA2,CUB,SUN,...}``):

``res101.mat``
  ``features`` (2048, N) ResNet-101 features of every image; ``labels`` (N, 1) 1-based
  class of every image.
``att_splits.mat``
  ``att`` (M, C) class attribute vectors, L2-normalised per class; ``original_att`` (M, C)
  the raw attribute strengths; ``trainval_loc``, ``test_seen_loc``, ``test_unseen_loc``
  1-based image indices into ``features``; ``allclasses_names`` (C, 1) class names.

Training uses ``trainval_loc`` (seen classes); the test set is ``test_seen_loc`` followed by
``test_unseen_loc``. DAP needs binary attributes: ``original_att`` thresholded at each
attribute's mean over classes.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io

from tljax.zeroshot.data import ZeroShotData

DATASET_FOLDERS = {"awa2": "AWA2", "awa1": "AWA1", "cub": "CUB", "sun": "SUN", "apy": "APY"}
FEATURE_FILE = "res101.mat"
SPLIT_FILE = "att_splits.mat"
_SPLIT_KEYS = ("att", "original_att", "trainval_loc", "test_seen_loc", "test_unseen_loc")


def dataset_dir(root: str, name: str) -> str:
    """The folder of dataset `name` under `root` (e.g. root/AWA2 for 'awa2').

    Raises:
      ValueError: for an unknown dataset name.
    """
    if name not in DATASET_FOLDERS:
        raise ValueError(
            f"Unknown proposed-split dataset {name!r}; use one of {list(DATASET_FOLDERS)}."
        )
    return os.path.join(os.fspath(root), DATASET_FOLDERS[name])


def load(root: str, name: str) -> ZeroShotData:
    """Reads one proposed-split dataset into a `ZeroShotData` (inputs under 'feature').

    Args:
      root: folder holding the dataset folders, e.g. ``.../xlsa17/data``.
      name: 'awa2', 'cub', 'sun', 'awa1' or 'apy'.

    Returns:
      The dataset with 0-based labels; its train split is ``trainval_loc`` and its test
      set ``test_seen_loc`` + ``test_unseen_loc``.

    Raises:
      FileNotFoundError: a file is missing (the message names the path and both files).
      ValueError: the files do not have the proposed split's fields or shapes.
    """
    folder = dataset_dir(root, name)
    features_mat = _read_mat(folder, FEATURE_FILE, ("features", "labels"))
    splits_mat = _read_mat(folder, SPLIT_FILE, _SPLIT_KEYS)

    features = np.asarray(features_mat["features"], np.float32).T
    labels = np.asarray(features_mat["labels"]).reshape(-1).astype(np.int64) - 1
    if len(labels) != len(features):
        raise ValueError(
            f"{os.path.join(folder, FEATURE_FILE)}: features has {len(features)} images "
            f"(expected shape (dim, N)) but labels has {len(labels)}."
        )
    att = np.asarray(splits_mat["att"], np.float32).T
    original = np.asarray(splits_mat["original_att"], np.float32).T
    num_classes = len(att)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{folder}: labels must be 1-based classes 1..{num_classes} (att has "
            f"{num_classes} class columns); found {labels.min() + 1}..{labels.max() + 1}."
        )
    index = {key: _indices(splits_mat, key, len(labels), folder) for key in _SPLIT_KEYS[2:]}
    test_idx = np.concatenate([index["test_seen_loc"], index["test_unseen_loc"]])
    return ZeroShotData(
        input_key="feature",
        train={"feature": features[index["trainval_loc"]], "label": labels[index["trainval_loc"]]},
        test={"feature": features[test_idx], "label": labels[test_idx]},
        class_attributes=(original > original.mean(axis=0, keepdims=True)).astype(np.float32),
        class_embeddings=att / np.maximum(np.linalg.norm(att, axis=1, keepdims=True), 1e-12),
        seen_classes=np.unique(labels[index["trainval_loc"]]),
        unseen_classes=np.unique(labels[index["test_unseen_loc"]]),
        class_names=_class_names(splits_mat, num_classes),
    )


def _read_mat(folder: str, filename: str, keys: tuple[str, ...]) -> dict:
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. A proposed-split dataset folder must hold {FEATURE_FILE} and "
            f"{SPLIT_FILE} (from xlsa17.zip, folder xlsa17/data/<DATASET>); pass the folder "
            "that contains AWA2/, CUB/, SUN/ as data.zsl_root (see BUILD.md)."
        )
    contents = _load_mat_v5(path)
    missing = [key for key in keys if key not in contents]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; expected {list(keys)}.")
    return contents


def _load_mat_v5(path: str) -> dict:
    """``scipy.io.loadmat(path)``, with a specific error for files scipy cannot read."""
    try:
        major_version, _ = scipy.io.matlab.matfile_version(path)
        if major_version != 2:
            return scipy.io.loadmat(path)
    except (ValueError, scipy.io.matlab.MatReadError) as error:
        raise ValueError(f"{path} is not a MATLAB file scipy can read ({error}).") from error
    # Major version 2 is MATLAB v7.3, HDF5 underneath; scipy reads v4 and v5 only.
    raise ValueError(
        f"{path} is a MATLAB v7.3 (HDF5) file; the proposed-split release ships v5 files. "
        "Re-save it with save('-v7') or use the original xlsa17 file."
    )


def _indices(mat: dict, key: str, num_images: int, folder: str) -> np.ndarray:
    index = np.asarray(mat[key]).reshape(-1).astype(np.int64) - 1
    if index.size == 0 or index.min() < 0 or index.max() >= num_images:
        raise ValueError(
            f"{os.path.join(folder, SPLIT_FILE)}: {key} must hold 1-based image indices in "
            f"1..{num_images}."
        )
    return index


def _class_names(mat: dict, num_classes: int) -> tuple[str, ...]:
    if "allclasses_names" not in mat:
        return tuple(f"class_{c}" for c in range(num_classes))
    cells = np.asarray(mat["allclasses_names"], dtype=object).reshape(-1)
    return tuple(str(np.asarray(cell).reshape(-1)[0]) for cell in cells)
