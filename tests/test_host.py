"""tljax.host: the CPU allocator setting that keeps XLA's per-step buffers mapped."""

import sys

import pytest

from tljax import host


@pytest.fixture
def fresh_host(monkeypatch):
    monkeypatch.setattr(host, "_applied", False)
    return host


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retain_freed_memory_applies_on_linux(fresh_host):
    assert fresh_host.retain_freed_memory()
    assert fresh_host.retain_freed_memory()  # Idempotent.


def test_retain_freed_memory_can_be_disabled(fresh_host, monkeypatch):
    monkeypatch.setenv(host.ENV_VAR, "0")
    assert not fresh_host.retain_freed_memory()
    assert not fresh_host._applied


def test_retain_freed_memory_without_libc(fresh_host, monkeypatch):
    monkeypatch.setattr(host.ctypes.util, "find_library", lambda name: None)
    assert not fresh_host.retain_freed_memory()
