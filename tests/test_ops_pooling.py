"""tljax.ops.pooling: the CPU pooling lowering must compute what 'xla' does, gradients included."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ops_cases import assert_close, normal

from tljax import ops

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
    pool = getattr(ops, pool_name)

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
    x = normal(shape, 1)
    if ties:
        # Many equal maxima per window: both lowerings must send the gradient to the same one.
        x = jnp.asarray(np.round(np.asarray(x)))
    out = _pool_fn("max_pool", window=window, strides=strides, padding=padding)(x)
    (y_ref, g_ref), (y, g) = out["xla"], out["im2col"]
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_matches_flax_with_explicit_strides():
    x = normal((2, 16, 16, 4), 2)
    ref = nn.max_pool(x, (3, 3), (2, 2), "SAME")
    np.testing.assert_array_equal(ops.max_pool(x, 3, 2, "SAME", impl="im2col"), ref)
    # strides=None means strides=window here (flax's own default is stride 1).
    np.testing.assert_array_equal(ops.max_pool(x, (2, 2)), nn.max_pool(x, (2, 2), (2, 2), "VALID"))


def test_max_pool_bfloat16():
    x = normal((2, 12, 12, 8), 3, jnp.bfloat16)
    out = _pool_fn("max_pool", window=2)(x)
    (y_ref, g_ref), (y, g) = out["xla"], out["im2col"]
    assert y.dtype == g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", [POOL_CASES[i] for i in (1, 2, 4, 5)], ids=_pool_id)
def test_avg_pool_im2col_matches_xla(case, count_include_pad):
    shape, window, strides, padding = case
    x = normal(shape, 4)
    out = _pool_fn(
        "avg_pool",
        window=window,
        strides=strides,
        padding=padding,
        count_include_pad=count_include_pad,
    )(x)
    (y_ref, g_ref), (y, g) = out["xla"], out["im2col"]
    assert_close(y, y_ref, rtol=1e-5)
    assert_close(g, g_ref, rtol=1e-5)
