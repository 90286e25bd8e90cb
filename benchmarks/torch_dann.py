"""PyTorch peer of tljax's DANN experiment (MNIST -> MNIST-M), for benchmarks only.

Ganin & Lempitsky (2015), "Unsupervised Domain Adaptation by Backpropagation", written the way a
competent PyTorch user would: eager mode, one forward pass of the feature extractor over the
concatenated source+target batch, channels-last memory format (faster for these small
convolutions with CPU oneDNN), ``torch.set_num_threads`` set to the machine's cores, and max-pool
applied before ReLU. ReLU is monotone, so ``relu(maxpool(x)) == maxpool(relu(x))`` exactly and
the gradients agree (up to ties between equal positive maxima, a measure-zero event); the ReLU
and its backward then touch 4x fewer elements, ~25% of a step on CPU. ``pool_before_relu=False``
(``--literal-order``) restores the paper's literal conv -> ReLU -> pool order.
torch.compile (inductor, CPU) was tried and was slower than eager here, so it is not used.

Initialisation: PyTorch defaults (``nn.Conv2d`` / ``nn.Linear`` use Kaiming-uniform with
``a=sqrt(5)`` for weights and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for biases), seeded with
``torch.manual_seed(seed)``. The paper does not specify an initialisation, so tljax may differ
here; accuracies are comparable in distribution, not bit-for-bit.

Usage::

    python benchmarks/torch_dann.py --mode step --batch 128 64
    python benchmarks/torch_dann.py --mode run --steps 3000 --seeds 0 1 2
    python benchmarks/torch_dann.py --mode run --synthetic   # no dataset needed

torch is not a tljax dependency; install it from ``benchmarks/requirements.txt``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
BASE_LR = 0.01
MOMENTUM = 0.9
EVAL_BATCH = 1000


def default_threads() -> int:
    """Number of CPU cores this process may run on.

    Returns:
        The size of the CPU affinity mask (respects cgroup/taskset limits, unlike
        ``os.cpu_count``), falling back to ``os.cpu_count()``.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class GradReverse(torch.autograd.Function):
    """Gradient reversal layer: identity forward, ``-lambda * grad`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:
        """Identity.

        Args:
            ctx: Autograd context.
            x: Features.
            lambd: Reversal coefficient used by ``backward``.

        Returns:
            ``x`` (as a view).
        """
        ctx.lambd = lambd
        # view_as, not x itself: autograd needs a distinct output to attach this backward to.
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Reverses and scales the gradient.

        Args:
            ctx: Autograd context.
            grad_output: Gradient w.r.t. the output.

        Returns:
            ``(-lambda * grad_output, None)``; lambda is a constant, so it gets no gradient.
        """
        return grad_output * -ctx.lambd, None


class DANN(nn.Module):
    """The MNIST -> MNIST-M DANN network of Ganin & Lempitsky (2015).

    Args:
        adversarial: Build the domain head. ``False`` gives the source-only baseline, which
            then has no domain parameters at all.
        pool_before_relu: Pool then ReLU (same function, cheaper); False for the literal
            conv -> ReLU -> pool order.
    """

    def __init__(self, adversarial: bool = True, pool_before_relu: bool = True) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            conv, relu, pool = nn.Conv2d(c_in, c_out, kernel_size=5), nn.ReLU(True), nn.MaxPool2d(2)
            return [conv, pool, relu] if pool_before_relu else [conv, relu, pool]

        # Flatten gives 48 x 4 x 4 = 768 features.
        self.features = nn.Sequential(*block(3, 32), *block(32, 48), nn.Flatten())
        self.label_head = nn.Sequential(
            nn.Linear(768, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, NUM_CLASSES),
        )
        self.domain_head = (
            nn.Sequential(nn.Linear(768, 100), nn.ReLU(inplace=True), nn.Linear(100, 1))
            if adversarial
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: Images, float (N, 3, 28, 28) in [0, 1].

        Returns:
            Logits (N, 10).
        """
        return self.label_head(self.features(x))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """Converts a uint8 NHWC batch into the network's float NCHW input.

    Args:
        images: uint8 (N, 28, 28, C) with C in {1, 3}.

    Returns:
        float32 (N, 3, 28, 28) in [0, 1], channels-last strided. Permuting NHWC to NCHW is
        already a channels-last view, so no transpose copy is made; grayscale is broadcast to 3
        channels before the single copy that the dtype conversion makes anyway.
    """
    x = images.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    out = torch.empty(x.shape, dtype=torch.float32, memory_format=torch.channels_last)
    return out.copy_(x).mul_(1.0 / 255.0)


def schedule(p: float) -> tuple[float, float]:
    """DANN's annealing schedules.

    Args:
        p: Training progress in [0, 1].

    Returns:
        ``(lr_p, lambda_p)`` with ``lr_p = 0.01 / (1 + 10 p)^0.75`` and
        ``lambda_p = 2 / (1 + exp(-10 p)) - 1``.
    """
    lr = BASE_LR / (1.0 + 10.0 * p) ** 0.75
    lambd = 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
    return lr, lambd


def make_model(
    adversarial: bool, seed: int, pool_before_relu: bool = True
) -> tuple[DANN, torch.optim.SGD]:
    """Builds the seeded network and its SGD-with-momentum optimiser.

    Args:
        adversarial: Whether to build the domain head.
        seed: Seed for the PyTorch default initialisation.
        pool_before_relu: See ``DANN``.

    Returns:
        ``(model, optimizer)``; the model is in channels-last format.
    """
    torch.manual_seed(seed)
    model = DANN(adversarial, pool_before_relu).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    return model, opt


def train_step(
    model: DANN,
    opt: torch.optim.SGD,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xt: torch.Tensor | None,
    domain_labels: torch.Tensor | None,
    lr: float,
    lambd: float,
) -> torch.Tensor:
    """One SGD step of DANN (or of the source-only baseline when ``xt`` is None).

    Args:
        model: The network.
        opt: Its optimiser.
        xs: Source images, float (B, 3, 28, 28).
        ys: Source labels, int64 (B,).
        xt: Target images, float (B, 3, 28, 28), or None for source-only.
        domain_labels: float (2B,) with B zeros (source) then B ones (target); None for
            source-only.
        lr: Learning rate for this step.
        lambd: Gradient-reversal coefficient for this step.

    Returns:
        The (detached) total loss.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    b = xs.shape[0]
    if xt is None:
        loss = F.cross_entropy(model(xs), ys)
    else:
        # One feature pass over both halves: half the convolution calls of two separate passes.
        feats = model.features(torch.cat([xs, xt]))
        loss = F.cross_entropy(model.label_head(feats[:b]), ys)
        dom_logits = model.domain_head(GradReverse.apply(feats, lambd)).squeeze(1)
        loss = loss + F.binary_cross_entropy_with_logits(dom_logits, domain_labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _domain_labels(b: int) -> torch.Tensor:
    """Domain targets for a concatenated batch: B zeros (source), then B ones (target)."""
    return torch.cat([torch.zeros(b), torch.ones(b)])


def time_train_step(
    batch_per_domain: int = 128,
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    seed: int = 0,
    pool_before_relu: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    """Times the pure compute cost of one DANN step on a fixed in-memory batch.

    Args:
        batch_per_domain: B; each step sees B source + B target images.
        warmup: Untimed steps first (oneDNN primitive creation, allocator warm-up).
        iters: Timed steps.
        threads: Intra-op threads; None means all cores of this machine.
        seed: Seed for the data and the initialisation.
        pool_before_relu: See ``DANN``.
        device: ``'cpu'`` or a CUDA device (``'cuda'``); each timed step then ends with
            ``torch.cuda.synchronize()``, so it counts the GPU work and not just its launch.

    Returns:
        ``{"ms_per_step": median ms, "images_per_s": 2 * B * 1000 / ms, "threads": n}``.
    """
    n_threads = threads or default_threads()
    torch.set_num_threads(n_threads)
    rng = np.random.default_rng(seed)
    b = batch_per_domain
    xs = to_input(torch.from_numpy(rng.integers(0, 256, (b, 28, 28, 1), dtype=np.uint8)))
    xt = to_input(torch.from_numpy(rng.integers(0, 256, (b, 28, 28, 3), dtype=np.uint8)))
    ys = torch.from_numpy(rng.integers(0, NUM_CLASSES, b)).long()
    dl = _domain_labels(b)
    xs, xt, ys, dl = (t.to(device) for t in (xs, xt, ys, dl))
    model, opt = make_model(True, seed, pool_before_relu)
    model.to(device)
    wait = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    times = []
    for i in range(warmup + iters):
        lr, lambd = schedule(i / (warmup + iters))
        t0 = time.perf_counter()
        train_step(model, opt, xs, ys, xt, dl, lr, lambd)
        wait()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000.0 * statistics.median(times)
    return {"ms_per_step": ms, "images_per_s": 2 * b * 1000.0 / ms, "threads": n_threads}


def _split(data: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Accepts ``(images, labels)``, ``{"image", "label"}`` (``load_split``'s output) or images."""
    if isinstance(data, dict):
        return data["image"], data.get("label")
    if isinstance(data, tuple | list):
        return data[0], data[1]
    return data, None


@torch.no_grad()
def evaluate(model: DANN, images: np.ndarray, labels: np.ndarray, device: str = "cpu") -> float:
    """Classification accuracy.

    Args:
        model: The network (on ``device``).
        images: uint8 (N, 28, 28, C), C in {1, 3}.
        labels: int (N,).
        device: where the model is.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    model.eval()
    correct = 0
    for i in range(0, len(images), EVAL_BATCH):
        # torch.tensor copies, so read-only input arrays are fine.
        batch = torch.tensor(images[i : i + EVAL_BATCH]).to(device)
        pred = model(to_input(batch)).argmax(1).cpu()
        correct += int((pred.numpy() == labels[i : i + EVAL_BATCH]).sum())
    model.train()
    return correct / len(images)


class EpochSampler:
    """Draws batches without replacement within an epoch, reshuffling each epoch.

    Args:
        n: Dataset size.
        batch: Batch size.
        rng: Seeded numpy Generator (shared across domains so one seed fixes the run).
    """

    def __init__(self, n: int, batch: int, rng: np.random.Generator) -> None:
        self.n, self.batch, self.rng = n, batch, rng
        self.perm, self.pos = rng.permutation(n), 0

    def next(self) -> np.ndarray:
        """Returns the indices of the next batch (drops an epoch's ragged tail)."""
        if self.pos + self.batch > self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def train_dann(
    source_train: Any,
    target_train: Any,
    target_test: Any,
    steps: int = 3000,
    batch_per_domain: int = 64,
    adversarial: bool = True,
    seed: int = 0,
    threads: int | None = None,
    source_test: Any = None,
    pool_before_relu: bool = True,
    device: str = "cpu",
) -> dict[str, float]:
    """Trains DANN (or the source-only baseline) and evaluates it on the target test set.

    Args:
        source_train: Labelled source data: ``(images, labels)`` or ``{"image", "label"}`` with
            uint8 images (N, 28, 28, 1) and int labels (N,).
        target_train: Unlabelled target images, uint8 (M, 28, 28, 3) (or a tuple/dict as above;
            labels are ignored).
        target_test: Labelled target data for evaluation, same forms as ``source_train``.
        steps: SGD steps; ``p = step / steps`` drives the lr and lambda schedules.
        batch_per_domain: B source + B target images per step (target unused if source-only).
        adversarial: False trains the source-only baseline; the domain branch is then not
            computed at all.
        seed: Seeds batch sampling (numpy Generator) and initialisation (torch).
        threads: Intra-op threads; None means all cores of this machine.
        source_test: Optional labelled source data for ``source_accuracy``.
        pool_before_relu: See ``DANN``.
        device: ``'cpu'`` or a CUDA device; batches are sampled on the host and copied there
            as uint8, as a GPU input pipeline would.

    Returns:
        ``{"target_accuracy", "wall_s", "ms_per_step"}`` plus ``"source_accuracy"`` when
        ``source_test`` is given. ``wall_s`` is the training loop only, including batch
        sampling and host-to-tensor conversion, excluding evaluation.
    """
    torch.set_num_threads(threads or default_threads())
    xs_all, ys_all = _split(source_train)
    xt_all, _ = _split(target_train)
    # Datasets stay uint8 numpy on the host (load_split's arrays are read-only, which torch
    # cannot wrap without a warning); each step gathers a fresh batch array and converts only it,
    # as a DataLoader-free in-memory pipeline would.
    ys_all = np.asarray(ys_all, dtype=np.int64)
    b = batch_per_domain
    rng = np.random.default_rng(seed)
    src_sampler = EpochSampler(len(xs_all), b, rng)
    tgt_sampler = EpochSampler(len(xt_all), b, rng) if adversarial else None
    dl = _domain_labels(b).to(device) if adversarial else None
    model, opt = make_model(adversarial, seed, pool_before_relu)
    model.to(device)
    on_device = lambda images: to_input(torch.from_numpy(images).to(device))

    t0 = time.perf_counter()
    for step in range(steps):
        lr, lambd = schedule(step / steps)
        si = src_sampler.next()
        xs, ys = on_device(xs_all[si]), torch.from_numpy(ys_all[si]).to(device)
        xt = on_device(xt_all[tgt_sampler.next()]) if adversarial else None
        loss = train_step(model, opt, xs, ys, xt, dl, lr, lambd)
    # Reading the last loss waits for the device (eager CPU ops are synchronous anyway).
    if steps:
        loss.item()
    wall_s = time.perf_counter() - t0

    xtt, ytt = _split(target_test)
    out = {
        "target_accuracy": evaluate(model, xtt, ytt, device),
        "wall_s": wall_s,
        "ms_per_step": 1000.0 * wall_s / max(steps, 1),
    }
    if source_test is not None:
        out["source_accuracy"] = evaluate(model, *_split(source_test), device)
    return out


def synthetic_data(
    n_train: int = 60000, n_test: int = 10000, seed: int = 0
) -> tuple[tuple, np.ndarray, tuple, tuple]:
    """Random uint8 data with the shapes of MNIST / MNIST-M (for timing without a dataset).

    Args:
        n_train: Training images per domain.
        n_test: Test images per domain.
        seed: numpy seed.

    Returns:
        ``(source_train, target_train, source_test, target_test)`` in the forms ``train_dann``
        takes. Accuracies on it are chance level by construction.
    """
    rng = np.random.default_rng(seed)
    img = lambda n, c: rng.integers(0, 256, (n, 28, 28, c), dtype=np.uint8)
    lab = lambda n: rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return (
        (img(n_train, 1), lab(n_train)),
        img(n_train, 3),
        (img(n_test, 1), lab(n_test)),
        (img(n_test, 3), lab(n_test)),
    )


def load_embedded_digits(data_dir: str | None = None) -> tuple[dict, dict, dict, dict]:
    """Loads MNIST -> MNIST-M through tljax's loader.

    Args:
        data_dir: Passed to ``tljax.data.load_split``.

    Returns:
        ``(source_train, target_train, source_test, target_test)`` as ``load_split`` dicts
        (benchmarks/speed_dann.py unpacks this order).
    """
    try:
        import tljax  # noqa: F401
    except ModuleNotFoundError:
        # Run as a script from an uninstalled checkout: sys.path has benchmarks/, not the root.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tljax.data import load_split

    return (
        load_split("embedded_digits/mnist", "train", data_dir=data_dir),
        load_split("embedded_digits/mnist_m", "train", data_dir=data_dir),
        load_split("embedded_digits/mnist", "test", data_dir=data_dir),
        load_split("embedded_digits/mnist_m", "test", data_dir=data_dir),
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; prints a markdown table.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["step", "run"], default="step")
    parser.add_argument(
        "--batch", type=int, nargs="+", help="per-domain batch(es); default 128 64 (step), 64 (run)"
    )
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps (run mode)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (step mode)")
    parser.add_argument("--iters", type=int, default=50, help="timed steps (step mode)")
    parser.add_argument(
        "--methods", nargs="+", choices=["source_only", "dann"], default=["source_only", "dann"]
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--synthetic", action="store_true", help="random data (run mode)")
    parser.add_argument(
        "--literal-order", action="store_true", help="conv -> ReLU -> pool instead of pool first"
    )
    args = parser.parse_args(argv)
    threads = args.threads or default_threads()
    pool_first = not args.literal_order
    order = "conv-ReLU-pool" if args.literal_order else "conv-pool-ReLU"
    print(f"torch {torch.__version__}, threads={threads}, {order}, channels-last\n")

    if args.mode == "step":
        print("| B per domain | threads | seed | ms/step (median) | images/s |")
        print("|---:|---:|---:|---:|---:|")
        for b in args.batch or [128, 64]:
            for seed in args.seeds:
                r = time_train_step(b, args.warmup, args.iters, threads, seed, pool_first)
                print(
                    f"| {b} | {threads} | {seed} | {r['ms_per_step']:.1f} | "
                    f"{r['images_per_s']:.0f} |"
                )
        return

    data = synthetic_data() if args.synthetic else load_embedded_digits(args.data_dir)
    print(f"data: {'synthetic' if args.synthetic else 'embedded_digits mnist -> mnist_m'}\n")
    print("| method | B | steps | seed | wall s | ms/step | source acc | target acc |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch or [64]:
        for method in args.methods:
            for seed in args.seeds:
                r = train_dann(
                    data[0],
                    data[1],
                    data[3],
                    steps=args.steps,
                    batch_per_domain=b,
                    adversarial=method == "dann",
                    seed=seed,
                    threads=threads,
                    source_test=data[2],
                    pool_before_relu=pool_first,
                )
                print(
                    f"| {method} | {b} | {args.steps} | {seed} | {r['wall_s']:.1f} | "
                    f"{r['ms_per_step']:.2f} | {r['source_accuracy']:.4f} | "
                    f"{r['target_accuracy']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
