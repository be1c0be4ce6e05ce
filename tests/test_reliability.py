"""Fault injection: crashes at chosen phases, preemption, corrupt checkpoints, incompatible resumes, NaN/Inf and loss
spikes, bad data and bad configs end to end, hostile completions in rewards, a full disk. See RELIABILITY.md.

Subprocess runs use tests/fault_worker.py (a tiny model on 2 CPU devices); the resume tests of experiments/train.py
itself are in test_resume.py.
"""

import errno
import fcntl
import gc
import glob
import json
import re
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phi_jax import sharding
from phi_jax.model import PhiConfig, init_params
from phi_jax.sharding import distributed
from phi_jax.stages import next_token
from phi_jax.train import LoopConfig, OptimizerConfig, checkpoint, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fault_worker.py")
NUM_STEPS = 12

pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  return env


def _cmd(workdir, settings):
  return [sys.executable, WORKER, str(workdir), json.dumps(dict({"num_steps": NUM_STEPS}, **settings))]


def _worker(workdir, check=True, **settings):
  proc = subprocess.run(_cmd(workdir, settings), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f.files}


def _complete_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _assert_identical(workdir, reference):
  ref_losses, ref_params = reference
  assert _losses(workdir) == ref_losses  # every step, bit for bit
  params = _params(workdir)
  assert params.keys() == ref_params.keys()
  for name in params:
    np.testing.assert_array_equal(params[name], ref_params[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _worker(workdir)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  return losses, _params(workdir)


# Kill points across the phases of a step's work; each restart resumes from what the previous kill left.
KILLS = [("step", 3), ("save", 4), ("rename_before", 6), ("rename_after", 6), ("save", 10)]


def test_sigkill_at_every_phase_resumes_from_newest_complete_checkpoint_bit_identically(tmp_path, reference):
  workdir = tmp_path
  for trial, (phase, step) in enumerate(KILLS):
    before = _complete_steps(workdir)
    proc = _worker(workdir, check=False, kill=[phase, step], seed_kill=trial)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    if before:  # the run restored the newest complete checkpoint that existed when it started
      assert f"resumed from {workdir}/checkpoints/{before[-1]} at step {before[-1]}" in proc.stdout
    with open(workdir / "kills.jsonl") as f:
      assert json.loads(f.readlines()[-1])["phase"] == phase  # the kill landed where it was aimed
    if phase == "rename_before":
      assert step not in _complete_steps(workdir)
    if phase == "rename_after":
      assert step in _complete_steps(workdir)
  last = _complete_steps(workdir)[-1]
  proc = _worker(workdir)
  assert f"resumed from {workdir}/checkpoints/{last} at step {last}" in proc.stdout
  assert not os.path.exists(workdir / "checkpoints" / checkpoint.CORRUPT_DIR)  # no kill left a damaged checkpoint
  _assert_identical(workdir, reference)


def _start(workdir, **settings):
  return subprocess.Popen(_cmd(workdir, settings), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      return
    time.sleep(0.02)
  raise AssertionError(f"condition not met (exit {proc.poll()}):\n{proc.stdout.read()[-3000:] if proc.poll() else ''}")


def _logged(workdir):
  return len(_losses(workdir)) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else 0


def _tmp_dirs(workdir):
  return [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]


def test_sigterm_twice_grace_expiry_and_full_disk_lose_nothing(tmp_path, reference):
  workdir = tmp_path
  # 1. SIGTERM after step 3, and again while the (slowed) save is being written: one clean save, exit 143.
  proc = _start(workdir, step_delay_s=0.3, slow_rename_s=1.5, grace_s=60)
  _wait_for(lambda: _logged(workdir) >= 3, proc)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  _wait_for(lambda: any(d.startswith(f"{_logged(workdir)}.") for d in _tmp_dirs(workdir)), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out[-3000:]
  assert time.time() - sent < 60 and "SIGTERM again while saving; ignored" in out
  preempted_at = _complete_steps(workdir)[-1]
  assert preempted_at == max(_losses(workdir)) < NUM_STEPS and not _tmp_dirs(workdir)
  # 2. A save slower than the grace period: the process leaves at the deadline; the newest checkpoint is unchanged.
  proc = _start(workdir, step_delay_s=0.3, slow_rename_s=30, grace_s=1.0, every=100)
  _wait_for(lambda: _logged(workdir) >= preempted_at + 2, proc)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143 and time.time() - sent < 15, out[-3000:]
  assert "not saved within the 1s grace period" in out
  assert _complete_steps(workdir)[-1] == preempted_at
  # 3. The disk fills up (no file may grow past 20 kB) from the save of the step after the next one: a clear error
  # naming the step and the intact previous checkpoint, which the next run resumes from.
  full_at = preempted_at + 2 + preempted_at % 2
  proc = _worker(workdir, check=False, fsize_limit=[full_at, 20_000])
  out = proc.stdout + proc.stderr
  assert proc.returncode not in (0, -signal.SIGKILL), out[-3000:]
  assert f"CheckpointError: saving checkpoint step {full_at} under {workdir}/checkpoints failed" in out, out[-3000:]
  assert f"The newest complete checkpoint, step {full_at - 2}, is untouched" in out
  assert _complete_steps(workdir)[-1] == full_at - 2 and not _tmp_dirs(workdir)
  proc = _worker(workdir)
  assert f"resumed from {workdir}/checkpoints/{full_at - 2} at step {full_at - 2}" in proc.stdout
  _assert_identical(workdir, reference)


def test_a_failed_saves_directory_is_removed_even_while_its_other_writes_finish(tmp_path):
  """A failed async save reports its first write error while its other writes may still be running; files they
  write after a first removal must not leave the temporary directory behind (the full-disk case above, when the
  timing falls that way). A finalised step and other steps' directories are never touched."""
  import threading

  # Only the removal is under test: no Orbax manager, whose own start-up cleanup of temporary directories would
  # hide what this removal leaves.
  ckpt = object.__new__(checkpoint.Checkpointer)
  ckpt.directory = str(tmp_path / "checkpoints")
  partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1"
  (partial / "state").mkdir(parents=True)
  (tmp_path / "checkpoints" / "6").mkdir()
  (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-2").mkdir()

  def late_writes():  # two more writes of the failed save, after the first removal
    for _ in range(2):
      time.sleep(0.1)
      try:
        (partial / "state").mkdir(parents=True, exist_ok=True)
        (partial / "state" / "chunk").write_bytes(b"x" * 100)
      except FileNotFoundError:  # the removal got in between the two (as it can with Orbax's writes)
        pass

  writer = threading.Thread(target=late_writes)
  writer.start()
  ckpt._discard_partial(8)
  writer.join()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "9.orbax-checkpoint-tmp-2"]


# ---- in-process: checkpoint integrity ---------------------------------------------------------------------------

def _saved_steps_1_and_2(path, async_save: bool) -> dict:
  """Saves `_small_state` 1 and 2 as steps 1 and 2 (data position = step) under `path`; returns the states."""
  states = {step: _small_state(step) for step in (1, 2)}
  ckpt = checkpoint.Checkpointer(str(path), save_interval_steps=1, async_save=async_save)
  for step, state in states.items():
    ckpt.save(step, state, data_state={"position": step}, meta={"step": step}, force=True)
  ckpt.close()
  return states


def _small_state(seed):
  mesh = sharding.make_mesh({"fsdp": 8})
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  key = jax.random.key(seed)
  return {"w": jax.device_put(jax.random.normal(key, (64, 16)), spec),
          "h": jax.device_put(jax.random.normal(key, (32,)).astype(jnp.bfloat16), spec),
          "step": jax.device_put(jnp.full((8,), seed, jnp.int32), spec)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _data_files(step_dir):
  return glob.glob(os.path.join(step_dir, "state", "d", "*"))


def test_checksums_catch_any_single_element_change_and_ignore_the_mesh():
  state = _small_state(0)
  sums = checkpoint.state_checksums(state)
  assert sums == checkpoint.state_checksums(jax.device_put(state, jax.devices()[0]))  # another layout, same sums
  for index in [(0, 0), (63, 15), (17, 3)]:
    for bit in (0, 22, 31):
      changed = np.asarray(state["w"]).copy()
      changed.view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert checkpoint.state_checksums(dict(state, w=jnp.asarray(changed)))["['w']"] != sums["['w']"]
  swapped = np.asarray(state["w"])[::-1]  # same values, other places
  assert checkpoint.state_checksums(dict(state, w=jnp.asarray(swapped)))["['w']"] != sums["['w']"]


def ignores_orbax_leftovers_of_damaged_files(test):
  """A restore of damaged files fails inside Orbax's asyncio reads, which leaves coroutines and callbacks behind;
  their errors (the planted damage, an event loop already closed) and the coroutines never awaited surface at
  garbage collection as "Exception ignored" reports and RuntimeWarnings, not as failures of the restore, which the
  tests check themselves. The tests that damage files ignore those reports and collect garbage before they end, so
  the reports arrive while the filters apply, not in whichever test runs next."""
  for rule in ("ignore::pytest.PytestUnraisableExceptionWarning",
               "ignore:coroutine .* was never awaited:RuntimeWarning"):
    test = pytest.mark.filterwarnings(rule)(test)
  return test


@ignores_orbax_leftovers_of_damaged_files
def test_truncated_or_bit_flipped_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
  pristine = tmp_path / "pristine"
  states = _saved_steps_1_and_2(pristine, async_save=True)
  target = _abstract(states[1])

  def restore_after(damage, check_meta=None):
    work = tmp_path / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    damage(work / "2")
    caplog.clear()
    ckpt = checkpoint.Checkpointer(str(work), save_interval_steps=1, async_save=False)
    try:
      step, state, data, _ = ckpt.restore_latest(target, check_meta=check_meta)
    finally:
      ckpt.close()
    return step, state, data, caplog.text

  # Truncation of the array data file: reported with its path, set aside, step 1 restored exactly.
  def truncate(step_dir):
    for path in _data_files(str(step_dir)):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

  step, state, data, text = restore_after(truncate)
  assert (step, data) == (1, {"position": 1}) and _equal(state, states[1])
  assert f"checkpoint {tmp_path}/work/2 is corrupt" in text and os.listdir(tmp_path / "work" / "corrupt")

  # Random single-bit flips anywhere in the newest step: either harmless (exact values) or detected; never wrong.
  files = [f for f in glob.glob(str(pristine / "2" / "**" / "*"), recursive=True) if os.path.isfile(f)]
  rng = random.Random(0)
  outcomes = {"detected": 0, "harmless": 0}
  for trial in range(16):
    relative = os.path.relpath(rng.choice(_data_files(str(pristine / "2")) if trial < 6 else files), pristine / "2")

    def flip(step_dir, relative=relative):
      path = os.path.join(step_dir, relative)
      with open(path, "rb") as f:
        data = bytearray(f.read())
      position = rng.randrange(len(data))
      data[position] ^= 1 << rng.randrange(8)
      with open(path, "wb") as f:
        f.write(bytes(data))

    step, state, data, text = restore_after(flip)
    if step == 2:
      assert _equal(state, states[2]) and data == {"position": 2}, relative  # never silently wrong
      outcomes["harmless"] += 1
    else:
      assert step == 1 and _equal(state, states[1]) and "is corrupt" in text, relative
      outcomes["detected"] += 1
    if trial < 6:  # a flip in the array data itself is always caught
      assert step == 1, relative
  assert outcomes["detected"] >= 6, outcomes

  # Damage no reader can see: valid JSON with another iterator position, or step 1's (valid) arrays in step 2's place.
  # Only the integrity record catches these.
  def rewrite_data_state(step_dir):
    (step_dir / "data" / "metadata").write_text(json.dumps({"position": 3}))

  def swap_arrays(step_dir):
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")

  def rewrite_meta(step_dir):  # metadata that the resume check would refuse as another run's settings
    (step_dir / "meta" / "metadata").write_text(json.dumps({"step": "another run"}))

  def rewrite_signature(step_dir):  # a signature that the shape check would refuse as another model's
    record = json.loads((step_dir / "integrity" / "metadata").read_text())
    record["signature"]["['w']"] = [[128, 8], "float32"]
    (step_dir / "integrity" / "metadata").write_text(json.dumps(record))

  def refuse_other_runs(meta):
    if meta != {"step": 1} and meta != {"step": 2}:
      raise checkpoint.IncompatibleCheckpointError(f"another run: {meta}")

  silent = ((rewrite_data_state, "data-iterator state does not match"), (swap_arrays, "checksum mismatch"),
            (rewrite_meta, "run metadata does not match its digest"),
            (rewrite_signature, "integrity record does not match its own digest"))
  for damage, reason in silent:  # damage is set aside like any other, not mistaken for another run's settings
    step, state, data, text = restore_after(damage, check_meta=refuse_other_runs)
    assert step == 1 and _equal(state, states[1]) and reason in text

  # Every step damaged: an error naming them, never a silent fresh start.
  def damage_both(step_dir):
    truncate(step_dir)
    truncate(os.path.join(os.path.dirname(step_dir), "1"))

  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint under .* could be restored \(2 tried\)"):
    restore_after(damage_both)
  # ... and the same command run again: no step is left, but the run's progress is set aside, so the loop refuses
  # to start from scratch over it (it trained from step 0 in the same workdir, without a word).
  ckpt = checkpoint.Checkpointer(str(tmp_path / "work"), save_interval_steps=1, async_save=False)
  assert ckpt.all_steps() == []
  with pytest.raises(checkpoint.CheckpointError, match=r"has no checkpoint left, but 2 damaged one\(s\) were set "
                     r"aside in .*corrupt \(1-.*, 2-.*\).*delete .*corrupt to start this workdir from scratch"):
    ckpt.refuse_fresh_start_over_set_aside_steps()
  ckpt.close()
  gc.collect()


def _wrapped(text: str) -> Exception:
  """A tensorstore error inside Orbax's, as an array restore reports one: the cause is only in the chain."""
  outer = Exception("Encountered error while reading array index: (slice(0, 2, 1), slice(0, 16, 1))")
  outer.__cause__ = ValueError(text)
  return outer


# (item whose restore fails, the error, whether it is damage): the machine's errors keep the step where it is.
RESTORE_ERRORS = [
    ("state", OSError(errno.EMFILE, "Too many open files"), False),
    ("state", _wrapped('RESOURCE_EXHAUSTED: Error reading "w/0" in OCDBT database at local file "x/state/": Failed '
                       "to open: \"x/state/d/3b05\": Too many open files [os_error_code='24']"), False),
    ("state", _wrapped("PERMISSION_DENIED: Error opening file \"x/state/_METADATA\": Permission denied "
                       "[os_error_code='13']"), False),
    ("integrity", OSError(errno.ESTALE, "Stale file handle"), False),
    ("data", OSError(errno.EINTR, "Interrupted system call"), False),
    # A network file system's passing faults (NFS, Lustre, gcsfuse): the files are there once it is back.
    ("state", OSError(errno.ETIMEDOUT, "Connection timed out"), False),
    ("state", _wrapped("UNAVAILABLE: Error reading \"x/state/d/3b05\": Transport endpoint is not connected "
                       "[os_error_code='107']"), False),
    ("state", _wrapped("DATA_LOSS: Error reading \"x/state/d/3b05\": Input/output error [os_error_code='5']"), True),
    ("integrity", ValueError("Expecting value: line 1 column 1 (char 0)"), True),
]


@ignores_orbax_leftovers_of_damaged_files
def test_a_restore_that_fails_for_a_reason_outside_the_files_keeps_the_checkpoint(tmp_path):
  """Too few file descriptors, a permission, a stale NFS handle: the files are sound, so the restore raises the
  error itself (with a note naming the step) and sets nothing aside, where setting the step aside lost the run's
  progress to a passing fault of the machine. A read error (EIO) or unreadable JSON is damage, set aside as before.
  Last, a real shortage of file descriptors at a few points of the restore."""
  pristine = tmp_path / "pristine"
  states = _saved_steps_1_and_2(pristine, async_save=False)
  work = tmp_path / "work"

  def checkpointer():
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    return checkpoint.Checkpointer(str(work), save_interval_steps=1, async_save=False)

  for item, error, damage in RESTORE_ERRORS:
    ckpt = checkpointer()
    real = ckpt.manager.restore

    def failing(step, args=None, real=real, item=item, error=error):
      if step == 2 and item in args:
        raise error
      return real(step, args=args)

    ckpt.manager.restore = failing
    try:
      if damage:
        assert ckpt.restore_latest(_abstract(states[1]))[0] == 1, error
        assert os.listdir(work / "corrupt"), error
      else:
        with pytest.raises(type(error)) as raised:
          ckpt.restore_latest(_abstract(states[1]))
        assert raised.value is error and f"{work}/2 was left in place" in " ".join(error.__notes__)
        assert ckpt.all_steps() == [1, 2] and not os.path.exists(work / "corrupt")
    finally:
      ckpt.close()

  for spare in (0, 1, 2, 3):
    ckpt = checkpointer()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + spare, hard))
    try:
      restored = ckpt.restore_latest(_abstract(states[1]))
    except Exception as e:  # pylint: disable=broad-except
      restored, chain = None, []
      while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
      assert "Too many open files" in " ".join(chain), (spare, chain)
    finally:
      resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
      ckpt.close()
    assert restored is None or restored[0] == 2, spare
    assert not os.path.exists(work / "corrupt"), spare
  gc.collect()


def test_a_step_that_lost_its_integrity_record_is_set_aside_and_an_older_one_without_is_restored(tmp_path, caplog):
  """Every save writes an integrity item and lists it in the step's Orbax metadata: a step whose metadata lists one
  that is gone is damaged (it was restored unverified, as if written before integrity records existed). A step whose
  metadata lists none is such an older step, restored unverified with a warning."""
  states = _saved_steps_1_and_2(tmp_path, async_save=False)
  pristine = tmp_path / "pristine"
  shutil.copytree(tmp_path / "2", pristine)
  shutil.rmtree(tmp_path / "2" / "integrity")

  def restore():
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False)
    try:
      return ckpt.restore_latest(_abstract(states[1]))[:3]
    finally:
      ckpt.close()

  step, state, data = restore()
  assert (step, data) == (1, {"position": 1}) and _equal(state, states[1])
  assert "its integrity record is missing" in caplog.text and os.listdir(tmp_path / "corrupt")

  shutil.copytree(pristine, tmp_path / "2")  # as a save from before integrity records: no item, none listed
  shutil.rmtree(tmp_path / "2" / "integrity")
  record = json.loads((tmp_path / "2" / "_CHECKPOINT_METADATA").read_text())
  del record["item_handlers"]["integrity"]
  (tmp_path / "2" / "_CHECKPOINT_METADATA").write_text(json.dumps(record))
  caplog.clear()
  step, state, data = restore()
  assert (step, data) == (2, {"position": 2}) and _equal(state, states[2])
  assert "has no integrity record (written before they existed); restored unverified" in caplog.text


# ---- in-process: resume compatibility, numerical faults ---------------------------------------------------------

TINY = PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=64)
OPT = OptimizerConfig(learning_rate=1e-2, decay="constant", max_grad_norm=1.0)


class ScaledData:
  """Synthetic batches with a per-step loss `scale` (NaN, Inf or a spike factor at chosen steps)."""

  def __init__(self, scales=None, vocab=TINY.vocab_size):
    self.index, self.scales, self.vocab = 0, scales or {}, vocab

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng(self.index)
    self.index += 1
    tokens = rng.integers(0, self.vocab, (8, 16), dtype=np.int32)
    return {"tokens": tokens, "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
            "segment_ids": np.ones((8, 16), np.int32), "loss_mask": np.ones((8, 16), np.int32),
            "scale": np.full((8,), self.scales.get(self.index, 1.0), np.float32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


class CountedData(ScaledData):
  """ScaledData with the pipeline's `stats()`: tokens per source of the batches returned so far."""

  def stats(self):
    return {"sources": {"synthetic": {"tokens": 8 * 16 * self.index}}}


def test_tokens_seen_in_each_record_count_the_batches_up_to_that_step(tmp_path):
  loop.run(workdir=str(tmp_path), model_config=TINY, optimizer_config=OPT, loss_fn=scaled_loss(TINY),
           train_data=CountedData(), loop=LoopConfig(num_steps=4, checkpoint_every=2, async_checkpoints=False),
           mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  with open(tmp_path / "metrics.jsonl") as f:
    seen = {r["step"]: r["tokens_seen/synthetic"] for r in map(json.loads, f) if "loss" in r}
  assert seen == {step: 8 * 16 * step for step in range(1, 5)}  # not the next batch's too (steps 1 and 3)


def test_a_data_error_on_one_process_stops_every_process_at_the_same_step(monkeypatch):
  """A batch that fails to read on one process (a bad record, a file changed mid-run) used to raise there alone,
  while the others waited in the next collective until the coordinator's timeout."""
  others_failed = lambda *flags: (flags[0], flags[1], True)  # what any_process returns when another process failed
  monkeypatch.setattr(distributed, "any_process", others_failed)
  with pytest.raises(RuntimeError, match=r"another process failed to read its training data for step 8"):
    loop._agree_before_step({"tokens": 1}, None, False, 7)
  with pytest.raises(ValueError, match="bad record"):  # where it failed: its own error
    loop._agree_before_step(None, ValueError("bad record"), False, 7)
  monkeypatch.setattr(distributed, "any_process", lambda *flags: tuple(flags))
  assert loop._agree_before_step(None, None, True, 7) == (True, True)  # ran out, SIGTERM: as before


def test_data_counts_combine_over_processes(monkeypatch):
  """What sum_over_processes makes of two processes' stats (the two-process run in test_resume.py checks the
  records and data_stats.json it feeds): counts add up, a skip reason only one process met is kept, fractions
  average, names stay process 0's."""
  source = lambda tokens: {"path": "a.jsonl", "tokens": tokens, "weight": 3, "num_epochs": 2, "records": 4}
  per_process = [{"tokens": 10, "padding_fraction": 0.25, "records_skipped": {"too long": 2}, "sources": {
                     "a": source(10)}},
                 {"tokens": 30, "padding_fraction": 0.75, "records_skipped": {"invalid JSON": 1}, "sources": {
                     "a": source(30)}}]
  monkeypatch.setattr(loop, "allgather_json", lambda obj: per_process)
  # A source's weight and epochs are settings, not counts: process 0's (they were doubled); its records add up.
  assert loop.sum_over_processes(per_process[0]) == {
      "tokens": 40, "padding_fraction": 0.5, "records_skipped": {"too long": 2, "invalid JSON": 1},
      "sources": {"a": {"path": "a.jsonl", "tokens": 40, "weight": 3, "num_epochs": 2, "records": 8}}}


def scaled_loss(config):
  base = next_token.make_loss_fn(config, chunk_size=64)

  def loss_fn(params, batch, rng):
    loss_sum, aux = base(params, {k: v for k, v in batch.items() if k != "scale"}, rng)
    return loss_sum * jnp.mean(batch["scale"]), aux

  return loss_fn


def _run(workdir, config=TINY, mesh_shape=None, opt=OPT, scales=None, eval_batches=None, data=None, **loop_kwargs):
  mesh = sharding.make_mesh(mesh_shape or {"data": 1}, devices=None if mesh_shape else jax.devices()[:1])
  loop_config = LoopConfig(**dict(dict(num_steps=4, checkpoint_every=2, async_checkpoints=False), **loop_kwargs))
  return loop.run(workdir=str(workdir), model_config=config, optimizer_config=opt, loss_fn=scaled_loss(config),
                  train_data=data or ScaledData(scales, config.vocab_size), loop=loop_config, mesh=mesh,
                  eval_batches=eval_batches)


def test_data_without_a_saved_position_resumes_past_the_batches_already_trained(tmp_path, caplog):
  """A list of batches (no get_state / set_state) restarted from its first batch on resume: steps 3-4 trained
  batches 0-1 again. Now the trained batches are skipped, so the resumed run equals the uninterrupted one."""
  batches = [next(data) for data in [ScaledData()] for _ in range(4)]
  whole = _run(tmp_path / "whole", data=batches)
  _run(tmp_path / "cut", data=batches, num_steps=2)
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    resumed = _run(tmp_path / "cut", data=batches)
  assert "skipping its first 2 batches to resume at step 2" in caplog.text
  for a, b in zip(jax.tree.leaves(jax.device_get(whole.params)), jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
  assert [r["loss"] for r in _records(tmp_path / "cut").values()] == [
      r["loss"] for r in _records(tmp_path / "whole").values()]


class EvalScales:
  """`eval_batches` for loop.run: one fixed batch whose loss is scaled by scales[k] at the k-th evaluation."""

  def __init__(self, scales, evaluations_done=0):
    self.scales, self.count = scales, evaluations_done

  def __call__(self):
    self.count += 1
    data = ScaledData()
    data.index = 1000
    batch = next(data)
    batch["scale"][:] = self.scales.get(self.count, 1.0)
    return [batch]


def _records(workdir):
  """{step: record} of metrics.jsonl, without the timings; one record per step (a step's evaluation joins it)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in map(json.loads, f)]
  assert len({r["step"] for r in records}) == len(records)
  return {r["step"]: r for r in records}


class FiniteData(ScaledData):
  """ScaledData that ends after `batches` batches."""

  def __init__(self, batches):
    super().__init__()
    self.batches = batches

  def __next__(self):
    if self.index >= self.batches:
      raise StopIteration
    return super().__next__()


def test_evaluation_runs_in_the_train_step_s_microbatches():
  """An eval batch is scored in train.microbatches pieces (a batch that needs them to fit in training needs them in
  the forward pass too), with the same loss sum and weight as in one piece."""
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params = init_params(TINY, jax.random.key(0))
  batch = loop.global_batch(next(ScaledData()), mesh)
  one, pieces = loop._make_eval(scaled_loss(TINY), mesh), loop._make_eval(scaled_loss(TINY), mesh, microbatches=4)
  rows = lambda fn: re.findall(r"tensor<(\d+)x16x", fn.lower(params, batch).as_text())  # [rows, 16] inputs
  assert "2" in rows(pieces) and "2" not in rows(one)  # the 8 rows scored as 4 microbatches of 2
  np.testing.assert_allclose([float(x) for x in pieces(params, batch)], [float(x) for x in one(params, batch)],
                             rtol=1e-6)
  # Eval batches of 6 rows (not a multiple of 4): 3 pieces of 2.
  six = loop.global_batch({k: v[:6] for k, v in next(ScaledData()).items()}, mesh)
  six_rows = re.findall(r"tensor<(\d+)x16x", pieces.lower(params, six).as_text())
  assert "2" in six_rows and np.isclose(float(pieces(params, six)[1]), float(one(params, six)[1]))


def test_eval_data_given_as_a_list_is_evaluated_and_anything_else_not_callable_is_refused_before_training(tmp_path):
  """A list of eval batches crashed at the first evaluation -- by default the last step, before its checkpoint."""
  batch = EvalScales({})()[0]
  _run(tmp_path / "list", eval_batches=[batch], num_steps=2, eval_every=1)
  assert [("eval_loss" in r) for _, r in sorted(_records(tmp_path / "list").items())] == [True, True]
  with pytest.raises(TypeError, match="eval_batches is a dict: give a list of batches or a function"):
    _run(tmp_path / "dict", eval_batches=batch, num_steps=2)
  assert not os.path.exists(tmp_path / "dict" / "metrics.jsonl")


def test_a_url_workdir_is_refused_before_training(tmp_path, monkeypatch):
  """os.path turned gs://bucket/run into a local "gs:" directory; the run failed at its first checkpoint."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="workdir='gs://bucket/run' is a URL; .* mount the bucket"):
    _run("gs://bucket/run", num_steps=2)
  assert os.listdir(tmp_path) == []


def _lock_is_free(workdir):
  fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)  # releases it again


class LockProbe(ScaledData):
  """ScaledData that notes, at its first batch, what the workdir's lock file says and whether the lock is free,
  and sends this process a SIGTERM when its batch `sigterm_at` is read."""

  def __init__(self, workdir, sigterm_at=None, scales=None):
    super().__init__(scales)
    self.workdir, self.sigterm_at, self.seen = workdir, sigterm_at, None

  def __next__(self):
    if self.seen is None:
      self.seen = (open(os.path.join(self.workdir, ".lock")).read(), _lock_is_free(self.workdir))
    if self.index == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_a_workdir_another_run_holds_is_refused_before_writing_and_the_lock_goes_however_a_run_ends(tmp_path):
  """Two trainers on one workdir (a sweep re-run while the first still runs, a second shell) both wrote checkpoints
  and metrics.jsonl, interleaving two runs' records."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT)  # another run's lock: its own open file
  fcntl.flock(holder, fcntl.LOCK_EX)
  os.write(holder, b"pid 4242 on node7\n")
  try:
    with pytest.raises(loop.WorkdirInUseError, match=rf"{workdir} is in use by another training run \(pid 4242 on "
                                                     rf"node7, per {workdir}/.lock\).*Wait for it to end.*another "
                                                     "workdir"):
      _run(workdir, num_steps=2)
  finally:
    os.close(holder)
  assert os.listdir(workdir) == [".lock"]  # nothing written
  probe = LockProbe(workdir)
  _run(workdir, num_steps=2, data=probe)
  assert probe.seen[0].startswith(f"pid {os.getpid()} on ") and not probe.seen[1]  # held while it trained
  assert _lock_is_free(workdir)  # and released when it returned
  with pytest.raises(loop.Preempted):  # SIGTERM at step 3's batch: saved and stopped
    _run(workdir, data=LockProbe(workdir, sigterm_at=2))
  assert _lock_is_free(workdir)
  with pytest.raises(FloatingPointError, match="non-finite loss=nan at step 4"):
    _run(workdir, data=LockProbe(workdir, scales={4: float("nan")}))
  assert _lock_is_free(workdir)
  with loop.workdir_lock(str(workdir)):  # train.py's, held from its first write in the workdir to its last
    _run(workdir, num_steps=5)  # the run inside holds it already
    assert not _lock_is_free(workdir)  # still held for what follows the run (params/, hf/)
  assert _lock_is_free(workdir)


def test_a_second_trainer_on_a_running_workdir_fails_at_once_and_the_first_ends_unmixed(tmp_path, reference):
  first = _start(tmp_path, step_delay_s=1.0)
  _wait_for(lambda: _logged(tmp_path) >= 2, first)
  second = _worker(tmp_path, check=False)
  out = second.stdout + second.stderr
  assert second.returncode not in (0, -signal.SIGKILL), out[-3000:]
  assert f"WorkdirInUseError: {tmp_path} is in use by another training run (pid {first.pid} on " in out, out[-3000:]
  assert first.poll() is None  # refused while the first still trained
  out, _ = first.communicate(timeout=120)
  assert first.returncode == 0, out[-3000:]
  _assert_identical(tmp_path, reference)  # no record or checkpoint of the second run mixed in


class EvalBreaks:
  """`eval_batches` for loop.run: a good batch at every evaluation but the `bad_at`-th, whose batch holds text."""

  def __init__(self, bad_at):
    self.bad_at, self.count = bad_at, 0

  def __call__(self):
    self.count += 1
    batch = EvalScales({})()[0]
    return [dict(batch, text=np.array(["an eval record's text"] * 8)) if self.count == self.bad_at else batch]


def test_an_evaluation_that_fails_mid_run_saves_its_step_first_and_the_run_resumes_from_it(tmp_path, caplog):
  """Only the first eval batch is checked before training; evaluations run before their step's checkpoint, so a
  later eval batch that failed lost every step since the last checkpoint (here two). The resumed run
  evaluates that step first: without it, keep_best chose step 6 where the uninterrupted run chose step 4."""
  settings = dict(num_steps=6, eval_every=2, checkpoint_every=10, keep_best_checkpoint=True)
  whole = _run(tmp_path / "whole", eval_batches=EvalBreaks(None), **settings)
  with caplog.at_level(logging.ERROR, logger="phi_jax"):
    with pytest.raises(TypeError, match=r"eval batch\['text'\] holds"):
      _run(tmp_path / "cut", eval_batches=EvalBreaks(bad_at=2), **settings)  # the evaluation of step 4
  assert _complete_steps(tmp_path / "cut") == [2, 4]  # step 2: the best evaluation so far, kept
  assert f"saved step 4's checkpoint to {tmp_path}/cut/checkpoints/4" in caplog.text
  assert "rerun the same command to resume from it" in caplog.text
  records = _records(tmp_path / "cut")
  assert sorted(records) == [1, 2, 3, 4] and "loss" in records[4] and "eval_loss" not in records[4]
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="phi_jax"):
    resumed = _run(tmp_path / "cut", eval_batches=EvalBreaks(None), **settings)  # the eval data fixed
  assert f"resumed from {tmp_path}/cut/checkpoints/4 at step 4" in caplog.text
  assert "evaluating step 4, whose evaluation failed before the run stopped" in caplog.text
  assert int(whole.step) == int(resumed.step) == 4  # keep_best: the best evaluation's step, in both
  for a, b in zip(jax.tree.leaves(jax.device_get(whole.params)), jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
  assert _records(tmp_path / "cut") == _records(tmp_path / "whole")  # evaluations included


def test_an_eval_batch_that_fails_on_one_process_stops_every_process_in_the_same_evaluation(monkeypatch):
  """A process whose eval batch failed to read or check raised alone while the others waited in the evaluation's
  next collective; now all raise there, so all can save the step before stopping."""
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  batch = EvalScales({})()[0]
  monkeypatch.setattr(distributed, "any_process", lambda more, failed: (more, True))  # another process failed
  with pytest.raises(RuntimeError, match="another process failed to read or check its eval batch"):
    loop._evaluate(None, None, [batch], mesh)
  monkeypatch.setattr(distributed, "any_process", lambda *flags: tuple(flags))
  with pytest.raises(TypeError, match=r"eval batch\['text'\] holds"):  # where it failed: its own error
    loop._evaluate(lambda params, b: (0.0, 1.0), None, [batch, dict(batch, text=np.array(["x"] * 8))], mesh)


def test_a_data_position_that_is_not_plain_json_is_named_at_the_first_save(tmp_path):
  """Orbax failed inside the async write, reported as a disk error with "step None" as the newest checkpoint."""
  class NumpyPosition(ScaledData):
    def get_state(self):
      return {"index": np.int64(self.index)}

  with pytest.raises(TypeError, match=r"data position \(train_data.get_state\(\)\) must be plain JSON .* int64"):
    _run(tmp_path, data=NumpyPosition(), num_steps=2)


def test_ctrl_c_in_the_loop_waits_for_the_save_in_flight():
  """KeyboardInterrupt is no Exception: the interpreter shut down under Orbax's commit thread, losing the step."""
  class Saves:
    waited = 0

    def wait(self):
      self.waited += 1

  saves = Saves()
  with pytest.raises(KeyboardInterrupt):
    with loop._finish_saves_on_error(saves):
      raise KeyboardInterrupt
  assert saves.waited == 1


def test_a_failing_last_evaluation_waits_for_the_save_in_flight(tmp_path, monkeypatch):
  """The data ran out right after an async checkpoint and the run's last evaluation raised: the error left the run
  without waiting for that save, and a process exiting on it lost the step."""
  events = []
  wait = loop.Checkpointer.wait
  monkeypatch.setattr(loop.Checkpointer, "wait", lambda self: (events.append("wait"), wait(self))[1])

  def failing_eval():  # read at the first step (and evaluated at step 3); gone at the last evaluation
    events.append("eval")
    if events.count("eval") > 1:
      raise OSError("eval file gone")
    return [next(ScaledData())]

  batches = [next(data) for data in [ScaledData()] for _ in range(4)]
  with pytest.raises(OSError, match="eval file gone"):
    _run(tmp_path, data=batches, num_steps=6, async_checkpoints=True, eval_every=3, eval_batches=failing_eval)
  assert events.count("eval") == 2 and "wait" in events[len(events) - events[::-1].index("eval"):]


def test_sigterm_handler_set_outside_python_is_put_back_as_the_default():
  """signal.signal returns None for a handler not set from Python; restoring None raised TypeError at the end of
  every run in such a process."""
  previous = signal.getsignal(signal.SIGTERM)
  flag = loop._SigtermFlag()
  try:
    with flag:
      flag._previous = None  # what signal.signal returned: a handler set outside Python
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_run_in_a_thread_other_than_the_main_one_trains_and_says_sigterm_will_not_save(tmp_path, caplog):
  """Python lets only the main thread set a signal handler: a run in a worker thread (Ray Train, a notebook's
  background thread) failed before its first step. It trains now, with a warning that SIGTERM will not save."""
  import threading
  outcome, handler = {}, signal.getsignal(signal.SIGTERM)

  def train():
    try:
      outcome["state"] = _run(tmp_path, num_steps=2)
    except BaseException as e:  # pylint: disable=broad-except  (reported by the assertion below)
      outcome["error"] = e

  worker = threading.Thread(target=train)
  worker.start()
  worker.join()
  assert "error" not in outcome, repr(outcome.get("error"))
  assert int(outcome["state"].step) == 2 and signal.getsignal(signal.SIGTERM) is handler  # the main thread's
  assert "not the main thread" in caplog.text and "SIGTERM will not save a checkpoint" in caplog.text
  # A second trainer of the same workdir in another thread of this process (a notebook cell run again) is refused,
  # as another process is; the thread holding it nests freely.
  from phi_jax.train.loop import workdir_lock  # pylint: disable=import-outside-toplevel
  with workdir_lock(str(tmp_path)):
    with workdir_lock(str(tmp_path)):
      pass
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
  assert isinstance(outcome.get("error"), loop.WorkdirInUseError) and "another thread of this process" in str(
      outcome["error"]), repr(outcome.get("error"))


def test_eval_batches_the_mesh_cannot_split_or_that_lack_a_key_are_refused_before_the_first_step(tmp_path):
  """Found only at the final evaluation, which runs before the last step's checkpoint: the run's last steps were
  lost to an IndivisibleError naming sharding internals (or a bare KeyError), and a rerun trained them again."""
  batch = EvalScales({})()[0]
  six_rows = {k: v[:6] for k, v in batch.items()}
  no_mask = {k: v for k, v in batch.items() if k != "loss_mask"}
  for eval_batch, message in ((six_rows, r"the first eval batch\['\w+'\] has 6 rows, .* data x fsdp = 8"),
                              (no_mask, r"the first eval batch lacks 'loss_mask', a key of the train batches")):
    workdir = tmp_path / str(len(os.listdir(tmp_path)))
    with pytest.raises(ValueError, match=message):
      _run(workdir, mesh_shape={"fsdp": -1}, eval_batches=[eval_batch], num_steps=2)
    assert _complete_steps(workdir) == [] and not os.path.exists(workdir / "metrics.jsonl")
  # One batch returned where an iterable of batches is expected: its keys were taken for batches.
  with pytest.raises(TypeError, match=r"eval_batches\(\) returned one batch \(a dict\).*lambda: \[batch\]"):
    _run(tmp_path / "one", eval_batches=lambda: batch, num_steps=2)


def test_token_ids_outside_the_vocabulary_are_named_before_their_step(tmp_path):
  """They reached the step as NaN hidden states: "non-finite loss=nan ... set on_nonfinite='skip'", advice that
  would drop every such batch."""
  batches = [next(data) for data in [ScaledData()] for _ in range(2)]
  batches[1]["tokens"][3, 5] = 100257  # a Phi-4 tokenizer's id, fed to a model of 128 tokens
  with pytest.raises(ValueError, match=r"train batch of step 2, 'tokens': token id 100257 at \[3, 5\] is outside "
                                       r"the vocabulary \[0, 128\)"):
    _run(tmp_path / "train", data=batches, num_steps=2, checkpoint_every=1)
  assert _complete_steps(tmp_path / "train") == [1]
  with pytest.raises(ValueError, match=r"the first eval batch, 'tokens': token id 100257"):
    _run(tmp_path / "eval", eval_batches=[batches[1]], num_steps=2)
  assert _complete_steps(tmp_path / "eval") == []


def test_a_hand_made_loss_data_or_init_that_breaks_the_contract_is_named(tmp_path, monkeypatch):
  """A scalar loss failed inside JAX ("expected function with aux output to return a two-element tuple ...
  LinearizeTracer"), (loss, {}) with KeyError 'weight', one batch as train_data with "'str' object has no attribute
  'shape'", params as init_params with "'dict' object is not callable"; the Orbax manager of a run whose init
  failed was never closed."""
  base = scaled_loss(TINY)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  batch = next(ScaledData())

  def run(loss_fn=base, data=None, **kwargs):
    return loop.run(workdir=str(tmp_path / str(len(os.listdir(tmp_path)))), model_config=TINY, optimizer_config=OPT,
                    loss_fn=loss_fn, train_data=[batch] if data is None else data, mesh=mesh,
                    loop=LoopConfig(num_steps=1, async_checkpoints=False), **kwargs)

  with pytest.raises(TypeError, match=r"loss_fn must return \(loss_sum, aux\) .* got one array of shape \(\)"):
    run(lambda *args: base(*args)[0])
  with pytest.raises(TypeError, match=r"loss_fn's aux must be a dict with a \"weight\" .* got keys \[\]"):
    run(lambda *args: (base(*args)[0], {}))
  with pytest.raises(TypeError, match=r"train_data is a dict: pass an iterable of batches, e.g. \[batch\]"):
    run(data=batch)
  with pytest.raises(TypeError, match=r"init_params is a dict: give a function returning the starting params"):
    run(init_params=init_params(TINY, jax.random.key(0)))
  closed = []
  close = checkpoint.Checkpointer.close
  monkeypatch.setattr(checkpoint.Checkpointer, "close", lambda self: (closed.append(1), close(self)))

  def fails():
    raise RuntimeError("no such checkpoint")

  with pytest.raises(RuntimeError, match="no such checkpoint"):
    run(init_params=fails)
  assert closed == [1]

@pytest.mark.parametrize("batches", [5, 4])  # the data ends between checkpoints, or right after one
def test_the_last_step_is_logged_when_the_data_ends_between_log_steps(tmp_path, batches):
  """Without eval data, a run whose data ends at a step that is not a log step still writes that step's record:
  metrics.jsonl (and a sweep's summary of it) ends at the run's last step, not at the last multiple of log_every."""
  _run(tmp_path, data=FiniteData(batches), num_steps=10, checkpoint_every=4, log_every=3)
  assert sorted(_records(tmp_path)) == [3, batches]


@pytest.mark.parametrize("log_every", [1, 3])
def test_the_last_step_evaluates_into_its_own_record_when_the_data_ends_after_a_checkpoint(tmp_path, log_every):
  """The data ends right after the step-4 checkpoint: step 4's evaluation joins its training record (written or
  not, as log_every has it), never a second record or one without the loss."""
  _run(tmp_path, data=FiniteData(4), eval_batches=EvalScales({}), num_steps=10, checkpoint_every=4, eval_every=5,
       log_every=log_every)
  records = _records(tmp_path)  # one record per step
  assert sorted(records) == ([1, 2, 3, 4] if log_every == 1 else [3, 4])
  assert all("loss" in r for r in records.values()) and "eval_loss" in records[4]
  # A finished run given eval data afterwards: run again, its last step is evaluated into that step's record.
  _run(tmp_path / "done", num_steps=2, log_every=log_every)
  _run(tmp_path / "done", eval_batches=EvalScales({}), num_steps=2, log_every=log_every)
  records = _records(tmp_path / "done")
  assert sorted(records) == ([1, 2] if log_every == 1 else [2]) and {"loss", "eval_loss"} <= set(records[2])


def test_patience_spent_at_the_last_step_is_not_an_early_stop(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="phi_jax")
  _run(tmp_path, eval_batches=EvalScales({2: 2.0, 3: 2.0}), num_steps=3, eval_every=1, early_stopping_patience=2)
  assert "early stop" not in caplog.text and sorted(_records(tmp_path)) == [1, 2, 3]


@ignores_orbax_leftovers_of_damaged_files
def test_early_stopping_ends_with_the_best_checkpoint_and_resumes_where_it_stopped(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="phi_jax")
  # The eval loss drops to 0.3x at the 2nd evaluation and never beats it again: patience 3 stops after step 5.
  scales = {2: 0.3}
  settings = dict(num_steps=12, eval_every=1, checkpoint_every=100, keep_checkpoints=1, early_stopping_patience=3,
                  keep_best_checkpoint=True)
  state = _run(tmp_path / "a", eval_batches=EvalScales(scales), **settings)
  records = _records(tmp_path / "a")
  assert sorted(records) == [1, 2, 3, 4, 5]
  assert all("loss" in r and "eval_loss" in r for r in records.values())  # at least step and loss, as documented
  assert [records[s]["best_eval_step"] for s in range(1, 6)] == [1, 2, 2, 2, 2]
  assert "early stop at step 5: 3 evaluations without a new best eval_loss" in caplog.text
  # The newest checkpoint (keep_checkpoints=1) and the best; the run ends with the best's state.
  ckpt = checkpoint.Checkpointer(str(tmp_path / "a" / "checkpoints"), save_interval_steps=1)
  assert ckpt.all_steps() == [2, 5]
  best, last = (ckpt.restore(s, _abstract_state_for(TINY))[0] for s in (2, 5))
  ckpt.close()
  assert int(state.step) == 2 and _equal(state.params, best.params) and not _equal(best.params, last.params)

  # Interrupted after step 3 and resumed: the same steps, evaluations, stop and checkpoints.
  _run(tmp_path / "b", eval_batches=EvalScales(scales), **dict(settings, num_steps=3))
  state = _run(tmp_path / "b", eval_batches=EvalScales(scales, evaluations_done=3), **settings)
  assert _records(tmp_path / "b") == records
  assert int(state.step) == 2 and _equal(state.params, best.params)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "b" / "checkpoints"), save_interval_steps=1)
  assert ckpt.all_steps() == [2, 5]
  ckpt.close()
  # Run again, a stopped run trains and evaluates nothing more.
  state = _run(tmp_path / "b", eval_batches=EvalScales(scales, evaluations_done=5), **settings)
  assert _records(tmp_path / "b") == records and int(state.step) == 2
  assert "stopped early at step 5: 3 evaluations without a new best eval_loss" in caplog.text
  # A damaged best checkpoint is reported and the run ends with its newest state instead.
  for path in _data_files(str(tmp_path / "b" / "checkpoints" / "2")):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  state = _run(tmp_path / "b", eval_batches=EvalScales(scales, evaluations_done=5), **settings)
  assert int(state.step) == 5 and _equal(state.params, last.params)
  assert "checkpoints/2 is corrupt" in caplog.text and "the run ends with the state of step 5 instead" in caplog.text
  gc.collect()


def test_early_stopping_settings_are_checked():
  history = loop._EvalHistory(0.1, [{"step": 1, "eval_loss": 2.0}, {"step": 2, "eval_loss": 1.95},
                                    {"step": 3, "eval_loss": 1.5}, {"step": 4, "eval_loss": float("nan")}])
  assert (history.best_step, history.best_loss, history.since_best, history.last_step) == (3, 1.5, 1, 4)
  with pytest.raises(ValueError, match=r"set eval_every > 0"):
    LoopConfig(num_steps=4, early_stopping_patience=2)
  with pytest.raises(ValueError, match=r"early_stopping_patience=0 must be at least 1"):
    LoopConfig(num_steps=4, eval_every=1, early_stopping_patience=0)
  # Spike settings that would switch the detector off or make it fire at every step without saying so.
  with pytest.raises(ValueError, match=r"loss_spike_window=4: a spike is flagged once the window holds 5 losses"):
    LoopConfig(num_steps=4, loss_spike_window=4)
  for factor in (0.5, -1.0):
    with pytest.raises(ValueError, match=rf"loss_spike_factor={factor} must be above 1"):
      LoopConfig(num_steps=4, loss_spike_factor=factor)
  assert LoopConfig(num_steps=4, loss_spike_window=20.0).loss_spike_window == 20
  LoopConfig(num_steps=4, loss_spike_factor=0, loss_spike_window=1)  # off: any window
  with pytest.raises(ValueError, match=r"loss_spike_factor=0 switches the detector off"):
    LoopConfig(num_steps=4, loss_spike_factor=None)
  with pytest.raises(ValueError, match=r"no eval data: set data.eval_files"):
    _run("/nonexistent/never/written", eval_every=1, keep_best_checkpoint=True)
  nan = loop._EvalHistory(0.0, [{"step": 1, "eval_loss": float("nan")}, {"step": 2, "eval_loss": float("nan")}])
  assert nan.describe() == "2 evaluations without a new best eval_loss (no finite eval_loss yet)"  # min_delta 0


def test_early_stopping_refuses_eval_data_with_nothing_to_score(tmp_path, gin_run):
  # An empty eval set used to score 0.0, a best no later evaluation could beat: the run stopped at once.
  with pytest.raises(ValueError, match=r"the eval data gave no tokens to score, so early_stopping_patience"):
    _run(tmp_path / "a", eval_every=1, early_stopping_patience=2, eval_batches=lambda: [])
  with pytest.raises(ValueError, match=r"a GRPO run has no eval loss for train.early_stopping_patience"):
    gin_run("train.num_steps = 2", "train.stage = 'grpo'", "train.eval_every = 1", "train.keep_best_checkpoint = True")


def test_resume_with_incompatible_config_stops_before_any_step_and_compatible_changes_are_logged(tmp_path, caplog):
  _run(tmp_path, num_steps=2)
  before = _losses(tmp_path)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"hidden_size=32 in the checkpoint but 48 now"):
    _run(tmp_path, config=TINY.replace(hidden_size=48))
  with pytest.raises(ValueError, match=r"cannot split evenly|kv_heads"):  # 8-way tensor parallel, 2 kv heads
    _run(tmp_path, mesh_shape={"tensor": 8})
  assert _losses(tmp_path) == before  # no step ran
  # The same check on the saved metadata for the other structural changes (no run needed to see the verdict).
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_interval_steps=1)
  saved = ckpt.restore_meta(2)
  ckpt.close()
  # A checkpoint without an array signature (older saves) is judged by the shape fields of its model config.
  unsigned = {k: v for k, v in saved.items() if k != "state_signature"}
  other_vocab = dict(saved, model_config=dict(saved["model_config"], vocab_size=256))
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"model vocab_size=128 in the checkpoint but 256"):
    loop.check_resume_compatible(unsigned, other_vocab, "W")
  # The saved data position belongs to the saved train files: another list is refused, other data changes logged.
  files = dict(saved, data={"train_files": ["a.jsonl"], "seq_len": 16})
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"data.train_files=\['a.jsonl'\] in the checkpoint"):
    loop.check_resume_compatible(files, dict(files, data={"train_files": ["b.jsonl"], "seq_len": 16}), "W")
  loop.check_resume_compatible(files, dict(files, data={"train_files": ["a.jsonl"], "seq_len": 32}), "W")
  assert "data.seq_len: 16 -> 32" in caplog.text
  # ... and to the mixture that interleaves them (equal weights spelled [1, 1], [2, 2] or left unset are one mixture).
  mixed = dict(saved, data={"train_files": ["a.jsonl", "b.jsonl"], "weights": None})
  for same in ([1.0, 1.0], [2, 2]):
    loop.check_resume_compatible(mixed, dict(mixed, data=dict(mixed["data"], weights=same)), "W")
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"data.weights=None in the checkpoint but \[3.0, "
                     r"1.0\] now \(the saved data position is a position in that mixture.*train.init_from=<this "
                     r"workdir>"):
    loop.check_resume_compatible(mixed, dict(mixed, data=dict(mixed["data"], weights=[3.0, 1.0])), "W")
  # ... and to the seed that shuffled them.
  reseeded = dict(saved, loop_config=dict(saved["loop_config"], seed=saved["loop_config"]["seed"] + 1))
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"train.seed=0 in the checkpoint but 1 now"):
    loop.check_resume_compatible(saved, reseeded, "W")
  # Another eval set is refused only where the run compares eval losses across it.
  evals = dict(saved, eval_set={"eval_files": ["e.jsonl"], "eval_batches": 4})
  other_evals = dict(evals, eval_set={"eval_files": ["hard.jsonl"], "eval_batches": 4})
  loop.check_resume_compatible(evals, other_evals, "W")
  assert "eval_set.eval_files: ['e.jsonl'] -> ['hard.jsonl']" in caplog.text
  for setting in ({"early_stopping_patience": 2}, {"keep_best_checkpoint": True}):
    comparing = dict(other_evals, loop_config=dict(saved["loop_config"], **setting))
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"the eval set changed \(eval_files: \['e.jsonl'\] -> \['hard.jsonl'\]\) while"):
      loop.check_resume_compatible(evals, comparing, "W")
  # ... and to the saved pipeline: packed and unpacked pipelines have different stages (SFT in a mid-training dir).
  packed = dict(saved, data={"train_files": ["a.jsonl"], "packing": "first_fit"})
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"data.packing='first_fit' in the checkpoint but"):
    loop.check_resume_compatible(packed, dict(packed, data={"train_files": ["a.jsonl"], "packing": None}), "W")
  loop.check_resume_compatible(dict(saved, stage_settings={"z_loss": 0.0}),
                               dict(saved, stage_settings={"z_loss": 1e-4}), "W")
  assert "stage_settings.z_loss: 0.0 -> 0.0001" in caplog.text
  # With one, a field change that changes no array resumes: head_dim=None and the same head_dim spelled out.
  assert saved["model_config"]["head_dim"] is None
  explicit = dict(saved, model_config=dict(saved["model_config"], head_dim=TINY.resolved_head_dim))
  loop.check_resume_compatible(saved, explicit, "W")
  # An optimizer state with other paths (here: as if the chain held one transform fewer) is refused...
  no_clipping = dict(saved, state_signature={k.replace("opt_state[1]", "opt_state[0]"): v
                                             for k, v in saved["state_signature"].items()})
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"state.opt_state\[0\]\[0\].count: absent saved vs \[\[\], 'int32'\] now"):
    loop.check_resume_compatible(saved, no_clipping, "W")
  # ... and the setting behind it is named.
  no_clipping["optimizer_config"] = dict(saved["optimizer_config"], max_grad_norm=None)
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"settings changed since: optimizer_config.max_grad_norm: 1.0 -> None; state.opt_state"):
    loop.check_resume_compatible(saved, no_clipping, "W")
  caplog.set_level(logging.INFO, logger="phi_jax")
  _run(tmp_path, opt=OptimizerConfig(learning_rate=3e-3, decay="constant", max_grad_norm=1.0), num_steps=3)
  assert "optimizer_config.learning_rate: 0.01 -> 0.003" in caplog.text
  assert "loop_config.num_steps: 2 -> 3" in caplog.text
  assert sorted(_losses(tmp_path)) == [1, 2, 3]
  # Norms decayed changes no array, only the optax state's empty nodes: refused as another config, naming them,
  # with every checkpoint kept (Orbax refused the tree and the restore took it for damage, setting them all aside).
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"same arrays as the restore target but other "
                     r"empty nodes.*opt_state\[1\]\[1\]: saved MaskedState, asked for EmptyState"):
    _run(tmp_path, opt=OptimizerConfig(learning_rate=3e-3, decay="constant", max_grad_norm=1.0,
                                       decay_norms_and_embeddings=True), num_steps=4)
  assert sorted(_losses(tmp_path)) == [1, 2, 3] and not os.path.exists(tmp_path / "checkpoints" / "corrupt")


def test_nan_stops_with_step_metric_and_intact_checkpoint_inf_skips_and_spikes_are_flagged(tmp_path, caplog):
  with pytest.raises(FloatingPointError, match=r"non-finite loss=nan at step 3; .* last good checkpoint is step 2"):
    _run(tmp_path / "stop", scales={3: float("nan")}, num_steps=6)
  with pytest.raises(FloatingPointError, match=r"at step 1; stopping. No checkpoint was saved yet in .* \(a rerun"):
    _run(tmp_path / "first", scales={1: float("nan")}, num_steps=6)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "stop" / "checkpoints"), save_interval_steps=1)
  assert ckpt.all_steps() == [2]
  step, state, _, _ = ckpt.restore_latest(_abstract_state_for(TINY))
  ckpt.close()
  assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))

  caplog.set_level(logging.INFO, logger="phi_jax")
  # Logged every 4 steps: the skipped update (step 3) and the spike (step 7) still get their own records (they
  # were in the process log only).
  _run(tmp_path / "skip", scales={3: float("inf"), 7: 50.0}, num_steps=8, on_nonfinite="skip", checkpoint_every=1,
       keep_checkpoints=None, log_every=4)
  with open(tmp_path / "skip" / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert sorted(records) == [3, 4, 7, 8]
  assert [s for s, r in records.items() if r["skipped_update"]] == [3]
  assert [s for s, r in records.items() if r["loss_spike"]] == [7]
  assert "non-finite loss=inf at step 3; update skipped" in caplog.text and "loss spike at step 7" in caplog.text
  ckpt = checkpoint.Checkpointer(str(tmp_path / "skip" / "checkpoints"), save_interval_steps=1)
  before, after = (ckpt.restore(s, _abstract_state_for(TINY))[0] for s in (2, 3))
  ckpt.close()
  # The update was dropped: same params and moments; only the schedule's counter moved on with the step.
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  without_schedule = lambda opt_state: jax.tree.map(lambda x: None if is_schedule(x) else x, opt_state,
                                                    is_leaf=is_schedule)
  assert _equal(before.params, after.params) and _equal(*map(without_schedule, (before.opt_state, after.opt_state)))
  counts = [int(x.count) for x in jax.tree.leaves(after.opt_state, is_leaf=is_schedule) if is_schedule(x)]
  assert counts == [3]


class MaskedData(ScaledData):
  """ScaledData whose batches at the steps in `empty` have no target token (every loss_mask 0)."""

  def __init__(self, scales=None, empty=()):
    super().__init__(scales)
    self.empty = set(empty)

  def __next__(self):
    batch = super().__next__()
    if self.index in self.empty:
      batch["loss_mask"][:] = 0
    return batch


def _strict_records(workdir):
  """{step: record} of metrics.jsonl read as strict JSON: NaN and Infinity are not JSON (JSON.parse refuses them,
  jq turns them into other numbers)."""
  def refuse(constant):
    raise ValueError(f"{constant} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in (json.loads(line, parse_constant=refuse) for line in f)}


def test_non_finite_metrics_are_written_as_null_and_a_resume_reads_them_back(tmp_path):
  """A skipped update's Inf loss and NaN grad norm, and an eval set with nothing to score, are null in
  metrics.jsonl; the resumed run reads those records (the kept lines, the eval history) and goes on."""
  settings = dict(scales={2: float("inf")}, on_nonfinite="skip", checkpoint_every=1, eval_batches=lambda: [],
                  eval_every=1)
  _run(tmp_path, num_steps=3, **settings)
  _run(tmp_path, num_steps=4, **settings)
  records = _strict_records(tmp_path)
  assert sorted(records) == [1, 2, 3, 4]
  assert records[2]["skipped_update"] == 1.0 and records[2]["loss"] is None and records[2]["grad_norm"] is None
  assert all(r["eval_loss"] is None for r in records.values()) and records[4]["loss"] > 0


def test_metrics_history_survives_a_write_that_fails_while_it_is_rewritten(tmp_path, monkeypatch):
  """A start that drops the interrupted run's lines, and a merge of an eval record, rewrite metrics.jsonl; a full
  disk (or a kill) part-way through leaves the old file whole, not the first lines of the new one."""
  path = tmp_path / "metrics.jsonl"
  original = "".join(loop._json_line({"step": s, "loss": 1.0 / s}) for s in range(1, 6))
  path.write_text(original)
  real, written = loop._json_line, []

  def fails_at_the_third_line(record):
    written.append(record)
    if len(written) == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(record)

  monkeypatch.setattr(loop, "_json_line", fails_at_the_third_line)
  with pytest.raises(OSError, match="No space left"):
    loop.MetricsWriter(str(path), resume_step=4)  # drops step 5: a rewrite
  assert path.read_text() == original
  monkeypatch.setattr(loop, "_json_line", real)
  writer = loop.MetricsWriter(str(path), resume_step=4)
  assert [r["step"] for r in writer.kept] == [1, 2, 3, 4]
  monkeypatch.setattr(loop, "_json_line", fails_at_the_third_line)
  written.clear()
  with pytest.raises(OSError, match="No space left"):
    writer.merge(2, {"eval_loss": 0.5})
  assert path.read_text() == "".join(map(real, writer.kept))
  monkeypatch.setattr(loop, "_json_line", real)
  writer.merge(2, {"eval_loss": 0.5})
  assert [json.loads(line).get("eval_loss") for line in path.read_text().splitlines()] == [None, 0.5, None, None]
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind


def test_a_step_without_targets_logs_a_null_loss_that_neither_stops_the_run_nor_enters_the_spike_median(tmp_path):
  """Steps 4-6 have no target token: their loss is a mean over nothing (it was 0.0, which pulled the running
  median down to half the real losses, so step 7 at 3x the loss was flagged a spike); under on_nonfinite="stop"
  the run goes on."""
  _run(tmp_path, data=MaskedData({7: 3.0}, empty=[4, 5, 6]), num_steps=7, loss_spike_window=6)
  records = _strict_records(tmp_path)
  assert [s for s, r in records.items() if r["loss"] is None] == [4, 5, 6]
  assert all(records[s]["weight"] == 0 and records[s]["loss_spike"] == 0 for s in (4, 5, 6))
  assert records[7]["loss"] > 2 * records[3]["loss"] and records[7]["loss_spike"] == 0


def test_a_refused_resume_advises_init_from_only_where_the_run_has_params(tmp_path):
  """A run that has not finished has no params/ for train.init_from (which refuses unfinished runs): the advice
  says how to resume it or start over instead."""
  saved = {"data": {"train_files": ["a.jsonl"], "train_file_sizes": [["a.jsonl", 10]]}}
  grown = {"data": {"train_files": ["a.jsonl"], "train_file_sizes": [["a.jsonl", 20]]}}
  where = str(tmp_path / "checkpoints")
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as unfinished:
    loop.check_resume_compatible(saved, grown, where)
  assert "init_from" not in str(unfinished.value)
  assert "Restore the original files and settings to resume this run, or start a new workdir from scratch" in str(
      unfinished.value)
  (tmp_path / "params").mkdir()
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=rf"or start a new workdir with train.init_from="
                     rf"{tmp_path} to start from this run's params/"):
    loop.check_resume_compatible(saved, grown, where)


class CrashesBeforeBatch(ScaledData):
  """ScaledData that raises (a crash) when asked for batch `crash_at`."""

  def __init__(self, scales, crash_at):
    super().__init__(scales)
    self.crash_at = crash_at

  def __next__(self):
    if self.index + 1 == self.crash_at:
      raise RuntimeError(f"crash before step {self.crash_at}")
    return super().__next__()


def test_a_resumed_run_flags_the_same_loss_spikes_as_an_uninterrupted_one(tmp_path, caplog):
  """The spike detector sees every step's loss, metrics.jsonl keeps every 4th: its window travels in the
  checkpoint, so after a crash at step 11 the resumed run still flags the spike at step 12."""
  steps = dict(num_steps=12, log_every=4, checkpoint_every=5)
  _run(tmp_path / "whole", scales={12: 50.0}, **steps)
  with pytest.raises(RuntimeError, match="crash before step 11"):
    _run(tmp_path / "resumed", data=CrashesBeforeBatch({12: 50.0}, crash_at=11), **steps)
  caplog.set_level(logging.WARNING, logger="phi_jax")
  _run(tmp_path / "resumed", scales={12: 50.0}, **steps)
  flags = lambda w: {s: (r["loss"], r["loss_spike"]) for s, r in _records(tmp_path / w).items()}
  assert flags("whole") == flags("resumed") and flags("resumed")[12][1] == 1.0
  assert "loss spike at step 12" in caplog.text


def _abstract_state_for(config):
  from phi_jax.train.optimizer import make_optimizer
  from phi_jax.train.state import abstract_state
  return abstract_state(config, make_optimizer(OPT, 4), sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))


def test_a_warmup_longer_than_the_run_is_logged_once_and_only_for_the_run_it_concerns(tmp_path, caplog):
  warmup = OptimizerConfig(learning_rate=1e-2, warmup_steps=10, decay="constant", max_grad_norm=1.0)
  _run(tmp_path, opt=warmup, num_steps=2)
  assert caplog.text.count("warmup_steps=10 exceeds the run's 2 steps") == 1
  caplog.clear()
  _run(tmp_path, opt=warmup, num_steps=12)  # extended past its warmup: nothing to say
  assert "exceeds the run's" not in caplog.text


def test_given_params_of_another_dtype_take_the_config_s(tmp_path):
  """Starting params in bfloat16 (load_hf(..., dtype="bfloat16")) under a float32 config: the state takes the
  config's dtype, so its checkpoints fit the config (the run used to train in bfloat16 and then refuse its own
  checkpoint on resume)."""
  from phi_jax.train.optimizer import make_optimizer
  from phi_jax.train.state import create_train_state
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(TINY, jax.random.key(0)))
  state = create_train_state(TINY, make_optimizer(OPT, 4), mesh, jax.random.key(0), params=bf16)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(state.params["embed"]["embedding"], bf16["embed"]["embedding"].astype(jnp.float32))


def test_a_restore_target_that_does_not_fit_is_refused_and_the_checkpoint_kept(tmp_path):
  from phi_jax.train.optimizer import make_optimizer
  from phi_jax.train.state import abstract_state, create_train_state
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state = create_train_state(TINY, make_optimizer(OPT, 4), mesh, jax.random.key(0))
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False)
  ckpt.save(1, state, force=True)
  for other in (TINY.replace(param_dtype="bfloat16"), TINY.replace(vocab_size=2 * TINY.vocab_size)):
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"does not fit the restore target"):
      ckpt.restore_latest(_abstract_state_for(other))
  assert ckpt.all_steps() == [1] and not os.path.exists(tmp_path / checkpoint.CORRUPT_DIR)  # nothing moved aside
  # The same arrays under other empty nodes (an optax state wrapped differently: AdamW without a decay mask) is
  # another config too, refused and kept, not set aside as damage.
  import optax
  unmasked = optax.chain(optax.identity(), optax.adamw(optax.constant_schedule(1e-2), mask=None))
  target = abstract_state(TINY, unmasked, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  assert checkpoint.state_signature(target) == checkpoint.state_signature(_abstract_state_for(TINY))
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"same arrays as the restore target but other empty"):
    ckpt.restore_latest(target)
  assert ckpt.all_steps() == [1] and not os.path.exists(tmp_path / checkpoint.CORRUPT_DIR)
  # A save without that record (older ones): Orbax's refusal of the tree is taken as another config as well.
  older = checkpoint.Checkpointer(str(tmp_path / "older"), save_interval_steps=1, async_save=False)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint, "state_empty_nodes", lambda state: None)
    older.save(1, state, force=True)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"written with a state of another tree struct"):
      older.restore_latest(target)
  assert older.all_steps() == [1] and not os.path.exists(tmp_path / "older" / checkpoint.CORRUPT_DIR)
  older.close()
  step, restored, _, _ = ckpt.restore_latest(_abstract_state_for(TINY))
  ckpt.close()
  assert step == 1 and _equal(restored.params, state.params)


# ---- in-process through experiments/common.py: bad data, bad configuration ---------------------------------------

@pytest.fixture
def gin_run(tmp_path):
  import gin
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import common  # pylint: disable=import-outside-toplevel
  import gin_bindings  # pylint: disable=import-outside-toplevel

  def run(*bindings, workdir=tmp_path / "run"):
    gin.clear_config()
    gin_bindings.parse_gin([os.path.join(ROOT, "experiments", "configs", "midtrain_tiny.gin")],
                           ["data.eval_files = []", "train.eval_every = 0", "data.seq_len = 64", *bindings])
    return common.run_training(str(workdir))

  yield run
  gin.clear_config()


BAD_LINES = {
    "invalid JSON": b'{"text": "unterminated',
    "missing field": b'{"prompt": "p"}',
    "mistyped field": b'{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
    "unknown role": b'{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}',
    "empty conversation": b'{"messages": []}',
    "not UTF-8": b'{"text": "caf\xe9"}',
    "too long": json.dumps({"text": " ".join(["word"] * 400)}).encode(),
}


def test_bad_records_raise_with_file_line_reason_or_are_counted_so_read_equals_used_plus_skipped(tmp_path, gin_run,
                                                                                                 caplog):
  path = tmp_path / "mixed.jsonl"
  good = [json.dumps({"text": f"document number {i} about sums"}).encode() for i in range(30)]
  lines = good[:10] + list(BAD_LINES.values()) + good[10:]
  path.write_bytes(b"\n".join(lines) + b"\n")
  files = f"data.train_files = ['{path}']"
  # Records are shuffled, so the first bad one met may be any of lines 11-17; the message names it exactly.
  with pytest.raises(ValueError, match=rf"{path}:1[1-7]: ({'|'.join(BAD_LINES)})"):
    gin_run(files, "train.num_steps = 50", "data.num_epochs = 1")
  gin_run(files, "train.num_steps = 50", "data.num_epochs = 1", "data.on_bad_record = 'skip'",
          "data.too_long = 'drop'", workdir=tmp_path / "skip")
  with open(tmp_path / "skip" / "data_stats.json") as f:
    stats = json.load(f)
  assert stats["records_skipped"] == {reason: 1 for reason in BAD_LINES}
  assert stats["records_read"] == len(lines) == stats["records_used"] + sum(stats["records_skipped"].values())
  assert stats["records_used"] == len(good)
  last = max(_losses(tmp_path / "skip"))
  assert last < 50  # the data ran out first and the run ended cleanly, saying how to fit the schedule to the data
  assert f"ran out after step {last} of num_steps=50" in caplog.text and f"train.num_steps={last}" in caplog.text
  # The same workdir with more epochs: its saved position is at the end of the data, which it says, naming the way on.
  caplog.clear()
  gin_run(files, "train.num_steps = 50", "data.num_epochs = 2", "data.on_bad_record = 'skip'",
          "data.too_long = 'drop'", workdir=tmp_path / "skip")
  assert max(_losses(tmp_path / "skip")) == last
  assert (f"the data position saved at step {last} is at the end of the data" in caplog.text
          and f"train.init_from={tmp_path / 'skip'}" in caplog.text)
  assert "removing" not in caplog.text  # nothing trained: the finished run's params/ were not taken away
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match=rf"{empty}: empty dataset"):
    gin_run(f"data.train_files = ['{empty}']", "train.num_steps = 2")
  latin1 = tmp_path / "latin1.jsonl"
  latin1.write_bytes('{"text": "déjà vu"}\n'.encode("latin-1"))
  with pytest.raises(ValueError, match=rf"{latin1}:1: not UTF-8: byte 0xe9"):
    gin_run(f"data.train_files = ['{latin1}']", "train.num_steps = 2")


@pytest.mark.parametrize("binding,message", [
    ("train.num_stpes = 3", r"num_stpes"),
    ("mesh.shape = {'data': 3}", r"needs 3 devices but 8 are available; make the product of the sizes equal 8"),
    ("data.batch_size = 12", r"data.batch_size=12 .* must be divisible by the data x fsdp mesh size 8"),
    ("data.seq_len = 1024", r"data.seq_len=1024 exceeds the model's max_position_embeddings=512.* lower data.seq_len"),
    ("train.microbatches = 3", r"data.batch_size=8 must be divisible by train.microbatches=3"),
    ("optimizer.max_grad_norm = 0.0", r"max_grad_norm=0.0 must be > 0; use None to turn gradient clipping off"),
    ("data.eval_files = ['no/such_eval.jsonl']", r"no/such_eval.jsonl: no such file"),  # not at the first eval
    ("train.chunk_size = 0", r"train.chunk_size=0: the positions per logits chunk of the loss must be >= 1"),
    ("train.z_loss = -1e-4", r"train.z_loss=-0.0001 must be >= 0"),  # negative: rewards large logits
])
def test_bad_configuration_is_caught_at_startup_saying_what_to_change(gin_run, tmp_path, binding, message):
  with pytest.raises(ValueError, match=message):
    gin_run("train.num_steps = 2", binding)
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # nothing trained


def test_eval_files_are_read_whole_and_checked_before_the_first_step(gin_run, tmp_path, caplog):
  """Several eval files are one pass over all of them (equal weights ended the eval set with its smallest file), and
  a bad eval record stops the run at startup: found at the first evaluation (by default the last step, before its
  checkpoint), it used to cost the whole run."""
  small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
  small.write_text("".join(json.dumps({"text": f"short note {i}"}) + "\n" for i in range(3)))
  big.write_text("".join(json.dumps({"text": f"document number {i} about sums"}) + "\n" for i in range(37)))
  with caplog.at_level("INFO", logger="phi_jax"):
    gin_run(f"data.train_files = ['{big}']", f"data.eval_files = ['{small}', '{big}']", "data.eval_batches = 100",
            "train.num_steps = 1")
  assert "of data.eval_files, the same ones at every evaluation (all of the files)" in caplog.text
  assert "not every record of the others was read" not in caplog.text
  bad = tmp_path / "bad_eval.jsonl"
  bad.write_bytes(b"\n".join([b'{"text": "fine"}', BAD_LINES["unknown role"]]) + b"\n")
  with pytest.raises(ValueError, match=rf"{bad}:2: unknown role"):
    gin_run(f"data.train_files = ['{big}']", f"data.eval_files = ['{bad}']", "train.num_steps = 2",
            workdir=tmp_path / "bad")
  assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")  # nothing trained


def test_dropped_records_are_named_once_and_unscored_eval_records_counted(gin_run, tmp_path, caplog):
  """Records dropped as too long were counted in data_stats.json only: the run said nothing, and the startup line
  said the eval set was read whole while most of it might never be scored."""
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text("".join(json.dumps({"text": f"document number {i} about sums"}) + "\n" for i in range(37))
                   + (BAD_LINES["too long"].decode() + "\n") * 3)
  with caplog.at_level("INFO", logger="phi_jax"):
    gin_run(f"data.train_files = ['{mixed}']", f"data.eval_files = ['{mixed}']", "data.eval_batches = 100",
            "data.too_long = 'drop'", "train.num_steps = 2", "train.eval_every = 1")
  # The training data's first drop, once; the eval pipelines (read at startup and at each evaluation) stay quiet.
  assert len(re.findall(r"mixed.jsonl: a record \(.*mixed.jsonl:(?:38|39|40)\) was longer than seq_len, dropped "
                        r"\(too_long='drop'\)", caplog.text)) == 1  # with its line (38-40)
  assert ("3 of 40 eval record(s) read are not scored (too long: 3): eval_loss measures the other 37. Raise "
          "data.seq_len (now 64)") in caplog.text


def test_a_refused_resume_leaves_the_workdir_as_it_was(gin_run, tmp_path):
  """eval.py and rollouts.py rebuild a run's model from its config.gin, so a refused rerun must not rewrite it."""
  gin_run("train.num_steps = 1")
  config, losses = (tmp_path / "run" / "config.gin").read_text(), _losses(tmp_path / "run")
  # SFT (unpacked) pointed at a mid-training (packed) workdir: the saved data position has no counterpart.
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"data.packing='first_fit' in the checkpoint"):
    gin_run("train.num_steps = 2", "data.packing = None")
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"num_layers=2 in the checkpoint but 3 now"):
    gin_run("train.num_steps = 2", "model.overrides = {'num_layers': 3}")
  assert (tmp_path / "run" / "config.gin").read_text() == config
  assert _losses(tmp_path / "run") == losses


def test_a_rerun_that_trains_nothing_keeps_the_config_its_params_were_trained_with(gin_run, tmp_path):
  """A finished run given other settings again trains nothing; its config.gin took the new ones, which eval.py,
  rollouts.py and export_hf.py then read as the settings of params that never saw them."""
  gin_run("train.num_steps = 1")
  config = (tmp_path / "run" / "config.gin").read_text()
  gin_run("train.num_steps = 1", "data.system_prompt = 'You are a pirate.'")
  assert (tmp_path / "run" / "config.gin").read_text() == config
  gin_run("train.num_steps = 2", "data.system_prompt = 'You are a pirate.'")  # trains on: the config it trains with
  assert "You are a pirate." in (tmp_path / "run" / "config.gin").read_text()


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_trained_again_over_its_params(gin_run, tmp_path):
  """Checkpoints/ deleted to save space, params/ kept: the same command started from step 0 and removed params/."""
  run = tmp_path / "run"
  gin_run("train.num_steps = 1")
  shutil.rmtree(run / "checkpoints")
  before = sorted(os.listdir(run / "params"))
  assert gin_run("train.num_steps = 1") is None  # the same command (a re-run sweep): finished, nothing to do
  with pytest.raises(ValueError, match=r"holds a finished run's params/ \(step 1\) but no checkpoint to resume from "
                     r".*use a new workdir with train.init_from="):
    gin_run("train.num_steps = 2")
  assert sorted(os.listdir(run / "params")) == before


def test_extending_a_finished_run_removes_its_final_params_until_it_finishes_again(gin_run, tmp_path, monkeypatch,
                                                                                   caplog):
  """A finished run given more steps must not look finished while it trains on: an interruption used to leave the
  old params/ for export_hf.py, eval.py and the next stage's train.init_from to read as this run's result."""
  import common  # pylint: disable=import-outside-toplevel  (on sys.path through gin_run)
  import run_files  # pylint: disable=import-outside-toplevel
  run = tmp_path / "run"
  gin_run("train.num_steps = 2", "train.export_hf = True")
  assert (run / "params").is_dir() and (run / "hf").is_dir()
  run_files.check_not_unfinished_run(str(run))
  with pytest.raises(ValueError, match=rf"{run / 'params'} is the params/ of a run: point at the run's workdir, {run}"):
    run_files.check_not_unfinished_run(str(run / "params"))  # e.g. train.init_from=run/params

  def interrupted(workdir, params, model_config=None):
    raise KeyboardInterrupt("after the last step, before the final params")

  monkeypatch.setattr(common, "save_final_params", interrupted)
  with pytest.raises(KeyboardInterrupt):
    gin_run("train.num_steps = 4", "train.export_hf = True")
  assert not (run / "params").exists() and not (run / "hf").exists()
  with pytest.raises(ValueError, match="is a run that has not finished"):
    run_files.check_not_unfinished_run(str(run))
  assert "num_steps changed from 2 to 4: the learning-rate schedule spans num_steps" in caplog.text
  monkeypatch.undo()
  caplog.clear()
  caplog.set_level(logging.INFO, logger="phi_jax")
  state = gin_run("train.num_steps = 4", "train.export_hf = True")  # nothing left to train: writes them again
  assert "already complete" in caplog.text and (run / "params").is_dir() and (run / "hf").is_dir()
  assert int(state.step) == 4
  # An export the run will not write again (train.export_hf off, e.g. made by export_hf.py) is kept, with a warning;
  # a rerun that trains nothing removes nothing.
  (run / "hf" / "marker").write_text("exported separately")
  caplog.clear()
  gin_run("train.num_steps = 6")
  assert (run / "hf" / "marker").exists() and "is not written again" in caplog.text
  caplog.clear()
  gin_run("train.num_steps = 6")
  assert "already complete" in caplog.text and "removing" not in caplog.text and (run / "hf" / "marker").exists()


def test_a_num_steps_change_warns_of_the_next_steps_learning_rate_under_both_schedules(gin_run, tmp_path, caplog):
  """After 3 of 3 steps (cosine, peak 3e-3, no warmup at this length) the rerun with num_steps=5 trains step 4 at
  the 5-step schedule's value there, 0.00104, where the 3-step schedule reached 0: the warning named step 3, which
  had trained at 0.00075."""
  gin_run("train.num_steps = 3")
  caplog.clear()
  gin_run("train.num_steps = 5")
  assert ("num_steps changed from 3 to 5: the learning-rate schedule spans num_steps, so the next step, step 4, "
          "trains at a learning rate of 0.00104 where the schedule of num_steps=3 gives it 0") in caplog.text
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rates = {r["step"]: r["learning_rate"] for r in map(json.loads, f) if "learning_rate" in r}
  assert f"{rates[3]:.3g} {rates[4]:.3g}" == "0.00075 0.00104"


# ---- hostile completions in the GRPO reward, through the loop ---------------------------------------------------

HOSTILE = [
    "\\boxed{__import__('os').system('touch PWNED')}",  # code injection
    "\\boxed{9^{9^{9^{9^{9}}}}}",  # a power tower sympy would never finish
    "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",  # deep nesting
    "x" * 2_000_000 + "\\boxed{5}",  # huge output
    "\udcff\ud800 \\boxed{\udcff}",  # invalid UTF-8 (lone surrogates)
    "\\boxed{\\int_0^\\infty e^{-x^{99999}} dx}",
    "\\boxed{eval('2+2')}",
    "\\boxed{99999999999!}",
]


def test_hostile_completions_score_incorrect_in_bounded_time_and_a_dead_worker_is_replaced(tmp_path, monkeypatch):
  from phi_jax.hf.tokenizer import build_tiny_tokenizer
  from phi_jax.rewards.verifier import VerifierConfig, VerifierPool
  from phi_jax.stages import grpo

  monkeypatch.chdir(tmp_path)
  tokenizer = build_tiny_tokenizer(tmp_path / "tok", chat_format="phi-4")
  config = PhiConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=64)
  cfg = grpo.GRPOConfig(prompts_per_step=1, group_size=len(HOSTILE), max_prompt_tokens=32, max_new_tokens=4)
  pool = VerifierPool(VerifierConfig(num_workers=2, timeout_s=2.0))
  seen = []

  def hostile_rewards(completions, golds, lengths, finished):
    del completions  # the policy's own samples are replaced by hostile ones
    if seen:  # from the second batch on, a worker has died between batches
      os.kill(pool.worker_pids()[0], signal.SIGKILL)
    start = time.perf_counter()
    correct = np.asarray(pool.verify_batch(HOSTILE[:len(golds)], list(golds)), bool)
    seen.append((time.perf_counter() - start, correct))
    return correct.astype(np.float32), correct

  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  prompts = [{"problem": "What is 2+2?", "answer": "4"}] * 2
  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=hostile_rewards, num_steps=2, mesh=mesh)
  pids = pool.worker_pids()
  try:
    loop.run(workdir=str(tmp_path / "run"), model_config=config, optimizer_config=OPT,
             loss_fn=grpo.make_loss_fn(config, cfg), train_data=source,
             loop=LoopConfig(num_steps=2, checkpoint_every=100, async_checkpoints=False), mesh=mesh)
    assert len(pool.worker_pids()) == 2 and pool.worker_pids()[0] != pids[0]  # the killed worker was replaced
  finally:
    pool.shutdown()
  assert len(seen) == 2 and sorted(_losses(tmp_path / "run")) == [1, 2]  # the trainer kept going
  for seconds, correct in seen:
    assert not correct.any()  # every hostile completion scores incorrect
    assert seconds < 3 * 2.0 + 5  # bounded: at most a few timeouts' worth for the whole batch
  assert not os.path.exists(tmp_path / "PWNED")  # no model output was ever run


_ORPHANING_PARENT = """
import os, signal, subprocess, sys
from phi_jax.rewards.verifier import VerifierConfig, VerifierPool
pool = VerifierPool(VerifierConfig(num_workers=1, timeout_s=5.0, soft_timeout_ratio=0.0))
assert pool.verify_answers([("4", "\\\\frac{8}{2}")]) == [True]  # the worker is up and has answered
worker = pool._workers[0].proc
# Another process holding the worker's input open keeps the end of input from reaching it, as an answer being
# worked on with no soft limit would: only the parent's death can tell the worker to stop.
holder = subprocess.Popen(["sleep", "60"], pass_fds=(worker.stdin.fileno(),), stdout=subprocess.DEVNULL)
print(worker.pid, holder.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _has_exited(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # a zombie no one reaps has exited too
  except FileNotFoundError:
    return True


def test_verification_workers_end_when_their_parent_is_killed(tmp_path):
  # Its stderr goes to a file: the worker and the holder inherit it, and a pipe would stay open as long as they live.
  with open(tmp_path / "stderr", "w") as stderr:
    proc = subprocess.Popen([sys.executable, "-c", _ORPHANING_PARENT], stdout=subprocess.PIPE, stderr=stderr,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pids = proc.stdout.readline()
    assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "stderr").read_text()
  worker_pid, holder_pid = map(int, pids.split())
  try:
    deadline = time.monotonic() + 10
    while not _has_exited(worker_pid) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert _has_exited(worker_pid), "the verification worker outlived its killed parent"
  finally:
    for pid in (worker_pid, holder_pid):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
