"""SIGTERM / SIGINT: the step in flight finishes, is checkpointed, the run exits 75 and resumes
exactly (tljax/preemption.py, tljax/stopping.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from tljax import cli, preemption, stopping, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")

# ------------------------------------------------------------------ unit ----


def test_a_signal_sets_the_flag_and_the_handlers_are_restored():
    before = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}
    watch = preemption.PreemptionWatch(first_step=0, sync_every=10, mode=preemption.LOCAL)
    watch.install()
    try:
        assert not watch.reached(1)
        signal.raise_signal(signal.SIGTERM)  # Handled at the next bytecode; the test survives.
        assert watch.reached(2) and watch.signal == signal.SIGTERM
        signal.raise_signal(signal.SIGTERM)  # A scheduler's repeat changes nothing.
        assert watch.reached(3)
    finally:
        watch.restore()
    assert {signum: signal.getsignal(signum) for signum in preemption.SIGNALS} == before


def test_a_second_sigint_interrupts_at_once():
    # Python's own SIGINT handler, also where the suite runs as a background job (SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watch = preemption.PreemptionWatch(first_step=0, sync_every=10, mode=preemption.LOCAL)
    watch.install()
    try:
        # raise_signal delivers to this thread: os.kill may land on another of the process's
        # threads and reach the Python handler only after the next line has run.
        signal.raise_signal(signal.SIGINT)
        assert watch.reached(1) and watch.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        watch.restore()
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    watch = preemption.PreemptionWatch(first_step=0, sync_every=10, mode=preemption.LOCAL)
    thread = threading.Thread(target=watch.install)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
    watch.restore()  # Nothing to restore.


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # As in a shell's background job.
    watch = preemption.PreemptionWatch(first_step=0, sync_every=10, mode=preemption.LOCAL)
    try:
        watch.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert not watch.reached(1)
        watch.restore()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_run_without_jax_distributed_agrees_locally():
    assert preemption.agreement() == preemption.LOCAL


def test_gathered_flags_are_read_only_every_sync_every_steps():
    watch = preemption.PreemptionWatch(first_step=0, sync_every=5, mode=preemption.GATHER)
    watch.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert [step for step in range(1, 12) if watch.reached(step)] == [5, 10]
    finally:
        watch.restore()


def test_pending_metrics_read_back_exactly():
    values = {
        "loss": np.asarray([0.1, 1 / 3, 2.5e-8], np.float32),
        "lr": np.asarray([1e-3, 1e-3, 9e-4], jnp.bfloat16),
    }
    fields = preemption.pending_fields([7, 8, 9], values)
    assert fields["status"] == "preempted"
    previous = json.loads(json.dumps({"last_step": 10, **fields}))
    steps, read = preemption.pending_metrics(previous, first_step=10)
    assert steps == [7, 8, 9]
    for name, array in values.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)
    # Resuming from another checkpoint (e.g. an older one) takes none of them.
    assert preemption.pending_metrics(previous, first_step=5) == ([], {})
    assert preemption.pending_metrics(None, first_step=0) == ([], {})


def test_carried_steps_average_bit_for_bit_as_without_a_stop():
    rng = np.random.default_rng(0)
    per_step = [
        {"loss": jnp.float32(rng.normal()), "accuracy": jnp.float32(rng.uniform())}
        for _ in range(7)
    ]
    whole = train.MetricBuffer()
    for step, metrics in enumerate(per_step):
        whole.add(step, metrics)
    first = train.MetricBuffer()
    for step, metrics in enumerate(per_step[:3]):
        first.add(step, metrics)
    steps, values = first.take()
    resumed = train.MetricBuffer()
    resumed.carry(
        *preemption.pending_metrics(
            json.loads(json.dumps({"last_step": 3, **preemption.pending_fields(steps, values)})), 3
        )
    )
    for step, metrics in enumerate(per_step[3:], start=3):
        resumed.add(step, metrics)
    assert resumed.flush() == whole.flush()


def test_a_nan_among_pending_steps_is_reported():
    buffer = train.MetricBuffer()
    buffer.add(4, {"loss": jnp.float32(np.nan)})
    with pytest.raises(train.NonFiniteLossError, match="step 4"):
        buffer.take()


@pytest.mark.parametrize(
    "error, code", [(stopping.PreemptedError, 75), (stopping.CollapsedError, 1)]
)
def test_launch_exits_with_the_stop_s_status(error, code):
    def main(argv):
        raise error("stopped", step=3)

    with pytest.raises(SystemExit) as exit_info:
        cli.exit_cleanly(main)([])
    assert exit_info.value.code == code


# ----------------------------------------------------- launch.py, real signals ----

STEPS, LOG_EVERY, CHECKPOINT_EVERY = 600, 100, 300


def _launch_args(workdir, data_dir) -> list[str]:
    return [
        sys.executable,
        "launch.py",
        "--config=configs/dann.py",
        f"--config.train.steps={STEPS}",
        # Slow enough steps that a signal sent after a log line lands before the next one.
        "--config.train.batch_size=32",
        f"--config.train.log_every={LOG_EVERY}",
        f"--config.eval.every={CHECKPOINT_EVERY}",
        f"--config.checkpoint.every={CHECKPOINT_EVERY}",
        "--config.eval.batch_size=500",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
    ]


def _tail(log_path) -> str:
    return log_path.read_text()[-3000:]


def _wait_for(log_path, text: str, procs, timeout: float = 300) -> None:
    """Polls a process's log file until ``text`` appears (the processes still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_path.read_text():
            return
        if any(proc.poll() is not None for proc in procs):
            raise AssertionError(f"A process ended before {text!r}:\n{_tail(log_path)}")
        time.sleep(0.02)
    raise AssertionError(f"No {text!r} within {timeout} s")


def _default_sigint() -> None:
    # As from an interactive terminal: pytest itself may run as a background job, whose
    # children inherit an ignored SIGINT (which a run then rightly leaves ignored).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(args, log_path, env=None) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_default_sigint,
        )


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """results.json of the run launched once without a signal."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    log_path = workdir.parent / "log"
    proc = _launch(_launch_args(workdir, data_dir), log_path)
    assert proc.wait(timeout=600) == 0, _tail(log_path)
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, after",
    [
        # During the evaluation and checkpoint at step 300: stops at the next step.
        (signal.SIGTERM, f"Step {CHECKPOINT_EVERY}/{STEPS} eval"),
        # Within the last log interval: its means need the earlier launch's steps.
        (signal.SIGINT, f"Step {STEPS - 2 * LOG_EVERY}/{STEPS} ("),
    ],
)
def test_a_signal_saves_the_step_in_flight_and_the_relaunch_ends_as_without_it(
    signum, after, data_dir, tmp_path, uninterrupted
):
    workdir, log_path = tmp_path / "run", tmp_path / "log"
    args = _launch_args(workdir, data_dir)
    proc = _launch(args, log_path)
    _wait_for(log_path, after, [proc])
    proc.send_signal(signum)
    assert proc.wait(timeout=300) == stopping.EXIT_PREEMPTED, _tail(log_path)

    partial = json.loads((workdir / "results.partial.json").read_text())
    stopped = partial["last_step"]
    assert CHECKPOINT_EVERY < stopped < STEPS
    assert str(stopped) in os.listdir(workdir / "checkpoints")
    assert partial["status"] == "preempted"
    assert partial["pending_train_metrics"]["steps"] == list(
        range(stopped - stopped % LOG_EVERY, stopped)
    )
    log = log_path.read_text()
    name = signal.Signals(signum).name
    assert f"Preempted by {name}: stopped after step {stopped}, checkpoint saved" in log
    assert "Traceback" not in log

    relaunch = _launch(args, tmp_path / "log2")
    assert relaunch.wait(timeout=600) == 0, _tail(tmp_path / "log2")
    results = json.loads((workdir / "results.json").read_text())
    assert results["final"] == uninterrupted["final"]
    assert results["history"] == uninterrupted["history"]
    assert results["status"] == "ok" and "pending_train_metrics" not in results
    assert [launch["to_step"] for launch in results["launches"]] == [stopped, STEPS]


# ------------------------------------------------------------ two processes ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


MULTI_STEPS = 600  # The worker logs every 150 steps, evaluates and checkpoints every 300.


def _start_workers(workdir, data_dir, tmp_path, tag: str, env=None):
    port = _free_port()
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    procs, logs = [], []
    for process_id in range(2):
        logs.append(tmp_path / f"{tag}{process_id}.log")
        worker = os.path.join(HERE, "preemption_worker.py")
        args = [sys.executable, worker, str(process_id), str(port), str(workdir), data_dir]
        procs.append(_launch([*args, str(MULTI_STEPS)], logs[-1], env))
    return procs, logs


def _printed(log_path, prefix: str) -> list[str]:
    lines = log_path.read_text().splitlines()
    return [line[len(prefix) :] for line in lines if line.startswith(prefix)]


def _preempt_workers(workdir, data_dir, tmp_path, tag, after: str, targets, env=None) -> int:
    """Starts both workers, sends SIGTERM to ``targets`` once process 0 logs ``after``.

    Returns:
      The step both stopped at, after checking that both exited 75 at the same step and that
      it is the workdir's newest checkpoint.
    """
    procs, logs = _start_workers(workdir, data_dir, tmp_path, tag, env)
    _wait_for(logs[0], after, procs)
    for index in targets:
        procs[index].send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=300) for proc in procs]
    assert codes == [75, 75], [_tail(log) for log in logs]
    steps = [int(_printed(log, "PREEMPTED ")[0]) for log in logs]
    assert steps[0] == steps[1], steps
    checkpoints = sorted(int(name) for name in os.listdir(workdir / "checkpoints"))
    assert checkpoints[-1] == steps[0]
    return steps[0]


def _finish_workers(workdir, data_dir, tmp_path, tag) -> dict:
    procs, logs = _start_workers(workdir, data_dir, tmp_path, tag)
    assert [proc.wait(timeout=300) for proc in procs] == [0, 0], [_tail(log) for log in logs]
    results = [json.loads(_printed(log, "RESULTS ")[0]) for log in logs]
    assert results[0] == results[1]
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_stop_together_twice_and_end_as_without_a_stop(data_dir, tmp_path):
    """JAX's preemption service: a SIGTERM to one process stops both at the same step, in the
    first launch and in a resumed one; the run then ends exactly as an uninterrupted one."""
    workdir = tmp_path / "run"
    first = _preempt_workers(workdir, data_dir, tmp_path, "a", "Step 300/600 eval", targets=[1])
    assert 300 < first < MULTI_STEPS
    assert sorted(os.listdir(workdir / "checkpoints")) == ["300", str(first)]
    # In a resumed launch (Orbax reports the global step to the same service at each save).
    second = _preempt_workers(workdir, data_dir, tmp_path, "b", "Compiled the train step", [0])
    assert first < second < MULTI_STEPS
    results = _finish_workers(workdir, data_dir, tmp_path, "c")
    assert results["status"] == "ok"
    assert [launch["to_step"] for launch in results["launches"]] == [first, second, MULTI_STEPS]

    uninterrupted = _finish_workers(tmp_path / "uninterrupted", data_dir, tmp_path, "ref")
    assert results["final"] == uninterrupted["final"]
    assert results["history"] == uninterrupted["history"]


@pytest.mark.slow
def test_two_processes_without_the_service_stop_at_the_next_log_step(data_dir, tmp_path):
    """jax_enable_preemption_service=False: the flags are gathered at log steps."""
    workdir = tmp_path / "run"
    env = {"JAX_ENABLE_PREEMPTION_SERVICE": "false"}
    stopped = _preempt_workers(workdir, data_dir, tmp_path, "a", "Step 300/600 eval", [0, 1], env)
    assert stopped == 450
    assert sorted(os.listdir(workdir / "checkpoints")) == ["300", "450"]
