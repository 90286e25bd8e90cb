"""benchmarks/input_pipeline.py: its folder, both loaders and its results page, on a tiny folder."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import input_pipeline as bench  # noqa: E402

SIDE = 32
BATCH = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 generated JPEGs in 4 class folders."""
    root = str(tmp_path_factory.mktemp("photos"))
    return bench.generate_folder(root, 20, 4, processes=1)


def _take(batches, count):
    try:
        return [next(batches) for _ in range(count)]
    finally:
        bench._close(batches)


def test_generated_folder_is_photo_sized_jpegs_in_class_folders(folder):
    stats = bench.folder_stats(folder)
    assert (stats.images, stats.classes) == (20, 4)
    assert sorted(os.listdir(folder)) == [".generated.json"] + [f"class_{k:02d}" for k in range(4)]
    smallest = round(bench.WIDTHS[0] * bench.ASPECTS[0])
    assert smallest <= stats.widths[0] and stats.widths[2] <= bench.WIDTHS[1]
    assert smallest <= stats.heights[0] and stats.heights[2] <= bench.WIDTHS[1]
    # Photo-like content compresses to tens of kB at quality 90 (noise would take ~150 kB).
    assert stats.kilobytes[0] > 15 and stats.kilobytes[2] < 90
    # A second call finds the marker and reuses the folder.
    before = os.path.getmtime(bench.list_images(folder)[0])
    bench.generate_folder(folder, 20, 4, processes=1)
    assert os.path.getmtime(bench.list_images(folder)[0]) == before


def test_linked_folder_holds_separate_names_for_the_same_files(folder, tmp_path):
    linked = bench.linked_folder(folder, str(tmp_path / "linked"), 30)
    paths = bench.list_images(linked)
    assert len(paths) == 30
    assert os.path.samefile(paths[0], bench.list_images(folder)[0])
    assert bench.folder_stats(linked).classes == 4


def test_peer_reads_every_file_once_per_epoch(folder):
    tasks = bench._peer_tasks(bench.list_images(folder), SIDE, BATCH, seed=0)
    epoch = [path for _ in range(4) for path in next(tasks)[0]]
    assert sorted(epoch) == bench.list_images(folder)


@pytest.mark.parametrize("loader", bench.LOADERS)
def test_loaders_give_augmented_batches_in_the_calling_thread(folder, loader):
    batches = bench.LOADER_FUNCTIONS[loader](folder, SIDE, 0, BATCH)
    images = np.concatenate(_take(batches, 4))
    assert images.shape == (20, SIDE, SIDE, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == 20  # Different crops and files.

    result = bench.measure(bench.LOADER_FUNCTIONS[loader](folder, SIDE, 0, BATCH), 1, 0, 2)
    assert result.images == 2 * BATCH and result.images_per_s > 0
    assert result.cpu_ms_per_image > 0


def test_page_has_both_tables_and_the_figure(folder, tmp_path):
    results = {
        (loader, 0): [
            bench.measure(bench.LOADER_FUNCTIONS[loader](folder, SIDE, 0, BATCH), 1, 0, 1)
        ]
        for loader in bench.LOADERS
    }
    trace = bench.memory_pass("tljax", folder, SIDE, 0, BATCH, interval=0.05)
    assert trace.images == 20 and trace.total()[0] >= trace.before_mb > 0
    settings = dict(image_size=SIDE, batch_size=BATCH, warmup=1, timed="1 batches", rounds=1)
    page = bench.write_report(
        str(tmp_path / "input_pipeline.md"),
        results,
        [trace],
        bench.folder_stats(folder),
        True,
        settings,
        command="python benchmarks/input_pipeline.py",
    )
    with open(page) as f:
        text = f.read()
    assert "| workers | tljax images/s | peer images/s | tljax / peer |" in text
    assert "| tljax CPU ms / image | peer CPU ms / image |" in text
    assert "\n| 0 | " in text
    assert "| tljax | 0 | 20 |" in text
    assert "normalisation" in text and "20 images in 4 class folders" in text
    assert os.path.getsize(tmp_path / "input_pipeline.png") > 0


@pytest.mark.parametrize("loader", bench.LOADERS)
def test_loaders_with_a_worker_process(folder, loader):
    batches = bench.LOADER_FUNCTIONS[loader](folder, SIDE, 1, BATCH)
    images = np.concatenate(_take(batches, 5))
    assert images.shape == (25, SIDE, SIDE, 3) and images.dtype == np.uint8

    trace = bench.memory_pass(loader, folder, SIDE, 1, BATCH, interval=0.05)
    # The worker's memory is counted with the main process's.
    assert trace.total()[0] > trace.samples[0][2]
