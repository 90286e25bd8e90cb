"""ResNet fine-tuning throughput and model-FLOP utilisation of tljax's train step.

  python benchmarks/resnet_throughput.py                       # ResNet-50, 224x224, batch 64
  python benchmarks/resnet_throughput.py --dtypes=float32,bfloat16 --batch=128
  python benchmarks/resnet_throughput.py --image_size=64 --batch=4 --steps=3   # CPU smoke run

The step is the one `configs/pretrain.py` / `configs/finetune.py` train with `model.name` set
to a ResNet: frozen BatchNorm (`norm=affine`, as pretrained checkpoints convert), SGD with
momentum, a new 10-class head. Inputs are random images of the given size (no dataset
needed, no TensorFlow), so the figure is the step's compute and nothing else.

Prints a markdown table: ms/step (median of single steps), images/s, XLA's FLOP count of the
compiled step, achieved TFLOP/s and, where the device's peak is known (or --peak_tflops is
given), the model-FLOP utilisation against the dense bf16 peak, and writes it to
docs/results/resnet_throughput.md (--page; --page= for none).
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402
import step_timing  # noqa: E402

import tljax.data  # noqa: E402
from configs import pretrain  # noqa: E402
from tljax import flops as flops_lib  # noqa: E402
from tljax import methods, optim, parallel, train  # noqa: E402
from tljax.data import pipeline  # noqa: E402

_MODEL = flags.DEFINE_string("model", "resnet50", "resnet18, resnet34 or resnet50.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values to time.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak of the device, TFLOP/s.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("resnet_throughput"), "Results page to write ('': none)."
)

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), keyed by jax device_kind.
KNOWN_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0}
NUM_CLASSES = 10


def random_split(name: str, split: str, data_dir=None) -> dict[str, np.ndarray]:
    """Random RGB images of --image_size, in `load_split`'s layout."""
    del name, data_dir
    n = 2 * _BATCH.value if split == "train" else _BATCH.value
    side = _IMAGE_SIZE.value
    return step_timing.random_labelled_images(n, (side, side, 3), NUM_CLASSES)


def finetune_config(dtype: str):
    """configs/pretrain.py with a ResNet of --model on --image_size inputs in `dtype`."""
    config = pretrain.get_config()
    config.model.name = _MODEL.value
    config.model.image_size = (_IMAGE_SIZE.value, _IMAGE_SIZE.value)
    config.model.channels = 3
    config.model.num_classes = NUM_CLASSES
    config.model.dtype = dtype
    config.train.batch_size = _BATCH.value
    return config


def time_step(dtype: str) -> dict[str, float]:
    """ms/step (median of single steps), XLA's FLOPs per step and compile seconds."""
    config = finetune_config(dtype)
    mesh = parallel.make_data_mesh()
    method = methods.build(config)
    schedule = optim.make_schedule(config.lr, config.train.steps)
    optimizer = optim.make_optimizer(config.optimizer, schedule)
    state = train.create_train_state(method, optimizer, 0, mesh)
    batches = pipeline.train_batches(method.train_streams, 0, 0, mesh)
    batch = next(batches)
    batches.close()
    step_fn = train.make_train_step(method, optimizer, schedule)
    compiled, compile_s = train.compile_train_step(step_fn, state, batch, mesh)
    flops = flops_lib.compiled_flops(compiled)
    ms, _ = step_timing.median_step_ms(compiled, state, lambda: batch, _STEPS.value, warmup=3)
    return dict(ms=ms, flops=flops, compile_s=compile_s)


def main(argv):
    del argv
    # For the whole process: no dataset, so no TensorFlow (see tljax/data/__init__.py).
    tljax.data.load_split = random_split
    device = jax.devices()[0]
    peak = _PEAK.value or KNOWN_PEAK_TFLOPS.get(device.device_kind)
    header = (
        f"{_MODEL.value} fine-tuning step, {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, batch "
        f"{_BATCH.value}, {jax.device_count()} x {device.device_kind}; bf16 peak: "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}"
    )
    print(f"\n{header}\n")
    lines = [
        "| model.dtype | ms/step | images/s | GFLOP/step (XLA) | TFLOP/s | MFU | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for dtype in _DTYPES.value:
        r = time_step(dtype)
        gflops = flops_lib.gflops_per_s(r["flops"], r["ms"])
        tflops = None if gflops is None else gflops / 1e3
        mfu = flops_lib.percent_of(tflops, peak)
        gflop = None if r["flops"] is None else r["flops"] / 1e9
        lines.append(
            f"| {dtype} | {r['ms']:.1f} | {_BATCH.value / r['ms'] * 1e3:.0f} "
            f"| {flops_lib.fmt(gflop)} | {flops_lib.fmt(tflops, '.2f')} "
            f"| {flops_lib.fmt(mfu, '.1f', '%')} | {r['compile_s']:.1f} |"
        )
        print(lines[-1], flush=True)
    results_page.write_page(
        _PAGE.value,
        f"{_MODEL.value} fine-tuning throughput",
        header + ":\n\n" + "\n".join(lines),
        settings=(
            "The configs/pretrain.py train step with a ResNet (frozen BatchNorm, SGD with "
            "momentum, a new 10-class head) on random images, so the figure is the step's "
            f"compute only; median of {_STEPS.value} single steps. MFU is XLA's FLOP count of "
            "the compiled step per second against the device's dense bf16 peak."
        ),
    )


if __name__ == "__main__":
    app.run(main)
