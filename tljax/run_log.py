"""What a run reports while it trains: log lines, TensorBoard events and the time of each phase.

The log shows one line per ``train.log_every`` steps (the train metrics, steps/s and the ETA) and
one per evaluation; the same scalars go to TensorBoard through clu's writers. clu's
``ReportProgress`` adds steps/s to TensorBoard and its ``timed`` splits the run's wall time into
phases (compile, eval, checkpoint) for ``results.json``.

clu's metric writers import TensorFlow. On a machine without it (an accelerator image training
on exported splits, see ``tljax.data.exported``) a run still logs every scalar and writes
``results.json``; only the TensorBoard events are missing, and the run says so at its start.

Libraries log at INFO level too (Orbax a few dozen lines per checkpoint); `quiet_library_logs`
keeps them out of the log, as launch.py does unless run with ``--verbosity=1``.
"""

from __future__ import annotations

import collections
import contextlib
import logging as pylogging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoFilter(pylogging.Filter):
    """Passes warnings and errors from everywhere, lower levels only from the ``own`` files."""

    def __init__(self, own: tuple[str, ...]):
        super().__init__()
        self._own = own

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return os.path.abspath(record.pathname).startswith(self._own)


def quiet_library_logs(handler: pylogging.Handler | None = None) -> None:
    """Keeps libraries' INFO and DEBUG lines out of the log; tljax's lines and all warnings stay.

    Args:
      handler: the handler to filter; default absl's, which writes every line of an absl app.
    """
    # absl sends every module's lines through one logger, so only the file that logged a line
    # tells a library's line from tljax's (or from the script's that was run, e.g. launch.py).
    script = getattr(sys.modules["__main__"], "__file__", None)
    own = (_PACKAGE_DIR,) + ((os.path.abspath(script),) if script else ())
    (handler or logging.get_absl_handler()).addFilter(_OwnInfoFilter(own))


def format_scalars(scalars: Mapping[str, Any]) -> str:
    """``'name=value, ...'`` with 6 significant digits."""
    return ", ".join(f"{name}={float(value):.6g}" for name, value in scalars.items())


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class RunLog:
    """A run's log lines, TensorBoard events and phase times.

    Built by `make_run_log`; the trainer calls `step_done` after every step.
    """

    def __init__(self, writer, progress, num_steps: int):
        """Wraps a clu-style writer and progress reporter.

        Args:
          writer: clu ``MetricWriter`` for the TensorBoard events (or `_NoEvents`).
          progress: clu ``ReportProgress`` with ``phase_seconds`` (or `_PhaseClock`).
          num_steps: the run's total steps (for the ETA).
        """
        self._writer = writer
        self._progress = progress
        self._num_steps = num_steps
        self._rate_since: tuple[int, float] | None = None

    def hparams(self, hparams: Mapping[str, Any]) -> None:
        """Records the run's hyperparameters (TensorBoard; the log only at ``--verbosity=1``)."""
        self._writer.write_hparams(hparams)
        logging.debug("Hyperparameters: %s", dict(hparams))

    def step_done(self, step: int) -> None:
        """Notes that ``step`` steps are done."""
        if self._rate_since is None:
            self._rate_since = (step, time.perf_counter())
        self._progress(step)

    def train_metrics(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes the train metrics at ``step`` with steps/s and the ETA since the last call.

        Args:
          step: steps done; the metrics must already be on the host, so that the rate counts
            finished steps, not dispatched ones.
          scalars: name -> number.
        """
        self._writer.write_scalars(step, scalars)
        logging.info(
            "Step %d/%d%s: %s", step, self._num_steps, self._rate(step), format_scalars(scalars)
        )

    def eval_metrics(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes the evaluation at ``step``."""
        self._writer.write_scalars(step, scalars)
        logging.info("Step %d/%d eval: %s", step, self._num_steps, format_scalars(scalars))

    def _rate(self, step: int) -> str:
        if self._rate_since is None or step <= self._rate_since[0]:
            return ""
        now = time.perf_counter()
        rate = (step - self._rate_since[0]) / max(now - self._rate_since[1], 1e-9)
        self._rate_since = (step, now)
        eta = _format_duration((self._num_steps - step) / rate)
        return f" ({rate:.1f} steps/s, ETA {eta})"

    @contextlib.contextmanager
    def timed(self, name: str, wait_for: Any = None) -> Iterator[None]:
        """Counts the wall time of the ``with`` body towards phase ``name``.

        Args:
          name: the phase.
          wait_for: arrays (any pytree) whose pending computation belongs to the time before
            this phase (the train step is dispatched asynchronously); waited for first.

        Yields:
          Nothing.
        """
        if wait_for is not None:
            jax.block_until_ready(wait_for)
        # Timing on this thread (clu's own wait times on a helper thread) makes the seconds
        # final when the block ends, so a checkpoint's results.json can include them.
        with self._progress.timed(name, wait_jax_async_dispatch=False):
            yield

    def phase_seconds(self) -> dict[str, float]:
        """Seconds spent in each phase so far."""
        return self._progress.phase_seconds()

    def close(self) -> None:
        """Writes out pending events."""
        self._writer.close()


class _NoEvents:
    """Stands in for clu's writer where clu cannot load: no TensorBoard events."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Drops ``scalars``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Drops ``hparams``."""

    def close(self) -> None:
        """Nothing is buffered."""


class _PhaseClock:
    """Stands in for clu's ``ReportProgress`` where clu cannot load: phase times only."""

    def __init__(self):
        self._seconds: collections.Counter[str] = collections.Counter()

    def __call__(self, step: int) -> None:
        """No steps/s events without TensorBoard."""

    @contextlib.contextmanager
    def timed(self, name: str, wait_jax_async_dispatch: bool = False) -> Iterator[None]:
        """As clu's ``ReportProgress.timed`` with ``wait_jax_async_dispatch=False``."""
        del wait_jax_async_dispatch
        start = time.monotonic()
        yield
        self._seconds[name] += time.monotonic() - start

    def phase_seconds(self) -> dict[str, float]:
        """Seconds spent in each phase so far."""
        return dict(self._seconds)


def _report_progress(num_steps: int, writer, every_secs: float):
    from clu import periodic_actions

    class ReportProgress(periodic_actions.ReportProgress):
        def phase_seconds(self) -> dict[str, float]:
            # clu keeps the split for its progress note, in this attribute only.
            return dict(self._time_per_part)

    return ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=every_secs)


def make_run_log(workdir: str, is_lead: bool, num_steps: int, every_secs: float) -> RunLog:
    """The run's `RunLog`.

    Args:
      workdir: where clu writes TensorBoard events.
      is_lead: whether this process writes events (every process logs).
      num_steps: the run's total steps.
      every_secs: seconds between steps/s events.

    Returns:
      A `RunLog` over clu's TensorBoard writer and ``ReportProgress`` if clu and TensorFlow
      import, else over stand-ins that write no events.
    """
    try:
        from clu import metric_writers
    except ImportError as err:
        logging.warning(
            "No TensorBoard events for this run: %s is not installed (clu's writers need "
            "TensorFlow). Metrics go to the log and results.json.",
            err.name,
        )
        return RunLog(_NoEvents(), _PhaseClock(), num_steps)
    if is_lead:
        writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    else:
        writer = metric_writers.MultiWriter([])
    return RunLog(writer, _report_progress(num_steps, writer, every_secs), num_steps)
