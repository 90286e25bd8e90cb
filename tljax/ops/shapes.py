"""Argument canonicalisation and spatial helpers shared by the convolution and pooling lowerings.

Same conventions as ``flax.linen.Conv`` and ``flax.linen.pooling``: NHWC inputs, HWIO kernels,
padding as ``'SAME'``, ``'VALID'``, an int or per-dimension ``(lo, hi)`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Padding = str | int | Sequence[int | tuple[int, int]]
Pads = tuple[tuple[int, int], tuple[int, int]]


def pair(value: int | Sequence[int] | None, name: str, default: tuple[int, int]) -> tuple[int, int]:
    """An int-or-pair argument as a pair of ints.

    Args:
      value: an int (used for both dims), a pair, or None.
      name: the argument's name, for the error message.
      default: the pair for ``None``.

    Returns:
      ``(int, int)``.

    Raises:
      ValueError: a sequence that is not of length 2.
    """
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}.")
    return value  # type: ignore[return-value]


def explicit_pads(
    padding: Padding,
    in_hw: tuple[int, int],
    window: tuple[int, int],
    strides: tuple[int, int],
) -> Pads:
    """Flax/lax-style padding as explicit ``((lo, hi), (lo, hi))`` pairs.

    Args:
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of two ints or ``(lo, hi)`` pairs.
      in_hw: input height and width.
      window: kernel or pooling window height and width.
      strides: pair of strides.

    Returns:
      The padding of the two spatial dims.

    Raises:
      ValueError: an unsupported padding string or a malformed sequence.
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"Unsupported padding {padding!r}; use 'SAME', 'VALID' or pairs.")
        pads = lax.padtype_to_pads(in_hw, window, strides, padding.upper())
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    else:
        pads = []
        for p in padding:
            if isinstance(p, int):
                pads.append((p, p))
            elif len(p) == 2:
                pads.append((int(p[0]), int(p[1])))
            else:
                raise ValueError(f"Invalid padding {padding!r}.")
        if len(pads) != 2:
            raise ValueError(f"Padding must describe 2 spatial dims, got {padding!r}.")
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def out_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    """Output length of a window ``k`` sliding at ``stride`` over ``size`` padded by ``pad``."""
    return (size + pad[0] + pad[1] - k) // stride + 1


def pad_spatial(x: Array, pads: Pads, value=0) -> Array:
    """``x`` (NHWC) padded with ``value`` on its two spatial dims; ``x`` itself if no padding."""
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=value)


def strided_slices(x: Array, axis: int, k: int, stride: int, out: int) -> list[Array]:
    """The ``k`` kernel-offset slices ``x[..., i : i + stride * out : stride, ...]`` of ``axis``."""
    return [lax.slice_in_dim(x, i, i + stride * (out - 1) + 1, stride, axis) for i in range(k)]


def flatten_batch(x: Array) -> tuple[Array, Callable[[Array], Array]]:
    """``(*batch, H, W, C)`` (any number of batch dims, including none) as ``(N, H, W, C)``.

    Args:
      x: the input.

    Returns:
      ``(x with one batch dim, the inverse reshape for outputs)``.

    Raises:
      ValueError: fewer than 3 dims.
    """
    if x.ndim < 3:
        raise ValueError(f"Expected (*batch, H, W, C) input, got shape {x.shape}.")
    batch = x.shape[:-3]
    if len(batch) == 1:
        return x, lambda y: y
    x = x.reshape((-1, *x.shape[-3:]))
    return x, lambda y: y.reshape((*batch, *y.shape[1:]))


def compute_dtype(dtype) -> Any:
    """The dtype the patch and Winograd lowerings compute in: ``dtype`` widened to fp32."""
    # Half-precision operands are widened per chunk (cheap: the chunk is in cache) because
    # XLA:CPU's bf16 matmuls are ~2x slower than fp32 on CPUs without bf16 units, and so that
    # accumulation happens in fp32 as in lax.conv. Outputs keep the input dtype.
    return jnp.promote_types(dtype, jnp.float32)
