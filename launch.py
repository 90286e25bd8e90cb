"""Launches one tljax experiment from a config file.

  python launch.py --config=configs/dann.py --workdir=runs/dann
  python launch.py --config=configs/dann.py:data=full --config.train.steps=200 --workdir=...

On a TPU pod or several GPU hosts, run the same command on every host with
--distributed.

A config with get_sweep() runs as a sweep (tljax/sweep.py): every point in its own
<workdir>/<point>, finished points skipped; --sweep_commands prints the commands instead.

  python launch.py --config=configs/layer_transfer.py --workdir=runs/yosinski --sweep

Compiled programs go to a persistent cache (--compilation_cache), so a later run or sweep
point with the same shapes and settings loads its train step instead of compiling it.

Bad input (a missing config file, an unknown field, a config value, a split or file that
cannot work) stops the launch before any training with one "Error: ..." line and exit status 2
(tljax/cli.py, tljax/validate.py).

SIGTERM or SIGINT (Ctrl-C) during training saves a checkpoint at the step in flight and exits
with status 75 (EX_TEMPFAIL): relaunch the same command to resume (tljax/stopping.py,
tljax/preemption.py; BUILD.md has a SLURM requeue example). A run whose training predictions
collapse to chance level is stopped with status 1 (tljax/collapse.py).

A workdir holds one run (tljax/workdir.py): a second launch on a workdir in use stops at once,
naming the holder; a launch whose config differs from the one recorded in <workdir>/config.json
stops before any work, listing the differing fields, unless --allow_config_change. --workdir
must be a local or network-filesystem path (gs://... is refused). Resuming skips damaged or
incomplete checkpoints for the newest good one (tljax/checkpoints.py).

The log shows tljax's lines and every warning; --verbosity=1 (-v 1) adds the libraries' INFO
and everyone's DEBUG lines (Orbax, tfds, clu, JAX, TensorFlow).
"""

import contextlib
import functools
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tljax import cli, validate

# XLA checks on load that an entry was compiled for this machine's CPU features and recompiles
# otherwise, so a home directory shared by different machines is safe.
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "tljax", "jax_compilation")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.json.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every point of the config's get_sweep().")
_SWEEP_COMMANDS = flags.DEFINE_bool(
    "sweep_commands", False, "Print one launch command per sweep point instead of running."
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory of JAX's persistent compilation cache. Default: $JAX_COMPILATION_CACHE_DIR if "
    f"set, else {DEFAULT_COMPILATION_CACHE}. '' turns the cache off.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir whose run was made with another config (its config.json); without it such "
    "a launch stops, listing the fields that differ (tljax/workdir.py).",
)
flags.mark_flags_as_required(["config", "workdir"])


def compilation_cache_dir(flag_value: str | None) -> str | None:
    """The persistent compilation cache directory for a --compilation_cache value.

    Args:
      flag_value: the flag; None means $JAX_COMPILATION_CACHE_DIR, or the default without it.

    Returns:
      An absolute path, or None for no cache.
    """
    if flag_value is None:
        flag_value = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
    return os.path.abspath(os.path.expanduser(flag_value)) if flag_value else None


@contextlib.contextmanager
def _stderr_discarded():
    """Sends what C/C++ code writes to stderr (file descriptor 2) to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _hide_accelerators_from_tensorflow(quiet: bool) -> None:
    """TensorFlow only feeds tfds: keep it off the accelerators JAX owns. Without TensorFlow
    (runs on exported splits, see tljax/data/export.py) there is nothing to hide.

    Args:
      quiet: import TensorFlow without the INFO lines its C++ libraries print as they load
        (oneDNN, CPU features), which TF_CPP_MIN_LOG_LEVEL does not reach.
    """
    try:
        with _stderr_discarded() if quiet else contextlib.nullcontext():
            import tensorflow as tf
    except ImportError:
        return
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Before TensorFlow and JAX load and before the workdir exists (tljax/validate.py).
    validate.check_config(_CONFIG.value)
    if _SWEEP_COMMANDS.value:
        from tljax import sweep

        config_spec = config_flags.get_config_filename(flags.FLAGS["config"])
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        print("\n".join(sweep.sweep_commands(config_spec, _WORKDIR.value, overrides)))
        return
    quiet = flags.FLAGS.verbosity < 1
    if quiet:
        # Read by TensorFlow's and XLA's C++ logging when their libraries load.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    _hide_accelerators_from_tensorflow(quiet)
    if quiet:
        # Only now: run_log imports JAX, which has always loaded after TensorFlow here.
        from tljax import run_log

        run_log.quiet_library_logs()

    import jax

    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir(_COMPILATION_CACHE.value))
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info(
        "Process %d of %d; local devices %s; %d devices in all.",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
    )

    from tljax import train, workdir

    # Refuses a URL (gs://...) or a file before anything is written.
    workdir.make(_WORKDIR.value)
    train_fn = functools.partial(
        train.train_and_evaluate, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if _SWEEP.value:
        from tljax import sweep

        config_spec = config_flags.get_config_filename(flags.FLAGS["config"])
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        sweep.run_sweep(config_spec, _WORKDIR.value, overrides, train_fn)
        return
    train_fn(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(
        cli.exit_cleanly(main),
        flags_parser=cli.flags_parser("config"),
    )
