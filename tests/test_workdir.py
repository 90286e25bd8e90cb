"""The workdir: local paths only, one run at a time (the lock), one config per run."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import jax
import pytest
from helpers import shrink

from configs import dann, source_only
from tljax import train
from tljax import workdir as workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir="unused", **changes):
    config = shrink(dann.get_config(), data_dir, steps=6, eval_every=3)
    for field, value in changes.items():
        *blocks, name = field.split(".")
        target = config
        for block in blocks:
            target = target[block]
        target[name] = value
    return config


def _used(workdir, config):
    """A workdir holding a run of ``config`` (its config.json and a checkpoint directory)."""
    with workdirs.claim(str(workdir), config):
        os.makedirs(workdir / "checkpoints" / "3")
    return workdir


def _lock_file(workdir, **fields):
    holder = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=None, since="x", token="t")
    (workdir / workdirs.LOCK_FILE).write_text(json.dumps({**holder, **fields}))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


# ------------------------------------------------------------------- path ----


def test_cloud_url_is_refused_and_no_local_directory_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(workdirs.WorkdirError, match=r"gs://bucket/run is a URL.*'gs:'"):
        workdirs.make("gs://bucket/run")
    with pytest.raises(workdirs.WorkdirError, match="is a URL"):
        train.train_and_evaluate(_config(), "gs://bucket/run")
    assert os.listdir(tmp_path) == []


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("not a directory")
    with pytest.raises(workdirs.WorkdirError, match="results.txt is an existing file"):
        workdirs.make(str(path))
    with pytest.raises(workdirs.WorkdirError, match="is an existing file, not a directory"):
        train.train_and_evaluate(_config(), str(path))
    with pytest.raises(workdirs.WorkdirError, match="Cannot create --workdir"):
        workdirs.make(str(path / "run"))
    assert path.read_text() == "not a directory"


# ----------------------------------------------------------------- config ----


def test_config_changes_list_each_differing_field():
    old = {"seed": 0, "lr": {"base": 0.01, "alpha": 10.0}, "tags": [1, 2], "nan": float("nan")}
    new = {"seed": 1, "lr": {"base": 0.02, "alpha": 10}, "tags": [1, 2], "nan": float("nan")}
    new["extra"] = {"x": None}
    assert workdirs.config_changes(old, new) == [
        ("extra.x", "(absent)", None),
        ("lr.base", 0.01, 0.02),
        ("seed", 0, 1),
    ]


def test_another_config_stops_before_any_work_listing_the_fields(tmp_path, monkeypatch):
    _used(tmp_path, _config())
    recorded = (tmp_path / workdirs.CONFIG_FILE).read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("work started despite the config change")

    monkeypatch.setattr(train.methods, "build", must_not_run)
    other = source_only.get_config()
    shrink(other, "unused", steps=6, eval_every=3)
    other.lr.base, other.seed, other.train.batch_size = 0.02, 1, 32
    with pytest.raises(workdirs.ConfigChangedError) as caught:
        train.train_and_evaluate(other, str(tmp_path))
    message = str(caught.value)
    for line in (
        "dann.adversarial: true -> false",
        "lr.base: 0.01 -> 0.02",
        "seed: 0 -> 1",
        "train.batch_size: 16 -> 32",
        "--allow_config_change",
    ):
        assert line in message
    assert "config.json" in message and "train.steps" in message  # names what may change
    assert (tmp_path / workdirs.CONFIG_FILE).read_text() == recorded
    assert not (tmp_path / workdirs.LOCK_FILE).exists()


def test_allow_config_change_records_the_new_config(tmp_path, caplog):
    _used(tmp_path, _config())
    with (
        caplog.at_level(logging.WARNING),
        workdirs.claim(str(tmp_path), _config(**{"lr.base": 0.02}), allow_config_change=True),
    ):
        pass
    recorded = json.loads((tmp_path / workdirs.CONFIG_FILE).read_text())
    assert recorded["lr"]["base"] == 0.02
    assert any("lr.base: 0.01 -> 0.02" in r.getMessage() for r in caplog.records)


def test_steps_and_logging_fields_may_change_on_resume(tmp_path):
    _used(tmp_path, _config())
    longer = _config(**{"train.steps": 9, "eval.every": 9, "checkpoint.max_to_keep": 3})
    with workdirs.claim(str(tmp_path), longer):
        pass
    assert json.loads((tmp_path / workdirs.CONFIG_FILE).read_text())["train"]["steps"] == 9


def test_a_workdir_without_checkpoints_or_results_takes_any_config(tmp_path):
    # E.g. a launch killed before its first checkpoint: nothing was made with its config.
    (tmp_path / workdirs.CONFIG_FILE).write_text(json.dumps(workdirs.config_dict(_config())))
    with workdirs.claim(str(tmp_path), _config(**{"lr.base": 0.5})):
        os.makedirs(tmp_path / "checkpoints" / "3")
    assert json.loads((tmp_path / workdirs.CONFIG_FILE).read_text())["lr"]["base"] == 0.5


def test_a_workdir_from_before_config_json_is_checked_against_its_results(tmp_path):
    results = {"config": workdirs.config_dict(_config()), "last_step": 6}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with (
        pytest.raises(workdirs.ConfigChangedError, match=r"results.json.*\n  seed: 0 -> 3"),
        workdirs.claim(str(tmp_path), _config(seed=3)),
    ):
        pass


def test_an_unused_workdir_is_left_as_it_was_found(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(RuntimeError), workdirs.claim(str(new), _config()):
        assert sorted(os.listdir(new)) == [workdirs.CONFIG_FILE, workdirs.LOCK_FILE]
        raise RuntimeError("the run failed before its first checkpoint")
    assert not new.exists()  # made by the claim, removed with it
    with workdirs.claim(str(tmp_path), _config()):
        pass
    assert os.listdir(tmp_path) == []  # existed before: kept, empty


# ------------------------------------------------------------------- lock ----


def test_a_second_claim_fails_at_once_naming_the_holder(tmp_path):
    with workdirs.claim(str(tmp_path), _config()):
        start = time.perf_counter()
        with (
            pytest.raises(workdirs.WorkdirBusyError) as caught,
            workdirs.claim(str(tmp_path), _config()),
        ):
            pass
        assert time.perf_counter() - start < 1.0
        assert (tmp_path / workdirs.CONFIG_FILE).exists()  # the holder's files untouched
    message = str(caught.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "another run is writing there" in message
    assert not (tmp_path / workdirs.LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    _lock_file(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING), workdirs.claim(str(tmp_path), _config()):
        holder = json.loads((tmp_path / workdirs.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
    assert any(
        f"its process {pid} on {socket.gethostname()} is no longer running" in r.getMessage()
        for r in caplog.records
    )


def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path):
    # The pid is alive (this test) but started at another time: reused after the holder died.
    _lock_file(tmp_path, pid=os.getpid(), pid_start=1)
    with workdirs.claim(str(tmp_path), _config()):
        pass


def test_a_lock_from_another_host_is_taken_over_only_once_not_refreshed(tmp_path):
    _lock_file(tmp_path, host="other-host", pid=1)
    with (
        pytest.raises(workdirs.WorkdirBusyError, match="pid 1 on host other-host"),
        workdirs.claim(str(tmp_path), _config()),
    ):
        pass
    old = time.time() - workdirs.STALE_AFTER_SECONDS - 5
    os.utime(tmp_path / workdirs.LOCK_FILE, (old, old))
    with workdirs.claim(str(tmp_path), _config()):
        pass


def test_a_held_lock_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(workdirs, "HEARTBEAT_SECONDS", 0.05)
    with workdirs.claim(str(tmp_path), _config()):
        os.utime(tmp_path / workdirs.LOCK_FILE, (0, 0))
        time.sleep(0.5)
        age = time.time() - os.stat(tmp_path / workdirs.LOCK_FILE).st_mtime
    assert age < 5


def test_only_process_0_locks_so_one_runs_processes_share_the_workdir(tmp_path, monkeypatch):
    with workdirs.claim(str(tmp_path), _config()):
        # Process 1 of the same run: it neither takes the lock nor writes config.json.
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        with workdirs.claim(str(tmp_path), _config()):
            pass
        monkeypatch.undo()
        assert (tmp_path / workdirs.LOCK_FILE).exists()


# ----------------------------------------------------- real processes ----


def _launch(workdir, data_dir, *flags):
    command = [
        sys.executable,
        "launch.py",
        "--config=configs/dann.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.batch_size=16",
        "--config.eval.batch_size=200",
        *flags,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_a_second_launch_on_a_busy_workdir_fails_at_once_and_the_first_finishes(data_dir, tmp_path):
    workdir = tmp_path / "run"
    # Long enough (about 1 min on 2 cores) to outlast the second launch's start-up.
    steps = ["--config.train.steps=3000", "--config.eval.every=1000"]
    first = _launch(workdir, data_dir, *steps)
    deadline = time.time() + 240
    while not (workdir / "checkpoints").exists():  # the first launch is past its setup
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.2)

    start = time.time()
    second = _launch(workdir, data_dir, *steps)
    _, second_err = second.communicate(timeout=240)
    second_s = time.time() - start
    still_running = first.poll() is None
    _, first_err = first.communicate(timeout=600)

    assert still_running, "the first launch ended before the second tried; make it longer"
    assert second.returncode == 2, second_err[-3000:]
    assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in second_err
    assert "Compiled the train step" not in second_err  # stopped before any work
    assert second_s < 120
    assert first.returncode == 0, first_err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["last_step"] == 3000 and len(results["launches"]) == 1
    assert results["config"] == json.loads((workdir / workdirs.CONFIG_FILE).read_text())
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2000", "3000"]
    assert not (workdir / workdirs.LOCK_FILE).exists()


@pytest.mark.slow
def test_launch_refuses_a_cloud_workdir_in_one_line(data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={ROOT}/configs/dann.py"]
        + ["--workdir=gs://bucket/runs/dann"],
        cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: --workdir=gs://bucket/runs/dann")
    assert os.listdir(tmp_path) == []
