"""tljax.validators: hand-computed values, the orderings each paper relies on, DEV's reference."""

import math

import numpy as np
import pytest

from tljax import validators

LN3 = math.log(3.0)
# softmax rows [1/4, 3/4] and [3/4, 1/4].
MIRRORED = np.array([[0.0, LN3], [LN3, 0.0]])


def get_dev_risk(weight, error):
    """thuml/Deep-Embedded-Validation dev.py (abf9c96), copied verbatim but for the assert."""
    N, d = weight.shape
    _N, _d = error.shape
    assert N == _N and d == _d, "dimension mismatch!"
    weighted_error = weight * error
    cov = np.cov(np.concatenate((weighted_error, weight), axis=1), rowvar=False)[0][1]
    var_w = np.var(weight, ddof=1)
    eta = -cov / var_w
    return np.mean(weighted_error) + eta * np.mean(weight) - eta


def _one_hot_logits(labels, classes, confidence=0.9):
    """Logits whose softmax puts ``confidence`` on the label, the rest spread evenly."""
    probabilities = np.full((len(labels), classes), (1 - confidence) / (classes - 1))
    probabilities[np.arange(len(labels)), labels] = confidence
    return np.log(probabilities)


# ------------------------------------------------------------ hand values ----


def test_source_accuracy_and_cross_entropy_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    labels = np.array([0, 0, 1])
    # Rows 0 and 2 are right, row 1 is wrong.
    assert validators.source_accuracy(logits, labels) == pytest.approx(2 / 3)
    # -log softmax: log(1 + e^-2), log(1 + e), log(1 + e^-2).
    np.testing.assert_allclose(
        validators.cross_entropies(logits, labels), [0.126928, 1.313262, 0.126928], atol=1e-6
    )


def test_entropy_is_minus_mean_row_entropy_by_hand():
    # Each row's entropy: 1/4 ln 4 + 3/4 ln(4/3) = 0.346574 + 0.215762.
    assert validators.entropy(MIRRORED) == pytest.approx(-0.562335, abs=1e-6)


def test_information_maximization_by_hand():
    # Mean prediction [1/2, 1/2]: ln 2 - 0.562335.
    assert validators.information_maximization(MIRRORED) == pytest.approx(0.130812, abs=1e-6)


def test_batch_nuclear_norm_by_hand():
    # [[1/4, 3/4], [3/4, 1/4]] has eigenvalues 1 and -1/2: singular values 1 and 1/2.
    assert validators.batch_nuclear_norm(MIRRORED) == pytest.approx((1.0 + 0.5) / 2)


def test_soft_neighborhood_density_by_hand():
    # Cosine of [1, 3] and [3, 1] is 6/10. With temperature 1 each row's logits are
    # [-1 (itself, masked), 0.6], so its softmax is [q, 1 - q] with q = 1 / (1 + e^1.6).
    q = 1 / (1 + math.exp(1.6))
    assert q == pytest.approx(0.167982, abs=1e-6)
    expected = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert expected == pytest.approx(0.452671, abs=1e-6)
    assert validators.soft_neighborhood_density(MIRRORED, temperature=1.0) == pytest.approx(
        expected
    )


def test_dev_risk_by_hand():
    # L = w * loss = [1, 2, 6], mean 3; Cov(L, w) = (2 + 0 + 3) / 2 = 2.5; Var(w) = 1;
    # eta = -2.5; risk = 3 - 2.5 * 2 + 2.5.
    assert validators.dev_risk([1.0, 2.0, 3.0], [1.0, 1.0, 2.0]) == pytest.approx(0.5)


# ----------------------------------------------------- constructed orderings ----


def test_snd_higher_for_clustered_than_uniform_random_predictions():
    rng = np.random.default_rng(0)
    rows, classes = 200, 4
    labels = np.repeat(np.arange(classes), rows // classes)
    clustered = _one_hot_logits(labels, classes) + 0.01 * rng.normal(size=(rows, classes))
    scattered = np.log(rng.dirichlet(np.ones(classes), rows))
    clustered_snd = validators.soft_neighborhood_density(clustered)
    # Each row's soft neighbours are about evenly the other 49 of its cluster.
    assert clustered_snd == pytest.approx(math.log(rows // classes - 1), abs=0.02)
    assert clustered_snd > validators.soft_neighborhood_density(scattered) + 0.1


def test_entropy_higher_for_confident_predictions():
    labels = np.arange(40) % 4
    confident = validators.entropy(_one_hot_logits(labels, 4, confidence=0.97))
    hesitant = validators.entropy(_one_hot_logits(labels, 4, confidence=0.4))
    assert confident > hesitant
    assert validators.entropy(np.zeros((5, 4))) == pytest.approx(-math.log(4))


def test_information_maximization_rewards_confident_and_balanced():
    classes = 4
    balanced = 50 * np.eye(classes)[np.arange(40) % classes]
    one_class = 50 * np.eye(classes)[np.zeros(40, int)]
    uncertain = np.zeros((40, classes))
    assert validators.information_maximization(balanced) == pytest.approx(math.log(classes))
    assert validators.information_maximization(one_class) == pytest.approx(0.0, abs=1e-9)
    assert validators.information_maximization(uncertain) == pytest.approx(0.0, abs=1e-9)


def test_bnm_higher_for_diverse_than_collapsed_predictions():
    rows, classes = 40, 4
    diverse = 50 * np.eye(classes)[np.arange(rows) % classes]
    collapsed = 50 * np.eye(classes)[np.zeros(rows, int)]
    # Four orthogonal blocks of 10 one-hot rows: singular values sqrt(10) each.
    assert validators.batch_nuclear_norm(diverse) == pytest.approx(math.sqrt(classes / rows))
    assert validators.batch_nuclear_norm(collapsed) == pytest.approx(1 / math.sqrt(rows))


# -------------------------------------------------------------------- DEV ----


def _source_split(rng, rows, classes=3, dims=5):
    features = rng.normal(size=(rows, dims))
    logits = rng.normal(size=(rows, classes))
    labels = rng.integers(0, classes, rows)
    return features, logits, labels


@pytest.mark.parametrize("rows", [3, 30])  # Below and above the rows needed to tune C.
def test_dev_is_mean_source_cross_entropy_when_domains_are_identical(rows):
    rng = np.random.default_rng(rows)
    features, logits, labels = _source_split(rng, rows)
    # Every source row has a target twin: the classifier's best is a constant 1/2, so w = 1.
    weights = validators.importance_weights(features, features.copy())
    np.testing.assert_array_equal(weights, np.ones(rows))
    mean_loss = np.mean(validators.cross_entropies(logits, labels))
    dev = validators.deep_embedded_validation(features, logits, labels, features.copy())
    assert dev == pytest.approx(-mean_loss, rel=1e-12)


def test_importance_weights_include_the_domain_size_ratio():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(20, 3))
    # The same rows twice: p(target | x) = 1/3, times N_s / N_t = 2.
    weights = validators.importance_weights(np.concatenate([target, target]), target)
    np.testing.assert_allclose(weights, 1.0, atol=1e-3)


def test_importance_weights_grow_towards_the_target():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(200, 1))
    target = rng.normal(loc=1.5, size=(200, 1))
    weights = validators.importance_weights(source, target)
    order = np.argsort(source[:, 0])
    assert np.all(np.diff(weights[order]) > 0)
    # For unit-variance Gaussians the true ratio is exp(1.5 x - 1.125): 1 at x = 0.75.
    assert np.exp(np.mean(np.log(weights[np.abs(source[:, 0] - 0.75) < 0.1]))) == (
        pytest.approx(1.0, abs=0.35)
    )


def test_dev_risk_matches_the_reference_get_dev_risk():
    rng = np.random.default_rng(3)
    weights = rng.lognormal(sigma=0.7, size=50)
    errors = rng.exponential(size=50)
    expected = get_dev_risk(weights[:, None], errors[:, None])
    assert validators.dev_risk(weights, errors) == pytest.approx(expected, rel=1e-12)
    # With the 0/1 error of the reference's docstring too.
    zero_one = (rng.random(50) < 0.3).astype(float)
    assert validators.dev_risk(weights, zero_one) == pytest.approx(
        get_dev_risk(weights[:, None], zero_one[:, None]), rel=1e-12
    )


def test_dev_is_minus_reference_risk_of_its_weights():
    rng = np.random.default_rng(4)
    features, logits, labels = _source_split(rng, 60)
    target = rng.normal(loc=0.5, size=(40, features.shape[1]))
    weights = validators.importance_weights(features, target, seed=7)
    assert np.std(weights) > 0.05  # The shift is visible, so the control variate acts.
    losses = validators.cross_entropies(logits, labels)
    expected = -get_dev_risk(weights[:, None], losses[:, None])
    dev = validators.deep_embedded_validation(features, logits, labels, target, seed=7)
    assert dev == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------- score_all ----


def test_score_all_has_every_name_and_each_validators_value():
    rng = np.random.default_rng(5)
    features, logits, labels = _source_split(rng, 30)
    target_features = rng.normal(size=(25, features.shape[1]))
    target_logits = rng.normal(size=(25, logits.shape[1]))
    scores = validators.score_all(features, logits, labels, target_features, target_logits)
    assert (
        tuple(scores)
        == validators.NAMES
        == (
            "source_accuracy",
            "entropy",
            "im",
            "snd",
            "bnm",
            "dev",
        )
    )
    assert all(isinstance(value, float) for value in scores.values())
    assert scores["source_accuracy"] == validators.source_accuracy(logits, labels)
    assert scores["snd"] == validators.soft_neighborhood_density(target_logits)
    assert scores["dev"] == validators.deep_embedded_validation(
        features, logits, labels, target_features
    )


def test_non_finite_logits_or_features_give_nan_scores():
    rng = np.random.default_rng(6)
    features, logits, labels = _source_split(rng, 10)
    broken = np.full((10, 3), np.nan)
    assert math.isnan(validators.batch_nuclear_norm(broken))
    assert math.isnan(validators.entropy(broken))
    assert math.isnan(
        validators.deep_embedded_validation(features, logits, labels, np.full((8, 5), np.inf))
    )


# ------------------------------------------------------------- bad input ----


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: validators.entropy(np.zeros((0, 3))), r"target_logits: expected at least 1"),
        (lambda: validators.entropy(np.zeros(3)), r"target_logits: expected a 2-D"),
        (
            lambda: validators.soft_neighborhood_density(np.zeros((1, 3))),
            r"target_logits: expected at least 2 row",
        ),
        (
            lambda: validators.soft_neighborhood_density(np.zeros((4, 3)), temperature=0),
            r"temperature: expected a positive number",
        ),
        (
            lambda: validators.source_accuracy(np.zeros((4, 3)), np.zeros(5, int)),
            r"source_labels: expected shape \(4,\)",
        ),
        (
            lambda: validators.source_accuracy(np.zeros((4, 3)), np.array([0, 1, 2, 3])),
            r"source_labels: expected classes in \[0, 3\)",
        ),
        (
            lambda: validators.source_accuracy(np.zeros((2, 3)), np.array([0.0, 1.0])),
            r"source_labels: expected integer class indices",
        ),
        (
            lambda: validators.importance_weights(np.zeros((4, 3)), np.zeros((4, 2))),
            r"source_features has 3 columns but target_features has 2",
        ),
        (
            lambda: validators.deep_embedded_validation(
                np.zeros((4, 2)), np.zeros((5, 3)), np.zeros(5, int), np.zeros((4, 2))
            ),
            r"source_features has 4 rows but source_logits has 5",
        ),
        (
            lambda: validators.dev_risk([1.0, 2.0], [1.0]),
            r"losses: expected shape \(2,\)",
        ),
        (
            lambda: validators.score_all(
                np.zeros((4, 2)),
                np.zeros((4, 3)),
                np.zeros(4, int),
                np.zeros((4, 2)),
                np.zeros((4, 5)),
            ),
            r"source_logits has 3 classes but target_logits has 5",
        ),
        (
            lambda: validators.score_all(
                np.zeros((4, 2)),
                np.zeros((4, 3)),
                np.zeros(4, int),
                np.zeros((6, 2)),
                np.zeros((4, 3)),
            ),
            r"target_features has 6 rows but target_logits has 4",
        ),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
