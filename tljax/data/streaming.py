"""Grain worker processes that decode and augment folder images for the input pipeline.

A training batch is a pure function of (seed, stream, step) (`stream_indices`): every process
computes the same global batch of example indices and decodes only its own rows, and each row's
augmentation is seeded by (seed, stream, step, row of the global batch). So the same seed gives
the same batches on any number of hosts and worker processes, and the pipeline's whole iterator
state is the next step (with the file lists it reads, `tljax.data.pipeline.iterator_state`),
which the trainer saves with every checkpoint: a resumed run sees exactly the batches an
uninterrupted one would have.

The steps are a Grain ``MapDataset`` over step numbers, mapped by `TrainRows` and prefetched by
``mp_prefetch`` in ``workers`` spawned processes (each works on every ``workers``-th step, and
Grain returns them in order). Evaluation reads its batches the same way (`EvalRows`). This
module imports no JAX: the worker processes unpickle it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from tljax.data.folders import FolderImages

# Steps are addressed from 0 up to here; no run gets near it.
_LAST_STEP = 2**62
_BUFFER_PER_WORKER = 2
_NEVER_SHARED = 2**62


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, stream_id: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream_id, epoch]).permutation(n)


def stream_indices(seed: int, stream_id: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices of `step`'s batch: consecutive reads of per-epoch shuffles.

    Args:
      seed: run seed.
      stream_id: distinguishes streams of the same run.
      step: training step.
      batch_size: global rows per step.
      n: examples in the split.

    Returns:
      int array [batch_size] of indices into the split.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(seed, stream_id, int(epoch), n)[offsets[sel]]
    return out


@dataclasses.dataclass(frozen=True)
class StreamedImages:
    """One stream's folder images, as a training batch entry.

    Attributes:
      key: the batch key, e.g. 'source_image'.
      images: the split's images.
      stream_id: the stream's position in the batch layout (seeds its shuffles).
      batch_size: global rows per step.
      host_rows: this process's rows of the global batch (`tljax.parallel.process_rows`).
    """

    key: str
    images: FolderImages
    stream_id: int
    batch_size: int
    host_rows: slice

    def rows(self, seed: int, step: int) -> np.ndarray:
        """This process's decoded, augmented rows of ``step``'s batch."""
        index = stream_indices(seed, self.stream_id, step, self.batch_size, len(self.images))
        global_rows = np.arange(self.batch_size)[self.host_rows]
        seeds = [(seed, self.stream_id, step, int(row)) for row in global_rows]
        return self.images.read(index[self.host_rows], seeds)


@dataclasses.dataclass(frozen=True)
class TrainRows:
    """step -> (step, {batch key: this process's decoded rows}): what each worker computes."""

    parts: tuple[StreamedImages, ...]
    seed: int

    def __call__(self, step: int) -> tuple[int, dict[str, np.ndarray]]:
        step = int(step)
        return step, {part.key: part.rows(self.seed, step) for part in self.parts}


@dataclasses.dataclass(frozen=True)
class EvalRows:
    """batch number -> this process's rows of that eval batch, decoded (tail padded)."""

    images: FolderImages
    batch_size: int
    host_rows: slice

    def __call__(self, number: int) -> np.ndarray:
        index = np.arange(number * self.batch_size, (number + 1) * self.batch_size)
        index = np.minimum(index, len(self.images) - 1)
        return self.images.read(index[self.host_rows])


def train_rows(
    parts: tuple[StreamedImages, ...], seed: int, start_step: int, workers: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, rows) for every step from ``start_step`` on, decoded in ``workers`` processes.

    Args:
      parts: the streamed entries of the batch.
      seed: run seed.
      start_step: the first step.
      workers: worker processes (0: decode in the calling thread).

    Returns:
      A Grain iterator; ``close()`` it to stop the workers.
    """
    steps = _dataset(start_step, _LAST_STEP)
    return _iterate(steps.map(TrainRows(parts, seed)), workers)


def eval_rows(images: FolderImages, batch_size: int, host_rows: slice, workers: int):
    """Decoded rows of each eval batch of ``images``, in order, from ``workers`` processes.

    Args:
      images: the eval split's images.
      batch_size: global rows per eval batch.
      host_rows: this process's rows of a batch.
      workers: worker processes (0: decode in the calling thread).

    Returns:
      A Grain iterator over one uint8 array per batch; ``close()`` it to stop the workers.
    """
    batches = -(-len(images) // batch_size)
    return _iterate(_dataset(0, batches).map(EvalRows(images, batch_size, host_rows)), workers)


def _dataset(start: int, stop: int):
    import grain  # noqa: PLC0415 - only runs that stream folders need it.

    return grain.MapDataset.range(start, stop)


def _iterate(dataset, workers: int):
    import grain  # noqa: PLC0415

    _let_grain_read_flags()
    # One thread per worker: each worker is one core's worth of decoding.
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    if workers:
        options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=_BUFFER_PER_WORKER
        )
        stream = stream.mp_prefetch(options)
        # Batches come back through the workers' pipes, not shared memory: Grain does not
        # unlink the shared memory of batches still buffered when an iterator is closed.
        no_shared_memory = grain.experimental.DatasetOptions(min_shm_size=_NEVER_SHARED)
        stream = grain.experimental.WithOptionsIterDataset(stream, no_shared_memory)
    return iter(stream)


def _let_grain_read_flags() -> None:
    # Grain reads its absl flags when it starts workers; outside an absl app (tests, notebooks)
    # they were never parsed, and reading them would raise.
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
