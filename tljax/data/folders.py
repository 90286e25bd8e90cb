"""Image-folder datasets: ``folder:<path>`` names, read lazily from JPEG/PNG files.

A dataset named ``folder:<path>`` is accepted wherever a dataset name is (``data.source``,
``data.target``, ``data.train``, multi-task and fine-tuning datasets). ``<path>`` holds one folder
per class (``<path>/<class>/**/<image>``, class names sorted, as torchvision's ``ImageFolder``);
its splits are

- the ``train/`` and ``test/`` subfolders of ``<path>`` when both exist (each holding class
  folders);
- otherwise the class folders directly under ``<path>``, split per class by a seeded fraction
  (``data.folder.test_fraction``, ``data.folder.split_seed``), or every image in every split
  with ``data.folder.split=all`` (the Office protocols).

A relative ``<path>`` is taken under ``data.root`` when the config sets it. Images of any size are
resized and cropped to ``model.image_size`` and converted to ``model.channels``
(`tljax.data.transforms`); training streams augment them (``data.folder.augment``).

`load` returns ``{"image": FolderImages, "label": int32 array}``: `FolderImages` stands for the
uint8 (N, H, W, C) array and is indexed like it (views stay lazy), and it is decoded only when read
— by the streaming pipeline's worker processes (`tljax.data.streaming`), or as a whole by
``np.asarray``. A split small enough (``data.folder.in_memory_mb``) and without augmentation is
decoded once into memory instead; the choice is logged.

File lists are cached in memory and under ``$TLJAX_CACHE_DIR`` (default ``~/.cache/tljax``),
keyed by the folder and the modification times of its directories, so a changed folder is
rescanned. This module imports no JAX: the pipeline's worker processes unpickle it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from tljax.data import transforms
from tljax.validate import ConfigError, DataError

PREFIX = "folder:"
# torchvision's IMG_EXTENSIONS, compared without case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test", "all")
SPLIT_MODES = ("auto", "all")
ON_BAD_IMAGE = ("stop", "skip")
_SPLIT_ALIASES = {"validation": "test", "val": "test"}
_CACHE_VERSION = 1

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    """How folder datasets are read; the trainer sets them from the config (`from_config`).

    Attributes:
      image_size: (height, width) of every image handed to the model (``model.image_size``).
      channels: 3 (RGB) or 1 (greyscale) (``model.channels``).
      augment: training augmentations (`tljax.data.transforms.AUGMENTATIONS`).
      split: 'auto' (train/test subfolders, else a seeded per-class fraction) or 'all'.
      test_fraction: share of each class in the test split when it is drawn.
      split_seed: seed of that draw.
      on_bad_image: 'stop' at an unreadable image, or 'skip' it with a counted warning.
      workers: worker processes decoding images (0: in the main process).
      in_memory_mb: splits up to this size, decoded, are held in memory when not augmented.
      root: where relative folder paths start (``data.root``); None: the working directory.
    """

    image_size: tuple[int, int]
    channels: int = 3
    augment: tuple[str, ...] = ()
    split: str = "auto"
    test_fraction: float = 0.2
    split_seed: int = 0
    on_bad_image: str = "stop"
    workers: int = 2
    in_memory_mb: float = 512.0
    root: str | None = None

    @classmethod
    def from_config(cls, config) -> FolderOptions | None:
        """The options a config describes; None when its model has no fixed image size.

        Args:
          config: an experiment config; reads ``model.image_size``, ``model.channels``,
            ``data.root`` and the ``data.folder`` block (all optional).

        Returns:
          The options, or None (folder datasets then cannot be read).

        Raises:
          ConfigError: a ``data.folder`` field with a value that cannot work.
        """
        model = config.get("model") or {}
        if model.get("image_size") is None:
            return None
        data = config.get("data") or {}
        block = dict(data.get("folder") or {})
        unknown = sorted(set(block) - set(_BLOCK_DEFAULTS))
        if unknown:
            raise ConfigError(f"data.folder has unknown field(s) {unknown}; use {_BLOCK_FIELDS}.")
        block = {**_BLOCK_DEFAULTS, **{k: v for k, v in block.items() if v is not None}}
        options = cls(
            image_size=tuple(int(s) for s in model.image_size),
            channels=int(model.get("channels") or 3),
            augment=transforms.parse_augment(block["augment"] or ""),
            split=block["split"],
            test_fraction=float(block["test_fraction"]),
            split_seed=int(block["split_seed"]),
            on_bad_image=block["on_bad_image"],
            workers=default_workers() if block["workers"] is None else int(block["workers"]),
            in_memory_mb=float(block["in_memory_mb"]),
            root=data.get("root"),
        )
        options.check()
        return options

    def check(self) -> None:
        """Raises ConfigError naming the ``data.folder`` field whose value cannot work."""
        if self.split not in SPLIT_MODES:
            raise ConfigError(f"data.folder.split={self.split!r}; use one of {SPLIT_MODES}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(
                f"data.folder.test_fraction={self.test_fraction} must lie strictly between 0 and 1."
            )
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(
                f"data.folder.on_bad_image={self.on_bad_image!r}; use one of {ON_BAD_IMAGE}."
            )
        if self.workers < 0:
            raise ConfigError(f"data.folder.workers={self.workers} must be >= 0.")
        if self.channels not in (1, 3):
            raise ConfigError(f"model.channels={self.channels}: folder images give 1 or 3.")


_BLOCK_DEFAULTS = dict(
    augment="",
    split="auto",
    test_fraction=0.2,
    split_seed=0,
    on_bad_image="stop",
    workers=None,
    in_memory_mb=512.0,
)
_BLOCK_FIELDS = tuple(_BLOCK_DEFAULTS)


def default_workers() -> int:
    """Worker processes by default: the host's CPUs, at most 8."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def config_block(**overrides):
    """The ``data.folder`` config block with its defaults (see `FolderOptions`).

    Args:
      **overrides: fields to set, e.g. ``augment="random_resized_crop,flip"``.

    Returns:
      An ``ml_collections.ConfigDict``.
    """
    import ml_collections  # noqa: PLC0415 - configs only; worker processes never build one.
    from ml_collections.config_dict import FieldReference  # noqa: PLC0415

    block = ml_collections.ConfigDict({k: v for k, v in _BLOCK_DEFAULTS.items() if k != "workers"})
    block.workers = FieldReference(None, field_type=int)
    block.update(overrides)
    return block


_OPTIONS: contextvars.ContextVar[FolderOptions | None] = contextvars.ContextVar(
    "tljax_folder_options", default=None
)


@contextlib.contextmanager
def reading(options: FolderOptions | None) -> Iterator[None]:
    """Within the block, folder datasets are read with ``options``.

    Args:
      options: the options (`FolderOptions.from_config`); None leaves folders unreadable.

    Yields:
      Nothing.
    """
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def is_folder(name: str) -> bool:
    """Whether a dataset name is a ``folder:<path>`` name."""
    return isinstance(name, str) and name.startswith(PREFIX)


# ------------------------------------------------------------ file lists ----


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The image files of one split: paths, labels and the class names labels index.

    Attributes:
      base: the folder the names are relative to.
      names: file paths relative to ``base``, UTF-8 bytes (compact: worker processes each get
        a copy), class by class, sorted within each class.
      labels: int32 class index of each file.
      classes: class names, sorted; label i is classes[i].
      where: the dataset name and split, for messages.
    """

    base: str
    names: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    where: str

    def __len__(self) -> int:
        return len(self.names)

    def path(self, row: int) -> str:
        """The file path of one row."""
        return os.path.join(self.base, self.names[row].decode())

    def take(self, rows: np.ndarray) -> ImageFiles:
        """The files of ``rows`` (indices or a boolean mask), in that order."""
        return dataclasses.replace(self, names=self.names[rows], labels=self.labels[rows])

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the names, labels and classes: changes whenever the file list does."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.classes).encode())
        digest.update(b"\0".join(self.names.tolist()))
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()


def _encoded(names: list[str]) -> np.ndarray:
    return np.asarray([name.encode() for name in names], dtype=bytes)


def scan(directory: str) -> ImageFiles:
    """The images under ``directory``'s class folders, cached while the folders are unchanged.

    Args:
      directory: a folder holding one subfolder per class.

    Returns:
      The files, class by class (classes sorted), sorted within each class.

    Raises:
      DataError: the folder is missing, has no class folders, or a class folder has no images.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such folder of class folders.")
    classes = sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DataError(
            f"{directory} has no class folders: expected {directory}/<class>/<image> "
            f"(images ending in {', '.join(IMAGE_EXTENSIONS)})."
        )
    signature = _signature(directory, classes)
    return _scan_cached(directory, signature)


def _signature(directory: str, classes: list[str]) -> str:
    """Modification times of every directory in the tree: they change when files come or go."""
    stamps = [f"{directory}:{os.stat(directory).st_mtime_ns}"]
    for name in classes:
        for folder, subfolders, _ in os.walk(os.path.join(directory, name), followlinks=True):
            subfolders.sort()
            stamps.append(f"{folder}:{os.stat(folder).st_mtime_ns}")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _scan_cached(directory: str, signature: str) -> ImageFiles:
    cached = _read_disk_cache(directory, signature)
    if cached is not None:
        return cached
    classes = sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    names, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(directory, name)
        if not found:
            raise DataError(
                f"Class folder {os.path.join(directory, name)} holds no images (expected files "
                f"ending in {', '.join(IMAGE_EXTENSIONS)}); remove it or add its images."
            )
        names += found
        labels += [label] * len(found)
    files = ImageFiles(
        directory, _encoded(names), np.asarray(labels, np.int32), tuple(classes), directory
    )
    _write_disk_cache(directory, signature, files)
    return files


def _images_under(directory: str, class_name: str) -> list[str]:
    """Image paths under one class folder, relative to ``directory``, sorted."""
    found = []
    for parent, subfolders, names in os.walk(os.path.join(directory, class_name), followlinks=True):
        subfolders.sort()
        relative = os.path.relpath(parent, directory)
        found += [
            os.path.join(relative, name)
            for name in sorted(names)
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
        ]
    return found


def _cache_file(directory: str) -> str:
    base = os.environ.get("TLJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tljax"
    )
    key = hashlib.sha256(directory.encode()).hexdigest()[:32]
    return os.path.join(base, "file_lists", f"{key}.json")


def _read_disk_cache(directory: str, signature: str) -> ImageFiles | None:
    try:
        with open(_cache_file(directory)) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if entry.get("version") != _CACHE_VERSION or entry.get("signature") != signature:
        return None
    labels = np.asarray(entry["labels"], np.int32)
    return ImageFiles(
        directory, _encoded(entry["names"]), labels, tuple(entry["classes"]), directory
    )


def _write_disk_cache(directory: str, signature: str, files: ImageFiles) -> None:
    entry = dict(
        version=_CACHE_VERSION,
        directory=directory,
        signature=signature,
        classes=list(files.classes),
        names=[name.decode() for name in files.names.tolist()],
        labels=files.labels.tolist(),
    )
    path = _cache_file(directory)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written whole, then renamed: a reader never sees half a list.
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            json.dump(entry, f)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    except OSError as err:  # A read-only home only costs the next run a rescan.
        log.debug("Not caching the file list of %s: %s", directory, err)


# ----------------------------------------------------------------- splits ----


def resolve(name: str, root: str | None = None) -> str:
    """The folder a ``folder:<path>`` name points at (relative paths start at ``root``).

    Args:
      name: the dataset name.
      root: ``data.root``, or None.

    Returns:
      The absolute folder path.

    Raises:
      DataError: the folder does not exist (the message lists its parent's folders, e.g. the
        domains a benchmark root does hold).
    """
    path = os.path.expanduser(name[len(PREFIX) :])
    if not path:
        raise DataError(f"Dataset {name!r}: expected folder:<path>.")
    if root and not os.path.isabs(path):
        path = os.path.join(os.path.expanduser(root), path)
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(path)
    hint = "set data.root to the folder that holds it, or give an absolute path"
    if os.path.isdir(parent):
        present = sorted(e.name for e in os.scandir(parent) if e.is_dir())
        hint = f"{parent} holds {', '.join(present) or 'no folders'}"
    raise DataError(f"Dataset {name!r}: no folder {path} ({hint}).")


def split_files(name: str, split: str, options: FolderOptions) -> ImageFiles:
    """The files of one split of a folder dataset (see the module docstring for the rules).

    Args:
      name: ``folder:<path>``.
      split: 'train', 'test' (also 'validation' / 'val') or 'all'.
      options: the reading options (split mode, fraction, seed, root).

    Returns:
      The split's files.

    Raises:
      DataError: an unknown split, a missing folder, class folders without images, or train /
        test subfolders whose class lists differ.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise DataError(
            f"Dataset {name!r}: split {split!r}; folder datasets have {', '.join(SPLITS)}."
        )
    path = resolve(name, options.root)
    where = f"{name} ({split})"
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        parts = [_rebased(scan(train_dir), path), _rebased(scan(test_dir), path)]
        check_same_classes({f"{name} train/": parts[0], f"{name} test/": parts[1]})
        if split == "all":
            return _concatenate(parts, where)
        return dataclasses.replace(parts[split == "test"], where=where)
    files = scan(path)
    if split == "all" or options.split == "all":
        return dataclasses.replace(files, where=where)
    test_rows = _drawn_test_rows(files.labels, options.test_fraction, options.split_seed)
    rows = test_rows if split == "test" else np.setdiff1d(np.arange(len(files)), test_rows)
    return dataclasses.replace(files.take(rows), where=where)


def _drawn_test_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of the test split: round(fraction * n) of each class of n >= 2, at least one."""
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue  # A lone image stays in training rather than leave the class untrained.
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        rng = np.random.default_rng([seed, int(label)])
        rows.append(np.sort(rng.permutation(members)[:count]))
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def _rebased(files: ImageFiles, base: str) -> ImageFiles:
    prefix = os.path.relpath(files.base, base).encode() + b"/"
    names = np.char.add(prefix, files.names) if len(files) else files.names
    return dataclasses.replace(files, base=base, names=names)


def _concatenate(parts: Sequence[ImageFiles], where: str) -> ImageFiles:
    return ImageFiles(
        parts[0].base,
        np.concatenate([p.names for p in parts]),
        np.concatenate([p.labels for p in parts]),
        parts[0].classes,
        where,
    )


def check_same_classes(named: Mapping[str, ImageFiles]) -> None:
    """Raises DataError unless every named file list has the same classes.

    Args:
      named: what to call each set in the message (e.g. 'data.source') -> its files.

    Raises:
      DataError: naming the sets and the classes only one of them has.
    """
    (first, reference), *others = ((key, files.classes) for key, files in named.items())
    for key, classes in others:
        if classes != reference:
            only_first = sorted(set(reference) - set(classes))
            only_other = sorted(set(classes) - set(reference))
            raise DataError(
                f"{first} has {len(reference)} classes and {key} has {len(classes)}; their class "
                f"folders must match (only in {first}: {only_first[:10]}; only in {key}: "
                f"{only_other[:10]})."
            )


def check_domains_match(named: Mapping[str, str], split: str = "train") -> None:
    """Raises DataError unless the named folder datasets have the same class folders.

    Domain adaptation trains one classifier for both domains, so label i must be the same
    class in each. Names that are not folders are not compared.

    Args:
      named: config field (e.g. 'data.source') -> dataset name.
      split: the split whose class folders are compared.

    Raises:
      DataError: a folder is missing, or the class lists differ (the message names both).
    """
    options = _OPTIONS.get()
    folders = {field: name for field, name in named.items() if is_folder(name)}
    if options is None or len(folders) < 2:
        return
    check_same_classes(
        {f"{field} ({name})": split_files(name, split, options) for field, name in folders.items()}
    )


# ----------------------------------------------------------------- images ----


class FolderImages:
    """A split's images as files: indexed like the uint8 (N, H, W, C) array they stand for.

    Indexing with a slice, integer array or boolean mask gives another lazy `FolderImages`;
    ``np.asarray`` (or `read`) decodes the rows with the evaluation transform; `read` with seeds
    decodes them augmented for training. It pickles small (paths and options), so worker
    processes can decode from it.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files: ImageFiles, options: FolderOptions):
        self.files = files
        self.options = options

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), *self.options.image_size, self.options.channels)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderImages({self.files.where}, shape={self.shape})"

    def __getitem__(self, index) -> FolderImages | np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.read(np.asarray([index]))[0]
        rows = np.arange(len(self))[index]
        return type(self)(self.files.take(rows), self.options)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        del copy  # Always a new array.
        images = self.read(np.arange(len(self)))
        return images if dtype is None else images.astype(dtype)

    def read(self, rows: np.ndarray, seeds: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """Decodes rows: the evaluation transform, or training augmentation when seeded.

        Args:
          rows: row indices into this split.
          seeds: one integer sequence per row seeding its augmentation (the pipeline passes
            (seed, stream, step, row of the global batch)); None: the evaluation transform.

        Returns:
          uint8 [len(rows), H, W, C].

        Raises:
          DataError: an image cannot be read and ``on_bad_image`` is 'stop' (or its whole class
            is unreadable).
        """
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for i, row in enumerate(np.asarray(rows, np.int64)):
            rng = None if seeds is None else np.random.default_rng(list(seeds[i]))
            out[i] = self._load_row(int(row), rng)
        return out

    def _load_row(self, row: int, rng) -> np.ndarray:
        options = self.options
        try:
            return self._load(self.files.path(row), rng)
        except transforms.UnreadableImageError as err:
            if options.on_bad_image == "stop":
                raise DataError(
                    f"Unreadable image in {self.files.where}: {err}. Fix or remove the file, or "
                    "set data.folder.on_bad_image=skip to skip unreadable images."
                ) from err
            return self._substitute(row, err, rng)

    def _load(self, path: str, rng) -> np.ndarray:
        options = self.options
        return transforms.load(
            str(path), options.image_size, options.channels, options.augment, rng
        )

    def _substitute(self, row: int, error: Exception, rng) -> np.ndarray:
        # The next readable image of the same class stands in, so the row's label stays true
        # and the batch is the same in every process and on every resume.
        same_class = np.flatnonzero(self.files.labels == self.files.labels[row])
        start = int(np.searchsorted(same_class, row))
        for other in np.roll(same_class, -start)[1:]:
            try:
                image = self._load(self.files.path(int(other)), rng)
            except transforms.UnreadableImageError:
                continue
            _count_skipped(self.files.path(row), error, self.files.path(int(other)))
            return image
        raise DataError(
            f"Every image of class {self.files.labels[row]} in {self.files.where} is unreadable."
        ) from error

    @property
    def decoded_mb(self) -> float:
        """Size of the whole split decoded, in MiB."""
        return float(np.prod(self.shape, dtype=np.float64)) / 2**20

    def eval_array(self) -> np.ndarray | None:
        """The split decoded with the evaluation transform, kept after the first call; None
        when it is larger than ``in_memory_mb`` (then it is streamed at every evaluation)."""
        if self.decoded_mb > self.options.in_memory_mb:
            return None
        if getattr(self, "_eval_array", None) is None:
            self._eval_array = self.decoded(self.options.workers)
            self._eval_array.setflags(write=False)
        return self._eval_array

    def __getstate__(self) -> dict:
        # Worker processes get the file list, never a decoded copy.
        return {"files": self.files, "options": self.options}

    def decoded(self, threads: int) -> np.ndarray:
        """The whole split decoded (evaluation transform) by ``threads`` threads.

        Args:
          threads: decoding threads (PIL releases the GIL while decoding and resizing).

        Returns:
          uint8 (N, H, W, C).
        """
        chunks = np.array_split(np.arange(len(self)), max(1, threads) * 4)
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            parts = list(pool.map(self.read, [c for c in chunks if len(c)]))
        return np.concatenate(parts) if parts else np.zeros(self.shape, np.uint8)


_SKIPPED = {"count": 0}


def _count_skipped(path: str, error: Exception, substitute: str) -> None:
    _SKIPPED["count"] += 1
    log.warning(
        "Skipped unreadable image %s (%s); %d skipped so far in process %d; %s stands in.",
        path,
        error,
        _SKIPPED["count"],
        os.getpid(),
        substitute,
    )


# ------------------------------------------------------------------- load ----


def load(name: str, split: str) -> dict[str, object]:
    """One split of a folder dataset, read with the options of the enclosing `reading` block.

    Args:
      name: ``folder:<path>``.
      split: 'train', 'test' or 'all'.

    Returns:
      ``{"image": FolderImages or uint8 array, "label": int32 (N,)}``: decoded into memory when
      the split is not augmented and fits in ``in_memory_mb``, else lazy (streamed).

    Raises:
      DataError: no options are set (no model image size), or the folder is not usable.
    """
    options = _OPTIONS.get()
    if options is None:
        raise DataError(
            f"Dataset {name!r}: folder datasets are read at the model's size, and this config "
            "has no model.image_size."
        )
    files = split_files(name, split, options)
    key = (files.where, files.fingerprint, options)
    if key not in _LOADED:
        while len(_LOADED) >= _LOADED_KEPT:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = _arrays(files, options)
    return dict(_LOADED[key])


# Splits loaded in this process, by (name and split, file list, options): a method that reads
# the same split twice (training stream and validation sample) decodes it once.
_LOADED: dict[tuple, dict[str, object]] = {}
_LOADED_KEPT = 16


def _arrays(files: ImageFiles, options: FolderOptions) -> dict[str, object]:
    images = FolderImages(files, options)
    decoded_mb = images.decoded_mb
    in_memory = not options.augment and decoded_mb <= options.in_memory_mb
    log.info(
        "%s: %d images, %d classes, %.0f MB decoded at %dx%d -> %s.",
        files.where,
        len(files),
        len(files.classes),
        decoded_mb,
        *options.image_size,
        "decoded once into memory"
        if in_memory
        else f"streamed from files by {options.workers} worker process(es)"
        + (f", augmented ({', '.join(options.augment)})" if options.augment else ""),
    )
    if in_memory:
        images = images.decoded(options.workers)
        # Shared between callers through the cache, so nobody may change them in place.
        images.setflags(write=False)
    labels = files.labels.copy()
    labels.setflags(write=False)
    return {"image": images, "label": labels}
