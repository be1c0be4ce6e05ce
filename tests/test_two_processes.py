"""The two-process launcher itself (`two_processes.run`), with plain Python workers: no JAX, so it takes seconds.
Then errors that one process alone meets before the first step (the slow tests, two jax.distributed processes):
every process must stop at once, naming the error, none waiting in a collective for the other."""

import json
import os
import shutil
import sys
import time

import pytest
from xla_flags import xla_flags

import two_processes

TRAIN = os.path.join(two_processes.ROOT, "experiments", "train.py")

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


def _jax_env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), PYTHONUNBUFFERED="1")


def _as_process(monkeypatch, index: int, gathered: list) -> list:
  """Makes `distributed` act as process `index` of two whose gathers return `gathered` (this process's own value
  put in its place); returns the values this process sent."""
  from phi_jax.sharding import distributed
  sent = []

  def gather(value):
    sent.append(value)
    return [value if i == index else other for i, other in enumerate(gathered)]

  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: index)
  monkeypatch.setattr(distributed, "allgather_json", gather)
  monkeypatch.setattr(distributed, "any_process", lambda *flags: (True,) * len(flags))
  return sent


def test_an_error_agreed_on_once_is_raised_again_without_a_second_exchange(monkeypatch):
  """A set-up check inside the run's own check: the error it raised on every process is raised again by the outer
  one as it is; exchanged again, the failed process's log ended with a note that process 0 had failed too, and
  every other error was named twice. An error `any_process_or_raise` raised (every process stops at one batch, no
  texts exchanged) is exchanged once, its cause named to the others and the others' "another process failed" to
  none."""
  from phi_jax.sharding import distributed
  empty = "ValueError: pairs.jsonl holds no preference pairs"
  sent = _as_process(monkeypatch, 1, [None, None])
  with pytest.raises(ValueError) as raised:
    distributed.raise_if_any_failed(ValueError("pairs.jsonl holds no preference pairs"), "checking the pair files")
  with pytest.raises(ValueError) as again:
    distributed.raise_if_any_failed(raised.value, "opening the training data")
  assert again.value is raised.value and len(sent) == 1 and not getattr(raised.value, "__notes__", None)
  sent = _as_process(monkeypatch, 0, [None, empty])
  with pytest.raises(RuntimeError, match=r"failed on process\(es\) \[1\]") as raised:
    distributed.raise_if_any_failed(None, "checking the pair files")
  with pytest.raises(RuntimeError) as again:
    distributed.raise_if_any_failed(raised.value, "opening the training data")
  assert again.value is raised.value and len(sent) == 1 and not getattr(raised.value, "__notes__", None)
  # Read batch by batch: process 0 learns the cause from process 1, process 1 nothing from process 0.
  peer = "RuntimeError: another process failed to read its copy"
  sent = _as_process(monkeypatch, 0, [None, "DataError: pairs.jsonl:11: invalid JSON"])
  with pytest.raises(RuntimeError, match="another process failed to read its copy of pairs.jsonl") as raised:
    distributed.any_process_or_raise(None, "read its copy of pairs.jsonl", False)
  with pytest.raises(RuntimeError) as again:
    distributed.raise_if_any_failed(raised.value, "opening the training data")
  assert again.value.__notes__ == ["process 1: DataError: pairs.jsonl:11: invalid JSON"]
  _as_process(monkeypatch, 1, [sent[0], None])
  with pytest.raises(ValueError) as raised:
    distributed.raise_if_any_failed(ValueError("pairs.jsonl:11: invalid JSON"), "opening the training data")
  assert peer in json.dumps(sent[0]) and not getattr(raised.value, "__notes__", None)


@pytest.mark.slow
def test_an_error_on_one_process_before_the_first_step_stops_both_naming_it(tmp_path):
  """Process 1 alone fails: a bad pair record read for DPO's in-step reference pass (was a collective mismatch that
  aborted both), a reward function that raises in GRPO's rollout (was a hang in the rewards' broadcast), a token id
  outside the vocabulary in the first eval batch (was a hang until JAX's timeout). Both raise instead: process 1
  its own error, process 0 an error saying another process failed."""
  worker = os.path.join(two_processes.ROOT, "tests", "multihost_worker.py")
  outputs = two_processes.run([sys.executable, worker, str(tmp_path), "errors"], _jax_env(4), 180,
                              " (one waiting in a collective the other never reached)")
  first, second = (json.loads(out.strip().splitlines()[-1]) for out in outputs)
  assert second["dpo"][0] == "DataError" and "pairs1.jsonl:4: invalid JSON" in second["dpo"][1], second["dpo"]
  assert first["dpo"][0] == "RuntimeError" and "another process failed" in first["dpo"][1], first["dpo"]
  assert second["grpo"] == ["ConnectionError", "reward service unreachable from this host"]
  assert first["grpo"][0] == "RuntimeError" and "process(es) [1]" in first["grpo"][1], first["grpo"]
  assert "ConnectionError: reward service unreachable" in first["grpo"][1]
  assert second["eval"][0] == "ValueError" and "the first eval batch, 'tokens'" in second["eval"][1], second["eval"]
  assert first["eval"][0] == "RuntimeError" and "the first eval batch, 'tokens'" in first["eval"][1], first["eval"]


def _write_lines(path, lines) -> str:
  with open(path, "w") as f:
    f.writelines(line + "\n" for line in lines)
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad_eval_record", "train_file_too_small", "eval_file_missing_on_one_host",
                                  "hf_weights_missing_on_one_host"])
def test_a_data_file_that_fails_at_start_up_on_one_process_stops_both_naming_it(tmp_path, case):
  """experiments/train.py reads its data before any collective of the loop: an invalid eval record (in process 0's
  share), a train file with fewer records than processes (none left for process 1), or an eval file that one host
  lacks (checked with the tokenizer and the starting params' directory, each host reading its own) raised on that
  process alone, and the other waited for it until JAX's timeout. Both stop at once now, each naming the error."""
  with open(os.path.join(two_processes.ROOT, "experiments", "data", "tiny_traces_eval.jsonl")) as f:
    records = [line.rstrip("\n") for line in f][:8]
  launch = [sys.executable, TRAIN]
  if case == "eval_file_missing_on_one_host":  # a relative path: each process reads it from a directory of its own
    for process in (0, 1):
      os.makedirs(tmp_path / f"process{process}")
    _write_lines(tmp_path / "process0" / "eval.jsonl", records)
    launch = [sys.executable, "-c", _FROM_OWN_DIRECTORY, str(tmp_path), TRAIN]
    data = [f"--gin_param=data.train_files=['{os.path.join(two_processes.ROOT, 'experiments', 'data')}/"
            "tiny_traces_train.jsonl']", "--gin_param=data.eval_files=['eval.jsonl']"]
    where, failed = "eval.jsonl: no such file", 1
  elif case == "hf_weights_missing_on_one_host":  # config.json on both hosts, the weights copied to process 0's only
    import jax  # pylint: disable=import-outside-toplevel
    import phi_jax  # pylint: disable=import-outside-toplevel
    config = phi_jax.presets["tiny"]
    phi_jax.save_hf(tmp_path / "process0" / "hf", config, phi_jax.init_params(config, jax.random.key(0)))
    os.makedirs(tmp_path / "process1" / "hf")
    shutil.copy(tmp_path / "process0" / "hf" / "config.json", tmp_path / "process1" / "hf")
    launch = [sys.executable, "-c", _FROM_OWN_DIRECTORY, str(tmp_path), TRAIN]
    data = [f"--gin_param=data.train_files=['{os.path.join(two_processes.ROOT, 'experiments', 'data')}/"
            "tiny_traces_train.jsonl']", "--gin_param=data.eval_files=[]", "--gin_param=train.eval_every=0",
            "--gin_param=model.hf_path='hf'"]
    where, failed = "hf has neither model.safetensors nor model.safetensors.index.json", 1
  elif case == "bad_eval_record":  # the third record is process 0's (records go to processes in turn)
    bad = _write_lines(tmp_path / "eval.jsonl", records[:2] + ["{"] + records[3:])
    data = [f"--gin_param=data.eval_files=['{bad}']"]
    where, failed = "eval.jsonl:3: invalid JSON", 0
  else:
    data = [f"--gin_param=data.train_files=['{_write_lines(tmp_path / 'train.jsonl', records[:1])}']",
            "--gin_param=data.eval_files=[]", "--gin_param=train.eval_every=0"]
    where, failed = "1 records leave none for process 1 of 2", 1
  codes, outputs = two_processes.run_to_exit(
      [*launch, f"--gin_file={os.path.join(two_processes.ROOT, 'experiments', 'configs', 'midtrain_tiny.gin')}",
       f"--workdir={tmp_path / 'run'}", "--gin_param=train.num_steps=2", *data], _jax_env(4), 120,
      " (one waiting for the other's error)")
  assert all(code == 1 for code in codes), (codes, [out[-2000:] for out in outputs])  # raised, not aborted
  assert where in outputs[failed], outputs[failed][-2000:]
  other = outputs[1 - failed]
  assert f"process(es) [{failed}]" in other and where in other, other[-2000:]


# Runs a script (argv[2:]) from a directory of each process's own (argv[1]/process<id>): relative paths there are
# the files each host holds, so one process can lack a file the other has.
_FROM_OWN_DIRECTORY = """
import os, runpy, sys
os.chdir(os.path.join(sys.argv[1], "process" + os.environ["PHI_JAX_PROCESS_ID"]))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _dpo_case(tmp_path, case) -> tuple[list[str], str]:
  """(the DPO bindings, the text of process 1's error) of `case`, its files written in each process's directory."""
  pairs = [json.dumps({"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)})
           for i in range(16)]
  mine = {0: pairs, 1: pairs}
  bindings = ["--gin_param=data.train_files=['pairs.jsonl']"]
  if case == "empty_pair_file":
    mine[1], where = [], "pairs.jsonl holds no preference pairs"
  elif case == "reference_missing":  # a transformers checkpoint on process 0's host only
    import jax
    import phi_jax
    tiny = phi_jax.presets["tiny"]
    phi_jax.save_hf(tmp_path / "process0" / "start", tiny, phi_jax.init_params(tiny, jax.random.key(0)))
    bindings.append("--gin_param=train.init_from='start'")
    where = "train.init_from='start': no such directory"
  else:  # process 1's copy lacks the last 4 pairs: 2 batches of 8 pairs on both, its rows scored from other pairs
    mine[1] = pairs[:12]
    bindings.append("--gin_param=dpo.reference='precompute'")
    where = "data.train_files[0]='pairs.jsonl' holds other pairs on this process than on process 0"
  for process, lines in mine.items():
    os.makedirs(tmp_path / f"process{process}", exist_ok=True)
    _write_lines(tmp_path / f"process{process}" / "pairs.jsonl", lines)
  return bindings, where


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_pair_file", "reference_missing", "shorter_copy_in_precompute"])
def test_dpo_set_up_that_fails_on_one_process_stops_both_naming_it(tmp_path, case):
  """DPO's set-up on one host alone failing: its pair file empty or its reference params (train.init_from) missing
  there, found before the reference params are loaded and summed (collectives). The other process failed after a
  gloo timeout naming no cause, or aborted; both stop at once now, each naming the error. A copy of the pairs that
  differs on one host is refused on both before the precompute pass (one as long in batches was scored from each
  host's own copy, and written against process 0's pairs). The failed process's log names its own error alone: not
  the other's error saying that it failed, as if both had, nor its own error twice."""
  bindings, where = _dpo_case(tmp_path, case)
  codes, outputs = two_processes.run_to_exit(
      [sys.executable, "-c", _FROM_OWN_DIRECTORY, str(tmp_path), TRAIN,
       f"--gin_file={os.path.join(two_processes.ROOT, 'experiments', 'configs', 'dpo_tiny.gin')}",
       f"--workdir={tmp_path / 'run'}", "--gin_param=train.num_steps=2", *bindings], _jax_env(4), 120,
      " (one waiting in a collective the other never reached)")
  assert all(code == 1 for code in codes), (codes, [out[-2000:] for out in outputs])  # raised, not aborted
  assert outputs[1].count(where) == 1 and "process 0: RuntimeError" not in outputs[1], outputs[1][-2000:]
  assert "process(es) [1]" in outputs[0] and outputs[0].count(where) == 1, outputs[0][-2000:]


@pytest.mark.slow
def test_a_precompute_run_resumes_with_each_host_holding_its_own_copy_of_the_start(tmp_path):
  """Hosts with disks of their own hold copies of train.init_from with the same bytes but other mtimes: each judged
  the precomputed reference file by its own copy's, and where one alone saw them changed, it alone loaded the
  reference to compare its digest (collectives the others never ran: a resumed run aborted). Resumed, both agree."""
  import jax
  import phi_jax
  tiny = phi_jax.presets["tiny"]
  pairs = [json.dumps({"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)})
           for i in range(16)]
  for process in (0, 1):
    os.makedirs(tmp_path / f"process{process}")
    _write_lines(tmp_path / f"process{process}" / "pairs.jsonl", pairs)
    start = tmp_path / f"process{process}" / "start"
    phi_jax.save_hf(start, tiny, phi_jax.init_params(tiny, jax.random.key(0)))
    for name in os.listdir(start):  # process 1's copy made a second later
      os.utime(start / name, ns=(10**9 * (1_000_000_000 + process),) * 2)
  for steps in (1, 2):  # the second run resumes from the first one's checkpoint
    codes, outputs = two_processes.run_to_exit(
        [sys.executable, "-c", _FROM_OWN_DIRECTORY, str(tmp_path), TRAIN,
         f"--gin_file={os.path.join(two_processes.ROOT, 'experiments', 'configs', 'dpo_tiny.gin')}",
         f"--workdir={tmp_path / 'run'}", f"--gin_param=train.num_steps={steps}",
         "--gin_param=train.checkpoint_every=1", "--gin_param=data.train_files=['pairs.jsonl']",
         "--gin_param=train.init_from='start'", "--gin_param=dpo.reference='precompute'"], _jax_env(4), 180,
        " (one waiting in a collective the other never reached)")
    assert codes == [0, 0], (steps, codes, [out[-3000:] for out in outputs])
