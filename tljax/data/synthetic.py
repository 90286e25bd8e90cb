"""Random labelled images in ``tljax.data.load_split``'s layout, for runs without a dataset.

A train step's cost depends only on the shapes it sees, so step benchmarks (and tests of the
step on machines without TensorFlow or tfds) can replace ``tljax.data.load_split`` with
``random_digits_split`` and run on random images of the embedded digits' shapes.
"""

from __future__ import annotations

import numpy as np

# Images per split of the embedded digit pair (tljax/data/embedded.py).
EMBEDDED_DIGITS_SIZES = {"train": 4000, "test": 1000}


def random_labelled_images(
    n: int, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random uint8 images and int32 labels in ``tljax.data.load_split``'s layout.

    Args:
        n: number of examples.
        image_shape: (height, width, channels).
        num_classes: labels are drawn from 0..num_classes-1.
        seed: numpy seed.

    Returns:
        {'image': uint8 (n, *image_shape), 'label': int32 (n,)}.
    """
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, num_classes, n).astype(np.int32),
    }


def random_digits_split(name: str, split: str, data_dir=None) -> dict[str, np.ndarray]:
    """Random digits shaped like the embedded split ``tljax.data.load_split(name, split)``.

    A drop-in replacement for ``tljax.data.load_split``: 4000 train or 1000 test images,
    28x28, grey for MNIST and colour for MNIST-M, labels 0..9.

    Args:
        name: dataset name; one ending in ``mnist_m`` gets 3 channels, any other 1.
        split: ``"train"`` for the train split's size, anything else for the test split's.
        data_dir: ignored (nothing is read).

    Returns:
        {'image': uint8 (n, 28, 28, channels), 'label': int32 (n,)}.
    """
    del data_dir
    channels = 3 if name.endswith("mnist_m") else 1
    n = EMBEDDED_DIGITS_SIZES["train" if split == "train" else "test"]
    return random_labelled_images(n, (28, 28, channels), num_classes=10)
