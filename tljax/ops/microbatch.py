"""Micro-batching: a network's feature extractor run on chunks of the batch, one at a time.

A CPU speed optimisation that does not change the network: each chunk's activations stay in
cache from one layer to the next (and from the forward to the backward pass), so the DANN step
runs 1.15-1.2x faster on the digit network. Accelerators want the largest matmuls instead, so
``'auto'`` means one pass there. ``MicrobatchedFeatures`` applies it from outside a network, which
keeps the network's own definition free of it.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

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


class MicrobatchedFeatures(nn.Module):
    """``net`` with its ``features`` computed in micro-batches of ``rows`` rows (``microbatched``).

    Shares ``net``'s scope, so its params have exactly ``net``'s paths and initial values, and
    computes the same function: a checkpoint of either runs in the other.

    Attributes:
      net: a network with ``features(images)`` and ``classify(features)`` whose features depend
        on each image alone (no batch statistics).
      rows: rows per micro-batch; 0 means one pass.
    """

    net: nn.Module
    rows: int

    def setup(self):
        nn.share_scope(self, self.net)

    def __call__(self, images: Array) -> Array:
        """Class logits of ``images``: ``classify(features(images))``.

        Args:
          images: a batch of inputs.

        Returns:
          ``net``'s class logits.
        """
        return self.classify(self.features(images))

    def features(self, images: Array) -> Array:
        """``net.features(images)``, computed per micro-batch.

        Args:
          images: a batch of inputs.

        Returns:
          ``net``'s features, one row per image.
        """
        return microbatched(self.net.features, images, self.rows)

    def classify(self, features: Array) -> Array:
        """``net.classify(features)``.

        Args:
          features: output of ``features``.

        Returns:
          ``net``'s class logits.
        """
        return self.net.classify(features)
