"""Convolution and pooling layers with CPU-efficient lowerings.

Why: under differentiation, XLA:CPU runs small convnets at a tenth of its matmul speed. The
forward convolution is fine when XLA can fuse it with the ops around it into one tiled YNNPACK
kernel (inference), but the kernel gradient is lowered as a convolution whose window is the whole
feature map, the input gradient as a fully padded convolution outside the tiled kernels, and
max-pool's backward (``select_and_scatter``) is 3-25x slower than the fused formulation below.
Every op here therefore has several lowerings:

* ``'xla'``: ``lax.conv_general_dilated`` / ``flax.linen.max_pool``. Use on GPU/TPU.
* ``'im2col'``: under differentiation, the convolution's forward pass and both gradients are
  matmuls over image patches, built over chunks of the batch so that the patches stay in cache;
  max-pool records the argmax in its forward pass and scatters the gradient with fused
  elementwise ops. Without differentiation both keep the native ops, which fuse best. For CPU.
* ``'winograd'``: stride-1 convolutions with kernel sides 2-5 as Winograd F(4x4, kh x kw)
  (Lavin & Gray 2016): 4-6x fewer multiplications and no patch matrix, at the price of tile
  transforms. Other convolutions fall back to ``'im2col'``. Pooling as ``'im2col'``. For CPU.

``impl='auto'`` (the default everywhere) picks, on CPU, ``'winograd'`` for the stride-1 layers
with long patches and ``'im2col'`` for the rest (``conv_lowering``), and ``'xla'`` on any other
backend. All lowerings compute the same function with the same parameters (outputs and
gradients agree to float rounding; max-pool gradients agree exactly, ties included), so a
checkpoint trained with one runs under another.

On the DANN digit net (batch 256, 2-core CPU) a forward+backward step is ~1.9x faster with
``'im2col'`` than with ``'xla'``, and Winograd halves the second convolution's time again; see
``benchmarks/speed_dann.py``. The host allocator matters as much: see ``tljax/host.py``.
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
    "conv_lowering",
    "conv_options",
    "max_pool",
    "microbatched",
    "resolve_microbatch",
    "resolve_impl",
    "winograd_matrices",
]

CONV_IMPLS = ("auto", "xla", "im2col", "winograd")

Array = jax.Array
Padding = str | int | Sequence[int | tuple[int, int]]
Pads = tuple[tuple[int, int], tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Target size of the per-chunk patch matrix (chunk * ho * wo * kh * kw * cin elements). The
# patches of a whole batch (44 MB for the digit net's first conv) cost more to materialise than
# the matmul that consumes them, mostly in page faults on the freshly allocated buffer; a chunk of
# a few MB is allocated once per step, reused by every iteration of the scan and stays in cache.
# On the digit net the step time is within noise between 1.5 and 12 MB.
_PATCH_CHUNK_BYTES = 3 * 2**20


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
    sides 2-5, a patch of ``kh * kw * cin >= _WINOGRAD_MIN_PATCH`` values) and im2col for the
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
        return "winograd" if eligible and kh * kw * cin >= _WINOGRAD_MIN_PATCH else "im2col"
    if explicit == "winograd" and not eligible:
        return "im2col"
    return explicit


# Rows per micro-batch that ``resolve_microbatch('auto')`` gives on CPU: the DANN step runs
# 1.15-1.2x faster through the digit feature extractor in chunks of 16-64 than in one pass,
# because each chunk's activations stay in cache between the layers. With the Kronecker-form
# Winograd, 16 is 3-5% faster than 32 at 64+64 and 128+128, and 8 is 15% slower.
_CPU_MICROBATCH = 16
# At most this many micro-batches per call (see ``microbatched``).
_MAX_MICROBATCHES = 8


def resolve_microbatch(microbatch: int | str) -> int:
    """Rows per micro-batch of a feature extractor; 0 means one pass over the whole batch.

    Args:
      microbatch: a non-negative int (or its string, as ``--config.model.microbatch=32`` gives),
        or ``'auto'``: ``_CPU_MICROBATCH`` on the CPU backend and 0 elsewhere (accelerators want
        the largest matmuls).

    Returns:
      The number of rows per micro-batch.

    Raises:
      ValueError: for a negative int or an unknown string.
    """
    if microbatch == "auto":
        return _CPU_MICROBATCH if jax.default_backend() == "cpu" else 0
    try:
        rows = int(microbatch)
    except (TypeError, ValueError):
        rows = -1
    if rows < 0:
        raise ValueError(f"microbatch must be 'auto' or an int >= 0, got {microbatch!r}.")
    return rows


def microbatched(fn: Callable[[Array], Array], x: Array, size: int) -> Array:
    """``fn(x)`` for a per-example ``fn``, computed on chunks of ``size`` rows, concatenated.

    The chunks are separate (unrolled) calls, so that XLA runs each through all of ``fn``'s
    layers while its activations are in cache; the result equals ``fn(x)``.

    Args:
      fn: maps ``(B, ...)`` to ``(B, ...)``, each row depending on its own input row only.
      x: the input batch.
      size: rows per chunk; 0, or at least the batch size, means one call. Raised where
        needed to make at most ``_MAX_MICROBATCHES`` chunks.

    Returns:
      ``fn(x)``.
    """
    if size <= 0 or x.shape[0] <= size:
        return fn(x)
    # Every chunk is compiled as its own copy of `fn`: big batches (e.g. evaluation) get bigger
    # chunks, so that compile time stays bounded (32 chunks of a 500-image batch took 2 s).
    size = max(size, -(-x.shape[0] // _MAX_MICROBATCHES))
    return jnp.concatenate([fn(x[i : i + size]) for i in range(0, x.shape[0], size)])


# ----------------------------------------------------------------------------------------------
# Argument canonicalisation (same conventions as flax.linen.Conv / flax.linen.pooling).


def _pair(
    value: int | Sequence[int] | None, name: str, default: tuple[int, int]
) -> tuple[int, int]:
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


def _pad_spatial(x: Array, pads: Pads, value=0) -> Array:
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=value)


def _strided_slices(x: Array, axis: int, k: int, stride: int, out: int) -> list[Array]:
    """The ``k`` kernel-offset slices ``x[..., i : i + stride * out : stride, ...]``."""
    return [lax.slice_in_dim(x, i, i + stride * (out - 1) + 1, stride, axis) for i in range(k)]


def _flatten_batch(x: Array) -> tuple[Array, Callable[[Array], Array]]:
    """Maps ``(*batch, H, W, C)`` (any number of batch dims, including none) to
    ``(N, H, W, C)`` and returns the inverse for outputs."""
    if x.ndim < 3:
        raise ValueError(f"Expected (*batch, H, W, C) input, got shape {x.shape}.")
    batch = x.shape[:-3]
    if len(batch) == 1:
        return x, lambda y: y
    x = x.reshape((-1, *x.shape[-3:]))
    return x, lambda y: y.reshape((*batch, *y.shape[1:]))


# ----------------------------------------------------------------------------------------------
# Convolution.


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


def conv_options(model_config: Any) -> dict[str, str]:
    """A conv model's ``conv_impl`` and ``conv_operands`` attributes, from a config's ``model``.

    Every method builds its network through this, so both settings reach every model the same
    way, and a wrong value fails when the method is built rather than at the first trace.

    Args:
      model_config: a config's ``model`` block (a ConfigDict or mapping); ``conv_impl`` is
        required, ``conv_operands`` defaults to ``'float32'`` (configs saved before it existed).

    Returns:
      ``{'conv_impl': ..., 'conv_operands': ...}``, keyword arguments of the conv models.

    Raises:
      ValueError: an unknown ``conv_impl`` or ``conv_operands``.
    """
    options = {
        "conv_impl": model_config["conv_impl"],
        "conv_operands": model_config.get("conv_operands", "float32"),
    }
    if options["conv_impl"] not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={options['conv_impl']!r}; choose one of {CONV_IMPLS}.")
    operand_dtype(options["conv_operands"])
    return options


def _round_to_bfloat16(x: Array) -> Array:
    """``x.astype(jnp.bfloat16)`` (round to nearest even) for the custom-gradient lowerings'
    matmuls; not differentiable."""
    # Integer rounding instead of a convert op: XLA:CPU fuses it into the producing copy (the
    # patch extraction), where a float convert runs as a slow separate pass.
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    rounded = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    rounded = jnp.where(jnp.isnan(x), bits | jnp.uint32(0x400000), rounded)  # NaN stays NaN.
    return lax.bitcast_convert_type((rounded >> 16).astype(jnp.uint16), jnp.bfloat16)


def _dot(a: Array, b: Array, dimension_numbers, operands) -> Array:
    """``lax.dot_general`` on operands rounded to ``operands``, accumulated in fp32."""
    if operands is None:
        return lax.dot_general(a, b, dimension_numbers)
    # bfloat16 is the one reduced operand dtype (CONV_OPERANDS).
    a, b = _round_to_bfloat16(a), _round_to_bfloat16(b)
    return lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)


def _conv_xla(
    x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, operands=None
) -> Array:
    if operands is None:
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=_DIMENSION_NUMBERS
        )
    y = lax.conv_general_dilated(
        x.astype(operands),
        kernel.astype(operands),
        strides,
        pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        preferred_element_type=jnp.float32,
    )
    return y.astype(x.dtype)


def _conv_1x1(
    x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, operands=None
) -> Array:
    # A 1x1 convolution is a matmul over the (strided) pixels, and autodiff of a matmul gives
    # matmuls for both gradients. No chunking needed: there is no patch expansion.
    ct = _compute_dtype(x.dtype)
    xs = _pad_spatial(x, pads)[:, :: strides[0], :: strides[1], :]
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


def _patches(x: Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> Array:
    """Channels-last im2col: ``(B, ho, wo, kh * kw * C)``, channels ordered like
    ``kernel.reshape(kh * kw * C, cout)``."""
    h, w = x.shape[1:3]
    ho = _out_size(h, kh, strides[0], pads[0])
    wo = _out_size(w, kw, strides[1], pads[1])
    rows = _strided_slices(_pad_spatial(x, pads), 1, kh, strides[0], ho)
    return jnp.concatenate([s for r in rows for s in _strided_slices(r, 2, kw, strides[1], wo)], -1)


def _patches_t(x: Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> Array:
    """Channel-major im2col: ``(kh * kw * C, B * ho * wo)``.

    Rows are ordered like ``kernel.reshape(kh * kw * C, cout)`` and columns like
    ``dy.reshape(B * ho * wo, cout)``, so ``patches_t @ dy`` is the kernel gradient.
    """
    b, h, w, c = x.shape
    ho = _out_size(h, kh, strides[0], pads[0])
    wo = _out_size(w, kw, strides[1], pads[1])
    # In this layout every kernel-offset slice copies contiguous runs of `wo` elements, while the
    # channels-last concatenation copies runs of `cin` (3 for RGB input): 1.5-2x faster for the
    # kernel gradient. (For the forward matmul the transposed operand costs more than it saves.)
    xt = jnp.transpose(_pad_spatial(x, pads), (3, 0, 1, 2))  # C, B, Hp, Wp
    cols = jnp.stack(_strided_slices(xt, 3, kw, strides[1], wo), 0)  # kw, C, B, Hp, wo
    rows = jnp.stack(_strided_slices(cols, 3, kh, strides[0], ho), 0)  # kh, kw, C, B, ho, wo
    return rows.reshape(kh * kw * c, b * ho * wo)


def _chunk_size(n: int, target: int) -> int:
    """A batch chunk near ``target``; a divisor of ``n`` if there is one within 2x."""
    target = max(1, min(n, target))
    for c in range(target, max(1, target // 2) - 1, -1):
        if n % c == 0:
            return c
    return target


def _compute_dtype(dtype) -> Any:
    # Half-precision operands are widened per chunk (cheap: the chunk is in cache) because
    # XLA:CPU's bf16 matmuls are ~2x slower than fp32 on CPUs without bf16 units, and so that
    # accumulation happens in fp32 as in lax.conv. Outputs keep the input dtype.
    return jnp.promote_types(dtype, jnp.float32)


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
        _out_size(x.shape[1], kh, strides[0], pads[0]),
        _out_size(x.shape[2], kw, strides[1], pads[1]),
    )
    ct = _compute_dtype(x.dtype)
    km = kernel.reshape(kh * kw * cin, cout).astype(ct)

    def chunk_out(xc):
        p = _patches(xc.astype(ct), kh, kw, strides, pads)
        return _dot(p, km, (((3,), (0,)), ((), ())), operands)

    chunk = _batch_chunks(kernel.shape, out_hw, ct.itemsize, x.shape[0])
    # Cast after the scan: XLA fuses a cast inside the scan body into the update of the stacked
    # output and then re-converts the whole stack on every iteration.
    return _chunked_map(chunk_out, (x,), chunk).astype(x.dtype)


def _conv_kernel_grad(x: Array, dy: Array, kernel_shape, strides, pads, operands) -> Array:
    kh, kw, _, cout = kernel_shape
    ct = _compute_dtype(x.dtype)

    def chunk_grad(xc, dyc):
        p = _patches_t(xc.astype(ct), kh, kw, strides, pads)
        return _dot(p, dyc.reshape(-1, cout).astype(ct), (((1,), (0,)), ((), ())), operands)

    chunk = _batch_chunks(kernel_shape, dy.shape[1:3], ct.itemsize, x.shape[0])
    return _chunked_sum(chunk_grad, (x, dy), chunk).reshape(kernel_shape)


def _conv_input_grad(dy: Array, kernel: Array, x_shape, strides, pads, operands) -> Array:
    kh, kw, cin, cout = kernel.shape
    ct = _compute_dtype(dy.dtype)
    km = kernel.reshape(kh * kw * cin, cout).astype(ct)

    def chunk_grad(dyc):
        # col2im: the transpose of the patch extraction scatter-adds the kh*kw slices of the
        # patch gradient back (pads and adds that XLA fuses into one loop). This beats XLA's
        # transposed convolution, which is not one of the tiled (YNNPACK) kernels.
        dp = _dot(dyc.astype(ct), km, (((3,), (1,)), ((), ())), operands)
        aval = jax.ShapeDtypeStruct((dyc.shape[0], *x_shape[1:]), ct)
        (dx,) = jax.linear_transpose(lambda z: _patches(z, kh, kw, strides, pads), aval)(dp)
        return dx

    chunk = _batch_chunks(kernel.shape, dy.shape[1:3], ct.itemsize, dy.shape[0])
    return _chunked_map(chunk_grad, (dy,), chunk).astype(dy.dtype)  # See _conv_forward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_im2col(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, operands) -> Array:
    # Not differentiated (inference): the native convolution, which XLA:CPU fuses together with
    # the surrounding bias/ReLU/pooling into one tiled YNNPACK kernel. Under differentiation the
    # output has to be materialised, and the kernel on its own is slower than the chunked im2col
    # matmul and page-faults far more memory (a quarter of the digit-net step).
    return _conv_xla(x, kernel, strides, pads, operands)


def _conv_im2col_fwd(x, kernel, strides, pads, operands):
    return _conv_forward(x, kernel, strides, pads, operands), (x, kernel)


def _conv_im2col_bwd(strides, pads, operands, res, dy):
    x, kernel = res
    dkernel = _conv_kernel_grad(x, dy, kernel.shape, strides, pads, operands)
    dkernel = dkernel.astype(kernel.dtype)
    dx = _conv_input_grad(dy, kernel, x.shape, strides, pads, operands)
    return dx, dkernel


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


# Output blocks: for a short patch (few input channels) the im2col matmul is narrow (``cout``
# columns) and its patch matrix is long. Computing each 2x2 block of outputs from one
# (kh + 1) x (kw + 1) window instead makes the matmul 4x wider and the patch matrix 2-3x smaller,
# for 1.4-1.8x the multiplications: the digit net's first conv (5x5x3) trains 1.5x faster. The
# windows are the im2col patches of a space-to-depth image (``_space_to_depth``).
_BLOCK = 2
# Patches shorter than this (kh * kw * cin values) use output blocks (stride-1 convs only).
_BLOCK_MAX_PATCH = 128


def _uses_output_blocks(kernel_shape, strides, out_hw) -> bool:
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
def _conv_blocked(x: Array, kernel: Array, pads: Pads, operands) -> Array:
    # Not differentiated: the native convolution (as for _conv_im2col).
    return _conv_xla(x, kernel, (1, 1), pads, operands)


def _block_patches(xp: Array, kernel_hw, blocks_hw, channel_major: bool = False) -> Array:
    ah, aw = _s2d_window(kernel_hw[0]), _s2d_window(kernel_hw[1])
    image = _space_to_depth(xp, kernel_hw, blocks_hw)
    patches = _patches_t if channel_major else _patches
    return patches(image, ah, aw, (1, 1), ((0, 0), (0, 0)))


def _conv_blocked_fwd(x, kernel, pads, operands):
    kh, kw = kernel.shape[:2]
    ct = _compute_dtype(x.dtype)
    xp = _pad_spatial(x.astype(ct), pads)
    blocks_hw = ((xp.shape[1] - kh + 1) // _BLOCK, (xp.shape[2] - kw + 1) // _BLOCK)
    patches = _block_patches(xp, (kh, kw), blocks_hw)
    y = _dot(patches, _block_kernel(kernel.astype(ct)), (((3,), (0,)), ((), ())), operands)
    return _from_blocks(y).astype(x.dtype), (x, kernel)


def _conv_blocked_bwd(pads, operands, res, dy):
    x, kernel = res
    kh, kw, _, cout = kernel.shape
    ct = _compute_dtype(x.dtype)
    dy_blocks = _to_blocks(dy.astype(ct))
    blocks_hw = dy_blocks.shape[1:3]
    xp = _pad_spatial(x.astype(ct), pads)
    patches_t = _block_patches(xp, (kh, kw), blocks_hw, channel_major=True)
    dy_rows = dy_blocks.reshape(-1, _BLOCK * _BLOCK * cout)
    dblock_kernel = _dot(patches_t, dy_rows, (((1,), (0,)), ((), ())), operands)
    block_kernel, kernel_vjp = jax.vjp(_block_kernel, kernel.astype(ct))
    (dkernel,) = kernel_vjp(dblock_kernel)
    # The input gradient (pruned by XLA where unused, as for an image): col2im of the blocks.
    dpatches = _dot(dy_blocks, block_kernel, (((3,), (1,)), ((), ())), operands).astype(ct)
    (dxp,) = jax.linear_transpose(lambda z: _block_patches(z, (kh, kw), blocks_hw), xp)(dpatches)
    h, w = x.shape[1:3]
    dx = dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_conv_blocked.defvjp(_conv_blocked_fwd, _conv_blocked_bwd)


# ----------------------------------------------------------------------------------------------
# Winograd convolution (Lavin & Gray 2016).

# Output tile side m of F(m x m, r x r). Larger tiles save more multiplications but need more
# interpolation points, which worsens fp32 rounding: with m = 4 and r <= 5 the error stays within
# a few float32 ulps of the output's scale (tests/test_layers.py bounds it).
_WINOGRAD_TILE = 4
# Interpolation points, finite ones first (infinity is implied as the last point); the small
# magnitudes keep the transforms well conditioned (the choice of Lavin & Gray and of cuDNN).
_WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
# auto uses Winograd for layers whose im2col patch (kh * kw * cin values) is at least this long
# (see conv_lowering): set from `python benchmarks/conv_lowering.py --layers`.
_WINOGRAD_MIN_PATCH = 256


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
    ct = _compute_dtype(x.dtype)
    (at_h, g_h, bt_h), (at_w, g_w, bt_w) = winograd_matrices(m, kh), winograd_matrices(m, kw)
    ah, aw = bt_h.shape[0], bt_w.shape[0]
    x = _pad_spatial(x.astype(ct), pads)
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
def _conv_winograd(x: Array, kernel: Array, pads: Pads) -> Array:
    # Not differentiated: the native convolution, fused by XLA with its neighbours (as im2col).
    return _conv_xla(x, kernel, (1, 1), pads)


def _conv_winograd_fwd(x, kernel, pads):
    # The vjp function is a pytree of the residual arrays (the transformed tiles and kernel).
    return jax.vjp(lambda x, k: _winograd(x, k, pads).astype(x.dtype), x, kernel)


def _conv_winograd_bwd(pads, vjp, dy):
    del pads
    return vjp(dy)


_conv_winograd.defvjp(_conv_winograd_fwd, _conv_winograd_bwd)


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
    strides = _pair(strides, "strides", (1, 1))
    kh, kw = kernel.shape[:2]
    pads = _explicit_pads(padding, x.shape[1:3], (kh, kw), strides)
    lowering = conv_lowering(impl, kernel.shape, strides)
    operands = operand_dtype(operands)
    if lowering == "xla":
        return _conv_xla(x, kernel, strides, pads, operands)
    if lowering == "1x1":
        return _conv_1x1(x, kernel, strides, pads, operands)
    if lowering == "winograd":
        return _conv_winograd(x, kernel, pads)
    out_hw = tuple(
        _out_size(x.shape[i + 1], kernel.shape[i], strides[i], pads[i]) for i in range(2)
    )
    if _uses_output_blocks(kernel.shape, strides, out_hw):
        return _conv_blocked(x, kernel, pads, operands)
    return _conv_im2col(x, kernel, strides, pads, operands)


# ----------------------------------------------------------------------------------------------
# Pooling.


def _pool_pads(x: Array, window, strides, padding) -> Pads:
    return _explicit_pads(padding, x.shape[1:3], window, strides)


def _window_views(x: Array, window, strides, pads: Pads, fill) -> tuple[list[Array], Any]:
    """The kh*kw kernel-offset views of the padded input, each of output shape."""
    n, h, w, c = x.shape
    ho = _out_size(h, window[0], strides[0], pads[0])
    wo = _out_size(w, window[1], strides[1], pads[1])
    x = _pad_spatial(x, pads, fill)
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
        ho = _out_size(h, kh, kh, pads[0])
        wo = _out_size(w, kw, kw, pads[1])
        xp = _pad_spatial(x, pads, -jnp.inf)[:, : ho * kh, : wo * kw]
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
      impl: one of ``CONV_IMPLS``. ``'im2col'`` keeps the native forward but differentiates
        through a (max, first-argmax) reduction and an elementwise scatter instead of XLA's
        ``select_and_scatter``; the gradient goes to the same element, ties included.

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
        kernel_size = _pair(self.kernel_size, "kernel_size", (1, 1))
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
        y = conv2d(inputs, kernel, self.strides, self.padding, self.impl, self.operands)
        if bias is not None:
            y = y + bias
        return unflatten(y)
