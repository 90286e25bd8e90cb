"""Learning-rate schedules and optimizers, built from config."""

import jax.numpy as jnp
import ml_collections
import optax


def progress(step, total_steps: int):
    """Training progress p in [0, 1] (Ganin & Lempitsky's p).

    Args:
      step: current step (int or traced scalar).
      total_steps: steps in the whole run.

    Returns:
      step / total_steps as float32, clipped to [0, 1].
    """
    return jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)


def dann_annealing(base: float, alpha: float, beta: float, total_steps: int) -> optax.Schedule:
    """lr_p = base / (1 + alpha p)^beta, the DANN paper's annealing.

    Args:
      base: lr at p = 0 (mu_0).
      alpha: annealing speed (10 in the paper).
      beta: annealing exponent (0.75 in the paper).
      total_steps: steps in the run (defines p).

    Returns:
      An optax schedule, step -> learning rate.
    """
    return lambda step: base / (1.0 + alpha * progress(step, total_steps)) ** beta


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule named by `config.schedule`.

    Args:
      config: the `lr` config block: schedule in {'constant', 'dann', 'cosine'}, base,
        and the schedule's own fields (alpha, beta for 'dann'; warmup_steps for 'cosine').
      total_steps: steps in the run.

    Returns:
      An optax schedule.

    Raises:
      ValueError: for an unknown schedule name.
    """
    if config.schedule == "constant":
        return optax.constant_schedule(config.base)
    if config.schedule == "dann":
        return dann_annealing(config.base, config.alpha, config.beta, total_steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.base, config.get("warmup_steps", 0), max(total_steps, 1)
        )
    raise ValueError(f"Unknown lr.schedule {config.schedule!r}; use constant, dann or cosine.")


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
    """Optimizer named by `config.name` ('sgd' or 'adamw').

    Args:
      config: the `optimizer` config block (name, momentum, nesterov, weight_decay).
      schedule: learning-rate schedule.

    Returns:
      An `optax.GradientTransformation`.

    Raises:
      ValueError: for an unknown optimizer name.
    """
    weight_decay = config.get("weight_decay", 0.0)
    if config.name == "sgd":
        parts = [optax.sgd(schedule, momentum=config.get("momentum"), nesterov=config.nesterov)]
        if weight_decay:
            parts.insert(0, optax.add_decayed_weights(weight_decay))
        return optax.chain(*parts)
    if config.name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer.name {config.name!r}; use sgd or adamw.")
