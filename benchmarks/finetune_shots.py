"""Few-shot fine-tuning benchmark: target accuracy vs labelled examples per class, per variant.

  python benchmarks/finetune_shots.py                       # ~20 min on 2 CPU cores
  python benchmarks/finetune_shots.py --shots=1,5 --seeds=0 # quicker

Pretrains one source model (configs/pretrain.py) and fine-tunes it on k labelled target
examples per class with every variant of configs/finetune.py, for each k and seed (the seed
draws the k shots and initialises new layers). Every run has its own workdir under --out, so an
interrupted benchmark resumes where it stopped. Prints the table and writes it, with a figure
of accuracy vs k per variant (error bars = std over seeds), to docs/results/finetune_shots.md
and .png (--page; --page= for none).
"""

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

from configs import finetune, pretrain  # noqa: E402

_SHOTS = flags.DEFINE_list("shots", ["1", "5", "10", "50"], "Labelled target examples per class.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (shot draw and new-layer init).")
_VARIANTS = flags.DEFINE_list("variants", list(finetune.VARIANTS), "configs/finetune.py variants.")
_DATA = flags.DEFINE_string("data", "embedded", "Dataset pair (configs/dann.py DATASETS).")
_OUT = flags.DEFINE_string("out", "runs/finetune_shots", "Root of the per-run workdirs.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("finetune_shots"), "Results page to write ('': none)."
)


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
    plt.close(fig)


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
    config = finetune.get_config()
    header = (
        f"Target (MNIST-M-style) test accuracy, mean ± std over seeds {', '.join(_SEEDS.value)}; "
        f"{config.train.steps} fine-tuning steps per run, mean {np.mean(wall):.0f} s per run.\n\n"
    )
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "finetune_shots.md"), "w") as f:
        f.write(header + text + "\n")
    print("\n" + header + text)
    if not _PAGE.value:
        return
    figure = results_page.figure_path(_PAGE.value)
    plot(accuracy, source_only, figure)
    results_page.write_page(
        _PAGE.value,
        "Few-shot fine-tuning: MNIST → MNIST-M-style digits from k labels per class",
        text,
        figure=figure,
        settings=(
            f"One source model (configs/pretrain.py:data={_DATA.value}, "
            f"{pretrain_config.train.steps} steps on the source digits) is fine-tuned on k "
            "labelled digits per class of the target domain with every variant of "
            f"configs/finetune.py ({config.train.steps} steps of {config.train.batch_size}, the "
            "same budget for every variant; `freeze`/`copy` use the first 2 layers, the two "
            "convolutions). Target test accuracy (1,000 MNIST-M-style digits), mean ± std "
            f"(ddof=0) over seeds {', '.join(_SEEDS.value)}: the seed draws the k shots (nested "
            "for growing k) and initialises new layers. Mean wall time per fine-tuning run: "
            f"{np.mean(wall):.0f} s on shared cores."
        ),
        notes=(
            "Variants: `scratch` (no transfer), `finetune` (copy all, train all), `freeze` "
            "(train above the frozen layers), `copy` (copy the layers, re-initialise the rest), "
            "`l2sp` (L2-SP, Li et al. 2018), `output` (distillation towards the starting "
            "network's outputs, as in LwF), `feature` (L2 between features). The last row is "
            "the pretrained network evaluated on the target without fine-tuning."
        ),
    )


if __name__ == "__main__":
    app.run(main)
