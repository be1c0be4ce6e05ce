"""Rollout preference pairs for DPO (stage 3 of Phi-4-mini-reasoning): sample k answers per problem, verify, pair.

    python experiments/rollouts.py --init_from=runs/sft_tiny --problems=experiments/data/tiny_traces_train.jsonl \
        --k=8 --out=runs/rollouts_tiny/pairs.jsonl
    python experiments/rollouts.py --init_from=/ckpt/phi-4-mini-reasoning-sft --problems=math.jsonl --k=8 \
        --out=pairs.jsonl --gin_param='rollouts.max_new_tokens=16384' --gin_param='rollouts.temperature=0.8'

`--init_from` is a previous run's workdir (its params/; its config.gin supplies the model and tokenizer settings,
and --gin_file / --gin_param apply on top, as in eval.py; a tokenizer other than the one the run trained with, the
copy it keeps in W/tokenizer, is refused as a next stage refuses it, see
`tokenizer_setup.check_tokenizer_matches_start`) or a transformers checkpoint directory (its config.json and
tokenizer files; a directory without them, as `phi_jax.save_hf` writes it, takes the bound `data.tokenizer`).
Problems are JSONL records `{"problem": str, "answer": str}`, or conversations `{"messages": [...]}` whose last
assistant turn holds the reference solution and whose earlier turns are the prompt (so SFT files serve as problem
sets); its final answer (in `\\boxed{}`, on a "####" line or after "The answer is", after any `</think>`) is the
gold. A prompt ending with an assistant message is refused: generation answers it in a new turn, a DPO pair would
continue that message.

Every rollout is checked with `phi_jax.rewards.verify_batch` against the problem's answer; a rollout that never
emitted its end-of-turn token counts as incorrect, since a pair would teach it an ending it never produced. Each
problem with at least one correct and one incorrect rollout gives one pair `{"prompt", "chosen", "rejected",
"answer"}` (chosen a correct rollout, rejected an incorrect one, both drawn with the seed; the rejected one from
the incorrect rollouts that ended on their own when there are any), written to --out with each side's sampled ids
(`chosen_token_ids`, `rejected_token_ids`: the stop token included where the rollout ended on one), the
`tokenizer_id` they are of and the data.system_prompt the prompt was rendered with (`sampled_system_prompt`), so
that the DPO stage trains the ids sampled, after the prompt they answered (it refuses another
data.system_prompt); the counts go to
`<out stem>.summary.json`: prompts, rollouts, accuracy, pairs, prompts_all_correct, prompts_all_wrong,
rollouts_unfinished, pairs_rejected_unfinished. Train on the pairs with experiments/configs/dpo_tiny.gin.

The rollouts depend on --seed and not on the batch size or device count: each rollout draws with a key of its own
(`generate_text`), so another batch (`rollouts.batch_size`, or the power of two that holds every rollout where that
is smaller, rounded up to a multiple of the mesh's data x fsdp devices) gives the same rollouts up to float rounding
(rarely, a logit's last bits change a draw). The summary records the batch used (`batch_size`) and that device count
(`data_parallel_devices`), with k, the seed and the sampling settings; and, as the pairs hold the bare problems, the
policy (`init_from`), the data.system_prompt the prompts were rendered with (`system_prompt`) and the stop tokens
generation used (`stop_token_ids`: the chat format's when rollouts.stop_token_ids names none).

Refused before the model loads: greedy sampling (rollouts.temperature=0 or rollouts.top_k=1), whose k rollouts of a
problem are identical and never make a pair, and a problem whose prompt plus rollouts.max_new_tokens exceeds the
model's max_position_embeddings (named by file:line with its prompt length).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  (gin configurables shared by every entry script)
import dpo_reference  # noqa: E402
import gin_bindings  # noqa: E402
import run_files  # noqa: E402
import starting_params  # noqa: E402
import tokenizer_setup  # noqa: E402
from phi_jax import rewards  # noqa: E402
from phi_jax.data.chat import render_prompt, stop_token_ids  # noqa: E402
from phi_jax.data import preference  # noqa: E402
from phi_jax.data.preference import prompt_messages  # noqa: E402
from phi_jax.data.sources import DataError, open_source  # noqa: E402
from phi_jax.hf.tokenizer import build_tiny_tokenizer, load_tokenizer  # noqa: E402
from phi_jax.sampling import SamplingConfig, generate_text  # noqa: E402
from phi_jax.sharding import distributed  # noqa: E402

log = logging.getLogger("phi_jax")

VerifyFn = Callable[[Sequence[str], Sequence[str]], list[bool]]


@gin.configurable("rollouts")
@gin_bindings.typed("rollouts")
def rollout_settings(max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     stop_token_ids: Sequence[int] = (), batch_size: int = 64,
                     verify_timeout_s: Optional[float] = None) -> dict[str, Any]:
  """Sampling settings; `stop_token_ids` empty means the chat format's own; `batch_size` is the number of rollouts
  generated at once."""
  if batch_size < 1:
    raise ValueError(f"rollouts.batch_size={batch_size} must be at least 1 (rollouts generated at once)")
  check_verify_timeout("rollouts.verify_timeout_s", verify_timeout_s)
  return dict(sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, stop_token_ids=tuple(stop_token_ids)),
              batch_size=batch_size, verify_timeout_s=verify_timeout_s)


def check_sampling_varies(sampling: SamplingConfig, k: int, k_name: str = "--k") -> None:
  """Refuses greedy sampling of several rollouts per problem: they would all be the same answer, all right or all
  wrong, so no problem could give a pair (found only after every rollout was generated). `k_name` is the setting
  that gave `k` (the recipe's is recipe.rollout_k)."""
  greedy = ([f"rollouts.temperature={sampling.temperature}"] if np.all(np.asarray(sampling.temperature) == 0)
            else []) + ([f"rollouts.top_k={sampling.top_k}"] if sampling.top_k == 1 else [])
  if k > 1 and greedy:
    raise ValueError(f"{' and '.join(greedy)} with {k_name}={k}: the {k} rollouts of a problem would be identical "
                     "(greedy decoding), all right or all wrong, and make no pair; set rollouts.temperature > 0 (e.g. "
                     "1.0) and rollouts.top_k to 0 (off) or more than 1")


def check_verify_timeout(binding: str, value: Optional[float]) -> None:
  """Refuses a per-answer verification limit that is not a finite number of seconds > 0 with the settings: the
  verifier refuses it too, but only at the first verification, after every sample was generated."""
  if value is not None and not (math.isfinite(value) and value > 0):
    raise ValueError(f"{binding}={value} must be a finite number of seconds > 0 (the wall-clock limit per answer); "
                     "set it so, or leave it unset for the verifier's own "
                     f"(VerifierConfig.timeout_s={rewards.default_config().timeout_s})")


def read_problems(path: str) -> list[dict[str, Any]]:
  """[{"prompt": str | messages, "answer": str}] from a problems file; a bad record raises DataError (file:line), and
  gold answers the verifier cannot grade against are named in a warning."""
  source = open_source(path)
  problems, ungradable = [], []
  for index in range(len(source)):
    raw = source[index]
    if raw["error"] is not None:
      raise DataError(raw["where"], *raw["error"])
    problem, bad = _problem(raw["data"])
    if bad is not None:
      raise DataError(raw["where"], *bad)
    problems.append(problem)
    if (why := rewards.gold_problem(problem["answer"])) is not None:
      ungradable.append(f"{raw['where']} ({problem['answer'][:40]!r}: {why})")
  if ungradable:  # kept, so that an evaluation's denominator stays the benchmark's
    log.warning("%d problem(s) of %s have a gold answer the verifier cannot grade against, so every answer to them "
                "scores incorrect: %s%s", len(ungradable), path, "; ".join(ungradable[:_NAMED_PROBLEMS]),
                f" and {len(ungradable) - _NAMED_PROBLEMS} more" if len(ungradable) > _NAMED_PROBLEMS else "")
  return problems


def _problem(data: Any) -> tuple[Optional[dict[str, Any]], Optional[tuple[str, str]]]:
  if not isinstance(data, dict):
    return None, ("not an object", f"got {type(data).__name__}")
  if data.get("messages") is not None:
    messages = data["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
      return None, ("mistyped field", "'messages' must be a list of objects")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
      return None, ("no assistant turn", "a conversation needs a prompt and an assistant turn with the answer")
    if not isinstance(messages[last].get("content"), str):
      return None, ("mistyped field", f"message {last} 'content' is not a string")
    if messages[last - 1].get("role") == "assistant":
      # Generation opens a new assistant turn after it, while a DPO pair continues a prompt's final assistant
      # message in the same turn: the rows trained would not be the ones sampled.
      return None, ("prompt ends in an assistant turn", f"message {last - 1}, before the last assistant turn, is "
                    "the assistant's; end the prompt with a user turn, or merge the assistant messages into one")
    prompt, bad = prompt_messages(messages[:last])  # roles and contents checked now, not after the model loads
    if bad is not None:
      return None, bad
    # The gold is the reference solution's final answer, read as a completion's is (after its </think>, from its
    # box or answer label), not the whole solution, whose thoughts may hold other boxed numbers.
    answer = rewards.extract_answer(messages[last]["content"], marked_only=True)  # not a number from its working
    if answer is None:
      return None, ("no answer", f"message {last}, the last assistant turn, marks no final answer to grade against "
                    "(a \\boxed{...}, a '#### N' line or 'The answer is ...', after any </think>); give 'problem' "
                    "and 'answer' instead")
    return {"prompt": prompt, "answer": answer}, None
  for key in ("problem", "answer"):
    if data.get(key) is None:
      return None, ("missing field", f"'{key}' is missing (or give 'messages')")
  if not isinstance(data["problem"], str):
    return None, ("mistyped field", f"'problem' is {type(data['problem']).__name__}, expected str")
  answer = data["answer"]
  # A number reads as its text, as in GRPO's prompt files (a bool is no answer to compare).
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    return None, ("mistyped field", f"'answer' is {type(answer).__name__}, expected a string or a number")
  if not str(answer).strip():
    return None, ("empty answer", "'answer' is empty: no rollout could be graded against it")
  return {"prompt": data["problem"], "answer": str(answer)}, None


def sample_rollouts(params, config, tokenizer, prompts: Sequence[Any], *, k: int, sampling: SamplingConfig, rng,
                    batch_size: int = 64, mesh=None, system_prompt: Optional[str] = None) -> list[list[dict]]:
  """k `generate_text` results per prompt, [len(prompts)][k]; rows are bucketed into batches of `batch_size`."""
  if isinstance(prompts, str):
    raise ValueError("prompts must be a list of prompts (questions or conversations), got one str: pass [prompt]")
  repeated = [prompt for prompt in prompts for _ in range(k)]
  outputs = generate_text(params, config, tokenizer, repeated, rng, sampling, mesh=mesh, system_prompt=system_prompt,
                          batch_size=rollout_batch_size(len(repeated), batch_size, mesh))
  return [outputs[i * k:(i + 1) * k] for i in range(len(prompts))]


def data_parallel_devices(mesh) -> int:
  """The devices a batch's rows are split over (the mesh's data x fsdp axes); 1 without a mesh."""
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def rollout_batch_size(num_rows: int, batch_size: int, mesh=None) -> int:
  """The batch `sample_rollouts` generates in: `batch_size`, or the power of two that holds `num_rows` where that is
  smaller, rounded up to a multiple of `data_parallel_devices(mesh)`."""
  rows = data_parallel_devices(mesh)
  return math.ceil(min(batch_size, 1 << (num_rows - 1).bit_length()) / rows) * rows


def make_pairs(problems: Sequence[dict], rollouts: Sequence[Sequence[dict]], correct: Sequence[Sequence[bool]], *,
               seed: int) -> tuple[list[dict], dict[str, Any]]:
  """One pair per problem with both a correct and an incorrect rollout; (pairs, counts).

  The rejected rollout is drawn from the incorrect ones that ended on their own when there are any: one cut off at
  max_new_tokens would be trained with an ending it never produced, and its pair is often too long for seq_len.
  """
  rng = random.Random(seed)
  pairs, all_correct, all_wrong, rejected_unfinished = [], 0, 0, 0
  for problem, outputs, verdicts in zip(problems, rollouts, correct):
    good = [o for o, ok in zip(outputs, verdicts) if ok]
    bad = [o for o, ok in zip(outputs, verdicts) if not ok]
    if not bad:
      all_correct += 1
    elif not good:
      all_wrong += 1
    else:
      ended = [o for o in bad if o["finished"]]
      rejected = rng.choice(ended or bad)
      rejected_unfinished += not rejected["finished"]
      chosen = rng.choice(good)
      pairs.append({"prompt": problem["prompt"], "chosen": chosen["text"], "rejected": rejected["text"],
                    "answer": problem["answer"], **_sampled_ids(chosen, rejected)})
  num_rollouts = sum(len(v) for v in correct)
  counts = {"prompts": len(problems), "rollouts": num_rollouts,
            "accuracy": sum(map(sum, correct)) / max(num_rollouts, 1), "pairs": len(pairs),
            "prompts_all_correct": all_correct, "prompts_all_wrong": all_wrong,
            "rollouts_unfinished": sum(not o["finished"] for outputs in rollouts for o in outputs),
            "pairs_rejected_unfinished": rejected_unfinished}
  return pairs, counts


def _sampled_ids(chosen: dict, rejected: dict) -> dict[str, list[int]]:
  """The sides' sampled ids (`generate_text`'s token_ids, the stop token included where a rollout ended on one),
  which the DPO stage trains: decoded and encoded again, text gives other ids (split digits merge, an invalid byte
  reads as U+FFFD, an <|endoftext|> stop as the end-of-turn token). Outputs without ids give none."""
  if "token_ids" not in chosen or "token_ids" not in rejected:
    return {}
  return {"chosen_token_ids": list(chosen["token_ids"]), "rejected_token_ids": list(rejected["token_ids"])}


def summary_path(out: str) -> str:
  return dpo_reference.pairs_summary_path(out)


def sampling_record(sampling: SamplingConfig) -> dict[str, Any]:
  """The sampling settings the pairs depend on, as their summary records them."""
  return {"temperature": float(sampling.temperature), "top_p": sampling.top_p, "top_k": sampling.top_k,
          "max_new_tokens": sampling.max_new_tokens}


def rollout_pairs(params, config, tokenizer, problems_path: str, out: str, *, k: int, sampling: SamplingConfig,
                  seed: int = 0, batch_size: int = 64, mesh=None, system_prompt: Optional[str] = None,
                  verify_timeout_s: Optional[float] = None, verify_fn: Optional[VerifyFn] = None,
                  init_from: Optional[str] = None) -> dict[str, Any]:
  """Samples, verifies and writes the pairs (JSONL) and the summary next to them; returns the summary. `verify_fn`
  (completions, golds) -> verdicts defaults to the math verifier with `verify_timeout_s`; `init_from`, where the
  policy was read from, is recorded in the summary."""
  if verify_fn is None:
    verify_fn = functools.partial(rewards.verify_batch, timeout_s=verify_timeout_s)
  if k < 2:
    raise ValueError(f"k={k}: a pair needs at least two rollouts per problem")
  check_sampling_varies(sampling, k)
  problems = read_problems(problems_path)
  rollouts = sample_rollouts(params, config, tokenizer, [p["prompt"] for p in problems], k=k, sampling=sampling,
                             rng=jax.random.key(seed), batch_size=batch_size, mesh=mesh, system_prompt=system_prompt)
  flat = [(o, p["answer"]) for p, outputs in zip(problems, rollouts) for o in outputs]
  verdicts = verify_fn([o["text"] for o, _ in flat], [answer for _, answer in flat])
  verdicts = [bool(v) and o["finished"] for v, (o, _) in zip(verdicts, flat)]
  correct = [verdicts[i * k:(i + 1) * k] for i in range(len(problems))]
  pairs, counts = make_pairs(problems, rollouts, correct, seed=seed)
  # Each pair says whose ids its completions are and the system prompt they were sampled after: the DPO stage trains
  # the ids with that tokenizer and refuses to render the prompts under another system prompt.
  if pairs:
    sampled_under = {"tokenizer_id": preference.tokenizer_id(tokenizer), "sampled_system_prompt": system_prompt}
    pairs = [dict(pair, **sampled_under) for pair in pairs]
  summary = dict(counts, k=k, seed=seed, problems_file=problems_path, pairs_file=out,
                 sampling=sampling_record(sampling), batch_size=rollout_batch_size(len(flat), batch_size, mesh),
                 data_parallel_devices=data_parallel_devices(mesh),
                 # The pairs hold the bare problems: what they were rendered, stopped and sampled with is told here.
                 # The stop tokens are those generation used, the chat format's when the settings name none.
                 stop_token_ids=list(sampling.stop_token_ids or stop_token_ids(tokenizer)),
                 system_prompt=system_prompt, init_from=init_from)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    run_files.write_results_atomically(out, pairs, summary_path(out), summary)
  return summary


def policy_config(init_from: str):
  """(model config, model.hf_path) of a run workdir or a transformers checkpoint directory, read without weights."""
  run_files.check_policy_dir(init_from)
  if not os.path.isdir(os.path.join(init_from, "params")):
    return common.model(hf_path=init_from)
  config, hf_path = common.model()
  return starting_params.as_trained(config, init_from), hf_path


def load_policy(init_from: str, the_mesh, tokenizer=None):
  """(config, params, tokenizer) of a run workdir (params/) or a transformers checkpoint directory; `tokenizer`, when
  given, is the one `policy_tokenizer(init_from)` returned, not read and checked again."""
  config, hf_path = policy_config(init_from)
  if tokenizer is None:
    tokenizer = policy_tokenizer(init_from)
  if os.path.isdir(os.path.join(init_from, "params")):
    params = starting_params.params_loader(config, hf_path, init_from, the_mesh)()
  else:
    params = starting_params.params_loader(config, init_from, None, the_mesh)()
  return config, params, tokenizer


def policy_tokenizer(init_from: str):
  """The tokenizer of a run workdir or a transformers checkpoint directory, checked against its model, without the
  weights (prompts can be measured before they load)."""
  config, _ = policy_config(init_from)
  if os.path.isdir(os.path.join(init_from, "params")):
    spec = common.data()["tokenizer"]
    tokenizer = run_tokenizer(spec, init_from)
    # Training's policy, against the copy the run kept (W/tokenizer): files replaced at its config's path since
    # are refused, a deliberate change of chat template (a recipe stage's binding) is logged.
    tokenizer_setup.check_tokenizer_matches_start(tokenizer, spec, "--init_from", init_from)
    return tokenizer
  tokenizer = checkpoint_tokenizer(init_from)
  if len(tokenizer) > config.vocab_size and _has_tokenizer_files(init_from):
    raise ValueError(f"--init_from={init_from!r}: its own tokenizer has {len(tokenizer)} tokens but its embedding "
                     f"table {config.vocab_size} rows (tokens added without resizing the embeddings?): remove the "
                     "extra tokens from its tokenizer files, or remove those files and bind data.tokenizer")
  tokenizer_setup.check_vocab(config, tokenizer, "--init_from", init_from)  # data.tokenizer may be another model's
  return tokenizer


# Over-long problems an error names; the rest are counted.
_NAMED_PROBLEMS = 5


def check_prompts_fit(problems_path: str, problems: Sequence[dict], tokenizer, config, *, binding: str,
                      max_new_tokens: int, system_prompt: Optional[str] = None, limit_flag: bool = False,
                      times: int = 1) -> None:
  """Refuses problems whose rendered prompt plus `times` x `max_new_tokens` (the value of gin `binding`) exceeds the
  model's max_position_embeddings, naming the first few by file:line with their prompt lengths: they would be
  generated at positions never trained and scored like any other. `limit_flag`: the command has --limit to stop
  before them. `times`: 2 where a completion is continued by as many tokens again (pts_pairs.py)."""
  room = config.max_position_embeddings - times * max_new_tokens
  lengths = [len(render_prompt(tokenizer, p["prompt"], system_prompt=system_prompt)) for p in problems]
  over = [i for i, length in enumerate(lengths) if length > room]
  if not over:
    return
  source = open_source(problems_path)
  named = ", ".join(f"{source[i]['where']} ({lengths[i]} prompt tokens)" for i in over[:_NAMED_PROBLEMS])
  more = f" and {len(over) - _NAMED_PROBLEMS} more" if len(over) > _NAMED_PROBLEMS else ""
  # Lowering the budget helps only where every such prompt leaves room for at least one new token.
  longest = max(lengths[i] for i in over)
  options = ([f"set --gin_param='{binding}=N' with N <= {(config.max_position_embeddings - longest) // times}"]
             if longest + times <= config.max_position_embeddings else [])
  options += [f"pass --limit={over[0]} to keep only the problems before the first"] if limit_flag and over[0] else []
  options.append(f"drop them from {problems_path}")
  advice = ", ".join(options[:-1]) + (", or " if len(options) > 1 else "") + options[-1]
  raise ValueError(f"{len(over)} problem(s) do not fit the model's max_position_embeddings="
                   f"{config.max_position_embeddings} with {binding}={max_new_tokens}"
                   + (f" taken {times} times" if times > 1 else "") + " (a prompt may have at most "
                   f"{room} tokens): {named}{more}. {advice[0].upper()}{advice[1:]}")


def run_tokenizer(spec: str, workdir: str):
  """The tokenizer data.tokenizer=`spec` names for reading the run in `workdir`, to be compared with the run's copy
  (W/tokenizer). A "tiny:" one of another chat format than the run's is built aside, not over the run's: for a read
  that is a deliberate change of template, as a tokenizer directory's is. One of another token family is refused."""
  copy = os.path.join(workdir, "tokenizer")
  if spec.startswith("tiny:"):
    chat_format = tokenizer_setup.tiny_chat_format(spec)
    trained = tokenizer_setup._tiny_tokenizer_format(copy)  # pylint: disable=protected-access
    if trained not in (None, chat_format):
      tokenizer_setup.check_token_family(spec, chat_format, trained, f"the run in {workdir}",
                                         "To eval, roll out or export it,")
      with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(tmp, chat_format=chat_format)
        return load_tokenizer(tmp)
  elif not os.path.exists(spec) and os.path.isdir(copy):
    raise FileNotFoundError(f"data.tokenizer={spec!r} (from {workdir}'s config.gin or a binding) does not exist; the "
                            f"run keeps a copy of the tokenizer it trained with: set "
                            f"--gin_param='data.tokenizer=\"{copy}\"'")
  return tokenizer_setup.get_tokenizer(spec, workdir)


# Files any of which makes a directory a tokenizer transformers can load (fast, SentencePiece or BPE vocab files).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer_files(hf_dir: str) -> bool:
  return any(os.path.isfile(os.path.join(hf_dir, name)) for name in _TOKENIZER_FILES)


def checkpoint_tokenizer(hf_dir: str):
  """A transformers checkpoint's own tokenizer, or the bound data.tokenizer where the directory has no tokenizer
  files (phi_jax.save_hf writes the weights and config alone)."""
  bound = gin_bindings.bound_or_none("data.tokenizer")
  if _has_tokenizer_files(hf_dir):
    if bound is not None:
      log.warning("--init_from=%s has tokenizer files of its own: using them, not data.tokenizer=%r (remove the "
                  "binding, or the files, to silence this)", hf_dir, bound)
    return load_tokenizer(hf_dir)
  if bound is None:
    raise ValueError(f"--init_from={hf_dir!r} has no tokenizer files (phi_jax.save_hf writes none): give the "
                     "tokenizer the model was trained with, --gin_param='data.tokenizer=\"DIR\"' (a tokenizer "
                     "directory, or 'tiny:<chat format>' for the test tokenizer)")
  if bound.startswith("tiny:"):
    # Built apart from the checkpoint, which stays as it was given (every process builds the same one).
    with tempfile.TemporaryDirectory() as tmp:
      return build_tiny_tokenizer(tmp, chat_format=tokenizer_setup.tiny_chat_format(bound))
  return load_tokenizer(bound)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  run_files.add_checkpoint_args(parser)
  parser.add_argument("--problems", required=True, help="JSONL of {problem, answer} (or conversations)")
  parser.add_argument("--k", type=int, default=8, help="rollouts per problem")
  parser.add_argument("--out", required=True, help="pairs JSONL to write; the summary goes next to it")
  parser.add_argument("--seed", type=int, default=0, help="sampling and pair-choice seed")
  return parser.parse_args(argv)


def start_pairs_tool(args, tool: str) -> None:
  """What a tool that writes DPO pairs from a policy (rollouts.py, pts_pairs.py) does first: logs to stdout, joins
  the other processes, reads the policy's config.gin with the command line's files and bindings on top, and checks
  --out, before the model loads and generates (minutes to hours)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-restore INFO lines
  # Before any use of the devices: on a cluster every host is one process of the run, so process 0 alone
  # writes the results (not each host as a single process of its own).
  distributed.initialize()
  gin_bindings.parse_gin_for_checkpoint(args.init_from, args.gin_file, args.gin_param)
  gin_bindings.warn_unread_bindings(args.gin_param, ("grpo", "dpo", "optimizer"), tool,
                                    "its sampling settings are rollouts.* (e.g. rollouts.temperature)")
  run_files.check_output_path("--out", args.out, directory=False)
  if not args.out.endswith((".jsonl", ".ndjson", ".json")):  # the DPO stage reads pair files by their extension
    raise ValueError(f"--out={args.out}: name the pairs file *.jsonl (e.g. {args.out}.jsonl), the JSON-lines "
                     "extension the DPO stage reads it by")


def main(argv=None):
  args = parse_args(argv)
  start_pairs_tool(args, "rollouts.py")
  if args.k < 2:
    raise ValueError(f"--k={args.k}: a pair needs at least two rollouts per problem")
  settings = rollout_settings()
  check_sampling_varies(settings["sampling"], args.k)
  problems = read_problems(args.problems)
  model_config = policy_config(args.init_from)[0]
  common.check_new_tokens("rollouts.max_new_tokens", settings["sampling"].max_new_tokens, model_config)
  tokenizer = policy_tokenizer(args.init_from)
  check_prompts_fit(args.problems, problems, tokenizer, model_config, binding="rollouts.max_new_tokens",
                    max_new_tokens=settings["sampling"].max_new_tokens, system_prompt=common.data()["system_prompt"])
  the_mesh = common.mesh()
  config, params, tokenizer = load_policy(args.init_from, the_mesh, tokenizer)
  summary = rollout_pairs(params, config, tokenizer, args.problems, args.out, k=args.k, sampling=settings["sampling"],
                          seed=args.seed, batch_size=settings["batch_size"], mesh=the_mesh,
                          system_prompt=common.data()["system_prompt"], verify_timeout_s=settings["verify_timeout_s"],
                          init_from=args.init_from)
  log.info("rollouts: %s", json.dumps(summary))
  if summary["pairs"] == 0:
    log.warning("no preference pairs: every prompt's %d rollouts were all correct or all incorrect (accuracy %.3f), "
                "so %s is empty and DPO would have nothing to train on. Train the policy longer, raise --k, or use "
                "prompts nearer its ability", args.k, summary["accuracy"], args.out)
  return summary


if __name__ == "__main__":
  main()
