"""Writes the small chain-of-thought files the tiny configs train on (seeded, so the files are reproducible).

    python experiments/data/make_tiny_traces.py --out_dir experiments/data
"""

import argparse
import json
import os
import random


def draw(rng: random.Random, seen: set) -> tuple[int, int, int]:
  """(a, b, c) of a question (a + b) * c whose arithmetic no file has yet ((b + a) * c is the same question): the
  eval and prompt files hold no question the training file does."""
  while True:
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    if (min(a, b), max(a, b), c) not in seen:
      seen.add((min(a, b), max(a, b), c))
      return a, b, c


def trace(rng: random.Random, seen: set) -> dict:
  a, b, c = draw(rng, seen)
  total = (a + b) * c
  question = f"What is ({a} + {b}) * {c}?"
  thinking = f"<think>First {a} + {b} = {a + b}. Then {a + b} * {c} = {total}.</think>"
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": f"{thinking} The answer is \\boxed{{{total}}}."}]}


def prompt(rng: random.Random, seen: set) -> dict:
  record = trace(rng, seen)
  answer = record["messages"][1]["content"].rsplit("\\boxed{", 1)[1].split("}")[0]
  return {"problem": record["messages"][0]["content"], "answer": answer}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  seen = set()
  for name, seed, count, make in (("tiny_traces_train.jsonl", 0, 400, trace), ("tiny_traces_eval.jsonl", 1, 40, trace),
                                  ("tiny_prompts.jsonl", 2, 64, prompt)):
    rng = random.Random(seed)
    with open(os.path.join(args.out_dir, name), "w") as f:
      for _ in range(count):
        f.write(json.dumps(make(rng, seen)) + "\n")


if __name__ == "__main__":
  main()
