"""Convolution and pooling layers with CPU-efficient lowerings.

XLA:CPU is a poor fit for the small convnets used in transfer-learning experiments: the forward
convolution is lowered to a tiled kernel that runs reasonably, but the two backward convolutions
are not. The kernel gradient is emitted as a convolution whose "window" is the whole feature map
and the input gradient as a fully padded convolution that falls back to a generic loop; on a
2-core machine they run at 5-20 GFLOP/s while a plain matmul runs at 100+ GFLOP/s. Max-pool's
backward (``select_and_scatter``) is similarly slow. Everything here therefore has two lowerings:

* ``'xla'``: the textbook ``lax.conv_general_dilated`` / ``flax.linen.max_pool``. Best on GPU/TPU.
* ``'im2col'``: convolution gradients expressed as matmuls over image patches, and pooling as
  reshapes / strided slices with elementwise ``max``. Best on CPU.

``impl='auto'`` (the default everywhere) picks ``'im2col'`` when ``jax.default_backend()`` is
``'cpu'`` and ``'xla'`` otherwise. Both lowerings compute the same function (up to float
rounding) with the same parameter layout, so a checkpoint trained with one runs under the other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "CONV_IMPLS",
    "Conv",
    "avg_pool",
    "conv2d",
    "max_pool",
    "resolve_impl",
]

CONV_IMPLS = ("auto", "xla", "im2col")

Array = jax.Array
Padding = str | int | Sequence[int | tuple[int, int]]
Pads = tuple[tuple[int, int], tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Bytes of one batch chunk of the (kh*kw*cin, chunk*ho*wo) patch matrix built for the kernel
# gradient. Materialising the patches of a whole batch costs more than the matmul itself: tens of
# MB of freshly allocated memory, which on CPU means page faults on every step. Chunks of a few MB
# stay in cache and are reused by every iteration of the scan. Measured optimum on the digit net
# is 1-4 MB; the result is flat in that range.
_PATCH_CHUNK_BYTES = 3 * 2**20


def resolve_impl(impl: str) -> str:
    """Resolves a lowering name to the concrete lowering for the current backend.

    ``jax.default_backend`` is looked up on the ``jax`` module at call (i.e. trace) time, so it
    can be patched with ``unittest.mock.patch("jax.default_backend", ...)`` in tests.

    Args:
      impl: one of ``CONV_IMPLS``. ``'auto'`` means ``'im2col'`` on CPU and ``'xla'`` on any
        other backend; the other names are returned unchanged.

    Returns:
      ``'xla'`` or ``'im2col'``.

    Raises:
      ValueError: if ``impl`` is not one of ``CONV_IMPLS``.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown impl {impl!r}; expected one of {CONV_IMPLS}.")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


# ----------------------------------------------------------------------------------------------
# Argument canonicalisation (same conventions as flax.linen.Conv / flax.linen.pooling).


def _pair(value: int | Sequence[int] | None, name: str, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}.")
    return value  # type: ignore[return-value]


def _explicit_pads(
    padding: Padding,
    in_hw: tuple[int, int],
    window: tuple[int, int],
    strides: tuple[int, int],
) -> Pads:
    """Turns flax/lax-style padding into explicit ``((lo, hi), (lo, hi))`` pairs."""
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


def _out_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def _strided_slices(x: Array, axis: int, k: int, stride: int, out: int) -> list[Array]:
    """The ``k`` kernel-offset slices ``x[..., i : i + stride * out : stride, ...]``."""
    return [lax.slice_in_dim(x, i, i + stride * (out - 1) + 1, stride, axis) for i in range(k)]


def _flatten_batch(x: Array) -> tuple[Array, Callable[[Array], Array]]:
    """Maps ``(*batch, H, W, C)`` to ``(N, H, W, C)`` and returns the inverse for outputs."""
    if x.ndim < 3:
        raise ValueError(f"Expected (*batch, H, W, C) input, got shape {x.shape}.")
    batch = x.shape[:-3]
    if len(batch) == 1:
        return x, lambda y: y
    x = x.reshape((-1, *x.shape[-3:]))
    return x, lambda y: y.reshape((*batch, *y.shape[1:]))


# ----------------------------------------------------------------------------------------------
# Convolution.


def _conv_xla(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads) -> Array:
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_DIMENSION_NUMBERS
    )


def _conv_1x1(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads) -> Array:
    # A 1x1 convolution is a matmul over the (strided) pixels; autodiff of this gives plain
    # matmuls for both gradients, unlike the whole-image-window convolution XLA emits for dK.
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    x = x[:, :: strides[0], :: strides[1], :]
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def _patches_t(x: Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> Array:
    """Transposed im2col matrix of a batch chunk.

    Args:
      x: ``(B, H, W, C)`` unpadded input chunk.
      kh, kw: kernel size.
      strides: convolution strides.
      pads: explicit padding.

    Returns:
      ``(kh * kw * C, B * ho * wo)``; rows ordered like ``kernel.reshape(kh * kw * C, cout)``,
      columns like ``dy.reshape(B * ho * wo, cout)``.
    """
    b, h, w, c = x.shape
    ho = _out_size(h, kh, strides[0], pads[0])
    wo = _out_size(w, kw, strides[1], pads[1])
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    # Channel-major layout makes every kernel-offset slice a copy of contiguous runs of `wo`
    # (then `ho * wo`) elements. The channels-last concatenation instead moves runs of `cin`
    # elements (3 for RGB input), which XLA:CPU copies several times slower. Slicing W first and
    # then H halves the number of slice ops (kh + kw instead of kh * kw separate copies).
    xt = jnp.transpose(x, (3, 0, 1, 2))  # C, B, Hp, Wp
    cols = jnp.stack(_strided_slices(xt, 3, kw, strides[1], wo), 0)  # kw, C, B, Hp, wo
    rows = jnp.stack(_strided_slices(cols, 3, kh, strides[0], ho), 0)  # kh, kw, C, B, ho, wo
    return rows.reshape(kh * kw * c, b * ho * wo)


def _chunk_size(n: int, target: int) -> int:
    """A chunk size near ``target``; a divisor of ``n`` if one is within 2x (no remainder)."""
    target = max(1, min(n, target))
    for c in range(target, max(1, target // 2) - 1, -1):
        if n % c == 0:
            return c
    return target


def _kernel_grad(x: Array, dy: Array, kernel_shape, strides: tuple[int, int], pads: Pads) -> Array:
    """``dL/dkernel`` as a sum over batch chunks of ``patches^T @ dy`` (float32 accumulation)."""
    kh, kw, cin, cout = kernel_shape
    n = x.shape[0]
    ho, wo = dy.shape[1:3]
    per_example = kh * kw * cin * ho * wo * x.dtype.itemsize
    chunk = _chunk_size(n, _PATCH_CHUNK_BYTES // max(per_example, 1))

    def chunk_grad(xc: Array, dyc: Array) -> Array:
        p = _patches_t(xc, kh, kw, strides, pads)
        return lax.dot_general(
            p,
            dyc.reshape(-1, cout),
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    num_chunks, rem = divmod(n, chunk)
    if num_chunks <= 1:
        acc = chunk_grad(x[:chunk], dy[:chunk])
    else:
        # A scan (rather than one big matmul) keeps the patch matrix in cache: see
        # _PATCH_CHUNK_BYTES.
        def body(acc, xs):
            return acc + chunk_grad(*xs), None

        split = lambda a: a[: num_chunks * chunk].reshape((num_chunks, chunk, *a.shape[1:]))
        acc, _ = lax.scan(body, jnp.zeros((kh * kw * cin, cout), jnp.float32), (split(x), split(dy)))
    if rem:
        acc = acc + chunk_grad(x[n - rem :], dy[n - rem :])
    return acc.reshape(kernel_shape)


def _patches_nhwc(x: Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> Array:
    """``(B, ho, wo, kh * kw * C)`` patches, channel order matching ``kernel.reshape``."""
    h, w = x.shape[1:3]
    ho = _out_size(h, kh, strides[0], pads[0])
    wo = _out_size(w, kw, strides[1], pads[1])
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    rows = _strided_slices(x, 1, kh, strides[0], ho)
    return jnp.concatenate([s for r in rows for s in _strided_slices(r, 2, kw, strides[1], wo)], -1)


def _input_grad_col2im(dy: Array, kernel: Array, x_shape, strides, pads) -> Array:
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x_shape
    ho, wo = dy.shape[1:3]
    km = kernel.reshape(kh * kw * cin, cout)
    chunk = _chunk_size(n, _PATCH_CHUNK_BYTES // max(kh * kw * cin * ho * wo * dy.dtype.itemsize, 1))

    def chunk_grad(dyc):
        dp = lax.dot_general(dyc, km, (((3,), (1,)), ((), ())))
        aval = jax.ShapeDtypeStruct((dyc.shape[0], h, w, cin), dy.dtype)
        return jax.linear_transpose(lambda z: _patches_nhwc(z, kh, kw, strides, pads), aval)(dp)[0]

    num_chunks, rem = divmod(n, chunk)
    if num_chunks <= 1:
        return chunk_grad(dy) if not rem else jnp.concatenate([chunk_grad(dy[:chunk]), chunk_grad(dy[chunk:])])
    main = dy[: num_chunks * chunk].reshape((num_chunks, chunk, *dy.shape[1:]))
    _, dx = lax.scan(lambda c, d: (c, chunk_grad(d)), None, main)
    dx = dx.reshape((num_chunks * chunk, h, w, cin))
    if rem:
        dx = jnp.concatenate([dx, chunk_grad(dy[n - rem :])])
    return dx


_DX_MODE = "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads) -> Array:
    # The forward pass is the native convolution: XLA:CPU lowers it to a tiled im2col kernel
    # (YNNPACK) that runs at matmul speed without materialising the patches. Only the backward
    # pass needs replacing.
    return _conv_xla(x, kernel, strides, pads)


_FWD_MODE = "xla"


def _conv_matmul_chunked(x: Array, kernel: Array, strides, pads) -> Array:
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ho = _out_size(h, kh, strides[0], pads[0])
    wo = _out_size(w, kw, strides[1], pads[1])
    km = kernel.reshape(kh * kw * cin, cout)
    chunk = _chunk_size(n, _PATCH_CHUNK_BYTES // max(kh * kw * cin * ho * wo * x.dtype.itemsize, 1))

    def chunk_out(xc):
        return lax.dot_general(
            _patches_nhwc(xc, kh, kw, strides, pads), km, (((3,), (0,)), ((), ()))
        )

    num_chunks, rem = divmod(n, chunk)
    if num_chunks <= 1:
        return chunk_out(x) if not rem else jnp.concatenate([chunk_out(x[:chunk]), chunk_out(x[chunk:])])
    main = x[: num_chunks * chunk].reshape((num_chunks, chunk, *x.shape[1:]))
    _, y = lax.scan(lambda c, d: (c, chunk_out(d)), None, main)
    y = y.reshape((num_chunks * chunk, ho, wo, cout))
    if rem:
        y = jnp.concatenate([y, chunk_out(x[n - rem :])])
    return y


def _conv_im2col_fwd(x, kernel, strides, pads):
    if _FWD_MODE == "im2col":
        return _conv_matmul_chunked(x, kernel, strides, pads), (x, kernel)
    return _conv_xla(x, kernel, strides, pads), (x, kernel)


def _conv_im2col_bwd(strides, pads, res, dy):
    x, kernel = res
    x, dy = lax.optimization_barrier((x, dy))
    dkernel = _kernel_grad(x, dy, kernel.shape, strides, pads).astype(kernel.dtype)
    # The input gradient is the transposed convolution. XLA's own lowering of it is a
    # (non-tiled) convolution that is still within 2x of matmul speed for these shapes, and
    # beats col2im, whose scatter-add of kh*kw shifted copies is memory bound.
    if _DX_MODE == "col2im":
        dx = _input_grad_col2im(dy, kernel, x.shape, strides, pads)
        return dx, dkernel
    (dx,) = jax.linear_transpose(
        functools.partial(_conv_xla, kernel=kernel, strides=strides, pads=pads),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
    )(dy)
    return dx, dkernel


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


def conv2d(
    x: Array,
    kernel: Array,
    strides: int | Sequence[int] = (1, 1),
    padding: Padding = "SAME",
    impl: str = "auto",
) -> Array:
    """2-D convolution with a selectable lowering.

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(kh, kw, Cin, Cout)`` kernel (``flax.linen.Conv`` layout), same dtype as ``x``.
      strides: int or pair of ints.
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of two ints or ``(lo, hi)`` pairs;
        same meaning as in ``flax.linen.Conv``.
      impl: one of ``CONV_IMPLS``; see ``resolve_impl``.

    Returns:
      ``(N, Ho, Wo, Cout)`` output with the dtype ``lax.conv_general_dilated`` would return.
    """
    impl = resolve_impl(impl)
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"Expected NHWC input and HWIO kernel, got {x.shape} and {kernel.shape}.")
    strides = _pair(strides, "strides", (1, 1))
    kh, kw = kernel.shape[:2]
    pads = _explicit_pads(padding, x.shape[1:3], (kh, kw), strides)
    if impl == "xla":
        return _conv_xla(x, kernel, strides, pads)
    if (kh, kw) == (1, 1):
        return _conv_1x1(x, kernel, strides, pads)
    return _conv_im2col(x, kernel, strides, pads)


# ----------------------------------------------------------------------------------------------
# Pooling.


def _pool_pads(x: Array, window, strides, padding) -> Pads:
    return _explicit_pads(padding, x.shape[1:3], window, strides)


def _max_pool_cpu(x: Array, window, strides, pads: Pads) -> Array:
    return _max_pool_vjp(x, window, strides, pads)


def _window_views(x: Array, window, strides, pads: Pads, fill) -> tuple[list[Array], Any]:
    """The kh*kw kernel-offset views of the padded input, each of output shape."""
    n, h, w, c = x.shape
    ho = _out_size(h, window[0], strides[0], pads[0])
    wo = _out_size(w, window[1], strides[1], pads[1])
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=fill)
    if tuple(window) == tuple(strides):
        # Non-overlapping windows: a reshape exposes each window offset as an axis, so no
        # strided copies are needed.
        kh, kw = window
        xw = x[:, : ho * kh, : wo * kw].reshape(n, ho, kh, wo, kw, c)
        return [xw[:, :, i, :, j] for i in range(kh) for j in range(kw)], (ho, wo)
    views = []
    for i in range(window[0]):
        row = lax.slice_in_dim(x, i, i + strides[0] * (ho - 1) + 1, strides[0], 1)
        views.extend(_strided_slices(row, 2, window[1], strides[1], wo))
    return views, (ho, wo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_vjp(x: Array, window, strides, pads: Pads) -> Array:
    # The forward pass is the native reduction: XLA:CPU fuses it (and the convolutions and
    # elementwise ops around it) into one tiled YNNPACK kernel, and any other formulation here
    # (e.g. strided slices) splits that kernel and costs several times more than the pooling.
    return nn.max_pool(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
    y = _max_pool_vjp(x, window, strides, pads)
    return y, (x, y)


def _max_pool_bwd(window, strides, pads, res, g):
    # Routes each output gradient to the first maximum of its window in row-major order, which
    # is exactly what XLA's select_and_scatter does (so gradients match impl='xla' even with
    # ties, e.g. bf16), but as elementwise ops that fuse into one loop.
    x, y = res
    views, (ho, wo) = _window_views(x, window, strides, pads, -jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for v in views:
        hit = (v == y) & ~taken
        taken = taken | hit
        parts.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
    kh, kw = window
    n, h, w, c = x.shape
    hp, wp = h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]
    if tuple(window) == tuple(strides):
        dxp = jnp.stack(parts, 3).reshape(n, ho, wo, kh, kw, c)
        dxp = dxp.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho * kh, wo * kw, c)
        dxp = jnp.pad(dxp, ((0, 0), (0, hp - ho * kh), (0, wp - wo * kw), (0, 0)))
    else:
        # Transpose of the strided slices: scatter each offset's contribution back with an
        # interior-padded pad and sum (one fused loop).
        dxp = None
        for t, part in enumerate(parts):
            i, j = divmod(t, kw)
            cfg = (
                (0, 0, 0),
                (i, hp - i - strides[0] * (ho - 1) - 1, strides[0] - 1),
                (j, wp - j - strides[1] * (wo - 1) - 1, strides[1] - 1),
                (0, 0, 0),
            )
            term = lax.pad(part, jnp.zeros((), part.dtype), cfg)
            dxp = term if dxp is None else dxp + term
    dx = dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w]
    return (dx,)


_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)


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
      impl: one of ``CONV_IMPLS``; ``'im2col'`` means the reshape/strided-slice lowering whose
        gradient avoids ``select_and_scatter``.

    Returns:
      ``(*batch, Ho, Wo, C)`` pooled output.
    """
    impl = resolve_impl(impl)
    window = _pair(window, "window", (1, 1))
    strides = _pair(strides, "strides", window)
    x, unflatten = _flatten_batch(x)
    pads = _pool_pads(x, window, strides, padding)
    if impl == "xla":
        return unflatten(nn.max_pool(x, window, strides, pads))
    return unflatten(_max_pool_vjp(x, window, strides, pads))


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
      impl: one of ``CONV_IMPLS``.

    Returns:
      ``(*batch, Ho, Wo, C)`` pooled output.
    """
    impl = resolve_impl(impl)
    window = _pair(window, "window", (1, 1))
    strides = _pair(strides, "strides", window)
    x, unflatten = _flatten_batch(x)
    pads = _pool_pads(x, window, strides, padding)
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


# ----------------------------------------------------------------------------------------------
# Module.


class Conv(nn.Module):
    """Drop-in replacement for 2-D ``flax.linen.Conv`` with a selectable lowering.

    Parameters are named and shaped exactly like ``flax.linen.Conv`` (``kernel``:
    ``(kh, kw, Cin, features)``, ``bias``: ``(features,)``), so checkpoints move freely between
    this module, ``nn.Conv`` and the different ``impl`` values.

    Attributes:
      features: number of output channels.
      kernel_size: int or pair.
      strides: int or pair.
      padding: ``'SAME'``, ``'VALID'``, an int, or a sequence of ints / ``(lo, hi)`` pairs.
      use_bias: whether to add a bias.
      impl: one of ``CONV_IMPLS``.
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
        kernel_size = _pair(self.kernel_size, "kernel_size", (1, 1))
        if inputs.ndim == 3:
            return self(inputs[None])[0]
        inputs, unflatten = _flatten_batch(inputs)
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
        y = conv2d(inputs, kernel, self.strides, self.padding, self.impl)
        if bias is not None:
            y = y + bias
        return unflatten(y)
