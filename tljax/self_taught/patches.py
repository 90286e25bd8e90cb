"""Natural image patches from photographs shipped inside installed packages, ZCA-whitened.

The unlabelled auxiliary data of self-taught learning must not share the target's classes or
distribution: grey-level 8x8 patches of everyday photographs (an astronaut, coffee, a rocket,
a cat, ...) share neither with handwritten digits. Training patches come from the photos that
`embedded_digits/mnist_m` uses for training, held-out patches from its test photos.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tljax.data import embedded

TRAIN_PHOTOS = embedded.TRAIN_PHOTOS
HELDOUT_PHOTOS = embedded.TEST_PHOTOS
# ITU-R BT.601 luma weights.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def grey_photo(name: str, downscale: int) -> np.ndarray:
    """A shipped colour photo as grey levels in [0, 1], block-averaged by `downscale`.

    Args:
      name: e.g. 'skimage.astronaut' (see `tljax.data.embedded.load_photo`).
      downscale: block size of the averaging; >1 removes JPEG artefacts and sensor noise.

    Returns:
      float32 (H // downscale, W // downscale).
    """
    grey = embedded.load_photo(name).astype(np.float32) @ _LUMA / 255.0
    h, w = (s // downscale * downscale for s in grey.shape)
    blocks = grey[:h, :w].reshape(h // downscale, downscale, w // downscale, downscale)
    return blocks.mean(axis=(1, 3))


def sample_patches(
    photos: list[np.ndarray], num_patches: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Square patches at uniformly random positions of photos picked uniformly at random.

    Args:
      photos: grey images.
      num_patches: patches to cut.
      size: side length in pixels.
      rng: numpy generator (the result is a function of its state).

    Returns:
      float32 (num_patches, size * size), row-major patches.
    """
    which = rng.integers(len(photos), size=num_patches)
    out = np.empty((num_patches, size * size), np.float32)
    for i, photo_index in enumerate(which):
        photo = photos[photo_index]
        top = rng.integers(photo.shape[0] - size + 1)
        left = rng.integers(photo.shape[1] - size + 1)
        out[i] = photo[top : top + size, left : left + size].reshape(-1)
    return out


@dataclasses.dataclass(frozen=True)
class Whitening:
    """Removes each patch's mean (its brightness), then ZCA-whitens.

    whiten(p) = zca @ (p - mean(p) - center). A linear map of the raw patch, so it can be
    folded into a convolution (`as_linear_map`).

    Attributes:
      center: (D,) mean of the brightness-normalised training patches.
      zca: (D, D) symmetric whitening matrix U diag(1 / sqrt(s + epsilon)) U^T.
    """

    center: np.ndarray
    zca: np.ndarray

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Whitened patches, (N, D) -> (N, D)."""
        matrix, offset = self.as_linear_map()
        return (np.asarray(patches, np.float32) @ matrix.T + offset).astype(np.float32)

    def as_linear_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(matrix, offset) with whiten(p) = matrix @ p + offset for raw patches p."""
        dim = len(self.center)
        remove_mean = np.eye(dim) - np.full((dim, dim), 1.0 / dim)
        matrix = self.zca @ remove_mean
        return matrix.astype(np.float32), (-self.zca @ self.center).astype(np.float32)


def fit_whitening(patches: np.ndarray, epsilon: float) -> Whitening:
    """Fits brightness removal + ZCA whitening to training patches.

    Args:
      patches: (N, D) raw patches.
      epsilon: added to every eigenvalue; damps the noisy high frequencies (the larger, the
        smoother the learned bases).

    Returns:
      The fitted `Whitening`.
    """
    centred = np.asarray(patches, np.float64)
    centred = centred - centred.mean(axis=1, keepdims=True)
    center = centred.mean(axis=0)
    covariance = np.cov(centred - center, rowvar=False, bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    zca = (eigenvectors / np.sqrt(eigenvalues + epsilon)) @ eigenvectors.T
    return Whitening(center.astype(np.float32), zca.astype(np.float32))


def natural_patches(
    size: int, num_train: int, num_heldout: int, downscale: int, epsilon: float, seed: int
) -> tuple[np.ndarray, np.ndarray, Whitening]:
    """Whitened training and held-out patches, and the whitening fitted on training ones.

    Args:
      size: patch side length.
      num_train: patches from the training photos.
      num_heldout: patches from the held-out photos.
      downscale: photo block-averaging factor (`grey_photo`).
      epsilon: ZCA regulariser (`fit_whitening`).
      seed: seed of the patch positions.

    Returns:
      (train (num_train, size^2), heldout (num_heldout, size^2), whitening), float32.
    """
    rng = np.random.default_rng(seed)
    train = sample_patches([grey_photo(n, downscale) for n in TRAIN_PHOTOS], num_train, size, rng)
    heldout_photos = [grey_photo(n, downscale) for n in HELDOUT_PHOTOS]
    heldout = sample_patches(heldout_photos, num_heldout, size, rng)
    whitening = fit_whitening(train, epsilon)
    return whitening(train), whitening(heldout), whitening
