"""Every config loads; variants and overrides reach the trainer; launch.py works."""

import glob
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import conv_operand_dtypes, shrink

from tljax import methods
from tljax.config_utils import parse_arg
from tljax.data.pipeline import host_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_")  # __init__.py, shared blocks (_common.py)
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_with_its_required_blocks(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    for block in (
        "method",
        "seed",
        "data",
        "model",
        "train",
        "optimizer",
        "lr",
        "eval",
        "checkpoint",
    ):
        assert block in config, f"configs/{name}.py has no {block!r}"


def test_variants():
    from configs import dann, source_only, target_only

    assert dann.get_config("data=full").data.source == "mnist"
    assert dann.get_config("seed=3").seed == 3
    assert not source_only.get_config().dann.adversarial
    assert target_only.get_config().data.source == "embedded_digits/mnist_m"


def test_unknown_variant_key_is_named():
    with pytest.raises(ValueError, match="Unknown config variant key 'dta'"):
        parse_arg("dta=full", data="embedded")
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_arg("full", data="embedded")
    with pytest.raises(ValueError, match="not a boolean"):
        parse_arg("adversarial=maybe", adversarial=True)


# Runs launch.py (argv[1:] are its flags) with the modules in argv[0] made unimportable.
_LAUNCH_WITHOUT = """
import runpy, sys
sys.path.insert(0, ".")
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # Importing it now raises ImportError.
sys.argv = ["launch.py", *sys.argv[2:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def _launch_tiny_dann(workdir, data_dir, *flags, config="configs/dann.py", env=None, without=()):
    """Runs launch.py on `config` (a DANN config) for 2 steps of 8 + 8 images.

    Args:
      without: modules the run cannot import (as if not installed).

    Returns:
      (the run's stderr, its results.json).
    """
    launch = ["-c", _LAUNCH_WITHOUT, ",".join(without)] if without else ["launch.py"]
    cmd = [
        sys.executable,
        *launch,
        f"--config={config}",  # Before the --config.* overrides.
        "--config.train.steps=2",
        "--config.train.batch_size=8",
        "--config.eval.batch_size=500",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *flags,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=ROOT, check=True, env=env, capture_output=True, text=True, timeout=300
    )
    return proc.stderr, json.loads((workdir / "results.json").read_text())


def test_launch_runs_a_variant_with_overrides(data_dir, tmp_path):
    _, results = _launch_tiny_dann(tmp_path / "run", data_dir, config="configs/dann.py:seed=2")
    assert results["seed"] == 2 and results["steps"] == 2
    assert results["config"]["train"]["batch_size"] == 8


def test_launch_trains_on_exported_splits_without_tensorflow(data_dir, tmp_path):
    """An accelerator image without TensorFlow, tfds or clu runs the same experiment on splits
    exported where tfds works, and logs its metrics instead of writing TensorBoard events."""
    from configs import dann
    from tljax.data import exported

    config = dann.get_config()
    config.data.data_dir = data_dir
    arrays = tmp_path / "arrays"
    exported.export_splits(config, str(arrays))

    _, with_tfds = _launch_tiny_dann(tmp_path / "tfds", data_dir)
    log, without_tf = _launch_tiny_dann(
        tmp_path / "arrays_run",
        arrays,
        without=("tensorflow", "tensorflow_datasets", "clu"),
    )
    assert without_tf["final"] == with_tfds["final"]
    assert "No TensorBoard events for this run" in log
    assert "target_test/accuracy=" in log
    assert not glob.glob(str(tmp_path / "arrays_run" / "events.out.tfevents.*"))


def test_launch_rejects_unknown_config_field(tmp_path):
    cmd = [
        sys.executable,
        "launch.py",
        "--config=configs/dann.py",
        "--config.train.stesp=2",
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "stesp" in proc.stderr


def test_a_second_run_loads_the_train_step_from_the_compilation_cache(data_dir, tmp_path):
    cache = tmp_path / "cache"
    # --compilation_cache wins over the tests' JAX_COMPILATION_CACHE_DIR. Cache even this tiny
    # step (it compiles in under the default 1 s threshold), and log hits.
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_LOG_COMPILES": "1"}
    flags = (f"--compilation_cache={cache}",)
    first_log, first = _launch_tiny_dann(tmp_path / "first", data_dir, *flags, env=env)
    assert "cache hit for 'jit_train_step'" not in first_log
    assert any(p.name.startswith("jit_train_step-") for p in cache.iterdir())
    second_log, second = _launch_tiny_dann(tmp_path / "second", data_dir, *flags, env=env)
    assert "Persistent compilation cache hit for 'jit_train_step'" in second_log
    assert second["final"] == first["final"]


def test_compilation_cache_dir_resolution(monkeypatch):
    from launch import DEFAULT_COMPILATION_CACHE, compilation_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compilation_cache_dir(None) == os.path.expanduser(DEFAULT_COMPILATION_CACHE)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/from_env")
    assert compilation_cache_dir(None) == "/tmp/from_env"
    assert compilation_cache_dir("~/c") == os.path.expanduser("~/c")
    assert compilation_cache_dir("") is None


# Every config variant that trains a convnet on the embedded digits.
CONVNET_VARIANTS = [
    ("dann", None),
    ("source_only", None),
    ("target_only", None),
    ("pretrain", None),
    ("finetune", None),
    ("layer_transfer", None),
    ("multitask", None),
    ("progressive", None),
    ("self_taught", "stage=classify,features=scratch"),
    ("zeroshot", None),
]


def test_convnet_variants_cover_every_config():
    assert {name for name, _ in CONVNET_VARIANTS} == set(CONFIGS)


@pytest.mark.parametrize("name, variant", CONVNET_VARIANTS)
def test_model_conv_operands_reaches_every_convolution(name, variant, data_dir):
    """--config.model.conv_operands=bfloat16 gives every conv of the method's loss bf16 operands."""
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config = shrink(config, data_dir, batch_size=8)
    # 'xla' keeps one conv primitive per layer, whose operand dtype the jaxpr shows.
    config.model.conv_impl = "xla"
    config.model.conv_operands = "bfloat16"
    method = methods.build(config)
    params = method.init_params(jax.random.key(0))
    batch = host_batch(method.train_streams, seed=0, step=0)
    jaxpr = jax.make_jaxpr(method.loss_fn)(params, batch, jax.random.key(1), 0).jaxpr
    dtypes = conv_operand_dtypes(jaxpr)
    assert dtypes, f"configs/{name}.py: no convolution in the loss"
    assert set(dtypes) == {jnp.dtype(jnp.bfloat16)}, dtypes


@pytest.mark.parametrize("field, value", [("conv_impl", "cudnn"), ("conv_operands", "float16")])
def test_unknown_conv_setting_fails_when_the_method_is_built(field, value, data_dir):
    from configs import multitask

    config = shrink(multitask.get_config(), data_dir)
    config.model[field] = value
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        methods.build(config)
