"""Two real processes on localhost (gloo CPU collectives) train one sharded model."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import dann
from tljax import train

HERE = os.path.dirname(os.path.abspath(__file__))

# Starts worker processes and trains end to end.
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_each_other_and_with_one_process(data_dir, tmp_path):
    port, workdir = _free_port(), str(tmp_path / "multi")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_worker.py"),
                str(i),
                str(port),
                workdir,
                data_dir,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    results = [
        json.loads(line[len("RESULTS ") :])
        for out, _ in outputs
        for line in out.splitlines()
        if line.startswith("RESULTS ")
    ]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["num_devices"] == 2 for r in results)
    assert results[0]["final"] == results[1]["final"]
    assert os.path.exists(os.path.join(workdir, "results.json"))

    config = dann.get_config()
    config.data.data_dir = data_dir
    config.train.steps, config.train.batch_size = 4, 8
    config.eval.every, config.eval.batch_size, config.checkpoint.every = 4, 200, 2
    single = train.train_and_evaluate(config, str(tmp_path / "single"), devices=jax.devices()[:2])
    for key in ("train/loss", "target_test/accuracy", "source_test/loss"):
        np.testing.assert_allclose(results[0]["final"][key], single["final"][key], rtol=1e-4)
