"""2-D convolution with a selectable lowering, and ``Conv``, a drop-in for ``nn.Conv`` using it.

Why: under differentiation, XLA:CPU runs small convnets at a tenth of its matmul speed. The
forward convolution is fine when XLA can fuse it with the ops around it into one tiled YNNPACK
kernel (inference), but the kernel gradient is lowered as a convolution whose window is the whole
feature map and the input gradient as a fully padded convolution outside the tiled kernels. So
``conv2d`` has several lowerings (``impl``):

* ``'xla'``: ``lax.conv_general_dilated`` (``tljax.ops.native``). Use on GPU/TPU.
* ``'im2col'``: under differentiation, the forward pass and both gradients are matmuls over
  image patches, built over chunks of the batch so that the patches stay in cache
  (``tljax.ops.im2col``). Without differentiation the native op runs, which fuses best. For CPU.
* ``'winograd'``: stride-1 convolutions with kernel sides 2-5 as Winograd F(4x4, kh x kw)
  (``tljax.ops.winograd``); other convolutions fall back to ``'im2col'``. For CPU.

``impl='auto'`` (the default) picks, on CPU, ``'winograd'`` for the stride-1 layers with long
patches and ``'im2col'`` for the rest (``conv_lowering``), and ``'xla'`` on any other backend.
All lowerings compute the same function with the same parameters (outputs and gradients agree
to float rounding), so a checkpoint trained with one runs under another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.ops.im2col import conv_blocked, conv_im2col, uses_output_blocks
from tljax.ops.native import conv_1x1, conv_xla, operand_dtype
from tljax.ops.shapes import Padding, explicit_pads, flatten_batch, out_size, pair
from tljax.ops.winograd import WINOGRAD_MIN_PATCH, conv_winograd

Array = jax.Array

CONV_IMPLS = ("auto", "xla", "im2col", "winograd")


def resolve_impl(impl: str) -> str:
    """Resolves a lowering name to the concrete lowering for the current backend.

    ``jax.default_backend`` is looked up on the ``jax`` module at call (i.e. trace) time, so it
    can be patched with ``unittest.mock.patch("jax.default_backend", ...)`` in tests.

    Args:
      impl: one of ``CONV_IMPLS``. ``'auto'`` means ``'im2col'`` on CPU (which ``conv_lowering``
        refines per layer) and ``'xla'`` on any other backend; the other names are returned
        unchanged.

    Returns:
      ``'xla'``, ``'im2col'`` or ``'winograd'``.

    Raises:
      ValueError: if ``impl`` is not one of ``CONV_IMPLS``.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown impl {impl!r}; expected one of {CONV_IMPLS}.")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv_lowering(impl: str, kernel_shape: Sequence[int], strides: Sequence[int]) -> str:
    """The lowering ``conv2d`` uses for one layer.

    On CPU, ``'auto'`` picks Winograd for the layers where it measured faster (stride 1, kernel
    sides 2-5, a patch of ``kh * kw * cin >= WINOGRAD_MIN_PATCH`` values) and im2col for the
    rest. With short patches the tile transforms, whose cost does not shrink with the patch,
    outweigh the saved multiplications: the digit net's first conv (5x5x3) is 3x slower with
    Winograd, its second (5x5x32) 2.4x faster; 3x3 convs gain from 32 channels (1.1x) to 256
    (1.6x).

    Args:
      impl: one of ``CONV_IMPLS``.
      kernel_shape: ``(kh, kw, cin, cout)``.
      strides: pair of ints.

    Returns:
      ``'xla'``, ``'im2col'``, ``'winograd'``, or ``'1x1'`` (a 1x1 kernel: a plain matmul).
    """
    explicit = resolve_impl(impl)
    if explicit == "xla":
        return explicit
    kh, kw, cin, _ = kernel_shape
    if (kh, kw) == (1, 1):
        return "1x1"
    eligible = tuple(strides) == (1, 1) and 2 <= kh <= 5 and 2 <= kw <= 5
    if impl == "auto":
        return "winograd" if eligible and kh * kw * cin >= WINOGRAD_MIN_PATCH else "im2col"
    if explicit == "winograd" and not eligible:
        return "im2col"
    return explicit


def conv2d(
    x: Array,
    kernel: Array,
    strides: int | Sequence[int] = (1, 1),
    padding: Padding = "SAME",
    impl: str = "auto",
    operands: str = "float32",
) -> Array:
    """2-D convolution with a selectable lowering.

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(kh, kw, Cin, Cout)`` kernel (``flax.linen.Conv`` layout), same dtype as ``x``.
      strides: int or pair of ints.
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of two ints or ``(lo, hi)`` pairs;
        same meaning as in ``flax.linen.Conv``.
      impl: one of ``CONV_IMPLS``; see ``resolve_impl``.
      operands: a key of ``CONV_OPERANDS``: the dtype the matmul operands (patches, kernel,
        output gradient) are rounded to, accumulated in fp32. ``'float32'`` keeps the
        computation dtype (exact). ``'bfloat16'`` runs the matmuls on bf16 units (AMX,
        tensor cores); Winograd keeps the computation dtype, since its transforms would
        amplify the rounding.

    Returns:
      ``(N, Ho, Wo, Cout)`` output with the dtype ``lax.conv_general_dilated`` would return.
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"Expected NHWC input and HWIO kernel, got {x.shape} and {kernel.shape}.")
    strides = pair(strides, "strides", (1, 1))
    kh, kw = kernel.shape[:2]
    pads = explicit_pads(padding, x.shape[1:3], (kh, kw), strides)
    lowering = conv_lowering(impl, kernel.shape, strides)
    operands = operand_dtype(operands)
    if lowering == "xla":
        return conv_xla(x, kernel, strides, pads, operands)
    if lowering == "1x1":
        return conv_1x1(x, kernel, strides, pads, operands)
    if lowering == "winograd":
        return conv_winograd(x, kernel, pads)
    out_hw = tuple(out_size(x.shape[i + 1], kernel.shape[i], strides[i], pads[i]) for i in range(2))
    if uses_output_blocks(kernel.shape, strides, out_hw):
        return conv_blocked(x, kernel, pads, operands)
    return conv_im2col(x, kernel, strides, pads, operands)


class Conv(nn.Module):
    """Drop-in replacement for 2-D ``flax.linen.Conv`` with a selectable lowering.

    Parameters are named and shaped exactly like ``flax.linen.Conv`` (``kernel``:
    ``(kh, kw, Cin, features)``, ``bias``: ``(features,)``), so checkpoints move freely between
    this module, ``nn.Conv`` and the different ``impl`` values. No dilation, feature groups or
    circular padding.

    Attributes:
      features: number of output channels.
      kernel_size: pair, or an int for a square kernel (for ``nn.Conv`` an int means 1-D).
      strides: int or pair.
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of ints / ``(lo, hi)`` pairs.
      use_bias: whether to add a bias.
      impl: one of ``CONV_IMPLS``.
      operands: matmul operand dtype, a key of ``CONV_OPERANDS`` (see ``conv2d``).
      dtype: computation dtype (``None``: inferred from inputs and params, as in flax).
      param_dtype: parameter dtype.
      kernel_init: kernel initializer.
      bias_init: bias initializer.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = (1, 1)
    padding: Padding = "SAME"
    use_bias: bool = True
    impl: str = "auto"
    operands: str = "float32"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the convolution.

        Args:
          inputs: ``(*batch, H, W, Cin)`` input; batch dims are flattened as in
            ``flax.linen.Conv`` (and an unbatched ``(H, W, Cin)`` input is accepted).

        Returns:
          ``(*batch, Ho, Wo, features)`` output.
        """
        kernel_size = pair(self.kernel_size, "kernel_size", (1, 1))
        inputs, unflatten = flatten_batch(inputs)
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, inputs.shape[-1], self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv2d(inputs, kernel, self.strides, self.padding, self.impl, self.operands)
        if bias is not None:
            y = y + bias
        return unflatten(y)
