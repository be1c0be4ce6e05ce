"""Verification worker: a standalone script run by `phi_jax.rewards.verifier.VerifierPool`, one process per worker.

    python -P verify_worker.py '{"memory_bytes": ..., "float_rounding": 6, "numeric_precision": 15}'

It imports only the standard library and math-verify with its sympy (never `phi_jax`, whose package import pulls in
JAX), so a worker starts in about a second and holds no accelerator state. Protocol, one ASCII JSON object per line:
the worker writes `{"ready": <pid>}` once warmed up, then answers each request `{"id", "gold", "pred",
"soft_timeout_s"}` read from stdin with `{"id", "ok"}` on its original stdout; it exits at end of input. A `pred`
that is a hedge ("a or b", see `alternatives`) is right when, as a whole, it is a gold of several answers (a set,
not a pair or an interval); when its alternatives restate one value ("\\frac{1}{4} or 25\\%"; degrees restate
radians, "\\frac{\\pi}{3} or 60^\\circ", and a price its value in cents, "\\$1.50 or 150") and any is the gold; or
when every alternative is the gold. An alternative it cannot compare (unparsed, a number with a unit word, or a
price beside what is not a plain number: "\\$12 or 20\\%") is dropped first, unless every one is; a price beside
plain numbers is a rival value ("\\$5 or 6"); alternatives each in a unit of its own ("5 \\text{ cm} or 50 \\text{
mm}") restate one quantity. A repeating decimal ("0.\\overline{3}") is read as its fraction. All of it runs within
the request's one time limit.

math-verify's own timeouts use `signal.alarm`, which shares one timer with this worker's soft limit, so they are
disabled and one `setitimer` per request bounds the whole parse-parse-verify. The soft limit interrupts Python
code only; the parent's hard wall-clock kill covers everything else (long C-level integer arithmetic).
"""

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


# A plain number ("150", "-1,200.5"): beside such alternatives a price is a rival value ("\\$5 or 6"), not another
# unit as beside "20\\%".
_PLAIN_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# A repeating decimal ("0.1\\overline{6}"), which math-verify cannot read; the look-behind keeps the scan linear.
_REPEATING_DECIMAL = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\overline\s*(?:\{(\d+)\}|(\d))")


def as_fractions(answer: str) -> str:
  """`answer` with each repeating decimal written as its exact fraction: "0.\\overline{3}" -> "\\frac{3}{9}",
  "0.1\\overline{6}" -> "\\frac{15}{90}" (its digits with the repeating part, less those without, over as many 9s as
  repeating digits and 0s as other decimals)."""
  def fraction(match) -> str:
    whole, fixed, repeating = match.group(1), match.group(2), match.group(3) or match.group(4)
    numerator = int(whole + fixed + repeating) - int(whole + fixed or "0")
    return "\\frac{%d}{%s}" % (numerator, "9" * len(repeating) + "0" * len(fixed))
  return _REPEATING_DECIMAL.sub(fraction, answer)


# A degree sign: "60^\\circ", "60^{\\circ}", "60°".
_DEGREES = re.compile(r"\^\s*(?:\\circ|\{\s*\\circ\s*\})|\u00b0")


def in_one_unit(answer: str) -> str:
  """`answer` with an angle in degrees in radians ("60^\\circ" -> "60 \\cdot \\frac{\\pi}{180}") and a price in cents
  ("\\$1.50" -> "100 \\cdot 1.50"), so that two alternatives in those units compare: math-verify reads "60^\\circ" as
  60 and "\\$1.50" as 1.50."""
  answer = _DEGREES.sub(lambda _: " \\cdot \\frac{\\pi}{180}", answer)
  return "100 \\cdot " + answer[2:] if answer.startswith("\\$") else answer


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
    # An alternative this cannot compare (unread, or a number with a unit word: "1200 meters or 3") is no rival
    # value, nor a price beside another form ("\\$12 or 20\\%"); beside plain numbers a price is compared ("\\$5 or
    # 6" is a hedge). Alternatives each in a unit of its own ("5 \\text{ cm} or 50 \\text{ mm}") restate one quantity.
    units = [unit(option) for option in options]
    plain = all(_PLAIN_NUMBER.fullmatch(option) for option, u in zip(options, units) if u is None)
    comparable = [option for option, u in zip(options, units) if (u is None or u == "$" and plain) and is_math(option)]
    in_own_units = None not in units and len(set(units)) == len(units)
    options = comparable or options
    if len(options) == 1:
      return is_equivalent(gold, options[0])
    # Alternatives of one value restate it ("\\frac{1}{4} or 25\\%", "\\frac{\\pi}{3} or 60^\\circ", "\\$1.50 or 150"
    # in cents): right when any is the gold. Of different values ("5 or 6"), right only when every one is the gold,
    # which no single gold is.
    restated = in_own_units or all(is_same_value(options[0], option) for option in options[1:])
    return (any if restated else all)(is_equivalent(gold, option) for option in options)

  def is_same_value(a: str, b: str) -> bool:
    # Degrees and prices compared as such only after the plain reading fails ("60^\\circ" is 60, too).
    in_one = in_one_unit(a), in_one_unit(b)
    return is_equivalent(a, b) or (in_one != (a, b) and is_equivalent(*in_one))

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
