"""The parameter-tree toolkit, the conservative-training penalties and the data subsets."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tljax import params as ptree
from tljax import regularizers
from tljax.data.subsets import class_subset, per_class_subset
from tljax.models.digits import DigitNet, MLPHead
from tljax.models.domain import WithHeads

FORWARD = [
    "feature/conv_0",
    "feature/conv_1",
    "label/dense_0",
    "label/dense_1",
    "label/dense_2",
    "domain/dense_0",
    "domain/dense_1",
]


def _dann_net(num_classes: int = 10) -> WithHeads:
    return WithHeads(DigitNet(num_classes=num_classes), MLPHead((100, 1)), lambda f, _: f)


def _init(rng):
    return _dann_net().init(rng, jnp.zeros((1, 28, 28, 3)))["params"]


@pytest.fixture(scope="module")
def shapes():
    return jax.eval_shape(_init, jax.random.key(0))


def test_layer_order_is_forward_order_not_alphabetical():
    assert ptree.layer_order(_init, jax.random.key(0)) == FORWARD
    # Recorded from the calls, so asking twice (a cached trace) gives the same answer.
    assert ptree.layer_order(_init, jax.random.key(1)) == FORWARD


@pytest.mark.parametrize(
    "patterns, expected",
    [
        ("feature/conv_0", ["feature/conv_0/bias", "feature/conv_0/kernel"]),
        ("*/kernel", [f"{layer}/kernel" for layer in sorted(FORWARD)]),
        ("re:label/dense_[12]/bias", ["label/dense_1/bias", "label/dense_2/bias"]),
        (
            "first:3",
            [
                "feature/conv_0/bias",
                "feature/conv_0/kernel",
                "feature/conv_1/bias",
                "feature/conv_1/kernel",
                "label/dense_0/bias",
                "label/dense_0/kernel",
            ],
        ),
        ("last:1@label", ["label/dense_2/bias", "label/dense_2/kernel"]),
        (
            ["first:1", "domain/dense_1/bias"],
            ["domain/dense_1/bias", "feature/conv_0/bias", "feature/conv_0/kernel"],
        ),
        ("first:0", []),
    ],
)
def test_select(shapes, patterns, expected):
    mask = ptree.select(shapes, patterns, FORWARD)
    assert jax.tree.structure(mask) == jax.tree.structure(shapes)
    assert sorted(ptree.selected_paths(mask)) == sorted(expected)


def test_select_fails_loudly(shapes):
    with pytest.raises(ValueError, match="'featur/\\*' matches no parameter.*feature/conv_0"):
        ptree.select(shapes, "featur/*")
    with pytest.raises(ValueError, match="asks for 9 layers but there are 7"):
        ptree.select(shapes, "first:9", FORWARD)
    with pytest.raises(ValueError, match="needs the network's layer order"):
        ptree.select(shapes, "last:2")


def test_copy_params_copies_only_the_selection():
    target = _init(jax.random.key(0))
    source = _init(jax.random.key(1))
    mask = ptree.select(target, "feature")
    copied = ptree.copy_params(target, source, mask)
    chex.assert_trees_all_equal(copied["feature"], source["feature"])
    chex.assert_trees_all_equal(copied["label"], target["label"])


def test_copy_params_lists_every_mismatch_with_both_shapes():
    target = _dann_net(num_classes=5).init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    source = _init(jax.random.key(1))
    del source["domain"]
    with pytest.raises(ValueError) as error:
        ptree.copy_params(target["params"], source, jax.tree.map(lambda _: True, target["params"]))
    message = str(error.value)
    assert "label/dense_2/kernel: pretrained (100, 10) vs model (100, 5)" in message
    assert "label/dense_2/bias: pretrained (10,) vs model (5,)" in message
    assert "domain/dense_0/kernel" in message and "missing" in message


def test_lr_labels_and_partitioned_optimizer():
    params = _init(jax.random.key(0))
    frozen = ptree.select(params, "feature/conv_0")
    labels = ptree.lr_labels(params, frozen, {"feature": 0.1, "label/dense_2": 1.0}, FORWARD)
    assert labels["feature"]["conv_0"]["kernel"] == ptree.FROZEN  # Freezing wins.
    assert labels["feature"]["conv_1"]["kernel"] == "lr_x0.1"
    assert labels["label"]["dense_2"]["kernel"] == ptree.TRAINED
    optimizer = ptree.partition_optimizer(optax.sgd(1.0), labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = optimizer.update(grads, optimizer.init(params), params)
    assert float(jnp.abs(updates["feature"]["conv_0"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(updates["feature"]["conv_1"]["kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["label"]["dense_2"]["kernel"], -1.0)
    # No optimizer state is kept for frozen leaves.
    momentum = ptree.partition_optimizer(optax.sgd(1.0, momentum=0.9), labels)
    state_size = ptree.count(momentum.init(params))
    assert state_size == ptree.count(params) - ptree.count(params, frozen)


def test_plain_run_keeps_the_plain_optimizer():
    params = _init(jax.random.key(0))
    labels = ptree.lr_labels(params, jax.tree.map(lambda _: False, params), {})
    optimizer = optax.sgd(0.1)
    assert ptree.partition_optimizer(optimizer, labels) is optimizer


def test_summary_table_names_every_layer_in_forward_order(shapes):
    copied = ptree.select(shapes, "first:2", FORWARD)
    frozen = ptree.select(shapes, "first:1", FORWARD)
    table = ptree.summary_table(shapes, copied, ptree.lr_labels(shapes, frozen, {}), FORWARD)
    rows = table.splitlines()
    assert [r.split("|")[1].strip() for r in rows[2:9]] == FORWARD
    assert "| feature/conv_0 | bias[32], kernel[5, 5, 3, 32] | 2,432 | copied | frozen |" in rows
    assert f"| total | | {ptree.count(shapes):,} | | |" in rows


def test_l2_sp_matches_hand_computation():
    start = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    params = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([4.0])}
    transferred = {"a": True, "b": False}
    drift, new = regularizers.l2_sp(params, start, transferred, alpha=0.5, beta=2.0)
    assert float(drift) == pytest.approx(0.5 / 2 * (1.0 + 4.0))
    assert float(new) == pytest.approx(2.0 / 2 * 16.0)
    grad = jax.grad(lambda p: sum(regularizers.l2_sp(p, start, transferred, 0.5, 2.0)))(params)
    np.testing.assert_allclose(grad["a"], 0.5 * (params["a"] - start["a"]))
    np.testing.assert_allclose(grad["b"], 2.0 * params["b"])


def test_distillation_kl():
    logits = jnp.array([[1.0, 2.0, 0.5]])
    assert float(regularizers.distillation_kl(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-7)
    teacher = jnp.array([[0.0, 0.0, 3.0]])
    p = jax.nn.softmax(teacher / 2.0)
    q = jax.nn.softmax(logits / 2.0)
    expected = 4.0 * float(jnp.sum(p * (jnp.log(p) - jnp.log(q))))
    assert float(regularizers.distillation_kl(logits, teacher, 2.0)) == pytest.approx(expected)


def test_feature_l2():
    f = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    f0 = jnp.array([[0.0, 0.0], [0.0, 3.0]])
    assert float(regularizers.feature_l2(f, f0)) == pytest.approx(0.5 * (5.0 + 9.0) / 2)


def _split(labels):
    labels = np.asarray(labels, np.int32)
    return {"image": np.arange(len(labels))[:, None], "label": labels}


def test_class_subset_relabels_in_the_given_order():
    out = class_subset(_split([0, 1, 2, 3, 2, 1]), (2, 1))
    np.testing.assert_array_equal(out["label"], [1, 0, 0, 1])
    np.testing.assert_array_equal(out["image"][:, 0], [1, 2, 4, 5])
    with pytest.raises(ValueError, match="Classes \\[7\\] have no example"):
        class_subset(_split([0, 1]), (0, 7))


def test_per_class_subset_is_seeded_balanced_and_nested():
    arrays = _split(np.repeat(np.arange(10), 20))
    one = per_class_subset(arrays, 1, seed=3)
    five = per_class_subset(arrays, 5, seed=3)
    assert np.bincount(five["label"]).tolist() == [5] * 10
    assert set(one["image"][:, 0]) <= set(five["image"][:, 0])
    again = per_class_subset(arrays, 5, seed=3)
    np.testing.assert_array_equal(five["image"], again["image"])
    other = per_class_subset(arrays, 5, seed=4)
    assert not np.array_equal(five["image"], other["image"])
    with pytest.raises(ValueError, match="fewer than 21 shots"):
        per_class_subset(arrays, 21, seed=0)
