"""MNIST-M (Ganin & Lempitsky, 2015): MNIST digits blended over colour photo patches.

The builder is registered as ``mnist_m``; tensorflow-datasets 4.9.10 ships no builder of
that name (checked with ``tfds.list_builders()``), so there is no clash.

Construction: each MNIST digit is binarised (pixel > 127 -> 255, else 0) and combined with a
random 28x28 crop of a BSDS500 *train* photograph as ``|patch - digit|`` per colour channel.
Patches are drawn with a fixed seed per split, so two builds give identical images.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_BSDS_URL = (
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/BSR/BSR_bsds500.tgz"
)
# Only the train photographs: BSDS500's val/test images stay unseen, as in the original recipe.
_BSDS_TRAIN_DIR = "BSR/BSDS500/data/images/train/"
_SPLIT_SEEDS = {"train": 0, "test": 1}
_IDX_UINT8 = 0x08

_CITATION = """\
@inproceedings{ganin2015unsupervised,
  title={Unsupervised Domain Adaptation by Backpropagation},
  author={Ganin, Yaroslav and Lempitsky, Victor},
  booktitle={International Conference on Machine Learning},
  pages={1180--1189},
  year={2015}
}
"""


def blend_mnist_m(digits: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """Blends grayscale digits over colour patches the way MNIST-M does.

    Args:
      digits: MNIST digits, shape (N, 28, 28) or (N, 28, 28, 1), values in 0..255 (uint8).
      patches: colour patches, uint8, shape (N, 28, 28, 3).

    Returns:
      uint8 array (N, 28, 28, 3) equal to ``|patch - binarised digit|`` per channel, where the
      binarised digit is 255 where ``digit > 127`` and 0 elsewhere.

    Raises:
      ValueError: if the shapes do not match.
      TypeError: if ``patches`` is not uint8.
    """
    digits = np.asarray(digits)
    patches = np.asarray(patches)
    if digits.ndim == 4 and digits.shape[-1] == 1:
        digits = digits[..., 0]
    if patches.dtype != np.uint8:
        raise TypeError(f"patches must be uint8, got {patches.dtype}")
    if digits.ndim != 3 or patches.shape != (*digits.shape, 3):
        raise ValueError(
            f"expected digits (N, H, W[, 1]) and patches (N, H, W, 3); "
            f"got {digits.shape} and {patches.shape}"
        )
    # With a 0/255 digit, |p - 255| = 255 - p and |p - 0| = p, so the blend is a masked
    # inversion: no signed intermediate needed.
    mask = (digits > 127)[..., None]
    return np.where(mask, 255 - patches, patches)


def random_patches(
    photos: Sequence[np.ndarray], n: int, rng: np.random.Generator, size: int = 28
) -> np.ndarray:
    """Crops ``n`` random ``size`` x ``size`` patches, each from a uniformly chosen photo.

    Args:
      photos: colour photographs, each a uint8 array (H, W, 3) with H, W >= ``size``.
      n: number of patches.
      rng: the only source of randomness, so a seeded generator gives reproducible patches.
      size: side length of the square patches.

    Returns:
      uint8 array (n, size, size, 3).

    Raises:
      ValueError: if there are no photos or one is not a large enough (H, W, 3) uint8 array.
    """
    photos = [_checked_photo(p, size) for p in photos]
    if not photos:
        raise ValueError("random_patches needs at least one photo")
    heights = np.array([p.shape[0] for p in photos])
    widths = np.array([p.shape[1] for p in photos])
    which = rng.integers(len(photos), size=n)
    tops = rng.integers(0, heights[which] - size + 1)
    lefts = rng.integers(0, widths[which] - size + 1)

    out = np.empty((n, size, size, 3), np.uint8)
    # One gather per photo from a (no-copy) view of all its windows: about 3x faster than
    # fancy indexing with per-pixel row and column arrays.
    for k, photo in enumerate(photos):
        sel = np.flatnonzero(which == k)
        windows = np.lib.stride_tricks.sliding_window_view(photo, (size, size, 3))[:, :, 0]
        out[sel] = windows[tops[sel], lefts[sel]]
    return out


def _checked_photo(photo: np.ndarray, size: int) -> np.ndarray:
    photo = np.asarray(photo)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f"photos must be uint8 (H, W, 3), got {photo.dtype} {photo.shape}")
    if min(photo.shape[:2]) < size:
        raise ValueError(f"photo of shape {photo.shape} is smaller than {size}x{size}")
    return photo


def read_idx_gz(path: epath.PathLike) -> np.ndarray:
    """Reads a gzipped IDX file of unsigned bytes (the raw MNIST format).

    Args:
      path: path to an ``*-idx?-ubyte.gz`` file.

    Returns:
      uint8 array with the shape stored in the file's header.

    Raises:
      ValueError: if the file is not a uint8 IDX file or its payload is truncated.
    """
    data = gzip.decompress(epath.Path(path).read_bytes())
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UINT8:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, payload has {payload.size} bytes")
    return payload.reshape(shape)


def read_bsds_train_photos(archive: Iterable[tuple[str, IO[bytes]]]) -> list[np.ndarray]:
    """Decodes the BSDS500 train photographs from an iterated archive.

    Args:
      archive: (path inside the archive, file object) pairs, as from
        ``dl_manager.iter_archive``.

    Returns:
      RGB uint8 arrays, ordered by path so the result does not depend on archive order.

    Raises:
      ValueError: if the archive holds no train photographs.
    """
    photos = {}
    for name, fobj in archive:
        if _BSDS_TRAIN_DIR in name and name.endswith(".jpg"):
            photos[name] = np.asarray(Image.open(fobj).convert("RGB"))
    if not photos:
        raise ValueError(f"no {_BSDS_TRAIN_DIR}*.jpg in the BSDS500 archive")
    return [photos[name] for name in sorted(photos)]


class MnistM(tfds.core.GeneratorBasedBuilder):
    """MNIST-M built from raw MNIST and BSDS500 (downloads both, about 80 MB)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Hosts that tljax.data.loading probes before downloading, to fail fast when offline.
    DOWNLOAD_HOSTS = ("storage.googleapis.com", "www2.eecs.berkeley.edu")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "MNIST-M: MNIST digits (train 60,000 / test 10,000) blended as |patch - digit| "
                "over random 28x28 crops of BSDS500 train photographs (Ganin & Lempitsky, 2015)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yaroslav.ganin.net/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        urls = {key: _MNIST_URL + fname for key, fname in _MNIST_FILES.items()}
        paths = dl_manager.download({**urls, "bsds": _BSDS_URL})
        photos = read_bsds_train_photos(dl_manager.iter_archive(paths["bsds"]))
        return {
            split: self._generate_examples(
                paths[f"{split}_images"], paths[f"{split}_labels"], photos, seed
            )
            for split, seed in _SPLIT_SEEDS.items()
        }

    def _generate_examples(
        self,
        images_path: epath.PathLike,
        labels_path: epath.PathLike,
        photos: Sequence[np.ndarray],
        seed: int,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        digits = read_idx_gz(images_path)
        labels = read_idx_gz(labels_path)
        if len(digits) != len(labels):
            raise ValueError(f"{len(digits)} MNIST images but {len(labels)} labels")
        patches = random_patches(photos, len(digits), np.random.default_rng(seed))
        images = blend_mnist_m(digits, patches)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": image, "label": int(label)}
