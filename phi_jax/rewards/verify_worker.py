"""Verification worker: a standalone script run by `phi_jax.rewards.verifier.VerifierPool`, one process per worker.

    python -P verify_worker.py '{"memory_bytes": ..., "float_rounding": 6, "numeric_precision": 15}'

It imports only the standard library and math-verify with its sympy (never `phi_jax`, whose package import pulls in
JAX), so a worker starts in about a second and holds no accelerator state. Protocol, one ASCII JSON object per line:
the worker writes `{"ready": <pid>}` once warmed up, then answers each request `{"id", "gold", "pred",
"soft_timeout_s"}` read from stdin with `{"id", "ok"}` on its original stdout; it exits at end of input. A `pred`
that is a hedge ("a or b", see `alternatives`) is right when, as a whole, it is a gold of several answers (a set,
not a pair or an interval); when every two of its alternatives restate one value ("\\frac{1}{4} or 25\\%"; degrees
restate radians, "\\frac{\\pi}{3} or 60^\\circ") and any is the gold, or, where one only rounds another ("\\pi or
3.14", "0.96 or 1.0"), the most precise is (`graded_alternatives`); or when every alternative is the gold. An
alternative it cannot compare (unparsed, a number with a unit word beside one without, or a price beside a percent or
a unit word: "\\$12 or 20\\%") is dropped first, unless every one is; a price beside other math is compared as its
plain value ("\\$5 or 6", "\\$0.25 or 25" are hedges). Alternatives each with a unit of `UNIT_SIZES`, read whole
(`amount`: "3/4 km" is not 3), restate one quantity where their values agree once converted or one rounds another
in its unit (`rounded_in_units`: "5 \\text{ cm}^2 or 500 \\text{ mm}^2", "\\$1.50 or 150 cents", "1 lb or 454
grams", not "3 hours or 150 minutes"), and the gold is compared with the number of the one in the gold's unit where
the gold names one, else of either of two most precise ("1 foot or 12 inches" is 1 or 12), else of the first;
with other words ("8 pies or 8 cakes", "2ab or 2bc") they are rival values. Two plain numbers, alternatives too,
also agree to `NUMBER_RELATIVE_TOLERANCE` (`numbers_match`); a percent and a plain number match where the number is
the percent's number or its value (`percent_match`: "12.5\\%" is 12.5 and 0.125, as "50\\%" is 50 and 0.5). A
repeating decimal ("0.\\overline{3}") is read as its fraction. Both answers are first rewritten where math-verify
misreads their notation (`notation`): a LaTeX space before a percent sign or a unit ("12\\,\\%", "5~\\text{cm}"),
`\\degree`, and a list of choice letters in text mode ("\\text{A, C}", a set as "A, C" is). All of it runs within the
request's one time limit.

math-verify's own timeouts use `signal.alarm`, which shares one timer with this worker's soft limit, so they are
disabled and one `setitimer` per request bounds the whole parse-parse-verify. The soft limit interrupts Python
code only; the parent's hard wall-clock kill covers everything else (long C-level integer arithmetic).
"""

import decimal
import fractions
import functools
import itertools
import json
import logging
import os
import re
import resource
import signal
import sys
import threading
import time
from typing import Optional


class SoftTimeout(BaseException):
  """Raised by the interval timer. A BaseException so math-verify's `except Exception` cannot swallow it."""


def _raise_soft_timeout(signum, frame):
  raise SoftTimeout()


# How extraction joins a hedge's alternatives (`phi_jax.rewards.extract.HEDGE_JOINER`, not imported: see above).
HEDGE_JOINER = " or "


def alternatives(answer: str) -> list[str]:
  """The alternatives of a hedge ("5 or 6" -> ["5", "6"]): `answer` split where `HEDGE_JOINER` stands outside every
  bracket (`x \\text{ or } y` is one answer); [answer] when it is no hedge. Linear in the answer's length."""
  options, depth, start, i = [], 0, 0, 0
  while i < len(answer):
    if answer[i] in "{([":
      depth += 1
    elif answer[i] in "})]":
      depth = max(0, depth - 1)  # an interval "[1, 2)" closes with another kind
    elif depth == 0 and answer.startswith(HEDGE_JOINER, i):
      options.append(answer[start:i])
      start = i = i + len(HEDGE_JOINER)
      continue
    i += 1
  # A comma before "or" ("3 hours, or 180 minutes") is punctuation, not part of the first alternative.
  options = [o.strip().removesuffix(",").rstrip() for o in options + [answer[start:]]]
  return options if len(options) > 1 and all(options) else [answer]


def has_top_level_comma(answer: str) -> bool:
  """Whether a comma stands in `answer` outside every bracket ("2, 3", "x = 2, 3"; not "(2, 3)", "\\{2, 3\\}")."""
  depth = 0
  for ch in answer:
    if ch in "{([":
      depth += 1
    elif ch in "})]":
      depth = max(0, depth - 1)
    elif ch == "," and depth == 0:
      return True
  return False


# Two answers that are both plain decimal numbers match within this relative difference.
NUMBER_RELATIVE_TOLERANCE = decimal.Decimal("1e-6")
_PLAIN_NUMBER_CHARS = frozenset("0123456789.+-eE")


def plain_number(text: str) -> Optional[decimal.Decimal]:
  """The value of an answer that is one decimal number ("-12", "0.0000003", "6.6e-34"), else None."""
  text = text.strip()
  if not text or len(text) > 64 or not set(text) <= _PLAIN_NUMBER_CHARS or not any(c.isdigit() for c in text):
    return None
  try:
    value = decimal.Decimal(text)
  except decimal.InvalidOperation:
    return None
  # Exponents beyond a few hundred are left to math-verify (and the screen): no overflow in the comparison.
  return value if value.is_finite() and abs(value.adjusted()) <= 400 else None


def numbers_match(a: decimal.Decimal, b: decimal.Decimal, places: int) -> bool:
  """Equal to `places` decimal places (math-verify's rule: 123456789 is not 123456790, 0.6666667 is 0.666667) and
  within NUMBER_RELATIVE_TOLERANCE of each other (so 3e-7 is not 1e-7, though both round to 0)."""
  if a == b:
    return True
  quantum = decimal.Decimal(1).scaleb(-places)
  with decimal.localcontext(prec=max(28, 2 * places + 420)):  # exact for every value plain_number lets through
    rounded_equal = (a.quantize(quantum, decimal.ROUND_HALF_UP) == b.quantize(quantum, decimal.ROUND_HALF_UP))
    return rounded_equal and abs(a - b) <= NUMBER_RELATIVE_TOLERANCE * max(abs(a), abs(b))


def percent_number(text: str) -> Optional[decimal.Decimal]:
  """The number of an answer that is one decimal number and a percent sign ("12.5\\%", "37.5%" -> 12.5), else None."""
  text = text.strip()
  return plain_number(text[:-1].removesuffix("\\")) if text.endswith("%") else None


def percent_match(a: str, b: str, places: int) -> Optional[bool]:
  """Whether a percent and a plain number, either way round, match: the number is the percent's number or its value
  ("12.5\\%" is 12.5 and 0.125), as math-verify matches "50\\%" with 50 and 0.5 but a percent with decimals only with
  its value. None where `a` and `b` are not one percent and one plain number."""
  for percent, other in ((a, b), (b, a)):
    shown, number = percent_number(percent), plain_number(other)
    if shown is not None and number is not None:
      return numbers_match(shown, number, places) or numbers_match(shown.scaleb(-2), number, places)
  return None


# A price or a word after a number ("\\$1.50", "5 \\text{ cm}", "1200 meters"): a hedge's alternative in a unit,
# which math-verify compares by its number alone.
_UNIT = re.compile(r"(\\\$|^\$)|(?:\d|\\frac\{\d+\}\{\d+\})\s*(?:\\(?:text|textrm|mathrm|mbox)\{\s*)?([A-Za-z]{2,})")


def unit(answer: str):
  """The unit of `answer` ("$" for "\\$1.50", "cm" for "5 \\text{ cm}"), or None where it has none."""
  match = _UNIT.search(answer)
  if match is None:
    return None
  return "$" if match.group(1) else match.group(2).lower()


# Units by dimension and their size in its smallest one here (`unit` reads words of two letters or more, lower-case):
# alternatives in units of one dimension restate one quantity only where their values agree once converted. A
# volume is a length cubed (in mm^3), so that "1000 cm^3" restates "1 liter".
UNIT_SIZES = {word: (dimension, fractions.Fraction(size)) for dimension, sizes in (
    ("time", ((1, "sec secs second seconds"), (60, "min mins minute minutes"), (3600, "hr hrs hour hours"),
              (86400, "day days"), (604800, "week weeks"))),
    ("length", ((1, "mm millimeter millimeters"), (10, "cm centimeter centimeters"),
                (1000, "meter meters metre metres"), (10 ** 6, "km kilometer kilometers"), ("25.4", "in inch inches"),
                ("304.8", "ft foot feet"), ("914.4", "yd yard yards"), (1609344, "mi mile miles"))),
    ("mass", ((1, "mg"), (1000, "gram grams"), (10 ** 6, "kg kilogram kilograms"), ("28349.523125", "oz ounce ounces"),
              ("453592.37", "lb lbs pound pounds"))),
    ("length^3", ((1000, "ml milliliter milliliters"), (10 ** 6, "liter liters litre litres"))),
    ("money", ((1, "cent cents"), (100, "$ dollar dollars")))) for size, words in sizes for word in words.split()}

# An alternative with a unit, read whole: a sign, a price's `\\$`, a number (a decimal, "a/b", `\\frac{a}{b}`), a
# word (in text mode or not) and a power of it ("-\\$1,200", "3/4 km", "5 \\text{ cm}^2").
_AMOUNT = re.compile(r"(-?)(\\\$)?\s*(?:\\frac\{(\d+)\}\{(\d+)\}|(\d[\d,]*(?:\.\d+)?(?:/\d+)?))\s*"
                     r"(?:\\(?:text|textrm|mathrm|mbox)\{\s*([A-Za-z]+)\s*\}|([A-Za-z]+))?(?:\^\s*\{?([23])\}?)?")


def amount(answer: str):
  """(number, unit, power) of an alternative with a unit ("-\\$1,200" -> ("-1200", "$", 1), "3/4 km" -> ("3/4",
  "km", 1), "5 \\text{ cm}^2" -> ("5", "cm", 2)); None where anything else stands in it ("3 hours 20 minutes")."""
  match = _AMOUNT.fullmatch(answer.strip())
  word = match and (match.group(6) or match.group(7) or match.group(2))
  if not word:
    return None
  number = "%s/%s" % match.group(3, 4) if match.group(3) else match.group(5).replace(",", "")
  return match.group(1) + number, "$" if word == "\\$" else word.lower(), int(match.group(8) or 1)


def _dimension(unit: str, power: int):
  """(dimension, size) of `unit` to `power` in `UNIT_SIZES` (a length squared or cubed an area or a volume)."""
  dimension, size = UNIT_SIZES.get(unit, (None, None))
  if power > 1:
    return ("length^%d" % power, size ** power) if dimension == "length" else None
  return None if dimension is None else (dimension, size)


# A decimal or a percent as written ("3.14", "66.7\\%"), which may be another alternative's value rounded.
_ROUNDED = re.compile(r"(-?\d+(\.\d+)?)\s*(\\?%)?")


def rounds_to(shown: str, value: decimal.Decimal, integers: bool = False) -> bool:
  """Whether `shown`, a decimal with d places or a percent (or, with `integers`, an integer) with two significant
  digits or more ("3" is no rounding of pi, nor "100" of 99.97), is `value` (in percent where `shown` is one)
  rounded to d places: "3.14" of pi, "66.7\\%" of 2/3, "454" of 453.59."""
  match = _ROUNDED.fullmatch(shown.strip())
  if match is None or not (match.group(2) or match.group(3) or integers):
    return False
  digits = match.group(1).replace("-", "").replace(".", "").lstrip("0")
  digits = digits if match.group(2) or match.group(3) else digits.rstrip("0")
  shown_value = decimal.Decimal(match.group(1))
  try:
    rounded = (value * (100 if match.group(3) else 1)).quantize(shown_value, rounding=decimal.ROUND_HALF_UP)
  except decimal.InvalidOperation:  # a value too large for the places shown
    return False
  return len(digits) >= 2 and rounded == shown_value


MAX_RESTATEMENTS = 8


def graded_alternatives(count: int, rounded_of) -> Optional[list[int]]:
  """The alternatives of a hedge of `count` that the gold is compared with, given `rounded_of(i, j)`: the indices
  of those of alternatives i and j that restate the other only as its rounding (none where they are one value
  exactly), or None where they are rival values. None where any two are rival values (every pair must restate one
  value: "1.0 or 0.96 or 1.04" does not); else the most precise, those that round no other ("\\pi or 3.14": \\pi,
  "0.96 or 1.0": 0.96), [] where each rounds another. More than `MAX_RESTATEMENTS` are rival values, so that the
  pairs compared stay few."""
  if count > MAX_RESTATEMENTS:
    return None
  rounded = set()
  for i, j in itertools.combinations(range(count), 2):
    sides = rounded_of(i, j)
    if sides is None:
      return None
    rounded.update(sides)
  return [i for i in range(count) if i not in rounded]


def rounded_in_units(quantities: list[tuple[str, str, int]], i: int, j: int) -> Optional[set[int]]:
  """`rounded_of` (`graded_alternatives`) for alternatives with units of `UNIT_SIZES` (`amount`): one value where
  they agree once converted ("3 hours or 180 minutes"); one rounds the other where it is the other's value rounded
  in its own unit, an integer of two significant digits or more too ("1 mile or 1.61 km", "1 inch or 25 mm": the km,
  the mm); rival values otherwise ("3 hours or 150 minutes", "3 hours or 3 cm")."""
  sizes = [_dimension(unit, power) for _, unit, power in (quantities[i], quantities[j])]
  if None in sizes or sizes[0][0] != sizes[1][0]:
    return None
  numbers = [quantities[k][0] for k in (i, j)]
  values = [fractions.Fraction(number) * size for number, (_, size) in zip(numbers, sizes)]
  if values[0] == values[1]:
    return set()

  def shown_as(k: int) -> bool:  # the k-th of the two is the other's value rounded, in its own unit
    in_its_unit = values[1 - k] / sizes[k][1]
    exact = decimal.Decimal(in_its_unit.numerator) / decimal.Decimal(in_its_unit.denominator)
    return rounds_to(numbers[k], exact, integers=True)
  return {index for k, index in enumerate((i, j)) if shown_as(k)} or None


# A repeating decimal ("0.1\\overline{6}", "1,000.\\overline{3}"), which math-verify cannot read; the look-behind
# keeps the scan linear.
_REPEATING_DECIMAL = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d*)\.(\d*)\\overline\s*(?:\{(\d+)\}|(\d))")


def as_fractions(answer: str) -> str:
  """`answer` with each repeating decimal written as its exact fraction: "0.\\overline{3}" -> "\\frac{3}{9}",
  "0.1\\overline{6}" -> "\\frac{15}{90}" (its digits with the repeating part, less those without, over as many 9s as
  repeating digits and 0s as other decimals)."""
  def fraction(match) -> str:
    whole, fixed, repeating = match.group(1).replace(",", ""), match.group(2), match.group(3) or match.group(4)
    numerator = int(whole + fixed + repeating) - int(whole + fixed or "0")
    return "\\frac{%d}{%s}" % (numerator, "9" * len(repeating) + "0" * len(fixed))
  return _REPEATING_DECIMAL.sub(fraction, answer)


# A degree sign: "60^\\circ", "60^{\\circ}", "60°".
_DEGREES = re.compile(r"\^\s*(?:\\circ|\{\s*\\circ\s*\})|\u00b0")


def in_radians(answer: str) -> str:
  """`answer` with an angle in degrees in radians ("60^\\circ" -> "60 \\cdot \\frac{\\pi}{180}"), so that it compares
  with an alternative in radians: math-verify reads "60^\\circ" as 60."""
  return _DEGREES.sub(lambda _: " \\cdot \\frac{\\pi}{180}", answer)


# A run of LaTeX spaces ("\\,", "~ \\;"; a `\\\\` line break is none), dropped before a percent sign or a unit in
# text mode (`_UNIT_AFTER_SPACE`: "12\\,\\%", "5~\\text{cm}"), which math-verify reads as a product with nothing. The
# whole run is matched and the sign after it checked apart, so that a long run is scanned once.
_LATEX_SPACES = re.compile(r"(?<!\\)(?:\\[,;:! ]|~)(?:\s*(?:\\[,;:! ]|~))*\s*")
_UNIT_AFTER_SPACE = re.compile(r"\\?%|\\(?:text|mathrm)\{")
# `\\degree` and `\\textdegree`, perhaps as a power ("30^{\\degree}"), which math-verify cannot read.
_DEGREE_COMMAND = re.compile(r"(?:\^\s*\{\s*\\(?:text)?degree\s*\}|\^\s*\\(?:text)?degree|\\(?:text)?degree)"
                             r"(?![A-Za-z])")
# A list of choice letters in text mode ("\\text{A, C}", "\\text{(A) and (C)}"), which math-verify reads as one
# symbol, though "A, C" is a set.
_CHOICE_LETTER = r"(?:\(\s*[A-Z]\s*\)|[A-Z])"
_CHOICE_LETTERS = re.compile(r"\\text\{\s*(%s(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+)%s)+)\s*\}" % ((_CHOICE_LETTER,) * 2))


def notation(answer: str) -> str:
  """`answer` in notation math-verify reads as it is meant: a LaTeX space before a percent sign or a unit dropped
  ("12\\,\\%" -> "12\\%", "5~\\text{cm}" -> "5\\text{cm}"), `\\degree` a degree sign ("30\\degree" -> "30^{\\circ}")
  and a list of choice letters in text mode the letters ("\\text{(A) and (C)}" -> "A, C", a set)."""
  answer = _LATEX_SPACES.sub(lambda match: "" if _UNIT_AFTER_SPACE.match(answer, match.end()) else match.group(0),
                             answer)
  answer = _DEGREE_COMMAND.sub(lambda _: "^{\\circ}", answer)
  return _CHOICE_LETTERS.sub(lambda match: ", ".join(re.findall(r"[A-Z]", match.group(1))), answer)


def _exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
  """Ends the worker once its parent is gone. A parent killed outright (SIGKILL, the OOM killer) cannot kill its
  workers, and the end of input it leaves reaches only a worker that reads again: one busy on an answer with no soft
  limit (`soft_timeout_ratio=0`), or whose input pipe another process also holds, would run on. A computation that
  holds the interpreter lock in C (a huge integer power) delays this check until it returns, within the memory
  limit."""
  while os.getppid() == parent_pid:
    time.sleep(poll_s)
  os._exit(0)


def main() -> None:
  settings = json.loads(sys.argv[1])
  # Replies go to a private duplicate of stdout; anything a library prints lands on stderr instead.
  replies = os.fdopen(os.dup(1), "w", encoding="ascii", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which shuts workers down itself
  threading.Thread(target=_exit_when_orphaned, args=(settings.get("parent_pid", os.getppid()),), daemon=True).start()
  signal.signal(signal.SIGALRM, _raise_soft_timeout)
  for name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(name).setLevel(logging.CRITICAL)

  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
  from sympy import FiniteSet

  extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

  @functools.lru_cache(maxsize=1024)  # a GRPO group shares one gold answer and often repeats predictions
  def parse_answer(answer: str):
    # Extraction already happened in the parent; boxing the bare answer makes math-verify's LaTeX path take it whole.
    answer = as_fractions(answer)
    parsed = parse("\\boxed{" + answer + "}", extraction_config=extraction, parsing_timeout=None)
    return parsed or parse(answer, extraction_config=extraction, parsing_timeout=None)

  def is_equivalent(gold: str, pred: str) -> bool:
    # Plain numbers (a hedge's alternatives too) to a relative tolerance as well: rounding alone makes 1e-7 4e-7.
    numbers = plain_number(gold), plain_number(pred)
    if None not in numbers:
      return numbers_match(*numbers, settings["float_rounding"])
    percent = percent_match(gold, pred, settings["float_rounding"])
    if percent is not None:
      return percent
    gold_parsed, pred_parsed = parse_answer(gold), parse_answer(pred)
    if not gold_parsed or not pred_parsed:
      return False
    return bool(verify(gold_parsed, pred_parsed, float_rounding=settings["float_rounding"],
                       numeric_precision=settings["numeric_precision"], timeout_seconds=None))

  def is_math(answer: str) -> bool:
    # math-verify gives back only the string of what it could not read as math ("\\frac{59").
    parsed = parse_answer(answer)
    return bool(parsed) and not isinstance(parsed[0], str)

  def has_several_answers(gold: str) -> bool:
    # A set ("2, 3", "\\{2, 3\\}", "\\pm 1"), not an ordered pair or an interval ("(2, 3)"), which math-verify counts
    # equal to the set {2, 3}; a number with thousands separators ("1,200") is one answer.
    parsed = parse_answer(gold)
    if not parsed:
      return False
    if isinstance(parsed[0], FiniteSet):
      return len(parsed[0]) > 1
    return has_top_level_comma(gold) and not getattr(parsed[0], "is_number", False)

  def is_right(gold: str, pred: str) -> bool:
    # Rewritten first, so that units, hedges and sets are read in the notation math-verify reads.
    gold, pred = notation(gold), notation(pred)
    options = alternatives(pred)
    if len(options) == 1:
      return is_equivalent(gold, pred)
    # A hedge: as a whole, a gold of several answers ("x = 2 or x = 3" is the gold "2, 3").
    if has_several_answers(gold) and is_equivalent(gold, ", ".join(options)):
      return True
    # An alternative this cannot compare (unread, or a number with a unit word: "1200 meters or 3") is no rival
    # value, nor a price beside a percent or a unit word ("\\$12 or 20\\%"); beside other math a price is compared
    # as its plain value ("\\$5 or 6", "\\$0.25 or 25" are hedges).
    units = [unit(option) for option in options]
    quantities = [] if None in units else [amount(option) for option in options]
    if None in units:
      price_compared = not any(u not in (None, "$") or "%" in option for option, u in zip(options, units))
      comparable = [o for o, u in zip(options, units) if (u is None or u == "$" and price_compared) and is_math(o)]
      options = comparable or options
      if len(options) == 1:
        return is_equivalent(gold, options[0])
    elif None in quantities:  # a number not read whole beside its unit ("3 hours 20 minutes"): no restatement
      return False
    elif all(_dimension(u, power) for _, u, power in quantities):
      # Alternatives in units of the table restate one quantity where their values agree once converted ("5
      # \\text{ cm} or 50 \\text{ mm}"); the gold is compared with the number of the one in the gold's unit where the
      # gold names one, else of either of two most precise (an answer and its conversion to the asked unit: "2 hours
      # or 120 minutes"), else of the first, the answer as given, so a quantity listed in every unit pays no gold alike.
      graded = graded_alternatives(len(options), functools.partial(rounded_in_units, quantities))
      gold_unit = (amount(gold) or (None, None, None))[1:]
      given = [i for i in graded if quantities[i][1:] == gold_unit][:1] or (graded if len(options) == 2 else graded[:1])
      return any(is_equivalent(gold, quantities[i][0]) for i in given)
    elif len({u for _, u, _ in quantities}) > 1:  # other words: "8 pies or 8 cakes", "2ab or 2bc" (math-verify: 2)
      return False
    # Otherwise alternatives restate one value where math-verify finds them equal, whole ("\\frac{1}{4} or 25\\%",
    # "\\frac{\\pi}{3} or 60^\\circ"; not "2ab or 2bc"), or one a rounding of another ("\\pi or 3.14"): right when the
    # most precise is the gold. Of different values ("5 or 6"), right only when every one is the gold.
    graded = graded_alternatives(len(options), lambda i, j: rounded_of(options[i], options[j], i, j))
    return (any(is_equivalent(gold, options[i]) for i in graded) if graded
            else all(is_equivalent(gold, option) for option in options))

  def rounded_of(a: str, b: str, i: int, j: int) -> Optional[set[int]]:
    # Degrees compared as radians only after the plain reading fails ("60^\\circ" is 60, too).
    radians = in_radians(a), in_radians(b)
    if is_equivalent(a, b) or (radians != (a, b) and is_equivalent(*radians)):
      return set()
    return {k for k, shown, exact in ((i, a, b), (j, b, a)) if is_rounded(shown, exact)} or None

  def is_rounded(shown: str, exact: str) -> bool:
    # "3.14" of "\\pi": sympy evaluates the exact value, `rounds_to` rounds it as `shown` is written.
    if _ROUNDED.fullmatch(shown.strip()) is None:
      return False
    parsed = parse_answer(exact)
    if not parsed or not getattr(parsed[0], "is_number", False):
      return False
    try:
      return rounds_to(shown, decimal.Decimal(str(parsed[0].evalf(30))))
    except (decimal.InvalidOperation, TypeError, ValueError):  # a complex or infinite value has no decimal
      return False

  # Warm the LaTeX parser, sympy's lazily imported simplification and set code before declaring readiness, so the
  # first real answers are not charged for it.
  for gold, pred in (("\\frac{1}{2}", "0.5"), ("x^2+2x+1", "(x+1)^2"), ("[1,2)", "\\{1\\}"), ("x=3", "3")):
    is_equivalent(gold, pred)
  if settings.get("memory_bytes"):
    resource.setrlimit(resource.RLIMIT_AS, (settings["memory_bytes"], settings["memory_bytes"]))
  replies.write(json.dumps({"ready": os.getpid()}) + "\n")

  for line in sys.stdin:
    request = json.loads(line)
    ok = False
    try:
      try:
        if request["soft_timeout_s"] > 0:
          signal.setitimer(signal.ITIMER_REAL, request["soft_timeout_s"])
        ok = is_right(request["gold"], request["pred"])
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except (SoftTimeout, Exception):  # noqa: BLE001 -- any failure on untrusted input means "not verified"
      ok = False
    replies.write(json.dumps({"id": request["id"], "ok": ok}) + "\n")


if __name__ == "__main__":
  main()
