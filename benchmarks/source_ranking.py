"""Source-model ranking benchmark: transferability scores against actual fine-tuned accuracy.

  python benchmarks/source_ranking.py                                   # ~7 min on 2 CPU cores
  python benchmarks/source_ranking.py --seeds=0 --pretrain_steps=300    # quicker

Trains several candidate source models offline (`CANDIDATES`: other source domains, a class
subset, and sources that should transfer badly: MNIST with shuffled labels, pure noise with
random labels), scores each on the labelled target shots with `tljax.rank` (LogME, LEEP, NCE,
H-score; `tljax.ranking`; and LogME as the authors' LogME.py computes it), then fine-tunes each
on the same shots (configs/finetune.py variant=finetune, its default budget) for every seed,
next to the from-scratch baseline (variant=scratch), and reports per score the Spearman and
Kendall rank correlation with the mean fine-tuned target accuracy and the candidate it would
pick. The target is the embedded MNIST-M-style digits with --shots labelled examples per class;
the seed draws the shots, as in configs/finetune.py, and the scores are the mean over the
seeds' draws.

The data are exported once under <out>/data (`tljax.data.exported`): the embedded splits and the
derived sources, so every run reads NumPy files. `embedded_digits/optdigits` and
`embedded_digits/syn_digits` are candidates where this checkout's tljax/data/embedded.py builds
them. Every run has its own workdir under --out, so an interrupted benchmark resumes where it
stopped. Writes docs/results/source_ranking.md and .png (--page; --page= for none).

Papers: see tljax/ranking.py.
"""

import dataclasses
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

_SHOTS = flags.DEFINE_integer("shots", 10, "Labelled target examples per class.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (shot draw, new-layer init).")
_PRETRAIN_STEPS = flags.DEFINE_integer(
    "pretrain_steps", 1000, "Steps per candidate's pretraining (configs/pretrain.py has 2000)."
)
_CANDIDATES = flags.DEFINE_list("candidates", None, "Candidates to run (default: all available).")
_OUT = flags.DEFINE_string("out", "runs/source_ranking", "Root of the per-run workdirs.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("source_ranking"), "Results page to write ('': none)."
)

TARGET = "embedded_digits/mnist_m"
SCRATCH = "scratch"
# python -m tljax.rank's scores, and LogME as the authors' LogME.py computes it (its
# log-determinant leaves out the D - N zero eigenvalues of F'F here, N = 100 < D = 768).
SCORE_LABELS = {
    "logme": "LogME",
    "logme_py": "LogME (LogME.py)",
    "leep": "LEEP",
    "nce": "NCE",
    "hscore": "H-score",
}


@dataclasses.dataclass(frozen=True)
class Source:
    """A candidate source model: what it is pretrained on.

    Attributes:
      description: for the results page.
      dataset: exported name of its labelled splits under the benchmark's data directory.
      classes: class subset (relabelled 0..n-1), or None for all ten.
      steps_factor: pretraining steps as a multiple of --pretrain_steps (memorising random
        labels takes longer than learning digits).
    """

    description: str
    dataset: str
    classes: tuple[int, ...] | None = None
    steps_factor: int = 1


CANDIDATES = {
    "mnist": Source("MNIST, all ten digits", "embedded_digits/mnist"),
    "mnist_0-4": Source(
        "MNIST digits 0-4 only (5 classes)", "embedded_digits/mnist", (0, 1, 2, 3, 4)
    ),
    "mnist_rot90": Source("MNIST rotated by 90 degrees, all ten digits", "derived/mnist_rot90"),
    "mnist_shuffled": Source(
        "MNIST with its labels shuffled across the images, trained 3x as long (memorisation)",
        "derived/mnist_shuffled",
        steps_factor=3,
    ),
    "noise": Source(
        "uniform-noise images with random labels, trained 3x as long (memorisation)",
        "derived/noise",
        steps_factor=3,
    ),
    "optdigits": Source("UCI optdigits (8x8 scans redrawn at 28x28)", "embedded_digits/optdigits"),
    "syn_digits": Source(
        "SynDigits-like font-rendered colour digits", "embedded_digits/syn_digits"
    ),
}
BASE_SPLITS = ("embedded_digits/mnist", TARGET)
OPTIONAL = ("embedded_digits/optdigits", "embedded_digits/syn_digits")


# ----------------------------------------------------------------------- data ----


def rotated(arrays: dict) -> dict:
    """The split with every image rotated by 90 degrees (counter-clockwise)."""
    return {
        "image": np.ascontiguousarray(np.rot90(arrays["image"], 1, axes=(1, 2))),
        "label": arrays["label"],
    }


def shuffled_labels(arrays: dict, seed: int) -> dict:
    """The split with its labels permuted across the images (class counts kept)."""
    rng = np.random.default_rng(seed)
    return {"image": arrays["image"], "label": rng.permutation(arrays["label"])}


def noise_split(count: int, seed: int) -> dict:
    """``count`` uniform-noise grey 28x28 images with uniform random labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8)
    return {"image": images, "label": rng.integers(0, 10, count).astype(np.int32)}


def export_data(data_dir: str) -> dict[str, str]:
    """Writes every split the benchmark reads to ``data_dir``; returns skipped datasets -> why.

    The embedded splits come from tfds (its default data directory); the derived sources are
    made from the embedded MNIST. Optional datasets this checkout cannot build are skipped.
    """
    from tljax import data
    from tljax.data import exported

    skipped = {}
    for name in BASE_SPLITS + OPTIONAL:
        for split in ("train", "test"):
            if exported.load_saved_split(data_dir, name, split) is not None:
                continue
            try:
                arrays = data.load_split(name, split)
            except Exception as error:  # An optional dataset this checkout does not build.
                if name not in OPTIONAL:
                    raise
                skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                break
            exported.save_split(data_dir, name, split, arrays)
    for split, seed in (("train", 1), ("test", 2)):
        mnist = exported.load_saved_split(data_dir, "embedded_digits/mnist", split)
        derived = {
            "derived/mnist_rot90": rotated(mnist),
            "derived/mnist_shuffled": shuffled_labels(mnist, seed),
            "derived/noise": noise_split(len(mnist["label"]), seed),
        }
        for name, arrays in derived.items():
            if exported.load_saved_split(data_dir, name, split) is None:
                exported.save_split(data_dir, name, split, arrays)
    return skipped


# ----------------------------------------------------------------------- runs ----


def run(name: str, config) -> dict:
    """Trains ``config`` in <out>/<name> unless it already finished there; returns results."""
    from tljax import sweep

    start = time.time()
    results = sweep.run_or_load(config, os.path.join(_OUT.value, name))
    final = results["final"]
    print(
        f"{name}: target {final['target_test/accuracy']:.4f} status {results.get('status', 'ok')} "
        f"({time.time() - start:.0f} s)",
        flush=True,
    )
    return results


def train_anyway(config):
    """Every run trains its full budget: the collapse monitor marks a run at chance, no more.

    Memorising shuffled labels or noise starts at chance by design, and a fine-tuning run that
    stays there is a measured outcome of negative transfer, not a run to cut short.
    """
    config.train.collapse.stop = False
    return config


def pretrain_config(source: Source, data_dir: str):
    """configs/pretrain.py's classifier on ``source``, --pretrain_steps x its steps_factor long."""
    config = pretrain.classifier_config(source.dataset, TARGET, source.classes, seed=0)
    config.data.data_dir = data_dir
    config.train.steps = _PRETRAIN_STEPS.value * source.steps_factor
    config.eval.every = config.checkpoint.every = config.train.steps
    return train_anyway(config)


def finetune_config(init_from: str | None, num_classes: int, seed: int, data_dir: str):
    """configs/finetune.py variant=finetune from ``init_from`` (variant=scratch for None).

    A candidate with another number of classes gets a new output layer (transfer.reinit),
    since its own cannot be copied into the target's 10-way head.
    """
    variant = "scratch" if init_from is None else "finetune"
    arg = f"variant={variant},shots={_SHOTS.value},seed={seed}"
    config = finetune.get_config(arg + (f",init_from={init_from}" if init_from else ""))
    config.data.data_dir = data_dir
    if init_from and num_classes != config.model.num_classes:
        config.transfer.reinit = ("label/dense_2",)
    return train_anyway(config)


# --------------------------------------------------------------------- scores ----


def target_draws(data_dir: str) -> list[dict]:
    """The labelled target shots of every seed, drawn as configs/finetune.py draws them."""
    from tljax import rank

    return [
        rank.load_target(TARGET, "train", data_dir, _SHOTS.value, int(seed))
        for seed in _SEEDS.value
    ]


def all_scores(features: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every score of `SCORE_LABELS` from a network's outputs on one target draw."""
    from tljax import rank, ranking

    values = rank.score_outputs(features, probs, labels, tuple(rank.SCORES))
    return values | {"logme_py": ranking.logme(features, labels, truncated_log_det=True)}


def candidate_scores(workdir: str, draws: list[dict]) -> dict[str, float]:
    """Each score of the run in ``workdir``, averaged over the target draws."""
    from tljax import rank

    candidate = rank.check_candidate(workdir)
    values = []
    for draw in draws:
        features, probs = rank.source_outputs(candidate, draw["image"])
        values.append(all_scores(features, probs, draw["label"]))
    return {name: float(np.mean([v[name] for v in values])) for name in SCORE_LABELS}


def scratch_scores(draws: list[dict]) -> dict[str, float]:
    """The scores of randomly initialised networks (seed i on draw i): the no-transfer row."""
    import jax

    from tljax import rank
    from tljax.methods import image_model_fns
    from tljax.models import make_classifier

    model_config = finetune.get_config("variant=scratch").model
    _, init_params = image_model_fns(make_classifier(model_config, for_eval=True), model_config)
    values = []
    for seed, draw in zip(_SEEDS.value, draws, strict=True):
        params = jax.device_get(init_params(jax.random.key(int(seed))))
        features, probs = rank.network_outputs(model_config, params, draw["image"])
        values.append(all_scores(features, probs, draw["label"]))
    return {name: float(np.mean([v[name] for v in values])) for name in SCORE_LABELS}


def agreement(scores: dict, accuracy: dict, names: list[str]) -> dict[str, dict]:
    """Per score: Spearman and Kendall correlation with mean accuracy over ``names``, its pick.

    Scores are compared as `tljax.rank.comparable` rounds them: values equal up to float
    rounding are ties (the H-score is C - 1 for every network when N <= D), so float noise
    neither orders nor picks them. All tied: NaN correlations and no pick.

    Returns:
      score -> {'spearman', 'kendall', 'pick' (None when all tie), 'pick_accuracy'}.
    """
    import warnings

    import scipy.stats

    from tljax import rank

    mean_accuracy = [np.mean(accuracy[name]) for name in names]
    rows = [{"candidate": name} | scores[name] for name in names]
    chosen = rank.picks(rows, tuple(SCORE_LABELS))
    out = {}
    for score in SCORE_LABELS:
        values = rank.comparable([scores[name][score] for name in names])
        with warnings.catch_warnings():  # Constant input: scipy warns and returns NaN.
            warnings.simplefilter("ignore")
            spearman = scipy.stats.spearmanr(values, mean_accuracy).statistic
            kendall = scipy.stats.kendalltau(values, mean_accuracy).statistic
        pick = chosen[score]
        out[score] = dict(
            spearman=float(spearman),
            kendall=float(kendall),
            pick=pick,
            pick_accuracy=float(np.mean(accuracy[pick])) if pick else float("nan"),
        )
    return out


# --------------------------------------------------------------------- report ----


def _number(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _mean_std(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def candidates_table(names, scores, accuracy, status, source_accuracy) -> str:
    """One row per candidate (best fine-tuned first), scratch last: its pretraining's final
    train accuracy on its own task, its scores, its fine-tuned target accuracy."""
    order = sorted(names, key=lambda n: -np.mean(accuracy[n])) + [SCRATCH]
    lines = [
        "| candidate | pretraining train accuracy | "
        + " | ".join(SCORE_LABELS.values())
        + " | fine-tuned target accuracy |",
        "|---|---:|" + "---:|" * (len(SCORE_LABELS) + 1),
    ]
    for name in order:
        label = "scratch (random init, no transfer)" if name == SCRATCH else f"`{name}`"
        source = f"{source_accuracy[name]:.3f}" if name in source_accuracy else "-"
        flag = " (a seed marked collapsed)" if status.get(name) else ""
        cells = " | ".join(f"{scores[name][s]:.4f}" for s in SCORE_LABELS)
        lines.append(f"| {label} | {source} | {cells} | {_mean_std(accuracy[name])}{flag} |")
    return "\n".join(lines)


def agreement_table(without: dict, with_scratch: dict, best: str, accuracy: dict) -> str:
    """Per score: rank correlations (candidates; candidates + scratch) and the pick."""

    lines = [
        "| score | Spearman ρ | Kendall τ | ρ / τ with scratch | picks | its accuracy |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for score in SCORE_LABELS:
        a, b = without[score], with_scratch[score]
        pick = f"`{a['pick']}`" if a["pick"] else "none (all tie)"
        lines.append(
            f"| {SCORE_LABELS[score]} | {_number(a['spearman'])} | {_number(a['kendall'])} | "
            f"{_number(b['spearman'])} / {_number(b['kendall'])} | {pick} | "
            f"{_number(a['pick_accuracy'])} |"
        )
    lines.append(
        f"| (best by fine-tuning) | 1 | 1 | 1 / 1 | `{best}` | {np.mean(accuracy[best]):.3f} |"
    )
    return "\n".join(lines)


def plot(names, scores, accuracy, path: str) -> None:
    """One panel per score: score vs mean fine-tuned accuracy (std bars), scratch as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tljax import rank

    fig, axes = plt.subplots(1, len(SCORE_LABELS), figsize=(18, 3.9), dpi=100)
    scratch = np.mean(accuracy[SCRATCH])
    for ax, score in zip(axes, SCORE_LABELS, strict=True):
        for name in names + [SCRATCH]:
            # As compared (rank.comparable): the H-score's C - 1 without its float noise.
            x, y = rank.comparable([scores[name][score]])[0], np.mean(accuracy[name])
            marker = "s" if name == SCRATCH else "o"
            ax.errorbar(
                x,
                y,
                yerr=np.std(accuracy[name]),
                marker=marker,
                capsize=3,
                color="gray" if name == SCRATCH else None,
            )
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(scratch, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(SCORE_LABELS[score])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fine-tuned target accuracy")
    fig.suptitle(
        f"Transferability scores vs fine-tuned accuracy on MNIST-M-style digits, "
        f"{_SHOTS.value} shots per class (dotted: from scratch)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------- main ----


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    data_dir = os.path.abspath(os.path.join(_OUT.value, "data"))
    skipped = export_data(data_dir)
    available = [name for name, source in CANDIDATES.items() if source.dataset not in skipped]
    names = _CANDIDATES.value or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise app.UsageError(f"--candidates {unknown} unknown or unavailable; have {available}.")
    for name, why in skipped.items():
        print(f"Skipping {name}: {why}", flush=True)

    draws = target_draws(data_dir)
    scores, accuracy, status, source_accuracy = {}, {}, {}, {}
    wall = 0.0
    for name in names:
        results = run(f"pretrain_{name}", pretrain_config(CANDIDATES[name], data_dir))
        wall += results["wall_time_s"]
        source_accuracy[name] = results["final"]["train/accuracy"]
        scores[name] = candidate_scores(os.path.join(_OUT.value, f"pretrain_{name}"), draws)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores[name].items()), flush=True)
    scores[SCRATCH] = scratch_scores(draws)
    for name in names + [SCRATCH]:
        init_from = None
        num_classes = 10
        if name != SCRATCH:
            init_from = os.path.abspath(os.path.join(_OUT.value, f"pretrain_{name}"))
            num_classes = len(CANDIDATES[name].classes or range(10))
        for seed in map(int, _SEEDS.value):
            results = run(
                f"finetune_{name}_seed{seed}",
                finetune_config(init_from, num_classes, seed, data_dir),
            )
            accuracy.setdefault(name, []).append(results["final"]["target_test/accuracy"])
            wall += results["wall_time_s"]
            status[name] = status.get(name, False) or results.get("status") == "collapsed"

    best = max(names, key=lambda n: np.mean(accuracy[n]))
    without = agreement(scores, accuracy, names)
    with_scratch = agreement(scores, accuracy, names + [SCRATCH])
    text = (
        candidates_table(names, scores, accuracy, status, source_accuracy)
        + "\n\n"
        + agreement_table(without, with_scratch, best, accuracy)
    )
    minutes = (time.time() - start) / 60
    print("\n" + text + f"\n\n{minutes:.1f} min", flush=True)
    if not _PAGE.value:
        return
    figure = results_page.figure_path(_PAGE.value)
    plot(names, scores, accuracy, figure)
    ft = finetune.get_config()
    steps = pretrain.get_config().train.steps
    shrunk = f" (configs/pretrain.py has {steps}, shrunk to fit the time budget)"
    new_heads = [f"`{n}`" for n in names if CANDIDATES[n].classes]
    runs = len(names) + (len(names) + 1) * len(_SEEDS.value)
    worse = [n for n in names if np.mean(accuracy[n]) < np.mean(accuracy[SCRATCH])]
    results_page.write_page(
        _PAGE.value,
        "Ranking source models before fine-tuning: LogME, LEEP, NCE, H-score",
        text,
        figure=figure,
        settings=(
            f"Target: the embedded MNIST-M-style digits (`{TARGET}`), {_SHOTS.value} labelled "
            f"training examples per class drawn by seed (seeds {', '.join(_SEEDS.value)}, "
            "configs/finetune.py's draw). Candidates, each pretrained with configs/pretrain.py's "
            f"classifier for {_PRETRAIN_STEPS.value} steps of "
            f"{pretrain.get_config().train.batch_size}"
            + (shrunk if _PRETRAIN_STEPS.value < steps else "")
            + ": "
            + "; ".join(f"`{n}`: {CANDIDATES[n].description}" for n in names)
            + (
                ". Not available in this checkout, so left out: "
                + ", ".join(f"`{n}` ({why})" for n, why in skipped.items())
                if skipped
                else ""
            )
            + ". Scores (`python -m tljax.rank`, tljax/ranking.py) are computed on the "
            "candidate's penultimate features / source softmax for each seed's shots and "
            "averaged over the seeds. Actual accuracy: configs/finetune.py `variant=finetune` "
            f"(copy all, train all; {ft.train.steps} steps of {ft.train.batch_size}, its default "
            "budget) on the same shots, target test accuracy (1,000 images), mean ± std over "
            "the seeds"
            + (
                f"; a candidate with another number of classes ({', '.join(new_heads)}) gets "
                "a new output layer (`transfer.reinit=('label/dense_2',)`)"
                if new_heads
                else ""
            )
            + ". Scratch: `variant=scratch`, "
            "same budget; its scores are those of a randomly initialised network. The collapse "
            "monitor marks runs at chance but does not stop them (`train.collapse.stop=False`). "
            f"Training wall time summed over the {runs} runs: {wall / 60:.0f} min on shared cores."
        ),
        notes=(
            "Correlations are over the candidates (n = "
            f"{len(names)}); the 'with scratch' pair adds the from-scratch row, i.e. asks "
            "whether a score also tells when not to transfer. Candidates that fine-tune below "
            f"scratch here (negative transfer): {', '.join(f'`{n}`' for n in worse) or 'none'}. "
            "Pretraining train accuracy: the candidate's accuracy on its own training labels "
            "over its last 100 steps (for shuffled or random labels: how far it memorised them). "
            "A pick is a score's highest candidate; 'its accuracy' is that candidate's mean "
            "fine-tuned accuracy, against the best candidate's in the last row.\n\n"
            "LEEP and NCE read the source head's predictions on the target shots, in the "
            "candidate's own label space. LogME and H-score read the 768-d penultimate features "
            f"of the {10 * _SHOTS.value} target shots, fewer examples than dimensions. "
            "H-score is then C - 1 = 9 for any features that span the shots' centred directions "
            "(tljax/ranking.py), so every network ties and it ranks nothing at this shot count. "
            "`LogME` is the evidence of the LogME paper and TLlib's code; `LogME (LogME.py)` is "
            "what the authors' current fixed-point code returns, whose log-determinant leaves "
            "out the D - N zero eigenvalues of F'F and so adds (D - N) log(alpha) / 2N per class "
            "(alpha: the prior precision of the linear weights), which grows with the feature "
            "scale. The embedded MNIST-M-style training images are the embedded MNIST training "
            "digits blended with photo patches, so the target shots are digits the `mnist` "
            "candidate was pretrained on, on other backgrounds (the test digits are unseen)."
        ),
    )


if __name__ == "__main__":
    app.run(main)
