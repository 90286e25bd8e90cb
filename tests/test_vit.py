"""tljax.models.vit and vit_convert: timm topology, timm / big_vision checkpoints, transfer."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale as _assert_close
from helpers import flat as _flat
from helpers import variable_shapes as _param_shapes

from tljax import params as ptree
from tljax import validate
from tljax.models import converters, make_classifier, vit, vit_convert

TORCH_REASON = "torch is an optional test dependency: pip install -r benchmarks/requirements.txt"

# timm.create_model(name).num_parameters() for vit_small_patch16_224 / vit_base_patch16_224.
TIMM_PARAM_COUNTS = {"vit_s16": 22_050_664, "vit_b16": 86_567_656}
# A ViT small enough for CPU tests: 32x32 images are a 4x4 grid of 8x8 patches.
TINY = dict(width=48, depth=2, heads=3, mlp_dim=192, patch=8)


def _tiny(num_classes=10, **kwargs):
    return vit.ViT(num_classes=num_classes, **TINY, **kwargs)


def _images(image_size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((2, image_size, image_size, 3), np.float32)


# ----------------------------------------------------------------------------------------------
# Architecture.


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_counts_equal_timm(name):
    variables = _param_shapes(vit.vit(name), image_size=224)
    assert list(variables) == ["params"]
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == TIMM_PARAM_COUNTS[name]


def test_param_paths_and_forward_layer_order():
    model = _tiny()
    flat = _flat(_param_shapes(model)["params"])
    expected_shapes = {
        "embedding/cls": (1, 1, 48),
        "embedding/pos_embedding": (1, 17, 48),
        "embedding/patch/kernel": (8, 8, 3, 48),
        "encoder/block1/norm1/scale": (48,),
        "encoder/block0/attn/query/kernel": (48, 48),
        "encoder/block0/attn/value/bias": (48,),
        "encoder/block1/attn/out/kernel": (48, 48),
        "encoder/block0/mlp/fc1/kernel": (48, 192),
        "encoder/block1/mlp/fc2/kernel": (192, 48),
        "encoder/norm/bias": (48,),
        "head/kernel": (48, 10),
    }
    for path, shape in expected_shapes.items():
        assert flat[path].shape == shape, path
    assert len(flat) == 4 + 2 * 16 + 2 + 2

    layers = ptree.layer_order(
        lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 3)))["params"], jax.random.key(0)
    )
    block = ["norm1", "attn/query", "attn/key", "attn/value", "attn/out", "norm2"]
    block += ["mlp/fc1", "mlp/fc2"]
    assert layers == [
        "embedding",
        "embedding/patch",
        *[f"encoder/block{i}/{layer}" for i in range(2) for layer in block],
        "encoder/norm",
        "head",
    ]
    # Transfer patterns address the blocks in that order.
    selected = ptree.select(_param_shapes(model)["params"], ("last:9",), layers)
    assert {path.rsplit("/", 1)[0] for path in ptree.selected_paths(selected)} == {
        *[f"encoder/block1/{layer}" for layer in block],
        "encoder/norm",
    } - {"encoder/block1/norm1"} | {"head"}


def test_features_classify_and_features_only():
    model = _tiny(num_classes=7)
    params = _param_shapes(model)["params"]
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    logits = jax.eval_shape(model.apply, {"params": params}, images)
    feats = jax.eval_shape(
        functools.partial(model.apply, method="features"), {"params": params}, images
    )
    classified = jax.eval_shape(
        functools.partial(model.apply, method="classify"), {"params": params}, feats
    )
    chex.assert_shape([logits, classified], (2, 7))
    chex.assert_shape(feats, (2, 48))
    assert logits.dtype == jnp.float32
    assert "head" not in _param_shapes(model, features_only=True)["params"]


def test_image_sizes_that_do_not_fit_are_named():
    model = _tiny()
    with pytest.raises(ValueError, match=r"30x30 are not whole 8x8 patches.*model.image_size"):
        _param_shapes(model, image_size=30)
    params = _param_shapes(model)["params"]
    with pytest.raises(ValueError, match=r"\(1, 17, 48\).*48x48 images \(36 patches\)"):
        jax.eval_shape(model.apply, {"params": params}, jax.ShapeDtypeStruct((1, 48, 48, 3), float))
    with pytest.raises(ValueError, match="width=48 is not a multiple of heads=5"):
        _param_shapes(vit.ViT(**{**TINY, "heads": 5}))


def test_model_block_names_and_fields():
    from configs import pretrain

    config = pretrain.get_config()
    config.model.name = "vit"
    config.model.image_size = (32, 32)
    config.model.vit = dict(TINY)
    model = make_classifier(config.model)
    assert isinstance(model, vit.ViT)
    assert (model.width, model.depth, model.heads, model.mlp_dim, model.patch) == (48, 2, 3, 192, 8)
    assert model.num_classes == 10 and model.dtype == jnp.float32

    config.model.name = "vit_b16"
    with pytest.raises(ValueError, match="model.name='vit_b16' is a fixed preset"):
        make_classifier(config.model)
    del config.model["vit"]
    assert make_classifier(config.model, num_classes=3).width == 768

    config.model.name = "vit"
    config.model.vit = dict(width=48, depth=2, heads=3, patch=8, mlp=4)
    with pytest.raises(ValueError, match=r"missing \['mlp_dim'\]; unknown \['mlp'\]"):
        make_classifier(config.model)
    assert converters.converter_for("vit_s16")[0] is vit_convert.convert_vit
    assert converters.converter_for("vit")[0] is vit_convert.convert_vit


def test_mlp_uses_exact_gelu():
    """timm's nn.GELU is erf-based; Flax's default (tanh) differs by up to ~1e-3 at |x| ~ 2."""
    x = jnp.linspace(-4.0, 4.0, 81, dtype=jnp.float32)[None, :, None].repeat(2, axis=-1)
    identity = {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}
    out = vit.Mlp(hidden=2).apply({"params": {"fc1": identity, "fc2": identity}}, x)
    exact = x * 0.5 * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(out, exact, atol=1e-6)
    assert np.max(np.abs(out - jax.nn.gelu(x, approximate=True))) > 1e-4


# ----------------------------------------------------------------------------------------------
# Precision.


def _primitive_dtypes(jaxpr, primitive: str) -> list:
    """The dtype of the first operand of every ``primitive`` in a jaxpr and its sub-jaxprs."""
    dtypes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            dtypes.append(eqn.invars[0].aval.dtype)
        for param in eqn.params.values():
            for value in param if isinstance(param, tuple) else (param,):
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    dtypes += _primitive_dtypes(value.jaxpr, primitive)
                elif isinstance(value, jax.extend.core.Jaxpr):
                    dtypes += _primitive_dtypes(value, primitive)
    return dtypes


def _random_params(model, image_size=32, seed=0):
    """Params of ``model`` with every leaf random at a scale that keeps activations O(1)."""
    rng = np.random.default_rng(seed)
    shapes = _param_shapes(model, image_size)["params"]

    def draw(path, shape):
        name = ptree.path_of(path)
        if name.endswith("scale"):
            return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
        if name.endswith("kernel"):
            fan_in = np.prod(shape.shape[:-1])
            return (rng.standard_normal(shape.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (rng.standard_normal(shape.shape) * 0.3).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_bfloat16_compute_keeps_params_fp32_and_statistics_fp32():
    fp32 = _tiny(dtype=jnp.float32)
    bf16 = _tiny(dtype=jnp.bfloat16)
    shapes = _param_shapes(bf16)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    params = _random_params(fp32)
    images = _images()
    expected = jax.jit(fp32.apply)({"params": params}, images)
    logits = jax.jit(bf16.apply)({"params": params}, images)
    assert logits.dtype == jnp.float32
    _assert_close(logits, expected, rtol=5e-2)
    assert not np.allclose(logits, expected, rtol=1e-5, atol=0)
    feats = jax.eval_shape(
        functools.partial(bf16.apply, method="features"), {"params": params}, images
    )
    assert feats.dtype == jnp.bfloat16

    jaxpr = jax.make_jaxpr(bf16.apply)({"params": params}, images).jaxpr
    assert _bfloat16_matmuls(jaxpr) >= 2 * 6  # query, key, value, out, fc1, fc2 per block.
    # Softmax (its exp) and LayerNorm statistics (rsqrt of the variance) run in float32.
    assert _primitive_dtypes(jaxpr, "exp") and set(_primitive_dtypes(jaxpr, "exp")) == {
        jnp.dtype(jnp.float32)
    }
    assert len(_primitive_dtypes(jaxpr, "rsqrt")) == 2 * 2 + 1
    assert set(_primitive_dtypes(jaxpr, "rsqrt")) == {jnp.dtype(jnp.float32)}


def _bfloat16_matmuls(jaxpr) -> int:
    return sum(dtype == jnp.bfloat16 for dtype in _primitive_dtypes(jaxpr, "dot_general"))


# ----------------------------------------------------------------------------------------------
# A PyTorch reference: timm's VisionTransformer (vit_*_patch16_224 defaults), transcribed.


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason=TORCH_REASON)


def _timm_vit(torch, *, num_classes=10, image_size=32, seed=0, **sizes):
    """timm's VisionTransformer with its module names (timm is not a dependency).

    From timm/models/vision_transformer.py (VisionTransformer: class token, pos_embed with the
    class entry, added after the concat; global_pool='token'; no fc_norm), Block, Mlp and
    timm/layers/attention.py (Attention, fused qkv, the non-fused path). Every parameter is
    random (LayerNorm scales and biases, class token and position embeddings included).
    """
    nn = torch.nn
    sizes = {**TINY, **sizes}
    width, depth, heads = sizes["width"], sizes["depth"], sizes["heads"]
    mlp_dim, patch = sizes["mlp_dim"], sizes["patch"]

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, width, patch, patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = heads
            self.head_dim = width // heads
            self.scale = self.head_dim**-0.5
            self.qkv = nn.Linear(width, width * 3, bias=True)
            self.proj = nn.Linear(width, width)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
            return self.proj(x.transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(width, mlp_dim)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(mlp_dim, width)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(width, eps=1e-6)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(width, eps=1e-6)
            self.mlp = Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            num_patches = (image_size // patch) ** 2
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=1e-6)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.norm(self.blocks(x + self.pos_embed))
            return self.head(x[:, 0])

    torch.manual_seed(seed)
    model = VisionTransformer()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif param.ndim >= 2 and name not in ("cls_token", "pos_embed"):
                param.normal_(0.0, (param[0].numel()) ** -0.5)
            else:
                param.normal_(0.0, 0.3)
    return model.eval()


def _numpy_state_dict(model):
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _torch_logits(torch, model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _flax_checkpoint(state_dict, *, heads, prefix, old_names, fold_class_pos):
    """The big_vision / vision_transformer .npz of a timm state_dict: timm._load_weights inverted.

    old_names: vision_transformer's block names (MultiHeadDotProductAttention_1, LayerNorm_2,
    MlpBlock_3) instead of big_vision's (_0, LayerNorm_1, MlpBlock_0). fold_class_pos: big_vision's
    layout, position embeddings of the patches only, the class entry summed into the class token;
    otherwise Transformer/posembed_input/pos_embedding with the class entry.
    """
    width = state_dict["cls_token"].shape[-1]
    head_dim = width // heads
    mha, ln2, mlp = (1, 2, 3) if old_names else (0, 1, 0)
    pos, cls = state_dict["pos_embed"], state_dict["cls_token"]
    out = {
        "embedding/kernel": state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state_dict["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": state_dict["norm.weight"],
        "Transformer/encoder_norm/bias": state_dict["norm.bias"],
        "head/kernel": state_dict["head.weight"].T,
        "head/bias": state_dict["head.bias"],
    }
    if fold_class_pos:
        out |= {"cls": cls + pos[:, :1], "pos_embedding": pos[:, 1:]}
    else:
        out |= {"cls": cls, "Transformer/posembed_input/pos_embedding": pos}
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    for i in range(depth):
        block, torch_block = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attention = f"{block}MultiHeadDotProductAttention_{mha}/"
        qkv_w = state_dict[f"{torch_block}attn.qkv.weight"]
        qkv_b = state_dict[f"{torch_block}attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * width, (j + 1) * width)
            out[f"{attention}{name}/kernel"] = qkv_w[rows].T.reshape(width, heads, head_dim)
            out[f"{attention}{name}/bias"] = qkv_b[rows].reshape(heads, head_dim)
        proj_w = state_dict[f"{torch_block}attn.proj.weight"]
        out[f"{attention}out/kernel"] = proj_w.T.reshape(heads, head_dim, width)
        out[f"{attention}out/bias"] = state_dict[f"{torch_block}attn.proj.bias"]
        for flax_norm, torch_norm in (("LayerNorm_0", "norm1"), (f"LayerNorm_{ln2}", "norm2")):
            out[f"{block}{flax_norm}/scale"] = state_dict[f"{torch_block}{torch_norm}.weight"]
            out[f"{block}{flax_norm}/bias"] = state_dict[f"{torch_block}{torch_norm}.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{block}MlpBlock_{mlp}/{dense}/kernel"] = state_dict[
                f"{torch_block}mlp.{fc}.weight"
            ].T
            out[f"{block}MlpBlock_{mlp}/{dense}/bias"] = state_dict[f"{torch_block}mlp.{fc}.bias"]
    return {prefix + key: np.ascontiguousarray(value) for key, value in out.items()}


@pytest.fixture(scope="module")
def reference(torch):
    """(torch model, its numpy state_dict) of a tiny timm ViT at 32x32."""
    model = _timm_vit(torch)
    return model, _numpy_state_dict(model)


# ----------------------------------------------------------------------------------------------
# Conversion.


def test_timm_checkpoint_gives_torch_logits(torch, reference, tmp_path):
    from safetensors.torch import save_file

    torch_model, state_dict = reference
    safetensors_path, npz_path = tmp_path / "vit.safetensors", tmp_path / "vit.npz"
    save_file(torch_model.state_dict(), str(safetensors_path))
    np.savez(npz_path, **state_dict)
    assert "blocks.1.attn.qkv.weight" in state_dict and "pos_embed" in state_dict

    model = _tiny()
    template = _param_shapes(model)["params"]
    from_safetensors = vit_convert.convert_vit(
        validate.read_state_dict(str(safetensors_path)), template
    )
    from_npz = vit_convert.convert_vit(validate.read_state_dict(str(npz_path)), template)
    chex.assert_trees_all_equal(from_safetensors, from_npz)
    chex.assert_trees_all_equal_shapes_and_dtypes(from_npz, template)

    images = _images()
    expected = _torch_logits(torch, torch_model, images)
    assert np.std(expected) > 0.1  # A real signal, not a vanishing one.
    _assert_close(jax.jit(model.apply)({"params": from_npz}, images), expected)
    qkv = state_dict["blocks.0.attn.qkv.weight"]
    np.testing.assert_array_equal(
        from_npz["encoder"]["block0"]["attn"]["key"]["kernel"], qkv[48:96].T
    )


def test_big_vision_layouts_give_the_timm_model(torch, reference, tmp_path):
    torch_model, state_dict = reference
    model = _tiny()
    template = _param_shapes(model)["params"]
    from_timm = vit_convert.convert_vit(state_dict, template)

    # vision_transformer / AugReg names, under an old Flax optimizer's prefix with its state.
    augreg = _flax_checkpoint(
        state_dict, heads=3, prefix="opt/target/", old_names=True, fold_class_pos=False
    )
    augreg["opt/state/step"] = np.zeros((), np.int32)
    path = tmp_path / "augreg.npz"
    np.savez(path, **augreg)
    assert vit_convert.detect_layout(augreg) == "big_vision"
    from_augreg = vit_convert.convert_vit(validate.read_state_dict(str(path)), template)
    chex.assert_trees_all_equal(from_augreg, from_timm)

    # big_vision's own names, and position embeddings without the class entry.
    big_vision = _flax_checkpoint(
        state_dict, heads=3, prefix="params/", old_names=False, fold_class_pos=True
    )
    assert big_vision["params/pos_embedding"].shape == (1, 16, 48)
    from_big_vision = vit_convert.convert_vit(big_vision, template)
    embedding = from_big_vision["embedding"]
    np.testing.assert_array_equal(embedding["pos_embedding"][:, 0], 0.0)
    np.testing.assert_array_equal(embedding["cls"], big_vision["params/cls"])
    images = _images(seed=1)
    _assert_close(
        jax.jit(model.apply)({"params": from_big_vision}, images),
        _torch_logits(torch, torch_model, images),
    )


def _timm_resample_abs_pos_embed(torch, posemb, new_size, num_prefix_tokens=1):
    """timm/layers/pos_embed.py::resample_abs_pos_embed as timm's .npz loader calls it
    (interpolation='bilinear', antialias=False), transcribed."""
    functional = torch.nn.functional
    num_pos_tokens = posemb.shape[1]
    num_new_tokens = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new_tokens == num_pos_tokens and new_size[0] == new_size[1]:
        return posemb
    hw = int(math.sqrt(num_pos_tokens - num_prefix_tokens))
    old_size = hw, hw
    posemb_prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    embed_dim = posemb.shape[-1]
    posemb = posemb.float().reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    posemb = functional.interpolate(posemb, size=new_size, mode="bilinear", antialias=False)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, embed_dim)
    return torch.cat([posemb_prefix, posemb], dim=1)


@pytest.mark.parametrize(("old", "new"), [(4, (6, 6)), (8, (3, 3)), (5, (3, 7)), (4, (4, 4))])
def test_pos_embedding_resampling_matches_timm(torch, old, new):
    posemb = np.random.default_rng(0).standard_normal((1, 1 + old * old, 12)).astype(np.float32)
    expected = _timm_resample_abs_pos_embed(torch, torch.from_numpy(posemb), new).numpy()
    resized = vit_convert.resample_pos_embedding(posemb, new)
    assert resized.shape == (1, 1 + new[0] * new[1], 12) and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])


def test_checkpoint_at_another_image_size_is_resized(torch, reference):
    """A 32-pixel (4x4 grid) checkpoint in a 48-pixel (6x6) model gives timm's resized model."""
    torch_model, state_dict = reference
    model = _tiny()
    params = vit_convert.convert_vit(state_dict, _param_shapes(model, image_size=48)["params"])
    resized = _timm_resample_abs_pos_embed(torch, torch_model.pos_embed.detach(), (6, 6))
    np.testing.assert_allclose(params["embedding"]["pos_embedding"], resized.numpy(), atol=1e-6)

    big_model = _timm_vit(torch, image_size=48)
    big_model.load_state_dict({**torch_model.state_dict(), "pos_embed": resized})
    images = _images(48)
    _assert_close(
        jax.jit(model.apply)({"params": params}, images), _torch_logits(torch, big_model, images)
    )
    # big_vision's grid without the class entry resizes to the same grid.
    big_vision = _flax_checkpoint(
        state_dict, heads=3, prefix="params/", old_names=False, fold_class_pos=True
    )
    from_big_vision = vit_convert.convert_vit(big_vision, _param_shapes(model, 48)["params"])
    pos = from_big_vision["embedding"]["pos_embedding"]
    np.testing.assert_allclose(pos[:, 1:], resized.numpy()[:, 1:], atol=1e-6)
    np.testing.assert_array_equal(pos[:, 0], 0.0)


# ----------------------------------------------------------------------------------------------
# Conversion errors.


def test_missing_unexpected_and_mismatched_keys_are_all_listed(reference):
    _, state_dict = reference
    state_dict = dict(state_dict)
    missing = ["blocks.0.norm2.bias", "blocks.1.mlp.fc1.weight", "cls_token"]
    for key in missing:
        del state_dict[key]
    state_dict["blocks.2.norm1.weight"] = np.ones(48, np.float32)
    state_dict["fc_norm.weight"] = np.ones(48, np.float32)
    state_dict["blocks.1.attn.qkv.weight"] = np.zeros((96, 48), np.float32)

    template = _param_shapes(_tiny(num_classes=5))["params"]
    with pytest.raises(ValueError) as error:
        vit_convert.convert_vit(state_dict, template)
    message = str(error.value)
    assert "timm-layout" in message and "no key holds a '/'" in message
    assert "3 keys missing" in message and "2 checkpoint keys have no place" in message
    for key in [*missing, "blocks.2.norm1.weight", "fc_norm.weight"]:
        assert key in message
    assert "3 shapes differ" in message and "transfer.reinit=('head',)" in message
    # One line per checkpoint key, though query, key and value all read the fused qkv.
    qkv_lines = [line for line in message.splitlines() if "blocks.1.attn.qkv.weight" in line]
    assert len(qkv_lines) == 1
    assert "encoder/block1/attn/" in qkv_lines[0]
    assert "template (48, 48) needs blocks.1.attn.qkv.weight of shape (144, 48)" in qkv_lines[0]
    assert "checkpoint has (96, 48)" in qkv_lines[0]
    assert "head/kernel: template (48, 5) needs head.weight of shape (5, 48)" in message
    assert "checkpoint has (10, 48)" in message


def test_excluded_layers_are_kept_and_not_read(reference):
    _, state_dict = reference
    template = _random_params(_tiny(num_classes=5))
    params = vit_convert.convert_vit(state_dict, template, exclude=("head", "encoder/block1"))
    assert params["head"]["kernel"] is template["head"]["kernel"]
    assert (
        params["encoder"]["block1"]["mlp"]["fc1"]["bias"]
        is template["encoder"]["block1"]["mlp"]["fc1"]["bias"]
    )
    np.testing.assert_array_equal(
        params["encoder"]["block0"]["mlp"]["fc1"]["kernel"], state_dict["blocks.0.mlp.fc1.weight"].T
    )
    # Excluded layers' keys may be absent or mis-shaped; the others are still checked.
    partial = {k: v for k, v in state_dict.items() if not k.startswith("blocks.1.")}
    vit_convert.convert_vit(partial, template, exclude=("head", "encoder/block1"))
    with pytest.raises(ValueError, match=r"1 keys missing[\s\S]*blocks\.0\.norm1\.bias"):
        del partial["blocks.0.norm1.bias"]
        vit_convert.convert_vit(partial, template, exclude=("head", "encoder/block1"))


def test_big_vision_errors_and_pre_logits(reference):
    _, state_dict = reference
    checkpoint = _flax_checkpoint(
        state_dict, heads=3, prefix="params/", old_names=False, fold_class_pos=True
    )
    checkpoint["params/pre_logits/kernel"] = np.zeros((48, 48), np.float32)
    checkpoint["params/pre_logits/bias"] = np.zeros((48,), np.float32)
    template = _param_shapes(_tiny())["params"]
    with pytest.raises(ValueError) as error:
        vit_convert.convert_vit(checkpoint, template)
    assert "big_vision-layout" in str(error.value) and "params/pre_logits/kernel" in str(
        error.value
    )
    # A re-initialised head drops the representation layer, as timm does.
    vit_convert.convert_vit(checkpoint, template, exclude=("head",))

    del checkpoint["params/pre_logits/kernel"], checkpoint["params/pre_logits/bias"]
    checkpoint["params/pos_embedding"] = np.zeros((1, 15, 48), np.float32)
    kernel = "params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    checkpoint[kernel] = np.zeros((48, 3, 8), np.float32)
    with pytest.raises(ValueError) as error:
        vit_convert.convert_vit(checkpoint, template)
    message = str(error.value)
    assert "2 shapes differ" in message
    assert f"needs {kernel} of shape (48, heads, 48 / heads), checkpoint has (48, 3, 8)" in message
    assert "square grid g x g, checkpoint has (1, 15, 48)" in message


def test_templates_that_are_not_vits_are_refused(reference):
    _, state_dict = reference
    from tljax.models import resnet

    template = _param_shapes(resnet.resnet18(width=8))["params"]
    # All 41 modules of a ResNet-18 but its head (which a ViT has too).
    with pytest.raises(
        ValueError,
        match=r"40 template paths have no ViT counterpart \(e\.g\. \['stage1/block0/conv1'",
    ):
        vit_convert.convert_vit(state_dict, template)
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        vit_convert.convert_vit(state_dict, _param_shapes(_tiny()))
    # A non-square model grid cannot take a resized checkpoint grid.
    wide = jax.eval_shape(
        _tiny().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.float32)
    )["params"]
    with pytest.raises(ValueError, match="not a square grid"):
        vit_convert.convert_vit(state_dict, wide)


# ----------------------------------------------------------------------------------------------
# Through the trainer: fine-tuning from a converted timm checkpoint.


@pytest.mark.slow
def test_finetune_from_timm_checkpoint(torch, data_dir, tmp_path):
    """A tiny ViT made at 56x56 (8x8 grid of 7x7 patches) fine-tuned on 28x28 digits (4x4)."""
    import orbax.checkpoint as ocp
    from safetensors.torch import save_file

    from configs import pretrain
    from tljax import train

    sizes = dict(TINY, patch=7)
    torch_model = _timm_vit(torch, num_classes=1000, image_size=56, **sizes)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(torch_model.state_dict(), str(path))

    config = pretrain.get_config()
    config.data.data_dir = data_dir
    config.model.name = "vit"
    config.model.vit = sizes
    config.transfer = dict(init_from=str(path), reinit=("head",))
    config.train.steps, config.train.batch_size = 3, 8
    config.eval.every = config.checkpoint.every = 3
    config.eval.batch_size = 500
    results = train.train_and_evaluate(config, str(tmp_path / "run"))

    template = _param_shapes(vit.ViT(num_classes=10, **sizes), image_size=28)["params"]
    converted = vit_convert.convert_vit(_numpy_state_dict(torch_model), template, exclude=("head",))
    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    tuned = manager.restore(3, args=ocp.args.StandardRestore())["params"]
    assert tuned["embedding"]["pos_embedding"].shape == (1, 17, 48)
    assert np.any(tuned["head"]["kernel"] != 0)  # The zero-initialised head trained.
    body = [p for p in _flat(converted) if not p.startswith("head/")]
    changes = [np.max(np.abs(_flat(tuned)[p] - _flat(converted)[p])) for p in body]
    scales = [np.max(np.abs(_flat(converted)[p])) for p in body]
    assert max(changes) > 0  # The body trains...
    assert all(c < 0.1 * s for c, s in zip(changes, scales, strict=True))  # ...from the checkpoint.
    assert results["num_params"] == sum(leaf.size for leaf in jax.tree.leaves(template))


def test_inception_normalisation_maps_unit_images_to_plus_minus_one():
    from tljax.data import preprocess

    images = jnp.asarray([[[[0.0, 0.5, 1.0]]]])
    np.testing.assert_allclose(preprocess.normalize(images, "inception"), [[[[-1.0, 0.0, 1.0]]]])
