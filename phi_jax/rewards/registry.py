"""Named reward functions with one signature, their weighted sums, and batch scoring.

Every reward is called as

    fn(completion: str, gold: str, *, length: int, finished: bool, correct: bool | None = None) -> float

`length` is the completion's length in tokens, `finished` whether the sampler stopped on an end-of-turn token, and
`correct` the verifier's verdict when the caller already has it (None: the reward verifies the answer itself).
A reward returns a finite number for every completion: 0.0 where it does not apply (a None, TRL's way of saying
so, or a NaN is refused by `CombinedReward`, naming the reward).
`score_batch` verifies a whole batch in parallel once and passes `correct` down. The rewards are plain functions
and frozen dataclasses; a training run picks and weights them with the gin binding `reward.weights = {"length_aware":
1.0, "format": 0.1}` (`experiments/common.py`), which builds `combine(weights)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, ClassVar, Mapping, Optional, Sequence, Union

from phi_jax.rewards.length_aware import LengthAwareRewardConfig, length_aware_reward
from phi_jax.rewards.repetition import repetition_penalty
from phi_jax.rewards.think_format import ThinkFormat, format_ok
from phi_jax.rewards.verifier import VerifierPool, is_correct, reading_with, think_format, verify_batch

RewardFn = Callable[..., float]


def _verdict(correct: Optional[bool], completion: str, gold: str) -> bool:
  return is_correct(completion, gold) if correct is None else correct


def correctness(completion: str, gold: str, *, length: int, finished: bool, correct: Optional[bool] = None) -> float:
  """1.0 when the completion ended its turn and its final answer equals the gold answer, else 0.0.

  A completion cut at the length limit scores 0 whatever it wrote before the cut: counted correct, an answer
  followed by a loop that never stops would be rewarded (GRPO) or chosen (rollout DPO) as a solution.
  """
  del length
  return float(finished and _verdict(correct, completion, gold))


correctness.uses_correctness = True


@dataclasses.dataclass(frozen=True)
class FormatReward:
  """1.0 for a well-formed think block and an end-of-turn token, else 0.0. `fmt` None: the verifier's think format
  (`phi_jax.rewards.configure`, or the pool given to `score_batch`), so a template that opens `<think>` in the
  prompt is configured once."""

  fmt: Optional[ThinkFormat] = None
  uses_correctness: ClassVar[bool] = False

  def __call__(self, completion: str, gold: str, *, length: int, finished: bool,
               correct: Optional[bool] = None) -> float:
    del gold, length, correct
    return float(format_ok(completion, finished=finished, fmt=self.fmt or think_format()))


@dataclasses.dataclass(frozen=True)
class RepetitionReward:
  """The n-gram repetition penalty R_rep in [-1, 0] on white-space tokens (see `repetition_penalty`)."""

  n: int = 5
  max_count: int = 5
  uses_correctness: ClassVar[bool] = False

  def __call__(self, completion: str, gold: str, *, length: int, finished: bool,
               correct: Optional[bool] = None) -> float:
    del gold, length, finished, correct
    return repetition_penalty(completion, n=self.n, max_count=self.max_count)


@dataclasses.dataclass(frozen=True)
class LengthAwareReward:
  """The Phi-4-reasoning-plus reward (see `length_aware`)."""

  config: LengthAwareRewardConfig = LengthAwareRewardConfig()
  uses_correctness: ClassVar[bool] = True

  def __call__(self, completion: str, gold: str, *, length: int, finished: bool,
               correct: Optional[bool] = None) -> float:
    return length_aware_reward(completion, correct=_verdict(correct, completion, gold), length=length,
                               finished=finished, config=self.config)


REWARDS: dict[str, RewardFn] = {
    "correctness": correctness,
    "format": FormatReward(),
    "repetition": RepetitionReward(),
    "length_aware": LengthAwareReward(),
}


def get_reward(name: str) -> RewardFn:
  """The reward registered under `name`."""
  if name not in REWARDS:
    raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
  return REWARDS[name]


def uses_correctness(fn: RewardFn) -> bool:
  """Whether `fn` needs the verifier's verdict (unknown functions are assumed to)."""
  return getattr(fn, "uses_correctness", True)


@dataclasses.dataclass(frozen=True)
class CombinedReward:
  """sum_i weight_i * reward_i, verifying the answer at most once per completion. `names`: each term's registry
  name (reward.weights' key), which names a reward that returns no finite number."""

  terms: tuple[tuple[RewardFn, float], ...]
  names: tuple[str, ...] = ()

  @property
  def uses_correctness(self) -> bool:
    return any(uses_correctness(fn) for fn, _ in self.terms)

  def __call__(self, completion: str, gold: str, *, length: int, finished: bool,
               correct: Optional[bool] = None) -> float:
    if correct is None and self.uses_correctness:
      correct = is_correct(completion, gold)
    total = 0.0
    for i, (fn, weight) in enumerate(self.terms):
      value = fn(completion, gold, length=length, finished=finished, correct=correct)
      number = _finite_number(value)
      if number is None:  # a None (TRL's "does not apply") fails in the sum, a NaN spreads through GRPO's advantages
        name = self.names[i] if i < len(self.names) else getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(f"reward {name!r} (reward.weights) returned {value!r} for a completion: every reward must "
                         "return a finite number for every completion; where it does not apply, return 0.0")
      total += weight * number
    return total


def _finite_number(value) -> Optional[float]:
  """`value` as a float (a numpy or JAX scalar, a bool too); None for text, None, NaN, infinities and the like."""
  if isinstance(value, (str, bytes)):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def combine(weights: Mapping[Union[str, RewardFn], float]) -> CombinedReward:
  """A weighted sum of rewards given by registry name (or as callables)."""
  return CombinedReward(tuple((get_reward(k) if isinstance(k, str) else k, float(w)) for k, w in weights.items()),
                        tuple(k if isinstance(k, str) else getattr(k, "__name__", type(k).__name__) for k in weights))


def score_batch(reward: Union[str, RewardFn], completions: Sequence[str], golds: Sequence[str], *,
                lengths: Sequence[int], finished: Sequence[bool], pool: Optional[VerifierPool] = None,
                timeout_s: Optional[float] = None) -> list[float]:
  """`reward` over a batch; correctness comes from one parallel `verify_batch` call when the reward needs it.

  With a `pool`, the format rewards read completions with its think format, as its verifier does."""
  fn = get_reward(reward) if isinstance(reward, str) else reward
  if not len(completions) == len(golds) == len(lengths) == len(finished):
    raise ValueError("completions, golds, lengths and finished must have the same length")
  if uses_correctness(fn):
    verdicts = verify_batch(completions, golds, timeout_s=timeout_s, pool=pool)
  else:
    verdicts = [None] * len(completions)
  with reading_with(pool.config.think) if pool is not None else contextlib.nullcontext():
    return [fn(c, g, length=int(n), finished=bool(f), correct=v)
            for c, g, n, f, v in zip(completions, golds, lengths, finished, verdicts)]
