"""Cheap pre-screen of untrusted answer text before it reaches sympy.

sympy evaluates integer powers and factorials eagerly, so a ten-character answer such as `9^{9^{9^9}}` can eat
gigabytes and minutes inside C code that no signal interrupts. The screen rejects, in linear time, the shapes that
do that (power towers of numbers, huge integer exponents and factorials, absurd nesting or digit runs). It is a
filter that saves worker restarts, not the guarantee: the verifier's wall-clock limit per answer is.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# Commands whose letters do not make an exponent symbolic (`2^{3 \cdot 4}` is still a number).
_NUMERIC_COMMANDS = ("\\cdot", "\\times", "\\left", "\\right", "\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\div")
_OPENERS, _CLOSERS = "{([", "})]"


@dataclasses.dataclass(frozen=True)
class ScreenConfig:
  """Limits on an extracted answer (the completion itself may be any length)."""

  max_answer_chars: int = 1000
  max_nesting_depth: int = 24  # of {}, () and [] together
  max_digit_run: int = 128
  max_power_ops: int = 16  # `^` and `**`
  max_exponent_depth: int = 3  # `e^{-x^2}` is depth 2
  max_integer_exponent: int = 100_000  # `2^{100000}` is fine for sympy; `2^{10^9}` is not
  # 10000! has 35,660 digits, about as many as 2^{100000} (30,103), which the exponent limit lets through; sympy
  # computes it in milliseconds, and a year-sized factorial (2024!) is a common olympiad answer.
  max_factorial_operand: int = 10_000


def _brace_matches(text: str) -> dict[int, int]:
  """Open index -> close index for unescaped `{}` and for `()`; unmatched ones are left out."""
  matches, stacks = {}, {"{": [], "(": []}
  closer_to_opener = {"}": "{", ")": "("}
  i = 0
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      i += 2
      continue
    if ch in stacks:
      stacks[ch].append(i)
    elif ch in closer_to_opener and stacks[closer_to_opener[ch]]:
      matches[stacks[closer_to_opener[ch]].pop()] = i
    i += 1
  return matches


def _brace_balance_and_depth(text: str) -> tuple[bool, int]:
  """Whether unescaped `{}` balance, and the deepest nesting of all bracket kinds (closers floor at zero)."""
  braces, depth, deepest = 0, 0, 0
  i = 0
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      i += 2
      continue
    if ch == "{":
      braces += 1
    elif ch == "}":
      braces -= 1
      if braces < 0:
        return False, deepest
    if ch in _OPENERS:
      depth += 1
      deepest = max(deepest, depth)
    elif ch in _CLOSERS:
      depth = max(0, depth - 1)  # intervals like `[1, 2)` mix bracket kinds
    i += 1
  return braces == 0, deepest


def _is_digit(ch: str) -> bool:
  """An ASCII digit. Not `str.isdigit`, which holds for superscripts ('²') that `int` refuses (math-verify reads
  '3²' as 3: they are no digits of a number)."""
  return "0" <= ch <= "9"


def _longest_digit_run(text: str) -> int:
  longest = run = 0
  for ch in text:
    run = run + 1 if _is_digit(ch) else 0
    longest = max(longest, run)
  return longest


def _operand_end(text: str, start: int, matches: dict[int, int]) -> int:
  """End (exclusive) of the operand starting at `start`: a group, a command with its groups, a number or a char."""
  i = start
  while i < len(text) and text[i] in " \t":
    i += 1
  while i < len(text) and text[i] in "+-":
    i += 1
  if i >= len(text):
    return i
  if i in matches:
    return matches[i] + 1
  if text[i] == "\\":
    j = i + 1
    while j < len(text) and text[j].isalpha():
      j += 1
    for _ in range(2):  # `\frac{a}{b}`, `\sqrt{x}`
      if j in matches and text[j] == "{":
        j = matches[j] + 1
    return max(j, i + 2)
  if _is_digit(text[i]) or text[i] == ".":
    j = i
    while j < len(text) and (_is_digit(text[j]) or text[j] == "."):
      j += 1
    return j
  return i + 1


def _is_numeric(operand: str) -> bool:
  for command in _NUMERIC_COMMANDS:
    operand = operand.replace(command, "")
  return not any(ch.isalpha() for ch in operand)


def _integer_value(operand: str) -> Optional[int]:
  digits = operand.strip().strip("{}()").strip().lstrip("+-").strip()
  return int(digits) if digits and all(map(_is_digit, digits)) else None


def _power_problem(text: str, config: ScreenConfig) -> Optional[str]:
  """Why the powers in `text` (`**` already written `^`) are dangerous, or None."""
  carets = [i for i, ch in enumerate(text) if ch == "^"]
  if len(carets) > config.max_power_ops:
    return f"more than {config.max_power_ops} powers"
  if not carets:
    return None
  matches = _brace_matches(text)
  # Exponent ranges [start, end); a `^` right after an exponent (`9^9^9`, as plain `9**9**9` parses) nests in it.
  ranges: list[list[int]] = []
  for caret in carets:
    end = _operand_end(text, caret + 1, matches)
    for r in ranges:
      if text[r[1]:caret].strip() == "" and r[1] <= caret:
        r[1] = max(r[1], end)
    ranges.append([caret + 1, end])
  for caret, (start, end) in zip(carets, ranges):
    depth = 1 + sum(1 for s, e in ranges if s <= caret < e)
    if depth > config.max_exponent_depth:
      return f"exponents nested {depth} deep"
    operand = text[start:end]
    value = _integer_value(operand)
    if value is not None and value > config.max_integer_exponent:
      return f"integer exponent {value} over {config.max_integer_exponent}"
    if "^" in operand and _is_numeric(operand):
      return "a power tower of numbers"
    if value is None and _is_numeric(operand):
      if "!" in operand:
        return "a factorial in an exponent"
      bound = _numeric_bound(operand, config.max_integer_exponent)
      if bound > config.max_integer_exponent:
        return f"a computed exponent (up to {bound}) over {config.max_integer_exponent}"
  return None


def _factorial_problem(text: str, config: ScreenConfig) -> Optional[str]:
  """Why a factorial in `text` is dangerous (a huge literal operand, or a numeric group with powers/factorials)."""
  closer_to_open = {close: open_ for open_, close in _brace_matches(text).items()}
  for i, ch in enumerate(text):
    if ch != "!":
      continue
    j = i - 1
    while j >= 0 and text[j] in " \t":
      j -= 1
    if j < 0:
      continue
    if text[j] == "!":  # math-verify reads n!! (a double factorial) as (n!)!: 10!! is a 3.6-million-digit number
      return "a factorial of a factorial"
    if _is_digit(text[j]):
      k = j
      while k >= 0 and _is_digit(text[k]):
        k -= 1
      if int(text[k + 1:j + 1]) > config.max_factorial_operand:
        return f"factorial of {text[k + 1:j + 1]}"
    elif j in closer_to_open:
      group = text[closer_to_open[j] + 1:j]
      if _is_numeric(group) and ("^" in group or "!" in group):
        return "factorial of a power or factorial"
      if _is_numeric(group) and _numeric_bound(group, config.max_factorial_operand) > config.max_factorial_operand:
        return f"factorial of {group.strip()!r}, possibly over {config.max_factorial_operand}"
  return None


def _numeric_bound(operand: str, limit: int) -> int:
  """An upper bound on the value of a numeric operand without powers or factorials (`{99999 \\cdot 99999}`,
  `(100000000)`): the product of its numbers, each counted as at least 2, which no sum, product or quotient of
  them exceeds. Stops once past `limit`, so a long operand stays a linear scan."""
  bound, run = 1, ""
  for ch in operand + " ":
    if _is_digit(ch):
      run += ch
      continue
    if run:
      bound *= max(int(run), 2) if len(run) <= 18 else limit + 1
      run = ""
      if bound > limit:
        return bound
  return bound


def screen_problem(answer: str, config: ScreenConfig = ScreenConfig()) -> Optional[str]:
  """Why `answer` should not be handed to sympy, or None when it may be."""
  if len(answer) > config.max_answer_chars:
    return f"longer than {config.max_answer_chars} characters"
  balanced, depth = _brace_balance_and_depth(answer)
  if not balanced:
    return "unbalanced braces"
  if depth > config.max_nesting_depth:
    return f"nested {depth} deep"
  if _longest_digit_run(answer) > config.max_digit_run:
    return f"a number longer than {config.max_digit_run} digits"
  text = answer.replace("**", "^")
  return _power_problem(text, config) or _factorial_problem(text, config)


def passes_screen(answer: str, config: ScreenConfig = ScreenConfig()) -> bool:
  return screen_problem(answer, config) is None
