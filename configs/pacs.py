"""PACS (art_painting, cartoon, photo, sketch; 7 classes): adaptation and fine-tuning, ResNet-50.

  python launch.py --config=configs/pacs.py:source=photo,target=sketch,method=dann \\
      --config.data.root=/data/pacs \\
      --config.transfer.init_from=/data/weights/resnet50_imagenet1k_v2.safetensors \\
      --workdir=runs/pacs/P2S_dann
  python launch.py --config=configs/pacs.py:source=P,target=A --sweep \\
      --config.data.root=/data/pacs --config.transfer.init_from=... --workdir=runs/pacs/P2A
  python launch.py --config=configs/pacs.py:task=finetune,target=sketch,variant=finetune,shots=5 \\
      --config.data.root=/data/pacs --config.transfer.init_from=... --workdir=runs/pacs/ft

``data.root`` holds ``art_painting/<class>/*.jpg``, ``cartoon/...``, ``photo/...`` and
``sketch/...`` (the authors' ``kfold`` folder, and TLlib's copy; BUILD.md "Image benchmarks").
``transfer.init_from`` is a converted torchvision ResNet-50 (BUILD.md "Pretrained ResNets"):
without it the network starts from random weights (then add ``--config.model.norm=group``).

Variants (after ':', comma separated):
  task=da (default) | finetune
  backbone=         resnet50 (default), vit_s16, vit_b16, convnext_t, vgg16 (BUILD.md
                    "Pretrained backbones"; transfer.init_from a converted checkpoint of it).
  source=, target=  art_painting, cartoon, photo, sketch (or TLlib's A, C, P, S); default
                    photo -> art_painting.
  method=NAME       a recipe of configs/da.py (default recommended); scale=, seed=, and with
                    --sweep method=all (default), seeds=, scales=.
  task=finetune: variant= scratch, finetune, freeze, copy, l2sp, feature (configs/finetune.py),
                 shots=K per class (default 3), layers=N, seed=N; half of each target class
                 gives the shots, the other half is evaluated.

Protocol: the Office protocol of TLlib's examples (every source and target image trains, every
target image is evaluated, ``data.folder.split=all``) with Office-31's budget, 20 x 1000 steps of
32 + 32 images; TLlib has no adaptation script for PACS (configs/_image_benchmarks.py has the
rest). The data layer checks before the first step that both domains hold the same class folders,
and labels beyond ``model.num_classes`` (7) stop the run; the folder names are not compared with
TLlib's list.

There is no TLlib adaptation table for PACS to hold results against: TLlib uses PACS for domain
generalisation (several labelled source domains, the target unseen in training), a different
protocol whose numbers do not compare with single-source adaptation. Compare the recipes with
each other and with ``method=source_only`` on the same pair; ``target_test/accuracy`` of a
run's best checkpoint picks with target labels, results.json ``selected`` does not. Report both.
"""

import ml_collections

from configs import _image_benchmarks as benchmarks

BENCHMARK = benchmarks.PACS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """PACS config; `arg` picks the task, pair and recipe, e.g. 'source=cartoon,target=sketch'."""
    return benchmarks.get_config(BENCHMARK, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    """configs/da.py's recipes over scales and seeds on one PACS pair."""
    return benchmarks.get_sweep(BENCHMARK, arg)
