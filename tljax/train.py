"""The one trainer: sharded state, jitted step, loop, eval, checkpoints, results.

Every method reuses `train_and_evaluate` unchanged; a method only supplies its
params, loss, eval and batch layout (`tljax.methods.Method`).
"""

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from tljax import (
    checkpoints,
    collapse,
    host,
    methods,
    optim,
    parallel,
    preemption,
    run_log,
    selection,
    transfer,
    validate,
    validators,
)
from tljax import params as ptree
from tljax import results as run_results
from tljax import workdir as workdirs
from tljax.data import folders, pipeline
from tljax.models import batch_norm

State = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


# ------------------------------------------------------------------ state ----


# XLA:CPU's default LLVM optimisation level spends most of a run's setup compiling programs
# that run once or a few times: init's threefry hashes took 1.5 s for the digit net and 5 s
# for ResNet-50, against 0.4-0.7 s and 2.9 s at level 1, with bit-identical results
# (tests/test_train.py). The train step keeps the default: it runs thousands of times.
_ONE_OFF_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def one_off_compiler_options(mesh) -> dict[str, Any]:
    """XLA compiler options for programs that run rarely (init, evaluation, checks).

    Args:
      mesh: the data mesh (its platform decides).

    Returns:
      Options for `jax.jit(..., compiler_options=...)`: a lower LLVM optimisation level on
      CPU, which compiles such programs 2-3x faster; none on accelerators.
    """
    return dict(_ONE_OFF_CPU_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else {}


def create_train_state(
    method: methods.Method, optimizer, seed: int, mesh, plan: transfer.TransferPlan | None = None
) -> State:
    """Initial state {params, opt_state, step, rng[, start_params]}, created already replicated.

    Args:
      method: supplies `init_params` (an `anchored` method needs `start_params`).
      optimizer: optax transformation.
      seed: run seed.
      mesh: the data mesh.
      plan: layer transfer (copies pretrained leaves into the fresh params), or None.

    Returns:
      The state pytree with every leaf replicated over `mesh`.
    """

    def create(pretrained):
        init_rng, train_rng = jax.random.split(jax.random.key(seed))
        params = method.init_params(init_rng)
        if plan is not None:
            params = plan.apply(params, pretrained)
        state = {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(train_rng),
        }
        if method.anchored:
            state["start_params"] = params
        return state

    # Pretrained params enter as an argument, not a closure: constants would be baked into
    # the compiled program.
    pretrained = plan.pretrained if plan is not None else None
    return jax.jit(
        create,
        out_shardings=parallel.replicated(mesh),
        compiler_options=one_off_compiler_options(mesh),
    )(pretrained)


def make_train_step(
    method: methods.Method, optimizer, schedule, plan: transfer.TransferPlan | None = None
):
    """(state, batch) -> (state, metrics): one optimizer step of `method.loss_fn`.

    Args:
      method: supplies `loss_fn` (given an `Anchor` if `anchored`) or `value_and_grad`. A
        metrics entry ``"batch_stats"`` (`tljax.models.batch_norm.STATS_KEY`) is not a metric:
        it holds new BatchNorm running statistics at their params paths, written into the
        params after the optimizer update.
      optimizer: optax transformation.
      schedule: lr schedule (logged as 'lr').
      plan: layer transfer; its frozen leaves are carried over unchanged, bit for bit (running
        statistics are always frozen to the optimizer, and then take the method's new values).

    Returns:
      The un-jitted step function.
    """
    frozen = plan.frozen if plan is not None and plan.any_frozen else None
    transferred = plan.copied if plan is not None else None

    def objective(params, batch, rng, step, start_params):
        if method.anchored:
            anchor = methods.Anchor(start_params, transferred)
            return method.loss_fn(params, batch, rng, step, anchor)
        return method.loss_fn(params, batch, rng, step)

    if method.value_and_grad is None:
        objective_grad = jax.value_and_grad(objective, has_aux=True)
    else:
        objective_grad = lambda params, batch, rng, step, _: method.value_and_grad(
            params, batch, rng, step
        )

    def apply_updates(params, updates):
        updated = optax.apply_updates(params, updates)
        if frozen is None:
            return updated
        # Adding a zero update could still flip -0.0 to +0.0; frozen means untouched.
        return jax.tree.map(lambda p, new, f: p if f else new, params, updated, frozen)

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        (loss, metrics), grads = objective_grad(
            state["params"], batch, rng, step, state.get("start_params")
        )
        metrics = dict(metrics)
        statistics = metrics.pop(batch_norm.STATS_KEY, None)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = apply_updates(state["params"], updates)
        if statistics is not None:
            params = batch_norm.write_statistics(params, statistics)
        metrics = {**metrics, "loss": loss, "lr": schedule(step)}
        new_state = {**state, "params": params, "opt_state": opt_state, "step": step + 1}
        return new_state, metrics

    return train_step


def compile_train_step(train_step, state: State, batch: dict, mesh):
    """Ahead-of-time compiles the step once, with the state donated.

    An AOT-compiled executable refuses inputs of another shape or sharding
    instead of silently recompiling, so a run compiles exactly once.

    Args:
      train_step: from `make_train_step`.
      state: the (replicated) train state, used for shapes and shardings.
      batch: a (sharded) batch, used for shapes and shardings.
      mesh: the data mesh.

    Returns:
      (compiled step, compile seconds).
    """
    start = time.perf_counter()
    jitted = jax.jit(
        train_step,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0,
    )
    compiled = jitted.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


# --------------------------------------------------------------- evaluate ----


def evaluate(
    eval_step, params, eval_sets, batch_size: int, mesh, summarize=methods.mean_over_count
) -> dict[str, float]:
    """Mean metrics of `eval_step` over each eval set.

    Args:
      eval_step: jitted (params, batch) -> dict of sums including 'count'.
      params: model params.
      eval_sets: name -> arrays.
      batch_size: global eval batch size.
      mesh: the data mesh.
      summarize: sums over a whole set -> metrics (default: means over 'count').

    Returns:
      Flat dict '<set>/<metric>' -> float.
    """
    results = {}
    for name, arrays in eval_sets.items():
        sums = None
        for batch in pipeline.eval_batches(arrays, batch_size, mesh):
            out = eval_step(params, batch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        metrics = summarize(jax.device_get(sums))
        results |= {f"{name}/{key}": float(value) for key, value in metrics.items()}
    return results


def score_validators(method, predict_step, params, batch_size: int, mesh) -> dict[str, float]:
    """The method's label-free validators on its validation sets (`Method.validate_fn`).

    Args:
      method: the run's `Method` (with ``predict_fn``, ``validation_sets``, ``validate_fn``).
      predict_step: jitted ``method.predict_fn`` with replicated outputs.
      params: model params.
      batch_size: global eval batch size.
      mesh: the data mesh.

    Returns:
      'validator/<name>' -> score.
    """
    outputs = {}
    for name, arrays in method.validation_sets.items():
        count = len(next(iter(arrays.values())))
        rows = [
            jax.device_get(predict_step(params, batch))
            for batch in pipeline.eval_batches(arrays, batch_size, mesh)
        ]
        # The padding of the last batch is cut off here, by row count.
        outputs[name] = {key: np.concatenate([r[key] for r in rows])[:count] for key in rows[0]}
        if "label" in arrays:
            outputs[name]["label"] = np.asarray(arrays["label"])
    scores = method.validate_fn(outputs)
    return {f"validator/{name}": float(value) for name, value in scores.items()}


# ---------------------------------------------------------------- metrics ----


class MetricBuffer:
    """Holds per-step metrics on device; syncs with the host only when flushed.

    A launch resuming from a preemption between two flushes starts with the earlier launch's
    steps since its last flush (`carry`), so that its next flush averages the same steps as an
    uninterrupted run.
    """

    def __init__(self):
        self._steps: list[int] = []
        self._metrics: list[dict] = []
        self._carried: dict[str, np.ndarray] = {}

    def add(self, step: int, metrics: dict) -> None:
        self._steps.append(step)
        self._metrics.append(metrics)

    def carry(self, steps: list[int], values: dict[str, np.ndarray]) -> None:
        """Puts earlier steps' metrics, already on the host, before the buffered ones."""
        self._steps = [*steps, *self._steps]
        self._carried = values

    def take(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """The buffered steps and each one's metrics on the host; empties the buffer.

        Returns:
          (steps, metric name -> array of its value at each step).

        Raises:
          NonFiniteLossError: the loss is NaN/Inf at one of the steps.
        """
        stacked = self._carried
        if self._metrics:
            fetched = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *self._metrics))
            stacked = {
                key: np.concatenate([self._carried[key], value]) if self._carried else value
                for key, value in fetched.items()
            }
        steps, self._steps, self._metrics, self._carried = self._steps, [], [], {}
        bad = np.flatnonzero(~np.isfinite(stacked["loss"])) if steps else []
        if len(bad):
            raise NonFiniteLossError(
                f"Loss became {stacked['loss'][bad[0]]} at step {steps[bad[0]]}."
            )
        return steps, stacked

    def flush(self) -> dict[str, float]:
        """Means over the buffered steps; raises NonFiniteLossError on NaN/Inf loss."""
        steps, stacked = self.take()
        if not steps:
            return {}
        return {f"train/{key}": float(np.mean(value)) for key, value in stacked.items()}


# ------------------------------------------------------------------- loop ----


# Holds the workdir for the run: its lock, its config.json (tljax/workdir.py).
@workdirs.guarded
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains `config.method` and evaluates it; resumes from `workdir` if it has checkpoints.

    A run may take several processes (launches): one killed, the next resuming from the last
    checkpoint. Its results.json covers all of them (see `tljax.results`); relaunching a finished
    run returns its results and leaves them as they are.

    Args:
      config: experiment config (see configs/).
      workdir: where checkpoints, TensorBoard events and results.json go.
      devices: devices of the data mesh; default all devices of all processes.
      allow_config_change: (keyword, added by `workdirs.guarded`) resume a run made with
        another config; without it, a config change stops the launch before any work.

    Returns:
      The results dict also written to `<workdir>/results.json`.

    Raises:
      NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint stays).
      tljax.stopping.PreemptedError: SIGTERM/SIGINT; the step in flight was checkpointed
        (tljax/preemption.py). launch.py exits 75.
      tljax.stopping.CollapsedError: the training predictions stayed at chance and
        ``train.collapse.stop`` ended the run after writing results.json (tljax/collapse.py).
      ValueError: a config value that cannot work (e.g. batch size vs devices).
      tljax.validate.InputError: bad config values or data, found before any compile; also
        `tljax.workdir.WorkdirError`: the workdir is a URL or a file, another run holds it, or
        its run was made with another config.
      tljax.checkpoints.CheckpointError: no checkpoint is usable (each listed with why), or
        one was written for another model.
    """
    start_time = time.perf_counter()
    validate.check_config(config)
    checkpoints.check_max_to_keep(config.checkpoint.max_to_keep)
    mesh = parallel.make_data_mesh(devices)
    if mesh.devices.flat[0].platform == "cpu":
        host.retain_freed_memory()
    num_steps = config.train.steps
    # Folder datasets are read at the model's image size, with the config's data.folder block.
    with folders.reading(folders.FolderOptions.from_config(config)):
        method = methods.build(config)
    validate.check_method_inputs(config, method)
    for stream in method.train_streams:
        parallel.check_batch_size(f"train.batch_size ({stream.name})", stream.batch_size, mesh)
    parallel.check_batch_size("eval.batch_size", config.eval.batch_size, mesh)
    select_by = config.eval.get("select_by") or None
    selection.check_select_by(select_by, validators.NAMES if method.validate_fn else None)

    plan = transfer.make_plan(config, method.init_params, jax.random.key(config.seed))
    method = plan.adapt(method)  # With transfer.lora: adapters in the params (tljax/lora.py).
    logging.info("Parameters (layers in forward order):\n%s", plan.summary)

    schedule = optim.make_schedule(config.lr, num_steps)
    optimizer = ptree.partition_optimizer(
        optim.make_optimizer(config.optimizer, schedule), plan.labels
    )
    state = create_train_state(method, optimizer, config.seed, mesh, plan)
    manager = checkpoints.checkpoint_manager(workdir, config)
    state, first_step = checkpoints.restore_latest(manager, state)
    if first_step:
        saved_input = checkpoints.saved_input_state(manager.directory, first_step)
        pipeline.check_resume(saved_input, method.train_streams, config.seed, first_step)

    is_lead = jax.process_index() == 0
    previous, previous_path = run_results.previous(workdir)
    if first_step >= num_steps and previous and run_results.last_step(previous) == first_step:
        return run_results.already_finished(workdir, previous, previous_path, is_lead)
    history, launches = run_results.carried_over(previous, first_step)

    log = run_log.make_run_log(workdir, is_lead, num_steps, config.train.log_every_secs)
    if first_step == 0:
        log.hparams(_flat_hparams(config))

    batches = pipeline.train_batches(method.train_streams, config.seed, first_step, mesh)
    eval_step = jax.jit(
        method.eval_fn,
        out_shardings=parallel.replicated(mesh),
        compiler_options=one_off_compiler_options(mesh),
    )
    predict_step = None
    if method.validate_fn is not None:
        predict_step = jax.jit(
            method.predict_fn,
            out_shardings=parallel.replicated(mesh),
            compiler_options=one_off_compiler_options(mesh),
        )

    def run_eval(params):
        metrics = evaluate(
            eval_step,
            params,
            method.eval_sets,
            config.eval.batch_size,
            mesh,
            method.summarize_eval or methods.mean_over_count,
        )
        if predict_step is not None:
            metrics |= score_validators(method, predict_step, params, config.eval.batch_size, mesh)
        return metrics

    all_finite = jax.jit(_all_finite, compiler_options=one_off_compiler_options(mesh))
    buffer = MetricBuffer()
    # After a preemption: the earlier launch's steps since its last log line.
    buffer.carry(*preemption.pending_metrics(previous, first_step))
    monitor = collapse.monitor_for(config, method.classifiers, previous, first_step)
    watch = preemption.PreemptionWatch(first_step, config.train.log_every)
    selector = selection.BestCheckpoint(workdir, select_by, history) if select_by else None
    train_step = None
    train_metrics, eval_metrics = {}, {}
    last_saved = first_step if first_step else None
    about = {
        "steps": num_steps,
        "resumed_from_step": first_step,
        "seed": config.seed,
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        "backend": jax.default_backend(),
        "compile_time_s": 0.0,
        "num_params": ptree.count(state["params"]),
        "num_frozen_params": ptree.count(state["params"], plan.frozen),
    }
    loop_start = time.perf_counter()
    watch.install()
    try:
        for step in range(first_step, num_steps):
            # Time the step waits for its batch: zero while the pipeline keeps ahead.
            with log.timed("input"):
                batch = next(batches)
            if train_step is None:
                with log.timed("compile"):
                    train_step, about["compile_time_s"] = compile_train_step(
                        make_train_step(method, optimizer, schedule, plan), state, batch, mesh
                    )
                logging.info("Compiled the train step in %.1f s.", about["compile_time_s"])
            state, metrics = train_step(state, batch)
            buffer.add(step, metrics)
            done = step + 1
            log.step_done(done)
            is_last = done == num_steps
            if done % config.train.log_every == 0 or is_last:
                train_metrics = _flush(buffer, manager, last_saved)
                log.train_metrics(done, train_metrics)
                # A collapse that stops the run ends it here as at its last step.
                is_last = monitor.update(done, train_metrics) or is_last
            # After every step on every process: they must agree on where to stop.
            preempted = watch.reached(done) and not is_last
            if done % config.eval.every == 0 or is_last:
                with log.timed("eval", wait_for=state):
                    eval_metrics = run_eval(state["params"])
                log.eval_metrics(done, eval_metrics)
                history.append({"step": done, **eval_metrics})
                if selector is not None:
                    with log.timed("checkpoint", wait_for=state):
                        selector.consider(done, eval_metrics, state)
            if done % config.checkpoint.every == 0 or is_last or preempted:
                if preempted and done % config.checkpoint.every:
                    # Kept per step for the next launch (tljax/preemption.py): its next log
                    # line then averages the same steps as an uninterrupted run's.
                    pending = _flush(buffer, manager, last_saved, raw=True)
                else:
                    train_metrics |= _flush(buffer, manager, last_saved)
                    pending = ([], {})
                with log.timed("checkpoint", wait_for=state):
                    _check_finite_params(all_finite, state["params"], done, manager, last_saved)
                    input_state = pipeline.iterator_state(method.train_streams, config.seed, done)
                    manager.save(
                        done,
                        args=ocp.args.StandardSave(state),
                        custom_metadata={checkpoints.INPUT_KEY: input_state},
                    )
                last_saved = done
                if is_lead:
                    launch = run_results.launch_record(
                        first_step, done, start_time, loop_start, log.phase_seconds()
                    )
                    final = {**train_metrics, **eval_metrics}
                    partial = run_results.assemble(
                        about, final, history, [*launches, launch], config
                    )
                    partial |= monitor.fields() | _selected_fields(select_by, history)
                    if preempted:
                        partial |= preemption.pending_fields(*pending)
                    run_results.write(workdir, partial, partial=True)
            if preempted:
                raise watch.preempted(done, manager.directory, partial if is_lead else None)
            if is_last:
                break
        jax.block_until_ready(state)
        train_s = run_results.train_seconds(loop_start, log.phase_seconds())
        if first_step >= num_steps:
            # A finished run without its results (e.g. killed while writing them).
            with log.timed("eval"):
                eval_metrics = run_eval(state["params"])
            log.eval_metrics(first_step, eval_metrics)
            if first_step not in {entry["step"] for entry in history}:
                history.append({"step": first_step, **eval_metrics})
    finally:
        watch.restore()
        batches.close()
        with log.timed("checkpoint"):
            manager.wait_until_finished()
            if selector is not None:
                selector.wait_until_finished()
        log.close()

    last_step = monitor.stopped_at or max(first_step, num_steps)
    launch = run_results.launch_record(
        first_step, last_step, start_time, loop_start, log.phase_seconds(), train_s
    )
    final = {**train_metrics, **eval_metrics}
    results = run_results.assemble(about, final, history, [*launches, launch], config)
    results |= monitor.fields() | _selected_fields(select_by, history)
    path = (
        run_results.write(workdir, results)
        if is_lead
        else os.path.join(workdir, run_results.RESULTS_FILE)
    )
    logging.info("%s", run_results.summary(results, path))
    if monitor.stopped_at:
        raise monitor.collapsed(workdir, results)
    return results


def _selected_fields(select_by: str | None, history: list[dict]) -> dict:
    # results.json's `selected` entry (tljax/selection.py), when the run selects.
    if not select_by:
        return {}
    return {"selected": selection.best_entry(history, select_by)}


def _flush(buffer: MetricBuffer, manager, last_saved, raw: bool = False):
    # The buffer's means (or, raw, its per-step values: `MetricBuffer.take`), with a NaN/Inf
    # loss reported against the last good checkpoint.
    try:
        return buffer.take() if raw else buffer.flush()
    except NonFiniteLossError as error:
        kept = (
            f"the last good checkpoint (step {last_saved}) is in {manager.directory}"
            if last_saved
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"{error} Training stopped; {kept}. Try a lower lr.base or check the inputs."
        ) from None


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def _check_finite_params(all_finite, params, step: int, manager, last_saved) -> None:
    # A finite loss can still be followed by an update that overflows the params;
    # such a state must never replace the last good checkpoint.
    if not bool(all_finite(params)):
        raise NonFiniteLossError(
            f"Params became non-finite by step {step}; training stopped and the last good "
            f"checkpoint (step {last_saved}) is in {manager.directory}. Try a lower lr.base."
        )


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
    # TensorBoard's hparams take numbers, bools and strings (not NaN); the rest go as text.
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {name: value if _is_hparam(value) else str(value) for name, value in flat.items()}


def _is_hparam(value) -> bool:
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, (bool, int, str))
