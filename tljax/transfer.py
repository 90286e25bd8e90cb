"""Layer transfer from config: what a run copies, re-initialises, freezes and how fast it trains.

The `transfer` config block (every field optional; no block means a plain run):

  init_from  a workdir of an earlier run (its newest checkpoint), a checkpoint directory, one
             step's directory, or a PyTorch-layout ResNet state dict (.safetensors / .npz, see
             BUILD.md "Pretrained ResNets"); None trains from scratch.
  copy       patterns of leaves to copy from it (default: everything, ``('*',)``).
  reinit     patterns excluded from the copy, i.e. freshly initialised (e.g. a new head).
  freeze     patterns the optimizer never touches (no update, no optimizer state).
  lr_mults   pattern -> learning-rate multiplier, e.g. ``{'feature': 0.1}``.

Patterns are those of `tljax.params.select` (globs, ``re:``, ``first:N``, ``last:N@module``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tljax import params as ptree
from tljax import validate

Params = Any


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    """The resolved transfer of one run.

    Attributes:
      pretrained: params to copy from (host arrays), or None.
      copied: selection of leaves taken from ``pretrained``.
      frozen: selection of leaves the optimizer leaves untouched.
      labels: optimizer group of each leaf (``tljax.params.lr_labels``).
      summary: readable table of the above, logged at the start of a run.
    """

    pretrained: Params | None
    copied: Any
    frozen: Any
    labels: Any
    summary: str

    def apply(self, params: Params, pretrained: Params | None) -> Params:
        """``params`` with the copied leaves taken from ``pretrained`` (traceable)."""
        if pretrained is None:
            return params
        return ptree.copy_params(params, pretrained, self.copied)

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
      The `TransferPlan`.

    Raises:
      ValueError: a pattern matches nothing, or copied leaves are missing or mis-shaped.
      FileNotFoundError: `init_from` holds no checkpoint.
    """
    block = config.get("transfer") or ml_collections.ConfigDict()
    unknown = set(block.keys()) - {"init_from", "copy", "reinit", "freeze", "lr_mults"}
    if unknown:
        raise ValueError(
            f"Unknown transfer field(s) {sorted(unknown)}; "
            "use init_from, copy, reinit, freeze, lr_mults."
        )
    shapes = jax.eval_shape(init_params, rng)
    layers = ptree.layer_order(init_params, rng)
    nothing = jax.tree.map(lambda _: False, shapes)
    init_from = block.get("init_from")
    pretrained = None
    copied = nothing
    if init_from:
        copied = ptree.select(shapes, _patterns(block.get("copy", ("*",))), layers)
        reinit = _patterns(block.get("reinit"))
        if reinit:
            copied = ptree.mask_and(copied, ptree.mask_not(ptree.select(shapes, reinit, layers)))
        pretrained = load_pretrained(init_from, shapes, copied, config.model.get("name"))
        # Fail on a missing or mis-shaped leaf now, with every offender listed.
        ptree.check_copy(shapes, pretrained, copied)
    elif _patterns(block.get("reinit")):
        raise ValueError("transfer.reinit needs transfer.init_from (without it all is new).")
    freeze = _patterns(block.get("freeze"))
    frozen = ptree.select(shapes, freeze, layers) if freeze else nothing
    if all(jax.tree.leaves(frozen)):
        raise ValueError(
            f"transfer.freeze={list(freeze)} freezes every parameter, so nothing would train. "
            "Freeze fewer layers (e.g. first:N) or leave the head out of the pattern."
        )
    lr_mults = dict(block.get("lr_mults") or {})
    labels = ptree.lr_labels(shapes, frozen, lr_mults, layers)
    summary = ptree.summary_table(shapes, copied, labels, layers)
    return TransferPlan(pretrained, copied, frozen, labels, summary)


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
    return jax.tree.map(np.asarray, state["params"])


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
