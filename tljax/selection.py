"""Keeping a run's best checkpoint by a label-free validator (``eval.select_by``).

A domain-adaptation run scores label-free validators at every evaluation (reported as
``validator/<name>`` in its history, `tljax.validators`). With ``eval.select_by=<name>`` it also
keeps the state of the evaluation that validator ranks best in ``<workdir>/selected/<step>``
(one checkpoint, with its integrity record), and its results.json has a ``selected`` entry
(validator, step, and that evaluation's metrics) beside ``final``. Target labels are never
involved: ``target_test/accuracy`` at the selected step is reported, not used.

The best score so far is read back from the run's history, so a resumed run keeps selecting
against every evaluation of the earlier launches.
"""

from __future__ import annotations

import math
import os

import orbax.checkpoint as ocp

from tljax import checkpoints, validate

SELECTED_DIR = "selected"


def validator_key(validator: str) -> str:
    """The history key of a validator's score."""
    return f"validator/{validator}"


def check_select_by(validator: str | None, available: tuple[str, ...] | None) -> None:
    """Refuses an ``eval.select_by`` the run cannot score.

    Args:
      validator: the config's ``eval.select_by`` (None or '': no selection).
      available: the validators the run scores; None when its method scores none.

    Raises:
      tljax.validate.ConfigError: selection asked of a method without validators, or an
        unknown validator name.
    """
    if not validator:
        return
    if available is None:
        raise validate.ConfigError(
            f"eval.select_by={validator!r}: this run scores no validators (eval.validators is "
            "off or its method is not a domain-adaptation method)."
        )
    if validator not in available:
        raise validate.ConfigError(
            f"eval.select_by={validator!r}: expected one of {', '.join(available)}."
        )


def best_entry(history: list[dict], validator: str) -> dict | None:
    """The evaluation that ``validator`` ranks best (ties: the latest, as `tljax.select`).

    Args:
      history: a run's evaluations, {'step', metrics...}.
      validator: a validator name.

    Returns:
      {'validator', 'step', 'metrics'} or None when no evaluation has a finite score.
    """
    from tljax import select

    best = select.best_point([{"run": ".", **entry} for entry in history], validator_key(validator))
    if best is None:
        return None
    metrics = {name: value for name, value in best.items() if name not in ("run", "step")}
    return {"validator": validator, "step": best["step"], "metrics": metrics}


class BestCheckpoint:
    """Saves the state whenever a new evaluation beats every earlier one by ``validator``.

    Attributes:
      validator: the validator name.
      directory: where the selected checkpoint goes (``<workdir>/selected``).
    """

    def __init__(self, workdir: str, validator: str, history: list[dict]):
        """Starts from the best of ``history`` (the evaluations of earlier launches).

        Args:
          workdir: the run's workdir.
          validator: the validator name.
          history: the evaluations so far.
        """
        self.validator = validator
        self.directory = os.path.join(os.path.abspath(workdir), SELECTED_DIR)
        best = best_entry(history, validator)
        self._best = None if best is None else best["metrics"][validator_key(validator)]
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self._manager = checkpoints.CheckpointManager(self.directory, options=options)

    def consider(self, step: int, metrics: dict, state) -> bool:
        """Saves ``state`` if this evaluation's score is the best so far.

        Args:
          step: the evaluated step.
          metrics: the evaluation's metrics (with ``validator/<name>``).
          state: the train state at ``step``.

        Returns:
          Whether it was saved.
        """
        score = metrics.get(validator_key(self.validator))
        if score is None or not math.isfinite(score):
            return False
        if self._best is not None and score <= self._best:
            return False
        self._best = score
        if step in self._manager.all_steps():
            # Saved by a launch that died before its next regular checkpoint; this launch
            # retrained from an earlier one, so the old save is not this state.
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        return True

    def wait_until_finished(self) -> None:
        """Blocks until the last save is on disk."""
        self._manager.wait_until_finished()
