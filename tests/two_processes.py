"""Runs a worker script as two local jax.distributed processes (gloo collectives on CPU), as a multi-host job."""

import os
import socket
import subprocess
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], env: dict, timeout_s: float, stuck_hint: str = "") -> list[str]:
  """Each process's output; fails the test on a timeout (with both outputs' tails) or a non-zero exit."""
  codes, outputs = run_to_exit(argv, env, timeout_s, stuck_hint)
  failed = [i for i, code in enumerate(codes) if code != 0]
  if failed:
    i = failed[0]
    raise AssertionError(f"process {i} exited with {codes[i]}:\n{outputs[i][-3000:]}")
  return outputs


def run_to_exit(argv: list[str], env: dict, timeout_s: float, stuck_hint: str = "") -> tuple[list[int], list[str]]:
  """(each process's exit code, each process's output), for runs expected to fail; fails the test on a timeout
  (with both outputs' tails), or when one process exits with an error and its peer is still running 10 s later.

  The outputs go to files, not pipes: a process blocked on a full pipe that nobody reads yet (the other one's is
  read first) would stall the collective its peer waits in."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as logs:
    files = [open(os.path.join(logs, f"process{i}.log"), "w+", encoding="utf-8") for i in range(2)]
    procs = [subprocess.Popen(argv, cwd=ROOT, text=True, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(env, PHI_JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       PHI_JAX_NUM_PROCESSES="2", PHI_JAX_PROCESS_ID=str(i)))
             for i, f in enumerate(files)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):  # one failed: its peer may wait for it in a collective
        deadline = min(deadline, time.monotonic() + 10)
      time.sleep(0.1)
    failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]  # on their own, before any kill
    stuck = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    outputs = []
    for f in files:
      f.seek(0)
      outputs.append(f.read())
      f.close()
  if failed and stuck:  # the failed process's own error explains its peer's wait
    i = failed[0]
    raise AssertionError(f"process {i} exited with {procs[i].returncode}:\n{outputs[i][-3000:]}\n--- process "
                         f"{stuck[0]}, still running 10 s later:\n{outputs[stuck[0]][-2000:]}")
  if stuck:
    tails = "\n".join(out[-2000:] for out in outputs)
    pytest.fail(f"the processes did not finish in {timeout_s} s{stuck_hint}:\n{tails}")
  return [p.returncode for p in procs], outputs
