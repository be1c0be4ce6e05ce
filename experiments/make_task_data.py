"""Writes the data of every recipe stage for the embedded word-problem task, and its tiny tokenizer.

    python experiments/make_task_data.py --out_dir runs/demo/data [--seed 0] [--difficulty medium] [--max_value 40 ...]

Files under --out_dir (chat records are `{"messages": [...]}`, prompt records `{"problem", "answer"}`):
  base_train.jsonl   chat    stage 0: questions with direct answers, no reasoning (the base model)
  midtrain.jsonl     chat    stage 1: teacher traces, packed
  sft.jsonl          chat    stage 2: a curated subset of midtrain.jsonl, the problems with the most hard steps
  dpo_prompts.jsonl  prompt  stage 3: prompts whose rollouts are ranked correct over incorrect
  rl_prompts.jsonl   prompt  stage 4: prompts for GRPO with the verifier as reward
  valid.jsonl        prompt  held-out problems for your own tuning and comparisons (eval.py --problems=.../valid.jsonl,
                             or the recipe's recipe.eval_split="valid"); nothing here selects checkpoints on them
  test.jsonl         prompt  held-out problems for the reported accuracy (the recipe's default recipe.eval_split)
  tokenizer/         a tiny byte-level BPE in transformers format with the chat specials of --chat_format; the
                     phi-4 formats (phi-4, phi-4-reasoning) also hold <think> and </think> as single tokens, the
                     phi-4-mini ones (phi-4-mini, phi-4-mini-reasoning) have none and encode the tags as text
  manifest.json      counts, arguments, the split rules' version (word_problems.SPLIT_VERSION) and token lengths;
                     written last, and removed first when a re-run writes the other files

Training problems of different stages are distinct questions (sft.jsonl excepted, a subset of midtrain.jsonl), though
the same arithmetic may recur in other words; valid and test problems each have their own arithmetic and are drawn
from their own splits, disjoint from training by their arithmetic (with the sentences in any order). Having one
problem per arithmetic, valid and test hold more long problems than training does: there are fewer short
arithmetics to draw (with the recipe's task, about a quarter of test problems have two steps and three quarters
three, against half and half in training). The manifest's num_steps gives each file's mix; compare accuracies by
step count where the mix matters. Seeded: the same command writes the same files. Runs in seconds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi_jax.data.chat import render_messages  # noqa: E402
from phi_jax.hf.tokenizer import CHAT_FORMAT_FAMILY, build_tiny_tokenizer  # noqa: E402
from phi_jax.tasks import word_problems  # noqa: E402

# The training files, cut in this order from one pool of distinct train problems.
TRAIN_FILES = ("base_train", "midtrain", "dpo_prompts", "rl_prompts")


def _is_hard(step: word_problems.Step) -> bool:
  """A product, or a sum or difference that carries or borrows across the tens: the steps tiny models miss."""
  if step.op == "+":  # units digits: with two-digit operands (--max_operand above 9), 12 + 15 carries nothing
    return step.left % 10 + step.right % 10 >= 10
  if step.op == "-":
    return step.left % 10 < step.right % 10
  return True


def curate(problems: list[word_problems.Problem], n: int) -> list[word_problems.Problem]:
  """`n` of the problems, the ones with the most hard steps among those of the same length, in their original order.

  Each step count keeps its share of the subset: a model fine-tuned on the longest chains alone learns to write long
  chains for short problems too.
  """
  by_length = collections.defaultdict(list)
  for i, problem in enumerate(problems):
    by_length[problem.num_steps].append(i)
  rank = {}  # position among problems of the same length, hardest first, as a fraction of their number
  for indices in by_length.values():
    hardest_first = sorted(indices, key=lambda i: -sum(map(_is_hard, problems[i].steps)))
    rank.update((i, position / len(indices)) for position, i in enumerate(hardest_first))
  chosen = sorted(range(len(problems)), key=rank.__getitem__)[:n]
  return [problems[i] for i in sorted(chosen)]


def _write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _length_stats(tokenizer, texts: list[str]) -> dict:
  if not texts:  # every count 0: the tokenizer's batch call fails on an empty list
    return _stats([])
  return _stats([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


def _stats(lengths: list[int]) -> dict:
  if not lengths:  # a file asked for with 0 records
    return {"mean": 0.0, "max": 0}
  return {"mean": round(float(np.mean(lengths)), 1), "max": int(np.max(lengths))}


def check_counts(counts: dict[str, int]) -> None:
  """Refuses counts the files cannot hold: a negative one (list slicing would take other files' problems), or more
  SFT than mid-training problems (the SFT data is a subset of the mid-training data)."""
  negative = {name: n for name, n in counts.items() if n < 0}
  if negative:
    raise ValueError(f"task counts must be >= 0, got {negative}")
  if counts["sft"] > counts["midtrain"]:
    raise ValueError(f"sft={counts['sft']} exceeds midtrain={counts['midtrain']}: the SFT data is a subset of the "
                     "mid-training data")


class TooFewProblems(ValueError):
  """A count the difficulty has too few distinct problems for."""


def draw_problems(seed: int, difficulty: str, counts: dict[str, int], **overrides: int
                  ) -> tuple[dict[str, list[word_problems.Problem]], list[word_problems.Problem]]:
  """({"valid": [...], "test": [...]}, the training pool): every problem the files are cut from, written nowhere
  (the recipe draws them before --fresh deletes a workdir). Raises TooFewProblems for a count the difficulty
  cannot fill, and ValueError for bad counts or difficulty parameters."""
  check_counts(counts)
  level = dataclasses.replace(word_problems.get_difficulty(difficulty), **overrides)

  def generate(name: str, n: int, split: str, **kwargs) -> list[word_problems.Problem]:
    try:
      return word_problems.generate(n, seed=seed, split=split, difficulty=level, **kwargs)
    except ValueError as e:  # an easy level has few distinct problems: name the count to lower
      raise TooFewProblems(f"{name}: {n} problems of the {difficulty!r} difficulty{' with ' if overrides else ''}"
                           f"{', '.join(f'{k}={v}' for k, v in overrides.items())} cannot be made: {e}") from e

  # The held-out splits first: problems distinct by arithmetic are the scarce ones, so a count too large fails
  # before the training pool is drawn.
  held_out = {split: generate(split, counts[split], split) for split in ("valid", "test")}
  train_counts = {name: counts[name] for name in TRAIN_FILES}
  pool = generate(" + ".join(f"{name}={n}" for name, n in train_counts.items()), sum(train_counts.values()),
                  "train", distinct_by="question")
  return held_out, pool


def make_task_data(out_dir: str, *, seed: int = 0, difficulty: str = "medium", chat_format: str = "phi-4",
                   counts: dict[str, int], extra: Optional[dict] = None, **overrides: int) -> dict:
  """Writes every file (see the module docstring) and returns the manifest.

  `overrides` replace fields of the named difficulty (`max_value=40`, `max_steps=3`, ...). `extra`: entries added to
  the manifest, written with it (the recipe's record of its task settings). Every argument is checked before
  anything is written.
  """
  if chat_format not in CHAT_FORMAT_FAMILY:
    raise ValueError(f"unknown chat_format {chat_format!r} (--chat_format); expected one of "
                     f"{sorted(CHAT_FORMAT_FAMILY)}")
  level = dataclasses.replace(word_problems.get_difficulty(difficulty), **overrides)
  problems, pool = draw_problems(seed, difficulty, counts, **overrides)
  cursor = 0
  for name in TRAIN_FILES:
    problems[name] = pool[cursor:cursor + counts[name]]
    cursor += counts[name]
  problems["sft"] = curate(problems["midtrain"], counts["sft"])
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "manifest.json")
  # Before the first file changes: a re-run cut short must not leave the old manifest describing new files.
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)

  records = {
      "base_train": [word_problems.to_sft_record(p, word_problems.direct_answer(p)) for p in problems["base_train"]],
      "midtrain": [word_problems.to_sft_record(p, word_problems.teacher_trace(p)) for p in problems["midtrain"]],
      "sft": [word_problems.to_sft_record(p, word_problems.teacher_trace(p)) for p in problems["sft"]],
  }
  for name in ("dpo_prompts", "rl_prompts", "valid", "test"):
    records[name] = [word_problems.to_eval_record(p) for p in problems[name]]
  for name, rows in records.items():
    _write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)

  tokenizer = build_tiny_tokenizer(os.path.join(out_dir, "tokenizer"), chat_format=chat_format,
                                   corpus=word_problems.tokenizer_corpus())
  everything = [p for name in records for p in problems[name]]
  manifest = {
      "seed": seed,
      "difficulty": difficulty,
      "difficulty_params": dataclasses.asdict(level),
      # Which held-out problems the settings give depends on it: the recipe uses data made under its own.
      "split_version": word_problems.SPLIT_VERSION,
      "chat_format": chat_format,
      "counts": {name: len(rows) for name, rows in records.items()},
      "num_steps": {name: {str(k): int(v) for k, v in zip(*np.unique([p.num_steps for p in problems[name]],
                                                                      return_counts=True))}
                    for name in records},
      "files": {name: f"{name}.jsonl" for name in records} | {"tokenizer": "tokenizer"},
      "vocab_size": len(tokenizer),
      "tokens": {
          "problem": _length_stats(tokenizer, [p.question for p in everything]),
          "trace": _length_stats(tokenizer, [word_problems.teacher_trace(p) for p in everything]),
          "direct_answer": _length_stats(tokenizer, [word_problems.direct_answer(p) for p in everything]),
          # SFT rows hold one whole conversation (no system prompt here): the recipe compares it with their length.
          "sft_conversation": _stats([len(render_messages(tokenizer, r["messages"])[0]) for r in records["sft"]]),
      },
  } | dict(extra or {})
  # Last and through a rename: a manifest is there only once every file is, whole (the recipe reads the data as
  # made when it finds one).
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")
  os.replace(path + ".tmp", path)
  return manifest


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--difficulty", default="medium", choices=sorted(word_problems.DIFFICULTIES))
  parser.add_argument("--chat_format", default="phi-4", choices=sorted(CHAT_FORMAT_FAMILY),
                      help="chat template of the tokenizer; phi-4-reasoning prepends its system prompt (about 950 "
                      "tokens of the tiny tokenizer) to every conversation, too long for the tiny model's sequences")
  defaults = {"base_train": 4000, "midtrain": 4000, "sft": 1000, "dpo_prompts": 256, "rl_prompts": 512,
              "valid": 200, "test": 200}
  for name, default in defaults.items():
    parser.add_argument(f"--num_{name}", type=int, default=default)
  for field in dataclasses.fields(word_problems.Difficulty):
    parser.add_argument(f"--{field.name}", type=int, help=f"overrides the difficulty's {field.name}")
  args = parser.parse_args()
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(word_problems.Difficulty)
               if getattr(args, f.name) is not None}
  counts = {name: getattr(args, f"num_{name}") for name in defaults}
  try:
    check_counts(counts)
  except ValueError as e:
    parser.error(str(e))
  try:
    manifest = make_task_data(args.out_dir, seed=args.seed, difficulty=args.difficulty,
                              chat_format=args.chat_format, counts=counts, **overrides)
  except TooFewProblems as e:
    parser.error(f"{e} (lower --num_<file>, or choose a harder --difficulty or larger --max_value/--max_operand)")
  except ValueError as e:
    parser.error(str(e))
  print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
  main()
