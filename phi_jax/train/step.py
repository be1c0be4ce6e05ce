"""One jitted, sharded, donated train step shared by every stage; stages differ only in their loss function.

A stage's loss function is pure: `loss_fn(params, batch, rng) -> (loss_sum, aux)` where `loss_sum` is a sum
over the batch (tokens, sequences or pairs) and `aux = {"weight": how many units were summed, "metrics": {name:
sum}}`. The step divides by the total weight only after all microbatches, so gradient accumulation gives the
same update as one big batch, and the normaliser is the stage's choice (tokens for cross-entropy, pairs for DPO).
A step whose batch trains nothing (`aux["trained"]`, else the weight, is 0) changes no parameter, and reports its
loss and metrics as NaN and its weight as 0 (a mean over nothing).
A metric counted in other units than the loss (a per-token mean under a per-sequence loss) gives its own
weight in `aux["metric_weights"][name]`.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi_jax.sharding import mesh_context, replicated
from phi_jax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def most_pieces(rows: int, at_most: int, ways: int = 1) -> int:
  """The most pieces, up to `at_most`, that `rows` split into evenly with each piece's rows a multiple of `ways`
  (the devices a piece is split over); 1 when none does. Batches of other sizes than the train batch (eval data, a
  scoring pass) use it to run in as many microbatches as fit."""
  return max((m for m in range(1, at_most + 1) if rows % m == 0 and (rows // m) % ways == 0), default=1)


def split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B/num, ...] taking rows with stride `num`, so every device feeds every microbatch."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={num}")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _grads_and_sums(loss_fn: LossFn, params, batch, rng, microbatches: int):
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss_sum, aux), grads = grad_fn(params, batch, rng)
    return grads, loss_sum, aux

  def accumulate(carry, mb_and_index):
    mb, index = mb_and_index
    (loss_sum, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (grads, loss_sum, aux)), None

  split = split_microbatches(batch, microbatches)
  (loss_shape, aux_shape), grads_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (grads_shape, loss_shape, aux_shape))
  (grads, loss_sum, aux), _ = jax.lax.scan(accumulate, zeros, (split, jnp.arange(microbatches)))
  return grads, loss_sum, aux


def train_step(state: TrainState, batch: dict, rng, *, loss_fn: LossFn, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, microbatches: int = 1, skip_nonfinite: bool = False):
  microbatches = _whole_count(microbatches)
  rng = jax.random.fold_in(rng, state.step)
  grads, loss_sum, aux = _grads_and_sums(loss_fn, state.params, batch, rng, microbatches)
  weight = jnp.maximum(aux["weight"], 1.0)
  grads = jax.tree.map(lambda g: (g / weight).astype(jnp.float32), grads)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  # The update math runs in float32 (the grads are float32), which would promote bfloat16 moments to float32
  # after one step: a different state signature (a recompile, a donated buffer that cannot be reused, a checkpoint
  # that no longer matches its abstract state). Each leaf keeps the dtype it came in with.
  opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
  # A batch that trains nothing (a GRPO rollout batch whose groups the filters all dropped, a batch of masked
  # tokens) has zero gradients, yet AdamW would still move the params along its momentum, repeating the last
  # update without new signal: such a step changes no parameter. Its update is zeroed inside the fused AdamW update
  # (a select: multiplying by 0/1 let XLA contract the update's last multiply and add differently, so every normal
  # step's params changed in their last bits); the moments see a zero gradient (they decay). A select that also
  # kept the moments cost ~40 ms of a 1.7 s step on a 2-core CPU (unfused passes over the params).
  trains = jnp.asarray(aux.get("trained", aux["weight"])) > 0
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: jnp.where(trains, u, jnp.zeros_like(u)), updates))
  # A mean over no units is not a number: a 0.0 would read as a perfect loss (the loop writes NaN as null and
  # keeps it out of the spike detector's median).
  mean = lambda total, units: jnp.where(trains & (units > 0), total / jnp.maximum(units, 1.0), jnp.nan)
  metric_weights = aux.get("metric_weights", {})
  metrics = {name: mean(value, metric_weights.get(name, aux["weight"]))
             for name, value in aux.get("metrics", {}).items()}
  metrics.update(loss=mean(loss_sum, aux["weight"]), grad_norm=grad_norm, learning_rate=schedule(state.step),
                 weight=jnp.where(trains, aux["weight"], 0.0))
  if skip_nonfinite:  # a NaN/Inf update is dropped; the step counter still advances past the bad batch
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jnp.where(finite, new, old)
    # ...and so does the learning-rate schedule's own counter, so the rate applied next is schedule(step), the one
    # logged; the moments and Adam's bias-correction count stay as they were.
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    params = jax.tree.map(keep_old, params, state.params)
    opt_state = jax.tree.map(lambda new, old: new if is_schedule(new) else keep_old(new, old), opt_state,
                             state.opt_state, is_leaf=is_schedule)
    metrics["skipped_update"] = 1.0 - finite.astype(jnp.float32)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def batch_shardings(batch_shapes: dict, mesh: Mesh) -> dict:
  """Every batch leaf is split on its leading (batch) axis over data x fsdp."""
  return jax.tree.map(lambda x: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (len(x.shape) - 1)))),
                      batch_shapes)


def check_rows_per_process(mesh: Mesh, rows: int, process_of=lambda device: device.process_index) -> None:
  """Raises unless every process holds its own block of a batch's rows split over data x fsdp.

  Each process loads rows / process_count rows of its own and they are assembled into one global batch, which is
  only right when no two processes hold the same rows: with data x fsdp smaller than the process count (e.g. one
  process per GPU and a tensor axis spanning processes) the processes' rows would overwrite each other.
  `process_of` maps a device to its process (tests simulate processes with it).
  """
  sharding = batch_shardings({"rows": jax.ShapeDtypeStruct((rows,), jnp.int32)}, mesh)["rows"]
  holders: dict[tuple[int, int], set[int]] = {}
  for device, index in sharding.devices_indices_map((rows,)).items():
    block = index[0].indices(rows)[:2]
    holders.setdefault(block, set()).add(process_of(device))
  shared = {block: procs for block, procs in holders.items() if len(procs) > 1}
  if shared:
    (start, stop), procs = min(shared.items())
    processes = len(set().union(*holders.values()))
    raise ValueError(
        f"mesh.shape={dict(mesh.shape)} splits the batch into {len(holders)} blocks of rows (data x fsdp) for "
        f"{processes} processes, so processes {sorted(procs)} would hold the same rows {start}:{stop} while each "
        "loads rows of its own; make data x fsdp a multiple of the process count (move devices from tensor to "
        "fsdp or data)")


class MeshJit:
  """A jitted function that is traced and run under its mesh and logical-axis rules (jax.set_mesh must be
  entered outside jit, so the context wraps each call rather than the traced body)."""

  def __init__(self, fn, mesh: Mesh, **jit_kwargs):
    self.mesh = mesh
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    with mesh_context(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with mesh_context(self.mesh):
      return self.jitted.lower(*args)


def _whole_count(microbatches) -> int:
  """`microbatches` as an int (2.0 is 2), refused unless a whole number >= 1 (it failed inside the split)."""
  if isinstance(microbatches, bool) or not isinstance(microbatches, numbers.Real) or not (
      microbatches >= 1 and float(microbatches).is_integer()):
    raise ValueError(f"microbatches={microbatches!r} must be a whole number >= 1 (the pieces a batch's rows are split "
                     "into, their gradients summed)")
  return int(microbatches)


def make_train_step(loss_fn: LossFn, optimizer, schedule, mesh: Mesh, state_shardings: TrainState,
                    batch_shapes: dict, *, microbatches: int = 1, skip_nonfinite: bool = False) -> MeshJit:
  """Returns step(state, batch, rng) -> (state, metrics), jitted once with shardings; the old state is donated."""
  microbatches = _whole_count(microbatches)
  step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                           microbatches=microbatches, skip_nonfinite=skip_nonfinite)
  return MeshJit(step, mesh, in_shardings=(state_shardings, batch_shardings(batch_shapes, mesh), replicated(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
