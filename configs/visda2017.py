"""VisDA-2017 classification (synthetic train -> real validation; 12 classes), ResNet-50.

  python launch.py --config=configs/visda2017.py:method=mcc \\
      --config.data.root=/data/visda2017 \\
      --config.transfer.init_from=/data/weights/resnet50_imagenet1k_v2.safetensors \\
      --workdir=runs/visda2017/mcc
  python launch.py --config=configs/visda2017.py --sweep --config.data.root=/data/visda2017 \\
      --config.transfer.init_from=... --workdir=runs/visda2017/all
  python launch.py --config=configs/visda2017.py:task=finetune,target=validation,variant=finetune \\
      --config.data.root=/data/visda2017 --config.transfer.init_from=... \\
      --workdir=runs/visda2017/ft

``data.root`` holds ``train/<class>/*.png`` (the synthetic renderings) and
``validation/<class>/*.jpg`` (the real images), as the challenge's ``train.tar`` and
``validation.tar`` unpack (BUILD.md "Image benchmarks"; the ``image_list.txt`` files beside the
class folders are ignored). ``transfer.init_from`` is a converted torchvision ResNet-50 (BUILD.md
"Pretrained ResNets"): without it the network starts from random weights (then add
``--config.model.norm=group``).

Variants (after ':', comma separated):
  task=da (default) | finetune
  backbone=         resnet50 (default), vit_s16, vit_b16, convnext_t, vgg16 (BUILD.md
                    "Pretrained backbones"; transfer.init_from a converted checkpoint of it).
  source=, target=  train, validation (or TLlib's Synthetic, Real); default train -> validation.
  method=NAME       a recipe of configs/da.py (default recommended); scale=, seed=, and with
                    --sweep method=all (default), seeds=, scales=.
  task=finetune: variant= scratch, finetune, freeze, copy, l2sp, feature (configs/finetune.py),
                 shots=K per class (default 3), layers=N, seed=N; half of each target class
                 gives the shots, the other half is evaluated.

Protocol (TLlib's examples): every synthetic (labelled) and every real (unlabelled) image trains,
every real image is evaluated; 30 x 1000 steps of 32 + 32 images; training images get TLlib's
``cen.crop`` resizing (resize, centre crop, flip: ``data.folder.augment=flip``), as every VisDA
command of its scripts uses (configs/_image_benchmarks.py has the rest). The data layer checks
before the first step that both domains hold the same class folders, and labels beyond
``model.num_classes`` (12) stop the run; the folder names are not compared with TLlib's list.

Hold results against TLlib's VisDA-2017 table, which uses ResNet-101 (tljax has ResNet-50 at
most: expect lower numbers). ``target_test/accuracy`` is accuracy over all images, TLlib's "Avg"
column (%): ERM 56.9, DANN 74.9, CDAN 76.5, MDD 79.8, MCC 80.4; the challenge's metric, the mean
of per-class accuracies ("Mean": ERM 51.7, DANN 79.5, CDAN 80.1, MDD 82.0, MCC 83.6), is not
computed here. The table keeps each run's best checkpoint by target accuracy (it picks with
target labels); results.json ``selected``, picked by a label-free validator, is expected lower.
Report both.
"""

import ml_collections

from configs import _image_benchmarks as benchmarks

BENCHMARK = benchmarks.VISDA2017


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """VisDA-2017 config; `arg` picks the task and recipe, e.g. 'method=cdan,seed=1'."""
    return benchmarks.get_config(BENCHMARK, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    """configs/da.py's recipes over scales and seeds on synthetic -> real."""
    return benchmarks.get_sweep(BENCHMARK, arg)
