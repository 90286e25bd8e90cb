"""Loads a whole tfds split into memory, failing fast and clearly when it cannot be had."""

from __future__ import annotations

import functools
import os
import socket
import threading

import numpy as np
import tensorflow_datasets as tfds

from tljax.data import DatasetUnavailableError

# Imported for their side effect: registering the tljax builders with tfds.
from tljax.data import embedded as _embedded  # noqa: F401
from tljax.data import mnist_m as _mnist_m  # noqa: F401

OFFLINE_ALTERNATIVE = (
    "embedded_digits/mnist, mnist_m, optdigits and syn_digits ship inside installed packages; "
    "use --config=configs/dann.py (default data=embedded) or configs/da.py"
)
# tfds's own datasets come from here (prepared copies and most raw files, MNIST included).
_DEFAULT_HOSTS = ("storage.googleapis.com",)
_PROBE_TIMEOUT_S = 5.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def load_split(name: str, split: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Loads one split of a tfds dataset fully into memory, preparing it first if needed.

    Use ``tljax.data.load_split``, which reads exported splits before asking tfds.

    Repeated calls with the same arguments in one process return the cached arrays; they are
    read-only, so copy them before modifying.

    Args:
      name: tfds name, e.g. ``"mnist"``, ``"mnist_m"`` or ``"embedded_digits/mnist_m"``.
      split: tfds split spec, e.g. ``"train"`` or ``"test[:10%]"``.
      data_dir: tfds data directory; None means tfds's default (``~/tensorflow_datasets``
        or ``$TFDS_DATA_DIR``).

    Returns:
      ``{"image": uint8 (N, H, W, C), "label": int32 (N,)}``.

    Raises:
      DatasetUnavailableError: if the dataset is unknown, or is not prepared in ``data_dir``
        and cannot be downloaded or built here.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    return dict(_load_split_cached(name, split, data_dir))


@functools.lru_cache(maxsize=8)
def _load_split_cached(name: str, split: str, data_dir: str | None) -> dict[str, np.ndarray]:
    builder = _prepared_builder(name, data_dir)
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    image = np.asarray(arrays["image"], np.uint8)
    label = np.asarray(arrays["label"]).astype(np.int32)
    # Shared between callers through the cache, so nobody may change them in place.
    image.setflags(write=False)
    label.setflags(write=False)
    return {"image": image, "label": label}


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the builder for ``name`` with its data prepared in ``data_dir``."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # tfds raises several types for unknown names / configs.
        raise _unavailable(name, f"tfds cannot find it ({_first_line(err)})", full=False) from err
    if builder.is_prepared():
        return builder

    offline = getattr(builder, "OFFLINE", False)
    if not offline and not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        host = _first_unreachable_host(getattr(builder, "DOWNLOAD_HOSTS", _DEFAULT_HOSTS))
        if host is not None:
            reason = f"it is not prepared in {_where(builder)} and {host} cannot be reached"
            raise _unavailable(name, reason, full=True)
    try:
        config = tfds.download.DownloadConfig(try_download_gcs=not offline)
        builder.download_and_prepare(download_config=config)
    except Exception as err:
        reason = f"preparing it in {_where(builder)} failed ({_first_line(err)})"
        raise _unavailable(name, reason, full=not offline) from err
    return builder


def _first_unreachable_host(hosts: tuple[str, ...]) -> str | None:
    """Returns the first host that does not accept an HTTPS connection quickly, if any.

    Without this, tfds retries a failed download 10 times with exponential backoff, which
    takes over three minutes to give up when there is no network.
    """
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return None  # Direct connections say nothing about a proxy; let tfds try.
    for host in hosts:
        if not _can_connect(host, 443, _PROBE_TIMEOUT_S):
            return host
    return None


def _can_connect(host: str, port: int, timeout: float) -> bool:
    connected = threading.Event()

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                connected.set()
        except OSError:
            pass

    # A thread, because name resolution ignores the socket timeout and can hang for long.
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return connected.is_set()


def _where(builder: tfds.core.DatasetBuilder) -> str:
    return os.fspath(builder.data_dir_root)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].rstrip('.:')}" if text else type(err).__name__


def _unavailable(name: str, reason: str, full: bool) -> DatasetUnavailableError:
    message = f"Dataset '{name}' is unavailable: {reason}. Offline alternative: "
    message += OFFLINE_ALTERNATIVE + "."
    if full:
        message += (
            f" To use '{name}', prepare it on a machine with network access, e.g. "
            f"`tfds build {name} --imports=tljax.data --data_dir=DIR` or "
            f"`python -c \"import tljax.data as d; d.load_split('{name}', 'train', 'DIR')\"`, "
            "then copy DIR to this machine and pass it as data_dir."
        )
    return DatasetUnavailableError(message)
