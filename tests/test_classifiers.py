"""tljax.models.make_classifier: the configured classifier networks and their shared interface."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import pretrain
from tljax import ops
from tljax.models import make_classifier
from tljax.models.digits import DigitNet


def _model_config(name="digits", **fields):
    config = pretrain.get_config().model
    config.name = name
    config.update(fields)
    return config


def _param_shapes(model, image_size=28):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def test_digit_network_paths_and_micro_batches():
    model_config = _model_config()
    net = make_classifier(model_config, for_eval=True)
    assert isinstance(net, DigitNet)
    trained = make_classifier(model_config)
    # On CPU, training runs the features in micro-batches of the same network.
    assert isinstance(trained, ops.MicrobatchedFeatures) and isinstance(trained.net, DigitNet)
    assert trained.rows == ops.resolve_microbatch("auto")
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(20, 28, 28, 3)), jnp.float32)
    params = net.init(jax.random.key(0), images[:1])["params"]
    chex.assert_trees_all_equal(trained.init(jax.random.key(0), images[:1])["params"], params)
    paths = set(traverse_util.flatten_dict(params, sep="/"))
    assert {"feature/conv_0/kernel", "feature/conv_1/bias", "label/dense_2/bias"} <= paths
    np.testing.assert_array_equal(
        trained.apply({"params": params}, images), net.apply({"params": params}, images)
    )


@pytest.mark.parametrize("name, image_size", [("digits", 28), ("convnet8", 28), ("resnet18", 32)])
def test_every_classifier_exposes_features_and_float32_logits(name, image_size):
    model_config = _model_config(name, dtype="bfloat16", num_classes=7)
    if name == "resnet18":
        model_config.width = 8
    net = make_classifier(model_config)
    images = jnp.zeros((2, image_size, image_size, 3), jnp.bfloat16)
    params = _param_shapes(net, image_size)

    def run(params):
        features = net.apply({"params": params}, images, method="features")
        return features, net.apply({"params": params}, features, method="classify")

    features, logits = jax.eval_shape(run, params)
    assert features.ndim == 2 and features.shape[0] == 2
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_conv_settings_and_num_classes_reach_the_network():
    model_config = _model_config("convnet8", conv_impl="im2col", conv_operands="bfloat16")
    net = make_classifier(model_config, num_classes=3)
    assert net.conv.keywords == {"impl": "im2col", "operands": "bfloat16"}
    assert net.pool.keywords == {"impl": "im2col"}
    assert _param_shapes(net)["fc8"]["bias"].shape == (3,)


def test_unknown_names_and_settings_fail():
    with pytest.raises(ValueError, match="Unknown model.name 'vgg'"):
        make_classifier(_model_config("vgg"))
    with pytest.raises(ValueError, match="conv_impl='cudnn'"):
        make_classifier(_model_config(conv_impl="cudnn"))
