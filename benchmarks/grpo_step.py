"""GRPO step time split into generation, reward and update, on the word-problem task with a tiny tokenizer.

    .venv/bin/python benchmarks/grpo_step.py [--prompts 8] [--group 8] [--new_tokens 128] [--steps 3]

A GRPO step = one rollout batch (`GRPORollouts.next_batch`: sample prompts x group completions with the KV-cache
sampler, decode them, score them with the math verifier's correctness reward, build the training batch) and one
update (`make_train_step` on the GRPO loss). The script times `phi_jax.sampling.generate` and the reward call
inside the rollout by wrapping them, so rollout = generation + reward + host work (detokenising, batch assembly).
Model: the benchmark model of `train_step.py` with the tokenizer's vocabulary, float32, random weights. The first
step (compiles) is reported apart; the figures are medians over the following steps.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _extra(parser):
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)


ARGS = _common.parse_args("grpo_step", __doc__.splitlines()[0], _extra)
_common.pin_threads(ARGS.threads)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from phi_jax import sharding  # noqa: E402
from phi_jax.hf.tokenizer import build_tiny_tokenizer  # noqa: E402
from phi_jax.stages import grpo  # noqa: E402
from phi_jax.tasks import word_problems  # noqa: E402
from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer  # noqa: E402
from phi_jax.train.state import state_shardings  # noqa: E402
from phi_jax.train.step import make_train_step  # noqa: E402


class _Stopwatch:
  """Wraps a function and adds the seconds each call takes to `total` (blocking on JAX results)."""

  def __init__(self, fn):
    self.fn, self.total = fn, 0.0

  def __call__(self, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(self.fn(*args, **kwargs))
    self.total += time.perf_counter() - start
    return out


def main():
  smoke = ARGS.smoke
  prompts_per_step, group, new_tokens = (2, 2, 8) if smoke else (ARGS.prompts, ARGS.group, ARGS.new_tokens)
  num_steps = 2 if smoke else ARGS.steps + 1
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = build_tiny_tokenizer(tmp, chat_format="phi-4", corpus=word_problems.tokenizer_corpus())
  config = _common.bench_config(smoke).replace(vocab_size=len(tokenizer))
  records = [word_problems.to_eval_record(p) for p in word_problems.generate(64, seed=0, split="train")]
  cfg = grpo.GRPOConfig(prompts_per_step=prompts_per_step, group_size=group, max_prompt_tokens=128,
                        max_new_tokens=new_tokens, temperature=1.0)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rewards = _Stopwatch(grpo.verifier_rewards("correctness"))
  source = grpo.GRPORollouts(records, tokenizer, config, cfg, reward_batch_fn=rewards, num_steps=num_steps, mesh=mesh)
  generation = _Stopwatch(grpo.generate)
  grpo.generate = generation  # the rollout calls the sampler through the stage module
  opt_cfg = OptimizerConfig(learning_rate=1e-5, decay="constant")
  optimizer = make_optimizer(opt_cfg, num_steps)
  state = create_train_state(config, optimizer, mesh, jax.random.key(0))
  step_fn = None
  steps = []
  for step in range(num_steps):
    generation.total = rewards.total = 0.0
    start = time.perf_counter()
    batch = source.next_batch(state.params, step)
    rollout_s = time.perf_counter() - start
    batch = jax.device_put(batch, jax.devices()[0])
    if step_fn is None:
      step_fn = make_train_step(grpo.make_loss_fn(config, cfg), optimizer, learning_rate_schedule(opt_cfg, num_steps),
                                mesh, state_shardings(config, optimizer, mesh), batch)
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics["loss"])
    update_s = time.perf_counter() - start
    steps.append({"generation_s": generation.total, "reward_s": rewards.total,
                  "host_s": rollout_s - generation.total - rewards.total, "update_s": update_s,
                  "total_s": rollout_s + update_s})
  timed = steps[1:]
  median = {k: float(np.median([s[k] for s in timed])) for k in timed[0]}
  result = {"benchmark": "grpo_step", "smoke": smoke, "machine": _common.machine(), "threads": ARGS.threads,
            "model_params": config.num_params(), "prompts_per_step": prompts_per_step, "group_size": group,
            "max_new_tokens": new_tokens, "first_step": steps[0], "steps": timed, "median": median,
            "share": {k: median[k] / median["total_s"] for k in ("generation_s", "reward_s", "host_s", "update_s")}}
  _common.write(ARGS, result)


if __name__ == "__main__":
  main()
