"""Preference optimisation (DPO / IPO) on chosen and rejected completions: stage 3 of Phi-4-mini-reasoning.

    loss_fn = make_loss_fn(config, beta=0.1)                  # the stage protocol of phi_jax.train.step
    ref_fn = reference_logps_fn(config, mesh=mesh)
    batches = with_reference_logps(preference_batches, ref_params, ref_fn, mesh=mesh)    # reference in the step
    precompute_reference_logps("pairs.jsonl", ref_params, config, tokenizer, seq_len=T, batch_size=B,
                               out_file="pairs.ref.jsonl")    # or once, ahead: later runs load no reference model

Batches are those of `phi_jax.data.preference` (`chosen_*` and `rejected_*` rows) plus the reference model's
summed completion log-probs `ref_chosen_logps`, `ref_rejected_logps` (float32 [B]). The reference params are frozen
and never part of the TrainState: either a separate jitted function adds their log-probs to each batch before the
step, or they were written next to the pairs once by `precompute_reference_logps`.

The loss of a pair is `phi_jax.losses.dpo_loss` on per-sequence completion log-probs: summed for "sigmoid", the mean
per completion token for "ipo" (as TRL does; the reference sums are divided by the same token counts). The stage
returns the sum over real pairs and their count as the weight, so the step's mean is over pairs of the whole
(microbatched, global) batch; all-padding filler rows (the end of a finite pair file) weigh nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi_jax.data.preference import REFERENCE_FIELDS, SIDES, build_preference_iterator, reference_settings
from phi_jax.losses import chunked_token_logprobs, dpo_loss, next_token_targets, sequence_logps
from phi_jax.losses.dpo import check_dpo_settings
from phi_jax.model import PhiConfig, hidden_states, lm_head_kernel
from phi_jax.sharding.distributed import any_process_or_raise, failing_together
from phi_jax.train.loop import global_batch
from phi_jax.train.step import MeshJit, most_pieces, split_microbatches

log = logging.getLogger("phi_jax")

ReferenceFn = Callable[[Any, dict], tuple[jax.Array, jax.Array]]


def completion_logps(params, batch: dict, *, config: PhiConfig, chunk_size: int = 1024,
                     length_normalize: bool = False) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Completion log-probs of both sides, {side: (logps [B], completion tokens [B])}: summed over the completion and,
  for a new turn, its end-of-turn token, or their mean per token with `length_normalize`.

  Chosen and rejected rows go through the model together as one [2B, T] batch: one forward pass, one compile.
  """
  def both(field):
    # Rows interleaved as (pair, side): [B, 2, T] -> [2B, T] keeps each device's pairs on that device.
    rows = jnp.stack([batch[f"{side}_{field}"] for side in SIDES], axis=1)
    return rows.reshape(-1, rows.shape[-1])

  tokens, segment_ids = both("tokens"), both("segment_ids")
  h = hidden_states(params, tokens, config, positions=both("positions"), segment_ids=segment_ids)
  targets, weights = next_token_targets(tokens, segment_ids, both("loss_mask"))
  token_logps = chunked_token_logprobs(h, lm_head_kernel(params, config), targets, chunk_size=chunk_size)
  logps = sequence_logps(token_logps, weights, length_normalize=length_normalize).reshape(-1, len(SIDES))
  counts = jnp.sum(weights, axis=-1).reshape(-1, len(SIDES))
  return {side: (logps[:, i], counts[:, i]) for i, side in enumerate(SIDES)}


def dpo_stage_loss(params, batch: dict, rng, *, config: PhiConfig, beta: float, label_smoothing: float = 0.0,
                   loss_type: str = "sigmoid", chunk_size: int = 1024):
  """(sum of pair losses, {"weight": number of pairs, "metrics": sums of the `dpo_loss` metrics over pairs})."""
  del rng  # deterministic: no dropout in Phi-4
  # TRL's IPO compares mean token log-probs; the reference sums are divided by the same completion lengths.
  normalize = loss_type == "ipo"
  policy = completion_logps(params, batch, config=config, chunk_size=chunk_size, length_normalize=normalize)
  reference = {}
  for side in SIDES:
    ref = batch[f"ref_{side}_logps"].astype(jnp.float32)
    reference[side] = ref / jnp.maximum(policy[side][1], 1.0) if normalize else ref

  def pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    return dpo_loss(policy_chosen[None], policy_rejected[None], ref_chosen[None], ref_rejected[None], beta=beta,
                    label_smoothing=label_smoothing, loss_type=loss_type)

  # A real pair always has a completion target (a new turn's end-of-turn token, a continuation's non-empty
  # completion); filler rows have none.
  real = (policy["chosen"][1] > 0) & (policy["rejected"][1] > 0)

  def real_only(x):
    # Filler rows' inputs are zeroed, not only weighted 0: 0 * NaN is NaN, in the loss and in its gradient.
    return jnp.where(real, x, 0.0)

  losses, metrics = jax.vmap(pair_loss)(real_only(policy["chosen"][0]), real_only(policy["rejected"][0]),
                                        real_only(reference["chosen"]), real_only(reference["rejected"]))
  return jnp.sum(real_only(losses)), {"weight": jnp.sum(real.astype(jnp.float32)),
                                      "metrics": {name: jnp.sum(real_only(value)) for name, value in metrics.items()}}


def make_loss_fn(config: PhiConfig, *, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 chunk_size: int = 1024):
  """loss_fn(params, batch, rng) -> (loss_sum, aux) for `phi_jax.train.make_train_step`."""
  check_dpo_settings(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
  loss_fn = functools.partial(dpo_stage_loss, config=config, beta=beta, label_smoothing=label_smoothing,
                              loss_type=loss_type, chunk_size=chunk_size)
  loss_fn.weight_unit = "pairs"  # what aux["weight"] counts: the loop reports eval_pairs, not eval_tokens
  loss_fn.model_config = config  # make_train_step checks each batch's token ids against its vocabulary
  return loss_fn


def _reference_sums(ref_params, batch, *, config: PhiConfig, chunk_size: int, microbatches: int):
  def sums(rows):
    logps = completion_logps(ref_params, rows, config=config, chunk_size=chunk_size)
    return jnp.stack([logps["chosen"][0], logps["rejected"][0]])  # [2, rows]

  pairs = jax.tree.leaves(batch)[0].shape[0]
  # Batches of other sizes (the eval data's) split into the most pieces up to `microbatches` that divide them.
  pieces = most_pieces(pairs, microbatches)
  if pieces == 1:
    out = sums(batch)
  else:
    # One piece at a time, like the train step's microbatches: the pass over the whole batch at once needs the
    # activations of every row together. Pieces take rows with stride `pieces`; [pieces, 2, rows] goes back to
    # [2, pairs] in the input's row order.
    out = jax.lax.map(sums, split_microbatches(batch, pieces))
    out = jnp.moveaxis(out, 0, -1).reshape(2, pairs)
  return out[0], out[1]


def reference_logps_fn(config: PhiConfig, chunk_size: int = 1024, *, mesh: Optional[Mesh] = None,
                       microbatches: int = 1) -> ReferenceFn:
  """A jitted (ref_params, batch) -> (ref_chosen [B], ref_rejected [B]): summed completion log-probs.

  With `mesh`, it runs under the mesh's logical-axis rules and returns arrays split over the batch like the input.
  `microbatches` > 1 runs the pass over that many pieces of the batch in turn (the train step's
  `train.microbatches`, so the reference pass fits where the step does); a batch it does not divide is split into
  the most pieces up to it that divide it.
  """
  if microbatches < 1:
    raise ValueError(f"microbatches={microbatches} must be at least 1")
  fn = functools.partial(_reference_sums, config=config, chunk_size=chunk_size, microbatches=microbatches)
  if mesh is None:
    return jax.jit(fn)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  return MeshJit(fn, mesh, out_shardings=(rows, rows))


class ReferenceLogpsIterator:
  """Adds the reference log-probs to each per-process batch; get_state / set_state / stats are the wrapped
  iterator's, so the training loop checkpoints the data position as usual."""

  def __init__(self, batches, ref_params, fn: ReferenceFn, mesh: Optional[Mesh] = None):
    self._batches = batches
    self._iterator = iter(batches)
    self._ref_params, self._fn, self._mesh = ref_params, fn, mesh

  def __iter__(self) -> ReferenceLogpsIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      local, error = next(self._iterator, None), None
    except Exception as e:  # pylint: disable=broad-except  (a bad record, a file changed or gone)
      if jax.process_count() == 1:
        raise
      local, error = None, e
    # The reference pass is a collective: with several processes, all run it or none. A process whose data ran out
    # first (uneven shares) or failed to read would otherwise wait in the loop's own check while the others waited
    # in the pass. A read error stops every process here, and the loop's own check then stops all at this step.
    if jax.process_count() > 1:
      ran_out = any_process_or_raise(error, "read its batch of pairs", local is None and error is None)[0]
      if ran_out:
        if local is not None:
          log.warning("another process's data ran out: this process's next batch of pairs is not used")
        raise StopIteration
    if local is None:
      raise StopIteration
    if self._mesh is None:
      outputs = self._fn(self._ref_params, local)
    else:
      # Global arrays in, this process's rows back out: the loop assembles the global batch again for the step.
      outputs = multihost_utils.global_array_to_host_local_array(
          self._fn(self._ref_params, global_batch(local, self._mesh)), self._mesh, P(("data", "fsdp")))
    return dict(local, **{key: np.asarray(value, np.float32) for key, value in zip(REFERENCE_FIELDS, outputs)})

  def get_state(self) -> dict[str, Any]:
    return self._batches.get_state()

  def set_state(self, state: dict[str, Any]):
    self._batches.set_state(state)

  def stats(self) -> dict[str, Any]:
    return self._batches.stats()


def with_reference_logps(batches, ref_params, fn: ReferenceFn, *, mesh: Optional[Mesh] = None
                         ) -> ReferenceLogpsIterator:
  """`batches` with `ref_chosen_logps` / `ref_rejected_logps` computed by `fn` from frozen `ref_params`."""
  return ReferenceLogpsIterator(batches, ref_params, fn, mesh)


def _replicated_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  # Every process holds the whole batch here, so each device takes its rows straight from the host copy.
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  return {key: jax.make_array_from_callback(value.shape, sharding, lambda index, value=value: value[index])
          for key, value in local.items()}


def _check_mesh_splits_batch(mesh: Mesh, batch_size: int, microbatches: int) -> None:
  """Refuses a batch whose rows (or a microbatch's) do not split evenly over the mesh's data x fsdp devices, as the
  train step does: found inside the pass, it is a sharding error that names neither setting."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  pieces = most_pieces(batch_size, microbatches)
  if batch_size % ways or (batch_size // pieces) % ways:
    raise ValueError(f"batch_size={batch_size} in microbatches={microbatches} (rows per piece "
                     f"{batch_size // pieces}) must split evenly over the data x fsdp mesh size {ways} of "
                     f"mesh.shape={dict(mesh.shape)}: give a batch_size that is a multiple of {ways * pieces}, fewer "
                     "microbatches, or another mesh")


def precompute_reference_logps(pairs_file: str, ref_params, config: PhiConfig, tokenizer, *, seq_len: int,
                               batch_size: int, out_file: Optional[str] = None, too_long: str = "drop",
                               system_prompt: Optional[str] = None, on_bad_record: str = "raise",
                               chunk_size: int = 1024, mesh: Optional[Mesh] = None,
                               microbatches: int = 1) -> dict[str, Any]:
  """Writes every usable pair of `pairs_file` with its reference log-probs to `out_file`, in file order.

  Output records are the input records plus `ref_chosen_logps`, `ref_rejected_logps` and the settings they were
  computed under (`ref_seq_len`, `ref_too_long`, `ref_system_prompt`, and `ref_tokenizer`: the tokenizer's size and
  a digest of its vocabulary and chat template); a DPO run with the same `seq_len`, `too_long`, `system_prompt` and
  tokenizer (checked) reads them with `reference_logps=True` and needs no reference model. Pairs dropped
  as too long or bad (in skip mode) are left out and counted. Every process computes the same batches (the
  reference params may be sharded across hosts); process 0 writes, atomically. Each process reads its own copy of
  `pairs_file`, and scores its devices' rows from it, so every host must hold the same copy: experiments/train.py
  compares their digests before the pass; here, copies holding more pairs on some hosts than others are refused (a
  ValueError), but copies that differ otherwise are not seen. A batch that fails to read on one process, and
  process 0's write, raise on every process, each process agreeing before the next collective. `microbatches` is
  `reference_logps_fn`'s; with `mesh`, `batch_size` and each microbatch's rows must split evenly over its data x fsdp
  devices (a ValueError says so before any work).

  Returns:
    {"out_file", "pairs", "stats"}: the file written, the number of pairs in it, the reader's `stats()`.
  """
  if mesh is not None:
    _check_mesh_splits_batch(mesh, batch_size, microbatches)
  if out_file is None:
    stem = pairs_file[:-len(".jsonl")] if pairs_file.endswith(".jsonl") else pairs_file
    out_file = f"{stem}.ref.jsonl"
  batches = build_preference_iterator(pairs_file, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0,
                                      shuffle=False, num_epochs=1, too_long=too_long, on_bad_record=on_bad_record,
                                      system_prompt=system_prompt, with_index=True, process_index=0, process_count=1)
  fn = reference_logps_fn(config, chunk_size, mesh=mesh, microbatches=microbatches)
  found: dict[int, tuple[float, float]] = {}
  for local in _agreed_batches(batches, pairs_file):
    index = local.pop("index")
    inputs = local if mesh is None else _replicated_batch(local, mesh)
    outputs = fn(ref_params, inputs)
    if jax.process_count() > 1:
      outputs = [multihost_utils.process_allgather(x, tiled=True) for x in outputs]
    chosen, rejected = (np.asarray(x) for x in outputs)
    for i, c, r in zip(index, chosen, rejected):
      if i >= 0:
        found[int(i)] = (float(c), float(r))
  # The others wait here for process 0's write, and stop with it where it failed.
  with failing_together(f"writing {out_file}"):
    if jax.process_index() == 0:
      _write_with_reference(batches, found, reference_settings(tokenizer, seq_len=seq_len, too_long=too_long,
                                                               system_prompt=system_prompt), out_file)
  return {"out_file": out_file, "pairs": len(found), "stats": batches.stats()}


def _agreed_batches(batches, pairs_file: str):
  """`batches`, each one read on every process before any runs its reference pass (a collective): a read that fails
  on one process (a bad record in its copy of the file, an I/O error) raises on all at the same batch."""
  iterator = iter(batches)
  while True:
    try:
      local, error = next(iterator, None), None
    except Exception as e:  # pylint: disable=broad-except  (raised below, on every process)
      if jax.process_count() == 1:
        raise
      local, error = None, e
    if jax.process_count() > 1:
      ended, going_on = any_process_or_raise(error, f"read its copy of {pairs_file}",
                                             local is None and error is None, local is not None)
      if ended and going_on:
        raise ValueError(f"{pairs_file} holds more pairs on some processes than on others: each process reads the "
                         "whole file, so every host must hold the same copy of it")
    if local is None:
      return
    yield local


def _write_with_reference(batches, found: dict[int, tuple[float, float]], settings: dict, out_file: str):
  source = batches.source
  tmp = f"{out_file}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      for index in sorted(found):
        record = dict(source[index]["data"], ref_chosen_logps=found[index][0], ref_rejected_logps=found[index][1],
                      **settings)
        # Columns JSON has no type for (a Parquet file's timestamps, dates, decimals) are written as their text.
        f.write(json.dumps(record, default=str) + "\n")
    os.replace(tmp, out_file)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)

