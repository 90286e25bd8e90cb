"""tljax.ops.winograd: the Winograd convolution must compute what 'xla' does."""

import jax.numpy as jnp
import numpy as np
import pytest
from ops_cases import CONV_CASES, assert_close, conv_case_id, conv_fn, normal, random_conv_inputs

from tljax import ops

WINOGRAD_CASES = [
    (3, 12, 12, 32, 48, 5, 1, "VALID"),  # digit net, conv 2
    (2, 9, 7, 16, 8, 3, 1, "SAME"),
    (2, 6, 6, 3, 5, 2, 1, "VALID"),
    (1, 5, 5, 4, 4, 5, 1, 2),
]


@pytest.mark.parametrize("case", CONV_CASES + WINOGRAD_CASES, ids=conv_case_id)
def test_conv2d_winograd_matches_xla(case):
    x, kernel = random_conv_inputs(case)
    y_ref, _, (dx_ref, dk_ref) = conv_fn(*case[6:], "xla")(x, kernel)
    y, y_grad, (dx, dk) = conv_fn(*case[6:], "winograd")(x, kernel)
    assert y.dtype == y_grad.dtype == jnp.float32
    assert_close(y, y_ref)
    # The tile transforms add a few float32 roundings per output (interpolation points up to
    # +-2), so under differentiation the bound is a little looser than im2col's.
    assert_close(y_grad, y_ref, rtol=3e-4)
    assert_close(dx, dx_ref, rtol=3e-4)
    assert_close(dk, dk_ref, rtol=3e-4)


def test_conv2d_winograd_rectangular_kernel():
    x = normal((2, 10, 11, 5), 0)
    kernel = normal((3, 5, 5, 4), 1, scale=75**-0.5)
    pads = ((1, 2), (0, 3))
    y_ref, _, (dx_ref, dk_ref) = conv_fn(1, pads, "xla")(x, kernel)
    _, y, (dx, dk) = conv_fn(1, pads, "winograd")(x, kernel)
    for actual, desired in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        assert_close(actual, desired, rtol=3e-4)


@pytest.mark.parametrize("r", [2, 3, 4, 5])
def test_winograd_matrices_compute_the_correlation(r):
    at, g, bt = ops.winograd_matrices(4, r)
    rng = np.random.default_rng(r)
    for _ in range(5):
        d, f = rng.standard_normal(4 + r - 1), rng.standard_normal(r)
        expected = [np.dot(f, d[i : i + r]) for i in range(4)]
        np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_winograd_matrices_reject_too_large_tiles():
    with pytest.raises(ValueError, match="finite points"):
        ops.winograd_matrices(4, 7)
