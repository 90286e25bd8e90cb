"""tljax.models.convnext and convnext_convert: timm topology, conversion, errors, transfer."""

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
from tljax.models import convnext, convnext_convert, make_classifier

TORCH_REASON = "torch is an optional test dependency: pip install -r benchmarks/requirements.txt"
TIMM_CONVNEXT_TINY_PARAMS = 28_589_128  # timm.create_model('convnext_tiny') parameter count.
TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32))


def _param_shapes(model, image_size=32):
    return variable_shapes(model, image_size)["params"]


def _model_config(num_classes=10, conv_impl="xla", **fields):
    return dict(
        name="convnext_t", num_classes=num_classes, dtype="float32", conv_impl=conv_impl, **fields
    )


# ----------------------------------------------------------------------------------------------
# Architecture.


def test_convnext_t_has_timm_parameter_count_and_paths():
    params = _param_shapes(convnext.convnext_t(), image_size=224)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == TIMM_CONVNEXT_TINY_PARAMS
    flat = _flat(params)
    expected = {
        "stem/conv/kernel": (4, 4, 3, 96),
        "stem/norm/scale": (96,),
        "stage1/block2/conv_dw/kernel": (7, 7, 1, 96),
        "stage1/block0/mlp/fc1/kernel": (96, 384),
        "stage2/downsample/norm/bias": (96,),
        "stage2/downsample/conv/kernel": (2, 2, 96, 192),
        "stage3/block8/mlp/fc2/kernel": (1536, 384),
        "stage4/block2/layer_scale/gamma": (768,),
        "final_norm/scale": (768,),
        "head/kernel": (768, 1000),
    }
    for path, shape in expected.items():
        assert flat[path].shape == shape, path
    assert not [path for path in flat if path.startswith("stage1/downsample")]
    assert {path.split("/")[0] for path in flat} == {
        "stem",
        *(f"stage{i}" for i in range(1, 5)),
        "final_norm",
        "head",
    }


def test_scratch_init_follows_timm():
    model = convnext.ConvNeXt(num_classes=5, **TINY)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    np.testing.assert_array_equal(
        params["stage2"]["block1"]["layer_scale"]["gamma"], np.float32(1e-6)
    )
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["stage3"]["block0"]["mlp"]["fc1"]["bias"], 0.0)
    kernel = np.asarray(params["stage1"]["block0"]["mlp"]["fc1"]["kernel"])
    assert 0.01 < kernel.std() < 0.03 and np.abs(kernel).max() <= 0.04 + 1e-6


def test_features_classify_shapes_and_bfloat16_compute():
    model = convnext.ConvNeXt(num_classes=7, dtype=jnp.bfloat16, **TINY)
    params = _param_shapes(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    features = jax.eval_shape(
        functools.partial(model.apply, method="features"), {"params": params}, images
    )
    logits = jax.eval_shape(model.apply, {"params": params}, images)
    chex.assert_shape(features, (2, 32))
    chex.assert_shape(logits, (2, 7))
    assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_too_small_images_and_bad_layouts_are_named():
    model = convnext.ConvNeXt(**TINY)
    with pytest.raises(ValueError, match="at least 2x2, got 1x1.*model.image_size"):
        _param_shapes(model, image_size=28)  # 28 -> 7 -> 3 -> 1: no room for stage 4.
    # Three stages fit 28x28 images.
    _param_shapes(convnext.ConvNeXt(depths=(1, 1, 1), dims=(8, 16, 24)), image_size=28)
    with pytest.raises(ValueError, match=r"model.depths=\(1, 1\) and model.dims=\(8,\)"):
        make_classifier(_model_config(depths=(1, 1), dims=(8,)))


def test_make_classifier_builds_configured_convnext():
    model = make_classifier(_model_config(num_classes=3, conv_impl="auto", **TINY))
    assert isinstance(model, convnext.ConvNeXt)
    assert model.depths == (1, 2, 1, 1) and model.dims == (8, 16, 24, 32)
    assert model.conv.keywords["impl"] == "auto"
    default = make_classifier(_model_config())
    assert default.depths == convnext.CONVNEXT_T_DEPTHS and default.dims == convnext.CONVNEXT_T_DIMS


# ----------------------------------------------------------------------------------------------
# A PyTorch reference: timm's ConvNeXt, transcribed (timm is not a dependency).


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason=TORCH_REASON)


def _torch_convnext(torch, depths, dims, num_classes=1000, seed=0):
    """timm.models.convnext.ConvNeXt (patch stem, conv_mlp=False) with timm's module names.

    LayerNorm affine params and layer scales are randomised (timm initialises them to 1, 0 and
    1e-6, which would hide a wrong mapping).
    """
    nn = torch.nn
    functional = torch.nn.functional

    class LayerNorm2d(nn.LayerNorm):  # timm.layers.LayerNorm2d: normalises channels of NCHW.
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    class Mlp(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc1 = nn.Linear(channels, 4 * channels)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(4 * channels, channels)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class ConvNeXtBlock(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv_dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
            self.norm = nn.LayerNorm(channels, eps=1e-6)
            self.mlp = Mlp(channels)
            self.gamma = nn.Parameter(1e-6 * torch.ones(channels))

        def forward(self, x):
            shortcut = x
            x = self.conv_dw(x).permute(0, 2, 3, 1)
            x = self.mlp(self.norm(x)).permute(0, 3, 1, 2)
            return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut

    class ConvNeXtStage(nn.Module):
        def __init__(self, in_chs, out_chs, depth, stride):
            super().__init__()
            if in_chs != out_chs or stride > 1:
                self.downsample = nn.Sequential(
                    LayerNorm2d(in_chs, eps=1e-6), nn.Conv2d(in_chs, out_chs, 2, stride=2)
                )
            else:
                self.downsample = nn.Identity()
            self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs) for _ in range(depth)])

        def forward(self, x):
            return self.blocks(self.downsample(x))

    class NormMlpClassifierHead(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.norm = LayerNorm2d(channels, eps=1e-6)
            self.fc = nn.Linear(channels, num_classes)

        def forward(self, x):
            x = self.norm(x.mean((2, 3), keepdim=True))
            return self.fc(x.flatten(1))

    class ConvNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
            )
            previous, stages = dims[0], []
            for index, (depth, width) in enumerate(zip(depths, dims, strict=True)):
                stages.append(ConvNeXtStage(previous, width, depth, 2 if index > 0 else 1))
                previous = width
            self.stages = nn.Sequential(*stages)
            self.head = NormMlpClassifierHead(previous)

        def forward(self, x):
            return self.head(self.stages(self.stem(x)))

    torch.manual_seed(seed)
    model = ConvNeXt()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or "stem.1" in name or "downsample.0" in name
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.0)
            elif is_norm and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif is_norm:
                param.normal_(0.0, 0.2)
    return model.eval()


def _numpy_state_dict(model):
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _torch_logits(torch, model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_full_convnext_tiny_state_dict_keys_and_shapes(torch):
    """timm's convnext_tiny (built on the meta device: shapes only) is exactly what we read."""
    with torch.device("meta"):
        reference = _torch_convnext(torch, (3, 3, 9, 3), (96, 192, 384, 768))
    wanted = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    template = _param_shapes(convnext.convnext_t(), image_size=224)
    assert convnext_convert.convnext_torch_shapes(template) == wanted
    assert sum(int(np.prod(shape)) for shape in wanted.values()) == TIMM_CONVNEXT_TINY_PARAMS


@pytest.mark.parametrize(("conv_impl", "image_size"), [("xla", 32), ("auto", 45)])
def test_checkpoint_file_gives_timm_logits(torch, tmp_path, conv_impl, image_size):
    """state_dict -> .safetensors / .npz -> read_state_dict -> converter -> same logits.

    45x45 images exercise the floor of every strided layer (45 -> 11 -> 5 -> 2 -> 1).
    """
    from safetensors.torch import save_file

    reference = _torch_convnext(torch, TINY["depths"], TINY["dims"], num_classes=10)
    save_file(reference.state_dict(), str(tmp_path / "convnext.safetensors"))
    np.savez(tmp_path / "convnext.npz", **_numpy_state_dict(reference))

    model = make_classifier(_model_config(conv_impl=conv_impl, **TINY), for_eval=True)
    template = _param_shapes(model, image_size)
    converted = [
        convnext_convert.convert_convnext(validate.read_state_dict(str(path)), template)
        for path in (tmp_path / "convnext.safetensors", tmp_path / "convnext.npz")
    ]
    chex.assert_trees_all_equal(*converted)
    chex.assert_trees_all_equal_shapes_and_dtypes(converted[0], template)

    images = np.random.default_rng(0).standard_normal((2, image_size, image_size, 3))
    images = images.astype(np.float32)
    expected = _torch_logits(torch, reference, images)
    assert np.std(expected) > 0.1  # A real signal, not a vanishing one.
    _assert_close(jax.jit(model.apply)({"params": converted[0]}, images), expected)


def test_conversion_layouts(torch):
    state_dict = _numpy_state_dict(_torch_convnext(torch, TINY["depths"], TINY["dims"]))
    params = convnext_convert.convert_convnext(state_dict, _param_shapes(convnext.ConvNeXt(**TINY)))
    block = params["stage2"]["block1"]
    np.testing.assert_array_equal(
        block["conv_dw"]["kernel"],
        state_dict["stages.1.blocks.1.conv_dw.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        block["mlp"]["fc2"]["kernel"], state_dict["stages.1.blocks.1.mlp.fc2.weight"].T
    )
    np.testing.assert_array_equal(
        block["layer_scale"]["gamma"], state_dict["stages.1.blocks.1.gamma"]
    )
    np.testing.assert_array_equal(
        params["stage3"]["downsample"]["norm"]["scale"], state_dict["stages.2.downsample.0.weight"]
    )
    np.testing.assert_array_equal(params["final_norm"]["bias"], state_dict["head.norm.bias"])


def test_bfloat16_compute_stays_close_to_float32(torch):
    reference = _torch_convnext(torch, TINY["depths"], TINY["dims"], num_classes=10)
    fp32 = convnext.ConvNeXt(num_classes=10, **TINY)
    bf16 = fp32.clone(dtype=jnp.bfloat16)
    params = convnext_convert.convert_convnext(_numpy_state_dict(reference), _param_shapes(fp32))
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    exact = jax.jit(fp32.apply)({"params": params}, images)
    rounded = jax.jit(bf16.apply)({"params": params}, images)
    assert rounded.dtype == jnp.float32
    _assert_close(rounded, exact, rtol=5e-2)
    assert not np.allclose(rounded, exact, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Conversion errors and exclusion.


@pytest.fixture(scope="module")
def tiny_state_dict(torch):
    return _numpy_state_dict(_torch_convnext(torch, TINY["depths"], TINY["dims"]))


def test_every_problem_is_listed_at_once(tiny_state_dict):
    state_dict = dict(tiny_state_dict)
    missing = ["stem.1.bias", "stages.2.blocks.0.gamma", "head.fc.weight"]
    for key in missing:
        del state_dict[key]
    state_dict["stages.4.blocks.0.gamma"] = np.zeros(32, np.float32)
    state_dict["norm_pre.weight"] = np.zeros(32, np.float32)
    state_dict["stages.1.blocks.0.mlp.fc1.weight"] = np.zeros((64, 8), np.float32)
    template = _param_shapes(convnext.ConvNeXt(**TINY))

    with pytest.raises(ValueError) as error:
        convnext_convert.convert_convnext(state_dict, template)
    message = str(error.value)
    assert "3 keys missing" in message and "2 checkpoint keys have no place" in message
    assert "1 shapes differ" in message
    for key in [*missing, "stages.4.blocks.0.gamma", "norm_pre.weight"]:
        assert key in message
    assert (
        "stage2/block0/mlp/fc1/kernel: template (16, 64) needs stages.1.blocks.0.mlp.fc1.weight "
        "of shape (64, 16), checkpoint has (64, 8)" in message
    )


def test_exclude_keeps_template_leaves_and_skips_their_keys(tiny_state_dict):
    template = _param_shapes(convnext.ConvNeXt(num_classes=10, **TINY))
    with pytest.raises(
        ValueError, match=r"(?s)exclude=\('head',\).*head/kernel: template \(32, 10\)"
    ):
        convnext_convert.convert_convnext(tiny_state_dict, template)

    concrete = jax.tree.map(lambda s: np.full(s.shape, 3.0, s.dtype), template)
    state_dict = {k: v for k, v in tiny_state_dict.items() if not k.startswith("stages.3.")}
    params = convnext_convert.convert_convnext(state_dict, concrete, exclude=("head", "stage4"))
    assert params["head"]["kernel"] is concrete["head"]["kernel"]
    assert (
        params["stage4"]["block0"]["norm"]["scale"] is concrete["stage4"]["block0"]["norm"]["scale"]
    )
    np.testing.assert_array_equal(
        params["stage3"]["block0"]["conv_dw"]["bias"], state_dict["stages.2.blocks.0.conv_dw.bias"]
    )
    # The layer scale is a layer of its own: excluding it leaves the rest of its block converted.
    params = convnext_convert.convert_convnext(
        tiny_state_dict, concrete, exclude=("head", "stage1/block0/layer_scale")
    )
    block = params["stage1"]["block0"]
    assert block["layer_scale"]["gamma"] is concrete["stage1"]["block0"]["layer_scale"]["gamma"]
    np.testing.assert_array_equal(
        block["mlp"]["fc1"]["bias"], tiny_state_dict["stages.0.blocks.0.mlp.fc1.bias"]
    )


def test_template_of_another_model_is_rejected(tiny_state_dict):
    template = _param_shapes(convnext.ConvNeXt(**TINY))
    with pytest.raises(ValueError, match="pass variables\\['params'\\]"):
        convnext_convert.convert_convnext(tiny_state_dict, {"params": template})
    with pytest.raises(ValueError, match="'stem/bn' has no timm ConvNeXt counterpart"):
        convnext_convert.convert_convnext(tiny_state_dict, {"stem": {"bn": {"scale": np.ones(8)}}})


def test_transfer_dispatches_convnext_files_and_names_the_file(tiny_state_dict, tmp_path):
    path = str(tmp_path / "convnext.npz")
    np.savez(path, **tiny_state_dict)
    shapes = _param_shapes(convnext.ConvNeXt(**TINY))
    copied = jax.tree.map(lambda _: True, shapes)
    params = transfer.load_pretrained(path, shapes, copied, "convnext_t")
    np.testing.assert_array_equal(params["stem"]["conv"]["bias"], tiny_state_dict["stem.0.bias"])
    wider = _param_shapes(convnext.ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 24, 40)))
    with pytest.raises(validate.DataError) as error:
        transfer.load_pretrained(path, wider, jax.tree.map(lambda _: True, wider), "convnext_t")
    message = str(error.value)
    assert "convnext.npz" in message and "a timm ConvNeXt state_dict" in message
    assert "stage4/downsample/conv/kernel: template (2, 2, 24, 40)" in message


# ----------------------------------------------------------------------------------------------
# Through the trainer: fine-tuning a converted checkpoint with a new head.


@pytest.mark.slow
def test_finetune_from_converted_timm_checkpoint(torch, data_dir, tmp_path):
    import orbax.checkpoint as ocp
    from helpers import shrink

    from configs import pretrain
    from tljax import train

    depths, dims = (1, 1, 1), (8, 16, 24)  # Three stages fit the 28x28 digits.
    state_dict = _numpy_state_dict(_torch_convnext(torch, depths, dims))
    path = tmp_path / "convnext_small_test.npz"
    np.savez(path, **state_dict)
    config = shrink(pretrain.get_config(), data_dir, steps=2, batch_size=8)
    config.model.name = "convnext_t"
    config.model.depths, config.model.dims = depths, dims
    config.transfer = dict(init_from=str(path), reinit=("head",), freeze=("stem", "stage1"))
    results = train.train_and_evaluate(config, str(tmp_path / "run"))

    model = convnext.ConvNeXt(depths=depths, dims=dims, num_classes=10)
    converted = convnext_convert.convert_convnext(
        state_dict, _param_shapes(model, image_size=28), exclude=("head",)
    )
    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    tuned = manager.restore(2, args=ocp.args.StandardRestore())["params"]
    # Frozen layers are the converted ones, bit for bit; the trained ones moved; the head is new.
    chex.assert_trees_all_equal(tuned["stem"], converted["stem"])
    chex.assert_trees_all_equal(tuned["stage1"], converted["stage1"])
    trained = _flat(tuned["stage3"])
    assert any(np.any(trained[k] != v) for k, v in _flat(converted["stage3"]).items())
    assert tuned["head"]["kernel"].shape == (24, 10)
    assert not np.allclose(tuned["head"]["kernel"], state_dict["head.fc.weight"][:10].T)
    frozen = sum(
        np.size(leaf) for leaf in jax.tree.leaves([converted["stem"], converted["stage1"]])
    )
    assert results["num_frozen_params"] == frozen
