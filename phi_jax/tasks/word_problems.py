"""Multi-step arithmetic word problems with exact answers, a teacher that writes their reasoning, and fixed splits.

    problems = generate(1000, seed=0, split="train", difficulty="medium")
    problems[0].question      # "Ann has 3 boxes of 4 apples. She gives away 5. She buys 7 more. How many ..."
    teacher_trace(problems[0])  # "<think>3 boxes of 4: 3 * 4 = 12. gives away 5: 12 - 5 = 7. buys 7 more: ..."
    direct_answer(problems[0])  # "The answer is \\boxed{14}."

The task stands in for the math problems and distilled R1 traces of the Phi-4-mini-reasoning recipe, at a size a
model of a few million parameters learns on a CPU in minutes. A problem is a chain of 1-6 operations on one
quantity, each one easy on its own (a product of two small factors, adding or removing at most a one-digit number,
doubling or tripling) but, composed, more than a tiny model computes in one forward pass. The teacher's trace
solves it one operation per sentence, each sentence quoting its clue from the question
("gives away 5: 12 - 5 = 7."), so every token of the trace is a copy, a look-up or a one-step sum of tokens close
by. `wrong_trace` makes one plausible slip (an arithmetic error or a wrong operator) and carries it to the end.

Every quantity stays an integer in [1, max_value], written in digits; `tokenizer_corpus` keeps digits out of the
tiny tokenizer's merges, so numbers tokenize one digit at a time.

Splits are fixed by the problem, not by the draw: a hash of the problem's arithmetic (its `split_key`: the
operations and numbers from the quantity it starts with, not the names and nouns around them; "3 boxes of 4" starts
at 12, and "buys 4 more, finds 3 more" is "finds 3 more, buys 4 more") decides train / valid / test, so a test
problem's arithmetic never appears in training under other words or with its sentences in another order; held-out
sets hold one problem per such arithmetic. (Its last operations may: with quantities up to 30, a training problem
can reach the same number by other steps and go on alike.) Everything is seeded and reproducible across processes
and machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import re
from collections.abc import Iterable, Sequence
from typing import Optional, Union

# Raised whenever the rules that put problems in splits change (`Problem.split_key`, `split_of`): data made under
# other rules has other held-out problems, so results on it are not comparable (the recipe refuses to reuse it).
# Raised too when `generate` picks other problems for the same arguments. 4: problems distinct by key are distinct
# by `split_key` (2026-12-07); 3: a first product of any kind is folded into its result (2026-12-07); 2: containers
# folded (2026-12-06). 5: every leading product is folded, a doubling after containers too (2026-12-07). 6: each run
# of sums and differences, and of products, after the leading products is sorted, so a problem told in another
# order shares its split and counts as the same held-out problem (2026-12-07).
SPLIT_VERSION = 6

# Fractions of the problem space in each split, in the order the hash buckets are assigned.
SPLIT_FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
SPLITS = tuple(name for name, _ in SPLIT_FRACTIONS)

NAMES = (("Ann", "She"), ("Ben", "He"), ("Cat", "She"), ("Dan", "He"), ("Eve", "She"), ("Max", "He"),
         ("Sam", "He"), ("Zoe", "She"), ("Liz", "She"), ("Tom", "He"))
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps")
CONTAINERS = ("boxes", "bags", "packs")
# The clue of each operation as the question states it (after the pronoun) and the trace quotes it.
ADD_CLUES = ("buys {n} more", "finds {n} more", "gets {n} more")
SUB_CLUES = ("gives away {n}", "loses {n}", "sells {n}")
MUL_CLUES = {2: "doubles them", 3: "triples them"}

# Relative weights of the operations after the first.
_OP_WEIGHTS = {"+": 2, "-": 2, "*": 1}
# How many draws `generate` may spend per problem kept (most are rejected by split or as duplicates).
_MAX_DRAWS_PER_PROBLEM = 200


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """How hard problems are.

  Attributes:
    min_steps: fewest arithmetic operations in a problem (a "3 boxes of 4" start counts as one).
    max_steps: most operations.
    max_value: every quantity, intermediate and final, stays in [1, max_value].
    max_start: largest starting count of a problem that starts with a plain count.
    max_operand: largest number added or removed, and largest number of items per container.
    max_containers: largest number of containers in a "3 boxes of 4" start.
  """

  min_steps: int = 2
  max_steps: int = 4
  max_value: int = 99
  max_start: int = 20
  max_operand: int = 9
  max_containers: int = 5

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int):  # 3.5 failed deep in the draw, as "too few problems"
        raise ValueError(f"Difficulty.{field.name} must be a whole number, got {value!r}")
    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
    if min(self.max_operand, self.max_containers, self.max_start) < 2:
      raise ValueError("max_operand, max_containers and max_start must be at least 2")
    if self.max_value < max(self.max_start, 2 * self.max_containers, self.max_operand + 1):
      raise ValueError(f"max_value={self.max_value} leaves no room for the starting quantities and operands")


DIFFICULTIES = {
    "easy": Difficulty(min_steps=1, max_steps=2, max_value=30, max_start=12, max_operand=6, max_containers=4),
    "medium": Difficulty(),
    "hard": Difficulty(min_steps=3, max_steps=6),
}


@dataclasses.dataclass(frozen=True)
class Step:
  """One operation of the solution: `left op right = result`, stated in the question as `clue`."""

  left: int
  op: str  # "+", "-" or "*"
  right: int
  result: int
  clue: str


@dataclasses.dataclass(frozen=True)
class Problem:
  """A word problem, its gold answer (an integer, as a string) and the operations that solve it, in order."""

  question: str
  answer: str
  steps: tuple[Step, ...]
  start: int  # the first number of the arithmetic: the starting count, or the number of containers

  @property
  def key(self) -> str:
    """The problem's arithmetic, free of names and nouns ("3*4-5+7"): what makes two problems the same one."""
    return _arithmetic_key(self.start, self.steps)

  @property
  def split_key(self) -> str:
    """What decides the problem's split: its arithmetic from the first quantity it counts, so "3 boxes of 4, gives
    away 5", "6 apples, doubles them, gives away 5" and "12 apples, gives away 5" fall in the same split. The
    products it starts with (containers, then any doubling or tripling) are folded into their result ("2 boxes of
    3, doubles them, gives away 5" is 12-5, as "6 apples, doubles them, gives away 5" is), so two problems with the
    same `key` always share a split. After them, each run of sums and differences, and each run of products, is
    sorted ("9, finds 3 more, buys 4 more" and "9, buys 4 more, finds 3 more" are both 9+3+4): the same sentences in
    another order are the same problem. Runs on either side of a product are not mixed ((5+3)*2-4 is not
    (5-4)*2+3)."""
    lead = 0
    while lead < len(self.steps) and self.steps[lead].op == "*":
      lead += 1
    start = self.steps[lead - 1].result if lead else self.start
    return _arithmetic_key(start, _in_canonical_order(self.steps[lead:]))

  @property
  def num_steps(self) -> int:
    return len(self.steps)


def split_of(key: str) -> str:
  """The split ("train", "valid" or "test") a problem's arithmetic `key` belongs to; fixed forever."""
  bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
  cumulative = 0.0
  for name, fraction in SPLIT_FRACTIONS:
    cumulative += fraction
    if bucket < cumulative:
      return name
  return SPLIT_FRACTIONS[-1][0]


def get_difficulty(difficulty: Union[str, Difficulty]) -> Difficulty:
  """A `Difficulty`, or the one of `DIFFICULTIES` with that name."""
  if isinstance(difficulty, Difficulty):
    return difficulty
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {sorted(DIFFICULTIES)}")
  return DIFFICULTIES[difficulty]


def generate(n: int, *, seed: int, split: str, difficulty: Union[str, Difficulty] = "medium",
             distinct_by: str = "key") -> list[Problem]:
  """`n` distinct problems of one split, the same list for the same arguments.

  Args:
    n: how many problems.
    seed: any integer; different seeds give different lists.
    split: "train", "valid" or "test".
    difficulty: a `Difficulty` or the name of one in `DIFFICULTIES`.
    distinct_by: "key" keeps one problem per arithmetic (for evaluation sets), counted as the splits count it (its
      `split_key`: "4 packs of 2, gets 3 more" and "8 eggs, buys 3 more" are one, and so are "9 pens, loses 4,
      buys 1 more" and "9 cards, finds 1 more, sells 4"); "question" allows the same arithmetic in other words,
      which keeps the difficulty's mix of step counts in large training sets (there are only a few thousand two-step
      problems). Held-out sets distinct by key hold fewer short problems than the difficulty draws, there being
      fewer short arithmetics.

  Raises:
    ValueError: an unknown split or `distinct_by`, or a split with fewer than about `n` distinct problems.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if distinct_by not in ("key", "question"):
    raise ValueError(f"distinct_by must be 'key' or 'question', got {distinct_by!r}")
  difficulty = get_difficulty(difficulty)
  rng = random.Random(f"word_problems:{split}:{seed}")
  problems, seen = [], set()
  if n < 0:
    raise ValueError(f"n={n}: ask for zero or more problems")
  if n == 0:
    return problems
  for _ in range(_MAX_DRAWS_PER_PROBLEM * n):
    problem = sample_problem(rng, difficulty)
    identity = problem.split_key if distinct_by == "key" else problem.question
    if identity not in seen and split_of(problem.split_key) == split:
      seen.add(identity)
      problems.append(problem)
      if len(problems) == n:  # checked here, so the n-th problem may come on the last allowed draw
        return problems
  raise ValueError(f"found only {len(problems)} distinct {split} problems of {difficulty} in "
                   f"{_MAX_DRAWS_PER_PROBLEM * n} draws; ask for fewer or make them harder")


def sample_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
  """One random problem of `difficulty`, of any split."""
  num_steps = rng.randint(difficulty.min_steps, difficulty.max_steps)
  name, pronoun = rng.choice(NAMES)
  item = rng.choice(ITEMS)
  steps = []
  if rng.random() < 0.5:
    containers = rng.randint(2, difficulty.max_containers)
    per_container = rng.randint(2, min(difficulty.max_operand, difficulty.max_value // containers))
    clue = f"{containers} {rng.choice(CONTAINERS)} of {per_container}"
    sentences = [f"{name} has {clue} {item}."]
    steps.append(Step(containers, "*", per_container, containers * per_container, clue))
    start = containers
  else:
    start = rng.randint(2, difficulty.max_start)
    sentences = [f"{name} has {start} {item}."]
  value = steps[-1].result if steps else start
  while len(steps) < num_steps:
    step = _sample_step(rng, value, difficulty)
    sentences.append(f"{pronoun} {step.clue}.")
    steps.append(step)
    value = step.result
  sentences.append(f"How many {item} does {name} have now?")
  return Problem(question=" ".join(sentences), answer=str(value), steps=tuple(steps), start=start)


def _sample_step(rng: random.Random, value: int, difficulty: Difficulty) -> Step:
  """A random operation on `value` that keeps the quantity in [1, max_value]."""
  choices = {}
  if value + 1 <= difficulty.max_value:
    choices["+"] = min(difficulty.max_operand, difficulty.max_value - value)
  if value >= 2:
    choices["-"] = min(difficulty.max_operand, value - 1)
  factors = [k for k in MUL_CLUES if value * k <= difficulty.max_value]
  if factors:
    choices["*"] = None
  op = rng.choices(list(choices), weights=[_OP_WEIGHTS[o] for o in choices])[0]
  if op == "*":
    factor = rng.choice(factors)
    return Step(value, "*", factor, value * factor, MUL_CLUES[factor])
  operand = rng.randint(1, choices[op])
  clue = rng.choice(ADD_CLUES if op == "+" else SUB_CLUES).format(n=operand)
  return Step(value, op, operand, _apply(value, op, operand), clue)


def _apply(left: int, op: str, right: int) -> int:
  return {"+": left + right, "-": left - right, "*": left * right}[op]


def _arithmetic_key(start: int, steps: Sequence[Step]) -> str:
  return str(start) + "".join(f"{s.op}{s.right}" for s in steps)


def _in_canonical_order(steps: Sequence[Step]) -> list[Step]:
  """`steps` with each run of sums and differences, and each run of products, sorted: every order of a run reaches
  the same quantity at its end, so `split_key` counts every order of a run as one problem."""
  ordered = []
  for _, run in itertools.groupby(steps, key=lambda step: step.op == "*"):
    ordered += sorted(run, key=lambda step: (step.op, step.right))
  return ordered


def _render_trace(steps: Iterable[Step], answer: Union[int, str]) -> str:
  thoughts = " ".join(f"{s.clue}: {s.left} {s.op} {s.right} = {s.result}." for s in steps)
  return f"<think>{thoughts}</think> {_answer_sentence(answer)}"


def _answer_sentence(answer: Union[int, str]) -> str:
  return f"The answer is \\boxed{{{answer}}}."


def teacher_trace(problem: Problem) -> str:
  """The assistant's reply with its reasoning: one sentence per step inside <think>, then the boxed answer."""
  return _render_trace(problem.steps, problem.answer)


def direct_answer(problem: Problem) -> str:
  """The assistant's reply without reasoning (the base model's data): only the boxed answer."""
  return _answer_sentence(problem.answer)


def wrong_trace(problem: Problem, rng: random.Random) -> str:
  """A trace with one plausible slip, carried through the later steps to a final answer that is not the gold one.

  The slip is, at a random step, either an arithmetic error (the result off by 1, 2 or 10) or a wrong operator (+
  for -, - for +, + for *). Later steps redo their operations, correctly, on the wrong quantity.
  """
  for _ in range(100):
    index = rng.randrange(problem.num_steps)
    step = problem.steps[index]
    if rng.random() < 0.5:
      slipped = dataclasses.replace(step, result=step.result + rng.choice((-10, -2, -1, 1, 2, 10)))
    else:
      op = {"+": "-", "-": "+", "*": "+"}[step.op]
      slipped = dataclasses.replace(step, op=op, result=_apply(step.left, op, step.right))
    steps = list(problem.steps[:index]) + [slipped]
    for later in problem.steps[index + 1:]:
      left = steps[-1].result
      steps.append(dataclasses.replace(later, left=left, result=_apply(left, later.op, later.right)))
    final = steps[-1].result
    if all(s.result >= 0 for s in steps) and str(final) != problem.answer:
      return _render_trace(steps, final)
  raise ValueError(f"no plausible slip found for {problem.question!r}")


def to_sft_record(problem: Problem, reply: str) -> dict:
  """A chat record (`{"messages": [user, assistant]}`) of the question and an assistant reply."""
  return {"messages": [{"role": "user", "content": problem.question}, {"role": "assistant", "content": reply}]}


def to_eval_record(problem: Problem) -> dict:
  """A prompt record for evaluation and RL: `{"problem": question, "answer": gold}`."""
  return {"problem": problem.question, "answer": problem.answer}


def tokenizer_corpus(difficulties: Optional[Sequence[Difficulty]] = None, *, num_problems: int = 600) -> list[str]:
  """Texts that cover the task's vocabulary, for `phi_jax.hf.tokenizer.build_tiny_tokenizer(corpus=...)`.

  Problems of every difficulty, their traces and direct answers, every name, noun and clue, and the role names of
  the chat templates. Multi-digit numbers are spelled out digit by digit with spaces between them, so the BPE
  learns no merge of two digits and numbers always tokenize one digit at a time.
  """
  rng = random.Random("word_problems:tokenizer_corpus")
  texts = ["user assistant system"]
  for name, pronoun in NAMES:
    texts.append(f"{name} {pronoun} How many does {name} have now?")
  for item in ITEMS:
    texts += [f"{n} {c} of {item}" for n in range(10) for c in CONTAINERS]
  texts += [c.format(n=n) for c in ADD_CLUES + SUB_CLUES for n in range(10)] + list(MUL_CLUES.values())
  for difficulty in difficulties or list(DIFFICULTIES.values()):
    for _ in range(num_problems):
      problem = sample_problem(rng, difficulty)
      texts += [problem.question, teacher_trace(problem), direct_answer(problem)]
  return [re.sub(r"(?<=\d)(?=\d)", " ", text) for text in texts]
