"""tljax.models.layers: the CPU lowerings ('im2col', 'winograd') must compute what 'xla' does."""

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models import layers

# (batch, H, W, cin, cout, kernel, stride, padding)
CONV_CASES = [
    (2, 28, 28, 3, 32, 5, 1, "VALID"),  # digit net, conv 1
    (3, 12, 12, 16, 32, 5, 1, "VALID"),  # digit net, conv 2 (fewer channels)
    (3, 9, 11, 16, 4, 3, 2, "SAME"),
    (4, 7, 9, 1, 4, 3, 1, "SAME"),
    (1, 16, 16, 3, 4, 7, 2, "SAME"),  # ResNet stem
    (1, 15, 13, 3, 4, 7, 2, 3),
    (4, 13, 10, 3, 32, 3, 1, ((1, 2), (0, 1))),
    (2, 15, 15, 16, 32, 5, 2, 2),
    (2, 8, 8, 16, 32, 1, 2, "SAME"),  # ResNet downsample
    (2, 9, 7, 3, 4, 1, 1, ((1, 0), (0, 1))),
    (1, 10, 10, 16, 4, 3, 2, "VALID"),
    (2, 10, 12, 3, 8, 3, 1, "SAME"),  # 2x2 output blocks, padded
    (2, 9, 9, 2, 8, 4, 1, ((1, 0), (2, 1))),  # 2x2 output blocks, asymmetric kernel padding
]


def _conv_case_id(case):
    n, h, w, ci, co, k, s, p = case
    return f"n{n}_{h}x{w}x{ci}_k{k}s{s}_{p}".replace(" ", "")


def _normal(shape, seed, dtype=jnp.float32, scale=1.0):
    # NumPy rather than jax.random: no per-shape compilations (they dominate this file's time).
    x = np.random.default_rng(seed).standard_normal(shape, np.float32) * np.float32(scale)
    return jnp.asarray(x).astype(dtype)


def _random_conv_inputs(case, dtype=jnp.float32, seed=0):
    n, h, w, ci, co, k, s, p = case
    x = _normal((n, h, w, ci), seed, dtype)
    kernel = _normal((k, k, ci, co), seed + 1, dtype, scale=(k * k * ci) ** -0.5)
    return x, kernel


def _assert_close(actual, desired, rtol=1e-4):
    """Elementwise closeness with a tolerance relative to the largest reference entry."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    scale = max(float(np.max(np.abs(desired))), 1e-6)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


@functools.cache
def _conv_fn(strides, padding, impl):
    """Jitted ``(x, kernel) -> (y, y_under_grad, (dx, dkernel))``, one compile per config."""

    def loss(x, kernel):
        y = layers.conv2d(x, kernel, strides, padding, impl=impl)
        # A nonlinear loss so the cotangent differs per output element.
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    def fn(x, kernel):
        (_, y_grad), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, kernel)
        return layers.conv2d(x, kernel, strides, padding, impl=impl), y_grad, grads

    return jax.jit(fn)


# --------------------------------------------------------------------------------------------
# resolve_impl


def test_resolve_impl_on_cpu():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_impl("auto") == "im2col"
    assert layers.resolve_impl("xla") == "xla"
    assert layers.resolve_impl("im2col") == "im2col"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_resolve_impl_on_accelerators(backend):
    with mock.patch("jax.default_backend", return_value=backend):
        assert layers.resolve_impl("auto") == "xla"
        assert layers.resolve_impl("im2col") == "im2col"


def test_auto_is_resolved_at_trace_time():
    x, kernel = _random_conv_inputs(CONV_CASES[2])
    # A fresh function per trace: jax caches traces by function identity.
    make_fn = lambda: lambda x, k: layers.conv2d(x, k, 2, "SAME")
    assert "custom_vjp" in str(jax.make_jaxpr(make_fn())(x, kernel))
    with mock.patch("jax.default_backend", return_value="gpu"):
        jaxpr = str(jax.make_jaxpr(make_fn())(x, kernel))
    assert "custom_vjp" not in jaxpr and "conv_general_dilated" in jaxpr


@pytest.mark.parametrize(
    "fn", [layers.resolve_impl, lambda i: layers.max_pool(jnp.ones((1, 4, 4, 1)), 2, impl=i)]
)
def test_unknown_impl_raises(fn):
    with pytest.raises(ValueError, match="auto.*xla.*im2col"):
        fn("cudnn")


def test_unknown_impl_raises_in_conv():
    x, kernel = _random_conv_inputs(CONV_CASES[2])
    with pytest.raises(ValueError, match="im2col"):
        layers.conv2d(x, kernel, impl="direct")


# --------------------------------------------------------------------------------------------
# conv2d


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_case_id)
def test_conv2d_im2col_matches_xla(case):
    x, kernel = _random_conv_inputs(case)
    y_ref, _, (dx_ref, dk_ref) = _conv_fn(*case[6:], "xla")(x, kernel)
    y, y_grad, (dx, dk) = _conv_fn(*case[6:], "im2col")(x, kernel)
    assert y.dtype == y_grad.dtype == y_ref.dtype == jnp.float32
    # Both forward lowerings: without differentiation and under it.
    _assert_close(y, y_ref)
    _assert_close(y_grad, y_ref)
    _assert_close(dx, dx_ref)
    _assert_close(dk, dk_ref)


# Winograd-specific shapes: sizes that are not multiples of the 4x4 tile, rectangular kernels.
WINOGRAD_CASES = [
    (3, 12, 12, 32, 48, 5, 1, "VALID"),  # digit net, conv 2
    (2, 9, 7, 16, 8, 3, 1, "SAME"),
    (2, 6, 6, 3, 5, 2, 1, "VALID"),
    (1, 5, 5, 4, 4, 5, 1, 2),
]


@pytest.mark.parametrize("case", CONV_CASES + WINOGRAD_CASES, ids=_conv_case_id)
def test_conv2d_winograd_matches_xla(case):
    x, kernel = _random_conv_inputs(case)
    y_ref, _, (dx_ref, dk_ref) = _conv_fn(*case[6:], "xla")(x, kernel)
    y, y_grad, (dx, dk) = _conv_fn(*case[6:], "winograd")(x, kernel)
    assert y.dtype == y_grad.dtype == jnp.float32
    _assert_close(y, y_ref)
    # The tile transforms add a few float32 roundings per output (interpolation points up to
    # +-2), so under differentiation the bound is a little looser than im2col's.
    _assert_close(y_grad, y_ref, rtol=3e-4)
    _assert_close(dx, dx_ref, rtol=3e-4)
    _assert_close(dk, dk_ref, rtol=3e-4)


def test_conv2d_winograd_rectangular_kernel():
    x = _normal((2, 10, 11, 5), 0)
    kernel = _normal((3, 5, 5, 4), 1, scale=75**-0.5)
    pads = ((1, 2), (0, 3))
    y_ref, _, (dx_ref, dk_ref) = _conv_fn(1, pads, "xla")(x, kernel)
    _, y, (dx, dk) = _conv_fn(1, pads, "winograd")(x, kernel)
    for actual, desired in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        _assert_close(actual, desired, rtol=3e-4)


@pytest.mark.parametrize("r", [2, 3, 4, 5])
def test_winograd_matrices_compute_the_correlation(r):
    at, g, bt = layers.winograd_matrices(4, r)
    rng = np.random.default_rng(r)
    for _ in range(5):
        d, f = rng.standard_normal(4 + r - 1), rng.standard_normal(r)
        expected = [np.dot(f, d[i : i + r]) for i in range(4)]
        np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_winograd_matrices_reject_too_large_tiles():
    with pytest.raises(ValueError, match="finite points"):
        layers.winograd_matrices(4, 7)


@pytest.mark.parametrize(
    "impl, kernel_shape, strides, expected",
    [
        ("auto", (5, 5, 3, 32), (1, 1), "im2col"),  # digit conv 1: short patch
        ("auto", (5, 5, 32, 48), (1, 1), "winograd"),  # digit conv 2
        ("auto", (3, 3, 16, 16), (1, 1), "im2col"),  # short patch
        ("auto", (3, 3, 64, 64), (1, 1), "winograd"),
        ("auto", (3, 3, 256, 256), (1, 1), "winograd"),
        ("auto", (3, 3, 256, 256), (2, 2), "im2col"),  # strided
        ("auto", (7, 7, 64, 64), (1, 1), "im2col"),  # no F(4, 7)
        ("auto", (1, 1, 64, 256), (1, 1), "1x1"),
        ("winograd", (5, 5, 3, 32), (1, 1), "winograd"),
        ("winograd", (3, 3, 64, 64), (2, 2), "im2col"),
        ("im2col", (5, 5, 32, 48), (1, 1), "im2col"),
        ("xla", (5, 5, 32, 48), (1, 1), "xla"),
    ],
)
def test_conv_lowering_choice_on_cpu(impl, kernel_shape, strides, expected):
    assert layers.conv_lowering(impl, kernel_shape, strides) == expected


def test_conv_lowering_auto_is_xla_on_gpu():
    with mock.patch("jax.default_backend", return_value="gpu"):
        assert layers.conv_lowering("auto", (5, 5, 32, 48), (1, 1)) == "xla"
        assert layers.conv_lowering("winograd", (5, 5, 32, 48), (1, 1)) == "winograd"


def test_output_blocks_for_short_patches():
    # The digit net's first conv (5x5x3, 24x24 outputs) uses 2x2 output blocks; long patches,
    # strides and odd output sizes use the plain im2col.
    assert layers._uses_output_blocks((5, 5, 3, 32), (1, 1), (24, 24))
    assert not layers._uses_output_blocks((5, 5, 32, 48), (1, 1), (8, 8))
    assert not layers._uses_output_blocks((3, 3, 3, 32), (2, 2), (8, 8))
    assert not layers._uses_output_blocks((3, 3, 3, 32), (1, 1), (7, 8))


@pytest.mark.parametrize("target_chunk", [1, 4, 6])
def test_conv2d_batch_chunking(monkeypatch, target_chunk):
    # Batch 11 in chunks of 1 (scan only), 4 (scan + remainder) and 6 (one chunk + remainder):
    # the gradients must not depend on the chunking.
    case = (11, 9, 9, 3, 4, 3, 2, "SAME")
    x, kernel = _random_conv_inputs(case)
    y_ref, _, (dx_ref, dk_ref) = _conv_fn(*case[6:], "xla")(x, kernel)
    per_example = 3 * 3 * 3 * 5 * 5 * 4  # kh * kw * cin * ho * wo * itemsize
    monkeypatch.setattr(layers, "_PATCH_CHUNK_BYTES", target_chunk * per_example)
    # Not the cached function: the chunk size is read when tracing.
    _, y, (dx, dk) = _conv_fn.__wrapped__(*case[6:], "im2col")(x, kernel)
    _assert_close(y, y_ref)
    _assert_close(dx, dx_ref)
    _assert_close(dk, dk_ref)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[8]], ids=_conv_case_id)
@pytest.mark.parametrize("impl", ["im2col", "winograd"])
def test_conv2d_bfloat16(case, impl):
    x, kernel = _random_conv_inputs(case, jnp.bfloat16)
    y_ref, _, (dx_ref, dk_ref) = _conv_fn(*case[6:], "xla")(x, kernel)
    y, y_grad, (dx, dk) = _conv_fn(*case[6:], impl)(x, kernel)
    assert y.dtype == y_grad.dtype == y_ref.dtype == jnp.bfloat16
    assert dx.dtype == dk.dtype == jnp.bfloat16
    _assert_close(y, y_ref, rtol=3e-2)
    _assert_close(y_grad, y_ref, rtol=3e-2)
    _assert_close(dx, dx_ref, rtol=3e-2)
    _assert_close(dk, dk_ref, rtol=3e-2)


def _bf16_rounded(a):
    return jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)


def _exact_conv(x, kernel, strides, padding):
    strides = layers._pair(strides, "strides", (1, 1))
    pads = layers._explicit_pads(padding, x.shape[1:3], kernel.shape[:2], strides)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


# Output blocks (digit conv1, padded blocks), plain and strided im2col, 1x1.
BF16_OPERAND_CASES = [CONV_CASES[i] for i in (0, 11, 1, 2, 8)]


@pytest.mark.parametrize("case", BF16_OPERAND_CASES, ids=_conv_case_id)
@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_conv2d_bfloat16_operands_equal_fp32_math_on_rounded_operands(case, impl):
    x, kernel = _random_conv_inputs(case)
    strides, padding = case[6:]
    conv = functools.partial(layers.conv2d, strides=strides, padding=padding, impl=impl)
    y, vjp = jax.vjp(lambda x, k: conv(x, k, operands="bfloat16"), x, kernel)
    dy = _normal(y.shape, 7)
    dx, dk = vjp(dy)
    x_r, k_r, dy_r = _bf16_rounded(x), _bf16_rounded(kernel), _bf16_rounded(dy)
    # Products of bf16 values are exact in fp32: only the summation order may differ.
    y_ref = _exact_conv(x_r, k_r, strides, padding)
    (dk_ref,) = jax.vjp(lambda k: _exact_conv(x_r, k, strides, padding), kernel)[1](dy_r)
    (dx_ref,) = jax.vjp(lambda x: _exact_conv(x, k_r, strides, padding), x)[1](dy_r)
    assert y.dtype == dx.dtype == dk.dtype == jnp.float32
    _assert_close(y, y_ref, rtol=1e-5)
    _assert_close(jax.jit(conv, static_argnames="operands")(x, kernel, operands="bfloat16"), y_ref)
    # Autodiff of a bf16 convolution or matmul (XLA's, and 1x1 convs) rounds the gradients to
    # bf16; the patch lowerings' own backward passes keep them in fp32.
    grad_rtol = 1e-5 if impl == "im2col" and case[5] > 1 else 1e-2
    _assert_close(dx, dx_ref, rtol=grad_rtol)
    _assert_close(dk, dk_ref, rtol=grad_rtol)
    assert not np.allclose(y, _exact_conv(x, kernel, strides, padding), rtol=1e-5, atol=0)


def test_bfloat16_operand_rounding_matches_astype_and_keeps_nan():
    x = jnp.concatenate(
        [_normal((1000,), 3, scale=1e3), jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, -0.0])]
    )
    rounded = jax.jit(layers._round_to_bfloat16)(x)
    np.testing.assert_array_equal(
        np.asarray(rounded.astype(jnp.float32)), np.asarray(x.astype(jnp.bfloat16), np.float32)
    )


def test_unknown_conv_operands_raise():
    x, kernel = _random_conv_inputs(CONV_CASES[0])
    with pytest.raises(ValueError, match=r"conv_operands='fp8'.*bfloat16.*float32"):
        layers.conv2d(x, kernel, operands="fp8")


# --------------------------------------------------------------------------------------------
# Pooling

# (shape, window, strides, padding)
POOL_CASES = [
    ((2, 8, 8, 3), 2, None, "VALID"),  # digit net
    ((2, 9, 11, 3), 2, 2, "VALID"),  # non-divisible
    ((2, 16, 16, 4), 3, 2, "SAME"),  # ResNet stem
    ((2, 15, 9, 4), 3, 2, "SAME"),
    ((3, 7, 9, 2), 3, 1, "SAME"),
    ((2, 7, 9, 4), (3, 2), (2, 1), ((1, 0), (1, 1))),
    ((2, 3, 5, 7, 4), 2, None, "SAME"),  # two batch dims, non-divisible SAME
    ((1, 25, 24, 2), 12, None, "VALID"),  # > 127 window offsets
]


def _pool_id(case):
    return f"{case[0]}_w{case[1]}_s{case[2]}_{case[3]}".replace(" ", "")


@functools.cache
def _pool_fn(pool_name, **kwargs):
    """Jitted ``x -> {impl: (y, dloss/dx)}`` for both impls, one compile per config."""
    pool = getattr(layers, pool_name)

    def loss(x, impl):
        y = pool(x, impl=impl, **kwargs)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape).astype(y.dtype)), y

    def fn(x):
        out = {}
        for impl in ("xla", "im2col"):
            (_, y), g = jax.value_and_grad(loss, has_aux=True)(x, impl)
            out[impl] = (y, g)
        return out

    return jax.jit(fn)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_max_pool_im2col_matches_xla(case, ties):
    shape, window, strides, padding = case
    x = _normal(shape, 1)
    if ties:
        # Many equal maxima per window: both lowerings must send the gradient to the same one.
        x = jnp.asarray(np.round(np.asarray(x)))
    out = _pool_fn("max_pool", window=window, strides=strides, padding=padding)(x)
    (y_ref, g_ref), (y, g) = out["xla"], out["im2col"]
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_matches_flax_with_explicit_strides():
    x = _normal((2, 16, 16, 4), 2)
    ref = nn.max_pool(x, (3, 3), (2, 2), "SAME")
    np.testing.assert_array_equal(layers.max_pool(x, 3, 2, "SAME", impl="im2col"), ref)
    # strides=None means strides=window here (flax's own default is stride 1).
    np.testing.assert_array_equal(
        layers.max_pool(x, (2, 2)), nn.max_pool(x, (2, 2), (2, 2), "VALID")
    )


def test_max_pool_bfloat16():
    x = _normal((2, 12, 12, 8), 3, jnp.bfloat16)
    out = _pool_fn("max_pool", window=2)(x)
    (y_ref, g_ref), (y, g) = out["xla"], out["im2col"]
    assert y.dtype == g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", [POOL_CASES[i] for i in (1, 2, 4, 5)], ids=_pool_id)
def test_avg_pool_im2col_matches_xla(case, count_include_pad):
    shape, window, strides, padding = case
    x = _normal(shape, 4)
    out = _pool_fn(
        "avg_pool",
        window=window,
        strides=strides,
        padding=padding,
        count_include_pad=count_include_pad,
    )(x)
    (y_ref, g_ref), (y, g) = out["xla"], out["im2col"]
    _assert_close(y, y_ref, rtol=1e-5)
    _assert_close(g, g_ref, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Conv module

MODULE_CASES = [
    dict(features=32, kernel_size=(5, 5), padding="VALID"),
    dict(features=8, kernel_size=(3, 3), strides=2, padding="SAME", use_bias=False),
    dict(features=8, kernel_size=(7, 7), strides=(2, 2), padding=3),
    dict(features=4, kernel_size=(1, 1), strides=2),
    dict(features=4, kernel_size=(3, 3), padding=((1, 2), (0, 1))),
]


@pytest.mark.parametrize("config", MODULE_CASES, ids=str)
def test_conv_module_is_drop_in_for_flax(config):
    x = _normal((2, 13, 12, 3), 5)
    key = jax.random.PRNGKey(6)
    flax_conv = nn.Conv(**config)
    params = flax_conv.init(key, x)
    ref = jax.jit(flax_conv.apply)(params, x)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)
    for impl in ("xla", "im2col"):
        ours = layers.Conv(**config, impl=impl)
        assert shapes(jax.eval_shape(ours.init, key, x)) == shapes(params)
        _assert_close(jax.jit(ours.apply)(params, x), ref)
    # Same initializers and names, so the same key gives the same parameters.
    our_params = layers.Conv(**config).init(key, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, our_params, params)


def test_conv_module_defaults():
    module = layers.Conv(features=4, kernel_size=3)
    assert module.impl == "auto" and module.padding == "SAME" and module.use_bias
    # Unlike nn.Conv (where an int means a 1-D kernel), an int kernel_size is square.
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 2)))
    assert params["params"]["kernel"].shape == (3, 3, 2, 4)


@pytest.mark.parametrize("shape", [(13, 12, 3), (2, 3, 13, 12, 3)])
def test_conv_module_batch_dims(shape):
    x = _normal(shape, 7)
    config = dict(features=4, kernel_size=(3, 3), strides=2)
    params = nn.Conv(**config).init(jax.random.PRNGKey(0), x)
    ref = jax.jit(nn.Conv(**config).apply)(params, x)
    out = jax.jit(layers.Conv(**config, impl="im2col").apply)(params, x)
    assert out.shape == ref.shape
    _assert_close(out, ref)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_conv_module_bfloat16(impl):
    x = _normal((4, 28, 28, 3), 8)
    config = dict(features=32, kernel_size=(5, 5), padding="VALID", dtype=jnp.bfloat16)
    module = layers.Conv(**config, impl=impl)
    params = module.init(jax.random.PRNGKey(9), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))

    def loss(params):
        y = module.apply(params, x)
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert y.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    ref = nn.Conv(**config).apply(params, x)
    _assert_close(y, ref, rtol=3e-2)


# --------------------------------------------------------------------------------------------
# Micro-batching


def test_microbatched_equals_one_pass():
    x = _normal((10, 6, 6, 3), 0)
    kernel = _normal((3, 3, 3, 4), 1)
    fn = lambda x: layers.max_pool(layers.conv2d(x, kernel, 1, "SAME"), 2)
    expected = fn(x)
    for size in (0, 3, 5, 10, 64):  # uneven last chunk, exact split, one pass
        np.testing.assert_array_equal(layers.microbatched(fn, x, size), expected)


def test_microbatched_makes_at_most_max_chunks():
    calls = []
    fn = lambda x: calls.append(x.shape[0]) or 2 * x
    x = jnp.arange(100.0).reshape(100, 1)
    np.testing.assert_array_equal(layers.microbatched(fn, x, 4), 2 * x)
    assert len(calls) == layers._MAX_MICROBATCHES and sum(calls) == 100
    calls.clear()
    layers.microbatched(fn, x, 25)
    assert calls == [25, 25, 25, 25]


def test_microbatched_gradients_equal_one_pass():
    x = _normal((7, 6, 6, 3), 0)
    kernel = _normal((3, 3, 3, 4), 1)
    loss = lambda k, size: jnp.sum(
        jnp.sin(layers.microbatched(lambda x: layers.conv2d(x, k, 1, "SAME"), x, size))
    )
    _assert_close(jax.grad(loss)(kernel, 3), jax.grad(loss)(kernel, 0), rtol=1e-5)


def test_resolve_microbatch():
    assert layers.resolve_microbatch("auto") == layers._CPU_MICROBATCH
    assert layers.resolve_microbatch(0) == 0
    assert layers.resolve_microbatch("32") == 32  # As a command-line override gives it.
    with mock.patch("jax.default_backend", return_value="gpu"):
        assert layers.resolve_microbatch("auto") == 0
    for bad in (-1, "fast", None):
        with pytest.raises(ValueError, match="microbatch must be 'auto' or an int >= 0"):
            layers.resolve_microbatch(bad)
