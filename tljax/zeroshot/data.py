"""Zero-shot datasets in one shape: seen-class training data, a test set, class descriptions.

`digits` builds one from the offline embedded MNIST digits and the attribute table of
`tljax.zeroshot.attributes`; `tljax.zeroshot.proposed_split` reads AwA2 / CUB / SUN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tljax import data as tljax_data
from tljax.zeroshot import attributes


@dataclasses.dataclass(frozen=True)
class ZeroShotData:
    """Everything a zero-shot run needs.

    Attributes:
      input_key: the batch key of the inputs, 'image' (uint8 NHWC) or 'feature' (float32).
      train: {input_key, 'label'} examples of the seen classes only.
      test: {input_key, 'label'} test examples of seen and unseen classes (GZSL test set).
      class_attributes: (C, M) binary attribute signatures (used by DAP).
      class_embeddings: (C, D) semantic embeddings (attribute embedding, ConSE, ESZSL).
      seen_classes: sorted class ids with training examples.
      unseen_classes: sorted class ids described only by their attributes.
      class_names: C names.
    """

    input_key: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    class_attributes: np.ndarray
    class_embeddings: np.ndarray
    seen_classes: np.ndarray
    unseen_classes: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_attributes)

    def __post_init__(self):
        train_classes = np.unique(self.train["label"])
        if not set(train_classes.tolist()) <= set(self.seen_classes.tolist()):
            raise ValueError("The training set holds examples of classes that are not seen.")
        if np.intersect1d(self.seen_classes, self.unseen_classes).size:
            raise ValueError("A class cannot be both seen and unseen.")
        if len(self.class_embeddings) != self.num_classes:
            raise ValueError(
                f"{len(self.class_embeddings)} class embeddings for {self.num_classes} classes."
            )


def digits(name: str, split: int, num_unseen: int, data_dir: str | None = None) -> ZeroShotData:
    """Zero-shot digits: the seen digits' training images, every digit's test images.

    Args:
      name: tfds name of the digits, e.g. 'embedded_digits/mnist'.
      split: seed of the seen / unseen split (`attributes.seen_unseen_split`).
      num_unseen: digits held out of training.
      data_dir: tfds data directory (None: tfds's default).

    Returns:
      The `ZeroShotData`, with the digits' attribute table and its signed unit embeddings.
    """
    table = attributes.digit_attribute_table()
    seen, unseen = attributes.seen_unseen_split(len(table), num_unseen, split)
    train = tljax_data.load_split(name, "train", data_dir)
    keep = np.isin(train["label"], seen)
    return ZeroShotData(
        input_key="image",
        train={"image": train["image"][keep], "label": train["label"][keep]},
        test=tljax_data.load_split(name, "test", data_dir),
        class_attributes=table,
        class_embeddings=attributes.signed_unit_embeddings(table),
        seen_classes=seen,
        unseen_classes=unseen,
        class_names=tuple(str(d) for d in range(len(table))),
    )
