"""Layer transfer from config: what a run copies, re-initialises, freezes and how fast it trains.

The `transfer` config block (every field optional; no block means a plain run):

  init_from  a workdir of an earlier run (its newest checkpoint), a checkpoint directory, one
             step's directory, or a PyTorch-layout ResNet state dict (.safetensors / .npz, see
             BUILD.md "Pretrained ResNets"); None trains from scratch.
  copy       patterns of leaves to copy from it (default: everything, ``('*',)``).
  reinit     patterns excluded from the copy, i.e. freshly initialised (e.g. a new head).
  freeze     patterns the optimizer never touches (no update, no optimizer state).
  lr_mults   pattern -> learning-rate multiplier, e.g. ``{'feature': 0.1}``.
  layer_decay   layer-wise learning-rate decay (BEiT, Bao et al. 2021; MAE's
             ``util/lr_decay.py``, facebookresearch/mae), e.g. 0.75: the last layer group trains
             at x1, each earlier one at ``layer_decay`` times the next; multiplies ``lr_mults``.
  layer_groups  the groups, in forward order: patterns, or lists of patterns (one group);
             ``{i}`` repeats an entry per number (``'encoder/block{i}'``); leaves in no group
             form the last group. Empty: `tljax.params.default_layer_groups` (numbered modules
             such as ``encoder/block3`` / ``stage2``, and runs of layers between them).
  preset     ``'bitfit'`` (only biases and the head train; Ben Zaken et al. 2021) or
             ``'head_only'`` (a linear probe): everything else frozen as by ``freeze``.
  head       patterns naming the classifier head, trained by the presets and LoRA (default
             ``'last:1'``, the last layer in forward order).
  lora       low-rank adapters on Dense kernels (`tljax.lora`): dict(rank, alpha, targets,
             dropout, train); the network's own leaves are frozen except ``lora.train``.

Patterns are those of `tljax.params.select` (globs, ``re:``, ``first:N``, ``last:N@module``).

BatchNorm running statistics (``running_mean`` / ``running_var`` leaves, `tljax.models.batch_norm`)
are copied and re-initialised with their layer like any leaf, but are always frozen to the
optimizer (no update, no weight decay, no optimizer state); the training method sets them. The
layer table shows them as ``statistics: frozen``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tljax import lora, validate
from tljax import params as ptree
from tljax import workdir as workdirs
from tljax.models import batch_norm

Params = Any

FIELDS = (
    "init_from",
    "copy",
    "reinit",
    "freeze",
    "lr_mults",
    "layer_decay",
    "layer_groups",
    "preset",
    "head",
    "lora",
)
# What each preset trains besides the head (BitFit: every bias); everything else is frozen.
PRESETS = {"bitfit": ("re:(.*/)?bias",), "head_only": ()}
DEFAULT_HEAD = ("last:1",)
# The layer table's group of running statistics: frozen to the optimizer, set by the method.
STATISTICS_LABEL = f"statistics: {ptree.FROZEN}"


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    """The resolved transfer of one run.

    Attributes:
      pretrained: params to copy from (host arrays), or None.
      copied: selection of leaves taken from ``pretrained``.
      frozen: selection of leaves the optimizer leaves untouched.
      labels: optimizer group of each leaf (``tljax.params.lr_labels``).
      summary: readable table of the above, logged at the start of a run.
      adapters: the LoRA adapters the params hold (`tljax.lora.Adapters`), or None.
    """

    pretrained: Params | None
    copied: Any
    frozen: Any
    labels: Any
    summary: str
    adapters: lora.Adapters | None = None

    def apply(self, params: Params, pretrained: Params | None) -> Params:
        """``params`` with the copied leaves taken from ``pretrained`` (traceable)."""
        if pretrained is None:
            return params
        return ptree.copy_params(params, pretrained, self.copied)

    def adapt(self, method):
        """The method to train: ``method`` itself, or with LoRA its `tljax.lora` wrapper.

        Args:
          method: the run's `tljax.methods.Method`, as built (params without adapters).

        Returns:
          A method whose params have the structure of this plan's selections.
        """
        if self.adapters is None:
            return method
        return self.adapters.wrap(method, self.frozen)

    @property
    def any_frozen(self) -> bool:
        return any(jax.tree.leaves(self.frozen))


def _patterns(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def make_plan(config: ml_collections.ConfigDict, init_params, rng) -> TransferPlan:
    """Resolves `config.transfer` against the network built by ``init_params``.

    Args:
      config: the experiment config (its optional `transfer` block is read).
      init_params: rng -> params of the network being trained.
      rng: a PRNG key for the abstract initialisation.

    Returns:
      The `TransferPlan`. With ``transfer.lora`` its selections cover the params with
      adapters; the trainer trains ``plan.adapt(method)``.

    Raises:
      ValueError: an unknown field or value, a pattern matches nothing, copied leaves are
        missing or mis-shaped, or nothing would train.
      FileNotFoundError: `init_from` holds no checkpoint.
    """
    block = config.get("transfer") or ml_collections.ConfigDict()
    unknown = set(block.keys()) - set(FIELDS)
    if unknown:
        raise ValueError(f"Unknown transfer field(s) {sorted(unknown)}; use {', '.join(FIELDS)}.")
    base_shapes = jax.eval_shape(init_params, rng)
    layers = ptree.layer_order(init_params, rng)
    spec = lora.LoRA.from_config(block.get("lora"))
    adapters, shapes = None, base_shapes
    if spec is not None:
        kernels = lora.target_kernels(base_shapes, spec.targets, layers)
        adapters = lora.Adapters(tuple(kernels), spec.rank, spec.alpha)
        shapes = jax.eval_shape(adapters.add, base_shapes, rng)
    # The pretrained params are the network's own: adapters are always new.
    pretrained, copied = _copied(config, block, base_shapes, layers)
    copied = lora.extend(copied, shapes, False)
    frozen = _frozen(block, shapes, layers, spec)
    decay = block.get("layer_decay")
    groups = _groups(block.get("layer_groups"))
    if groups and decay is None:
        raise ValueError("transfer.layer_groups needs transfer.layer_decay (e.g. 0.75).")
    base_mults = None
    if decay is not None:
        base_mults = ptree.layer_decay_mults(shapes, decay, groups, layers)
    lr_mults = dict(block.get("lr_mults") or {})
    statistics = batch_norm.statistics_mask(shapes)
    labels = ptree.lr_labels(shapes, frozen, lr_mults, layers, base_mults)
    shown = jax.tree.map(lambda label, s: STATISTICS_LABEL if s else label, labels, statistics)
    summary = ptree.summary_table(shapes, copied, shown, layers)
    return TransferPlan(pretrained, copied, frozen, labels, summary, adapters)


def _copied(config, block, shapes, layers) -> tuple[Params | None, Any]:
    """(pretrained params or None, selection of the leaves copied from them)."""
    nothing = jax.tree.map(lambda _: False, shapes)
    init_from = block.get("init_from")
    if not init_from:
        if _patterns(block.get("reinit")):
            raise ValueError("transfer.reinit needs transfer.init_from (without it all is new).")
        return None, nothing
    copied = ptree.select(shapes, _patterns(block.get("copy", ("*",))), layers)
    reinit = _patterns(block.get("reinit"))
    if reinit:
        copied = ptree.mask_and(copied, ptree.mask_not(ptree.select(shapes, reinit, layers)))
    pretrained = load_pretrained(init_from, shapes, copied, config.model.get("name"))
    # Fail on a missing or mis-shaped leaf now, with every offender listed.
    ptree.check_copy(shapes, pretrained, copied)
    return pretrained, copied


def _frozen(block, shapes, layers, spec: lora.LoRA | None) -> Any:
    """The frozen selection: ``freeze``, whatever a preset or LoRA does not train, statistics."""
    freeze = _patterns(block.get("freeze"))
    frozen = (
        ptree.select(shapes, freeze, layers) if freeze else jax.tree.map(lambda _: False, shapes)
    )
    trained = _trained_only(block, shapes, layers, spec)
    if trained is not None:
        frozen = jax.tree.map(lambda f, t: bool(f or not t), frozen, trained)
    # Running statistics never train, whatever the patterns say (the method sets them).
    frozen = jax.tree.map(lambda f, s: bool(f or s), frozen, batch_norm.statistics_mask(shapes))
    if all(jax.tree.leaves(frozen)):
        raise ValueError(
            f"transfer.freeze={list(freeze)} (with preset / lora) freezes every parameter, so "
            "nothing would train. Freeze fewer layers (e.g. first:N) or leave the head out."
        )
    return frozen


def _trained_only(block, shapes, layers, spec: lora.LoRA | None) -> Any | None:
    """Selection of the only leaves a preset and/or LoRA lets train; None without either."""
    preset = block.get("preset")
    if not preset and spec is None:
        return None
    head = _patterns(block.get("head", DEFAULT_HEAD))
    patterns: list[str] = []
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"transfer.preset={preset!r}; use one of {sorted(PRESETS)}.")
        if not head:
            raise ValueError(f"transfer.preset={preset!r} trains the head: set transfer.head.")
        patterns += [*PRESETS[preset], *head]
    adapters = jax.tree.map(lambda _: False, shapes)
    if spec is not None:
        patterns += head if spec.train is None else spec.train
        adapters = jax.tree_util.tree_map_with_path(
            lambda kp, _: lora.is_adapter(ptree.path_of(kp)), shapes
        )
    chosen = ptree.select(shapes, patterns, layers) if patterns else adapters
    return jax.tree.map(lambda c, a: bool(c or a), chosen, adapters)


def _groups(value) -> list:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [entry if isinstance(entry, str) else tuple(entry) for entry in value]


def checkpoint_directory(path: str) -> tuple[str, int]:
    """The Orbax checkpoint directory and step that ``path`` points at.

    Args:
      path: a run's workdir, its ``checkpoints`` directory, or one step's directory in it.

    Returns:
      (checkpoints directory, step); the newest step unless ``path`` names one.

    Raises:
      FileNotFoundError: nothing there holds a checkpoint.
    """
    path = os.path.abspath(os.path.expanduser(path))
    candidates = [os.path.join(path, "checkpoints"), path]
    for directory in candidates:
        if os.path.isdir(directory):
            step = ocp.CheckpointManager(directory).latest_step()
            if step is not None:
                return directory, step
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.isdir(path):
        return parent, int(name)
    raise FileNotFoundError(
        f"transfer.init_from={path!r} holds no checkpoint: expected a run's workdir (with "
        "checkpoints/<step>/), its checkpoints/ directory, or one step's directory. Train the "
        "source model first, e.g. python launch.py --config=configs/pretrain.py --workdir=DIR."
    )


TORCH_SUFFIXES = (".safetensors", ".npz")


def load_pretrained(
    path: str, shapes: Params | None = None, copied: Any = None, model_name: str | None = None
) -> Params:
    """Pretrained params as host arrays, from a tljax checkpoint or a PyTorch-layout file.

    Args:
      path: see `checkpoint_directory`, or a ``.safetensors`` / ``.npz`` PyTorch-layout state
        dict of the model's family (`tljax.models.converters`).
      shapes: the model's params shapes (needed to convert a PyTorch file).
      copied: selection of leaves that will be copied; layers with none are not converted
        (e.g. a re-initialised 1000-class head).
      model_name: ``model.name``, which picks the converter of a PyTorch file (default: a
        ResNet's).

    Returns:
      The params pytree (for a PyTorch file: of ``shapes``' structure).

    Raises:
      FileNotFoundError: no checkpoint or file at ``path``.
      ValueError: the checkpoint holds no params.
      tljax.validate.DataError: the PyTorch file cannot be read or does not fit the model.
    """
    if str(path).endswith(TORCH_SUFFIXES):
        return _convert_torch_file(path, shapes, copied, model_name or "resnet")
    directory, step = checkpoint_directory(path)
    # Host arrays of the saved shapes: a target without shardings restores a checkpoint saved
    # on any number of devices (Orbax refuses to guess a sharding for another topology).
    step_dir = os.path.join(directory, str(step), "default")
    saved = ocp.StandardCheckpointer().metadata(step_dir).item_metadata.tree
    target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), saved)
    state = ocp.CheckpointManager(directory).restore(step, args=ocp.args.StandardRestore(target))
    if "params" not in state:
        raise ValueError(f"Checkpoint {directory}/{step} holds no 'params' entry.")
    params = state["params"]
    if lora.holds_adapters(params):
        # A LoRA run: its network is the merged one (tljax/lora.py).
        params = lora.merge(params, _recorded_lora_alpha(directory))
    params = jax.tree.map(np.asarray, params)
    if shapes is not None:
        # A norm='batch' run starting a norm='affine' network keeps its statistics, folded.
        params = batch_norm.fold_into_affine(params, shapes)
    return params


def _recorded_lora_alpha(directory: str) -> float:
    """The ``transfer.lora.alpha`` that the run owning checkpoint ``directory`` trained with."""
    run = os.path.dirname(directory)
    recorded, _ = workdirs.recorded_config(run)
    block = ((recorded or {}).get("transfer") or {}).get("lora") or {}
    alpha = block.get("alpha", lora.LoRA.alpha)
    if not block or isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(
            f"Checkpoint {directory} holds LoRA adapters, but {run} has no config.json that "
            "records transfer.lora.alpha. Merge them first with tljax.lora.merge(params, alpha)."
        )
    return float(alpha)


def _convert_torch_file(path: str, shapes: Params, copied: Any, model_name: str) -> Params:
    from tljax.models import converters

    if shapes is None:
        raise ValueError("Converting a PyTorch checkpoint needs the model's params shapes.")
    wanted = {ptree.layer_of(p) for p in ptree.selected_paths(copied)} if copied else set()
    skipped = {ptree.layer_of(p) for p in ptree.leaf_paths(shapes)} - wanted

    # Layers that are not converted stay as the template's leaves and still travel to the
    # device with the rest, so they must be arrays; converted ones only need their shapes.
    def template_leaf(key_path, shape):
        if ptree.layer_of(ptree.path_of(key_path)) in skipped:
            return np.zeros(shape.shape, shape.dtype)
        return shape

    template = jax.tree_util.tree_map_with_path(template_leaf, shapes)
    try:
        convert, expected = converters.converter_for(model_name)
    except ValueError as error:
        raise validate.ConfigError(f"transfer.init_from={os.fspath(path)!r}: {error}") from None
    state_dict = validate.read_state_dict(path)
    try:
        return convert(state_dict, template, exclude=sorted(skipped))
    except ValueError as error:  # The converter's message lists the problems, not the file.
        raise validate.DataError(
            f"transfer.init_from={os.fspath(path)!r} does not fit this model "
            f"(expected {expected} for model.name={model_name!r}): {error}"
        ) from None
