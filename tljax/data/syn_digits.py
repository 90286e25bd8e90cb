"""Synthetic printed digits in the spirit of SynDigits, rendered from matplotlib's fonts.

Ganin & Lempitsky (2015) trained on "Synthetic Numbers" (SynDigits) as a source domain for
SVHN: house-number-like crops rendered from Windows fonts. The same recipe works offline with
the TrueType fonts matplotlib ships (``matplotlib.get_data_path()/fonts/ttf``). Each image is
one digit in a random font, at a random height (14..21 of 28 pixels), rotated by up to 15
degrees and shifted by up to 1.5 pixels, optionally thickened with a stroke, with neighbouring
digits on either side (probability 0.5 each) that the 28x28 frame cuts off, as in SVHN's
crops. Foreground and background are random colours whose luma differs by at least 64 of 255;
a Gaussian blur (radius up to 1 pixel) and Gaussian pixel noise (sigma up to 8) finish it.
Glyphs are drawn at three times the final size and box-filtered down, so edges are
antialiased.

Of matplotlib 3.11's 40 ``.ttf`` files, the 21 in ``DIGIT_FONTS`` draw the ten digits; the
others map '0'..'9' to no glyph (``DejaVuSansDisplay``, ``DejaVuSerifDisplay``, the
``STIXNonUni*`` and ``STIXSiz*`` variants), to a stand-in box (``LastResortHE-Regular``),
to symbols (``cmex10``: delimiter pieces, ``cmsy10``: math symbols) or to old-style figures
(``cmmi10``). ``find_digit_fonts`` repeats that check on whatever matplotlib is installed.

Everything random comes from the ``numpy.random.Generator`` passed in, and FreeType renders
the same pixels for the same font files, so a seed gives the same images for the same
package versions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 28
SUPERSAMPLE = 3
# Digits are drawn on a canvas 1.5 times the frame: wide enough that the rotated frame's corners
# stay inside it, so neighbours are only ever cut by the frame, never by the canvas edge.
_CANVAS = SIZE * SUPERSAMPLE * 3 // 2
DIGITS = "0123456789"

DIGIT_FONTS = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralBolIta.ttf",
    "STIXGeneralItalic.ttf",
    "cmb10.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
# What a font's cmap must map '0'..'9' to (PostScript glyph names).
_DIGIT_GLYPH_NAMES = (
    *("zero", "one", "two", "three", "four"),
    *("five", "six", "seven", "eight", "nine"),
)

# Rendering ranges, in pixels of the final 28x28 image unless said otherwise.
HEIGHTS = (16, 22)  # Inclusive range of whole-pixel digit heights.
MAX_ANGLE = 15.0  # Degrees either way.
MAX_SHIFT = 1.5
STROKES = (0, 1, 2)  # Extra stroke width in supersampled pixels (up to 2/3 of a final pixel).
NEIGHBOUR_PROB = 0.5
GAPS = (1.0, 4.0)
MIN_CONTRAST = 64.0  # Luma difference between foreground and background, of 255.
MAX_BLUR = 1.0
MAX_NOISE = 8.0
_LUMA = np.array([0.299, 0.587, 0.114])


def font_dir() -> str:
    """Returns the directory of the TrueType fonts that matplotlib ships."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def find_digit_fonts(directory: str | None = None) -> tuple[str, ...]:
    """Lists the fonts in a directory that draw ten distinct, non-empty digits.

    Args:
      directory: a directory of ``.ttf`` files; None means matplotlib's (``font_dir()``).

    Returns:
      The usable file names, sorted.
    """
    directory = font_dir() if directory is None else directory
    names = sorted(name for name in os.listdir(directory) if name.endswith(".ttf"))
    return tuple(name for name in names if _draws_digits(os.path.join(directory, name)))


def _draws_digits(path: str) -> bool:
    from fontTools.ttLib import TTFont

    # Rendering alone cannot tell symbol fonts apart: cmsy10 draws ten distinct glyphs at
    # '0'..'9', but they are math symbols. The glyph names say what the code points hold.
    cmap = TTFont(path, lazy=True).getBestCmap() or {}
    if tuple(cmap.get(ord(digit)) for digit in DIGITS) != _DIGIT_GLYPH_NAMES:
        return False
    font = ImageFont.truetype(path, 48)
    masks = [np.asarray(_ink(font, digit, 0)[0]) for digit in DIGITS]
    return all(mask.any() for mask in masks) and len({mask.tobytes() for mask in masks}) == 10


def split_fonts(fonts: Sequence[str], seed: int, test_fraction: float = 0.25) -> dict:
    """Splits fonts into disjoint train and test sets by a seeded permutation.

    Args:
      fonts: font file names.
      seed: seed of the permutation.
      test_fraction: share of the fonts (rounded, at least one) that only the test split uses.

    Returns:
      ``{"train": names, "test": names}``, each a sorted tuple.

    Raises:
      ValueError: if there are fewer than two fonts.
    """
    if len(fonts) < 2:
        raise ValueError(f"need at least two fonts to split, got {list(fonts)}")
    order = [str(name) for name in np.random.default_rng(seed).permutation(sorted(fonts))]
    n_test = min(len(fonts) - 1, max(1, round(len(fonts) * test_fraction)))
    return {"train": tuple(sorted(order[n_test:])), "test": tuple(sorted(order[:n_test]))}


def render_digits(
    labels: np.ndarray, fonts: Sequence[str], rng: np.random.Generator, directory: str | None = None
) -> np.ndarray:
    """Renders one synthetic colour digit per label.

    Args:
      labels: int digits 0..9, shape (N,).
      fonts: font file names to draw from (uniformly, per image).
      rng: the only source of randomness.
      directory: where the fonts are; None means matplotlib's (``font_dir()``).

    Returns:
      uint8 (N, 28, 28, 3).

    Raises:
      ValueError: if a label is not a digit, no font is given, or a font file is missing.
    """
    labels = np.asarray(labels)
    digits = labels.ndim == 1 and np.isin(labels, np.arange(10)).all()
    if not digits:
        raise ValueError(f"labels must be a 1-D array of digits 0..9, got {labels!r}")
    paths = _font_paths(fonts, font_dir() if directory is None else directory)
    params = _draw_params(labels, len(paths), rng)
    masks = np.zeros((len(labels), SIZE, SIZE))
    for i, label in enumerate(labels):
        masks[i] = _render_mask(paths, int(label), {key: value[i] for key, value in params.items()})
    foreground, background = _random_colours(len(labels), rng)
    return _compose(masks, foreground, background, rng)


def _font_paths(fonts: Sequence[str], directory: str) -> list[str]:
    if not fonts:
        raise ValueError("render_digits needs at least one font")
    paths = [os.path.join(directory, name) for name in fonts]
    missing = [name for name, path in zip(fonts, paths, strict=True) if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"fonts {missing} are not in {directory}; this matplotlib ships "
            f"{list(find_digit_fonts(directory))} that draw digits"
        )
    return paths


def _draw_params(labels: np.ndarray, n_fonts: int, rng: np.random.Generator) -> dict:
    """Draws every random choice up front, so the images depend only on the seed."""
    n = len(labels)
    return {
        "font": rng.integers(n_fonts, size=n),
        "height": rng.integers(HEIGHTS[0], HEIGHTS[1] + 1, size=n),
        "angle": rng.uniform(-MAX_ANGLE, MAX_ANGLE, size=n),
        "shift": rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=(n, 2)),
        "stroke": rng.choice(STROKES, size=n),
        "neighbours": rng.integers(10, size=(n, 2)),
        "has_neighbour": rng.random((n, 2)) < NEIGHBOUR_PROB,
        "gap": rng.uniform(*GAPS, size=n),
        "blur": rng.uniform(0.0, MAX_BLUR, size=n),
    }


def _render_mask(paths: Sequence[str], label: int, p: dict) -> np.ndarray:
    """Renders one image's ink coverage: float (28, 28) in [0, 1]."""
    canvas = _draw_house_number(paths[p["font"]], label, p)
    frame = _rotated_frame(canvas, float(p["angle"]))
    frame = frame.resize((SIZE, SIZE), Image.Resampling.BOX)
    frame = frame.filter(ImageFilter.GaussianBlur(float(p["blur"])))
    return np.asarray(frame, np.float64) / 255.0


def _draw_house_number(path: str, label: int, p: dict) -> Image.Image:
    """Draws the labelled digit at the (shifted) canvas centre and its neighbours beside it."""
    size = _font_size(path, int(p["height"]))
    stroke = int(p["stroke"])
    glyph, top = _glyph(path, size, DIGITS[label], stroke)
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    centre = _CANVAS / 2 + p["shift"] * SUPERSAMPLE
    x = round(centre[0] - glyph.width / 2)
    y = round(centre[1] - glyph.height / 2)
    _paste(canvas, glyph, x, y)
    # Neighbours share the labelled digit's baseline, as digits on one house-number plate do.
    baseline = y - top
    gap = round(p["gap"] * SUPERSAMPLE)
    for side, (digit, present) in enumerate(zip(p["neighbours"], p["has_neighbour"], strict=True)):
        if present:
            other, other_top = _glyph(path, size, DIGITS[digit], stroke)
            other_x = x - gap - other.width if side == 0 else x + glyph.width + gap
            _paste(canvas, other, other_x, baseline + other_top)
    return canvas


def _rotated_frame(canvas: Image.Image, angle: float) -> Image.Image:
    """The supersampled frame cut from the canvas centre, rotated ``angle`` degrees anticlockwise.

    Equal to ``canvas.rotate(angle, resample=Image.Resampling.BILINEAR)`` cropped to the frame,
    but only the frame is resampled: half the time of rotating the whole canvas.
    """
    frame = SIZE * SUPERSAMPLE
    radians = -np.deg2rad(angle)
    cos, sin = float(np.cos(radians)), float(np.sin(radians))
    # Maps a frame pixel to the canvas pixel it shows: rotate about the centre, which
    # stays put (frame centre -> canvas centre).
    out_centre, in_centre = frame / 2, canvas.width / 2
    matrix = (
        cos,
        sin,
        in_centre - cos * out_centre - sin * out_centre,
        -sin,
        cos,
        in_centre + sin * out_centre - cos * out_centre,
    )
    # Bilinear is enough at three times the final size, and twice as fast as bicubic.
    bilinear = Image.Resampling.BILINEAR
    return canvas.transform((frame, frame), Image.Transform.AFFINE, matrix, bilinear)


def _paste(canvas: Image.Image, glyph: Image.Image, x: int, y: int) -> None:
    # Solid white through the glyph as alpha: antialiased edges keep their coverage.
    canvas.paste(255, (x, y, x + glyph.width, y + glyph.height), mask=glyph)


@functools.cache
def _font_size(path: str, height: int) -> int:
    """The point size at which the font's '0' is ``height`` final pixels tall."""
    reference = 100
    zero, _ = _glyph(path, reference, "0", 0)
    return max(1, round(reference * height * SUPERSAMPLE / zero.height))


@functools.cache
def _glyph(path: str, size: int, digit: str, stroke: int) -> tuple[Image.Image, int]:
    """One digit cropped to its ink, and the ink's top relative to the baseline (negative)."""
    return _ink(ImageFont.truetype(path, size), digit, stroke)


def _ink(font: ImageFont.FreeTypeFont, digit: str, stroke: int) -> tuple[Image.Image, int]:
    left, top, right, bottom = font.getbbox(digit, stroke_width=stroke, anchor="ls")
    image = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    origin = (1 - left, 1 - top)  # Where the baseline's start lands in ``image``.
    ImageDraw.Draw(image).text(
        origin, digit, font=font, fill=255, anchor="ls", stroke_width=stroke, stroke_fill=255
    )
    box = image.getbbox() or (0, 0, 1, 1)
    return image.crop(box), box[1] - origin[1]


def _random_colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB, float (n, 3) each, at least MIN_CONTRAST apart in luma."""
    foreground = rng.uniform(0, 255, size=(n, 3))
    background = rng.uniform(0, 255, size=(n, 3))
    # Redraw the failing pairs until none is left: the result still depends only on the seed.
    while True:
        low = np.abs((foreground - background) @ _LUMA) < MIN_CONTRAST
        if not low.any():
            return foreground, background
        foreground[low] = rng.uniform(0, 255, size=(low.sum(), 3))
        background[low] = rng.uniform(0, 255, size=(low.sum(), 3))


def _compose(
    masks: np.ndarray, foreground: np.ndarray, background: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Paints each mask in its foreground over its background and adds pixel noise."""
    # In place where possible: the train split's float images are 94 MB each.
    images = (foreground - background)[:, None, None, :] * masks[..., None]
    images += background[:, None, None, :]
    sigma = rng.uniform(0.0, MAX_NOISE, size=(len(masks), 1, 1, 1))
    noise = rng.standard_normal(images.shape)
    noise *= sigma
    images += noise
    return np.clip(np.round(images, out=images), 0, 255, out=images).astype(np.uint8)
