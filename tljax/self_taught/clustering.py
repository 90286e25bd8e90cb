"""k-means and the two standard clustering scores, NMI and clustering accuracy.

k-means runs as gradient descent (Bottou & Bengio 1995): with the loss
  L(c) = sum_k 1 / (2 |C_k|) sum_{i in C_k} ||x_i - c_k||^2
(assignments C_k held fixed), dL/dc_k = c_k - mean(C_k), so one SGD step of learning rate 1
over the whole set moves every centroid to the mean of its points: a Lloyd iteration. The
trainer therefore runs k-means like any other method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def kmeans_plus_plus(points: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007).

    Args:
      points: (N, D).
      num_clusters: K <= N.
      seed: numpy seed.

    Returns:
      float32 (K, D) initial centroids, rows of `points`.
    """
    points = np.asarray(points, np.float64)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(points)))]
    distances = np.sum((points - points[chosen[0]]) ** 2, axis=1)
    for _ in range(1, num_clusters):
        total = distances.sum()
        pick = (
            rng.choice(len(points), p=distances / total) if total > 0 else rng.integers(len(points))
        )
        chosen.append(int(pick))
        distances = np.minimum(distances, np.sum((points - points[pick]) ** 2, axis=1))
    return points[chosen].astype(np.float32)


def assign(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid of every point, (N,)."""
    sq_distances = (
        jnp.sum(points**2, axis=1, keepdims=True)
        - 2.0 * points @ centroids.T
        + jnp.sum(centroids**2, axis=1)
    )
    return jnp.argmin(sq_distances, axis=1)


def lloyd_loss(centroids: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The k-means loss whose learning-rate-1 gradient step is a Lloyd iteration.

    Args:
      centroids: (K, D).
      points: (N, D).

    Returns:
      (loss, inertia): the size-normalised loss above, and the plain k-means inertia
      (mean squared distance of a point to its centroid).
    """
    labels = jax.lax.stop_gradient(assign(points, centroids))
    members = jax.nn.one_hot(labels, len(centroids))
    sizes = jnp.maximum(members.sum(0), 1.0)  # Empty clusters get no gradient: they stay.
    sq_distances = jnp.sum((points[:, None, :] - centroids[None]) ** 2, axis=-1)
    loss = 0.5 * jnp.sum(members * sq_distances / sizes)
    inertia = jnp.sum(members * sq_distances) / len(points)
    return loss, inertia


def contingency(clusters: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int):
    """Counts of every (cluster, class) pair, (num_clusters, num_classes)."""
    table = np.zeros((num_clusters, num_classes), np.int64)
    np.add.at(table, (np.asarray(clusters), np.asarray(labels)), 1)
    return table


def normalized_mutual_information(table: np.ndarray) -> float:
    """NMI of a clustering and the true classes, I(C; Y) / sqrt(H(C) H(Y)).

    Args:
      table: (clusters, classes) contingency counts.

    Returns:
      NMI in [0, 1] (geometric-mean normalisation, as in Dai et al. 2008); 0 when either
      partition has a single part.
    """
    joint = np.asarray(table, np.float64) / np.sum(table)
    cluster_p, class_p = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(cluster_p, class_p)[nonzero]))
    entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
    normaliser = np.sqrt(entropy(cluster_p) * entropy(class_p))
    return float(mutual / normaliser) if normaliser > 0 else 0.0


def clustering_accuracy(table: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to classes (Hungarian matching).

    Args:
      table: (clusters, classes) contingency counts.

    Returns:
      Fraction of points whose cluster maps to their class.
    """
    table = np.asarray(table)
    rows, cols = scipy.optimize.linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())
