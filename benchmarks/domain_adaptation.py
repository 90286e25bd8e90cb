"""The domain-adaptation catalogue on several offline domain pairs, selected without target labels.

  python benchmarks/domain_adaptation.py                      # every recipe, 6 directions, 3 seeds
  python benchmarks/domain_adaptation.py --methods=source_only,dann --seeds=0 --page=

Every recipe of configs/da.py runs on each pair direction of --pairs (digit domains shipped
inside packages: MNIST, MNIST-M, UCI optdigits, font-rendered digits) for every seed, with a
fixed budget (--steps), as ``python launch.py --config=configs/da.py:...`` commands in their
own workdirs under --out (an interrupted benchmark resumes; --workers run side by side).
Each run scores the label-free validators at every evaluation (tljax/validators.py).

Reported per pair and recipe (mean ± std over seeds): target test accuracy at the final step,
at the best step (oracle: needs target labels), and at the step each validator picks; the
train step time relative to DANN's; collapsed runs. Then the protocols: for each validator,
the (recipe, step) it picks across the whole catalogue per pair and seed, and for each
(recipe, validator) pair the gain over source-only across pairs — the recommendation is the
combination with the best mean gain whose worst pair loses at most a point.
"""

import collections
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

from configs import da as da_config  # noqa: E402
from tljax import select, selection, validators  # noqa: E402

PAIRS = (
    "mnist:mnist_m,mnist_m:mnist,mnist:optdigits,optdigits:mnist,syn_digits:mnist,mnist:syn_digits"
)
_PAIRS = flags.DEFINE_list("pairs", PAIRS.split(","), "source:target short names.")
_METHODS = flags.DEFINE_list("methods", list(da_config.RECIPES), "Recipes of configs/da.py.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps per run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Steps between evaluations.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Runs side by side (each on its own cores).")
_RUN = flags.DEFINE_bool("run", True, "Train the unfinished runs (False: report the finished).")
_OUT = flags.DEFINE_string("out", "runs/bench_da", "Root of the per-run workdirs.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("domain_adaptation"), "Results page to write ('': none)."
)
ACCURACY = "target_test/accuracy"
# The tolerance of the recommendation: its worst pair may lose this much to source-only.
WORST_LOSS = 0.01


def run_dir(pair: str, method: str, seed: str) -> str:
    """The workdir of one run."""
    return os.path.join(_OUT.value, pair.replace(":", "_to_"), f"{method}_seed{seed}")


def launch_command(pair: str, method: str, seed: str) -> list[str]:
    """The launch.py command of one run."""
    source, target = pair.split(":")
    arg = f"method={method},source={source},target={target},seed={seed}"
    steps = _STEPS.value
    return [
        sys.executable,
        os.path.join(ROOT, "launch.py"),
        f"--config={os.path.join(ROOT, 'configs', 'da.py')}:{arg}",
        f"--workdir={run_dir(pair, method, seed)}",
        f"--config.train.steps={steps}",
        f"--config.eval.every={_EVAL_EVERY.value}",
        f"--config.checkpoint.every={steps}",
        # The validators are in every run's history; selection is computed here.
        "--config.eval.select_by=",
    ]


def run_all(jobs: list[tuple[str, str, str]]) -> None:
    """Runs the unfinished jobs, --workers at a time, each single-threaded when side by side."""
    pending = [job for job in jobs if not os.path.exists(_results_path(*job))]
    env = dict(os.environ)
    if _WORKERS.value > 1:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        ).strip()
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    while pending or running:
        while pending and len(running) < _WORKERS.value:
            job = pending.pop(0)
            os.makedirs(run_dir(*job), exist_ok=True)
            with open(os.path.join(run_dir(*job), "launch.log"), "w") as log:
                # The child keeps its own copy of the log's descriptor.
                process = subprocess.Popen(
                    launch_command(*job), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                )
            running.append((process, job, time.time()))
        time.sleep(0.5)
        for entry in list(running):
            process, job, start = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
            print(f"{job}: {status} in {time.time() - start:.0f} s", flush=True)


def _results_path(pair: str, method: str, seed: str) -> str:
    return os.path.join(run_dir(pair, method, seed), "results.json")


def load(pair: str, method: str, seed: str) -> dict | None:
    """A finished run's results, or None."""
    path = _results_path(pair, method, seed)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def picked_accuracy(history: list[dict], validator: str) -> float:
    """Target accuracy at the evaluation ``validator`` ranks best (as ``eval.select_by``)."""
    best = selection.best_entry(history, validator)
    return float("nan") if best is None else best["metrics"][ACCURACY]


def run_summary(results: dict) -> dict:
    """Final, oracle and per-validator target accuracy, step time and status of one run."""
    history = results["history"]
    summary = {
        "final": history[-1][ACCURACY],
        "oracle": max(e[ACCURACY] for e in history),
        # A collapsed run stops early: its train time covers the steps it ran.
        "step_s": results["timing_s"]["train"] / max(results.get("last_step", results["steps"]), 1),
        "collapsed": results.get("status") == "collapsed",
    }
    for name in validators.NAMES:
        summary[name] = picked_accuracy(history, name)
    return summary


def protocol_accuracy(runs: dict[str, dict], validator: str) -> float:
    """Target accuracy of the (recipe, step) a validator picks over the whole catalogue.

    As ``python -m tljax.select``: over the runs not marked collapsed, ties to the earliest
    recipe name, then the latest step.
    """
    points = [
        {"run": method, "status": results.get("status"), **entry}
        for method, results in runs.items()
        for entry in results["history"]
    ]
    candidates = [p for p in points if p["status"] != select.COLLAPSED]
    best = select.best_point(candidates, f"validator/{validator}")
    return float("nan") if best is None else best[ACCURACY]


def _mean_std(values) -> str:
    values = np.asarray([v for v in values if np.isfinite(v)])
    if not len(values):
        return "-"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {std:.3f}"


def pair_table(pair: str, summaries: dict[str, list[dict]], dann_step: float) -> str:
    """One pair's table: per recipe, final / oracle / each validator's pick, time, collapses."""
    header = ["recipe", "final", "oracle", *validators.NAMES, "step time / DANN", "collapsed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in summaries.items():
        cells = [method, _mean_std([r["final"] for r in runs])]
        cells += [_mean_std([r["oracle"] for r in runs])]
        cells += [_mean_std([r[name] for r in runs]) for name in validators.NAMES]
        step = np.mean([r["step_s"] for r in runs])
        cells += [f"{step / dann_step:.2f}x" if dann_step else "-"]
        cells += [f"{sum(r['collapsed'] for r in runs)}/{len(runs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return f"**{pair.replace(':', ' → ')}**\n\n" + "\n".join(lines)


def combination_gains(summaries) -> dict[tuple[str, str], list[float]]:
    """Per (recipe, validator): mean gain over source-only's final accuracy, per pair."""
    gains = collections.defaultdict(list)
    for by_method in summaries.values():
        if "source_only" not in by_method:
            continue
        baseline = np.mean([r["final"] for r in by_method["source_only"]])
        for method, runs in by_method.items():
            for name in validators.NAMES:
                gains[(method, name)].append(np.mean([r[name] for r in runs]) - baseline)
            gains[(method, "final")].append(np.mean([r["final"] for r in runs]) - baseline)
    return gains


def recommendation(gains: dict[tuple[str, str], list[float]], num_pairs: int):
    """The (recipe, validator) to recommend, and whether it met the tolerance.

    Among the adapting recipes (not source-only itself) with a gain on every pair: the best
    mean gain of those whose worst pair loses at most WORST_LOSS; when none does, the one with
    the best worst pair.
    """
    complete = {
        k: v
        for k, v in gains.items()
        if len(v) == num_pairs and k[1] != "final" and k[0] != "source_only"
    }
    if not complete:
        return None, False
    safe = {k: v for k, v in complete.items() if min(v) >= -WORST_LOSS}
    if safe:
        return max(safe, key=lambda k: np.mean(safe[k])), True
    return max(complete, key=lambda k: min(complete[k])), False


def plot(summaries, protocol, path: str) -> None:
    """Per pair: source-only, DANN and the best protocols' target accuracy, with the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(summaries)
    series = {
        "source only (final)": [
            np.mean([r["final"] for r in summaries[p].get("source_only", [])] or [np.nan])
            for p in pairs
        ],
        "DANN (final)": [
            np.mean([r["final"] for r in summaries[p].get("dann", [])] or [np.nan]) for p in pairs
        ],
        **{
            f"catalogue, picked by {name}": [np.nanmean(protocol[p][name]) for p in pairs]
            for name in ("snd", "im", "dev")
        },
        "catalogue, oracle": [np.nanmean(protocol[p]["oracle"]) for p in pairs],
    }
    fig, ax = plt.subplots(figsize=(9.0, 4.2), dpi=110)
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        ax.bar(np.arange(len(pairs)) + index * width, values, width, label=label)
    ax.set_xticks(np.arange(len(pairs)) + 0.4 - width / 2)
    ax.set_xticklabels([p.replace(":", "→") for p in pairs], fontsize=8)
    ax.set_ylabel("target test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    jobs = list(itertools.product(_PAIRS.value, _METHODS.value, _SEEDS.value))
    # Seed-major order: a benchmark cut short still covers every recipe and pair.
    jobs.sort(key=lambda job: (_SEEDS.value.index(job[2]), _PAIRS.value.index(job[0])))
    if _RUN.value:
        run_all(jobs)

    summaries, protocol, seeds_done = {}, {}, set()
    for pair in _PAIRS.value:
        by_method = {}
        for method in _METHODS.value:
            runs = [load(pair, method, seed) for seed in _SEEDS.value]
            runs = [r for r in runs if r is not None]
            if runs:
                by_method[method] = [run_summary(r) for r in runs]
        summaries[pair] = by_method
        protocol[pair] = collections.defaultdict(list)
        for seed in _SEEDS.value:
            catalogue = {m: load(pair, m, seed) for m in _METHODS.value}
            if any(r is None for r in catalogue.values()):
                continue
            seeds_done.add(seed)
            for name in validators.NAMES:
                protocol[pair][name].append(protocol_accuracy(catalogue, name))
            protocol[pair]["oracle"].append(
                max(e[ACCURACY] for r in catalogue.values() for e in r["history"])
            )

    tables = []
    for pair, by_method in summaries.items():
        dann = by_method.get("dann")
        dann_step = np.mean([r["step_s"] for r in dann]) if dann else 0.0
        tables.append(pair_table(pair, by_method, dann_step))
    columns = ["pair", "source only (final)", *validators.NAMES, "oracle"]
    protocol_lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for pair in summaries:
        baseline = _mean_std([r["final"] for r in summaries[pair].get("source_only", [])])
        cells = [pair.replace(":", " → "), baseline]
        cells += [_mean_std(protocol[pair][name]) for name in (*validators.NAMES, "oracle")]
        protocol_lines.append("| " + " | ".join(cells) + " |")

    correlation_lines = [
        "| pair | " + " | ".join(validators.NAMES) + " |",
        "|" + "---|" * (len(validators.NAMES) + 1),
    ]
    for pair in summaries:
        points = [
            {"run": f"{method}_seed{seed}", "status": results.get("status"), **entry}
            for method in _METHODS.value
            for seed in _SEEDS.value
            if (results := load(pair, method, seed)) is not None
            for entry in results["history"]
        ]
        points = [p for p in points if p["status"] != select.COLLAPSED]
        cells = [select.rank_correlation(points, f"validator/{name}") for name in validators.NAMES]
        cells = ["-" if c is None else f"{c:+.2f}" for c in cells]
        correlation_lines.append(f"| {pair.replace(':', ' → ')} | " + " | ".join(cells) + " |")

    gains = combination_gains(summaries)
    best, within_tolerance = recommendation(gains, len(summaries))
    ranked = sorted(
        ((k, v) for k, v in gains.items() if len(v) == len(summaries)),
        key=lambda item: -np.mean(item[1]),
    )
    gain_lines = [
        "| recipe | chosen by | mean gain over source only | worst pair |",
        "|---|---|---|---|",
        *(
            f"| {method} | {name} | {100 * np.mean(v):+.1f} | {100 * min(v):+.1f} |"
            for (method, name), v in ranked[:15]
        ),
    ]
    table = "\n\n".join(
        [
            *tables,
            "**The catalogue selected without target labels** (per pair and seed, the "
            "(recipe, step) each validator ranks best over every recipe; oracle: best by "
            "target labels)\n\n" + "\n".join(protocol_lines),
            "**How each validator ranks every evaluation** (Spearman correlation with target "
            "accuracy over every (recipe, seed, step) of a pair, collapsed runs left out)\n\n"
            + "\n".join(correlation_lines),
            "**Recipe and validator combinations** (gain in points of target accuracy over "
            "source-only's final step, mean over pairs and its worst pair; top 15)\n\n"
            + "\n".join(gain_lines),
        ]
    )
    print(table)
    if best:
        print(f"\nRecommended: recipe {best[0]} chosen by {best[1]}.")
    if not _PAGE.value:
        return
    figure = results_page.figure_path(_PAGE.value)
    plot(summaries, protocol, figure)
    settings = (
        f"configs/da.py:method=<recipe>,source=<S>,target=<T>,seed=<seed> with "
        f"train.steps={_STEPS.value}, eval.every={_EVAL_EVERY.value}; seeds "
        f"{', '.join(sorted(seeds_done)) or '-'} complete over every recipe and pair; "
        "64 source + 64 target images per step, SGD momentum 0.9, lr 0.01/(1+10p)^0.75, "
        "each recipe's default weights (configs/da.py RECIPES). Validators on the source test "
        "split and 1,000 unlabelled target training images; accuracy on the target test split. "
        "± is the sample standard deviation over seeds; step time is the mean train time per "
        "step on cores shared with other jobs."
    )
    notes = ""
    if best:
        rule = (
            f"the best mean gain over source-only among the combinations whose worst pair "
            f"loses at most {100 * WORST_LOSS:.0f} point"
            if within_tolerance
            else f"no combination kept every pair within {100 * WORST_LOSS:.0f} point of "
            "source-only; this one has the best worst pair"
        )
        notes = (
            f"Recommended ({rule}): **{best[0]}** with eval.select_by=**{best[1]}**; "
            f"configs/da.py RECOMMENDED is {da_config.RECOMMENDED}."
        )
    results_page.write_page(
        _PAGE.value,
        "Domain adaptation: the catalogue on offline digit pairs",
        table,
        figure=figure,
        settings=settings,
        notes=notes,
    )


if __name__ == "__main__":
    app.run(main)
