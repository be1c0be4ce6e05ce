"""Writes the small chain-of-thought files the tiny configs train on (seeded, so the files are reproducible).

    python experiments/data/make_tiny_traces.py --out_dir experiments/data
"""

import argparse
import json
import os
import random


def trace(rng: random.Random) -> dict:
  a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
  total = (a + b) * c
  question = f"What is ({a} + {b}) * {c}?"
  thinking = f"<think>First {a} + {b} = {a + b}. Then {a + b} * {c} = {total}.</think>"
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": f"{thinking} The answer is \\boxed{{{total}}}."}]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  for name, seed, count in (("tiny_traces_train.jsonl", 0, 400), ("tiny_traces_eval.jsonl", 1, 40)):
    rng = random.Random(seed)
    with open(os.path.join(args.out_dir, name), "w") as f:
      for _ in range(count):
        f.write(json.dumps(trace(rng)) + "\n")


if __name__ == "__main__":
  main()
