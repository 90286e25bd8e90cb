"""Gradient reversal layer and its schedule (Ganin & Lempitsky 2015)."""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def gradient_reversal(x: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Identity on the forward pass; multiplies the incoming gradient by -scale.

    Args:
      x: any array (typically features entering the domain classifier).
      scale: the reversal strength lambda (a scalar, may be traced).

    Returns:
      `x` unchanged.
    """
    del scale
    return x


def _grl_fwd(x, scale):
    return x, scale


def _grl_bwd(scale, g):
    # The schedule, not the loss, owns lambda: no gradient flows into it.
    return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def grl_lambda(p, gamma: float = 10.0) -> jax.Array:
    """The paper's reversal schedule, 2 / (1 + exp(-gamma p)) - 1: 0 at p=0, ~1 at p=1.

    Args:
      p: training progress in [0, 1] (``tljax.optim.progress``).
      gamma: steepness (10 in the paper).

    Returns:
      lambda_p as float32.
    """
    return 2.0 / (1.0 + jnp.exp(-gamma * jnp.asarray(p, jnp.float32))) - 1.0
