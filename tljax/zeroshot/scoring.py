"""Scoring rules and metrics of zero-shot learning, as pure functions.

Every rule maps a batch to scores of shape (N, num_classes) over *all* classes; zero-shot
(ZSL) prediction restricts the argmax to the unseen classes, generalised zero-shot (GZSL)
prediction takes it over every class (`restrict_to`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dap_log_scores(
    attribute_logits: jax.Array,
    class_attributes: jax.Array,
    attribute_prior: jax.Array,
    prob_floor: float,
    attribute_mask: jax.Array | None = None,
) -> jax.Array:
    """Direct attribute prediction (Lampert et al. 2009), in log space.

    score(x, z) = sum_m log p(a_m = a_m^z | x) - log p(a_m = a_m^z), the log of
    prod_m p(a_m^z | x) / p(a_m^z). Products of many probabilities underflow; sums of logs
    do not.

    Args:
      attribute_logits: (N, M) logits of the per-attribute classifiers p(a_m = 1 | x).
      class_attributes: (C, M) binary attribute signature a^z of every class.
      attribute_prior: (M,) p(a_m = 1), e.g. the attribute's frequency over seen classes.
      prob_floor: probabilities are clipped to [prob_floor, 1 - prob_floor] so that one
        over-confident attribute classifier cannot veto a class on its own.
      attribute_mask: optional (M,) 1 for attributes to use, 0 to leave out (an attribute
        that is constant over the seen classes cannot be learned).

    Returns:
      (N, C) float32 scores.
    """
    prob = jnp.clip(
        jax.nn.sigmoid(attribute_logits.astype(jnp.float32)), prob_floor, 1 - prob_floor
    )
    prior = jnp.clip(jnp.asarray(attribute_prior, jnp.float32), prob_floor, 1 - prob_floor)
    present = jnp.log(prob) - jnp.log(prior)
    absent = jnp.log1p(-prob) - jnp.log1p(-prior)
    if attribute_mask is not None:
        present, absent = present * attribute_mask, absent * attribute_mask
    class_attributes = jnp.asarray(class_attributes, jnp.float32)
    return present @ class_attributes.T + absent @ (1.0 - class_attributes).T


def cosine_scores(queries: jax.Array, class_embeddings: jax.Array) -> jax.Array:
    """Cosine similarity of every query to every class embedding.

    Args:
      queries: (N, D).
      class_embeddings: (C, D).

    Returns:
      (N, C) cosines (0 where a vector is zero).
    """
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return unit(queries) @ unit(jnp.asarray(class_embeddings, queries.dtype)).T


def conse_embeddings(seen_probs: jax.Array, seen_embeddings: jax.Array, top_t: int) -> jax.Array:
    """ConSE's convex combination of seen-class embeddings (Norouzi et al. 2014).

    f(x) = (1/Z) sum_{t <= T} p(y_t | x) s(y_t) over the T most probable seen classes,
    Z = sum_{t <= T} p(y_t | x).

    Args:
      seen_probs: (N, S) softmax probabilities over the seen classes.
      seen_embeddings: (S, D) semantic embedding s(y) of every seen class.
      top_t: T; capped at S.

    Returns:
      (N, D) embeddings of the images.
    """
    top_t = min(int(top_t), seen_probs.shape[-1])
    top_probs, top_classes = jax.lax.top_k(seen_probs, top_t)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return jnp.einsum("nt,ntd->nd", weights, jnp.asarray(seen_embeddings)[top_classes])


def eszsl_projection(
    features: np.ndarray,
    labels: np.ndarray,
    seen_embeddings: np.ndarray,
    gamma: float,
    lam: float,
) -> np.ndarray:
    """The closed-form ESZSL projection (Romera-Paredes & Torr 2015).

    V = (X^T X + gamma I)^-1 X^T Y S (S^T S + lam I)^-1, with Y the {-1, +1} one-hot
    labels over the seen classes and S their embeddings (rows); score(x, z) = x^T V s_z.

    Args:
      features: (N, d) training features X.
      labels: (N,) index of each example's class *within the seen classes*.
      seen_embeddings: (S, a) seen-class embeddings.
      gamma: ridge on the feature side.
      lam: ridge on the embedding side.

    Returns:
      float32 (d, a) projection V.
    """
    x = np.asarray(features, np.float64)
    s = np.asarray(seen_embeddings, np.float64)
    y = -np.ones((len(x), len(s)))
    y[np.arange(len(x)), labels] = 1.0
    left = np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ y @ s)
    return np.linalg.solve(s.T @ s + lam * np.eye(s.shape[1]), left.T).T.astype(np.float32)


def restrict_to(scores: jax.Array, candidates: jax.Array) -> jax.Array:
    """Scores with every class outside `candidates` (a (C,) 0/1 mask) set to -inf."""
    return jnp.where(jnp.asarray(candidates, bool), scores, -jnp.inf)


def mean_class_accuracy(correct: np.ndarray, count: np.ndarray, classes: np.ndarray) -> float:
    """Per-class mean top-1 accuracy over `classes` (the standard ZSL metric).

    Args:
      correct: (C,) correctly classified test examples of each class.
      count: (C,) test examples of each class.
      classes: which classes to average over; classes without test examples are skipped.

    Returns:
      The mean of correct / count over those classes.

    Raises:
      ValueError: if none of `classes` has a test example.
    """
    classes = np.asarray(classes)
    present = classes[np.asarray(count)[classes] > 0]
    if not present.size:
        raise ValueError(f"No test examples for any of the classes {classes.tolist()}.")
    return float(np.mean(np.asarray(correct)[present] / np.asarray(count)[present]))


def harmonic_mean(seen_accuracy: float, unseen_accuracy: float) -> float:
    """GZSL's H = 2 s u / (s + u); 0 when both accuracies are 0."""
    total = seen_accuracy + unseen_accuracy
    return 0.0 if total == 0 else 2.0 * seen_accuracy * unseen_accuracy / total
