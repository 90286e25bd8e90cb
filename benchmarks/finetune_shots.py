"""Few-shot fine-tuning benchmark: target accuracy vs labelled examples per class, per variant.

  python benchmarks/finetune_shots.py                       # ~20 min on 2 CPU cores
  python benchmarks/finetune_shots.py --shots=1,5 --seeds=0 # quicker

Pretrains one source model (configs/pretrain.py) and fine-tunes it on k labelled target
examples per class with every variant of configs/finetune.py, for each k and seed (the seed
draws the k shots and initialises new layers). Every run has its own workdir under --out, so an
interrupted benchmark resumes where it stopped. Writes <out>/finetune_shots.md (the table) and
<out>/finetune_shots.png (accuracy vs k per variant, error bars = std over seeds), and prints
the table.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import finetune, pretrain  # noqa: E402

_SHOTS = flags.DEFINE_list("shots", ["1", "5", "10", "50"], "Labelled target examples per class.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (shot draw and new-layer init).")
_VARIANTS = flags.DEFINE_list("variants", list(finetune.VARIANTS), "configs/finetune.py variants.")
_DATA = flags.DEFINE_string("data", "embedded", "Dataset pair (configs/dann.py DATASETS).")
_OUT = flags.DEFINE_string("out", "runs/finetune_shots", "Root of the per-run workdirs.")
_FIGURE_DIR = flags.DEFINE_string("figure_dir", None, "Also copy the table and PNG here.")


def run(name: str, config) -> dict:
    """Trains `config` in <out>/<name> unless it already finished there; returns results."""
    from tljax import sweep

    start = time.time()
    results = sweep.run_or_load(config, os.path.join(_OUT.value, name))
    print(
        f"{name}: target {results['final']['target_test/accuracy']:.4f} "
        f"({time.time() - start:.0f} s)",
        flush=True,
    )
    return results


def table(accuracy: dict, source_only: float, pretrain_results: dict) -> str:
    """Markdown table: one row per variant, mean ± std target accuracy per k."""
    shots = [int(k) for k in _SHOTS.value]
    lines = [
        "| variant | " + " | ".join(f"k={k}" for k in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for variant in _VARIANTS.value:
        cells = []
        for k in shots:
            values = np.array(accuracy[variant, k])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append(
        f"| pretrained, not fine-tuned | {source_only:.3f} (source test "
        f"{pretrain_results['final']['source_test/accuracy']:.3f}) |" + " |" * (len(shots) - 1)
    )
    return "\n".join(lines)


def plot(accuracy: dict, source_only: float, path: str) -> None:
    """Target accuracy vs k (log axis) per variant, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [int(k) for k in _SHOTS.value]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for variant in _VARIANTS.value:
        values = np.array([accuracy[variant, k] for k in shots])
        ax.errorbar(shots, values.mean(1), yerr=values.std(1), marker="o", capsize=3, label=variant)
    ax.axhline(source_only, color="gray", linestyle=":", label="pretrained, not fine-tuned")
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled target examples per class (k)")
    ax.set_ylabel("target test accuracy")
    ax.set_title("Fine-tuning MNIST -> MNIST-M-style digits from k shots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    pretrain_config = pretrain.get_config(f"data={_DATA.value}")
    pretrained = run("pretrain", pretrain_config)
    source_only = pretrained["final"]["target_test/accuracy"]
    init_from = os.path.abspath(os.path.join(_OUT.value, "pretrain"))
    accuracy = {}
    wall = []
    for k in map(int, _SHOTS.value):
        for variant in _VARIANTS.value:
            for seed in map(int, _SEEDS.value):
                config = finetune.get_config(
                    f"variant={variant},shots={k},seed={seed},data={_DATA.value},"
                    f"init_from={init_from}"
                )
                results = run(f"{variant}_k{k}_seed{seed}", config)
                accuracy.setdefault((variant, k), []).append(
                    results["final"]["target_test/accuracy"]
                )
                wall.append(results["wall_time_s"])
    text = table(accuracy, source_only, pretrained)
    steps = finetune.get_config().train.steps
    header = (
        f"Target (MNIST-M-style) test accuracy, mean ± std over seeds {_SEEDS.value}; "
        f"{steps} fine-tuning steps per run, mean {np.mean(wall):.0f} s per run.\n\n"
    )
    os.makedirs(_OUT.value, exist_ok=True)
    outputs = [_OUT.value] + ([_FIGURE_DIR.value] if _FIGURE_DIR.value else [])
    for directory in outputs:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "finetune_shots.md"), "w") as f:
            f.write(header + text + "\n")
        plot(accuracy, source_only, os.path.join(directory, "finetune_shots.png"))
    print("\n" + header + text)


if __name__ == "__main__":
    app.run(main)
