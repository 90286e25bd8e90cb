"""Host-side image decoding and augmentation (tljax/data/transforms.py) against TLlib/torchvision.

torchvision cannot be installed next to the pinned torch==2.13.0+cpu here (the only torchvision
0.28 wheel the index has is the CUDA build, whose ops library needs libtorch_cuda), so the
reference computations are transcribed below from torchvision 0.28.0's source
(``transforms/transforms.py``: ``RandomResizedCrop.get_params``, ``ColorJitter.forward``;
``transforms/functional.py``: ``center_crop``, ``resized_crop``, ``resize``;
``transforms/_functional_pil.py``: ``crop``, ``resize``, ``adjust_*``) and from TLlib's
``tllib/vision/transforms/__init__.py`` (``ResizeImage``), with NumPy's generator standing in for
torch's.
"""

import ast
import math
import pickle
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tljax.data import transforms

# ---- References, transcribed ----


def _tllib_resize_image(img, size):
    # tllib.vision.transforms.ResizeImage(size).__call__: th, tw = size, size; img.resize((th, tw))
    return img.resize((size, size))


def _tv_crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


def _tv_resize(img, size):
    # functional.resize with a (h, w) size: the image itself when it already has that size.
    if [img.height, img.width] == list(size):
        return img
    return img.resize(tuple(size[::-1]), Image.BILINEAR)


def _tv_resized_crop(img, top, left, height, width, size):
    return _tv_resize(_tv_crop(img, top, left, height, width), size)


def _tv_center_crop(img, output_size):
    crop_height, crop_width = output_size
    # The padding branch (crop larger than the image) never arises after the base resize.
    assert crop_width <= img.width and crop_height <= img.height
    crop_top = int(round((img.height - crop_height) / 2.0))
    crop_left = int(round((img.width - crop_width) / 2.0))
    return _tv_crop(img, crop_top, crop_left, crop_height, crop_width)


def _tv_get_params(width, height, rng, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """RandomResizedCrop.get_params, torch's draws replaced by the same draws from ``rng``."""
    area = height * width
    log_ratio = np.log(np.array(ratio))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def _tv_color_jitter(img, fn_idx, brightness, contrast, saturation):
    """ColorJitter.forward on a PIL image, hue off, with the drawn order and factors."""
    for fn_id in fn_idx:
        if fn_id == 0:
            img = ImageEnhance.Brightness(img).enhance(brightness)
        elif fn_id == 1:
            img = ImageEnhance.Contrast(img).enhance(contrast)
        elif fn_id == 2:
            img = ImageEnhance.Color(img).enhance(saturation)
    return img


# ---- Helpers ----


def _image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def _pixels(image):
    return np.asarray(image).astype(np.int16)


def _save(image, path, **options):
    image.save(path, **options)
    return str(path)


# Image sizes (width, height) of several aspects, square and not, larger and smaller than 256.
_SHAPES = [(300, 200), (256, 256), (97, 411), (500, 375), (40, 30)]


# ---- The evaluation and crop geometry against the references ----


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("shape", _SHAPES)
def test_eval_image_is_tllib_val_transform(shape, mode):
    image = _image(*shape, mode=mode)
    expected = _tv_center_crop(_tllib_resize_image(image, 256), (224, 224))
    got = transforms.eval_image(image, (224, 224))
    assert got.size == (224, 224) and got.mode == mode
    np.testing.assert_array_equal(_pixels(got), _pixels(expected))


@pytest.mark.parametrize("size,base", [(32, 37), (28, 32), (96, 110), (64, 73), (20, 23)])
def test_eval_image_scales_256_224_to_other_sizes(size, base):
    # base = round(size / 0.875); a margin of 3 (size 20) rounds the offset 1.5 to 2, as
    # torchvision's center_crop does, not down to 1.
    image = _image(123, 77)
    expected = _tv_center_crop(_tllib_resize_image(image, base), (size, size))
    got = transforms.eval_image(image, (size, size))
    np.testing.assert_array_equal(_pixels(got), _pixels(expected))


def test_eval_image_non_square_size():
    got = transforms.eval_image(_image(300, 200), (24, 40))
    assert got.size == (40, 24)


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("shape", _SHAPES)
def test_random_resized_crop_is_tllib_train_transform(shape, size):
    image = _image(*shape, seed=1)
    base = _tllib_resize_image(image, round(size / 0.875))
    for seed in range(4):
        left, top, width, height = transforms.random_resized_crop_box(
            base.width, base.height, np.random.default_rng(seed)
        )
        expected = _tv_resized_crop(base, top, left, height, width, [size, size])
        got = transforms.train_image(
            image, (size, size), ("random_resized_crop",), np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(_pixels(got), _pixels(expected))


# ---- random_resized_crop_box ----


@pytest.mark.parametrize("shape", _SHAPES + [(1000, 10), (10, 1000), (1, 1), (5, 3)])
def test_box_follows_get_params(shape):
    width, height = shape
    for seed in range(50):
        left, top, crop_width, crop_height = transforms.random_resized_crop_box(
            width, height, np.random.default_rng(seed)
        )
        i, j, h, w = _tv_get_params(width, height, np.random.default_rng(seed))
        assert (top, left, crop_height, crop_width) == (i, j, h, w)


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (200, 300)])
def test_boxes_lie_inside_with_area_and_ratio_in_range(shape):
    width, height = shape
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(2000):
        left, top, crop_width, crop_height = transforms.random_resized_crop_box(width, height, rng)
        assert left >= 0 and left + crop_width <= width
        assert top >= 0 and top + crop_height <= height
        assert crop_width > 0 and crop_height > 0
        fractions.append(crop_width * crop_height / (width * height))
        ratios.append(crop_width / crop_height)
    fractions, ratios = np.array(fractions), np.array(ratios)
    # Sides are rounded to whole pixels: allow a few percent on the smallest (~60 px) boxes.
    assert fractions.min() >= 0.08 * 0.96 and fractions.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.97 and ratios.max() <= 4 / 3 * 1.03
    # The draws cover the ranges: small and large areas, both orientations.
    assert fractions.min() < 0.12 and fractions.max() > 0.85
    assert ratios.min() < 0.8 and ratios.max() > 1.25


@pytest.mark.parametrize(
    "shape,box",
    [
        # Too wide for any drawn box: the central crop of height 10 at the widest ratio, 4/3.
        ((1000, 10), (493, 0, 13, 10)),
        # Too tall: width 10 at the narrowest ratio, 3/4.
        ((10, 1000), (0, 493, 10, 13)),
    ],
)
def test_box_falls_back_to_a_ratio_clamped_centre_crop(shape, box):
    for seed in range(10):
        assert transforms.random_resized_crop_box(*shape, np.random.default_rng(seed)) == box


def test_box_falls_back_to_the_whole_image_within_the_ratio_range():
    # A scale above 1 never fits; the image's own ratio is in range, so the box is all of it.
    box = transforms.random_resized_crop_box(120, 100, np.random.default_rng(0), scale=(1.5, 2.0))
    assert box == (0, 0, 120, 100)


def test_box_follows_the_generator():
    def boxes(seed):
        rng = np.random.default_rng(seed)
        return [transforms.random_resized_crop_box(256, 256, rng) for _ in range(5)]

    assert boxes(3) == boxes(3)
    assert boxes(3) != boxes(4)


# ---- train_image: flip, colour jitter, determinism ----


def test_flip_mirrors_about_half_the_time():
    image = _image(90, 70)
    plain = _pixels(transforms.eval_image(image, (32, 32)))
    flipped = 0
    for seed in range(40):
        got = _pixels(
            transforms.train_image(image, (32, 32), ("flip",), np.random.default_rng(seed))
        )
        if np.array_equal(got, plain[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(got, plain)
    assert 8 <= flipped <= 32


def test_color_jitter_is_torchvision_color_jitter_without_hue():
    image = transforms.eval_image(_image(90, 70, seed=2), (32, 32))
    for seed in range(10):
        # ColorJitter.get_params draws the order, then the brightness, contrast and saturation.
        draws = np.random.default_rng(seed)
        order = draws.permutation(3)
        brightness, contrast, saturation = draws.uniform(0.6, 1.4, size=3)
        expected = _tv_color_jitter(image, order, brightness, contrast, saturation)
        got = transforms.train_image(
            _image(90, 70, seed=2), (32, 32), ("color_jitter",), np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(_pixels(got), _pixels(expected))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_color_jitter_brightness_range(mode):
    # On a flat grey image contrast and saturation change nothing: the output is grey * factor.
    grey = Image.new(mode, (50, 50), 100 if mode == "L" else (100, 100, 100))
    levels = []
    for seed in range(200):
        got = transforms.train_image(grey, (16, 16), ("color_jitter",), np.random.default_rng(seed))
        values = np.unique(np.asarray(got))
        assert values.size == 1
        levels.append(int(values[0]))
    assert 60 <= min(levels) < 66 and 134 < max(levels) <= 140


def test_train_image_follows_the_generator():
    image = _image(120, 90)
    ops = transforms.AUGMENTATIONS

    def augmented(seed):
        return _pixels(transforms.train_image(image, (32, 32), ops, np.random.default_rng(seed)))

    np.testing.assert_array_equal(augmented(5), augmented(5))
    assert not np.array_equal(augmented(5), augmented(6))


def test_train_image_without_ops_is_eval_image():
    image = _image(120, 90)
    got = transforms.train_image(image, (32, 32), (), np.random.default_rng(0))
    np.testing.assert_array_equal(_pixels(got), _pixels(transforms.eval_image(image, (32, 32))))


def test_train_image_rejects_unknown_ops():
    with pytest.raises(ValueError, match="rotate"):
        transforms.train_image(_image(20, 20), (8, 8), ("rotate",), np.random.default_rng(0))


# ---- decode ----


def _rgba(path):
    return _save(Image.new("RGBA", (30, 20), (10, 200, 30, 0)), path / "rgba.png")


def _la(path):
    return _save(Image.new("LA", (30, 20), (90, 10)), path / "la.png")


def _palette_with_transparency(path):
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    # Transparency as a byte string per palette entry: PIL warns on a direct RGB conversion.
    return _save(image, path / "p.png", transparency=bytes([0, 128, 255]))


def _cmyk_jpeg(path):
    return _save(Image.new("CMYK", (30, 20), (10, 20, 30, 40)), path / "cmyk.jpg")


def _sixteen_bit(path):
    pixels = np.full((20, 30), 257 * 100, dtype=np.uint16)
    pixels[0, 0] = 65535
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return _save(image, path / "grey16.png")


_FILES = {
    "rgb": lambda path: _save(_image(30, 20), path / "rgb.jpg"),
    "grey": lambda path: _save(_image(30, 20, mode="L"), path / "grey.png"),
    "rgba": _rgba,
    "la": _la,
    "palette": _palette_with_transparency,
    "cmyk": _cmyk_jpeg,
    "sixteen_bit": _sixteen_bit,
}


@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (1, "L")])
@pytest.mark.parametrize("kind", sorted(_FILES))
def test_decode_converts_every_mode(tmp_path, kind, channels, mode):
    path = _FILES[kind](tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = transforms.decode(path, channels)
    assert image.mode == mode and image.size == (30, 20)
    assert transforms.to_array(image, channels).shape == (20, 30, channels)


def test_decode_scales_sixteen_bit_to_eight(tmp_path):
    pixels = np.asarray(transforms.decode(_sixteen_bit(tmp_path), 1))
    assert pixels[0, 0] == 255 and pixels[0, 1] == 100


def test_decode_drops_alpha_as_pil_loader_does(tmp_path):
    pixels = np.asarray(transforms.decode(_rgba(tmp_path), 3))
    np.testing.assert_array_equal(pixels[0, 0], [10, 200, 30])


def _truncated(path, name):
    full = path / f"full_{name}"
    _image(64, 48).save(full)
    data = full.read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    return str(path / name)


def _written(path, data):
    path.write_bytes(data)
    return str(path)


_BROKEN = {
    "truncated_jpeg": lambda path: _truncated(path, "cut.jpg"),
    "truncated_png": lambda path: _truncated(path, "cut.png"),
    "zero_bytes": lambda path: _written(path / "empty.jpg", b""),
    "text": lambda path: _written(path / "note.jpg", b"not an image"),
    "missing": lambda path: str(path / "absent.png"),
    "directory": lambda path: str(path),
}


@pytest.mark.parametrize("kind", sorted(_BROKEN))
def test_decode_raises_unreadable_image_error(tmp_path, kind):
    path = _BROKEN[kind](tmp_path)
    with pytest.raises(transforms.UnreadableImageError) as caught:
        transforms.decode(path, 3)
    error = caught.value
    assert isinstance(error, OSError)
    assert error.path == path and error.reason
    assert str(error) == f"{path}: {error.reason}"
    # Raised in a worker process and pickled back to the parent.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is transforms.UnreadableImageError
    assert (copy.path, copy.reason, str(copy)) == (error.path, error.reason, str(error))


def test_load_raises_unreadable_image_error(tmp_path):
    path = _BROKEN["truncated_jpeg"](tmp_path)
    with pytest.raises(transforms.UnreadableImageError, match="cut.jpg"):
        transforms.load(path, (16, 16), 3)


# ---- load, to_array ----


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("augment", [False, True])
def test_load_shapes(tmp_path, channels, augment):
    path = _save(_image(75, 50), tmp_path / "image.png")
    rng = np.random.default_rng(0) if augment else None
    array = transforms.load(path, (24, 40), channels, transforms.AUGMENTATIONS, rng)
    assert array.shape == (24, 40, channels) and array.dtype == np.uint8


def test_load_without_rng_is_eval_image(tmp_path):
    image = _image(75, 50)
    path = _save(image, tmp_path / "image.png")
    expected = np.asarray(transforms.eval_image(image, (32, 32)))
    np.testing.assert_array_equal(transforms.load(path, (32, 32), 3, ("flip",)), expected)


def test_to_array_converts_and_rejects_other_channel_counts():
    assert transforms.to_array(_image(8, 6), 1).shape == (6, 8, 1)
    assert transforms.to_array(_image(8, 6, mode="L"), 3).shape == (6, 8, 3)
    with pytest.raises(ValueError, match="channels"):
        transforms.to_array(_image(8, 6), 4)


# ---- parse_augment ----


@pytest.mark.parametrize(
    "spec,ops",
    [
        ("random_resized_crop,flip", ("random_resized_crop", "flip")),
        ("flip, color_jitter", ("flip", "color_jitter")),
        ("random_resized_crop,flip,color_jitter", transforms.AUGMENTATIONS),
        ("", ()),
        ("none", ()),
        (" none ", ()),
    ],
)
def test_parse_augment(spec, ops):
    assert transforms.parse_augment(spec) == ops


@pytest.mark.parametrize(
    "spec,bad",
    [("rotate", "'rotate'"), ("flip,flip", "'flip'"), ("flip,", "''"), ("none,flip", "'none'")],
)
def test_parse_augment_errors_name_the_field_the_name_and_the_choices(spec, bad):
    with pytest.raises(ValueError) as caught:
        transforms.parse_augment(spec, field="data.source_augment")
    message = str(caught.value)
    assert message.startswith("data.source_augment:")
    assert bad in message
    assert all(name in message for name in transforms.AUGMENTATIONS)


def test_parse_augment_default_field():
    with pytest.raises(ValueError, match="data.folder.augment"):
        transforms.parse_augment("blur")


# ---- Light to import ----


def test_module_imports_only_numpy_pil_and_the_standard_library():
    # Spawned pipeline workers import it: no JAX, no TensorFlow.
    with open(transforms.__file__) as source:
        tree = ast.parse(source.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots - sys.stdlib_module_names - {"__future__"} == {"numpy", "PIL"}
