"""On-device image preprocessing (runs inside the jitted step).

Batches travel to the device as uint8, four times smaller than float32, and are
converted there.
"""

import jax
import jax.numpy as jnp


def to_float_images(images: jax.Array, channels: int = 3, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC images -> floats in [0, 1] with `channels` channels.

    Args:
      images: uint8 [N, H, W, C] with C == 1 or C == channels.
      channels: channels the model expects; grayscale is repeated to match.
      dtype: output dtype.

    Returns:
      [N, H, W, channels] array of `dtype`.

    Raises:
      ValueError: if C can neither be repeated nor kept to give `channels`.
    """
    if images.shape[-1] not in (1, channels):
        raise ValueError(f"Cannot turn {images.shape[-1]}-channel images into {channels} channels.")
    images = images.astype(dtype) / 255.0
    if images.shape[-1] != channels:
        images = jnp.repeat(images, channels, axis=-1)
    return images


# torchvision's ImageNet statistics: what converted ImageNet ResNets expect their inputs to have.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inception-style [-1, 1] inputs: what big_vision's and timm's AugReg ViT checkpoints expect.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {
    "none": None,
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
}


def normalize(images: jax.Array, name: str) -> jax.Array:
    """Per-channel standardisation of [0, 1] images by a named set of statistics.

    Args:
      images: float [N, H, W, 3] in [0, 1].
      name: a key of `NORMALIZATIONS` ('none' returns the images unchanged).

    Returns:
      The normalised images, same shape and dtype.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in NORMALIZATIONS:
        raise ValueError(f"Unknown model.normalize {name!r}; use one of {sorted(NORMALIZATIONS)}.")
    if NORMALIZATIONS[name] is None:
        return images
    mean, std = (jnp.asarray(v, images.dtype) for v in NORMALIZATIONS[name])
    return (images - mean) / std
