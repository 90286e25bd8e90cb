"""Launches one tljax experiment from a config file.

  python launch.py --config=configs/dann.py --workdir=runs/dann
  python launch.py --config=configs/dann.py:data=full --config.train.steps=200 --workdir=...

On a TPU pod or several GPU hosts, run the same command on every host with
--distributed.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.json.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # TensorFlow only feeds tfds; keep it off the accelerators JAX owns.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")

    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info(
        "Process %d of %d; local devices %s; %d devices in all.",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
    )

    from tljax import train

    os.makedirs(_WORKDIR.value, exist_ok=True)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
