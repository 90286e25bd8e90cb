"""Config blocks shared by the classifier-style configs (pretrain, multitask, progressive, ...)."""

import ml_collections
from ml_collections.config_dict import FieldReference

from tljax import collapse
from tljax.data import folders


def train_block(steps: int, batch_size: int, log_every: int = 100) -> ml_collections.ConfigDict:
    """The `train` block: steps, global batch size, logging, and the collapse monitor's settings.

    Args:
      steps: training steps.
      batch_size: global batch size (per domain for domain adaptation).
      log_every: steps between train-metric log lines (and collapse checks, tljax/collapse.py).

    Returns:
      The block.
    """
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,
            log_every=log_every,
            log_every_secs=30.0,
            collapse=collapse.config_block(),
        )
    )


def digit_model_block(num_classes: int = 10) -> ml_collections.ConfigDict:
    """The `model` block of the digit network on 28x28 images, with the CPU lowering options.

    Args:
      num_classes: outputs of the classifier.

    Returns:
      The block (3 channels: grey images are repeated).
    """
    return ml_collections.ConfigDict(
        dict(
            num_classes=num_classes,
            image_size=(28, 28),
            channels=3,
            conv_impl="auto",
            # 'bfloat16': bf16 matmul operands in the im2col convolutions, fp32 accumulation
            # and activations (docs/experiments.md); float32 is exact.
            conv_operands="float32",
            dtype="float32",
            microbatch="auto",
        )
    )


def add_training_blocks(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    lr_base: float = 0.01,
) -> ml_collections.ConfigDict:
    """Adds train / optimizer / lr / eval / checkpoint blocks: SGD momentum 0.9, cosine lr.

    Args:
      config: the config to extend (modified in place).
      steps: training steps.
      batch_size: global batch size.
      eval_every: steps between evaluations (and checkpoints).
      lr_base: peak learning rate.

    Returns:
      ``config``.
    """
    config.train = train_block(steps, batch_size)
    config.optimizer = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.0)
    )
    config.lr = ml_collections.ConfigDict(dict(schedule="cosine", base=lr_base, warmup_steps=0))
    config.eval = ml_collections.ConfigDict(dict(every=eval_every, batch_size=500))
    config.checkpoint = ml_collections.ConfigDict(dict(every=eval_every, max_to_keep=1))
    return config


def transfer_block(init_from: str | None = None, **fields) -> ml_collections.ConfigDict:
    """A `transfer` block (tljax/transfer.py): off until ``init_from`` names a run or file.

    Args:
      init_from: the run, checkpoint or PyTorch file to start from; None trains from scratch.
      **fields: copy / reinit / freeze / lr_mults to set (defaults: copy all, nothing else).

    Returns:
      The block, with ``init_from``, ``layer_decay`` (e.g. 0.75) and ``preset`` ('bitfit',
      'head_only') typed as optional values so flags can set them; ``lora``, ``layer_groups``
      and ``head`` are set in a config file (tljax/transfer.py).
    """
    block = dict(copy=("*",), reinit=(), freeze=(), lr_mults={})
    unknown = set(fields) - set(block)
    if unknown:
        raise ValueError(f"Unknown transfer field(s) {sorted(unknown)}; use {sorted(block)}.")
    block |= fields
    return ml_collections.ConfigDict(
        dict(
            init_from=FieldReference(init_from, field_type=str),
            layer_decay=FieldReference(None, field_type=float),
            preset=FieldReference(None, field_type=str),
            **block,
        )
    )


def add_folder_fields(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds what ``folder:<path>`` datasets read: ``data.root`` and the ``data.folder`` block.

    Args:
      data: the config's ``data`` block (modified in place).

    Returns:
      ``data``. ``root`` (None) is where relative folder paths start; ``folder`` holds the
      augmentation, split, bad-image and worker settings (`tljax.data.folders.FolderOptions`).
    """
    data.root = FieldReference(None, field_type=str)
    data.folder = folders.config_block()
    return data
