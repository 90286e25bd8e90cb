"""Helpers shared by the tests (fixtures live in conftest.py): `from helpers import shrink`."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


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


def conv_operand_dtypes(jaxpr) -> list:
    """The input dtype of every convolution in a jaxpr and its sub-jaxprs.

    Args:
      jaxpr: a ``jax.extend.core.Jaxpr`` (e.g. ``jax.make_jaxpr(f)(*args).jaxpr``).

    Returns:
      The dtype of the first operand of each ``conv_general_dilated``, in program order.
    """
    dtypes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            dtypes.append(eqn.invars[0].aval.dtype)
        for param in eqn.params.values():
            # lax.cond keeps its branches as a tuple of jaxprs.
            for value in param if isinstance(param, tuple) else (param,):
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    dtypes += conv_operand_dtypes(value.jaxpr)
                elif isinstance(value, jax.extend.core.Jaxpr):
                    dtypes += conv_operand_dtypes(value)
    return dtypes


def variable_shapes(model, image_size=32, **apply_kwargs):
    """The variables of ``model.init`` on two square RGB images, as ShapeDtypeStructs (traced,
    never compiled)."""
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, **apply_kwargs), jax.random.key(0), images)


def flat(tree) -> dict:
    """A nested dict as ``{'a/b/c': leaf}``."""
    return traverse_util.flatten_dict(tree, sep="/")


def assert_close_to_scale(actual, desired, rtol=1e-4):
    """Closeness with a tolerance relative to the largest reference entry (the logit scale)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = max(float(np.max(np.abs(desired))), 1e-6)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)
