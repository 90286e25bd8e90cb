"""LoRA: low-rank adapters on Dense kernels, as a params transform around any method.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
reference implementation microsoft/LoRA, ``loralib/layers.py`` (``Linear``: shapes, init,
scaling, merge) and ``loralib/utils.py`` (``mark_only_lora_as_trainable``).

The ``transfer.lora`` config block (`LoRA.from_config`)::

    lora = dict(rank=8, alpha=16, targets=("*attn/query/kernel", "*attn/value/kernel"),
                dropout=0.0, train=None)

  rank     r, the adapters' inner dimension.
  alpha    the scaling numerator: the update is ``(alpha / rank) * B A`` (loralib's scaling).
  targets  patterns (`tljax.params.select`) choosing the Dense kernels to adapt: among the
           leaves they select, the 2-D leaves named ``kernel`` are adapted (so ``'*'`` means every
           Dense layer, ``'encoder'`` every Dense layer of the encoder); each pattern must reach
           at least one. The default adapts the attention's query and value projections, as Hu
           et al. do (their Sec. 7.1), with tljax's ViT names (tljax/models/vit.py); the digit
           network and ResNets need their own (e.g. ``('label/dense_0', 'label/dense_1')``).
  dropout  must be 0 (see below).
  train    patterns of the network's own leaves that still train beside the adapters (None:
           ``transfer.head``, the classifier head; ``()``: adapters only). Everything else is
           frozen, through the same mechanism as ``transfer.freeze``: no update, no weight
           decay, no optimizer state, bit-identical after training.

Parameters: every adapted layer gains two leaves beside its ``kernel`` [in, out]: ``lora_a``
[rank, in] (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as loralib's
``nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))``) and ``lora_b`` [out, rank] (zeros), so
training starts from the pretrained network exactly. The shapes are loralib's; Flax stores the
kernel transposed from PyTorch's weight, so the effective kernel is

    kernel + (alpha / rank) * (lora_b @ lora_a).T

Mechanism, and why: the method's ``init_params`` is wrapped to add the adapters, and its
``loss_fn`` / ``eval_fn`` / ``predict_fn`` / ``value_and_grad`` are wrapped to hand the network
`merge` (params) -- ordinary params with each adapted kernel replaced by the effective one.
Alternatives considered: changing each model's Dense layers (every model would need a LoRA
variant), or ``flax.linen.intercept_methods`` (adds ``x A^T B^T`` at call time; it works only
for modules whose call is ``x @ kernel + bias``, so each kind of layer needs its own rule). The
params transform needs no model change, works for any network whose Dense kernels are 2-D
leaves, and leaves the trainer, checkpoints (the adapters are ordinary leaves of the state)
and transfer patterns (the adapters sit in their layer, so
``first:N``, layer decay and ``lr_mults`` treat them as part of it) as they are; the trainer
only calls `tljax.transfer.TransferPlan.adapt`. Merging costs one rank-r product per kernel
per step, small beside the batch's own matmuls, and frozen leaves enter through
``stop_gradient``, so no weight gradients are computed for them. The price: dropout on the
adapter branch's input (loralib's ``lora_dropout``) has no place in a merged kernel, so
``dropout`` must be 0 (loralib's default).

`merge` gives plain model params for export or evaluation; `tljax.transfer.load_pretrained`
merges a LoRA run's checkpoint on its own (with the alpha its config.json records), so a LoRA
run can be the ``init_from`` of another run or a candidate of ``tljax.rank``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tljax import methods
from tljax import params as ptree

Params = Any

LORA_A = "lora_a"
LORA_B = "lora_b"
ADAPTER_LEAVES = (LORA_A, LORA_B)
FIELDS = ("rank", "alpha", "targets", "dropout", "train")
DEFAULT_TARGETS = ("*attn/query/kernel", "*attn/value/kernel")
# Folded into the init key for the adapters, so the network's own leaves initialise exactly as
# in a run without LoRA (e.g. a new head).
_ADAPTER_STREAM = 0x10A


@dataclasses.dataclass(frozen=True)
class LoRA:
    """The settings of a ``transfer.lora`` block.

    Attributes:
      rank: the adapters' inner dimension r.
      alpha: the scaling numerator (update scale ``alpha / rank``).
      targets: patterns choosing the Dense kernels to adapt.
      train: patterns of non-adapter leaves that still train; None: ``transfer.head``.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None) -> LoRA | None:
        """The settings of a ``transfer.lora`` block, checked.

        Args:
          block: the block (a dict or ConfigDict), or None / empty for no LoRA.

        Returns:
          The settings, or None.

        Raises:
          ValueError: an unknown field or an invalid value, named.
        """
        if not block:
            return None
        block = dict(block)
        unknown = set(block) - set(FIELDS)
        if unknown:
            raise ValueError(f"Unknown transfer.lora field(s) {sorted(unknown)}; use {FIELDS}.")
        rank = block.get("rank", cls.rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"transfer.lora.rank={rank!r}: must be a positive integer.")
        alpha = block.get("alpha", cls.alpha)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ValueError(f"transfer.lora.alpha={alpha!r}: must be a positive number.")
        if float(block.get("dropout", 0.0)) != 0.0:
            raise ValueError(
                f"transfer.lora.dropout={block['dropout']!r}: only 0 is supported. Adapters "
                "are merged into the kernels (tljax/lora.py), which leaves no separate branch "
                "whose input dropout could drop."
            )
        targets = _patterns(block.get("targets", DEFAULT_TARGETS))
        if not targets:
            raise ValueError("transfer.lora.targets is empty: name the Dense kernels to adapt.")
        train = block.get("train")
        return cls(int(rank), float(alpha), targets, None if train is None else _patterns(train))


def _patterns(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def target_kernels(
    shapes: Params, targets: Sequence[str], layers: Sequence[str] | None = None
) -> list[str]:
    """Paths of the Dense kernels ``targets`` adapt: 2-D leaves named ``kernel`` they select.

    Args:
      shapes: the network's params (or their shapes), without adapters.
      targets: patterns (`tljax.params.select`).
      layers: forward layer order, for ``first:``/``last:`` patterns.

    Returns:
      Kernel paths, in ``jax.tree`` order.

    Raises:
      ValueError: a pattern matches nothing, or nothing it matches is a 2-D kernel.
    """
    flat = traverse_util.flatten_dict(shapes, sep="/")
    chosen: set[str] = set()
    for pattern in targets:
        try:
            hits = ptree.selected_paths(ptree.select(shapes, pattern, layers))
        except ValueError as error:
            raise ValueError(f"transfer.lora.targets: {error}") from None
        kernels = [p for p in hits if p.rpartition("/")[2] == "kernel" and len(flat[p].shape) == 2]
        if not kernels:
            shown = [f"{p}{list(flat[p].shape)}" for p in hits[:8]]
            raise ValueError(
                f"transfer.lora.targets pattern {pattern!r} reaches no Dense kernel (a 2-D leaf "
                f"named 'kernel'); it matches {shown}{' ...' if len(hits) > 8 else ''}."
            )
        chosen.update(kernels)
    return [p for p in ptree.leaf_paths(shapes) if p in chosen]


def is_adapter(path: str) -> bool:
    """Whether the leaf at ``path`` is a LoRA adapter (``.../lora_a`` or ``.../lora_b``)."""
    return path.rpartition("/")[2] in ADAPTER_LEAVES


def holds_adapters(params: Params) -> bool:
    """Whether ``params`` holds LoRA adapters (e.g. a LoRA run's checkpoint)."""
    return any(is_adapter(path) for path in ptree.leaf_paths(params))


def init_adapters(rng, params: Params, kernels: Sequence[str], rank: int) -> Params:
    """``params`` with fresh adapters beside each of ``kernels`` (loralib's ``Linear`` init).

    Args:
      rng: a PRNG key.
      params: the network's params (arrays or ``ShapeDtypeStruct``s under ``eval_shape``).
      kernels: paths of the 2-D kernels [in, out] to adapt (`target_kernels`).
      rank: r.

    Returns:
      A new params tree: each adapted layer also holds ``lora_a`` [rank, in], uniform in
      +-1/sqrt(in) (``kaiming_uniform_(a=sqrt(5))``: gain sqrt(2 / (1 + 5)) times sqrt(3 /
      fan_in)), and ``lora_b`` [out, rank], zeros, both of the kernel's dtype.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    for index, path in enumerate(kernels):
        kernel = flat[path]
        fan_in, fan_out = kernel.shape
        bound = math.sqrt(2.0 / (1.0 + 5.0)) * math.sqrt(3.0 / fan_in)
        key = jax.random.fold_in(rng, index)
        layer = path.rpartition("/")[0]
        flat[f"{layer}/{LORA_A}"] = jax.random.uniform(
            key, (rank, fan_in), kernel.dtype, minval=-bound, maxval=bound
        )
        flat[f"{layer}/{LORA_B}"] = jnp.zeros((fan_out, rank), kernel.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def merge(params: Params, alpha: float) -> Params:
    """Plain model params: each adapted kernel replaced by ``kernel + (alpha/r) (B A)^T``.

    The rank r is each layer's own (``lora_a``'s first dimension), so only ``alpha`` is needed.
    Traceable; used inside the wrapped loss and for export.

    Args:
      params: params holding adapters (leaves without adapters pass through).
      alpha: the run's ``transfer.lora.alpha``.

    Returns:
      Params of the network's own structure (no ``lora_*`` leaves), kernels in their dtype.

    Raises:
      ValueError: a layer holds only one of the two adapters, or their shapes do not fit its
        kernel.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    adapted = sorted({p.rpartition("/")[0] for p in flat if is_adapter(p)})
    for layer in adapted:
        a, b = flat.pop(f"{layer}/{LORA_A}", None), flat.pop(f"{layer}/{LORA_B}", None)
        kernel = flat.get(f"{layer}/kernel")
        if a is None or b is None or kernel is None:
            raise ValueError(f"LoRA layer {layer!r} needs kernel, {LORA_A} and {LORA_B}.")
        if (
            jnp.ndim(kernel) != 2
            or (a.shape[1], b.shape[0]) != kernel.shape
            or (b.shape[1] != a.shape[0])
        ):
            raise ValueError(
                f"LoRA layer {layer!r}: {LORA_A}{list(a.shape)} and {LORA_B}{list(b.shape)} do "
                f"not fit kernel{list(jnp.shape(kernel))} (expected [r, in], [out, r])."
            )
        # Full precision: on accelerators a default-precision matmul may round the operands.
        delta = jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST).T
        flat[f"{layer}/kernel"] = (kernel + (alpha / a.shape[0]) * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def strip(tree: Params) -> Params:
    """``tree`` (params or a selection of their structure) without its adapter leaves."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return traverse_util.unflatten_dict(
        {path: leaf for path, leaf in flat.items() if not is_adapter(path)}, sep="/"
    )


def extend(tree: Params, like: Params, fill: Any) -> Params:
    """``tree`` (of the network's structure) grown to ``like``'s, ``fill`` at the adapters.

    Args:
      tree: e.g. a selection over the network's params.
      like: params (or shapes) with adapters.
      fill: the value of the new leaves.

    Returns:
      A pytree of ``like``'s structure.
    """
    flat = traverse_util.flatten_dict(tree, sep="/")
    return jax.tree_util.tree_map_with_path(lambda kp, _: flat.get(ptree.path_of(kp), fill), like)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The adapters of one run: which kernels, their rank and scaling.

    Attributes:
      kernels: paths of the adapted kernels.
      rank: r.
      alpha: the scaling numerator.
    """

    kernels: tuple[str, ...]
    rank: int
    alpha: float

    def add(self, params: Params, rng) -> Params:
        """``params`` with fresh adapters (`init_adapters`), drawn from a stream of ``rng``."""
        key = jax.random.fold_in(rng, _ADAPTER_STREAM)
        return init_adapters(key, params, self.kernels, self.rank)

    def merge(self, params: Params, frozen: Params | None = None) -> Params:
        """`merge`, with ``frozen`` leaves (a selection) behind ``stop_gradient``."""
        if frozen is not None:
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        return merge(params, self.alpha)

    def wrap(self, method, frozen: Params):
        """``method`` training the adapters: its functions see merged params.

        Args:
          method: a `tljax.methods.Method` of the network without adapters.
          frozen: selection (over the params with adapters) of the leaves that do not train.

        Returns:
          A `tljax.methods.Method` whose params hold the adapters.
        """

        def init_params(rng):
            return self.add(method.init_params(rng), rng)

        def loss_fn(params, batch, rng, step, *anchor):
            merged = self.merge(params, frozen)
            if not anchor:
                return method.loss_fn(merged, batch, rng, step)
            start = methods.Anchor(
                merge(anchor[0].params, self.alpha), strip(anchor[0].transferred)
            )
            return method.loss_fn(merged, batch, rng, step, start)

        def on_merged(fn):
            return (
                None if fn is None else (lambda params, *args: fn(merge(params, self.alpha), *args))
            )

        value_and_grad = None
        if method.value_and_grad is not None:

            def value_and_grad(params, batch, rng, step):
                # The method differentiates w.r.t. the merged params; the chain rule through
                # the merge (its VJP) gives the adapters' gradients.
                merged, pullback = jax.vjp(lambda p: self.merge(p, frozen), params)
                (loss, metrics), grads = method.value_and_grad(merged, batch, rng, step)
                return (loss, metrics), pullback(grads)[0]

        return dataclasses.replace(
            method,
            init_params=init_params,
            loss_fn=loss_fn,
            eval_fn=on_merged(method.eval_fn),
            predict_fn=on_merged(method.predict_fn),
            value_and_grad=value_and_grad,
        )
