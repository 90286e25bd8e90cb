"""Input-pipeline benchmark: tljax's folder streaming against a plain PIL + multiprocessing loader.

  python benchmarks/input_pipeline.py                          # ~13 min on 2 shared CPU cores
  python benchmarks/input_pipeline.py --rss_images=0 --seconds=5 --rounds=1    # quick look
  python benchmarks/input_pipeline.py --folder=/data/office31/amazon --rss_images=0

Measures the host side of training on a folder of JPEGs: decoding each file and augmenting it to
the model's size (``random_resized_crop,flip``, `tljax.data.transforms`), in worker processes.

- The folder: ``--generate_images`` JPEGs of about 500x375 (sizes vary around it; quality 90;
  smooth gradients, blurred shapes and mild noise, so they compress like photos, ~30-60 kB),
  laid out ``<root>/<class>/<image>.jpg`` in ``--classes`` classes. They are generated once under
  ``--cache_dir`` and reused; ``--folder`` reads an existing folder of class folders instead.
- Throughput, images/s per worker count, for
  (a) tljax: the folder read as training reads it, i.e. ``tljax.data.load_split('folder:<root>')``
      inside ``tljax.data.folders.reading(FolderOptions(...))`` gives a lazy ``FolderImages``,
      wrapped in a ``tljax.data.pipeline.Stream`` and read through
      ``tljax.data.streaming.train_rows`` (Grain ``mp_prefetch`` worker processes);
  (b) the peer: the files listed with ``os.walk``, shuffled per epoch, cut into batches of paths
      and mapped by a ``multiprocessing.Pool(workers)`` with ``pool.imap`` (results in order,
      ``2 x workers`` batches in flight, as Grain's per-worker buffer of 2). Each peer worker
      calls the same ``tljax.data.transforms.load`` per file, so both loaders do identical
      per-image work and the comparison isolates the loader around it.
  After ``--warmup_batches`` (worker start-up and the first batch are reported separately),
  batches are timed for ``--seconds`` (or ``--batches``), ``--rounds`` times, the two loaders
  back to back in alternating order; the table gives medians.
- Host memory: the summed resident set (VmRSS, via psutil) of the main process and its workers,
  sampled every ``--rss_interval`` seconds while each loader streams one pass over a
  ``--rss_images`` folder (hard links to the generated JPEGs: every image is still a separate
  file to open and decode), with the largest worker count.

Writes docs/results/input_pipeline.md and .png (--page; --page= for none).
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

from tljax.data import transforms  # noqa: E402 - light: numpy and PIL only.


def define_flags() -> None:
    """Defines the command-line flags; only when run as a script, so that tests can import
    this module beside other benchmarks (absl flags are process-wide)."""
    global \
        _FOLDER, \
        _GENERATE_IMAGES, \
        _CLASSES, \
        _CACHE_DIR, \
        _WORKERS, \
        _IMAGE_SIZE, \
        _BATCH_SIZE, \
        _SECONDS, \
        _BATCHES, \
        _WARMUP, \
        _ROUNDS, \
        _RSS_IMAGES, \
        _RSS_LOADERS, \
        _RSS_INTERVAL, \
        _PAGE
    _FOLDER = flags.DEFINE_string(
        "folder", "", "An existing folder of class folders to read ('': generate one)."
    )
    _GENERATE_IMAGES = flags.DEFINE_integer(
        "generate_images", 2000, "Distinct JPEGs in the generated folder."
    )
    _CLASSES = flags.DEFINE_integer("classes", 10, "Class folders of the generated folder.")
    _CACHE_DIR = flags.DEFINE_string(
        "cache_dir", "/tmp/tljax_loader_bench", "Where generated folders are kept and reused."
    )
    _WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker process counts to measure.")
    _IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Side of the square training crop.")
    _BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
    _SECONDS = flags.DEFINE_float("seconds", 8.0, "Timed seconds per measurement.")
    _BATCHES = flags.DEFINE_integer(
        "batches", None, "Timed batches per measurement (overrides --seconds)."
    )
    _WARMUP = flags.DEFINE_integer(
        "warmup_batches", 5, "Batches read before timing starts (worker start-up, buffers)."
    )
    _ROUNDS = flags.DEFINE_integer(
        "rounds", 5, "Measure each (loader, workers) this many times, alternating the order."
    )
    _RSS_IMAGES = flags.DEFINE_integer(
        "rss_images", 50000, "Images in the memory pass's folder (0: no memory measurement)."
    )
    _RSS_LOADERS = flags.DEFINE_list(
        "rss_loaders", ["tljax", "peer"], "Loaders of the memory pass."
    )
    _RSS_INTERVAL = flags.DEFINE_float("rss_interval", 0.5, "Seconds between memory samples.")
    _PAGE = flags.DEFINE_string(
        "page", results_page.default_page("input_pipeline"), "Results page to write ('': none)."
    )


TRAIN_AUGMENT = ("random_resized_crop", "flip")
JPEG_QUALITY = 90
# Images come out around 500x375 (a typical photo dataset size, e.g. Office-31's Amazon is
# smaller, ImageNet's median larger); widths vary, and some images are portrait.
WIDTHS = (440, 560)
ASPECTS = (0.66, 0.84)
PORTRAIT_FRACTION = 0.15
# Gaussian noise std in grey levels: enough texture that JPEG files weigh what photos do.
NOISE = 5.0
_MARKER = ".generated.json"
_MARKER_VERSION = 1
_MB = 2**20
LOADERS = ("tljax", "peer")


# ------------------------------------------------------------------ folder ----


def make_image(seed: int) -> Image.Image:
    """One synthetic photo-like RGB image: gradients, blurred shapes, mild noise.

    Args:
      seed: determines the image (size and content).

    Returns:
      An RGB image of about 500x375 (see `WIDTHS`, `ASPECTS`).
    """
    rng = np.random.default_rng(seed)
    width = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1))
    height = int(round(width * rng.uniform(*ASPECTS)))
    if rng.random() < PORTRAIT_FRACTION:
        width, height = height, width
    image = Image.fromarray(_background(rng, width, height))
    _draw_shapes(ImageDraw.Draw(image), rng, width, height)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    pixels = np.asarray(image, np.float32) + rng.normal(0, NOISE, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # Per channel: a linear gradient plus one slow wave, the smooth bulk of a photo.
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    out = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        slope_x, slope_y = rng.uniform(-120, 120, 2)
        freq_x, freq_y = rng.uniform(0.5, 3.0, 2)
        wave = 30 * np.sin(2 * np.pi * (freq_x * x + freq_y * y) + rng.uniform(0, 2 * np.pi))
        out[..., channel] = rng.uniform(40, 215) + slope_x * (x - 0.5) + slope_y * (y - 0.5) + wave
    return np.clip(out, 0, 255).astype(np.uint8)


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int):
    # A few solid objects: the edges JPEG spends most of its bits on in real photos.
    for _ in range(int(rng.integers(4, 10))):
        left, top = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        right = left + rng.uniform(0.05, 0.5) * width
        bottom = top + rng.uniform(0.05, 0.5) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((left, top, right, bottom), fill=colour)
        elif kind == 1:
            draw.rectangle((left, top, right, bottom), fill=colour)
        else:
            corners = int(rng.integers(3, 7))
            xs, ys = rng.uniform(left, right, corners), rng.uniform(top, bottom, corners)
            draw.polygon([(float(a), float(b)) for a, b in zip(xs, ys, strict=True)], fill=colour)


def _write_image(job: tuple[int, str]) -> None:
    seed, path = job
    buffer = io.BytesIO()
    make_image(seed).save(buffer, "JPEG", quality=JPEG_QUALITY)
    # Written whole, then renamed: an interrupted run leaves no half-written JPEG behind.
    with open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)


def _generated_path(root: str, index: int, classes: int) -> str:
    return os.path.join(root, f"class_{index % classes:02d}", f"img_{index:06d}.jpg")


def _marker_matches(root: str, expected: dict) -> bool:
    try:
        with open(os.path.join(root, _MARKER)) as f:
            return json.load(f) == expected
    except (OSError, ValueError):
        return False


def _write_marker(root: str, content: dict) -> None:
    with open(os.path.join(root, _MARKER), "w") as f:
        json.dump(content, f)


def generate_folder(root: str, count: int, classes: int, processes: int | None = None) -> str:
    """Writes ``count`` synthetic JPEGs as ``root/class_XX/img_NNNNNN.jpg`` unless already there.

    A marker file at the root records a finished folder, so a later run reuses it.

    Args:
      root: the folder to fill.
      count: images (image i is `make_image(i)`, in class ``i % classes``).
      classes: class folders.
      processes: processes encoding images (default: the CPUs).

    Returns:
      ``root``.

    Raises:
      ValueError: ``count`` or ``classes`` is below 1.
    """
    if count < 1 or classes < 1:
        raise ValueError(f"generate_folder: count={count} and classes={classes} must be >= 1.")
    expected = dict(version=_MARKER_VERSION, count=count, classes=classes, quality=JPEG_QUALITY)
    if _marker_matches(root, expected):
        return root
    for label in range(classes):
        os.makedirs(os.path.join(root, f"class_{label:02d}"), exist_ok=True)
    jobs = [(i, _generated_path(root, i, classes)) for i in range(count)]
    processes = processes or os.cpu_count() or 1
    if processes > 1 and count > 50:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_write_image, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_image(job)
    _write_marker(root, expected)
    return root


def linked_folder(source: str, root: str, count: int) -> str:
    """A folder of ``count`` files that are hard links to the images of ``source``, cycled.

    Every link is a separate file for a loader to open and decode; the disk holds the source
    images once. Where hard links are not possible the files are copied.

    Args:
      source: a folder from `generate_folder`.
      root: the folder to fill (``root/<class of the source file>/img_NNNNNN.jpg``).
      count: files to create.

    Returns:
      ``root``.
    """
    sources = list_images(source)
    expected = dict(version=_MARKER_VERSION, count=count, source=os.path.abspath(source))
    if _marker_matches(root, expected):
        return root
    for index in range(count):
        original = sources[index % len(sources)]
        label = os.path.basename(os.path.dirname(original))
        path = os.path.join(root, label, f"img_{index:06d}.jpg")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.link(original, path)
        except OSError:  # Another filesystem, or one without hard links.
            shutil.copyfile(original, path)
    _write_marker(root, expected)
    return root


def list_images(folder: str) -> list[str]:
    """The image files under ``folder``'s class folders, sorted (as a plain loader lists them).

    Args:
      folder: a folder of class folders.

    Returns:
      Absolute paths, sorted.

    Raises:
      FileNotFoundError: the folder holds no images.
    """
    extensions = (".jpg", ".jpeg", ".png")
    found = []
    for parent, subfolders, names in os.walk(os.path.abspath(folder)):
        subfolders.sort()
        found += [os.path.join(parent, n) for n in sorted(names) if n.lower().endswith(extensions)]
    if not found:
        raise FileNotFoundError(f"{folder}: no .jpg/.jpeg/.png images under its class folders.")
    return found


@dataclasses.dataclass(frozen=True)
class FolderStats:
    """What a folder holds, for the page.

    Attributes:
      images: image files.
      classes: class folders.
      widths: (min, median, max) width in pixels over the inspected files.
      heights: (min, median, max) height.
      kilobytes: (min, median, max) file size in kB (1000 bytes).
      mean_kilobytes: mean file size in kB.
      inspected: files whose sizes were read.
    """

    images: int
    classes: int
    widths: tuple[int, int, int]
    heights: tuple[int, int, int]
    kilobytes: tuple[float, float, float]
    mean_kilobytes: float
    inspected: int


def folder_stats(folder: str, max_files: int = 2000) -> FolderStats:
    """Image and file sizes of a folder (up to ``max_files`` evenly spaced files inspected).

    Args:
      folder: a folder of class folders.
      max_files: most files whose headers are read.

    Returns:
      The folder's `FolderStats`.
    """
    paths = list_images(folder)
    picked = [
        paths[i] for i in np.linspace(0, len(paths) - 1, min(max_files, len(paths))).astype(int)
    ]
    sizes = []
    for path in picked:
        with Image.open(path) as image:  # Reads the header only.
            sizes.append(image.size)
    widths, heights = np.asarray(sizes).T
    kilobytes = np.asarray([os.path.getsize(p) / 1000 for p in picked])
    classes = {os.path.dirname(p) for p in paths}
    return FolderStats(
        images=len(paths),
        classes=len(classes),
        widths=_spread(widths),
        heights=_spread(heights),
        kilobytes=tuple(float(v) for v in np.percentile(kilobytes, [0, 50, 100])),
        mean_kilobytes=float(kilobytes.mean()),
        inspected=len(picked),
    )


def _spread(values: np.ndarray) -> tuple[int, int, int]:
    return int(values.min()), int(np.median(values)), int(values.max())


# ----------------------------------------------------------------- loaders ----


def tljax_batches(folder: str, image_size: int, workers: int, batch_size: int, seed: int = 0):
    """Augmented training batches of ``folder`` through tljax's pipeline, as training reads them.

    The split is loaded now (file list scanned and cached); the returned generator starts the
    worker processes at its first ``next``.

    Args:
      folder: a folder of class folders (read as the dataset ``folder:<folder>``, split 'all').
      image_size: side of the square crop.
      workers: Grain worker processes (0: decode in the calling thread).
      batch_size: images per batch.
      seed: the run seed (shuffles and augmentation).

    Returns:
      An endless iterator of uint8 (batch_size, image_size, image_size, 3) arrays; ``close()``
      it to stop the workers.
    """
    from tljax import data  # noqa: PLC0415 - imports JAX; spawned peer workers never need it.
    from tljax.data import folders, pipeline  # noqa: PLC0415

    options = folders.FolderOptions(
        image_size=(image_size, image_size), augment=TRAIN_AUGMENT, split="all", workers=workers
    )
    with folders.reading(options):
        arrays = data.load_split(f"{folders.PREFIX}{os.path.abspath(folder)}", "all")
    streams = (pipeline.Stream("source", arrays, batch_size),)
    return _tljax_stream(pipeline.streamed_parts(streams), seed, workers)


def _tljax_stream(parts, seed: int, workers: int) -> Iterator[np.ndarray]:
    from tljax.data import streaming  # noqa: PLC0415

    rows = streaming.train_rows(parts, seed, 0, workers)
    try:
        for _, batch in rows:
            yield batch["source_image"]
    finally:
        rows.close()


def peer_load_batch(task: tuple[list[str], list[int], int]) -> np.ndarray:
    """The peer's worker function: one batch of files, decoded and augmented.

    Args:
      task: (paths, one seed per path, image side).

    Returns:
      uint8 (len(paths), side, side, 3).
    """
    paths, seeds, side = task
    out = np.empty((len(paths), side, side, 3), np.uint8)
    for i, (path, seed) in enumerate(zip(paths, seeds, strict=True)):
        rng = np.random.default_rng(seed)
        out[i] = transforms.load(path, (side, side), 3, TRAIN_AUGMENT, rng)
    return out


def _peer_tasks(paths: list[str], side: int, batch_size: int, seed: int):
    # Endless: consecutive batches of per-epoch shuffles, like a shuffling DataLoader.
    order = np.zeros(0, np.int64)
    epoch, position, number = 0, 0, 0
    while True:
        while len(order) - position < batch_size:
            order = np.concatenate(
                [order[position:], np.random.default_rng([seed, epoch]).permutation(len(paths))]
            )
            epoch, position = epoch + 1, 0
        rows = order[position : position + batch_size]
        position += batch_size
        seeds = [seed * 2**40 + number * batch_size + i for i in range(batch_size)]
        number += 1
        yield [paths[r] for r in rows], seeds, side


def peer_batches(folder: str, image_size: int, workers: int, batch_size: int, seed: int = 0):
    """Augmented batches of ``folder`` from a plain ``multiprocessing.Pool`` loader.

    The files are listed now; the returned generator starts the pool at its first ``next``.

    Args:
      folder: a folder of class folders.
      image_size: side of the square crop.
      workers: pool processes (0: decode in the calling thread).
      batch_size: images per batch.
      seed: shuffles and augmentation.

    Returns:
      An endless iterator of uint8 (batch_size, image_size, image_size, 3) arrays; ``close()``
      it to stop the pool.
    """
    tasks = _peer_tasks(list_images(folder), image_size, batch_size, seed)
    if workers == 0:
        return map(peer_load_batch, tasks)
    return _pool_stream(tasks, workers)


def _pool_stream(tasks, workers: int) -> Iterator[np.ndarray]:
    # Pool.imap queues every task its iterable yields; the semaphore holds the tasks in flight
    # to 2 per worker (Grain's per-worker buffer), so an endless stream stays bounded.
    slots = threading.Semaphore(2 * workers)
    stop = threading.Event()

    def bounded():
        for task in tasks:
            slots.acquire()
            if stop.is_set():
                return
            yield task

    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        for batch in pool.imap(peer_load_batch, bounded()):
            slots.release()
            yield batch
    finally:
        stop.set()
        slots.release()  # Wakes the feeding thread so the pool can shut down.
        pool.terminate()
        pool.join()


LOADER_FUNCTIONS: dict[str, Callable[..., Iterator[np.ndarray]]] = {
    "tljax": tljax_batches,
    "peer": peer_batches,
}


# ----------------------------------------------------------------- measure ----


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One timed read.

    Attributes:
      startup_s: from the first ``next`` (workers start) to the first batch.
      images: images in the timed batches.
      seconds: time of the timed batches.
      cpu_seconds: CPU time (user + system) the main process and its workers spent on them.
    """

    startup_s: float
    images: int
    seconds: float
    cpu_seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / self.images


def measure(
    batches: Iterator[np.ndarray], warmup: int, seconds: float, max_batches: int | None = None
) -> Throughput:
    """Times a loader's batches after a warm-up, then closes it.

    Args:
      batches: a fresh loader (`tljax_batches`, `peer_batches`).
      warmup: batches read before timing, the first of them included (at least 1).
      seconds: time batches until this much has passed (when ``max_batches`` is None).
      max_batches: time exactly this many batches instead.

    Returns:
      The `Throughput` (its CPU time is read while the workers are still running).
    """
    start = time.perf_counter()
    try:
        next(batches)
        startup = time.perf_counter() - start
        for _ in range(max(1, warmup) - 1):
            next(batches)
        begin, cpu, images, count = time.perf_counter(), tree_cpu(), 0, 0
        while True:
            images += len(next(batches))
            count += 1
            elapsed = time.perf_counter() - begin
            done = count >= max_batches if max_batches else elapsed >= seconds
            if done:
                return Throughput(startup, images, elapsed, tree_cpu() - cpu)
    finally:
        _close(batches)


def _close(batches) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def tree_cpu(process=None) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants.

    Args:
      process: a ``psutil.Process`` (default: this one).

    Returns:
      The sum over the process (all its threads) and each descendant still running.
    """
    import psutil  # noqa: PLC0415

    process = process or psutil.Process()
    total = sum(process.cpu_times()[:2])  # user, system; not the reaped children's.
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # A worker exiting between the listing and the read.
            continue
    return total


def tree_rss(process=None) -> tuple[float, float]:
    """Resident set size in MB of a process and of it with all its descendants.

    Args:
      process: a ``psutil.Process`` (default: this one).

    Returns:
      (the process's own RSS, the RSS summed over it and its descendants).
    """
    import psutil  # noqa: PLC0415 - installed with orbax-checkpoint, a tljax requirement.

    process = process or psutil.Process()
    own = process.memory_info().rss
    total = own
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # A worker exiting between the listing and the read.
            continue
    return own / _MB, total / _MB


@dataclasses.dataclass(frozen=True)
class MemoryTrace:
    """Host memory while one loader streams a folder once.

    Attributes:
      loader: 'tljax' or 'peer'.
      workers: worker processes.
      images: images read.
      seconds: time of the pass (workers' start included).
      before_mb: the main process's RSS before the loader started.
      samples: (images read, seconds, main RSS MB, main + workers RSS MB), every interval.
    """

    loader: str
    workers: int
    images: int
    seconds: float
    before_mb: float
    samples: tuple[tuple[int, float, float, float], ...]

    def total(self) -> np.ndarray:
        """Main + workers RSS of every sample (MB)."""
        return np.asarray([s[3] for s in self.samples])


def memory_pass(
    loader: str,
    folder: str,
    image_size: int,
    workers: int,
    batch_size: int,
    interval: float,
    images: int | None = None,
) -> MemoryTrace:
    """Streams one pass over ``folder`` with ``loader`` while sampling the memory of its processes.

    Args:
      loader: a key of `LOADER_FUNCTIONS`.
      folder: a folder of class folders.
      image_size: side of the square crop.
      workers: worker processes.
      batch_size: images per batch.
      interval: seconds between samples.
      images: images to read (default: the folder's, rounded up to whole batches).

    Returns:
      The `MemoryTrace` (a sample at the first batch and one at the end included).
    """
    before, _ = tree_rss()
    batches = LOADER_FUNCTIONS[loader](folder, image_size, workers, batch_size)
    total = images or len(list_images(folder))
    read = [0]
    samples = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample():
        samples.append((read[0], time.perf_counter() - start, *tree_rss()))

    def sampler():
        while not stop.wait(interval):
            sample()

    thread = threading.Thread(target=sampler, daemon=True)
    try:
        read[0] = len(next(batches))
        sample()  # Workers up and the first batch out: the trace's first point.
        thread.start()
        while read[0] < total:
            read[0] += len(next(batches))
        sample()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        _close(batches)
    seconds = time.perf_counter() - start
    ordered = tuple(sorted(samples, key=lambda s: s[1]))
    return MemoryTrace(loader, workers, read[0], seconds, before, ordered)


# ------------------------------------------------------------------ report ----


def _workers(count: int) -> str:
    return f"{count} worker" + ("" if count == 1 else "s")


def _median_rate(runs: list[Throughput]) -> float:
    return statistics.median(r.images_per_s for r in runs)


def _median_cpu(runs: list[Throughput]) -> float:
    return statistics.median(r.cpu_ms_per_image for r in runs)


def _rates(runs: list[Throughput]) -> str:
    text = f"{_median_rate(runs):.0f}"
    if len(runs) > 1:
        text += " (" + ", ".join(f"{r.images_per_s:.0f}" for r in runs) + ")"
    return text


def throughput_table(results: dict[tuple[str, int], list[Throughput]]) -> str:
    """Markdown: per worker count, both loaders' images/s (median, rounds), ratio, CPU time per
    image (median), start-up (median).

    Args:
      results: (loader, workers) -> its measurements.

    Returns:
      The table.
    """
    lines = [
        "| workers | tljax images/s | peer images/s | tljax / peer | tljax ≥ peer | "
        "tljax CPU ms / image | peer CPU ms / image | tljax start-up (s) | peer start-up (s) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for workers in sorted({w for _, w in results}):
        ours, peer = results[("tljax", workers)], results[("peer", workers)]
        ratio = _median_rate(ours) / _median_rate(peer)
        cpu = [_median_cpu(runs) for runs in (ours, peer)]
        startups = [statistics.median(r.startup_s for r in runs) for runs in (ours, peer)]
        lines.append(
            f"| {workers} | {_rates(ours)} | {_rates(peer)} | {ratio:.2f} | "
            f"{'yes' if ratio >= 1 else 'no'} | {cpu[0]:.2f} | {cpu[1]:.2f} | "
            f"{startups[0]:.2f} | {startups[1]:.2f} |"
        )
    return "\n".join(lines)


def at_fraction(trace: MemoryTrace, fraction: float) -> float:
    """Main + workers RSS (MB) of the first sample taken after ``fraction`` of the pass's images."""
    for images, _, _, total in trace.samples:
        if images >= fraction * trace.images:
            return total
    return trace.samples[-1][3]


def late_trend(trace: MemoryTrace) -> float:
    """Least-squares slope of main + workers RSS over the second half of the pass, MB per 10,000
    images: about 0 when memory does not grow with the images read."""
    points = np.asarray([(s[0], s[3]) for s in trace.samples if s[0] >= trace.images / 2])
    if len(points) < 2 or np.ptp(points[:, 0]) == 0:
        return float("nan")
    return float(np.polyfit(points[:, 0], points[:, 1], 1)[0] * 10_000)


def memory_table(traces: list[MemoryTrace]) -> str:
    """Markdown: per loader, RSS along the pass (first batch, quarters, end, peak), its trend over
    the second half, the size of one worker and of the main process.

    Args:
      traces: the memory passes.

    Returns:
      The table.
    """
    lines = [
        "| loader | workers | images read | pass (s) | images/s | at first batch (MB) | "
        "25 % | 50 % | 75 % | end | peak | trend, 2nd half (MB / 10k images) | "
        "one worker at first batch (MB) | main process: before → peak (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for trace in traces:
        total = trace.total()
        first_main, first_total = trace.samples[0][2], trace.samples[0][3]
        per_worker = (first_total - first_main) / trace.workers if trace.workers else 0.0
        quarters = " | ".join(f"{at_fraction(trace, f):.0f}" for f in (0.25, 0.5, 0.75))
        main_peak = max(s[2] for s in trace.samples)
        lines.append(
            f"| {trace.loader} | {trace.workers} | {trace.images:,} | {trace.seconds:.0f} | "
            f"{trace.images / trace.seconds:.0f} | {total[0]:.0f} | {quarters} | "
            f"{total[-1]:.0f} | {total.max():.0f} | {late_trend(trace):+.1f} | "
            f"{per_worker:.0f} | {trace.before_mb:.0f} → {main_peak:.0f} |"
        )
    return "\n".join(lines)


def folder_text(stats: FolderStats, generated: bool) -> str:
    """One sentence describing the folder read for throughput."""
    origin = (
        f"generated by the benchmark (synthetic photo-like JPEGs, quality {JPEG_QUALITY})"
        if generated
        else "given with --folder"
    )
    return (
        f"The folder: {stats.images:,} images in {stats.classes} class folders, {origin}; "
        f"width {stats.widths[0]}–{stats.widths[2]} px (median {stats.widths[1]}), height "
        f"{stats.heights[0]}–{stats.heights[2]} px (median {stats.heights[1]}); files "
        f"{stats.kilobytes[0]:.0f}–{stats.kilobytes[2]:.0f} kB (median "
        f"{stats.kilobytes[1]:.0f}, mean {stats.mean_kilobytes:.0f}"
        + (
            f"; sizes of {stats.inspected:,} evenly spaced files"
            if stats.inspected < stats.images
            else ""
        )
        + ")."
    )


def plot(results: dict[tuple[str, int], list[Throughput]], traces: list[MemoryTrace], path: str):
    """Images/s per worker count (bars, both loaders) and, with traces, RSS over images read.

    Args:
      results: (loader, workers) -> measurements.
      traces: memory passes (may be empty).
      path: the PNG to write.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = 2 if traces else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), dpi=100, squeeze=False)
    ax = axes[0][0]
    workers = sorted({w for _, w in results})
    x = np.arange(len(workers))
    for offset, loader in zip((-0.2, 0.2), LOADERS, strict=True):
        rates = [_median_rate(results[(loader, w)]) for w in workers]
        ax.bar(x + offset, rates, width=0.4, label=loader)
    ax.set_xticks(x, [str(w) for w in workers])
    ax.set_xlabel("worker processes")
    ax.set_ylabel("images/s (decode + augment)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    if traces:
        ax = axes[0][1]
        for trace in traces:
            read = [s[0] for s in trace.samples]
            ax.plot(read, trace.total(), label=f"{trace.loader}, {_workers(trace.workers)}")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("images read")
        ax.set_ylabel("RSS, main + workers (MB)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    page: str,
    results: dict[tuple[str, int], list[Throughput]],
    traces: list[MemoryTrace],
    stats: FolderStats,
    generated: bool,
    settings: dict,
    command: str | None = None,
) -> str | None:
    """Writes the results page (and its figure) from the measurements.

    Args:
      page: the page's path ('' for none).
      results: (loader, workers) -> throughput measurements.
      traces: memory passes (may be empty).
      stats: the throughput folder's sizes.
      generated: whether the benchmark generated that folder.
      settings: image_size, batch_size, warmup, timed ('15 s' or '40 batches'), rounds;
        optional: rss_folder (a sentence on the memory folder), load_at_start (the load
        average when the run began).
      command: the command line for the page (default: this process's).

    Returns:
      The page's path, or None without one.
    """
    if not page:
        return None
    figure = results_page.figure_path(page)
    plot(results, traces, figure)
    tables = "### Throughput\n\n" + throughput_table(results)
    if traces:
        tables += "\n\n### Host memory over one pass\n\n" + memory_table(traces)
    return results_page.write_page(
        page,
        "Input pipeline: decoding and augmenting JPEG folders, tljax vs a plain PIL loader",
        tables,
        command=command,
        figure=figure,
        settings=_settings_text(stats, generated, settings),
        notes=_notes_text(results, traces),
    )


def _settings_text(stats: FolderStats, generated: bool, settings: dict) -> str:
    side = settings["image_size"]
    return (
        folder_text(stats, generated)
        + f" Host work per image: open and decode the JPEG to RGB, resize to "
        f"{round(side / transforms.CROP_FRACTION)}² (TLlib's ResizeImage), torchvision-style "
        f"RandomResizedCrop to {side}×{side} and a random horizontal flip "
        "(`tljax.data.transforms.load` with `random_resized_crop,flip`), giving uint8 "
        "arrays; normalisation (mean/std, float conversion) happens on the device inside the "
        "train step and is not host work. tljax: `tljax.data.load_split('folder:<root>', "
        "'all')` in `folders.reading(FolderOptions(augment=('random_resized_crop', 'flip')))`, "
        "a `pipeline.Stream`, read through `streaming.train_rows` (Grain `mp_prefetch`, "
        "spawned workers) as `pipeline.train_batches` reads it, without the device transfer. "
        "Peer: the same files listed with `os.walk`, shuffled per epoch, batches of paths "
        "mapped in order by `multiprocessing.Pool(workers).imap` (spawned workers, 2 batches in "
        "flight per worker), each worker calling the same `transforms.load` per file, so the "
        f"per-image work is identical. Batches of {settings['batch_size']}; after "
        f"{settings['warmup']} warm-up batches (the first batch's delay is the start-up "
        f"column), {settings['timed']} timed per measurement, {settings['rounds']} round(s) "
        "per cell, the two loaders measured back to back on the same machine in alternating "
        "order; the table gives the median images/s with each round's value in brackets. "
        "The folder's files are read from the page cache after the first pass, so disk speed "
        "is not part of the figures. "
        + (
            f"Load average (1, 5, 15 min) when the benchmark started: {settings['load_at_start']}. "
            if settings.get("load_at_start")
            else ""
        )
        + settings.get("rss_folder", "")
    ).strip()


def _notes_text(results, traces: list[MemoryTrace]) -> str:
    workers = sorted({w for _, w in results})
    met = [
        w
        for w in workers
        if _median_rate(results[("tljax", w)]) >= _median_rate(results[("peer", w)])
    ]
    missed = [w for w in workers if w not in met]
    verdict = (
        "met at every worker count"
        if not missed
        else f"not met at {', '.join(map(str, missed))} worker(s)"
    )
    cpu = "; ".join(
        f"{_workers(w)}: tljax {_median_cpu(results[('tljax', w)]):.2f} ms, peer "
        f"{_median_cpu(results[('peer', w)]):.2f} ms "
        f"({_median_cpu(results[('tljax', w)]) / _median_cpu(results[('peer', w)]) - 1:+.0%})"
        for w in workers
    )
    text = (
        f"Goal: tljax ≥ the peer in images/s at equal workers; {verdict} (medians). Other jobs "
        "shared the machine during the runs (load averages above), so wall-clock images/s "
        "follow the CPU share the loaders got, which changed between rounds (the bracketed "
        "values). CPU time per image, summed over the main process and the workers (user + "
        "system, psutil), depends much less on other jobs: it is what each loader spends to "
        f"deliver an image, lower is better; {cpu}."
    )
    if traces:
        growth = "; ".join(
            f"{t.loader} {t.total().max() - t.total()[0]:+.0f} MB to the peak, trend over the "
            f"second half {late_trend(t):+.1f} MB per 10,000 images"
            for t in traces
        )
        text += (
            "\n\nMemory: RSS is summed over the main process and its worker processes (psutil; "
            "pages shared between processes, such as the Python runtime and libraries, count in "
            "each, so the sum overstates the total), sampled during one pass; the quarter columns "
            "are the first sample after that share of the images. From the first batch: "
            f"{growth}. Neither loader holds decoded images beyond the batches in flight (tljax's "
            "`FolderImages` holds the file list; the peer's pool holds at most 2 batches per "
            "worker). 'One worker' is (total − main) / workers at the first batch: what each "
            "worker process costs, libraries included (in this environment `import grain` "
            "imports JAX, so each Grain worker carries JAX's libraries; the peer's workers "
            "import NumPy and PIL). The main process has JAX imported (tljax's pipeline "
            "imports it), as in training; its 'before' is measured after the previous passes."
        )
    return text


# -------------------------------------------------------------------- main ----


def _throughput_folder() -> tuple[str, bool]:
    if _FOLDER.value:
        return _FOLDER.value, False
    root = os.path.join(_CACHE_DIR.value, f"photos_{_GENERATE_IMAGES.value}_c{_CLASSES.value}")
    began = time.time()
    generate_folder(root, _GENERATE_IMAGES.value, _CLASSES.value)
    print(f"Folder {root} ready ({time.time() - began:.0f} s).", flush=True)
    return root, True


def run_throughput(folder: str, workers: list[int]) -> dict[tuple[str, int], list[Throughput]]:
    """Every (loader, workers) measurement, ``--rounds`` times, loaders in alternating order."""
    results: dict[tuple[str, int], list[Throughput]] = {}
    for round_number in range(_ROUNDS.value):
        order = LOADERS if round_number % 2 == 0 else LOADERS[::-1]
        for count in workers:
            for loader in order:
                batches = LOADER_FUNCTIONS[loader](
                    folder, _IMAGE_SIZE.value, count, _BATCH_SIZE.value
                )
                result = measure(batches, _WARMUP.value, _SECONDS.value, _BATCHES.value)
                results.setdefault((loader, count), []).append(result)
                print(
                    f"round {round_number} {loader} workers={count}: "
                    f"{result.images_per_s:.0f} images/s, start-up {result.startup_s:.2f} s",
                    flush=True,
                )
    return results


def run_memory(source: str, workers: int) -> tuple[list[MemoryTrace], str]:
    """The memory passes over a ``--rss_images`` folder of links; a sentence describing them."""
    if not _RSS_IMAGES.value:
        return [], ""
    root = os.path.join(_CACHE_DIR.value, f"linked_{_RSS_IMAGES.value}_{os.path.basename(source)}")
    linked_folder(source, root, _RSS_IMAGES.value)
    traces = []
    for loader in _RSS_LOADERS.value:
        trace = memory_pass(
            loader, root, _IMAGE_SIZE.value, workers, _BATCH_SIZE.value, _RSS_INTERVAL.value
        )
        total = trace.total()
        print(
            f"memory {loader} workers={workers}: {trace.images} images in {trace.seconds:.0f} s, "
            f"RSS {total[0]:.0f} -> peak {total.max():.0f} -> end {total[-1]:.0f} MB",
            flush=True,
        )
        traces.append(trace)
    sentence = (
        f"Memory pass: one pass over a folder of {_RSS_IMAGES.value:,} files (hard links to "
        f"the {len(list_images(source)):,} images above, cycled; each is opened and decoded as a "
        f"separate file) with {_workers(workers)}, RSS sampled every {_RSS_INTERVAL.value:g} s."
    )
    return traces, sentence


def main(argv):
    del argv
    load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    unknown = sorted(set(_RSS_LOADERS.value) - set(LOADERS))
    if unknown:
        raise app.UsageError(f"--rss_loaders {unknown}: use {list(LOADERS)}.")
    workers = [int(w) for w in _WORKERS.value]
    if any(w < 0 for w in workers):
        raise app.UsageError(f"--workers={_WORKERS.value}: counts must be >= 0.")
    if _RSS_IMAGES.value and _FOLDER.value:
        raise app.UsageError(
            "--rss_images links the generated folder's files: with --folder, set --rss_images=0."
        )
    folder, generated = _throughput_folder()
    stats = folder_stats(folder)
    print(folder_text(stats, generated), flush=True)
    results = run_throughput(folder, workers)
    print(throughput_table(results), flush=True)
    traces, rss_folder = run_memory(folder, max(workers))
    if traces:
        print(memory_table(traces), flush=True)
    timed = f"{_BATCHES.value} batches" if _BATCHES.value else f"{_SECONDS.value:g} s"
    write_report(
        _PAGE.value,
        results,
        traces,
        stats,
        generated,
        dict(
            image_size=_IMAGE_SIZE.value,
            batch_size=_BATCH_SIZE.value,
            warmup=_WARMUP.value,
            timed=timed,
            rounds=_ROUNDS.value,
            rss_folder=rss_folder,
            load_at_start=load_at_start,
        ),
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
