"""Deep Adaptation Network (DAN, Long et al. ICML 2015): MK-MMD between the domains' features.

The term is the multiple-kernel maximum mean discrepancy between the source and target
features of a batch,

  MK-MMD = E_ss[k] + E_tt[k] - 2 E_st[k],   k = sum_u k_u,   k_u(x, y) = exp(-|x-y|^2 / 2 s_u^2),

with each Gaussian bandwidth tied to the batch: s_u^2 = alpha_u * mean_ij |z_i - z_j|^2 over
the concatenated source + target features (a constant for the gradient). The run's loss is
CE(source) + weight * MK-MMD.

Checked against Transfer-Learning-Library (commit c4aa59e) ``tllib/alignment/dan.py``
(``MultipleKernelMaximumMeanDiscrepancy``, ``_update_index_matrix``) and
``tllib/modules/kernels.py`` (``GaussianKernel``); tests/test_statistics_terms.py holds a
numpy transcription of both. As there:

- the quadratic estimate weighs the 2n x 2n kernel matrix with `index_matrix`: the unbiased
  within-domain means (diagonal left out, 1 / (n (n - 1))) and the cross-domain means with
  -1 / n^2; the linear-time estimate (``linear=True``) uses the pairs (i, i + 1 mod n) only;
- the loss adds TLlib's constant 2 / (n - 1) (in both estimates). It has no gradient; it is
  kept so that the reported values equal TLlib's.
- the source and target batches must have the same size n >= 2.

Deviations: the pairwise squared distances come from the Gram matrix (|x|^2 + |y|^2 - 2 x.y at
the highest matmul precision) rather than TLlib's [2n, 2n, D] difference tensor, which for the
digit net's 768-d features would hold 2n * 2n * 768 floats per step; they agree to float32
rounding. The kernels run in float32 whatever the model's dtype. TLlib puts a 256-d bottleneck
before the loss; here the features are the network's own (768-d flattened conv features for
the digit net). TLlib's class defaults to the quadratic estimate (``linear=False``), as
``DEFAULTS`` here; its example script ``examples/.../dan.py`` runs the linear one unless given
``--non-linear``.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tljax.methods import adaptation

DEFAULTS = {
    # Bandwidth multipliers 2^k, k = -3..1, as TLlib's DAN and JAN examples.
    "kernel_alphas": (0.125, 0.25, 0.5, 1.0, 2.0),
    "linear": False,
}


# Floor of the bandwidth estimate, well above float32's flush-to-zero range.
MIN_MEAN_DISTANCE = 1e-12


def squared_distances(x: jax.Array) -> jax.Array:
    """Squared Euclidean distances between all rows of ``x``.

    Args:
      x: [K, D] points.

    Returns:
      [K, K] matrix of |x_i - x_j|^2 (float32, non-negative).
    """
    x = x.astype(jnp.float32)
    norms = jnp.sum(x * x, axis=-1)
    # Reduced-precision matmuls (TPU's bf16 passes, GPU's TF32) would swamp the differences.
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)


def multi_gaussian_kernel(x: jax.Array, alphas: Sequence[float]) -> jax.Array:
    """Sum of Gaussian kernels whose bandwidths follow the batch (TLlib's ``GaussianKernel``).

    Args:
      x: [K, D] points (source and target features concatenated).
      alphas: one kernel per alpha, with sigma^2 = alpha * mean of the squared distances.

    Returns:
      [K, K] kernel matrix sum_u exp(-|x_i - x_j|^2 / (2 sigma_u^2)).
    """
    distances = squared_distances(x)
    # TLlib detaches the bandwidth estimate: it sets the scale, it is not a path to align by.
    mean_distance = jax.lax.stop_gradient(distances.mean())
    # Features that are all equal (e.g. dead ReLUs) have mean distance 0, and 0 / 0 would make
    # the loss NaN where TLlib's does; with a floor every kernel is 1 there, the MMD 0.
    mean_distance = jnp.maximum(mean_distance, MIN_MEAN_DISTANCE)
    return sum(jnp.exp(-distances / (2.0 * alpha * mean_distance)) for alpha in alphas)


def gaussian_kernel(x: jax.Array, sigma: float) -> jax.Array:
    """A Gaussian kernel of fixed bandwidth (TLlib's ``track_running_stats=False``).

    Args:
      x: [K, D] points.
      sigma: the bandwidth.

    Returns:
      [K, K] kernel matrix exp(-|x_i - x_j|^2 / (2 sigma^2)).
    """
    return jnp.exp(-squared_distances(x) / (2.0 * sigma**2))


def index_matrix(batch_size: int, linear: bool) -> np.ndarray:
    """The weights that turn a [2n, 2n] kernel matrix into the MMD estimate (TLlib's).

    Rows and columns 0..n-1 are source examples, n..2n-1 target examples.

    Args:
      batch_size: n, the examples per domain (at least 2).
      linear: the linear-time estimate over consecutive pairs (i, i + 1 mod n) instead of
        the quadratic (unbiased) one.

    Returns:
      [2n, 2n] float32 weights.

    Raises:
      ValueError: for fewer than 2 examples per domain.
    """
    n = batch_size
    if n < 2:
        raise ValueError(f"The MMD estimate needs at least 2 examples per domain, got {n}.")
    weights = np.zeros((2 * n, 2 * n), np.float32)
    if linear:
        s1 = np.arange(n)
        s2 = (s1 + 1) % n
        weights[s1, s2] = weights[s1 + n, s2 + n] = 1.0 / n
        weights[s1, s2 + n] = weights[s2, s1 + n] = -1.0 / n
    else:
        within = (1.0 - np.eye(n)) / (n * (n - 1))
        across = np.full((n, n), -1.0 / (n * n))
        weights[:] = np.block([[within, across], [across, within]])
    return weights


def kernel_discrepancy(kernel: jax.Array, linear: bool) -> jax.Array:
    """The MMD estimate of a [2n, 2n] source-then-target kernel matrix, TLlib's constant added.

    Args:
      kernel: [2n, 2n] kernel matrix over the concatenated source and target examples.
      linear: the linear-time estimate instead of the quadratic one.

    Returns:
      The scalar sum(kernel * index_matrix) + 2 / (n - 1).
    """
    n = kernel.shape[0] // 2
    # TLlib's offset: the diagonal a single kernel would add, so that the quadratic estimate
    # reads non-negative; it shifts the reported value, never the gradient.
    return jnp.sum(kernel * index_matrix(n, linear)) + 2.0 / (n - 1)


def concatenate_domains(source: jax.Array, target: jax.Array) -> jax.Array:
    """Source rows then target rows, after checking the two batches pair up.

    Args:
      source: [n, D] source activations.
      target: [n, D] target activations.

    Returns:
      [2n, D] activations.

    Raises:
      ValueError: if the batches differ in shape (TLlib's estimates pair them up).
    """
    if source.shape != target.shape:
        raise ValueError(
            f"MMD terms need source and target batches of one shape, got {source.shape} "
            f"and {target.shape}."
        )
    return jnp.concatenate([source, target])


def mk_mmd(
    source: jax.Array, target: jax.Array, alphas: Sequence[float], linear: bool = False
) -> jax.Array:
    """TLlib's multiple-kernel MMD between two batches of features.

    Args:
      source: [n, D] source features.
      target: [n, D] target features.
      alphas: bandwidth multipliers, one Gaussian kernel each.
      linear: the linear-time estimate instead of the quadratic one.

    Returns:
      The scalar MK-MMD estimate (with TLlib's 2 / (n - 1) offset).
    """
    kernel = multi_gaussian_kernel(concatenate_domains(source, target), alphas)
    return kernel_discrepancy(kernel, linear)


def term(config: ml_collections.ConfigDict) -> adaptation.Term:
    """DAN's term: MK-MMD between the source and target features.

    Args:
      config: the experiment config; its ``dan`` block holds ``kernel_alphas`` and
        ``linear``.

    Returns:
      The `adaptation.Term`, metric ``mkmmd``.
    """
    alphas = tuple(float(alpha) for alpha in config.dan.kernel_alphas)
    linear = bool(config.dan.linear)

    def loss(outputs: adaptation.Outputs):
        value = mk_mmd(outputs.source_features, outputs.target_features, alphas, linear)
        return value, {"mkmmd": value}

    return adaptation.Term("dan", loss)
