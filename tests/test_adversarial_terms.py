"""The adversarial terms: CDAN / CDAN+E, MDD, MCD.

Each loss is checked against a value computed by hand on a tiny batch and against a numpy
transcription of Transfer-Learning-Library (``tllib/alignment/cdan.py``, ``mdd.py``,
``mcd.py``, ``tllib/modules/entropy.py``, ``tllib/modules/grl.py`` and
``examples/domain_adaptation/image_classification/mcd.py``); the gradient tests use linear
heads so each gradient has a closed form to compare with.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tljax import validate
from tljax.methods import adaptation, cdan, da, dann, mcd, mdd

# --- numpy transcriptions of TLlib (torch ops spelled in numpy) -------------------------------


def _softmax(logits):
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def _tllib_entropy(predictions):
    """tllib.modules.entropy.entropy, reduction='none'."""
    return -(predictions * np.log(predictions + 1e-5)).sum(1)


def _tllib_multilinear_map(f, g):
    """MultiLinearMap.forward: torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).view(N, -1)."""
    return np.matmul(g[:, :, None], f[:, None, :]).reshape(len(f), -1)


def _tllib_randomized_map(f, g, rf, rg):
    """RandomizedMultiLinearMap.forward with the given Rf, Rg."""
    return (f @ rf) * (g @ rg) / np.sqrt(float(rf.shape[1]))


def _tllib_cdan_loss(g_s, f_s, g_t, f_t, discriminator, entropy_conditioning, linear_map):
    """ConditionalDomainAdversarialLoss.forward (sigmoid=True, reduction='mean').

    TLlib's discriminator outputs P(source); ours outputs a target logit z, so d = sigmoid(-z).
    """
    f = np.concatenate([f_s, f_t])
    g = _softmax(np.concatenate([g_s, g_t]))
    d = 1 / (1 + np.exp(discriminator(linear_map(f, g))))
    weight = 1.0 + np.exp(-_tllib_entropy(g))
    weight = weight / weight.sum() * len(f)
    d_label = np.concatenate([np.ones(len(g_s)), np.zeros(len(g_t))])
    bce = -(d_label * np.log(d) + (1 - d_label) * np.log(1 - d))
    if entropy_conditioning:
        bce = weight * bce
    return bce.mean()


def _tllib_warm_start(iter_num, alpha=1.0, lo=0.0, hi=0.1, max_iters=1000):
    """WarmStartGradientReverseLayer's coefficient (MDD's GeneralModule settings)."""
    return float(2.0 * (hi - lo) / (1.0 + np.exp(-alpha * iter_num / max_iters)) - (hi - lo) + lo)


def _tllib_mdd_transfer_loss(y_s, y_s_adv, y_t, y_t_adv, margin=4.0):
    """-ClassificationMarginDisparityDiscrepancy(margin)(y_s, y_s_adv, y_t, y_t_adv)."""
    prediction_s, prediction_t = y_s.argmax(1), y_t.argmax(1)
    log_adv_s = np.log(_softmax(y_s_adv))
    cross_entropy = -log_adv_s[np.arange(len(y_s)), prediction_s]
    source_loss = -margin * cross_entropy
    shift_log = np.log(np.minimum(1.0 - _softmax(y_t_adv) + 1e-6, 1.0))
    nll_loss = -shift_log[np.arange(len(y_t)), prediction_t]
    target_loss = -nll_loss
    return -(source_loss + target_loss).mean()


def _tllib_classifier_discrepancy(p1, p2):
    return np.mean(np.abs(p1 - p2))


def _tllib_mcd_entropy(predictions):
    return -np.mean(np.log(np.mean(predictions, 0) + 1e-6))


def _tllib_mcd_step_b_loss(y1_s, y2_s, labels, y1_t, y2_t, trade_off, trade_off_entropy):
    """The classifiers' loss of MCD's step B (examples/.../mcd.py)."""
    cross_entropy = lambda y: -np.log(_softmax(y))[np.arange(len(y)), labels].mean()
    p1_t, p2_t = _softmax(y1_t), _softmax(y2_t)
    return (
        cross_entropy(y1_s)
        + cross_entropy(y2_s)
        + (_tllib_mcd_entropy(p1_t) + _tllib_mcd_entropy(p2_t)) * trade_off_entropy
        - _tllib_classifier_discrepancy(p1_t, p2_t) * trade_off
    )


# --- helpers ----------------------------------------------------------------------------------


def _config(**blocks) -> ml_collections.ConfigDict:
    """A config with the terms' default blocks; ``blocks`` override fields (or top-level keys)."""
    config = ml_collections.ConfigDict(
        {
            "seed": 0,
            "train": {"steps": 2000},
            "cdan": dict(cdan.DEFAULTS),
            "mdd": dict(mdd.DEFAULTS),
            "mcd": dict(mcd.DEFAULTS),
        }
    )
    for key, value in blocks.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def _outputs(source_features, source_logits, target_features, target_logits, **heads):
    return adaptation.Outputs(
        source_features=source_features,
        source_logits=source_logits,
        source_labels=heads.pop("source_labels", jnp.zeros(len(source_features), jnp.int32)),
        target_features=target_features,
        target_logits=target_logits,
        progress=heads.pop("progress", jnp.float32(0.5)),
        rng=None,
        **heads,
    )


def _normal(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- CDAN -------------------------------------------------------------------------------------


def test_multilinear_map_is_the_class_major_outer_product():
    by_hand = cdan.multilinear_map(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.25, 0.75]]))
    np.testing.assert_allclose(by_hand, [[0.25, 0.5, 0.75, 0.75, 1.5, 2.25]])
    f, g = _normal(0, 4, 5), _softmax(_normal(1, 4, 3))
    np.testing.assert_allclose(cdan.multilinear_map(f, g), _tllib_multilinear_map(f, g), rtol=1e-6)


def test_randomized_map_multiplies_the_projections_over_sqrt_d():
    f, g = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, 0.5]])
    rf, rg = jnp.eye(2), jnp.array([[2.0, 0.0], [0.0, 4.0]])
    # f Rf = [1, 2], g Rg = [1, 2]: [1, 4] / sqrt(2).
    np.testing.assert_allclose(
        cdan.randomized_multilinear_map(f, g, rf, rg), [[1 / np.sqrt(2), 4 / np.sqrt(2)]]
    )
    rf, rg = cdan.random_matrices(6, 3, 16, 0)
    f, g = _normal(0, 4, 6), _softmax(_normal(1, 4, 3))
    np.testing.assert_allclose(
        cdan.randomized_multilinear_map(f, g, rf, rg),
        _tllib_randomized_map(f, g, rf, rg),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "randomized, features_dim, width",
    [
        ("auto", 768, 1024),  # C * D = 7680 > 4096: randomized.
        ("auto", 400, 4000),  # C * D = 4000: the full map.
        ("false", 768, 7680),
        ("True", 400, 1024),
    ],
)
def test_discriminator_input_width(randomized, features_dim, width):
    term = cdan.term(_config(cdan={"randomized": randomized}))
    inputs = term.discriminator_input(_normal(0, 4, features_dim), _normal(1, 4, 10))
    chex.assert_shape(inputs, (4, width))


def test_randomized_reads_auto_and_booleans_spelled_either_way():
    # The config field is a string ('auto'); code that builds settings may pass a bool.
    assert cdan.parse_randomized("auto") is None
    assert cdan.parse_randomized("TRUE") is True and cdan.parse_randomized(True) is True
    assert cdan.parse_randomized("false") is False and cdan.parse_randomized(False) is False


def test_the_random_matrices_are_fixed_for_the_run():
    f, logits = _normal(0, 4, 768), _normal(1, 4, 10)
    first = cdan.term(_config()).discriminator_input
    eager = first(f, logits)
    cdan.random_matrices.cache_clear()
    # A fresh term (as in init and in the step), traced under jit, draws the same matrices.
    traced = jax.jit(cdan.term(_config()).discriminator_input)(f, logits)
    np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-6)
    rf, rg = cdan.random_matrices(768, 10, 1024, 0)
    expected = cdan.randomized_multilinear_map(f, jax.nn.softmax(logits), rf, rg)
    np.testing.assert_allclose(eager, expected, rtol=1e-6)
    other_seed = cdan.term(_config(seed=1)).discriminator_input(f, logits)
    assert not np.allclose(other_seed, eager)


@pytest.mark.parametrize("randomized", ["true", "false"])
def test_predictions_are_detached_and_features_are_not(randomized):
    discriminator_input = cdan.term(_config(cdan={"randomized": randomized})).discriminator_input
    f, logits = _normal(0, 3, 8), _normal(1, 3, 4)
    objective = lambda f, logits: jnp.sum(discriminator_input(f, logits) ** 2)
    grad_features, grad_logits = jax.grad(objective, argnums=(0, 1))(f, logits)
    np.testing.assert_array_equal(grad_logits, 0.0)
    assert np.abs(grad_features).min() > 0


def test_the_built_discriminator_reads_the_randomized_map(tiny_da_config):
    tiny_da_config.da.terms = "cdan:1"
    params = da.build(tiny_da_config).init_params(jax.random.key(0))
    chex.assert_shape(params["domain"]["dense_0"]["kernel"], (1024, 100))


def test_entropy_weights_by_hand_and_against_tllib():
    # Uniform over 2 classes: 1 + exp(-log 2) = 1.5; certain: 1 + exp(0) = 2. Sum 3.5, N = 2.
    weights = cdan.entropy_weights(jnp.array([[0.0, 0.0], [40.0, 0.0]]))
    np.testing.assert_allclose(weights, [2 * 1.5 / 3.5, 2 * 2 / 3.5], rtol=1e-6)
    logits = 3 * _normal(0, 8, 5)
    reference = 1.0 + np.exp(-_tllib_entropy(_softmax(logits)))
    reference = reference / reference.sum() * len(logits)
    np.testing.assert_allclose(cdan.entropy_weights(logits), reference, rtol=1e-4)
    grad = jax.grad(lambda x: jnp.sum(cdan.entropy_weights(x) * jnp.arange(8.0)))(logits)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("entropy", [False, True])
def test_cdan_loss_by_hand(entropy):
    """The discriminator's logit is the feature sum: sum_c,d g_c f_d = sum_d f_d."""
    term = cdan.term(_config(cdan={"entropy": entropy, "randomized": "false"}))
    outputs = _outputs(
        source_features=jnp.array([[0.5, -0.5]]),  # Logit 0: BCE log 2, counted correct.
        source_logits=jnp.array([[0.0, 0.0]]),  # Uniform: raw weight 1.5.
        target_features=jnp.array([[np.log(3.0), 0.0]]),  # Logit ln 3: BCE log(4/3).
        target_logits=jnp.array([[40.0, 0.0]]),  # Certain: raw weight 2.
        discriminate=lambda inputs: inputs.sum(-1),
    )
    loss, metrics = term.loss(outputs)
    weights = [6 / 7, 8 / 7] if entropy else [1.0, 1.0]
    expected = (weights[0] * np.log(2.0) + weights[1] * np.log(4 / 3)) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["domain_accuracy"] == 1.0 and metrics["domain_loss"] == loss


def test_unweighted_cdan_bce_is_dann_s():
    source, target = _normal(0, 5), _normal(1, 7)
    chex.assert_trees_all_close(
        cdan.weighted_domain_loss(source, target), dann.domain_adversarial_loss(source, target)
    )


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("randomized", ["false", "true"])
def test_cdan_loss_matches_tllib(entropy, randomized):
    term = cdan.term(
        _config(cdan={"entropy": entropy, "randomized": randomized, "randomized_dim": 32})
    )
    f_s, f_t = _normal(0, 6, 5), _normal(1, 6, 5)
    g_s, g_t = 2 * _normal(2, 6, 4), 2 * _normal(3, 6, 4)
    w = 0.3 * _normal(4, 32)
    discriminate = lambda inputs: inputs @ w[: inputs.shape[-1]]
    loss, _ = term.loss(_outputs(f_s, g_s, f_t, g_t, discriminate=discriminate))

    if randomized == "true":
        rf, rg = cdan.random_matrices(5, 4, 32, 0)
        linear_map = lambda f, g: _tllib_randomized_map(f, g, rf, rg)
    else:
        linear_map = _tllib_multilinear_map
    reference = _tllib_cdan_loss(g_s, f_s, g_t, f_t, discriminate, entropy, linear_map)
    np.testing.assert_allclose(loss, reference, rtol=1e-4)


@pytest.mark.parametrize("field, value", [("randomized", "maybe"), ("randomized_dim", 0)])
def test_bad_cdan_settings_are_refused(field, value):
    with pytest.raises(validate.ConfigError, match=f"cdan.{field}"):
        cdan.term(_config(cdan={field: value}))


# --- MDD --------------------------------------------------------------------------------------


def test_warm_start_coefficient_follows_tllib():
    np.testing.assert_allclose(mdd.warm_start_coefficient(0.0), 0.0, atol=1e-8)
    np.testing.assert_allclose(
        mdd.warm_start_coefficient(1000.0), 0.2 / (1 + np.exp(-1.0)) - 0.1, rtol=1e-6
    )
    np.testing.assert_allclose(mdd.warm_start_coefficient(1e6), 0.1, rtol=1e-6)
    # float32 cancels digits near step 0 (2 hi / (1 + ~1) - hi): hence atol.
    for step in (1, 250, 3000, 20000):
        np.testing.assert_allclose(
            mdd.warm_start_coefficient(step), _tllib_warm_start(step), rtol=1e-5, atol=1e-8
        )


def test_margin_disparity_loss_by_hand():
    # Source: h_f says class 0, f' is uniform: CE log 2, times the margin 4.
    # Target: h_f says class 1, f' gives it 3/4: -log(1 - 3/4 + 1e-6) ~ log 4.
    loss, source_ce, target_term = mdd.margin_disparity_loss(
        jnp.array([[2.0, 0.0]]),
        jnp.array([[0.0, 0.0]]),
        jnp.array([[0.0, 1.0]]),
        jnp.array([[0.0, np.log(3.0)]]),
        margin=4.0,
    )
    np.testing.assert_allclose(
        [loss, source_ce, target_term],
        [4 * np.log(2) - np.log(0.25 + 1e-6), np.log(2), -np.log(0.25 + 1e-6)],
        rtol=1e-6,
    )


def test_the_shifted_log_bounds_the_target_term():
    adversarial = jnp.array([[0.0, 60.0], [60.0, 0.0]])  # p(h_f) = 1, then p(h_f) = 0.
    _, _, target_term = mdd.margin_disparity_loss(
        jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]] * 2), adversarial, 4.0
    )
    # -log(0 + 1e-6) for the first; log(min(1 + 1e-6, 1)) = 0 for the second.
    np.testing.assert_allclose(target_term, -np.log(1e-6) / 2, rtol=1e-5)


def test_margin_disparity_loss_matches_tllib():
    y_s, y_s_adv, y_t, y_t_adv = (3 * _normal(seed, 8, 5) for seed in range(4))
    loss, _, _ = mdd.margin_disparity_loss(y_s, y_s_adv, y_t, y_t_adv, margin=4.0)
    reference = _tllib_mdd_transfer_loss(y_s, y_s_adv, y_t, y_t_adv, margin=4.0)
    np.testing.assert_allclose(loss, reference, rtol=1e-5)


def test_mdd_trains_the_adversary_directly_and_reverses_into_the_features():
    """Linear adversary W: W descends the loss; features get -strength times its gradient."""
    term = mdd.term(_config())  # train.steps = 2000, progress 0.5: iteration 1000.
    strength = 0.2 / (1 + np.exp(-1.0)) - 0.1
    f_s, f_t, w = _normal(0, 6, 4), _normal(1, 6, 4), _normal(2, 4, 3)
    y_s, y_t = _normal(3, 6, 3), _normal(4, 6, 3)

    def term_loss(w, f_s, f_t, y_s):
        outputs = _outputs(f_s, y_s, f_t, y_t, auxiliary=lambda x: x @ w)
        return term.loss(outputs)

    def plain_loss(w, f_s, f_t):
        return mdd.margin_disparity_loss(y_s, f_s @ w, y_t, f_t @ w, 4.0)[0]

    (value, metrics), grads = jax.value_and_grad(term_loss, argnums=(0, 1, 2, 3), has_aux=True)(
        w, f_s, f_t, y_s
    )
    plain_grads = jax.grad(plain_loss, argnums=(0, 1, 2))(w, f_s, f_t)
    np.testing.assert_allclose(value, plain_loss(w, f_s, f_t), rtol=1e-6)
    np.testing.assert_allclose(metrics["mdd_grl_strength"], strength, rtol=1e-5)
    np.testing.assert_allclose(grads[0], plain_grads[0], rtol=1e-5)
    np.testing.assert_allclose(grads[1], -strength * plain_grads[1], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(grads[2], -strength * plain_grads[2], rtol=1e-4, atol=1e-8)
    np.testing.assert_array_equal(grads[3], 0.0)  # The main head enters only as argmax.


@pytest.mark.parametrize("field", ["margin", "grl_hi", "grl_max_iters"])
def test_bad_mdd_settings_are_refused(field):
    with pytest.raises(validate.ConfigError, match=f"mdd.{field}"):
        mdd.term(_config(mdd={field: 0}))


# --- MCD --------------------------------------------------------------------------------------


def test_discrepancy_and_class_balance_by_hand_and_against_tllib():
    # |1 - 0.5| + |0 - 0.5| over 2 entries.
    np.testing.assert_allclose(
        mcd.classifier_discrepancy(jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.5]])), 0.5
    )
    # The batch's mean prediction is uniform: -log(0.5 + 1e-6).
    np.testing.assert_allclose(
        mcd.class_balance_entropy(jnp.array([[1.0, 0.0], [0.0, 1.0]])), np.log(2), rtol=1e-5
    )
    p1, p2 = _softmax(_normal(0, 8, 5)), _softmax(_normal(1, 8, 5))
    np.testing.assert_allclose(
        mcd.classifier_discrepancy(p1, p2), _tllib_classifier_discrepancy(p1, p2), rtol=1e-6
    )
    np.testing.assert_allclose(mcd.class_balance_entropy(p1), _tllib_mcd_entropy(p1), rtol=1e-6)


def _linear_mcd(term, w1, w2, f_s, f_t, labels):
    outputs = _outputs(
        f_s,
        f_s @ w1,
        f_t,
        f_t @ w1,
        source_labels=labels,
        classify=lambda x: x @ w1,
        auxiliary=lambda x: x @ w2,
    )
    return term.loss(outputs)


def test_mcd_loss_is_tllibs_step_b_loss_with_the_main_cross_entropy():
    """Source CE (the base's) + the term = the classifiers' loss of TLlib's step B."""
    term = mcd.term(_config(mcd={"discrepancy_weight": 0.3, "entropy_weight": 0.03}))
    w1, w2 = _normal(0, 4, 3), _normal(1, 4, 3)
    f_s, f_t = _normal(2, 6, 4), _normal(3, 6, 4)
    labels = np.array([0, 1, 2, 0, 1, 2])
    value, metrics = _linear_mcd(term, w1, w2, f_s, f_t, labels)
    main_ce = -np.log(_softmax(f_s @ w1))[np.arange(6), labels].mean()
    reference = _tllib_mcd_step_b_loss(f_s @ w1, f_s @ w2, labels, f_t @ w1, f_t @ w2, 0.3, 0.03)
    np.testing.assert_allclose(main_ce + value, reference, rtol=1e-5)
    discrepancy = _tllib_classifier_discrepancy(_softmax(f_t @ w1), _softmax(f_t @ w2))
    np.testing.assert_allclose(metrics["mcd_discrepancy"], discrepancy, rtol=1e-5)


def test_mcd_hand_value():
    """Identical classifiers: no discrepancy; one source example, uniform predictions."""
    term = mcd.term(_config(mcd={"entropy_weight": 0.5}))
    zeros = jnp.zeros((2, 2))
    value, metrics = _linear_mcd(
        term, zeros, zeros, jnp.ones((1, 2)), jnp.ones((3, 2)), np.array([1])
    )
    # CE(uniform over 2) = log 2; each balance term -log(1/2 + 1e-6) ~ log 2, two of them.
    np.testing.assert_allclose(value, np.log(2) + 0.5 * 2 * np.log(2), rtol=1e-5)
    assert metrics["mcd_discrepancy"] == 0.0


def test_mcd_classifiers_ascend_the_discrepancy_and_features_descend_it():
    """The discrepancy's share of the gradient: -w grad d for the heads, +w grad d for G."""
    weight = 0.3
    with_d = mcd.term(_config(mcd={"discrepancy_weight": weight, "entropy_weight": 0.0}))
    without_d = mcd.term(_config(mcd={"discrepancy_weight": 0.0, "entropy_weight": 0.0}))
    w1, w2 = _normal(0, 4, 3), _normal(1, 4, 3)
    f_s, f_t = _normal(2, 6, 4), _normal(3, 6, 4)
    labels = np.array([0, 1, 2, 0, 1, 2])

    def grads(term):
        objective = lambda *args: _linear_mcd(term, *args, labels)[0]
        return jax.grad(objective, argnums=(0, 1, 2, 3))(w1, w2, f_s, f_t)

    discrepancy = lambda w1, w2, f_t: mcd.classifier_discrepancy(
        jax.nn.softmax(f_t @ w1), jax.nn.softmax(f_t @ w2)
    )
    d_w1, d_w2, d_f_t = jax.grad(discrepancy, argnums=(0, 1, 2))(w1, w2, f_t)
    share = [a - b for a, b in zip(grads(with_d), grads(without_d), strict=True)]
    np.testing.assert_allclose(share[0], -weight * d_w1, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(share[1], -weight * d_w2, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(share[2], 0.0, atol=1e-7)  # Source features: no discrepancy.
    np.testing.assert_allclose(share[3], weight * d_f_t, rtol=1e-4, atol=1e-7)

    # A gradient step on the term: the classifiers' moves raise d, the features' lower it.
    step = 0.5
    before = discrepancy(w1, w2, f_t)
    assert discrepancy(w1 - step * share[0], w2 - step * share[1], f_t) > before
    assert discrepancy(w1, w2, f_t - step * share[3]) < before


def test_bad_mcd_settings_are_refused():
    with pytest.raises(validate.ConfigError, match="mcd.entropy_weight"):
        mcd.term(_config(mcd={"entropy_weight": -1.0}))
