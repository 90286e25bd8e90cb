"""XLA's own convolution and matmul, with the option of bf16 matmul operands.

``conv_xla`` is the ``'xla'`` lowering and the non-differentiated forward pass of every CPU
lowering (XLA fuses it with the surrounding bias, ReLU and pooling into one tiled kernel);
``dot`` is the matmul the patch lowerings are built from.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tljax.ops.shapes import Pads, compute_dtype, pad_spatial

Array = jax.Array

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Matmul operand dtypes (``conv2d``'s ``operands``): None keeps the computation dtype.
CONV_OPERANDS = {"float32": None, "bfloat16": jnp.bfloat16}


def operand_dtype(name: str) -> Any:
    """The matmul operand dtype for a config's ``model.conv_operands`` name.

    Args:
      name: a key of ``CONV_OPERANDS``.

    Returns:
      None (operands in the computation dtype) or ``jnp.bfloat16``.

    Raises:
      ValueError: an unknown name.
    """
    if name not in CONV_OPERANDS:
        raise ValueError(f"conv_operands={name!r}; choose one of {sorted(CONV_OPERANDS)}.")
    return CONV_OPERANDS[name]


def round_to_bfloat16(x: Array) -> Array:
    """``x.astype(jnp.bfloat16)`` (round to nearest even), for the custom-gradient lowerings'
    matmuls; not differentiable.

    Args:
      x: a float array.

    Returns:
      ``x`` rounded to bfloat16; NaN stays NaN.
    """
    # Integer rounding instead of a convert op: XLA:CPU fuses it into the producing copy (the
    # patch extraction), where a float convert runs as a slow separate pass.
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    rounded = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    rounded = jnp.where(jnp.isnan(x), bits | jnp.uint32(0x400000), rounded)  # NaN stays NaN.
    return lax.bitcast_convert_type((rounded >> 16).astype(jnp.uint16), jnp.bfloat16)


def dot(a: Array, b: Array, dimension_numbers, operands) -> Array:
    """``lax.dot_general`` on operands rounded to ``operands``, accumulated in fp32.

    Args:
      a: left operand.
      b: right operand.
      dimension_numbers: as for ``lax.dot_general``.
      operands: an ``operand_dtype`` (None keeps the operands as they are).

    Returns:
      The product.
    """
    if operands is None:
        return lax.dot_general(a, b, dimension_numbers)
    # bfloat16 is the one reduced operand dtype (CONV_OPERANDS).
    a, b = round_to_bfloat16(a), round_to_bfloat16(b)
    return lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)


def conv_xla(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, operands=None) -> Array:
    """``lax.conv_general_dilated`` in NHWC/HWIO, operands cast to ``operands`` if given.

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(kh, kw, Cin, Cout)`` kernel.
      strides: pair of strides.
      pads: explicit padding pairs.
      operands: an ``operand_dtype``.

    Returns:
      ``(N, Ho, Wo, Cout)`` output in ``x``'s dtype.
    """
    if operands is None:
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=DIMENSION_NUMBERS
        )
    y = lax.conv_general_dilated(
        x.astype(operands),
        kernel.astype(operands),
        strides,
        pads,
        dimension_numbers=DIMENSION_NUMBERS,
        preferred_element_type=jnp.float32,
    )
    return y.astype(x.dtype)


def conv_1x1(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, operands=None) -> Array:
    """A 1x1 convolution as a matmul over the (strided) pixels.

    Autodiff of a matmul gives matmuls for both gradients, and there is no patch expansion, so
    neither a custom gradient nor chunking is needed.

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(1, 1, Cin, Cout)`` kernel.
      strides: pair of strides.
      pads: explicit padding pairs.
      operands: an ``operand_dtype``.

    Returns:
      ``(N, Ho, Wo, Cout)`` output in ``x``'s dtype.
    """
    ct = compute_dtype(x.dtype)
    xs = pad_spatial(x, pads)[:, :: strides[0], :: strides[1], :]
    dimension_numbers = (((3,), (0,)), ((), ()))
    if operands is None:
        y = lax.dot_general(xs.astype(ct), kernel[0, 0].astype(ct), dimension_numbers)
    else:
        y = lax.dot_general(
            xs.astype(operands),
            kernel[0, 0].astype(operands),
            dimension_numbers,
            preferred_element_type=jnp.float32,
        )
    return y.astype(x.dtype)
