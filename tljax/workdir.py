"""A run's workdir: a local path, one run at a time, one config per run.

`claim` (and `guarded`, which wraps `train.train_and_evaluate` in it) runs before any work:

* The path: cloud URLs (``gs://...``) are refused, because every file a run writes (results,
  TensorBoard events, this module's files) goes through local file APIs, which would make a
  local directory named ``gs:``. Several hosts share a workdir through a network filesystem.
  A workdir that is an existing file is refused too.
* The lock, `workdir.lock`: process 0 of a run creates it (all processes of one run share the
  workdir, so only one of them takes it), naming its host, pid and start time, and refreshes its
  modification time every `HEARTBEAT_SECONDS`. A second run on the workdir fails at once, naming
  the holder. A lock left behind is taken over with a warning: on the same host when its process
  is gone (or its pid now belongs to another process), from another host once it has not been
  refreshed for `STALE_AFTER_SECONDS` (a host cannot see another host's processes).
* The config, `config.json`: the first launch records its config; a later launch with another
  config stops, listing each differing field (old -> new), unless it passes
  ``allow_config_change`` (``--allow_config_change``); the new config is then recorded. The
  fields in `RESUMABLE_FIELDS` may change without it. A workdir with no checkpoint and no results
  holds nothing made with its recorded config, so any config may take it over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tljax import checkpoints, validate
from tljax import results as run_results

CONFIG_FILE = "config.json"
LOCK_FILE = "workdir.lock"
# May change when a run resumes: how long it runs, how often it logs, evaluates and checkpoints,
# how many checkpoints it keeps, where the datasets are stored. None of them changes what the
# steps already taken computed; a longer train.steps stretches the lr and GRL schedules over
# the steps still to run.
RESUMABLE_FIELDS = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.log_every_secs",
        "eval.every",
        "checkpoint.every",
        "checkpoint.max_to_keep",
        "data.data_dir",
    }
)
HEARTBEAT_SECONDS = 10.0
# Generous against network filesystems' attribute caching (NFS caches mtimes up to 60 s).
STALE_AFTER_SECONDS = 120.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ABSENT = "(absent)"


class WorkdirError(validate.InputError):
    """The workdir cannot be used for this run (launch.py: one "Error: ..." line)."""


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's lock."""


class ConfigChangedError(WorkdirError):
    """The workdir holds a run made with another config."""


# ------------------------------------------------------------------- path ----


def check_path(workdir: str) -> None:
    """Refuses a workdir that tljax cannot write: a cloud URL or an existing file.

    Args:
      workdir: the --workdir value.

    Raises:
      WorkdirError: with what to use instead.
    """
    if _URL.match(workdir):
        raise WorkdirError(
            f"--workdir={workdir} is a URL; tljax writes its workdir with local file APIs and "
            f"would create a local directory named {workdir.split('/')[0]!r}. Use a local path; "
            "for several hosts, a network filesystem (NFS, e.g. Filestore) mounted on all of them."
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is an existing file, not a directory.")


def make(workdir: str) -> bool:
    """Checks ``workdir`` (`check_path`) and creates it if needed.

    Args:
      workdir: the --workdir value.

    Returns:
      Whether it was created now.

    Raises:
      WorkdirError: a URL, a file, or a path that cannot be created.
    """
    check_path(workdir)
    if os.path.isdir(workdir):
        return False
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise WorkdirError(f"Cannot create --workdir={workdir}: {error}") from None
    return True


def is_used(workdir: str) -> bool:
    """Whether ``workdir`` holds something a run made: a checkpoint or results.

    Args:
      workdir: a run's workdir.

    Returns:
      True if it has a checkpoint step directory, results.json or results.partial.json.
    """
    if checkpoints.step_directories(os.path.join(workdir, "checkpoints")):
        return True
    names = (run_results.RESULTS_FILE, run_results.PARTIAL_RESULTS_FILE)
    return any(os.path.exists(os.path.join(workdir, name)) for name in names)


# ----------------------------------------------------------------- config ----


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """``config`` as it is written to config.json (JSON types: tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def recorded_config(workdir: str) -> tuple[dict | None, str | None]:
    """The config a workdir's run was made with.

    Args:
      workdir: a run's workdir.

    Returns:
      (config, file it came from): config.json or, in a workdir from before config.json was
      written, the config in results.json / results.partial.json; (None, None) if none.
    """
    for name in (CONFIG_FILE, run_results.RESULTS_FILE, run_results.PARTIAL_RESULTS_FILE):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            raise WorkdirError(f"Cannot read {path} ({error}); fix or remove it.") from None
        saved = saved if name == CONFIG_FILE else saved.get("config")
        if isinstance(saved, dict):
            return saved, path
    return None, None


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """Fields whose values differ between two configs (nested dicts).

    Args:
      old: the recorded config.
      new: this launch's config.

    Returns:
      (dotted field, old value, new value) per differing field, sorted by field; a field one
      side lacks has the value "(absent)".
    """
    old_flat, new_flat = _flatten(old), _flatten(new)
    changes = []
    for field in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(field, _ABSENT), new_flat.get(field, _ABSENT)
        if not _same(before, after):
            changes.append((field, before, after))
    return changes


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        # 10 and 10.0 are one value (a field typed float, set from an int); NaN equals NaN.
        return not isinstance(b, bool) and (a == b or (math.isnan(a) and math.isnan(b)))
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= _flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def check_config(
    workdir: str, config: ml_collections.ConfigDict, allow_change: bool, write: bool
) -> None:
    """Stops a launch whose config differs from the one the workdir's run was made with.

    Args:
      workdir: the run's workdir.
      config: this launch's config.
      allow_change: the change is deliberate (--allow_config_change): log it and go on.
      write: record the config in config.json (process 0 only).

    Raises:
      ConfigChangedError: fields outside `RESUMABLE_FIELDS` differ and ``allow_change`` is
        False; the message lists every differing field.
    """
    new = config_dict(config)
    old, source = recorded_config(workdir)
    if old is None or not is_used(workdir):
        if old is None and is_used(workdir):
            logging.warning("%s has no recorded config; recording this launch's.", workdir)
        if write:
            _write_json(os.path.join(workdir, CONFIG_FILE), new)
        return
    changes = config_changes(old, new)
    blocking = [change for change in changes if change[0] not in RESUMABLE_FIELDS]
    if blocking and not allow_change:
        raise ConfigChangedError(_changed_message(workdir, source, blocking))
    for field, before, after in changes:
        line = _change_line(field, before, after)
        if field in RESUMABLE_FIELDS:
            logging.info("Config change (may change on resume): %s", line)
        else:
            logging.warning("Config change (allowed by --allow_config_change): %s", line)
    if changes and write:
        _write_json(os.path.join(workdir, CONFIG_FILE), new)


def _changed_message(workdir: str, source: str, changes: list[tuple[str, Any, Any]]) -> str:
    lines = "\n".join("  " + _change_line(*change) for change in changes)
    return (
        f"{workdir} holds a run made with another config ({source}); this launch differs in:\n"
        f"{lines}\nResuming would continue that run's checkpoints under the new config. Use a "
        "new --workdir, the config that made the run, or --allow_config_change (argument "
        "allow_config_change=True of train_and_evaluate) if the change is deliberate. "
        f"These may change on resume without it: {', '.join(sorted(RESUMABLE_FIELDS))}."
    )


def _change_line(field: str, before: Any, after: Any) -> str:
    return f"{field}: {_show(before)} -> {_show(after)}"


def _show(value: Any) -> str:
    text = value if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _write_json(path: str, value: Any) -> None:
    # Whole or not at all: the other processes of the run may read it meanwhile.
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------- lock ----


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a workdir's lock."""

    host: str
    pid: int
    pid_start: int | None  # the process's start time (/proc), telling a reused pid apart
    since: str
    token: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.since})"


class WorkdirLock:
    """The workdir's lock file: taken atomically, refreshed while held, stale ones taken over."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock, or fails at once if a live process holds it.

        Raises:
          WorkdirBusyError: naming the holder (host, pid, since when).
        """
        me = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_process_state(os.getpid())[1],
            since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            token=uuid.uuid4().hex,
        )
        # A few rounds: a stale lock taken away, or a holder that just released, means try again.
        for _ in range(3):
            if self._create(me):
                self.holder = me
                self._start_heartbeat()
                return
            raw, holder, age = self._read()
            if raw is None:
                continue
            stale = _stale_reason(holder, age)
            if stale is None:
                raise WorkdirBusyError(self._busy_message(holder, age))
            if self._remove_if_unchanged(raw):
                logging.warning("Took over the lock %s: %s.", self.path, stale)
        raise WorkdirBusyError(f"Could not take {self.path}: other processes keep taking it.")

    def release(self) -> None:
        """Stops refreshing the lock and removes it, if this object still holds it."""
        if self.holder is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._current_token() == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.holder = None

    def _create(self, me: Holder) -> bool:
        # Written whole to a private file, then linked into place: the link is atomic and fails
        # if the lock exists (also over NFS), so a lock file never appears half-written.
        tmp = f"{self.path}.{me.token}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(me), f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            return self._create_exclusive(me)  # a filesystem without hard links
        finally:
            os.remove(tmp)

    def _create_exclusive(self, me: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(me), f)
        return True

    def _read(self) -> tuple[bytes | None, Holder | None, float]:
        """(raw content, holder or None if unreadable, age in seconds); raw None if gone."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None, None, 0.0
        try:
            holder = Holder(**json.loads(raw))
        except (ValueError, TypeError):
            holder = None
        return raw, holder, age

    def _current_token(self) -> str | None:
        _, holder, _ = self._read()
        return holder.token if holder else None

    def _remove_if_unchanged(self, raw: bytes) -> bool:
        # Renamed first, then checked: two processes taking over the same stale lock cannot both
        # remove it, and one that moved a fresh lock (taken meanwhile) puts it back.
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = f.read()
        if moved == raw:
            os.remove(aside)
            return True
        os.rename(aside, self.path)
        return False

    def _busy_message(self, holder: Holder | None, age: float) -> str:
        who = holder.describe() if holder else "an unknown process (the lock is unreadable)"
        if holder and holder.host == socket.gethostname():
            gone = "it is taken over as soon as that process is gone"
        else:
            gone = (
                f"a lock from another host is taken over once not refreshed for "
                f"{STALE_AFTER_SECONDS:.0f} s (last refreshed {age:.0f} s ago)"
            )
        return (
            f"{os.path.dirname(self.path)} is in use by {who}: another run is writing there. "
            f"Use another --workdir, or wait for that run to end; {gone}."
        )

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name="tljax-workdir-lock", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        # A live run's lock stays fresh, so other hosts never take it over.
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if self._current_token() != self.holder.token:
                    logging.warning("Lost the lock %s: another process took it.", self.path)
                    return
                os.utime(self.path)
            except OSError as error:
                logging.warning("Cannot refresh the lock %s: %s", self.path, error)


def _stale_reason(holder: Holder | None, age: float) -> str | None:
    """Why a lock is left behind by a process that is gone, or None if it may be alive."""
    if holder is None:
        if age > STALE_AFTER_SECONDS:
            return f"it is unreadable and was not refreshed for {age:.0f} s"
        return None
    if holder.host == socket.gethostname():
        if _alive(holder.pid, holder.pid_start):
            return None
        return f"its process {holder.pid} on {holder.host} is no longer running"
    if age > STALE_AFTER_SECONDS:
        return f"host {holder.host} (pid {holder.pid}) has not refreshed it for {age:.0f} s"
    return None


def _alive(pid: int, pid_start: int | None) -> bool:
    """Whether process ``pid`` of this host runs and is the one that started at ``pid_start``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    state, start = _process_state(pid)
    if state == "Z":
        return False  # exited, waiting to be reaped
    return pid_start is None or start is None or start == pid_start


def _process_state(pid: int) -> tuple[str | None, int | None]:
    """(state letter, start time in clock ticks after boot) from /proc; Nones without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None, None
    # The command name (field 2) may hold spaces and parentheses; fields 3... follow its ')'.
    fields = stat.rpartition(")")[2].split()
    return fields[0], int(fields[19])


# ------------------------------------------------------------------ claim ----


@contextlib.contextmanager
def claim(
    workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool = False
) -> Iterator[None]:
    """Holds ``workdir`` for one run: path checked, lock taken, config checked and recorded.

    On exit the lock is released, and a workdir left without checkpoints or results is left
    as it was found (no config.json; removed if this call created it and it is empty).

    Args:
      workdir: the run's workdir.
      config: the run's config.
      allow_config_change: the run deliberately resumes with a changed config.

    Yields:
      None, while the workdir is held.

    Raises:
      WorkdirError: the path cannot be used, another run holds it (`WorkdirBusyError`), or its
        run was made with another config (`ConfigChangedError`).
    """
    check_path(workdir)
    # The processes of one run share the workdir: process 0 holds it for all of them.
    is_lead = jax.process_index() == 0
    lock = WorkdirLock(workdir)
    created, error = False, None
    try:
        if is_lead:
            created = make(workdir)
            lock.acquire()
        check_config(workdir, config, allow_config_change, write=is_lead)
    except WorkdirError as caught:
        error = caught
    try:
        _agree(error, workdir)
        yield
    finally:
        if lock.holder is not None:
            _tidy(workdir, created, lock)


def _agree(error: WorkdirError | None, workdir: str) -> None:
    # All processes of a run stop together, rather than some waiting forever for the others.
    if jax.process_count() > 1:
        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and failed.any():
            error = WorkdirError(
                f"Process(es) {np.flatnonzero(failed).tolist()} could not claim {workdir}; "
                "see their logs."
            )
    if error is not None:
        raise error


def _tidy(workdir: str, created: bool, lock: WorkdirLock) -> None:
    # The config is dropped before the lock: once released, another run may record its own.
    if not is_used(workdir):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(workdir, CONFIG_FILE))
    lock.release()
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(workdir)  # only if empty


def guarded(train_fn: Callable[..., dict]) -> Callable[..., dict]:
    """Wraps ``train_fn(config, workdir, ...)`` in `claim`, adding ``allow_config_change``.

    Args:
      train_fn: the trainer (`tljax.train.train_and_evaluate`).

    Returns:
      ``train_fn`` taking a keyword ``allow_config_change=False`` and holding the workdir while
      it runs.
    """

    @functools.wraps(train_fn)
    def train_in_workdir(config, workdir, *args, allow_config_change: bool = False, **kwargs):
        with claim(workdir, config, allow_config_change):
            return train_fn(config, workdir, *args, **kwargs)

    return train_in_workdir
