"""Multi-task loss balancing and gradient surgery, as pure functions of per-task values.

Every function here works on stacked per-task quantities (a leading task axis of size T), so the
multi-task method computes all tasks' gradients with one vectorised backward pass and calls these
inside the jitted step; nothing loops over devices.

* fixed weights:           L = sum_i w_i L_i.
* uncertainty weighting:   Kendall, Gal & Cipolla 2018, classification form (their eq. 10) with
                           s_i = log sigma_i^2 learned: L = sum_i exp(-s_i) L_i + s_i / 2.
* GradNorm:                Chen et al. 2018: weights w_i (sum_i w_i = T) learned by minimising
                           sum_i |w_i ||grad_W L_i|| - mean_j(w_j ||grad_W L_j||) r_i^alpha|,
                           r_i the relative inverse training rate of task i.
* PCGrad:                  Yu et al. 2020: each task's gradient is projected onto the normal
                           plane of every other task's gradient it conflicts with (negative dot
                           product), in a random order; the projected gradients are summed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-12


def uncertainty_weighted_loss(losses: jax.Array, log_vars: jax.Array) -> jax.Array:
    """Kendall et al. 2018's loss for classification tasks: sum_i exp(-s_i) L_i + s_i / 2.

    Args:
      losses: [T] per-task losses.
      log_vars: [T] learned log-variances s_i = log sigma_i^2.

    Returns:
      The scalar total. Its minimum over s_i is at exp(s_i) = 2 L_i, so a task whose loss is
      high (noisy) gets a low weight exp(-s_i).
    """
    return jnp.sum(jnp.exp(-log_vars) * losses + 0.5 * log_vars)


def uncertainty_weights(log_vars: jax.Array) -> jax.Array:
    """The effective weight exp(-s_i) each task's loss carries under uncertainty weighting."""
    return jnp.exp(-log_vars)


def normalized_weights(logits: jax.Array) -> jax.Array:
    """GradNorm task weights w = T softmax(logits): positive and summing to T by construction.

    Chen et al. renormalise the weights to sum to T after every update; parametrising them
    through a softmax keeps the same constraint exactly at every step without a post-update hook
    (the trainer owns the optimizer).

    Args:
      logits: [T] unconstrained parameters.

    Returns:
      [T] weights, sum T.
    """
    return logits.shape[0] * jax.nn.softmax(logits)


def gradnorm_loss(
    weights: jax.Array,
    layer_grad_norms: jax.Array,
    losses: jax.Array,
    initial_losses: jax.Array,
    alpha: float,
) -> jax.Array:
    """GradNorm's auxiliary loss L_grad (Chen et al. 2018, eq. 2), differentiable in `weights`.

    Args:
      weights: [T] task weights w_i.
      layer_grad_norms: [T] ||grad_W L_i|| on the chosen shared layer W (unweighted).
      losses: [T] current task losses L_i(t).
      initial_losses: [T] reference losses L_i(0).
      alpha: restoring-force strength (Chen et al. use 0.12 to 3; 0 equalises gradient norms).

    Returns:
      sum_i |G_i - G_mean r_i^alpha| with G_i = w_i ||grad_W L_i||; the target G_mean r_i^alpha
      is a constant (no gradient flows into it), as in the paper.
    """
    weighted_norms = weights * layer_grad_norms
    loss_ratios = losses / initial_losses
    inverse_rates = loss_ratios / jnp.mean(loss_ratios)
    targets = jax.lax.stop_gradient(jnp.mean(weighted_norms) * inverse_rates**alpha)
    return jnp.sum(jnp.abs(weighted_norms - targets))


def pcgrad(task_grads: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PCGrad gradient surgery (Yu et al. 2020, Algorithm 1) on flattened per-task gradients.

    For every task i, in a random order of the other tasks j: if g_i . g_j < 0, then
    g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j, where g_j is task j's *original* gradient.

    Args:
      task_grads: [T, P] one flattened gradient per task.
      rng: PRNG key for the projection orders.

    Returns:
      (the sum of the projected gradients [P], conflicts [T, T] bool: whether task i's gradient
      was projected away from task j's).
    """
    num_tasks = task_grads.shape[0]
    orders = jax.vmap(lambda key: jax.random.permutation(key, num_tasks))(
        jax.random.split(rng, num_tasks)
    )
    squared_norms = jnp.sum(task_grads * task_grads, axis=1)

    def project_task(grad, order, task):
        def project_away(current, other):
            dot = jnp.dot(current, task_grads[other])
            conflict = (dot < 0) & (other != task)
            step = dot / jnp.maximum(squared_norms[other], _EPS)
            return jnp.where(conflict, current - step * task_grads[other], current), conflict

        projected, conflicts_in_order = jax.lax.scan(project_away, grad, order)
        conflicts = jnp.zeros(num_tasks, bool).at[order].set(conflicts_in_order)
        return projected, conflicts

    projected, conflicts = jax.vmap(project_task)(task_grads, orders, jnp.arange(num_tasks))
    return projected.sum(0), conflicts


def cosine_matrix(task_grads: jax.Array) -> jax.Array:
    """[T, T] cosine similarity between the tasks' flattened gradients (0 for a zero gradient).

    Args:
      task_grads: [T, P] one flattened gradient per task.

    Returns:
      The symmetric matrix of cosines, ones on the diagonal for non-zero gradients.
    """
    norms = jnp.linalg.norm(task_grads, axis=1)
    dots = task_grads @ task_grads.T
    return dots / jnp.maximum(norms[:, None] * norms[None, :], _EPS)
