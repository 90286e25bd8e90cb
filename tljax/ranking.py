"""Transferability scores: rank candidate source models for a target before fine-tuning any.

Each score is a pure function of NumPy arrays computed once per candidate on the labelled
target data (the candidate's penultimate features, or its source-class predictions) and returns
one float; higher predicts better transfer. ``python -m tljax.rank`` computes them for trained
runs (`tljax.rank`).

  logme                         LogME, You et al., "LogME: Practical Assessment of Pre-trained
                                Models for Transfer Learning", ICML 2021: the log marginal
                                evidence of a Bayesian linear model from features to one-hot
                                labels, maximised over its prior and noise precisions.
  leep                          LEEP, Nguyen et al., "LEEP: A New Measure to Evaluate
                                Transferability of Learned Representations", ICML 2020: the
                                log-likelihood of the "expected empirical predictor"
                                P(y | x) = sum_z P_hat(y | z) theta(x)_z.
  negative_conditional_entropy  NCE, Tran et al., "Transferability and Hardness of Supervised
                                Classification Tasks", ICCV 2019: -H(Y | Z) of the target labels
                                given the source model's hard predictions.
  h_score                       H-score, Bao et al., "An Information-theoretic Approach to
                                Transferability in Task Transfer Learning", ICIP 2019:
                                tr(cov(f)^+ cov(E[f | y])).

Reference implementations, whose formulas these follow (tests/test_ranking.py transcribes them):
the Transfer-Learning-Library, github.com/thuml/Transfer-Learning-Library,
``tllib/ranking/{logme,leep,nce,hscore}.py``, and the LogME authors' code,
github.com/thuml/LogME (``LogME.py``, ``LEEP.py``, ``NCE.py``).

LogME runs the authors' fixed-point iteration (``LogME._fit_fixed_point``: the updates
alpha = gamma / m'm and beta = (N - gamma) / ||Fm - y||^2 in the basis of F's singular vectors,
their 1e-5 guards, at most 11 steps, stopping when alpha / beta moves by <= 0.1%), one binary
target per class, the evidence divided by N and averaged over the classes. One difference: the
authors' fixed-point code sums log(alpha + beta sigma_i) over F's min(N, D) singular values
only, so with fewer examples than feature dimensions (N < D, the few-shot case) it drops the
(D - rank) * log(alpha) of the zero eigenvalues from log|alpha I + beta F'F|. Here the
log-determinant is the full D x D one, as in the paper's evidence and the authors' ICML code
(TLlib's ``log_maximum_evidence``); with N >= D and F of full rank both agree exactly.
``logme(..., truncated_log_det=True)`` reproduces the authors' fixed-point numbers.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

# The authors' guard against a zero denominator when features fit a class exactly.
_LOGME_EPSILON = 1e-5
_LOGME_MAX_STEPS = 11
_LOGME_TOLERANCE = 1e-3
_LOGME_PY_RANK_TOLERANCE = 1e-10
# TLlib's h_score: every singular value above 1e-15 x the largest is inverted.
_HSCORE_RCOND = 1e-15


def logme(features: np.ndarray, labels: np.ndarray, *, truncated_log_det: bool = False) -> float:
    """LogME: the maximum log evidence per example of a linear model from features to labels.

    Args:
      features: [N, D] features of the target examples (e.g. a network's penultimate layer).
      labels: [N] integer target labels >= 0.
      truncated_log_det: sum log|alpha I + beta F'F| over F's singular values only (all
        min(N, D) of them when N <= D, those above 1e-10 when N > D), as the authors' LogME.py
        fixed-point code does, to reproduce its numbers; it differs from the evidence when F
        has rank < D, e.g. whenever N < D (see the module docstring).

    Returns:
      The evidence per example, averaged over the classes present in ``labels`` (higher: the
      features explain the labels better with a simpler linear model).

    Raises:
      ValueError: malformed or non-finite features, or labels that do not match them.
    """
    f = _checked_features(features, "features")
    y = _checked_labels(labels, len(f), "labels")
    n, d = f.shape
    # Thin SVD: F = U diag(s) V'; everything the iteration needs lives in U's column space.
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    if truncated_log_det and n > d:
        # LogME.py's SVD for N > D keeps the singular values above 1e-10 only.
        keep = s > _LOGME_PY_RANK_TOLERANCE
        u, s = u[:, keep], s[keep]
    sigma = s**2
    zero_eigenvalues = 0 if truncated_log_det else d - len(s)
    evidences = []
    for label in np.unique(y):
        target = (y == label).astype(np.float64)
        projected = u.T @ target
        evidence = _class_evidence(projected**2, target @ target, sigma, n, d, zero_eigenvalues)
        evidences.append(evidence)
    return float(np.mean(evidences))


def _class_evidence(
    x2: np.ndarray, target_sq: float, sigma: np.ndarray, n: int, d: int, zero_eigenvalues: int
) -> float:
    """Maximised log evidence / N of one binary target (the authors' fixed-point iteration).

    Args:
      x2: squared coordinates of the target on F's left singular vectors, [k].
      target_sq: the target's squared norm.
      sigma: F's squared singular values, [k].
      n: examples.
      d: feature dimensions.
      zero_eigenvalues: eigenvalues of F'F beyond ``sigma`` that the log-determinant counts
        (each adds log(alpha)): D - k for the evidence, 0 as in LogME.py.
    """
    # The target's part outside F's column space is residual whatever the weights are.
    outside = target_sq - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(_LOGME_MAX_STEPS):
        ratio = alpha / beta
        gamma = (sigma / (sigma + ratio)).sum()
        m2 = (sigma * x2 / (ratio + sigma) ** 2).sum()
        res2 = (x2 / (1 + sigma / ratio) ** 2).sum() + outside
        alpha = gamma / (m2 + _LOGME_EPSILON)
        beta = (n - gamma) / (res2 + _LOGME_EPSILON)
        if abs(alpha / beta - ratio) / ratio <= _LOGME_TOLERANCE:
            break
    # log|alpha I + beta F'F|: the D - k eigenvalues of F'F beyond sigma are 0, each adding
    # log(alpha) (LogME.py leaves them out).
    log_det = np.log(alpha + beta * sigma).sum() + zero_eigenvalues * np.log(alpha)
    evidence = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - log_det / 2
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )
    return evidence / n


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: mean log-likelihood of the labels under the expected empirical predictor.

    The joint P_hat(y, z) = 1/N sum_i theta(x_i)_z [y_i = y] of target label y and source class
    z gives P_hat(y | z); each example is predicted as sum_z P_hat(y | z) theta(x)_z.

    Args:
      source_probs: [N, Cs] the source model's class probabilities (rows sum to 1) on the target
        examples; Cs need not equal the number of target classes.
      labels: [N] integer target labels >= 0.

    Returns:
      The LEEP score, <= 0 (0: the source classes determine the target labels).

    Raises:
      ValueError: probabilities that are not [N, Cs] rows of a distribution, or labels that do
        not match them.
    """
    probs = _checked_probabilities(source_probs)
    y = _checked_labels(labels, len(probs), "labels")
    one_hot = np.eye(y.max() + 1)[y]
    joint = one_hot.T @ probs / len(probs)  # [Ct, Cs]
    source_marginal = joint.sum(axis=0)
    # A source class with no mass anywhere is never predicted, so its P(y | z) never counts.
    given_source = np.divide(
        joint, source_marginal, out=np.zeros_like(joint), where=source_marginal > 0
    )
    expected = (probs @ given_source.T)[np.arange(len(y)), y]
    return float(np.mean(np.log(expected)))


def negative_conditional_entropy(source_predictions: np.ndarray, labels: np.ndarray) -> float:
    """NCE: -H(Y | Z) of the empirical joint of target labels Y and source predictions Z.

    Args:
      source_predictions: [N] the source model's predicted (argmax) source class per example.
      labels: [N] integer target labels >= 0.

    Returns:
      The NCE in nats, <= 0 (0: every source class maps to one target label).

    Raises:
      ValueError: predictions or labels that are not [N] integers >= 0 of the same length.
    """
    z = _checked_labels(source_predictions, None, "source_predictions")
    y = _checked_labels(labels, len(z), "labels")
    joint = np.zeros((y.max() + 1, z.max() + 1))
    np.add.at(joint, (y, z), 1.0)
    # H(Y | Z) = H(Y, Z) - H(Z); scipy normalises the counts and skips zero cells.
    conditional = scipy.stats.entropy(joint.ravel()) - scipy.stats.entropy(joint.sum(axis=0))
    return float(-conditional)


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score: tr(cov(f)^+ cov(E[f | y])), how much of the features' spread the classes explain.

    Args:
      features: [N, D] features of the target examples.
      labels: [N] integer target labels >= 0.

    Returns:
      The H-score (TLlib's: sample covariances, pseudo-inverse with rcond 1e-15). With no more
      examples than feature dimensions (N - 1 <= D) the centred features generically span every
      centred direction of the N examples, and the score is then C - 1 for C classes whatever
      the features are: it ranks nothing in that few-shot regime.

    Raises:
      ValueError: malformed or non-finite features, fewer than 2 examples, or labels that do
        not match them.
    """
    f = _checked_features(features, "features")
    y = _checked_labels(labels, len(f), "labels")
    if len(f) < 2:
        raise ValueError(f"h_score needs at least 2 examples for a covariance, got {len(f)}.")
    classes, index = np.unique(y, return_inverse=True)
    class_means = np.stack([f[index == c].mean(axis=0) for c in range(len(classes))])
    covariance = np.atleast_2d(np.cov(f, rowvar=False))
    between = np.atleast_2d(np.cov(class_means[index], rowvar=False))
    return float(np.trace(np.linalg.pinv(covariance, rcond=_HSCORE_RCOND) @ between))


def _checked_features(features, name: str) -> np.ndarray:
    f = np.asarray(features)
    if f.ndim != 2 or not f.size:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {f.shape}.")
    if not np.issubdtype(f.dtype, np.number):
        raise ValueError(f"{name} must be numbers, got dtype {f.dtype}.")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        raise ValueError(f"{name} hold {int((~np.isfinite(f)).sum())} NaN or infinite values.")
    return f


def _checked_labels(labels, count: int | None, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not y.size:
        raise ValueError(f"{name} must be a non-empty [N] array, got shape {y.shape}.")
    if count is not None and len(y) != count:
        raise ValueError(f"{name} has {len(y)} entries for {count} examples.")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}.")
    if y.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {int(y.min())}.")
    return y.astype(np.int64)


def _checked_probabilities(probs) -> np.ndarray:
    p = _checked_features(probs, "source_probs")
    if p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(
            "source_probs must be probabilities (rows >= 0 summing to 1, e.g. a softmax); got "
            f"values in [{p.min():.3g}, {p.max():.3g}], row sums in "
            f"[{p.sum(axis=1).min():.4g}, {p.sum(axis=1).max():.4g}]."
        )
    return p
