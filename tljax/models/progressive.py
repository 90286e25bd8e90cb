"""Progressive neural networks (Rusu et al. 2016) of digit-network columns.

One column per task. Column k's layer i sums its own transform of its layer i-1 output with a
lateral input from layer i-1 of every earlier column j < k, through Rusu et al.'s adapter

  h_i^k = f(W_i^k h_{i-1}^k + sum_{j<k} U_i^{k:j} sigma(V_i^{k:j} alpha_i^{k:j} h_{i-1}^j)),

with a learned scalar alpha (initialised to a small random value), V a dimension-reducing
projection (a 1x1 convolution on feature maps, a dense layer on vectors) and U a layer of the
same kind as W_i (a 5x5 convolution for conv layers, dense otherwise). A column is the digit
network of `tljax.models.digits` (conv-pool-ReLU x2, dense-ReLU stack, head).

Params are ``column_<k>/<layer>`` for column k's own layers and
``column_<k>/lateral_<j>_<layer>/{alpha,v,u}`` for its adapters from column j, so ``column_0``
names everything task 0 uses and freezing it (transfer.freeze) leaves task 0's outputs
bit-identical. Each column's head is ``column_<k>/head_<k>``.

Modes: ``progressive`` (with adapters), ``independent`` (columns without adapters: a fresh
network per task, the no-transfer baseline) and ``finetune`` (a single column whose trunk every
task fine-tunes, with one head per task: ``column_0/head_<k>``; the forgetting baseline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax import params as ptree

MODES = ("progressive", "independent", "finetune")
KERNEL = (5, 5)

# A Flax module class or a functools.partial of one, as in the Flax examples.
ModuleDef = Any


def _conv(module: nn.Module, features: int, kernel: tuple[int, int], **kwargs) -> nn.Module:
    """A conv layer made by ``module.conv`` in ``module.dtype``."""
    return module.conv(features, kernel, dtype=module.dtype, **kwargs)


class Adapter(nn.Module):
    """A lateral connection U sigma(V alpha h) into a layer of `features` outputs.

    Attributes:
      features: output width (the receiving layer's width).
      reduced: width of V's output (the dimensionality reduction).
      into_conv: whether the receiving layer is a convolution (U is then a 5x5 convolution);
        otherwise U is dense (and a feature map is flattened after V).
      alpha_init: alpha starts uniform in [0, alpha_init).
      conv, dtype: as for ``tljax.models.digits.DigitFeatures``.
    """

    features: int
    reduced: int
    into_conv: bool
    alpha_init: float = 0.1
    conv: ModuleDef = nn.Conv
    dtype: Any = None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """The lateral contribution to the receiving layer's pre-activation."""
        # Rusu et al. start alpha at a random small value to absorb the inputs' scales.
        alpha = self.param("alpha", nn.initializers.uniform(scale=self.alpha_init), (), jnp.float32)
        h = h * alpha.astype(h.dtype)
        if h.ndim == 4:
            h = _conv(self, self.reduced, (1, 1), name="v")(h)
        else:
            h = nn.Dense(self.reduced, dtype=self.dtype, name="v")(h)
        h = nn.relu(h)
        if self.into_conv:
            # No bias: the receiving layer W_i has one.
            return _conv(self, self.features, KERNEL, padding="VALID", use_bias=False, name="u")(h)
        return nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="u")(
            h.reshape(h.shape[0], -1)
        )


class _ColumnConfig(nn.Module):
    """The fields that shape a column; `ProgressiveNet` passes its own on to every `Column`.

    Attributes:
      conv_widths: output channels of the 5x5 conv-pool-ReLU layers.
      dense_widths: widths of the dense-ReLU layers before the heads.
      reduction: V reduces its input width by this factor (at least one unit).
      alpha_init: adapters' alpha starts uniform in [0, alpha_init).
      conv, pool, dtype: as for ``tljax.models.digits.DigitFeatures``.
    """

    conv_widths: tuple[int, ...] = (32, 48)
    dense_widths: tuple[int, ...] = (100, 100)
    reduction: int = 4
    alpha_init: float = 0.1
    conv: ModuleDef = nn.Conv
    pool: Callable[..., jax.Array] = nn.max_pool
    dtype: Any = None


_COLUMN_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(_ColumnConfig)
    if field.name not in ("parent", "name")
)


class Column(_ColumnConfig, kw_only=True):
    """One digit-network column, optionally receiving adapters from earlier columns.

    Attributes:
      heads: task index -> classes, one linear head per entry (``head_<task>``).
      conv_widths, dense_widths, reduction, alpha_init, conv, pool, dtype: see `_ColumnConfig`.
    """

    heads: tuple[tuple[int, int], ...]

    def _lateral(self, name: str, features: int, into_conv: bool, sources, index: int):
        total = 0.0
        for j, earlier in enumerate(sources):
            h = earlier[index]
            reduced = max(1, h.shape[-1] // self.reduction)
            adapter = Adapter(
                features,
                reduced,
                into_conv,
                self.alpha_init,
                conv=self.conv,
                dtype=self.dtype,
                name=f"lateral_{j}_{name}",
            )
            total = total + adapter(h)
        return total

    @nn.compact
    def __call__(self, images: jax.Array, earlier: Sequence[Sequence[jax.Array]] = ()):
        """Runs the column.

        Args:
          images: float NHWC images.
          earlier: for each earlier column, its hidden outputs (one per layer before the heads),
            the sources of this column's lateral inputs; empty for no laterals.

        Returns:
          (this column's hidden outputs, {task: float32 logits}).
        """
        hiddens = []
        h = images
        for i, width in enumerate(self.conv_widths):
            name = f"conv_{i}"
            pre = _conv(self, width, KERNEL, padding="VALID", name=name)(h)
            if i > 0:
                pre = pre + self._lateral(name, width, True, earlier, i - 1)
            # relu(maxpool(x)) == maxpool(relu(x)); pooling first is cheaper (see digits.py).
            h = nn.relu(self.pool(pre, (2, 2), strides=(2, 2)))
            hiddens.append(h)
        offset = len(self.conv_widths)
        for i, width in enumerate(self.dense_widths):
            name = f"dense_{i}"
            pre = nn.Dense(width, dtype=self.dtype, name=name)(h.reshape(h.shape[0], -1))
            pre = pre + self._lateral(name, width, False, earlier, offset + i - 1)
            h = nn.relu(pre)
            hiddens.append(h)
        logits = {}
        for task, classes in self.heads:
            name = f"head_{task}"
            out = nn.Dense(classes, dtype=self.dtype, name=name)(h)
            out = out + self._lateral(name, classes, False, earlier, len(hiddens) - 1)
            logits[task] = out.astype(jnp.float32)
        return hiddens, logits


class ProgressiveNet(_ColumnConfig, kw_only=True):
    """Columns for tasks 0..K (or one fine-tuned trunk with K+1 heads); see the module doc.

    Attributes:
      task_classes: classes of each task so far, in order; the last one is trained now.
      mode: 'progressive', 'independent' or 'finetune'.
      conv_widths, dense_widths, reduction, alpha_init, conv, pool, dtype: every column's (see
        `_ColumnConfig`).
    """

    task_classes: tuple[int, ...]
    mode: str = "progressive"

    def _column(self, heads, name):
        config = {field: getattr(self, field) for field in _COLUMN_FIELDS}
        return Column(heads=heads, name=name, **config)

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """Logits of every task's head, in task order.

        Args:
          images: float NHWC images.

        Returns:
          One [N, classes_k] float32 array per task.
        """
        if self.mode not in MODES:
            raise ValueError(f"Unknown progressive mode {self.mode!r}; use one of {MODES}.")
        tasks = tuple(enumerate(self.task_classes))
        if self.mode == "finetune":
            _, logits = self._column(tasks, "column_0")(images)
            return tuple(logits[task] for task, _ in tasks)
        sources, outputs = [], []
        last = len(tasks) - 1
        for task, classes in tasks:
            earlier = sources if self.mode == "progressive" else ()
            hiddens, logits = self._column(((task, classes),), f"column_{task}")(images, earlier)
            if task < last:
                # Earlier columns never train on later tasks: no backward pass through them.
                hiddens = jax.lax.stop_gradient(hiddens)
                logits = jax.lax.stop_gradient(logits)
            sources.append(hiddens)
            outputs.append(logits[task])
        return tuple(outputs)


def column_param_counts(params) -> list[dict[str, int]]:
    """Parameters of each column: its own layers, its adapters, and the running total.

    Args:
      params: ProgressiveNet params (arrays or shapes).

    Returns:
      One dict per column, in order: {'column', 'own', 'lateral', 'column_total', 'total'}.
    """
    rows, running = [], 0
    columns = sorted((key for key in params if key.startswith("column_")), key=_column_index)
    for name in columns:
        tree = params[name]
        lateral = sum(ptree.count(v) for k, v in tree.items() if k.startswith("lateral_"))
        size = ptree.count(tree)
        running += size
        index = _column_index(name)
        rows.append(
            dict(
                column=index, own=size - lateral, lateral=lateral, column_total=size, total=running
            )
        )
    return rows


def _column_index(name: str) -> int:
    return int(name.rpartition("_")[2])


def param_growth_table(params) -> str:
    """Markdown table of `column_param_counts`."""
    rows = [
        "| column | own | lateral adapters | column total | network total |",
        "|---|---|---|---|---|",
    ]
    for row in column_param_counts(params):
        rows.append(
            f"| {row['column']} | {row['own']:,} | {row['lateral']:,} | {row['column_total']:,} "
            f"| {row['total']:,} |"
        )
    return "\n".join(rows)
