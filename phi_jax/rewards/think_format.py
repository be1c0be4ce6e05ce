"""Format checks on a reasoning completion: one well-formed think block, and a proper end of turn."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ThinkFormat:
  """What a well-formed reasoning completion looks like.

  `prompt_opens_think`: the chat template already ends the prompt with `open_tag`, so the completion starts inside
  the think block and must not contain `open_tag` itself. `require_solution`: something must follow `close_tag`.
  """

  open_tag: str = "<think>"
  close_tag: str = "</think>"
  prompt_opens_think: bool = False
  require_solution: bool = True


def think_format_ok(completion: str, fmt: ThinkFormat = ThinkFormat()) -> bool:
  """Exactly one `<think>` ... `</think>`, in that order, opening the completion, with non-empty thoughts (and a
  solution after it)."""
  text = fmt.open_tag + completion if fmt.prompt_opens_think else completion
  if text.count(fmt.open_tag) != 1 or text.count(fmt.close_tag) != 1:
    return False
  start = text.index(fmt.open_tag) + len(fmt.open_tag)
  close = text.index(fmt.close_tag)
  if close < start or not text[start:close].strip():
    return False
  if text[:text.index(fmt.open_tag)].strip():
    return False  # the think block opens the completion
  return not fmt.require_solution or bool(text[close + len(fmt.close_tag):].strip())


def format_ok(completion: str, *, finished: bool, fmt: ThinkFormat = ThinkFormat()) -> bool:
  """A well-formed think block and an end-of-turn token (`finished`: the sampler stopped on a stop token)."""
  return finished and think_format_ok(completion, fmt)
