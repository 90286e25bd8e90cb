"""The fine-tuning step the backbone benchmarks time, built as a tljax run builds it.

benchmarks/finetune_throughput.py (images/s and MFU, meant for an accelerator) and
benchmarks/backbone_speed.py (CPU, against PyTorch) time the step `configs/pretrain.py` trains
with ``model.name`` set to a backbone (a ResNet, He et al. 2016, with torchvision's topology
and frozen BatchNorm, ``norm='affine'``; or a ViT, Dosovitskiy et al. 2021, with timm's:
tljax/models/resnet.py and vit.py cite the reference code), SGD with momentum 0.9 and a
10-class head, on random images of the given size, so the figure is the step's compute and
nothing else (no dataset, no TensorFlow). With ``init_from`` the params
start from a PyTorch checkpoint through ``transfer.init_from``, the path a user's fine-tuning
run takes (`tljax.transfer.make_plan` and `tljax.models.converters`).

  finetune_step.use_random_images(image_size=224, batch=64)
  step = finetune_step.compile_step(finetune_step.finetune_config("vit_b16", 224, 64))
  ms, step.state = step_timing.median_step_ms(step.compiled, step.state, lambda: step.batch, 20)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import step_timing

import tljax.data
from configs import pretrain
from tljax import flops as flops_lib
from tljax import methods, optim, parallel, train, transfer
from tljax import params as ptree
from tljax.data import pipeline

NUM_CLASSES = 10


def use_random_images(image_size: int, batch: int) -> None:
    """Makes ``tljax.data.load_split`` return random RGB images, for the whole process.

    Methods read their splits when they are built; with this they get random labelled images
    and TensorFlow is never imported (see tljax/data/__init__.py).

    Args:
      image_size: side of the square images.
      batch: the global batch; the train split holds two batches, the others one.
    """

    def random_split(name: str, split: str, data_dir=None) -> dict[str, np.ndarray]:
        del name, data_dir
        n = 2 * batch if split == "train" else batch
        return step_timing.random_labelled_images(n, (image_size, image_size, 3), NUM_CLASSES)

    tljax.data.load_split = random_split


def finetune_config(
    model: str, image_size: int, batch: int, dtype: str = "float32", init_from: str | None = None
):
    """configs/pretrain.py with backbone ``model`` on ``image_size`` RGB images.

    Args:
      model: ``model.name`` (e.g. 'resnet50', 'vit_s16', 'vit_b16').
      image_size: side of the square inputs (``model.image_size``).
      batch: ``train.batch_size``.
      dtype: ``model.dtype``, the computation dtype (params stay float32).
      init_from: a PyTorch checkpoint for ``transfer.init_from`` (every layer copied), or None
        for the model's own initialisation.

    Returns:
      The config.
    """
    config = pretrain.get_config()
    config.model.name = model
    config.model.image_size = (image_size, image_size)
    config.model.channels = 3
    config.model.num_classes = NUM_CLASSES
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.transfer.init_from = init_from
    return config


@dataclasses.dataclass
class CompiledStep:
    """A compiled train step with its state and one fixed batch.

    Attributes:
      compiled: ``(state, batch) -> (state, metrics)``; donates the state.
      state: the train state to pass next (replace it with each step's output).
      batch: the fixed (sharded) batch.
      compile_s: seconds the compilation took.
      flops: XLA's FLOP count of the compiled step (None where XLA gives none).
      pretrained: the converted ``transfer.init_from`` params the state started from, or None.
    """

    compiled: Any
    state: Any
    batch: dict
    compile_s: float
    flops: float | None
    pretrained: Any = None


def compile_step(config) -> CompiledStep:
    """Builds and compiles the train step of ``config`` as ``train.train_and_evaluate`` does.

    Call ``use_random_images`` first (or have the config's datasets available).

    Args:
      config: e.g. from ``finetune_config``.

    Returns:
      The compiled step, its initial state and a batch.
    """
    mesh = parallel.make_data_mesh()
    method = methods.build(config)
    plan = transfer.make_plan(config, method.init_params, jax.random.key(config.seed))
    method = plan.adapt(method)
    schedule = optim.make_schedule(config.lr, config.train.steps)
    optimizer = ptree.partition_optimizer(
        optim.make_optimizer(config.optimizer, schedule), plan.labels
    )
    state = train.create_train_state(method, optimizer, config.seed, mesh, plan)
    batches = pipeline.train_batches(method.train_streams, config.seed, 0, mesh)
    batch = next(batches)
    batches.close()
    step_fn = train.make_train_step(method, optimizer, schedule, plan)
    compiled, compile_s = train.compile_train_step(step_fn, state, batch, mesh)
    return CompiledStep(
        compiled=compiled,
        state=state,
        batch=batch,
        compile_s=compile_s,
        flops=flops_lib.compiled_flops(compiled),
        pretrained=plan.pretrained,
    )
