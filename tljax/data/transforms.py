"""Host-side decoding and augmentation of image files, as TLlib's image-classification examples.

The streaming pipeline's worker processes call `load` to turn one image file into a uint8
(H, W, C) array of the model's size; this module imports only NumPy, PIL and the standard
library so that spawned workers start light. The reference is Transfer-Learning-Library
(github:thuml/Transfer-Learning-Library), against which the domain-adaptation numbers are held:
``examples/domain_adaptation/image_classification/utils.py`` (``get_train_transform`` and
``get_val_transform`` with ``resizing='default'``), ``tllib/vision/transforms/__init__.py``
(``ResizeImage``) and ``tllib/vision/datasets/imagelist.py`` (torchvision's ``default_loader``).
The torchvision parts are transcribed from torchvision 0.28's ``transforms/transforms.py``,
``transforms/functional.py``, ``transforms/_functional_pil.py`` and ``datasets/folder.py``.

* `decode`: open the file and read it whole, then convert it to ``"RGB"`` (3 channels) or ``"L"``
  (1), as torchvision's ``pil_loader`` (``img.convert('RGB')``) does: alpha is dropped, not
  composited. Palette images with transparency go through RGBA (PIL warns on the direct
  conversion); 16-bit greyscale ("I;16", "I") is scaled to 8 bits rather than clipped at 255 as
  PIL's conversion does. EXIF orientation is not applied, as in torchvision. Truncated files are
  errors: ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left False.
* The base resize, TLlib's ``ResizeImage(256)``: a square resize ignoring the aspect ratio, with
  PIL's default filter (BICUBIC since Pillow 7; ``ResizeImage`` calls ``img.resize`` without a
  filter). For other model sizes 256/224 generalises to ``round(size / 0.875)`` per side.
* `eval_image`: the base resize, then torchvision's ``CenterCrop(size)``: TLlib's validation
  transform.
* ``random_resized_crop``: the base resize, then torchvision's ``RandomResizedCrop(size)``: a box
  from `random_resized_crop_box` (``get_params``: area fraction in [0.08, 1], aspect ratio
  log-uniform in [3/4, 4/3], 10 attempts, then a centre crop) resized with BILINEAR, torchvision's
  filter for PIL images. TLlib's default training transform.
* ``flip``: torchvision's ``RandomHorizontalFlip()``, probability 0.5 (TLlib's default too).
* ``color_jitter``: torchvision's ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)``:
  each factor uniform in [0.6, 1.4], applied with PIL's ``ImageEnhance`` (Brightness, Contrast,
  Color) in a random order. Hue jitter is not included. TLlib's ``--color-jitter`` (off by
  default) uses ``ColorJitter(0.5, 0.5, 0.5, hue=0.5)``; set `COLOR_JITTER` to 0.5 to match
  its strength (hue still not included).

Without ``random_resized_crop`` a training image gets `eval_image`'s resize and crop; ``flip``
and ``color_jitter`` follow in that order, whatever order the ops are named in. Randomness comes
only from the ``numpy.random.Generator`` passed in, so the same generator state gives the same
image in any process.

Deviations from TLlib and torchvision: the draws match torchvision's in kind and order but not in
value (NumPy's generator in float64, not torch's in float32); 224 and 256 are generalised to any
model size; 1-channel models get ``"L"`` images (TLlib's loaders always give RGB); 16-bit
greyscale is scaled, not clipped; colour jitter is 0.4 without hue, not TLlib's 0.5 with hue 0.5.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
from PIL import Image, ImageEnhance

__all__ = [
    "AUGMENTATIONS",
    "UnreadableImageError",
    "decode",
    "eval_image",
    "load",
    "parse_augment",
    "random_resized_crop_box",
    "to_array",
    "train_image",
]

AUGMENTATIONS = ("random_resized_crop", "flip", "color_jitter")
# TLlib resizes to 256 and crops 224: the crop is 0.875 of the resized side.
CROP_FRACTION = 224 / 256
# TLlib's ResizeImage calls img.resize without a filter: PIL's default, BICUBIC (Pillow >= 7).
BASE_RESAMPLE = Image.Resampling.BICUBIC
# torchvision's RandomResizedCrop default for PIL images.
CROP_RESAMPLE = Image.Resampling.BILINEAR
# torchvision's RandomResizedCrop defaults.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5
# Strength of brightness, contrast and saturation jitter: factors uniform in [1 - x, 1 + x].
COLOR_JITTER = 0.4
# torchvision's ColorJitter order: brightness, contrast, saturation (hue left out).
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
_MODES = {1: "L", 3: "RGB"}
# What PIL raises on a missing, unrecognised, truncated or corrupt file (its plugins raise
# SyntaxError, EOFError and struct.error on broken headers, ValueError on bad conversions).
_DECODE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    Image.DecompressionBombError,
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file that could not be opened, decoded or converted.

    Attributes:
      path: the file, as given.
      reason: what went wrong.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        # One argument: OSError reads two as (errno, strerror).
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self):
        # Raised in worker processes and pickled back to the parent: rebuild from both fields.
        return type(self), (self.path, self.reason)


def decode(path: str | os.PathLike, channels: int) -> Image.Image:
    """Reads an image file whole and converts it to ``channels`` channels.

    Args:
      path: the image file (any format PIL reads).
      channels: 3 for an ``"RGB"`` image, 1 for ``"L"``.

    Returns:
      The loaded image, in mode ``"RGB"`` or ``"L"``, detached from the file.

    Raises:
      UnreadableImageError: the file is missing, not an image, truncated or corrupt.
      ValueError: ``channels`` is not 1 or 3.
    """
    mode = _mode(channels)
    try:
        with Image.open(path) as image:
            image.load()
            converted = _convert(image, mode)
            # Detach from the file: PIL may keep an uncompressed file memory-mapped.
            return image.copy() if converted is image else converted
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(path, _reason(error)) from error


def parse_augment(spec: str, field: str = "data.folder.augment") -> tuple[str, ...]:
    """Parses a comma-separated list of augmentations, e.g. ``"random_resized_crop,flip"``.

    Args:
      spec: names from `AUGMENTATIONS`, comma-separated; ``""`` or ``"none"`` for none.
      field: the config field the spec came from, named in errors.

    Returns:
      The names, in the order given (`train_image` applies them in its own fixed order).

    Raises:
      ValueError: a name is unknown, empty or repeated.
    """
    text = spec.strip()
    if text in ("", "none"):
        return ()
    names = tuple(name.strip() for name in text.split(","))
    allowed = f"allowed: {', '.join(AUGMENTATIONS)}, comma-separated, or 'none'"
    for position, name in enumerate(names):
        if name not in AUGMENTATIONS:
            raise ValueError(f"{field}: unknown augmentation {name!r} in {spec!r}; {allowed}")
        if name in names[:position]:
            raise ValueError(f"{field}: augmentation {name!r} is repeated in {spec!r}; {allowed}")
    return names


def eval_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The evaluation transform: TLlib's ``ResizeImage(256)`` then ``CenterCrop(224)``, scaled.

    Args:
      image: the decoded image.
      size: the model's (height, width).

    Returns:
      The image resized to ``round(size / 0.875)`` (ignoring its aspect ratio) and centre-cropped
      to ``size``.
    """
    height, width = _check_size(size)
    base = _base_resize(image, (height, width))
    # torchvision's center_crop rounds the offsets (Python's round, halves to even).
    top = int(round((base.height - height) / 2.0))
    left = int(round((base.width - width) / 2.0))
    return base.crop((left, top, left + width, top + height))


def train_image(
    image: Image.Image,
    size: tuple[int, int],
    ops: tuple[str, ...],
    rng: np.random.Generator,
) -> Image.Image:
    """The training transform: a random resized crop or `eval_image`, then flip and colour jitter.

    Args:
      image: the decoded image.
      size: the model's (height, width).
      ops: names from `AUGMENTATIONS` (see `parse_augment`); the empty tuple gives `eval_image`.
      rng: the only source of randomness; the same state gives the same image.

    Returns:
      The augmented image, of ``size``.

    Raises:
      ValueError: an op is not in `AUGMENTATIONS`.
    """
    height, width = _check_size(size)
    unknown = [op for op in ops if op not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; allowed: {', '.join(AUGMENTATIONS)}")
    if "random_resized_crop" in ops:
        image = _random_resized_crop(image, (height, width), rng)
    else:
        image = eval_image(image, (height, width))
    return flip_and_jitter(image, ops, rng)


def flip_and_jitter(image: Image.Image, ops: tuple[str, ...], rng: np.random.Generator):
    """`train_image`'s steps after the crop: the flip, then the colour jitter, as ``ops`` ask.

    Args:
      image: an image already of the model's size.
      ops: augmentation names; only ``flip`` and ``color_jitter`` act here.
      rng: the source of randomness (drawn in `train_image`'s order).

    Returns:
      The image, same size.
    """
    if "flip" in ops and rng.random() < FLIP_PROBABILITY:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "color_jitter" in ops:
        image = _color_jitter(image, rng)
    return image


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """A random crop box, by torchvision's ``RandomResizedCrop.get_params`` algorithm.

    Up to 10 attempts draw an area fraction uniform in ``scale`` and an aspect ratio (width /
    height) log-uniform in ``ratio``; the first box that fits gets a uniform position. If none
    fits, the box is the central crop of the largest size whose aspect ratio is clamped to
    ``ratio``.

    Args:
      width: the image's width.
      height: the image's height.
      rng: the source of randomness.
      scale: the range of the box's area as a fraction of the image's.
      ratio: the range of the box's aspect ratio, width / height.

    Returns:
      ``(left, top, crop_width, crop_height)``, inside the image.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            # torchvision draws the top before the left.
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    return _central_box(width, height, ratio)


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """The image as a uint8 (H, W, channels) array.

    Args:
      image: a PIL image; converted as `decode` does if its mode is not that of ``channels``.
      channels: 1 or 3.

    Returns:
      A new uint8 array of shape (H, W, channels).
    """
    image = _convert(image, _mode(channels))
    array = np.array(image, dtype=np.uint8)
    return array.reshape(image.height, image.width, channels)


def load(
    path: str | os.PathLike,
    size: tuple[int, int],
    channels: int,
    ops: tuple[str, ...] = (),
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Decodes an image file and transforms it to the model's size: the pipeline's one call.

    Args:
      path: the image file.
      size: the model's (height, width).
      channels: 1 or 3.
      ops: augmentations (`train_image`); used only with ``rng``.
      rng: None for the deterministic `eval_image`, else the generator of `train_image`.

    Returns:
      uint8 (height, width, channels).

    Raises:
      UnreadableImageError: the file cannot be read as an image.
    """
    image = decode(path, channels)
    image = eval_image(image, size) if rng is None else train_image(image, size, ops, rng)
    return to_array(image, channels)


def _mode(channels: int) -> str:
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return _MODES[channels]


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)``, with the detours some source modes need."""
    if image.mode == mode:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        # PIL warns when a palette image with transparency is converted straight to RGB or L.
        image = image.convert("RGBA")
    return image.convert(mode)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # PIL's own conversion clips at 255, turning most of a 16-bit image white; scale instead.
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def _reason(error: Exception) -> str:
    # An OSError's strerror leaves out the path, which the message already starts with.
    detail = getattr(error, "strerror", None) or str(error) or "no detail"
    return f"{type(error).__name__}: {detail}"


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(side) for side in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be a positive (height, width), got {tuple(size)}")
    return height, width


def _base_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # TLlib's ResizeImage(256) for a 224 model: both sides to size / 0.875, aspect ignored.
    height, width = size
    base = (int(round(width / CROP_FRACTION)), int(round(height / CROP_FRACTION)))
    return image.resize(base, BASE_RESAMPLE)


def _random_resized_crop(
    image: Image.Image, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """TLlib's ResizeImage(256) then torchvision's RandomResizedCrop(224), scaled to ``size``."""
    base = _base_resize(image, size)
    left, top, crop_width, crop_height = random_resized_crop_box(base.width, base.height, rng)
    # torchvision's resized_crop: crop, then resize (skipped when the crop already fits).
    crop = base.crop((left, top, left + crop_width, top + crop_height))
    height, width = size
    if crop.size == (width, height):
        return crop
    return crop.resize((width, height), CROP_RESAMPLE)


def _central_box(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the central crop with its aspect ratio clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width = width
        crop_height = int(round(crop_width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height = height
        crop_width = int(round(crop_height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def _color_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter without hue: random order, then one factor per enhancer."""
    order = rng.permutation(len(_ENHANCERS))
    factors = rng.uniform(1 - COLOR_JITTER, 1 + COLOR_JITTER, size=len(_ENHANCERS))
    for index in order:
        image = _ENHANCERS[index](image).enhance(float(factors[index]))
    return image
