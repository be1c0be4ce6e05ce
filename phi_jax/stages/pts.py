"""Pivotal Token Search (the preference pairs of Phi-4's first DPO round): the tokens of a completion that move its
chance of success, each turned into a pair of one-token completions after the prefix before it.

    estimate = sampled_estimator(params, config, tokenizer, "What is 2 + 3?", "5", k=16, sampling=sampling, rng=key)
    pairs = pivotal_pairs(completion_ids, estimate, p_gap=0.2)   # [TokenPair(prefix, chosen, rejected, ...)]
    records = [pair_record(tokenizer, "What is 2 + 3?", pair) for pair in pairs]   # DPO pair files' records

p(success | prefix) is estimated by sampling completions that continue the prefix and checking each with an oracle
(`Estimate`; `sampled_estimator` does it with `phi_jax.sampling.generate` and `phi_jax.rewards.verify_batch`). The
search (`find_pivotal_tokens`) splits the completion at its midpoint, recursively, until a span changes p(success)
by less than `p_gap` or is one token; every prefix is estimated once. A one-token span that moves p(success) by
`p_gap` or more is pivotal. Its pair (`pivotal_pairs`) takes the prefix before it as the prompt and, as the other
completion, the token the samples from that prefix chose most often in its place (ties to the lower id), whose own
p(success) is estimated; the side with the higher p(success) is chosen, and a pair whose two sides differ by less
than `p_gap` is not made. Only questions whose p(success) is in [0.2, 0.8] are worth the search
(`worth_searching`): for the others most tokens change little, and the estimates are too coarse to tell.

A record (`pair_record`) ends its prompt with the assistant message holding the prefix's text, which
`phi_jax.data.preference` reads as a continuation: its rows score the one token alone. Where the tokenizer merges the
prefix's text with the token's into other ids, the pair has no exact row and `pair_record` returns None.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from phi_jax.data import chat
from phi_jax.sampling import filters
from phi_jax.sampling.sampler import SamplingConfig, generate

# Questions whose p(success) lies outside these bounds are not searched.
SEARCH_RANGE = (0.2, 0.8)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """p(success | prefix) as estimated from sampled continuations: `p`, and each sample's first token and verdict
  (empty where nothing was sampled: the prefix is a finished completion, judged as it is)."""
  p: float
  first_tokens: tuple[int, ...] = ()
  successes: tuple[bool, ...] = ()


@dataclasses.dataclass(frozen=True)
class PivotalToken:
  position: int  # index in the completion
  token: int
  p_before: float  # p(success) of the prefix before the token
  p_after: float  # and with it


@dataclasses.dataclass(frozen=True)
class TokenPair:
  prefix: tuple[int, ...]  # completion ids before the pivotal token
  chosen: int
  rejected: int
  p_chosen: float  # p(success) of the prefix followed by each token
  p_rejected: float
  pivotal: PivotalToken


Estimator = Callable[[tuple[int, ...]], Estimate]


def worth_searching(p_question: float, search_range: tuple[float, float] = SEARCH_RANGE) -> bool:
  """Whether a question whose completions succeed with probability `p_question` is searched."""
  return search_range[0] <= p_question <= search_range[1]


def _check_p_gap(p_gap: float) -> None:
  if not 0.0 < p_gap <= 1.0:
    raise ValueError(f"p_gap={p_gap} must be in (0, 1]: the least change of p(success) that makes a token pivotal")


class Memo:
  """An estimator that makes each prefix's estimate once; pass one to `find_pivotal_tokens` and `pivotal_pairs` to share
  their estimates."""

  def __init__(self, estimate: Estimator):
    self.estimate, self.seen = estimate, {}

  def __call__(self, prefix: Sequence[int]) -> Estimate:
    prefix = tuple(int(t) for t in prefix)
    if prefix not in self.seen:
      self.seen[prefix] = self.estimate(prefix)
    return self.seen[prefix]


def find_pivotal_tokens(completion: Sequence[int], estimate: Estimator, p_gap: float) -> list[PivotalToken]:
  """The tokens of `completion` whose one-token span changes p(success) by `p_gap` or more, in order.

  `estimate(prefix)` gives p(success) after a prefix of the completion (the empty one: the question alone; the whole
  one: the completion as it is). Spans whose ends differ by less than `p_gap` are not split further, so a token
  inside one is not found even where it moves p(success) and a later one moves it back."""
  _check_p_gap(p_gap)
  ids = tuple(int(t) for t in completion)
  memo = estimate if isinstance(estimate, Memo) else Memo(estimate)
  found = []
  spans = [(0, len(ids))]  # a stack: the left half is searched first, so tokens come out in order
  while spans:
    lo, hi = spans.pop()
    p_lo, p_hi = memo(ids[:lo]).p, memo(ids[:hi]).p
    if abs(p_hi - p_lo) < p_gap:
      continue
    if hi - lo == 1:
      found.append(PivotalToken(position=lo, token=ids[lo], p_before=p_lo, p_after=p_hi))
      continue
    mid = (lo + hi) // 2
    spans += [(mid, hi), (lo, mid)]
  return found


def pivotal_pairs(completion: Sequence[int], estimate: Estimator, p_gap: float) -> list[TokenPair]:
  """A pair for each pivotal token of `completion` that has an alternative its samples chose, whose p(success)
  differs from the token's by `p_gap` or more (see the module's docstring)."""
  memo = estimate if isinstance(estimate, Memo) else Memo(estimate)
  ids = tuple(int(t) for t in completion)
  pairs = []
  for pivotal in find_pivotal_tokens(ids, memo, p_gap):
    prefix = ids[:pivotal.position]
    counts = collections.Counter(t for t in memo(prefix).first_tokens if t != pivotal.token)
    if not counts:
      continue
    alternative = min(counts, key=lambda t: (-counts[t], t))
    p_alternative = memo(prefix + (alternative,)).p
    if abs(p_alternative - pivotal.p_after) < p_gap:
      continue
    (p_chosen, chosen), (p_rejected, rejected) = sorted(
        [(pivotal.p_after, pivotal.token), (p_alternative, alternative)], reverse=True)
    pairs.append(TokenPair(prefix=prefix, chosen=chosen, rejected=rejected, p_chosen=p_chosen,
                           p_rejected=p_rejected, pivotal=pivotal))
  return pairs


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def sampled_estimator(params, config, tokenizer, prompt: Any, answer: str, *, k: int, sampling: SamplingConfig,
                      rng: jax.Array, verify: Optional[Callable[[list[str], list[str]], list[bool]]] = None,
                      system_prompt: Optional[str] = None, mesh=None, length_multiple: int = 64) -> Estimator:
  """p(success | prefix) for completions of `prompt` (a question or a conversation ending with a user message)
  whose final answer should be `answer`: k continuations of the prompt (as generation renders it,
  `chat.render_prompt`) followed by the prefix, each prefix + continuation decoded and checked with `verify`
  (`phi_jax.rewards.verify_batch` by default); a continuation that never emits a stop token counts as wrong. A
  prefix that already ends with a stop token is judged as it is (p is 0 or 1). Continuation j of a prefix draws with
  a key folded from the prefix's ids and j, so an estimate does not depend on which prefixes were estimated before.
  Prompt widths are rounded up to `length_multiple` so that one compiled program serves many prefixes."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k!r} must be a positive whole number of samples per estimate")
  if verify is None:
    from phi_jax.rewards import verify_batch  # pylint: disable=import-outside-toplevel
    verify = verify_batch
  if not sampling.stop_token_ids:
    sampling = dataclasses.replace(sampling, stop_token_ids=chat.stop_token_ids(tokenizer))
  stops = set(sampling.stop_token_ids)
  rendered = chat.render_prompt(tokenizer, prompt, system_prompt=system_prompt)

  def text(ids: Sequence[int]) -> str:
    ended = bool(ids) and ids[-1] in stops
    return tokenizer.decode(list(ids[:-1] if ended else ids), skip_special_tokens=False)

  def estimate(prefix: tuple[int, ...]) -> Estimate:
    if prefix and prefix[-1] in stops:
      return Estimate(p=float(verify([text(prefix)], [answer])[0]))
    ids = rendered + list(prefix)
    width = _round_up(len(ids), length_multiple)
    tokens = np.zeros((k, width), np.int32)
    tokens[:, :len(ids)] = ids
    lengths = np.full((k,), len(ids), np.int32)
    key = jax.random.fold_in(rng, zlib.crc32(np.asarray(prefix, np.int64).tobytes()) & 0x7FFFFFFF)
    out = generate(params, config, tokens, lengths, filters.row_keys(key, np.arange(k)), sampling, mesh=mesh)
    out = multihost_utils.process_allgather(out, tiled=True)  # every process gets every row (and judges them alike)
    continuations = [[int(t) for t in out["tokens"][row, :out["lengths"][row]]] for row in range(k)]
    finished = [bool(f) for f in out["finished"]]
    verdicts = verify([text(prefix + tuple(c)) for c in continuations], [answer] * k)
    successes = tuple(bool(v) and done for v, done in zip(verdicts, finished))
    return Estimate(p=sum(successes) / k, first_tokens=tuple(c[0] for c in continuations if c),
                    successes=successes)

  return estimate


def pair_record(tokenizer, prompt: Any, pair: TokenPair, *, system_prompt: Optional[str] = None
                ) -> Optional[dict[str, Any]]:
  """A DPO pair record of `pair` (`phi_jax.data.preference`'s format): the prompt's messages followed by an
  assistant message holding the prefix's text, and each side one token's text; None where that text does not give
  back the same ids (the tokenizer merges across the boundary), as such a pair has no exact row, and where a side is
  a special token (an end of turn, which a continuation's text cannot hold)."""
  from phi_jax.data import preference  # pylint: disable=import-outside-toplevel

  if {pair.chosen, pair.rejected} & set(tokenizer.all_special_ids):  # an end of turn: not a text continuation
    return None
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  record = {"prompt": messages + [{"role": "assistant", "content": tokenizer.decode(list(pair.prefix))}],
            "chosen": tokenizer.decode([pair.chosen]), "rejected": tokenizer.decode([pair.rejected]),
            "p_chosen": pair.p_chosen, "p_rejected": pair.p_rejected}
  checked, bad = preference.validate_pair(record)
  if bad is not None:
    raise ValueError(f"the pair's record is not a valid preference pair: {bad[0]}: {bad[1]}")
  room = 2 * (len(chat.render_prompt(tokenizer, messages, system_prompt=system_prompt)) + len(pair.prefix)) + 64
  try:
    rows, _ = preference.encode_pair(tokenizer, checked, seq_len=room, system_prompt=system_prompt)
  except ValueError:  # the tokenizer merges the prefix's text with the token's: no exact per-token mask
    return None
  for side in preference.SIDES:
    row = rows[side]
    if row["tokens"][row["loss_mask"] == 1].tolist() != [getattr(pair, side)]:
      return None
  return record
