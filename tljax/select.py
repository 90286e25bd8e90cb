"""Model selection over a sweep: the (run, step) each label-free validator picks.

  python -m tljax.select runs/dann_sweep                   # every validator the runs scored
  python -m tljax.select runs/dann_sweep --validator=snd   # one of them

Every evaluation of every run under WORKDIR is a candidate point: a run is a directory with a
``results.json`` (WORKDIR itself, or sub-directories at any depth; its name is its path
relative to WORKDIR, "." for WORKDIR itself), and its points are the entries of its
``history``. A directory with only ``results.partial.json`` (an unfinished or preempted run)
is skipped with a note. Validators choose among the runs not marked ``"status": "collapsed"``
(the collapse monitor saw their classifier at chance on labelled source batches: no target
label is involved), since some rank constant predictions highest.

Each validator (history key ``validator/<name>``, higher is better, `tljax.validators`) picks
the point with its highest score: ties go to the earliest run name, then the latest step; NaN
scores are never picked. The oracle picks by ``target_test/accuracy``, which no validator may
use; it bounds what selection can reach. Per validator, the Spearman rank correlation of its
score with target accuracy over all points says how well it ranks them (as in Musgrave et al.,
"Benchmarking Validation Methods for Unsupervised Domain Adaptation", 2022, and Saito et al.,
"Tune it the Right Way", ICCV 2021).

The selection goes to ``WORKDIR/selection.json`` ({"workdir", "points", "selections"}) and a
markdown table to ``WORKDIR/selection.md``, which is also printed. Bad input ends with one
``Error: ...`` line and exit status 2 (`tljax.cli`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence

from absl import app, flags
from scipy import stats

from tljax import cli, validate
from tljax.results import PARTIAL_RESULTS_FILE, RESULTS_FILE
from tljax.validators import NAMES

VALIDATOR_PREFIX = "validator/"
TARGET_ACCURACY = "target_test/accuracy"
ORACLE = "oracle"
COLLAPSED = "collapsed"
SELECTION_JSON = "selection.json"
SELECTION_MD = "selection.md"
# Fewer points than this give no rank correlation (two points always correlate perfectly).
MIN_POINTS_FOR_CORRELATION = 3


# ------------------------------------------------------------------ reading ----


def load_points(workdir: str) -> list[dict]:
    """Every evaluation of every finished run under ``workdir``, one dict per (run, step).

    Args:
      workdir: a run's workdir or a sweep's (runs in sub-directories, possibly nested).

    Returns:
      Points sorted by run name then step: ``run`` (path relative to ``workdir``), ``status``
      (the run's, or None) and the history entry's keys (``step`` and its metrics). Runs with
      only results.partial.json are skipped, with a note on stderr.

    Raises:
      tljax.validate.DataError: ``workdir`` is not a directory, has no results.json under it,
        or a results.json is not a run's results (unreadable JSON, a history that is not a
        list of {'step', ...}).
    """
    if not os.path.isdir(workdir):
        what = "is not a directory" if os.path.exists(workdir) else "does not exist"
        raise validate.DataError(
            f"WORKDIR {workdir!r} {what}: expected a run's or sweep's workdir."
        )
    points, finished, unfinished = [], [], []
    for run_dir in _run_dirs(workdir):
        run = os.path.relpath(run_dir, workdir)
        results_path = os.path.join(run_dir, RESULTS_FILE)
        if not os.path.isfile(results_path):
            unfinished.append(run)
            print(
                f"Note: skipping run {run!r}: it has {PARTIAL_RESULTS_FILE} but no {RESULTS_FILE} "
                "(unfinished or preempted).",
                file=sys.stderr,
            )
            continue
        finished.append(run)
        results = _read_results(results_path)
        status = results.get("status")
        history = _history(results, results_path)
        points += [{"run": run, "status": status, **entry} for entry in history]
    if not finished:
        only = f" (only unfinished runs: {', '.join(unfinished)})" if unfinished else ""
        raise validate.DataError(
            f"No {RESULTS_FILE} under {workdir!r}{only}: expected a finished run's "
            "workdir, or a sweep's whose runs are in its sub-directories."
        )
    return sorted(points, key=lambda point: (point["run"], point["step"]))


def _run_dirs(workdir: str) -> list[str]:
    """Directories under ``workdir`` (itself included) that hold a run's results."""
    found = []
    for directory, subdirs, files in os.walk(workdir):
        subdirs.sort()
        if RESULTS_FILE in files or PARTIAL_RESULTS_FILE in files:
            found.append(directory)
            subdirs.clear()  # A run's own sub-directories (checkpoints) hold no runs.
    return found


def _read_results(path: str) -> dict:
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as error:
        raise validate.DataError(f"{path}: cannot read it as JSON ({error}).") from None
    if not isinstance(results, dict):
        raise validate.DataError(f"{path}: expected a JSON object, got {type(results).__name__}.")
    return results


def _history(results: dict, path: str) -> list[dict]:
    history = results.get("history", [])
    if not isinstance(history, list):
        raise validate.DataError(f"{path}: 'history' should be a list of evaluations.")
    for index, entry in enumerate(history):
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise validate.DataError(
                f"{path}: history[{index}] should be an object with an integer 'step', got "
                f"{entry!r:.80}."
            )
    return history


def _number(point: dict, key: str) -> float:
    """The point's value of ``key`` as a float; NaN when absent or null."""
    value = point.get(key)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise validate.DataError(
            f"Run {point['run']!r}, step {point['step']}: {key} should be a number, got {value!r}."
        )
    return float(value)


# ---------------------------------------------------------------- selecting ----


def validator_names(points: Sequence[dict]) -> list[str]:
    """The validators scored in any point: `tljax.validators.NAMES` order, then others sorted."""
    present = {
        key[len(VALIDATOR_PREFIX) :]
        for p in points
        for key in p
        if key.startswith(VALIDATOR_PREFIX)
    }
    return [name for name in NAMES if name in present] + sorted(present - set(NAMES))


def best_point(points: Sequence[dict], key: str) -> dict | None:
    """The point with the highest finite ``key``: ties to the earliest run, then latest step.

    Args:
      points: from `load_points`.
      key: a history key, e.g. ``validator/snd``.

    Returns:
      The point, or None when no point has a finite value.
    """
    scored = [p for p in points if math.isfinite(_number(p, key))]
    if not scored:
        return None
    # max keeps the first of equal scores: order by run name, then latest step first.
    by_run = sorted(scored, key=lambda p: (p["run"], -p["step"]))
    return max(by_run, key=lambda p: _number(p, key))


def rank_correlation(points: Sequence[dict], key: str) -> float | None:
    """Spearman correlation of ``key`` with target accuracy over points with both finite.

    Args:
      points: from `load_points`.
      key: a history key.

    Returns:
      The correlation, or None for fewer than `MIN_POINTS_FOR_CORRELATION` points or when
      either is constant (it is undefined then).
    """
    pairs = [(_number(p, key), _number(p, TARGET_ACCURACY)) for p in points]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < MIN_POINTS_FOR_CORRELATION:
        return None
    scores, accuracies = zip(*pairs, strict=True)
    if len(set(scores)) == 1 or len(set(accuracies)) == 1:
        return None
    return float(stats.spearmanr(scores, accuracies).statistic)


def _entry(name: str, point: dict | None, key: str, correlation: float | None) -> dict:
    if point is None:
        return {
            "validator": name,
            "run": None,
            "step": None,
            "score": None,
            "target_accuracy": None,
            "rank_correlation": correlation,
        }
    accuracy = _number(point, TARGET_ACCURACY)
    return {
        "validator": name,
        "run": point["run"],
        "step": point["step"],
        "score": _number(point, key),
        "target_accuracy": accuracy if math.isfinite(accuracy) else None,
        "rank_correlation": correlation,
    }


def select(workdir: str, validators: Sequence[str] | None = None) -> dict:
    """The (run, step) each validator picks over the runs under ``workdir``, and the oracle's.

    Args:
      workdir: a run's workdir or a sweep's.
      validators: names to select by (without ``validator/``); None: every one the runs scored.

    Returns:
      {"workdir": absolute path, "points": number of (run, step) points, "selections": one
      {"validator", "run", "step", "score", "target_accuracy", "rank_correlation"} per
      validator (over the runs not marked collapsed), then the oracle's (picked by target
      accuracy over every run; its rank_correlation is None)}.
      A validator with no finite score has None for run, step, score and target_accuracy.

    Raises:
      tljax.validate.DataError: ``workdir`` missing, no results.json under it, no validator
        scores in the runs, or a requested validator they did not score.
    """
    points = load_points(workdir)
    available = validator_names(points)
    if not available:
        raise validate.DataError(
            f"No validator scores ({VALIDATOR_PREFIX}<name>) in the history of the runs under "
            f"{workdir!r}: they were not trained with validators (config eval.validators); "
            f"expected a domain-adaptation sweep scoring {', '.join(NAMES)}."
        )
    chosen = available if validators is None else list(validators)
    for name in chosen:
        if name not in available:
            raise validate.DataError(
                validate.with_suggestion(
                    f"Unknown validator {name!r}: the runs under {workdir!r} scored "
                    f"{', '.join(available)}",
                    name,
                    available,
                )
            )
    # A collapsed run's classifier sat at chance on its labelled source batches, which needs no
    # target label to see; some validators rank such constant predictions highest (SND).
    candidates = [point for point in points if point.get("status") != COLLAPSED]
    selections = []
    for name in chosen:
        key = VALIDATOR_PREFIX + name
        best, correlation = best_point(candidates, key), rank_correlation(candidates, key)
        selections.append(_entry(name, best, key, correlation))
    oracle = best_point(points, TARGET_ACCURACY)
    selections.append(_entry(ORACLE, oracle, TARGET_ACCURACY, None))
    return {"workdir": os.path.abspath(workdir), "points": len(points), "selections": selections}


# ------------------------------------------------------------------ writing ----


def markdown_table(selection: dict) -> str:
    """The selections as a markdown table: validator | run | step | target accuracy | rank
    correlation ("-" where there is none)."""
    lines = [
        "| validator | run | step | target accuracy | rank correlation |",
        "|---|---|---|---|---|",
    ]
    for entry in selection["selections"]:
        cells = [
            entry["validator"],
            "-" if entry["run"] is None else entry["run"],
            "-" if entry["step"] is None else str(entry["step"]),
            _format(entry["target_accuracy"], ".4f"),
            _format(entry["rank_correlation"], "+.3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_selection(workdir: str, selection: dict) -> str:
    """Writes ``selection.json`` and ``selection.md`` into ``workdir``.

    Args:
      workdir: where to write them (the selected sweep's workdir).
      selection: from `select`.

    Returns:
      The markdown table.
    """
    with open(os.path.join(workdir, SELECTION_JSON), "w") as f:
        json.dump(selection, f, indent=2)
        f.write("\n")
    table = markdown_table(selection)
    with open(os.path.join(workdir, SELECTION_MD), "w") as f:
        f.write(table + "\n")
    return table


# ---------------------------------------------------------------------- CLI ----


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise validate.ConfigError(
            f"expected one WORKDIR argument, got {len(argv) - 1}: "
            "python -m tljax.select WORKDIR [--validator=NAME]"
        )
    workdir = argv[1]
    validator = flags.FLAGS.validator
    validators = None if validator is None else [validator]
    selection = select(workdir, validators)
    print(write_selection(workdir, selection))


if __name__ == "__main__":
    # Defined here, not on import: the trainer imports this module for `best_point`.
    flags.DEFINE_string(
        "validator", None, "Select by this validator only (default: every one the runs scored)."
    )
    app.run(cli.exit_cleanly(main), flags_parser=cli.flags_parser())
