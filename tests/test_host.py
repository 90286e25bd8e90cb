"""tljax.host: the CPU allocator setting that keeps XLA's per-step buffers mapped."""

import concurrent.futures
import ctypes
import ctypes.util
import multiprocessing
import sys

import pytest

from tljax import host

# glibc's <malloc.h>: the parameters retain_freed_memory sets, and mmap's threshold.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_DEFAULT_MMAP_MAX, GLIBC_DEFAULT_MMAP_THRESHOLD = 65536, 128 * 1024
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
MIB = 1 << 20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (all fields size_t)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes the heap took from the system (sbrk)
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in separately mmapped blocks
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",  # free bytes held in the heap
            "keepcost",
        )
    ]


def _glibc():
    """This process's glibc with malloc, free, mallopt, malloc_trim and mallinfo2 typed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc >= 2.33")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc


def _allocate_and_free(libc, size: int) -> tuple[int, int]:
    """Mallocs and frees `size` bytes (untouched, so no pages are faulted in).

    Returns:
      (bytes of the block that came from a separate mmap, free heap bytes kept after the free).
    """
    before = libc.mallinfo2()
    block = libc.malloc(size)
    assert block
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    return during.hblkhd - before.hblkhd, after.fordblks


@pytest.fixture
def fresh_host(monkeypatch):
    monkeypatch.setattr(host, "_applied", False)
    return host


def _measure_retained_block() -> dict[str, int]:
    """Allocates and frees one large block with glibc's defaults, then after the setting.

    Runs in a fresh process: there the heap holds little free memory, so the block is larger
    than any free chunk (and smaller than the 1 GiB trim threshold), as in a run's first steps.
    """
    libc = _glibc()
    size = libc.mallinfo2().fordblks + 64 * MIB
    default_mapped, _ = _allocate_and_free(libc, size)
    applied = host.retain_freed_memory()
    mapped, kept = _allocate_and_free(libc, size)
    return dict(
        size=size,
        default_mapped=default_mapped,
        applied=applied,
        mapped=mapped,
        kept=kept,
        again=host.retain_freed_memory(),
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retain_freed_memory_applies_on_linux():
    """After the call, a large block comes from the heap (not its own mmap) and stays in the
    heap once freed, so the next step reuses mapped pages instead of faulting in new ones."""
    _glibc()  # Skips without mallinfo2.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        measured = pool.submit(_measure_retained_block).result()
    size = measured["size"]
    assert measured["default_mapped"] >= size  # glibc's defaults: mmapped, unmapped on free.
    assert measured["applied"] and measured["again"]  # Idempotent.
    assert measured["mapped"] == 0
    assert measured["kept"] >= size


def test_retain_freed_memory_sets_glibc_parameters(fresh_host, monkeypatch):
    """Exactly mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 1 GiB), once per process."""
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": mallopt}))
    monkeypatch.setattr(host.ctypes.util, "find_library", lambda name: "libc.so.6")
    assert fresh_host.retain_freed_memory()
    assert sorted(calls) == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**30)]
    assert fresh_host.retain_freed_memory()
    assert len(calls) == 2  # Not applied again.


def test_retain_freed_memory_reports_a_refused_setting(fresh_host, monkeypatch):
    monkeypatch.setattr(
        host.ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": lambda p, v: 0})
    )
    monkeypatch.setattr(host.ctypes.util, "find_library", lambda name: "libc.so.6")
    assert not fresh_host.retain_freed_memory()
    assert not fresh_host._applied


def test_retain_freed_memory_can_be_disabled(fresh_host, monkeypatch):
    monkeypatch.setenv(host.ENV_VAR, "0")
    assert not fresh_host.retain_freed_memory()
    assert not fresh_host._applied


def test_retain_freed_memory_without_libc(fresh_host, monkeypatch):
    monkeypatch.setattr(host.ctypes.util, "find_library", lambda name: None)
    assert not fresh_host.retain_freed_memory()
