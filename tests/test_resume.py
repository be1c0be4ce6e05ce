"""End-to-end runs of experiments/train.py in subprocesses: exact resume after SIGKILL and SIGTERM, restore onto
another mesh, two jax.distributed processes == one, the ahead-of-time memory plan for phi-4."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import two_processes
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
NUM_STEPS = 8
# Constant LR: the schedule then does not depend on num_steps, so a run can be extended.
BASE = ["--gin_file=experiments/configs/midtrain_tiny.gin", f"--gin_param=train.num_steps={NUM_STEPS}",
        "--gin_param=train.checkpoint_every=2", "--gin_param=train.eval_every=0", "--gin_param=data.eval_files=[]",
        "--gin_param=data.seq_len=64", "--gin_param=optimizer.decay='constant'",
        "--gin_param=optimizer.warmup_fraction=None", "--gin_param=optimizer.learning_rate=1e-3"]

pytestmark = pytest.mark.slow


def _env(devices=8):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
             PYTHONUNBUFFERED="1")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  return env


def _train(workdir, *extra, check=True):
  proc = subprocess.run([sys.executable, TRAIN, *BASE, *extra, f"--workdir={workdir}"], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _params(workdir):
  with ocp.StandardCheckpointer() as ckptr:
    return jax.device_get(ckptr.restore(os.path.join(workdir, "params")))


def _start_and_signal(workdir, sig, after_step):
  """Starts a run and sends `sig` once metrics.jsonl shows `after_step` (a checkpoint exists by then)."""
  proc = subprocess.Popen([sys.executable, TRAIN, *BASE, f"--workdir={workdir}"], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(_losses(workdir)) >= after_step:
      break
    time.sleep(0.05)
  assert proc.poll() is None, f"run ended before the signal:\n{proc.stdout.read()[-3000:]}"
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _train(workdir)
  return _losses(workdir), _params(workdir)


def _assert_identical(workdir, reference):
  ref_losses, ref_params = reference
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  assert losses == ref_losses  # bit-identical, every step
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)


def test_sigkill_then_rerun_is_bit_identical(tmp_path, uninterrupted):
  workdir = str(tmp_path)
  code, _ = _start_and_signal(workdir, signal.SIGKILL, after_step=5)
  assert code == -signal.SIGKILL
  assert len(_losses(workdir)) < NUM_STEPS  # really interrupted
  _train(workdir)
  _assert_identical(workdir, uninterrupted)


def test_sigterm_saves_exits_143_and_resumes_identically(tmp_path, uninterrupted):
  workdir = str(tmp_path)
  code, out = _start_and_signal(workdir, signal.SIGTERM, after_step=3)
  assert code == 143, out[-2000:]
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved[-1] < NUM_STEPS and saved[-1] == max(_losses(workdir))  # saved at the step the signal arrived
  _train(workdir)
  _assert_identical(workdir, uninterrupted)


def test_restore_onto_another_mesh_continues_identically(tmp_path, uninterrupted):
  workdir = str(tmp_path)
  _train(workdir, "--gin_param=train.num_steps=4", "--gin_param=mesh.shape={'fsdp': 8}")
  _train(workdir, "--gin_param=mesh.shape={'data': 2, 'fsdp': 2, 'tensor': 2}", "--gin_param=train.export_hf=True")
  losses, ref = _losses(workdir), uninterrupted[0]
  np.testing.assert_allclose([losses[s] for s in range(5, NUM_STEPS + 1)], [ref[s] for s in range(5, NUM_STEPS + 1)],
                             rtol=1e-5)
  # The export (train.export_hf) stops transformers' generate at the end of a chat turn.
  from transformers import AutoTokenizer, GenerationConfig
  hf = os.path.join(workdir, "hf")
  end_of_turn = AutoTokenizer.from_pretrained(hf).convert_tokens_to_ids("<|im_end|>")
  assert GenerationConfig.from_pretrained(hf).eos_token_id[0] == end_of_turn


def test_two_processes_equal_one(tmp_path):
  import test_train  # the single-process reference over the same global batches
  reference, _, _ = test_train.run_steps({"fsdp": -1})
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")
  outputs = two_processes.run([sys.executable, worker, str(tmp_path)], _env(4), 300,
                              " (one waiting in a step or save the other never took)")
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  assert [r["devices"] for r in results] == [8, 8]
  assert [r["spanning_mesh"] for r in results] == ["refused", "refused"]
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, rtol=1e-5)
  # Finite data that runs out on one process first: both stop after the same step. Their eval shares are uneven
  # (2 batches against 1): every eval batch is scored, the shorter share padded with batches that weigh nothing.
  first, second = test_train.packed_batches(2)
  weight = lambda seg, mask: float(((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0) & (mask[:, 1:] != 0)).sum())
  eval_weight = (weight(first["segment_ids"], first["loss_mask"])  # both processes' rows
                 + weight(second["segment_ids"][:4], second["loss_mask"][:4]))  # process 0's rows alone
  assert [r["finite_data_steps"] for r in results] == [2, 2]
  assert [r["eval_tokens"] for r in results] == [[eval_weight]] * 2
  # Tokens seen count both processes' rows: each step's global batch, and in data_stats.json every batch either
  # process returned (process 0's third, never trained, included).
  batches = test_train.packed_batches(test_train.NUM_STEPS)
  real = lambda b, rows=slice(None): int((b["segment_ids"][rows] > 0).sum())
  assert results[0]["tokens_seen"] == {"1": real(batches[0]), "2": real(batches[0]) + real(batches[1])}
  assert results[0]["data_stats"] == {"batches": 5, "sources": {"packed": {
      "tokens": sum(map(real, batches[:2])) + real(batches[2], slice(0, 4))}}}
  # A SIGTERM on process 0 only: both save the same step and stop (the other does not go on into a step alone).
  preempted = {r["preempted_at"] for r in results}
  assert len(preempted) == 1 and None not in preempted, outputs[1][-3000:]
  assert os.path.isdir(os.path.join(tmp_path, "preempted", "checkpoints", str(preempted.pop())))
  # Damage only process 1 sees: both move the steps aside and restore the same earlier one.
  assert [r["restored_step"] for r in results] == [1, 1]
  assert [sorted(name.split("-")[0] for name in r["corrupt"]) for r in results] == [["2", "3"], ["2", "3"]]
  # GRPO: the same whole rollout batch on both processes, half of its 8 rows trained by each, two loop steps.
  assert [(r["grpo_rows"], r["grpo_rows_match"], r["grpo_same_batch"], r["grpo_steps"]) for r in results] == [
      (4, True, True, 2)] * 2
  # DPO's in-step reference pass on uneven shares of a finite pair file: both stop after the step both can take.
  assert [r["dpo_uneven_steps"] for r in results] == [1, 1]
  # GRPO's prompt position is the same on every process, so its two-process checkpoint resumes on one.
  from phi_jax import sharding
  from phi_jax.hf.tokenizer import build_tiny_tokenizer
  from phi_jax.stages import grpo
  from phi_jax.train import LoopConfig, checkpoint, loop, make_optimizer
  from phi_jax.train.state import abstract_state
  mesh = sharding.make_mesh({"fsdp": -1})
  abstract = abstract_state(test_train.CONFIG, make_optimizer(test_train.OPT, 2), mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "grpo", "checkpoints"))
  step, saved, data, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 2 and data == results[0]["grpo_state"] == results[1]["grpo_state"]
  # Three rollout batches of 2 prompts: the one sampled before the loop, then one per loop step.
  assert data["position"] == 6 and data[checkpoint.GLOBAL_DATA_STATE]
  # ...and the loop trains on from it on one process: step 3 samples the next 2 prompts and updates the params.
  grpo_cfg, rollouts = test_train.grpo_rollouts(build_tiny_tokenizer(str(tmp_path / "tokenizer"), chat_format="phi-4"),
                                                mesh, num_steps=3)
  resumed = loop.run(workdir=str(tmp_path / "grpo"), model_config=test_train.CONFIG, optimizer_config=test_train.OPT,
                     loss_fn=grpo.make_loss_fn(test_train.CONFIG, grpo_cfg), train_data=rollouts,
                     loop=LoopConfig(num_steps=3, async_checkpoints=False), mesh=mesh)
  assert int(loop.host_scalar(resumed.step)) == 3 and rollouts.get_state()["position"] == 8
  with open(tmp_path / "grpo" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and np.isfinite(records[-1]["loss"])
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(resumed.params))]
  assert all(changed)


def test_plan_phi4_memory_on_8_device_fsdp(tmp_path):
  proc = subprocess.run(
      [sys.executable, TRAIN, "--gin_file=experiments/configs/midtrain_tiny.gin", "--dry_run",
       "--gin_param=model.preset='phi-4'", "--gin_param=data.seq_len=4096", "--gin_param=data.batch_size=8",
       "--gin_param=model.overrides={'remat_policy': 'full'}", "--gin_param=mesh.shape={'fsdp': 8}",
       f"--workdir={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert report["model_params"] == 14_659_507_200
  # fp32 params + two Adam moments = 12 bytes per parameter, split 8 ways, is the floor of the arguments.
  floor = 12 * 14_659_507_200 / 8 / 2**30
  assert floor <= report["per_device"]["argument_size_gib"] < floor * 1.05
  assert report["per_device"]["peak_estimate_gib"] > report["per_device"]["argument_size_gib"]


def test_a_run_that_ended_early_and_lost_its_checkpoints_reruns_as_nothing(tmp_path):
  """A run whose data ran out before train.num_steps (data.num_epochs=1), its checkpoints/ then deleted: its own
  command again failed ("training on to step 50 would start again from step 0"); only more steps are refused."""
  with open(os.path.join(ROOT, "experiments", "data", "tiny_traces_train.jsonl")) as f:
    (tmp_path / "small.jsonl").write_text("".join(f.readlines()[:20]))
  workdir = tmp_path / "run"
  ended_early = ["--gin_param=train.num_steps=50", "--gin_param=data.num_epochs=1",
                 f"--gin_param=data.train_files=['{tmp_path / 'small.jsonl'}']"]
  _train(workdir, *ended_early)
  assert 1 <= max(_losses(workdir)) < 50
  params = _params(workdir)
  subprocess.run(["rm", "-rf", str(workdir / "checkpoints")], check=True)
  proc = _train(workdir, *ended_early, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "nothing to train" in proc.stderr + proc.stdout
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(workdir))))
  # It loads no params, so the run it started from may be gone since (a recipe's earlier stage retrained, deleted).
  proc = _train(workdir, *ended_early, f"--gin_param=train.init_from='{tmp_path / 'deleted_start'}'", check=False)
  assert proc.returncode == 0 and "nothing to train" in proc.stderr + proc.stdout, proc.stderr[-3000:]
  proc = _train(workdir, *ended_early, "--gin_param=train.num_steps=60", check=False)
  assert proc.returncode != 0 and "training on to step 60 would start again from step 0" in proc.stderr


def _train_here(monkeypatch, *argv):
  """train.py's main in this process, for what it says before training (its set-up's errors and warnings)."""
  import gin
  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
  monkeypatch.chdir(ROOT)  # the configs' paths and includes are the repository root's
  monkeypatch.setattr("logging.basicConfig", lambda **kwargs: None)  # keeps caplog's handler on the root logger
  import train
  try:
    return train.main(list(argv))
  finally:
    gin.clear_config()


def test_a_rerun_without_gin_file_names_the_runs_config(tmp_path, monkeypatch):
  """`train.py --workdir=W` alone failed inside gin ("Required bindings for `train` not provided"): it reads no
  config, not even W/config.gin, and is refused with the --gin_file to give."""
  (tmp_path / "config.gin").write_text("train.num_steps = 2\n")
  with pytest.raises(ValueError, match=rf"no --gin_file given: .* --gin_file={tmp_path}/config.gin"):
    _train_here(monkeypatch, f"--workdir={tmp_path}")
  with pytest.raises(ValueError, match=r"no --gin_file given: give the --gin_file the run was started with \(e\.g\. "
                                       r"--gin_file=experiments/configs/midtrain_tiny.gin\)"):
    _train_here(monkeypatch, f"--workdir={tmp_path / 'new'}", "--gin_param=train.num_steps=2")


class _SetUpReached(Exception):
  pass


@pytest.mark.parametrize("config,stage_setup,says", [
    ("dpo_tiny.gin", "dpo_reference.setup", "the policy and the DPO reference are the random init of train.seed=3"),
    ("grpo_tiny.gin", "common._grpo_setup", "the policy (and the reference, when grpo.beta > 0) is the random init of "
                                     "train.seed=3"),
    ("midtrain_tiny.gin", "common._next_token_setup", None)])
def test_dpo_and_grpo_from_no_starting_params_warn_once(tmp_path, monkeypatch, caplog, config, stage_setup, says):
  """DPO and GRPO refine a trained model: with neither train.init_from nor model.hf_path both the policy and DPO's
  frozen reference were a random init, with no word. Warned once (toy runs do it on purpose); mid-training is not."""
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}) + "\n")
  data = [f"--gin_param=data.train_files=['{pairs}']"] if config == "dpo_tiny.gin" else []

  def reached(*args, **kwargs):
    raise _SetUpReached()

  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
  monkeypatch.setattr(stage_setup, reached)
  with caplog.at_level("WARNING", logger="phi_jax"), pytest.raises(_SetUpReached):
    _train_here(monkeypatch, f"--gin_file=experiments/configs/{config}", "--gin_param=train.seed=3", *data,
                f"--workdir={tmp_path / 'run'}")
  warnings = [r.getMessage() for r in caplog.records if "random init" in r.getMessage()]
  if says is None:
    assert warnings == []
    return
  assert len(warnings) == 1 and says in warnings[0], warnings
  assert "neither train.init_from nor model.hf_path" in warnings[0]
