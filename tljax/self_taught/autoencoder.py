"""The sparse autoencoder of self-taught learning, and the digit features it induces.

Sigmoid hidden units and a linear decoder (whitened inputs are not confined to [0, 1]);
the loss is the classic one (Ng's UFLDL notes):

  J = 1/(2N) sum ||x_hat - x||^2 + beta sum_j KL(rho || rho_hat_j)
      + weight_decay / 2 (||W_enc||^2 + ||W_dec||^2)

with rho_hat_j the mean activation of hidden unit j over the batch. Each hidden unit is a
patch filter; applied at every position of a digit (a convolution) and mean-pooled over a
grid of regions, they give the digit's self-taught features (`digit_features`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax import ops
from tljax.self_taught.patches import Whitening


class SparseAutoencoder(nn.Module):
    """x -> sigmoid(encoder(x)) -> linear decoder. Params: {'encoder', 'decoder'}."""

    hidden: int
    visible: int

    def setup(self):
        self.encoder = nn.Dense(self.hidden, name="encoder")
        self.decoder = nn.Dense(self.visible, name="decoder")

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (reconstruction (N, visible), hidden activations (N, hidden))."""
        hidden = self.encode(x)
        return self.decoder(hidden), hidden

    def encode(self, x: jax.Array) -> jax.Array:
        """Hidden activations in (0, 1), (N, hidden)."""
        return nn.sigmoid(self.encoder(x))


def kl_sparsity(target: float, mean_activations: jax.Array) -> jax.Array:
    """sum_j KL(Bernoulli(target) || Bernoulli(rho_hat_j)).

    Args:
      target: the sparsity target rho.
      mean_activations: (H,) mean activation rho_hat_j of every hidden unit.

    Returns:
      Scalar penalty, 0 iff every unit's mean activation equals the target.
    """
    rho_hat = jnp.clip(mean_activations, 1e-6, 1 - 1e-6)
    return jnp.sum(
        target * jnp.log(target / rho_hat) + (1 - target) * jnp.log((1 - target) / (1 - rho_hat))
    )


def sparse_autoencoder_loss(
    model: SparseAutoencoder,
    params,
    patches: jax.Array,
    sparsity_target: float,
    sparsity_weight: float,
    weight_decay: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sparse autoencoder objective J on a batch of (whitened) patches.

    Args:
      model: the autoencoder.
      params: its params.
      patches: (N, visible).
      sparsity_target: rho.
      sparsity_weight: beta.
      weight_decay: lambda on both weight matrices (not the biases).

    Returns:
      (J, {'reconstruction', 'sparsity', 'mean_activation'}).
    """
    reconstruction, hidden = model.apply({"params": params}, patches)
    squared_error = 0.5 * jnp.mean(jnp.sum((reconstruction - patches) ** 2, axis=-1))
    sparsity = kl_sparsity(sparsity_target, hidden.mean(axis=0))
    decay = 0.5 * sum(jnp.sum(params[part]["kernel"] ** 2) for part in ("encoder", "decoder"))
    loss = squared_error + sparsity_weight * sparsity + weight_decay * decay
    metrics = {
        "reconstruction": squared_error,
        "sparsity": sparsity,
        "mean_activation": hidden.mean(),
    }
    return loss, metrics


def pixel_space_filters(encoder_params, whitening: Whitening) -> tuple[np.ndarray, np.ndarray]:
    """The encoder expressed on raw patches: pre-activation = raw_patch @ filters + bias.

    Brightness removal, whitening and the encoder are all linear before the sigmoid, so
    they fold into one linear map.

    Args:
      encoder_params: the autoencoder's {'kernel': (P*P, H), 'bias': (H,)} encoder.
      whitening: the patches' whitening.

    Returns:
      (filters (P*P, H), bias (H,)), float32.
    """
    matrix, offset = whitening.as_linear_map()
    kernel = np.asarray(encoder_params["kernel"], np.float32)
    bias = offset @ kernel + np.asarray(encoder_params["bias"], np.float32)
    return (matrix.T @ kernel).astype(np.float32), bias.astype(np.float32)


def digit_features(
    encoder_params, whitening: Whitening, images: np.ndarray, pool_grid: int, batch: int = 500
) -> np.ndarray:
    """Self-taught features of digit images: convolve the learned filters, then mean-pool.

    Args:
      encoder_params: the autoencoder's {'kernel': (P*P, H), 'bias': (H,)} encoder.
      whitening: the patches' whitening.
      images: uint8 (N, S, S, 1) or float [0, 1] (N, S, S) grey images.
      pool_grid: the map of activations is averaged over pool_grid x pool_grid regions.
      batch: images per convolution call (bounds memory).

    Returns:
      float32 (N, pool_grid^2 * H).

    Raises:
      ValueError: if the activation map cannot be cut into pool_grid equal regions.
    """
    filters, bias = pixel_space_filters(encoder_params, whitening)
    size = int(round(np.sqrt(filters.shape[0])))
    kernel = jnp.asarray(filters.reshape(size, size, 1, -1))
    images = np.asarray(images)
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    images = images.reshape(len(images), images.shape[1], images.shape[2], 1)
    side = images.shape[1] - size + 1
    if side % pool_grid:
        raise ValueError(f"A {side}x{side} activation map does not split into {pool_grid}^2.")
    window = side // pool_grid

    @jax.jit
    def features(chunk):
        x = chunk.astype(jnp.float32) / scale
        hidden = nn.sigmoid(ops.conv2d(x, kernel, padding="VALID") + bias)
        return ops.avg_pool(hidden, window).reshape(len(chunk), -1)

    return np.concatenate(
        [np.asarray(features(images[i : i + batch])) for i in range(0, len(images), batch)]
    )
