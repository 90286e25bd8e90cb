"""results.json: a run's final and per-evaluation metrics, config and cost, across launches.

A run may take several processes (launches): one killed, the next resuming from its last
checkpoint. Its results.json has every evaluation up to its last step once, `wall_time_s` and
`timing_s` summed over its launches (a killed launch counts until its last checkpoint), and one
entry per launch in `launches`: {from_step, to_step, wall_time_s, timing_s}. `timing_s` splits
the wall time into setup (data, init, restore), compile, train (the steps and the input
pipeline), eval and checkpoint seconds. `resumed_from_step` and `compile_time_s` are the last
launch's. The trainer adds `status`: "ok", or "collapsed" with a `collapse` record
(tljax/collapse.py); a results.partial.json written at a preemption says "preempted" and keeps
the train metrics not yet logged in `pending_train_metrics` (tljax/preemption.py).
"""

import contextlib
import json
import os
import time

from absl import logging

RESULTS_FILE = "results.json"
# The same, written at every checkpoint, so that the launch after a killed one keeps what it
# measured. results.json itself appears only when a launch finishes: sweeps read it as "done".
PARTIAL_RESULTS_FILE = "results.partial.json"
PHASES = ("setup", "compile", "train", "input", "eval", "checkpoint")


def previous(workdir: str) -> tuple[dict | None, str | None]:
    """The newest results an earlier launch of the run in ``workdir`` wrote.

    Args:
      workdir: the run's workdir.

    Returns:
      (results, path): from results.json or, where that is older, results.partial.json;
      (None, None) if there are none.
    """
    found = []
    for name in (RESULTS_FILE, PARTIAL_RESULTS_FILE):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            with open(path) as f:
                found.append((json.load(f), path))
    # max keeps the first of equals: a finished launch's results.json over its last partial.
    return max(found, key=lambda pair: last_step(pair[0]), default=(None, None))


def last_step(results: dict) -> int:
    """The step that ``results`` reach (their last launch's last step)."""
    # Results written before launches were recorded describe their final step.
    return results.get("last_step", results.get("steps", 0))


def carried_over(previous: dict | None, first_step: int) -> tuple[list[dict], list[dict]]:
    """What a launch resuming at ``first_step`` keeps of the earlier launches' results.

    Args:
      previous: the earlier results (`previous`), or None.
      first_step: the step of the restored checkpoint.

    Returns:
      (history entries up to ``first_step``, earlier launch records).
    """
    if previous is None or first_step == 0:
        return [], []
    # Evaluations after the restored checkpoint went with the launch that made them; this
    # launch makes them again.
    history = [entry for entry in previous.get("history", []) if entry["step"] <= first_step]
    return history, list(previous.get("launches", []))


def train_seconds(loop_start: float, phases: dict[str, float]) -> float:
    """Seconds since ``loop_start`` spent in no timed phase (``phases``: name -> seconds)."""
    # The loop's time that no phase took: the steps (the input pipeline's waits are 'input').
    return time.perf_counter() - loop_start - sum(phases.values())


def launch_record(
    first_step: int,
    last_step: int,
    start_time: float,
    loop_start: float,
    phases: dict[str, float],
    train_s: float | None = None,
) -> dict:
    """One launch's entry of ``launches``.

    Args:
      first_step: the step the launch started from.
      last_step: the step it reached.
      start_time: ``time.perf_counter()`` at the launch's start.
      loop_start: ``time.perf_counter()`` when its training loop started.
      phases: seconds per timed phase (compile, input, eval, checkpoint).
      train_s: training seconds, if already measured; else computed now.

    Returns:
      {from_step, to_step, wall_time_s, timing_s}.
    """
    if train_s is None:
        train_s = train_seconds(loop_start, phases)
    timing = {"setup": loop_start - start_time, "train": train_s}
    timing |= {name: phases.get(name, 0.0) for name in ("compile", "input", "eval", "checkpoint")}
    return {
        "from_step": first_step,
        "to_step": last_step,
        "wall_time_s": time.perf_counter() - start_time,
        "timing_s": {name: timing[name] for name in PHASES},
    }


def assemble(about: dict, final: dict, history: list[dict], launches: list[dict], config) -> dict:
    """The results dict of a run.

    Args:
      about: run facts (steps, seed, devices, parameter counts, ...).
      final: the last train and eval metrics.
      history: one entry per evaluation, {'step', metrics...}.
      launches: every launch's record (`launch_record`), the current one last.
      config: the run's config.

    Returns:
      The dict written to results.json, with wall time and phases summed over launches.
    """
    return {
        "final": final,
        "history": list(history),
        "last_step": launches[-1]["to_step"],
        **about,
        "wall_time_s": sum(launch["wall_time_s"] for launch in launches),
        "timing_s": {
            name: sum(launch["timing_s"].get(name, 0.0) for launch in launches) for name in PHASES
        },
        "launches": launches,
        "config": config.to_dict(),
    }


def write(workdir: str, results: dict, partial: bool = False) -> str:
    """Writes ``results`` atomically to results.json (or results.partial.json).

    Args:
      workdir: the run's workdir.
      results: from `assemble`.
      partial: a checkpoint's snapshot rather than a finished launch's results.

    Returns:
      The path written.
    """
    path = os.path.join(workdir, PARTIAL_RESULTS_FILE if partial else RESULTS_FILE)
    # Written whole or not at all: a launch may be killed at any moment.
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    if not partial:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(workdir, PARTIAL_RESULTS_FILE))
    return path


def already_finished(workdir: str, results: dict, path: str, is_lead: bool) -> dict:
    """A relaunched finished run: keeps its results (promoting a partial file) and logs so.

    Args:
      workdir: the run's workdir.
      results: the results found there.
      path: where they were found.
      is_lead: whether this process writes files.

    Returns:
      ``results``, unchanged.
    """
    if is_lead and os.path.basename(path) != RESULTS_FILE:
        path = write(workdir, results)
    logging.info(
        "Step %d/%d was already done; results (kept as they were): %s",
        last_step(results),
        results["steps"],
        path,
    )
    return results


def summary(results: dict, path: str) -> str:
    """The closing log line: steps, wall time and its split, and the results file."""
    launches = len(results["launches"])
    over = f" over {launches} launches" if launches > 1 else ""
    return (
        f"Done: step {results['last_step']}/{results['steps']} in "
        f"{results['wall_time_s']:.1f} s{over} ({_format_timing(results['timing_s'])}); "
        f"results: {path}"
    )


def _format_timing(timing: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timing.items())
