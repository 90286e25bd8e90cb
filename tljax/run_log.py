"""Where a run's metrics go: clu's writers (TensorBoard events plus the log) when they can load,
else the log alone.

clu's metric writers import TensorFlow. On a machine without it (an accelerator image training
on exported splits, see ``tljax.data.exported``) a run still logs every scalar and writes
``results.json``; only the TensorBoard events are missing, and the run says so at its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging


class LogWriter:
    """The subset of clu's ``MetricWriter`` that the trainer uses, writing to the log only."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs ``scalars`` (name -> number) at ``step``."""
        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Logs the run's hyperparameters."""
        logging.info("Hyperparameters: %s", dict(hparams))

    def flush(self) -> None:
        """Nothing is buffered."""


class StepRateLog:
    """Logs steps/s every ``every_secs`` seconds and at the last step (clu's ReportProgress
    writes the same rate as a metric)."""

    def __init__(self, num_steps: int, every_secs: float):
        self._num_steps = num_steps
        self._every_secs = every_secs
        self._last_step: int | None = None
        self._last_time = 0.0

    def __call__(self, step: int) -> None:
        """Notes that ``step`` steps are done."""
        now = time.perf_counter()
        if self._last_step is None:
            self._last_step, self._last_time = step, now
            return
        if now - self._last_time >= self._every_secs or step == self._num_steps:
            rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            logging.info("Step %d of %d: %.1f steps/s.", step, self._num_steps, rate)
            self._last_step, self._last_time = step, now


def make_writer(
    workdir: str, is_lead: bool, num_steps: int, every_secs: float
) -> tuple[Any, Callable[[int], None]]:
    """The run's metric writer and its progress reporter.

    Args:
      workdir: where clu writes TensorBoard events.
      is_lead: whether this process writes events (others only log).
      num_steps: the run's total steps.
      every_secs: seconds between progress reports.

    Returns:
      ``(writer, progress)``: clu's default writer and ``ReportProgress`` if clu and TensorFlow
      import, else a ``LogWriter`` and a ``StepRateLog``. ``progress(step)`` is called after
      every step.
    """
    try:
        from clu import metric_writers, periodic_actions
    except ImportError as err:
        logging.warning(
            "No TensorBoard events for this run: %s is not installed (clu's writers need "
            "TensorFlow). Metrics go to the log and results.json.",
            err.name,
        )
        return LogWriter(), StepRateLog(num_steps, every_secs)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead)
    progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_secs=every_secs
    )
    return writer, progress
