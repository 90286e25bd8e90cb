"""Fine-tuning throughput and model-FLOP utilisation of tljax's train step, per backbone.

  python benchmarks/finetune_throughput.py             # ResNet-50 and ViT-B/16, 224x224, batch 64
  python benchmarks/finetune_throughput.py --models=vit_b16 --dtypes=float32,bfloat16 --batch=128
  python benchmarks/finetune_throughput.py --models=resnet50,vit_b16 --image_size=32 --batch=2 \
      --steps=1 --warmup=1 --dtypes=float32 --page=   # CPU smoke run: checks the command

The step is the one `configs/pretrain.py` / `configs/finetune.py` train with `model.name` set
to a backbone (benchmarks/finetune_step.py): a ResNet (He et al. 2016, torchvision's topology;
frozen BatchNorm, `norm=affine`, as pretrained checkpoints convert) or a ViT (ViT-S/16,
ViT-B/16: Dosovitskiy et al. 2021, timm's topology, tljax/models/vit.py), SGD with momentum,
a new 10-class head. Inputs are random images of the given size (no dataset needed, no
TensorFlow), so the figure is the step's compute and nothing else.

Prints a markdown table: ms/step (median of single steps), images/s, XLA's FLOP count of the
compiled step, achieved TFLOP/s and, where the device's peak is known (or --peak_tflops is
given), the model-FLOP utilisation against the dense bf16 peak, and writes it to
docs/results/finetune_throughput.md (--page; --page= for none). The CPU comparison of the same
steps with PyTorch is benchmarks/backbone_speed.py.
"""

import os
import sys

import jax
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import finetune_step  # noqa: E402
import results_page  # noqa: E402
import step_timing  # noqa: E402

from tljax import flops as flops_lib  # noqa: E402
from tljax.models import classifiers  # noqa: E402

_MODELS = flags.DEFINE_list(
    "models", ["resnet50", "vit_b16"], "model.name values to time (resnet18/34/50, vit_s16/b16)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before them (at least 1).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values to time.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak of the device, TFLOP/s.")
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("finetune_throughput"), "Results page to write ('': none)."
)

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), keyed by jax device_kind.
KNOWN_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0}


def check_flags() -> None:
    """Refuses unknown model names and step counts that time nothing, naming the flag."""
    unknown = [m for m in _MODELS.value if m not in classifiers.CLASSIFIERS or m == "vit"]
    if unknown:
        raise app.UsageError(
            f"--models: unknown {unknown}; use names of tljax.models.classifiers.CLASSIFIERS "
            "with a fixed size (e.g. resnet50, vit_s16, vit_b16)."
        )
    if _STEPS.value < 1 or _WARMUP.value < 1:
        raise app.UsageError(f"--steps={_STEPS.value}, --warmup={_WARMUP.value}: both >= 1.")


def time_step(model: str, dtype: str) -> dict[str, float]:
    """ms/step (median of single steps), XLA's FLOPs per step and compile seconds.

    Args:
      model: model.name.
      dtype: model.dtype.

    Returns:
      {ms, flops, compile_s}.
    """
    config = finetune_step.finetune_config(model, _IMAGE_SIZE.value, _BATCH.value, dtype)
    step = finetune_step.compile_step(config)
    ms, _ = step_timing.median_step_ms(
        step.compiled, step.state, lambda: step.batch, _STEPS.value, warmup=_WARMUP.value
    )
    return dict(ms=ms, flops=step.flops, compile_s=step.compile_s)


def table_row(model: str, dtype: str, r: dict[str, float], peak: float | None) -> str:
    """One markdown row of the table from ``time_step``'s result."""
    gflops = flops_lib.gflops_per_s(r["flops"], r["ms"])
    tflops = None if gflops is None else gflops / 1e3
    mfu = flops_lib.percent_of(tflops, peak)
    gflop = None if r["flops"] is None else r["flops"] / 1e9
    return (
        f"| {model} | {dtype} | {r['ms']:.1f} | {_BATCH.value / r['ms'] * 1e3:.0f} "
        f"| {flops_lib.fmt(gflop)} | {flops_lib.fmt(tflops, '.2f')} "
        f"| {flops_lib.fmt(mfu, '.1f', '%')} | {r['compile_s']:.1f} |"
    )


def main(argv):
    del argv
    check_flags()
    finetune_step.use_random_images(_IMAGE_SIZE.value, _BATCH.value)
    device = jax.devices()[0]
    peak = _PEAK.value or KNOWN_PEAK_TFLOPS.get(device.device_kind)
    header = (
        f"Fine-tuning step, {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, batch {_BATCH.value}, "
        f"{jax.device_count()} x {device.device_kind}; bf16 peak: "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}"
    )
    print(f"\n{header}\n")
    lines = [
        "| model.name | model.dtype | ms/step | images/s | GFLOP/step (XLA) | TFLOP/s | MFU "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for model in _MODELS.value:
        for dtype in _DTYPES.value:
            lines.append(table_row(model, dtype, time_step(model, dtype), peak))
            print(lines[-1], flush=True)
    results_page.write_page(
        _PAGE.value,
        "Backbone fine-tuning throughput",
        header + ":\n\n" + "\n".join(lines),
        settings=(
            "The configs/pretrain.py train step with each backbone (ResNets with frozen "
            "BatchNorm; ViTs with timm's topology), SGD with momentum and a new 10-class head, "
            f"on random images, so the figure is the step's compute only; median of "
            f"{_STEPS.value} single steps after {_WARMUP.value} untimed ones. MFU is XLA's FLOP "
            "count of the compiled step per second against the device's dense bf16 peak, for "
            "both dtypes. float32 rows use JAX's default matmul precision, which may compute "
            "float32 matmuls and convolutions with TF32 tensor cores on recent NVIDIA GPUs "
            "(JAX documentation, 'Matmul precision')."
        ),
    )


if __name__ == "__main__":
    app.run(main)
