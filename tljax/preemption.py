"""Saving a run when its machine is about to be taken away (SIGTERM) or on Ctrl-C (SIGINT).

Schedulers (SLURM, Kubernetes, preemptible and spot VMs) send SIGTERM some time before they
kill a job. While `tljax.train.train_and_evaluate` trains, a `PreemptionWatch` turns SIGTERM
and SIGINT into a request to stop: the step in flight finishes, a checkpoint is saved at that
step (the trainer's usual save, after its finite-params check), results.partial.json is written
with ``"status": "preempted"``, and the trainer raises `tljax.stopping.PreemptedError`, which
launch.py turns into exit status 75 so that a wrapper or the scheduler relaunches the job.
Relaunching the same command in the same workdir resumes from that checkpoint and ends with
the results of an uninterrupted run, bit for bit: the train metrics of the steps since the last
log line go into results.partial.json (`pending_fields`) and the next launch averages them
together with its own (`pending_metrics`).

Every process of a multi-process run must stop at the same step, because Orbax writes one
checkpoint collectively. How they agree:

* one process: the signal handler sets a flag, which the loop reads after every step; no
  device sync and no collective is added to a step.
* several processes with JAX's preemption service (on by default after
  ``jax.distributed.initialize``): JAX's own SIGTERM handler tells the coordination service,
  which picks the step after the one the furthest process has reached, and
  ``multihost_utils.reached_preemption_sync_point`` turns True at that step on every process.
  It is called after every step, a local check (the agreement runs in the background once a
  notice arrives). SIGTERM is left to JAX's handler; SIGINT is passed on to it as SIGTERM.
* several processes without the service (``jax_enable_preemption_service=False``): the flags
  are gathered across processes every ``sync_every`` steps (the log interval, where the loop
  already waits for the device), and every process stops at the first such step after a signal.

A second SIGINT while the run is saving stops it at once (``KeyboardInterrupt``), for a user
who cannot wait; a second SIGTERM is ignored, since schedulers repeat it when their grace time
runs out and the save should carry on until then. The handlers are installed only from the
main thread (Python allows no other), not for a signal the process ignores, and the previous
ones are restored afterwards.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from tljax import results as run_results
from tljax import stopping

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# How the processes agree on the step to stop at (see the module docstring).
LOCAL, SERVICE, GATHER = "local", "service", "gather"


def agreement(first_step: int = 0) -> str:
    """How this run's processes agree on the step to stop at.

    Args:
      first_step: the step the launch starts from.

    Returns:
      `LOCAL` for a run without ``jax.distributed``, `SERVICE` where JAX's preemption service
      is running, `GATHER` for several processes without it.
    """
    if not jax.distributed.is_initialized():
        return LOCAL
    try:
        # Also tells the service where this launch starts: a notice before the first step then
        # stops after it (the service picks the furthest step reported + 1).
        multihost_utils.reached_preemption_sync_point(first_step)
    except RuntimeError:  # jax_enable_preemption_service=False
        return GATHER if jax.process_count() > 1 else LOCAL
    return SERVICE


class PreemptionWatch:
    """Turns SIGTERM / SIGINT into a stop after the step in flight, at a step all processes share.

    Use: `install` before the training loop, `reached` after every step, `restore` after the loop
    (in a ``finally``).
    """

    def __init__(self, first_step: int, sync_every: int, mode: str | None = None):
        """Prepares the watch; installs nothing yet.

        Args:
          first_step: the step this launch starts from.
          sync_every: steps between agreements when several processes have no preemption
            service (`GATHER`).
          mode: `LOCAL`, `SERVICE` or `GATHER`; default `agreement()`.
        """
        self._sync_every = sync_every
        self._mode = mode or agreement(first_step)
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal(self) -> int | None:
        """The signal this process received, if any."""
        return self._signal

    def install(self) -> None:
        """Installs the handlers (from the main thread only; elsewhere signals keep their way)."""
        if threading.current_thread() is not threading.main_thread():
            return
        # With the service, SIGTERM belongs to JAX's handler, installed by
        # jax.distributed.initialize: replacing it would hide the notice from the other processes.
        handled = (signal.SIGINT,) if self._mode == SERVICE else SIGNALS
        for signum in handled:
            # An ignored signal stays ignored, as Python leaves SIGINT in a shell's background
            # job: Ctrl-C in the terminal is not meant for it.
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Puts the handlers back as they were before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        del frame
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt
        self._signal = self._signal or signum
        if self._mode == SERVICE:
            # JAX's SIGTERM handler is the way into the preemption service.
            signal.raise_signal(signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to stop after ``step`` (steps done); call it after every step on every process.

        Args:
          step: steps done so far.

        Returns:
          True at the same step on every process once a signal has arrived at any of them.
        """
        if self._mode == SERVICE:
            # The global step, as Orbax's CheckpointManager.save reports it to the same service.
            return multihost_utils.reached_preemption_sync_point(step)
        if self._mode == GATHER:
            if step % self._sync_every:
                return False
            flags = multihost_utils.process_allgather(np.int32(self._signal is not None))
            return bool(np.any(flags))
        return self._signal is not None

    def preempted(
        self, step: int, checkpoint_dir: str, results: dict | None
    ) -> stopping.PreemptedError:
        """The exception the trainer raises after saving at ``step``.

        Args:
          step: the step the run stopped at.
          checkpoint_dir: where its checkpoint is.
          results: the partial results written there.

        Returns:
          A `tljax.stopping.PreemptedError` whose message names the signal, the step and what to do.
        """
        if self._signal:
            cause = signal.Signals(self._signal).name
        else:  # JAX's handler took the SIGTERM, here or on another process.
            cause = "SIGTERM to a process of this run (JAX's preemption service)"
        return stopping.PreemptedError(
            f"Preempted by {cause}: stopped after step {step}, checkpoint saved in "
            f"{checkpoint_dir}/{step}; relaunch the same command to resume (exit status "
            f"{stopping.EXIT_PREEMPTED}).",
            step,
            results,
        )


def pending_fields(steps: list[int], values: dict[str, np.ndarray]) -> dict:
    """The fields results.partial.json gets at a preemption.

    Args:
      steps: the steps since the last flush of the train metrics.
      values: metric name -> its value at each of those steps (host arrays).

    Returns:
      ``{"status": "preempted", "pending_train_metrics": ...}``; the values as JSON numbers
      with their dtype, which read back exactly (`pending_metrics`).
    """
    metrics = {
        name: {"dtype": str(array.dtype), "values": array.tolist()}
        for name, array in values.items()
    }
    return {"status": "preempted", "pending_train_metrics": {"steps": steps, "metrics": metrics}}


def pending_metrics(previous: dict | None, first_step: int) -> tuple[list[int], dict]:
    """The train metrics a preempted launch left for the launch resuming at ``first_step``.

    Args:
      previous: the earlier launch's results (`tljax.results.previous`), or None.
      first_step: the step of the restored checkpoint.

    Returns:
      (steps, metric name -> host array of per-step values); empty unless ``previous`` was
      written at a preemption at ``first_step``.
    """
    if not previous or run_results.last_step(previous) != first_step:
        return [], {}
    pending = previous.get("pending_train_metrics")
    if not pending:
        return [], {}
    values = {
        name: np.asarray(entry["values"], dtype=jnp.dtype(entry["dtype"]))
        for name, entry in pending["metrics"].items()
    }
    return list(pending["steps"]), values
