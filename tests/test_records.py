"""tfds splits prepared as array_record: read record by record, streamed when large."""

import logging
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import shrink
from PIL import Image

from tljax import data, train
from tljax.data import folders, pipeline, records, transforms
from tljax.validate import DataError

NAME = "tljax_test_records"
FIXED, VARIED = f"{NAME}/fixed", f"{NAME}/varied"
SPLIT_SIZES = {"train": 40, "test": 20}


class TljaxTestRecords(tfds.core.GeneratorBasedBuilder):
    """Random 10-class images: 28x28 grey ('fixed') or 3-channel of varying sizes ('varied')."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in ("fixed", "varied")]

    def _info(self):
        fixed = self.builder_config.name == "fixed"
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1) if fixed else (None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        rng = np.random.default_rng(["train", "test"].index(split))
        for i in range(SPLIT_SIZES[split]):
            if self.builder_config.name == "fixed":
                image = rng.integers(0, 256, (28, 28, 1), np.uint8)
            else:
                height, width = rng.integers(20, 60, size=2)
                image = rng.integers(0, 256, (height, width, 3), np.uint8)
            yield f"{split}{i}", {"image": image, "label": i % 10}


def _prepare(directory, file_format):
    for config in ("fixed", "varied"):
        builder = TljaxTestRecords(config=config, data_dir=str(directory))
        builder.download_and_prepare(
            file_format=file_format,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return str(directory)


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    """A tfds data_dir holding both configs prepared as array_record."""
    return _prepare(tmp_path_factory.mktemp("array_record"), "array_record")


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory):
    """The same dataset prepared as tfrecord: tfds's in-memory path reads it."""
    return _prepare(tmp_path_factory.mktemp("tfrecord"), "tfrecord")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    # Each test sees its own label cache and logs its own loading choices.
    monkeypatch.setenv("TLJAX_CACHE_DIR", str(tmp_path / "cache"))
    records._load_cached.cache_clear()
    records._record_files_cached.cache_clear()


def _options(**fields):
    return folders.FolderOptions(**{"image_size": (28, 28), "channels": 3, "workers": 0, **fields})


def _load(name, split, data_dir, **fields):
    with folders.reading(_options(**fields)):
        return data.load_split(name, split, data_dir)


def test_streamed_rows_equal_the_in_memory_rows(record_dir, tfrecord_dir):
    in_memory = data.load_split(FIXED, "train", tfrecord_dir)
    small = _load(FIXED, "train", record_dir)
    streamed = _load(FIXED, "train", record_dir, in_memory_mb=0.0)
    grey = _load(FIXED, "train", record_dir, in_memory_mb=0.0, channels=1)

    assert isinstance(small["image"], np.ndarray)
    assert isinstance(streamed["image"], records.RecordImages)
    # Exact: records of the model's size are not resized, and grey -> RGB repeats the channel.
    np.testing.assert_array_equal(small["image"], in_memory["image"])
    np.testing.assert_array_equal(np.asarray(grey["image"]), in_memory["image"])
    np.testing.assert_array_equal(
        np.asarray(streamed["image"]), np.repeat(in_memory["image"], 3, axis=-1)
    )
    for split in (small, streamed, grey):
        np.testing.assert_array_equal(split["label"], in_memory["label"])
        assert split["label"].dtype == np.int32 and not split["label"].flags.writeable
    assert streamed["image"].files.classes == tuple(str(i) for i in range(10))


def test_records_of_other_sizes_get_the_file_transforms(record_dir):
    streamed = _load(VARIED, "test", record_dir, in_memory_mb=0.0)["image"]
    decoded = _load(VARIED, "test", record_dir)["image"]
    raw = streamed.files.source.open()

    expected = [
        transforms.to_array(transforms.eval_image(Image.fromarray(raw[i]["image"]), (28, 28)), 3)
        for i in range(len(raw))
    ]
    assert decoded.shape == (20, 28, 28, 3) and isinstance(decoded, np.ndarray)
    np.testing.assert_array_equal(decoded, np.stack(expected))
    np.testing.assert_array_equal(np.asarray(streamed), decoded)
    # The whole split decoded by threads sharing one data source reads the same rows.
    np.testing.assert_array_equal(streamed.decoded(threads=4), decoded)


def test_augmentation_is_seeded_and_keeps_native_size_unzoomed(record_dir):
    flipped = _load(FIXED, "test", record_dir, augment=("flip",))["image"]
    plain = np.asarray(_load(FIXED, "test", record_dir, in_memory_mb=0.0)["image"])
    rows = np.arange(len(flipped))
    seeds = [(0, 0, 0, int(row)) for row in rows]

    first, again = flipped.read(rows, seeds), flipped.read(rows, seeds)
    np.testing.assert_array_equal(first, again)
    # Flip only: each row is the record or its mirror image, never resized.
    mirrored = [np.array_equal(first[i], plain[i][:, ::-1]) for i in rows]
    unchanged = [np.array_equal(first[i], plain[i]) for i in rows]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert any(mirrored) and any(unchanged)

    cropped = _load(VARIED, "test", record_dir, augment=("random_resized_crop", "color_jitter"))
    assert cropped["image"].read(rows[:3], seeds[:3]).shape == (3, 28, 28, 3)


def test_the_choice_is_logged(record_dir, tfrecord_dir, caplog):
    caplog.set_level(logging.INFO, logger="tljax.data.records")
    _load(FIXED, "train", record_dir)
    _load(FIXED, "test", record_dir, in_memory_mb=0.0, workers=3)
    _load(FIXED, "train", record_dir, augment=("flip",), workers=2)
    _load(VARIED, "train", record_dir)
    in_memory = _load(FIXED, "train", tfrecord_dir)

    lines = [r.getMessage() for r in caplog.records if r.name == "tljax.data.records"]
    assert lines[0].endswith("-> read into memory as they are.")
    assert lines[1].endswith("-> streamed from array_record by 3 worker process(es).")
    assert lines[2].endswith("by 2 worker process(es), augmented (flip).")
    assert lines[3].endswith("-> decoded once into memory at the model's size.")
    assert "prepared as tfrecord" in lines[4] and "--file_format=array_record" in lines[4]
    assert isinstance(in_memory["image"], np.ndarray)


def test_pickles_small_and_reads_the_same_rows_after(record_dir):
    images = _load(FIXED, "train", record_dir, in_memory_mb=0.0)["image"]
    view = images[np.array([3, 1, 4, 1, 5])]
    np.asarray(view)  # Opens the data source in this process: it must not be pickled.

    blob = pickle.dumps(view)
    restored = pickle.loads(blob)

    assert len(blob) < 4096
    assert isinstance(restored, records.RecordImages) and restored.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(images)[[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(restored.files.labels, images.files.labels[[3, 1, 4, 1, 5]])


def test_streams_record_their_rows_in_the_pipeline_state(record_dir):
    images = _load(FIXED, "train", record_dir, in_memory_mb=0.0)
    stream = pipeline.Stream("source", images, batch_size=8)

    state = pipeline.iterator_state((stream,), seed=0, next_step=3)["streams"][0]
    fewer = pipeline.Stream("source", {**images, "image": images["image"][:20]}, batch_size=8)

    assert state["image"]["files"] == f"{FIXED} (train)"
    assert state["image"]["fingerprint"] != fewer.arrays["image"].files.fingerprint
    assert pipeline.streamed_parts((stream,))[0].images is images["image"]
    batch = pipeline.host_batch((stream,), seed=0, step=3)
    assert batch["source_image"].shape == (8, 28, 28, 3)


def test_labels_are_read_once_and_cached_on_disk(record_dir, monkeypatch):
    first = _load(FIXED, "train", record_dir, in_memory_mb=0.0)["label"]
    records._load_cached.cache_clear()
    records._record_files_cached.cache_clear()
    monkeypatch.setattr(records, "_read_labels", lambda source: pytest.fail("labels reread"))

    again = _load(FIXED, "train", record_dir, in_memory_mb=0.0)["label"]

    np.testing.assert_array_equal(again, first)


def test_array_record_files_without_their_reader_say_what_to_install(record_dir, monkeypatch):
    find_spec = records.importlib.util.find_spec
    monkeypatch.setattr(
        records.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "array_record" else find_spec(name, *args),
    )
    with pytest.raises(data.DatasetUnavailableError, match="pip install array_record"):
        _load(FIXED, "train", record_dir)


def test_an_unknown_split_names_the_splits(record_dir):
    with pytest.raises(DataError, match=r"split 'validation'.*\['test', 'train'\]"):
        _load(FIXED, "validation", record_dir)


@pytest.mark.slow
def test_a_streamed_run_matches_the_in_memory_run(record_dir, tfrecord_dir, tmp_path, caplog):
    from configs import pretrain

    def run(data_dir, workdir, **folder):
        config = pretrain.classifier_config(FIXED, FIXED, None, seed=0)
        config = shrink(config, data_dir, steps=4, batch_size=8, eval_batch_size=8)
        config.data.folder.update(folder)
        return train.train_and_evaluate(config, str(tmp_path / workdir))["final"]

    caplog.set_level(logging.INFO, logger="tljax.data.records")
    in_memory = run(tfrecord_dir, "in_memory")
    streamed = run(record_dir, "streamed", in_memory_mb=0.0, workers=1)
    augmented = run(record_dir, "augmented", augment="flip", workers=1)

    log = caplog.text
    assert f"{FIXED} (train): 40 records" in log and "by 1 worker process(es)." in log
    assert "by 1 worker process(es), augmented (flip)." in log
    # Streaming changes nothing the model sees: the same metrics, to the last bit.
    assert streamed == in_memory
    assert augmented != streamed
    assert all(np.isfinite(value) for value in augmented.values())
