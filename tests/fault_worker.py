"""A small training run for fault injection, driven by tests/test_reliability.py in a subprocess.

    python tests/fault_worker.py WORKDIR '{"num_steps": 12, "kill": ["rename_before", 6]}'

It trains a tiny model with `phi_jax.train.loop.run` on a deterministic synthetic data source (its position is
checkpointed) over an fsdp mesh of 2 CPU devices, and writes WORKDIR/final_params.npz when it finishes.
Faults, chosen by the JSON settings, are injected from inside the process, so they land on a chosen phase:

    kill: [phase, step]   SIGKILL itself at a phase of a step's work:
        "step"           a few milliseconds after the batch of `step` is handed to the train step (mid-compute);
        "save"           a few milliseconds after the async save of `step` starts (mid-write);
        "rename_before"  when Orbax is about to rename the finished temporary directory of `step` into place;
        "rename_after"   right after that rename, before Orbax's own bookkeeping;
        "random"         `step` is a delay in seconds from the start of training.
    slow_rename_s: s      the rename of every save sleeps first (a save that takes a while, for SIGTERM tests).
    fsize_limit: [step, bytes]  from the save of `step` on, no file may grow past `bytes` (RLIMIT_FSIZE; writes
                          fail with EFBIG as on a full disk).
    grace_s: s            LoopConfig.preemption_grace_s.
    step_delay_s: s       each batch takes this long to read (time for a test to signal mid-run).

Each kill first appends the phase and the checkpoint directory listing to WORKDIR/kills.jsonl.
"""

import json
import logging
import os
import random
import resource
import signal
import sys
import threading
import time

from xla_flags import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = xla_flags(devices=2)

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                              os.path.join(ROOT, ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import orbax.checkpoint._src.path.async_path as async_path  # noqa: E402

from phi_jax import sharding  # noqa: E402
from phi_jax.model import PhiConfig  # noqa: E402
from phi_jax.stages import next_token  # noqa: E402
from phi_jax.train import LoopConfig, OptimizerConfig, checkpoint, loop  # noqa: E402

CONFIG = PhiConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=64)
BATCH, SEQ = 8, 32


class SyntheticData:
  """Batch i is a function of (seed, i) only; the state is i."""

  def __init__(self, seed: int, on_batch=None):
    self.seed, self.index, self.on_batch = seed, 0, on_batch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.index])
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ), dtype=np.int32)
    self.index += 1
    if self.on_batch is not None:
      self.on_batch(self.index - 1)
    return {"tokens": tokens, "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
            "segment_ids": np.ones((BATCH, SEQ), np.int32), "loss_mask": np.ones((BATCH, SEQ), np.int32)}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict):
    self.index = int(state["index"])


def main():
  workdir, settings = sys.argv[1], json.loads(sys.argv[2])
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  rand = random.Random(settings.get("seed_kill", 0))

  def die(phase):
    listing = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    with open(os.path.join(workdir, "kills.jsonl"), "a") as f:
      f.write(json.dumps({"phase": phase, "listing": listing}) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

  def die_later(phase, delay):
    threading.Thread(target=lambda: (time.sleep(delay), die(phase)), daemon=True).start()

  kill_phase, kill_step = settings.get("kill", [None, None])
  if kill_phase == "random":
    die_later("random", kill_step)

  def on_batch(index):
    time.sleep(settings.get("step_delay_s", 0.0))
    if kill_phase == "step" and index == kill_step - 1:  # the batch of the step that produces state `kill_step`
      die_later("step", rand.uniform(0.0, 0.02))

  original_rename = async_path.rename

  async def rename(src, dst):
    if settings.get("slow_rename_s"):
      time.sleep(settings["slow_rename_s"])
    if kill_phase == "rename_before" and os.path.basename(str(dst)) == str(kill_step):
      die("rename_before")
    result = await original_rename(src, dst)
    if kill_phase == "rename_after" and os.path.basename(str(dst)) == str(kill_step):
      die("rename_after")
    return result

  async_path.rename = rename

  original_save = checkpoint.Checkpointer.save

  def save(self, step, state, **kwargs):
    limit = settings.get("fsize_limit")
    if limit and step == limit[0]:
      self.wait()
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit[1], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    started = original_save(self, step, state, **kwargs)
    if kill_phase == "save" and step == kill_step:
      die_later("save", rand.uniform(0.0, 0.05))
    return started

  checkpoint.Checkpointer.save = save

  mesh = sharding.make_mesh(settings.get("mesh", {"fsdp": 2}))
  loop_config = LoopConfig(num_steps=settings.get("num_steps", 12), checkpoint_every=settings.get("every", 2),
                           keep_checkpoints=settings.get("keep", 3), async_checkpoints=True,
                           preemption_grace_s=settings.get("grace_s"))
  state = loop.run(workdir=workdir, model_config=CONFIG,
                   optimizer_config=OptimizerConfig(learning_rate=1e-2, decay="constant", max_grad_norm=1.0),
                   loss_fn=next_token.make_loss_fn(CONFIG, chunk_size=64), train_data=SyntheticData(0, on_batch),
                   loop=loop_config, mesh=mesh)
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  np.savez(os.path.join(workdir, "final_params.npz"), **{jax.tree_util.keystr(p): x for p, x in leaves})
  print("FINISHED", flush=True)


if __name__ == "__main__":
  main()
