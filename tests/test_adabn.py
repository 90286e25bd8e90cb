"""tljax.adabn: BatchNorm statistics recomputed on another domain, and the checkpoint it writes."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from helpers import shrink

from configs import pretrain
from tljax import adabn, checkpoints, methods, transfer
from tljax.models.batch_norm import BatchNorm
from tljax.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "embedded_digits/mnist_m"


class TinyNet(nn.Module):
    """conv -> BatchNorm -> relu -> strided conv -> BatchNorm -> pooled Dense."""

    @nn.compact
    def __call__(self, x, capture=False):
        first = nn.Conv(4, (3, 3))(x)
        h = nn.relu(BatchNorm(train=False, name="norm1")(first))
        second = nn.Conv(3, (3, 3), strides=2)(h)
        h = BatchNorm(train=False, name="norm2")(second)
        logits = nn.Dense(5)(h.mean(axis=(1, 2)))
        return (first, second) if capture else logits


def _tiny_params(net, images):
    params = traverse_util.flatten_dict(
        jax.jit(net.init)(jax.random.key(0), images[:1])["params"], sep="/"
    )
    # Source statistics far from the images' own, so that stale ones would show.
    for layer in ("norm1", "norm2"):
        params[f"{layer}/running_mean"] = jnp.full_like(params[f"{layer}/running_mean"], 3.0)
        params[f"{layer}/running_var"] = jnp.full_like(params[f"{layer}/running_var"], 0.05)
    return traverse_util.unflatten_dict(params, sep="/")


def test_recomputed_statistics_are_the_exact_moments_of_each_layers_inputs():
    """Over all images (30, in batches of 7: the last one padded), each layer's inputs computed
    with the earlier layers' new statistics."""
    net = TinyNet()
    images = np.random.default_rng(0).normal(1.0, 2.0, size=(30, 6, 6, 2)).astype(np.float32)
    params = _tiny_params(net, images)

    def apply_fn(p, x):
        return net.apply({"params": p}, x)

    assert adabn.batch_norm_layers(apply_fn, params, images) == ["norm1", "norm2"]
    adapted = adabn.recompute_statistics(apply_fn, params, images, batch_size=7)

    first, second = net.apply({"params": adapted}, images, capture=True)
    for layer, inputs in (("norm1", first), ("norm2", second)):
        values = np.asarray(inputs, np.float64)
        np.testing.assert_allclose(
            adapted[layer]["running_mean"], values.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            adapted[layer]["running_var"], values.var(axis=(0, 1, 2), ddof=1), rtol=1e-5
        )
    # norm2's inputs under the source statistics of norm1 have other moments: order matters.
    _, stale = net.apply({"params": params}, images, capture=True)
    stale_var = np.asarray(stale, np.float64).var(axis=(0, 1, 2), ddof=1)
    assert not np.allclose(adapted["norm2"]["running_var"], stale_var, rtol=1e-2)
    # Nothing else changes.
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        if not path.endswith(("running_mean", "running_var")):
            np.testing.assert_array_equal(
                traverse_util.flatten_dict(adapted, sep="/")[path], leaf, err_msg=path
            )


def test_a_network_without_batch_norm_is_refused():
    net = nn.Dense(3)
    images = np.ones((4, 2), np.float32)
    params = net.init(jax.random.key(0), images)["params"]
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        adabn.recompute_statistics(lambda p, x: net.apply({"params": p}, x), params, images, 2)


# ----------------------------------------------------------------------------------------------
# The run-level function and the command line.


def _source_workdir(path, data_dir, norm="batch", step=5):
    """A workdir as a classifier run leaves it: config.json and a checkpoint (untrained)."""
    config = shrink(pretrain.get_config(), data_dir)
    config.model.update(dict(name="resnet18", width=8, norm=norm))
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    params = methods.build(config).init_params(jax.random.key(0))
    with checkpoints.CheckpointManager(os.path.join(path, "checkpoints")) as manager:
        manager.save(step, args=ocp.args.StandardSave({"params": params, "step": step}))
        manager.wait_until_finished()
    return config, jax.device_get(params)


def test_adabn_writes_a_checkpoint_that_transfer_init_from_loads(data_dir, tmp_path):
    workdir = str(tmp_path / "source")
    config, source = _source_workdir(workdir, data_dir)
    summary = adabn.adapt(workdir, TARGET, "train[:200]", batch_size=64)

    assert summary["out"] == os.path.join(workdir, "adabn", "embedded_digits_mnist_m_train_200")
    assert (summary["step"], summary["images"], summary["layers"]) == (5, 200, 20)
    assert 0.0 <= summary["accuracy_before"] <= 1 and 0.0 <= summary["accuracy_after"] <= 1
    assert "20 BatchNorm layers" in adabn.summary_line(summary)
    with open(os.path.join(summary["out"], adabn.SUMMARY_FILE)) as f:
        assert json.load(f) == summary
    record, _ = checkpoints.read_record(summary["checkpoint"])
    assert "params/stem/norm/running_var" in record["leaves"]

    # The saved statistics are recompute_statistics' on those images; the rest is the source's.
    from tljax import data
    from tljax.models import make_classifier

    model = make_classifier(config.model, for_eval=True)
    preprocess, _ = methods.image_model_fns(model, config.model)
    images = data.load_split(TARGET, "train[:200]", data_dir)["image"]
    expected = adabn.recompute_statistics(
        lambda p, x: model.apply({"params": p}, preprocess(x)), source, images, 64
    )
    loaded = transfer.load_pretrained(summary["out"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loaded, expected)
    assert not np.allclose(loaded["stem"]["norm"]["running_var"], 1.0)
    kernel = loaded["stem"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, source["stem"]["conv"]["kernel"])

    # A fine-tuning run starts from it.
    config.transfer.init_from = summary["out"]
    method = methods.build(config)
    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    started = plan.apply(method.init_params(jax.random.key(1)), plan.pretrained)
    np.testing.assert_array_equal(
        started["stage4"]["block1"]["norm2"]["running_mean"],
        loaded["stage4"]["block1"]["norm2"]["running_mean"],
    )

    with pytest.raises(ConfigError, match="already holds checkpoints"):
        adabn.adapt(workdir, TARGET, "train[:200]", batch_size=64)


def test_adabn_refuses_runs_without_batch_statistics_and_unknown_steps(data_dir, tmp_path):
    affine = str(tmp_path / "affine")
    _source_workdir(affine, data_dir, norm="affine")
    with pytest.raises(ConfigError, match="model.norm='affine'.*model.norm='batch'"):
        adabn.adapt(affine, TARGET)
    batch = str(tmp_path / "batch")
    _source_workdir(batch, data_dir)
    with pytest.raises(adabn.validate.DataError, match=r"--step=4: .* holds steps \[5\]"):
        adabn.adapt(batch, TARGET, step=4)
    with pytest.raises(adabn.validate.DataError, match="has no config.json"):
        adabn.adapt(str(tmp_path), TARGET)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tljax.adabn", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=False,
    )


def test_cli_reports_a_missing_flag_in_one_line():
    result = _cli("--data=mnist")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --workdir is required: a classifier run's workdir."
    )


@pytest.mark.slow
def test_cli_writes_the_adapted_checkpoint(data_dir, tmp_path):
    workdir, out = str(tmp_path / "source"), str(tmp_path / "adapted")
    _source_workdir(workdir, data_dir, step=7)
    result = _cli(f"--workdir={workdir}", f"--data={TARGET}", "--split=train[:64]", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("AdaBN: 20 BatchNorm layers")
    assert transfer.checkpoint_directory(out) == (os.path.join(out, "checkpoints"), 7)
