"""Batch streams: determinism by step, epochs, per-process rows, eval padding."""

import jax
import numpy as np
import pytest

from tljax import parallel
from tljax.data import pipeline


def test_stream_indices_cover_each_epoch_once_and_repeat_by_step():
    n, batch = 10, 4
    stream = np.concatenate([pipeline.stream_indices(0, 0, s, batch, n) for s in range(5)])
    assert sorted(stream[:10]) == list(range(10))  # epoch 0 is a permutation
    assert sorted(stream[10:20]) == list(range(10))  # and so is epoch 1
    again = pipeline.stream_indices(0, 0, 3, batch, n)
    np.testing.assert_array_equal(again, stream[12:16])
    assert not np.array_equal(pipeline.stream_indices(1, 0, 0, batch, n), stream[:4])


def test_unlabelled_stream_has_no_labels_and_train_batches_are_sharded():
    arrays = {
        "image": np.arange(20 * 2, dtype=np.uint8).reshape(20, 2),
        "label": np.arange(20, dtype=np.int32),
    }
    streams = (
        pipeline.Stream("source", arrays, 8),
        pipeline.Stream("target", arrays, 8, ("image",)),
    )
    mesh = parallel.make_data_mesh()
    batches = pipeline.train_batches(streams, seed=0, start_step=2, mesh=mesh)
    batch = next(batches)
    batches.close()
    assert set(batch) == {"source_image", "source_label", "target_image"}
    assert batch["source_image"].sharding.is_equivalent_to(parallel.batch_sharded(mesh), 2)
    expected = pipeline.host_batch(streams, 0, 2)
    np.testing.assert_array_equal(np.asarray(batch["source_label"]), expected["source_label"])


def test_eval_batches_pad_and_mask_the_tail():
    arrays = {"image": np.zeros((10, 3), np.uint8), "label": np.arange(10, dtype=np.int32)}
    mesh = parallel.make_data_mesh()
    batches = list(pipeline.eval_batches(arrays, 8, mesh))
    assert len(batches) == 2
    assert float(sum(b["mask"].sum() for b in batches)) == 10
    np.testing.assert_array_equal(np.asarray(batches[1]["label"])[:2], [8, 9])


def test_check_batch_size_names_the_field():
    mesh = parallel.make_data_mesh()
    with pytest.raises(ValueError, match=f"train.batch_size=6 .* \\({jax.device_count()} devices"):
        parallel.check_batch_size("train.batch_size", 6, mesh)


def test_prefetch_thread_has_stopped_when_the_generator_closes():
    # A producer still running at interpreter exit aborts the process; closing must wait for it.
    import threading
    import time

    def slow_produce(step):
        time.sleep(0.05)
        return step

    before = set(threading.enumerate())
    batches = pipeline._prefetch(slow_produce, 3, 2)
    assert [next(batches) for _ in range(3)] == [3, 4, 5]
    batches.close()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_prefetch_reraises_producer_errors():
    def failing(step):
        if step == 1:
            raise RuntimeError("shard 1 unreadable")
        return step

    batches = pipeline._prefetch(failing, 0, 2)
    assert next(batches) == 0
    with pytest.raises(RuntimeError, match="shard 1 unreadable"):
        next(batches)
