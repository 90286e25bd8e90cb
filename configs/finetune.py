"""Fine-tune a pretrained source model on a few labelled target examples.

  python launch.py --config=configs/pretrain.py --workdir=runs/pretrain
  python launch.py --config=configs/finetune.py:variant=l2sp,shots=5 --workdir=runs/ft_l2sp_5

The target is the source's other domain (embedded MNIST -> its MNIST-M version by default),
with `shots` labelled examples per class; accuracy on both test sets is reported (the source
test set shows how much of the source task survives).

Variants (after ':', comma separated):
  variant=   scratch   the same network and budget, randomly initialised (no transfer)
             finetune  copy every layer, train all (default)
             freeze    copy every layer, freeze the first `layers` layers, train the rest
             copy      copy the first `layers` layers, re-initialise the rest, train all
             l2sp      finetune + L2-SP (alpha=0.1 towards the pretrained weights, beta=0.01)
             output    finetune + output-level distillation towards the pretrained network
             feature   finetune + feature-level L2 towards the pretrained features
  shots=K        labelled target examples per class (default 10; 1 = one-shot)
  layers=N       layers counted by freeze / copy, in forward order (default 2: both convs)
  init_from=DIR  the pretraining run's workdir (default runs/pretrain)
  data=embedded|full, seed=N (seed also picks the K shots)

Reproduces, from the default pretraining run (embedded, seeds 0-2, benchmarks/finetune_shots.py,
docs/results/finetune_shots.md), target test accuracy: shots=1: scratch 0.185, finetune 0.423,
l2sp 0.557, output 0.454; shots=10: scratch 0.464, finetune 0.695, l2sp 0.694; shots=50:
scratch 0.789, finetune 0.859.
"""

import ml_collections

from configs import dann, pretrain
from tljax.config_utils import parse_arg

VARIANTS = ("scratch", "finetune", "freeze", "copy", "l2sp", "output", "feature")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Fine-tuning config; `arg` picks a variant, e.g. 'variant=freeze,layers=1,shots=1'."""
    arg = parse_arg(
        arg,
        variant="finetune",
        shots=10,
        layers=2,
        init_from="runs/pretrain",
        data="embedded",
        seed=0,
    )
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"variant={arg['variant']!r}; choose one of {VARIANTS}.")
    if arg["data"] not in dann.DATASETS:
        raise ValueError(f"data={arg['data']!r}; choose one of {sorted(dann.DATASETS)}.")
    source, target = dann.DATASETS[arg["data"]]
    # Train on the target domain; the source's test set is still reported (forgetting).
    config = pretrain.classifier_config(target, source, None, arg["seed"])
    config.data.eval_sets = {"target_test": target, "source_test": source}
    config.data.shots_per_class = arg["shots"]
    config.data.shots_seed = arg["seed"]
    config.train.steps = 500
    config.train.batch_size = 32
    config.eval.every = 500
    config.checkpoint.every = 500

    variant, layers = arg["variant"], arg["layers"]
    if variant != "scratch":
        config.transfer.init_from = arg["init_from"]
    if variant == "copy":
        config.transfer.copy = (f"first:{layers}",)
    if variant == "freeze":
        config.transfer.freeze = (f"first:{layers}",)
    if variant == "l2sp":
        config.conservative.l2sp_alpha = 0.1
        config.conservative.l2sp_beta = 0.01
    if variant == "output":
        config.conservative.output_weight = 1.0
    if variant == "feature":
        config.conservative.feature_weight = 0.01
    return config
