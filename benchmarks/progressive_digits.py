"""Progressive-network benchmark: three digit tasks in sequence, three ways to add a task.

  python benchmarks/progressive_digits.py                 # ~4 min on 2 CPU cores
  python benchmarks/progressive_digits.py --seeds=0,1,2 --steps=1000

The sequence of configs/progressive.py (embedded data): digits 0-4 -> digits 5-9 -> MNIST-M-style
digits (all ten). Task 0 is trained once per seed (one column, the same network in every
variant); tasks 1 and 2 are each trained from the previous task's checkpoint with

  progressive  a new column with lateral adapters from every earlier column, earlier ones frozen;
  independent  a new column without adapters, earlier ones frozen (no transfer);
  finetune     the one trunk fine-tuned on the new task with a new head (transfer, forgetting).

Reports every task's test accuracy after the last task (and right after it was learned), whether
the earlier tasks' accuracies are exactly unchanged, and parameters per column. Every run has its
own workdir under --out, so an interrupted benchmark resumes where it stopped. Writes
<out>/progressive_digits.md and docs/results/progressive.md (--page; --page= for none) and
prints the tables.
"""

import os
import sys

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

from configs import progressive  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (initialisation and batch order).")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per task.")
_OUT = flags.DEFINE_string("out", "runs/progressive_digits", "Root of the per-run workdirs.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("progressive"), "Results page to write ('': none)."
)

TASKS = progressive.SEQUENCE
VARIANTS = progressive.VARIANTS


def run(variant: str, task: int, seed: int) -> tuple[dict, str]:
    """Trains one task of one variant (task 0 is shared) unless it already finished."""
    from tljax import sweep

    def workdir_of(k):
        return os.path.abspath(
            os.path.join(_OUT.value, f"seed{seed}", "task0" if k == 0 else f"{variant}_task{k}")
        )

    workdir = workdir_of(task)
    if (done := sweep.finished_results(workdir)) is not None:
        return done, workdir
    config = progressive.get_config(
        f"task={task},variant={variant},seed={seed},init_from={workdir_of(task - 1)}"
    )
    config.train.steps = _STEPS.value
    config.eval.every = config.checkpoint.every = _STEPS.value
    results = sweep.run_or_load(config, workdir)
    print(f"{variant} task {task} seed {seed}: {_accuracies(results)}", flush=True)
    return results, workdir


def _accuracies(results: dict) -> dict[str, float]:
    final = results["final"]
    return {t: final[f"{t}_test/accuracy"] for t in TASKS if f"{t}_test/accuracy" in final}


def _mean_std(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def _restore_params(workdir: str) -> dict:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())["params"]


def earlier_params_identical(workdirs: list[str]) -> bool:
    """Whether every parameter a task's run ended with is bit-identical in every later run.

    Args:
      workdirs: one seed's runs of one variant, task 0 first.

    Returns:
      True when no later task changed any earlier run's parameter (compared on shared paths).
    """
    import jax

    from tljax import params as ptree

    def flat(workdir):
        tree = _restore_params(workdir)
        return {
            ptree.path_of(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)
        }

    runs = [flat(w) for w in workdirs]
    return all(
        np.array_equal(earlier[path], later[path])
        for k, earlier in enumerate(runs)
        for later in runs[k + 1 :]
        for path in earlier
    )


def accuracy_table(results: dict, workdirs: dict) -> str:
    """Per variant: each task's accuracy after the last task (and when it was just learned)."""
    lines = [
        "| variant | "
        + " | ".join(f"{t} (just learned → after task 2)" for t in TASKS)
        + " | earlier params bit-identical | params (trained in last run) | wall s, tasks 1+2 |",
        "|---|" + "---|" * (len(TASKS) + 3),
    ]
    for variant in VARIANTS:
        runs = results[variant]  # per seed: [results of task 0, 1, 2]
        cells = []
        for k, task in enumerate(TASKS):
            learned = [seed_runs[k]["final"][f"{task}_test/accuracy"] for seed_runs in runs]
            last = [seed_runs[-1]["final"][f"{task}_test/accuracy"] for seed_runs in runs]
            cells.append(f"{_mean_std(learned)} → {_mean_std(last)}")
        unchanged = all(earlier_params_identical(dirs) for dirs in workdirs[variant])
        final = runs[0][-1]
        trained = final["num_params"] - final["num_frozen_params"]
        wall = np.mean([sum(r["wall_time_s"] for r in seed_runs[1:]) for seed_runs in runs])
        lines.append(
            f"| {variant} | " + " | ".join(cells) + f" | {'yes' if unchanged else 'no'}"
            f" | {final['num_params']:,} ({trained:,}) | {wall:.0f} |"
        )
    return "\n".join(lines)


def growth_table(workdir: str) -> str:
    """Parameters per column of the final progressive network (its checkpoint's params)."""
    from tljax.models.progressive import param_growth_table

    return param_growth_table(_restore_params(workdir))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results = {variant: [] for variant in VARIANTS}
    workdirs = {variant: [] for variant in VARIANTS}
    for seed in map(int, _SEEDS.value):
        for variant in VARIANTS:
            runs = [run(variant, task, seed) for task in range(len(TASKS))]
            results[variant].append([task_results for task_results, _ in runs])
            workdirs[variant].append([workdir for _, workdir in runs])
    header = (
        f"Test accuracy, mean ± std (ddof=0) over seeds {', '.join(_SEEDS.value)}; "
        f"{_STEPS.value} steps of 64 "
        "images per task; task 0 is the same run for every variant.\n\n"
    )
    text = (
        header
        + accuracy_table(results, workdirs)
        + "\n\nParameters per column of the progressive network after task 2:\n\n"
        + growth_table(workdirs["progressive"][-1][-1])
    )
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "progressive_digits.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    results_page.write_page(
        _PAGE.value,
        "Progressive networks: digits 0–4 → digits 5–9 → MNIST-M",
        text[len(header) :],
        settings=header.strip()
        + " Each accuracy cell: the task's test accuracy right after it was learned → after "
        'task 2. "Earlier params bit-identical" compares every parameter of every earlier '
        "run with the later runs' checkpoints. Wall time on cores shared with other jobs.",
        notes=(
            "`progressive`: a new column per task with Rusu et al.'s lateral adapters from every "
            "earlier column, earlier columns frozen; `independent`: a new column without "
            "adapters; `finetune`: one trunk fine-tuned on each task with a new head."
        ),
    )


if __name__ == "__main__":
    app.run(main)
