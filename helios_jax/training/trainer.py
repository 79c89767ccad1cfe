"""The training loop around any `loss_fn(model, batch, key) -> (loss, metrics)` and an nnx filter
naming the trainable parameters (spec §7, §12).

The state is (trainable parameters in fp32, optimizer state for those only, step, rng key); the
frozen parameters stay in the model's dtype outside it and are never differentiated. One jitted
step is a pure function of (state, frozen, batch): its randomness is fold_in(rng, step), so a
resumed run repeats the uninterrupted one exactly. Parameters are placed on the mesh by their
logical axes (FSDP over `fsdp`), the batch is split over `data` x `fsdp`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from helios_jax.distributed import is_main_process, log
from helios_jax.models.example_inputs import token_counts
from helios_jax.models.flops import transformer_flops
from helios_jax.parallel import use_mesh
from helios_jax.training.checkpointing import Checkpoints
from helios_jax.training.ema import EMAState, ema_update
from helios_jax.training.metrics import MetricsLog, peak_flops
from helios_jax.training.optimizer import learning_rate_schedule, make_optimizer

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
BATCH_MESH_AXES = ("data", "fsdp")


class TrainState(NamedTuple):
    trainable: Any  # nested dict of fp32 arrays (the trainable subtree, as a pure dict)
    opt_state: Any  # optax state over `trainable` only
    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32[2] key; step s uses fold_in(rng, s)
    ema: Any = None  # ema.EMAState of `trainable` when the config has `ema` (Stage 3), else None


class SplitModel(NamedTuple):
    """A model cut into what the step differentiates and what it only reads."""
    graphdef: Any
    trainable_treedef: Any  # the nnx.State structure the pure dict's leaves go back into
    compute_dtypes: list  # the model's dtype for each trainable leaf (fp32 masters are cast to it)
    frozen: nnx.State


def split_model(model: nnx.Module, trainable_filter) -> tuple[SplitModel, dict]:
    """(SplitModel, fp32 pure dict of the trainable variables). `trainable_filter` is any nnx filter
    (a path filter, a Variable type such as a LoRA parameter type, or nnx.All/Any of them); it is
    used as given, so a LoRA Variable type that is not an nnx.Param subclass is still trainable."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError("the trainable filter selects no parameter of the model")
    pure = nnx.to_pure_dict(trainable)
    # The pure dict and the State flatten in the same (sorted-key) order; check it once.
    state_paths = [path for path, _ in nnx.to_flat_state(trainable)]
    pure_paths = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
                  for path, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    if [tuple(p) for p in state_paths] != pure_paths:
        raise AssertionError("nnx.State and its pure dict flatten in different orders")
    dtypes = [leaf.dtype for leaf in jax.tree.leaves(trainable)]
    master = jax.tree.map(lambda x: x.astype(jnp.float32), pure)
    return SplitModel(graphdef, jax.tree.structure(trainable), dtypes, frozen), master


def merge_model(split: SplitModel, trainable: dict, frozen: nnx.State) -> nnx.Module:
    leaves = [x.astype(d) for x, d in zip(jax.tree.leaves(trainable), split.compute_dtypes)]
    return nnx.merge(split.graphdef, jax.tree.unflatten(split.trainable_treedef, leaves), frozen)


def make_train_step(split: SplitModel, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    grad_accum: int = 1, ema: dict | None = None):
    """step(state, frozen, batch) -> (state, metrics): value_and_grad over the trainable subtree,
    averaged over `grad_accum` micro-batches (a lax.scan), then one optimizer update and, with
    `ema` = {decay, start_step} (config.ema), one EMA update of the new parameters (spec §7.3)."""

    def loss_of(trainable, frozen, batch, key):
        loss, metrics = loss_fn(merge_model(split, trainable, frozen), batch, key)
        return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state: TrainState, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(state.trainable, frozen, batch, key)
        else:
            # Micro-batch i takes rows i, i + grad_accum, ...: each keeps the batch's split over devices.
            micro = jax.tree.map(lambda x: jnp.swapaxes(
                x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1), batch)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.trainable, frozen, first, key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def accumulate(total, inputs):
                index, micro_batch = inputs
                out = grad_fn(state.trainable, frozen, micro_batch, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, total, out), None

            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
            (loss, metrics), grads = jax.tree.map(lambda x: x / grad_accum, total)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        averaged = state.ema
        if ema is not None:
            averaged = ema_update(state.ema, trainable, decay=float(ema["decay"]),
                                  update_after_step=int(ema["start_step"]))
        new_state = TrainState(trainable, opt_state, state.step + 1, state.rng, averaged)
        return new_state, {"loss": loss, "grad_norm": grad_norm, **metrics}

    return step


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int) -> NamedSharding:
    """The leading (batch) dimension over data x fsdp; every other dimension whole."""
    axes = tuple(a for a in BATCH_MESH_AXES if mesh.shape[a] > 1)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if batch_size % ways:
        raise ValueError(f"config.data.batch_size {batch_size} does not split over the mesh's "
                         f"data x fsdp = {ways} devices")
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def place_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's rows of the global batch -> global arrays split over data x fsdp."""
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        sharding = batch_sharding(mesh, global_rows, value.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def initial_state(split_master: dict, optimizer, seed: int, mesh: Mesh, *, with_ema: bool = False) -> TrainState:
    """Optimizer state (and the EMA, `with_ema`) placed like the parameters it mirrors; step and
    rng replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda x: x.sharding, split_master)
    abstract = jax.eval_shape(optimizer.init, split_master)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, param_shardings,
                                          transform_non_params=lambda _: replicated)
    with use_mesh(mesh):
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(split_master)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    rng = jax.device_put(jax.random.PRNGKey(seed), replicated)
    averaged = None
    if with_ema:
        # A copy, not an alias: the step donates the state, so no two leaves may share a buffer.
        with use_mesh(mesh):
            params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=param_shardings)(split_master)
        averaged = EMAState(params, jax.device_put(jnp.zeros((), jnp.int32), replicated))
    return TrainState(split_master, opt_state, step, rng, averaged)


class StepCost(NamedTuple):
    tokens: int  # transformer tokens per step (history + current, the whole global batch)
    flops: float  # training FLOPs per step (~3x the forward)


def step_cost(model_config, batch: dict, *, uses_history: bool) -> StepCost:
    rows, _, frames, height, width = batch["target_latents"].shape
    rows *= jax.process_count()
    history, current = token_counts(model_config, (frames, height, width), history=uses_history)
    text = batch["prompt_embeds"].shape[1]
    forward = transformer_flops(model_config, history, current, text)
    return StepCost(rows * (history + current), 3.0 * rows * forward)


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def start_run(workdir, config, state, iterator):
    """(state, Checkpoints, MetricsLog) of a run in `workdir`: `state` restored from the latest
    checkpoint when there is one (the iterator set to match), the resolved config written."""
    checkpoints = Checkpoints(workdir, config)
    latest = checkpoints.latest_step()
    if latest is not None:
        state = checkpoints.restore(latest, abstract_of(state), iterator)
        log(f"train: resumed from {checkpoints.directory / str(latest)} at step {int(state.step)}")
    if is_main_process():
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return state, checkpoints, MetricsLog(workdir, int(state.step))


def train(config, workdir, *, model: nnx.Module, loss_fn: LossFn, trainable_filter, iterator,
          mesh: Mesh, uses_history: bool = True, cost_fn=None) -> TrainState:
    """Run config.total_steps optimizer steps (resuming from the latest checkpoint in
    WORKDIR/checkpoints if there is one). `model` is already placed on `mesh`; `iterator` yields
    this process's rows of each global batch and has get_state / set_state (grain).
    `cost_fn(model_config, local_batch) -> StepCost` for batches that are not one chunk per row
    (default: step_cost). With config.ema the state carries the EMA of the trainable parameters."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    grad_accum = int(config.train.grad_accum)
    if grad_accum < 1 or config.data.batch_size % grad_accum:
        raise ValueError(f"config.train.grad_accum {grad_accum} must be >= 1 and divide "
                         f"config.data.batch_size {config.data.batch_size}")
    optimizer = make_optimizer(config.optimizer)
    schedule = learning_rate_schedule(config.optimizer)
    split, master = split_model(model, trainable_filter)
    frozen, model_config = split.frozen, model.config
    del model  # its arrays live on in `master` / `frozen`
    ema = config.get("ema")
    state = initial_state(master, optimizer, int(config.seed), mesh, with_ema=ema is not None)

    state, checkpoints, metrics_log = start_run(workdir, config, state, iterator)

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(make_train_step(split, loss_fn, optimizer, grad_accum, ema=ema),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))
    steps, log_every = int(config.total_steps), int(config.train.log_every)
    peak = peak_flops(jax.devices()[0])
    cost = None
    since, since_step = time.perf_counter(), int(state.step)
    with use_mesh(mesh):
        for step in range(int(state.step), steps):
            local = next(iterator)
            if cost is None:
                cost = (cost_fn(model_config, local) if cost_fn is not None
                        else step_cost(model_config, local, uses_history=uses_history))
            state, metrics = step_fn(state, frozen, place_batch(local, mesh))
            done = step + 1
            if done % log_every == 0 or done == steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - since
                taken = done - since_step
                step_time = elapsed / taken
                record = {"step": done, **values, "lr": float(schedule(step)), "step_time_s": step_time,
                          "tokens_per_s": cost.tokens / step_time,
                          "mfu": (cost.flops / step_time / (peak * jax.device_count())) if peak else "n/a"}
                metrics_log.write(record)
                since, since_step = time.perf_counter(), done
            if checkpoints.save_step(done, steps, state, iterator):
                log(f"train: preemption signalled; saved step {done} and stopping")
                break
    checkpoints.close()
    return state

