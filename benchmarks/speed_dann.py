"""Speed benchmark: the DANN train step in tljax (each conv lowering) vs PyTorch.

  pip install -r benchmarks/requirements.txt      # torch==2.13.0 (CPU build)
  python benchmarks/speed_dann.py                  # step table (a few minutes)
  python benchmarks/speed_dann.py --full_run       # + whole 3000-step runs, tljax vs PyTorch
  python benchmarks/speed_dann.py --steps=5 --batches=64 --impls=auto --full_run --seeds=0,1,2
  python benchmarks/speed_dann.py --impls=auto --conv_operands=float32,bfloat16   # bf16 option
  python benchmarks/speed_dann.py --rounds=3   # each row 3x, interleaved, medians (noisy hosts)
  python benchmarks/speed_dann.py --synthetic --impls=xla --conv_operands=float32,bfloat16
      # on a GPU: random digits (no tfds/TensorFlow needed), PyTorch on CUDA
  python benchmarks/speed_dann.py --data_dir=ARRAYS --impls=xla --dtypes=float32,bfloat16 \
      --full_run --seeds=0,1,2   # on a GPU: splits exported by tljax.data.export, no tfds

Lowerings: xla (lax.conv), im2col, winograd (every stride-1 conv), auto (what configs use on
CPU: Winograd where it is faster, im2col elsewhere; see tljax/models/layers.py).

Prints markdown tables: ms/step (median of single steps, for both frameworks) and images/s
for B source + B target images on a fixed in-memory batch (pure compute) and through the
real input pipeline,
achieved GFLOP/s (XLA's FLOP count of the compiled step) against a measured
fp32 matmul rate, compile time, and the ratio to PyTorch on the same machine.
"""

import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import step_timing  # noqa: E402

import tljax.data  # noqa: E402
from configs import dann as dann_config  # noqa: E402
from tljax import host, methods, optim, parallel, train  # noqa: E402
from tljax.data import pipeline  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["128", "64"], "Images per domain per step.")
_IMPLS = flags.DEFINE_list(
    "impls", ["xla", "im2col", "winograd", "auto"], "Conv lowerings (xla first: FLOPs)."
)
_OPERANDS = flags.DEFINE_list(
    "conv_operands", ["float32"], "Conv matmul operand dtypes (model.conv_operands) to time."
)
_DTYPES = flags.DEFINE_list(
    "dtypes", ["float32"], "Computation dtypes (model.dtype; params stay fp32) to time."
)
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per measurement.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Measure every row this many times, interleaved; print the medians."
)
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch peer (needs torch).")
_FULL_RUN = flags.DEFINE_bool("full_run", False, "Also time whole default DANN runs.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds of the whole runs (each framework).")
_RUN_STEPS = flags.DEFINE_integer("run_steps", None, "Steps of the whole runs (default: config).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data_dir, or a directory of splits from python -m tljax.data.export."
)
_SYNTHETIC = flags.DEFINE_bool(
    "synthetic",
    False,
    "Step table on random digits of the embedded splits' shapes, without tfds or TensorFlow "
    "(e.g. on an accelerator image that lacks them).",
)


def matmul_gflops(n: int = 1024, reps: int = 20, dtype=jnp.float32) -> float:
    """Measured matmul rate of the default device, GFLOP/s, fp32 accumulation and output.

    Args:
        n: square matrix size.
        reps: timed repetitions (median).
        dtype: operand dtype (bfloat16 runs on AMX/tensor cores where present).

    Returns:
        GFLOP/s.
    """
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def synthetic_split(name: str, split: str, data_dir=None) -> dict[str, np.ndarray]:
    """Random digits shaped like the embedded split ``tljax.data.load_split(name, split)``:
    4000 train or 1000 test images, 28x28, grey for MNIST and colour for MNIST-M."""
    del data_dir
    channels = 3 if name.endswith("mnist_m") else 1
    n = 4000 if split == "train" else 1000
    return step_timing.random_labelled_images(n, (28, 28, channels), num_classes=10)


def precisions() -> list[tuple[str, str]]:
    """The (model.conv_operands, model.dtype) pairs to time: --conv_operands x --dtypes."""
    return list(itertools.product(_OPERANDS.value, _DTYPES.value))


def dann_setup(impl: str, batch: int, operands: str = "float32", dtype: str = "float32"):
    """Config, method, optimizer and mesh of configs/dann.py with `impl`, `batch`, `operands`
    (model.conv_operands) and `dtype` (model.dtype)."""
    config = dann_config.get_config()
    config.model.conv_impl = impl
    config.model.conv_operands = operands
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.data.data_dir = _DATA_DIR.value
    mesh = parallel.make_data_mesh()
    method = methods.build(config)
    schedule = optim.make_schedule(config.lr, config.train.steps)
    optimizer = optim.make_optimizer(config.optimizer, schedule)
    step_fn = train.make_train_step(method, optimizer, schedule)
    return config, method, optimizer, step_fn, mesh


def time_tljax(impl: str, batch: int, operands: str = "float32", dtype: str = "float32") -> dict:
    """ms/step (median of single steps) of the compiled DANN step, fixed batch and real pipeline.

    Args:
        impl: conv lowering (a key of layers.CONV_IMPLS).
        batch: images per domain.
        operands: conv matmul operand dtype (model.conv_operands).
        dtype: computation dtype (model.dtype).

    Returns:
        Dict with ms_fixed, ms_pipeline, gflop (XLA's count for this lowering), compile_s.
    """
    config, method, optimizer, step_fn, mesh = dann_setup(impl, batch, operands, dtype)
    state = train.create_train_state(method, optimizer, 0, mesh)
    batches = pipeline.train_batches(method.train_streams, 0, 0, mesh)
    fixed = next(batches)
    compiled, compile_s = train.compile_train_step(step_fn, state, fixed, mesh)
    flops = compiled.cost_analysis().get("flops", float("nan"))

    def timed(next_batch):
        nonlocal state
        ms, state = step_timing.median_step_ms(compiled, state, next_batch, _STEPS.value)
        return ms

    ms_fixed = timed(lambda: fixed)
    ms_pipeline = timed(lambda: next(batches))
    batches.close()
    return dict(ms_fixed=ms_fixed, ms_pipeline=ms_pipeline, gflop=flops / 1e9, compile_s=compile_s)


def measure_round(batch: int, settings: list[tuple[str, str, str]]) -> dict:
    """One measurement of PyTorch (if timed) and of every (impl, operands, dtype) setting.

    Args:
        batch: images per domain.
        settings: (conv lowering, conv operand dtype, computation dtype) triples.

    Returns:
        {'torch': ms/step} (when timed) and {setting: time_tljax's dict}.
    """
    measured = {}
    if _TORCH.value:
        import torch_dann

        measured["torch"] = torch_dann.time_train_step(
            batch, iters=_STEPS.value, device=torch_device()
        )["ms_per_step"]
    for impl, operands, dtype in settings:
        measured[impl, operands, dtype] = time_tljax(impl, batch, operands, dtype)
    return measured


def torch_device() -> str:
    """Where the PyTorch peer runs: the GPU when JAX runs on one, else the CPU."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_label() -> str:
    import torch

    return f"PyTorch {torch.__version__.split('+')[0]}"


def _median_fields(results: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def standard_gflop(batch: int) -> float:
    """XLA's FLOP count (GFLOP) of the DANN step with the standard lowering (compiled, not run)."""
    _, method, optimizer, step_fn, mesh = dann_setup("xla", batch)
    state = train.create_train_state(method, optimizer, 0, mesh)
    batches = pipeline.train_batches(method.train_streams, 0, 0, mesh)
    compiled, _ = train.compile_train_step(step_fn, state, next(batches), mesh)
    batches.close()
    return compiled.cost_analysis()["flops"] / 1e9


def _tljax_label(label: str, operands: str, dtype: str) -> str:
    if operands != "float32":
        label += f", {operands} conv operands"
    return label if dtype == "float32" else f"{label}, {dtype} compute"


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _isolated(fn, *args):
    """``fn(*args)`` in a fresh process: each whole run gets the machine as a user's run would,
    untouched by the other framework's thread pools and allocator state (PyTorch having run in
    the same process slowed a later tljax run by ~20%)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _tljax_run(seed: int, data_dir: str | None, steps: int, operands: str, dtype: str) -> dict:
    """One default configs/dann.py run: its wall seconds by phase and final target accuracy."""
    config = dann_config.get_config()
    config.model.conv_operands = operands
    config.model.dtype = dtype
    config.data.data_dir = data_dir
    config.seed = seed
    config.train.steps = steps
    with tempfile.TemporaryDirectory() as workdir:
        results = train.train_and_evaluate(config, workdir)
    return dict(
        run=results["wall_time_s"],
        acc=results["final"]["target_test/accuracy"],
        **results["timing_s"],
    )


def _torch_run(seed: int, data_dir: str | None, steps: int, batch: int, retain: bool) -> dict:
    """The PyTorch peer's run with the same steps and batch: whole run (data loading, training,
    final evaluation) and training-loop seconds, target accuracy.

    With ``retain``, glibc keeps freed memory as tljax's runs do (tljax/host.py).
    """
    import torch_dann

    start = time.perf_counter()
    if retain:
        host.retain_freed_memory()
    source, target, _, target_test = torch_dann.load_embedded_digits(data_dir)
    out = torch_dann.train_dann(
        source,
        target,
        target_test,
        steps=steps,
        batch_per_domain=batch,
        seed=seed,
        device=torch_device(),
    )
    return dict(run=time.perf_counter() - start, train=out["wall_s"], acc=out["target_accuracy"])


def whole_run_shape() -> tuple[int, int]:
    """(steps, images per domain) of the whole runs: configs/dann.py's, steps from --run_steps."""
    config = dann_config.get_config()
    return _RUN_STEPS.value or config.train.steps, config.train.batch_size


def full_runs() -> list[str]:
    """Wall time and target accuracy of default configs/dann.py runs, tljax vs PyTorch.

    Returns:
        Markdown table rows, mean ± std over --seeds (DANN's target accuracy varies by a few
        points with the seed, so parity is judged over several). "whole run" is everything after
        the imports: data loading, initialisation, compilation, training, evaluations and (tljax
        only: the PyTorch peer has none) checkpoints; "training loop" is the steps with their
        input pipeline, the like-for-like part.
    """
    seeds = [int(s) for s in _SEEDS.value]
    steps, batch = whole_run_shape()

    def row(label: str, runs: list[dict]) -> str:
        cells = [
            _mean_std([r[key] for r in runs], ".1f") + " s" if key in runs[0] else "-"
            for key in ("run", "train", "setup", "compile", "eval", "checkpoint")
        ]
        acc = _mean_std([r["acc"] for r in runs], ".3f")
        return f"| {label} | {' | '.join(cells)} | {acc} | {len(runs)} |"

    rows = []
    for operands, dtype in precisions():
        runs = [
            _isolated(_tljax_run, seed, _DATA_DIR.value, steps, operands, dtype) for seed in seeds
        ]
        rows.append(row(_tljax_label("tljax", operands, dtype), runs))
    if _TORCH.value:
        # glibc's settings matter for CPU tensors only.
        variants = ((False, "glibc defaults"), (True, "allocator as tljax"))
        if torch_device() != "cpu":
            variants = ((False, torch_device()),)
        for retain, label in variants:
            runs = [
                _isolated(_torch_run, seed, _DATA_DIR.value, steps, batch, retain) for seed in seeds
            ]
            rows.append(row(f"{torch_label()} ({label})", runs))
    return rows


def main(argv):
    del argv
    if _SYNTHETIC.value:
        if _FULL_RUN.value:
            raise app.UsageError("--full_run trains on the real data; drop --synthetic for it.")
        # Methods call tljax.data.load_split when they are built, so for this whole process
        # they get random digits and TensorFlow is never imported.
        tljax.data.load_split = synthetic_split
    # As train_and_evaluate does on CPU (see tljax/host.py); PyTorch runs in the same process.
    retained = jax.default_backend() == "cpu" and host.retain_freed_memory()
    device = jax.devices()[0]
    mm = matmul_gflops()
    mm_bf16 = matmul_gflops(dtype=jnp.bfloat16)
    print(
        f"\nDANN train step, {jax.device_count()} x {device.device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPU cores; fp32 matmul {mm:.0f} GFLOP/s "
        f"(bf16 operands, fp32 accumulation: {mm_bf16:.0f}); "
        f"glibc keeps freed memory (tljax/host.py, both frameworks): {retained}\n"
    )
    print(
        "| B+B | impl | ms/step (fixed batch) | images/s | ms/step (pipeline) | GFLOP/s "
        "| % of matmul | compile s | vs PyTorch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    settings = [(impl, *precision) for impl in _IMPLS.value for precision in precisions()]
    for batch in map(int, _BATCHES.value):
        # Model FLOPs come from the standard lowering: XLA does not count the FLOPs inside
        # the loops of the im2col lowering's chunked backward, and the work is the same.
        model_gflop = None if "xla" in _IMPLS.value else standard_gflop(batch)
        torch_ms = None
        rounds = [measure_round(batch, settings) for _ in range(_ROUNDS.value)]
        if _TORCH.value:
            torch_ms = statistics.median(r["torch"] for r in rounds)
        for impl, operands, dtype in settings:
            r = _median_fields([r[impl, operands, dtype] for r in rounds])
            model_gflop = model_gflop or (r["gflop"] if impl == "xla" else None)
            rate = (model_gflop or float("nan")) / r["ms_fixed"] * 1e3
            ratio = f"{torch_ms / r['ms_fixed']:.2f}x" if torch_ms else "-"
            print(
                f"| {batch}+{batch} | {_tljax_label(f'tljax {impl}', operands, dtype)} "
                f"| {r['ms_fixed']:.1f} | "
                f"{2 * batch / r['ms_fixed'] * 1e3:.0f} | {r['ms_pipeline']:.1f} | {rate:.0f} "
                f"| {100 * rate / mm:.0f}% | {r['compile_s']:.1f} | {ratio} |"
            )
        if torch_ms:
            print(
                f"| {batch}+{batch} | {torch_label()} eager ({torch_device()}) | {torch_ms:.1f} | "
                f"{2 * batch / torch_ms * 1e3:.0f} | - | - | - | - | 1.00x |"
            )
    if _FULL_RUN.value:
        steps, batch = whole_run_shape()
        print(
            f"\nWhole default run (configs/dann.py: {steps} steps of {batch}+{batch}, evals, "
            "checkpoints)\n"
        )
        print(
            "| framework | whole run | training loop | setup | compile | evals | checkpoints "
            "| target test acc | seeds |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(full_runs()))


if __name__ == "__main__":
    app.run(main)
