"""Host-side runtime settings for training on CPU.

Why: XLA:CPU allocates an executable's buffers afresh on every call. glibc serves allocations of
more than 128 KiB with ``mmap`` and unmaps them on ``free``, so every train step page-faults its
working memory in again, at about 2.6 ms per MB on the development VM (a 100 MB first-touch copy
runs at 0.76 GB/s, a warm one at 14 GB/s). Keeping freed memory in the heap removes those faults:
the DANN step runs 1.1-1.3x faster (``benchmarks/speed_dann.py``). This is the in-process form
of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<big>``; freed memory stays with the process
(up to ``_TRIM_THRESHOLD_BYTES`` at the top of the heap) instead of returning to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from absl import logging

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**30
# Set to 0 to keep glibc's defaults.
ENV_VAR = "TLJAX_RETAIN_HOST_MEMORY"

_applied = False


def retain_freed_memory() -> bool:
    """Makes glibc keep freed memory in the heap instead of unmapping it (once per process).

    Does nothing off Linux/glibc, or when the environment variable ``TLJAX_RETAIN_HOST_MEMORY``
    is ``0``.

    Returns:
      Whether the setting is in effect.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):  # Not glibc (macOS, musl without mallopt).
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    if _applied:
        logging.info("glibc keeps freed memory (mallopt); %s=0 disables.", ENV_VAR)
    return _applied
