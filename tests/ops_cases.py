"""Random inputs, tolerances and jitted convolutions shared by the tljax.ops tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tljax import ops

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


def conv_case_id(case):
    n, h, w, ci, co, k, s, p = case
    return f"n{n}_{h}x{w}x{ci}_k{k}s{s}_{p}".replace(" ", "")


def normal(shape, seed, dtype=jnp.float32, scale=1.0):
    # NumPy rather than jax.random: no per-shape compilations (they dominate this file's time).
    x = np.random.default_rng(seed).standard_normal(shape, np.float32) * np.float32(scale)
    return jnp.asarray(x).astype(dtype)


def random_conv_inputs(case, dtype=jnp.float32, seed=0):
    n, h, w, ci, co, k, s, p = case
    x = normal((n, h, w, ci), seed, dtype)
    kernel = normal((k, k, ci, co), seed + 1, dtype, scale=(k * k * ci) ** -0.5)
    return x, kernel


def assert_close(actual, desired, rtol=1e-4):
    """Elementwise closeness with a tolerance relative to the largest reference entry."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    scale = max(float(np.max(np.abs(desired))), 1e-6)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


@functools.cache
def conv_fn(strides, padding, impl):
    """Jitted ``(x, kernel) -> (y, y_under_grad, (dx, dkernel))``, one compile per config."""

    def loss(x, kernel):
        y = ops.conv2d(x, kernel, strides, padding, impl=impl)
        # A nonlinear loss so the cotangent differs per output element.
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    def fn(x, kernel):
        (_, y_grad), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, kernel)
        return ops.conv2d(x, kernel, strides, padding, impl=impl), y_grad, grads

    return jax.jit(fn)
