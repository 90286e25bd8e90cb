"""Layer-wise learning-rate decay (transfer.layer_decay): groups, exact multipliers, training.

The reference is BEiT's layer decay as MAE ships it (facebookresearch/mae ``util/lr_decay.py``,
``param_groups_lrd`` and ``get_layer_id_for_vit``), transcribed below over timm parameter names.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import shrink

from tljax import params as ptree
from tljax import transfer
from tljax.models.digits import DigitNet
from tljax.models.resnet import RESNETS
from tljax.models.vit import ViT

DEPTH = 3


# ---------------------------------------------------------------- reference ----


def get_layer_id_for_vit(name, num_layers):
    """MAE util/lr_decay.py (after BEiT's optim_factory), verbatim."""
    if name in ["cls_token", "pos_embed"]:  # noqa: SIM114 (kept verbatim)
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def param_groups_lrd(
    named_ndims, num_blocks, weight_decay=0.05, no_weight_decay_list=(), layer_decay=0.75
):
    """MAE's ``param_groups_lrd``: ``model.named_parameters()`` becomes (name, ndim) pairs and
    ``len(model.blocks)`` ``num_blocks``; the groups hold parameter names."""
    param_groups = {}

    num_layers = num_blocks + 1

    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))

    for n, ndim in named_ndims:
        # no decay: all 1D parameters and model specific ones
        if ndim == 1 or n in no_weight_decay_list:
            g_decay = "no_decay"
            this_decay = 0.0
        else:
            g_decay = "decay"
            this_decay = weight_decay

        layer_id = get_layer_id_for_vit(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)  # noqa: UP031 (verbatim)

        if group_name not in param_groups:
            this_scale = layer_scales[layer_id]

            param_groups[group_name] = {
                "lr_scale": this_scale,
                "weight_decay": this_decay,
                "params": [],
            }

        param_groups[group_name]["params"].append(n)

    return list(param_groups.values())


def beit_scales(named_ndims, num_blocks, layer_decay) -> dict[str, float]:
    """name -> lr_scale of its ``param_groups_lrd`` group."""
    groups = param_groups_lrd(named_ndims, num_blocks, layer_decay=layer_decay)
    return {name: group["lr_scale"] for group in groups for name in group["params"]}


def timm_name(path: str) -> str:
    """timm's name of a tljax ViT leaf (tljax/models/vit.py documents the correspondence)."""
    parts = path.split("/")
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    if parts[0] == "embedding":
        named = {"cls": "cls_token", "pos_embedding": "pos_embed"}
        return named[parts[1]] if parts[1] in named else f"patch_embed.proj.{torch_leaf[parts[-1]]}"
    if parts[0] == "encoder" and parts[1].startswith("block"):
        module = ".".join(parts[2:-1]).replace("attn.query", "attn.qkv")
        module = module.replace("attn.key", "attn.qkv").replace("attn.value", "attn.qkv")
        module = module.replace("attn.out", "attn.proj")
        return f"blocks.{parts[1][len('block') :]}.{module}.{torch_leaf[parts[-1]]}"
    modules = parts[1:-1] if parts[0] == "encoder" else parts[:-1]  # encoder/norm: norm.
    return ".".join([*modules, torch_leaf[parts[-1]]])


# ------------------------------------------------------------------ helpers ----


def _vit_init(rng):
    net = ViT(num_classes=5, width=12, depth=DEPTH, heads=2, mlp_dim=24, patch=4)
    return net.init(rng, jnp.zeros((1, 8, 8, 3)))["params"]


def _digits_init(rng):
    return DigitNet(num_classes=10).init(rng, jnp.zeros((1, 28, 28, 3)))["params"]


def _resnet_init(rng):
    net = RESNETS["resnet18"](num_classes=3, width=4, norm="affine")
    return net.init(rng, jnp.zeros((1, 32, 32, 3)))["params"]


def _plan(init, **fields):
    config = ml_collections.ConfigDict(dict(model=dict(name="test"), transfer=fields))
    return transfer.make_plan(config, init, jax.random.key(0))


def _mults(labels) -> dict[str, float]:
    """path -> learning-rate multiplier read back from the optimizer labels (None: frozen)."""

    def mult(label):
        if label in (ptree.TRAINED, ptree.FROZEN):
            return {ptree.TRAINED: 1.0, ptree.FROZEN: None}[label]
        return float(label[len("lr_x") :])

    return {
        ptree.path_of(kp): mult(label) for kp, label in jax.tree_util.tree_leaves_with_path(labels)
    }


# -------------------------------------------------------------------- tests ----


@pytest.mark.parametrize("decay", [0.75, 0.65, 0.5])
@pytest.mark.parametrize(
    "groups", [(), [("embedding",), "encoder/block{i}"], ["embedding", "encoder/block{i}", "*"]]
)
def test_vit_multipliers_equal_beit_exactly(decay, groups):
    """Default groups, BEiT's written as patterns (the rest last), and overlapping '*' ones."""
    if groups and groups[-1] == "*":
        # '*' first, then the later groups take their leaves back: the same grouping as BEiT.
        groups = ["*", "embedding", "encoder/block{i}", ("encoder/norm", "head")]
    plan = _plan(_vit_init, layer_decay=decay, layer_groups=groups)
    shapes = jax.eval_shape(_vit_init, jax.random.key(0))
    named = [
        (timm_name(ptree.path_of(kp)), len(leaf.shape))
        for kp, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    ]
    expected = beit_scales(named, DEPTH, decay)
    got = {timm_name(path): mult for path, mult in _mults(plan.labels).items()}
    assert got == expected  # Exact floats: the labels carry the multiplier unrounded.
    assert expected["cls_token"] == decay ** (DEPTH + 1) and expected["head.weight"] == 1.0


def test_layer_decay_multiplies_lr_mults_and_yields_to_freeze():
    plan = _plan(
        _vit_init,
        layer_decay=0.75,
        lr_mults={"encoder/block0": 2.0, "head": 0.1},
        freeze=("embedding/patch",),
    )
    mults = _mults(plan.labels)
    assert mults["encoder/block0/mlp/fc1/kernel"] == 0.75**DEPTH * 2.0
    assert mults["encoder/block1/mlp/fc1/kernel"] == 0.75 ** (DEPTH - 1)
    assert mults["head/kernel"] == 0.1 and mults["encoder/norm/scale"] == 1.0
    assert mults["embedding/patch/kernel"] is None  # Frozen: no multiplier applies.
    assert mults["embedding/cls"] == 0.75 ** (DEPTH + 1)


def test_partitioned_optimizer_scales_each_group_exactly():
    plan = _plan(_vit_init, layer_decay=0.75)
    params = _vit_init(jax.random.key(0))
    optimizer = ptree.partition_optimizer(optax.sgd(1.0), plan.labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    for path, mult in _mults(plan.labels).items():
        leaf = updates
        for key in path.split("/"):
            leaf = leaf[key]
        np.testing.assert_array_equal(leaf, np.float32(-mult), err_msg=path)


def test_resnet_and_digit_defaults():
    resnet = _mults(_plan(_resnet_init, layer_decay=0.5).labels)
    stage_of = {"stem": 0, "stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4, "head": 5}
    assert resnet == {path: 0.5 ** (5 - stage_of[path.split("/")[0]]) for path in resnet}
    digits = _mults(_plan(_digits_init, layer_decay=0.5).labels)
    order = ["feature/conv_0", "feature/conv_1", "label/dense_0", "label/dense_1", "label/dense_2"]
    assert digits == {path: 0.5 ** (4 - order.index(ptree.layer_of(path))) for path in digits}


def test_default_groups_of_the_vit_are_beits():
    layers = ptree.layer_order(_vit_init, jax.random.key(0))
    groups = ptree.default_layer_groups(layers)
    assert [g[0] for g in groups] == [
        "embedding",
        *(f"encoder/block{i}/norm1" for i in range(DEPTH)),
        "encoder/norm",
    ]
    assert groups[0] == ["embedding", "embedding/patch"] and groups[-1] == ["encoder/norm", "head"]


def test_summary_shows_the_groups_and_trainable_counts():
    plan = _plan(_digits_init, layer_decay=0.5, freeze=("feature/conv_0",))
    assert (
        "| label/dense_1 | bias[100], kernel[100, 100] | 10,100 | new | lr_x0.5 |" in plan.summary
    )
    assert plan.summary.splitlines()[-1] == "trainable: 126,458 of 128,890 (98.11%)"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layer_decay=0.0), r"layer_decay=0.0: must be a number in \(0, 1\]"),
        (dict(layer_decay=1.5), "layer_decay=1.5"),
        (dict(layer_decay="0.7"), "layer_decay='0.7'"),
        (dict(layer_groups=["embedding"]), "layer_groups needs transfer.layer_decay"),
        (dict(layer_decay=0.7, layer_groups=["encoder/blok{i}"]), "blok.*matches no parameter"),
        (dict(layer_decay=0.7, layer_groups=["embeding"]), "'embeding' matches no parameter"),
    ],
)
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        _plan(_vit_init, **fields)


def _checkpoint_params(workdir):
    import os

    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.restore(manager.latest_step())["params"]


@pytest.mark.slow
def test_finetune_with_layer_decay_scales_each_layers_step(data_dir, tmp_path):
    """configs/pretrain.py -> configs/finetune.py, one step with and one without layer decay.

    The first SGD step is -lr * gradient (the momentum buffer starts at zero), and both runs
    see the same gradient, so each layer's step must be its multiplier times the plain one.
    """
    from configs import finetune, pretrain
    from tljax import train

    source = str(tmp_path / "pretrain")
    train.train_and_evaluate(shrink(pretrain.get_config(), data_dir, steps=2), source)
    steps = {}
    for name, decay in (("plain", None), ("decayed", 0.5)):
        config = shrink(finetune.get_config(f"init_from={source},shots=2"), data_dir, steps=1)
        if decay:
            config.transfer.layer_decay = decay
            config.transfer.lr_mults = {"feature/conv_1": 3.0}
        results = train.train_and_evaluate(config, str(tmp_path / name))
        assert np.isfinite(results["final"]["target_test/accuracy"])
        steps[name] = jax.tree.map(
            lambda a, b: np.asarray(a, np.float64) - b,
            _checkpoint_params(str(tmp_path / name)),
            _checkpoint_params(source),
        )
    mults = {"conv_0": 0.5**4, "conv_1": 0.5**3 * 3.0, "dense_0": 0.25, "dense_1": 0.5}
    mults["dense_2"] = 1.0
    for module in ("feature", "label"):
        for layer, leaves in steps["decayed"][module].items():
            for name, step in leaves.items():
                plain = steps["plain"][module][layer][name]
                assert np.abs(plain).max() > 0
                np.testing.assert_allclose(
                    step, mults[layer] * plain, rtol=1e-3, atol=1e-7, err_msg=f"{layer}/{name}"
                )
