"""What the tljax step benchmarks share: random labelled images and the step timer."""

import statistics
import time

import jax

from tljax.data.synthetic import random_labelled_images  # noqa: F401  (re-exported)


def median_step_ms(compiled, state, next_batch, steps: int, warmup: int = 5):
    """Median wall time of single compiled train steps, each waited for.

    The median (what the PyTorch peer reports too) keeps a shared machine's bursts out of the
    figure. Waiting for each step costs nothing: the next step needs its state anyway.

    Args:
        compiled: ``(state, batch) -> (state, metrics)``, e.g. ``train.compile_train_step``'s.
        state: the train state (donated to each step).
        next_batch: ``() -> batch``; its time counts (the input pipeline is part of a step).
        steps: timed steps.
        warmup: untimed steps first.

    Returns:
        (median ms per step, the state after the last step).
    """
    for _ in range(warmup):
        state, metrics = compiled(state, next_batch())
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, next_batch())
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, state
