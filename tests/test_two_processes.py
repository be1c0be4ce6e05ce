"""The two-process launcher itself (`two_processes.run`), with plain Python workers: no JAX, so it takes seconds."""

import os
import sys
import time

import pytest

import two_processes

# Process 1 writes far more than a pipe holds, then marks that it is done; process 0 waits for the mark, as a
# process waits in a collective for its peer.
_CHATTY = """
import os, sys, time
done = os.path.join(sys.argv[1], "done")
if os.environ["PHI_JAX_PROCESS_ID"] == "1":
  print("x" * 1_000_000)
  open(done, "w").close()
else:
  while not os.path.exists(done):
    time.sleep(0.05)
print("finished", os.environ["PHI_JAX_PROCESS_ID"])
"""

_ONE_FAILS = """
import os, time
if os.environ["PHI_JAX_PROCESS_ID"] == "1":
  raise SystemExit("process 1 gives up")
time.sleep(600)  # process 0 would wait for it forever
"""


def test_a_process_writing_more_than_a_pipe_holds_does_not_stall_its_peer(tmp_path):
  outputs = two_processes.run([sys.executable, "-c", _CHATTY, str(tmp_path)], dict(os.environ), 60)
  assert [out.splitlines()[-1] for out in outputs] == ["finished 0", "finished 1"]
  assert len(outputs[1]) > 1_000_000


def test_one_failing_process_fails_the_test_with_its_own_output_without_waiting_for_the_timeout(tmp_path):
  start = time.monotonic()
  with pytest.raises(AssertionError, match="process 1 exited with 1:\n.*process 1 gives up"):
    two_processes.run([sys.executable, "-c", _ONE_FAILS], dict(os.environ), 300)
  assert time.monotonic() - start < 60
