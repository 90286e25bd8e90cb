"""Tests for the offline digit domains optdigits and syn_digits (tljax/data/embedded.py)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tljax.data import embedded, load_split, optdigits, syn_digits
from tljax.data.preprocess import to_float_images

NEW_CONFIGS = ("optdigits", "syn_digits")
SPLITS = ("train", "test")
# load_digits() holds 178, 182, 177, 183, 181, 182, 181, 179, 174, 180 digits of 0..9.
OPTDIGITS_CLASS_SIZES = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


@pytest.fixture(scope="module")
def prepared(data_dir):
    """Each new config's splits as load_split returns them and as tfds stores them."""
    out = {}
    for config in NEW_CONFIGS:
        name = f"embedded_digits/{config}"
        for split in SPLITS:
            loaded = load_split(name, split, data_dir)
            builder = tfds.builder(name, data_dir=data_dir)
            stored = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            out[config, split] = {"loaded": loaded, "stored": stored}
    return out


def _by_source(arrays):
    order = np.argsort(arrays["source_index"])
    return {key: value[order] for key, value in arrays.items()}


# ---------------------------------------------------------------- both configs


def test_shapes_dtypes_and_class_counts(prepared):
    expected = {
        ("optdigits", "train"): (1, OPTDIGITS_CLASS_SIZES - 36),
        ("optdigits", "test"): (1, np.full(10, 36)),
        ("syn_digits", "train"): (3, np.full(10, 500)),
        ("syn_digits", "test"): (3, np.full(10, 100)),
    }
    for key, (channels, counts) in expected.items():
        arrays = prepared[key]["loaded"]
        assert arrays["image"].shape == (counts.sum(), 28, 28, channels), key
        assert arrays["image"].dtype == np.uint8
        assert arrays["label"].dtype == np.int32
        np.testing.assert_array_equal(np.bincount(arrays["label"], minlength=10), counts)


def test_load_split_round_trips_the_generated_splits(prepared):
    makers = {"optdigits": embedded.optdigits_split, "syn_digits": embedded.syn_digits_split}
    for (config, split), both in prepared.items():
        loaded, stored = both["loaded"], both["stored"]
        np.testing.assert_array_equal(loaded["image"], stored["image"])
        np.testing.assert_array_equal(loaded["label"], stored["label"])
        if (config, split) == ("syn_digits", "train"):
            continue  # Regenerating 5,000 renders takes seconds; the test split stands for it.
        images, labels, indices = makers[config](split)
        stored = _by_source(stored)
        np.testing.assert_array_equal(stored["source_index"], indices)
        np.testing.assert_array_equal(stored["label"], labels)
        np.testing.assert_array_equal(stored["image"], images)


def test_train_and_test_are_disjoint(prepared):
    for config in NEW_CONFIGS:
        train = prepared[config, "train"]["stored"]
        test = prepared[config, "test"]["stored"]
        assert not set(train["source_index"]) & set(test["source_index"])
        train_images = {image.tobytes() for image in train["image"]}
        assert not any(image.tobytes() in train_images for image in test["image"])


def test_grey_and_colour_splits_feed_a_three_channel_model(prepared):
    grey = prepared["optdigits", "train"]["loaded"]["image"][:8]
    colour = prepared["syn_digits", "train"]["loaded"]["image"][:8]
    as_rgb = np.asarray(to_float_images(grey, channels=3))
    assert as_rgb.shape == (8, 28, 28, 3)
    np.testing.assert_allclose(as_rgb, np.repeat(grey / 255.0, 3, axis=-1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(to_float_images(colour, channels=3)), colour / 255.0)


def test_info_says_where_the_data_comes_from(tmp_path):
    opt = tfds.builder("embedded_digits/optdigits", data_dir=str(tmp_path)).info
    assert "load_digits" in opt.description and "load_digits" in opt.metadata["source"]
    syn = tfds.builder("embedded_digits/syn_digits", data_dir=str(tmp_path)).info
    assert "matplotlib" in syn.description
    assert syn.metadata["fonts"] == {s: list(names) for s, names in embedded.SYN_FONTS.items()}
    assert syn.features["image"].shape == (28, 28, 3)
    assert opt.features["image"].shape == (28, 28, 1)


# ---------------------------------------------------------------- optdigits


def _centre_of_mass(images):
    mass = images.sum(axis=(1, 2))
    rows = images.sum(axis=2) @ np.arange(28) / mass
    cols = images.sum(axis=1) @ np.arange(28) / mass
    return np.stack([rows, cols], axis=1)


def test_optdigits_are_centred_in_a_20_pixel_box():
    digits, labels = optdigits.load_optdigits()
    assert digits.shape == (1797, 28, 28) and labels.shape == (1797,)
    np.testing.assert_array_equal(np.bincount(labels), OPTDIGITS_CLASS_SIZES)
    # A whole-pixel shift puts the centre of mass within half a pixel of MNIST's (14, 14).
    com = _centre_of_mass(digits.astype(np.float64))
    assert np.abs(com - optdigits.CENTRE).max() <= 0.55
    for digit in digits:
        rows, cols = np.nonzero(digit)
        longer = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert 19 <= longer <= 20
    assert digits.max() == 255


def test_to_mnist_layout_scales_resizes_and_centres_an_off_centre_block():
    digit = np.zeros((8, 8))
    digit[0:4, 0:2] = 16  # A 4x2 block in the corner: 20x10 once resized.
    image = optdigits.to_mnist_layout(digit)
    rows, cols = np.nonzero(image > 127)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (20, 10)
    np.testing.assert_allclose(_centre_of_mass(image[None].astype(float))[0], [14, 14], atol=0.5)
    assert image.max() == 255


@pytest.mark.parametrize(
    "digit, message",
    [(np.zeros((8, 8)), "no ink"), (np.full((8, 8), 17.0), "0..16"), (np.ones(8), "2-D")],
)
def test_to_mnist_layout_rejects_bad_digits(digit, message):
    with pytest.raises(ValueError, match=message):
        optdigits.to_mnist_layout(digit)


# ---------------------------------------------------------------- syn_digits


def test_fonts_that_draw_digits_are_split_into_unseen_test_fonts():
    assert syn_digits.find_digit_fonts() == syn_digits.DIGIT_FONTS
    for symbol_font in ("cmsy10.ttf", "cmex10.ttf", "cmmi10.ttf", "LastResortHE-Regular.ttf"):
        assert symbol_font not in syn_digits.DIGIT_FONTS
    train, test = embedded.SYN_FONTS["train"], embedded.SYN_FONTS["test"]
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(syn_digits.DIGIT_FONTS)
    assert (len(train), len(test)) == (16, 5)
    assert syn_digits.split_fonts(syn_digits.DIGIT_FONTS, embedded.FONT_SPLIT_SEED) == {
        "train": train,
        "test": test,
    }


def test_renders_are_deterministic_and_depend_on_seed_and_font():
    labels = np.arange(10).repeat(3)
    fonts = embedded.SYN_FONTS["test"]
    first = syn_digits.render_digits(labels, fonts, np.random.default_rng(7))
    # Cold caches, as in a fresh process.
    syn_digits._glyph.cache_clear()
    syn_digits._font_size.cache_clear()
    again = syn_digits.render_digits(labels, fonts, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    other_seed = syn_digits.render_digits(labels, fonts, np.random.default_rng(8))
    assert not np.array_equal(first, other_seed)
    mono = syn_digits.render_digits(labels, ["DejaVuSansMono.ttf"], np.random.default_rng(7))
    serif = syn_digits.render_digits(labels, ["cmr10.ttf"], np.random.default_rng(7))
    assert not np.array_equal(mono, serif)


def test_colours_keep_the_minimum_contrast():
    foreground, background = syn_digits._random_colours(5000, np.random.default_rng(0))
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs((foreground - background) @ luma).min() >= syn_digits.MIN_CONTRAST
    # Colours still span the cube, not just black-on-white.
    assert foreground.min() < 10 and foreground.max() > 245


def test_the_labelled_digit_sits_in_the_middle():
    # Neighbouring digits put some ink at the left and right edges, but the labelled digit
    # always covers the middle.
    labels = np.arange(10).repeat(5)
    rng = np.random.default_rng(0)
    images = syn_digits.render_digits(labels, syn_digits.DIGIT_FONTS, rng).astype(float)
    assert images.shape == (50, 28, 28, 3)
    # Contrast shows as spread around each image's background (its most common colour).
    spread = np.abs(images - np.median(images, axis=(1, 2), keepdims=True)).sum(-1)
    middle = spread[:, 8:20, 8:20].mean()
    border = np.concatenate([spread[:, :, :3], spread[:, :, -3:]], axis=2).mean()
    assert middle > 2 * border


def test_render_rejects_missing_fonts_and_bad_labels():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no_such_font.ttf"):
        syn_digits.render_digits(np.arange(3), ["no_such_font.ttf"], rng)
    with pytest.raises(ValueError, match="digits 0..9"):
        syn_digits.render_digits(np.array([10]), syn_digits.DIGIT_FONTS, rng)
    with pytest.raises(ValueError, match="at least one font"):
        syn_digits.render_digits(np.arange(3), [], rng)


@pytest.mark.parametrize("maker", [embedded.optdigits_split, embedded.syn_digits_split])
def test_split_makers_reject_unknown_splits(maker):
    with pytest.raises(ValueError, match="validation"):
        maker("validation")
