"""Accuracy benchmark: source-only vs DANN (vs train-on-target) on MNIST -> MNIST-M.

  python benchmarks/accuracy_dann.py --seeds=0,1,2 --out=runs/bench_accuracy

Runs each config for every seed through the one trainer (each in its own
workdir under --out, so an interrupted benchmark resumes), then prints a
markdown table of target-test accuracy (mean ± std over seeds) and the mean
wall time per run.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_CONFIGS = flags.DEFINE_list("configs", ["source_only", "dann", "target_only"], "configs/ names.")
_VARIANT = flags.DEFINE_string("variant", "data=embedded", "Config variant (after ':').")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps.")
_OUT = flags.DEFINE_string("out", "runs/bench_accuracy", "Root of the per-run workdirs.")


def run_one(config_name: str, seed: int) -> dict:
    """Trains configs/<config_name>.py with `seed` (or reads its finished results).

    Args:
      config_name: module name under configs/.
      seed: run seed.

    Returns:
      The run's results dict.
    """
    import importlib

    from tljax import sweep

    workdir = os.path.join(_OUT.value, f"{config_name}_seed{seed}")
    config = importlib.import_module(f"configs.{config_name}").get_config(
        f"{_VARIANT.value},seed={seed}"
    )
    if _STEPS.value:
        config.train.steps = _STEPS.value
    start = time.time()
    results = sweep.run_or_load(config, workdir)
    logging.info(
        "%s seed %d: %.4f in %.0f s",
        config_name,
        seed,
        results["final"]["target_test/accuracy"],
        time.time() - start,
    )
    return results


def main(argv):
    del argv
    import jax

    rows = []
    for name in _CONFIGS.value:
        runs = [run_one(name, int(seed)) for seed in _SEEDS.value]
        acc = np.array([r["final"]["target_test/accuracy"] for r in runs])
        src = np.array([r["final"]["source_test/accuracy"] for r in runs])
        wall = np.mean([r["wall_time_s"] for r in runs])
        rows.append(
            f"| {name} | {acc.mean():.4f} ± {acc.std():.4f} | {src.mean():.4f} | "
            f"{wall:.0f} s | {len(runs)} |"
        )
    print(
        f"\nMNIST -> MNIST-M ({_VARIANT.value}), {runs[0]['steps']} steps, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}\n"
    )
    print("| config | target test acc (mean ± std) | source test acc | wall time / run | seeds |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
