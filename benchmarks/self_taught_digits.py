"""Self-taught learning and clustering benchmark on the offline digits.

  python benchmarks/self_taught_digits.py                  # ~3.5 min on 2 CPU cores

1. Trains the sparse autoencoder on natural image patches (configs/self_taught.py) and
   writes its filters as a PNG grid.
2. Few-label classification: for every k (labels per class) and seed, a linear classifier
   on the self-taught features, one on raw pixels, and the digit convnet from scratch.
3. Self-taught clustering: k-means of the 1,000 unlabelled test digits on the self-taught
   features vs raw pixels, NMI and clustering accuracy.

Every run goes through the one trainer in its own workdir under --out (so an interrupted
benchmark resumes); the tables are printed as markdown and written, with the filter grid, to
docs/results/self_taught.md and .png (--page; --page= for none).
"""

import os
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

_KS = flags.DEFINE_list("ks", ["1", "5", "20"], "Labelled digits per class.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (labelled subset, init, k-means++).")
_OUT = flags.DEFINE_string("out", "runs/bench_self_taught", "Root of the per-run workdirs.")
_PNG = flags.DEFINE_string("filters_png", None, "Also write the filter grid here.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("self_taught"), "Results page to write ('': none)."
)


def run(name: str, variant: str) -> dict:
    """Runs configs/self_taught.py:<variant> in <out>/<name> (or reads its results).

    Args:
      name: workdir name under --out.
      variant: the config variant string.

    Returns:
      The run's results dict.
    """
    from configs import self_taught
    from tljax import sweep

    return sweep.run_or_load(self_taught.get_config(variant), os.path.join(_OUT.value, name))


def mean_std(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def main(argv):
    del argv
    from tljax.methods import self_taught as method
    from tljax.self_taught import autoencoder, filters

    sae = run("autoencoder", "stage=autoencoder")
    encoder_dir = os.path.join(_OUT.value, "autoencoder")
    final = sae["final"]
    sae_line = (
        f"Sparse autoencoder: {sae['steps']} steps, {sae['wall_time_s']:.0f} s; held-out "
        f"patches: relative reconstruction error {final['heldout_patches/relative_error']:.3f}, "
        f"mean activation {final['heldout_patches/mean_activation']:.3f}"
    )
    print("\n" + sae_line)
    figure = results_page.figure_path(_PAGE.value)
    for png in filter(None, (_PNG.value, figure)):
        encoder, whitening, _ = method.load_encoder(encoder_dir)
        pixel_filters, _ = autoencoder.pixel_space_filters(encoder, whitening)
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        filters.save_filter_grid(pixel_filters.T, png)
        print(f"Filters written to {png}")

    seeds = [int(s) for s in _SEEDS.value]
    lines = [
        "| labels per class | self-taught features + linear | raw pixels + linear | "
        "convnet from scratch |",
        "|---|---|---|---|",
    ]
    print("\n" + "\n".join(lines))
    for k in (int(k) for k in _KS.value):
        cells = []
        for features in ("sae", "pixels", "scratch"):
            accuracy = [
                run(
                    f"classify_{features}_k{k}_seed{seed}",
                    f"stage=classify,features={features},k={k},seed={seed},encoder={encoder_dir}",
                )["final"]["test/accuracy"]
                for seed in seeds
            ]
            cells.append(mean_std(accuracy))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    cluster_lines = [
        "| features | NMI | clustering accuracy | k-means inertia |",
        "|---|---|---|---|",
    ]
    print("\n" + "\n".join(cluster_lines))
    for features in ("sae", "pixels"):
        finals = [
            run(
                f"cluster_{features}_seed{seed}",
                f"stage=cluster,features={features},seed={seed},encoder={encoder_dir}",
            )["final"]
            for seed in seeds
        ]
        nmi = mean_std([f["target/nmi"] for f in finals])
        accuracy = mean_std([f["target/cluster_accuracy"] for f in finals])
        inertia = np.mean([f["target/inertia"] for f in finals])
        cluster_lines.append(f"| {features} | {nmi} | {accuracy} | {inertia:.2f} |")
        print(cluster_lines[-1], flush=True)
    seed_list = ", ".join(map(str, seeds))
    results_page.write_page(
        _PAGE.value,
        "Self-taught learning and self-taught clustering on the digits",
        f"{sae_line}.\n\nFew-label test accuracy (1,000 test digits), mean ± std (ddof=0) over "
        f"seeds {seed_list} (the seed picks the labelled digits):\n\n"
        + "\n".join(lines)
        + f"\n\nClustering of the 1,000 unlabelled test digits into 10 clusters, seeds "
        f"{seed_list} (inertia is in each feature space's own units):\n\n"
        + "\n".join(cluster_lines),
        figure=figure,
        settings=(
            "configs/self_taught.py, three stages, each a trainer run. `stage=autoencoder`: a "
            "sparse autoencoder (100 sigmoid hidden units, KL sparsity) on 8x8 whitened grey "
            "patches of the photos that the embedded MNIST-M uses for training; relative error "
            "and mean activation are measured on patches of held-out photos. "
            "`stage=classify`: k labelled digits per class; `sae` convolves the learned filters "
            "over the digit, pools over a 3x3 grid and trains a linear softmax classifier, "
            "`pixels` trains it on the 784 raw pixels, `scratch` trains the DANN digit convnet "
            "on the same labels. `stage=cluster`: k-means (k-means++ seeding) on the features "
            "or the raw pixels; the labels only score the result."
        ),
        notes="The figure: the 100 learned filters in pixel space (whitening folded in).",
    )


if __name__ == "__main__":
    app.run(main)
