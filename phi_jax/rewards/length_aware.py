"""The Phi-4-reasoning-plus reward: length-aware accuracy plus a repetition penalty.

    R = w_acc * R_acc + w_rep * R_rep

R_acc (ρ clipped to [0, 1], L the completion length in tokens):
- correct: ρ = (L - l_pos_control) / (l_max - l_pos_control), R_acc = 0.75 + 0.25 cos(πρ): 1.0 up to l_pos_control,
  falling to 0.5 at l_max, so right answers are nudged to be concise;
- wrong: ρ = L / l_neg_control, R_acc = -0.75 - 0.25 cos(πρ): -1.0 for an empty answer, rising to -0.5 at
  l_neg_control and beyond, so wrong answers are nudged to think longer;
- no end-of-turn token (cut at the length limit): R_acc = unfinished_score (-0.5), whatever the answer;
- otherwise a missing or malformed think block: R_acc = bad_format_score (-1.0).
The 0.75 / 0.25 above come from the four end points, which are settings as well. R_rep is
`repetition.repetition_penalty`. Source: Phi-4-reasoning technical report (arXiv 2504.21318), section on RL.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from phi_jax.rewards.repetition import repetition_penalty
from phi_jax.rewards.think_format import ThinkFormat, think_format_ok
from phi_jax.rewards.verifier import think_format


@dataclasses.dataclass(frozen=True)
class LengthAwareRewardConfig:
  """Constants of the length-aware reward, at the paper's 32K context (responses cut at 31K tokens)."""

  l_max: int = 31744
  l_pos_control: int = 25600
  l_neg_control: int = 3702
  correct_short: float = 1.0  # R_acc of a correct answer no longer than l_pos_control
  correct_long: float = 0.5  # ... of a correct answer of length l_max
  wrong_short: float = -1.0  # ... of a wrong answer of length 0
  wrong_long: float = -0.5  # ... of a wrong answer at least l_neg_control long
  unfinished_score: float = -0.5
  bad_format_score: float = -1.0
  w_acc: float = 8 / 13
  w_rep: float = 1 / 13
  rep_ngram: int = 5
  rep_max_count: int = 5
  # None: the verifier's (`phi_jax.rewards.configure` or the pool given to `score_batch`; `<think>` by default)
  think: Optional[ThinkFormat] = None

  def __post_init__(self):
    if not (0 <= self.l_pos_control < self.l_max and self.l_neg_control > 0):
      raise ValueError(f"need 0 <= l_pos_control < l_max and l_neg_control > 0, got {self.l_pos_control}, "
                       f"{self.l_max}, {self.l_neg_control}")

  def scaled_to(self, max_length: int) -> LengthAwareRewardConfig:
    """The same reward shape for a run whose responses are cut at `max_length` tokens (all lengths scaled)."""
    if not self._scalable_to(max_length):
      # Checked here, so the message names the budget the user set rather than the constants derived from it.
      smallest = next(n for n in range(1, self.l_max + 1) if self._scalable_to(n))
      raise ValueError(f"the length-aware reward cannot be scaled to a response budget of {max_length} tokens "
                       "(grpo.max_new_tokens, or reward.length_aware_max_tokens when set): its full-reward and "
                       f"shrinking ranges need at least {smallest} tokens; raise the budget to at least {smallest}")
    ratio = max_length / self.l_max
    return dataclasses.replace(self, l_max=max_length, l_pos_control=round(self.l_pos_control * ratio),
                               l_neg_control=max(1, round(self.l_neg_control * ratio)))

  def _scalable_to(self, max_length: int) -> bool:
    """Whether l_pos_control scaled to `max_length` stays below it (l_neg_control is kept >= 1 anyway)."""
    return max_length > 0 and round(self.l_pos_control * max_length / self.l_max) < max_length


def _cosine(rho: float, at_zero: float, at_one: float) -> float:
  """at_zero when ρ = 0, at_one when ρ = 1, half a cosine period in between."""
  rho = min(max(rho, 0.0), 1.0)
  return at_one + (at_zero - at_one) * 0.5 * (1.0 + math.cos(math.pi * rho))


def length_scaled_accuracy(correct: bool, length: int, config: LengthAwareRewardConfig) -> float:
  """R_acc of a finished, well-formed completion of `length` tokens."""
  if correct:
    rho = (length - config.l_pos_control) / (config.l_max - config.l_pos_control)
    return _cosine(rho, config.correct_short, config.correct_long)
  return _cosine(length / config.l_neg_control, config.wrong_short, config.wrong_long)


def accuracy_term(completion: str, *, correct: bool, length: int, finished: bool,
                  config: LengthAwareRewardConfig) -> float:
  """R_acc with the end-of-turn and think-format overrides applied (see the module docstring)."""
  if not finished:
    return config.unfinished_score
  if not think_format_ok(completion, config.think or think_format()):
    return config.bad_format_score
  return length_scaled_accuracy(correct, length, config)


def length_aware_reward(completion: str, *, correct: bool, length: int, finished: bool,
                        config: LengthAwareRewardConfig = LengthAwareRewardConfig()) -> float:
  """R = w_acc * R_acc + w_rep * R_rep for one completion whose correctness is already known."""
  r_acc = accuracy_term(completion, correct=correct, length=length, finished=finished, config=config)
  r_rep = repetition_penalty(completion, n=config.rep_ngram, max_count=config.rep_max_count)
  return config.w_acc * r_acc + config.w_rep * r_rep
