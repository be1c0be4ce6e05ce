"""Cheap pre-screen of untrusted answer text before it reaches sympy.

sympy evaluates integer powers and factorials eagerly, so a ten-character answer such as `9^{9^{9^9}}` can eat
gigabytes and minutes inside C code that no signal interrupts. The screen rejects, in about linear time, what does
that: exponents, factorial operands, `\\Gamma` and binomial arguments of numbers that may exceed its limits (bounded
from their literal numbers, so `2^{2^{3}}` and `(3!)!` pass while `9^{9^{9}}` and `2^{20}!` do not; a power or
factorial the bound cannot read is rejected), absurd nesting or digit runs. It is a filter that saves worker
restarts, not the guarantee: the verifier's wall-clock limit per answer is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

# Commands whose letters do not make an exponent symbolic (`2^{3 \cdot 4}` is still a number): sympy computes
# `7^{\lfloor 10^{8} \rfloor}` exactly, and the verifier reads a repeating decimal (`\overline`) as an exact fraction.
_NUMERIC_COMMANDS = ("\\cdot", "\\times", "\\left", "\\right", "\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\div",
                     "\\overline", "\\lfloor", "\\rfloor", "\\lceil", "\\rceil", "\\lvert", "\\rvert", "\\vert",
                     "\\lbrack", "\\rbrack", "\\lbrace", "\\rbrace", "\\cfrac", "\\over")
# (`\over` last: `_is_numeric` removes the commands in this order, `\overline` first.)
# Functions of numbers that sympy evaluates exactly, as large as factorials (math-verify reads these spellings).
_GAMMA_COMMANDS = ("Gamma",)
_BINOMIAL_COMMANDS = ("binom", "dbinom", "tbinom")
_FUNCTION_COMMANDS = tuple("\\" + name for name in _GAMMA_COMMANDS + _BINOMIAL_COMMANDS)
# Spellings that put a number under a fraction bar, where a tiny one makes a huge quotient (1/0.0000001 is 10^7).
_DIVISIONS = ("/", ":", "÷", "\\div", "\\frac", "\\dfrac", "\\tfrac", "\\cfrac", "\\over")
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
  for command in _NUMERIC_COMMANDS + _FUNCTION_COMMANDS:
    operand = operand.replace(command, "")
  return not any(ch.isalpha() for ch in operand)


def _is_flat(operand: str) -> bool:
  """Whether a numeric operand holds no power, factorial or function, so that `_numeric_bound` bounds it."""
  return "^" not in operand and "!" not in operand and not any(f in operand for f in _FUNCTION_COMMANDS)


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
    if value is None and _is_numeric(operand):
      problem = _exponent_problem(operand, config.max_integer_exponent)
      if problem:
        return problem
  return None


def _exponent_problem(operand: str, limit: int) -> Optional[str]:
  """Why a numeric exponent other than a plain integer may exceed `limit` (ScreenConfig.max_integer_exponent)."""
  if _is_flat(operand):
    bound = _numeric_bound(operand, limit)
    return f"a computed exponent (up to {bound}) over {limit}" if bound > limit else None
  bound = _value_bound(operand, limit)
  if bound is not None and bound <= limit:
    return None
  if "^" in operand:
    return f"a power tower of numbers with an exponent possibly over {limit}"
  if "!" in operand:
    return f"a factorial in an exponent, possibly over {limit}"
  return f"a computed exponent possibly over {limit}"


def _factorial_problem(text: str, config: ScreenConfig) -> Optional[str]:
  """Why a factorial in `text` is dangerous: a numeric operand (a number or group, with the power it is the exponent
  of and the command it is the argument of) whose bound exceeds ScreenConfig.max_factorial_operand. Other bracket
  pairs count as groups (`_as_parentheses`)."""
  text = _as_parentheses(text)
  closer_to_open = {close: open_ for open_, close in _brace_matches(text).items()}
  limit = config.max_factorial_operand
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
    start = _factorial_operand_start(text, j, closer_to_open)
    operand = "" if start is None else text[start:j + 1]
    if not operand or not _is_numeric(operand):
      continue
    if all(map(_is_digit, operand)):
      if int(operand) > limit:
        return f"factorial of {operand}"
      continue
    bound = _numeric_bound(operand, limit) if _is_flat(operand) else _value_bound(operand, limit)
    if bound is None or bound > limit:
      return f"factorial of {operand.strip()!r}, possibly over {limit}"
  return None


# Brackets that math-verify reads around a factorial's operand (`\lfloor 10^{10} \rfloor!` is floor(10^10)!), as
# parentheses. Square brackets too, in either direction, so that an interval (`[1, 2)`, `(0, 1]`) pairs as a group.
_BRACKET_SPELLINGS = (("\\vert", "|"), ("\\left|", "\\left("), ("\\right|", "\\right)"), ("\\lvert", "("),
                      ("\\rvert", ")"), ("\\lfloor", "("), ("\\rfloor", ")"), ("\\lceil", "("), ("\\rceil", ")"),
                      ("\\lbrack", "("), ("\\rbrack", ")"), ("\\lbrace", "("), ("\\rbrace", ")"), ("\\{", "("),
                      ("\\}", ")"), ("[", "("), ("]", ")"))
# Commands after which a bar opens an absolute value (`|x| \cdot |y|`) rather than closing one.
_OPERATOR_COMMANDS = ("cdot", "times", "div", "pm", "mp", "ast", "left")


def _as_parentheses(text: str) -> str:
  """`text` with the bracket pairs of `_BRACKET_SPELLINGS` and absolute-value bars written as parentheses. A bar
  closes the innermost open bar where it follows an operand (`|x|`, `||a|-1|`) and opens one otherwise
  (`|-|a||`, `2|a|`); bars left unpaired stay bars."""
  for spelling, parenthesis in _BRACKET_SPELLINGS:
    text = text.replace(spelling, parenthesis)
  chars, open_bars = list(text), []
  for i, ch in enumerate(text):
    if ch != "|":
      continue
    if open_bars and _follows_operand(chars, i):
      chars[open_bars.pop()], chars[i] = "(", ")"
    else:
      open_bars.append(i)
  return "".join(chars)


def _follows_operand(chars: list[str], i: int) -> bool:
  """Whether `chars[i]` follows the end of an operand: a number, letter, closing bracket, factorial or a command
  other than an operator (`\\pi`, not `\\cdot`)."""
  j = i - 1
  while j >= 0 and chars[j] in " \t":
    j -= 1
  if j < 0:
    return False
  if _is_digit(chars[j]) or chars[j] in ".)}!":
    return True
  if not chars[j].isalpha():
    return False
  k = j
  while k >= 0 and chars[k].isalpha():
    k -= 1
  return k < 0 or chars[k] != "\\" or "".join(chars[k + 1:j + 1]) not in _OPERATOR_COMMANDS


def _atom_start(text: str, j: int, closer_to_open: dict[int, int]) -> Optional[int]:
  """Start of the number or group that ends at `j`, or None where `text[j]` ends neither."""
  if _is_digit(text[j]) or text[j] == ".":
    while j > 0 and (_is_digit(text[j - 1]) or text[j - 1] == "."):
      j -= 1
    return j
  return closer_to_open.get(j)


def _skip_back(text: str, i: int) -> int:
  """The index of the last non-blank character at or before `i` (-1 where there is none)."""
  while i >= 0 and text[i] in " \t":
    i -= 1
  return i


def _factorial_operand_start(text: str, j: int, closer_to_open: dict[int, int]) -> Optional[int]:
  """Start of the operand of a `!` after `text[j]`: the number or group ending there, widened to the power it is the
  exponent of (math-verify reads `2^{20}!` as (2^20)!) and to the command it is an argument of (`\\Gamma(10)!`,
  `\\frac{10^{6}}{1}!`). None where `text[j]` ends no number or group."""
  start = _atom_start(text, j, closer_to_open)
  while start is not None:
    before = _skip_back(text, start - 1)
    if before >= 0 and text[before] == "^":
      base_end = _skip_back(text, before - 1)
      base = _atom_start(text, base_end, closer_to_open) if base_end >= 0 else None
      if base is None:  # a letter, command or stray bracket: its own text decides whether the power is numeric
        return max(base_end, 0)
      start = base
      continue
    command = _command_start(text, start, closer_to_open)
    if command is None:
      return start
    start = command


def _command_start(text: str, start: int, closer_to_open: dict[int, int]) -> Optional[int]:
  """Start of the command (`\\frac`, `\\Gamma`, `\\left`) whose argument list ends with the group at `start`, or None.
  Up to two `{}` groups before it belong to the same command (`\\frac{a}{b}`). Only a command of numbers counts: a
  constant or operator takes no argument (`\\pi(10^{10})!` is pi * (10^10)!), and a function of a group is bounded
  by the group."""
  if text[start] not in "{(":
    return None
  i = _skip_back(text, start - 1)
  for _ in range(2):
    if text[start] == "{" and i >= 0 and text[i] == "}" and i in closer_to_open:
      i = _skip_back(text, closer_to_open[i] - 1)
  k = i
  while k >= 0 and text[k].isalpha():
    k -= 1
  is_command = k < i and k >= 0 and text[k] == "\\"
  return k if is_command and text[k:i + 1] in _NUMERIC_COMMANDS + _FUNCTION_COMMANDS else None


def _argument_span(text: str, i: int, matches: dict[int, int]) -> tuple[int, int]:
  """[start, end) of the argument at `i` of a command (`\\Gamma`, `\\binom{n}`), past blanks and a `\\left`."""
  while i < len(text) and (text[i] in " \t" or _is_left(text, i)):
    i += 5 if text[i] == "\\" else 1
  return i, _operand_end(text, i, matches)


def _is_left(text: str, i: int) -> bool:
  return text.startswith("\\left", i) and not text[i + 5:i + 6].isalpha()


def _function_problem(text: str, config: ScreenConfig) -> Optional[str]:
  """Why a `\\Gamma` or binomial coefficient of numbers in `text` is dangerous. sympy evaluates both exactly:
  Gamma(n) as (n-1)!, so its argument gets ScreenConfig.max_factorial_operand as a factorial's operand does."""
  matches, limit = _brace_matches(text), config.max_factorial_operand
  i = text.find("\\")
  while i != -1:
    j = i + 1
    while j < len(text) and text[j].isalpha():
      j += 1
    problem = None
    if text[i + 1:j] in _GAMMA_COMMANDS:
      start, end = _argument_span(text, j, matches)
      argument = text[start:end]
      bound = _value_bound(argument, limit + 1) if _is_numeric(argument) else 0  # Gamma(limit + 1) is limit!
      if bound is None or bound > limit + 1:
        problem = f"Gamma of {argument.strip()!r}, possibly over {limit + 1}"
    elif text[i + 1:j] in _BINOMIAL_COMMANDS:
      problem = _binomial_problem(text, j, matches, limit)
    if problem:
      return problem
    i = text.find("\\", max(j, i + 2))
  return None


def _binomial_problem(text: str, i: int, matches: dict[int, int], limit: int) -> Optional[str]:
  """Why the binomial coefficient whose arguments start at `i` is dangerous, or None. For an integer k sympy
  multiplies min(k, n - k) factors the size of n (binom(10^9, 2) is quick), so the result's length is bounded
  against that of `limit`! (under limit * its bit length bits), and for a natural number n so is 2^n, which bounds
  it. A negative or fractional n takes k factors whatever its size (binom(-5, 10^9) runs for hours). For any other k
  it goes through Gamma of n and k, so both get the factorial limit (binom(10^9, 1/2) takes minutes)."""
  n_start, n_end = _argument_span(text, i, matches)
  k_start, k_end = _argument_span(text, n_end, matches)
  n, k = text[n_start:n_end], text[k_start:k_end]
  if not (_is_numeric(n) and _is_numeric(k)):
    return None
  n_value = None if "-" in n else _integer_value(n)  # `_integer_value` drops the sign
  k_value = _integer_value(k)
  if k_value is not None:
    budget = limit * limit.bit_length()
    n_bound = _value_bound(n, 1 << budget)
    factors = k_value if n_value is None else min(k_value, max(n_value - k_value, 0))
    safe = n_bound is not None and factors * n_bound.bit_length() <= budget
    safe = safe or (n_value is not None and n_value <= budget)
  else:
    bounds = (_value_bound(n, limit), _value_bound(k, limit))
    safe = None not in bounds and max(bounds) <= limit
  return None if safe else f"a binomial coefficient of {n.strip()!r} and {k.strip()!r}, possibly over {limit}!"


def _numeric_bound(operand: str, limit: int) -> int:
  """An upper bound on the value of a numeric operand without powers or factorials (`{99999 \\cdot 99999}`,
  `(100000000)`): the product of its numbers' `_number_bound`s, which no sum, product or quotient of them exceeds.
  A number below 1 counts by its reciprocal only where the operand holds a quotient: `e^{0.000001}` is about 1.
  Stops once past `limit`, so a long operand stays a linear scan."""
  bound, number, reciprocal = 1, "", _may_divide(operand)
  for ch in operand + " ":
    if _is_digit(ch) or ch == ".":
      number += ch
      continue
    if number:
      bound *= _number_bound(number, limit + 1, reciprocal)
      number = ""
      if bound > limit:
        return bound
  return bound


def _may_divide(operand: str) -> bool:
  """Whether a number in a flat operand may be a divisor: math-verify reads `:` and `÷` as `/` too (`\\overline`
  is no `\\over`)."""
  operand = operand.replace("\\overline", "")
  return any(division in operand for division in _DIVISIONS)


def _number_bound(number: str, cap: int, reciprocal: bool = True) -> int:
  """A bound, at least 2 and capped at `cap`, on a number (`12`, `0.25`, `.5`) and, where `reciprocal`, on its
  reciprocal. Below 1 a number is then bounded through its leading zeros (1/0.0012 < 10^3), and so is an integer that
  has any: it may be the repeating part of a decimal, which the verifier reads as an exact fraction
  (`0.\\overline{001}` is 1/999)."""
  longest = min(cap.bit_length(), 4000)  # 10^longest is past the cap, or too long a number to convert
  whole, point, fraction = number.partition(".")
  if "." in fraction:  # `1.2.3` is no number math-verify reads; bound every reading
    tens = len(number)
  elif reciprocal and not point and len(whole) > 1 and whole[0] == "0":
    tens = len(whole)
  elif whole.strip("0"):  # at least 1, so its reciprocal is at most 1
    whole = whole.lstrip("0")
    return cap if len(whole) > longest else min(max(int(whole) + bool(point), 2), cap)
  elif point and reciprocal:
    tens = len(fraction) - len(fraction.lstrip("0")) + 1
  else:
    return 2
  return cap if tens > longest else min(10**tens, cap)


class _Unreadable(Exception):
  """A `^` or `!` that follows nothing `_value_bound` reads as a number (`[3]^{2}`)."""


def _value_bound(operand: str, limit: int) -> Optional[int]:
  """An upper bound, capped at `limit + 1`, on the magnitude of a numeric operand that may hold powers, factorials,
  `\\Gamma` and binomials (`2^{2^{3}}`, `(3!)!`), or None where a power or factorial applies to something it cannot
  read. As in `_numeric_bound` the atoms (numbers, groups, powers, ...) multiply, each counted as at least 2, and a
  number by its `_number_bound`, which bounds its reciprocal too; a power is bounded right to left (`2^3^4` as
  2^(3^4), the larger reading). Capping keeps every step small, so bounding costs about as much as a scan."""
  try:
    return _product_bound(operand, 0, len(operand), _brace_matches(operand), limit + 1)
  except _Unreadable:
    return None


def _product_bound(text: str, start: int, end: int, matches: dict[int, int], cap: int) -> int:
  bound, i = 1, start
  while i < end:
    if text[i] in "^!":
      raise _Unreadable()
    atom, i = _atom_bound(text, i, end, matches, cap)
    if atom is not None:
      atom, i = _postfix_bound(text, i, end, atom, matches, cap, factorials=True)
      bound = min(bound * atom, cap)
  return bound


def _atom_bound(text: str, i: int, end: int, matches: dict[int, int], cap: int) -> tuple[Optional[int], int]:
  """(bound, end) of the atom at `i`, or (None, end) for a character or command that is no atom (`+`, `\\cdot`)."""
  if _is_digit(text[i]) or text[i] == ".":
    j = i
    while j < end and (_is_digit(text[j]) or text[j] == "."):
      j += 1
    return _number_bound(text[i:j], cap), j
  if i in matches:
    return max(_product_bound(text, i + 1, matches[i], matches, cap), 2), matches[i] + 1
  if text[i] != "\\":
    return None, i + 1
  j = i + 1
  while j < end and text[j].isalpha():
    j += 1
  name = text[i + 1:j]
  if name in _GAMMA_COMMANDS:  # Gamma(x) <= x! for the x where it is large
    arg, j = _argument_bound(text, j, end, matches, cap)
    return _factorial_bound(arg, cap), j
  if name in _BINOMIAL_COMMANDS:  # binom(n, k) <= min(2^n, n^k)
    n, j = _argument_bound(text, j, end, matches, cap)
    k, j = _argument_bound(text, j, end, matches, cap)
    return min(_power_bound(2, n, cap), _power_bound(n, k, cap)), j
  return None, max(j, i + 2)  # `\frac`, `\cdot`, `\,`: their groups, if any, are atoms of their own


def _argument_bound(text: str, i: int, end: int, matches: dict[int, int], cap: int) -> tuple[int, int]:
  """(bound, end) of the argument or exponent at `i`: one atom after spaces, signs and `\\left`."""
  while i < end and (text[i] in " \t+-" or _is_left(text, i)):
    i += 5 if text[i] == "\\" else 1
  if i >= end or text[i] in "^!":
    raise _Unreadable()
  atom, i = _atom_bound(text, i, end, matches, cap)
  if atom is None:
    raise _Unreadable()
  return atom, i


def _postfix_bound(text: str, i: int, end: int, base: int, matches: dict[int, int], cap: int,
                   factorials: bool) -> tuple[int, int]:
  """(bound, end) of `base` raised to the powers and, where `factorials`, the factorials that follow it at `i`.
  math-verify reads `2^{20}!` as (2^20)!, so a factorial after an exponent applies to the power, not the exponent."""
  while True:
    j = i
    while j < end and text[j] in " \t":
      j += 1
    if j < end and text[j] == "!" and factorials:
      base, i = _factorial_bound(base, cap), j + 1
    elif j < end and text[j] == "^":
      exponent, i = _argument_bound(text, j + 1, end, matches, cap)
      exponent, i = _postfix_bound(text, i, end, exponent, matches, cap, factorials=False)
      base = _power_bound(base, exponent, cap)
    else:
      return base, i


def _power_bound(base: int, exponent: int, cap: int) -> int:
  """min(base^exponent, cap) for base >= 2, without computing a power past the cap."""
  if (base.bit_length() - 1) * exponent >= cap.bit_length():
    return cap
  return min(base**exponent, cap)


def _factorial_bound(n: int, cap: int) -> int:
  """min(n!, cap), or a power of two at least n! where n! is too long to multiply out cheaply."""
  if n >= max(4, cap.bit_length()):  # n! >= 2^n from n = 4 on
    return cap
  if n > 100:
    return min(1 << math.ceil(math.lgamma(n + 1) / math.log(2) + 1), cap)
  product = 1
  for factor in range(2, n + 1):
    product *= factor
    if product >= cap:
      return cap
  return product


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
  return _power_problem(text, config) or _factorial_problem(text, config) or _function_problem(text, config)


def passes_screen(answer: str, config: ScreenConfig = ScreenConfig()) -> bool:
  return screen_problem(answer, config) is None
