"""Shared test setup: 4 virtual CPU devices, one prepared copy of the offline data.

Fixtures live here; helper functions that tests import live in helpers.py.
"""

import os
import sys

# Must happen before JAX starts its backend: every test process sees 4 CPU devices,
# so sharded code paths run for real; single-device tests select one of them.
import jax

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
from helpers import shrink  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds data_dir holding the embedded digit pair, built once per session."""
    path = str(tmp_path_factory.mktemp("tfds"))
    from tljax import data

    for name in ("embedded_digits/mnist", "embedded_digits/mnist_m"):
        data.load_split(name, "train", path)
    return path


@pytest.fixture
def tiny_dann_config(data_dir):
    """configs/dann.py shrunk to a few small steps on the embedded data."""
    from configs import dann

    return shrink(dann.get_config(), data_dir, steps=6, eval_every=3, eval_batch_size=200)


@pytest.fixture
def tiny_da_config(data_dir):
    """configs/da.py (DANN recipe) shrunk to a few small steps on the embedded data.

    Set ``config.da.terms`` (and the term's block) to try another term.
    """
    from configs import da

    config = da.get_config("method=dann")
    config.eval.validator_examples = 64
    return shrink(config, data_dir, steps=6, eval_every=3, eval_batch_size=200)
