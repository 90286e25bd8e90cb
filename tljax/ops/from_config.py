"""The configured convolution, pooling and micro-batching of a conv network, from its config."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from tljax.ops.conv import CONV_IMPLS, Conv
from tljax.ops.microbatch import resolve_microbatch
from tljax.ops.native import operand_dtype
from tljax.ops.pooling import max_pool

# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any


class ConvOps(NamedTuple):
    """What a conv network takes from the ``model`` config block besides its architecture.

    Attributes:
      conv: ``Conv`` with the configured lowering and operand dtype, to pass as a network's
        ``conv`` (a drop-in for ``nn.Conv``).
      pool: ``max_pool`` with the configured lowering, to pass as a network's ``pool`` (same
        signature as ``nn.max_pool``).
      microbatch: rows per micro-batch of the feature extractor (``MicrobatchedFeatures``); 0
        means one pass.
    """

    conv: ModuleDef
    pool: Callable[..., Any]
    microbatch: int


def conv_from_config(model_config: Mapping[str, Any]) -> ConvOps:
    """The convolution, pooling and micro-batching that a config's ``model`` block asks for.

    Every method builds its conv network through this, so the settings reach every model the
    same way, and a wrong value fails when the method is built rather than at the first trace.

    Args:
      model_config: a config's ``model`` block (a ConfigDict or mapping). ``conv_impl`` (one of
        ``CONV_IMPLS``) is required; ``conv_operands`` defaults to ``'float32'`` (configs saved
        before it existed) and ``microbatch`` to ``'auto'`` (see ``resolve_microbatch``).

    Returns:
      The ``ConvOps``.

    Raises:
      ValueError: an unknown ``conv_impl``, ``conv_operands`` or ``microbatch``.
    """
    impl = model_config["conv_impl"]
    operands = model_config.get("conv_operands", "float32")
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={impl!r}; choose one of {CONV_IMPLS}.")
    operand_dtype(operands)
    return ConvOps(
        conv=functools.partial(Conv, impl=impl, operands=operands),
        pool=functools.partial(max_pool, impl=impl),
        microbatch=resolve_microbatch(model_config.get("microbatch", "auto")),
    )
