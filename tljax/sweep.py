"""Sweeps: one command runs, resumes or prints every point of a config's ``get_sweep``.

A config file describes a sweep with ``get_sweep(arg) -> list of Point`` (or of dicts with the
same fields). Each point is a config variant string for the same file's ``get_config`` plus the
names of the points it needs; ``{root}`` in a variant string is replaced by the sweep's workdir,
so a point can name another point's run, e.g. ``init_from={root}/baseA_seed0``.

  python launch.py --config=configs/layer_transfer.py --workdir=runs/yosinski --sweep
  python launch.py --config=configs/layer_transfer.py --workdir=runs/yosinski --sweep_commands

Locally the points run one after another, dependencies first, each in ``<workdir>/<name>``, with
a progress line per point; a point whose ``results.json`` exists is skipped (so an interrupted
sweep resumes where it stopped, and a half-finished point resumes from its checkpoint).
``--sweep_commands`` prints one ``launch.py`` command per point instead, in an order that
respects the dependencies, for a cluster scheduler. ``--config.a.b=v`` overrides apply to every
point.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
      name: unique name; the run's sub-workdir.
      arg: variant string for the config file's ``get_config`` (may contain ``{root}``).
      depends_on: names of the points that must finish first.
    """

    name: str
    arg: str
    depends_on: tuple[str, ...] = ()


def load_config_module(path: str):
    """Imports a config file by path (as ml_collections' config flags do).

    Args:
      path: e.g. ``configs/layer_transfer.py``.

    Returns:
      The module.

    Raises:
      FileNotFoundError: no such file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    name = "tljax_sweep_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def order_points(points: Sequence[Point | Mapping[str, Any]]) -> list[Point]:
    """Validates points and orders them so that every point follows its dependencies.

    The order is otherwise the one given (a stable topological sort).

    Args:
      points: ``Point``s or dicts with their fields.

    Returns:
      The ordered points.

    Raises:
      ValueError: duplicate names, a dependency on an unknown point, or a cycle.
    """
    points = [p if isinstance(p, Point) else Point(**p) for p in points]
    points = [dataclasses.replace(p, depends_on=tuple(p.depends_on)) for p in points]
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Sweep point names must be unique; repeated: {duplicates}.")
    unknown = sorted({d for p in points for d in p.depends_on if d not in names})
    if unknown:
        raise ValueError(f"Sweep points depend on unknown points: {unknown}.")
    ordered, done = [], set()
    remaining = list(points)
    while remaining:
        ready = [p for p in remaining if set(p.depends_on) <= done]
        if not ready:
            raise ValueError(
                f"Sweep dependencies form a cycle among {[p.name for p in remaining]}."
            )
        ordered.extend(ready)
        done.update(p.name for p in ready)
        remaining = [p for p in remaining if p.name not in done]
    return ordered


def expand(config_spec: str) -> tuple[Any, list[Point]]:
    """The config module and ordered points of ``FILE[:ARG]``'s ``get_sweep(ARG)``.

    Raises:
      ValueError: the config file defines no ``get_sweep``.
    """
    path, _, arg = config_spec.partition(":")
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg); it cannot be run with --sweep.")
    return module, order_points(module.get_sweep(arg or None))


def point_config(module, point: Point, root: str, overrides: Mapping[str, Any]):
    """The config of one point: its variant, ``{root}`` filled in, overrides applied.

    Raises:
      KeyError: an override names a field the config does not have.
    """
    config = module.get_config(point.arg.format(root=os.path.abspath(root)))
    if overrides:
        config.update_from_flattened_dict(dict(overrides))
    return config


def finished_results(workdir: str) -> dict | None:
    """The results of a run that finished in ``workdir``, or None."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_or_load(config, workdir: str, train_fn: Callable[..., dict] | None = None) -> dict:
    """Trains ``config`` in ``workdir`` unless a run already finished there.

    What benchmarks and sweeps use so that an interrupted batch of runs resumes: a finished
    run is read back, an unfinished one resumes from its checkpoint.

    Args:
      config: the run's config (unused when the run is finished).
      workdir: the run's workdir.
      train_fn: ``(config, workdir) -> results``; default ``tljax.train.train_and_evaluate``.

    Returns:
      The run's results.
    """
    done = finished_results(workdir)
    if done is not None:
        return done
    if train_fn is None:
        from tljax import train

        train_fn = train.train_and_evaluate
    os.makedirs(workdir, exist_ok=True)
    return train_fn(config, workdir)


def _accuracies(results: dict) -> str:
    final = results.get("final", {})
    parts = [f"{k}={v:.4f}" for k, v in final.items() if k.endswith("accuracy") and "/" in k]
    return " ".join(p for p in parts if not p.startswith("train/")) or "done"


def run_sweep(
    config_spec: str,
    workdir: str,
    overrides: Mapping[str, Any] | None = None,
    train_fn: Callable[..., dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Runs every unfinished point of the sweep, dependencies first.

    Args:
      config_spec: ``FILE[:ARG]`` as given to ``--config``.
      workdir: the sweep's root; point ``p`` runs in ``<workdir>/<p.name>``.
      overrides: dotted field -> value, applied to every point's config.
      train_fn: ``(config, workdir) -> results``; default ``tljax.train.train_and_evaluate``.
      log: receives one progress line per point.

    Returns:
      Point name -> its results.
    """
    module, points = expand(config_spec)
    results = {}
    for index, point in enumerate(points, start=1):
        point_dir = os.path.join(workdir, point.name)
        prefix = f"[{index}/{len(points)}] {point.name}"
        done = finished_results(point_dir)
        if done is not None:
            results[point.name] = done
            log(f"{prefix}: already finished ({_accuracies(done)}), skipped")
            continue
        start = time.time()
        config = point_config(module, point, workdir, overrides or {})
        results[point.name] = run_or_load(config, point_dir, train_fn)
        log(f"{prefix}: {_accuracies(results[point.name])} ({time.time() - start:.0f} s)")
    return results


def sweep_commands(
    config_spec: str, workdir: str, overrides: Mapping[str, Any] | None = None
) -> list[str]:
    """One ``launch.py`` command per point, dependencies first (for a cluster scheduler).

    Args:
      config_spec: ``FILE[:ARG]``.
      workdir: the sweep's root.
      overrides: dotted field -> value, repeated on every command.

    Returns:
      Shell command lines; a point's dependencies are named in a trailing comment.
    """
    path = config_spec.partition(":")[0]
    _, points = expand(config_spec)
    root = os.path.abspath(workdir)
    lines = []
    for point in points:
        words = [
            "python",
            "launch.py",
            f"--config={path}:{point.arg.format(root=root)}",
            f"--workdir={os.path.join(root, point.name)}",
            *(f"--config.{key}={value}" for key, value in (overrides or {}).items()),
        ]
        after = f"  # after: {' '.join(point.depends_on)}" if point.depends_on else ""
        lines.append(shlex.join(words) + after)
    return lines
