"""The n-gram repetition penalty of the Phi-4-reasoning-plus reward."""

from __future__ import annotations

import collections
from typing import Sequence, Union


def repetition_penalty(tokens: Union[str, Sequence], *, n: int = 5, max_count: int = 5) -> float:
  """R_rep in [-1, 0]: how much of the completion is n-grams repeated more than `max_count` times.

  With N tokens (a string is split on white space; token ids work as they are), c(g) the count of n-gram type g
  among the N - n + 1 n-grams, T the set of types and R = {g in T : c(g) > max_count}:

      R_rep = 0                                                   if R is empty
      R_rep = -max(|R| / |T|,  min(1, max_g c(g) / (N / n)))      otherwise

  The first term is the share of n-gram types that repeat too often (near 1 when the whole completion loops), the
  second the top frequency relative to N / n, the number of n-grams that fit in the text without overlapping (near
  1 when one short phrase loops through most of an otherwise varied text). A text with no n-gram above
  `max_count` gets 0.
  """
  units = tokens.split() if isinstance(tokens, str) else list(tokens)
  num_ngrams = len(units) - n + 1
  if num_ngrams <= 0:
    return 0.0
  counts = collections.Counter(tuple(units[i:i + n]) for i in range(num_ngrams))
  repeated = sum(1 for c in counts.values() if c > max_count)
  if not repeated:
    return 0.0
  return -max(repeated / len(counts), min(1.0, max(counts.values()) * n / len(units)))
