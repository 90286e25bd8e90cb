"""tljax.ranking against hand computations and NumPy transcriptions of the reference code.

The `tllib_*` and `authors_*` functions below are the Transfer-Learning-Library's
``tllib/ranking/{logme,leep,nce,hscore}.py`` (commit c4aa59e) and the LogME authors'
``LogME.py`` fixed-point fit (github.com/thuml/LogME, commit 56551ca), transcribed without numba
and with their loops kept, so the tests compare against what the papers' code computes.
"""

import math

import numpy as np
import pytest

from tljax import ranking

# ------------------------------------------------------ reference transcriptions ----


def tllib_log_maximum_evidence(features, targets):
    """tllib.ranking.logme.log_maximum_evidence (ICML 2021 iteration), classification."""
    f = features.astype(np.float64)
    y = targets
    fh = f
    f = f.transpose()
    D, N = f.shape
    v, s, vh = np.linalg.svd(f @ fh, full_matrices=True)
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64)
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        tmp = vh @ (f @ y_)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / alpha_de
            beta_de = ((y_ - fh @ m) ** 2).sum()
            beta = (N - gamma) / beta_de
            new_lam = alpha / beta
            if np.abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (
            D / 2.0 * np.log(alpha)
            + N / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2.0 * beta_de
            - alpha / 2.0 * alpha_de
            - N / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / N)
    return np.mean(evidences)


def authors_truncated_svd(x):
    """LogME.truncated_svd."""
    u, s, vh = np.linalg.svd(x.transpose() @ x)
    s = np.sqrt(s)
    u_times_sigma = x @ vh.transpose()
    k = np.sum((s > 1e-10) * 1)
    s = s.reshape(-1, 1)
    s = s[:k]
    vh = vh[:k]
    u = u_times_sigma[:, :k] / s.reshape(1, -1)
    return u, s, vh


def authors_logme_fixed_point(f, y):
    """LogME.LogME._fit_fixed_point (the authors' default fit), classification."""
    f = f.astype(np.float64)
    N, D = f.shape
    if N > D:
        u, s, vh = authors_truncated_svd(f)
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = s**2
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64).reshape(-1, 1)
        x = u.T @ y_
        x2 = x**2
        res_x2 = (y_**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (N - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = (
            D / 2.0 * np.log(alpha)
            + N / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - N / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / N)
    return np.mean(evidences)


def tllib_leep(predictions, labels):
    """tllib.ranking.leep.log_expected_empirical_prediction."""
    N, C_s = predictions.shape
    labels = labels.reshape(-1)
    C_t = int(np.max(labels) + 1)
    normalized_prob = predictions / float(N)
    joint = np.zeros((C_t, C_s), dtype=float)
    for i in range(C_t):
        joint[i] = np.sum(normalized_prob[labels == i], axis=0)
    p_target_given_source = (joint / joint.sum(axis=0, keepdims=True)).T
    empirical_prediction = predictions @ p_target_given_source
    empirical_prob = np.array(
        [predict[label] for predict, label in zip(empirical_prediction, labels, strict=True)]
    )
    return np.mean(np.log(empirical_prob))


def tllib_nce(source_labels, target_labels):
    """tllib.ranking.nce.negative_conditional_entropy."""
    C_t = int(np.max(target_labels) + 1)
    C_s = int(np.max(source_labels) + 1)
    N = len(source_labels)
    joint = np.zeros((C_t, C_s), dtype=float)
    for s, t in zip(source_labels, target_labels, strict=True):
        joint[int(t), int(s)] += 1.0 / N
    p_z = joint.sum(axis=0, keepdims=True)
    p_target_given_source = (joint / p_z).T
    mask = p_z.reshape(-1) != 0
    p_target_given_source = p_target_given_source[mask] + 1e-20
    entropy_y_given_z = np.sum(
        -p_target_given_source * np.log(p_target_given_source), axis=1, keepdims=True
    )
    return -np.sum(entropy_y_given_z * p_z.reshape((-1, 1))[mask])


def tllib_h_score(features, labels):
    """tllib.ranking.hscore.h_score."""
    f, y = features, labels
    covf = np.cov(f, rowvar=False)
    g = np.zeros_like(f)
    for i in range(int(y.max() + 1)):
        g[y == i] = np.mean(f[y == i, :], axis=0)
    covg = np.cov(g, rowvar=False)
    return np.trace(np.dot(np.linalg.pinv(covf, rcond=1e-15), covg))


# ------------------------------------------------------------------ test data ----


def clustered_features(n, d, classes, spread, seed, relu=False):
    """Features = a class centre + Gaussian noise of std ``spread``; every class present."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d))
    features = centres[labels] + spread * rng.normal(size=(n, d))
    return (np.maximum(features, 0) if relu else features), labels


def softmax_rows(n, classes, seed):
    rng = np.random.default_rng(seed)
    logits = 2 * rng.normal(size=(n, classes))
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------- LogME ----


def test_logme_equals_the_authors_fixed_point_when_features_have_full_rank():
    features, labels = clustered_features(200, 20, 4, 1.0, seed=0)
    assert ranking.logme(features, labels) == pytest.approx(
        authors_logme_fixed_point(features, labels), rel=1e-12
    )


@pytest.mark.parametrize(("n", "d", "relu"), [(200, 20, False), (60, 20, True), (30, 80, True)])
def test_logme_matches_the_icml_iteration_of_tllib(n, d, relu):
    # Same fixed point, other stopping rule (1% vs 0.1% change of alpha / beta) and no 1e-5
    # guards: close, not equal (ours, iterated to 1e-9, moves by < 1e-4 here).
    features, labels = clustered_features(n, d, 3, 1.0, seed=1, relu=relu)
    assert ranking.logme(features, labels) == pytest.approx(
        tllib_log_maximum_evidence(features, labels), abs=1.5e-3
    )


def test_logme_keeps_the_full_log_determinant_when_examples_are_fewer_than_dimensions():
    # N < D: the authors' fixed-point code drops (D - N) log(alpha) / 2N per class and comes
    # out far above the ICML evidence; ours stays with the ICML one.
    features, labels = clustered_features(30, 300, 3, 1.0, seed=2)
    ours = ranking.logme(features, labels)
    icml = tllib_log_maximum_evidence(features, labels)
    assert ours == pytest.approx(icml, abs=1.5e-3)
    assert authors_logme_fixed_point(features, labels) > icml + 1.0


@pytest.mark.parametrize(
    ("n", "d", "dead"), [(30, 300, 0), (100, 768, 0), (200, 20, 0), (200, 20, 5)]
)
def test_truncated_log_det_reproduces_the_authors_fixed_point(n, d, dead):
    features, labels = clustered_features(n, d, 4, 1.0, seed=n, relu=True)
    features[:, :dead] = 0.0  # Dead units: F has rank D - dead although N > D.
    assert ranking.logme(features, labels, truncated_log_det=True) == pytest.approx(
        authors_logme_fixed_point(features, labels), rel=1e-9
    )


def test_dead_units_keep_the_evidence_of_the_icml_iteration():
    features, labels = clustered_features(200, 20, 4, 1.0, seed=7, relu=True)
    features[:, :5] = 0.0
    assert ranking.logme(features, labels) == pytest.approx(
        tllib_log_maximum_evidence(features, labels), abs=1.5e-3
    )


def test_logme_prefers_features_that_separate_the_labels():
    features, labels = clustered_features(120, 16, 4, 0.3, seed=3)
    shuffled = np.random.default_rng(0).permutation(labels)
    noise = np.random.default_rng(1).normal(size=features.shape)
    separable = ranking.logme(features, labels)
    assert separable > ranking.logme(features, shuffled)
    assert separable > ranking.logme(noise, labels)


def test_logme_does_not_depend_on_how_classes_are_numbered():
    features, labels = clustered_features(90, 10, 3, 0.5, seed=4)
    renamed = np.array([7, 2, 5])[labels]
    assert ranking.logme(features, renamed) == pytest.approx(ranking.logme(features, labels))


# ----------------------------------------------------------------------- LEEP ----


def test_leep_of_a_known_joint_by_hand():
    # Hard source predictions z = 0, 0, 1, 1 for labels y = 0, 0, 1, 0:
    # P(y | z=0) = (1, 0), P(y | z=1) = (1/2, 1/2), so EEP = 1, 1, 1/2, 1/2.
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 0])
    assert ranking.leep(probs, labels) == pytest.approx(2 * math.log(0.5) / 4)


def test_leep_of_soft_predictions_by_hand():
    # theta = (0.8, 0.2) for y=0 and (0.4, 0.6) for y=1, one example each:
    # joint = [[0.4, 0.1], [0.2, 0.3]], P(y | z) = [[2/3, 1/4], [1/3, 3/4]].
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    eep = [0.8 * 2 / 3 + 0.2 * 1 / 4, 0.4 * 1 / 3 + 0.6 * 3 / 4]
    assert ranking.leep(probs, np.array([0, 1])) == pytest.approx(np.mean(np.log(eep)))


@pytest.mark.parametrize(("source_classes", "target_classes"), [(10, 10), (5, 10), (12, 3)])
def test_leep_matches_tllib(source_classes, target_classes):
    probs = softmax_rows(150, source_classes, seed=source_classes)
    labels = np.arange(150) % target_classes
    assert ranking.leep(probs, labels) == pytest.approx(tllib_leep(probs, labels), rel=1e-12)


def test_leep_of_hard_predictions_is_nce():
    predictions = np.random.default_rng(0).integers(0, 4, 80)
    labels = np.random.default_rng(1).integers(0, 3, 80)
    one_hot = np.eye(4)[predictions]
    assert ranking.leep(one_hot, labels) == pytest.approx(
        ranking.negative_conditional_entropy(predictions, labels)
    )


def test_leep_refuses_rows_that_are_not_probabilities():
    with pytest.raises(ValueError, match="source_probs must be probabilities"):
        ranking.leep(np.array([[2.0, -1.0], [0.5, 0.5]]), np.array([0, 1]))


# ------------------------------------------------------------------------ NCE ----


def test_nce_is_minus_the_conditional_entropy_by_hand():
    # z = 0 -> y = 0, 0 (H = 0); z = 1 -> y = 1, 0 (H = ln 2); z = 2 -> y = 2, 2, 1, 1 (ln 2).
    # H(Y | Z) = 2/8 * 0 + 2/8 * ln 2 + 4/8 * ln 2.
    predictions = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    labels = np.array([0, 0, 1, 0, 2, 2, 1, 1])
    expected = -(0.25 + 0.5) * math.log(2)
    assert ranking.negative_conditional_entropy(predictions, labels) == pytest.approx(expected)


def test_nce_is_zero_when_source_classes_determine_the_labels():
    predictions = np.array([3, 3, 0, 1, 1])
    labels = np.array([1, 1, 0, 0, 0])
    assert ranking.negative_conditional_entropy(predictions, labels) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_nce_matches_tllib(seed):
    rng = np.random.default_rng(seed)
    predictions, labels = rng.integers(0, 7, 200), rng.integers(0, 5, 200)
    assert ranking.negative_conditional_entropy(predictions, labels) == pytest.approx(
        tllib_nce(predictions, labels), abs=1e-12
    )


# -------------------------------------------------------------------- H-score ----


def test_h_score_by_hand_in_one_dimension():
    # f = 0, 2 | 10, 12: var(f) = 104/3; class means 1, 1, 11, 11: var = 100/3.
    features = np.array([[0.0], [2.0], [10.0], [12.0]])
    assert ranking.h_score(features, np.array([0, 0, 1, 1])) == pytest.approx(100 / 104)


@pytest.mark.parametrize(("n", "d"), [(200, 12), (50, 8)])
def test_h_score_matches_tllib(n, d):
    features, labels = clustered_features(n, d, 4, 1.0, seed=n)
    assert ranking.h_score(features, labels) == pytest.approx(
        tllib_h_score(features, labels), rel=1e-10
    )


def test_h_score_is_classes_minus_one_with_fewer_examples_than_dimensions():
    # tr(pinv(F'F) F'HF) = tr(projection onto F's columns x H) = tr(H) = C - 1 once the centred
    # features span all N - 1 centred directions.
    rng = np.random.default_rng(6)
    labels = np.arange(20) % 4
    for features in (rng.normal(size=(20, 50)), clustered_features(20, 50, 4, 0.1, seed=6)[0]):
        assert ranking.h_score(features, labels) == pytest.approx(3.0, rel=1e-6)


def test_h_score_prefers_features_that_separate_the_labels():
    features, labels = clustered_features(200, 8, 4, 0.5, seed=5)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert ranking.h_score(features, labels) > ranking.h_score(features, shuffled)


# ----------------------------------------------------------------- bad input ----


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ranking.logme(np.zeros(5), np.zeros(5, int)), r"\[N, D\] array"),
        (lambda: ranking.logme(np.zeros((5, 2)), np.zeros(4, int)), "4 entries for 5"),
        (lambda: ranking.logme(np.zeros((2, 2)), np.array([0.0, 1.0])), "integer class"),
        (lambda: ranking.h_score(np.zeros((2, 2)), np.array([0, -1])), ">= 0"),
        (lambda: ranking.h_score(np.full((2, 2), np.nan), np.array([0, 1])), "NaN"),
        (lambda: ranking.h_score(np.zeros((1, 2)), np.array([0])), "at least 2 examples"),
        (lambda: ranking.negative_conditional_entropy(np.array([0, 1]), np.array([0])), "1 entr"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
