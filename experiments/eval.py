"""Evaluates a model on problems with verifiable answers: accuracy averaged over n sampled runs (the Phi-4 reasoning
papers report the mean of 3), pass@k, greedy accuracy, response lengths and format errors, plus every output.

    python experiments/eval.py --init_from=runs/demo/sft --problems=runs/demo/data/test.jsonl --out=runs/eval_sft \
        --gin_file=experiments/configs/recipe_tiny/eval.gin
    python experiments/eval.py --init_from=/ckpt/Phi-4-mini-reasoning --problems=math500.jsonl --out=runs/m500 \
        --gin_file=experiments/configs/phi4_mini_reasoning/eval.gin

`--init_from` is a run's workdir (its params/; its config.gin gives the model and tokenizer) or a transformers
checkpoint directory (its own tokenizer files, or where it has none, as `phi_jax.save_hf` writes it, the bound
`data.tokenizer`). Problems are JSONL `{"problem": str, "answer": str}` (MATH-500 / AIME style; conversations
`{"messages": [...]}` work too). Sampling settings are the `evaluation.*` gin bindings. Writes
`<out>/summary.json` and `<out>/items.jsonl` (one record per problem: the greedy output and the n samples, each
with its text, verdict, token count and whether it ended on a stop token). A problem whose prompt plus
evaluation.max_new_tokens exceeds the model's max_position_embeddings is refused before the model loads, named by
file:line with its prompt length.

A response is a format error when it never ended (ran into max_new_tokens) or holds no answer the verifier can
read (as `phi_jax.rewards.verifier.readable_answer` reads it: extracted within the verifier's answer length and
passing its screen); one that never ended is incorrect too, whatever answer it wrote before the cut. Intervals are
95% normal intervals over problems: a problem's score is its mean over the n samples, so samples of one problem
are not counted as independent evidence.

Sampled outputs depend on `evaluation.seed` and not on the batch size or device count: each problem's samples draw
with keys of their own (`generate_text`), so another `evaluation.batch_size`, or a mesh that rounds it up to a
multiple of its data x fsdp devices, gives the same samples up to float rounding (a batch of other prompt widths
can change a logit in its last bits, and with it, rarely, a draw). summary.json records the batch size used
(`batch_size`) and that device count (`data_parallel_devices`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  (gin configurables shared by every entry script)
import gin_bindings  # noqa: E402
import run_files  # noqa: E402
import rollouts  # noqa: E402
from phi_jax import rewards  # noqa: E402
from phi_jax.data.chat import stop_token_ids  # noqa: E402
from phi_jax.rewards.verifier import readable_answer  # noqa: E402
from phi_jax.sampling import SamplingConfig, generate_text  # noqa: E402
from phi_jax.sharding import distributed  # noqa: E402

log = logging.getLogger("phi_jax")

VerifyFn = Callable[[Sequence[str], Sequence[str]], list[bool]]

Z_95 = 1.959964


@gin.configurable("evaluation")
@gin_bindings.typed("evaluation")
def eval_settings(num_samples: int = 3, temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0,
                  max_new_tokens: int = 32768, greedy: bool = True, pass_k: int | Sequence[int] = (1,),
                  batch_size: int = 64, seed: int = 0, verify_timeout_s: Optional[float] = None) -> dict[str, Any]:
  """`num_samples` sampled runs at `temperature` / `top_p` / `top_k` (plus one greedy run when `greedy`);
  `pass_k`: the k of the pass@k estimates (each at most num_samples); `batch_size`: rows generated at once."""
  if num_samples < 1:
    raise ValueError(f"evaluation.num_samples={num_samples} must be at least 1")
  if batch_size < 1:
    raise ValueError(f"evaluation.batch_size={batch_size} must be at least 1 (rows generated at once)")
  pass_k = (pass_k,) if isinstance(pass_k, int) else tuple(pass_k)  # evaluation.pass_k=3: one k
  if not all(isinstance(k, int) and not isinstance(k, bool) for k in pass_k):
    raise ValueError(f"evaluation.pass_k={list(pass_k)}: every k must be a whole number (3, not 3.0)")
  if any(k < 1 or k > num_samples for k in pass_k):
    raise ValueError(f"evaluation.pass_k={list(pass_k)}: every k must lie in [1, num_samples={num_samples}]")
  rollouts.check_verify_timeout("evaluation.verify_timeout_s", verify_timeout_s)
  return dict(sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k),
              num_samples=num_samples, greedy=greedy, pass_k=tuple(pass_k), batch_size=batch_size, seed=seed,
              verify_timeout_s=verify_timeout_s)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
  """(mean, low, high): the mean and its 95% normal interval (zero width for fewer than two values)."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean()) if len(values) else float("nan")
  half = Z_95 * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
  return mean, mean - half, mean + half


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
  if not 0 < k <= n or not 0 <= c <= n:
    raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n; got n={n}, c={c}, k={k}: k samples are drawn from "
                     "the n of each problem")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def format_error(output: dict) -> bool:
  """Ran into the token limit, or gave no answer the module-wide verifier can read (`readable_answer`, the rule it
  scores by: an answer it cannot read scores incorrect whatever it says)."""
  return not output["finished"] or readable_answer(output["text"]) is None


def evaluate(params, config, tokenizer, problems: Sequence[dict], *, settings: dict, mesh=None,
             system_prompt: Optional[str] = None,
             verify_fn: Optional[VerifyFn] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Generates, verifies and scores; returns (summary, per-problem items). The summary records the batch size used
  (`settings["batch_size"]` rounded up to a multiple of the mesh's data x fsdp devices) and that device count.

  Args:
    params, config, tokenizer: the model (e.g. `rollouts.load_policy`).
    problems: [{"prompt": str | messages, "answer": str}] (see `rollouts.read_problems`).
    settings: `eval_settings()`.
    mesh, system_prompt: as for `phi_jax.sampling.generate_text`.
    verify_fn: (completions, golds) -> verdicts; default the math verifier with `settings["verify_timeout_s"]`.
  """
  check_not_empty(problems)
  if verify_fn is None:
    verify_fn = functools.partial(rewards.verify_batch, timeout_s=settings.get("verify_timeout_s"))
  n, prompts = settings["num_samples"], [p["prompt"] for p in problems]
  rng = jax.random.key(settings["seed"])
  # Batches split over the mesh's data x fsdp devices: `batch_size` rounded up to a multiple of them.
  rows = rollouts.data_parallel_devices(mesh)
  settings = dict(settings, batch_size=math.ceil(settings["batch_size"] / rows) * rows)
  runs = {}
  if settings["greedy"]:
    greedy = SamplingConfig(**{**_fields(settings["sampling"]), "temperature": 0.0})
    runs["greedy"] = [[o] for o in generate_text(params, config, tokenizer, prompts, rng, greedy, mesh=mesh,
                                                 system_prompt=system_prompt, batch_size=settings["batch_size"])]
  repeated = [prompt for prompt in prompts for _ in range(n)]
  sampled = generate_text(params, config, tokenizer, repeated, jax.random.fold_in(rng, 1), settings["sampling"],
                          mesh=mesh, system_prompt=system_prompt, batch_size=settings["batch_size"])
  runs["samples"] = [sampled[i * n:(i + 1) * n] for i in range(len(problems))]
  for outputs in runs.values():
    flat = [(o, p["answer"]) for p, row in zip(problems, outputs) for o in row]
    verdicts = verify_fn([o["text"] for o, _ in flat], [answer for _, answer in flat])
    for (o, _), ok in zip(flat, verdicts):
      # A response cut at max_new_tokens is not a solution, whatever it wrote before the cut (as for the rewards
      # and rollout DPO's pairs): a model that answers and then never ends its turn would score as right.
      o["correct"] = bool(ok) and bool(o["finished"])
      o["format_error"] = format_error(o)

  items = []
  for i, problem in enumerate(problems):
    item = {"prompt": problem["prompt"], "answer": problem["answer"]}
    for name, outputs in runs.items():
      item[name] = [{k: o[k] for k in ("text", "correct", "num_tokens", "finished", "format_error")}
                    for o in outputs[i]]
    item["score"] = float(np.mean([o["correct"] for o in item["samples"]]))
    items.append(item)
  summary = dict(summarize(items, settings["pass_k"]), batch_size=settings["batch_size"], data_parallel_devices=rows)
  return summary, items


def check_not_empty(problems: Sequence[dict]) -> None:
  """An empty list has no accuracy to report (its mean and intervals would be NaN, its per-run figures missing)."""
  if not problems:
    raise ValueError("no problems to evaluate: give at least one problem (check the problems file and --limit)")


def summarize(items: Sequence[dict], pass_k: Sequence[int] = (1,)) -> dict[str, Any]:
  """The summary of `evaluate`'s items (see the module docstring for the definitions)."""
  check_not_empty(items)
  samples = [o for item in items for o in item["samples"]]
  n = len(items[0]["samples"])
  score, low, high = mean_ci([item["score"] for item in items])
  lengths = np.asarray([o["num_tokens"] for o in samples], np.float64)
  summary = {
      "num_problems": len(items), "num_samples": n,
      "accuracy": score, "accuracy_ci95": [low, high],
      "accuracy_per_run": [float(np.mean([item["samples"][r]["correct"] for item in items])) for r in range(n)],
      "pass_at_k": {str(k): float(np.mean([pass_at_k(n, sum(o["correct"] for o in item["samples"]), k)
                                           for item in items])) for k in pass_k},
      "response_tokens_mean": float(lengths.mean()), "response_tokens_median": float(np.median(lengths)),
      "response_tokens_max": int(lengths.max()),
      "format_error_rate": float(np.mean([o["format_error"] for o in samples])),
      "unfinished_rate": float(np.mean([not o["finished"] for o in samples])),
      "think_format_rate": float(np.mean([rewards.think_format_ok(o["text"], rewards.default_config().think)
                                          for o in samples])),
  }
  if "greedy" in items[0]:
    greedy, g_low, g_high = mean_ci([float(item["greedy"][0]["correct"]) for item in items])
    summary.update(greedy_accuracy=greedy, greedy_accuracy_ci95=[g_low, g_high],
                   greedy_response_tokens_mean=float(np.mean([item["greedy"][0]["num_tokens"] for item in items])),
                   greedy_format_error_rate=float(np.mean([item["greedy"][0]["format_error"] for item in items])))
  return summary


def paired_difference(after: Sequence[dict], before: Sequence[dict], key: str = "score") -> dict[str, float]:
  """The change of a per-problem score between two evaluations of the same problems, with its 95% interval.

  Pairing by problem removes the between-problem variance, so the interval is much narrower than the difference of
  two independent intervals.
  """
  if [i["answer"] for i in after] != [i["answer"] for i in before]:
    raise ValueError("paired_difference needs two evaluations of the same problems in the same order")
  value = (lambda i: i[key]) if key == "score" else (lambda i: float(i[key][0]["correct"]))
  mean, low, high = mean_ci([value(a) - value(b) for a, b in zip(after, before)])
  return {"delta": mean, "ci95": [low, high]}


def write_results(out_dir: str, summary: dict, items: Sequence[dict]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  run_files.write_results_atomically(os.path.join(out_dir, "items.jsonl"), items, os.path.join(out_dir, "summary.json"),
                                     summary)


def read_items(out_dir: str) -> list[dict]:
  with open(os.path.join(out_dir, "items.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _fields(sampling: SamplingConfig) -> dict:
  return {k: getattr(sampling, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "stop_token_ids")}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  run_files.add_checkpoint_args(parser)
  parser.add_argument("--problems", required=True, help="JSONL of {problem, answer}")
  parser.add_argument("--out", required=True, help="directory for summary.json and items.jsonl")
  parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
  args = parser.parse_args(argv)
  if args.limit is not None and args.limit < 1:
    parser.error(f"--limit={args.limit}: give the number of problems to evaluate (1 or more)")
  return args


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Before any use of the devices: on a cluster every host is one process of the run, so process 0 alone
  # writes the results (not each host as a single process of its own).
  distributed.initialize()
  gin_bindings.parse_gin_for_checkpoint(args.init_from, args.gin_file, args.gin_param)
  gin_bindings.warn_unread_bindings(
      args.gin_param, ("rollouts", "grpo", "dpo", "optimizer"), "eval.py",
      "its sampling and verification settings are evaluation.* (e.g. evaluation.temperature)")
  # What can be refused is refused before the model loads and generates (minutes to hours).
  run_files.check_output_path("--out", args.out, directory=True)
  settings = eval_settings()
  the_mesh = common.mesh()
  problems = rollouts.read_problems(args.problems)[:args.limit]  # an empty file is a DataError ("empty dataset")
  model_config = rollouts.policy_config(args.init_from)[0]
  common.check_new_tokens("evaluation.max_new_tokens", settings["sampling"].max_new_tokens, model_config)
  tokenizer = rollouts.policy_tokenizer(args.init_from)
  rollouts.check_prompts_fit(args.problems, problems, tokenizer, model_config, binding="evaluation.max_new_tokens",
                             max_new_tokens=settings["sampling"].max_new_tokens,
                             system_prompt=common.data()["system_prompt"], limit_flag=True)
  config, params, tokenizer = rollouts.load_policy(args.init_from, the_mesh, tokenizer)
  summary, items = evaluate(params, config, tokenizer, problems, settings=settings, mesh=the_mesh,
                            system_prompt=common.data()["system_prompt"])
  # What the figures were measured under, so two evaluations of the same run can be told apart.
  summary = dict(summary, init_from=args.init_from, problems_file=args.problems, limit=args.limit,
                 system_prompt=common.data()["system_prompt"], seed=settings["seed"], greedy=settings["greedy"],
                 num_samples=settings["num_samples"],
                 # The stop tokens generation used: the chat format's own when the settings name none.
                 sampling=dict(_fields(settings["sampling"]), stop_token_ids=list(
                     settings["sampling"].stop_token_ids or stop_token_ids(tokenizer))))
  if jax.process_index() == 0:
    write_results(args.out, summary, items)
  print(json.dumps(summary, indent=1))
  return summary


if __name__ == "__main__":
  main()
