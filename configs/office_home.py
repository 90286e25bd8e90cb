"""Office-Home (Art, Clipart, Product, Real_World; 65 classes): adaptation and fine-tuning.

  python launch.py --config=configs/office_home.py:source=Art,target=Clipart,method=mdd \\
      --config.data.root=/data/office_home \\
      --config.transfer.init_from=/data/weights/resnet50_imagenet1k_v2.safetensors \\
      --workdir=runs/office_home/Ar2Cl_mdd
  python launch.py --config=configs/office_home.py:source=Ar,target=Cl --sweep \\
      --config.data.root=/data/office_home --config.transfer.init_from=... \\
      --workdir=runs/office_home/Ar2Cl
  python launch.py --config=configs/office_home.py:task=finetune,target=Clipart,variant=l2sp \\
      --config.data.root=/data/office_home --config.transfer.init_from=... \\
      --workdir=runs/office_home/ft

``data.root`` holds ``Art/<class>/*.jpg``, ``Clipart/...``, ``Product/...`` and
``Real_World/...`` (TLlib's names; the official archive calls the last ``Real World``: rename or
symlink it; BUILD.md "Image benchmarks"). ``transfer.init_from`` is a converted torchvision
ResNet-50 (BUILD.md "Pretrained ResNets"): without it the network starts from random weights
(then add ``--config.model.norm=group``).

Variants (after ':', comma separated):
  task=da (default) | finetune
  backbone=         resnet50 (default), vit_s16, vit_b16, convnext_t, vgg16 (BUILD.md
                    "Pretrained backbones"; transfer.init_from a converted checkpoint of it).
  source=, target=  Art, Clipart, Product, Real_World (or TLlib's Ar, Cl, Pr, Rw); default
                    Art -> Clipart.
  method=NAME       a recipe of configs/da.py (default recommended); scale=, seed=, and with
                    --sweep method=all (default), seeds=, scales=.
  task=finetune: variant= scratch, finetune, freeze, copy, l2sp, feature (configs/finetune.py),
                 shots=K per class (default 3), layers=N, seed=N; half of each target class
                 gives the shots, the other half is evaluated.

Protocol (TLlib's examples): every source and every target image trains (the target's without
labels), every target image is evaluated (``data.folder.split=all``); 30 x 1000 steps of 32 + 32
images (configs/_image_benchmarks.py has the rest). The data layer checks before the first step
that both domains hold the same class folders, and labels beyond ``model.num_classes`` (65) stop
the run; the folder names are not compared with TLlib's list.

Hold ``target_test/accuracy`` against TLlib's Office-Home table (ResNet-50, average over the 12
pairs, %): ERM 58.4, DANN 65.2, CDAN 68.8, MDD 69.7, MCC 72.4 (Ar->Cl: ERM 41.1, DANN 53.8,
CDAN 55.2, MDD 56.2, MCC 58.4). The table keeps each run's best checkpoint by target-test
accuracy (it picks with target labels); results.json ``selected``, picked by a label-free
validator, is expected lower. Report both.
"""

import ml_collections

from configs import _image_benchmarks as benchmarks

BENCHMARK = benchmarks.OFFICE_HOME


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Office-Home config; `arg` picks the task, pair and recipe, e.g. 'source=Pr,target=Rw'."""
    return benchmarks.get_config(BENCHMARK, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    """configs/da.py's recipes over scales and seeds on one Office-Home pair."""
    return benchmarks.get_sweep(BENCHMARK, arg)
