"""Class descriptions for zero-shot learning on the digits 0-9, and seeded class splits.

Each digit is described by eleven binary attributes. The first seven are the segments a
seven-segment display lights for that digit::

     aaa
    f   b
     ggg
    e   c
     ddd

The last four describe handwritten strokes, which a segment display cannot show:

* ``closed_loop``: the digit encloses a region (0, 6, 8, 9; a handwritten 4 is usually open).
* ``two_loops``: it encloses two regions (8).
* ``curved_stroke``: it is written with at least one curve (every digit except 1, 4, 7).
* ``diagonal_stroke``: it has a long slanted stroke (2's base-to-top stroke, 7's stem).

The segment code alone already tells the ten digits apart; the stroke attributes add
descriptions that are closer to how handwritten digits look.
"""

from __future__ import annotations

import numpy as np

SEGMENT_ATTRIBUTES = (
    "segment_a_top",
    "segment_b_upper_right",
    "segment_c_lower_right",
    "segment_d_bottom",
    "segment_e_lower_left",
    "segment_f_upper_left",
    "segment_g_middle",
)
STROKE_ATTRIBUTES = ("closed_loop", "two_loops", "curved_stroke", "diagonal_stroke")
DIGIT_ATTRIBUTE_NAMES = SEGMENT_ATTRIBUTES + STROKE_ATTRIBUTES

# digit -> the segments a seven-segment display lights for it.
_SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
_STROKES = {
    "closed_loop": {0, 6, 8, 9},
    "two_loops": {8},
    "curved_stroke": {0, 2, 3, 5, 6, 8, 9},
    "diagonal_stroke": {2, 7},
}


def digit_attribute_table() -> np.ndarray:
    """The binary attribute table of the digits 0-9.

    Returns:
      float32 (10, 11): row d is digit d's attributes in the order of DIGIT_ATTRIBUTE_NAMES.
    """
    table = np.zeros((10, len(DIGIT_ATTRIBUTE_NAMES)), np.float32)
    for digit, segments in _SEGMENTS.items():
        for letter in segments:
            table[digit, "abcdefg".index(letter)] = 1.0
        for offset, name in enumerate(STROKE_ATTRIBUTES):
            table[digit, len(SEGMENT_ATTRIBUTES) + offset] = float(digit in _STROKES[name])
    return table


def signed_unit_embeddings(binary_attributes: np.ndarray) -> np.ndarray:
    """Class embeddings from binary attributes: {0, 1} -> {-1, +1}, scaled to unit length.

    Every class vector then has the same norm, so a dot product with it does not favour
    classes that have more attributes switched on (the digit 8 lights every segment).

    Args:
      binary_attributes: (num_classes, num_attributes) of 0/1.

    Returns:
      float32 (num_classes, num_attributes), rows of unit L2 norm.
    """
    signed = 2.0 * np.asarray(binary_attributes, np.float32) - 1.0
    return signed / np.sqrt(signed.shape[1])


def seen_unseen_split(num_classes: int, num_unseen: int, split: int) -> tuple[np.ndarray, ...]:
    """A seeded, uniformly drawn split of the classes into seen and unseen ones.

    Args:
      num_classes: classes in all.
      num_unseen: how many become unseen (described only by attributes).
      split: seed of the split; different values give (usually) different splits.

    Returns:
      (seen_classes, unseen_classes): sorted int arrays that partition range(num_classes).

    Raises:
      ValueError: unless 0 < num_unseen < num_classes.
    """
    if not 0 < num_unseen < num_classes:
        raise ValueError(f"num_unseen={num_unseen} must be in [1, {num_classes - 1}].")
    order = np.random.default_rng([split, num_classes, num_unseen]).permutation(num_classes)
    return np.sort(order[num_unseen:]), np.sort(order[:num_unseen])
