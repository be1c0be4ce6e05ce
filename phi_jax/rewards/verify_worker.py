"""Verification worker: a standalone script run by `phi_jax.rewards.verifier.VerifierPool`, one process per worker.

    python -P verify_worker.py '{"memory_bytes": ..., "float_rounding": 6, "numeric_precision": 15}'

It imports only the standard library and math-verify with its sympy (never `phi_jax`, whose package import pulls in
JAX), so a worker starts in about a second and holds no accelerator state. Protocol, one ASCII JSON object per line:
the worker writes `{"ready": <pid>}` once warmed up, then answers each request `{"id", "gold", "pred",
"soft_timeout_s"}` read from stdin with `{"id", "ok"}` on its original stdout; it exits at end of input. A `pred`
that is a hedge ("a or b", see `alternatives`) is right when, as a whole, it is a gold of several answers (a set,
not a pair or an interval); when its alternatives restate one value ("\\frac{1}{4} or 25\\%"; degrees restate
radians, "\\frac{\\pi}{3} or 60^\\circ", a price its value in cents, "\\$1.50 or 150", and a decimal a value it
rounds, "\\pi or 3.14") and any is the gold; or when every alternative is the gold. An alternative it cannot compare
(unparsed, a number with a unit word beside one without, or a price beside a percent or a unit word: "\\$12 or
20\\%") is dropped first, unless every one is; a price beside other math is a rival value ("\\$5 or 6"). Alternatives
each with a unit restate one quantity where their values agree once converted (`restated_in_units`: "5 \\text{ cm}
or 50 \\text{ mm}", not "3 hours or 150 minutes" nor "8 pies or 9 cakes"). A repeating decimal ("0.\\overline{3}")
is read as its fraction. All of it runs within the request's one time limit.

math-verify's own timeouts use `signal.alarm`, which shares one timer with this worker's soft limit, so they are
disabled and one `setitimer` per request bounds the whole parse-parse-verify. The soft limit interrupts Python
code only; the parent's hard wall-clock kill covers everything else (long C-level integer arithmetic).
"""

import decimal
import fractions
import functools
import json
import logging
import os
import re
import resource
import signal
import sys
import threading
import time


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
  options = [o.strip() for o in options + [answer[start:]]]
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


# A price or a word after a number ("\\$1.50", "5 \\text{ cm}", "1200 meters"): a hedge's alternative in a unit,
# which math-verify compares by its number alone.
_UNIT = re.compile(r"(\\\$|^\$)|\d\s*(?:\\(?:text|textrm|mathrm|mbox)\{\s*)?([A-Za-z]{2,})")


def unit(answer: str):
  """The unit of `answer` ("$" for "\\$1.50", "cm" for "5 \\text{ cm}"), or None where it has none."""
  match = _UNIT.search(answer)
  if match is None:
    return None
  return "$" if match.group(1) else match.group(2).lower()


# Units by dimension and their size in its smallest one here (`unit` reads words of two letters or more, lower-case):
# alternatives in units of one dimension restate one quantity only where their values agree once converted.
UNIT_SIZES = {word: (dimension, fractions.Fraction(size)) for dimension, sizes in (
    ("time", ((1, "sec secs second seconds"), (60, "min mins minute minutes"), (3600, "hr hrs hour hours"),
              (86400, "day days"), (604800, "week weeks"))),
    ("length", ((1, "mm millimeter millimeters"), (10, "cm centimeter centimeters"),
                (1000, "meter meters metre metres"), (10 ** 6, "km kilometer kilometers"), ("25.4", "in inch inches"),
                ("304.8", "ft foot feet"), ("914.4", "yd yard yards"), (1609344, "mi mile miles"))),
    ("mass", ((1, "mg"), (1000, "gram grams"), (10 ** 6, "kg kilogram kilograms"), ("28349.523125", "oz ounce ounces"),
              ("453592.37", "lb lbs pound pounds"))),
    ("volume", ((1, "ml milliliter milliliters"), (1000, "liter liters litre litres"))),
    ("money", ((1, "cent cents"), (100, "$ dollar dollars")))) for size, words in sizes for word in words.split()}

# The number of an alternative with a unit ("3 hours", "-\\$1,200"), which `UNIT_SIZES` converts.
_AMOUNT = re.compile(r"(-?)\s*(?:\\\$)?\s*(\d[\d,]*(?:\.\d+)?)")


def amount(answer: str):
  """The number opening `answer` (a price's after its sign and `\\$`), without separators ("-1200"), or None."""
  match = _AMOUNT.match(answer)
  return None if match is None else match.group(1) + match.group(2).replace(",", "")


# A decimal or a percent as written ("3.14", "66.7\\%"), which may be another alternative's value rounded.
_ROUNDED = re.compile(r"(-?\d+(\.\d+)?)\s*(\\?%)?")


def rounds_to(shown: str, value: decimal.Decimal) -> bool:
  """Whether `shown`, a decimal with d places or a percent with two significant digits or more ("3" is no rounding
  of pi), is `value` (in percent where `shown` is one) rounded to d places: "3.14" of pi, "66.7\\%" of 2/3."""
  match = _ROUNDED.fullmatch(shown.strip())
  if match is None or not (match.group(2) or match.group(3)):
    return False
  digits = match.group(1).replace("-", "").replace(".", "").lstrip("0")
  shown_value = decimal.Decimal(match.group(1))
  try:
    rounded = (value * (100 if match.group(3) else 1)).quantize(shown_value, rounding=decimal.ROUND_HALF_UP)
  except decimal.InvalidOperation:  # a value too large for the places shown
    return False
  return len(digits) >= 2 and rounded == shown_value


def restated_in_units(options: list[str], units: list[str]) -> bool:
  """Whether alternatives each with a unit restate one quantity: in units of one dimension of `UNIT_SIZES`, when
  their values agree once converted, exactly or as one rounded ("3 hours or 180 minutes", "1 mile or 1.61 km", not
  "3 hours or 150 minutes"); in units of several dimensions never ("3 hours or 3 cm"); with a unit outside the table
  or a count noun ("8 pies or 9 cakes"), when their numbers are equal."""
  amounts, sizes = [amount(option) for option in options], [UNIT_SIZES.get(u) for u in units]
  if None in amounts:
    return False
  numbers = [fractions.Fraction(a) for a in amounts]
  if None in sizes:
    return len(set(numbers)) == 1
  if len({dimension for dimension, _ in sizes}) > 1:
    return False
  values = [number * size for number, (_, size) in zip(numbers, sizes)]

  def shown_as(i: int, value: fractions.Fraction) -> bool:  # alternative i is `value` rounded, in its own unit
    in_its_unit = value / sizes[i][1]
    return rounds_to(amounts[i], decimal.Decimal(in_its_unit.numerator) / decimal.Decimal(in_its_unit.denominator))
  return all(values[i] == values[0] or shown_as(i, values[0]) or shown_as(0, values[i]) for i in range(1, len(options)))


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
# A thousands separator: "1,200".
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def in_one_unit(answer: str) -> str:
  """`answer` with an angle in degrees in radians ("60^\\circ" -> "60 \\cdot \\frac{\\pi}{180}") and a price in cents
  ("\\$1.50" -> "100 \\cdot 1.50"), so that two alternatives in those units compare: math-verify reads "60^\\circ" as
  60 and "\\$1.50" as 1.50. Thousands separators go ("\\$1,200" -> "100 \\cdot 1200"), and a sign stays a sign."""
  answer = _THOUSANDS.sub("", _DEGREES.sub(lambda _: " \\cdot \\frac{\\pi}{180}", answer))
  sign = "-" if answer.startswith("-\\$") else ""
  return sign + "100 \\cdot " + answer[len(sign) + 2:] if answer.startswith(sign + "\\$") else answer


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
    options = alternatives(pred)
    if len(options) == 1:
      return is_equivalent(gold, pred)
    # A hedge: as a whole, a gold of several answers ("x = 2 or x = 3" is the gold "2, 3").
    if has_several_answers(gold) and is_equivalent(gold, ", ".join(options)):
      return True
    # Alternatives each with a unit restate one quantity where their values agree ("5 \\text{ cm} or 50 \\text{
    # mm}"). Otherwise an alternative this cannot compare (unread, or a number with a unit word: "1200 meters or 3")
    # is no rival value, nor a price beside a percent or a unit word ("\\$12 or 20\\%"); beside other math a price
    # is compared ("\\$5 or 6", "\\$2 or \\frac{5}{2}" are hedges).
    units = [unit(option) for option in options]
    if None in units:
      price_compared = not any(u not in (None, "$") or "%" in option for option, u in zip(options, units))
      comparable = [o for o, u in zip(options, units) if (u is None or u == "$" and price_compared) and is_math(o)]
      options = comparable or options
      if len(options) == 1:
        return is_equivalent(gold, options[0])
    # Alternatives of one value restate it ("\\frac{1}{4} or 25\\%", "\\frac{\\pi}{3} or 60^\\circ", "\\$1.50 or 150"
    # in cents, "\\pi or 3.14" rounded): right when any is the gold. Of different values ("5 or 6"), right only when
    # every one is the gold, which no single gold is.
    restated = (restated_in_units(options, units) if None not in units
                else all(is_same_value(options[0], option) for option in options[1:]))
    return (any if restated else all)(is_equivalent(gold, option) for option in options)

  def is_same_value(a: str, b: str) -> bool:
    # Degrees and prices compared as such only after the plain reading fails ("60^\\circ" is 60, too).
    in_one = in_one_unit(a), in_one_unit(b)
    return (is_equivalent(a, b) or (in_one != (a, b) and is_equivalent(*in_one)) or is_rounded(a, b)
            or is_rounded(b, a))

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
