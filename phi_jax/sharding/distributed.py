"""Multi-host start-up: one process per host (or per GPU), all running the same program.

Resolution order:
1. explicit arguments (coordinator address, number of processes, this process's id);
2. PHI_JAX_COORDINATOR_ADDRESS / PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID in the environment;
3. a cluster JAX detects by itself (TPU pod slices, SLURM with several tasks, Open MPI, GKE/K8s) —
   `jax.distributed.initialize()` with no arguments;
4. otherwise a single process (no call at all), so laptops and single GPUs need nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import numpy as np

_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def _multi_task_slurm() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when this is a multi-process run; a no-op for a single process."""
  coordinator_address = coordinator_address or os.environ.get("PHI_JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "PHI_JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["PHI_JAX_NUM_PROCESSES"])
  if process_id is None and "PHI_JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["PHI_JAX_PROCESS_ID"])
  multi = bool(coordinator_address) or _multi_task_slurm() or any(m in os.environ for m in _CLUSTER_MARKERS)
  if multi:
    # Cross-process collectives on CPU need gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id too "
                       "(PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _multi_task_slurm() or any(marker in os.environ for marker in _CLUSTER_MARKERS):
    jax.distributed.initialize()
  else:
    return
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


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; a no-op for a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
