"""Verification worker: a standalone script run by `phi_jax.rewards.verifier.VerifierPool`, one process per worker.

    python -P verify_worker.py '{"memory_bytes": ..., "float_rounding": 6, "numeric_precision": 15}'

It imports only the standard library and math-verify (never `phi_jax`, whose package import pulls in JAX), so a
worker starts in about a second and holds no accelerator state. Protocol, one ASCII JSON object per line:
the worker writes `{"ready": <pid>}` once warmed up, then answers each request `{"id", "gold", "pred",
"soft_timeout_s"}` read from stdin with `{"id", "ok"}` on its original stdout; it exits at end of input. A `pred`
that is a hedge ("a or b", see `alternatives`) is right when, as a whole, it is the gold set, or when every
alternative is the gold; all of it within the request's one time limit.

math-verify's own timeouts use `signal.alarm`, which shares one timer with this worker's soft limit, so they are
disabled and one `setitimer` per request bounds the whole parse-parse-verify. The soft limit interrupts Python
code only; the parent's hard wall-clock kill covers everything else (long C-level integer arithmetic).
"""

import functools
import json
import logging
import os
import resource
import signal
import sys


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


def main() -> None:
  settings = json.loads(sys.argv[1])
  # Replies go to a private duplicate of stdout; anything a library prints lands on stderr instead.
  replies = os.fdopen(os.dup(1), "w", encoding="ascii", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which shuts workers down itself
  signal.signal(signal.SIGALRM, _raise_soft_timeout)
  for name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(name).setLevel(logging.CRITICAL)

  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

  extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

  @functools.lru_cache(maxsize=1024)  # a GRPO group shares one gold answer and often repeats predictions
  def parse_answer(answer: str):
    # Extraction already happened in the parent; boxing the bare answer makes math-verify's LaTeX path take it whole.
    parsed = parse("\\boxed{" + answer + "}", extraction_config=extraction, parsing_timeout=None)
    return parsed or parse(answer, extraction_config=extraction, parsing_timeout=None)

  def is_equivalent(gold: str, pred: str) -> bool:
    gold_parsed, pred_parsed = parse_answer(gold), parse_answer(pred)
    if not gold_parsed or not pred_parsed:
      return False
    return bool(verify(gold_parsed, pred_parsed, float_rounding=settings["float_rounding"],
                       numeric_precision=settings["numeric_precision"], timeout_seconds=None))

  def is_right(gold: str, pred: str) -> bool:
    options = alternatives(pred)
    if len(options) == 1:
      return is_equivalent(gold, pred)
    # A hedge: as a whole, a set ("x = 2 or x = 3" is the gold "2, 3"); else one answer only when every alternative
    # is the gold, a restatement ("\\frac{3}{10} or 30\\%"), never when one is a rival value ("5 or 6").
    return is_equivalent(gold, ", ".join(options)) or all(is_equivalent(gold, option) for option in options)

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
