"""Self-taught learning and clustering benchmark on the offline digits.

  python benchmarks/self_taught_digits.py --out=runs/bench_self_taught \
      --filters_png=docs/self_taught_filters.png

1. Trains the sparse autoencoder on natural image patches (configs/self_taught.py) and
   writes its filters as a PNG grid.
2. Few-label classification: for every k (labels per class) and seed, a linear classifier
   on the self-taught features, one on raw pixels, and the digit convnet from scratch.
3. Self-taught clustering: k-means of the 1,000 unlabelled test digits on the self-taught
   features vs raw pixels, NMI and clustering accuracy.

Every run goes through the one trainer in its own workdir under --out (so an interrupted
benchmark resumes); the tables are printed as markdown.
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_KS = flags.DEFINE_list("ks", ["1", "5", "20"], "Labelled digits per class.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (labelled subset, init, k-means++).")
_OUT = flags.DEFINE_string("out", "runs/bench_self_taught", "Root of the per-run workdirs.")
_PNG = flags.DEFINE_string("filters_png", None, "Where to write the filter grid (optional).")


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
    print(
        f"\nSparse autoencoder: {sae['steps']} steps, {sae['wall_time_s']:.0f} s; held-out "
        f"patches: relative reconstruction error {final['heldout_patches/relative_error']:.3f}, "
        f"mean activation {final['heldout_patches/mean_activation']:.3f}"
    )
    if _PNG.value:
        encoder, whitening, _ = method.load_encoder(encoder_dir)
        pixel_filters, _ = autoencoder.pixel_space_filters(encoder, whitening)
        filters.save_filter_grid(pixel_filters.T, _PNG.value)
        print(f"Filters written to {_PNG.value}")

    seeds = [int(s) for s in _SEEDS.value]
    print(
        "\n| labels per class | self-taught features + linear | raw pixels + linear | "
        "convnet from scratch |"
    )
    print("|---|---|---|---|")
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
        print(f"| {k} | " + " | ".join(cells) + " |")

    print("\n| features | NMI | clustering accuracy | k-means inertia |")
    print("|---|---|---|---|")
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
        print(f"| {features} | {nmi} | {accuracy} | {inertia:.2f} |")


if __name__ == "__main__":
    app.run(main)
