"""BatchNorm whose running statistics are params leaves, updated through ``"batch_stats"``.

Batch normalisation (Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
by Reducing Internal Covariate Shift", ICML 2015) with PyTorch's conventions
(pytorch/pytorch ``torch/nn/modules/batchnorm.py`` ``_BatchNorm`` and
``torch/nn/functional.py::batch_norm``): ``momentum=0.1`` weighs the new batch,
``running = (1 - momentum) * running + momentum * batch``; the running variance takes the
unbiased batch variance and the normalisation the biased one; ``epsilon=1e-5``. So a
torchvision BatchNorm maps leaf for leaf: ``weight, bias, running_mean, running_var`` ->
``scale, bias, running_mean, running_var``.

Where the statistics live. Flax's ``nn.BatchNorm`` (google/flax ``flax/linen/normalization.py``)
keeps them in a collection of their own; here they are leaves of ``params`` beside ``scale`` and
``bias``, so everything the trainer does to params (replication, checkpoints with integrity
records, transfer patterns that copy or re-initialise a layer) applies to them unchanged. They
are never trained: `tljax.transfer.make_plan` labels every `is_statistic` leaf frozen, and the
normalisation reads them through ``stop_gradient``.

Modes (``train``):

* ``train=True``: normalise with the statistics of the batch, over every axis but the last
  (channel) one, computed in float32 whatever the compute dtype. Under ``jax.jit`` with the
  batch sharded over devices the reductions are global: synchronised BatchNorm, with no
  collective to write. The updated running statistics are written to the mutable collection
  ``"batch_stats"`` at the module's own path (apply with ``mutable=["batch_stats"]``); a method
  returns them as ``metrics["batch_stats"]`` (`STATS_KEY`) and the trainer stores them into
  the params after the optimizer step (`write_statistics`).
* ``train=False``: normalise with the running statistics (evaluation; fine-tuning with frozen
  BatchNorm, ``model.batch_stats='frozen'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "COLLECTION",
    "STATISTICS",
    "STATS_KEY",
    "BatchNorm",
    "is_statistic",
    "statistics_mask",
    "write_statistics",
]

Array = jax.Array

# The mutable collection the new running statistics are written to, and the reserved metrics
# entry a method's loss returns them in (the same name: one thing, one word).
COLLECTION = "batch_stats"
STATS_KEY = "batch_stats"
# The leaf names of a BatchNorm's running statistics.
STATISTICS = ("running_mean", "running_var")


def is_statistic(path: str) -> bool:
    """Whether a params path names a running statistic (``.../running_mean`` or ``running_var``).

    Args:
      path: a leaf path such as ``stage1/block0/norm1/running_var``.

    Returns:
      True for the statistics leaves of a `BatchNorm`.
    """
    return path.rpartition("/")[2] in STATISTICS


def statistics_mask(params: Any) -> Any:
    """The selection (bool pytree of ``params``' structure) of its running-statistics leaves.

    Args:
      params: a params pytree (arrays or ``ShapeDtypeStruct``s).

    Returns:
      True at every `is_statistic` leaf.
    """
    return jax.tree_util.tree_map_with_path(
        lambda key_path, _: is_statistic(
            jax.tree_util.keystr(key_path, simple=True, separator="/")
        ),
        params,
    )


def fold_into_affine(params: Any, shapes: Any, epsilon: float = 1e-5) -> Any:
    """Folds the BatchNorm layers of ``params`` into scale and bias where ``shapes`` is affine.

    A checkpoint of a ``norm='batch'`` network (e.g. AdaBN's output) starting a
    ``norm='affine'`` one: its statistics become part of the frozen per-channel scale and bias,
    exactly BatchNorm in eval mode, instead of being dropped.

    Args:
      params: host params (nested dicts of numpy arrays) of the pretrained network.
      shapes: the params (or shapes) of the network they start.

    Returns:
      ``params`` with each BatchNorm layer whose counterpart in ``shapes`` has ``scale`` and
      ``bias`` but no statistics folded; other layers as they are.
    """
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    target = traverse_util.flatten_dict(dict(shapes), sep="/")
    for mean_path in [path for path in flat if path.endswith("/running_mean")]:
        module = mean_path.rpartition("/")[0]
        if f"{module}/running_mean" in target or f"{module}/scale" not in target:
            continue
        mean = np.asarray(flat.pop(mean_path), np.float64)
        var = np.asarray(flat.pop(f"{module}/running_var"), np.float64)
        scale = np.asarray(flat[f"{module}/scale"], np.float64) / np.sqrt(var + epsilon)
        dtype = np.asarray(flat[f"{module}/scale"]).dtype
        bias = np.asarray(flat[f"{module}/bias"], np.float64) - mean * scale
        flat[f"{module}/scale"], flat[f"{module}/bias"] = scale.astype(dtype), bias.astype(dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def write_statistics(params: Any, batch_stats: Mapping[str, Any]) -> Any:
    """``params`` with the running statistics of ``batch_stats`` written in (traceable).

    Args:
      params: the params pytree (nested dicts).
      batch_stats: nested dict of new statistics leaves at their params paths, as a
        ``"batch_stats"`` collection returned by ``apply(..., mutable=["batch_stats"])``.

    Returns:
      A params tree of the same structure and dtypes.

    Raises:
      ValueError: a leaf of ``batch_stats`` is not a running statistic of ``params`` or has
        another shape (a method returned the updates of another network).
    """
    new = traverse_util.flatten_dict(dict(batch_stats), sep="/")
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    wrong = [
        path
        for path, value in new.items()
        if not is_statistic(path) or path not in flat or jnp.shape(value) != jnp.shape(flat[path])
    ]
    if wrong:
        raise ValueError(
            f"batch_stats updates {sorted(wrong)[:5]} are not running statistics of the params "
            "(same path and shape): a method's loss must return the updates of its own network."
        )

    def pick(key_path, leaf):
        path = jax.tree_util.keystr(key_path, simple=True, separator="/")
        return new[path].astype(leaf.dtype) if path in new else leaf

    return jax.tree_util.tree_map_with_path(pick, params)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis, running statistics in ``params`` (see the module docstring).

    Params: ``scale`` and ``bias`` (trained), ``running_mean`` (zeros) and ``running_var``
    (ones) (never trained), each of shape ``(C,)`` in ``param_dtype``.

    Attributes:
      train: normalise with the batch statistics and write the updated running statistics to
        ``"batch_stats"`` (True), or normalise with the running statistics (False).
      momentum: weight of the new batch in the running statistics (PyTorch's convention).
      epsilon: added to the variance before its square root.
      scale_init: initializer of ``scale`` (ones, or zeros for the last norm of a block).
      dtype: computation dtype of the output (``None``: inferred from inputs and params).
      param_dtype: dtype of the four leaves.
    """

    train: bool
    momentum: float = 0.1
    epsilon: float = 1e-5
    scale_init: Callable[..., Array] = nn.initializers.ones
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalises ``x`` per channel (its last axis).

        Args:
          x: ``(..., C)`` input.

        Returns:
          ``(..., C)`` output in the computation dtype.

        Raises:
          ValueError: ``train=True`` applied without ``mutable=["batch_stats"]``: the updated
            statistics would be lost silently.
        """
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        running_mean = self.param(
            "running_mean", nn.initializers.zeros, (channels,), self.param_dtype
        )
        running_var = self.param("running_var", nn.initializers.ones, (channels,), self.param_dtype)
        out_dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        x32 = x.astype(jnp.float32)
        if self.train:
            mean, variance = self._batch_statistics(x32, running_mean, running_var)
        else:
            mean = jax.lax.stop_gradient(running_mean).astype(jnp.float32)
            variance = jax.lax.stop_gradient(running_var).astype(jnp.float32)
        inverse = jax.lax.rsqrt(variance + self.epsilon) * scale.astype(jnp.float32)
        return ((x32 - mean) * inverse + bias.astype(jnp.float32)).astype(out_dtype)

    def _batch_statistics(
        self, x32: Array, running_mean: Array, running_var: Array
    ) -> tuple[Array, Array]:
        """(mean, biased variance) of the batch; records the updated running statistics."""
        axes = tuple(range(x32.ndim - 1))
        mean = jnp.mean(x32, axis=axes)
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 loses the variance of
        # channels with a large mean to cancellation.
        variance = jnp.mean(jnp.square(x32 - mean), axis=axes)
        if self.is_initializing():
            return mean, variance
        if not self.is_mutable_collection(COLLECTION):
            raise ValueError(
                f"BatchNorm {'/'.join(self.scope.path)} runs with train=True, which updates its "
                f"running statistics: apply the network with mutable=['{COLLECTION}'] and store "
                "them (`tljax.models.batch_norm.write_statistics`), or build it with train=False "
                "(model.batch_stats='frozen')."
            )
        count = x32.size // x32.shape[-1]
        unbiased = variance * (count / max(count - 1, 1))
        for name, running, batch in (
            ("running_mean", running_mean, mean),
            ("running_var", running_var, unbiased),
        ):
            updated = (1.0 - self.momentum) * running + self.momentum * batch
            self.put_variable(
                COLLECTION, name, jax.lax.stop_gradient(updated).astype(running.dtype)
            )
        return mean, variance
