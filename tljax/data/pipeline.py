"""Input pipelines: seeded, step-addressable batch streams and device prefetch.

A batch is a pure function of (seed, stream, step): epoch permutations are
derived from the seed, so a resumed run sees exactly the batches an
uninterrupted run would have seen, and every host computes the same global
batch and keeps its own rows (see `tljax.parallel.process_rows`).
"""

import dataclasses
import functools
import queue
import threading
from collections.abc import Iterator

import numpy as np

from tljax import parallel


@dataclasses.dataclass(frozen=True)
class Stream:
    """One labelled or unlabelled slice of every training batch.

    Attributes:
      name: prefix of the batch keys, e.g. 'source' gives 'source_image'.
      arrays: the whole split in memory, e.g. {'image': uint8 NHWC, 'label': int32}.
      batch_size: global rows per step from this stream.
      keys: which entries of `arrays` go into the batch (leave out 'label' for
        unlabelled domains so a method cannot use target labels by accident).
    """

    name: str
    arrays: dict[str, np.ndarray]
    batch_size: int
    keys: tuple[str, ...] = ("image", "label")

    @property
    def num_examples(self) -> int:
        return len(next(iter(self.arrays.values())))


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


def host_batch(streams: tuple[Stream, ...], seed: int, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global training batch for `step`.

    Args:
      streams: the batch layout.
      seed: run seed.
      step: training step.

    Returns:
      Dict '<stream>_<key>' -> numpy rows for this process.
    """
    batch = {}
    for stream_id, stream in enumerate(streams):
        idx = stream_indices(seed, stream_id, step, stream.batch_size, stream.num_examples)
        idx = idx[parallel.process_rows(stream.batch_size)]
        for key in stream.keys:
            batch[f"{stream.name}_{key}"] = stream.arrays[key][idx]
    return batch


def train_batches(streams, seed: int, start_step: int, mesh, prefetch: int = 2) -> Iterator[dict]:
    """Global, sharded training batches from `start_step` on, prepared ahead in a thread.

    Args:
      streams: the batch layout (tuple of `Stream`).
      seed: run seed.
      start_step: first step to produce (resumed runs start past 0).
      mesh: the data mesh.
      prefetch: batches prepared ahead of the consumer.

    Returns:
      An iterator of dicts of sharded `jax.Array`s.
    """

    def produce(step):
        return parallel.global_batch(host_batch(streams, seed, step), mesh)

    return _prefetch(produce, start_step, prefetch)


_JOIN_TIMEOUT_S = 30.0


def _prefetch(produce, start_step: int, size: int) -> Iterator:
    # A daemon thread overlaps host-side gathering and transfer with device compute;
    # closing the generator stops it, so finished runs leave no thread behind.
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def worker():
        step = start_step
        try:
            while not stop.is_set():
                put(("ok", produce(step)))
                step += 1
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer
            put(("error", error))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = buffer.get()
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        # Wait for the batch in progress: a daemon thread killed inside a JAX/TF call at
        # interpreter exit aborts the process (SIGABRT after the run's results were written).
        thread.join(timeout=_JOIN_TIMEOUT_S)


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, mesh) -> Iterator[dict]:
    """The whole split in fixed-size sharded batches, the tail padded and masked.

    Args:
      arrays: {'image': ..., 'label': ...} of the split.
      batch_size: global rows per batch (a multiple of the device count).
      mesh: the data mesh.

    Returns:
      Iterator of dicts with the arrays' keys plus 'mask' (1.0 real, 0.0 padding).
    """
    n = len(next(iter(arrays.values())))
    rows = parallel.process_rows(batch_size)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        batch = {key: value[idx] for key, value in arrays.items()}
        batch["mask"] = mask
        yield parallel.global_batch({k: v[rows] for k, v in batch.items()}, mesh)
