"""Multi-task benchmark: single-task baselines vs multi-task learning per balancing method.

  python benchmarks/multitask_digits.py                       # ~4.5 min on 2 CPU cores
  python benchmarks/multitask_digits.py --seeds=0,1,2 --steps=1500

Tasks (configs/multitask.py, embedded data): `mnist` (digit class of the 4,000 embedded MNIST
digits) and `mnist_m` (digit class of MNIST-M-style images), the latter limited to --shots
labelled examples per class, so it can borrow from the first task through the shared layers.
Each single-task baseline is the same network trained on its task's slice alone (same slice
size, same steps); each multi-task run shares the conv trunk (`sharing=lower`). Every run has its
own workdir under --out, so an interrupted benchmark resumes where it stopped. Writes
<out>/multitask_digits.md and docs/results/multitask.md (--page; --page= for none) and prints
the table.
"""

import os
import sys

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

from configs import multitask  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (init, batch order, shot draw).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per run.")
_SHOTS = flags.DEFINE_integer("shots", 20, "Labelled mnist_m examples per class (0: all).")
_SHARING = flags.DEFINE_string("sharing", "lower", "configs/multitask.py sharing variant.")
_OUT = flags.DEFINE_string("out", "runs/multitask_digits", "Root of the per-run workdirs.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("multitask"), "Results page to write ('': none)."
)

TASKS = ("mnist", "mnist_m")
# (row label, config variant); single-task rows train one task with its multi-task slice size.
ROWS = (
    ("single-task mnist", "tasks=mnist"),
    ("single-task mnist_m", "tasks=mnist_m"),
    ("MTL fixed weights", "balancing=fixed"),
    ("MTL uncertainty (Kendall 2018)", "balancing=uncertainty"),
    ("MTL GradNorm (alpha 1.5)", "balancing=gradnorm"),
    ("MTL PCGrad (Yu 2020)", "balancing=pcgrad"),
)


def run(name: str, variant: str, seed: int) -> dict:
    """Trains one row's config in <out>/<name> unless it already finished there."""
    from tljax import sweep

    workdir = os.path.join(_OUT.value, name)
    if (done := sweep.finished_results(workdir)) is not None:
        return done
    config = multitask.get_config(
        f"{variant},sharing={_SHARING.value},shots={_SHOTS.value},seed={seed}"
    )
    config.train.steps = _STEPS.value
    config.eval.every = config.checkpoint.every = _STEPS.value
    if variant.startswith("tasks="):
        config.train.batch_size //= len(TASKS)  # The task's slice of a multi-task batch.
    results = sweep.run_or_load(config, workdir)
    print(f"{name}: {_accuracies(results)} ({results['wall_time_s']:.0f} s)", flush=True)
    return results


def _accuracies(results: dict) -> dict[str, float]:
    final = results["final"]
    return {t: final[f"{t}_test/accuracy"] for t in TASKS if f"{t}_test/accuracy" in final}


def _mean_std(values) -> str:
    if not values:
        return "-"
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def table(all_results: dict[str, list[dict]]) -> str:
    """Markdown table: per row, each task's test accuracy, final weights and gradient cosine."""
    lines = [
        "| method | mnist test acc | mnist_m test acc | final weights (mnist / mnist_m) "
        "| grad cosine (shared) | wall s / run |",
        "|---|---|---|---|---|---|",
    ]
    for label, _ in ROWS:
        runs = all_results[label]
        accs = {t: [_accuracies(r)[t] for r in runs if t in _accuracies(r)] for t in TASKS}
        finals = [r["final"] for r in runs]
        weights = "-"
        if "train/weight/mnist" in finals[0] and "train/weight/mnist_m" in finals[0]:
            w = np.mean([[f["train/weight/mnist"], f["train/weight/mnist_m"]] for f in finals], 0)
            weights = f"{w[0]:.2f} / {w[1]:.2f}"
        cos = [
            f["train/grad_cos/mnist-mnist_m"] for f in finals if "train/grad_cos/mnist-mnist_m" in f
        ]
        wall = np.mean([r["wall_time_s"] for r in runs])
        lines.append(
            f"| {label} | {_mean_std(accs['mnist'])} | {_mean_std(accs['mnist_m'])} | {weights} "
            f"| {_mean_std(cos)} | {wall:.0f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    all_results = {}
    for label, variant in ROWS:
        for seed in map(int, _SEEDS.value):
            name = f"{variant.replace('=', '_')}_seed{seed}"
            all_results.setdefault(label, []).append(run(name, variant, seed))
    header = (
        f"Test accuracy, mean ± std (ddof=0) over seeds {', '.join(_SEEDS.value)}; "
        f"{_STEPS.value} steps of 32 mnist "
        f"+ 32 mnist_m images (single-task: 32 of its task), mnist_m limited to {_SHOTS.value} "
        f"labelled examples per class, sharing={_SHARING.value}. Weights and gradient cosine: "
        "means over the last logging window (train.log_every = 100 steps).\n\n"
    )
    text = header + table(all_results)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "multitask_digits.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    results_page.write_page(
        _PAGE.value,
        "Multi-task learning: MNIST + data-poor MNIST-M",
        table(all_results),
        settings=header.strip()
        + " Wall time per run on cores shared with other jobs. Single-task rows train the "
        "same network on their task's slice alone for the same steps.",
        notes=(
            "`fixed`: Σ w_i L_i; `uncertainty`: Kendall et al. (2018), Σ exp(−s_i) L_i + s_i/2; "
            "`gradnorm`: Chen et al. (2018); `pcgrad`: Yu et al. (2020), each task's gradient "
            "on the shared params projected off conflicting ones. The gradient cosine is "
            "between the two tasks' gradients on the shared parameters."
        ),
    )


if __name__ == "__main__":
    app.run(main)
