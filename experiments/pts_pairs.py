"""Pivotal Token Search pairs for DPO (the pairs of Phi-4's first DPO round): one-token preference pairs at the tokens
of the policy's own completions that move its chance of solving the problem (`phi_jax.stages.pts`).

    python experiments/pts_pairs.py --init_from=runs/sft_tiny --problems=experiments/data/tiny_traces_train.jsonl \
        --k=16 --p_gap=0.2 --out=runs/pts_tiny/pairs.jsonl

The policy, the problems and the sampling settings (rollouts.*) are read as experiments/rollouts.py reads them. For
each problem, --k completions are sampled and verified; a problem whose share of correct ones lies outside
[0.2, 0.8] is not searched, nor one none of whose completions finished (ended on a stop token). Otherwise its first
finished completion is searched: p(success) after each prefix the search visits is the share of --k continuations of
the prompt and that prefix that finish with a correct answer (`pts.sampled_estimator`), and each pivotal token with
an alternative makes a pair (`pts.pivotal_pairs`). A continuation may take rollouts.max_new_tokens more tokens after
a prefix, so the prompt plus twice that must fit the model's positions.

Pairs go to --out as `{"prompt": [messages, {"role": "assistant", "content": <prefix>}], "chosen", "rejected",
"p_chosen", "p_rejected", "answer"}`, which the DPO stage reads as continuations (it scores the one token alone);
pairs whose text the tokenizer does not encode back into the same ids are left out (`pts.pair_record`). The counts
go to `<out stem>.summary.json`: problems, problems_searched, problems_outside_range, problems_unfinished,
pivotal_tokens, pivotal_tokens_unpaired (no other token sampled in its place, or none whose p(success) differs by
--p_gap), pairs, pairs_not_exact, estimates (of p(success), each --k continuations). Train on them with the DPO stage,
e.g. experiments/configs/dpo_tiny.gin with data.train_files=['<out>'], under the same data.system_prompt.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import common  # noqa: E402  (gin configurables shared by every entry script)
import rollouts  # noqa: E402
import run_files  # noqa: E402
from phi_jax import rewards  # noqa: E402
from phi_jax.sampling.sampler import SamplingConfig  # noqa: E402
from phi_jax.stages import pts  # noqa: E402

log = logging.getLogger("phi_jax")


def search_problems(params, config, tokenizer, problems: list[dict[str, Any]], *, k: int, p_gap: float,
                    sampling: SamplingConfig, seed: int = 0, batch_size: int = 64, mesh=None,
                    system_prompt: Optional[str] = None, verify_fn=None) -> tuple[list[dict], dict[str, int]]:
  """(pair records, counts) of `problems` (`rollouts.read_problems`' records); see the module's docstring.
  `verify_fn` (completions, golds) -> verdicts defaults to the math verifier."""
  verify_fn = verify_fn or rewards.verify_batch
  check_k_splits(k, mesh)
  samples = rollouts.sample_rollouts(params, config, tokenizer, [p["prompt"] for p in problems], k=k,
                                     sampling=sampling, rng=jax.random.key(seed), batch_size=batch_size, mesh=mesh,
                                     system_prompt=system_prompt)
  counts = dict(problems=len(problems), problems_searched=0, problems_outside_range=0, problems_unfinished=0,
                pivotal_tokens=0, pairs=0, pivotal_tokens_unpaired=0, pairs_not_exact=0, estimates=0)
  records = []
  search_key = jax.random.fold_in(jax.random.key(seed), 1)
  for index, (problem, outputs) in enumerate(zip(problems, samples)):
    verdicts = verify_fn([o["text"] for o in outputs], [problem["answer"]] * k)
    p_question = sum(bool(v) and o["finished"] for v, o in zip(verdicts, outputs)) / k
    if not pts.worth_searching(p_question):
      counts["problems_outside_range"] += 1
      continue
    finished = [o for o in outputs if o["finished"]]
    if not finished:
      counts["problems_unfinished"] += 1
      continue
    counts["problems_searched"] += 1
    estimate = pts.sampled_estimator(params, config, tokenizer, problem["prompt"], problem["answer"], k=k,
                                     sampling=sampling, rng=jax.random.fold_in(search_key, index), verify=verify_fn,
                                     system_prompt=system_prompt, mesh=mesh)
    asked = []

    def counted(prefix, estimate=estimate, asked=asked):
      asked.append(prefix)
      return estimate(prefix)

    memo = pts.Memo(counted)
    completion = finished[0]["token_ids"]
    found = pts.find_pivotal_tokens(completion, memo, p_gap)
    pairs = pts.pivotal_pairs(completion, memo, p_gap)
    counts["pivotal_tokens"] += len(found)
    counts["pivotal_tokens_unpaired"] += len(found) - len(pairs)
    for pair in pairs:
      record = pts.pair_record(tokenizer, problem["prompt"], pair, system_prompt=system_prompt)
      if record is None:
        counts["pairs_not_exact"] += 1
        continue
      records.append(dict(record, answer=problem["answer"]))
    counts["estimates"] += len(asked)
  counts["pairs"] = len(records)
  return records, counts


def check_k_splits(k: int, mesh) -> None:
  """Each estimate's k continuations run as one batch, split over the mesh's data x fsdp devices."""
  rows = rollouts.data_parallel_devices(mesh)
  if k % rows:
    raise ValueError(f"--k={k} continuations per estimate run as one batch, which must split over the mesh's "
                     f"data x fsdp = {rows} devices: set --k to a multiple of {rows}")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  run_files.add_checkpoint_args(parser)
  parser.add_argument("--problems", required=True, help="JSONL of {problem, answer} (or conversations)")
  parser.add_argument("--k", type=int, default=16, help="samples per problem and per estimate of p(success)")
  parser.add_argument("--p_gap", type=float, default=0.2, help="the least change of p(success) that is pivotal")
  parser.add_argument("--out", required=True, help="pairs JSONL to write; the summary goes next to it")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  rollouts.start_pairs_tool(args, "pts_pairs.py")
  if args.k < 2:
    raise ValueError(f"--k={args.k}: estimating p(success) needs at least two samples")
  if not 0.0 < args.p_gap <= 1.0:
    raise ValueError(f"--p_gap={args.p_gap} must be in (0, 1]: the least change of p(success) that is pivotal")
  settings = rollouts.rollout_settings()
  rollouts.check_sampling_varies(settings["sampling"], args.k)
  problems = rollouts.read_problems(args.problems)
  model_config = rollouts.policy_config(args.init_from)[0]
  max_new = settings["sampling"].max_new_tokens
  if 2 * max_new >= model_config.max_position_embeddings:  # a completion, then continuations of its prefixes
    raise ValueError(f"rollouts.max_new_tokens={max_new}: a completion and a continuation of its prefix take up to "
                     f"{2 * max_new} positions after the prompt, which leaves no room for it within the model's "
                     f"max_position_embeddings={model_config.max_position_embeddings}; set "
                     f"--gin_param='rollouts.max_new_tokens=N' with N well below "
                     f"{model_config.max_position_embeddings // 2}")
  tokenizer = rollouts.policy_tokenizer(args.init_from)
  system_prompt = common.data()["system_prompt"]
  rollouts.check_prompts_fit(args.problems, problems, tokenizer, model_config, binding="rollouts.max_new_tokens",
                             max_new_tokens=max_new, system_prompt=system_prompt, times=2)
  the_mesh = common.mesh()
  check_k_splits(args.k, the_mesh)
  config, params, tokenizer = rollouts.load_policy(args.init_from, the_mesh, tokenizer)
  verify_fn = functools.partial(rewards.verify_batch, timeout_s=settings["verify_timeout_s"])
  records, counts = search_problems(params, config, tokenizer, problems, k=args.k, p_gap=args.p_gap,
                                    sampling=settings["sampling"], seed=args.seed,
                                    batch_size=settings["batch_size"], mesh=the_mesh, system_prompt=system_prompt,
                                    verify_fn=verify_fn)
  summary = dict(counts, k=args.k, p_gap=args.p_gap, seed=args.seed, problems_file=args.problems,
                 pairs_file=args.out, sampling=rollouts.sampling_record(settings["sampling"]),
                 system_prompt=system_prompt, init_from=args.init_from)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run_files.write_results_atomically(args.out, records, rollouts.summary_path(args.out), summary)
  log.info("pts_pairs: %s", json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
