"""tljax.ops.conv: the CPU convolutions ('im2col', output blocks) must compute what 'xla' does."""

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ops_cases import (
    CONV_CASES,
    assert_close,
    conv_case_id,
    conv_fn,
    normal,
    random_conv_inputs,
)

from tljax import ops
from tljax.ops import im2col, native, shapes

# --------------------------------------------------------------------------------------------
# resolve_impl


def test_resolve_impl_on_cpu():
    assert jax.default_backend() == "cpu"
    assert ops.resolve_impl("auto") == "im2col"
    assert ops.resolve_impl("xla") == "xla"
    assert ops.resolve_impl("im2col") == "im2col"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_resolve_impl_on_accelerators(backend):
    with mock.patch("jax.default_backend", return_value=backend):
        assert ops.resolve_impl("auto") == "xla"
        assert ops.resolve_impl("im2col") == "im2col"


def test_auto_is_resolved_at_trace_time():
    x, kernel = random_conv_inputs(CONV_CASES[2])
    # A fresh function per trace: jax caches traces by function identity.
    make_fn = lambda: lambda x, k: ops.conv2d(x, k, 2, "SAME")
    assert "custom_vjp" in str(jax.make_jaxpr(make_fn())(x, kernel))
    with mock.patch("jax.default_backend", return_value="gpu"):
        jaxpr = str(jax.make_jaxpr(make_fn())(x, kernel))
    assert "custom_vjp" not in jaxpr and "conv_general_dilated" in jaxpr


@pytest.mark.parametrize(
    "fn", [ops.resolve_impl, lambda i: ops.max_pool(jnp.ones((1, 4, 4, 1)), 2, impl=i)]
)
def test_unknown_impl_raises(fn):
    with pytest.raises(ValueError, match="auto.*xla.*im2col"):
        fn("cudnn")


def test_unknown_impl_raises_in_conv():
    x, kernel = random_conv_inputs(CONV_CASES[2])
    with pytest.raises(ValueError, match="im2col"):
        ops.conv2d(x, kernel, impl="direct")


# --------------------------------------------------------------------------------------------
# conv2d


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_conv2d_im2col_matches_xla(case):
    x, kernel = random_conv_inputs(case)
    y_ref, _, (dx_ref, dk_ref) = conv_fn(*case[6:], "xla")(x, kernel)
    y, y_grad, (dx, dk) = conv_fn(*case[6:], "im2col")(x, kernel)
    assert y.dtype == y_grad.dtype == y_ref.dtype == jnp.float32
    # Both forward lowerings: without differentiation and under it.
    assert_close(y, y_ref)
    assert_close(y_grad, y_ref)
    assert_close(dx, dx_ref)
    assert_close(dk, dk_ref)


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
    assert ops.conv_lowering(impl, kernel_shape, strides) == expected


def test_conv_lowering_auto_is_xla_on_gpu():
    with mock.patch("jax.default_backend", return_value="gpu"):
        assert ops.conv_lowering("auto", (5, 5, 32, 48), (1, 1)) == "xla"
        assert ops.conv_lowering("winograd", (5, 5, 32, 48), (1, 1)) == "winograd"


def test_output_blocks_for_short_patches():
    # The digit net's first conv (5x5x3, 24x24 outputs) uses 2x2 output blocks; long patches,
    # strides and odd output sizes use the plain im2col.
    assert im2col.uses_output_blocks((5, 5, 3, 32), (1, 1), (24, 24))
    assert not im2col.uses_output_blocks((5, 5, 32, 48), (1, 1), (8, 8))
    assert not im2col.uses_output_blocks((3, 3, 3, 32), (2, 2), (8, 8))
    assert not im2col.uses_output_blocks((3, 3, 3, 32), (1, 1), (7, 8))


@pytest.mark.parametrize("target_chunk", [1, 4, 6])
def test_conv2d_batch_chunking(monkeypatch, target_chunk):
    # Batch 11 in chunks of 1 (scan only), 4 (scan + remainder) and 6 (one chunk + remainder):
    # the gradients must not depend on the chunking.
    case = (11, 9, 9, 3, 4, 3, 2, "SAME")
    x, kernel = random_conv_inputs(case)
    y_ref, _, (dx_ref, dk_ref) = conv_fn(*case[6:], "xla")(x, kernel)
    per_example = 3 * 3 * 3 * 5 * 5 * 4  # kh * kw * cin * ho * wo * itemsize
    monkeypatch.setattr(im2col, "_PATCH_CHUNK_BYTES", target_chunk * per_example)
    # Not the cached function: the chunk size is read when tracing.
    _, y, (dx, dk) = conv_fn.__wrapped__(*case[6:], "im2col")(x, kernel)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    assert_close(dk, dk_ref)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[8]], ids=conv_case_id)
@pytest.mark.parametrize("impl", ["im2col", "winograd"])
def test_conv2d_bfloat16(case, impl):
    x, kernel = random_conv_inputs(case, jnp.bfloat16)
    y_ref, _, (dx_ref, dk_ref) = conv_fn(*case[6:], "xla")(x, kernel)
    y, y_grad, (dx, dk) = conv_fn(*case[6:], impl)(x, kernel)
    assert y.dtype == y_grad.dtype == y_ref.dtype == jnp.bfloat16
    assert dx.dtype == dk.dtype == jnp.bfloat16
    assert_close(y, y_ref, rtol=3e-2)
    assert_close(y_grad, y_ref, rtol=3e-2)
    assert_close(dx, dx_ref, rtol=3e-2)
    assert_close(dk, dk_ref, rtol=3e-2)


def _bf16_rounded(a):
    return jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)


def _exact_conv(x, kernel, strides, padding):
    strides = shapes.pair(strides, "strides", (1, 1))
    pads = shapes.explicit_pads(padding, x.shape[1:3], kernel.shape[:2], strides)
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


@pytest.mark.parametrize("case", BF16_OPERAND_CASES, ids=conv_case_id)
@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_conv2d_bfloat16_operands_equal_fp32_math_on_rounded_operands(case, impl):
    x, kernel = random_conv_inputs(case)
    strides, padding = case[6:]
    conv = functools.partial(ops.conv2d, strides=strides, padding=padding, impl=impl)
    y, vjp = jax.vjp(lambda x, k: conv(x, k, operands="bfloat16"), x, kernel)
    dy = normal(y.shape, 7)
    dx, dk = vjp(dy)
    x_r, k_r, dy_r = _bf16_rounded(x), _bf16_rounded(kernel), _bf16_rounded(dy)
    # Products of bf16 values are exact in fp32: only the summation order may differ.
    y_ref = _exact_conv(x_r, k_r, strides, padding)
    (dk_ref,) = jax.vjp(lambda k: _exact_conv(x_r, k, strides, padding), kernel)[1](dy_r)
    (dx_ref,) = jax.vjp(lambda x: _exact_conv(x, k_r, strides, padding), x)[1](dy_r)
    assert y.dtype == dx.dtype == dk.dtype == jnp.float32
    assert_close(y, y_ref, rtol=1e-5)
    assert_close(jax.jit(conv, static_argnames="operands")(x, kernel, operands="bfloat16"), y_ref)
    # Autodiff of a bf16 convolution or matmul (XLA's, and 1x1 convs) rounds the gradients to
    # bf16; the patch lowerings' own backward passes keep them in fp32.
    grad_rtol = 1e-5 if impl == "im2col" and case[5] > 1 else 1e-2
    assert_close(dx, dx_ref, rtol=grad_rtol)
    assert_close(dk, dk_ref, rtol=grad_rtol)
    assert not np.allclose(y, _exact_conv(x, kernel, strides, padding), rtol=1e-5, atol=0)


def test_bfloat16_operand_rounding_matches_astype_and_keeps_nan():
    x = jnp.concatenate(
        [normal((1000,), 3, scale=1e3), jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, -0.0])]
    )
    rounded = jax.jit(native.round_to_bfloat16)(x)
    np.testing.assert_array_equal(
        np.asarray(rounded.astype(jnp.float32)), np.asarray(x.astype(jnp.bfloat16), np.float32)
    )


def test_unknown_conv_operands_raise():
    x, kernel = random_conv_inputs(CONV_CASES[0])
    with pytest.raises(ValueError, match=r"conv_operands='fp8'.*bfloat16.*float32"):
        ops.conv2d(x, kernel, operands="fp8")


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
    x = normal((2, 13, 12, 3), 5)
    key = jax.random.PRNGKey(6)
    flax_conv = nn.Conv(**config)
    params = flax_conv.init(key, x)
    ref = jax.jit(flax_conv.apply)(params, x)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)
    for impl in ("xla", "im2col"):
        ours = ops.Conv(**config, impl=impl)
        assert shapes(jax.eval_shape(ours.init, key, x)) == shapes(params)
        assert_close(jax.jit(ours.apply)(params, x), ref)
    # Same initializers and names, so the same key gives the same parameters.
    our_params = ops.Conv(**config).init(key, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, our_params, params)


def test_conv_module_defaults():
    module = ops.Conv(features=4, kernel_size=3)
    assert module.impl == "auto" and module.padding == "SAME" and module.use_bias
    # Unlike nn.Conv (where an int means a 1-D kernel), an int kernel_size is square.
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 2)))
    assert params["params"]["kernel"].shape == (3, 3, 2, 4)


@pytest.mark.parametrize("shape", [(13, 12, 3), (2, 3, 13, 12, 3)])
def test_conv_module_batch_dims(shape):
    x = normal(shape, 7)
    config = dict(features=4, kernel_size=(3, 3), strides=2)
    params = nn.Conv(**config).init(jax.random.PRNGKey(0), x)
    ref = jax.jit(nn.Conv(**config).apply)(params, x)
    out = jax.jit(ops.Conv(**config, impl="im2col").apply)(params, x)
    assert out.shape == ref.shape
    assert_close(out, ref)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_conv_module_bfloat16(impl):
    x = normal((4, 28, 28, 3), 8)
    config = dict(features=32, kernel_size=(5, 5), padding="VALID", dtype=jnp.bfloat16)
    module = ops.Conv(**config, impl=impl)
    params = module.init(jax.random.PRNGKey(9), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))

    def loss(params):
        y = module.apply(params, x)
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert y.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    ref = nn.Conv(**config).apply(params, x)
    assert_close(y, ref, rtol=3e-2)


# --------------------------------------------------------------------------------------------
# conv_from_config


def test_conv_from_config_builds_the_configured_ops():
    conv, pool, rows = ops.conv_from_config(
        {"conv_impl": "im2col", "conv_operands": "bfloat16", "microbatch": "4"}
    )
    assert conv.func is ops.Conv and conv.keywords == {"impl": "im2col", "operands": "bfloat16"}
    assert pool.func is ops.max_pool and pool.keywords == {"impl": "im2col"}
    assert rows == 4
    # A drop-in for nn.Conv and nn.max_pool, as the models call them.
    x = normal((2, 8, 8, 3), 0)
    params = nn.Conv(4, (3, 3)).init(jax.random.key(0), x)
    y = pool(conv(4, (3, 3)).apply(params, x), (2, 2), strides=(2, 2))
    ref = nn.max_pool(nn.Conv(4, (3, 3)).apply(params, x), (2, 2), strides=(2, 2))
    assert_close(y, ref, rtol=3e-2)


def test_conv_from_config_defaults():
    # conv_operands and microbatch may be missing (configs without them).
    conv, _, rows = ops.conv_from_config({"conv_impl": "auto"})
    assert conv.keywords == {"impl": "auto", "operands": "float32"}
    assert rows == ops.resolve_microbatch("auto")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("conv_impl", "cudnn", "model.conv_impl='cudnn'"),
        ("conv_operands", "fp8", "conv_operands='fp8'"),
        ("microbatch", -2, "microbatch must be"),
    ],
)
def test_conv_from_config_rejects_unknown_values(field, value, message):
    model_config = {"conv_impl": "auto", field: value}
    with pytest.raises(ValueError, match=message):
        ops.conv_from_config(model_config)
