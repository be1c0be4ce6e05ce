"""Multi-host start-up: one process per host (or per GPU), all running the same program.

Resolution order:
1. explicit arguments (coordinator address, number of processes, this process's id);
2. PHI_JAX_COORDINATOR_ADDRESS / PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID in the environment;
3. a cluster JAX detects by itself (TPU pod slices, a Slurm job step of several tasks, Open MPI's mpirun) —
   `jax.distributed.initialize()` with no arguments;
4. otherwise a single process (no call at all), so laptops and single GPUs need nothing.

Outside a cluster JAX detects, several processes (or a process id) without a coordinator address are refused:
each process would otherwise run alone, all of them writing the same workdir.
"""

from __future__ import annotations

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


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when this is a multi-process run; a no-op for a single process.

  Raises ValueError when more than one process, or a process id, is asked for without a coordinator address
  (`num_processes=1` with `process_id` 0 or unset needs none). An explicit single process (`num_processes=1`, or
  PHI_JAX_NUM_PROCESSES=1) stays one whatever cluster variables are set. A second call does nothing.
  """
  global _initialized
  if _initialized or jax.distributed.is_initialized():  # jax.distributed.initialize() may run once (also by the
    _initialized = True  # program itself, before calling phi_jax), before any other JAX call
    return
  coordinator_address = coordinator_address or os.environ.get("PHI_JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "PHI_JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["PHI_JAX_NUM_PROCESSES"])
  if process_id is None and "PHI_JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["PHI_JAX_PROCESS_ID"])
  one_process = num_processes in (None, 1) and (process_id is None or (process_id == 0 and num_processes == 1))
  if one_process and num_processes == 1 and not coordinator_address:
    _initialized = True
    return  # asked for explicitly: no cluster detection
  detected = _multi_task_slurm() or any(m in os.environ for m in _CLUSTER_MARKERS)  # JAX finds its peers there
  if not coordinator_address and not one_process and not detected:
    raise ValueError(
        f"num_processes={num_processes} and process_id={process_id} (PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID) "
        "need a coordinator address too: set PHI_JAX_COORDINATOR_ADDRESS (host:port of process 0) on every "
        "process. Without one each process would run alone and all would write the same workdir.")
  multi = bool(coordinator_address) or detected
  if multi:
    # Cross-process collectives on CPU need gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id too "
                       "(PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif detected:
    jax.distributed.initialize()
  else:
    _initialized = True
    return
  _initialized = True
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


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


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; a no-op for a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
