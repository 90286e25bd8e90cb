"""Class subsets and few-shot subsets of an in-memory split."""

import numpy as np


def class_subset(arrays: dict[str, np.ndarray], classes) -> dict[str, np.ndarray]:
    """The examples of ``classes`` only, relabelled ``0 .. len(classes) - 1`` in that order.

    Args:
      arrays: a split, ``{'image': ..., 'label': ...}``.
      classes: original class ids to keep; their position becomes the new label.

    Returns:
      A new dict of arrays.

    Raises:
      ValueError: duplicate classes, or a class with no example in the split.
    """
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"data.classes has duplicates: {classes}.")
    present = set(np.unique(arrays["label"]).tolist())
    absent = [c for c in classes if c not in present]
    if absent:
        raise ValueError(f"Classes {absent} have no example; the split has {sorted(present)}.")
    keep = np.isin(arrays["label"], classes)
    relabel = np.full(max(max(classes), int(arrays["label"].max())) + 1, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    out = {key: value[keep] for key, value in arrays.items()}
    out["label"] = relabel[out["label"]]
    return out


def per_class_subset(arrays: dict[str, np.ndarray], shots: int, seed: int) -> dict[str, np.ndarray]:
    """``shots`` examples of every class, drawn without replacement from a seeded shuffle.

    The draw depends only on (labels, seed), so every method and variant of a comparison sees
    the same few examples, and the subsets for growing ``shots`` are nested (the 1-shot example
    is among the 5 shots).

    Args:
      arrays: a split, ``{'image': ..., 'label': ...}``.
      shots: examples per class (k of k-shot); must be positive.
      seed: draw seed.

    Returns:
      A new dict of arrays with ``shots * num_classes`` examples, ordered by class.

    Raises:
      ValueError: ``shots`` < 1, or a class has fewer than ``shots`` examples.
    """
    if shots < 1:
        raise ValueError(f"shots per class must be >= 1, got {shots}.")
    labels = arrays["label"]
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise ValueError(
                f"Class {label} has {len(members)} examples, fewer than {shots} shots."
            )
        chosen.append(rng.permutation(members)[:shots])
    idx = np.concatenate(chosen)
    return {key: value[idx] for key, value in arrays.items()}
