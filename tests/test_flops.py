"""tljax.flops: FLOP counts and the GFLOP/s and % columns of the speed benchmarks."""

import jax
import jax.numpy as jnp
import pytest

from tljax import flops


class _Compiled:
    def __init__(self, analysis):
        self._analysis = analysis

    def cost_analysis(self):
        if isinstance(self._analysis, Exception):
            raise self._analysis
        return self._analysis


def test_compiled_flops_of_a_real_program():
    compiled = jax.jit(lambda a: a @ a).lower(jnp.ones((64, 64))).compile()
    assert flops.compiled_flops(compiled) == pytest.approx(2 * 64**3, rel=0.1)


@pytest.mark.parametrize(
    "analysis",
    [
        {},
        {"bytes accessed": 1.0},
        {"flops": float("nan")},
        {"flops": -1.0},
        None,
        [],
        NotImplementedError(),
    ],
)
def test_compiled_flops_is_none_without_a_usable_count(analysis):
    assert flops.compiled_flops(_Compiled(analysis)) is None


def test_compiled_flops_reads_the_older_list_form():
    assert flops.compiled_flops(_Compiled([{"flops": 5.0}])) == 5.0


def test_model_flops_uses_the_standard_count_whatever_the_order():
    # The speed table used to take the standard lowering's count only from rows after it:
    # `--impls=auto,xla` printed nan GFLOP/s and nan% for auto.
    standard = 2.7e9
    for counts in ({"auto": 1.9e9, "xla": standard}, {"xla": standard, "auto": 1.9e9}):
        assert flops.model_flops(counts, count_standard=lambda: pytest.fail("compiled")) == standard


def test_model_flops_counts_the_standard_lowering_when_it_was_not_timed():
    assert flops.model_flops({"auto": 1.9e9}, count_standard=lambda: 2.7e9) == 2.7e9
    assert flops.model_flops({"xla": None}, count_standard=lambda: 2.7e9) == 2.7e9
    assert flops.model_flops({"auto": 1.9e9}) is None
    assert flops.model_flops({}, count_standard=lambda: None) is None


def test_rates_and_cells():
    rate = flops.gflops_per_s(2.7e9, 13.5)  # 2.7 GFLOP in 13.5 ms
    assert rate == pytest.approx(200.0)
    assert flops.percent_of(rate, 400.0) == pytest.approx(50.0)
    assert flops.fmt(rate) == "200"
    assert flops.fmt(flops.percent_of(rate, 400.0), ".0f", "%") == "50%"
    # Unknown counts give '-' cells, never nan.
    for unknown in (flops.gflops_per_s(None, 13.5), flops.gflops_per_s(float("nan"), 13.5)):
        assert unknown is None
        assert flops.fmt(unknown) == "-"
        assert flops.fmt(flops.percent_of(unknown, 400.0), ".0f", "%") == "-"
    assert flops.gflops_per_s(2.7e9, 0.0) is None
    assert flops.percent_of(200.0, None) is None
