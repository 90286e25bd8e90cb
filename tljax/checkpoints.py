"""Checkpoints a run can trust: an integrity record with every save, verified on restore.

Orbax writes a step's arrays, then its step metadata (`_CHECKPOINT_METADATA`), then the commit
marker (`commit_success.txt`), and on a local filesystem renames the finished directory into
place. `CheckpointManager.save` adds an integrity record to that step metadata: the shape, dtype
and SHA-256 of every saved array, computed on the host from the state being saved. Orbax writes
it only once the arrays are written, and the commit marker after it, so an asynchronous save that
dies half-way leaves no record or no marker, never a record for arrays that are not all there.

`restore_latest` walks the steps newest first and takes the first that has its commit marker
and record, restores without an error, and whose arrays hash to the record. Every other step it
passes is moved to `<workdir>/rejected_checkpoints/` with a warning naming it and why: out of
Orbax's way (its `max_to_keep` would count it, and a new save of the same step would collide
with it) but kept for inspection. The run then continues exactly as if it had been killed after
the good checkpoint. When no step is good it stops, moves nothing, and lists each step with
its reason. A checkpoint whose record describes other arrays than the config builds is a config
mismatch, not damage, and stops the run with a message of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from tljax import params as ptree
from tljax import validate

State = Any

RECORD_KEY = "tljax_integrity"
# The input pipeline's state at the saved step, stored beside the record.
INPUT_KEY = "tljax_input_pipeline"
RECORD_FORMAT = 1
# Orbax's names for the step metadata and the commit marker inside a step directory.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"
REJECTED_DIR = "rejected_checkpoints"
# At most this many leaves are named in a message; the rest are counted.
_NAMED_LEAVES = 5


class CheckpointError(RuntimeError):
    """A run's checkpoints cannot be resumed from."""


class NoUsableCheckpointError(CheckpointError):
    """Every checkpoint in the directory is damaged or incomplete."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint holds other arrays (paths, shapes, dtypes) than the config's model."""


# ---------------------------------------------------------------- manager ----


def check_max_to_keep(max_to_keep: int | None) -> None:
    """Refuses a `checkpoint.max_to_keep` that would delete the run's own checkpoints.

    Args:
      max_to_keep: how many checkpoints Orbax keeps; None keeps every one.

    Raises:
      tljax.validate.ConfigError: a value below 1 (Orbax's 0 deletes every checkpoint, the
        final one too).
    """
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
        raise validate.ConfigError(
            f"checkpoint.max_to_keep={max_to_keep!r}: keep at least 1 checkpoint (0 would delete "
            "every one, the final one included); None keeps them all."
        )


class CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager whose every save carries the saved state's integrity record."""

    def save(self, step: int, *, args: ocp.args.StandardSave, **kwargs) -> bool:
        """Saves ``args.item`` at ``step`` (asynchronously), with its integrity record.

        Args:
          step: the training step.
          args: the state to save, as `ocp.args.StandardSave`.
          **kwargs: passed to Orbax (``custom_metadata`` is merged with the record).

        Returns:
          Whether Orbax saved (see `ocp.CheckpointManager.save`).
        """
        if not isinstance(args, ocp.args.StandardSave):
            raise TypeError(f"tljax checkpoints save one state (StandardSave), not {type(args)}.")
        metadata = {**(kwargs.pop("custom_metadata", None) or {})}
        # Hashed now, from the arrays handed to Orbax: the record describes what this save was
        # asked to write, whatever happens to the files later.
        metadata[RECORD_KEY] = integrity_record(args.item)
        return super().save(step, args=args, custom_metadata=metadata, **kwargs)


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> CheckpointManager:
    """The manager of `<workdir>/checkpoints`, keeping the newest `checkpoint.max_to_keep`.

    Args:
      workdir: the run's workdir.
      config: the run's config (its `checkpoint` block).

    Returns:
      A `CheckpointManager` (saves carry integrity records).

    Raises:
      tljax.validate.ConfigError: `checkpoint.max_to_keep` below 1.
    """
    check_max_to_keep(config.checkpoint.max_to_keep)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.max_to_keep, create=True)
    return CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


# ------------------------------------------------------- integrity record ----


def integrity_record(state: State) -> dict:
    """Shape, dtype and SHA-256 of every leaf of ``state``, keyed by its path.

    Args:
      state: a pytree of arrays (replicated or fully addressable jax.Arrays, or NumPy).

    Returns:
      {'format', 'algorithm', 'leaves': {path: {'shape', 'dtype', 'sha256'}}}, JSON-ready.
    """
    leaves = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(state):
        array = _host_array(leaf)
        # A byte view hashes any dtype (bfloat16 included) without copying.
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        leaves[ptree.path_of(key_path)] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return {"format": RECORD_FORMAT, "algorithm": "sha256", "leaves": leaves}


def _host_array(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            # Every process holds the whole value (the trainer's state is replicated).
            return np.asarray(leaf.addressable_data(0))
        # Sharded over processes: a collective, but every process saves and restores together.
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _layout(state: State) -> dict[str, tuple[list[int], str]]:
    """Path -> (shape, dtype) of every leaf, from the arrays' metadata only."""
    layout = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            dtype = jax.random.key_data(leaf).dtype
        layout[ptree.path_of(key_path)] = (list(np.shape(leaf)), str(np.dtype(dtype)))
    return layout


def layout_differences(record: dict, state: State) -> list[str]:
    """How the arrays a record describes differ from ``state``'s (paths, shapes, dtypes).

    Args:
      record: an integrity record.
      state: the restore target.

    Returns:
      One line per differing leaf; empty when the layouts agree.
    """
    saved = {path: (leaf["shape"], leaf["dtype"]) for path, leaf in record["leaves"].items()}
    wanted = _layout(state)
    lines = []
    for path in sorted(saved.keys() | wanted.keys()):
        if path not in wanted:
            lines.append(f"{path}: in the checkpoint, not in this config's state")
        elif path not in saved:
            lines.append(f"{path}: in this config's state, not in the checkpoint")
        elif saved[path] != wanted[path]:
            (shape, dtype), (want_shape, want_dtype) = saved[path], wanted[path]
            lines.append(
                f"{path}: checkpoint {tuple(shape)} {dtype} vs this config "
                f"{tuple(want_shape)} {want_dtype}"
            )
    return lines


def damaged_leaves(record: dict, state: State) -> list[str]:
    """Paths of the leaves of ``state`` whose bytes do not hash to ``record``'s digests.

    Args:
      record: the checkpoint's integrity record.
      state: the state restored from it.

    Returns:
      The differing paths, in tree order; empty when every digest matches.
    """
    restored = integrity_record(state)["leaves"]
    return [
        path
        for path, leaf in restored.items()
        if record["leaves"].get(path, {}).get("sha256") != leaf["sha256"]
    ]


# ---------------------------------------------------------------- restore ----


def restore_latest(manager: ocp.CheckpointManager, state: State) -> tuple[State, int]:
    """Restores the newest good checkpoint into ``state``'s shapes and shardings, if any.

    A checkpoint without its commit marker or integrity record, one that cannot be read, or one
    whose arrays do not match their record is skipped with a warning and moved to
    `<workdir>/rejected_checkpoints/`; the next older one is tried.

    Args:
      manager: the run's checkpoint manager.
      state: freshly initialised state (the restore target).

    Returns:
      (state, first step to run): the restored state and its step, or ``state`` and 0 when the
      directory holds no checkpoint.

    Raises:
      CheckpointMismatchError: a checkpoint holds other arrays than this config's state.
      NoUsableCheckpointError: checkpoints exist but none is good (each listed with why).
    """
    directory = os.fspath(manager.directory)
    steps = step_directories(directory)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    rejected: dict[int, str] = {}
    found = None
    for step in sorted(steps, reverse=True):
        restored, reason = _examine(manager, directory, step, abstract)
        if reason is None:
            found = (restored, step)
            break
        rejected[step] = reason
        logging.warning("Skipping checkpoint %s: %s.", os.path.join(directory, str(step)), reason)
    _agree_across_processes(found[1] if found else -1, directory)
    if found is None:
        if rejected:
            raise NoUsableCheckpointError(_nothing_usable_message(directory, rejected))
        return state, 0
    _set_aside(manager, directory, sorted(rejected))
    logging.info("Resumed from checkpoint at step %d.", found[1])
    return found


def step_directories(directory: str) -> list[int]:
    """Steps that have a directory in ``directory`` (committed or not; Orbax's naming).

    Args:
      directory: a run's checkpoints directory.

    Returns:
      The steps, unsorted; empty when the directory does not exist.
    """
    if not os.path.isdir(directory):
        return []
    return [
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    ]


def _examine(manager, directory: str, step: int, abstract) -> tuple[State | None, str | None]:
    """(restored state, None) for a good checkpoint, else (None, why it is rejected)."""
    step_dir = os.path.join(directory, str(step))
    if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
        return None, f"no {COMMIT_MARKER}: its save never finished"
    record, reason = read_record(step_dir)
    if record is None:
        return None, reason
    differences = layout_differences(record, abstract)
    if differences:
        raise CheckpointMismatchError(
            f"Checkpoint {step_dir} holds other arrays than this config's model/optimizer: "
            f"{_join(differences)}. Use a new --workdir or the config that wrote it."
        )
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # TensorStore and Orbax raise many types for damaged files
        return None, f"cannot be read ({_first_line(error)})"
    damaged = damaged_leaves(record, restored)
    if damaged:
        return None, f"its arrays differ from its integrity record: {_join(damaged)}"
    return restored, None


def read_record(step_dir: str) -> tuple[dict | None, str | None]:
    """The integrity record saved in a step directory.

    Args:
      step_dir: one step's checkpoint directory.

    Returns:
      (record, None), or (None, why there is no usable record).
    """
    path = os.path.join(step_dir, STEP_METADATA_FILE)
    try:
        with open(path) as f:
            record = (json.load(f).get("custom_metadata") or {}).get(RECORD_KEY)
    except FileNotFoundError:
        return None, f"no {STEP_METADATA_FILE}, so no integrity record: an incomplete save"
    except (OSError, ValueError, AttributeError) as error:
        return None, f"its {STEP_METADATA_FILE} cannot be read ({_first_line(error)})"
    if not isinstance(record, Mapping) or record.get("format") != RECORD_FORMAT:
        return None, (
            "no integrity record: an incomplete save, or one made before tljax recorded them"
        )
    return dict(record), None


def saved_input_state(directory: str, step: int) -> dict | None:
    """The input pipeline's state saved with one step (`tljax.data.pipeline.iterator_state`).

    Args:
      directory: the checkpoint directory.
      step: a step restored from it.

    Returns:
      The state, or None for a checkpoint saved without one.
    """
    path = os.path.join(directory, str(step), STEP_METADATA_FILE)
    with open(path) as f:
        return (json.load(f).get("custom_metadata") or {}).get(INPUT_KEY)


def _agree_across_processes(step: int, directory: str) -> None:
    # Every process examines the files itself; all must resume from the same step.
    if jax.process_count() == 1:
        return
    chosen = multihost_utils.process_allgather(np.int32(step))
    if len(set(np.asarray(chosen).tolist())) > 1:
        raise CheckpointError(
            f"Processes chose different checkpoints in {directory} (steps by process: "
            f"{np.asarray(chosen).tolist()}, -1 for none): they do not see the same files."
        )


def _set_aside(manager: ocp.CheckpointManager, directory: str, steps: list[int]) -> None:
    """Moves rejected steps out of Orbax's directory and makes the manager forget them."""
    if not steps:
        return
    if jax.process_index() == 0:
        rejected_dir = os.path.join(os.path.dirname(directory), REJECTED_DIR)
        os.makedirs(rejected_dir, exist_ok=True)
        for step in steps:
            target = _free_name(os.path.join(rejected_dir, str(step)))
            shutil.move(os.path.join(directory, str(step)), target)
            logging.warning("Moved the rejected checkpoint of step %d to %s.", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tljax_rejected_checkpoints_moved")
    manager.reload()


def _free_name(path: str) -> str:
    # A step may be rejected again in a later launch; keep every copy.
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}.{n}", n + 1
    return candidate


def _nothing_usable_message(directory: str, rejected: dict[int, str]) -> str:
    found = "; ".join(f"step {step}: {why}" for step, why in sorted(rejected.items()))
    return (
        f"No usable checkpoint in {directory}, nothing was changed. Found {found}. Restore a good "
        "copy, or move that directory aside (or use a new --workdir) to start from scratch."
    )


def _join(items: list[str]) -> str:
    named = "; ".join(items[:_NAMED_LEAVES])
    more = len(items) - _NAMED_LEAVES
    return f"{named}; and {more} more" if more > 0 else named


def _first_line(error: BaseException) -> str:
    # Orbax wraps TensorStore's error (what went wrong, in which file) in one that prints the
    # whole TensorStore spec; the innermost cause says it in one line.
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    line = text[0].split(" [tensorstore_spec=")[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
