"""The training loop shared by every stage: resume, step, log, evaluate, checkpoint, handle preemption.

Python drives steps, never tokens: each iteration fetches one global batch, dispatches the jitted step, and
only then pulls the *previous* step's metrics to the host, so logging overlaps with compute.

Resume contract: re-running with the same workdir restores the newest complete checkpoint (state + data
iterator position; data without get_state / set_state, such as a list, skips the batches already trained),
drops metrics.jsonl lines written after it, and continues; the result is bit-identical to
an uninterrupted run because the step rng is `fold_in(key(seed), step)` and the data order is a function of the
seed and the restored iterator state. A checkpoint that fails its integrity check is set aside and the previous
one is used (see `checkpoint.py`); one written under a config whose state cannot be restored (other model shapes,
another optimizer structure) stops the run before any step with a message naming the difference, while compatible
changes (learning rate, mesh, number of steps) are logged.

With eval data, `early_stopping_patience` ends the run once that many evaluations in a row bring no new best
eval_loss, and `keep_best_checkpoint` keeps the best evaluation's checkpoint (beside the newest ones) and ends the
run with its state; both rebuild their history on resume from the kept eval records of metrics.jsonl.

Faults the loop turns into clear outcomes: a NaN/Inf loss or gradient norm stops the run naming the step, the
metric and the last good checkpoint (or, with `on_nonfinite="skip"`, drops that update with a warning); a loss
above `loss_spike_factor` x the running median of the last `loss_spike_window` losses is flagged (`loss_spike` in
metrics.jsonl and a warning); SIGTERM finishes the current step, saves, and exits with status 143, or, past
`preemption_grace_s`, exits without the new checkpoint (the previous one stays the newest); a failed save raises
`CheckpointError` naming the directory and the intact previous step; an evaluation that raises (a bad eval batch
after the first) saves its step's checkpoint first, so a rerun resumes there once the eval data is fixed; a second
run started in a workdir while one trains there raises `WorkdirInUseError` before writing anything (process 0 holds
an exclusive `flock` on W/.lock, recording its pid and host, for the whole of `run`; the kernel drops it when the
process dies, so a crash leaves no stale lock).
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from phi_jax.model import PhiConfig
from phi_jax.sharding.distributed import (allgather_json, any_process, any_process_or_raise, failing_together,
                                          from_process_zero)
from phi_jax.train import flops
from phi_jax.train.checkpoint import (Checkpointer, CheckpointError, CorruptCheckpointError,
                                     IncompatibleCheckpointError, state_signature)
from phi_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer, warmup_length
from phi_jax.train.state import abstract_state, create_train_state, state_shardings
from phi_jax.train.step import (MeshJit, batch_shardings, check_rows_per_process, make_train_step,
                               most_pieces, split_microbatches)
from phi_jax.train.step import check_batch_token_ids as _check_token_ids, checked_loss_fn as _checked_loss_fn

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
  # Seconds the scheduler allows between SIGTERM and SIGKILL: the save after SIGTERM must finish within them, else
  # the process exits at the deadline (status 143) with the previous checkpoint as the newest. None: no deadline.
  preemption_grace_s: Optional[float] = None
  loss_spike_factor: float = 5.0  # flag a loss above factor x the running median; 0 disables
  loss_spike_window: int = 20  # losses in the running median (a spike is flagged once it holds 5 or more)
  # Early stopping: end the run once this many evaluations in a row have not lowered the best eval_loss by more
  # than `early_stopping_min_delta`. Needs eval data and eval_every > 0. None: train to num_steps.
  early_stopping_patience: Optional[int] = None
  early_stopping_min_delta: float = 0.0
  # Checkpoint each evaluation that sets a new best eval_loss, keep it beside the newest `keep_checkpoints`, and end
  # the run with its state (so params/ and the transformers export hold the best params, not the last).
  keep_best_checkpoint: bool = False

  def __post_init__(self):
    for name in ("num_steps", "seed", "microbatches", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every",
                 "early_stopping_patience", "loss_spike_window"):
      value = getattr(self, name)
      if isinstance(value, float) and value.is_integer():  # train.num_steps=1e4, as MaxText configs write it
        object.__setattr__(self, name, int(value))
      elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise ValueError(f"LoopConfig.{name}={value!r} must be a whole number")
    # Grain's shuffle (DPO's pairs) takes 32-bit seeds only and numpy's SeedSequence (the other stages) no negative
    # one: refused here, before a recipe trains its first stages and then stops at DPO.
    if self.seed is None or not 0 <= self.seed < 2**32:
      raise ValueError(f"train.seed={self.seed} must be in [0, 2**32) (LoopConfig.seed): the data shuffles take "
                       "32-bit seeds; choose another seed in that range")
    if self.eval_every < 0:
      raise ValueError(f"LoopConfig.eval_every={self.eval_every} must be >= 0 (0: evaluate only at the end)")
    if self.on_nonfinite not in ON_NONFINITE:
      raise ValueError(f"on_nonfinite={self.on_nonfinite!r}; expected one of {ON_NONFINITE}")
    for name in ("microbatches", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be at least 1"
                         + (" (0 would delete every checkpoint; None keeps all)" if name == "keep_checkpoints" else ""))
    if self.loss_spike_factor is None or self.loss_spike_window is None:
      raise ValueError("loss_spike_factor and loss_spike_window take numbers; loss_spike_factor=0 switches the "
                       "detector off")
    if self.loss_spike_factor != 0 and not self.loss_spike_factor > 1:
      raise ValueError(f"loss_spike_factor={self.loss_spike_factor} must be above 1 (a loss that many times the "
                       "running median is a spike), or 0 to switch the detector off")
    if self.loss_spike_factor and self.loss_spike_window < _MIN_SPIKE_HISTORY:
      raise ValueError(f"loss_spike_window={self.loss_spike_window}: a spike is flagged once the window holds "
                       f"{_MIN_SPIKE_HISTORY} losses, so a smaller one never flags any; give at least "
                       f"{_MIN_SPIKE_HISTORY}, or loss_spike_factor=0 to switch the detector off")
    if self.preemption_grace_s is not None and self.preemption_grace_s <= 0:
      raise ValueError(f"preemption_grace_s={self.preemption_grace_s} must be positive (or None)")
    if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
      raise ValueError(f"early_stopping_patience={self.early_stopping_patience} must be at least 1 (or None)")
    if self.early_stopping_min_delta < 0:
      raise ValueError(f"early_stopping_min_delta={self.early_stopping_min_delta} must be >= 0")
    if self.compares_evaluations and self.eval_every < 1:
      raise ValueError("early_stopping_patience and keep_best_checkpoint compare evaluations made during the run: "
                       f"set eval_every > 0 (it is {self.eval_every})")

  @property
  def compares_evaluations(self) -> bool:
    return self.early_stopping_patience is not None or self.keep_best_checkpoint


ON_NONFINITE = ("stop", "skip")
_MIN_SPIKE_HISTORY = 5  # losses the running median needs before a spike can be flagged
# Model config fields that fix the shapes or dtypes of the saved state: a resume that changes one cannot restore.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings", "param_dtype")


class Preempted(SystemExit):
  """Raised after a SIGTERM once the checkpoint is saved; exit status 143 (128 + SIGTERM) tells schedulers so."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


class _SigtermFlag:
  """Records SIGTERM instead of dying, so the loop can save first; further SIGTERMs during the save are ignored.

  With a grace period, a watchdog thread started by the first SIGTERM ends the process at the deadline, so a save
  that cannot finish in time never outlives the scheduler's patience half-written: its temporary directory is
  ignored and cleaned up on the next start. (Python runs the handler between bytecodes, so the clock starts when a
  blocking call in progress, such as waiting for a step, returns.) In a thread other than the main one, where Python
  sets no signal handler, it only logs that SIGTERM will not save.
  """

  def __init__(self, grace_s: Optional[float] = None):
    self.raised = False
    self.grace_s = grace_s
    self.done = threading.Event()
    self._previous = None
    self._installed = False  # False in a thread other than the main one, where Python sets no handler

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():  # Python sets handlers from the main thread only
      log.warning("training in %r, not the main thread: SIGTERM will not save a checkpoint first (a preempted run "
                  "resumes from its newest periodic checkpoint); run the loop in the main thread to have it saved",
                  threading.current_thread().name)
      return self
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    self._installed = True
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if self.raised:
      log.warning("SIGTERM again while saving; ignored so the save can finish")
      return
    self.raised = True
    log.warning("SIGTERM: finishing this step, then saving%s",
                f" (grace period {self.grace_s:g}s)" if self.grace_s else "")
    if self.grace_s:
      threading.Thread(target=self._watchdog, daemon=True, name="preemption-watchdog").start()

  def _watchdog(self):
    if not self.done.wait(self.grace_s):
      log.error("SIGTERM: the checkpoint was not saved within the %gs grace period; exiting without it (the newest "
                "complete checkpoint is unchanged). Raise train.preemption_grace_s only if the scheduler allows it.",
                self.grace_s)
      for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
      sys.stdout.flush()
      os._exit(143)  # pylint: disable=protected-access

  def __exit__(self, *exc):
    self.done.set()
    if self._installed:  # a handler set outside Python reads as None: the default is the nearest to put back
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)


_SPIKE_WINDOW_KEY = "loss_spike_window_losses"  # in each checkpoint's metadata
_EVAL_PENDING_KEY = "evaluation_pending"  # a checkpoint's step whose evaluation raised: a resumed run runs it first


# Settings that data stats carry beside their counts (a source's mixture weight and epochs): the same on every
# process, so process 0's value is the run's, whatever its type (an integer weight is not a count to add up).
_SETTINGS_KEYS = ("weight", "num_epochs")


def sum_over_processes(counts: Any) -> Any:
  """Per-process counts (JSON: nested dicts of numbers) combined over all processes: integers add up, floats
  (fractions such as `padding_fraction`) become their mean, anything else (and the settings of `_SETTINGS_KEYS`)
  is process 0's. A key some processes lack (a skip reason only one of them met) combines the values of those that
  have it. A collective."""
  per_process = allgather_json(counts)

  def combine(values, key=None):
    first = values[0]
    if isinstance(first, dict):
      keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
      return {k: combine([v[k] for v in values if isinstance(v, dict) and k in v], k) for k in keys}
    if key in _SETTINGS_KEYS:
      return first
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
      return sum(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      return sum(values) / len(values)
    return first

  return combine(per_process)


def _counted_over_processes(stats: dict) -> dict:
  """The record's `tokens_per_sec` (the step's real tokens on every process over its time) and `tokens_seen/<source>`
  fields (the tokens of every source so far), summed over the processes: a collective on several processes."""
  local = {"tokens": stats["tokens"], "seen": stats.get("tokens_seen", {})}
  total = sum_over_processes(local) if jax.process_count() > 1 else local
  return {"tokens_per_sec": total["tokens"] / stats["elapsed"],
          **{f"tokens_seen/{name}": tokens for name, tokens in total["seen"].items()}}


class _SpikeDetector:
  """Flags a loss above `factor` x the median of the previous `window` finite losses."""

  def __init__(self, factor: float, window: int, history: Iterable[float] = ()):
    self.factor = factor
    self.losses = collections.deque((x for x in history if math.isfinite(x)), maxlen=window)

  def __call__(self, loss: float) -> Optional[float]:
    """The running median when `loss` is a spike, else None; records the loss."""
    median = statistics.median(self.losses) if len(self.losses) >= _MIN_SPIKE_HISTORY else None
    if math.isfinite(loss):
      self.losses.append(loss)
    if self.factor and median is not None and median > 0 and loss > self.factor * median:
      return median
    return None


class _EvalHistory:
  """The run's evaluations: the best (lowest) eval_loss, its step, and how many evaluations since one lowered the
  best by more than min_delta (early stopping's patience; as transformers' EarlyStoppingCallback threshold, min_delta
  decides only when the run stalls, never which evaluation is the best one, whose params keep_best keeps).

  Rebuilt on resume from the eval records metrics.jsonl keeps up to the restored step, so early stopping and the
  kept best checkpoint go on as in an uninterrupted run.
  """

  def __init__(self, min_delta: float, records: Iterable[dict] = ()):
    self.min_delta = min_delta
    self.best_loss, self.best_step, self.since_best, self.last_step = math.inf, None, 0, None
    for record in records:  # metrics.jsonl writes a NaN eval_loss (nothing scored) as null
      self.add(record["step"], float("nan") if record["eval_loss"] is None else record["eval_loss"])

  def add(self, step: int, loss: float) -> bool:
    """Records an evaluation; True when it is a new best (below every earlier eval_loss)."""
    self.last_step = step
    finite = math.isfinite(loss)
    self.since_best = 0 if finite and loss < self.best_loss - self.min_delta else self.since_best + 1
    if finite and loss < self.best_loss:
      self.best_loss, self.best_step = loss, step
      return True
    return False

  def agree(self) -> None:
    """Takes process 0's history: another process may have read metrics.jsonl while process 0 rewrote it, and
    the history decides collectives (saves, evaluations, the restore of the best step)."""
    nan = float("nan")
    best_loss, best_step, since_best, last_step = from_process_zero(
        self.best_loss, nan if self.best_step is None else self.best_step, self.since_best,
        nan if self.last_step is None else self.last_step)
    self.best_loss, self.since_best = best_loss, int(since_best)
    self.best_step = None if math.isnan(best_step) else int(best_step)
    self.last_step = None if math.isnan(last_step) else int(last_step)

  def summary(self) -> dict:
    return {"best_eval_loss": None if self.best_step is None else self.best_loss, "best_eval_step": self.best_step}

  def describe(self) -> str:
    best = ("no finite eval_loss yet" if self.best_step is None
            else f"best eval_loss {self.best_loss:.4g} at step {self.best_step}")
    gain = (f"an eval_loss below the best by more than {self.min_delta:g}" if self.min_delta
            else "a new best eval_loss")
    return f"{self.since_best} evaluations without {gain} ({best})"


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays split over data x fsdp (works on one host and many)."""
  check_batch(local_batch, mesh)
  if jax.process_count() > 1:
    # Each process's rows must be a block of the global batch of their own: on a mesh whose data x fsdp blocks span
    # processes, the processes' different rows would silently become one batch per process.
    _check_rows_once(mesh, len(jax.tree.leaves(local_batch)[0]) * jax.process_count())
  shardings = batch_shardings(local_batch, mesh)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_batch, shardings)


def check_batch(local_batch: dict, mesh: Mesh, what: str = "batch") -> None:
  """Raises, naming the key, unless every leaf of the per-process batch is a numeric array whose leading axis of
  rows (over all processes) splits evenly over the mesh's data x fsdp devices."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  for path, x in jax.tree_util.tree_leaves_with_path(local_batch):
    name = f"{what}{jax.tree_util.keystr(path)}"
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      problem = f"is a {type(x).__name__}"
    elif np.dtype(x.dtype).kind in "OSU":
      problem = f"holds {np.dtype(x.dtype).str.lstrip('<>|=')} values"
    elif not x.ndim:
      problem = "has no batch axis (a scalar)"
    else:
      rows = x.shape[0] * jax.process_count()
      if rows % ways:
        raise ValueError(f"{name} has {rows} rows, which mesh.shape={dict(mesh.shape)} cannot split evenly over "
                         f"data x fsdp = {ways} devices: give batches a multiple of {ways} rows")
      continue
    raise TypeError(f"{name} {problem}: only arrays (numpy or jax, numbers with a leading axis of rows) can be "
                    f"batched; drop {jax.tree_util.keystr(path[:1])} from the batch (keep text and ids outside it)")


@functools.lru_cache(maxsize=16)
def _check_rows_once(mesh: Mesh, rows: int) -> None:
  check_rows_per_process(mesh, rows)


def _json_line(record: dict) -> str:
  """`record` as one line of strict JSON: a non-finite number (a skipped update's loss, the loss of a step with no
  targets, an eval set with nothing to score) is null, as NaN and Infinity are not JSON (JSON.parse refuses them,
  jq turns them into other numbers); `skipped_update` and `weight` say why."""
  clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
  return json.dumps({k: clean(v) for k, v in record.items()}) + "\n"


class MetricsWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl (only process 0 writes); a non-finite value
  is written as null."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.enabled = jax.process_index() == 0
    self.kept: list[dict] = []  # the records of steps up to resume_step, as read back
    if os.path.exists(path):
      # Lines after the restored checkpoint came from the interrupted run; the resumed run writes them again. A
      # line cut short by a crash mid-write is dropped too.
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue
          if record.get("step", 0) <= resume_step:
            self.kept.append(record)
      if self.enabled:
        self._rewrite(self.kept)

  def _rewrite(self, records: list[dict]):
    """Replaces the file through a temporary file and a rename: a full disk or a kill part-way through leaves the
    old history whole (it holds the eval history that early stopping and the best checkpoint are rebuilt from)."""
    tmp = f"{self.path}.tmp"
    try:
      with open(tmp, "w") as f:
        f.writelines(map(_json_line, records))
      os.replace(tmp, self.path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  def write(self, record: dict):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(_json_line(record))

  def merge(self, step: int, extra: dict):
    """Adds `extra` to the newest written training record of `step` (rewriting the file), or appends it as a
    record of its own when that step has none."""
    if not self.enabled:
      return
    records = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        records = [json.loads(line) for line in f]
    index = next((i for i in reversed(range(len(records)))
                  if records[i].get("step") == step and "loss" in records[i]), None)
    if index is None:
      self.write(dict(extra, step=step))
      return
    records[index].update(extra)
    self._rewrite(records)


def _token_stats(local: dict) -> dict:
  """Real tokens, row slots (for MFU) and row length of a batch; DPO rows come as chosen_* and rejected_*."""
  segments = [np.asarray(v) for k, v in local.items() if k.endswith("segment_ids")]
  rows = [np.asarray(v) for k, v in local.items() if k.endswith("tokens") and np.ndim(v) == 2]
  return {"tokens": sum(int(np.sum(s > 0)) for s in segments),  # this process's: summed when a record is written
          "slots": sum(int(r.size) for r in rows) * jax.process_count(),  # fixed shapes: the same on every process
          "seq_len": int(rows[0].shape[-1]) if rows else 0}


def initial_params_key(seed: int) -> jax.Array:
  """The key `run` initialises a fresh run's params from (without `init_params`); a reference model that is "the
  policy as it started" (DPO, GRPO) is built from the same key."""
  return jax.random.fold_in(jax.random.key(seed), 2**31 - 1)


def host_scalar(x) -> float:
  """A replicated scalar's value; reads the local copy, so it works when the array spans several hosts."""
  return float(np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x)


def _to_host(metrics: dict) -> dict:
  return {k: host_scalar(v) for k, v in metrics.items()}


def check_workdir(workdir: str) -> None:
  """Refuses a URL (gs://, s3://): the metrics, data state and checkpoint code write local (or mounted) paths, and
  os.path would turn the URL into a local directory named "gs:", failing only at the first checkpoint."""
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(workdir)):
    raise ValueError(f"workdir={workdir!r} is a URL; phi_jax writes runs to a local or mounted file system path: "
                     "mount the bucket (e.g. gcsfuse, mountpoint-s3) and give the mounted path")


LOCK_FILE = ".lock"  # in the workdir; holds "pid N on HOST" of the run that trains there


class WorkdirInUseError(RuntimeError):
  """Another run trains in the workdir (holds its lock)."""


def _lock_workdir(workdir: str) -> Optional[int]:
  """Takes the workdir's exclusive lock and returns its file descriptor (closing it releases the lock; the kernel
  releases it when the process dies, so a crashed run leaves no stale lock). Raises `WorkdirInUseError` naming the
  holder when another run has it; None (with a warning) on a file system without locks."""
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "not yet recorded"
    os.close(fd)
    raise WorkdirInUseError(
        f"{workdir} is in use by another training run ({holder}, per {path}): two runs in one workdir would "
        "interleave their checkpoints and metrics.jsonl. Wait for it to end (or stop it) and rerun the same command "
        "to resume, or give this run another workdir") from None
  except OSError as e:  # e.g. a network file system without flock
    os.close(fd)
    log.warning("could not lock %s (%s): nothing stops a second run from training in %s at the same time", path, e,
                workdir)
    return None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
  return fd


# workdir (real path) -> (this process's lock on it (None: not process 0), the thread holding it)
_HELD_LOCKS: dict[str, tuple[Optional[int], int]] = {}


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds the workdir's lock, taken by process 0 alone and released however the block ends (return, error,
  `Preempted`); a block inside another on the same workdir (`run` inside train.py's) holds it already. A refused
  lock stops every process before anything is written there: process 0's error is shared with the others (a
  collective), which would otherwise wait for it in the first step."""
  check_workdir(workdir)  # before makedirs turns a URL into a local directory
  key = os.path.realpath(workdir)
  if key in _HELD_LOCKS:
    if _HELD_LOCKS[key][1] != threading.get_ident():  # a second trainer in this process (a re-run notebook cell)
      raise WorkdirInUseError(f"{workdir} is being trained by another thread of this process: wait for it to end, "
                              "or use another workdir")
    yield
    return
  fd, error = None, None
  if jax.process_index() != 0:
    os.makedirs(workdir, exist_ok=True)
  else:
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = _lock_workdir(workdir)
    except Exception as e:  # pylint: disable=broad-except  (held by another run; a read-only or missing directory)
      error = e
  refusal = allgather_json(None if error is None else f"{type(error).__name__}: {error}")[0]
  if refusal is not None:
    raise error or WorkdirInUseError(f"process 0 could not take the lock of {workdir}: {refusal}")
  _HELD_LOCKS[key] = (fd, threading.get_ident())
  try:
    yield
  finally:
    del _HELD_LOCKS[key]
    if fd is not None:
      os.close(fd)


def _holding_workdir_lock(run_fn: Callable) -> Callable:
  """`run_fn(workdir=..., ...)` inside `workdir_lock(workdir)`."""
  @functools.wraps(run_fn)
  def locked(*, workdir: str, **kwargs):
    with workdir_lock(workdir):
      return run_fn(workdir=workdir, **kwargs)
  return locked


def _first_eval_checked(eval_batches: Callable[[], Iterable[dict]], train_batch: dict, mesh: Mesh,
                        vocab_size: int) -> Callable[[], Iterable[dict]]:
  """Checks the first eval batch against the mesh, the train batch's keys and the vocabulary, before any step (found
  at an evaluation, by default the last step, a bad eval batch stops the run there, its steps paid for).
  Returns `eval_batches` whose first call goes on with the batches read here: no extra pass over the eval data.
  A batch that fails to read or check on one process stops every process here (a collective), each naming it."""
  # A bad record, a bad token id: on this process alone.
  with failing_together("reading or checking the first eval batch"):
    first, batches = _first_eval_batch(eval_batches, train_batch, mesh, vocab_size)
  replay = [itertools.chain([] if first is None else [first], batches)]
  return lambda: replay.pop() if replay else eval_batches()


def _first_eval_batch(eval_batches: Callable[[], Iterable[dict]], train_batch: dict, mesh: Mesh,
                      vocab_size: int) -> tuple[Optional[dict], Iterator[dict]]:
  """(the first eval batch, checked, or None when there is none; the rest of the batches) of `_first_eval_checked`."""
  batches = eval_batches()
  if isinstance(batches, collections.abc.Mapping):  # iterating one batch gives its keys
    raise TypeError("eval_batches() returned one batch (a dict): it must return an iterable of batches, e.g. "
                    "lambda: [batch]")
  batches = iter(batches)
  first = next(batches, None)
  if first is not None and not isinstance(first, collections.abc.Mapping):
    raise TypeError(f"eval_batches() yields a {type(first).__name__}: each batch is a dict of arrays")
  if first is not None:
    missing = sorted(set(train_batch) - set(first), key=str)
    if missing:
      raise ValueError(f"the first eval batch lacks {', '.join(map(repr, missing))}, a key of the train batches "
                       f"(it has {sorted(first, key=str)}): the loss function reads the same keys in both")
    check_batch(first, mesh, what="the first eval batch")
    _check_token_ids(first, vocab_size, "the first eval batch")
  return first, batches


@_holding_workdir_lock
def run(*, workdir: str, model_config: PhiConfig, optimizer_config: OptimizerConfig, loss_fn: Callable,
        train_data: Iterable, loop: LoopConfig, mesh: Mesh, init_params: Optional[Callable[[], Any]] = None,
        eval_batches: Optional[Callable[[], Iterable[dict]]] = None, run_meta: Optional[dict] = None,
        on_log: Optional[Callable[[dict], None]] = None, on_start: Optional[Callable[[], None]] = None,
        on_first_step: Optional[Callable[[], None]] = None):
  """Trains to `loop.num_steps` (resuming if workdir has checkpoints) and returns the final TrainState.

  `loss_fn(params, batch, rng)` returns (loss_sum, aux): `loss_sum` a scalar sum over the batch, `aux` a dict with
  "weight" (the units summed: tokens, pairs), which the step divides by, and optionally "metrics" ({name: sum});
  see phi_jax.train.step. A loss of another form is refused when the step is first traced.
  `train_data` (an iterable of batches, e.g. `[batch]`, not one batch) yields per-process numpy batches (dicts of
  arrays of rows, a multiple of data x fsdp over all processes; token ids inside the model's vocabulary), or has
  `next_batch(params, step)` when batches are sampled from the current policy (GRPO); if it has
  get_state/set_state, its position is checkpointed; `step_metrics(step)` adds data-side metrics (rewards,
  lengths) to that step's record. `on_start()` runs once the workdir's
  checkpoints are known to fit this config (a refused resume changes nothing in the workdir), before any step;
  `on_first_step()` right before the first step this call trains (not at all when nothing is left to train).
  `init_params()` returns (sharded) starting params, e.g. from an HF checkpoint or a previous stage; None means
  random init from the seed.
  With `loop.keep_best_checkpoint` the returned state is the best evaluation's, restored from its checkpoint.
  `eval_batches()` returns the eval batches anew at every evaluation; a list or tuple of batches is taken as is.
  Its first batch is checked before the first step (rows the mesh can split, the train batch's keys, token ids),
  as the batches of `train_data` are before each step; a later one that fails (at any evaluation) raises once the
  step it evaluates is saved.
  Raises `WorkdirInUseError` before writing anything when another run holds the workdir's lock (W/.lock).
  """
  check_workdir(workdir)
  if isinstance(train_data, collections.abc.Mapping):  # iterating one batch gives its keys
    raise TypeError(f"train_data is a {type(train_data).__name__}: pass an iterable of batches, e.g. [batch]")
  if init_params is not None and not callable(init_params):
    raise TypeError(f"init_params is a {type(init_params).__name__}: give a function returning the starting params "
                    "(e.g. lambda: params), or None for a random init from the seed")
  loss_fn = _checked_loss_fn(loss_fn)
  if isinstance(eval_batches, (list, tuple)):
    eval_batches = functools.partial(iter, eval_batches)
  elif eval_batches is not None and not callable(eval_batches):
    # Found only at the first evaluation, by default the last step, before its checkpoint: the run's steps lost.
    raise TypeError(f"eval_batches is a {type(eval_batches).__name__}: give a list of batches or a function "
                    "returning a fresh iterable of them at every evaluation (an iterator would be used up by the "
                    "first)")
  if loop.compares_evaluations and eval_batches is None:
    raise ValueError("early_stopping_patience and keep_best_checkpoint compare evaluations, but this run has no "
                     "eval data: set data.eval_files (or turn both off)")
  os.makedirs(workdir, exist_ok=True)
  optimizer = make_optimizer(optimizer_config, loop.num_steps)
  schedule = learning_rate_schedule(optimizer_config, loop.num_steps)
  warmup = warmup_length(optimizer_config, loop.num_steps)
  if warmup > loop.num_steps:
    log.warning("optimizer.warmup_steps=%d exceeds the run's %d steps: the run ends inside the warmup, below the "
                "peak learning rate", warmup, loop.num_steps)
  shardings = state_shardings(model_config, optimizer, mesh)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=loop.checkpoint_every,
                              max_to_keep=loop.keep_checkpoints, async_save=loop.async_checkpoints)
  rng = jax.random.key(loop.seed)
  meta = _json_clean(dict(run_meta or {}, model_config=dataclasses.asdict(model_config),
                          optimizer_config=dataclasses.asdict(optimizer_config), loop_config=dataclasses.asdict(loop),
                          mesh=dict(mesh.shape)))
  restored = saved_meta = None
  if checkpointer.all_steps():
    target = abstract_state(model_config, optimizer, mesh)
    meta["state_signature"] = _json_clean(state_signature(target))
    restored = checkpointer.restore_latest(
        target, check_meta=lambda saved: check_resume_compatible(saved, meta, checkpointer.directory))
  else:
    checkpointer.refuse_fresh_start_over_set_aside_steps()
  if restored is not None:
    latest, state, data_state, saved_meta = restored
    if data_state and hasattr(train_data, "set_state"):
      train_data.set_state(data_state)
    log.info("resumed from %s at step %d", checkpointer.step_path(latest), latest)
    saved_steps = saved_meta.get("loop_config", {}).get("num_steps")
    if saved_steps not in (None, loop.num_steps):
      # The schedule counts optimizer updates from 0, so the next step (latest + 1) trains at schedule(latest).
      before = float(learning_rate_schedule(optimizer_config, saved_steps)(latest))
      now = float(schedule(latest))
      if before != now:
        log.warning("num_steps changed from %d to %d: the learning-rate schedule spans num_steps, so the next step, "
                    "step %d, trains at a learning rate of %.3g where the schedule of num_steps=%d gives it %.3g",
                    saved_steps, loop.num_steps, latest + 1, now, saved_steps, before)
  else:
    try:
      params = init_params() if init_params is not None else None
      state = create_train_state(model_config, optimizer, mesh, initial_params_key(loop.seed), params=params)
    except BaseException:
      checkpointer.close()  # else Orbax's background thread outlives the failed run
      raise
    meta["state_signature"] = _json_clean(state_signature(state))
  start = int(host_scalar(state.step))
  if start >= loop.num_steps:
    log.info("the run in %s is already complete: step %d of num_steps=%d; nothing to train (raise num_steps to go "
             "on)", workdir, start, loop.num_steps)
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), start)
  # Every step's loss feeds the spike detector, but metrics.jsonl keeps only the logged steps: the checkpoint
  # carries the detector's window (older checkpoints lack it: the logged losses stand in).
  saved_window = (saved_meta or {}).get(_SPIKE_WINDOW_KEY)
  if saved_window is None:
    saved_window = [r["loss"] for r in writer.kept if r.get("loss") is not None]  # null: no finite loss
    if jax.process_count() > 1:  # process 0's: another may have read metrics.jsonl while process 0 rewrote it, and
      saved_window = allgather_json(saved_window)[0]  # a flagged spike writes a record, which is a collective
  spikes = _SpikeDetector(loop.loss_spike_factor, loop.loss_spike_window, saved_window)
  evals = _EvalHistory(loop.early_stopping_min_delta, [r for r in writer.kept if "eval_loss" in r])
  evals.agree()
  if loop.keep_best_checkpoint and evals.best_step is not None:
    checkpointer.keep([evals.best_step])
  patience_spent = lambda: (loop.early_stopping_patience is not None
                            and any_process(evals.since_best >= loop.early_stopping_patience)[0])
  if on_start is not None:
    on_start()
  # A data source with next_batch(params, step) samples from the current policy (GRPO); others are iterators.
  on_policy = hasattr(train_data, "next_batch")
  iterator = None if on_policy else iter(train_data)
  if iterator is not None and restored is not None and start > 0 and not hasattr(train_data, "set_state"):
    # No saved position to restore (a list, a generator): as transformers' Trainer does, skip the batches the steps
    # so far trained on, so a deterministic source resumes where the run left it instead of training them again.
    log.warning("train_data has no get_state / set_state, so its position was not saved: skipping its first %d "
                "batches to resume at step %d (give the data get_state / set_state to restore it exactly)", start,
                start)
    iterator = itertools.islice(iterator, start, None)

  step_fn = None
  eval_fn = None

  def evaluate(step: int) -> tuple[dict, bool]:
    """Scores the eval data with the current params: (eval metrics, whether it is a new best)."""
    nonlocal eval_fn
    eval_fn = eval_fn or _make_eval(loss_fn, mesh, loop.microbatches)
    unit = getattr(loss_fn, "weight_unit", "tokens")  # what the stage's aux["weight"] counts
    record = _evaluate(eval_fn, state.params, eval_batches(), mesh, unit)
    if loop.compares_evaluations and not record[f"eval_{unit}"]:
      raise ValueError(f"the eval data gave no {unit} to score, so early_stopping_patience / keep_best_checkpoint "
                       "have no eval loss to compare: check data.eval_files and data.eval_batches")
    improved = evals.add(step, record["eval_loss"])
    return dict(record, **evals.summary()), improved

  if (eval_batches is not None and (saved_meta or {}).get(_EVAL_PENDING_KEY) == start
      and evals.last_step != start):
    # The restored step's evaluation raised after its checkpoint was saved (`save_before_eval_error`): it runs now,
    # so the eval history, early stopping and the kept best checkpoint go on as in an uninterrupted run.
    log.info("evaluating step %d, whose evaluation failed before the run stopped", start)
    eval_record, improved = evaluate(start)
    writer.merge(start, eval_record)
    if improved and loop.keep_best_checkpoint:
      checkpointer.keep([start])
  stopped_early = start < loop.num_steps and patience_spent()
  if stopped_early:
    log.info("the run in %s stopped early at step %d: %s; early_stopping_patience=%d, nothing to train (raise the "
             "patience to go on)", workdir, start, evals.describe(), loop.early_stopping_patience)
  with_spike_window = lambda: dict(meta, **{_SPIKE_WINDOW_KEY: list(spikes.losses)})
  pending = None  # (step, device metrics, host stats) of the last dispatched step, pulled one step late
  flushed = None  # (record, written, host stats) of the last step pulled to the host
  last_time = time.perf_counter()

  def flush(pending_item, evaluate_now: bool = False, last: bool = False) -> bool:
    """Writes the step's record (on log steps, and the run's `last` step); with `evaluate_now` the step's evaluation
    joins it, so every record carries the training loss. Returns whether that evaluation is a new best."""
    nonlocal last_time, flushed
    step, device_metrics, stats = pending_item
    record = _to_host(device_metrics)
    now = time.perf_counter()
    elapsed, last_time = now - last_time, now
    stats["elapsed"] = elapsed  # tokens_per_sec joins the record when it is written (see _counted_over_processes)
    if loop.peak_flops_per_device:
      flops_per_token = flops.train_flops_per_token(model_config, stats["seq_len"])
      # Against the devices of the mesh that ran the step, which may be a subset of the process's.
      record["mfu"] = flops_per_token * stats["slots"] / elapsed / (loop.peak_flops_per_device * mesh.size)
    record["step"] = step
    # A step's own data metrics (GRPO: the reward and accuracy of the rollout batch it trained on, at every pass over
    # the batch) exist at that step only: its record is written whatever log_every says, or they would be lost.
    step_metrics = train_data.step_metrics(step) if hasattr(train_data, "step_metrics") else {}
    record.update(step_metrics)
    # A step that trained nothing (weight 0) has a NaN loss by design (a mean over no targets), not a fault.
    checked = ("loss", "grad_norm") if record.get("weight", 1.0) else ("grad_norm",)
    bad = [k for k in checked if not math.isfinite(record.get(k, 0.0))]
    if bad and loop.on_nonfinite == "stop":
      checkpointer.wait()
      latest = checkpointer.latest_step()
      where = (f"The last good checkpoint is step {latest} in {checkpointer.directory}" if latest is not None else
               f"No checkpoint was saved yet in {checkpointer.directory} (a rerun starts from the beginning)")
      raise FloatingPointError(f"non-finite {bad[0]}={record[bad[0]]} at step {step}; stopping. {where} (set "
                               "on_nonfinite='skip' to skip such updates)")
    if bad:
      log.warning("non-finite %s=%s at step %d; update skipped (on_nonfinite='skip')", bad[0], record[bad[0]], step)
    if "loss" in record:
      median = spikes(record["loss"])
      record["loss_spike"] = float(median is not None)
      if median is not None:
        log.warning("loss spike at step %d: %.4g > %g x the running median %.4g", step, record["loss"],
                    loop.loss_spike_factor, median)
    improved = False
    if evaluate_now:
      try:
        eval_record, improved = evaluate(step)
      except Exception:
        save_before_eval_error(record, stats)
        raise
      record.update(eval_record)
      last_time = time.perf_counter()  # the evaluation's time is not the next step's
    # A skipped update or a loss spike is flagged in its own step's record whatever log_every says (the loss is the
    # same on every process, so they all write it).
    flagged = bool(bad) or record.get("loss_spike", 0.0) > 0
    written = (step % loop.log_every == 0 or step == loop.num_steps or evaluate_now or last or bool(step_metrics)
               or flagged)
    if written:
      record.update(_counted_over_processes(stats))  # every process writes the same steps: a collective is safe
      writer.write(record)
      if on_log is not None:
        on_log(record)
    flushed = (record, written, stats)
    return improved

  def save_before_eval_error(record: dict, stats: dict) -> None:
    """Saves the step whose evaluation raised, with its training record, as its own save would have (its loss is
    known finite by now; the evaluation runs before the save, and a bad eval batch would otherwise lose the steps
    since the last checkpoint), marked so that a resumed run evaluates it first. Every process gets here together
    (`_agree_on_eval_batch`), as the save needs."""
    step = record["step"]
    writer.write(dict(record, **_counted_over_processes(stats)))
    data_state = train_data.get_state() if hasattr(train_data, "get_state") else None
    checkpointer.save(step, state, data_state=data_state, meta=dict(with_spike_window(), **{_EVAL_PENDING_KEY: step}),
                      force=True)
    checkpointer.wait()
    write_data_stats()
    log.error("the evaluation at step %d failed (the error follows); saved step %d's checkpoint to %s first, so no "
              "trained step is lost: fix the eval data (data.eval_files, or eval_batches) and rerun the same command "
              "to resume from it", step, step, checkpointer.step_path(step))

  def write_data_stats():
    if hasattr(train_data, "stats"):
      combined = sum_over_processes(json.loads(json.dumps(train_data.stats(), default=str)))  # a collective
      if jax.process_index() == 0:
        with open(os.path.join(workdir, "data_stats.json"), "w") as f:
          json.dump(combined, f, indent=1)

  with _SigtermFlag(loop.preemption_grace_s) as sigterm, _finish_saves_on_error(checkpointer):
    saved = start
    for step in range(start, start if stopped_early else loop.num_steps):
      error = None
      try:
        local = train_data.next_batch(state.params, step) if on_policy else next(iterator)
        # Checked on the host (cheap next to a step), where the batch is still at hand to name the bad id.
        _check_token_ids(local, model_config.vocab_size, f"train batch of step {step + 1}")
      except StopIteration:
        local = None
      except Exception as e:  # pylint: disable=broad-except  (a bad record, a file changed or gone)
        if jax.process_count() == 1:
          raise
        error, local = e, None  # raised below on every process, not on this one alone while the others wait
      # Every process must take every step and every checkpoint save (they are collectives), but a process may run
      # out of a finite dataset first (uneven shares, packing), fail to read its data, or see a SIGTERM another does
      # not (yet). So before each step the processes agree on all three, and all stop, fail or save at the same
      # step. On multi-process runs this waits for the previous step.
      exhausted, preempt = _agree_before_step(local, error, sigterm.raised, step)
      if exhausted:
        if local is not None:
          log.warning("another process's training data ran out: this process's batch for step %d is not trained",
                      step + 1)
        if step == start and restored is not None:
          log.warning("the training data ran out before this run resumed: the data position saved at step %d is at "
                      "the end of the data, and a resumed run does not reopen it (a raised data.num_epochs included). "
                      "To train on, start a new workdir with train.init_from=%s", step, workdir)
        else:
          log.warning("the training data ran out after step %d of num_steps=%d; ending the run there. The "
                      "learning-rate schedule spans num_steps, so it stopped at %.3g (peak %.3g): to run the whole "
                      "schedule on this data, set train.num_steps=%d (or raise data.num_epochs) in a new run", step,
                      loop.num_steps, float(schedule(max(step - 1, 0))), optimizer_config.learning_rate, step)
        break
      if step == start and eval_batches is not None:
        # After the agreement: reading a DPO eval batch runs the reference pass, a collective every process joins.
        eval_batches = _first_eval_checked(eval_batches, local, mesh, model_config.vocab_size)
      batch = global_batch(local, mesh)
      if step == start and on_first_step is not None:
        on_first_step()
      if step_fn is None:
        # Each batch's token ids were checked above, on the host batch: no second host copy per step.
        step_fn = make_train_step(loss_fn, optimizer, schedule, mesh, shardings, batch,
                                  microbatches=loop.microbatches, skip_nonfinite=loop.on_nonfinite == "skip",
                                  check_token_ids=False)
      state, metrics = step_fn(state, batch, rng)
      if jax.process_count() == 1:
        preempt = sigterm.raised  # nothing to agree on: save right after the step the signal arrived in
      stats = _token_stats(local)
      if hasattr(train_data, "stats"):  # counted now: when this step's record is written, the next batch is in
        sources = train_data.stats().get("sources", {})
        stats["tokens_seen"] = {name: source["tokens"] for name, source in sources.items()}
      if pending is not None:
        flush(pending)
      pending = (step + 1, metrics, stats)
      done = step + 1
      save_best = False
      # The last step's evaluation waits for a resume when a SIGTERM asks for the checkpoint (the grace period is
      # short); other steps evaluate before their save so a resumed run has the same evaluation history.
      last_step_preempted = preempt and done == loop.num_steps
      if eval_batches is not None and not last_step_preempted and (
          (loop.eval_every and done % loop.eval_every == 0) or done == loop.num_steps):
        save_best = flush(pending, evaluate_now=True) and loop.keep_best_checkpoint
        pending = None
        if save_best:
          checkpointer.keep([done])  # the previous best goes once this save lands, unless among the newest
        stopped_early = done < loop.num_steps and patience_spent()
      if done % loop.checkpoint_every == 0 or done == loop.num_steps or preempt or stopped_early or save_best:
        if pending is not None:
          flush(pending)  # a checkpoint is written only after its step's loss is known to be finite
          pending = None
        data_state = train_data.get_state() if hasattr(train_data, "get_state") else None
        checkpointer.save(done, state, data_state=data_state, meta=with_spike_window(), force=True)
        saved = done
        write_data_stats()
        last_time = time.perf_counter()  # the save's time is not the next step's
      if preempt:
        checkpointer.close()
        log.warning("SIGTERM%s: saved step %d to %s; exiting", "" if sigterm.raised else " on another process", done,
                    checkpointer.step_path(done))
        raise Preempted(done)
      if stopped_early:
        log.info("early stop at step %d: %s; early_stopping_patience=%d", done, evals.describe(),
                 loop.early_stopping_patience)
        break
    if pending is not None:  # the data ended: the last step is evaluated (unless it just was) with its record
      if flush(pending, evaluate_now=eval_batches is not None and evals.last_step != pending[0], last=True):
        if loop.keep_best_checkpoint:
          checkpointer.keep([pending[0]])
    final = int(host_scalar(state.step))
    if final != saved:  # the data ended between checkpoints
      checkpointer.save(final, state, data_state=train_data.get_state() if hasattr(train_data, "get_state") else None,
                        meta=with_spike_window(), force=True)
  # The last evaluation (and the best state's restore) may raise while the last checkpoint's async save is in flight.
  with _finish_saves_on_error(checkpointer):
    if eval_batches is not None and evals.last_step != final:
      # The last step's record is already pulled (the data ran out right after a checkpoint, a preempted last step,
      # or nothing trained in this run): the evaluation joins it.
      eval_record, improved = evaluate(final)
      if flushed is not None and flushed[0]["step"] == final and not flushed[1]:
        writer.write(dict(flushed[0], **_counted_over_processes(flushed[2]), **eval_record))
      else:
        writer.merge(final, eval_record)
      if improved and loop.keep_best_checkpoint:
        checkpointer.keep([final])
    elif flushed is not None and flushed[0]["step"] == final and not flushed[1]:
      # The data ran out right after a checkpoint that pulled the last step's record between log steps: written now,
      # so metrics.jsonl (and a sweep's summary of it) ends at the run's last step.
      writer.write(dict(flushed[0], **_counted_over_processes(flushed[2])))
    if loop.keep_best_checkpoint and evals.best_step not in (None, final):
      state = _restore_best(checkpointer, evals, abstract_state(model_config, optimizer, mesh), state)
  checkpointer.close()
  write_data_stats()
  return state


def _restore_best(checkpointer: Checkpointer, evals: _EvalHistory, target, state):
  """The state of the best evaluation's checkpoint (keep_best_checkpoint), or `state` if that step is gone or
  damaged."""
  checkpointer.wait()
  step, last = evals.best_step, int(host_scalar(state.step))
  if step not in checkpointer.all_steps():  # e.g. evaluated before keep_best_checkpoint was turned on
    log.warning("the best evaluation (eval_loss %.4g at step %d) has no checkpoint in %s; the run ends with the "
                "state of step %d", evals.best_loss, step, checkpointer.directory, last)
    return state
  if last in checkpointer.all_steps():
    # Two train states may not fit on the devices: free the last one, which is on disk as step `last`, first.
    for leaf in jax.tree.leaves(state):
      if isinstance(leaf, jax.Array):
        leaf.delete()
    fallback = lambda: checkpointer.restore(last, target)[0]
  else:
    fallback = lambda: state
  try:
    best = checkpointer.restore(step, target)[0]
  except CorruptCheckpointError as e:  # raised on every process alike; the step stays where it is
    log.warning("%s; the run ends with the state of step %d instead of its best evaluation's", e, last)
    return fallback()
  log.info("the run ends with the state of step %d, its best evaluation (eval_loss %.4g), restored from %s",
           step, evals.best_loss, checkpointer.step_path(step))
  return best


@contextlib.contextmanager
def _finish_saves_on_error(checkpointer: Checkpointer):
  """On an error inside the loop, lets an async save already in flight finish, so its step is not lost. Ctrl-C
  (KeyboardInterrupt) included: without the wait the interpreter shut down under the commit thread."""
  try:
    yield
  except CheckpointError:
    raise
  except (Exception, KeyboardInterrupt):
    try:
      checkpointer.wait()
    except CheckpointError as e:
      log.error("%s", e)
    raise


def _json_clean(obj):
  """`obj` as it reads back from JSON (tuples become lists), so saved and current metadata compare equal."""
  return json.loads(json.dumps(obj, default=str))


def check_resume_compatible(saved: dict, current: dict, where: str):
  """Raises `IncompatibleCheckpointError` when the saved state cannot be restored under `current` metadata (other
  model shapes, another optimizer-state structure); logs every other difference (learning rate, mesh, steps)."""
  saved_model, current_model = saved.get("model_config", {}), current.get("model_config", {})
  changes = {}
  for section in ("model_config", "optimizer_config", "loop_config", "mesh", "data", "eval_set", "stage_settings"):
    before, after = saved.get(section, {}), current.get(section, {})
    for key in sorted(set(before) | set(after)):
      if before.get(key) != after.get(key):
        changes[f"{section}.{key}"] = (before.get(key), after.get(key))
  for key in ("stage", "init_from"):  # compared where the checkpoint recorded them
    if key in saved and saved[key] != current.get(key):
      changes[key] = (saved[key], current.get(key))
  shape_changes = [f"model {k}={saved_model.get(k)!r} in the checkpoint but {current_model.get(k)!r} now"
                   for k in SHAPE_FIELDS if k in saved_model and saved_model.get(k) != current_model.get(k)]
  saved_sig, current_sig = saved.get("state_signature"), current.get("state_signature", {})
  array_changes = []
  if saved_sig is not None:
    for name in sorted(set(saved_sig) | set(current_sig)):
      if saved_sig.get(name) != current_sig.get(name):
        array_changes.append(f"state{name}: {saved_sig.get(name, 'absent')} saved vs {current_sig.get(name, 'absent')}"
                             " now")
  # The saved data position belongs to the saved list of train files, and to the files those names matched with
  # the sizes they had (a new shard under a glob, or an appended file, reshuffles what the position points into).
  saved_files, current_files = (m.get("data", {}).get("train_files") for m in (saved, current))
  data_changes = ([f"data.train_files={saved_files} in the checkpoint but {current_files} now (the saved data "
                   "position belongs to the old files)"] if saved_files is not None and saved_files != current_files
                  else [])
  # Packing changes the pipeline's stages, so the saved position has no counterpart in the other pipeline (the
  # usual cause: an SFT stage, unpacked, pointed at a mid-training workdir).
  saved_packing, current_packing = (m.get("data", {}).get("packing", "absent") for m in (saved, current))
  packs = current.get("stage", "next_token") == "next_token"  # DPO and GRPO read no packed rows
  if packs and "absent" not in (saved_packing, current_packing) and saved_packing != current_packing:
    data_changes.append(f"data.packing={saved_packing!r} in the checkpoint but {current_packing!r} now (the saved "
                        "data position belongs to the other pipeline)")
  # The mixture maps the saved position to a record of each source by the weights: under others every source
  # would resume elsewhere than where it stopped, skipping some records and repeating others.
  saved_weights, current_weights = (_mixture_shares(m.get("data", {})) for m in (saved, current))
  if packs and None not in (saved_weights, current_weights) and saved_weights != current_weights:
    data_changes.append(f"data.weights={saved.get('data', {}).get('weights')} in the checkpoint but "
                        f"{current.get('data', {}).get('weights')} now (the saved data position is a position in "
                        "that mixture; to change the mixture, start a new workdir with train.init_from=<this "
                        "workdir> once this run has finished)")
  # The seed orders the data (the shuffle, GRPO's prompt order), so the saved position is a position in its order.
  saved_seed, current_seed = (m.get("loop_config", {}).get("seed", "absent") for m in (saved, current))
  if "absent" not in (saved_seed, current_seed) and saved_seed != current_seed:
    data_changes.append(f"train.seed={saved_seed} in the checkpoint but {current_seed} now (the saved data position "
                        "is a position in that seed's shuffled order)")
  # The eval history (best loss, steps since) was measured on the saved eval set.
  compares = any(current.get("loop_config", {}).get(k) not in (None, False)
                 for k in ("early_stopping_patience", "keep_best_checkpoint"))
  if compares and "eval_set" in saved and saved["eval_set"] != current.get("eval_set"):
    differ = [f"{k}: {saved['eval_set'].get(k)!r} -> {current.get('eval_set', {}).get(k)!r}"
              for k in sorted(set(saved["eval_set"]) | set(current.get("eval_set", {})))
              if saved["eval_set"].get(k) != current.get("eval_set", {}).get(k)]
    data_changes.append(f"the eval set changed ({'; '.join(differ)}) while early_stopping_patience / "
                        "keep_best_checkpoint compare this run's eval losses, measured on the old set")
  # DPO's and GRPO's frozen reference is loaded again on every start, from where train.init_from points now.
  saved_ref, current_ref = saved.get("reference_digest"), current.get("reference_digest")
  if saved_ref is not None and current_ref is not None and saved_ref != current_ref:
    data_changes.append(f"the frozen reference loaded from train.init_from={current.get('init_from')!r} is not the "
                        "one this run started with (its params changed since; was that run trained on?): point "
                        "train.init_from at the params this run started from")
  saved_sizes, current_sizes = (dict(map(tuple, m.get("data", {}).get("train_file_sizes") or ()))
                                for m in (saved, current))
  if not data_changes and saved_sizes and saved_sizes != current_sizes:
    differ = [f"{path}: {saved_sizes.get(path, 'absent')} -> {current_sizes.get(path, 'absent')} bytes"
              for path in sorted(set(saved_sizes) | set(current_sizes))
              if saved_sizes.get(path) != current_sizes.get(path)]
    data_changes = [f"the files data.train_files names changed since the checkpoint ({'; '.join(differ[:5])}"
                    + (f"; ... {len(differ) - 5} more" if len(differ) > 5 else "") + "), so the saved data position "
                    "no longer points where it did"]
  # The saved arrays' signature is exact; the shape fields name the cause (and decide for checkpoints without a
  # signature). head_dim=None and an explicit head_dim of the same size change no array, so they resume.
  if data_changes or (array_changes if saved_sig is not None else shape_changes):
    # The settings that change the saved state's structure (gradient clipping adds a transform to the optimizer
    # chain, weight decay a mask), named before the arrays they moved.
    structural = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()
                  if k.startswith(("model_config.", "optimizer_config."))]
    causes = ([f"settings changed since: {', '.join(structural)}"]
              if array_changes and structural and not shape_changes else [])
    details = (shape_changes + causes + data_changes + array_changes[:8]
               + ([f"... {len(array_changes) - 8} more arrays"] if len(array_changes) > 8 else []))
    raise IncompatibleCheckpointError(
        f"cannot resume from the checkpoints in {where}: the current config does not fit the saved state: "
        + "; ".join(details) + f". {_way_out(where)}")
  if changes:
    log.warning("resuming with a changed config: %s",
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))


def _way_out(checkpoints: str) -> str:
  """What a refused resume can do instead: train.init_from takes a finished run's params/ only, which a preempted
  or otherwise unfinished run does not have."""
  workdir = os.path.dirname(os.path.normpath(checkpoints))
  if os.path.isdir(os.path.join(workdir, "params")):
    return (f"Restore the original settings, or start a new workdir with train.init_from={workdir} to start from "
            "this run's params/.")
  return ("Restore the original files and settings to resume this run, or start a new workdir from scratch (the run "
          "has not finished: its progress lives in these checkpoints only).")


def _mixture_shares(data: dict) -> Optional[list]:
  """A run's mixture weights as shares of their sum ([1, 1] and None alike: equal), None when there is nothing to
  compare (one train file, or no weights recorded); a None weight (its file's record count) stays None."""
  files, weights = data.get("train_files"), data.get("weights", "absent")
  if not files or len(files) < 2 or weights == "absent":
    return None
  weights = weights or [1.0] * len(files)
  if any(w is None for w in weights):
    return list(weights)
  total = float(sum(weights))
  return [round(w / total, 12) for w in weights]


def _agree_before_step(local, error: Optional[BaseException], sigterm_raised: bool, step: int) -> tuple[bool, bool]:
  """(whether any process's data ran out, whether any saw a SIGTERM); raises on every process when any failed to
  read its batch: its own error where it failed, a RuntimeError naming the step elsewhere. A collective."""
  return any_process_or_raise(error, f"read its training data for step {step + 1}", local is None and error is None,
                              sigterm_raised)


def _make_eval(loss_fn, mesh, microbatches: int = 1):
  """The eval batch's (loss sum, weight), in the train step's microbatches: the batch that needs them to fit in
  training would need them in the forward pass too."""
  def sums(params, batch):
    loss_sum, aux = loss_fn(params, batch, jax.random.key(0))
    return loss_sum, aux["weight"]

  def microbatched(params, batch):
    # Eval batches may have other row counts than the train batch: the most pieces up to `microbatches` they split
    # into evenly.
    rows = jax.tree.leaves(batch)[0].shape[0]
    pieces = most_pieces(rows, microbatches)
    if pieces == 1:
      return sums(params, batch)
    add = lambda carry, mb: (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, sums(params, mb)), None)
    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.scan(add, zeros, split_microbatches(batch, pieces))[0]

  return MeshJit(microbatched, mesh)


def _next_eval_batch(batches, mesh) -> tuple[Optional[dict], Optional[Exception]]:
  """(the next per-process eval batch, checked against the mesh, or None at the end; the error reading or checking
  it, raised by `_agree_on_eval_batch` on every process alike)."""
  try:
    local = next(batches, None)
    if local is not None:
      check_batch(local, mesh, what="eval batch")
    return local, None
  except Exception as e:  # pylint: disable=broad-except  (a bad record, keys of text, rows the mesh cannot split)
    return None, e


def _agree_on_eval_batch(local, error: Optional[Exception]) -> bool:
  """Whether any process has an eval batch left; raises on every process when any failed to read or check its
  batch, so all stop in the same evaluation (and can save the step before they do). A collective."""
  return any_process_or_raise(error, "read or check its eval batch", local is not None)[0]


def _evaluate(eval_fn, params, batches: Iterable[dict], mesh, unit: str = "tokens") -> dict:
  """{"eval_loss": the weighted mean, "eval_<unit>": its weight}, unit being what the stage's weight counts."""
  total, weight = 0.0, 0.0
  batches = iter(batches)
  local, error = _next_eval_batch(batches, mesh)
  # Every process scores the same number of (collective) batches. Shares may be uneven (records split over
  # processes, packing): a process whose share ran out scores all-padding batches, which weigh nothing, until every
  # share is scored, so several processes score what one would. The filler takes the shapes of a first batch.
  template = None
  if jax.process_count() > 1:
    shapes = [s for s in allgather_json(None if local is None else {k: [list(v.shape), str(v.dtype)]
                                                                   for k, v in local.items()}) if s is not None]
    template = shapes[0] if shapes else None
  while _agree_on_eval_batch(local, error):
    if local is None:
      local = {k: np.zeros(shape, dtype) for k, (shape, dtype) in template.items()}
    loss_sum, w = eval_fn(params, global_batch(local, mesh))
    total, weight = total + host_scalar(loss_sum), weight + host_scalar(w)
    local, error = _next_eval_batch(batches, mesh)
  if not weight:
    log.warning("the eval data gave no %s to score (no batches, or no targets in them): eval_loss is NaN", unit)
  return {"eval_loss": total / weight if weight else float("nan"), f"eval_{unit}": weight}
