"""Runs that stop before their last step on purpose, and the exit status each gives launch.py.

The trainer stops a run early, after saving its checkpoint and results, in two cases:

* `PreemptedError`: a SIGTERM or SIGINT arrived (tljax/preemption.py). The step in flight finished
  and was checkpointed; relaunching the same command resumes there and ends exactly as an
  uninterrupted run. Exit status `EXIT_PREEMPTED` = 75.
* `CollapsedError`: the training predictions sat at chance level (tljax/collapse.py). The
  checkpoint and results.json (``"status": "collapsed"``) are written. Exit status 1.

Why 75: it is ``EX_TEMPFAIL`` of sysexits.h, "a temporary failure; the user is invited to
retry", which is what a preempted run is. It is also a status that nothing else produces: a
process killed by SIGTERM before it could save shows 143 (128 + 15) in a shell and a Python
error 1, so a requeue wrapper that relaunches on 75 and on nothing else relaunches exactly the
runs whose checkpoint is safe. SIGINT gives 75 too (not 130): the state is the same, a saved
checkpoint to resume from. This module imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL
EXIT_COLLAPSED = 1


class RunStoppedError(Exception):
    """The trainer stopped a run early on purpose, after its checkpoint and results were saved.

    Attributes:
      step: the step the run stopped at (its newest checkpoint).
      exit_code: the exit status launch.py gives this stop.
      results: the results written at the stop (results.json, or results.partial.json for a
        preemption).
    """

    exit_code = 1

    def __init__(self, message: str, step: int, results: dict | None = None):
        """Records the stop.

        Args:
          message: what happened, where the checkpoint is and what to do next.
          step: the step the run stopped at.
          results: the results written at the stop.
        """
        super().__init__(message)
        self.step = step
        self.results = results


class PreemptedError(RunStoppedError):
    """SIGTERM or SIGINT: the checkpoint at `step` is saved; relaunch to resume."""

    exit_code = EXIT_PREEMPTED


class CollapsedError(RunStoppedError):
    """The training predictions stayed at chance; the run was stopped (train.collapse.stop)."""

    exit_code = EXIT_COLLAPSED
