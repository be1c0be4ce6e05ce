"""Runs a worker script as two local jax.distributed processes (gloo collectives on CPU), as a multi-host job."""

import os
import socket
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], env: dict, timeout_s: float, stuck_hint: str = "") -> list[str]:
  """Each process's output; fails the test on a timeout (with both outputs' tails) or a non-zero exit."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(env, PHI_JAX_COORDINATOR_ADDRESS=f"localhost:{port}", PHI_JAX_NUM_PROCESSES="2",
                                     PHI_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = "\n".join(p.communicate()[0][-2000:] for p in procs)
    pytest.fail(f"the processes did not finish in {timeout_s} s{stuck_hint}:\n{tails}")
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs
