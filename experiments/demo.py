"""The demo: packed mid-training of a tiny model on chain-of-thought traces, then greedy answers with the KV cache.

    make demo        # == python experiments/demo.py --workdir runs/demo

Runs on a laptop CPU in a few minutes with no downloads. Writes runs/demo/summary.json
({"stages": [{"name", "accuracy", ...}]}) and runs/demo/report.md. Stages beyond mid-training (SFT, rollout DPO,
GRPO) join this table as they land.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from phi_jax.data.chat import render_prompt, stop_token_ids  # noqa: E402
from phi_jax.model import kv_cache  # noqa: E402
from phi_jax.rewards import is_correct  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy_answers(params, config, tokenizer, questions, max_new_tokens):
  """Batched greedy decoding with the KV cache (prefill once, then one token per step for every row)."""
  prompts = [render_prompt(tokenizer, q) for q in questions]
  lengths = np.array([len(p) for p in prompts], np.int32)
  padded = np.zeros((len(prompts), lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  cache = kv_cache.init_cache(config, len(prompts), int(lengths.max()) + max_new_tokens)
  prefill = jax.jit(kv_cache.prefill, static_argnames="config")
  step = jax.jit(kv_cache.decode_step, static_argnames="config")
  logits, cache = prefill(params, padded, lengths, cache, config)
  stops = set(stop_token_ids(tokenizer))
  outputs = [[] for _ in prompts]
  done = np.zeros(len(prompts), bool)
  for _ in range(max_new_tokens):
    tokens = np.asarray(jnp.argmax(logits, -1))
    for i, t in enumerate(tokens):
      if not done[i]:
        done[i] = int(t) in stops
        if not done[i]:
          outputs[i].append(int(t))
    if done.all():
      break
    logits, cache = step(params, jnp.asarray(tokens, jnp.int32), cache, config)
  return [tokenizer.decode(o) for o in outputs]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo"))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--num_eval", type=int, default=32)
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  os.chdir(ROOT)
  workdir = os.path.abspath(args.workdir)
  stage_dir = os.path.join(workdir, "midtrain")
  common.parse_gin(["experiments/configs/midtrain_tiny.gin"],
                   [f"train.num_steps={args.steps}", "train.checkpoint_every=100", "train.eval_every=100",
                    "train.log_every=10"])
  state = common.run_training(stage_dir)
  config, _ = common.model()
  tokenizer = common.get_tokenizer("tiny:phi-4", stage_dir)
  with open("experiments/data/tiny_traces_eval.jsonl") as f:
    records = [json.loads(line) for line in f][:args.num_eval]
  questions = [r["messages"][0]["content"] for r in records]
  golds = [r["messages"][1]["content"].rsplit("\\boxed{", 1)[1].split("}")[0] for r in records]
  answers = greedy_answers(state.params, config, tokenizer, questions, max_new_tokens=64)
  correct = [is_correct(a, g) for a, g in zip(answers, golds)]
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    final = [r for r in map(json.loads, f) if "loss" in r][-1]
  summary = {"stages": [{"name": "midtrain", "accuracy": float(np.mean(correct)), "num_eval": len(correct),
                         "final_loss": final["loss"], "steps": args.steps}]}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  lines = ["# phi_jax demo", "", "| stage | held-out accuracy (greedy) | final train loss |", "|---|---|---|"]
  lines += [f"| {s['name']} | {s['accuracy']:.3f} ({s['num_eval']} problems) | {s['final_loss']:.3f} |"
            for s in summary["stages"]]
  lines += ["", "## Sample answers", ""]
  lines += [f"- `{q}` -> `{a}` (gold {g}, {'correct' if c else 'wrong'})"
            for q, a, g, c in list(zip(questions, answers, golds, correct))[:5]]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
