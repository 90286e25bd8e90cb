"""Self-training regularisers of the DA base: MCC, entropy minimisation, BSP, AFN.

Each loss is checked against a value worked out by hand and against a numpy transcription of
Transfer-Learning-Library's code (the ``_tllib_*`` functions below, line by line from the files
named in their docstrings, torch calls replaced by numpy ones).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from tljax import validate
from tljax.methods import afn, bsp, da, entropy, mcc

# --- Numpy transcriptions of the reference implementations. ---------------------------------


def _tllib_entropy(predictions):
    """tllib/modules/entropy.py ``entropy(predictions, reduction='none')``."""
    epsilon = 1e-5
    H = -predictions * np.log(predictions + epsilon)
    return H.sum(axis=1)


def _tllib_mcc(logits, temperature):
    """tllib/self_training/mcc.py ``MinimumClassConfusionLoss.forward``."""
    batch_size, num_classes = logits.shape
    predictions = special.softmax(logits / temperature, axis=1)
    entropy_weight = _tllib_entropy(predictions)
    entropy_weight = 1 + np.exp(-entropy_weight)
    entropy_weight = (batch_size * entropy_weight / np.sum(entropy_weight))[:, None]
    class_confusion_matrix = (predictions * entropy_weight).T @ predictions
    # torch.sum(m, dim=1) is a [C] vector that broadcasts over the last axis, as here.
    class_confusion_matrix = class_confusion_matrix / np.sum(class_confusion_matrix, axis=1)
    return (np.sum(class_confusion_matrix) - np.trace(class_confusion_matrix)) / num_classes


def _tllib_bsp(f_s, f_t):
    """tllib/alignment/bsp.py ``BatchSpectralPenalizationLoss.forward``."""
    s_s = np.linalg.svd(f_s, compute_uv=False)
    s_t = np.linalg.svd(f_t, compute_uv=False)
    return s_s[0] ** 2 + s_t[0] ** 2


def _tllib_safn_and_gradient(f, delta):
    """tllib/normalization/afn.py ``AdaptiveFeatureNorm.forward`` and its autograd gradient.

    ``radius`` is detached, so d/df ((||f|| - radius)^2).mean() = 2 (||f|| - radius) / N *
    f / ||f||.
    """
    norm = np.linalg.norm(f, ord=2, axis=1)
    radius = norm.copy() + delta  # .detach()
    loss = ((norm - radius) ** 2).mean()
    gradient = (2 * (norm - radius) / len(f))[:, None] * f / norm[:, None]
    return loss, gradient


def _afn_hafn(x, radius):
    """jihanyang/AFN vanilla/ImageCLEF/HAFN/code/train.py ``get_L2norm_loss_self_driven``
    without its ``weight_L2norm`` factor (here the term's weight)."""
    return (np.linalg.norm(x, ord=2, axis=1).mean() - radius) ** 2


def _random(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# --- Entropy minimisation. --------------------------------------------------------------------


def test_entropy_by_hand():
    logits = jnp.array([[0.0, 0.0], [200.0, 0.0]])  # Uniform over two classes; certain.
    np.testing.assert_allclose(entropy.prediction_entropy(logits), [np.log(2), 0.0], atol=1e-7)
    np.testing.assert_allclose(
        entropy.prediction_entropy(jnp.zeros((3, 10))), np.full(3, np.log(10)), rtol=1e-6
    )


def test_entropy_is_zero_for_one_hot_predictions_with_a_finite_gradient():
    one_hot_logits = 1000.0 * jnp.eye(4)  # softmax underflows to exact 0 off the diagonal.
    values, gradient = jax.value_and_grad(lambda x: entropy.prediction_entropy(x).mean())(
        one_hot_logits
    )
    assert values == 0.0
    assert np.isfinite(gradient).all()


def test_entropy_matches_tllib():
    logits = _random((16, 10), scale=3.0)
    ours = entropy.prediction_entropy(logits)
    # TLlib's 1e-5 inside the log moves each entropy by at most C * 1e-5.
    np.testing.assert_allclose(ours, _tllib_entropy(special.softmax(logits, axis=1)), atol=1e-4)


# --- MCC. -------------------------------------------------------------------------------------


def test_mcc_by_hand_with_equal_weights():
    """p = (3/4, 1/4) and (1/4, 3/4): equal entropies, so equal weights, and
    M = [[10, 6], [6, 10]] / 16 already has unit columns: (2 - 20/16) / 2 = 3/8."""
    temperature = 2.5
    logits = temperature * np.log(np.array([[0.75, 0.25], [0.25, 0.75]], np.float32))
    np.testing.assert_allclose(mcc.minimum_class_confusion(logits, temperature), 3 / 8, rtol=1e-6)


def test_mcc_by_hand_with_entropy_weights():
    """p = (1, 0) (H = 0, weight 2) and (1/2, 1/2) (H = log 2, weight 3/2): normalised weights
    8/7 and 6/7, M = [[9.5, 1.5], [1.5, 1.5]] / 7, columns summing to 11/7 and 3/7, so
    trace = 9.5/11 + 1/2 and the loss is (2 - trace) / 2 = 7/22."""
    logits = np.array([[500.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(mcc.minimum_class_confusion(logits, 1.0), 7 / 22, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mcc_matches_tllib(temperature):
    logits = _random((12, 5), scale=2.0)
    ours = mcc.minimum_class_confusion(logits, temperature)
    np.testing.assert_allclose(ours, _tllib_mcc(logits.astype(np.float64), temperature), rtol=1e-4)


def test_mcc_is_lower_for_confident_distinct_classes_than_for_confused_ones():
    """Identical rows p make every normalised column p, so the trace is 1 and the loss
    (C - 1) / C, the maximum; one confident class per example gives nearly 0."""
    confident = 20.0 * np.tile(np.eye(4, dtype=np.float32), (3, 1))  # Each class predicted.
    confused = np.tile(np.array([[4.0, 4.0, 0.0, 0.0]], np.float32), (12, 1))  # Classes 0, 1 mixed.
    confident_loss = mcc.minimum_class_confusion(confident, 2.5)
    confused_loss = mcc.minimum_class_confusion(confused, 2.5)
    assert confident_loss < 0.01
    np.testing.assert_allclose(confused_loss, 3 / 4, rtol=1e-6)
    gradient = jax.grad(lambda x: mcc.minimum_class_confusion(x, 2.5))(confident)
    assert np.isfinite(gradient).all()


# --- BSP. -------------------------------------------------------------------------------------


def test_bsp_by_hand():
    """sigma_1 of diag(3, 1) (padded with a zero row) is 3; of the all-ones 2x2 matrix, 2."""
    source = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
    target = np.ones((2, 2), np.float32)
    np.testing.assert_allclose(bsp.batch_spectral_penalization(source, target), 9 + 4, rtol=1e-6)
    np.testing.assert_allclose(bsp.top_singular_energy(source, k=2), 9 + 1, rtol=1e-6)


def test_bsp_is_the_largest_singular_value_squared_and_matches_tllib():
    source, target = _random((16, 24), seed=1), _random((12, 24), seed=2)
    ours = bsp.batch_spectral_penalization(source, target)
    spectral_norms = np.linalg.norm(source, 2) ** 2 + np.linalg.norm(target, 2) ** 2
    np.testing.assert_allclose(ours, spectral_norms, rtol=1e-5)
    np.testing.assert_allclose(ours, _tllib_bsp(source, target), rtol=1e-5)


@pytest.mark.parametrize(
    "features",
    [np.eye(4, dtype=np.float32), np.zeros((4, 3), np.float32)],
    ids=["repeated_singular_values", "zeros"],
)
def test_bsp_gradient_is_finite_at_degenerate_spectra(features):
    assert np.isfinite(jax.grad(bsp.top_singular_energy)(features)).all()


def test_bsp_gradient_is_along_the_top_singular_direction():
    """d sigma_1^2 / dF = 2 sigma_1 u_1 v_1^T when sigma_1 is simple."""
    features = _random((8, 6), seed=3)
    gradient = jax.grad(bsp.top_singular_energy)(features)
    u, s, vt = np.linalg.svd(features)
    np.testing.assert_allclose(gradient, 2 * s[0] * np.outer(u[:, 0], vt[0]), atol=1e-4)


# --- AFN. -------------------------------------------------------------------------------------


def test_safn_value_is_delta_squared_per_domain_and_matches_tllib():
    source, target = _random((6, 5), seed=4), _random((4, 5), seed=5)
    delta = 0.3
    ours, (source_grad, target_grad) = jax.value_and_grad(
        lambda s, t: afn.adaptive_feature_norm(s, t, mode="stepwise", delta=delta), argnums=(0, 1)
    )(source, target)
    np.testing.assert_allclose(ours, 2 * delta**2, rtol=1e-5)
    tllib_source, tllib_source_grad = _tllib_safn_and_gradient(source, delta)
    tllib_target, tllib_target_grad = _tllib_safn_and_gradient(target, delta)
    np.testing.assert_allclose(ours, tllib_source + tllib_target, rtol=1e-5)
    np.testing.assert_allclose(source_grad, tllib_source_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(target_grad, tllib_target_grad, rtol=1e-5, atol=1e-7)


def test_safn_gradient_pushes_every_norm_up_by_delta():
    """The gradient is -2 delta / N * f / ||f||: a descent step of N / 2 adds delta to each
    norm and keeps each direction."""
    features = _random((8, 5), seed=6)
    delta = 1.0
    gradient = jax.grad(lambda f: afn.stepwise_feature_norm(f, delta))(features)
    stepped = features - len(features) / 2 * gradient
    norms = np.linalg.norm(features, axis=1)
    np.testing.assert_allclose(np.linalg.norm(stepped, axis=1), norms + delta, rtol=1e-5)
    np.testing.assert_allclose(
        stepped / np.linalg.norm(stepped, axis=1, keepdims=True),
        features / norms[:, None],
        atol=1e-6,
    )


def test_hafn_by_hand_and_against_the_authors_code():
    """Source norms 5 and 5 (mean 5), target norm 10: (5 - 25)^2 + (10 - 25)^2 = 625."""
    source = np.array([[3.0, 4.0], [0.0, 5.0]], np.float32)
    target = np.array([[6.0, 8.0]], np.float32)
    ours = afn.adaptive_feature_norm(source, target, mode="hard", radius=25.0)
    np.testing.assert_allclose(ours, 625.0, rtol=1e-6)
    source, target = _random((6, 5), seed=7), _random((4, 5), seed=8)
    ours = afn.adaptive_feature_norm(source, target, mode="hard", radius=25.0)
    np.testing.assert_allclose(ours, _afn_hafn(source, 25.0) + _afn_hafn(target, 25.0), rtol=1e-5)


@pytest.mark.parametrize("mode", afn.MODES)
def test_afn_gradient_is_finite_for_an_all_zero_feature_row(mode):
    """A ReLU can zero a whole feature row; its norm's gradient must not be NaN."""
    features = _random((4, 5), seed=9)
    features[1] = 0.0
    gradient = jax.grad(lambda f: afn.adaptive_feature_norm(f, f, mode=mode))(features)
    assert np.isfinite(gradient).all()
    np.testing.assert_array_equal(gradient[1], 0.0)


def test_afn_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode 'soft'"):
        afn.adaptive_feature_norm(np.ones((2, 2)), np.ones((2, 2)), mode="soft")


# --- Config and the DA base. ------------------------------------------------------------------


def test_every_term_has_its_defaults_in_the_da_config(tiny_da_config):
    assert tiny_da_config.mcc.temperature == 2.5
    assert tiny_da_config.bsp.top_k == 1
    assert dict(tiny_da_config.afn) == {"mode": "stepwise", "delta": 1.0, "radius": 25.0}
    assert dict(tiny_da_config.entropy) == {}
    assert {"mcc", "entropy", "bsp", "afn"} <= set(da.term_modules())


@pytest.mark.parametrize(
    "block, field, value",
    [("mcc", "temperature", 0.0), ("bsp", "top_k", 0), ("afn", "mode", "soft")],
)
def test_bad_settings_fail_when_the_term_is_built(tiny_da_config, block, field, value):
    tiny_da_config[block][field] = value
    tiny_da_config.da.terms = f"{block}:1"
    with pytest.raises(validate.ConfigError, match=f"{block}.{field}="):
        da.build(tiny_da_config)


def _batch(size: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "source_image": rng.integers(0, 255, (size, 28, 28, 3), dtype=np.uint8),
        "source_label": rng.integers(0, 10, (size,)).astype(np.int32),
        "target_image": rng.integers(0, 255, (size, 28, 28, 3), dtype=np.uint8),
    }


def test_the_weighted_terms_add_to_the_source_loss_and_give_finite_gradients(tiny_da_config):
    weights = {"mcc": 1.0, "entropy": 0.1, "bsp": 1e-4, "afn": 0.05}
    tiny_da_config.da.terms = ",".join(f"{name}:{w}" for name, w in weights.items())
    tiny_da_config.afn.delta = 0.3
    method = da.build(tiny_da_config)
    params = method.init_params(jax.random.key(0))
    grad_fn = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True), static_argnums=3)
    (loss, metrics), grads = grad_fn(params, _batch(), None, 2)
    term_losses = {name: metrics[f"{name}_loss"] for name in weights}
    expected = metrics["class_loss"] + sum(weights[n] * term_losses[n] for n in weights)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(term_losses["afn"], 2 * 0.3**2, rtol=1e-4)
    assert 0 <= term_losses["mcc"] <= 0.9 and 0 <= term_losses["entropy"] <= np.log(10)
    assert term_losses["bsp"] > 0
    assert metrics["target_feature_norm"] > 0
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))
