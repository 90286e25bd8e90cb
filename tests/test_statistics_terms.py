"""Statistics-matching terms: DAN (MK-MMD), JAN (JMMD), Deep CORAL.

Each loss is checked against a value worked out by hand on a tiny batch and against a numpy
transcription of Transfer-Learning-Library (commit c4aa59e): ``tllib/modules/kernels.py``
(GaussianKernel), ``tllib/alignment/dan.py`` (MultipleKernelMaximumMeanDiscrepancy,
_update_index_matrix), ``tllib/alignment/jan.py`` (JointMultipleKernelMaximumMeanDiscrepancy)
and ``tllib/alignment/coral.py`` (CorrelationAlignmentLoss).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import da as da_config
from tljax import models
from tljax.methods import adaptation, coral, da, dan, image_model_fns, jan

ALPHAS = dan.DEFAULTS["kernel_alphas"]


# --- numpy transcription of TLlib -------------------------------------------------------------


def tllib_gaussian_kernel(X, alpha=1.0, sigma=None):
    """GaussianKernel.forward; track_running_stats unless a fixed sigma is given."""
    l2_distance_square = ((X[None, :, :] - X[:, None, :]) ** 2).sum(2)
    sigma_square = alpha * np.mean(l2_distance_square) if sigma is None else sigma * sigma
    return np.exp(-l2_distance_square / (2 * sigma_square))


def tllib_index_matrix(batch_size, linear):
    """_update_index_matrix, loops as written there."""
    index_matrix = np.zeros((2 * batch_size, 2 * batch_size))
    if linear:
        for i in range(batch_size):
            s1, s2 = i, (i + 1) % batch_size
            t1, t2 = s1 + batch_size, s2 + batch_size
            index_matrix[s1, s2] = 1.0 / float(batch_size)
            index_matrix[t1, t2] = 1.0 / float(batch_size)
            index_matrix[s1, t2] = -1.0 / float(batch_size)
            index_matrix[s2, t1] = -1.0 / float(batch_size)
    else:
        for i in range(batch_size):
            for j in range(batch_size):
                if i != j:
                    index_matrix[i][j] = 1.0 / float(batch_size * (batch_size - 1))
                    index_matrix[i + batch_size][j + batch_size] = 1.0 / float(
                        batch_size * (batch_size - 1)
                    )
        for i in range(batch_size):
            for j in range(batch_size):
                index_matrix[i][j + batch_size] = -1.0 / float(batch_size * batch_size)
                index_matrix[i + batch_size][j] = -1.0 / float(batch_size * batch_size)
    return index_matrix


def tllib_mkmmd(z_s, z_t, alphas, linear):
    """MultipleKernelMaximumMeanDiscrepancy.forward."""
    features = np.concatenate([z_s, z_t], axis=0)
    batch_size = int(z_s.shape[0])
    index_matrix = tllib_index_matrix(batch_size, linear)
    kernel_matrix = sum([tllib_gaussian_kernel(features, alpha) for alpha in alphas])
    return (kernel_matrix * index_matrix).sum() + 2.0 / float(batch_size - 1)


def tllib_softmax(logits):
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def tllib_jmmd(z_s, z_t, kernels, linear):
    """JointMultipleKernelMaximumMeanDiscrepancy.forward without thetas.

    kernels: per layer, a list of (alpha, sigma) as GaussianKernel's arguments.
    """
    batch_size = int(z_s[0].shape[0])
    index_matrix = tllib_index_matrix(batch_size, linear)
    kernel_matrix = np.ones_like(index_matrix)
    for layer_z_s, layer_z_t, layer_kernels in zip(z_s, z_t, kernels, strict=True):
        layer_features = np.concatenate([layer_z_s, layer_z_t], axis=0)
        kernel_matrix *= sum(
            [tllib_gaussian_kernel(layer_features, alpha, sigma) for alpha, sigma in layer_kernels]
        )
    return (kernel_matrix * index_matrix).sum() + 2.0 / float(batch_size - 1)


def tllib_coral(f_s, f_t):
    """CorrelationAlignmentLoss.forward."""
    mean_s = f_s.mean(0, keepdims=True)
    mean_t = f_t.mean(0, keepdims=True)
    cent_s = f_s - mean_s
    cent_t = f_t - mean_t
    cov_s = cent_s.T @ cent_s / (len(f_s) - 1)
    cov_t = cent_t.T @ cent_t / (len(f_t) - 1)
    mean_diff = ((mean_s - mean_t) ** 2).mean()
    cov_diff = ((cov_s - cov_t) ** 2).mean()
    return mean_diff + cov_diff


def _normal(seed, shape, shift=0.0):
    return np.random.default_rng(seed).normal(size=shape) + shift


# --- DAN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_index_matrix_matches_tllib(batch_size, linear):
    np.testing.assert_allclose(
        dan.index_matrix(batch_size, linear), tllib_index_matrix(batch_size, linear), rtol=1e-6
    )


def test_index_matrix_needs_two_examples_per_domain():
    with pytest.raises(ValueError, match="at least 2 examples"):
        dan.index_matrix(1, linear=False)


# Source features 0, 1 and target features 0, 2 (1-d): the squared distances over (0, 1, 0, 2)
# sum to 22, so with alpha = 1 sigma^2 = 22 / 16 and k(d) = exp(-d / 2.75) = exp(-4 d / 11).
TINY_SOURCE = np.array([[0.0], [1.0]])
TINY_TARGET = np.array([[0.0], [2.0]])


@pytest.mark.parametrize(
    "linear, expected",
    [
        # Within: k(0,1) + k(0,2 of target) = e^{-4/11} + e^{-16/11} (weights 1/2 on both
        # orders); across: -(1/2)(k(0,0) + k(0,2) + k(1,0) + k(1,2)); plus 2 / (n - 1) = 2.
        (False, 1.5 + 0.5 * math.exp(-16 / 11)),
        # Pairs (s0,s1), (s1,s0), (t0,t1), (t1,t0) at +1/2; (s0,t1), (s1,t0) at -1/2.
        (True, 2.0 + 0.5 * (math.exp(-4 / 11) + math.exp(-16 / 11))),
    ],
    ids=["quadratic", "linear"],
)
def test_mk_mmd_by_hand(linear, expected):
    value = dan.mk_mmd(jnp.asarray(TINY_SOURCE), jnp.asarray(TINY_TARGET), (1.0,), linear)
    np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize("linear", [False, True])
def test_mk_mmd_matches_tllib(linear):
    source, target = _normal(0, (6, 5)), _normal(1, (6, 5), shift=0.5)
    value = dan.mk_mmd(jnp.asarray(source), jnp.asarray(target), ALPHAS, linear)
    np.testing.assert_allclose(value, tllib_mkmmd(source, target, ALPHAS, linear), rtol=1e-5)


def test_mk_mmd_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    n = 100
    source = _normal(0, (n, 4))
    offset = 2.0 / (n - 1)  # TLlib's constant.
    # The linear estimate pairs up (s_i, s_i+1) against (s_i, t_i+1): equal batches cancel.
    same = dan.mk_mmd(jnp.asarray(source), jnp.asarray(source), ALPHAS, linear=True)
    np.testing.assert_allclose(same, offset, rtol=1e-5)

    def quadratic(target):
        return float(dan.mk_mmd(jnp.asarray(source), jnp.asarray(target), ALPHAS) - offset)

    # The quadratic estimate's cross term keeps the pairs (s_i, t_i), which the within-domain
    # means leave out: equal batches read between -2 * (number of kernels) / n and 0.
    assert -2 * len(ALPHAS) / n <= quadratic(source) <= 0.0
    independent = quadratic(_normal(1, (n, 4)))
    shifted = quadratic(_normal(1, (n, 4), shift=1.0))
    assert abs(independent) < 0.05
    assert shifted > 10 * abs(independent) and shifted > 0.3


def test_mk_mmd_bandwidth_carries_no_gradient():
    """TLlib detaches sigma^2: the gradient is that of kernels with the bandwidth held fixed."""
    source, target = jnp.asarray(_normal(0, (4, 3))), jnp.asarray(_normal(1, (4, 3), shift=1.0))
    both = jnp.concatenate([source, target])
    mean_distance = float(jnp.mean(jnp.sum((both[:, None] - both[None]) ** 2, -1)))

    def fixed_bandwidth(source):
        kernel = sum(
            dan.gaussian_kernel(jnp.concatenate([source, target]), math.sqrt(alpha * mean_distance))
            for alpha in ALPHAS
        )
        return dan.kernel_discrepancy(kernel, linear=False)

    grad = jax.grad(lambda s: dan.mk_mmd(s, target, ALPHAS))(source)
    np.testing.assert_allclose(grad, jax.grad(fixed_bandwidth)(source), rtol=1e-4, atol=1e-6)


def test_mmd_terms_need_batches_of_one_shape():
    with pytest.raises(ValueError, match="of one shape"):
        dan.mk_mmd(jnp.zeros((4, 3)), jnp.zeros((5, 3)), ALPHAS)


# --- JAN ---------------------------------------------------------------------------------------


def test_jmmd_by_hand():
    # DAN's tiny features, alpha = 1; all predictions (1/2, 1/2) but the second target's,
    # softmax(log 4, 0) = (4/5, 1/5): at squared distance 0.18 from the others.
    source_logits = np.zeros((2, 2))
    target_logits = np.array([[0.0, 0.0], [math.log(4.0), 0.0]])
    b = math.exp(-0.18 / (2 * 0.92**2))
    # Joint kernel = feature kernel x b on pairs with the second target; as DAN's by-hand sum.
    expected = 1.5 + 0.5 * math.exp(-4 / 11) * (1 - b) + 0.5 * math.exp(-16 / 11) * b
    value = jan.jmmd(
        (jnp.asarray(TINY_SOURCE), jax.nn.softmax(jnp.asarray(source_logits))),
        (jnp.asarray(TINY_TARGET), jax.nn.softmax(jnp.asarray(target_logits))),
        (1.0,),
        prediction_sigma=0.92,
    )
    np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize("linear", [False, True])
def test_jmmd_matches_tllib(linear):
    source, target = _normal(0, (6, 5)), _normal(1, (6, 5), shift=0.5)
    source_logits, target_logits = _normal(2, (6, 3)), _normal(3, (6, 3))
    reference = tllib_jmmd(
        (source, tllib_softmax(source_logits)),
        (target, tllib_softmax(target_logits)),
        ([(alpha, None) for alpha in ALPHAS], [(1.0, 0.92)]),
        linear,
    )
    value = jan.jmmd(
        (jnp.asarray(source), jax.nn.softmax(jnp.asarray(source_logits))),
        (jnp.asarray(target), jax.nn.softmax(jnp.asarray(target_logits))),
        ALPHAS,
        0.92,
        linear,
    )
    np.testing.assert_allclose(value, reference, rtol=1e-5)


def test_jmmd_with_equal_predictions_is_dans_mmd():
    source, target = jnp.asarray(_normal(0, (8, 5))), jnp.asarray(_normal(1, (8, 5), shift=0.5))
    same = jnp.full((8, 3), 1 / 3)
    dan_value = dan.mk_mmd(source, target, ALPHAS)
    np.testing.assert_allclose(
        jan.jmmd((source, same), (target, same), ALPHAS, 0.92), dan_value, rtol=1e-6
    )
    # Predictions that differ lower every cross-example kernel value: the value moves.
    varied = jax.nn.softmax(jnp.asarray(_normal(2, (8, 3)) * 3))
    assert not np.isclose(jan.jmmd((source, varied), (target, same), ALPHAS, 0.92), dan_value)


# --- CORAL -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, target, expected",
    [
        # d = 1: means 1 and 0, variances 2 and 0 -> 1 + 4.
        ([[0.0], [2.0]], [[0.0], [0.0]], 5.0),
        # d = 2: mean difference (1, 0) -> 1/2; covariance difference [[2, 0], [0, 0]] -> 4/4.
        ([[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], 1.5),
    ],
    ids=["1d", "2d"],
)
def test_coral_by_hand(source, target, expected):
    value, _, _ = coral.correlation_alignment(jnp.asarray(source), jnp.asarray(target))
    np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_coral_matches_tllib_and_splits_into_its_two_parts():
    source, target = _normal(0, (7, 4)), _normal(1, (9, 4), shift=0.3) * 2
    value, mean_part, covariance_part = coral.correlation_alignment(
        jnp.asarray(source), jnp.asarray(target)
    )
    np.testing.assert_allclose(value, tllib_coral(source, target), rtol=1e-5)
    np.testing.assert_allclose(mean_part, ((source.mean(0) - target.mean(0)) ** 2).mean(), 1e-5)
    covariance_gap = np.cov(source, rowvar=False) - np.cov(target, rowvar=False)
    np.testing.assert_allclose(covariance_part, (covariance_gap**2).mean(), rtol=1e-5)


def test_coral_is_zero_for_equal_statistics_and_sees_a_mean_shift():
    source = _normal(0, (10, 4))
    shuffled = source[np.random.default_rng(1).permutation(10)]  # Same mean and covariance.
    value, _, _ = coral.correlation_alignment(jnp.asarray(source), jnp.asarray(shuffled))
    np.testing.assert_allclose(value, 0.0, atol=1e-6)
    # A shift leaves the covariance as it was: the mean part alone reads shift^2.
    value, _, covariance_part = coral.correlation_alignment(
        jnp.asarray(source), jnp.asarray(source + 0.5)
    )
    np.testing.assert_allclose(covariance_part, 0.0, atol=1e-6)
    np.testing.assert_allclose(value, 0.25, rtol=1e-5)


# --- through the domain-adaptation base -------------------------------------------------------


def _reference_value(name, outputs):
    source, target = np.asarray(outputs.source_features), np.asarray(outputs.target_features)
    if name == "dan":
        return "mkmmd", tllib_mkmmd(source, target, ALPHAS, linear=False)
    if name == "jan":
        return "jmmd", tllib_jmmd(
            (source, tllib_softmax(np.asarray(outputs.source_logits))),
            (target, tllib_softmax(np.asarray(outputs.target_logits))),
            ([(alpha, None) for alpha in ALPHAS], [(1.0, 0.92)]),
            linear=False,
        )
    return "coral", tllib_coral(source, target)


@pytest.mark.parametrize("name", ["dan", "jan", "coral"])
def test_terms_read_their_config_and_score_the_outputs(name):
    rng = np.random.default_rng(0)
    outputs = adaptation.Outputs(
        source_features=jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
        source_logits=jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
        source_labels=jnp.zeros(8, jnp.int32),
        target_features=jnp.asarray(rng.normal(size=(8, 6)) + 0.5, jnp.float32),
        target_logits=jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
        progress=jnp.asarray(0.5),
        rng=None,
    )
    term = da.term_modules()[name].term(da_config.get_config(f"method={name}"))
    loss, metrics = term.loss(outputs)
    metric, reference = _reference_value(name, outputs)
    np.testing.assert_allclose(loss, reference, rtol=1e-5)
    assert metrics[metric] == loss
    assert term.discriminator_input is None and not term.auxiliary_classifier


def test_dan_settings_come_from_its_config_block():
    config = da_config.get_config("method=dan")
    config.dan.kernel_alphas = (1.0,)
    config.dan.linear = True
    outputs = adaptation.Outputs(
        jnp.asarray(TINY_SOURCE), None, None, jnp.asarray(TINY_TARGET), None, 0.0, None
    )
    loss, _ = dan.term(config).loss(outputs)
    np.testing.assert_allclose(loss, 2.0 + 0.5 * (math.exp(-4 / 11) + math.exp(-16 / 11)), 1e-6)


def test_the_three_terms_compose_in_the_da_loss(tiny_da_config):
    tiny_da_config.da.terms = "dan:0.5,jan:0.25,coral:2"
    method = da.build(tiny_da_config)
    params = method.init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "source_image": rng.integers(0, 255, (8, 28, 28, 3), dtype=np.uint8),
        "source_label": rng.integers(0, 10, (8,)).astype(np.int32),
        "target_image": rng.integers(0, 255, (8, 28, 28, 3), dtype=np.uint8),
    }
    loss, metrics = method.loss_fn(params, batch, None, 2)
    expected = (
        metrics["class_loss"]
        + 0.5 * metrics["mkmmd"]
        + 0.25 * metrics["jmmd"]
        + 2 * metrics["coral"]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)

    net = models.make_classifier(tiny_da_config.model)
    preprocess, _ = image_model_fns(net, tiny_da_config.model)
    features = lambda images: np.asarray(
        net.apply({"params": params}, preprocess(images), method="features"), np.float64
    )
    source, target = features(batch["source_image"]), features(batch["target_image"])
    np.testing.assert_allclose(
        metrics["mkmmd"], tllib_mkmmd(source, target, ALPHAS, linear=False), rtol=1e-4
    )
    np.testing.assert_allclose(metrics["coral"], tllib_coral(source, target), rtol=1e-4)


def test_identical_features_give_a_finite_discrepancy_and_gradient():
    """Dead ReLUs make every feature equal: the batch's bandwidth is 0 (TLlib's loss is NaN)."""
    zeros = jnp.zeros((4, 3))
    value, grad = jax.value_and_grad(lambda s: dan.mk_mmd(s, zeros, ALPHAS))(zeros)
    assert np.isfinite(value) and np.isfinite(grad).all()
