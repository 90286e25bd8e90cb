"""tfds datasets read record by record from array_record files: large splits streamed.

A tfds dataset prepared in the array_record file format (``tfds build NAME
--file_format=array_record``, or ``builder.download_and_prepare(file_format="array_record")``)
gives random access to its records through ``tfds.data_source``. `load` reads such a split with
the options of the enclosing `tljax.data.folders.reading` block (``model.image_size``,
``model.channels`` and the ``data.folder`` block) and chooses, logging the choice:

- streamed: a lazy `RecordImages` (a `tljax.data.folders.FolderImages`, so the input pipeline
  decodes it in its worker processes as it does image folders) when the split decoded at the
  model's size exceeds ``data.folder.in_memory_mb`` or ``data.folder.augment`` is set;
- in memory otherwise: records of one fixed shape stacked as they are (what tfds's
  ``as_dataset`` gives for the TFRecord format), records of varying sizes decoded at the model's
  size;
- neither (None) when the dataset is not prepared in array_record here: the caller's
  in-memory tfds path runs, and the log says why.

A streamed record already of the model's size is not resized: the evaluation transform leaves
it as it is (so it equals the in-memory row, channels converted to ``model.channels``), and
training applies ``flip`` and ``color_jitter`` at that size; ``random_resized_crop`` and records
of other sizes get the transforms of image files (`tljax.data.transforms`: TLlib's resize,
centre or random crop).

Labels are read in one pass over the split with image decoding skipped, and cached under
``$TLJAX_CACHE_DIR`` (default ``~/.cache/tljax``) while the array_record files are unchanged.
tfds decodes a record's image with OpenCV or PIL, not TensorFlow, and this module imports
neither TensorFlow nor JAX, so the pipeline's worker processes that unpickle `RecordImages` never
load TensorFlow. Without a model image size (no `tljax.data.folders.reading` options), records
of one fixed shape are read into memory as they are.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tljax.data import DatasetUnavailableError, folders, transforms
from tljax.data.folders import FolderImages, FolderOptions
from tljax.validate import DataError

__all__ = ["RecordFiles", "RecordImages", "RecordSource", "current_options", "find", "load"]

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
# Records per read in the label pass and the in-memory read.
_CHUNK = 4096
_LABEL_CACHE_VERSION = 1

log = logging.getLogger(__name__)


def current_options() -> FolderOptions | None:
    """The reading options of the enclosing `tljax.data.folders.reading` block, or None."""
    return folders._OPTIONS.get()


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """One split of a tfds dataset prepared as array_record: all a process needs to open it.

    Attributes:
      name: the tfds name as given, e.g. ``"embedded_digits/mnist"``.
      split: the tfds split spec, e.g. ``"train"`` or ``"test[:10%]"``.
      directory: the prepared dataset's directory (``<data_dir>/<name>/<version>``).
      full_name: tfds's name with config and version, e.g. ``"embedded_digits/mnist/1.0.0"``.
    """

    name: str
    split: str
    directory: str
    full_name: str

    @property
    def where(self) -> str:
        return f"{self.name} ({self.split})"

    def open(self, skip_images: bool = False):
        """The split's tfds data source, opened once per process (never pickled).

        Args:
          skip_images: leave images encoded (a label pass reads no pixels).

        Returns:
          A ``tfds`` array_record data source: ``len``, ``source[i]`` and
          ``source.__getitems__(indices)`` give decoded records.
        """
        return _open_source(self.directory, self.split, skip_images)


@functools.lru_cache(maxsize=32)
def _open_source(directory: str, split: str, skip_images: bool):
    # From the directory, not the registry: worker processes have not imported the builders.
    builder = tfds.builder_from_directory(directory)
    decoders = {"image": tfds.decode.SkipDecoding()} if skip_images else None
    return builder.as_data_source(split=split, decoders=decoders, file_format=ARRAY_RECORD)


@dataclasses.dataclass(frozen=True)
class RecordFiles:
    """The records of one split, in the role `tljax.data.folders.ImageFiles` has for files.

    Attributes:
      source: the split.
      indices: int64 record index into the split's data source of each row.
      labels: int32 class index of each row.
      classes: class names of tfds's label feature; label i is classes[i].
      where: the dataset name and split, for messages.
    """

    source: RecordSource
    indices: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    where: str

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, row: int) -> str:
        """Names one row's record in messages."""
        return f"{self.where} record {int(self.indices[row])}"

    def take(self, rows: np.ndarray) -> RecordFiles:
        """The records of ``rows`` (indices or a boolean mask), in that order."""
        return dataclasses.replace(self, indices=self.indices[rows], labels=self.labels[rows])

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 over dataset, split, record count and rows: changes when what is read does."""
        digest = hashlib.sha256()
        digest.update(f"{self.source.full_name}\n{self.source.split}\n{len(self)}\n".encode())
        digest.update(np.ascontiguousarray(self.indices, np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.labels, np.int32).tobytes())
        return digest.hexdigest()


class RecordImages(FolderImages):
    """A split's images as array_record records: indexed like the uint8 (N, H, W, C) array.

    Behaves as `FolderImages` (lazy views, ``np.asarray``, `read` with seeds for augmentation);
    rows come from the data source, opened on first use in each process, so it pickles small.
    """

    def __repr__(self) -> str:
        return f"RecordImages({self.files.where}, shape={self.shape})"

    def _load_row(self, row: int, rng) -> np.ndarray:
        record = self.files.source.open()[int(self.files.indices[row])]
        return record_image(record["image"], self.options, rng, self.files.path(row))


_MODES = {1: "L", 3: "RGB"}


def record_image(array: np.ndarray, options: FolderOptions, rng, where: str) -> np.ndarray:
    """One record's image at the model's size and channels, augmented when ``rng`` is given.

    Args:
      array: the record's uint8 (H, W, C) image, C in 1..4 (alpha is dropped, as for files).
      options: the model's size and channels, and the augmentations.
      rng: None for the evaluation transform, else the generator of the augmentation.
      where: names the record in errors.

    Returns:
      uint8 (height, width, channels).

    Raises:
      DataError: the image is not uint8 (H, W, C) with 1 to 4 channels.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or not 1 <= array.shape[-1] <= 4:
        raise DataError(
            f"{where}: image of dtype {array.dtype} and shape {array.shape}; expected uint8 "
            "(height, width, channels) with 1 to 4 channels."
        )
    # PIL infers L, LA, RGB or RGBA from the channels; the conversion drops alpha.
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image = image.convert(_MODES[options.channels])
    size = tuple(options.image_size)
    native = (image.height, image.width) == size
    if rng is None:
        image = image if native else transforms.eval_image(image, size)
    elif native and "random_resized_crop" not in options.augment:
        image = transforms.flip_and_jitter(image, options.augment, rng)
    else:
        image = transforms.train_image(image, size, options.augment, rng)
    return transforms.to_array(image, options.channels)


# ------------------------------------------------------------------- find ----


def find(name: str, split: str, data_dir: str | None) -> tuple[RecordSource | None, str]:
    """The split as array_record records, or why it cannot be read that way.

    Args:
      name: tfds name.
      split: tfds split spec.
      data_dir: tfds data directory (None: tfds's default).

    Returns:
      ``(source, "")``, or ``(None, reason)`` when the dataset is unknown to tfds, not prepared
      in ``data_dir`` or prepared in another file format.

    Raises:
      DatasetUnavailableError: the dataset is prepared only as array_record and the
        ``array_record`` package is not installed (tfds cannot read it in any other way).
      DataError: the split spec is not one of the dataset's.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # tfds raises several types for unknown names and configs.
        return None, f"tfds cannot open it ({type(err).__name__})"
    if not builder.is_prepared():
        return None, f"it is not prepared in {builder.data_dir_root}"
    info = builder.info
    formats = {info.file_format, *(info.alternative_file_formats or ())}
    if ARRAY_RECORD not in formats:
        formats = ", ".join(sorted(str(f.value) for f in formats if f is not None)) or "unknown"
        return None, (
            f"it is prepared as {formats}; prepare it with `tfds build {name} "
            "--file_format=array_record` to read it record by record"
        )
    if importlib.util.find_spec("array_record") is None:
        raise DatasetUnavailableError(
            f"Dataset '{name}' is prepared as array_record in {builder.data_dir}, and the "
            "array_record package is not installed: `pip install array_record`."
        )
    _check_features(name, info)
    source = RecordSource(name, split, os.fspath(builder.data_dir), info.full_name)
    try:
        source.open()
    except (ValueError, KeyError) as err:
        raise DataError(
            f"Dataset '{name}' split '{split}': {err}; it has splits {sorted(info.splits)}."
        ) from err
    return source, ""


def _check_features(name: str, info) -> None:
    features = dict(info.features.items())
    image, label = features.get("image"), features.get("label")
    if image is None or not isinstance(label, tfds.features.ClassLabel):
        raise DataError(
            f"Dataset '{name}' has features {sorted(features)}: tljax reads an 'image' and a "
            "class 'label' (tfds.features.ClassLabel)."
        )
    if np.dtype(image.np_dtype) != np.uint8:
        raise DataError(f"Dataset '{name}': images are {image.np_dtype}; tljax reads uint8.")


# ------------------------------------------------------------------- load ----


def load(name: str, split: str, data_dir: str | None = None) -> dict[str, object] | None:
    """One split read from its array_record records, streamed when large or augmented.

    Args:
      name: tfds name.
      split: tfds split spec.
      data_dir: tfds data directory (None: tfds's default).

    Returns:
      ``{"image": RecordImages or uint8 (N, H, W, C), "label": int32 (N,)}``, read-only; or
      None when the dataset is not prepared as array_record in ``data_dir`` (the reason is
      logged): read it with tfds's in-memory path then.

    Raises:
      DataError: the dataset lacks an image or class label, its images vary in size and the
        config has no ``model.image_size``, or the split is unknown.
      tljax.data.DatasetUnavailableError: see `find`.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    source, reason = find(name, split, data_dir)
    if source is None:
        log.info("%s (%s): read whole into memory by tfds: %s.", name, split, reason)
        return None
    return dict(_load_cached(source, current_options()))


@functools.lru_cache(maxsize=16)
def _load_cached(source: RecordSource, options: FolderOptions | None) -> dict[str, object]:
    count = len(source.open())
    shape = _fixed_shape(source.directory)
    if options is None:
        if shape is None:
            raise DataError(
                f"Dataset {source.where}: its images vary in size, so they are read at the "
                "model's size, and this config has no model.image_size."
            )
        log.info("%s: %d records -> read into memory as they are.", source.where, count)
        return _frozen(*_read_all(source, shape, folders.default_workers()))
    decoded_mb = count * float(np.prod(options.image_size)) * options.channels / 2**20
    streamed = bool(options.augment) or decoded_mb > options.in_memory_mb
    log.info(
        "%s: %d records, %.0f MB decoded at %dx%d -> %s.",
        source.where,
        count,
        decoded_mb,
        *options.image_size,
        _choice(options, streamed, shape),
    )
    if shape is not None and not streamed:
        return _frozen(*_read_all(source, shape, options.workers))
    images = RecordImages(record_files(source), options)
    labels = images.files.labels
    return _frozen(images if streamed else images.decoded(options.workers), labels)


def _choice(options: FolderOptions, streamed: bool, shape) -> str:
    if streamed:
        augmented = f", augmented ({', '.join(options.augment)})" if options.augment else ""
        return f"streamed from array_record by {options.workers} worker process(es){augmented}"
    if shape is not None:
        return "read into memory as they are"
    return "decoded once into memory at the model's size"


def _fixed_shape(directory: str) -> tuple[int, int, int] | None:
    shape = _info(directory).features["image"].shape
    return None if any(side is None for side in shape) else tuple(int(s) for s in shape)


@functools.lru_cache(maxsize=32)
def _info(directory: str):
    return tfds.builder_from_directory(directory).info


def _frozen(images, labels: np.ndarray) -> dict[str, object]:
    # Shared between callers through the cache, so nobody may change them in place.
    labels = np.array(labels, np.int32)
    labels.setflags(write=False)
    if isinstance(images, np.ndarray):
        images.setflags(write=False)
    return {"image": images, "label": labels}


def _read_all(source: RecordSource, shape, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Every record of the split, images as they are, read by ``threads`` threads."""
    data = source.open()
    images = np.empty((len(data), *shape), np.uint8)
    labels = np.empty(len(data), np.int32)

    def read(start: int) -> None:
        stop = min(start + _CHUNK, len(data))
        for offset, record in enumerate(data.__getitems__(range(start, stop))):
            images[start + offset] = record["image"]
            labels[start + offset] = record["label"]

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(read, range(0, len(data), _CHUNK)))
    return images, labels


# ----------------------------------------------------------------- labels ----


def record_files(source: RecordSource) -> RecordFiles:
    """The split's rows: every record in order, with its label and the class names.

    Args:
      source: the split.

    Returns:
      The records; labels come from the disk cache while the dataset's files are unchanged.
    """
    return _record_files_cached(source)


@functools.lru_cache(maxsize=16)
def _record_files_cached(source: RecordSource) -> RecordFiles:
    classes = tuple(_info(source.directory).features["label"].names)
    labels = _cached_labels(source)
    if labels is None:
        labels = _read_labels(source)
        _write_cached_labels(source, labels)
    indices = np.arange(len(labels), dtype=np.int64)
    return RecordFiles(source, indices, labels, classes, source.where)


def _read_labels(source: RecordSource) -> np.ndarray:
    data = source.open(skip_images=True)
    labels = np.empty(len(data), np.int32)
    for start in range(0, len(data), _CHUNK):
        chunk = data.__getitems__(range(start, min(start + _CHUNK, len(data))))
        labels[start : start + len(chunk)] = [record["label"] for record in chunk]
    return labels


def _label_cache_file(source: RecordSource) -> str:
    base = os.environ.get("TLJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tljax"
    )
    # The files' sizes and times are in the key: a re-prepared dataset is read again.
    stamps = [source.directory, source.split, str(_LABEL_CACHE_VERSION)]
    for entry in sorted(os.scandir(source.directory), key=lambda e: e.name):
        if ".array_record" in entry.name:
            stat = entry.stat()
            stamps.append(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:32]
    return os.path.join(base, "record_labels", f"{key}.npy")


def _cached_labels(source: RecordSource) -> np.ndarray | None:
    try:
        return np.load(_label_cache_file(source)).astype(np.int32)
    except (OSError, ValueError):
        return None


def _write_cached_labels(source: RecordSource, labels: np.ndarray) -> None:
    path = _label_cache_file(source)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written whole, then renamed: a reader never sees half a file.
        with open(f"{path}.{os.getpid()}.tmp", "wb") as f:
            np.save(f, labels)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    except OSError as err:  # A read-only home only costs the next run a label pass.
        log.debug("Not caching the labels of %s: %s", source.where, err)
