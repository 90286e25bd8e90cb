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
