"""LoRA (tljax/lora.py) and the BitFit / head-only presets (tljax/transfer.py).

The reference is microsoft/LoRA ``loralib/layers.py`` (``Linear``): its init, scaling and
forward are transcribed below in PyTorch.
"""

import dataclasses
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import shrink

from tljax import lora, methods, optim, parallel, train, transfer
from tljax import params as ptree
from tljax.models.digits import DigitNet
from tljax.models.vit import ViT

IMAGE = (8, 8, 3)
VIT = ViT(num_classes=5, width=12, depth=2, heads=2, mlp_dim=24, patch=4)
QV = [f"encoder/block{i}/attn/{p}" for i in range(2) for p in ("query", "value")]


def _vit_init(rng):
    return VIT.init(rng, jnp.zeros((1, *IMAGE)))["params"]


def _digits_init(rng):
    return DigitNet(num_classes=10).init(rng, jnp.zeros((1, 28, 28, 3)))["params"]


def _plan(init, **fields):
    config = ml_collections.ConfigDict(dict(model=dict(name="test"), transfer=fields))
    return transfer.make_plan(config, init, jax.random.key(0))


def _vit_method() -> methods.Method:
    def loss_fn(params, batch, rng, step):
        del rng, step
        logits = VIT.apply({"params": params}, batch["image"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return losses.mean(), {}

    def eval_fn(params, batch):
        logits = VIT.apply({"params": params}, batch["image"])
        return methods.classification_sums(logits, batch["label"], batch["mask"])

    return methods.Method(_vit_init, loss_fn, eval_fn, train_streams=(), eval_sets={})


def _batch(n=8):
    images = jax.random.uniform(jax.random.key(3), (n, *IMAGE))
    return {"image": images, "label": jnp.arange(n) % 5, "mask": jnp.ones(n)}


def _flat(tree) -> dict:
    return {ptree.path_of(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _as_if_trained(params, rng):
    """Params as training leaves them: B (and the ViT's zero-initialised head) no longer zero."""
    flat = _flat(params)
    for path in flat:
        if path.endswith("/lora_b") or path == "head/kernel":
            rng, key = jax.random.split(rng)
            flat[path] = jax.random.normal(key, flat[path].shape)
    return jax.tree_util.tree_map_with_path(lambda kp, _: flat[ptree.path_of(kp)], params)


# ---------------------------------------------------------- loralib, in torch ----


def _loralib_linear(torch, in_features, out_features, r, lora_alpha):
    """loralib.layers.Linear (fan_in_fan_out=False), as a function of its hyper-parameters."""
    nn_torch = torch.nn

    class Linear(nn_torch.Linear):
        def __init__(self):
            nn_torch.Linear.__init__(self, in_features, out_features)
            self.r = r
            self.lora_alpha = lora_alpha
            self.lora_A = nn_torch.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn_torch.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            self.reset_parameters()

        def reset_parameters(self):
            nn_torch.Linear.reset_parameters(self)
            if hasattr(self, "lora_A"):
                nn_torch.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn_torch.init.zeros_(self.lora_B)

        def forward(self, x):
            result = torch.nn.functional.linear(x, self.weight, bias=self.bias)
            result += (x @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling
            return result

        def merged_weight(self):
            return self.weight.data + (self.lora_B @ self.lora_A) * self.scaling

    return Linear()


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 8.0), (8, 16.0), (6, 3.0)])
def test_merge_equals_loralib_linear(rank, alpha):
    torch = pytest.importorskip("torch")
    torch.manual_seed(rank)
    reference = _loralib_linear(torch, 10, 7, rank, alpha)
    with torch.no_grad():
        reference.lora_B.normal_()  # Trained adapters: B away from its zero init.
    params = {
        "dense": {
            "kernel": reference.weight.detach().numpy().T,
            "bias": reference.bias.detach().numpy(),
            "lora_a": reference.lora_A.detach().numpy(),
            "lora_b": reference.lora_B.detach().numpy(),
        }
    }
    merged = lora.merge(params, alpha)
    assert set(merged["dense"]) == {"kernel", "bias"}
    np.testing.assert_allclose(
        merged["dense"]["kernel"].T, reference.merged_weight().detach(), atol=1e-6
    )
    x = np.random.default_rng(rank).normal(size=(5, 10)).astype(np.float32)
    ours = nn.Dense(7, name="dense").apply({"params": merged["dense"]}, x)
    np.testing.assert_allclose(ours, reference(torch.from_numpy(x)).detach(), atol=1e-5)


def test_adapters_start_as_loralib_and_leave_the_network_as_it_was():
    torch = pytest.importorskip("torch")
    plan = _plan(_vit_init, lora=dict(rank=4, alpha=8))
    method = plan.adapt(_vit_method())
    params = method.init_params(jax.random.key(7))
    flat = _flat(params)
    # loralib: A is (r, in), kaiming_uniform_(a=sqrt(5)); B is (out, r), zeros.
    fan_in = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(4, 12))[0]
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / fan_in)
    a = np.concatenate([np.ravel(flat[f"{layer}/lora_a"]) for layer in QV])
    assert all(flat[f"{layer}/lora_a"].shape == (4, 12) for layer in QV)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert all(np.array_equal(flat[f"{layer}/lora_b"], np.zeros((12, 4))) for layer in QV)
    assert sorted(p for p in flat if lora.is_adapter(p)) == sorted(
        f"{layer}/{name}" for layer in QV for name in ("lora_a", "lora_b")
    )
    # The network's own leaves initialise as without LoRA, and B = 0 starts from it exactly.
    chex.assert_trees_all_equal(lora.strip(params), _vit_init(jax.random.key(7)))
    chex.assert_trees_all_equal(lora.merge(params, 8.0), _vit_init(jax.random.key(7)))


def test_merged_network_equals_the_network_with_adapter_branches():
    """Merging is exact: the merged kernels compute base Dense + loralib's x A^T B^T s."""
    plan = _plan(_vit_init, lora=dict(rank=3, alpha=6, targets=("*attn*kernel", "*mlp/fc1")))
    params = _as_if_trained(
        plan.adapt(_vit_method()).init_params(jax.random.key(1)), jax.random.key(2)
    )
    flat = _flat(params)
    images = _batch()["image"]

    def branch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        layer = "/".join(context.module.scope.path)
        if not isinstance(context.module, nn.Dense) or f"{layer}/lora_a" not in flat:
            return out
        a, b = flat[f"{layer}/lora_a"], flat[f"{layer}/lora_b"]
        return out + (args[0] @ a.T @ b.T) * (6 / 3)

    def features(params):  # The head starts at zero: compare the features it reads.
        return VIT.apply({"params": params}, images, method="features")

    with nn.intercept_methods(branch):
        adapted = features(lora.strip(params))
    merged = features(lora.merge(params, 6.0))
    assert float(jnp.abs(adapted - features(lora.strip(params))).max()) > 1e-2
    np.testing.assert_allclose(merged, adapted, atol=1e-5)


def test_training_moves_only_adapters_and_head():
    """A few AdamW steps (weight decay on) through the trainer's own state and step."""
    plan = _plan(_vit_init, lora=dict(rank=2, alpha=4))
    method = plan.adapt(_vit_method())
    schedule = optax.constant_schedule(0.01)
    optimizer_config = ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.1))
    optimizer = ptree.partition_optimizer(
        optim.make_optimizer(optimizer_config, schedule), plan.labels
    )
    mesh = parallel.make_data_mesh(jax.devices()[:1])
    start = train.create_train_state(method, optimizer, 0, mesh, plan)
    start = jax.tree.map(np.asarray, start)
    step = jax.jit(train.make_train_step(method, optimizer, schedule, plan))
    state = start
    for _ in range(4):
        state, metrics = step(state, _batch())
    assert np.isfinite(float(metrics["loss"]))
    before, after = _flat(start["params"]), _flat(state["params"])
    moved = {path for path in before if np.any(before[path] != after[path])}
    trainable = {p for p in before if lora.is_adapter(p) or p.startswith("head/")}
    assert moved == trainable
    for path in set(before) - trainable:  # Bit for bit, -0.0 included.
        assert before[path].tobytes() == np.asarray(after[path]).tobytes(), path
    # AdamW keeps two moments for the trainable leaves only.
    moments = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
    assert moments == 2 * sum(np.size(before[p]) for p in trainable)


def test_value_and_grad_methods_get_the_adapters_gradients():
    plan = _plan(_vit_init, lora=dict(rank=2, alpha=4, train=()))
    base = _vit_method()
    custom = jax.value_and_grad(base.loss_fn, has_aux=True)
    wrapped = plan.adapt(base)
    via_hook = plan.adapt(dataclasses.replace(base, value_and_grad=custom))
    params = _as_if_trained(wrapped.init_params(jax.random.key(0)), jax.random.key(1))
    args = (params, _batch(), jax.random.key(2), 0)
    (loss, _), grads = jax.jit(via_hook.value_and_grad)(*args)
    reference = jax.jit(jax.value_and_grad(wrapped.loss_fn, has_aux=True))
    (expected_loss, _), expected = reference(*args)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    chex.assert_trees_all_close(grads, expected, atol=1e-6)
    flat = _flat(grads)
    assert all(np.any(flat[p] != 0) for p in flat if lora.is_adapter(p))
    # Frozen leaves enter through stop_gradient: no weight gradients at all.
    assert all(not np.any(flat[p]) for p in flat if not lora.is_adapter(p))


def test_plan_freezes_the_network_but_adapters_and_head():
    plan = _plan(
        _digits_init, lora=dict(rank=4, alpha=8, targets=("label/dense_0", "label/dense_1"))
    )
    labels = _flat(plan.labels)
    trained = sorted(p for p, label in labels.items() if label != ptree.FROZEN)
    assert trained == sorted(
        [f"label/dense_{i}/lora_{x}" for i in (0, 1) for x in "ab"]
        + ["label/dense_2/bias", "label/dense_2/kernel"]
    )
    assert not any(jax.tree.leaves(plan.copied))
    assert "| label/dense_0 | bias[100], kernel[768, 100], lora_a[4, 768], lora_b[100, 4] |" in (
        plan.summary
    )
    assert "| 80,372 | new | frozen 76,900, trained 3,472 |" in plan.summary
    trainable = 4 * 768 + 100 * 4 + 4 * 100 + 100 * 4 + 1010
    total = 128_890 + 4 * 768 + 100 * 4 + 4 * 100 + 100 * 4
    assert plan.summary.endswith(
        f"trainable: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    )


@pytest.mark.parametrize(
    "fields, expected",
    [
        # BitFit: every bias (LayerNorm's too, as in BERT) and the head.
        (dict(preset="bitfit"), lambda p: p.endswith("/bias") or p.startswith("head/")),
        (dict(preset="head_only"), lambda p: p.startswith("head/")),
        (dict(preset="head_only", head="encoder/norm"), lambda p: p.startswith("encoder/norm/")),
        (
            dict(preset="bitfit", freeze=("encoder/block0",)),
            lambda p: (p.endswith("/bias") and "block0" not in p) or p.startswith("head/"),
        ),
        (
            dict(preset="head_only", lora=dict(rank=2, train=())),
            lambda p: p.startswith("head/") or lora.is_adapter(p),
        ),
    ],
)
def test_presets_train_exactly_the_expected_leaves(fields, expected):
    labels = _flat(_plan(_vit_init, **fields).labels)
    assert {p for p, label in labels.items() if label != ptree.FROZEN} == {
        p for p in labels if expected(p)
    }


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(preset="bitfitt"),
            r"transfer.preset='bitfitt'; use one of \['bitfit', 'head_only'\]",
        ),
        (dict(lora=dict(rank=4, alph=8)), r"Unknown transfer.lora field\(s\) \['alph'\]"),
        (dict(lora=dict(rank=0)), "transfer.lora.rank=0: must be a positive integer"),
        (dict(lora=dict(alpha=-1)), "transfer.lora.alpha=-1: must be a positive number"),
        (dict(lora=dict(dropout=0.1)), "transfer.lora.dropout=0.1: only 0 is supported"),
        (dict(lora=dict(targets=())), "transfer.lora.targets is empty"),
        (
            dict(lora=dict(targets=("embedding/patch",))),
            r"'embedding/patch' reaches no Dense kernel",
        ),
        (
            dict(lora=dict(targets=("*atn*",))),
            r"transfer.lora.targets: Pattern '\*atn\*' matches no",
        ),
        (dict(preset="head_only", head="last:0"), "freezes every parameter"),
    ],
)
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        _plan(_vit_init, **fields)


def test_a_lora_checkpoint_without_its_config_is_a_clear_error(tmp_path):
    manager = ocp.CheckpointManager(
        str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True)
    )
    layer = {"kernel": np.ones((3, 2), np.float32), "lora_a": np.ones((1, 3), np.float32)}
    manager.save(
        1,
        args=ocp.args.StandardSave(
            {"params": {"dense": layer | {"lora_b": np.ones((2, 1), np.float32)}}}
        ),
    )
    manager.wait_until_finished()
    with pytest.raises(ValueError, match="holds LoRA adapters.*tljax.lora.merge"):
        transfer.load_pretrained(str(tmp_path))


@pytest.mark.slow
def test_lora_finetune_end_to_end(data_dir, tmp_path):
    """pretrain -> LoRA fine-tune with L2-SP (an anchored method) -> the run as init_from."""
    from configs import finetune, pretrain

    source = str(tmp_path / "pretrain")
    train.train_and_evaluate(shrink(pretrain.get_config(), data_dir, steps=2), source)
    tuned = str(tmp_path / "lora")
    config = shrink(
        finetune.get_config(f"variant=l2sp,init_from={source},shots=2"), data_dir, steps=4
    )
    config.transfer.lora = dict(rank=4, alpha=8, targets=("label/dense_0", "label/dense_1"))
    results = train.train_and_evaluate(config, tuned)
    assert np.isfinite(results["final"]["train/l2sp_drift"])
    trainable = 4 * 768 + 100 * 4 + 4 * 100 + 100 * 4 + 1010
    assert results["num_params"] - results["num_frozen_params"] == trainable

    def state(workdir):
        manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
        return manager.restore(manager.latest_step())

    pretrained, final = _flat(state(source)["params"]), state(tuned)
    after, start = _flat(final["params"]), _flat(final["start_params"])
    for path, value in pretrained.items():
        if not path.startswith("label/dense_2/"):
            assert value.tobytes() == after[path].tobytes(), path
    for path in ("label/dense_2/kernel", "label/dense_0/lora_a", "label/dense_1/lora_b"):
        assert np.any(after[path] != start[path]), path
    assert not np.any(start["label/dense_0/lora_b"])

    # The LoRA run reads back as the plain network, adapters merged with its recorded alpha.
    merged = transfer.load_pretrained(tuned)
    expected = lora.merge(final["params"], 8.0)
    chex.assert_trees_all_close(merged, jax.tree.map(np.asarray, expected), atol=0)
    assert not lora.holds_adapters(merged)
    assert np.any(merged["label"]["dense_0"]["kernel"] != pretrained["label/dense_0/kernel"])
