"""Conservative training: penalties that keep a fine-tuned network close to where it started.

Pure functions of params trees, logits and features, usable in any method's loss:

* weight level, L2-SP (Li et al. 2018): ``alpha/2 ||w_s - w0_s||^2`` over transferred weights
  plus ``beta/2 ||w_new||^2`` over new ones;
* output level (LwF / distillation): the KL divergence from the starting network's softened
  predictions to the fine-tuned network's, scaled by ``T^2`` so its gradient does not shrink
  with the temperature (Hinton et al. 2015);
* feature level (DELTA without attention, Li et al. 2019): the squared L2 distance between the
  two networks' intermediate features.
"""

import jax
import jax.numpy as jnp

from tljax.params import Mask, Params


def _sum_squares(tree: Params, mask: Mask) -> jax.Array:
    terms = [
        jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        for leaf, chosen in zip(jax.tree.leaves(tree), jax.tree.leaves(mask), strict=True)
        if chosen
    ]
    return sum(terms, jnp.zeros((), jnp.float32))


def l2_sp(
    params: Params, start: Params, transferred: Mask, alpha: float, beta: float
) -> tuple[jax.Array, jax.Array]:
    """L2-SP: pull transferred weights towards their starting point, decay the new ones.

    Args:
      params: current params.
      start: the params the run started from (the pretrained values on transferred leaves).
      transferred: selection of leaves copied from the pretrained network.
      alpha: weight of the starting-point term.
      beta: weight of the plain L2 term on the leaves that were not transferred.

    Returns:
      (alpha/2 * ||w_s - w0_s||^2, beta/2 * ||w_new||^2) as float32 scalars.
    """
    drift = jax.tree.map(lambda w, w0: w - jax.lax.stop_gradient(w0), params, start)
    new = jax.tree.map(lambda t: not t, transferred)
    return 0.5 * alpha * _sum_squares(drift, transferred), 0.5 * beta * _sum_squares(params, new)


def distillation_kl(logits: jax.Array, start_logits: jax.Array, temperature: float) -> jax.Array:
    """Output-level penalty: T^2 * KL(softmax(start/T) || softmax(logits/T)), batch mean.

    Args:
      logits: [N, C] logits of the network being trained.
      start_logits: [N, C] logits of the starting network on the same inputs.
      temperature: softening temperature T > 0.

    Returns:
      Float32 scalar.
    """
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(start_logits) / temperature)
    student = jax.nn.log_softmax(logits / temperature)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return temperature**2 * jnp.mean(kl).astype(jnp.float32)


def feature_l2(features: jax.Array, start_features: jax.Array) -> jax.Array:
    """Feature-level penalty: 1/2 ||f(x) - f0(x)||^2 per example, batch mean.

    Args:
      features: [N, ...] features of the network being trained.
      start_features: the starting network's features on the same inputs.

    Returns:
      Float32 scalar.
    """
    diff = (features - jax.lax.stop_gradient(start_features)).astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(diff.reshape(len(diff), -1)), axis=-1))
