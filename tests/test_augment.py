"""On-device weak / strong augmentation (tljax/data/augment.py): shapes, randomness, each op."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.data import augment


@functools.cache
def _jitted(kind: str, **settings):
    function = augment.weak if kind == "weak" else augment.strong
    return jax.jit(functools.partial(function, **settings))


def _views(kind, rng, images, **settings):
    return np.asarray(_jitted(kind, **settings)(rng, jnp.asarray(images)))


def _random_images(count=6, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28, channels), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_views_keep_shape_and_dtype_and_follow_the_key(kind, channels):
    images = _random_images(channels=channels)
    first = _views(kind, jax.random.key(0), images)
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(_views(kind, jax.random.key(0), images), first)
    assert not np.array_equal(_views(kind, jax.random.key(1), images), first)
    assert not np.array_equal(first, images)


def test_each_example_draws_its_own_augmentation():
    images = np.repeat(_random_images(count=1), 8, axis=0)
    views = _views("strong", jax.random.key(0), images)
    assert len({view.tobytes() for view in views}) == 8


def test_zero_magnitudes_are_the_identity():
    images = _random_images()
    np.testing.assert_array_equal(_views("weak", jax.random.key(0), images, translate=0.0), images)
    still = _views("strong", jax.random.key(0), images, translate=0.0, magnitude=0.0, cutout=0.0)
    np.testing.assert_array_equal(still, images)


@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_every_op_is_the_identity_at_magnitude_zero_and_changes_images_above(name):
    images = jnp.asarray(_random_images(count=4) // 2 + 40)  # Room to stretch and shift.
    rng = jax.random.key(0)
    unchanged = augment.rand_augment(rng, images, num_ops=1, magnitude=0.0, ops=(name,))
    np.testing.assert_array_equal(unchanged, images)
    if name != "identity":
        changed = augment.rand_augment(rng, images, num_ops=1, magnitude=1.0, ops=(name,))
        assert not np.array_equal(changed, images)


def test_unknown_ops_are_refused():
    with pytest.raises(ValueError, match="choose one or more of"):
        augment.rand_augment(jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.uint8), ops=("blur",))


def test_translation_moves_content_by_at_most_an_eighth_of_the_image():
    images = np.zeros((64, 28, 28, 1), np.uint8)
    images[:, 14, 12] = 255  # One bright pixel, more than 4 px from every border.
    views = _views("weak", jax.random.key(0), images)
    shifts = set()
    for view in views:
        rows, cols = np.nonzero(view[..., 0])
        assert len(rows) == 1 and view[rows[0], cols[0], 0] == 255  # Moved, not smeared.
        shifts.add((rows[0] - 14, cols[0] - 12))
    assert max(max(abs(dy), abs(dx)) for dy, dx in shifts) == 4  # round(12.5% of 28 px).
    assert len(shifts) > 20  # Per example, over the whole 9 x 9 range of shifts.


def test_translation_pads_by_reflection():
    images = np.zeros((64, 28, 28, 1), np.uint8)
    images[:, :, 1] = 255  # A bright column next to the left border...
    views = _views("weak", jax.random.key(0), images)
    # ...reflects into the padding, so a shift right by 3 shows it at columns 2 and 4.
    padded = np.pad(images[0, :, :, 0], 4, mode="reflect")
    crops = {
        np.asarray(padded[top : top + 28, left : left + 28]).tobytes()
        for top in range(9)
        for left in range(9)
    }
    assert all(view[..., 0].tobytes() in crops for view in views)


def test_flips_are_off_by_default_and_random_when_asked():
    images = _random_images(count=32)
    unflipped = _views("weak", jax.random.key(0), images, translate=0.0)
    np.testing.assert_array_equal(unflipped, images)
    views = _views("weak", jax.random.key(0), images, translate=0.0, flip=True)
    flipped = np.array([np.array_equal(v, x[:, ::-1]) for v, x in zip(views, images, strict=True)])
    kept = np.array([np.array_equal(v, x) for v, x in zip(views, images, strict=True)])
    assert np.all(flipped | kept) and 0 < flipped.sum() < 32


def test_cutout_paints_one_grey_square_of_half_the_side():
    images = np.zeros((32, 28, 28, 3), np.uint8)
    views = _views("strong", jax.random.key(0), images, translate=0.0, magnitude=0.0, cutout=0.5)
    for view in views:
        grey = np.all(view == augment.CUTOUT_GREY, axis=-1)
        assert np.all((view == 0) | grey[..., None])  # Only grey pixels were painted.
        rows, cols = np.nonzero(grey)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert grey[top:bottom, left:right].all()  # One filled rectangle...
        # ...of side 14 (half of 28), clipped to at least 7 at the borders.
        assert 7 <= bottom - top <= 14 and 7 <= right - left <= 14
    sides = {(np.nonzero(np.any(v, axis=(1, 2)))[0].size) for v in views}
    assert 14 in sides


# --- against PIL, which FixMatch's and TLlib's augmentations call -------------------------------

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402


def _pil_reference(name, image, magnitude, sign):
    picture = Image.fromarray(image)
    factor = 1.0 + 0.9 * sign * magnitude
    return {
        "autocontrast": lambda: ImageOps.autocontrast(picture),
        "equalize": lambda: ImageOps.equalize(picture),
        "invert": lambda: ImageOps.invert(picture),
        "posterize": lambda: ImageOps.posterize(picture, 8 - round(4 * magnitude)),
        "solarize": lambda: ImageOps.solarize(picture, 256 * (1 - magnitude)),
        "brightness": lambda: ImageEnhance.Brightness(picture).enhance(factor),
        "contrast": lambda: ImageEnhance.Contrast(picture).enhance(factor),
        "color": lambda: ImageEnhance.Color(picture).enhance(factor),
        "sharpness": lambda: ImageEnhance.Sharpness(picture).enhance(factor),
    }[name]()


@pytest.mark.parametrize(
    "name, magnitude, sign, atol",
    [
        ("autocontrast", 1.0, 1.0, 1),  # PIL truncates its lookup table, we round.
        ("equalize", 1.0, 1.0, 0),
        ("invert", 1.0, 1.0, 0),
        ("posterize", 1.0, 1.0, 0),
        ("posterize", 0.5, 1.0, 0),
        ("solarize", 0.5, 1.0, 0),
        ("brightness", 0.5, 1.0, 1),
        ("brightness", 1.0, -1.0, 1),
        ("contrast", 0.7, 1.0, 1),  # PIL rounds the mean grey to an integer.
        ("contrast", 0.7, -1.0, 1),
        ("color", 1.0, 1.0, 1),  # PIL rounds the grey image to integers.
        ("sharpness", 1.0, 1.0, 1),  # PIL rounds the smoothed image to integers.
        ("sharpness", 1.0, -1.0, 1),
    ],
)
def test_photometric_ops_match_pil(name, magnitude, sign, atol):
    image = _random_images(count=1, seed=3)[0] // 2 + 40  # Away from 0 and 255, not stretched.
    ours = augment.OPS[name](jnp.asarray(image, jnp.float32), magnitude, sign)
    ours = np.clip(np.round(np.asarray(ours)), 0, 255)
    reference = np.asarray(_pil_reference(name, image, magnitude, sign), np.float64)
    np.testing.assert_allclose(ours, reference, atol=atol)


def _pil_geometric(name, image):
    """PIL's version of each geometric op at magnitude 0.5, sign +1, about the image centre."""
    picture, centre = Image.fromarray(image), image.shape[0] / 2  # PIL's pixel centres: +0.5.
    affine = lambda data: picture.transform(
        picture.size, Image.AFFINE, data, resample=Image.BILINEAR
    )
    return {
        # PIL turns counter-clockwise; a positive sign here turns clockwise.
        "rotate": lambda: picture.rotate(-15, resample=Image.BILINEAR),
        "shear_x": lambda: affine((1, 0.15, -0.15 * centre, 0, 1, 0)),
        "shear_y": lambda: affine((1, 0, 0, 0.15, 1, -0.15 * centre)),
        "translate_x": lambda: affine((1, 0, 0.15 * 28, 0, 1, 0)),
        "translate_y": lambda: affine((1, 0, 0, 0, 1, 0.15 * 28)),
    }[name]()


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_geometric_ops_match_pil_away_from_the_borders(name):
    image = _random_images(count=1, seed=4)[0]
    ours = augment.OPS[name](jnp.asarray(image, jnp.float32), 0.5, 1.0)
    ours = np.clip(np.round(np.asarray(ours)), 0, 255)
    reference = np.asarray(_pil_geometric(name, image), np.float64)
    # Both resample bilinearly; they treat the pixels next to the fill differently.
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(ours[inner], reference[inner], atol=1)


def test_translate_x_shifts_columns_and_fills_black():
    image = _random_images(count=1, seed=5)[0].astype(np.float32)
    magnitude = 5 / (0.3 * 28)  # A 5 px shift: the largest is 30% of the width.
    shifted = np.asarray(augment.OPS["translate_x"](image, magnitude, 1.0))
    np.testing.assert_allclose(shifted[:, :-5], image[:, 5:], atol=1e-2)
    np.testing.assert_allclose(shifted[:, -5:], 0.0, atol=1e-2)
