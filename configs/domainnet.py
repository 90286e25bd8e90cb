"""DomainNet (clipart, infograph, painting, quickdraw, real, sketch; 345 classes), ResNet-50.

  python launch.py --config=configs/domainnet.py:source=clipart,target=painting,method=cdan \\
      --config.data.root=/data/domainnet_splits \\
      --config.transfer.init_from=/data/weights/resnet50_imagenet1k_v2.safetensors \\
      --workdir=runs/domainnet/c2p_cdan
  python launch.py --config=configs/domainnet.py:source=r,target=s --sweep \\
      --config.data.root=/data/domainnet_splits --config.transfer.init_from=... \\
      --workdir=runs/domainnet/r2s
  python launch.py --config=configs/domainnet.py:task=finetune,target=sketch,variant=l2sp,shots=5 \\
      --config.data.root=/data/domainnet_splits --config.transfer.init_from=... \\
      --workdir=runs/domainnet/ft

``data.root`` holds ``<domain>/train/<class>/*.jpg`` and ``<domain>/test/<class>/*.jpg`` for each
domain, built once from the official ``<domain>_train.txt`` / ``<domain>_test.txt`` lists with
symbolic links (BUILD.md "Image benchmarks" has the script). ``transfer.init_from`` is a
converted torchvision ResNet-50 (BUILD.md "Pretrained ResNets"): without it the network starts
from random weights (then add ``--config.model.norm=group``).

Variants (after ':', comma separated):
  task=da (default) | finetune
  backbone=         resnet50 (default), vit_s16, vit_b16, convnext_t, vgg16 (BUILD.md
                    "Pretrained backbones"; transfer.init_from a converted checkpoint of it).
  source=, target=  clipart, infograph, painting, quickdraw, real, sketch (or TLlib's c, i, p,
                    q, r, s); default clipart -> painting.
  method=NAME       a recipe of configs/da.py (default recommended); scale=, seed=, and with
                    --sweep method=all (default), seeds=, scales=.
  task=finetune: variant= scratch, finetune, freeze, copy, l2sp, feature (configs/finetune.py),
                 shots=K per class from the target's train split (default 3), layers=N, seed=N;
                 the target's test split is evaluated.

Protocol (TLlib's examples): the source's train split (labelled) and the target's train split
(unlabelled) train, the target's test split is evaluated (``target_test``; ``source_test`` is the
source's test split); 30 x 2500 steps of 32 + 32 images (configs/_image_benchmarks.py has the
rest). The data layer checks before the first step that the domains' train/ and test/ folders
hold the same classes, and labels beyond ``model.num_classes`` (345) stop the run; the folder
names are not compared with TLlib's list.

Hold ``target_test/accuracy`` against TLlib's DomainNet table, which uses ResNet-101 with a
1024-wide bottleneck (tljax has ResNet-50 at most: expect lower numbers); average over the 12
pairs among c, p, r, s (%): ERM 43.3, DANN 47.2, CDAN 49.9, MDD 51.8, MCC 48.9 (c->p: ERM 32.7,
DANN 37.9, CDAN 40.4, MDD 42.9, MCC 37.7). The table keeps each run's best checkpoint by target
accuracy (it picks with target labels); results.json ``selected``, picked by a label-free
validator, is expected lower. Report both.
"""

import ml_collections

from configs import _image_benchmarks as benchmarks

BENCHMARK = benchmarks.DOMAINNET


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """DomainNet config; `arg` picks the task, pair and recipe, e.g. 'source=r,target=c'."""
    return benchmarks.get_config(BENCHMARK, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    """configs/da.py's recipes over scales and seeds on one DomainNet pair."""
    return benchmarks.get_sweep(BENCHMARK, arg)
