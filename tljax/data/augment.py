"""On-device random augmentation of uint8 image batches: FixMatch's weak and strong views.

Both functions are pure and jittable: uint8 NHWC in (1 or 3 channels), uint8 of the same shape
out, every example drawn independently from one PRNG key (the same key gives the same views).

* `weak`: a random translation by up to ``translate`` of the image size (reflect-pad, then a
  random crop of the original size per example, via vmapped ``jax.lax.dynamic_slice``), and an
  optional random horizontal flip (off by default: a flipped digit is another symbol).
* `strong`: `weak`, then a RandAugment-like chain of ``num_ops`` ops drawn uniformly per example
  from ``ops`` (default `DEFAULT_OPS`), each with its own magnitude drawn uniformly from
  [0, ``magnitude``] and, where it has a direction, a random sign; then Cutout, a square of side
  ``cutout`` x the image size at a random centre (clipped at the borders) set to grey 127.

This follows FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS 2020) as its code does it (github:google-research/fixmatch:
``libml/augment.py`` ``augment_shift`` with REFLECT padding for the weak view;
``libml/ctaugment.py`` for the ops' ranges and the grey cutout; the RandAugment variant with
randomised magnitude). TLlib's FixMatch example (``examples/domain_adaptation/
image_classification/fixmatch.py``) builds the same two views with torchvision/timm transforms.

The ops (magnitude m in [0, 1], sign s = +-1; every op is the identity at m = 0):

  identity      the image.
  autocontrast  per-channel min/max stretch to [0, 255], blended in with weight m.
  equalize      PIL's per-channel histogram equalisation, blended in with weight m.
  invert        255 - x blended in with weight m (available; not in `DEFAULT_OPS`, as in
                FixMatch's RandAugment).
  brightness    PIL ImageEnhance factor 1 + 0.9 s m (the CTAugment range [0.1, 1.9]), black
                as the degenerate image.
  contrast      same factor, degenerate image: the mean grey level.
  color         same factor, degenerate image: the greyscale image (identity for 1 channel).
  sharpness     same factor, degenerate image: PIL's 3x3 smoothing of the interior pixels.
  posterize     keep 8 - round(4 m) bits.
  solarize      invert the pixels >= 256 (1 - m).
  rotate        by 30 s m degrees about the centre.
  shear_x/y     by 0.3 s m about the centre.
  translate_x/y by 0.3 s m of the image size.

Geometric ops resample bilinearly (``jax.scipy.ndimage.map_coordinates``) and fill with black,
PIL's default. tests/test_augment.py checks each op against PIL (equal, or within one grey
level where PIL rounds an intermediate image). Deviations from the PIL ops: shears turn about
the centre rather than the top-left corner; the blended ops (autocontrast, equalize, invert)
follow CTAugment's ``Image.blend`` with strength m rather than RandAugment's all-or-nothing.
The image is rounded to integers after each op, as PIL's uint8 images are, so posterize and
solarize see integer levels. Every op of the list runs on the whole batch and each example
keeps the one it drew, so the cost is that of all ops, ``num_ops`` times (about 30 ms for 64
28x28 RGB images on two CPU cores).
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# Grey of FixMatch's cutout (libml/ctaugment.py ``cutout``).
CUTOUT_GREY = 127
# Largest enhance-factor change, rotation, shear and translation of a magnitude-1 op.
_ENHANCE = 0.9
_ROTATE_DEGREES = 30.0
_SHEAR = 0.3
_TRANSLATE = 0.3
# ITU-R 601-2 luma, PIL's convert('L').
_LUMA = (0.299, 0.587, 0.114)
# PIL's ImageFilter.SMOOTH kernel, used by ImageEnhance.Sharpness.
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))

Op = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def weak(
    rng: jax.Array, images: jax.Array, *, translate: float = 0.125, flip: bool = False
) -> jax.Array:
    """FixMatch's weak view: random translation (and, if asked, horizontal flip) per example.

    Args:
      rng: PRNG key.
      images: uint8 [N, H, W, C].
      translate: largest shift as a fraction of the height / width (0 turns it off).
      flip: flip each example left-right with probability 1/2.

    Returns:
      uint8 [N, H, W, C].
    """
    shift_rng, flip_rng = jax.random.split(rng)
    images = _random_translate(shift_rng, images, translate)
    if flip:
        flipped = jax.random.bernoulli(flip_rng, 0.5, (images.shape[0],))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    return images


def strong(
    rng: jax.Array,
    images: jax.Array,
    *,
    translate: float = 0.125,
    flip: bool = False,
    num_ops: int = 2,
    magnitude: float = 1.0,
    cutout: float = 0.5,
    ops: Sequence[str] | None = None,
) -> jax.Array:
    """FixMatch's strong view: `weak`, ``num_ops`` random ops, then Cutout.

    Args:
      rng: PRNG key.
      images: uint8 [N, H, W, C].
      translate: as for `weak`.
      flip: as for `weak`.
      num_ops: ops applied in a row to each example (each drawn uniformly from ``ops``).
      magnitude: largest op magnitude in [0, 1]; each op draws its own from [0, magnitude].
      cutout: side of the grey square as a fraction of the image's smaller side (0: none).
      ops: names of `OPS` to draw from; None means `DEFAULT_OPS`.

    Returns:
      uint8 [N, H, W, C].

    Raises:
      ValueError: an unknown op name, or an empty op list with num_ops > 0.
    """
    weak_rng, ops_rng, cutout_rng = jax.random.split(rng, 3)
    images = weak(weak_rng, images, translate=translate, flip=flip)
    if num_ops:
        images = rand_augment(ops_rng, images, num_ops=num_ops, magnitude=magnitude, ops=ops)
    return random_cutout(cutout_rng, images, cutout)


def rand_augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    num_ops: int = 2,
    magnitude: float = 1.0,
    ops: Sequence[str] | None = None,
) -> jax.Array:
    """``num_ops`` ops per example, each drawn uniformly from ``ops`` with a random magnitude.

    Args:
      rng: PRNG key.
      images: uint8 [N, H, W, C].
      num_ops: ops in a row per example.
      magnitude: largest magnitude in [0, 1].
      ops: names of `OPS`; None means `DEFAULT_OPS`.

    Returns:
      uint8 [N, H, W, C].

    Raises:
      ValueError: an unknown op name, or no ops.
    """
    functions = _op_functions(DEFAULT_OPS if ops is None else ops)
    count = images.shape[0]
    index_rng, magnitude_rng, sign_rng = jax.random.split(rng, 3)
    indices = jax.random.randint(index_rng, (num_ops, count), 0, len(functions))
    magnitudes = jax.random.uniform(magnitude_rng, (num_ops, count), maxval=magnitude)
    signs = jnp.where(jax.random.bernoulli(sign_rng, 0.5, (num_ops, count)), 1.0, -1.0)
    images = images.astype(jnp.float32)
    for k in range(num_ops):
        # Every op runs on the whole batch and each example keeps the one it drew: a vmapped
        # lax.switch computes every branch too, and XLA then fuses the first op's branches into
        # each of the next op's (4x slower on CPU).
        candidates = jnp.stack([jax.vmap(f)(images, magnitudes[k], signs[k]) for f in functions])
        images = jnp.take_along_axis(candidates, indices[k][None, :, None, None, None], axis=0)[0]
        # PIL hands uint8 images from op to op; posterize and solarize expect integer levels.
        images = jnp.clip(jnp.round(images), 0, 255)
    return images.astype(jnp.uint8)


def random_cutout(rng: jax.Array, images: jax.Array, size: float = 0.5) -> jax.Array:
    """Cutout: a grey square of side ``size`` x the smaller image side at a random centre.

    As FixMatch's ``cutout`` (libml/ctaugment.py): the centre is uniform over the image and the
    square [centre - side // 2, centre + side // 2) is clipped at the borders.

    Args:
      rng: PRNG key.
      images: uint8 [N, H, W, C].
      size: side as a fraction of min(H, W); 0 leaves the images unchanged.

    Returns:
      uint8 [N, H, W, C].
    """
    count, height, width = images.shape[:3]
    half = int(size * min(height, width)) // 2
    row_rng, col_rng = jax.random.split(rng)
    rows = jax.random.randint(row_rng, (count, 1, 1), 0, height)
    cols = jax.random.randint(col_rng, (count, 1, 1), 0, width)
    row_index = jnp.arange(height)[None, :, None]
    col_index = jnp.arange(width)[None, None, :]
    inside = (
        (row_index >= rows - half)
        & (row_index < rows + half)
        & (col_index >= cols - half)
        & (col_index < cols + half)
    )
    return jnp.where(inside[..., None], jnp.uint8(CUTOUT_GREY), images)


def _random_translate(rng: jax.Array, images: jax.Array, fraction: float) -> jax.Array:
    height, width = images.shape[1:3]
    pad_h, pad_w = _pixels(fraction, height), _pixels(fraction, width)
    if not pad_h and not pad_w:
        return images
    padded = jnp.pad(images, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="reflect")
    row_rng, col_rng = jax.random.split(rng)
    tops = jax.random.randint(row_rng, (images.shape[0],), 0, 2 * pad_h + 1)
    lefts = jax.random.randint(col_rng, (images.shape[0],), 0, 2 * pad_w + 1)
    crop = lambda image, top, left: jax.lax.dynamic_slice(
        image, (top, left, 0), (height, width, image.shape[-1])
    )
    return jax.vmap(crop)(padded, tops, lefts)


def _pixels(fraction: float, size: int) -> int:
    # Half up, so FixMatch's 12.5% of 32 px gives its 4 px and 12.5% of 28 px gives 4 px too.
    return int(math.floor(fraction * size + 0.5))


# ---------------------------------------------------------------------- ops ----
# Each op: (image float32 [H, W, C] in [0, 255], magnitude in [0, 1], sign +-1) -> image.


def _blend(image, other, weight):
    return image + weight * (other - image)


def _enhance(image, degenerate, magnitude, sign):
    # PIL's ImageEnhance: degenerate + factor * (image - degenerate).
    return _blend(degenerate, image, 1.0 + _ENHANCE * sign * magnitude)


def _greyscale(image):
    if image.shape[-1] == 1:
        return image
    return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=1)[..., None]


def _identity(image, magnitude, sign):
    del magnitude, sign
    return image


def _autocontrast(image, magnitude, sign):
    del sign
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    spread = high - low
    stretched = (image - low) * (255.0 / jnp.where(spread > 0, spread, 1.0))
    return _blend(image, jnp.where(spread > 0, stretched, image), magnitude)


def _equalize_channel(channel):
    # PIL's ImageOps.equalize: a lookup table from the histogram, step = (pixels - pixels at the
    # top level) // 255, level i -> (step // 2 + pixels below i) // step.
    levels = jnp.clip(channel, 0, 255).astype(jnp.int32).reshape(-1)
    histogram = jnp.zeros(256, jnp.int32).at[levels].add(1)
    top = 255 - jnp.argmax(histogram[::-1] > 0)
    step = (levels.size - histogram[top]) // 255
    below = jnp.cumsum(histogram) - histogram
    table = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    # PIL leaves a channel alone when a step would be 0 (one level, or nearly one).
    equalized = jnp.where(step > 0, table[levels], levels)
    return equalized.reshape(channel.shape).astype(channel.dtype)


def _equalize(image, magnitude, sign):
    del sign
    equalized = jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)
    return _blend(image, equalized, magnitude)


def _invert(image, magnitude, sign):
    del sign
    return _blend(image, 255.0 - image, magnitude)


def _brightness(image, magnitude, sign):
    return _enhance(image, jnp.zeros_like(image), magnitude, sign)


def _contrast(image, magnitude, sign):
    mean = _greyscale(image).mean()
    return _enhance(image, jnp.full_like(image, mean), magnitude, sign)


def _color(image, magnitude, sign):
    return _enhance(image, jnp.broadcast_to(_greyscale(image), image.shape), magnitude, sign)


def _sharpness(image, magnitude, sign):
    height, width = image.shape[:2]
    kernel = jnp.asarray(_SMOOTH, image.dtype) / 13.0
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smoothed = sum(
        kernel[i, j] * padded[i : i + height, j : j + width] for i in range(3) for j in range(3)
    )
    # PIL leaves the one-pixel border of the degenerate image unsmoothed.
    rows, cols = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
    return _enhance(image, jnp.where(interior, smoothed, image), magnitude, sign)


def _posterize(image, magnitude, sign):
    del sign
    step = 2.0 ** jnp.round(4.0 * magnitude)
    return jnp.floor(image / step) * step


def _solarize(image, magnitude, sign):
    del sign
    return jnp.where(image >= 256.0 * (1.0 - magnitude), 255.0 - image, image)


def _resample(image, matrix, offset):
    """The image sampled at matrix @ (p - centre) + centre + offset for each output pixel p."""
    height, width = image.shape[:2]
    centre = jnp.asarray([(height - 1) / 2.0, (width - 1) / 2.0])
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    points = jnp.stack([rows.ravel(), cols.ravel()]).astype(jnp.float32) - centre[:, None]
    source = matrix @ points + (centre + offset)[:, None]
    coordinates = [source[0].reshape(height, width), source[1].reshape(height, width)]
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, coordinates, order=1, mode="constant", cval=0.0
    )
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def _rotate(image, magnitude, sign):
    angle = jnp.deg2rad(_ROTATE_DEGREES * sign * magnitude)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return _resample(image, jnp.asarray([[cos, -sin], [sin, cos]]), jnp.zeros(2))


def _shear_x(image, magnitude, sign):
    shear = _SHEAR * sign * magnitude
    return _resample(image, jnp.asarray([[1.0, 0.0], [shear, 1.0]]), jnp.zeros(2))


def _shear_y(image, magnitude, sign):
    shear = _SHEAR * sign * magnitude
    return _resample(image, jnp.asarray([[1.0, shear], [0.0, 1.0]]), jnp.zeros(2))


def _translate_x(image, magnitude, sign):
    shift = _TRANSLATE * sign * magnitude * image.shape[1]
    return _resample(image, jnp.eye(2), jnp.stack([jnp.zeros_like(shift), shift]))


def _translate_y(image, magnitude, sign):
    shift = _TRANSLATE * sign * magnitude * image.shape[0]
    return _resample(image, jnp.eye(2), jnp.stack([shift, jnp.zeros_like(shift)]))


OPS: dict[str, Op] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "invert": _invert,
    "brightness": _brightness,
    "contrast": _contrast,
    "color": _color,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _rotate,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}
# FixMatch's RandAugment op set (no invert).
DEFAULT_OPS = tuple(name for name in OPS if name != "invert")


def _op_functions(names: Sequence[str]) -> list[Op]:
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise ValueError(f"Augmentation ops {list(names)}: choose one or more of {sorted(OPS)}.")
    return [OPS[name] for name in names]
