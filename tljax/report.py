"""Collects a sweep's results into a CSV, a markdown table and the layer-transfer figure.

  python -m tljax.report runs/yosinski            # writes runs/yosinski/report.{csv,md,png}
  python -m tljax.report runs/yosinski --out=runs/yosinski_report

`python benchmarks/layer_transfer.py` runs a sweep and writes this report into its results page
(docs/results/yosinski_<data>[_dissimilar].md).

Every ``<workdir>/*/results.json`` is one row: the run's name, its ``config.experiment`` fields
(written by configs that describe a sweep, e.g. configs/layer_transfer.py: mode, n, half) and its
final metrics. The table and figure group rows by ``experiment.mode`` and ``experiment.n``:
mean ± std of ``--metric`` over seeds, the 'base' runs of the evaluated half drawn as the
reference line, as in Yosinski et al. (2014), figure 2.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from tljax import cli
from tljax.validate import DataError


def collect(workdir: str) -> list[dict]:
    """One flat row per finished run under ``workdir``.

    Args:
      workdir: a sweep's root (runs in its immediate sub-directories).

    Returns:
      Rows sorted by name: ``name``, ``experiment.<field>`` and ``final.<metric>`` keys.

    Raises:
      FileNotFoundError: no ``results.json`` under ``workdir``.
    """
    paths = sorted(glob.glob(os.path.join(workdir, "*", "results.json")))
    if not paths:
        single = os.path.isfile(os.path.join(workdir, "results.json"))
        hint = " It is one run's workdir; give the sweep's, whose runs are its sub-directories."
        raise FileNotFoundError(
            f"No */results.json under {workdir!r}: has the sweep run?{hint if single else ''}"
        )
    rows = []
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        row = {"name": os.path.basename(os.path.dirname(path)), "seed": results.get("seed")}
        experiment = results.get("config", {}).get("experiment", {})
        row |= {f"experiment.{key}": value for key, value in experiment.items()}
        row |= {f"final.{key}": value for key, value in results.get("final", {}).items()}
        rows.append(row)
    return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
    """All rows, the union of their keys as columns."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def curves(rows: Sequence[dict], metric: str, base_half: str = "B") -> dict:
    """Per mode, per n: the metric's values over seeds; the base half's values under 'base'.

    Args:
      rows: from ``collect``.
      metric: a final metric, e.g. ``test/accuracy``.
      base_half: which base runs are the reference (the half every transfer run is tested on).

    Returns:
      ``{mode: {n: [values]}}``; 'base' has the single key 0.

    Raises:
      tljax.validate.DataError: rows without experiment.mode / experiment.n, or without the
        metric.
    """
    grouped: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if "experiment.mode" not in row or "experiment.n" not in row:
            raise DataError(
                f"Run {row['name']} has no config.experiment.mode / .n to group by: expected the "
                "runs of a layer-transfer sweep (python launch.py --config=configs/"
                "layer_transfer.py --workdir=DIR --sweep), one per sub-directory of DIR."
            )
        if f"final.{metric}" not in row:
            metrics = sorted(key[len("final.") :] for key in row if key.startswith("final."))
            raise DataError(
                f"Run {row['name']} has no final metric {metric!r}; choose --metric from {metrics}."
            )
        mode, n = row["experiment.mode"], int(row["experiment.n"])
        if mode == "base" and row.get("experiment.half", base_half) != base_half:
            continue
        grouped.setdefault(mode, {}).setdefault(n, []).append(float(row[f"final.{metric}"]))
    return grouped


def markdown_table(grouped: dict, metric: str) -> str:
    """Rows = modes, columns = n; cells ``mean ± std (seeds)``."""
    ns = sorted({n for mode, by_n in grouped.items() if mode != "base" for n in by_n})
    lines = [
        f"| {metric} | " + " | ".join(f"n={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    if "base" in grouped:
        values = np.array(grouped["base"][0])
        lines.append(
            f"| base (n/a) | {values.mean():.4f} ± {values.std():.4f} ({len(values)})"
            + " |" * len(ns)
        )
    for mode in sorted(m for m in grouped if m != "base"):
        cells = []
        for n in ns:
            values = np.array(grouped[mode].get(n, []))
            cells.append(
                f"{values.mean():.4f} ± {values.std():.4f} ({len(values)})" if len(values) else "-"
            )
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STYLES = {
    "BnB": dict(color="tab:blue", marker="o", fillstyle="none"),
    "BnB+": dict(color="tab:blue", marker="o"),
    "AnB": dict(color="tab:red", marker="D", fillstyle="none"),
    "AnB+": dict(color="tab:red", marker="D"),
}


def plot(grouped: dict, metric: str, path: str, title: str = "") -> None:
    """The paper's figure: metric vs n per mode with std error bars, base as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    if "base" in grouped:
        values = np.array(grouped["base"][0])
        ax.axhline(values.mean(), color="black", linewidth=1, label="baseB")
        ax.axhspan(values.mean() - values.std(), values.mean() + values.std(), color="0.85")
    for mode in [m for m in STYLES if m in grouped] + [
        m for m in grouped if m not in STYLES and m != "base"
    ]:
        ns = sorted(grouped[mode])
        values = [np.array(grouped[mode][n]) for n in ns]
        ax.errorbar(
            ns,
            [v.mean() for v in values],
            yerr=[v.std() for v in values],
            capsize=3,
            label=mode,
            **STYLES.get(mode, {}),
        )
    ax.set_xlabel("layer n at which the network is chopped and retrained")
    ax.set_ylabel(metric)
    ax.set_title(title or "How transferable are features? (B's test set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(workdir: str, out: str | None = None, metric: str = "test/accuracy") -> str:
    """Writes report.csv, report.md and report.png for a sweep; returns the markdown table.

    Args:
      workdir: the sweep's root.
      out: directory for the three files (default: ``workdir``).
      metric: the final metric to tabulate and plot.

    Returns:
      The markdown table.

    Raises:
      FileNotFoundError: no run under ``workdir``.
      tljax.validate.DataError: the runs are not a layer-transfer sweep (nothing is written).
    """
    rows = collect(workdir)
    # Grouping checks every row, so runs that are not a sweep leave no partial report behind.
    grouped = curves(rows, metric)
    out = out or workdir
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "report.csv"))
    table = markdown_table(grouped, metric)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table + "\n")
    plot(grouped, metric, os.path.join(out, "report.png"))
    return table


_OUT = flags.DEFINE_string("out", None, "Where to write report.{csv,md,png} (default: WORKDIR).")
_METRIC = flags.DEFINE_string("metric", "test/accuracy", "Final metric to tabulate.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("Usage: python -m tljax.report WORKDIR [--out=DIR] [--metric=...]")
    try:
        table = write_report(argv[1], _OUT.value, _METRIC.value)
    except FileNotFoundError as error:  # collect's: no results.json under the directory.
        raise DataError(str(error)) from None
    print(table)


if __name__ == "__main__":
    app.run(cli.exit_cleanly(main))
