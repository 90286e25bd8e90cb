"""Input pipelines: seeded, step-addressable batch streams and device prefetch.

A batch is a pure function of (seed, stream, step): epoch permutations are
derived from the seed, so a resumed run sees exactly the batches an
uninterrupted run would have seen, and every host computes the same global
batch and keeps its own rows (see `tljax.parallel.process_rows`). Arrays held
in memory are gathered in a prefetch thread; folder images are decoded and
augmented by Grain worker processes (`tljax.data.streaming`), each host reading
only the files of its own rows. `iterator_state` is what a checkpoint stores of
the pipeline, and `check_resume` compares it on resume.
"""

import dataclasses
import queue
import threading
from collections.abc import Iterator

import numpy as np

from tljax import parallel
from tljax.data import streaming
from tljax.data.folders import FolderImages
from tljax.data.streaming import stream_indices
from tljax.validate import DataError


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


def host_batch(streams: tuple[Stream, ...], seed: int, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global training batch for `step`.

    Folder images are decoded and augmented here, in the calling thread (`train_batches`
    decodes them in worker processes instead).

    Args:
      streams: the batch layout.
      seed: run seed.
      step: training step.

    Returns:
      Dict '<stream>_<key>' -> numpy rows for this process.
    """
    batch = _in_memory_rows(streams, seed, step)
    for part in streamed_parts(streams):
        batch[part.key] = part.rows(seed, step)
    return {f"{s.name}_{k}": batch[f"{s.name}_{k}"] for s in streams for k in s.keys}


def _in_memory_rows(streams, seed: int, step: int) -> dict[str, np.ndarray]:
    batch = {}
    for stream_id, stream in enumerate(streams):
        idx = stream_indices(seed, stream_id, step, stream.batch_size, stream.num_examples)
        idx = idx[parallel.process_rows(stream.batch_size)]
        for key in stream.keys:
            if not isinstance(stream.arrays[key], FolderImages):
                batch[f"{stream.name}_{key}"] = stream.arrays[key][idx]
    return batch


def streamed_parts(streams: tuple[Stream, ...]) -> tuple[streaming.StreamedImages, ...]:
    """The batch entries that are folder images, decoded from files at every step."""
    return tuple(
        streaming.StreamedImages(
            f"{stream.name}_{key}",
            stream.arrays[key],
            stream_id,
            stream.batch_size,
            parallel.process_rows(stream.batch_size),
        )
        for stream_id, stream in enumerate(streams)
        for key in stream.keys
        if isinstance(stream.arrays[key], FolderImages)
    )


def iterator_state(streams: tuple[Stream, ...], seed: int, next_step: int) -> dict:
    """The input pipeline's whole state after ``next_step - 1``: saved with each checkpoint.

    Batches are a pure function of (seed, stream, step) and the examples each stream reads, so
    this is the next step, the seed, and what each stream reads: its size, and for a folder the
    fingerprint of its file list (files added or removed change the batches).

    Args:
      streams: the batch layout.
      seed: run seed.
      next_step: the step the pipeline produces next.

    Returns:
      A JSON-serialisable dict.
    """
    return {
        "next_step": int(next_step),
        "seed": int(seed),
        "streams": [_stream_state(stream) for stream in streams],
    }


def _stream_state(stream: Stream) -> dict:
    state = {"name": stream.name, "examples": stream.num_examples}
    for key in stream.keys:
        if isinstance(stream.arrays[key], FolderImages):
            files = stream.arrays[key].files
            state[key] = {"files": files.where, "fingerprint": files.fingerprint}
    return state


def check_resume(saved: dict | None, streams: tuple[Stream, ...], seed: int, step: int) -> None:
    """Raises DataError when a resumed run would not see the batches it would have seen.

    Args:
      saved: `iterator_state` stored with the checkpoint restored at ``step`` (None for a
        checkpoint written before states were stored: nothing to compare).
      streams: this launch's batch layout.
      seed: this launch's seed.
      step: the restored step.

    Raises:
      tljax.validate.DataError: naming what changed since the checkpoint.
    """
    if saved is None:
        return
    now = iterator_state(streams, seed, step)
    if saved == now:
        return
    changes = [
        f"{key}: {saved.get(key)!r} then, {now[key]!r} now"
        for key in ("next_step", "seed")
        if saved.get(key) != now[key]
    ]
    for before, after in zip(saved.get("streams", []), now["streams"], strict=False):
        if before != after:
            changes.append(
                f"stream {after['name']!r} read {_describe(before)} then, {_describe(after)} now"
            )
    raise DataError(
        f"The training data changed since the checkpoint of step {step} ({'; '.join(changes)}): "
        "the resumed run would not see the batches an uninterrupted run would. Restore the "
        "data, or start the run in a new workdir."
    )


def _describe(state: dict) -> str:
    files = [value for value in state.values() if isinstance(value, dict)]
    text = f"{state.get('examples')} examples"
    return text + "".join(f" ({f['files']}, list {f['fingerprint'][:12]})" for f in files)


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

    parts = streamed_parts(streams)
    if not parts:
        return _prefetch(
            lambda step: parallel.global_batch(host_batch(streams, seed, step), mesh),
            start_step,
            prefetch,
        )
    workers = max(part.images.options.workers for part in parts)
    decoded = streaming.train_rows(parts, seed, start_step, workers)

    def produce(step):
        decoded_step, batch = next(decoded)
        if decoded_step != step:  # The workers' order is Grain's promise; a break is a bug.
            raise RuntimeError(f"Input pipeline out of step: got {decoded_step}, wanted {step}.")
        batch |= _in_memory_rows(streams, seed, step)
        ordered = {f"{s.name}_{k}": batch[f"{s.name}_{k}"] for s in streams for k in s.keys}
        return parallel.global_batch(ordered, mesh)

    return _prefetch(produce, start_step, prefetch, on_close=decoded.close)


_JOIN_TIMEOUT_S = 30.0


def _prefetch(produce, start_step: int, size: int, on_close=None) -> Iterator:
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
        if on_close is not None:
            on_close()


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
    arrays = {key: _held(value) for key, value in arrays.items()}
    streamed = {k: v for k, v in arrays.items() if isinstance(v, FolderImages)}
    decoded = {
        key: streaming.eval_rows(images, batch_size, rows, images.options.workers)
        for key, images in streamed.items()
    }
    try:
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size)
            mask = (idx < n).astype(np.float32)
            idx = np.minimum(idx, n - 1)
            batch = {key: value[idx] for key, value in arrays.items() if key not in streamed}
            batch["mask"] = mask
            batch = {k: v[rows] for k, v in batch.items()}
            batch |= {key: next(rows_of) for key, rows_of in decoded.items()}
            yield parallel.global_batch(batch, mesh)
    finally:
        for rows_of in decoded.values():
            rows_of.close()


def _held(value):
    # Folder images small enough are decoded once and evaluated from memory afterwards.
    if isinstance(value, FolderImages):
        decoded = value.eval_array()
        return value if decoded is None else decoded
    return value
