"""Label-free model-selection scores for unsupervised domain adaptation.

Every score is "higher is better", so a selector takes the argmax over checkpoints or runs;
scores whose papers minimise a risk or an entropy are negated here (each docstring says how).
They are pure functions of host arrays (numpy in, python float out), evaluated once per
evaluation on at most a few thousand rows. Non-finite logits give a non-finite score, which a
selector never picks (`tljax.select`).

* `source_accuracy`: accuracy on a held-out labelled source split.
* `entropy`: minus the mean prediction entropy on target data; Morerio et al., "Minimal-Entropy
  Correlation Alignment for Unsupervised Deep Domain Adaptation", ICLR 2018.
* `information_maximization`: H(mean prediction) - mean H(prediction), the negated loss of SHOT
  (Liang et al., "Do We Really Need to Access the Source Data?", ICML 2020; github.com/
  tim-learn/SHOT @f7d555a, object/image_target.py ``im_loss``); a validator in
  Musgrave et al., "Benchmarking Validation Methods for Unsupervised Domain Adaptation", 2022
  (reference: github.com/KevinMusgrave/pytorch-adapt @1366df7, validators/im_validator.py).
* `soft_neighborhood_density`: Saito et al., "Tune it the Right Way: Unsupervised Validation of
  Domain Adaptation via Soft Neighborhood Density", ICCV 2021 (reference:
  github.com/VisionLearningGroup/SND @6aae970, cdan/main_cdan.py
  ``image_classification_test``).
* `batch_nuclear_norm`: Cui et al., "Towards Discriminability and Diversity: Batch
  Nuclear-norm Maximization under Label Insufficient Situations", CVPR 2020 (reference:
  github.com/cuishuhao/BNM @2d23c61, UODR/train_loader.py; pytorch-adapt layers/bnm_loss.py).
* `deep_embedded_validation`: You et al., "Towards Accurate Model Selection in Deep
  Unsupervised Domain Adaptation", ICML 2019 (reference: github.com/thuml/Deep-Embedded-
  Validation @abf9c96, dev.py ``get_dev_risk`` and ``get_weight``; tests/test_validators.py
  holds a copy of ``get_dev_risk``).

Where this module departs from the reference code, the function's docstring says so.
"""

from __future__ import annotations

import numpy as np
import threadpoolctl
from scipy import special
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

NAMES = ("source_accuracy", "entropy", "im", "snd", "bnm", "dev")

# L2 strengths (sklearn's inverse C) the DEV domain classifier chooses from on held-out rows,
# as the reference chooses its MLP's weight decay from a grid.
DOMAIN_CLASSIFIER_CS = (1e-2, 1e-1, 1.0)
_DEFAULT_C = 0.1  # Used when a domain has too few rows to hold any out.
_MIN_ROWS_TO_TUNE = 5  # Per domain: a 20% held-out split then keeps a row of each.
_HELD_OUT_FRACTION = 0.2  # The reference's train_test_split(train_size=0.8).
# Relative variance below which DEV's importance weights count as constant: the control
# variate's coefficient is then a regression slope on rounding noise.
_CONSTANT_WEIGHTS_RTOL = np.finfo(np.float64).eps


# ------------------------------------------------------------------- inputs ----


def _matrix(array, name: str, min_rows: int = 1) -> np.ndarray:
    """``array`` as a float64 [N, D] matrix with N >= min_rows and D >= 1, else ValueError."""
    matrix = np.asarray(array, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-D [N, D] array, got shape {matrix.shape}.")
    if matrix.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} row(s), got shape {matrix.shape}.")
    return matrix


def _labels(labels, logits: np.ndarray) -> np.ndarray:
    """``labels`` checked as integer classes, one per row of ``logits`` (source_logits)."""
    labels = np.asarray(labels)
    rows, classes = logits.shape
    if labels.shape != (rows,):
        raise ValueError(
            f"source_labels: expected shape ({rows},), one label per row of source_logits, "
            f"got {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"source_labels: expected integer class indices, got {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"source_labels: expected classes in [0, {classes}) (source_logits has {classes} "
            f"columns), got values in [{labels.min()}, {labels.max()}]."
        )
    return labels


def _same_rows(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} has {a.shape[0]} rows but {b_name} has {b.shape[0]}: expected one row "
            "per example in both."
        )


def _probabilities(logits: np.ndarray) -> np.ndarray:
    return special.softmax(logits, axis=1)


def _row_entropies(probabilities: np.ndarray) -> np.ndarray:
    # entr is -p log p with entr(0) = 0, so no epsilon inside the log is needed.
    return special.entr(probabilities).sum(axis=1)


def cross_entropies(logits, labels) -> np.ndarray:
    """Per-example cross-entropy of softmax(logits) against integer labels.

    Args:
      logits: [N, C] source logits.
      labels: [N] integer classes in [0, C).

    Returns:
      [N] losses, -log softmax(logits)[i, labels[i]].
    """
    logits = _matrix(logits, "source_logits")
    labels = _labels(labels, logits)
    log_probabilities = special.log_softmax(logits, axis=1)
    return -np.take_along_axis(log_probabilities, labels[:, None], axis=1)[:, 0]


# --------------------------------------------------------------- validators ----


def source_accuracy(source_logits, source_labels) -> float:
    """Accuracy on a held-out labelled source split (higher is better).

    Args:
      source_logits: [N, C] logits on the source validation split.
      source_labels: [N] integer labels in [0, C).

    Returns:
      The fraction of rows whose argmax logit is the label.
    """
    logits = _matrix(source_logits, "source_logits")
    labels = _labels(source_labels, logits)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def entropy(target_logits) -> float:
    """Minus the mean prediction entropy on target data (higher = more confident = better).

    Morerio et al. (2018) select the model whose target predictions have the lowest entropy;
    the sign is flipped so that higher is better.

    Args:
      target_logits: [N, C] logits on unlabelled target data.

    Returns:
      -mean_i H(softmax(logits_i)), in nats; 0 for one-hot predictions.
    """
    probabilities = _probabilities(_matrix(target_logits, "target_logits"))
    return float(-np.mean(_row_entropies(probabilities)))


def information_maximization(target_logits) -> float:
    """Information maximisation, H(mean prediction) - mean H(prediction) (higher is better).

    The mutual information between inputs and predicted classes: highest (ln C) for
    predictions that are confident and spread evenly over the classes, 0 for identical
    predictions. SHOT minimises its negative (without SHOT's 1e-5 inside the logs).

    Args:
      target_logits: [N, C] logits on unlabelled target data.

    Returns:
      H(mean_i p_i) - mean_i H(p_i), in nats.
    """
    probabilities = _probabilities(_matrix(target_logits, "target_logits"))
    marginal = probabilities.mean(axis=0, keepdims=True)
    return float(_row_entropies(marginal)[0] - np.mean(_row_entropies(probabilities)))


def soft_neighborhood_density(target_logits, temperature: float = 0.05) -> float:
    """Soft neighbourhood density, SND (higher = denser neighbourhoods = better).

    As the authors' code computes it: the rows' softmax predictions are L2-normalised, their
    cosine similarities divided by ``temperature``, each row's similarity to itself replaced by
    the lowest possible cosine, -1 (so -1/temperature; the authors' ``masked_fill_(mask, -1 /
    0.05)``, where pytorch-adapt drops it instead: the two differ by about exp(-1/temperature)),
    and the mean over rows of the entropy of each row's softmax is the score. The authors take
    the model with the largest value. Unlike their code, the entropy has no 1e-5 inside the log.

    Args:
      target_logits: [N, C] logits on unlabelled target data, N >= 2.
      temperature: softmax temperature on the cosine similarities (the paper's 0.05).

    Returns:
      mean_i H(softmax_j(cos(p_i, p_j) / temperature)), with cos(p_i, p_i) := -1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}.")
    probabilities = _probabilities(_matrix(target_logits, "target_logits", min_rows=2))
    # A softmax row's norm is at least 1/sqrt(C), so this never divides by zero.
    unit = probabilities / np.linalg.norm(probabilities, axis=1, keepdims=True)
    rows = len(unit)
    # Row blocks keep memory at block x N rather than N x N for a few thousand rows.
    block = 1024
    entropies = [
        _neighbour_entropies(unit, start, min(start + block, rows), temperature)
        for start in range(0, rows, block)
    ]
    return float(np.mean(np.concatenate(entropies)))


def _neighbour_entropies(unit: np.ndarray, start: int, stop: int, temperature: float):
    """SND's row entropies for rows [start, stop) of the normalised predictions ``unit``."""
    similarity = unit[start:stop] @ unit.T
    rows = np.arange(stop - start)
    similarity[rows, start + rows] = -1.0
    return _row_entropies(special.softmax(similarity / temperature, axis=1))


def batch_nuclear_norm(target_logits) -> float:
    """Batch nuclear norm, BNM (higher = more confident and more diverse = better).

    The nuclear norm (sum of singular values) of the [N, C] matrix of target softmax
    predictions, divided by N as in the paper's loss (-||A||_* / B), the authors' UODR code and
    pytorch-adapt's BNMLoss. (The authors' DA/BNM code takes the mean singular value instead,
    i.e. divides by min(N, C).) It is at most sqrt(min(N, C) / N), reached by one-hot
    predictions spread evenly over the classes; one-hot predictions all of one class give
    1/sqrt(N).

    Args:
      target_logits: [N, C] logits on unlabelled target data.

    Returns:
      ||softmax(logits)||_* / N.
    """
    probabilities = _probabilities(_matrix(target_logits, "target_logits"))
    if not np.all(np.isfinite(probabilities)):
        return float("nan")  # The SVD would raise rather than return NaN.
    return float(np.linalg.norm(probabilities, ord="nuc") / len(probabilities))


def deep_embedded_validation(
    source_features, source_logits, source_labels, target_features, *, seed: int = 0
) -> float:
    """Deep embedded validation, DEV: minus the importance-weighted source risk.

    The source-validation cross-entropy, weighted by how target-like each row's features are
    (`importance_weights`) with the control variate of the reference (`dev_risk`), estimates
    the target risk; the score is its negative, so higher is better. With weights that are all
    equal (source and target features indistinguishable), it is minus the mean source
    cross-entropy.

    Args:
      source_features: [N_s, D] features of the source validation split, N_s >= 2.
      source_logits: [N_s, C] logits on the same rows.
      source_labels: [N_s] integer labels in [0, C).
      target_features: [N_t, D] features of unlabelled target data.
      seed: seeds the held-out split that tunes the domain classifier.

    Returns:
      -dev_risk(importance_weights(...), per-example cross-entropy).
    """
    features = _matrix(source_features, "source_features", min_rows=2)
    logits = _matrix(source_logits, "source_logits")
    _same_rows(features, "source_features", logits, "source_logits")
    losses = cross_entropies(logits, source_labels)
    target = _matrix(target_features, "target_features")
    if not (np.all(np.isfinite(features)) and np.all(np.isfinite(target))):
        return float("nan")  # The domain classifier would raise rather than return NaN.
    weights = importance_weights(features, target, seed=seed)
    return -dev_risk(weights, losses)


def importance_weights(source_features, target_features, *, seed: int = 0) -> np.ndarray:
    """Density ratios p_target(x) / p_source(x) at the source rows, from a domain classifier.

    A logistic regression on standardised features separates source (0) from target (1); the
    weights are w = (N_s / N_t) * p(target | x) / p(source | x), the reference's ``get_weight``
    (which labels the domains the other way round). As the reference tunes its MLP's weight
    decay on a held-out 20%, the L2 strength is chosen from `DOMAIN_CLASSIFIER_CS`, here by
    held-out log-loss (the reference uses accuracy, which says less about the probabilities
    the weights are made of); the chosen classifier is then refitted on all rows (the
    reference keeps the one fitted on 80%). The reference fits on the training source split
    and weighs the validation split; here the validation split is both. Domains with fewer than
    5 rows skip the tuning.

    Args:
      source_features: [N_s, D] source validation features.
      target_features: [N_t, D] target features.
      seed: seeds the held-out split.

    Returns:
      [N_s] positive weights (their mean is near 1 when the classifier is calibrated).
    """
    source = _matrix(source_features, "source_features")
    target = _matrix(target_features, "target_features")
    if source.shape[1] != target.shape[1]:
        raise ValueError(
            f"source_features has {source.shape[1]} columns but target_features has "
            f"{target.shape[1]}: expected features of the same network layer."
        )
    features = np.concatenate([source, target])
    is_target = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    c = _tuned_c(features, is_target, seed)
    classifier = _domain_classifier(c).fit(features, is_target)
    # The decision function is the log-odds log p(target|x)/p(source|x); exp of it avoids
    # dividing by a probability that has rounded to 0.
    return len(source) / len(target) * np.exp(classifier.decision_function(source))


def _domain_classifier(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))


def _tuned_c(features: np.ndarray, is_target: np.ndarray, seed: int) -> float:
    """The C of `DOMAIN_CLASSIFIER_CS` with the lowest held-out log-loss."""
    if min(np.sum(is_target == 0), np.sum(is_target == 1)) < _MIN_ROWS_TO_TUNE:
        return _DEFAULT_C
    fit_x, held_x, fit_y, held_y = train_test_split(
        features,
        is_target,
        test_size=_HELD_OUT_FRACTION,
        stratify=is_target,
        random_state=seed,
    )
    losses = [
        log_loss(
            held_y, _domain_classifier(c).fit(fit_x, fit_y).predict_proba(held_x), labels=[0, 1]
        )
        for c in DOMAIN_CLASSIFIER_CS
    ]
    return DOMAIN_CLASSIFIER_CS[int(np.argmin(losses))]


def dev_risk(weights, losses) -> float:
    """The DEV risk estimate: importance-weighted mean loss with a control variate.

    As the reference's ``get_dev_risk``: L = w * loss, eta = -Cov(L, w) / Var(w) (both with
    ddof=1), risk = mean(L) + eta * mean(w) - eta. The control variate uses E[w] = 1 to cancel
    part of the weights' variance. When the weights are constant (relative variance below
    float64 epsilon) eta is 0, where the reference divides by zero.

    Args:
      weights: [N] importance weights, N >= 2.
      losses: [N] per-example losses (the reference's "error").

    Returns:
      The estimated target risk (lower is better).
    """
    weights = np.asarray(weights, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if weights.ndim != 1 or len(weights) < 2:
        raise ValueError(f"weights: expected a 1-D array of >= 2 values, got {weights.shape}.")
    if losses.shape != weights.shape:
        raise ValueError(
            f"losses: expected shape {weights.shape}, one per weight, got {losses.shape}."
        )
    weighted = weights * losses
    mean_weight = np.mean(weights)
    variance = np.var(weights, ddof=1)
    if variance <= _CONSTANT_WEIGHTS_RTOL * mean_weight**2:
        eta = 0.0
    else:
        eta = -np.cov(weighted, weights)[0, 1] / variance
    return float(np.mean(weighted) + eta * mean_weight - eta)


def score_all(
    source_features,
    source_logits,
    source_labels,
    target_features,
    target_logits,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Every validator of `NAMES` on one evaluation's outputs.

    Args:
      source_features: [N_s, D] features of the labelled source validation split.
      source_logits: [N_s, C] logits on it.
      source_labels: [N_s] integer labels in [0, C).
      target_features: [N_t, D] features of unlabelled target data.
      target_logits: [N_t, C] logits on the same target rows.
      seed: seeds DEV's held-out split.

    Returns:
      name -> score, higher is better, keys `NAMES` in that order.
    """
    source_logits = _matrix(source_logits, "source_logits")
    target_logits = _matrix(target_logits, "target_logits")
    target_features = _matrix(target_features, "target_features")
    _same_rows(target_features, "target_features", target_logits, "target_logits")
    if source_logits.shape[1] != target_logits.shape[1]:
        raise ValueError(
            f"source_logits has {source_logits.shape[1]} classes but target_logits has "
            f"{target_logits.shape[1]}: expected the same classifier's outputs."
        )
    # One BLAS thread: beside JAX's own CPU threads, NumPy's and scikit-learn's thread pools
    # oversubscribe the cores and DEV's fits take 20x longer (7 s against 0.35 s on 2 cores).
    with threadpoolctl.threadpool_limits(limits=1):
        scores = {
            "source_accuracy": source_accuracy(source_logits, source_labels),
            "entropy": entropy(target_logits),
            "im": information_maximization(target_logits),
            "snd": soft_neighborhood_density(target_logits),
            "bnm": batch_nuclear_norm(target_logits),
            "dev": deep_embedded_validation(
                source_features, source_logits, source_labels, target_features, seed=seed
            ),
        }
    return {name: scores[name] for name in NAMES}
