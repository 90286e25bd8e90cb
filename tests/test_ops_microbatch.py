"""tljax.ops.microbatch: micro-batches compute what one pass computes, with the same params."""

from collections.abc import Callable
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ops_cases import assert_close, normal

from tljax import ops
from tljax.ops import microbatch

# --------------------------------------------------------------------------------------------
# Micro-batching


def test_microbatched_equals_one_pass():
    x = normal((10, 6, 6, 3), 0)
    kernel = normal((3, 3, 3, 4), 1)
    fn = lambda x: ops.max_pool(ops.conv2d(x, kernel, 1, "SAME"), 2)
    expected = fn(x)
    for size in (0, 3, 5, 10, 64):  # uneven last chunk, exact split, one pass
        np.testing.assert_array_equal(ops.microbatched(fn, x, size), expected)


def test_microbatched_makes_at_most_max_chunks():
    calls = []
    fn = lambda x: calls.append(x.shape[0]) or 2 * x
    x = jnp.arange(100.0).reshape(100, 1)
    np.testing.assert_array_equal(ops.microbatched(fn, x, 4), 2 * x)
    assert len(calls) == microbatch._MAX_MICROBATCHES and sum(calls) == 100
    calls.clear()
    ops.microbatched(fn, x, 25)
    assert calls == [25, 25, 25, 25]


def test_microbatched_gradients_equal_one_pass():
    x = normal((7, 6, 6, 3), 0)
    kernel = normal((3, 3, 3, 4), 1)
    loss = lambda k, size: jnp.sum(
        jnp.sin(ops.microbatched(lambda x: ops.conv2d(x, k, 1, "SAME"), x, size))
    )
    assert_close(jax.grad(loss)(kernel, 3), jax.grad(loss)(kernel, 0), rtol=1e-5)


def test_resolve_microbatch():
    assert ops.resolve_microbatch("auto") == microbatch._CPU_MICROBATCH
    assert ops.resolve_microbatch(0) == 0
    assert ops.resolve_microbatch("32") == 32  # As a command-line override gives it.
    with mock.patch("jax.default_backend", return_value="gpu"):
        assert ops.resolve_microbatch("auto") == 0
    for bad in (-1, "fast", None):
        with pytest.raises(ValueError, match="microbatch must be 'auto' or an int >= 0"):
            ops.resolve_microbatch(bad)


# --------------------------------------------------------------------------------------------
# MicrobatchedFeatures


class _TinyNet(nn.Module):
    """A conv feature extractor and a dense classifier; reports the batch of each features call."""

    record: Callable[[int], None]

    def setup(self):
        self.feature = ops.Conv(4, 3, impl="im2col")
        self.label = nn.Dense(3)

    def __call__(self, images):
        return self.classify(self.features(images))

    def features(self, images):
        self.record(images.shape[0])
        return ops.max_pool(self.feature(images), 2).reshape(images.shape[0], -1)

    def classify(self, features):
        return self.label(features)


def test_microbatched_features_keep_the_params_and_the_function():
    calls = []
    net = _TinyNet(calls.append)
    wrapped = ops.MicrobatchedFeatures(_TinyNet(calls.append), rows=4)
    images = normal((10, 6, 6, 2), 0)
    params = net.init(jax.random.key(0), images[:1])
    chex.assert_trees_all_equal(wrapped.init(jax.random.key(0), images[:1]), params)
    calls.clear()
    logits = wrapped.apply(params, images)
    assert calls == [4, 4, 2]
    np.testing.assert_array_equal(logits, net.apply(params, images))
    features = wrapped.apply(params, images, method="features")
    np.testing.assert_array_equal(features, net.apply(params, images, method="features"))
    np.testing.assert_array_equal(wrapped.apply(params, features, method="classify"), logits)
    loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply(p, images)))
    # Gradients sum over the micro-batches in another order: equal to float rounding.
    chex.assert_trees_all_close(
        jax.grad(loss(wrapped))(params), jax.grad(loss(net))(params), rtol=1e-5, atol=1e-6
    )


def test_microbatched_features_with_no_rows_run_one_pass():
    calls = []
    images = normal((10, 6, 6, 2), 0)
    wrapped = ops.MicrobatchedFeatures(_TinyNet(calls.append), rows=0)
    params = wrapped.init(jax.random.key(0), images[:1])
    calls.clear()
    wrapped.apply(params, images)
    assert calls == [10]
