"""The training loop shared by every stage: resume, step, log, evaluate, checkpoint, handle preemption.

Python drives steps, never tokens: each iteration fetches one global batch, dispatches the jitted step, and
only then pulls the *previous* step's metrics to the host, so logging overlaps with compute.

Resume contract: re-running with the same workdir restores the newest complete checkpoint (state + data
iterator position), drops metrics.jsonl lines written after it, and continues; the result is bit-identical to
an uninterrupted run because the step rng is `fold_in(key(seed), step)` and the data order is a function of the
seed and the restored iterator state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from phi_jax.model import PhiConfig
from phi_jax.train import flops
from phi_jax.train.checkpoint import Checkpointer
from phi_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from phi_jax.train.state import abstract_state, create_train_state, state_shardings
from phi_jax.train.step import MeshJit, batch_shardings, make_train_step

log = logging.getLogger("phi_jax")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  num_steps: int
  seed: int = 0
  microbatches: int = 1
  log_every: int = 1
  checkpoint_every: int = 100
  keep_checkpoints: Optional[int] = 3
  async_checkpoints: bool = True
  eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
  on_nonfinite: str = "stop"  # "stop": raise with the step and metric; "skip": keep the previous state
  peak_flops_per_device: Optional[float] = None  # for MFU; None: not reported
  export_hf: bool = False  # write the final params as a transformers checkpoint to workdir/hf


class Preempted(SystemExit):
  """Raised after a SIGTERM once the checkpoint is saved; exit status 143 (128 + SIGTERM) tells schedulers so."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


class _SigtermFlag:
  """Records SIGTERM instead of dying, so the loop can save first; further SIGTERMs during the save are ignored."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays split over data x fsdp (works on one host and many)."""
  shardings = batch_shardings(local_batch, mesh)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_batch, shardings)


class MetricsWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl (only process 0 writes)."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.enabled = jax.process_index() == 0
    if self.enabled and os.path.exists(path):
      # Lines after the restored checkpoint came from the interrupted run; the resumed run writes them again.
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      with open(path, "w") as f:
        f.writelines(kept)

  def write(self, record: dict):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def host_scalar(x) -> float:
  """A replicated scalar's value; reads the local copy, so it works when the array spans several hosts."""
  return float(np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x)


def _to_host(metrics: dict) -> dict:
  return {k: host_scalar(v) for k, v in metrics.items()}


def run(*, workdir: str, model_config: PhiConfig, optimizer_config: OptimizerConfig, loss_fn: Callable,
        train_data: Iterable, loop: LoopConfig, mesh: Mesh, init_params: Optional[Callable[[], Any]] = None,
        eval_batches: Optional[Callable[[], Iterable[dict]]] = None, run_meta: Optional[dict] = None,
        on_log: Optional[Callable[[dict], None]] = None):
  """Trains to `loop.num_steps` (resuming if workdir has checkpoints) and returns the final TrainState.

  `train_data` yields per-process numpy batches, or has `next_batch(params, step)` when batches are sampled from
  the current policy (GRPO); if it has get_state/set_state, its position is checkpointed; `step_metrics(step)`
  adds data-side metrics (rewards, lengths) to that step's record.
  `init_params()` returns (sharded) starting params, e.g. from an HF checkpoint or a previous stage; None means
  random init from the seed.
  """
  os.makedirs(workdir, exist_ok=True)
  optimizer = make_optimizer(optimizer_config, loop.num_steps)
  schedule = learning_rate_schedule(optimizer_config, loop.num_steps)
  shardings = state_shardings(model_config, optimizer, mesh)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=loop.checkpoint_every,
                              max_to_keep=loop.keep_checkpoints, async_save=loop.async_checkpoints)
  rng = jax.random.key(loop.seed)
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data_state, _ = checkpointer.restore(latest, abstract_state(model_config, optimizer, mesh))
    if data_state and hasattr(train_data, "set_state"):
      train_data.set_state(data_state)
    log.info("resumed from %s at step %d", checkpointer.directory, latest)
  else:
    params = init_params() if init_params is not None else None
    state = create_train_state(model_config, optimizer, mesh, jax.random.fold_in(rng, 2**31 - 1), params=params)
  start = int(host_scalar(state.step))
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), start)
  # A data source with next_batch(params, step) samples from the current policy (GRPO); others are iterators.
  on_policy = hasattr(train_data, "next_batch")
  iterator = None if on_policy else iter(train_data)
  meta = dict(run_meta or {}, model_config=dataclasses.asdict(model_config))

  step_fn = None
  eval_fn = None
  pending = None  # (step, device metrics, host stats) of the last dispatched step, pulled one step late
  last_time = time.perf_counter()

  def flush(pending_item):
    nonlocal last_time
    step, device_metrics, stats = pending_item
    record = _to_host(device_metrics)
    now = time.perf_counter()
    elapsed, last_time = now - last_time, now
    record["tokens_per_sec"] = stats["tokens"] / elapsed
    if loop.peak_flops_per_device:
      flops_per_token = flops.train_flops_per_token(model_config, stats["seq_len"])
      record["mfu"] = flops_per_token * stats["slots"] / elapsed / (loop.peak_flops_per_device * jax.device_count())
    record["step"] = step
    if hasattr(train_data, "step_metrics"):
      record.update(train_data.step_metrics(step))
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(record.get(k, 0.0))]
    if bad and loop.on_nonfinite == "stop":
      checkpointer.wait()
      raise FloatingPointError(
          f"non-finite {bad[0]}={record[bad[0]]} at step {step}; stopping. The last good checkpoint is step "
          f"{checkpointer.latest_step()} in {checkpointer.directory} (set on_nonfinite='skip' to skip such updates)")
    if step % loop.log_every == 0 or step == loop.num_steps:
      if hasattr(train_data, "stats"):
        for name, source in train_data.stats().get("sources", {}).items():
          record[f"tokens_seen/{name}"] = source["tokens"]
      writer.write(record)
      if on_log is not None:
        on_log(record)
    return record

  with _SigtermFlag() as sigterm:
    for step in range(start, loop.num_steps):
      local = train_data.next_batch(state.params, step) if on_policy else next(iterator)
      batch = global_batch(local, mesh)
      if step_fn is None:
        step_fn = make_train_step(loss_fn, optimizer, schedule, mesh, shardings, batch,
                                  microbatches=loop.microbatches, skip_nonfinite=loop.on_nonfinite == "skip")
      state, metrics = step_fn(state, batch, rng)
      stats = {"tokens": int(np.sum(np.asarray(local["segment_ids"]) > 0)) if "segment_ids" in local else 0,
               "slots": int(np.size(local["tokens"])) * jax.process_count() if "tokens" in local else 0,
               "seq_len": int(np.shape(local["tokens"])[-1]) if "tokens" in local else 0}
      if pending is not None:
        flush(pending)
      pending = (step + 1, metrics, stats)
      done = step + 1
      if eval_batches is not None and loop.eval_every and done % loop.eval_every == 0 and done < loop.num_steps:
        eval_fn = eval_fn or _make_eval(loss_fn, mesh)
        writer.write(dict(_evaluate(eval_fn, state.params, eval_batches(), mesh), step=done))
      if done % loop.checkpoint_every == 0 or done == loop.num_steps or sigterm.raised:
        flush(pending)  # a checkpoint is written only after its step's loss is known to be finite
        pending = None
        data_state = train_data.get_state() if hasattr(train_data, "get_state") else None
        checkpointer.save(done, state, data_state=data_state, meta=meta, force=True)
      if sigterm.raised:
        checkpointer.close()
        log.warning("SIGTERM: saved step %d to %s; exiting", done, checkpointer.directory)
        raise Preempted(done)
    if pending is not None:
      flush(pending)
  if eval_batches is not None:
    eval_fn = eval_fn or _make_eval(loss_fn, mesh)
    writer.write(dict(_evaluate(eval_fn, state.params, eval_batches(), mesh), step=int(host_scalar(state.step))))
  checkpointer.close()
  if hasattr(train_data, "stats") and jax.process_index() == 0:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump(train_data.stats(), f, indent=1, default=str)
  return state


def _make_eval(loss_fn, mesh):
  def sums(params, batch):
    loss_sum, aux = loss_fn(params, batch, jax.random.key(0))
    return loss_sum, aux["weight"]

  return MeshJit(sums, mesh)


def _evaluate(eval_fn, params, batches: Iterable[dict], mesh) -> dict:
  total, weight = 0.0, 0.0
  for local in batches:
    loss_sum, w = eval_fn(params, global_batch(local, mesh))
    total, weight = total + host_scalar(loss_sum), weight + host_scalar(w)
  return {"eval_loss": total / max(weight, 1.0), "eval_tokens": weight}
