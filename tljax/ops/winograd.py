"""The ``'winograd'`` convolution: stride-1 layers as Winograd F(4x4, kh x kw).

Lavin & Gray 2016: for kernel sides 2-5, 4-6x fewer multiplications than a direct or im2col
convolution and no patch matrix, at the price of tile transforms. Used under differentiation;
without it the native convolution runs, which XLA fuses with its neighbours.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tljax.ops.native import conv_xla
from tljax.ops.shapes import Pads, compute_dtype, pad_spatial

Array = jax.Array

# Output tile side m of F(m x m, r x r). Larger tiles save more multiplications but need more
# interpolation points, which worsens fp32 rounding: with m = 4 and r <= 5 the error stays within
# a few float32 ulps of the output's scale (tests/test_ops_winograd.py bounds it).
_WINOGRAD_TILE = 4
# Interpolation points, finite ones first (infinity is implied as the last point); the small
# magnitudes keep the transforms well conditioned (the choice of Lavin & Gray and of cuDNN).
_WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
# auto uses Winograd for layers whose im2col patch (kh * kw * cin values) is at least this long
# (see conv_lowering): set from `python benchmarks/conv_lowering.py --layers`.
WINOGRAD_MIN_PATCH = 256


@functools.cache
def winograd_matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Toom-Cook matrices of the 1-D minimal filtering algorithm F(m, r).

    For a length-``m + r - 1`` signal ``d`` and a length-``r`` filter ``g``, the correlation
    ``y[i] = sum_k g[k] d[i + k]`` equals ``AT @ ((G @ g) * (BT @ d))``, using ``m + r - 1``
    multiplications instead of ``m * r``. Derived from polynomial multiplication evaluated at the
    points ``_WINOGRAD_POINTS`` and infinity: ``G`` and ``AT.T`` are Vandermonde matrices and
    ``BT`` is the transposed inverse of the full one.

    Args:
      m: outputs per tile.
      r: filter length.

    Returns:
      ``(AT, G, BT)`` as float64 arrays of shapes ``(m, a)``, ``(a, r)``, ``(a, a)``, ``a = m + r
      - 1``.

    Raises:
      ValueError: if F(m, r) needs more points than ``_WINOGRAD_POINTS`` provides.
    """
    a = m + r - 1
    if a - 1 > len(_WINOGRAD_POINTS):
        raise ValueError(f"F({m}, {r}) needs {a - 1} finite points; have {len(_WINOGRAD_POINTS)}.")
    vander = np.zeros((a, a))
    for row, point in enumerate(_WINOGRAD_POINTS[: a - 1]):
        vander[row] = point ** np.arange(a)
    vander[a - 1, a - 1] = 1.0  # Infinity picks the leading coefficient.

    def leading_at_infinity(cols: int) -> np.ndarray:
        part = vander[:, :cols].copy()
        part[a - 1] = 0.0
        part[a - 1, cols - 1] = 1.0
        return part

    return leading_at_infinity(m).T, leading_at_infinity(r), np.linalg.inv(vander).T


def _tiles(x: Array, m: int, a_hw: tuple[int, int], tiles_hw: tuple[int, int]) -> Array:
    """The overlapping ``a_h x a_w`` input tiles at stride ``m``: ``(N, th, a_h, tw, a_w, C)``.

    ``x`` is ``(N, m * (th + 1), m * (tw + 1), C)``. As ``a <= 2m``, each tile is a block of ``m``
    rows (columns) plus the start of the next block: one reshape and two concatenations, whose
    transposes (for the input gradient) are two slices and adds, not a scatter of ``a`` windows.
    """
    (ah, aw), (th, tw) = a_hw, tiles_hw
    n, _, _, c = x.shape
    blocks = x.reshape(n, th + 1, m, m * (tw + 1), c)
    rows = jnp.concatenate([blocks[:, :th], blocks[:, 1:, : ah - m]], axis=2)
    blocks = rows.reshape(n, th, ah, tw + 1, m, c)
    return jnp.concatenate([blocks[:, :, :, :tw], blocks[:, :, :, 1:, : aw - m]], axis=4)


def _winograd(x: Array, kernel: Array, pads: Pads) -> Array:
    """Stride-1 convolution as F(4x4, kh x kw) Winograd. Differentiated by autodiff: the
    transposes of the transforms and matmul are the same algorithm for both gradients.

    Each 2-D transform is one matmul with the Kronecker product of its 1-D matrices (e.g. 64 x 64
    for the 8 x 8 input tiles of a 5 x 5 kernel) rather than two small-contraction products: 4x
    the multiplications of the separable form, but as one wide matmul it is faster on CPU (the
    digit net's step ~15% faster), and it needs no intermediate layouts.
    """
    kh, kw, cin, cout = kernel.shape
    m = _WINOGRAD_TILE
    ct = compute_dtype(x.dtype)
    (at_h, g_h, bt_h), (at_w, g_w, bt_w) = winograd_matrices(m, kh), winograd_matrices(m, kw)
    ah, aw = bt_h.shape[0], bt_w.shape[0]
    x = pad_spatial(x.astype(ct), pads)
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    th, tw = -(-ho // m), -(-wo // m)
    x = jnp.pad(x, ((0, 0), (0, m * (th + 1) - h), (0, m * (tw + 1) - w), (0, 0)))
    tiles = _tiles(x, m, (ah, aw), (th, tw))
    # Input transform B^T d B, indexed by tile frequency f = (p, q): (ah * aw, tiles, cin).
    bt = np.kron(bt_h, bt_w).reshape(ah * aw, ah, aw)
    v = jnp.einsum("fij,ntiujc->fntuc", jnp.asarray(bt, ct), tiles)
    v = v.reshape(ah * aw, n * th * tw, cin)
    # Kernel transform G k G^T, in fp32 (as lax.conv accumulates): (ah * aw, cin, cout).
    g = jnp.asarray(np.kron(g_h, g_w), jnp.float32)
    u = (g @ kernel.reshape(kh * kw, cin * cout).astype(jnp.float32)).astype(ct)
    prod = lax.dot_general(v, u.reshape(ah * aw, cin, cout), (((2,), (1,)), ((0,), (0,))))
    # Output transform A^T y A: (m * m, tiles, cout), then back to the image layout.
    y = jnp.tensordot(jnp.asarray(np.kron(at_h, at_w), ct), prod, axes=1)
    y = y.reshape(m, m, n, th, tw, cout).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, th * m, tw * m, cout)[:, :ho, :wo]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_winograd(x: Array, kernel: Array, pads: Pads) -> Array:
    """Stride-1 convolution, differentiated as Winograd F(4x4, kh x kw).

    Args:
      x: ``(N, H, W, Cin)`` input.
      kernel: ``(kh, kw, Cin, Cout)`` kernel, sides 2-5.
      pads: explicit padding pairs.

    Returns:
      ``(N, Ho, Wo, Cout)`` output in ``x``'s dtype.
    """
    # Not differentiated: the native convolution, fused by XLA with its neighbours (as im2col).
    return conv_xla(x, kernel, (1, 1), pads)


def _conv_winograd_fwd(x, kernel, pads):
    # The vjp function is a pytree of the residual arrays (the transformed tiles and kernel).
    return jax.vjp(lambda x, k: _winograd(x, k, pads).astype(x.dtype), x, kernel)


def _conv_winograd_bwd(pads, vjp, dy):
    del pads
    return vjp(dy)


conv_winograd.defvjp(_conv_winograd_fwd, _conv_winograd_bwd)
