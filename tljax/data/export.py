r"""Exports every split a config loads as NumPy files, for runs on machines without TensorFlow.

Usage:
  python -m tljax.data.export --config=configs/dann.py --out=/tmp/dann_arrays
  # then, on a machine without TensorFlow/tfds (copy /tmp/dann_arrays there):
  python launch.py --config=configs/dann.py --config.data.data_dir=/tmp/dann_arrays ...

The splits are the ones the config's method loads when it is built (its training and evaluation
sets), read through ``tljax.data.load_split`` with the config's own ``data.data_dir``. Files that
a method reads without ``load_split`` (e.g. zero-shot attribute tables) are not exported.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from tljax.data import exported

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write <name>/<split>.npz files to.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _OUT.value:
        raise app.UsageError("--out is required.")
    for path in exported.export_splits(_CONFIG.value, _OUT.value):
        logging.info("Wrote %s (%.1f MB).", path, os.path.getsize(path) / 1e6)
    print(f"Exported to {_OUT.value}; pass --config.data.data_dir={_OUT.value} to use it.")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
