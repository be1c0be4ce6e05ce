"""One process of a two-process CPU run (see test_resume.py::test_two_processes_equal_one): each process feeds
its half of every global batch and prints the losses as JSON on its last line.

Then the training loop (`loop.run`, workdir argv[1]) on finite data that ends sooner on process 1 (2 train
batches and 1 eval batch against 3 and 2): both processes must stop after step 2 and score one eval batch, not
wait forever in a step the other never takes.

Then a run in which only process 0 gets a SIGTERM (it signals itself after logging step 3): both processes must
save the same step and stop with `Preempted`.

Then a restore in which only process 1 finds the two newest checkpoints damaged (an array read that fails in
one, a digest that does not match in the other): both processes must move those steps aside and restore the same
earlier one, neither waiting in a collective (the checksums, the quarantine barrier) the other never reaches.

Last, GRPO: both processes sample the same whole rollout batch (with KL reference log-probs), each trains its own
block of rows, and two steps of the loop run; the test then restores that checkpoint on one process and trains a
third step from it.

With `errors` after the workdir (test_two_processes.py), only runs in which process 1 alone fails before the first
step (`_errors_on_one_process`)."""

import json
import os
import signal
import sys

from xla_flags import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from phi_jax import sharding  # noqa: E402
from phi_jax.sharding import distributed  # noqa: E402
from phi_jax.stages import next_token  # noqa: E402
from phi_jax.train import LoopConfig, checkpoint, loop  # noqa: E402

distributed.initialize()


def _cache_writes_from_every_process():
  """JAX writes persistent compilation-cache entries from process 0 only, and on CPU each process's cache keys
  differ (they hash the process's own device topology), so process 1 would compile every program of this run anew
  each time the suite runs. Its writes go to its own keys, so letting it write is safe; without this private hook
  (a later JAX may move it) the run is only slower."""
  from jax._src import compiler, distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  write = getattr(compiler, "_cache_write", None)
  if write is None or jax.process_index() == 0:
    return

  def write_as_process_0(*args, **kwargs):
    state = jax_distributed.global_state
    own_id, state.process_id = state.process_id, 0
    try:
      return write(*args, **kwargs)
    finally:
      state.process_id = own_id

  compiler._cache_write = write_as_process_0


_cache_writes_from_every_process()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_train  # noqa: E402  (same config, batches and step as the single-process tests)


def _outcome(run) -> object:
  """"finished", or [the error's type, the start of its message]."""
  try:
    run()
    return "finished"
  except Exception as e:  # pylint: disable=broad-except  (each case's error is what the test reads)
    return [type(e).__name__, str(e)[:600]]


def _errors_on_one_process(workdir: str) -> dict:
  """`errors` mode: three runs of the loop in which process 1 alone fails before its first step (a bad pair record
  read for DPO's in-step reference pass, a reward function that raises in GRPO's rollout, a token id outside the
  vocabulary in the first eval batch). Each run must raise on both processes, neither waiting in a collective for
  the other; the outcome of each, per process."""
  from phi_jax.data import preference
  from phi_jax.hf.tokenizer import build_tiny_tokenizer
  from phi_jax.stages import dpo, grpo

  index, mesh = jax.process_index(), sharding.make_mesh({"fsdp": -1})
  run = lambda name, **kwargs: loop.run(workdir=os.path.join(workdir, name), model_config=test_train.CONFIG,
                                        optimizer_config=test_train.OPT, mesh=mesh,
                                        loop=LoopConfig(num_steps=2, async_checkpoints=False), **kwargs)
  tokenizer = build_tiny_tokenizer(os.path.join(workdir, f"tokenizer{index}"), chat_format="phi-4")
  grpo_cfg, rollouts = test_train.grpo_rollouts(tokenizer, mesh, num_steps=2)
  pairs = os.path.join(workdir, f"pairs{index}.jsonl")  # line 4 is cut short: process 1 reads records 1, 3, 5, 7
  with open(pairs, "w") as f:
    f.writelines(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)})
                 [:None if i != 3 else 20] + "\n" for i in range(8))
  dpo_data = dpo.with_reference_logps(
      preference.build_preference_iterator(pairs, tokenizer, seq_len=48, batch_size=4, seed=0, num_epochs=1),
      rollouts.ref_params, dpo.reference_logps_fn(test_train.CONFIG, 16, mesh=mesh), mesh=mesh)
  results = {"dpo": _outcome(lambda: run("dpo", train_data=dpo_data,
                                         loss_fn=dpo.make_loss_fn(test_train.CONFIG, beta=0.1, chunk_size=16)))}

  def reward_fails_on_process_1(texts, golds, lengths, finished):
    if index == 1:  # e.g. a remote reward service this host cannot reach
      raise ConnectionError("reward service unreachable from this host")
    return (np.arange(len(texts)) % 3).astype(np.float32), np.zeros(len(texts), bool)

  rollouts.reward_batch_fn = reward_fails_on_process_1
  results["grpo"] = _outcome(lambda: run("grpo", train_data=rollouts,
                                         loss_fn=grpo.make_loss_fn(test_train.CONFIG, grpo_cfg)))
  rows = slice(4 * index, 4 * (index + 1))
  local = [{k: v[rows] for k, v in b.items()} for b in test_train.packed_batches(2)]
  bad_eval = {k: v.copy() for k, v in local[0].items()}
  if index == 1:
    bad_eval["tokens"][0, 3] = test_train.CONFIG.vocab_size + 5
  results["eval"] = _outcome(lambda: run("eval", train_data=local, eval_batches=[bad_eval],
                                         loss_fn=next_token.make_loss_fn(test_train.CONFIG, chunk_size=16)))
  return results


if sys.argv[2:] == ["errors"]:
  print(json.dumps(dict(_errors_on_one_process(sys.argv[1]), process=jax.process_index())), flush=True)
  sys.exit(0)

half = test_train.packed_batches(test_train.NUM_STEPS)
rows = slice(4 * jax.process_index(), 4 * (jax.process_index() + 1))
local = [{k: v[rows] for k, v in b.items()} for b in half]
losses, _, _ = test_train.run_steps({"fsdp": -1}, batches=local)


class CountedBatches:
  """This process's batches with the data pipeline's `stats()`: tokens returned so far, per source."""

  def __init__(self, batches):
    self.batches, self.index = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.index == len(self.batches):
      raise StopIteration
    self.index += 1
    return self.batches[self.index - 1]

  def stats(self):
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in self.batches[:self.index])
    return {"batches": self.index, "sources": {"packed": {"tokens": tokens}}}


more = 3 - jax.process_index()  # process 0: 3 train / 2 eval batches; process 1: 2 / 1
state = loop.run(workdir=sys.argv[1], model_config=test_train.CONFIG, optimizer_config=test_train.OPT,
                 loss_fn=next_token.make_loss_fn(test_train.CONFIG, chunk_size=16),
                 train_data=CountedBatches(local[:more]),
                 loop=LoopConfig(num_steps=5, async_checkpoints=False), mesh=sharding.make_mesh({"fsdp": -1}),
                 eval_batches=lambda: iter(local[:more - 1]))
with open(os.path.join(sys.argv[1], "metrics.jsonl")) as f:
  records = [json.loads(line) for line in f]
eval_tokens = [r["eval_tokens"] for r in records if "eval_tokens" in r]
tokens_seen = {r["step"]: r["tokens_seen/packed"] for r in records if "loss" in r}
with open(os.path.join(sys.argv[1], "data_stats.json")) as f:
  data_stats = json.load(f)
finite_data_steps = int(loop.host_scalar(state.step))


def signal_process_0(record):
  if record["step"] == 3 and jax.process_index() == 0:
    os.kill(os.getpid(), signal.SIGTERM)


try:
  loop.run(workdir=os.path.join(sys.argv[1], "preempted"), model_config=test_train.CONFIG,
           optimizer_config=test_train.OPT, loss_fn=next_token.make_loss_fn(test_train.CONFIG, chunk_size=16),
           train_data=local * 10, loop=LoopConfig(num_steps=30, async_checkpoints=False),
           mesh=sharding.make_mesh({"fsdp": -1}), on_log=signal_process_0)
  preempted_at = None
except loop.Preempted as e:
  preempted_at = e.step
fallback = os.path.join(sys.argv[1], "fallback")
state = loop.run(workdir=fallback, model_config=test_train.CONFIG, optimizer_config=test_train.OPT,
                 loss_fn=next_token.make_loss_fn(test_train.CONFIG, chunk_size=16), train_data=local * 2,
                 loop=LoopConfig(num_steps=3, checkpoint_every=1, async_checkpoints=False),
                 mesh=sharding.make_mesh({"fsdp": -1}))
if jax.process_index() == 1:
  # Damage only process 1 finds, once Orbax's own (collective) reads are done: step 3's arrays fail to read,
  # step 2's data-iterator state fails its digest. (A read that fails inside Orbax on one process is left to
  # Orbax, whose restore ends in a barrier of its own.)
  intact_restore, intact_digest = checkpoint.ocp.CheckpointManager.restore, checkpoint.digest

  def restore(self, step, *args, **kwargs):
    restored = intact_restore(self, step, *args, **kwargs)
    if step == 3 and "state" in kwargs["args"].keys():
      raise OSError("step 3: a shard file only this process reads is damaged")
    checkpoint.digest = (lambda obj: "damaged") if step == 2 and "state" in kwargs["args"].keys() else intact_digest
    return restored

  checkpoint.ocp.CheckpointManager.restore = restore
ckpt = checkpoint.Checkpointer(os.path.join(fallback, "checkpoints"))
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
restored_step = ckpt.restore_latest(abstract)[0]
ckpt.close()
from jax.experimental import multihost_utils  # noqa: E402

from phi_jax.hf.tokenizer import build_tiny_tokenizer  # noqa: E402
from phi_jax.stages import grpo  # noqa: E402

tokenizer = build_tiny_tokenizer(os.path.join(sys.argv[1], f"tokenizer{jax.process_index()}"), chat_format="phi-4")
grpo_cfg, rollouts = test_train.grpo_rollouts(tokenizer, sharding.make_mesh({"fsdp": -1}), num_steps=2)
mine = rollouts.next_batch(state.params, 0)
whole = rollouts._batch  # every process holds the whole batch; `mine` is this process's block of rows
gathered = multihost_utils.process_allgather(mine, tiled=True)
rows_match = all(np.array_equal(gathered[k], whole[k]) for k in whole)
same_batch = multihost_utils.process_allgather(np.asarray([float(whole["old_logprobs"].sum()), whole["tokens"].sum(),
                                                           float(np.abs(whole["advantages"] * np.arange(8)).sum())]))
grpo_state = loop.run(workdir=os.path.join(sys.argv[1], "grpo"), model_config=test_train.CONFIG,
                      optimizer_config=test_train.OPT, loss_fn=grpo.make_loss_fn(test_train.CONFIG, grpo_cfg),
                      train_data=rollouts, loop=LoopConfig(num_steps=2, async_checkpoints=False),
                      mesh=sharding.make_mesh({"fsdp": -1}))
# DPO with the in-step reference on 9 pairs, 4 rows a process: process 0's share (5 pairs) has a second batch that
# process 1's (4) has not. The reference pass is a collective, so both must stop after step 1, not wait in different
# collectives.
from phi_jax.data import preference  # noqa: E402
from phi_jax.stages import dpo  # noqa: E402

pairs = os.path.join(sys.argv[1], f"pairs{jax.process_index()}.jsonl")  # the same pairs; a file per process
with open(pairs, "w") as f:
  f.writelines(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)}) + "\n"
               for i in range(9))
dpo_mesh = sharding.make_mesh({"fsdp": -1})
dpo_data = dpo.with_reference_logps(
    preference.build_preference_iterator(pairs, tokenizer, seq_len=48, batch_size=4, seed=0, num_epochs=1),
    state.params, dpo.reference_logps_fn(test_train.CONFIG, 16, mesh=dpo_mesh), mesh=dpo_mesh)
dpo_state = loop.run(workdir=os.path.join(sys.argv[1], "dpo"), model_config=test_train.CONFIG,
                     optimizer_config=test_train.OPT, train_data=dpo_data, mesh=dpo_mesh,
                     loss_fn=dpo.make_loss_fn(test_train.CONFIG, beta=0.1, chunk_size=16),
                     loop=LoopConfig(num_steps=5, async_checkpoints=False))
# A mesh whose batch blocks span both processes (tensor over all devices): loop.run's batches are refused, not
# assembled from the two processes' different rows as if they were one block.
try:
  loop.global_batch({"tokens": np.zeros((4, 8), np.int32)}, sharding.make_mesh({"tensor": jax.device_count()}))
  spanning_mesh = "accepted"
except ValueError as e:
  spanning_mesh = "refused" if "make data x fsdp a multiple of the process count" in str(e) else str(e)
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses,
                  "spanning_mesh": spanning_mesh,
                  "finite_data_steps": finite_data_steps, "eval_tokens": eval_tokens,
                  "tokens_seen": tokens_seen, "data_stats": data_stats, "preempted_at": preempted_at,
                  "restored_step": restored_step, "grpo_rows": int(mine["tokens"].shape[0]),
                  "grpo_rows_match": rows_match, "grpo_same_batch": bool(np.all(same_batch == same_batch[0])),
                  "grpo_steps": int(loop.host_scalar(grpo_state.step)), "grpo_state": rollouts.get_state(),
                  "dpo_uneven_steps": int(loop.host_scalar(dpo_state.step)),
                  "corrupt": sorted(os.listdir(os.path.join(fallback, "checkpoints", "corrupt")))}))
