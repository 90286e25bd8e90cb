"""A PNG grid of learned patch filters (the classic picture of sparse-coding bases)."""

from __future__ import annotations

import numpy as np


def filter_grid(filters: np.ndarray, columns: int | None = None, border: int = 1) -> np.ndarray:
    """Tiles square filters into one grey image, each scaled to its own [0, 1] range.

    Args:
      filters: (K, P*P) filters as rows.
      columns: tiles per row (default: ceil(sqrt(K))).
      border: pixels of white between tiles.

    Returns:
      float (rows * (P + border) + border, columns * (P + border) + border) in [0, 1].
    """
    filters = np.asarray(filters, np.float64)
    count, size = len(filters), int(round(np.sqrt(filters.shape[1])))
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    step = size + border
    grid = np.ones((rows * step + border, columns * step + border))
    for index, flat in enumerate(filters):
        low, high = flat.min(), flat.max()
        tile = (flat - low) / (high - low) if high > low else np.full_like(flat, 0.5)
        top, left = border + (index // columns) * step, border + (index % columns) * step
        grid[top : top + size, left : left + size] = tile.reshape(size, size)
    return grid


def save_filter_grid(filters: np.ndarray, path: str, zoom: int = 4) -> None:
    """Writes `filter_grid(filters)` to `path` as a PNG, each pixel a zoom x zoom block.

    Args:
      filters: (K, P*P) filters as rows.
      path: output .png path.
      zoom: magnification (8x8 filters are too small to see at 1:1).
    """
    import matplotlib.image

    grid = np.kron(filter_grid(filters), np.ones((zoom, zoom)))
    matplotlib.image.imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
