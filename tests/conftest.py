"""Shared test setup: 4 virtual CPU devices, one prepared copy of the offline data."""

import os
import sys

# Must happen before JAX starts its backend: every test process sees 4 CPU devices,
# so sharded code paths run for real; single-device tests select one of them.
import jax
import jax.extend

jax.config.update("jax_num_cpu_devices", 4)
# Many tests compile the same programs (init, train step); reuse them across tests
# and across the subprocesses the tests start.
_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "tljax_test_jax_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds data_dir holding the embedded digit pair, built once per session."""
    path = str(tmp_path_factory.mktemp("tfds"))
    from tljax import data

    for name in ("embedded_digits/mnist", "embedded_digits/mnist_m"):
        data.load_split(name, "train", path)
    return path


def shrink(config, data_dir, steps=4, eval_every=None, batch_size=16, eval_batch_size=500):
    """A config cut down to a few small steps on the embedded data in `data_dir`.

    Args:
      config: any experiment config (modified in place).
      data_dir: the session's prepared tfds data_dir.
      steps: training steps.
      eval_every: steps between evals and checkpoints (default: only at the end).
      batch_size: global training batch size.
      eval_batch_size: global eval batch size.

    Returns:
      ``config``.
    """
    config.data.data_dir = data_dir
    config.train.steps = steps
    config.train.batch_size = batch_size
    config.train.log_every = max(1, steps // 2)
    config.eval.every = config.checkpoint.every = eval_every or steps
    config.eval.batch_size = eval_batch_size
    return config


@pytest.fixture
def tiny_dann_config(data_dir):
    """configs/dann.py shrunk to a few small steps on the embedded data."""
    from configs import dann

    return shrink(dann.get_config(), data_dir, steps=6, eval_every=3, eval_batch_size=200)


def conv_operand_dtypes(jaxpr) -> list:
    """The input dtype of every convolution in a jaxpr and its sub-jaxprs."""
    dtypes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            dtypes.append(eqn.invars[0].aval.dtype)
        for value in eqn.params.values():
            if isinstance(value, jax.extend.core.ClosedJaxpr):
                dtypes += conv_operand_dtypes(value.jaxpr)
            elif isinstance(value, jax.extend.core.Jaxpr):
                dtypes += conv_operand_dtypes(value)
    return dtypes
