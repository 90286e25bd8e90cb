"""What the tljax step benchmarks share: random labelled images and the step timer."""

import statistics
import time

import jax
import numpy as np


def random_labelled_images(
    n: int, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random uint8 images and int32 labels in ``tljax.data.load_split``'s layout.

    A step's cost depends on the shapes only, so benchmarks can run on these where no dataset
    (or no TensorFlow) is available.

    Args:
        n: number of examples.
        image_shape: (height, width, channels).
        num_classes: labels are drawn from 0..num_classes-1.
        seed: numpy seed.

    Returns:
        {'image': uint8 (n, *image_shape), 'label': int32 (n,)}.
    """
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, num_classes, n).astype(np.int32),
    }


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
