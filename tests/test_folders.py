"""Image-folder datasets: file order, labels, splits, bad input, streaming, sharding, resume."""

import json
import logging
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import shrink
from PIL import Image

from tljax import data, parallel, train
from tljax.data import folders, pipeline, streaming, transforms
from tljax.data.pipeline import Stream
from tljax.validate import ConfigError, DataError

CLASSES = ("cat", "dog", "owl")


def write_images(folder, classes=CLASSES, per_class=5, seed=0, size=(20, 14)):
    """Small images of mixed formats and modes, ``folder/<class>/<i>.<ext>``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(folder / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if i % 3 == 1:
                image.convert("L").save(folder / name / f"{i:02d}.png")
            elif i % 3 == 2:
                image.convert("RGBA").save(folder / name / f"{i:02d}.png")
            else:
                image.save(folder / name / f"{i:02d}.jpg", quality=90)
    return folder


def options(**overrides):
    return folders.FolderOptions(image_size=(16, 16), **{"workers": 0, **overrides})


def load(name, which, **overrides):
    with folders.reading(options(**overrides)):
        return data.load_split(name, which)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLJAX_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def domain(tmp_path):
    return write_images(tmp_path / "domain")


# ------------------------------------------------------------- file lists ----


def test_classes_are_sorted_and_files_sorted_within_each(tmp_path):
    root = write_images(tmp_path / "d", classes=("zebra", "ant", "moth"), per_class=3)
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "ant" / ".hidden.jpg").write_bytes(b"")
    os.makedirs(root / "ant" / "more")
    Image.new("RGB", (8, 8)).save(root / "ant" / "more" / "a.JPG")

    files = folders.scan(str(root))

    assert files.classes == ("ant", "moth", "zebra")
    names = [n.decode() for n in files.names]
    assert names[:4] == ["ant/00.jpg", "ant/01.png", "ant/02.png", "ant/more/a.JPG"]
    np.testing.assert_array_equal(files.labels, [0] * 4 + [1] * 3 + [2] * 3)


def test_train_and_test_subfolders_are_the_splits(tmp_path):
    write_images(tmp_path / "d" / "train", per_class=4)
    write_images(tmp_path / "d" / "test", per_class=2, seed=1)
    train_split = load(f"folder:{tmp_path / 'd'}", "train")
    test_split = load(f"folder:{tmp_path / 'd'}", "test")
    everything = load(f"folder:{tmp_path / 'd'}", "all")
    assert len(train_split["label"]) == 12 and len(test_split["label"]) == 6
    assert len(everything["label"]) == 18
    np.testing.assert_array_equal(test_split["label"], np.repeat([0, 1, 2], 2))


def test_drawn_split_is_seeded_disjoint_and_covers_every_class(domain):
    name = f"folder:{domain}"
    train_split = folders.split_files(name, "train", options(test_fraction=0.4))
    test_split = folders.split_files(name, "test", options(test_fraction=0.4))
    again = folders.split_files(name, "test", options(test_fraction=0.4))
    other_seed = folders.split_files(name, "test", options(test_fraction=0.4, split_seed=1))

    assert not set(train_split.names) & set(test_split.names)
    assert len(train_split) + len(test_split) == 15
    np.testing.assert_array_equal(np.bincount(test_split.labels), [2, 2, 2])
    np.testing.assert_array_equal(test_split.names, again.names)
    assert set(other_seed.names) != set(test_split.names)


def test_split_all_uses_every_image_for_every_split(domain):
    for split in ("train", "test"):
        assert len(folders.split_files(f"folder:{domain}", split, options(split="all"))) == 15


def test_relative_names_start_at_data_root(tmp_path):
    write_images(tmp_path / "office" / "amazon")
    arrays = load("folder:amazon", "train", root=str(tmp_path / "office"), split="all")
    assert len(arrays["label"]) == 15


def test_file_lists_are_cached_and_rescanned_when_a_folder_changes(domain, tmp_path):
    first = folders.scan(str(domain))
    cached = list((tmp_path / "cache" / "file_lists").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["directory"] == str(domain)
    folders._scan_cached.cache_clear()
    assert folders.scan(str(domain)).fingerprint == first.fingerprint  # read from disk

    Image.new("RGB", (8, 8)).save(domain / "dog" / "99.png")
    changed = folders.scan(str(domain))
    assert len(changed) == 16 and changed.fingerprint != first.fingerprint


# -------------------------------------------------------------- bad input ----


def test_a_missing_domain_names_what_the_root_holds(tmp_path):
    write_images(tmp_path / "office" / "amazon")
    write_images(tmp_path / "office" / "webcam")
    with pytest.raises(DataError, match=r"no folder .*dslr.*holds amazon, webcam"):
        load("folder:dslr", "train", root=str(tmp_path / "office"))


def test_an_empty_class_folder_is_an_error(domain):
    os.makedirs(domain / "empty")
    with pytest.raises(DataError, match=r"Class folder .*empty holds no images"):
        load(f"folder:{domain}", "train")


def test_a_folder_without_class_folders_is_an_error(tmp_path):
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="has no class folders"):
        load(f"folder:{tmp_path / 'flat'}", "train")


def test_an_unknown_split_is_an_error(domain):
    with pytest.raises(DataError, match=r"split 'train\[:10%\]'; folder datasets have"):
        load(f"folder:{domain}", "train[:10%]")


def test_different_classes_in_source_and_target_are_an_error(tmp_path):
    write_images(tmp_path / "a")
    write_images(tmp_path / "b", classes=("cat", "dog", "eel"))
    named = {"data.source": f"folder:{tmp_path / 'a'}", "data.target": f"folder:{tmp_path / 'b'}"}
    only_one = r"only in data.source .*\['owl'\].*\['eel'\]"
    with folders.reading(options()), pytest.raises(DataError, match=only_one):
        folders.check_domains_match(named)


def test_bad_folder_settings_name_the_field():
    config = shrink_folder_config("unused")
    config.data.folder.on_bad_image = "ignore"
    with pytest.raises(ConfigError, match="data.folder.on_bad_image='ignore'"):
        folders.FolderOptions.from_config(config)
    config.data.folder.on_bad_image = "stop"
    config.data.folder.augment = "random_resized_crop,blur"
    with pytest.raises(ValueError, match="data.folder.augment.*blur"):
        folders.FolderOptions.from_config(config)


def truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 3])


def test_an_unreadable_image_stops_the_run_by_name(domain):
    truncate(domain / "dog" / "00.jpg")
    images = load(f"folder:{domain}", "train", split="all", augment=("flip",))["image"]
    with pytest.raises(DataError, match=r"dog/00.jpg.*on_bad_image=skip"):
        np.asarray(images)


def test_skipped_images_are_counted_and_replaced_by_their_class(domain, caplog):
    truncate(domain / "dog" / "00.jpg")
    arrays = load(f"folder:{domain}", "train", split="all", augment=("flip",), on_bad_image="skip")
    with caplog.at_level(logging.WARNING):
        images = np.asarray(arrays["image"])
    assert "Skipped unreadable image" in caplog.text and "dog/00.jpg" in caplog.text
    stand_in = transforms.load(str(domain / "dog" / "01.png"), (16, 16), 3)
    np.testing.assert_array_equal(images[5], stand_in)
    assert arrays["label"][5] == 1


# ----------------------------------------------------------------- images ----


def test_images_are_resized_and_converted_like_the_transforms(domain):
    arrays = load(f"folder:{domain}", "train", split="all")
    assert isinstance(arrays["image"], np.ndarray)  # small, not augmented: in memory
    assert arrays["image"].shape == (15, 16, 16, 3) and arrays["image"].dtype == np.uint8
    expected = transforms.load(str(domain / "owl" / "02.png"), (16, 16), 3)
    np.testing.assert_array_equal(arrays["image"][12], expected)
    grey = load(f"folder:{domain}", "train", split="all", channels=1)["image"]
    assert grey.shape == (15, 16, 16, 1)


def test_augmented_or_large_splits_stay_lazy_and_index_like_arrays(domain, caplog):
    with caplog.at_level(logging.INFO):
        lazy = load(f"folder:{domain}", "train", split="all", augment=("flip",))["image"]
    assert "streamed from files" in caplog.text
    assert isinstance(lazy, folders.FolderImages) and lazy.shape == (15, 16, 16, 3)
    whole = np.asarray(lazy)
    np.testing.assert_array_equal(np.asarray(lazy[3:7]), whole[3:7])
    np.testing.assert_array_equal(np.asarray(lazy[np.array([9, 1])]), whole[[9, 1]])
    mask = np.arange(15) % 2 == 0
    np.testing.assert_array_equal(np.asarray(lazy[mask]), whole[mask])
    np.testing.assert_array_equal(lazy[4], whole[4])
    big = load(f"folder:{domain}", "train", split="all", in_memory_mb=0.001)["image"]
    assert isinstance(big, folders.FolderImages)


# --------------------------------------------------------------- pipeline ----


def folder_stream(domain, batch_size=8, **overrides):
    arrays = load(
        f"folder:{domain}",
        "train",
        split="all",
        augment=("random_resized_crop", "flip"),
        **overrides,
    )
    return Stream("source", arrays, batch_size)


def test_streamed_batches_are_augmented_deterministically(domain):
    streams = (folder_stream(domain),)
    first = pipeline.host_batch(streams, seed=0, step=2)
    assert first["source_image"].shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(
        first["source_image"], pipeline.host_batch(streams, 0, 2)["source_image"]
    )
    assert not np.array_equal(
        first["source_image"], pipeline.host_batch(streams, 1, 2)["source_image"]
    )
    index = streaming.stream_indices(0, 0, 2, 8, 15)
    np.testing.assert_array_equal(first["source_label"], streams[0].arrays["label"][index])


def test_worker_processes_give_the_batches_of_the_main_process(domain):
    mesh = parallel.make_data_mesh(jax.devices()[:1])
    streams = (
        folder_stream(domain, workers=2),
        Stream("target", {"image": np.zeros((5, 16, 16, 3), np.uint8)}, 8, ("image",)),
    )
    batches = pipeline.train_batches(streams, seed=3, start_step=4, mesh=mesh)
    try:
        for step in (4, 5, 6):
            got = jax.device_get(next(batches))
            want = pipeline.host_batch(streams, 3, step)
            assert list(got) == list(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    finally:
        batches.close()


def test_each_process_decodes_only_its_rows_of_the_same_global_batch(domain, monkeypatch):
    streams = (folder_stream(domain),)
    whole = pipeline.host_batch(streams, 0, 1)
    decoded = []
    read = folders.FolderImages.read

    def counting_read(self, rows, seeds=None):
        decoded.append(len(rows))
        return read(self, rows, seeds)

    monkeypatch.setattr(folders.FolderImages, "read", counting_read)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(pipeline.host_batch(streams, 0, 1))
    assert decoded == [4, 4]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_eval_batches_of_a_streamed_split_match_the_decoded_split(domain):
    mesh = parallel.make_data_mesh(jax.devices()[:1])
    arrays = load(
        f"folder:{domain}", "test", split="all", augment=("flip",), in_memory_mb=0.001, workers=1
    )
    batches = [jax.device_get(b) for b in pipeline.eval_batches(arrays, 8, mesh)]
    images = np.concatenate([b["image"] for b in batches])[:15]
    np.testing.assert_array_equal(images, np.asarray(arrays["image"]))
    assert [b["mask"].sum() for b in batches] == [8, 7]


def test_iterator_state_round_trips_and_notices_changed_files(domain):
    streams = (folder_stream(domain),)
    state = json.loads(json.dumps(pipeline.iterator_state(streams, 0, 7)))
    pipeline.check_resume(state, streams, 0, 7)
    with pytest.raises(DataError, match="seed: 0 then, 1 now"):
        pipeline.check_resume(state, streams, 1, 7)

    Image.new("RGB", (8, 8)).save(domain / "owl" / "99.png")
    changed = (folder_stream(domain),)
    with pytest.raises(DataError, match=r"stream 'source' read 15 examples .* then, 16 examples"):
        pipeline.check_resume(state, changed, 0, 7)


# ------------------------------------------------------------ end to end ----


def shrink_folder_config(root, **folder):
    from configs import da

    config = shrink(da.get_config("method=dann"), None, steps=6, eval_every=3, eval_batch_size=16)
    config.train.batch_size = 8
    config.checkpoint.max_to_keep = None
    config.eval.validator_examples = 16
    config.data.source = f"folder:{root}/a"
    config.data.target = f"folder:{root}/b"
    config.data.folder.update(folder)
    return config


@pytest.fixture
def two_domains(tmp_path):
    write_images(tmp_path / "a", classes=[f"{c}" for c in range(10)], per_class=4)
    write_images(tmp_path / "b", classes=[f"{c}" for c in range(10)], per_class=4, seed=1)
    return tmp_path


def final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())["params"]


@pytest.mark.slow
def test_a_resumed_streaming_run_sees_the_batches_of_an_uninterrupted_one(two_domains, tmp_path):
    config = shrink_folder_config(
        two_domains, augment="random_resized_crop,flip", split="all", workers=1
    )
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    full = train.train_and_evaluate(config, full_dir)

    train.train_and_evaluate(config, resumed_dir)
    manager = ocp.CheckpointManager(os.path.join(resumed_dir, "checkpoints"))
    manager.delete(6)
    manager.wait_until_finished()
    resumed = train.train_and_evaluate(config, resumed_dir)

    assert resumed["resumed_from_step"] == 3
    assert full["timing_s"]["input"] >= 0.0
    chex.assert_trees_all_close(final_params(full_dir), final_params(resumed_dir), atol=1e-6)


@pytest.mark.slow
def test_resuming_on_changed_files_stops_before_training(two_domains, tmp_path):
    config = shrink_folder_config(two_domains, augment="flip", split="all", workers=0)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    manager.delete(6)
    manager.wait_until_finished()
    Image.new("RGB", (8, 8)).save(two_domains / "a" / "3" / "99.png")
    with pytest.raises(DataError, match="training data changed since the checkpoint of step 3"):
        train.train_and_evaluate(config, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["pretrain", "multitask"])
def test_classification_and_multitask_runs_read_folders(
    experiment, two_domains, data_dir, tmp_path
):
    from configs import multitask, pretrain

    if experiment == "pretrain":
        config = shrink(pretrain.get_config(), data_dir, steps=2, batch_size=8, eval_batch_size=16)
        config.data.train = f"folder:{two_domains}/a"
        config.data.shots_per_class = 2
        config.data.eval_sets = {"a": f"folder:{two_domains}/a", "b": f"folder:{two_domains}/b"}
    else:
        config = shrink(multitask.get_config(), data_dir, steps=2, batch_size=8, eval_batch_size=16)
        config.tasks.mnist.dataset = f"folder:{two_domains}/a"
    config.data.folder.update(augment="flip", workers=1)
    results = train.train_and_evaluate(config, str(tmp_path / experiment))
    assert results["steps"] == 2 and all(np.isfinite(v) for v in results["final"].values())
