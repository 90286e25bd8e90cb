"""Max and average pooling with a selectable lowering (``impl``, as for ``tljax.ops.conv2d``).

Why: XLA:CPU differentiates max-pooling with ``select_and_scatter``, 3-25x slower than the
formulation here. Under ``'im2col'`` (and ``'winograd'``, which has no pooling of its own) the
forward pass stays the native reduction, which XLA fuses with the convolution, bias and ReLU
around it, while the backward pass scatters the gradient to the argmax recorded in the forward
pass with fused elementwise ops; it goes to the same element as XLA's, ties included. Average
pooling becomes sums of strided views, which differentiate into pads and adds. ``'xla'`` is
``flax.linen.max_pool`` / ``avg_pool``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tljax.ops.conv import resolve_impl
from tljax.ops.shapes import (
    Padding,
    Pads,
    explicit_pads,
    flatten_batch,
    out_size,
    pad_spatial,
    pair,
    strided_slices,
)

Array = jax.Array


def _pool_args(x: Array, window, strides, padding, impl: str):
    """Resolved impl, ``(N, H, W, C)`` input and its unflatten, window, strides and pads."""
    impl = resolve_impl(impl)
    window = pair(window, "window", (1, 1))
    strides = pair(strides, "strides", window)
    x, unflatten = flatten_batch(x)
    pads = explicit_pads(padding, x.shape[1:3], window, strides)
    return impl, x, unflatten, window, strides, pads


def _window_views(x: Array, window, strides, pads: Pads, fill) -> tuple[list[Array], Any]:
    """The kh*kw kernel-offset views of the padded input, each of output shape."""
    n, h, w, c = x.shape
    ho = out_size(h, window[0], strides[0], pads[0])
    wo = out_size(w, window[1], strides[1], pads[1])
    x = pad_spatial(x, pads, fill)
    if tuple(window) == tuple(strides):
        # Non-overlapping windows: a reshape exposes each window offset as an axis, so no
        # strided copies are needed.
        kh, kw = window
        xw = x[:, : ho * kh, : wo * kw].reshape(n, ho, kh, wo, kw, c)
        return [xw[:, :, i, :, j] for i in range(kh) for j in range(kw)], (ho, wo)
    views = []
    for i in range(window[0]):
        row = lax.slice_in_dim(x, i, i + strides[0] * (ho - 1) + 1, strides[0], 1)
        views.extend(strided_slices(row, 2, window[1], strides[1], wo))
    return views, (ho, wo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_cpu(x: Array, window, strides, pads: Pads) -> Array:
    # Not differentiated: the native reduction, which XLA:CPU fuses with the surrounding ops
    # (convolution, bias, ReLU) into one tiled YNNPACK kernel.
    return nn.max_pool(x, window, strides, pads)


def _max_pool_cpu_fwd(x, window, strides, pads):
    # Returns the max and, for the backward pass, the offset of the first maximum in each window
    # (row-major: the element XLA's select_and_scatter picks, so gradients match impl='xla' even
    # with ties). Both come out of reductions, so XLA materialises the small offset array rather
    # than fusing its computation into (and repeating it in) each term of the backward scatter.
    kh, kw = window
    n, h, w, c = x.shape
    offset_dtype = jnp.int8 if kh * kw < 128 else jnp.int32
    if tuple(window) == tuple(strides):
        ho = out_size(h, kh, kh, pads[0])
        wo = out_size(w, kw, kw, pads[1])
        xp = pad_spatial(x, pads, -jnp.inf)[:, : ho * kh, : wo * kw]
        # Window offsets on the last axis; the transpose fuses into the reduction.
        xw = xp.reshape(n, ho, kh, wo, kw, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, -1)
        y, first = lax.reduce(
            (xw, lax.broadcasted_iota(jnp.int32, xw.shape, 4)),
            (jnp.array(-jnp.inf, x.dtype), jnp.array(np.iinfo(np.int32).max, jnp.int32)),
            _first_max,
            (4,),
        )
        return y, (first.astype(offset_dtype), _shape_token(x))

    rows = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 2)
    y, pos = lax.reduce_window(
        (x, rows * w + cols),
        (jnp.array(-jnp.inf, x.dtype), jnp.array(np.iinfo(np.int32).max, jnp.int32)),
        _first_max,
        (1, kh, kw, 1),
        (1, *strides, 1),
        ((0, 0), *pads, (0, 0)),
    )
    ho, wo = y.shape[1:3]
    di = pos // w + pads[0][0] - strides[0] * jnp.arange(ho)[:, None, None]
    dj = pos % w + pads[1][0] - strides[1] * jnp.arange(wo)[:, None]
    return y, ((di * kw + dj).astype(offset_dtype), _shape_token(x))


def _first_max(a, b):
    """Reducer over (value, index) pairs: the max, ties (and NaNs) going to the lower index."""
    (av, ai), (bv, bi) = a, b
    a_nan, b_nan = jnp.isnan(av), jnp.isnan(bv)
    a_wins = (av > bv) | (a_nan & ~b_nan) | (((av == bv) | (a_nan & b_nan)) & (ai < bi))
    return jnp.where(a_wins, av, bv), jnp.where(a_wins, ai, bi)


def _shape_token(x: Array) -> Array:
    # Residuals must be arrays: an empty one carries the input's spatial shape to the backward.
    return jnp.zeros((0, *x.shape[1:3], 0), x.dtype)


def _max_pool_cpu_bwd(window, strides, pads, res, g):
    # Scatter of the gradient to the recorded offsets as elementwise selects plus a transpose
    # (non-overlapping windows) or kh*kw interior-padded pads and adds (overlapping windows),
    # both single fused loops; XLA's select_and_scatter is 5-20x slower on CPU.
    first, x_hw = res
    kh, kw = window
    n, ho, wo, c = g.shape
    h, w = x_hw.shape[1:3]
    hp, wp = h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]
    zero = jnp.zeros((), g.dtype)
    parts = [jnp.where(first == t, g, zero) for t in range(kh * kw)]
    if tuple(window) == tuple(strides):
        dxp = jnp.stack(parts, 3).reshape(n, ho, wo, kh, kw, c)
        dxp = dxp.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho * kh, wo * kw, c)
        dxp = jnp.pad(dxp, ((0, 0), (0, hp - ho * kh), (0, wp - wo * kw), (0, 0)))
    else:
        dxp = None
        for t, part in enumerate(parts):
            i, j = divmod(t, kw)
            cfg = (
                (0, 0, 0),
                (i, hp - i - strides[0] * (ho - 1) - 1, strides[0] - 1),
                (j, wp - j - strides[1] * (wo - 1) - 1, strides[1] - 1),
                (0, 0, 0),
            )
            term = lax.pad(part, zero, cfg)
            dxp = term if dxp is None else dxp + term
    return (dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w],)


_max_pool_cpu.defvjp(_max_pool_cpu_fwd, _max_pool_cpu_bwd)


def max_pool(
    x: Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    impl: str = "auto",
) -> Array:
    """Max pooling over the two spatial dims of ``(*batch, H, W, C)`` input.

    Same padding semantics as ``flax.linen.max_pool`` (padded positions never win), but note the
    stride default: ``strides=None`` means ``strides = window`` (non-overlapping windows, as in
    PyTorch/Keras), whereas ``flax.linen.max_pool`` defaults to stride 1.

    Args:
      x: ``(*batch, H, W, C)`` input.
      window: int or pair, the pooling window.
      strides: int or pair; ``None`` means ``window``.
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of ``(lo, hi)`` pairs.
      impl: one of ``tljax.ops.CONV_IMPLS``. ``'im2col'`` keeps the native forward but
        differentiates through a (max, first-argmax) reduction and an elementwise scatter
        instead of XLA's ``select_and_scatter``; the gradient goes to the same element, ties
        included.

    Returns:
      ``(*batch, Ho, Wo, C)`` pooled output.
    """
    impl, x, unflatten, window, strides, pads = _pool_args(x, window, strides, padding, impl)
    if impl == "xla":
        return unflatten(nn.max_pool(x, window, strides, pads))
    return unflatten(_max_pool_cpu(x, window, strides, pads))


def avg_pool(
    x: Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    count_include_pad: bool = True,
    impl: str = "auto",
) -> Array:
    """Average pooling over the two spatial dims of ``(*batch, H, W, C)`` input.

    Same semantics as ``flax.linen.avg_pool`` except that ``strides=None`` means ``window``.

    Args:
      x: ``(*batch, H, W, C)`` input.
      window: int or pair, the pooling window.
      strides: int or pair; ``None`` means ``window``.
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of ``(lo, hi)`` pairs.
      count_include_pad: whether zero padding counts towards the window size.
      impl: one of ``tljax.ops.CONV_IMPLS``.

    Returns:
      ``(*batch, Ho, Wo, C)`` pooled output.
    """
    impl, x, unflatten, window, strides, pads = _pool_args(x, window, strides, padding, impl)
    if impl == "xla":
        return unflatten(nn.avg_pool(x, window, strides, pads, count_include_pad))
    # Sums of views differentiate into pads and adds instead of reduce_window's transpose.
    views, _ = _window_views(x, window, strides, pads, 0)
    y = functools.reduce(jnp.add, views)
    if count_include_pad or all(p == (0, 0) for p in pads):
        return unflatten(y / np.prod(window))
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    counts = functools.reduce(jnp.add, _window_views(ones, window, strides, pads, 0)[0])
    return unflatten(y / counts)
