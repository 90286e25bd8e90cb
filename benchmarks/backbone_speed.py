"""CPU fine-tuning step speed of tljax's backbones against the same networks in PyTorch.

  pip install -r benchmarks/requirements.txt     # torch (CPU build), safetensors
  python benchmarks/backbone_speed.py            # ResNet-50 and ViT-S/16, 224x224, batch 16
  python benchmarks/backbone_speed.py --models=vit_s16 --steps=5 --rounds=5
  python benchmarks/backbone_speed.py --models=resnet18,vit_s16 --image_size=32 --batch=2 \
      --steps=1 --rounds=1 --warmup=1 --page=/tmp/backbone_speed.md   # smoke run

Both sides run one fine-tuning step on the same fixed batch of uint8 images: float conversion,
forward, softmax cross-entropy, backward, SGD with momentum 0.9, float32 throughout.

* tljax: the step `configs/pretrain.py` trains with ``model.name`` set to the backbone
  (benchmarks/finetune_step.py), compiled once; its params start from the PyTorch model's
  weights through ``transfer.init_from`` (`tljax.models.converters`), as a fine-tuning run
  from a torchvision or timm checkpoint does.
* PyTorch: the peers of benchmarks/torch_backbones.py in eager mode, ``torch.set_num_threads``
  set to the cores this process may use, which is the size of XLA's CPU thread pool too.

The networks: ResNet-50 (He et al. 2016; torchvision's ``torchvision/models/resnet.py`` in
pytorch/vision) with frozen BatchNorm, which is tljax's ``norm='affine'``, and ViT-S/16
(Dosovitskiy et al. 2021; huggingface/pytorch-image-models ``timm/models/vision_transformer.py``).
Before timing, a check on two images makes sure both sides compute the same network: the
converted params must give PyTorch's logits (to ``--tolerance`` of the largest logit), or the
benchmark stops.

Each round times ``--steps`` single steps of every model on each side, alternating which side
goes first; a round's figure is its median step. The table gives the median over ``--rounds``
rounds, every round's figure (a shared machine's bursts show) and the ratio to PyTorch of the
medians and of each side's best round (other jobs only ever slow a round down, so on a loaded
machine the best rounds are the closer estimate of the unloaded speeds). The page records
the load average when the benchmark started and when it ended (docs/results/backbone_speed.md,
--page; --page= for none). The accelerator counterpart (images/s and MFU, no PyTorch) is
benchmarks/finetune_throughput.py.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import finetune_step  # noqa: E402
import results_page  # noqa: E402
import step_timing  # noqa: E402
import torch_backbones  # noqa: E402
import torch_dann  # noqa: E402

from tljax import host  # noqa: E402
from tljax.models import classifiers  # noqa: E402

_MODELS = flags.DEFINE_list(
    "models", ["resnet50", "vit_s16"], f"Backbones to time, of {list(torch_backbones.MODELS)}."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side.")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per model, side and round.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps before a side's first round (1 before the later ones)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; the table gives their median and best.")
_TOLERANCE = flags.DEFINE_float(
    "tolerance", 1e-3, "Largest logit difference of the two sides, relative to the largest logit."
)
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("backbone_speed"), "Results page to write ('': none)."
)

FRAMEWORKS = ("tljax", "PyTorch")
CHECK_IMAGES = 2
# Rounds of one row that differ by more than this fraction of their median get NOISY_MARK
# (as benchmarks/speed_dann.py marks its rows).
NOISY_SPREAD = 0.5
NOISY_MARK = " †"
NOISY_NOTE = (
    f"†: the row's rounds differ by more than {NOISY_SPREAD:.0%} of their median (other jobs "
    "were using the machine); its median ratio is unreliable, its best-round ratio less so."
)


@dataclasses.dataclass
class Backbone:
    """One backbone on both sides, ready to time.

    Attributes:
      name: model.name.
      torch_model: the PyTorch network (training mode).
      optimizer: its SGD optimizer.
      step: tljax's compiled step, state and batch.
      images: the batch's uint8 images (N, H, W, 3), which PyTorch trains on too.
      labels: the batch's labels.
      logit_error: the check's largest logit difference relative to the largest logit.
      num_params: parameters of the network.
    """

    name: str
    torch_model: object
    optimizer: object
    step: finetune_step.CompiledStep
    images: np.ndarray
    labels: np.ndarray
    logit_error: float
    num_params: int


def check_flags() -> None:
    """Refuses flag values the benchmark cannot run, naming the flag."""
    unknown = [m for m in _MODELS.value if m not in torch_backbones.MODELS]
    if unknown:
        raise app.UsageError(
            f"--models: no PyTorch peer for {unknown}; use some of {list(torch_backbones.MODELS)}."
        )
    for flag in (_BATCH, _STEPS, _WARMUP, _ROUNDS):
        if flag.value < 1:
            raise app.UsageError(f"--{flag.name}={flag.value}: must be at least 1.")
    if jax.default_backend() != "cpu":
        raise app.UsageError(
            f"JAX runs on {jax.default_backend()}: this benchmark compares CPU steps; on an "
            "accelerator use benchmarks/finetune_throughput.py."
        )


def logit_error(torch_model, params, model_config, seed: int = 0) -> float:
    """How far tljax's logits from ``params`` are from the PyTorch model's, on random images.

    Args:
      torch_model: the PyTorch network.
      params: tljax params converted from its state_dict.
      model_config: the config's ``model`` block (the network tljax builds).
      seed: seed of the images.

    Returns:
      max |tljax - PyTorch| / max |PyTorch| over the logits of ``CHECK_IMAGES`` images.
    """
    side = model_config.image_size
    images = np.random.default_rng(seed).random((CHECK_IMAGES, *side, 3), np.float32)
    model = classifiers.make_classifier(model_config)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, images), np.float64)
    theirs = torch_backbones.logits(torch_model, images).astype(np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))


def check_same_network(name: str, error: float, tolerance: float) -> None:
    """Stops the benchmark when the two sides are not the same network.

    Args:
      name: model.name (for the message).
      error: ``logit_error``'s result.
      tolerance: the largest acceptable error.

    Raises:
      RuntimeError: ``error`` exceeds ``tolerance`` (or is NaN).
    """
    if not error <= tolerance:
        raise RuntimeError(
            f"{name}: tljax's logits from the converted PyTorch weights differ from PyTorch's by "
            f"{error:.2e} of the largest logit (--tolerance={tolerance:g}): the two sides would "
            "not time the same network."
        )


def prepare(name: str, workdir: str) -> Backbone:
    """Builds the PyTorch model, converts its weights into tljax's step and checks the logits.

    Args:
      name: model.name.
      workdir: where the PyTorch checkpoint is written.

    Returns:
      The backbone on both sides.
    """
    from safetensors.torch import save_file

    side = _IMAGE_SIZE.value
    torch_model = torch_backbones.build(name, finetune_step.NUM_CLASSES, side)
    path = os.path.join(workdir, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, path)
    config = finetune_step.finetune_config(name, side, _BATCH.value, init_from=path)
    step = finetune_step.compile_step(config)
    error = logit_error(torch_model, step.pretrained, config.model)
    check_same_network(name, error, _TOLERANCE.value)
    print(
        f"{name}: logits agree to {error:.1e} of the largest; compiled in {step.compile_s:.1f} s",
        flush=True,
    )
    return Backbone(
        name=name,
        torch_model=torch_model,
        optimizer=torch_backbones.make_optimizer(torch_model),
        step=step,
        images=np.asarray(step.batch["train_image"]),
        labels=np.asarray(step.batch["train_label"]),
        logit_error=error,
        num_params=torch_backbones.num_params(torch_model),
    )


def time_side(backbone: Backbone, framework: str, warmup: int) -> float:
    """Median ms of ``--steps`` single steps of one side (tljax's state is carried on).

    Args:
      backbone: the model on both sides.
      framework: one of ``FRAMEWORKS``.
      warmup: untimed steps first.

    Returns:
      Median milliseconds per step.
    """
    if framework == "PyTorch":
        ms, _ = torch_backbones.time_steps(
            backbone.torch_model,
            backbone.optimizer,
            backbone.images,
            backbone.labels,
            _STEPS.value,
            warmup,
        )
        return ms
    step = backbone.step
    ms, step.state = step_timing.median_step_ms(
        step.compiled, step.state, lambda: step.batch, _STEPS.value, warmup=warmup
    )
    return ms


def measure_round(backbones: list[Backbone], index: int) -> dict[tuple[str, str], float]:
    """One round: every backbone on both sides, the first side alternating between rounds.

    Args:
      backbones: the prepared backbones.
      index: the round's number from 0 (round 0 warms up with --warmup steps).

    Returns:
      (model name, framework) -> median ms/step of the round.
    """
    order = FRAMEWORKS if index % 2 == 0 else FRAMEWORKS[::-1]
    warmup = _WARMUP.value if index == 0 else 1
    measured = {}
    for backbone in backbones:
        for framework in order:
            ms = time_side(backbone, framework, warmup)
            measured[backbone.name, framework] = ms
            print(f"round {index}: {backbone.name} {framework} {ms:.0f} ms/step", flush=True)
    return measured


def summarize(backbones: list[Backbone], rounds: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (model, framework): median and best ms/step over rounds, every round's figure.

    Args:
      backbones: the prepared backbones.
      rounds: ``measure_round`` results.

    Returns:
      (model name, framework) -> {ms, best_ms, rounds, images_per_s, noisy}.
    """
    out = {}
    for backbone in backbones:
        for framework in FRAMEWORKS:
            values = [r[backbone.name, framework] for r in rounds]
            ms = statistics.median(values)
            out[backbone.name, framework] = dict(
                ms=ms,
                best_ms=min(values),
                rounds=values,
                images_per_s=_BATCH.value / ms * 1e3,
                noisy=len(values) > 1 and max(values) - min(values) > NOISY_SPREAD * ms,
            )
    return out


def speed_table(backbones: list[Backbone], results: dict) -> str:
    """The markdown table: per model and side, ms/step, images/s, rounds and the ratios.

    A ratio is tljax's images/s over PyTorch's for the same model (above 1, tljax is faster):
    of the medians over rounds, and of each side's best round. Rows whose rounds spread by
    more than NOISY_SPREAD of their median carry NOISY_MARK.
    """
    lines = [
        "| model | params | framework | ms/step (median) | images/s | rounds (ms/step) "
        "| images/s vs PyTorch (medians) | (best rounds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backbone in backbones:
        theirs = results[backbone.name, "PyTorch"]
        for framework in FRAMEWORKS:
            r = results[backbone.name, framework]
            rounds = " / ".join(format_ms(v) for v in r["rounds"])
            ms = format_ms(r["ms"]) + (NOISY_MARK if r["noisy"] else "")
            median_ratio = theirs["ms"] / r["ms"]
            best_ratio = theirs["best_ms"] / r["best_ms"]
            lines.append(
                f"| {backbone.name} | {backbone.num_params / 1e6:.1f}M "
                f"| {framework_label(framework)} | {ms} | {r['images_per_s']:.2f} "
                f"| {rounds} | {median_ratio:.2f}x | {best_ratio:.2f}x |"
            )
    if any(r["noisy"] for r in results.values()):
        lines += ["", NOISY_NOTE]
    return "\n".join(lines)


def format_ms(ms: float) -> str:
    """Milliseconds to the unit above 100 ms, to 0.1 ms below (tiny smoke runs)."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def check_table(backbones: list[Backbone]) -> str:
    """The markdown table of the same-network check and tljax's compile time."""
    lines = [
        f"| model | logits: max abs difference / max abs logit ({CHECK_IMAGES} images) "
        "| tljax compile s |",
        "|---|---|---|",
    ]
    for b in backbones:
        lines.append(f"| {b.name} | {b.logit_error:.1e} | {b.step.compile_s:.1f} |")
    return "\n".join(lines)


def framework_label(framework: str) -> str:
    """'tljax' or 'PyTorch <version> eager'."""
    if framework == "tljax":
        return "tljax"
    import torch

    return f"PyTorch {torch.__version__.split('+')[0]} eager"


def plot(backbones: list[Backbone], results: dict, path: str | None) -> str | None:
    """Bars of images/s per model and side, with each side's range over rounds.

    Args:
      backbones: the prepared backbones.
      results: ``summarize``'s output.
      path: the PNG to write, or None for none.

    Returns:
      ``path``.
    """
    if not path:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(backbones), 3.2))
    width = 0.38
    for offset, framework in zip((-width / 2, width / 2), FRAMEWORKS, strict=True):
        rates, low, high = [], [], []
        for b in backbones:
            r = results[b.name, framework]
            per_round = [_BATCH.value / ms * 1e3 for ms in r["rounds"]]
            rates.append(r["images_per_s"])
            low.append(r["images_per_s"] - min(per_round))
            high.append(max(per_round) - r["images_per_s"])
        xs = np.arange(len(backbones)) + offset
        ax.bar(xs, rates, width, yerr=[low, high], capsize=3, label=framework_label(framework))
    ax.set_xticks(np.arange(len(backbones)), [b.name for b in backbones])
    ax.set_ylabel("images/s (median of rounds)")
    ax.set_title(
        f"Fine-tuning step on CPU, {_IMAGE_SIZE.value}px, batch {_BATCH.value}", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ('unknown' where the OS gives none)."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv):
    del argv
    check_flags()
    import torch

    threads = torch_dann.default_threads()
    torch.set_num_threads(threads)
    # As train_and_evaluate does on CPU (tljax/host.py); the PyTorch side shares the process.
    retained = host.retain_freed_memory()
    start_load = load_average()
    finetune_step.use_random_images(_IMAGE_SIZE.value, _BATCH.value)
    with tempfile.TemporaryDirectory() as workdir:
        backbones = [prepare(name, workdir) for name in _MODELS.value]
    rounds = [measure_round(backbones, i) for i in range(_ROUNDS.value)]
    results = summarize(backbones, rounds)
    tables = speed_table(backbones, results) + "\n\n" + check_table(backbones)
    print("\n" + tables, flush=True)
    results_page.write_page(
        _PAGE.value,
        "Backbone fine-tuning step on CPU: tljax vs PyTorch",
        tables,
        figure=plot(backbones, results, results_page.figure_path(_PAGE.value)),
        settings=(
            f"One fine-tuning step on a fixed batch of {_BATCH.value} random "
            f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} images (uint8 to float, forward, "
            "cross-entropy, backward, SGD with momentum 0.9; float32), the same weights and "
            f"images on both sides, both on {threads} threads in one process; glibc keeps "
            f"freed memory for both (tljax/host.py): {retained}. tljax is the compiled "
            "configs/pretrain.py step (ResNets: frozen BatchNorm, norm='affine', the CPU "
            "convolution lowering 'auto'); PyTorch is eager (ResNets channels-last, BatchNorm "
            "in eval mode; ViTs with scaled_dot_product_attention, as timm). "
            f"{_ROUNDS.value} rounds of {_STEPS.value} timed steps per side and model after "
            f"{_WARMUP.value} untimed ones (1 in later rounds), the side that goes first "
            f"alternating; each round's figure is its median step. Load average (1, 5, 15 "
            f"min) when the benchmark started: {start_load}."
        ),
        notes=(
            "images/s vs PyTorch is tljax's images/s over PyTorch's on the same model (above "
            "1: tljax is faster), of the medians over rounds and of each side's best round. "
            "The check runs before timing: tljax's params are the PyTorch model's weights "
            "converted by transfer.init_from, and their logits on two images must agree, so "
            "both sides time the same network. On a loaded machine (a load average above the "
            "core count) the rounds spread, and not necessarily alike for both sides: the "
            "rounds interleave, so both meet the same load, but how much a step suffers from "
            "sharing the cores differs between the frameworks. Other jobs only slow a round "
            "down, so the best-round ratio is the closer estimate there; a rerun on a quiet "
            "machine gives the clean figures and rewrites this page."
        ),
    )


if __name__ == "__main__":
    app.run(main)
