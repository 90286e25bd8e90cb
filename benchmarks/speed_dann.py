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
CPU: Winograd where it is faster, im2col elsewhere; see tljax/ops/conv.py).

Prints markdown tables: ms/step (median of single steps, for both frameworks) and images/s
for B source + B target images on a fixed in-memory batch (pure compute) and through the
real input pipeline,
achieved GFLOP/s (XLA's FLOP count of the compiled step) against a measured
fp32 matmul rate, compile time, and the ratio to PyTorch on the same machine, and writes them
to docs/results/dann_speed.md (--page; --page= for none).
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
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402
import step_timing  # noqa: E402

import tljax.data  # noqa: E402
from configs import dann as dann_config  # noqa: E402
from tljax import flops as flops_lib  # noqa: E402
from tljax import host, methods, optim, parallel, train  # noqa: E402
from tljax.data import pipeline, synthetic  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["128", "64"], "Images per domain per step.")
_IMPLS = flags.DEFINE_list(
    "impls", ["xla", "im2col", "winograd", "auto"], "Conv lowerings, in any order."
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
_PAGE = flags.DEFINE_string(
    "page", results_page.default_page("dann_speed"), "Results page to write ('': none)."
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


# Random digits shaped like the embedded splits (4000 train / 1000 test, 28x28, grey for MNIST,
# colour for MNIST-M): the --synthetic replacement of tljax.data.load_split.
synthetic_split = synthetic.random_digits_split


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
        impl: conv lowering (a key of tljax.ops.CONV_IMPLS).
        batch: images per domain.
        operands: conv matmul operand dtype (model.conv_operands).
        dtype: computation dtype (model.dtype).

    Returns:
        Dict with ms_fixed, ms_pipeline, flops (XLA's count for this lowering, None where XLA
        gives none), compile_s.
    """
    config, method, optimizer, step_fn, mesh = dann_setup(impl, batch, operands, dtype)
    state = train.create_train_state(method, optimizer, 0, mesh)
    batches = pipeline.train_batches(method.train_streams, 0, 0, mesh)
    fixed = next(batches)
    compiled, compile_s = train.compile_train_step(step_fn, state, fixed, mesh)
    flops = flops_lib.compiled_flops(compiled)

    def timed(next_batch):
        nonlocal state
        ms, state = step_timing.median_step_ms(compiled, state, next_batch, _STEPS.value)
        return ms

    ms_fixed = timed(lambda: fixed)
    ms_pipeline = timed(lambda: next(batches))
    batches.close()
    return dict(ms_fixed=ms_fixed, ms_pipeline=ms_pipeline, flops=flops, compile_s=compile_s)


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
    """Per key, the median over rounds (None where a round has no value, e.g. no FLOP count)."""
    values = {key: [r[key] for r in results] for key in results[0]}
    return {k: None if None in v else statistics.median(v) for k, v in values.items()}


def standard_flops(batch: int) -> float | None:
    """XLA's FLOP count of the fp32 DANN step with the standard lowering (compiled, not run)."""
    _, method, optimizer, step_fn, mesh = dann_setup("xla", batch)
    state = train.create_train_state(method, optimizer, 0, mesh)
    batches = pipeline.train_batches(method.train_streams, 0, 0, mesh)
    compiled, _ = train.compile_train_step(step_fn, state, next(batches), mesh)
    batches.close()
    return flops_lib.compiled_flops(compiled)


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


# Rounds of one row that differ by more than this fraction of their median get NOISY_MARK.
NOISY_SPREAD = 0.5
NOISY_MARK = " †"
NOISY_NOTE = (
    f"†: the row's {{rounds}} rounds differ by more than {NOISY_SPREAD:.0%} of their median "
    "(other jobs were using the machine); its ratio to PyTorch is unreliable."
)


def _noisy(values: list[float]) -> bool:
    """Whether repeated measurements disagree by more than NOISY_SPREAD of their median."""
    return len(values) > 1 and (max(values) - min(values)) > NOISY_SPREAD * statistics.median(
        values
    )


def step_rows(batch: int, settings: list[tuple[str, str, str]], rounds: list[dict], mm: float):
    """Markdown rows of the step table for one batch size, from measure_round's rounds.

    A row whose rounds disagree by more than NOISY_SPREAD of their median has NOISY_MARK after
    its ms/step (see NOISY_NOTE).

    Every lowering's GFLOP/s is its step time against the standard lowering's FLOP count
    (tljax/flops.py): XLA does not count the FLOPs inside the loops of the im2col lowering's
    chunked backward, and the work is the same. The count is the fp32 ``xla`` row's when that
    was timed, in whatever position of --impls, and is compiled for otherwise.
    """
    medians = {s: _median_fields([r[s] for r in rounds]) for s in settings}
    counts = {
        impl: r["flops"]
        for (impl, operands, dtype), r in medians.items()
        if (operands, dtype) == ("float32", "float32")
    }
    model = flops_lib.model_flops(counts, lambda: standard_flops(batch))
    torch_ms = statistics.median(r["torch"] for r in rounds) if _TORCH.value else None
    rows = []
    for impl, operands, dtype in settings:
        r = medians[impl, operands, dtype]
        rate = flops_lib.gflops_per_s(model, r["ms_fixed"])
        ratio = f"{torch_ms / r['ms_fixed']:.2f}x" if torch_ms else "-"
        mark = NOISY_MARK if _noisy([x[impl, operands, dtype]["ms_fixed"] for x in rounds]) else ""
        rows.append(
            f"| {batch}+{batch} | {_tljax_label(f'tljax {impl}', operands, dtype)} "
            f"| {r['ms_fixed']:.1f}{mark} | {2 * batch / r['ms_fixed'] * 1e3:.0f} "
            f"| {r['ms_pipeline']:.1f} | {flops_lib.fmt(rate)} "
            f"| {flops_lib.fmt(flops_lib.percent_of(rate, mm), '.0f', '%')} "
            f"| {r['compile_s']:.1f} | {ratio} |"
        )
    if torch_ms:
        mark = NOISY_MARK if _noisy([x["torch"] for x in rounds]) else ""
        rows.append(
            f"| {batch}+{batch} | {torch_label()} eager ({torch_device()}) "
            f"| {torch_ms:.1f}{mark} | {2 * batch / torch_ms * 1e3:.0f} | - | - | - | - | 1.00x |"
        )
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
    header = (
        f"DANN train step, {jax.device_count()} x {device.device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPU cores; fp32 matmul {mm:.0f} GFLOP/s "
        f"(bf16 operands, fp32 accumulation: {mm_bf16:.0f}); "
        f"glibc keeps freed memory (tljax/host.py, both frameworks): {retained}"
    )
    print(f"\n{header}\n", flush=True)
    lines = [
        "| B+B | impl | ms/step (fixed batch) | images/s | ms/step (pipeline) | GFLOP/s "
        "| % of matmul | compile s | vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    settings = [(impl, *precision) for impl in _IMPLS.value for precision in precisions()]
    for batch in map(int, _BATCHES.value):
        rounds = [measure_round(batch, settings) for _ in range(_ROUNDS.value)]
        rows = step_rows(batch, settings, rounds, mm)
        print("\n".join(rows), flush=True)
        lines += rows
    tables = [header + ":", "\n".join(lines)]
    if any(NOISY_MARK in line for line in lines):
        tables.append(NOISY_NOTE.format(rounds=_ROUNDS.value))
        print("\n" + tables[-1])
    if _FULL_RUN.value:
        steps, batch = whole_run_shape()
        whole = [
            f"Whole default run (configs/dann.py: {steps} steps of {batch}+{batch}, evals, "
            "checkpoints), each in a fresh process, mean ± std over seeds "
            f"{', '.join(_SEEDS.value)}:",
            "| framework | whole run | training loop | setup | compile | evals | checkpoints "
            "| target test acc | seeds |\n|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(full_runs()),
        ]
        print("\n" + "\n\n".join(whole))
        tables += whole
    results_page.write_page(
        _PAGE.value,
        "DANN train step speed: tljax vs PyTorch",
        "\n\n".join(tables),
        settings=(
            f"The configs/dann.py train step for B source + B target images, {_STEPS.value} "
            f"timed steps (median of single steps, both frameworks), {_ROUNDS.value} "
            'interleaved round(s) per row (median). "fixed batch" reuses one in-memory batch '
            '(pure compute); "pipeline" draws real batches. GFLOP/s counts the standard '
            "lowering's FLOPs (XLA's count) for every row; \"% of matmul\" compares it with the "
            "measured fp32 matmul rate above."
        ),
        notes=(
            "Lowerings (`model.conv_impl`): `xla` is `lax.conv`; `im2col` and `winograd` are "
            "tljax's CPU lowerings (every stride-1 conv for `winograd`); `auto`, what every "
            "config uses, picks per layer on CPU and `xla` on accelerators. Speed on a "
            "shared CPU moves between runs; the ratio to PyTorch in the same run is the stable "
            "figure, and whole runs, minutes each, are the most exposed to other jobs (see the "
            "load average above). Earlier measurements on other machines: "
            "[cpu_speed_history.md](cpu_speed_history.md)."
        ),
    )


if __name__ == "__main__":
    app.run(main)
