"""Pretrain a source classifier to fine-tune from (configs/finetune.py).

  python launch.py --config=configs/pretrain.py --workdir=runs/pretrain

Variants (after ':', comma separated):
  data=embedded (default)  the offline digits: trains on the 4,000 embedded MNIST digits and
                           also reports accuracy on their MNIST-M version (the target domain).
  data=full                tfds `mnist` / `mnist_m` (needs the datasets; BUILD.md).
  classes=0-4              train on a class subset (a range 'a-b' or a list '0/2/4'),
                           relabelled 0..n-1; num_classes follows.
  seed=N

Reproduces (embedded, default; docs/results/finetune_shots.md): source test accuracy 0.974 and
0.537 on the MNIST-M-style target test set.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs import dann
from configs._common import add_folder_fields, add_training_blocks, transfer_block
from tljax.config_utils import parse_arg


def parse_classes(text: str) -> tuple[int, ...] | None:
    """'0-4' -> (0, 1, 2, 3, 4); '1/3/5' -> (1, 3, 5); '' -> None (all classes)."""
    if not text:
        return None
    if "-" in text:
        low, high = (int(v) for v in text.split("-"))
        return tuple(range(low, high + 1))
    return tuple(int(v) for v in text.split("/"))


def classifier_config(source: str, target: str, classes, seed: int) -> ml_collections.ConfigDict:
    """A classifier run training on `source`, evaluated on both domains' test splits.

    Args:
      source: tfds name of the labelled training dataset.
      target: tfds name of the other domain (evaluated only).
      classes: class subset or None.
      seed: run seed.

    Returns:
      The config (a run from scratch: its transfer block has no init_from).
    """
    config = ml_collections.ConfigDict()
    config.method = "classifier"
    config.seed = seed
    config.data = ml_collections.ConfigDict(
        dict(
            train=source,
            train_split="train",
            classes=classes,
            shots_per_class=0,  # 0: every example; k: k per class (few-shot).
            shots_seed=0,
            eval_split="test",
            eval_sets={"source_test": source, "target_test": target},
            data_dir=FieldReference(None, field_type=str),
        )
    )
    add_folder_fields(config.data)
    num_classes = len(classes) if classes else 10
    config.model = ml_collections.ConfigDict(
        dict(
            name="digits",
            num_classes=num_classes,
            image_size=(28, 28),
            channels=3,
            conv_impl="auto",
            # 'bfloat16': bf16 conv matmul operands, fp32 accumulation (docs/experiments.md).
            conv_operands="float32",
            dtype="float32",
            # 'imagenet' for converted ImageNet ResNets (model.name='resnet50', BUILD.md).
            normalize="none",
            # ResNets: 'affine' (frozen BatchNorm, folded), 'batch' (BatchNorm with running
            # statistics; batch_stats 'update' or 'frozen') or 'group'; width 64 as torchvision.
            norm="affine",
            batch_stats="update",
            width=64,
        )
    )
    add_training_blocks(config, steps=2000, batch_size=64, eval_every=1000)
    # Layer transfer (tljax/transfer.py): off until init_from names a run or a checkpoint file.
    config.transfer = transfer_block()
    # Conservative-training penalties (tljax/regularizers.py); all off.
    config.conservative = ml_collections.ConfigDict(
        dict(l2sp_alpha=0.0, l2sp_beta=0.0, output_weight=0.0, temperature=2.0, feature_weight=0.0)
    )
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Source pretraining config; `arg` picks a variant, e.g. 'classes=0-4,seed=1'."""
    arg = parse_arg(arg, data="embedded", classes="", seed=0)
    if arg["data"] not in dann.DATASETS:
        raise ValueError(f"data={arg['data']!r}; choose one of {sorted(dann.DATASETS)}.")
    source, target = dann.DATASETS[arg["data"]]
    return classifier_config(source, target, parse_classes(arg["classes"]), arg["seed"])
