"""Self-taught learning and clustering on digits (tljax/methods/self_taught.py).

  python launch.py --config=configs/self_taught.py --workdir=runs/sae
  python launch.py --config=configs/self_taught.py:stage=classify,encoder=runs/sae,k=5 \
      --workdir=runs/st_sae_k5
  python launch.py --config=configs/self_taught.py:stage=classify,features=pixels,k=5 \
      --workdir=runs/st_pixels_k5
  python launch.py --config=configs/self_taught.py:stage=cluster,encoder=runs/sae \
      --workdir=runs/stc_sae

Variants (after ':', comma separated):
  stage=autoencoder (default)  sparse autoencoder on 8x8 natural image patches cut from the
                               photos shipped in scikit-learn / scikit-image.
  stage=classify               k labelled digits per class; features=sae|pixels|scratch.
  stage=cluster                k-means of the 1,000 unlabelled test digits; features=sae|pixels.
  encoder=PATH                 workdir of a finished stage=autoencoder run (features=sae).
  k=N                          labelled digits per class (classify), seed=N (the labelled
                               subset, the initialisation and k-means++ seeding).

Reproduces (benchmarks/self_taught_digits.py, seeds 0-2; docs/results/self_taught.md):
localised, oriented edge filters; with 5 labels per class 0.811 test accuracy on self-taught
features vs 0.680 on raw pixels and 0.759 for a convnet from scratch; k-means NMI 0.550 vs
0.488 on raw pixels.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs._common import train_block
from tljax.config_utils import parse_arg
from tljax.methods.self_taught import FEATURES, STAGES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Self-taught config; `arg` picks a variant, e.g. 'stage=classify,features=pixels,k=5'."""
    arg = parse_arg(arg, stage="autoencoder", features="sae", encoder="", k=5, seed=0)
    stage = arg["stage"]
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; choose one of {STAGES}.")
    if stage != "autoencoder" and arg["features"] not in FEATURES[stage]:
        raise ValueError(f"features={arg['features']!r}; stage={stage} takes {FEATURES[stage]}.")
    config = ml_collections.ConfigDict()
    config.method = "self_taught"
    config.seed = arg["seed"]
    config.data = ml_collections.ConfigDict(
        dict(dataset="embedded_digits/mnist", data_dir=FieldReference(None, field_type=str))
    )
    # conv_operands='bfloat16': bf16 conv matmul operands, fp32 accumulation (docs/experiments.md).
    config.model = ml_collections.ConfigDict(dict(conv_impl="auto", conv_operands="float32"))
    config.self_taught = ml_collections.ConfigDict(
        dict(
            stage=stage,
            features=arg["features"],
            encoder_workdir=FieldReference(arg["encoder"] or None, field_type=str),
            labels_per_class=arg["k"],
            # Sparse autoencoder (Ng's UFLDL linear-decoder settings).
            hidden=100,
            sparsity_target=0.035,
            sparsity_weight=5.0,
            weight_decay=3e-3,
            # Digit features: activation maps mean-pooled over pool_grid x pool_grid regions.
            pool_grid=3,
            patches=dict(
                size=8, num_train=20000, num_heldout=5000, downscale=2, zca_epsilon=1e-2, seed=0
            ),
            num_clusters=10,
            cluster_split="test",
        )
    )
    config.optimizer = ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.0))
    # The filters become localised edges only near convergence (3,000 steps give noise).
    config.lr = ml_collections.ConfigDict(dict(schedule="cosine", base=1e-2, warmup_steps=0))
    config.train = train_block(steps=20000, batch_size=500, log_every=1000)
    config.eval = ml_collections.ConfigDict(dict(every=5000, batch_size=500))
    config.checkpoint = ml_collections.ConfigDict(dict(every=5000, max_to_keep=1))
    if stage == "classify":
        # Full passes over the k * 10 labelled digits; the weight decay keeps the few-label
        # fit from growing without bound once the labels are separated.
        config.train.update(steps=300, batch_size=50, log_every=100)
        config.optimizer.weight_decay = 1e-4
        config.lr.base = 1e-3 if arg["features"] == "scratch" else 1e-2
        config.eval.every = 300
    elif stage == "cluster":
        # One full-batch SGD step of lr 1 on clustering.lloyd_loss is one Lloyd iteration.
        config.train.update(steps=30, batch_size=1000, log_every=10)
        config.optimizer = ml_collections.ConfigDict(
            dict(name="sgd", momentum=0.0, nesterov=False, weight_decay=0.0)
        )
        config.lr = ml_collections.ConfigDict(dict(schedule="constant", base=1.0))
        config.eval.every = 30
        config.checkpoint.every = 30
    return config
