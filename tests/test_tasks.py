"""The embedded word-problem task: answers against an independent reading of the question, teacher and slipped traces
through the verifier, splits, the tiny tokenizer's lengths, and the data files of every stage."""

import collections
import dataclasses
import itertools
import json
import operator
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest
import sympy

from phi_jax import rewards
from phi_jax.data.chat import render_messages
from phi_jax.data.sources import JsonlSource, read_record
from phi_jax.hf.tokenizer import build_tiny_tokenizer, load_tokenizer
from phi_jax.tasks import word_problems as wp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import make_task_data  # noqa: E402

# The question's sentences, read without the generator: pattern -> how the quantity changes.
_START_GROUPS = re.compile(r"^(\w+) has (\d+) (?:boxes|bags|packs) of (\d+) (\w+)\.$")
_START_COUNT = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
_OPERATIONS = ((re.compile(r"^(?:She|He) (?:buys|finds|gets) (\d+) more\.$"), "+"),
               (re.compile(r"^(?:She|He) (?:gives away|loses|sells) (\d+)\.$"), "-"),
               (re.compile(r"^(?:She|He) doubles them\.$"), "*2"),
               (re.compile(r"^(?:She|He) triples them\.$"), "*3"))
_QUESTION = re.compile(r"^How many (\w+) does (\w+) have now\?$")
_TRACE = re.compile(r"^<think>(.*)</think> The answer is \\boxed\{(-?\d+)\}\.$")
_TRACE_STEP = re.compile(r"([a-z0-9 ]+): (-?\d+) ([-+*]) (\d+) = (-?\d+)\.")

# Bounds the task is designed to (the tiny model's sequences are 128-256 tokens).
MAX_PROBLEM_TOKENS = 40
MAX_TRACE_TOKENS = 80
MAX_CONVERSATION_TOKENS = 128


def read_question(question: str) -> tuple[str, list[int], sympy.Integer]:
  """Read from the question's text alone: its arithmetic key ("3*4-5"), the quantity after each operation, and the
  final quantity as sympy evaluates the whole chain."""
  sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", question)]
  groups, count = _START_GROUPS.match(sentences[0]), _START_COUNT.match(sentences[0])
  if groups:
    name, item = groups.group(1), groups.group(4)
    key = expression = f"{groups.group(2)}*{groups.group(3)}"
    value = int(groups.group(2)) * int(groups.group(3))
    values = [value]
  else:
    assert count, sentences[0]
    name, item = count.group(1), count.group(3)
    key = expression = count.group(2)
    value, values = int(count.group(2)), []
  for sentence in sentences[1:-1]:
    matches = [(m, op) for pattern, op in _OPERATIONS if (m := pattern.match(sentence))]
    assert len(matches) == 1, f"unreadable sentence {sentence!r}"
    match, op = matches[0]
    operation = op + match.group(1) if op in "+-" else op
    key += operation
    expression = f"({expression}){operation}"
    value = apply(value, operation[0], int(operation[1:]))
    values.append(value)
  ending = _QUESTION.match(sentences[-1])
  assert ending and ending.groups() == (item, name), sentences[-1]
  return key, values, sympy.sympify(expression)


def read_trace(trace: str) -> tuple[list[tuple[str, int, str, int, int]], str]:
  """(clue, left, op, right, result) of every step of a trace, and its boxed answer."""
  match = _TRACE.match(trace)
  assert match, trace
  steps = [(c, int(a), op, int(b), int(r)) for c, a, op, b, r in _TRACE_STEP.findall(match.group(1))]
  assert _TRACE_STEP.sub("", match.group(1)).strip() == "", f"unparsed text in {trace!r}"
  return steps, match.group(2)


def apply(left: int, op: str, right: int) -> int:
  return {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](left, right)


def holds(left: int, op: str, right: int, result: int) -> bool:
  return apply(left, op, right) == result


@pytest.fixture(scope="module")
def problems():
  # 100: the easy level's valid and test splits hold only about 110 arithmetics each.
  return {(name, split): wp.generate(100, seed=3, split=split, difficulty=name)
          for name in wp.DIFFICULTIES for split in wp.SPLITS}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_tiny_tokenizer(tmp_path_factory.mktemp("task_tokenizer"), chat_format="phi-4",
                              corpus=wp.tokenizer_corpus())


@pytest.fixture(scope="module")
def verifier():
  pool = rewards.VerifierPool(rewards.VerifierConfig(num_workers=2))
  yield pool
  pool.shutdown()


def test_answers_follow_from_the_question_text(problems):
  for (name, _), group in problems.items():
    difficulty = wp.DIFFICULTIES[name]
    for problem in group:
      key, values, total = read_question(problem.question)
      assert sympy.Integer(problem.answer) == total == values[-1], problem.question
      assert key == problem.key
      assert all(1 <= value <= difficulty.max_value for value in values), problem.question
      assert difficulty.min_steps <= len(values) == problem.num_steps <= difficulty.max_steps


def test_teacher_trace_solves_the_question_one_step_per_sentence(problems):
  for group in problems.values():
    for problem in group:
      steps, boxed = read_trace(wp.teacher_trace(problem))
      assert boxed == problem.answer
      assert len(steps) == problem.num_steps == len(problem.steps)
      previous = None
      for clue, left, op, right, result in steps:
        assert holds(left, op, right, result), (problem.question, clue)
        assert clue in problem.question, clue
        assert str(right) in clue.split() or op == "*"
        assert previous is None or left == previous
        previous = result


def test_wrong_trace_is_one_slip_carried_to_a_wrong_answer(problems):
  rng = random.Random(0)
  kinds = collections.Counter()
  for group in problems.values():
    for problem in group:
      teacher, _ = read_trace(wp.teacher_trace(problem))
      wrong, boxed = read_trace(wp.wrong_trace(problem, rng))
      assert boxed != problem.answer and boxed == str(wrong[-1][4])
      assert len(wrong) == len(teacher)
      first = next(i for i, (w, t) in enumerate(zip(wrong, teacher)) if w != t)
      kinds["last step" if first == len(teacher) - 1 else "earlier step"] += 1
      assert wrong[:first] == teacher[:first]
      clue, left, op, right, result = wrong[first]
      assert (clue, left, right) == teacher[first][:2] + teacher[first][3:4]
      if op == teacher[first][2]:
        kinds["arithmetic"] += 1
        assert not holds(left, op, right, result) and abs(result - teacher[first][4]) in (1, 2, 10)
      else:
        kinds["operator"] += 1
        assert holds(left, op, right, result)
      for (_, left, op, right, result), before, taught in zip(wrong[first + 1:], wrong[first:], teacher[first + 1:]):
        assert left == before[4] and (op, right) == taught[2:4] and holds(left, op, right, result)
  assert all(kinds[kind] > 100 for kind in ("arithmetic", "operator", "last step", "earlier step")), kinds


def test_every_operator_can_slip_into_another(problems):
  """Wrong-operator slips cover each operator: + for -, - for +, and + for a doubling or tripling."""
  rng = random.Random(3)
  swaps = collections.Counter()
  for problem in problems["medium", "train"]:
    teacher, _ = read_trace(wp.teacher_trace(problem))
    for _ in range(4):
      wrong, _ = read_trace(wp.wrong_trace(problem, rng))
      swaps.update((t[2], w[2]) for t, w in zip(teacher, wrong) if t[2] != w[2])
  assert set(swaps) == {("+", "-"), ("-", "+"), ("*", "+")}, swaps


@pytest.mark.parametrize("fields", [{"min_steps": 0}, {"min_steps": 3, "max_steps": 2}, {"max_operand": 1},
                                    {"max_value": 19}])  # 19 < max_start 20
def test_difficulties_that_cannot_make_problems_are_refused(fields):
  with pytest.raises(ValueError):
    wp.Difficulty(**fields)


@pytest.mark.parametrize("field,value", [("max_steps", 3.5), ("max_value", "30"), ("max_start", 12.0),
                                         ("max_operand", True)])
def test_a_difficulty_field_that_is_no_whole_number_is_named(field, value):
  with pytest.raises(ValueError, match=rf"Difficulty.{field} must be a whole number, got {re.escape(repr(value))}"):
    wp.Difficulty(**{field: value})


def test_verifier_accepts_teacher_traces_and_rejects_slips(problems, verifier):
  rng = random.Random(1)
  chosen = [group[i] for group in problems.values() for i in range(2)][:12]
  golds = [p.answer for p in chosen]
  assert verifier.verify_batch([wp.teacher_trace(p) for p in chosen], golds) == [True] * len(chosen)
  assert verifier.verify_batch([wp.direct_answer(p) for p in chosen], golds) == [True] * len(chosen)
  assert verifier.verify_batch([wp.wrong_trace(p, rng) for p in chosen], golds) == [False] * len(chosen)


def test_splits_are_disjoint_by_arithmetic_and_reproducible():
  problems = {split: wp.generate(n, seed=0, split=split) for split, n in (("train", 2000), ("valid", 400),
                                                                         ("test", 400))}
  keys = {split: [p.key for p in ps] for split, ps in problems.items()}
  starts = {split: {p.split_key for p in ps} for split, ps in problems.items()}
  for split, split_keys in keys.items():
    assert len(set(split_keys)) == len(split_keys)
    assert {wp.split_of(k) for k in starts[split]} == {split}
  # No arithmetic in two splits, counted from the quantity it starts with ("3 boxes of 4" starts at 12).
  assert not starts["train"] & starts["valid"] | starts["train"] & starts["test"] | starts["valid"] & starts["test"]
  boxes = wp.Problem("", "6", (wp.Step(3, "*", 4, 12, "3 boxes of 4"), wp.Step(12, "-", 3, 9, "sells 3"),
                               wp.Step(9, "-", 3, 6, "loses 3")), start=3)
  plain = wp.Problem("", "6", (wp.Step(12, "-", 3, 9, "sells 3"), wp.Step(9, "-", 3, 6, "loses 3")), start=12)
  assert boxes.split_key == plain.split_key == "12-3-3" and boxes.key != plain.key
  # A doubling of the start is the same arithmetic as two boxes of it: one split for both.
  doubled = wp.Problem("", "6", (wp.Step(6, "*", 2, 12, "doubles them"), wp.Step(12, "-", 3, 9, "sells 3"),
                                 wp.Step(9, "-", 3, 6, "loses 3")), start=6)
  two_boxes = wp.Problem("", "6", (wp.Step(6, "*", 2, 12, "6 bags of 2"),) + doubled.steps[1:], start=6)
  assert doubled.split_key == two_boxes.split_key == "12-3-3" and doubled.key == two_boxes.key
  # Containers then a doubling: every leading product is folded, so "2 boxes of 3, doubled" is "6, doubled" is 12.
  boxes_doubled = wp.Problem("", "6", (wp.Step(2, "*", 3, 6, "2 boxes of 3"),) + doubled.steps, start=2)
  assert boxes_doubled.split_key == doubled.split_key == "12-3-3"
  # Across many draws, no arithmetic (`key`) falls in two splits.
  rng = random.Random(7)
  split_of_key = collections.defaultdict(set)
  for _ in range(20000):
    problem = wp.sample_problem(rng, wp.DIFFICULTIES["medium"])
    split_of_key[problem.key].add(wp.split_of(problem.split_key))
  assert all(len(splits) == 1 for splits in split_of_key.values())

  again = wp.generate(400, seed=0, split="test")
  assert [p.key for p in again] == keys["test"]
  assert [p.question for p in again] == [p.question for p in wp.generate(400, seed=0, split="test")]
  assert [p.key for p in wp.generate(400, seed=1, split="test")] != keys["test"]

  rng = random.Random(5)
  distinct = {wp.sample_problem(rng, wp.DIFFICULTIES["hard"]).split_key for _ in range(10000)}
  shares = collections.Counter(map(wp.split_of, distinct))
  for split, fraction in wp.SPLIT_FRACTIONS:
    assert abs(shares[split] / len(distinct) - fraction) < 0.02, shares


def test_training_pool_keeps_the_mix_of_step_counts():
  # Easy problems have only about 130 one-step arithmetics in the train split: 2,000 problems distinct by key would
  # be mostly two-step ones; distinct by question they keep the even mix.
  by_question = wp.generate(2000, seed=0, split="train", difficulty="easy", distinct_by="question")
  assert len({p.question for p in by_question}) == 2000
  counts = collections.Counter(p.num_steps for p in by_question)
  assert min(counts.values()) > 0.45 * 2000, counts
  with pytest.raises(ValueError, match="distinct"):
    wp.generate(300, seed=0, split="test", difficulty="easy")


def test_tokenizer_fits_the_tiny_model_and_round_trips(problems, tokenizer):
  assert len(tokenizer) <= 512
  vocabulary = tokenizer.get_vocab()
  merged = [t for t in vocabulary if len(re.findall(r"\d", t)) > 1 and t not in tokenizer.all_special_tokens]
  assert not merged, f"merges of two digits: {merged}"
  for token in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"):
    assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
  words = {w for name, pronoun in wp.NAMES for w in (name, pronoun)} | set(wp.ITEMS) | set(wp.CONTAINERS)
  for word in words | {"buys", "finds", "gets", "gives", "away", "loses", "sells", "doubles", "triples", "boxed"}:
    assert f"\u0120{word}" in vocabulary or word in vocabulary, word

  rng = random.Random(2)
  lengths = collections.defaultdict(list)
  for (name, _), group in problems.items():
    texts = {"problem": [p.question for p in group], "trace": [wp.teacher_trace(p) for p in group],
             "direct": [wp.direct_answer(p) for p in group], "wrong": [wp.wrong_trace(p, rng) for p in group]}
    for kind, batch in texts.items():
      ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
      assert tokenizer.batch_decode(ids) == batch
      lengths[name, kind] += map(len, ids)
    if name != "hard":
      longest = max(range(len(group)), key=lambda i: len(texts["problem"][i]) + len(texts["trace"][i]))
      conversation = [{"role": "user", "content": texts["problem"][longest]},
                      {"role": "assistant", "content": texts["trace"][longest]}]
      lengths[name, "conversation"].append(len(render_messages(tokenizer, conversation)[0]))
  for name in ("easy", "medium"):
    assert max(lengths[name, "problem"]) <= MAX_PROBLEM_TOKENS
    assert max(lengths[name, "trace"]) <= MAX_TRACE_TOKENS
    assert max(lengths[name, "conversation"]) <= MAX_CONVERSATION_TOKENS
  # Each step of a trace costs a dozen tokens or fewer: the medium mean sits well under the bound.
  assert 30 <= sum(lengths["medium", "trace"]) / len(lengths["medium", "trace"]) <= 55


def test_make_task_data_writes_every_stage(tmp_path):
  counts = {"base_train": 60, "midtrain": 80, "sft": 20, "dpo_prompts": 10, "rl_prompts": 12, "valid": 15,
            "test": 15}
  manifest = make_task_data.make_task_data(str(tmp_path / "a"), seed=4, counts=counts, max_value=40)
  make_task_data.make_task_data(str(tmp_path / "b"), seed=4, counts=counts, max_value=40)
  assert manifest["counts"] == counts and manifest["vocab_size"] <= 512
  assert manifest["difficulty_params"] == dataclasses.asdict(wp.Difficulty(max_value=40))
  assert manifest["tokens"]["trace"]["max"] <= MAX_TRACE_TOKENS
  files = {}
  for name in counts:
    path = tmp_path / "a" / f"{name}.jsonl"
    assert path.read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes(), name
    files[name] = [json.loads(line) for line in path.read_text().splitlines()]

  questions = {}
  for name in ("base_train", "midtrain", "sft"):
    source = JsonlSource(str(tmp_path / "a" / f"{name}.jsonl"))
    records = [read_record(source[i]) for i in range(len(source))]
    assert all(error is None for _, error in records), name
    questions[name] = [r["messages"][0]["content"] for r, _ in records]
    replies = [r["messages"][1]["content"] for r, _ in records]
    assert all(("<think>" in reply) == (name != "base_train") for reply in replies)
  for name in ("dpo_prompts", "rl_prompts", "valid", "test"):
    assert all(set(r) == {"problem", "answer"} and 1 <= int(r["answer"]) <= 40 for r in files[name])
    questions[name] = [r["problem"] for r in files[name]]
  assert set(questions["sft"]) <= set(questions["midtrain"])
  training = ("base_train", "midtrain", "dpo_prompts", "rl_prompts")
  assert sum(len(set(questions[n])) for n in training) == len(set().union(*(questions[n] for n in training)))
  keys = {n: {read_question(q)[0] for q in questions[n]} for n in questions}
  assert not set().union(*(keys[n] for n in training)) & (keys["valid"] | keys["test"])
  assert not keys["valid"] & keys["test"]
  # Curation keeps the mix of step counts of the mid-training data.
  for steps, count in manifest["num_steps"]["midtrain"].items():
    assert abs(manifest["num_steps"]["sft"].get(steps, 0) / counts["sft"] - count / counts["midtrain"]) <= 0.06


def test_make_task_data_names_a_count_its_difficulty_cannot_fill(tmp_path):
  """The easy level has under 200 distinct test problems, make_task_data.py's default count: the error names the
  file and the level, before anything is written."""
  counts = {"base_train": 10, "midtrain": 10, "sft": 5, "dpo_prompts": 5, "rl_prompts": 5, "valid": 5, "test": 300}
  with pytest.raises(ValueError, match=r"^test: 300 problems of the 'easy' difficulty cannot be made: found only"):
    make_task_data.make_task_data(str(tmp_path / "out"), difficulty="easy", counts=counts)
  assert not (tmp_path / "out").exists()


def test_make_task_data_with_every_count_zero_writes_empty_files(tmp_path):
  """Zero of every file (a tokenizer and a manifest alone): empty files and zero-length statistics."""
  counts = dict.fromkeys(make_task_data.TRAIN_FILES + ("sft", "valid", "test"), 0)
  manifest = make_task_data.make_task_data(str(tmp_path / "out"), seed=0, counts=counts)
  assert set(manifest["counts"].values()) == {0} and manifest["tokens"]["problem"] == {"mean": 0.0, "max": 0}
  assert all((tmp_path / "out" / f"{name}.jsonl").read_text() == "" for name in manifest["counts"])


def test_the_nth_problem_may_come_on_the_last_allowed_draw(monkeypatch):
  monkeypatch.setattr(wp, "_MAX_DRAWS_PER_PROBLEM", 1)
  seed = next(seed for seed in range(100)  # a seed whose first draw is a train problem
              if wp.split_of(wp.sample_problem(random.Random(f"word_problems:train:{seed}"),
                                               wp.get_difficulty("medium")).split_key) == "train")
  assert len(wp.generate(1, seed=seed, split="train")) == 1
  assert wp.generate(0, seed=seed, split="train") == []
  with pytest.raises(ValueError, match="zero or more"):
    wp.generate(-1, seed=seed, split="train")


def _step(left: int, op: str, right: int) -> wp.Step:
  return wp.Step(left, op, right, apply(left, op, right), clue="")


def test_hard_steps_are_products_and_sums_or_differences_that_cross_a_ten():
  """A step is hard when a sum carries or a difference borrows across the tens, or when it is a product."""
  assert make_task_data._is_hard(_step(35, "+", 5))  # 5 + 5 = 10: carries
  assert not make_task_data._is_hard(_step(34, "+", 5))  # 4 + 5 = 9: no carry
  assert not make_task_data._is_hard(_step(35, "-", 5))  # 35 - 5 = 30: the units digit just reaches 0, no borrow
  assert make_task_data._is_hard(_step(34, "-", 5))  # 4 < 5: borrows
  # Two-digit operands (--max_operand above 9): the units digits decide.
  assert not make_task_data._is_hard(_step(12, "+", 15)) and not make_task_data._is_hard(_step(25, "-", 15))
  assert make_task_data._is_hard(_step(18, "+", 15)) and make_task_data._is_hard(_step(40, "-", 12))
  assert make_task_data._is_hard(_step(3, "*", 2))


def test_curation_keeps_the_hardest_problems_in_their_original_order():
  """Of three two-step problems with 1, 0 and 2 hard steps, the two hardest are kept, first one first."""
  def problem(*steps):
    return wp.Problem(question=str(steps), answer=str(steps[-1].result), steps=steps, start=steps[0].left)

  one_hard = problem(_step(12, "+", 3), _step(15, "-", 7))  # 5 < 7 borrows
  none_hard = problem(_step(12, "+", 3), _step(15, "-", 4))
  two_hard = problem(_step(18, "+", 5), _step(23, "-", 6))  # 8 + 5 >= 10 carries; 3 < 6 borrows
  assert make_task_data.curate([one_hard, none_hard, two_hard], 2) == [one_hard, two_hard]


# recipe_tiny's task (recipe.gin's recipe.difficulty_overrides on the medium level).
RECIPE_LEVEL = dataclasses.replace(wp.get_difficulty("medium"), min_steps=2, max_steps=3, max_value=30, max_start=12,
                                   max_operand=5, max_containers=4)


def test_held_out_problems_are_distinct_by_the_arithmetic_that_splits_them():
  """"4 packs of 2 coins, gets 3 more, doubles them" and "8 eggs, buys 3 more, doubles them" are one sum (8+3*2),
  with other `key`s: 35 of the recipe's 200 test problems repeated another's arithmetic."""
  for split in ("valid", "test"):
    problems = wp.generate(200, seed=0, split=split, difficulty=RECIPE_LEVEL)
    assert len({p.split_key for p in problems}) == len(problems), split
  packs = wp.Problem("", "22", (wp.Step(4, "*", 2, 8, "4 packs of 2"), wp.Step(8, "+", 3, 11, "gets 3 more"),
                                wp.Step(11, "*", 2, 22, "doubles them")), start=4)
  eggs = wp.Problem("", "22", packs.steps[1:], start=8)
  assert packs.key != eggs.key and packs.split_key == eggs.split_key


def _chain(start: int, *operations: tuple[str, int]) -> wp.Problem:
  """A problem of these operations on `start` (its question left empty)."""
  steps, value = [], start
  for op, right in operations:
    steps.append(_step(value, op, right))
    value = steps[-1].result
  return wp.Problem("", str(value), tuple(steps), start=start)


def _folded(question: str) -> tuple[int, list[tuple[str, int]]]:
  """Read from the question's text: the quantity after its leading products, and the operations after them."""
  key = read_question(question)[0]
  value, operations = int(re.match(r"\d+", key).group()), [(op, int(n)) for op, n in re.findall(r"([-+*])(\d+)", key)]
  while operations and operations[0][0] == "*":
    value *= operations.pop(0)[1]
  return value, operations


def _reordering(question: str) -> tuple:
  """What telling a problem's sentences in any order keeps: its folded start, its operations as a multiset, its
  answer."""
  value, operations = _folded(question)
  answer = value
  for op, right in operations:
    answer = apply(answer, op, right)
  return value, tuple(sorted(operations)), answer


def _commuted(question: str) -> tuple:
  """The question's arithmetic with each run of sums and differences, and each run of products, sorted: the orders
  that reach the same quantity at the end of every run."""
  value, operations = _folded(question)
  return value, tuple(tuple(sorted(run)) for _, run in itertools.groupby(operations, key=lambda o: o[0] == "*"))


def test_a_problem_told_in_another_order_falls_in_the_split_of_the_original():
  """"9 coins, finds 3 more, buys 4 more" and "9 stamps, buys 4 more, finds 3 more" fell in different splits: 82 of
  the demo's 200 test problems had such a twin in training."""
  coins, stamps = _chain(9, ("+", 3), ("+", 4)), _chain(9, ("+", 4), ("+", 3))
  assert coins.key != stamps.key and coins.split_key == stamps.split_key
  assert _chain(5, ("-", 4), ("+", 1)).split_key == _chain(5, ("+", 1), ("-", 4)).split_key
  boxes = wp.Problem("", "14", (wp.Step(2, "*", 6, 12, "2 boxes of 6"),) + _chain(12, ("-", 1), ("+", 3)).steps, 2)
  assert boxes.split_key == _chain(12, ("+", 3), ("-", 1)).split_key
  # Runs after a product commute within themselves, and so do products in a row.
  assert (_chain(5, ("+", 3), ("*", 2), ("-", 4), ("+", 1)).split_key
          == _chain(5, ("+", 3), ("*", 2), ("+", 1), ("-", 4)).split_key)
  assert _chain(5, ("+", 1), ("*", 2), ("*", 3)).split_key == _chain(5, ("+", 1), ("*", 3), ("*", 2)).split_key
  # Not across a product: (5 + 3) * 2 - 4 and (5 - 4) * 2 + 3 are other problems.
  assert _chain(5, ("+", 3), ("*", 2), ("-", 4)).split_key != _chain(5, ("-", 4), ("*", 2), ("+", 3)).split_key
  rng = random.Random(11)
  splits, keys = collections.defaultdict(set), collections.defaultdict(set)
  for _ in range(20000):
    problem = wp.sample_problem(rng, wp.DIFFICULTIES["medium"])
    splits[_commuted(problem.question)].add(wp.split_of(problem.split_key))
    keys[_commuted(problem.question)].add(problem.key)
  assert max(map(len, keys.values())) > 1  # reorderings were drawn
  assert all(len(s) == 1 for s in splits.values())


def test_held_out_splits_hold_no_two_orderings_of_one_problem():
  for split in ("valid", "test"):
    problems = wp.generate(200, seed=0, split=split, difficulty=RECIPE_LEVEL)
    assert len({_reordering(p.question) for p in problems}) == len(problems), split


def test_no_held_out_problem_of_the_demo_is_a_training_problem_told_in_another_order():
  """With the demo's task (recipe.DEFAULT_COUNTS, recipe.gin's difficulty), 82 test and 78 valid problems had one."""
  counts = {"base_train": 4000, "midtrain": 4000, "sft": 1000, "dpo_prompts": 256, "rl_prompts": 512, "valid": 200,
            "test": 200}
  held_out, pool = make_task_data.draw_problems(0, "medium", counts, **dataclasses.asdict(RECIPE_LEVEL))
  training = {_reordering(p.question) for p in pool}
  for split, problems in held_out.items():
    assert [p.question for p in problems if _reordering(p.question) in training] == [], split
  assert not {_reordering(p.question) for p in held_out["valid"]} & {_reordering(p.question) for p in held_out["test"]}


SMALL_COUNTS = {"base_train": 6, "midtrain": 6, "sft": 3, "dpo_prompts": 3, "rl_prompts": 3, "valid": 3, "test": 3}


def test_the_manifest_records_the_split_rules_and_sft_conversation_lengths(tmp_path):
  """Data made by hand (make_task_data.py) recorded no split version, so the recipe refused it as made under older
  split rules; the SFT conversations' lengths let the recipe compare them with the SFT stage's rows."""
  manifest = make_task_data.make_task_data(str(tmp_path), seed=1, counts=SMALL_COUNTS)
  assert manifest["split_version"] == wp.SPLIT_VERSION
  assert json.loads((tmp_path / "manifest.json").read_text())["split_version"] == wp.SPLIT_VERSION
  tokenizer = load_tokenizer(tmp_path / "tokenizer")
  rows = [json.loads(line)["messages"] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
  assert manifest["tokens"]["sft_conversation"]["max"] == max(len(render_messages(tokenizer, m)[0]) for m in rows)


def _files(out) -> dict:
  return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.is_file()}


def test_a_rerun_with_a_bad_argument_writes_nothing(tmp_path, monkeypatch):
  """A chat format no tokenizer has was found after the .jsonl files were overwritten, under the old manifest."""
  out = tmp_path / "data"
  make_task_data.make_task_data(str(out), seed=1, counts=SMALL_COUNTS)
  before = _files(out)
  with pytest.raises(ValueError, match=r"chat_format 'phi4'"):
    make_task_data.make_task_data(str(out), seed=2, chat_format="phi4", counts=SMALL_COUNTS)
  assert _files(out) == before
  argv = ["make_task_data.py", f"--out_dir={tmp_path / 'cli'}", "--chat_format=phi4"]
  monkeypatch.setattr(sys, "argv", argv + [f"--num_{name}={n}" for name, n in SMALL_COUNTS.items()])
  with pytest.raises(SystemExit):
    make_task_data.main()
  assert not (tmp_path / "cli").exists()


def test_a_rerun_cut_short_leaves_no_manifest_of_other_files(tmp_path, monkeypatch):
  """The old manifest stayed until the new one replaced it: a re-run stopped after its first file left the old
  manifest describing new files (and the recipe reads data with a manifest as whole)."""
  out = tmp_path / "data"
  make_task_data.make_task_data(str(out), seed=1, counts=SMALL_COUNTS)
  write = make_task_data._write_jsonl

  def killed_after_one_file(path, records):
    write(path, records)
    raise KeyboardInterrupt

  monkeypatch.setattr(make_task_data, "_write_jsonl", killed_after_one_file)
  with pytest.raises(KeyboardInterrupt):
    make_task_data.make_task_data(str(out), seed=2, counts=SMALL_COUNTS)
  assert not (out / "manifest.json").exists()


def test_the_tiny_trace_files_are_reproduced_by_their_script_and_share_no_question(tmp_path):
  """The tiny configs' eval and prompt files held questions of the training file (their eval loss was partly a
  training loss); the script writes them from one set of questions, into a directory it makes."""
  out = tmp_path / "new" / "dir"
  subprocess.run([sys.executable, os.path.join(REPO, "experiments/data/make_tiny_traces.py"), "--out_dir", str(out)],
                 check=True)
  arithmetic = {}
  for name in ("tiny_traces_train.jsonl", "tiny_traces_eval.jsonl", "tiny_prompts.jsonl"):
    assert (out / name).read_bytes() == (pathlib.Path(REPO) / "experiments/data" / name).read_bytes(), name
    questions = [json.loads(line) for line in (out / name).read_text().splitlines()]
    questions = [q["problem"] if "problem" in q else q["messages"][0]["content"] for q in questions]
    a_b_c = [tuple(map(int, re.findall(r"\d+", q))) for q in questions]
    arithmetic[name] = {(min(a, b), max(a, b), c) for a, b, c in a_b_c}
    assert len(arithmetic[name]) == len(questions), name
  train, evaluation, prompts = arithmetic.values()
  assert not train & evaluation and not train & prompts and not evaluation & prompts
