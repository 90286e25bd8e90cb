"""tljax.models.vgg and vgg_convert: torchvision topology, pooling, conversion, transfer."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale as _assert_close
from helpers import flat as _flat
from helpers import variable_shapes

from tljax import transfer, validate
from tljax.models import make_classifier, vgg, vgg_convert

TORCH_REASON = "torch is an optional test dependency: pip install -r benchmarks/requirements.txt"
TORCHVISION_VGG16_PARAMS = 138_357_544  # sum(p.numel() for p in torchvision vgg16().parameters())
# VGG-16's layout (2, 2, 3, 3, 3 convs), narrow: the features indices are VGG-16's.
TINY = dict(blocks=((4, 4), (8, 8), (8, 8, 8), (16, 16, 16), (16, 16, 16)), hidden=24)


def _param_shapes(model, image_size=32):
    return variable_shapes(model, image_size)["params"]


def _model_config(num_classes=10, conv_impl="xla", **fields):
    return dict(
        name="vgg16", num_classes=num_classes, dtype="float32", conv_impl=conv_impl, **fields
    )


# ----------------------------------------------------------------------------------------------
# Architecture.


def test_vgg16_has_torchvision_parameter_count_and_paths():
    params = _param_shapes(vgg.vgg16(), image_size=224)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == TORCHVISION_VGG16_PARAMS
    flat = _flat(params)
    expected = {
        "block1/conv1/kernel": (3, 3, 3, 64),
        "block1/conv2/bias": (64,),
        "block3/conv3/kernel": (3, 3, 256, 256),
        "block5/conv3/kernel": (3, 3, 512, 512),
        "fc6/kernel": (7 * 7 * 512, 4096),
        "fc7/kernel": (4096, 4096),
        "head/kernel": (4096, 1000),
    }
    for path, shape in expected.items():
        assert flat[path].shape == shape, path
    assert sum(path.endswith("/kernel") and path.startswith("block") for path in flat) == 13


def test_features_are_fc7_and_bfloat16_computes_with_float32_params():
    model = vgg.VGG(num_classes=7, dtype=jnp.bfloat16, **TINY)
    params = _param_shapes(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    features = jax.eval_shape(
        functools.partial(model.apply, method="features"), {"params": params}, images
    )
    logits = jax.eval_shape(model.apply, {"params": params}, images)
    chex.assert_shape(features, (2, 24))
    chex.assert_shape(logits, (2, 7))
    assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_features_are_non_negative_and_classify_is_the_head():
    model = vgg.VGG(num_classes=5, **TINY)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    features = jax.jit(functools.partial(model.apply, method="features"))(
        {"params": params}, images
    )
    assert np.all(np.asarray(features) >= 0)  # fc7's ReLU comes before the features.
    head = params["head"]
    np.testing.assert_allclose(
        jax.jit(model.apply)({"params": params}, images),
        features @ head["kernel"] + head["bias"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_too_small_images_and_bad_layouts_are_named():
    with pytest.raises(ValueError, match="at least 2x2, got 1x1.*model.image_size"):
        _param_shapes(vgg.VGG(**TINY), image_size=28)  # 28 -> 14 -> 7 -> 3 -> 1: no 5th pool.
    _param_shapes(vgg.VGG(blocks=((4,), (4,), (8,), (8,))), image_size=28)
    with pytest.raises(ValueError, match="model.blocks=.*at least one conv"):
        make_classifier(_model_config(blocks=((4,), ())))


def test_make_classifier_builds_configured_vgg():
    model = make_classifier(_model_config(num_classes=3, conv_impl="auto", **TINY))
    assert isinstance(model, vgg.VGG)
    assert model.blocks == TINY["blocks"] and model.hidden == 24 and model.num_classes == 3
    assert model.conv.keywords["impl"] == "auto" and model.pool.keywords["impl"] == "auto"
    default = make_classifier(_model_config())
    assert default.blocks == vgg.VGG16_BLOCKS and default.hidden == 4096


# ----------------------------------------------------------------------------------------------
# A PyTorch reference: torchvision's VGG, transcribed (torchvision is not a dependency).


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason=TORCH_REASON)


def _torch_vgg(torch, blocks, hidden=4096, num_classes=1000, seed=0):
    """torchvision.models.vgg.VGG over make_layers(cfg), with its module names, in eval mode.

    Biases are randomised (torchvision zeroes them, which would hide a wrong mapping).
    """
    nn = torch.nn
    layers, channels = [], 3
    for widths in blocks:
        for width in widths:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers += [nn.MaxPool2d(kernel_size=2, stride=2)]

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(channels * 7 * 7, hidden),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(hidden, hidden),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(hidden, num_classes),
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    torch.manual_seed(seed)
    model = VGG()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def _numpy_state_dict(model):
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _torch_logits(torch, model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_full_vgg16_state_dict_keys_and_shapes(torch):
    """torchvision's vgg16 (built on the meta device: shapes only) is exactly what we read."""
    with torch.device("meta"):
        reference = _torch_vgg(torch, vgg.VGG16_BLOCKS)
    wanted = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    template = _param_shapes(vgg.vgg16(), image_size=224)
    assert vgg_convert.vgg_torch_shapes(template) == wanted
    assert sum(int(np.prod(shape)) for shape in wanted.values()) == TORCHVISION_VGG16_PARAMS


@pytest.mark.parametrize("size", [1, 2, 5, 7, 9, 13, 14, 20])
def test_adaptive_avg_pool_is_pytorchs(torch, size):
    x = np.random.default_rng(size).standard_normal((2, size, size + 3, 5)).astype(np.float32)
    expected = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), (7, 7)
    ).numpy()
    np.testing.assert_allclose(
        vgg.adaptive_avg_pool(jnp.asarray(x)), expected.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    ("conv_impl", "image_size"),
    # Maps before the pool: 1x1 (copied to every cell), 3x3 (overlapping cells), 7x7 (identity).
    [("xla", 32), ("auto", 96), ("xla", 224)],
)
def test_checkpoint_file_gives_torchvision_logits(torch, tmp_path, conv_impl, image_size):
    """state_dict -> .safetensors / .npz -> read_state_dict -> converter -> same logits."""
    from safetensors.torch import save_file

    reference = _torch_vgg(torch, TINY["blocks"], TINY["hidden"], num_classes=10)
    save_file(reference.state_dict(), str(tmp_path / "vgg.safetensors"))
    np.savez(tmp_path / "vgg.npz", **_numpy_state_dict(reference))

    model = make_classifier(_model_config(conv_impl=conv_impl, **TINY), for_eval=True)
    template = _param_shapes(model, image_size)
    converted = [
        vgg_convert.convert_vgg(validate.read_state_dict(str(path)), template)
        for path in (tmp_path / "vgg.safetensors", tmp_path / "vgg.npz")
    ]
    chex.assert_trees_all_equal(*converted)
    chex.assert_trees_all_equal_shapes_and_dtypes(converted[0], template)

    images = np.random.default_rng(0).standard_normal((2, image_size, image_size, 3))
    images = images.astype(np.float32)
    expected = _torch_logits(torch, reference, images)
    assert np.std(expected) > 0.05  # A real signal, not a vanishing one.
    _assert_close(jax.jit(model.apply)({"params": converted[0]}, images), expected)


def test_fc6_rows_are_permuted_from_nchw_to_nhwc_flatten_order(torch):
    """fc6/kernel row (h * 7 + w) * C + c holds torchvision's column c * 49 + h * 7 + w."""
    state_dict = _numpy_state_dict(_torch_vgg(torch, TINY["blocks"], TINY["hidden"]))
    weight = state_dict["classifier.0.weight"]
    channels = TINY["blocks"][-1][-1]
    params = vgg_convert.convert_vgg(state_dict, _param_shapes(vgg.VGG(**TINY)))
    kernel = params["fc6"]["kernel"]
    assert kernel.shape == (49 * channels, TINY["hidden"])
    for h, w, c in [(0, 0, 1), (0, 1, 0), (3, 5, 7), (6, 6, channels - 1)]:
        np.testing.assert_array_equal(
            kernel[(h * 7 + w) * channels + c], weight[:, c * 49 + h * 7 + w]
        )
    # A plain transpose would put the wrong columns there.
    assert not np.array_equal(kernel, weight.T)
    np.testing.assert_array_equal(params["fc7"]["kernel"], state_dict["classifier.3.weight"].T)
    np.testing.assert_array_equal(
        params["block3"]["conv2"]["kernel"], state_dict["features.12.weight"].transpose(2, 3, 1, 0)
    )


def test_bfloat16_compute_stays_close_to_float32(torch):
    reference = _torch_vgg(torch, TINY["blocks"], TINY["hidden"], num_classes=10)
    fp32 = vgg.VGG(num_classes=10, **TINY)
    bf16 = fp32.clone(dtype=jnp.bfloat16)
    params = vgg_convert.convert_vgg(_numpy_state_dict(reference), _param_shapes(fp32))
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    exact = jax.jit(fp32.apply)({"params": params}, images)
    rounded = jax.jit(bf16.apply)({"params": params}, images)
    assert rounded.dtype == jnp.float32
    _assert_close(rounded, exact, rtol=5e-2)
    assert not np.allclose(rounded, exact, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Conversion errors and exclusion.


@pytest.fixture(scope="module")
def tiny_state_dict(torch):
    return _numpy_state_dict(_torch_vgg(torch, TINY["blocks"], TINY["hidden"]))


def test_every_problem_is_listed_at_once(tiny_state_dict):
    state_dict = dict(tiny_state_dict)
    missing = ["features.0.bias", "features.28.weight", "classifier.3.bias"]
    for key in missing:
        del state_dict[key]
    state_dict["features.30.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    state_dict["classifier.1.weight"] = np.zeros(3, np.float32)
    state_dict["features.5.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    template = _param_shapes(vgg.VGG(**TINY))

    with pytest.raises(ValueError) as error:
        vgg_convert.convert_vgg(state_dict, template)
    message = str(error.value)
    assert "3 keys missing" in message and "2 checkpoint keys have no place" in message
    assert "1 shapes differ" in message
    for key in [*missing, "features.30.weight", "classifier.1.weight"]:
        assert key in message
    assert (
        "block2/conv1/kernel: template (3, 3, 4, 8) needs features.5.weight of shape "
        "(8, 4, 3, 3), checkpoint has (8, 3, 3, 3)" in message
    )


def test_exclude_keeps_template_leaves_and_skips_their_keys(tiny_state_dict):
    template = _param_shapes(vgg.VGG(num_classes=10, **TINY))
    with pytest.raises(
        ValueError, match=r"(?s)exclude=\('head',\).*head/kernel: template \(24, 10\)"
    ):
        vgg_convert.convert_vgg(tiny_state_dict, template)

    concrete = jax.tree.map(lambda s: np.full(s.shape, 3.0, s.dtype), template)
    state_dict = {k: v for k, v in tiny_state_dict.items() if not k.startswith("classifier.")}
    params = vgg_convert.convert_vgg(state_dict, concrete, exclude=("head", "fc6", "fc7"))
    for name in ("fc6", "fc7", "head"):
        assert params[name]["kernel"] is concrete[name]["kernel"]
    np.testing.assert_array_equal(params["block5"]["conv3"]["bias"], state_dict["features.28.bias"])


def test_template_of_another_model_is_rejected(tiny_state_dict):
    template = _param_shapes(vgg.VGG(**TINY))
    with pytest.raises(ValueError, match="pass variables\\['params'\\]"):
        vgg_convert.convert_vgg(tiny_state_dict, {"params": template})
    with pytest.raises(ValueError, match="'stem/conv' has no torchvision VGG counterpart"):
        vgg_convert.convert_vgg(tiny_state_dict, {"stem": {"conv": {"kernel": np.ones((3, 3))}}})


def test_transfer_dispatches_vgg_files_and_names_the_file(tiny_state_dict, tmp_path):
    path = str(tmp_path / "vgg.safetensors")
    from safetensors.numpy import save_file

    save_file(tiny_state_dict, path)
    shapes = _param_shapes(vgg.VGG(**TINY))
    params = transfer.load_pretrained(path, shapes, jax.tree.map(lambda _: True, shapes), "vgg16")
    np.testing.assert_array_equal(params["head"]["bias"], tiny_state_dict["classifier.6.bias"])
    deeper = _param_shapes(vgg.VGG(blocks=((4, 4),) * 5, hidden=24))
    with pytest.raises(validate.DataError) as error:
        transfer.load_pretrained(path, deeper, jax.tree.map(lambda _: True, deeper), "vgg16")
    message = str(error.value)
    assert "vgg.safetensors" in message and "a torchvision VGG state_dict" in message


# ----------------------------------------------------------------------------------------------
# Through the trainer: fine-tuning a converted checkpoint with a new head.


@pytest.mark.slow
def test_finetune_from_converted_torchvision_checkpoint(torch, data_dir, tmp_path):
    import orbax.checkpoint as ocp
    from helpers import shrink

    from configs import pretrain
    from tljax import train

    blocks, hidden = ((4,), (8,), (8, 8), (16,)), 16  # Four blocks fit the 28x28 digits.
    state_dict = _numpy_state_dict(_torch_vgg(torch, blocks, hidden))
    path = tmp_path / "vgg_small_test.safetensors"
    from safetensors.numpy import save_file

    save_file(state_dict, str(path))
    config = shrink(pretrain.get_config(), data_dir, steps=2, batch_size=8)
    config.model.name = "vgg16"
    config.model.blocks, config.model.hidden = blocks, hidden
    config.transfer = dict(init_from=str(path), reinit=("head",), freeze=("block1", "block2"))
    results = train.train_and_evaluate(config, str(tmp_path / "run"))

    model = vgg.VGG(blocks=blocks, hidden=hidden, num_classes=10)
    converted = vgg_convert.convert_vgg(
        state_dict, _param_shapes(model, image_size=28), exclude=("head",)
    )
    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    tuned = manager.restore(2, args=ocp.args.StandardRestore())["params"]
    # Frozen layers are the converted ones, bit for bit; the trained ones moved; the head is new.
    chex.assert_trees_all_equal(tuned["block1"], converted["block1"])
    chex.assert_trees_all_equal(tuned["block2"], converted["block2"])
    assert np.any(tuned["fc7"]["kernel"] != converted["fc7"]["kernel"])
    assert tuned["head"]["kernel"].shape == (16, 10)
    assert not np.allclose(tuned["head"]["kernel"], state_dict["classifier.6.weight"][:10].T)
    frozen = sum(
        np.size(leaf) for leaf in jax.tree.leaves([converted["block1"], converted["block2"]])
    )
    assert results["num_frozen_params"] == frozen
