"""FLOP counts of compiled programs and the rates benchmarks report (GFLOP/s, % of a peak).

A step's "model FLOPs" are XLA's count for the standard lowering (``lax.conv``): the im2col
and Winograd lowerings do the same work, but XLA's count of them differs (it misses the FLOPs
inside loops, and Winograd does fewer multiplications), so every lowering's rate is its step
time against the standard count. ``model_flops`` picks that count from what was measured,
whatever order the lowerings ran in, and counts it when it was not measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

STANDARD_LOWERING = "xla"


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program, or None when XLA gives none.

    Args:
      compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``).

    Returns:
      The count, or None where ``cost_analysis()`` is unavailable, has no 'flops', or gives a
      value that is not a positive finite number.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Some backends do not implement it.
        return None
    if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    return _positive(analysis.get("flops"))


def model_flops(
    counts: Mapping[str, float | None],
    count_standard: Callable[[], float | None] | None = None,
    standard: str = STANDARD_LOWERING,
) -> float | None:
    """The standard lowering's FLOP count, for every lowering's rate.

    Args:
      counts: lowering -> its measured FLOP count (None where XLA gave none), in any order.
      count_standard: counts the standard lowering's FLOPs when ``counts`` lacks a usable one
        (e.g. compiles the step with ``lax.conv`` without running it).
      standard: the standard lowering's name.

    Returns:
      The count, or None when neither source gives one.
    """
    flops = _positive(counts.get(standard))
    if flops is None and count_standard is not None:
        flops = _positive(count_standard())
    return flops


def gflops_per_s(flops: float | None, ms: float) -> float | None:
    """Achieved GFLOP/s of ``flops`` done in ``ms`` milliseconds; None without a count."""
    flops = _positive(flops)
    if flops is None or not ms > 0:
        return None
    return flops / ms * 1e-6


def percent_of(rate: float | None, peak: float | None) -> float | None:
    """``rate`` as a percentage of ``peak`` (same units); None when either is unknown."""
    rate, peak = _positive(rate), _positive(peak)
    return None if rate is None or peak is None else 100 * rate / peak


def fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    """A table cell: the formatted value, or '-' when it is unknown."""
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def _positive(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None
