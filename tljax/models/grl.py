"""Gradient reversal layer (Ganin & Lempitsky 2015)."""

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
