"""One jitted, sharded, donated train step shared by every stage; stages differ only in their loss function.

A stage's loss function is pure: `loss_fn(params, batch, rng) -> (loss_sum, aux)` where `loss_sum` is a sum
over the batch (tokens, sequences or pairs) and `aux = {"weight": how many units were summed, "metrics": {name:
sum}}`. The step divides by the total weight only after all microbatches, so gradient accumulation gives the
same update as one big batch, and the normaliser is the stage's choice (tokens for cross-entropy, pairs for DPO).
A step whose batch trains nothing (`aux["trained"]`, else the weight, is 0) changes no parameter, and reports its
loss and metrics as NaN and its weight as 0 (a mean over nothing).
A metric counted in other units than the loss (a per-token mean under a per-sequence loss) gives its own
weight in `aux["metric_weights"][name]`.
A loss of another form, a batch without a key the loss reads, or a `*positions`/`*segment_ids`/`*loss_mask` leaf
of another shape than its `*tokens` is refused when the step is first traced. A loss fn carrying its model's
config (`loss_fn.model_config`, as the stages' make_loss_fn attach) also has each batch's token ids checked
against the vocabulary before the step runs.
"""

from __future__ import annotations

import collections.abc
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi_jax.model.api import check_token_ids as check_ids_in_vocabulary
from phi_jax.sharding import mesh_context, replicated
from phi_jax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]

_LOSS_CONTRACT = '(loss_sum, aux) with aux = {"weight": units summed, "metrics": {name: sum}} (see phi_jax.train.step)'
# The per-token keys of a batch: each `<prefix>tokens` (DPO's chosen_tokens, rejected_tokens) has these beside it.
_PER_TOKEN_KEYS = ("positions", "segment_ids", "loss_mask")


def checked_loss_fn(loss_fn: LossFn) -> LossFn:
  """`loss_fn` with its output checked against the loss contract as it is traced (no cost per step): a loss of
  another form failed deep inside JAX's autodiff or the step. A loss fn checked already is returned as it is."""
  if getattr(loss_fn, "checks_loss_contract", False):
    return loss_fn

  @functools.wraps(loss_fn)  # keeps attributes such as weight_unit and model_config
  def checked(params, batch, rng):
    try:
      out = loss_fn(params, batch, rng)
    except KeyError as e:
      _raise_if_missing_key(e, batch)
      raise
    if not isinstance(out, (tuple, list)) or len(out) != 2:
      got = f"one array of shape {jnp.shape(out)}" if hasattr(out, "shape") else f"a {type(out).__name__}"
      raise TypeError(f"loss_fn must return {_LOSS_CONTRACT}; got {got}")
    loss_sum, aux = out
    if not isinstance(aux, collections.abc.Mapping) or "weight" not in aux:
      keys = sorted(aux) if isinstance(aux, collections.abc.Mapping) else None
      raise TypeError(f"loss_fn's aux must be a dict with a \"weight\" (the units the loss sums over: tokens, "
                      f"pairs); got {f'keys {keys}' if keys is not None else f'a {type(aux).__name__}'}. "
                      f"loss_fn returns {_LOSS_CONTRACT}")
    if jnp.ndim(loss_sum) != 0:
      raise TypeError(f"loss_fn's loss_sum must be a scalar (the sum over the batch); got shape "
                      f"{jnp.shape(loss_sum)}. loss_fn returns {_LOSS_CONTRACT}")
    return out
  checked.checks_loss_contract = True
  return checked


def _raise_if_missing_key(error: KeyError, batch) -> None:
  """A KeyError for a key the batch lacks, as an error naming it and the batch's keys (a bare KeyError 'positions'
  from inside the traced loss said neither which dict nor what it holds). The KeyError stays chained: its
  traceback shows the lookup."""
  key = error.args[0] if len(error.args) == 1 else None
  if isinstance(batch, collections.abc.Mapping) and isinstance(key, str) and key not in batch:
    raise ValueError(f"loss_fn failed with KeyError {key!r}, a key the batch lacks (it has {sorted(batch, key=str)}): "
                     "a next-token batch has tokens, positions, segment_ids and loss_mask, each [B, T] "
                     "(phi_jax.data builds them); DPO and GRPO batches add their stage's keys") from error


def check_per_token_shapes(batch) -> None:
  """Raises unless each `<prefix>positions`, `<prefix>segment_ids` and `<prefix>loss_mask` of the batch has the
  shape of its `<prefix>tokens` (shapes only: cheap under jit); a mismatch was a broadcast error inside the loss."""
  if not isinstance(batch, collections.abc.Mapping):
    return
  for tokens_key, tokens in batch.items():
    if not (isinstance(tokens_key, str) and tokens_key.endswith("tokens") and jnp.ndim(tokens) == 2):
      continue
    prefix = tokens_key[:-len("tokens")]
    for key in (prefix + name for name in _PER_TOKEN_KEYS):
      if key in batch and jnp.shape(batch[key]) != jnp.shape(tokens):
        raise ValueError(f"batch[{key!r}] has shape {tuple(jnp.shape(batch[key]))}, but batch[{tokens_key!r}] is "
                         f"{tuple(jnp.shape(tokens))}: {key} holds one value per token, so it must be [B, T] like "
                         f"{tokens_key}")


def check_batch_token_ids(batch, vocab_size: int, what: str) -> None:
  """Raises on a token id outside the model's vocabulary in a real slot of a batch (each `*tokens` key, with its
  `*segment_ids`): inside the step such an id is a NaN loss, which reads as a numerical fault. Arrays this process
  cannot read alone (spanning other processes) are not checked."""
  for key, tokens in (batch.items() if isinstance(batch, collections.abc.Mapping) else ()):
    if isinstance(key, str) and key.endswith("tokens") and np.ndim(tokens) == 2:
      segments = batch.get(key[:-len("tokens")] + "segment_ids", np.ones(np.shape(tokens), np.int32))
      try:
        check_ids_in_vocabulary(tokens, segments, vocab_size)
      except ValueError as e:
        raise ValueError(f"{what}, {key!r}: {e}") from None


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
  check_per_token_shapes(batch)
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
    donated = jit_kwargs.get("donate_argnums", ())
    self.donated = (donated,) if isinstance(donated, int) else tuple(donated)
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    for index in self.donated:
      if index < len(args):
        _check_not_donated(args[index])
    with mesh_context(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with mesh_context(self.mesh):
      return self.jitted.lower(*args)


def _check_not_donated(tree) -> None:
  """Raises when an array of `tree` was donated to an earlier call: on a multi-device mesh XLA crashed the process
  (a segfault) on such a buffer, on one device JAX raised an error that did not say which argument or what to do."""
  if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree)):
    raise ValueError(f"this {type(tree).__name__} was donated to an earlier call of the step (its buffers are reused "
                     "for the new state); pass the state that call returned: state, metrics = step(state, batch, rng)")


class TrainStep(MeshJit):
  """The jitted step(state, batch, rng) of `make_train_step`, with the checks of a batch that need its values or
  its keys, made on the host before the step runs."""

  def __init__(self, fn, mesh: Mesh, *, batch_keys, vocab_size, **jit_kwargs):
    super().__init__(fn, mesh, **jit_kwargs)
    self.batch_keys, self.vocab_size = batch_keys, vocab_size

  def __call__(self, state, batch, rng):
    if self.batch_keys is not None and isinstance(batch, collections.abc.Mapping) and set(batch) != self.batch_keys:
      self._refuse_other_keys(batch)
    if self.vocab_size is not None:
      # Copies the token arrays to the host (small next to a step); the state is not yet donated when it raises.
      check_batch_token_ids(batch, self.vocab_size, "the batch passed to the train step")
    return super().__call__(state, batch, rng)

  def _refuse_other_keys(self, batch) -> None:
    """JAX's own error here is a pytree mismatch of the step's input shardings."""
    missing = sorted(self.batch_keys - set(batch), key=str)
    problem = (f"lacks {', '.join(map(repr, missing))}, a key of the batch this step was made for" if missing else
               f"has {', '.join(map(repr, sorted(set(batch) - self.batch_keys, key=str)))}, which the batch this step "
               "was made for lacks")
    raise ValueError(f"the batch {problem} (make_train_step's batch_shapes has {sorted(self.batch_keys, key=str)}): "
                     "give every call batches with the same keys, or make a step for these")


def _whole_count(microbatches) -> int:
  """`microbatches` as an int (2.0 is 2), refused unless a whole number >= 1 (it failed inside the split)."""
  if isinstance(microbatches, bool) or not isinstance(microbatches, numbers.Real) or not (
      microbatches >= 1 and float(microbatches).is_integer()):
    raise ValueError(f"microbatches={microbatches!r} must be a whole number >= 1 (the pieces a batch's rows are split "
                     "into, their gradients summed)")
  return int(microbatches)


def make_train_step(loss_fn: LossFn, optimizer, schedule, mesh: Mesh, state_shardings: TrainState,
                    batch_shapes: dict, *, microbatches: int = 1, skip_nonfinite: bool = False,
                    check_token_ids: bool = True) -> TrainStep:
  """Returns step(state, batch, rng) -> (state, metrics), jitted once with shardings; the old state is donated
  (pass each call the state the previous one returned).

  When `loss_fn` carries its model's config (`loss_fn.model_config`, as the stages' make_loss_fn attach), each call
  first checks the batch's token ids against its vocabulary on the host (arrays spanning other processes are not
  read); `check_token_ids=False` leaves that out where the batches are checked already (`loop.run`).
  """
  microbatches = _whole_count(microbatches)
  loss_fn = checked_loss_fn(loss_fn)
  model_config = getattr(loss_fn, "model_config", None)
  vocab_size = getattr(model_config, "vocab_size", None) if check_token_ids else None
  batch_keys = set(batch_shapes) if isinstance(batch_shapes, collections.abc.Mapping) else None
  step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                           microbatches=microbatches, skip_nonfinite=skip_nonfinite)
  return TrainStep(step, mesh, batch_keys=batch_keys, vocab_size=vocab_size,
                   in_shardings=(state_shardings, batch_shardings(batch_shapes, mesh), replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
