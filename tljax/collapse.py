"""Noticing a run whose classifiers have collapsed to chance while its loss stays finite.

Adversarial training can drive the features to a constant (DANN with too strong a domain term,
some domain pairs, a bf16 seed): every class head then outputs about the class prior, its
cross-entropy sits at ln C and its accuracy at 1/C, and nothing fails; the run ends with a
results.json like any other. The monitor reads the train metrics the trainer already brings to
the host every ``train.log_every`` steps (no device sync is added) and watches the classifiers
a method declares (`tljax.methods.Method.classifiers`). A log interval is *at chance* when one
of them has

    loss >= (1 - margin) * ln C    and    accuracy <= (1 + accuracy_margin) / C,

i.e. it predicts no better than a constant. ``patience`` such intervals in a row, after the
first ``warmup`` fraction of the run and at least ``warmup_steps`` steps, are a collapse: the
run logs a warning naming the step, results.json gets ``"status": "collapsed"`` and a
``collapse`` record, and, with ``stop``, the run ends there after its evaluation, checkpoint
and results.json, and the trainer raises `tljax.stopping.CollapsedError`. Healthy runs get
``"status": "ok"``.

Settings: the optional ``train.collapse`` block of a config (`config_block`); a config without
it gets `Settings`' defaults. ``patience=0`` turns the monitor off.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from absl import logging

from tljax import results as run_results
from tljax import stopping, validate


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A classifier a method trains, named by the train metrics that report it.

    Attributes:
      loss: the train metric holding its mean cross-entropy (e.g. 'class_loss').
      accuracy: the train metric holding its accuracy (e.g. 'source_accuracy').
      num_classes: its number of classes C: chance is a loss of ln C and an accuracy of 1/C.
    """

    loss: str
    accuracy: str
    num_classes: int


@dataclasses.dataclass(frozen=True)
class Settings:
    """When a run counts as collapsed and what then happens (the ``train.collapse`` block).

    Attributes:
      patience: log intervals in a row at chance that make a collapse; 0 turns the monitor off.
      warmup: fraction of the run's steps whose log intervals do not count (a network starts
        at chance).
      warmup_steps: steps that do not count in any run, however short: a smoke test of a few
        dozen steps ends near chance without having collapsed.
      margin: a loss at or above (1 - margin) * ln C counts as chance.
      accuracy_margin: an accuracy at or below (1 + accuracy_margin) / C counts as chance. It
        is wider than ``margin`` because a constant prediction's accuracy is the share of one
        class in the interval's batches, which varies from interval to interval.
      stop: end the launch at the collapse (else it trains on, marked collapsed). Relaunching
        a stopped run trains on from the collapse.
    """

    patience: int = 3
    warmup: float = 0.1
    warmup_steps: int = 100
    margin: float = 0.05
    accuracy_margin: float = 0.5
    stop: bool = True


def config_block(**overrides) -> ml_collections.ConfigDict:
    """A ``train.collapse`` config block with the default `Settings`.

    Args:
      **overrides: fields to change.

    Returns:
      The block (so that ``--config.train.collapse.<field>=...`` works on the command line).
    """
    return ml_collections.ConfigDict(
        dataclasses.asdict(dataclasses.replace(Settings(), **overrides))
    )


def settings_from_config(config: ml_collections.ConfigDict) -> Settings:
    """The `Settings` of a config: its ``train.collapse`` block over the defaults.

    Args:
      config: an experiment config (the block is optional).

    Returns:
      The settings.

    Raises:
      tljax.validate.ConfigError: an unknown field or a value out of range, naming it.
    """
    block = config.train.get("collapse")
    fields = block.to_dict() if block is not None else {}
    known = {field.name for field in dataclasses.fields(Settings)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise validate.ConfigError(
            f"Unknown train.collapse field(s) {unknown}; use {sorted(known)}."
        )
    settings = dataclasses.replace(Settings(), **fields)
    checks = {
        "patience": settings.patience >= 0,
        "warmup": 0.0 <= settings.warmup < 1.0,
        "warmup_steps": settings.warmup_steps >= 0,
        "margin": 0.0 <= settings.margin < 1.0,
        "accuracy_margin": settings.accuracy_margin >= 0.0,
    }
    for name, ok in checks.items():
        if not ok:
            raise validate.ConfigError(
                f"train.collapse.{name}={getattr(settings, name)!r} is out of range "
                "(patience >= 0, 0 <= warmup < 1, warmup_steps >= 0, 0 <= margin < 1, "
                "accuracy_margin >= 0)."
            )
    return settings


def at_chance(classifier: Classifier, metrics: dict[str, float], settings: Settings) -> bool:
    """Whether a classifier predicted no better than a constant over one log interval.

    Args:
      classifier: the classifier and its metric names.
      metrics: the interval's train metrics ('train/<name>' -> mean).
      settings: the margins.

    Returns:
      True if its loss is at or above ln C and its accuracy at or below 1/C, within the margins.

    Raises:
      KeyError: the method's train metrics lack a metric the classifier names.
    """
    missing = [
        name for name in (classifier.loss, classifier.accuracy) if f"train/{name}" not in metrics
    ]
    if missing:
        raise KeyError(
            f"The method declares a classifier with train metric(s) {missing}, which its loss "
            f"does not report (it reports {sorted(metrics)})."
        )
    loss = metrics[f"train/{classifier.loss}"]
    accuracy = metrics[f"train/{classifier.accuracy}"]
    chance_loss = math.log(classifier.num_classes)
    return (
        loss >= (1.0 - settings.margin) * chance_loss
        and accuracy <= (1.0 + settings.accuracy_margin) / classifier.num_classes
    )


class Monitor:
    """Counts log intervals at chance and decides when a run has collapsed.

    `observe` is pure bookkeeping over the metrics it is given; `update` adds the warning. The
    state (`fields`) goes into results.json and results.partial.json, and `monitor_for` takes it
    back, so a resumed run counts on from its checkpoint as an uninterrupted one would.
    """

    def __init__(
        self,
        classifiers: tuple[Classifier, ...],
        settings: Settings,
        num_steps: int,
        state: dict | None = None,
    ):
        """Starts watching.

        Args:
          classifiers: the method's classifiers (none: nothing to watch).
          settings: patience, warm-up, margins, stop.
          num_steps: the run's total steps (the warm-up is a fraction of them).
          state: a ``collapse`` record from `fields` to continue from, or None.
        """
        self.classifiers = tuple(classifiers)
        self.settings = settings
        self._warmup_steps = max(settings.warmup * num_steps, settings.warmup_steps)
        state = state or {}
        self._since: int | None = state.get("at_chance_since_step")
        self._intervals: int = state.get("intervals_at_chance", 0)
        self.detected_at: int | None = state.get("detected_at_step")
        self.stopped_at: int | None = None
        self._at_chance: list[Classifier] = []

    @property
    def enabled(self) -> bool:
        """Whether anything is watched."""
        return bool(self.classifiers) and self.settings.patience > 0

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Counts one log interval.

        Args:
          step: steps done at the end of the interval.
          metrics: its train metrics ('train/<name>' -> mean over the interval).

        Returns:
          True if this interval makes ``patience`` in a row at chance: a collapse, now.
        """
        if not self.enabled or step <= self._warmup_steps:
            return False
        self._at_chance = [c for c in self.classifiers if at_chance(c, metrics, self.settings)]
        if not self._at_chance:
            self._since, self._intervals = None, 0
            return False
        self._intervals += 1
        self._since = self._since or step
        if self._intervals != self.settings.patience:
            return False
        self.detected_at = self.detected_at or step
        if self.settings.stop:
            self.stopped_at = step
        return True

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """`observe`, with a warning when a collapse is found.

        Args:
          step: steps done at the end of the interval.
          metrics: its train metrics.

        Returns:
          Whether the run should stop at ``step``.
        """
        if not self.observe(step, metrics):
            return False
        logging.warning("%s", self.warning(step, metrics))
        return self.settings.stop

    def warning(self, step: int, metrics: dict[str, float]) -> str:
        """The warning for a collapse found at ``step``: when, which metrics, what happens next."""
        readings = "; ".join(
            f"{c.loss}={metrics[f'train/{c.loss}']:.4f} (ln {c.num_classes} = "
            f"{math.log(c.num_classes):.4f}), {c.accuracy}={metrics[f'train/{c.accuracy}']:.4f} "
            f"(1/{c.num_classes} = {1 / c.num_classes:.4f})"
            for c in self._at_chance
        )
        then = (
            "The run stops here (train.collapse.stop=False trains on)."
            if self.settings.stop
            else "Training goes on (train.collapse.stop=False)."
        )
        return (
            f"COLLAPSE at step {step}: the training predictions have been at chance level for "
            f"{self._intervals} log intervals in a row (since step {self._since}): {readings}. "
            f"results.json marks the run 'collapsed'. {then}"
        )

    def fields(self) -> dict:
        """What results.json records: ``status``, and the ``collapse`` record once anything was
        at chance (its state, for a resumed run)."""
        fields = {"status": "collapsed" if self.detected_at is not None else "ok"}
        if self.detected_at is not None or self._intervals:
            fields["collapse"] = {
                "detected_at_step": self.detected_at,
                "at_chance_since_step": self._since,
                "intervals_at_chance": self._intervals,
            }
        return fields

    def collapsed(self, workdir: str, results: dict) -> stopping.CollapsedError:
        """The exception the trainer raises after writing the results of a stopped run.

        Args:
          workdir: the run's workdir.
          results: its results.

        Returns:
          A `tljax.stopping.CollapsedError` naming the step and what to try.
        """
        return stopping.CollapsedError(
            f"Training collapsed to chance level and was stopped at step {self.stopped_at} "
            f"(see the COLLAPSE warning above); its checkpoint and results.json (status "
            f"'collapsed') are in {workdir}. Try a lower learning rate or adversarial weight, or "
            "another seed; relaunching the same command trains on from this checkpoint.",
            self.stopped_at,
            results,
        )


def monitor_for(
    config: ml_collections.ConfigDict,
    classifiers: tuple[Classifier, ...],
    previous: dict | None,
    first_step: int,
) -> Monitor:
    """The monitor of a launch starting at ``first_step``.

    Args:
      config: the experiment config (``train.steps``, optional ``train.collapse``).
      classifiers: the method's classifiers.
      previous: the earlier launch's results (`tljax.results.previous`), or None.
      first_step: the step of the restored checkpoint.

    Returns:
      A `Monitor` continuing the count the earlier launch saved at ``first_step``; from an
      older state only a collapse found by then is kept.
    """
    state = (previous or {}).get("collapse") if first_step else None
    if state and run_results.last_step(previous) != first_step:
        detected = state.get("detected_at_step")
        state = {"detected_at_step": detected} if detected and detected <= first_step else None
    monitor = Monitor(classifiers, settings_from_config(config), config.train.steps, state)
    if monitor.detected_at is not None:
        logging.warning(
            "This run collapsed at step %d (results.json: status 'collapsed'); training on from "
            "step %d.",
            monitor.detected_at,
            first_step,
        )
    return monitor
