"""Orbax checkpoints of (train state, data-iterator state, run metadata) with async saves, keep-N (plus steps the
loop pins, e.g. the best evaluation's) and integrity checks.

Orbax writes each step into a temporary directory and renames it only when every host has finished, so a
crash mid-save leaves no directory that `latest_step` would return: only complete checkpoints are restored.
Restoring takes an abstract target with shardings, so a checkpoint saved on one mesh restores onto another.

Integrity: every save carries an `integrity` item written inside the same temporary directory (so it is renamed
into place together with the data, never after it): a 32-bit checksum of every state array and SHA-256 digests of
the data-iterator and metadata JSON, and of the record itself. The array checksum is a sum of
`bits[i]*odd_weight(i)` modulo 2**32, computed on device over the global (sharded) arrays: integer addition is
associative, so the value does not depend on the mesh, and because every weight is odd, any change to a single
element changes it. `restore_latest` tries the newest step first; a step whose restore fails (a truncated file,
tensorstore's own checks) or whose restored values do not match their checksums is reported with its path, moved to
`<directory>/corrupt/`, and the previous step is tried. A restore target with other shapes or dtypes than the saved
arrays, or other array-free nodes (an optax state wrapped differently), compared with the signature in the
integrity record before any array is read, is refused as incompatible, not treated as damage; the record's and the
metadata's digests are checked before that comparison and the run-settings check, so edited JSON is set aside as
damage, not mistaken for another run's settings. An out-of-memory error is passed on as it is, and so is an error of
the machine rather than of the files (too few file descriptors, a permission, a stale NFS handle, no memory: see
`is_environment_error`; EIO counts as damage), with a note that the step was left in place. A step without an
integrity item is restored with a warning, relying on Orbax's validation alone, only when its Orbax metadata lists
none (written before integrity records existed); one whose metadata lists the item that is gone is damaged.

Data-iterator state: each process reads its own shard of the data, so each is at its own position. A
single-process save writes the iterator's state as it is; a save on several processes gathers every process's
state and writes `{"process_count": N, "per_process": [state of process 0, ...]}`, and each process restores
its own entry. A non-empty position cannot be mapped onto another number of processes, so such a checkpoint is
refused as incompatible there; one without a data-iterator state (e.g. data given as a list) restores on any, and
so does a state that says it is the same on every process (`GLOBAL_DATA_STATE`: GRPO's prompt position, which
every process advances alike) when every process saved the same one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from phi_jax.sharding.distributed import allgather_json, any_process, barrier

log = logging.getLogger("phi_jax")

CORRUPT_DIR = "corrupt"  # not a step number, so Orbax never lists it as a checkpoint
_GOLDEN = 0x9E3779B1  # odd, so odd * odd index weights stay odd


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or no checkpoint in a directory that has some could be restored."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint step failed to restore or failed its integrity check; `path` is its directory."""

  def __init__(self, path: str, reason: str):
    self.path, self.reason = path, reason
    super().__init__(f"checkpoint {path} is corrupt: {reason}")


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by a run whose state cannot be restored under the current config."""


def _as_uint32(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None:
    raise TypeError(f"no checksum for dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  bits = _as_uint32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):  # the flat row-major index, built without reshaping a sharded array
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  weight = (index * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(_GOLDEN)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> list:
  return [_leaf_checksum(x) for x in leaves]


def state_checksums(state) -> dict[str, int]:
  """{array path: 32-bit checksum} of a pytree of (possibly sharded, multi-host) arrays; mesh-independent."""
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  values = _checksums([leaf for _, leaf in paths_and_leaves])
  return {jax.tree_util.keystr(path): int(jax.device_get(v.addressable_data(0))) for (path, _), v in
          zip(paths_and_leaves, values)}


def state_signature(state) -> dict[str, list]:
  """{array path: [shape, dtype]} of a pytree of arrays or ShapeDtypeStructs (what a restore target must match)."""
  return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def state_empty_nodes(state) -> dict[str, str]:
  """{path: type name} of the nodes of a state that hold no array (an optax `EmptyState`, a `MaskedState` around
  one, None): Orbax restores only onto the tree that was saved, empty nodes included, and the array signature cannot
  see them."""
  is_empty = lambda node: not jax.tree_util.tree_leaves(node)
  return {jax.tree_util.keystr(path): type(leaf).__name__
          for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_empty)[0] if is_empty(leaf)}


def _check_record_digest(path: str, integrity: Any) -> None:
  """An integrity record must be a dict whose own digest (saves since the digest existed) matches its contents."""
  if not isinstance(integrity, dict):
    raise CorruptCheckpointError(path, f"the integrity record is a {type(integrity).__name__}, not a dict")
  if "record" in integrity and digest({k: v for k, v in integrity.items() if k != "record"}) != integrity["record"]:
    raise CorruptCheckpointError(path, "the integrity record does not match its own digest")


def _differences(saved: dict, wanted: dict) -> list[str]:
  """"name: saved X, asked for Y" for each entry of a signature record that the restore target does not match."""
  return [f"{name}: saved {saved.get(name)}, asked for {wanted.get(name)}"
          for name in sorted(set(saved) | set(wanted)) if saved.get(name) != wanted.get(name)]


def _check_signature(path: str, saved: Optional[dict], wanted: dict) -> None:
  """Raises IncompatibleCheckpointError when the restore target differs from the saved arrays (records without a
  signature, from older saves, are not checked here)."""
  if saved is None or saved == wanted:
    return
  differing = _differences(saved, wanted)
  raise IncompatibleCheckpointError(
      f"checkpoint {path} does not fit the restore target in {len(differing)} array(s) ([shape, dtype]): "
      + "; ".join(differing[:3]) + ". Restore it with the model and optimizer config that wrote it, or start a new "
      "workdir")


def _check_empty_nodes(path: str, saved: Optional[dict], wanted: dict) -> None:
  """Raises IncompatibleCheckpointError when the restore target's array-free nodes differ from the saved ones (an
  optimizer set up differently around the same arrays); records from older saves have none to compare."""
  if saved is None or saved == wanted:
    return
  raise IncompatibleCheckpointError(
      f"checkpoint {path} holds the same arrays as the restore target but other empty nodes (an optimizer set up "
      f"differently): " + "; ".join(_differences(saved, wanted)[:3]) + ". Restore it with the optimizer config "
      "that wrote it, or start a new workdir (train.init_from=<that run's workdir> starts from its params/ once it "
      "has finished)")


# Errors of the machine, not of the files: the step is sound, and a rerun once the cause is gone (more file
# descriptors, permissions fixed, the file system or its network back, memory free) restores it. EIO is not among
# them: a read error of the medium is, as far as a restore can tell, damage to the files.
_ENVIRONMENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM, errno.ESTALE, errno.ENOMEM,
                                 errno.EINTR, errno.EAGAIN, errno.EBUSY,
                                 # a network file system's (NFS, Lustre, a FUSE mount such as gcsfuse) passing faults
                                 errno.ETIMEDOUT, errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED,
                                 errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOLINK})
# Tensorstore reports an OS error inside the text of a ValueError, with its code, e.g. "...: Too many open files
# [os_error_code='24']", and a remote store's faults by their status; Orbax may wrap that in an exception of its
# own, keeping it as the cause.
_ENVIRONMENT_TEXTS = tuple(os.strerror(n) for n in sorted(_ENVIRONMENT_ERRNOS)) + (
    "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def is_environment_error(error: BaseException) -> bool:
  """Whether `error`, or an exception in its chain of causes, is an error of the machine (see
  `_ENVIRONMENT_ERRNOS`) rather than of the files being read."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
      return True
    text = str(error)
    codes = {int(code) for code in _OS_ERROR_CODE.findall(text)}
    if codes & _ENVIRONMENT_ERRNOS or any(marker in text for marker in _ENVIRONMENT_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _lists_integrity_item(path: str) -> bool:
  """Whether the step's Orbax metadata lists an `integrity` item. Every save does, so a step that lists one but lacks
  it lost it; a step written before integrity records existed lists none (nor does one whose metadata is gone or
  unreadable: Orbax's own checks judge that)."""
  try:
    with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
      record = json.load(f)
  except (FileNotFoundError, ValueError):
    return False
  handlers = record.get("item_handlers") if isinstance(record, dict) else None
  return isinstance(handlers, dict) and "integrity" in handlers


def _agree(path: str, error: Optional[BaseException]) -> None:
  """Raises on every process when any process failed; a no-op for one process that found nothing.

  `error` is damage (`CorruptCheckpointError`) or an error outside the files (the machine's, or unexpected), which
  is raised as it is. An error outside the files on any process wins over damage found elsewhere: no process then
  raises `CorruptCheckpointError`, so the step is not set aside.
  """
  damaged = isinstance(error, CorruptCheckpointError)
  found_damage, found_other = any_process(damaged, error is not None and not damaged)
  if found_other:
    if error is not None and not damaged:
      error.add_note(f"checkpoint {path} was left in place: the restore failed for a reason outside its files (too "
                     "few file descriptors, permissions, the file system, memory). Fix that, then rerun the same "
                     "command to resume from it.")
      raise error
    raise CheckpointError(f"another process could not restore checkpoint {path} for a reason outside its files (its "
                          "log names the error); the checkpoint was left in place. Fix that, then rerun the same "
                          "command to resume from it.")
  if found_damage:
    raise error if error is not None else CorruptCheckpointError(path, "damage found by another process")


def digest(obj) -> str:
  """SHA-256 of obj as sorted-key JSON."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# A data-iterator state holding this key set to True is the same on every process and does not depend on how many
# there are (the iterator's position is global, not a shard's), so it restores onto any number of processes.
GLOBAL_DATA_STATE = "same_on_every_process"


def _is_global(data_state) -> bool:
  return isinstance(data_state, dict) and data_state.get(GLOBAL_DATA_STATE) is True


def _gather_data_state(data_state: dict) -> dict:
  """What `save` writes as the data-iterator state: this state on one process; every process's on several (a
  collective)."""
  if jax.process_count() == 1:
    return data_state
  return {"process_count": jax.process_count(), "per_process": allgather_json(data_state)}


def _processes(n: int) -> str:
  return f"{n} process" + ("" if n == 1 else "es")


def _own_data_state(path: str, saved: dict) -> dict:
  """This process's data-iterator state out of what `save` wrote (see the module docstring).

  Raises IncompatibleCheckpointError when the checkpoint holds a non-empty state of another number of processes.
  """
  per_process = isinstance(saved, dict) and set(saved) == {"process_count", "per_process"}
  saved_count, states = (int(saved["process_count"]), saved["per_process"]) if per_process else (1, [saved])
  if saved_count == jax.process_count() and len(states) == saved_count:
    return states[jax.process_index()]
  if not any(states):  # no position to carry over: any number of processes starts its data afresh alike
    return {}
  if all(_is_global(state) and state == states[0] for state in states):
    return states[0]
  if not per_process:
    raise IncompatibleCheckpointError(
        f"checkpoint {path} holds one data-iterator position, written by a one-process run (or by a multi-process "
        f"run of an older phi_jax, which kept process 0's only), but this run has "
        f"{_processes(jax.process_count())}, each reading its own shard of the data: resume it with one process, "
        "or start a new workdir (train.init_from can start from its params).")
  raise IncompatibleCheckpointError(
      f"checkpoint {path} holds the data-iterator position of {_processes(saved_count)}, but this run has "
      f"{_processes(jax.process_count())}. Each process reads its own shard of the data, so the position cannot "
      f"be mapped onto another number of processes: resume with the same number of processes as the run that "
      f"wrote it ({saved_count}), or start a new workdir.")


class _KeptSteps(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the steps in `steps`, a set its owner updates (the best evaluation's step).

  Orbax's own `BestN` ranks checkpoints by metrics saved with them, but a restarted manager does not read those
  back, so on resume it would delete the best step; the loop instead recomputes the best from metrics.jsonl.
  """

  def __init__(self):
    self.steps: set[int] = set()

  def should_preserve(self, checkpoints, *, context):
    return [info.step in self.steps for info in checkpoints]


# How long a failed save's temporary directory must stay gone before its removal counts as done, and the most
# time spent removing it (see `Checkpointer._discard_partial`).
_DISCARD_SETTLE_S = 0.3
_DISCARD_TIMEOUT_S = 30.0


def _require_json(what: str, value) -> None:
  """Orbax saves these as JSON; a value that is not plain JSON failed only inside the async write, as a disk error."""
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be plain JSON (dict, list, str, int, float, bool, None) to be checkpointed: {e}. "
                    "Convert numpy scalars with int()/float() and arrays with .tolist()") from e


class Checkpointer:
  def __init__(self, directory: str, *, save_interval_steps: int = 100, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._kept = _KeptSteps()
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True,
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(n=max_to_keep), self._kept]))
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: Optional[int] = None  # the step of the save that may still be in flight

  def keep(self, steps) -> None:
    """Protects these steps from deletion by the keep-newest-N rule (replacing the previous set)."""
    self._kept.steps = set(int(s) for s in steps)

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, *, data_state: Optional[dict] = None, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether a save started.

    A failed write (disk full, unwritable directory) raises `CheckpointError`, here or, for an async save, from the
    next `save`/`wait`/`close`; the failed step never becomes visible, so the previous checkpoint stays the newest.
    On several processes it is a collective (it gathers every process's `data_state`): all call it at one step.
    """
    if not force and not self.manager.should_save(step):
      return False
    meta = meta or {}
    self._raise_if_failed(self.manager.wait_until_finished)
    _require_json("the data position (train_data.get_state())", data_state or {})
    _require_json("the checkpoint metadata", meta)
    data_state = _gather_data_state(data_state or {})  # the digest below covers what is written
    integrity = {"state": state_checksums(state), "data": digest(data_state), "meta": digest(meta),
                 "signature": state_signature(state), "empty_nodes": state_empty_nodes(state)}
    integrity["record"] = digest(integrity)  # the record's own digest: its signature is trusted before any array
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta), integrity=ocp.args.JsonSave(integrity))
    self._saving = step
    return self._raise_if_failed(lambda: self.manager.save(step, args=args, force=force))

  def _raise_if_failed(self, fn: Callable):
    try:
      result = fn()
    except Exception as e:  # Orbax surfaces an async write's OSError (or tensorstore's) wrapped in various types.
      failed, self._saving = self._saving, None
      self._discard_partial(failed)
      newest = self._newest_on_disk()
      kept = ("no complete checkpoint exists yet" if newest is None else
              f"the newest complete checkpoint, step {newest}, is untouched")
      raise CheckpointError(f"saving checkpoint step {failed} under {self.directory} failed: {type(e).__name__}: "
                            f"{e}. {kept[0].upper() + kept[1:]}; free disk space or make the directory writable "
                            "(or fix the cause above), then rerun the same command to resume.") from e
    return result

  def _newest_on_disk(self) -> Optional[int]:
    steps = [int(d) for d in os.listdir(self.directory) if d.isdigit()] if os.path.isdir(self.directory) else []
    return max(steps, default=None)

  def _discard_partial(self, step: Optional[int]):
    """Removes a failed save's temporary directory (it frees the space it took); never a finalised step.

    The error reaches us as soon as one write fails, while the save's other writes may still be running and can
    recreate files in the directory after a first removal. So the removal repeats until the directory has stayed
    gone for `_DISCARD_SETTLE_S` (or `_DISCARD_TIMEOUT_S` passes, which is logged).
    """
    if step is None or jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    partial = lambda: [os.path.join(self.directory, name) for name in os.listdir(self.directory)
                       if name.startswith(f"{step}.") and "tmp" in name]
    deadline, gone_since = time.monotonic() + _DISCARD_TIMEOUT_S, None
    while time.monotonic() < deadline:
      leftovers = partial()
      for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
      if leftovers:
        gone_since = None
      elif gone_since is None:
        gone_since = time.monotonic()
      elif time.monotonic() - gone_since >= _DISCARD_SETTLE_S:
        return
      time.sleep(0.02)
    log.warning("the failed save of step %d left %s behind after %.0f s of removal attempts", step, partial(),
                _DISCARD_TIMEOUT_S)

  def restore(self, step: int, abstract_state, *, check_meta: Optional[Callable[[dict], None]] = None
              ) -> tuple[Any, dict, dict]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); returns (state, data, meta).

    Raises `CorruptCheckpointError` (naming the step's path) when the files cannot be read or the values do not
    match the checksums written with them; `IncompatibleCheckpointError` when the target asks for other shapes or
    dtypes than were saved, or when `check_meta(meta)` refuses the run metadata (both checked before any array is
    read, and not damage: the step is left where it is), or when the data-iterator state was saved by another
    number of processes (see the module docstring). The returned data state is this process's own.

    On several processes, each reads some files alone (its shards, its copy of the JSON items): after each phase
    the processes agree whether any of them failed, so all raise together and none is left waiting in a
    collective (the checksums) that the others never reach.
    """
    path = self.step_path(step)
    integrity = meta = data = error = None
    try:
      if os.path.isdir(os.path.join(path, "integrity")):
        integrity = self._read_json(step, "integrity", "integrity record")
        _check_record_digest(path, integrity)
      elif _lists_integrity_item(path):
        raise CorruptCheckpointError(path, "its integrity record is missing (the step's _CHECKPOINT_METADATA lists "
                                     "one, as every save does)")
      if check_meta is not None:
        meta = self._read_json(step, "meta", "metadata")
        # Damage first: edited metadata is set aside like any damaged file, not refused as another run's settings.
        if integrity is not None and digest(meta) != integrity.get("meta"):
          raise CorruptCheckpointError(path, "the run metadata does not match its digest")
      # The data state too, before the arrays: whether it fits this number of processes is decided from it.
      data = self._read_json(step, "data", "data-iterator state")
      if integrity is not None and digest(data) != integrity.get("data"):
        raise CorruptCheckpointError(path, "the data-iterator state does not match its digest")
    except Exception as e:  # pylint: disable=broad-except  (damage, or the machine's error: see `_read_json`)
      error = e
    _agree(path, error)
    if check_meta is not None:
      check_meta(meta)
    if integrity is not None:
      _check_signature(path, integrity.get("signature"), state_signature(abstract_state))
      _check_empty_nodes(path, integrity.get("empty_nodes"), state_empty_nodes(abstract_state))
    own_data = _own_data_state(path, data)
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = error = None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore/Orbax/JSON errors of damaged files; the type says little, the text is kept
      if is_environment_error(e):  # before the memory check: tensorstore reports EMFILE as RESOURCE_EXHAUSTED
        error = e
      elif isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        raise  # out of memory on this mesh: nothing wrong with the files
      elif "tree structures do not match" in str(e) and (integrity is None or integrity.get("empty_nodes") is None):
        # A save without a record of its empty nodes (older saves): Orbax's refusal of a target whose tree is not
        # the saved one (same on every process) is taken as another config, not as damage to set aside. With the
        # record, the check above has already compared them, and a mismatch here is damage to Orbax's metadata.
        raise IncompatibleCheckpointError(
            f"checkpoint {path} was written with a state of another tree structure (an optimizer set up "
            f"differently). Restore it with the config that wrote it, or start a new workdir. Orbax: "
            f"{str(e)[:800]}") from e
      else:
        error = CorruptCheckpointError(path, f"restore failed: {type(e).__name__}: {str(e)[:500]}")
        error.__cause__ = e
    _agree(path, error)
    state, meta = restored["state"], restored["meta"]
    if integrity is None:
      log.warning("checkpoint %s has no integrity record (written before they existed); restored unverified", path)
      return state, own_data, meta
    error = None
    try:
      self._verify(path, integrity, state, data, meta)
    except CorruptCheckpointError as e:
      error = e
    _agree(path, error)
    return state, own_data, meta

  def _read_json(self, step: int, item: str, what: str) -> Any:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:  # an unreadable JSON item is damage, like any other unreadable file
      if is_environment_error(e):
        raise  # the machine's error (too few file descriptors, permissions): the file may well be sound
      raise CorruptCheckpointError(self.step_path(step), f"{what} unreadable: {type(e).__name__}: {e}") from e

  @staticmethod
  def _verify(path: str, integrity: dict, state, data: dict, meta: dict):
    # The checksums first: a computation over the global arrays that every process runs, whatever it finds below.
    expected, actual = integrity.get("state", {}), state_checksums(state)
    if digest(data) != integrity.get("data"):
      raise CorruptCheckpointError(path, "the data-iterator state does not match its digest")
    if digest(meta) != integrity.get("meta"):
      raise CorruptCheckpointError(path, "the run metadata does not match its digest")
    bad = [name for name in actual if expected.get(name) != actual[name]]
    if bad or set(expected) != set(actual):
      raise CorruptCheckpointError(path, f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:5])}")

  def restore_meta(self, step: int) -> dict:
    return self._read_json(step, "meta", "metadata")

  def restore_latest(self, abstract_state, *, check_meta: Optional[Callable[[dict], None]] = None
                     ) -> Optional[tuple[int, Any, dict, dict]]:
    """(step, state, data, meta) of the newest checkpoint that restores and verifies; None when there is none.

    Corrupt steps are logged with their path, moved to `<directory>/corrupt/` (so the step can be written again)
    and the previous step is tried. `check_meta(meta)` runs before the arrays are read; it raises (e.g.
    `IncompatibleCheckpointError`) to refuse a checkpoint whose run config does not fit the current one.
    """
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        return (step, *self.restore(step, abstract_state, check_meta=check_meta))
      except CorruptCheckpointError as e:  # raised on every process alike (see `restore`)
        failures.append(str(e))
        moved = self._quarantine(step)
        log.warning("%s; moved it to %s and trying the previous checkpoint", e, moved)
    if failures:
      raise CheckpointError(f"no checkpoint under {self.directory} could be restored ({len(failures)} tried): "
                            + "; ".join(failures) + f". The damaged steps are in {self._corrupt_dir()}; to start "
                            "from scratch instead, use a new workdir.")
    return None

  def _corrupt_dir(self) -> str:
    return os.path.join(self.directory, CORRUPT_DIR)

  def refuse_fresh_start_over_set_aside_steps(self) -> None:
    """Raises CheckpointError when no step is left but damaged ones were set aside: the run's progress is there, and
    starting from scratch in this workdir would write new steps (and metrics) over it without a word."""
    corrupt = self._corrupt_dir()
    entries = sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []
    if entries:
      raise CheckpointError(
          f"{self.directory} has no checkpoint left, but {len(entries)} damaged one(s) were set aside in {corrupt} "
          f"({', '.join(entries[:5])}): this run has progress that did not restore. Move a step back into "
          f"{self.directory} (named by its step number) if it is sound, or delete {corrupt} to start this workdir "
          "from scratch, or use a new workdir")

  def _quarantine(self, step: int) -> str:
    target = os.path.join(self._corrupt_dir(), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir(), exist_ok=True)
      shutil.move(self.step_path(step), target)
    barrier(f"phi_jax_quarantine_{step}")  # no process lists the step again before it has moved
    self.manager.reload()
    return target if jax.process_index() == 0 else self._corrupt_dir()  # process 0 names the move

  def wait(self):
    self._raise_if_failed(self.manager.wait_until_finished)
    self._saving = None

  def close(self):
    try:
      self.wait()
    except CheckpointError:
      try:
        self.manager.close()
      except Exception:  # the same failure again; the CheckpointError above already says what happened
        pass
      raise
    self.manager.close()
