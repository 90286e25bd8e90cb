"""What the persistent compilation cache saves: one DANN run cold, then the same run warm.

  python benchmarks/compile_cache.py                 # the default 3000-step configs/dann.py
  python benchmarks/compile_cache.py --steps=300     # a short run, where compilation weighs more

Each run is `python launch.py --config=configs/dann.py` in a fresh process, as a user or a
sweep starts it, with `--compilation_cache` pointing at a new, empty directory: the first run
compiles and fills it, the second loads the train step from it. Prints a markdown table of
`results.json`'s `wall_time_s` and `timing_s`, and whether the two runs ended with the same
metrics.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir.")


def launch(workdir: str, cache_dir: str) -> dict:
    """Runs configs/dann.py with `cache_dir` as the compilation cache.

    Args:
        workdir: the run's workdir.
        cache_dir: the persistent compilation cache directory.

    Returns:
        The run's results.json.
    """
    cmd = [
        sys.executable,
        "launch.py",
        "--config=configs/dann.py",
        f"--compilation_cache={cache_dir}",
        f"--workdir={workdir}",
    ]
    if _STEPS.value:
        cmd.append(f"--config.train.steps={_STEPS.value}")
    if _DATA_DIR.value:
        cmd.append(f"--config.data.data_dir={_DATA_DIR.value}")
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = os.path.join(tmp, "cache")
        runs = {name: launch(os.path.join(tmp, name), cache_dir) for name in ("cold", "warm")}
    steps = runs["cold"]["steps"]
    print(f"\nconfigs/dann.py, {steps} steps, each run a fresh process\n")
    phases = ("setup", "compile", "train", "eval", "checkpoint")
    print("| compilation cache | whole run | " + " | ".join(phases) + " |")
    print("|---|---|" + "---|" * len(phases))
    for name, results in runs.items():
        timing = results["timing_s"]
        cells = " | ".join(f"{timing[p]:.1f} s" for p in phases)
        print(f"| {name} | {results['wall_time_s']:.1f} s | {cells} |")
    same = runs["cold"]["final"] == runs["warm"]["final"]
    print(f"\nSame final metrics in both runs: {same}")


if __name__ == "__main__":
    app.run(main)
