"""CPU-efficient convolution, pooling and micro-batching, injected into the models.

The models in ``tljax.models`` are plain Flax: they take their convolution as a module
(``conv``, ``nn.Conv`` by default) and their pooling as a function (``pool``, ``nn.max_pool`` by
default). On GPU and TPU that is all they need. On CPU, XLA runs small convnets at a tenth of its
matmul speed under differentiation, so this package provides drop-ins with faster CPU lowerings:

* ``conv2d`` / ``Conv`` (``conv``): ``'im2col'`` (``im2col``), ``'winograd'`` (``winograd``) or
  ``'xla'`` (``native``), chosen per layer by ``impl='auto'``; optionally bf16 matmul operands.
* ``max_pool`` / ``avg_pool`` (``pooling``): the same ``impl`` names.
* ``MicrobatchedFeatures`` (``microbatch``): a network's feature extractor run on chunks of the
  batch, applied from outside the network.

All of them compute what the plain Flax ops compute, with the same parameters, so checkpoints
move freely between lowerings. ``conv_from_config`` reads them from a config's ``model`` block
(``conv_impl``, ``conv_operands``, ``microbatch``). The host allocator matters as much as the
lowerings on CPU: see ``tljax/host.py``.
"""

from tljax.ops.conv import CONV_IMPLS, Conv, conv2d, conv_lowering, resolve_impl
from tljax.ops.from_config import ConvOps, ModuleDef, conv_from_config
from tljax.ops.microbatch import MicrobatchedFeatures, microbatched, resolve_microbatch
from tljax.ops.native import CONV_OPERANDS, operand_dtype
from tljax.ops.pooling import avg_pool, max_pool
from tljax.ops.winograd import winograd_matrices

__all__ = [
    "CONV_IMPLS",
    "CONV_OPERANDS",
    "Conv",
    "ConvOps",
    "MicrobatchedFeatures",
    "ModuleDef",
    "avg_pool",
    "conv2d",
    "conv_from_config",
    "conv_lowering",
    "max_pool",
    "microbatched",
    "operand_dtype",
    "resolve_impl",
    "resolve_microbatch",
    "winograd_matrices",
]
