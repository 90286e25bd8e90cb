"""Office-31 (amazon, dslr, webcam; 31 classes): domain adaptation and fine-tuning, ResNet-50.

  python launch.py --config=configs/office31.py:source=amazon,target=webcam,method=cdan \\
      --config.data.root=/data/office31 \\
      --config.transfer.init_from=/data/weights/resnet50_imagenet1k_v2.safetensors \\
      --workdir=runs/office31/A2W_cdan
  python launch.py --config=configs/office31.py:source=A,target=W --sweep \\
      --config.data.root=/data/office31 --config.transfer.init_from=... --workdir=runs/office31/A2W
  python launch.py --config=configs/office31.py:task=finetune,target=webcam,variant=l2sp,shots=3 \\
      --config.data.root=/data/office31 --config.transfer.init_from=... --workdir=runs/office31/ft

``data.root`` holds ``amazon/images/<class>/*.jpg``, ``dslr/images/...`` and ``webcam/images/...``
(the layout of the official archive and of TLlib's copy; BUILD.md "Image benchmarks"). Another
layout works with ``--config.data.source=folder:PATH`` / ``--config.data.target=folder:PATH``.
``transfer.init_from`` is a converted torchvision ResNet-50 (BUILD.md "Pretrained ResNets"):
without it the network starts from random weights (then add ``--config.model.norm=group``).

Variants (after ':', comma separated):
  task=da (default) | finetune
  backbone=         resnet50 (default), vit_s16, vit_b16, convnext_t, vgg16 (BUILD.md
                    "Pretrained backbones"; transfer.init_from a converted checkpoint of it).
  source=, target=  amazon, dslr, webcam (or TLlib's A, D, W); default amazon -> webcam.
  method=NAME       a recipe of configs/da.py (dann, cdan, mdd, mcc, ...; default recommended);
                    scale=, seed=, and with --sweep method=all (default), seeds=, scales=.
  task=finetune: variant= scratch, finetune, freeze, copy, l2sp, feature (configs/finetune.py),
                 shots=K labelled target images per class (default 3), layers=N, seed=N; the
                 target's images are split per class, half for the shots, half for evaluation.

Protocol (TLlib's examples): every source image (labelled) and every target image (unlabelled)
trains, and every target image is evaluated (``data.folder.split=all``); 20 x 1000 steps of 32 + 32
images (configs/_image_benchmarks.py has the rest). The data layer checks before the first step
that both domains hold the same class folders, and labels beyond ``model.num_classes`` (31) stop
the run; the folder names are not compared with TLlib's list (the config is built before
``data.root`` is set), so a copy whose folders are spelled otherwise works when both domains
agree.

Hold ``target_test/accuracy`` against TLlib's Office-31 table (ResNet-50, average over the six
pairs, %): ERM 79.5, DANN 86.1, CDAN 87.7, MDD 89.6, MCC 89.6 (A->W: ERM 75.8, DANN 91.4,
CDAN 93.8, MDD 95.6, MCC 94.1). That table keeps the checkpoint with the best target-test
accuracy, i.e. it picks with target labels; results.json ``selected`` is picked by a label-free
validator and is expected lower. Report both.
"""

import ml_collections

from configs import _image_benchmarks as benchmarks

BENCHMARK = benchmarks.OFFICE31


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Office-31 config; `arg` picks the task, pair and recipe, e.g. 'source=D,target=A'."""
    return benchmarks.get_config(BENCHMARK, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    """configs/da.py's recipes over scales and seeds on one Office-31 pair."""
    return benchmarks.get_sweep(BENCHMARK, arg)
