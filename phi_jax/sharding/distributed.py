"""Multi-host start-up: one process per host (per GPU on a GPU cluster), all running the same program.

Resolution order:
1. explicit arguments (coordinator address, number of processes, this process's id);
2. PHI_JAX_COORDINATOR_ADDRESS / PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID in the environment;
3. a cluster JAX detects by itself (TPU pod slices, a Slurm job step of several tasks, Open MPI's mpirun) —
   `jax.distributed.initialize()` fills what 1 and 2 leave unset; in a Slurm job step, a process count or id
   that disagrees with the step's (SLURM_NTASKS / SLURM_PROCID) is refused;
4. otherwise a single process (no call at all), so laptops and single GPUs need nothing.

On a Slurm or Open MPI GPU cluster JAX gives each task one GPU (its local rank), so launch one task per GPU
(`srun --ntasks-per-node=<GPUs per node>`); a step of one task per node is warned about (each would use one GPU).

An explicit single process (num_processes=1) needs none of this and starts nothing. An explicit empty coordinator
address (`coordinator_address=""`) means none, whatever PHI_JAX_COORDINATOR_ADDRESS says.

Outside a cluster JAX detects, several processes (or a process id) without a coordinator address are refused:
each process would otherwise run alone, all of them writing the same workdir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np

# The variables JAX's own cluster detection reads (TPU pod slices, Open MPI's `mpirun`): with them,
# `jax.distributed.initialize()` finds its peers by itself.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri")
# A task of a Slurm job step (`srun`): JAX needs all of these; an `salloc` shell or a notebook kernel inside an
# allocation has the job's variables but no step, and is one process.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_initialized = False


def _multi_task_slurm() -> bool:
  return all(v in os.environ for v in _SLURM_STEP) and int(os.environ["SLURM_NTASKS"]) > 1


def _process_setting(value: Optional[int], argument: str, variable: str) -> tuple[Optional[int], str]:
  """The argument, else the environment variable as an int (None when neither is set), with its name for errors."""
  if value is not None or variable not in os.environ:
    return value, argument
  text = os.environ[variable]
  try:
    return int(text), variable
  except ValueError:
    raise ValueError(f"{variable}={text!r} is not an integer: set it to a whole number or unset it") from None


def _process_settings(num_processes: Optional[int], process_id: Optional[int]) -> tuple[Optional[int], Optional[int]]:
  """num_processes and process_id from the arguments or PHI_JAX_*, checked: at least 1, and 0 <= id < count."""
  num_processes, num_name = _process_setting(num_processes, "num_processes", "PHI_JAX_NUM_PROCESSES")
  process_id, id_name = _process_setting(process_id, "process_id", "PHI_JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"{num_name}={num_processes} is not a process count: it must be at least 1")
  if process_id is not None and process_id < 0:
    raise ValueError(f"{id_name}={process_id} is not a process id: it must be at least 0")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise ValueError(f"{id_name}={process_id} is out of range for {num_name}={num_processes}: "
                     f"process ids run from 0 to {num_processes - 1}")
  return num_processes, process_id


def _check_slurm_step(num_processes: Optional[int], process_id: Optional[int]) -> None:
  """Refuses a process count or id that disagrees with the job step's: JAX would mix them with the step's own."""
  for value, name, slurm_name in ((num_processes, "num_processes", "SLURM_NTASKS"),
                                  (process_id, "process_id", "SLURM_PROCID")):
    if value is not None and value != int(os.environ[slurm_name]):
      raise ValueError(f"{name}={value} (argument or PHI_JAX_{name.upper()}) disagrees with this Slurm job step's "
                       f"{slurm_name}={os.environ[slurm_name]}: unset it, or launch the step with matching tasks")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when this is a multi-process run; a no-op for a single process.

  Raises ValueError when more than one process, or a process id, is asked for without a coordinator address
  (`num_processes=1` with `process_id` 0 or unset needs none), and when a process count below 1, a process id
  outside [0, num_processes) or a PHI_JAX_* value that is not an integer is given. An explicit single process
  (`num_processes=1`, or PHI_JAX_NUM_PROCESSES=1) stays one whatever coordinator address or cluster variables are
  set. A second call does nothing.
  """
  global _initialized
  if _initialized or jax.distributed.is_initialized():  # jax.distributed.initialize() may run once (also by the
    _initialized = True  # program itself, before calling phi_jax), before any other JAX call
    return
  num_processes, process_id = _process_settings(num_processes, process_id)
  if num_processes == 1:  # process_id is 0 or unset here
    _initialized = True
    return  # asked for explicitly: no coordinator, no cluster detection
  if coordinator_address is None:  # an explicit "" means no coordinator, whatever the environment says
    coordinator_address = os.environ.get("PHI_JAX_COORDINATOR_ADDRESS")
  slurm = _multi_task_slurm()
  detected = slurm or any(m in os.environ for m in _CLUSTER_MARKERS)  # JAX finds its peers there
  if slurm:
    _check_slurm_step(num_processes, process_id)
  elif not detected and not coordinator_address:
    if num_processes is None and process_id is None:
      _initialized = True
      return
    raise ValueError(
        f"num_processes={num_processes} and process_id={process_id} (PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID) "
        "need a coordinator address too: set PHI_JAX_COORDINATOR_ADDRESS (host:port of process 0) on every "
        "process. Without one each process would run alone and all would write the same workdir.")
  elif not detected and (num_processes is None or process_id is None):
    missing = " and ".join(n for n, v in (("num_processes", num_processes), ("process_id", process_id)) if v is None)
    raise ValueError(f"a coordinator address needs num_processes and process_id too: {missing} not set: pass "
                     "num_processes= and process_id=, or set PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID on every "
                     "process")
  # Cross-process collectives on CPU need gloo; accelerators ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # In a cluster JAX detects, it fills what is unset (None) from the cluster.
  jax.distributed.initialize(coordinator_address or None, num_processes, process_id)
  _initialized = True
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  gpus = _slurm_gpus_on_node()
  if (slurm and _one_slurm_task_per_node() and jax.default_backend() == "gpu" and jax.local_device_count() == 1
      and (gpus is None or gpus > 1)):
    # JAX gives each Slurm task the one GPU of its SLURM_LOCALID: one task on an 8-GPU node trains on 1 of them.
    logging.warning("this Slurm job step runs one task per node, and JAX gives each task one GPU (its "
                    "SLURM_LOCALID): this process sees 1 GPU of %s. Launch one task per GPU instead (srun "
                    "--ntasks-per-node=<GPUs per node>); the mesh then spans every GPU of every node.",
                    f"the node's {gpus}" if gpus else "its node's (if the node has more, they sit idle)")


def _slurm_gpus_on_node() -> Optional[int]:
  """The GPUs Slurm gave this node's share of the job (SLURM_GPUS_ON_NODE, else SLURM_JOB_GPUS), None if unsaid."""
  count = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
  if count.isdigit():
    return int(count)
  listed = [g for g in os.environ.get("SLURM_JOB_GPUS", "").split(",") if g.strip()]
  return len(listed) or None


def _one_slurm_task_per_node() -> bool:
  """Whether the job step runs one task on each of its nodes (SLURM_STEP_TASKS_PER_NODE like '1(x4)')."""
  spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
  counts = [part.split("(")[0] for part in spec.split(",") if part]
  return bool(counts) and all(count == "1" for count in counts)


def any_process(*flags: bool) -> tuple[bool, ...]:
  """For each flag, whether it is True on any process; the flags as they are in a single-process run.

  A collective: every process must call it at the same point of the program. It goes through the devices, so it
  also waits for the work already queued on them.
  """
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))  # [processes, flags]
  return tuple(bool(f) for f in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0))


def from_process_zero(*values: float) -> tuple[float, ...]:
  """Process 0's values on every process, bit for bit; the values as given in a single-process run. A collective."""
  if jax.process_count() == 1:
    return tuple(float(v) for v in values)
  from jax.experimental import multihost_utils
  words = np.asarray(values, np.float64).view(np.int32)  # int32 words: exact whatever jax_enable_x64 says
  received = np.asarray(multihost_utils.broadcast_one_to_all(words)).astype(np.int32).view(np.float64)
  return tuple(float(v) for v in received)


def allgather_json(obj: Any) -> list:
  """Every process's JSON-serialisable `obj`, in process order, on every process; `[obj]` in a single-process run.

  A collective: every process must call it at the same point. The values come back as `json.loads` reads them
  (tuples as lists, keys as strings). An `obj` that JSON cannot encode raises TypeError on every process, after
  the collective, so no process is left waiting in it.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  try:
    encoded, error = json.dumps(obj).encode("utf-8"), None
  except (TypeError, ValueError) as e:
    encoded, error = b"", e
  # The gather needs one shape on every process: the lengths first (-1 for a failed encoding), then padded bytes.
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([-1 if error else len(encoded)], np.int32)))
  lengths = lengths.reshape(-1)
  if (lengths < 0).any():
    failed = [int(p) for p in np.flatnonzero(lengths < 0)]
    raise TypeError(f"the value to gather is not JSON-serialisable on process(es) {failed}"
                    + (f": {error}" if error else "")) from error
  padded = np.zeros(max(int(lengths.max()), 1), np.uint8)
  padded[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, lengths)]


_ERROR_TEXT_CHARS = 1000  # of each failed process's error, in the others' message
# Set on an error that every process raised at the same point: "exchanged" where `raise_if_any_failed` exchanged
# the errors' texts (every process knows every cause), "peer" on `any_process_or_raise`'s error saying another
# process failed (a cause of none of its own).
_AGREED = "_phi_jax_agreed"


def _agreed(error: BaseException, how: str) -> BaseException:
  try:
    setattr(error, _AGREED, how)
  except AttributeError:  # an exception type that takes no attributes: exchanged again, as before
    pass
  return error


@contextlib.contextmanager
def failing_together(what: str):
  """`raise_if_any_failed` around a block of work one process may fail alone: an exception the block raises is kept
  until every process has finished its block, then raised on every process, as `raise_if_any_failed` says."""
  error = None
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (raised below, on every process)
    error = e
  raise_if_any_failed(error, what)


def raise_if_any_failed(error: Optional[BaseException], what: str) -> None:
  """Raises on every process when `error` is set on any: its own error where it was set, elsewhere a RuntimeError
  naming the failed process(es) and their errors. For work one process may fail alone (reading its data, a reward
  function) before a collective: all stop at the same point, none waits in a collective the failed one never
  reaches. `what` says what failed, e.g. "reading the eval data". A collective; a single-process run raises `error`.

  An error an earlier call raised (on every process at once) is raised again as it is, with no second exchange;
  one `any_process_or_raise` raised is exchanged, its cause named to the others, but its message that another
  process failed is named to none.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  if error is not None and getattr(error, _AGREED, None) == "exchanged":  # every process holds one here
    raise error
  text = None if error is None else f"{type(error).__name__}: {error}"[:_ERROR_TEXT_CHARS]
  try:  # a peer error's text is sent as {"peer": text}: it fails the exchange, but no other process names it
    errors = allgather_json({"peer": text} if getattr(error, _AGREED, None) == "peer" else text)
  except Exception as gather_error:  # e.g. another process sat in another collective: this one's error comes first
    if error is not None:
      raise error from gather_error
    raise
  failed = {process: text for process, text in enumerate(errors) if isinstance(text, str)}
  if error is not None:
    others = {p: text for p, text in failed.items() if p != jax.process_index()}
    if others:
      error.add_note("; ".join(f"process {p}: {text}" for p, text in others.items()))
    raise _agreed(error, "exchanged")
  if any(e is not None for e in errors):
    raise _agreed(RuntimeError(f"{what} failed on process(es) {sorted(failed)} ("
                               + "; ".join(f"process {p}: {text}" for p, text in failed.items())
                               + "): stopping here too, rather than waiting for it in a collective it never "
                               "reaches"), "exchanged")


def any_process_or_raise(error: Optional[BaseException], failed_to: str, *flags: bool) -> tuple[bool, ...]:
  """`any_process(*flags)`, whose same collective raises on every process when `error` is set on any: its own error
  where it was set, elsewhere a RuntimeError saying another process failed to `failed_to`. For a check made at every
  batch, where `raise_if_any_failed`'s exchange of error texts would be a second collective."""
  *found, failed = any_process(*flags, error is not None)
  if failed:
    if error is not None:
      raise error
    raise _agreed(RuntimeError(f"another process failed to {failed_to} (its log names the error); stopping here "
                               "too, rather than waiting for it in a collective it never reaches"), "peer")
  return tuple(found)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; a no-op for a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
