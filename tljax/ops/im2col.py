"""The ``'im2col'`` convolution: under differentiation, matmuls over image patches.

XLA:CPU lowers a convolution's kernel gradient as a convolution whose window is the whole feature
map and its input gradient as a fully padded convolution outside the tiled kernels, both at a
fraction of its matmul speed. Here the forward pass and both gradients are matmuls over image
patches, built over chunks of the batch so that the patches stay in cache. Short patches (few
input channels) compute each 2x2 block of outputs at once (``conv_blocked``), which makes the
matmul 4x wider. Without differentiation the native convolution runs, which fuses best.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from tljax.ops.native import conv_xla, dot
from tljax.ops.shapes import Pads, compute_dtype, out_size, pad_spatial, strided_slices

Array = jax.Array

# Target size of the per-chunk patch matrix (chunk * ho * wo * kh * kw * cin elements). The
# patches of a whole batch (44 MB for the digit net's first conv) cost more to materialise than
# the matmul that consumes them, mostly in page faults on the freshly allocated buffer; a chunk of
# a few MB is allocated once per step, reused by every iteration of the scan and stays in cache.
# On the digit net the step time is within noise between 1.5 and 12 MB.
_PATCH_CHUNK_BYTES = 3 * 2**20


def _patches(x: Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> Array:
    """Channels-last im2col: ``(B, ho, wo, kh * kw * C)``, channels ordered like
    ``kernel.reshape(kh * kw * C, cout)``."""
    h, w = x.shape[1:3]
    ho = out_size(h, kh, strides[0], pads[0])
    wo = out_size(w, kw, strides[1], pads[1])
    rows = strided_slices(pad_spatial(x, pads), 1, kh, strides[0], ho)
    return jnp.concatenate([s for r in rows for s in strided_slices(r, 2, kw, strides[1], wo)], -1)


def _patches_t(x: Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> Array:
    """Channel-major im2col: ``(kh * kw * C, B * ho * wo)``.

    Rows are ordered like ``kernel.reshape(kh * kw * C, cout)`` and columns like
    ``dy.reshape(B * ho * wo, cout)``, so ``patches_t @ dy`` is the kernel gradient.
    """
    b, h, w, c = x.shape
    ho = out_size(h, kh, strides[0], pads[0])
    wo = out_size(w, kw, strides[1], pads[1])
    # In this layout every kernel-offset slice copies contiguous runs of `wo` elements, while the
    # channels-last concatenation copies runs of `cin` (3 for RGB input): 1.5-2x faster for the
    # kernel gradient. (For the forward matmul the transposed operand costs more than it saves.)
    xt = jnp.transpose(pad_spatial(x, pads), (3, 0, 1, 2))  # C, B, Hp, Wp
    cols = jnp.stack(strided_slices(xt, 3, kw, strides[1], wo), 0)  # kw, C, B, Hp, wo
    rows = jnp.stack(strided_slices(cols, 3, kh, strides[0], ho), 0)  # kh, kw, C, B, ho, wo
    return rows.reshape(kh * kw * c, b * ho * wo)


def _chunk_size(n: int, target: int) -> int:
    """A batch chunk near ``target``; a divisor of ``n`` if there is one within 2x."""
    target = max(1, min(n, target))
    for c in range(target, max(1, target // 2) - 1, -1):
        if n % c == 0:
            return c
    return target


def _batch_chunks(kernel_shape, out_hw, itemsize: int, n: int) -> int:
    kh, kw, cin, _ = kernel_shape
    per_example = kh * kw * cin * out_hw[0] * out_hw[1] * itemsize
    return _chunk_size(n, _PATCH_CHUNK_BYTES // max(per_example, 1))


def _chunked_map(fn: Callable[..., Array], arrays: tuple[Array, ...], chunk: int) -> Array:
    """``concatenate([fn(*chunk_of_arrays) ...])`` over batch chunks, as a scan."""
    n = arrays[0].shape[0]
    num_chunks, rem = divmod(n, chunk)
    if num_chunks <= 1:
        parts = [fn(*(a[:chunk] for a in arrays))]
    else:
        main = tuple(
            a[: num_chunks * chunk].reshape((num_chunks, chunk, *a.shape[1:])) for a in arrays
        )
        _, ys = lax.scan(lambda carry, xs: (carry, fn(*xs)), None, main)
        parts = [ys.reshape((num_chunks * chunk, *ys.shape[2:]))]
    if rem:
        parts.append(fn(*(a[n - rem :] for a in arrays)))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _chunked_sum(fn: Callable[..., Array], arrays: tuple[Array, ...], chunk: int) -> Array:
    """``sum(fn(*chunk_of_arrays) ...)`` over batch chunks, as a scan."""
    n = arrays[0].shape[0]
    num_chunks, rem = divmod(n, chunk)
    if num_chunks <= 1:
        total = fn(*(a[:chunk] for a in arrays))
    else:
        main = tuple(
            a[: num_chunks * chunk].reshape((num_chunks, chunk, *a.shape[1:])) for a in arrays
        )
        init = jax.eval_shape(fn, *(a[0] for a in main))
        total, _ = lax.scan(
            lambda acc, xs: (acc + fn(*xs), None), jnp.zeros(init.shape, init.dtype), main
        )
    if rem:
        total = total + fn(*(a[n - rem :] for a in arrays))
    return total


# Every im2col step runs over batch chunks (see _PATCH_CHUNK_BYTES): materialising the patches
# of a whole batch costs more than the matmul, and most of that is page faults on the fresh
# buffers, not copying.


def _conv_forward(x: Array, kernel: Array, strides, pads, operands) -> Array:
    kh, kw, cin, cout = kernel.shape
    out_hw = (
        out_size(x.shape[1], kh, strides[0], pads[0]),
        out_size(x.shape[2], kw, strides[1], pads[1]),
    )
    ct = compute_dtype(x.dtype)
    km = kernel.reshape(kh * kw * cin, cout).astype(ct)

    def chunk_out(xc):
        p = _patches(xc.astype(ct), kh, kw, strides, pads)
        return dot(p, km, (((3,), (0,)), ((), ())), operands)

    chunk = _batch_chunks(kernel.shape, out_hw, ct.itemsize, x.shape[0])
    # Cast after the scan: XLA fuses a cast inside the scan body into the update of the stacked
    # output and then re-converts the whole stack on every iteration.
    return _chunked_map(chunk_out, (x,), chunk).astype(x.dtype)


def _conv_kernel_grad(x: Array, dy: Array, kernel_shape, strides, pads, operands) -> Array:
    kh, kw, _, cout = kernel_shape
    ct = compute_dtype(x.dtype)

    def chunk_grad(xc, dyc):
        p = _patches_t(xc.astype(ct), kh, kw, strides, pads)
        return dot(p, dyc.reshape(-1, cout).astype(ct), (((1,), (0,)), ((), ())), operands)

    chunk = _batch_chunks(kernel_shape, dy.shape[1:3], ct.itemsize, x.shape[0])
    return _chunked_sum(chunk_grad, (x, dy), chunk).reshape(kernel_shape)


def _conv_input_grad(dy: Array, kernel: Array, x_shape, strides, pads, operands) -> Array:
    kh, kw, cin, cout = kernel.shape
    ct = compute_dtype(dy.dtype)
    km = kernel.reshape(kh * kw * cin, cout).astype(ct)

    def chunk_grad(dyc):
        # col2im: the transpose of the patch extraction scatter-adds the kh*kw slices of the
        # patch gradient back (pads and adds that XLA fuses into one loop). This beats XLA's
        # transposed convolution, which is not one of the tiled (YNNPACK) kernels.
        dp = dot(dyc.astype(ct), km, (((3,), (1,)), ((), ())), operands)
        aval = jax.ShapeDtypeStruct((dyc.shape[0], *x_shape[1:]), ct)
        (dx,) = jax.linear_transpose(lambda z: _patches(z, kh, kw, strides, pads), aval)(dp)
        return dx

    chunk = _batch_chunks(kernel.shape, dy.shape[1:3], ct.itemsize, dy.shape[0])
    return _chunked_map(chunk_grad, (dy,), chunk).astype(dy.dtype)  # See _conv_forward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, operands) -> Array:
    """Convolution whose forward and backward passes under differentiation are patch matmuls.

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(kh, kw, Cin, Cout)`` kernel.
      strides: pair of strides.
      pads: explicit padding pairs.
      operands: the matmuls' operand dtype (``native.operand_dtype``).

    Returns:
      ``(N, Ho, Wo, Cout)`` output in ``x``'s dtype.
    """
    # Not differentiated (inference): the native convolution, which XLA:CPU fuses together with
    # the surrounding bias/ReLU/pooling into one tiled YNNPACK kernel. Under differentiation the
    # output has to be materialised, and the kernel on its own is slower than the chunked im2col
    # matmul and page-faults far more memory (a quarter of the digit-net step).
    return conv_xla(x, kernel, strides, pads, operands)


def _conv_im2col_fwd(x, kernel, strides, pads, operands):
    return _conv_forward(x, kernel, strides, pads, operands), (x, kernel)


def _conv_im2col_bwd(strides, pads, operands, res, dy):
    x, kernel = res
    dkernel = _conv_kernel_grad(x, dy, kernel.shape, strides, pads, operands)
    dkernel = dkernel.astype(kernel.dtype)
    dx = _conv_input_grad(dy, kernel, x.shape, strides, pads, operands)
    return dx, dkernel


conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


# Output blocks: for a short patch (few input channels) the im2col matmul is narrow (``cout``
# columns) and its patch matrix is long. Computing each 2x2 block of outputs from one
# (kh + 1) x (kw + 1) window instead makes the matmul 4x wider and the patch matrix 2-3x smaller,
# for 1.4-1.8x the multiplications: the digit net's first conv (5x5x3) trains 1.5x faster. The
# windows are the im2col patches of a space-to-depth image (``_space_to_depth``).
_BLOCK = 2
# Patches shorter than this (kh * kw * cin values) use output blocks (stride-1 convs only).
_BLOCK_MAX_PATCH = 128


def uses_output_blocks(kernel_shape, strides, out_hw) -> bool:
    """Whether ``conv2d``'s im2col lowering computes 2x2 output blocks for this layer.

    Args:
      kernel_shape: ``(kh, kw, cin, cout)``.
      strides: pair of strides.
      out_hw: output height and width.

    Returns:
      True for stride-1 layers with a short patch and an even output size.
    """
    kh, kw, cin, _ = kernel_shape
    return (
        tuple(strides) == (1, 1)
        and kh * kw * cin < _BLOCK_MAX_PATCH
        and out_hw[0] % _BLOCK == 0
        and out_hw[1] % _BLOCK == 0
    )


def _s2d_window(k: int) -> int:
    """Rows (or columns) of a space-to-depth image covering one 2x2 output block's input."""
    return (k + _BLOCK) // _BLOCK


def _space_to_depth(x: Array, kernel_hw: tuple[int, int], blocks_hw: tuple[int, int]) -> Array:
    """``(N, H, W, C)`` -> ``(N, H', W', 4C)``, pixel ``(2y + i, 2x + j)`` at ``(y, x, (i, j, c))``,
    zero-padded at the bottom and right so that every block's window fits.

    A 2x2 output block's ``(kh + 1) x (kw + 1)`` input window is then a stride-1 window of the
    space-to-depth image, so its patches come from the plain im2col with 4x longer contiguous
    copies (12 values instead of 3 for RGB input).
    """
    s = _BLOCK
    n, h, w, c = x.shape
    hp = s * (blocks_hw[0] + _s2d_window(kernel_hw[0]) - 1)
    wp = s * (blocks_hw[1] + _s2d_window(kernel_hw[1]) - 1)
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(n, hp // s, s, wp // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hp // s, wp // s, s * s * c)


def _block_kernel(kernel: Array) -> Array:
    """``(patch, 4 * cout)``: the kernel placed at each of the 4 offsets of a 2x2 output block,
    rows ordered like the im2col patches of ``_space_to_depth``'s image."""
    kh, kw, cin, cout = kernel.shape
    s = _BLOCK
    ah, aw = _s2d_window(kh), _s2d_window(kw)
    placed = [
        jnp.pad(kernel, ((i, s * ah - kh - i), (j, s * aw - kw - j), (0, 0), (0, 0)))
        for i in range(s)
        for j in range(s)
    ]
    window = jnp.stack(placed, 3).reshape(ah, s, aw, s, cin, s * s, cout)
    return window.transpose(0, 2, 1, 3, 4, 5, 6).reshape(ah * aw * s * s * cin, s * s * cout)


def _from_blocks(y: Array) -> Array:
    n, bh, bw, _ = y.shape
    s = _BLOCK
    y = y.reshape(n, bh, bw, s, s, -1).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, bh * s, bw * s, -1)


def _to_blocks(dy: Array) -> Array:
    n, ho, wo, c = dy.shape
    s = _BLOCK
    dy = dy.reshape(n, ho // s, s, wo // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return dy.reshape(n, ho // s, wo // s, s * s * c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_blocked(x: Array, kernel: Array, pads: Pads, operands) -> Array:
    """Stride-1 convolution whose passes under differentiation work on 2x2 output blocks.

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(kh, kw, Cin, Cout)`` kernel.
      pads: explicit padding pairs; the output height and width must be even
        (``uses_output_blocks``).
      operands: the matmuls' operand dtype (``native.operand_dtype``).

    Returns:
      ``(N, Ho, Wo, Cout)`` output in ``x``'s dtype.
    """
    # Not differentiated: the native convolution (as for conv_im2col).
    return conv_xla(x, kernel, (1, 1), pads, operands)


def _block_patches(xp: Array, kernel_hw, blocks_hw, channel_major: bool = False) -> Array:
    ah, aw = _s2d_window(kernel_hw[0]), _s2d_window(kernel_hw[1])
    image = _space_to_depth(xp, kernel_hw, blocks_hw)
    patches = _patches_t if channel_major else _patches
    return patches(image, ah, aw, (1, 1), ((0, 0), (0, 0)))


def _conv_blocked_fwd(x, kernel, pads, operands):
    kh, kw = kernel.shape[:2]
    ct = compute_dtype(x.dtype)
    xp = pad_spatial(x.astype(ct), pads)
    blocks_hw = ((xp.shape[1] - kh + 1) // _BLOCK, (xp.shape[2] - kw + 1) // _BLOCK)
    patches = _block_patches(xp, (kh, kw), blocks_hw)
    y = dot(patches, _block_kernel(kernel.astype(ct)), (((3,), (0,)), ((), ())), operands)
    return _from_blocks(y).astype(x.dtype), (x, kernel)


def _conv_blocked_bwd(pads, operands, res, dy):
    x, kernel = res
    kh, kw, _, cout = kernel.shape
    ct = compute_dtype(x.dtype)
    dy_blocks = _to_blocks(dy.astype(ct))
    blocks_hw = dy_blocks.shape[1:3]
    xp = pad_spatial(x.astype(ct), pads)
    patches_t = _block_patches(xp, (kh, kw), blocks_hw, channel_major=True)
    dy_rows = dy_blocks.reshape(-1, _BLOCK * _BLOCK * cout)
    dblock_kernel = dot(patches_t, dy_rows, (((1,), (0,)), ((), ())), operands)
    block_kernel, kernel_vjp = jax.vjp(_block_kernel, kernel.astype(ct))
    (dkernel,) = kernel_vjp(dblock_kernel)
    # The input gradient (pruned by XLA where unused, as for an image): col2im of the blocks.
    dpatches = dot(dy_blocks, block_kernel, (((3,), (1,)), ((), ())), operands).astype(ct)
    (dxp,) = jax.linear_transpose(lambda z: _block_patches(z, (kh, kw), blocks_hw), xp)(dpatches)
    h, w = x.shape[1:3]
    dx = dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv_blocked.defvjp(_conv_blocked_fwd, _conv_blocked_bwd)
