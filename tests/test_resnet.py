"""tljax.models.resnet and torch_convert: torchvision topology, lowerings, conversion."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale as _assert_close
from helpers import conv_operand_dtypes
from helpers import flat as _flat
from helpers import variable_shapes as _param_shapes

from tljax import ops
from tljax.models import resnet, torch_convert

TORCH_REASON = "torch is an optional test dependency: pip install -r benchmarks/requirements.txt"

# torchvision's parameter counts (BatchNorm counted as weight + bias, as in model.parameters()).
TORCHVISION_PARAM_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def _concrete(shapes):
    """A params tree of the given shapes filled with distinct random values."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


# ----------------------------------------------------------------------------------------------
# Architecture.


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAM_COUNTS))
def test_param_counts_equal_torchvision(name):
    variables = _param_shapes(resnet.RESNETS[name](num_classes=1000))
    assert list(variables) == ["params"]
    count = sum(leaf.size for leaf in jax.tree.leaves(variables))
    assert count == TORCHVISION_PARAM_COUNTS[name]


@pytest.mark.parametrize(("name", "feature_dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_output_shapes(name, feature_dim):
    model = resnet.RESNETS[name](num_classes=10)
    params = _param_shapes(model, image_size=64)["params"]
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    logits = jax.eval_shape(model.apply, {"params": params}, images)
    features = jax.eval_shape(
        functools.partial(model.apply, features_only=True), {"params": params}, images
    )
    pooled = jax.eval_shape(
        functools.partial(model.apply, method="features"), {"params": params}, images
    )
    classified = jax.eval_shape(
        functools.partial(model.apply, method="classify"), {"params": params}, pooled
    )
    chex.assert_shape(logits, (2, 10))
    chex.assert_shape([features, pooled], (2, feature_dim))
    chex.assert_shape(classified, (2, 10))
    assert logits.dtype == jnp.float32


def test_param_paths_follow_torchvision_layout():
    flat = _flat(_param_shapes(resnet.resnet50(num_classes=10))["params"])
    top_level = {path.split("/")[0] for path in flat}
    assert top_level == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
    expected_shapes = {
        "stem/conv/kernel": (7, 7, 3, 64),
        "stem/norm/scale": (64,),
        "stage1/block0/conv1/kernel": (1, 1, 64, 64),
        "stage1/block0/downsample/conv/kernel": (1, 1, 64, 256),
        "stage2/block0/conv2/kernel": (3, 3, 128, 128),  # v1.5: the 3x3 conv strides
        "stage2/block0/downsample/norm/bias": (512,),
        "stage3/block5/norm3/scale": (1024,),
        "stage4/block2/conv3/kernel": (1, 1, 512, 2048),
        "head/kernel": (2048, 10),
        "head/bias": (10,),
    }
    for path, shape in expected_shapes.items():
        assert flat[path].shape == shape, path
    assert "stage1/block1/downsample/conv/kernel" not in flat
    assert not [path for path in flat if "/conv" in path and path.endswith("/bias")]


def test_norm_variants_and_compute_dtype():
    group = _flat(_param_shapes(resnet.resnet18(width=8, norm="group"))["params"])
    affine = _flat(_param_shapes(resnet.resnet18(width=8))["params"])
    # Same names and shapes: a GroupNorm net (8 channels, so 8 groups) can take transfers.
    assert jax.tree.map(lambda s: s.shape, group) == jax.tree.map(lambda s: s.shape, affine)
    with pytest.raises(ValueError, match="Unknown norm 'layer'"):
        _param_shapes(resnet.resnet18(norm="layer"))

    model = resnet.resnet18(num_classes=10, width=8, dtype=jnp.bfloat16)
    params = _param_shapes(model)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(model.apply, {"params": params}, images).dtype == jnp.float32
    pooled = jax.eval_shape(
        functools.partial(model.apply, method="features"), {"params": params}, images
    )
    assert pooled.dtype == jnp.bfloat16


@pytest.mark.parametrize("norm", ["affine", "group"])
def test_scratch_init_zeroes_last_norm_of_each_block(norm):
    model = resnet.ResNet((1, 1, 1, 1), resnet.Bottleneck, num_classes=10, width=8, norm=norm)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        block = params[stage]["block0"]
        np.testing.assert_array_equal(block["norm3"]["scale"], 0.0)
        np.testing.assert_array_equal(block["norm1"]["scale"], 1.0)
        np.testing.assert_array_equal(block["downsample"]["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["stem"]["norm"]["scale"], 1.0)


def _lowered(model, impl, operands="float32"):
    """``model`` with the convolution and pooling of ``tljax.ops`` under lowering ``impl``."""
    conv, pool, _ = ops.conv_from_config({"conv_impl": impl, "conv_operands": operands})
    return model.clone(conv=conv, pool=pool)


def test_im2col_and_xla_lowerings_agree():
    """Logits and gradients of a (narrow) ResNet-18 are the same function under both lowerings."""
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32))
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((2, 10), np.float32))
    base = _lowered(resnet.resnet18(num_classes=10, width=16), "xla")
    # Non-zero last-norm scales, or the residual branches would get no kernel gradients.
    params = _concrete(_param_shapes(base)["params"])
    params = jax.tree.map(
        lambda p: p * 0.3 if p.ndim == 1 else p * np.prod(p.shape[:-1]) ** -0.5, params
    )

    def loss_and_logits(params, impl):
        logits = _lowered(base, impl).apply({"params": params}, images)
        return jnp.sum(logits * weights), logits

    results = {}
    for impl in ("xla", "im2col"):
        grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=1)
        (_, logits), grads = grad_fn(params, impl)
        inference_logits = jax.jit(_lowered(base, impl).apply)({"params": params}, images)
        results[impl] = logits, inference_logits, grads

    xla_logits, xla_inference, xla_grads = results["xla"]
    im2col_logits, im2col_inference, im2col_grads = results["im2col"]
    _assert_close(im2col_logits, xla_logits)
    _assert_close(im2col_inference, xla_inference)
    _assert_close(im2col_logits, im2col_inference)
    chex.assert_trees_all_equal_shapes(im2col_grads, xla_grads)
    for path, xla_grad in _flat(xla_grads).items():
        assert np.max(np.abs(xla_grad)) > 0, path
        _assert_close(_flat(im2col_grads)[path], xla_grad, rtol=2e-4)


def _bf16_convolutions(jaxpr) -> int:
    return sum(dtype == jnp.bfloat16 for dtype in conv_operand_dtypes(jaxpr))


def test_bfloat16_conv_operands_reach_every_convolution():
    """conv_operands=bfloat16 rounds the operands of every conv (stem, blocks, shortcuts)."""
    images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3), np.float32))
    base = _lowered(resnet.resnet18(num_classes=10, width=8), "xla")
    params = _concrete(_param_shapes(base)["params"])
    params = jax.tree.map(
        lambda p: p * 0.3 if p.ndim == 1 else p * np.prod(p.shape[:-1]) ** -0.5, params
    )
    bf16_model = _lowered(base, "xla", "bfloat16")
    num_convs = sum(p.ndim == 4 for p in jax.tree.leaves(params))
    assert num_convs == 20  # Stem, 16 block convs, 3 shortcut projections.
    jaxpr = jax.make_jaxpr(bf16_model.apply)({"params": params}, images).jaxpr
    assert _bf16_convolutions(jaxpr) == num_convs
    assert _bf16_convolutions(jax.make_jaxpr(base.apply)({"params": params}, images).jaxpr) == 0
    fp32 = jax.jit(base.apply)({"params": params}, images)
    bf16 = jax.jit(bf16_model.apply)({"params": params}, images)
    assert bf16.dtype == jnp.float32
    _assert_close(bf16, fp32, rtol=5e-2)
    assert not np.allclose(bf16, fp32, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Conversion of PyTorch checkpoints.


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason=TORCH_REASON)


def _torch_resnet(torch, block: str, stage_sizes, num_classes=1000, width=64, seed=0):
    """torchvision.models.ResNet, rebuilt with its module names (torchvision is not a dependency).

    BatchNorm affine params and running statistics are randomised and the model is in eval mode,
    so the folding of every statistic is exercised.
    """
    nn = torch.nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    block_class = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(width, stage_sizes[0], 1)
            self.layer2 = self._make_layer(width * 2, stage_sizes[1], 2)
            self.layer3 = self._make_layer(width * 4, stage_sizes[2], 2)
            self.layer4 = self._make_layer(width * 8, stage_sizes[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(width * 8 * block_class.expansion, num_classes)

        def _make_layer(self, planes, blocks, stride):
            out_planes = planes * block_class.expansion
            downsample = None
            if stride != 1 or self.inplanes != out_planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, out_planes, 1, stride, bias=False),
                    nn.BatchNorm2d(out_planes),
                )
            layers = [block_class(self.inplanes, planes, stride, downsample)]
            self.inplanes = out_planes
            layers += [block_class(out_planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(seed)
    model = ResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _numpy_state_dict(model):
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _torch_logits(torch, model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_resnet18_checkpoint_gives_torch_logits(torch, tmp_path):
    from safetensors.torch import save_file

    torch_model = _torch_resnet(torch, "basic", (2, 2, 2, 2))
    safetensors_path = tmp_path / "resnet18.safetensors"
    npz_path = tmp_path / "resnet18.npz"
    save_file(torch_model.state_dict(), str(safetensors_path))
    np.savez(npz_path, **_numpy_state_dict(torch_model))
    assert "layer2.0.downsample.1.running_var" in torch_model.state_dict()

    model = resnet.resnet18(num_classes=1000)
    template = _param_shapes(model, image_size=64)["params"]
    from_safetensors = torch_convert.load_pretrained_resnet(
        safetensors_path, template, exclude_head=False
    )
    from_npz = torch_convert.load_pretrained_resnet(npz_path, template, exclude_head=False)
    chex.assert_trees_all_equal(from_safetensors, from_npz)
    chex.assert_trees_all_equal_shapes_and_dtypes(from_npz, template)

    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    expected = _torch_logits(torch, torch_model, images)
    logits = jax.jit(model.apply)({"params": from_npz}, images)
    assert np.std(expected) > 0.1  # A real signal, not a vanishing one.
    _assert_close(logits, expected)


def test_running_statistics_load_into_batch_norm_resnets(torch):
    torch_model = _torch_resnet(torch, "basic", (2, 2, 2, 2), width=8)
    with torch.no_grad():  # Statistics that are not the initial zeros and ones.
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    state_dict = _numpy_state_dict(torch_model)
    images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)

    evaluating = resnet.resnet18(width=8, norm="batch")
    params = torch_convert.convert_resnet(state_dict, _param_shapes(evaluating)["params"])
    np.testing.assert_array_equal(
        params["stage2"]["block0"]["downsample"]["norm"]["running_var"],
        state_dict["layer2.0.downsample.1.running_var"],
    )
    _assert_close(
        evaluating.apply({"params": params}, images), _torch_logits(torch, torch_model, images)
    )

    training = resnet.resnet18(width=8, norm="batch", train=True)
    logits, _ = training.apply({"params": params}, images, mutable=["batch_stats"])
    torch_model.train()
    _assert_close(logits, _torch_logits(torch, torch_model, images))


def test_batch_norm_folding_matches_formula(torch):
    state_dict = _numpy_state_dict(_torch_resnet(torch, "basic", (1, 1, 1, 1), width=8))
    template = _param_shapes(resnet.ResNet((1, 1, 1, 1), width=8))["params"]
    params = torch_convert.convert_resnet(state_dict, template)
    weight, bias, mean, var = (
        state_dict[f"layer3.0.bn2.{field}"]
        for field in ("weight", "bias", "running_mean", "running_var")
    )
    scale = weight / np.sqrt(var + 1e-5)
    norm = params["stage3"]["block0"]["norm2"]
    np.testing.assert_allclose(norm["scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(norm["bias"], bias - mean * scale, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
        params["stage2"]["block0"]["downsample"]["conv"]["kernel"],
        state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(params["head"]["kernel"], state_dict["fc.weight"].T)


def test_bottleneck_checkpoint_gives_torch_logits(torch):
    """A narrow ResNet-50 layout (3-conv Bottleneck, stride on the 3x3, projection in stage 1)."""
    stage_sizes = (2, 1, 1, 1)
    torch_model = _torch_resnet(torch, "bottleneck", stage_sizes, num_classes=7, width=8)
    model = resnet.ResNet(stage_sizes, resnet.Bottleneck, num_classes=7, width=8)
    template = _param_shapes(model)["params"]
    params = torch_convert.convert_resnet(_numpy_state_dict(torch_model), template)

    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    _assert_close(
        jax.jit(model.apply)({"params": params}, images),
        _torch_logits(torch, torch_model, images),
    )


def test_full_resnet50_state_dict_fills_the_template(torch):
    """Every key of a full-size ResNet-50 has its place (names and shapes only: no forward)."""
    state_dict = _numpy_state_dict(_torch_resnet(torch, "bottleneck", (3, 4, 6, 3)))
    template = _param_shapes(resnet.resnet50())["params"]
    params = torch_convert.convert_resnet(state_dict, template)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, template)


# ----------------------------------------------------------------------------------------------
# Conversion errors.


@pytest.fixture(scope="module")
def narrow_resnet18_state_dict(torch):
    return _numpy_state_dict(_torch_resnet(torch, "basic", (2, 2, 2, 2), width=8))


def _narrow_resnet18_template(num_classes=1000):
    return _param_shapes(resnet.resnet18(num_classes=num_classes, width=8))["params"]


def test_missing_checkpoint_file_names_path_and_build_doc(tmp_path):
    path = tmp_path / "absent" / "resnet50.safetensors"
    with pytest.raises(FileNotFoundError) as error:
        torch_convert.load_state_dict(path)
    assert str(path) in str(error.value)
    assert "never downloads" in str(error.value)
    assert "BUILD.md" in str(error.value)


def test_unknown_checkpoint_extension(tmp_path):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"not a supported format")
    with pytest.raises(ValueError, match=r"unknown extension '\.pth'.*\.safetensors"):
        torch_convert.load_state_dict(path)


def test_missing_and_unexpected_keys_are_all_listed(narrow_resnet18_state_dict):
    state_dict = dict(narrow_resnet18_state_dict)
    missing = ["layer1.0.bn1.running_var", "layer4.1.conv2.weight", "fc.bias"]
    for key in missing:
        del state_dict[key]
    state_dict["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    state_dict["module.fc.weight"] = np.zeros((1000, 64), np.float32)

    with pytest.raises(ValueError) as error:
        torch_convert.convert_resnet(state_dict, _narrow_resnet18_template())
    message = str(error.value)
    assert "3 keys missing" in message and "2 checkpoint keys have no place" in message
    for key in [*missing, "layer5.0.conv1.weight", "module.fc.weight"]:
        assert key in message
    assert "num_batches_tracked" not in message


def test_head_shape_mismatch_lists_both_shapes_and_suggests_excluding_head(
    narrow_resnet18_state_dict,
):
    template = _narrow_resnet18_template(num_classes=10)
    with pytest.raises(ValueError) as error:
        torch_convert.convert_resnet(narrow_resnet18_state_dict, template)
    message = str(error.value)
    assert "2 shapes differ" in message
    assert "head/kernel: template (64, 10) needs fc.weight of shape (10, 64)" in message
    assert "checkpoint has (1000, 64)" in message
    assert "head/bias: template (10,) needs fc.bias of shape (10,), checkpoint has (1000,)" in (
        message
    )
    assert "exclude_head=True" in message

    concrete_template = _concrete(template)
    params = torch_convert.convert_resnet(
        narrow_resnet18_state_dict, concrete_template, exclude=("head",)
    )
    assert params["head"]["kernel"] is concrete_template["head"]["kernel"]
    np.testing.assert_array_equal(
        params["stem"]["conv"]["kernel"],
        narrow_resnet18_state_dict["conv1.weight"].transpose(2, 3, 1, 0),
    )


def test_shape_mismatches_in_the_body_are_all_listed(narrow_resnet18_state_dict):
    wider_template = _param_shapes(resnet.resnet18(width=16))["params"]
    with pytest.raises(ValueError) as error:
        torch_convert.convert_resnet(narrow_resnet18_state_dict, wider_template, exclude=("head",))
    message = str(error.value)
    assert "stem/conv/kernel: template (7, 7, 3, 16) needs conv1.weight of shape (16, 3, 7, 7)" in (
        message
    )
    assert "checkpoint has (8, 3, 7, 7)" in message
    assert "stage4/block1/norm2/{scale,bias}" in message and "layer4.1.bn2.running_mean" in message
    assert "head" not in message.split("\n", 1)[1]


def test_template_must_be_resnet_params(narrow_resnet18_state_dict):
    template = _narrow_resnet18_template()
    with pytest.raises(ValueError, match="pass variables\\['params'\\]"):
        torch_convert.convert_resnet(narrow_resnet18_state_dict, {"params": template})
    with pytest.raises(ValueError, match="'feature/conv_0' has no torchvision ResNet counterpart"):
        torch_convert.convert_resnet(
            narrow_resnet18_state_dict, {"feature": {"conv_0": {"kernel": np.zeros((5, 5, 3, 32))}}}
        )


def test_excluded_heads_beside_the_resnet_are_kept_unread(narrow_resnet18_state_dict):
    # Domain adaptation adds a discriminator next to the ResNet's own layers.
    discriminator = {"dense_0": {"kernel": np.ones((64, 4)), "bias": np.ones(4)}}
    template = {**_concrete(_narrow_resnet18_template()), "domain": discriminator}
    params = torch_convert.convert_resnet(
        narrow_resnet18_state_dict, template, exclude=("domain", "head")
    )
    np.testing.assert_array_equal(params["domain"]["dense_0"]["kernel"], np.ones((64, 4)))
    with pytest.raises(ValueError, match="'domain/dense_0' has no torchvision ResNet counterpart"):
        torch_convert.convert_resnet(narrow_resnet18_state_dict, template, exclude=("head",))


# ----------------------------------------------------------------------------------------------
# Through the trainer: a linear probe on a converted PyTorch checkpoint.


@pytest.mark.slow
def test_linear_probe_from_torch_checkpoint(narrow_resnet18_state_dict, data_dir, tmp_path):
    import orbax.checkpoint as ocp

    from configs import pretrain
    from tljax import train

    path = tmp_path / "resnet18_w8.npz"
    np.savez(path, **narrow_resnet18_state_dict)
    config = pretrain.get_config()
    config.data.data_dir = data_dir
    config.model.name = "resnet18"
    config.model.width = 8
    config.transfer = dict(init_from=str(path), reinit=("head",), freeze=("stem", "stage*"))
    config.train.steps, config.train.batch_size = 2, 8
    config.eval.batch_size = 500
    results = train.train_and_evaluate(config, str(tmp_path / "run"))

    converted = torch_convert.convert_resnet(
        narrow_resnet18_state_dict, _narrow_resnet18_template(), exclude=("head",)
    )
    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    tuned = manager.restore(2, args=ocp.args.StandardRestore())["params"]
    body = {k: v for k, v in converted.items() if k != "head"}
    chex.assert_trees_all_equal(body, {k: v for k, v in tuned.items() if k != "head"})
    assert tuned["head"]["kernel"].shape == (64, 10)
    assert results["num_params"] - results["num_frozen_params"] == 64 * 10 + 10


@pytest.mark.parametrize("name", ["digits", "convnet8", "resnet50"])
def test_classifier_configs_pass_conv_operands_to_the_model(name):
    from configs import pretrain
    from tljax.models import make_classifier

    config = pretrain.get_config()
    config.model.name = name
    # for_eval: the network itself, not wrapped in micro-batches.
    operands = lambda: make_classifier(config.model, for_eval=True).conv.keywords["operands"]
    assert operands() == "float32"
    config.model.conv_operands = "bfloat16"
    assert operands() == "bfloat16"
