"""phi_jax.rewards: answer extraction and verification (worker pool, limits, untrusted input) and the RL rewards."""

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from phi_jax import rewards
from phi_jax.rewards import (LengthAwareRewardConfig, ScreenConfig, ThinkFormat, VerifierConfig, extract_answer,
                             extract_gold, latex_notation, repetition_penalty, screen_problem)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist worker runs the whole module, so the verifier pool starts once (`make test` uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("rewards")


@pytest.fixture(scope="module")
def pool():
  """The module-wide pool (so `is_correct` shares it), generous limits for a loaded 2-core test machine."""
  rewards.configure(VerifierConfig(num_workers=2, timeout_s=10.0))
  yield rewards.default_pool()
  rewards.shutdown()


# -- extraction ----------------------------------------------------------------------------------------------------

EXTRACTIONS = [
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{x \\} y}", "x \\} y"),  # an escaped brace does not close the box
    ("\\boxed{\\frac{a}{b}} and a cut-off \\boxed{\\frac{1}{", "\\frac{a}{b}"),
    ("\\fbox{15}", "15"),
    ("so \\boxed 5.", "5"),
    ("<think>maybe \\boxed{7}</think> Therefore the answer is \\boxed{8}.", "8"),
    ("<think>\\boxed{7}</think>", None),
    ("<think>cut off mid-thought, so far \\boxed{12}", None),  # an unclosed think block holds no answer yet
    ("<think>a</think> \\boxed{3} <think>second thoughts", None),
    ("Final answer:\n42", "42"),
    ("The answer is $x=3$ since the line crosses there.", "x=3"),
    ("Thus the final answer is 1/2. Let me double check.", "1/2"),
    ("**Answer:** 12", "12"),
    ("**Answer**: 12\n", "12"),
    ("The answer is **7**.", "7"),
    ("**Final Answer**\n\n42", "42"),  # a markdown heading with the answer on the next line
    ("### Final Answer\n12 apples", "12"),
    ("The answer is 5. Let me check that the answer matches.", "5"),  # later uses of the word are not labels
    ("The answer isn't obvious at first. Answer: 4", "4"),
    ("The answer is 9. " + "Checking the answer again. " * 30, "9"),  # however many uses of the word follow
    ("Answer: 4. The answer isolates x.", "4"),  # "answer is" must be the word "is", not the start of one
    ("The answer is .5", ".5"),  # a leading period belongs to the number
    # A label followed by prose gives way to an earlier label followed by an answer, else to the last math.
    ("The answer is 5. We can double-check that the answer is correct.", "5"),
    ("**Answer:** 5\n\nNote that the answer is independent of $a$.", "5"),
    ("The answer is 3. Let's verify the answer: plug in x=3.", "3"),
    ("Thus $x = 5$. Checking, the answer is indeed right.", "x = 5"),
    ("So the answer is therefore 5.", "5"),  # connectives before the answer are dropped
    ("The answer is yes.", "yes"),  # prose, and no math to prefer
    ("The answer is yes. Final answer:", "yes"),  # an empty last label gives way too
    ("The answer is sqrt(2).", "sqrt(2)"),  # a function name is math
    ("Thus $x = 7$. Final answer:", "x = 7"),  # a label with nothing after it falls back to the last math
    ("We get $a$, then $$\\frac{3}{4}$$", "\\frac{3}{4}"),
    ("We get \\(a\\) and finally \\[ 2\\pi \\]", "2\\pi"),
    # An escaped dollar is a price, not a math delimiter.
    ("Apples cost \\$3, so 4 cost $4 \\times 3 = 12$ dollars: \\$12.", "4 \\times 3 = 12"),
    ("A \\\\$x^2$ after an escaped backslash", "x^2"),  # an escaped backslash: this $ opens math
    ("<think>hmm</think>\n42<|im_end|>", "42"),
    ("a long discussion\nover two lines and no marked answer", None),
    ("word " * 20, None),  # one line, but too long to be a bare answer
    ("", None),
    # A plain-text label's sentence cut to its answer: explanations, units and bold go; words that change the value
    # or add another answer stay (they then match no single gold).
    ("The answer is 12 (3 boxes of 4).", "12"),
    ("Answer: 5, since 2 + 3 = 5.", "5"),
    ("The answer is 27 coins, because 35 - 8 = 27.", "27"),
    ("The answer is 1,200 people.", "1200"),
    ("Therefore, the answer is 18 km/h.", "18"),
    ("The answer is 42; we are done.", "42"),
    ("The answer is **18** dollars.", "18"),
    ("The answer is -4 degrees, which is below freezing.", "-4 degrees"),
    ("The answer is 4 (x = 7 is rejected).", "4"),
    ("The answer is 2 (or 3).", "2 or 3"),
    ("The answer is 2 million.", "2 million"),
    ("The answer is 12 out of 20.", "12 out of 20"),
    ("The answer is 5 x.", "5 x"),
    ("The answer is 5 (x+1).", "5 (x+1)"),
    ("The answer is x**2.", "x^2"),
    ("The answer is 2 ** 3.", "2 ^ 3"),
    ("The answer is $\\frac{3}{4}$, since the rest is water.", "\\frac{3}{4}"),
    ("\\boxed{18 dollars}", "18"),
    ("\\boxed{\\text{5 cm}}", "5"),  # text mode holds words, not a product of variables
    ("\\boxed{5 x}", "5 x"),
    ("\\boxed{2 xy}", "2 xy"),  # inside math, short letters after a number are variables
    ("The answer is 3 eighths.", "3 eighths"),  # fractions and multipliers change the value
    ("The answer is 4 hundreds.", "4 hundreds"),
    ("The answer is 3/4 (or 0.75 as a decimal).", "3/4 or 0.75"),  # an alternative form stays beside the answer
    ("The answer is 1/2 (or 50%).", "1/2"),  # ... unless it is not a plain number
    ("The answer is 2 (maybe 3).", "2 or 3"),
    ("The answer is x = 1; y = 2.", "x = 1; y = 2"),  # a semicolon cuts only before prose
    # A corrected or qualified last answer is the answer, not an earlier one or the last math before it.
    ("So the answer is 5. Wait, the answer is actually 6.", "6"),
    ("We have $x = 5$ first.\nThe answer is approximately 18.", "18"),
    ("We have $x = 5$ first.\nThe answer is approx. 18.", "18"),  # an abbreviation does not end the sentence
    ("The answer is x = 3 because 2x = 6.", "x = 3"),  # an explanation without a comma
    ("The answer is 20 because 35 - 8 = 27.", "20"),
    ("9 eggs at $2 each.\n\nThe answer is $18.\n\nCheck: $2 * 9 = $18.", "18"),  # a price, not inline math
    ("So the answer is $13. She spent $5 on lunch.", "13"),
    ("The answer is 18 dollars.<|im_end|>", "18"),
    ("The answer is 18 (9 * 2).", "18"),  # a worked check after the number
    ("The answer is 5(or 6).", "5 or 6"),
    ("The answer is 5 [or 6].", "5 or 6"),
    ("The answer is 3/4 (i.e. 0.75).", "3/4 or 0.75"),
    ("\\boxed{\\text{no}}", "\\text{no}"),  # words stay in \text (an anagram would match unwrapped)
    ("The answer is x = 1 \\text{ or } x = 2.", "x = 1 \\text{ or } x = 2"),  # a LaTeX group is no hedge
    ("The answer is x \\in [2, 5), since f increases there.", "x \\in [2, 5)"),  # an interval left open
    ("\\boxed{6 oz}", "6"),  # a short unit
    ("\\boxed{\\text{30 pts}}", "30"),
    ("The answer is 32 teeth.", "32"),  # not a fraction word
    ("The answer is 45 fourth graders.", "45"),
    ("The answer is 1 fourth.", "1 fourth"),
    ("The answer is $\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}$.", "\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}"),
    ("The answer is 0 when n is even and 1 when n is odd.", "0 when n is even and 1 when n is odd"),
    ("The answer is 2ca. Next we check it.", "2ca"),
    # GSM8K's marker: the number alone on a "####" line; markdown headings that open with "####" are not answers.
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("So the total is 1,200.\n#### -1,200.\n", "-1200"),
    ("#### 1.\nAdd.\n#### 2.\nDouble it: 14.\n\nThe answer is 14.", "14"),  # numbered headings
    ("#### Step 1\nWe get $x = 4$.\n#### 2. Done", "x = 4"),
    ("#### $18", "18"),
    ("\\boxed{3}\n#### 4", "3"),
    # Whole numbers in words are read as digits, unless a word changes the value.
    ("The answer is Seven.", "7"),
    ("**Answer:** twenty-one apples", "21"),
    ("The answer is three hundred and five.", "305"),
    ("The answer is one hundred one", "101"),
    ("The answer is one million.", "one million"),
    ("The answer is two thirds.", "two thirds"),
    ("The answer is one of them.", "one of them"),
    ("The answer is zero point five.", "zero point five"),
    ("The answer is two pi.", "two \\pi"),
    ("\\boxed{five x}", "five x"),
    ("The answer is one hour and thirty minutes.", "one hour and thirty minutes"),
    ("The answer is five cm.", "5"),
]


@pytest.mark.parametrize("completion,expected", EXTRACTIONS)
def test_extract_answer(completion, expected):
  assert extract_answer(completion) == expected


def test_a_prompt_that_opens_the_think_block_moves_where_the_answer_starts():
  """With a chat template that opens `<think>` in the prompt, a completion cut off mid-thought has no closing tag
  and no answer yet; the verifier reads the same setting from its config."""
  opened = rewards.ThinkFormat(prompt_opens_think=True)
  cut_off = "so far \\boxed{5}, but let me reconsider"
  assert extract_answer(cut_off) == "5" and extract_answer(cut_off, think=opened) is None
  assert extract_answer("thoughts \\boxed{4}</think> so \\boxed{5}", think=opened) == "5"
  assert extract_answer("[a]\\boxed{4}[/a] \\boxed{5}", think=rewards.ThinkFormat("[a]", "[/a]")) == "5"
  pool = rewards.VerifierPool(rewards.VerifierConfig(num_workers=1, think=opened))
  try:
    assert pool.verify_batch([cut_off, cut_off + "</think> \\boxed{5}"], ["5", "5"]) == [False, True]
  finally:
    pool.shutdown()


def test_extract_gold():
  assert extract_gold("$\\boxed{2}$") == "2"
  assert extract_gold(" \\frac{1}{2} ") == "\\frac{1}{2}"
  assert extract_gold("$-3$") == "-3"
  # A GSM8K solution as the gold: its "####" line's number.
  assert extract_gold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
  assert extract_gold("#### 1,200") == "1200"
  assert extract_gold("seven") == "7"


def test_a_spelled_number_or_yes_no_after_a_label_is_the_answer_not_prose():
  """A labelled answer in words wins over earlier, unrelated math in the solution."""
  think = "<think>a</think>\n"
  worded = {"John has $3$ apples and buys 4 more. The answer is seven.": "7",
            "John has $3$ apples and buys 4 more. So the answer is seven apples.": "7",
            "John has $3$ apples and buys 4 more. Answer: seven": "7",
            "John has $3$ apples and buys 4 more. The answer is twenty-one apples.": "21",
            "Since $x > 0$, the answer is no.": "no",
            "Since $x > 0$, the answer is yes, because $x^2 > 0$.": "yes",
            # Still prose: a check after the answer, and a word that is no answer.
            "So $x = 5$. We verify that the answer is correct.": "x = 5",
            "Since $x > 0$, the answer is no longer negative.": "x > 0",
            "We get $x = 2$; the answer is one of them.": "x = 2"}
  assert {c: extract_answer(think + c) for c in worded} == worded


def test_several_math_spans_after_a_label_or_chained_boxes_are_one_answer(pool):
  """Spans joined by ",", "and" or "or" are one answer, a set ("2, 3") or, where "or" joins any two, a hedge
  ("5 or 6"): a set matches a set gold, a hedge no single gold."""
  think = "<think>a</think>\n"
  joined = {"The answer is $5$ or $6$.": "5 or 6",
            "The answer is $5$ (or $6$).": "5 or 6",
            "The answer is $x = 2$ and $x = 3$.": "x = 2, x = 3",
            "The answer is $2$, $3$, and $5$.": "2, 3, 5",
            "Answer: $a = 1$, $b = 2$": "a = 1, b = 2",
            "The solutions are $\\boxed{2}$ and $\\boxed{3}$.": "2, 3",
            "So \\boxed{5 apples} or \\boxed{6 apples}": "5 or 6",  # each box read as a box alone
            # Not joined: an explanation, another sentence, or boxes with prose between them.
            "The answer is $5$, since $2 + 3 = 5$.": "5",
            "The answer is $5$. Check: $5 - 2 = 3$.": "5",
            "\\boxed{1} then \\boxed{\\frac{1}{2}}": "\\frac{1}{2}",
            "\\boxed{10}\\boxed{11}": "11",
            # ... nor a clause that goes on in prose, nor an equation that justifies a value.
            "The answer is $18$, and $18 \\times 2 = 36$ confirms it.": "18",
            "**Answer:** $18$, and $x = 18$ satisfies the equation.": "18",
            "The answer is $12$, and $12 = 3 \\cdot 4$.": "12",
            "Final answer: $\\left(1, 2\\right)$ and $(3, 4)$.": "\\left(1, 2\\right), (3, 4)",  # \left is no relation
            "The answer is $x = 5$ and $-5$.": "x = 5, -5",
            "The answer is $2$ and $3$ respectively.": "2, 3",
            # ... nor answers joined by "and" that prose goes on from (the first is the answer).
            "The answer is $12$ and $4$ is the remainder.": "12",
            "The answer is $3$, and $\\frac{3}{4}$ of the pizza is left.": "3",
            "The answer is $8$ and $2$ heads.": "8",
            "The answer is $x = 2$, and $2 \\times 3 = 6$ confirms it.": "x = 2",
            "The answer is $5$, and $5 \\leqslant 6$.": "5",  # a relation, whatever its spelling
            "The answer is $5$ or $6$, I think.": "5 or 6",
            # Alternatives joined by "or" always stay joined, whatever follows (a restatement too, as math-verify).
            "The answer is $5$ or $6$ depending on how you count.": "5 or 6",
            "The answer is $\\sqrt{2}$, or $1.414$ approximately.": "\\sqrt{2} or 1.414",
            # A set followed by a bracket, a dash or a plural verb stays a set.
            "So the answer is $2$ and $-3$ (in either order).": "2, -3",
            "The answer is $x = 2$ and $x = 3$ \u2014 the two roots.": "x = 2, x = 3",
            "Final answer: $2$ and $3$ are the solutions.": "2, 3",
            "The answer is $a \\\\$ and $b$.": "a \\\\, b",  # `\\` then `$`: the dollar sign closes the math
            # An escaped dollar sign inside inline math is content, not its end.
            "The answer is $\\$20$.": "\\$20"}
  assert {c: extract_answer(think + c) for c in joined} == joined
  assert extract_gold("$\\boxed{2}$ and $\\boxed{3}$") == "2, 3"
  cases = [("The answer is $5$ or $6$.", "5", False), ("The answer is $6$ or $5$.", "5", False),
           ("The answer is $5$ or $6$, I'm not sure.", "5", False),
           ("The answer is $x = 2$ and $x = 3$.", "2, 3", True), ("The answer is $x = 2$ and $x = 3$.", "2", False),
           ("The answer is $2$, $3$, and $5$.", "2, 3, 5", True), ("Answer: $a = 1$, $b = 2$", "1, 2", True),
           ("The solutions are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3", True),
           ("The answer is $\\boxed{5}$ or $\\boxed{6}$.", "6", False), ("The answer is $5$ dollars.", "5", True),
           ("The answer is $12$, and $12 = 3 \\cdot 4$.", "12", True), ("Answer: $\\$4.50$", "4.5", True)]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def test_a_price_is_no_math_delimiter_for_the_last_math(pool):
  """Without a box or label, a `$` before a number that ends the text's math is a price, the answer its number: it
  neither closes an earlier `$` nor opens math running to the next one."""
  think = "<think>\nok\n</think>\n\n"
  priced = {"We get $6 \\times 7 = 42$, so the total is $42.": "42",
            "She sells $6$ boxes at $7$ each, so she earns $42.": "42",
            "She sells 6 boxes at $7 each, so she earns $42.": "42",
            "Each costs $7$ dollars and she buys $6$, so the total cost is $42.": "42",
            "So she earns $42 in total.": "42",
            "Total: $42": "42",
            "She paid $1,200.": "1200",
            # Math after the price is still the last math; a price before math is not its opening.
            "She has $5 and spends it: $x = 42$.": "x = 42",
            "It costs $13.\nSo $x = 4$ and we get $$\\frac{3}{4}$$": "\\frac{3}{4}"}
  assert {c: extract_answer(think + c) for c in priced} == priced
  assert rewards.verify_batch([think + c for c in list(priced)[:6]], ["42"] * 6, pool=pool) == [True] * 6


def test_the_last_math_is_one_answer_with_the_alternatives_or_joins_to_it(pool):
  """Without a box or label, math that "or" joins to the last math (a comma list ending in "or" too) is one answer,
  so a hedge matches no single gold; math joined only by "and" or "," is not (the last is a derivation's result)."""
  think = "<think>\nok\n</think>\n\n"
  last = {"So Ann has $5$ or $6$ apples.": "5 or 6",
          "Ann has $5$, $6$, or $7$ apples.": "5 or 6 or 7",
          "Hence $x=5$ or $6$.": "x=5 or 6",
          "Solving gives $x = 2$ or $x = 3$.": "x = 2 or x = 3",
          "It is \\(5\\) or \\(6\\).": "5 or 6",
          "We get $$5$$ or $$6$$": "5 or 6",
          "Since $a = 2$, we get $x = 5$ or $6$.": "x = 5 or 6",  # only what joins to the last math
          "So $5$ or, as we showed, $6$.": "6",  # other words beside "or": prose, not a hedge
          # Not joined: "and" and "," alone, an equation that justifies a value before "or".
          "We have $a = 3$ and $b = 4$, so $a + b = 7$.": "a + b = 7",
          "Therefore $a = 3$, $b = 7$, and $a + b = 10$.": "a + b = 10",
          "Then $2x = 10$, so $x = 5$.": "x = 5",
          "$12$ and $4$ is the remainder": "4",
          "The roots are $x = 2$ and $x = 3$.": "x = 3",
          "Thus $6$, or $6 = 2 \\cdot 3$.": "6 = 2 \\cdot 3",
          "She has $5$ or $6$ apples and pays $42.": "42"}
  assert {c: extract_answer(think + c) for c in last} == last
  cases = [("So Ann has $5$ or $6$ apples.", "6", False), ("Ann has $5$, $6$, or $7$ apples.", "7", False),
           ("Hence $x=5$ or $6$.", "6", False), ("Solving gives $x = 2$ or $x = 3$.", "2, 3", True),
           ("We have $a = 3$ and $b = 4$, so $a + b = 7$.", "7", True),
           ("Therefore $a = 3$, $b = 7$, and $a + b = 10$.", "10", True), ("Then $2x = 10$, so $x = 5$.", "5", True)]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def test_a_hedge_or_a_bound_inside_a_box_matches_no_single_gold(pool):
  """A box is read as a label's sentence is: a hedge in brackets, plain or in `\\text{}`, is two answers, and words
  that change the value stay (unmatchable) rather than being dropped with the `\\text{}` around them."""
  think = "<think>\nok\n</think>\n\n"
  boxed = {"$\\boxed{5 (or 6)}$": "5 or 6",
           "$\\boxed{\\text{5 (or 6)}}$": "5 or 6",
           "$\\boxed{5 \\text{ (or 6)}}$": "5 or 6",
           "$\\boxed{5\\text{ (or possibly 6)}}$": "5 or 6",
           "$\\boxed{1/2 (or 50\\%)}$": "1/2 or 50\\%",  # a restatement, which the verifier recognises
           "$\\boxed{5 \\text{ or more}}$": "5 or more",
           "$\\boxed{5 \\text{ at least}}$": "5 at least",
           "The answer is 5 at least.": "5 at least",
           # Units in text mode stay harmless; a bracket inside a group or one that is no hedge stays.
           "$\\boxed{5 \\text{ apples}}$": "5",
           "$\\boxed{5\\text{ cm}}$": "5",
           "$\\boxed{\\sqrt{2 (or 3)}}$": "\\sqrt{2 (or 3)}",
           "$\\boxed{f(x (or y))}$": "f(x (or y))",
           "The answer is 45 at the store.": "45"}
  assert {c: extract_answer(think + c) for c in boxed} == boxed
  cases = [("$\\boxed{5 (or 6)}$", "6"), ("$\\boxed{5 (or 6)}$", "5"), ("$\\boxed{\\text{5 (or 6)}}$", "6"),
           ("$\\boxed{5 \\text{ (or 6)}}$", "5"), ("$\\boxed{5 \\text{ or more}}$", "5"),
           ("$\\boxed{5 \\text{ at least}}$", "5"), ("$\\boxed{5 \\text{ apples}}$", "5"),
           ("$\\boxed{5\\text{ cm}}$", "5"), ("$\\boxed{1/2 (or 50\\%)}$", "0.5")]
  verdicts = rewards.verify_batch([think + c for c, _ in cases], [g for _, g in cases], pool=pool)
  assert [(c, g, v) for (c, g), v in zip(cases, verdicts)] == [(c, g, i >= 6) for i, (c, g) in enumerate(cases)]


def test_a_number_with_a_unit_in_text_mode_is_left_to_the_verifier(pool):
  """`N \\text{...}` is unwrapped only where its words then read as the number alone, a hedge or a bound; a unit of
  one letter or with a slash, a degree sign or a note in brackets stays in `\\text{}`, which math-verify drops (as
  plain text, "10 m/s" would be a product), in a model's answer and a gold answer alike."""
  think = "<think>\nok\n</think>\n\n"
  boxed = {"$\\boxed{10 \\text{ m/s}}$": "10 \\text{ m/s}",
           "$\\boxed{2.5 \\text{ L}}$": "2.5 \\text{ L}",
           "$\\boxed{5 \\text{ N}}$": "5 \\text{ N}",
           "$\\boxed{25 \\text{ °C}}$": "25 \\text{ °C}",
           "$\\boxed{75 \\text{ g/mol}}$": "75 \\text{ g/mol}",
           "$\\boxed{4 \\text{ (rounded)}}$": "4 \\text{ (rounded)}",
           "$\\boxed{5 \\text{ cm}}$": "5"}
  assert {c: extract_answer(think + c) for c in boxed} == boxed
  assert extract_gold("10 \\text{ m/s}") == "10 \\text{ m/s}"
  cases = [("$\\boxed{10 \\text{ m/s}}$", "10"), ("$\\boxed{2.5 \\text{ L}}$", "2.5"), ("$\\boxed{5 \\text{ N}}$", "5"),
           ("$\\boxed{4 \\text{ (rounded)}}$", "4"), ("$\\boxed{10}$", "10 \\text{ m/s}"),
           ("$\\boxed{25 \\text{ °C}}$", "25"), ("$\\boxed{75 \\text{ g/mol}}$", "75"),
           ("$\\boxed{2 \\text{ (approximately)}}$", "2"), ("$\\boxed{42 \\text{ (in dollars)}}$", "42")]
  verdicts = rewards.verify_batch([think + c for c, _ in cases], [g for _, g in cases], pool=pool)
  assert [(c, g, v) for (c, g), v in zip(cases, verdicts)] == [(c, g, True) for c, g in cases]


def test_math_over_lines_that_opens_with_a_number_is_no_price(pool):
  """A `$$...$$` span is never a price, and a `$...$` one only when the number opening it is followed by prose
  ("$13.\\nShe spent 5 $"), not by an operator, `=` or LaTeX: multi-line math stays whole."""
  think = "<think>\nok\n</think>\n\n"
  spans = {"Adding up:\n$$15 + 27\n= 42$$\nSo she has 42 marbles.": "15 + 27\n= 42",
           "So $3 +\n4 = 7$": "3 +\n4 = 7",
           "Hence\n$$1. \\; 42$$": "1. \\; 42",
           "So\n$$12 + 30\n= 42$$": "12 + 30\n= 42",
           "The answer is $3 +\n4 = 7$.": "3 +\n4 = 7",
           # Prose after the number: a price, as before.
           "It costs $13.\nShe spent 5 $ on lunch.": "13",
           "It costs $13 (each).\nShe spent 5 $ on lunch.": "13",
           "So the answer is $13. She spent $5 on lunch.": "13"}
  assert {c: extract_answer(think + c) for c in spans} == spans
  cases = [("Adding up:\n$$15 + 27\n= 42$$\nSo she has 42 marbles.", "42"), ("So $3 +\n4 = 7$", "7"),
           ("Hence\n$$1. \\; 42$$", "42")]
  verdicts = rewards.verify_batch([think + c for c, _ in cases], [g for _, g in cases], pool=pool)
  assert [(c, g, v) for (c, g), v in zip(cases, verdicts)] == [(c, g, True) for c, g in cases]


def test_a_boxed_hedge_with_a_math_alternative_matches_no_single_gold(pool):
  """In a box, a hedge's alternative that is math stays beside the answer (two answers, which match no single gold
  unless both are the gold or they restate one value, "1/2 (or 50%)", and one is the gold); an alternative in words
  is dropped."""
  think = "<think>\nok\n</think>\n\n"
  boxed = {"$\\boxed{x = 2 (or x = 3)}$": "x = 2 or x = 3",
           "$\\boxed{\\sqrt{2} (or \\sqrt{3})}$": "\\sqrt{2} or \\sqrt{3}",
           "$\\boxed{\\frac{1}{2} (or \\frac{1}{3})}$": "\\frac{1}{2} or \\frac{1}{3}",
           "$\\boxed{2 (or x = 3)}$": "2 or x = 3",
           "$\\boxed{(1, 2) (or (2, 1))}$": "(1, 2) or (2, 1)",
           "$\\boxed{\\frac{1}{2} (or 50\\%)}$": "\\frac{1}{2} or 50\\%",
           "$\\boxed{0.75 (or \\frac{3}{4})}$": "0.75 or \\frac{3}{4}",
           "$\\boxed{1/2 (or equivalently 50\\% as a percentage)}$": "1/2 or 50\\%",
           "$\\boxed{12 (or as computed above)}$": "12"}
  assert {c: extract_answer(think + c) for c in boxed} == boxed
  assert extract_gold("\\boxed{\\sqrt{2} (or \\sqrt{3})}") == "\\sqrt{2} or \\sqrt{3}"
  cases = [("$\\boxed{x = 2 (or x = 3)}$", "2", False), ("$\\boxed{\\sqrt{2} (or \\sqrt{3})}$", "\\sqrt{2}", False),
           ("$\\boxed{\\sqrt{2} (or \\sqrt{3})}$", "\\sqrt{3}", False),
           ("$\\boxed{\\frac{1}{2} (or \\frac{1}{3})}$", "\\frac{1}{2}", False),
           ("$\\boxed{\\frac{1}{2} (or \\frac{1}{3})}$", "\\frac{1}{3}", False),
           ("$\\boxed{x = 2 (or x = 3)}$", "2, 3", True), ("$\\boxed{\\frac{1}{2} (or 50\\%)}$", "0.5", True)]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]

def test_a_labelled_answer_followed_by_white_space_or_a_special_token_is_read(pool):
  """Every label, number, white space and ending: the answer is the number as it reads alone, whatever white space
  and ending follow it."""
  labels = ("The answer is ", "So the answer is ", "Answer: ", "**Answer:** ", "The final answer is ", "Answer:\n")
  numbers = {"42": "42", "1,200": "1,200", "-7": "-7", "2.5": "2.5", "**42**": "42"}
  spaces = (" ", "  ", "\t", " \t ", " \n", " \n\n", "\u00a0", " \r\n")
  endings = ("", "<|im_end|>", "<|end|>", "\nDone.", ".", " .", "\n<|im_end|>", "\n\nCheck: $2 + 2 = 4$.")
  completions, expected = [], []
  for label in labels:
    for number, value in numbers.items():
      for space in spaces:
        for ending in endings:
          completions.append("<think>x</think>\n" + label + number + space + ending)
          expected.append(value)
  assert [extract_answer(c) for c in completions] == expected
  assert all(rewards.readable_answer(c) == e for c, e in zip(completions, expected))
  cases = ["The answer is 42 ", "The answer is 42 <|im_end|>", "So the answer is 42 \n", "Answer: 42 \nDone."]
  assert rewards.verify_batch(cases, ["42"] * 4, pool=pool) == [True] * 4
  assert rewards.verify_batch(cases, ["41"] * 4, pool=pool) == [False] * 4


def test_words_that_change_a_value_in_text_mode_read_as_words(pool):
  """`N \\text{ words}` whose words change the value reads as it does after a label ("2 million" is not 2), not
  as N with the `\\text{}` dropped; a unit math-verify reads in `\\text{}` still stays there."""
  think = "<think>\nok\n</think>\n\n"
  boxed = {"$\\boxed{2 \\text{ million}}$": "2 million",
           "$\\boxed{3 \\text{ hundred}}$": "3 hundred",
           "$\\boxed{1.5 \\text{ billion}}$": "1.5 billion",
           "$\\boxed{4 \\text{ thousand}}$": "4 thousand",
           "$\\boxed{12 \\text{ thousand dollars}}$": "12 thousand dollars",
           "$\\boxed{5 \\text{ dozen}}$": "5 dozen",
           "$\\boxed{3 \\text{ eighths}}$": "3 eighths",
           "$\\boxed{3 \\text{ squared}}$": "3 squared",
           "$\\boxed{3 \\text{ times}}$": "3 \\text{ times}",  # "3 times as many": left to math-verify, which reads 3
           "$\\boxed{2 \\text{ and 3}}$": "2 and 3",
           "$\\boxed{3 \\text{ (and 4)}}$": "3 (and 4)",
           "$\\boxed{20 \\text{ percent}}$": "20 percent",
           "$\\boxed{10 \\text{ m/s}}$": "10 \\text{ m/s}",
           "$\\boxed{6 \\text{ (not 7)}}$": "6 \\text{ (not 7)}",
           "$\\boxed{40 \\text{ (to the nearest dollar)}}$": "40 \\text{ (to the nearest dollar)}"}
  assert {c: extract_answer(think + c) for c in boxed} == boxed
  assert extract_gold("\\boxed{2 \\text{ million}}") == "2 million"
  wrong = [("$\\boxed{2 \\text{ million}}$", "2"), ("$\\boxed{3 \\text{ hundred}}$", "3"),
           ("$\\boxed{1.5 \\text{ billion}}$", "1.5"), ("$\\boxed{4 \\text{ thousand}}$", "4"),
           ("$\\boxed{5 \\text{ dozen}}$", "5"), ("$\\boxed{3 \\text{ eighths}}$", "3"),
           ("$\\boxed{3 \\text{ squared}}$", "3"), ("$\\boxed{2 \\text{ and 3}}$", "2"),
           ("$\\boxed{3 \\text{ (and 4)}}$", "3")]
  cases = [(c, g, False) for c, g in wrong]
  cases += [("$\\boxed{20 \\text{ percent}}$", "0.2", True), ("$\\boxed{10 \\text{ m/s}}$", "10", True),
            ("$\\boxed{40 \\text{ (to the nearest dollar)}}$", "40", True)]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def test_a_hedge_is_right_only_when_every_alternative_is_the_gold(pool):
  """Alternatives joined by "or" are a hedge, kept as "a or b": it matches a gold only when each alternative does,
  or any of them where they restate one value ("$\\frac{3}{10}$, or $30\\%$"), or as a whole a set gold ("x = 2 or
  x = 3" and "2, 3"); a relation "or" joins to an equation is no alternative ("since $n > 0$ or $n = 5$")."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"The probability is $\\frac{3}{10}$, or $30\\%$.": "\\frac{3}{10} or 30\\%",
             "So Ann has $5$ or $6$ apples.": "5 or 6",
             "The answer is $5$ or $6$.": "5 or 6",
             "So \\boxed{5} or \\boxed{6}": "5 or 6",
             "The solutions are $\\boxed{2}$ and $\\boxed{3}$.": "2, 3",
             "We get $n = 5$; there is no other solution, since $n > 0$ or $n = 5$.": "n = 5",
             "So $x \\le 3$ or $x \\ge 5$.": "x \\le 3 or x \\ge 5",
             "$\\boxed{2 (or x = 2)}$": "2 or x = 2",
             "Ann has $5$ apples or $6$ apples.": "5 or 6",  # the noun after each alternative
             "Ann has $1$ apple, or $2$ apples.": "1 or 2", "He needs $3$ dozen, or $36$ eggs.": "36"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  assert extract_gold("\\boxed{5} or \\boxed{6}") == "5 or 6"
  right = [("The probability is $\\frac{3}{10}$, or $30\\%$.", "\\frac{3}{10}"),
           ("The probability is $\\frac{1}{5}$, or $20\\%$.", "\\frac{1}{5}"),
           ("So the chance is $\\frac{1}{4}$ or $25\\%$.", "\\frac{1}{4}"),
           ("So the answer is $\\frac{1}{2}$, or $50\\%$.", "\\frac{1}{2}"),
           ("We get $n = 5$; there is no other solution, since $n > 0$ or $n = 5$.", "5"),
           ("$\\boxed{2 (or x = 2)}$", "2"), ("$\\boxed{(2, 3) (or x = 2, y = 3)}$", "(2,3)"),
           ("The answer is 3/4 (or 0.75 as a decimal).", "3/4"),
           ("Solving gives $x = 2$ or $x = 3$.", "2, 3"), ("$\\boxed{x = 2 (or x = 3)}$", "2, 3"),
           ("So \\boxed{5} or \\boxed{6}", "\\boxed{5} or \\boxed{6}"), ("Ann has $5$ apples, or $5$ apples.", "5")]
  wrong = [("So Ann has $5$ or $6$ apples.", "6"), ("So Ann has $5$ or $6$ apples.", "5"),
           ("$\\boxed{x = 2 (or x = 3)}$", "2"), ("$\\boxed{\\sqrt{2} (or \\sqrt{3})}$", "\\sqrt{2}"),
           ("The answer is $5$ or $6$.", "6"), ("The answer is 2 (or 3).", "2"), ("So \\boxed{5} or \\boxed{6}", "5"),
           ("So the discount is $20\\%$, or $\\frac{1}{4}$ off.", "20"), ("$\\boxed{5 \\text{ or more}}$", "5"),
           ("Ann has $5$, $6$, or $7$ apples.", "7"), ("The answer is $2$ or $2$ or $3$.", "2"),
           ("Ann has $5$ apples or $6$ apples.", "5"), ("Ann has $5$ apples or $6$ apples.", "6"),
           ("Ann has $1$ apple, or $2$ apples.", "1")]
  cases = [(c, g, True) for c, g in right] + [(c, g, False) for c, g in wrong]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def test_count_nouns_and_comparatives_in_text_mode_are_left_to_the_verifier(pool):
  """In a box, `N \\text{ words}` is unwrapped only for words that change the value alone (a scale, a fraction,
  "percent", a hedge or a bound, a word joining another number); "times as many", "more cookies", "quarters", "of
  them" stay in `\\text{}`, which math-verify drops, so the answer is N."""
  think = "<think>\nok\n</think>\n\n"
  kept = {"$\\boxed{3 \\text{ times as many}}$": "3 \\text{ times as many}",
          "$\\boxed{2 \\text{ times}}$": "2 \\text{ times}",
          "$\\boxed{6 \\text{ more cookies}}$": "6 \\text{ more cookies}",
          "$\\boxed{12 \\text{ quarters}}$": "12 \\text{ quarters}",
          "$\\boxed{7 \\text{ of them}}$": "7 \\text{ of them}",
          "$\\boxed{6 \\text{ over}}$": "6 \\text{ over}",
          "$\\boxed{1200 \\text{ meters (or 3 laps)}}$": "1200 \\text{ meters (or 3 laps)}",
          "$\\boxed{3 \\text{ squared units}}$": "3 \\text{ squared units}",
          "$\\boxed{7 \\text{ (mod 12)}}$": "7 \\text{ (mod 12)}",
          "$\\boxed{40 \\text{ (to 2 decimal places)}}$": "40 \\text{ (to 2 decimal places)}",
          # Words that change the value alone still read as words.
          "$\\boxed{2 \\text{ million}}$": "2 million",
          "$\\boxed{2 \\text{ dozens}}$": "2 dozens",
          "$\\boxed{2 \\text{ to 1}}$": "2 to 1",
          "$\\boxed{5 \\text{ and a half}}$": "5 and a half",
          "$\\boxed{5 \\text{ at most}}$": "5 at most"}
  assert {c: extract_answer(think + c) for c in kept} == kept
  cases = [("$\\boxed{3 \\text{ times as many}}$", "3", True), ("$\\boxed{2 \\text{ times}}$", "2", True),
           ("$\\boxed{6 \\text{ more cookies}}$", "6", True), ("$\\boxed{12 \\text{ quarters}}$", "12", True),
           ("$\\boxed{7 \\text{ of them}}$", "7", True), ("$\\boxed{6 \\text{ over}}$", "6", True),
           ("$\\boxed{1200 \\text{ meters (or 3 laps)}}$", "1200", True),
           ("$\\boxed{3 \\text{ squared units}}$", "3", True), ("$\\boxed{7 \\text{ (mod 12)}}$", "7", True),
           ("$\\boxed{40 \\text{ (to 2 decimal places)}}$", "40", True), ("$\\boxed{2 \\text{ million}}$", "2", False),
           ("$\\boxed{2 \\text{ dozens}}$", "2", False), ("$\\boxed{2 \\text{ to 1}}$", "2", False),
           ("$\\boxed{5 \\text{ and a half}}$", "5", False)]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def test_a_restatement_in_another_form_is_right_when_any_form_is_the_gold(pool):
  """Alternatives that are all equal ("$\\frac{1}{4}$, or $25\\%$") restate one value: right when any of them is the
  gold. An alternative the verifier cannot compare (a price, a unit word) is dropped, not taken as a rival value;
  alternatives of different values stay a hedge, which matches no single gold."""
  think = "<think>\nok\n</think>\n\n"
  boxed = {"$\\boxed{\\frac{1}{4} (or 25\\%)}$": "\\frac{1}{4} or 25\\%",
           "$\\boxed{0.25 (or 25\\%)}$": "0.25 or 25\\%",
           "$\\boxed{1/2 (or equivalently 50\\% as a percentage)}$": "1/2 or 50\\%"}
  assert {c: extract_answer(think + c) for c in boxed} == boxed
  right = [("That is $\\frac{1}{4}$, or $25\\%$.", "25"), ("She saved $0.2$, or $20\\%$.", "20"),
           ("The discount is $\\$12$, or $20\\%$.", "20"), ("$\\boxed{\\frac{1}{4} (or 25\\%)}$", "25"),
           ("$\\boxed{0.25 (or 25\\%)}$", "25"), ("$\\boxed{0.25 (or 25\\%)}$", "\\frac{1}{4}"),
           ("The total is $\\$1.50$, or $150$ cents.", "1.50"), ("The answer is 12 (or twelve).", "12"),
           ("So the discount is $20\\%$, or $\\frac{1}{5}$ off.", "20"),
           ("So it is $5 \\text{ cm}$, or $50 \\text{ mm}$.", "5")]
  wrong = [("That is $\\frac{1}{4}$, or $25\\%$.", "4"), ("$\\boxed{0.25 (or 25\\%)}$", "0.5"),
           ("The answer is $\\$5$ or $\\$6$.", "6"), ("The answer is $\\frac{1}{4}$ or $\\frac{1}{3}$.", "\\frac14"),
           ("$\\boxed{0.25 (or 0.3)}$", "0.25"), ("So it is $5 \\text{ cm}$ or $6 \\text{ cm}$.", "6"),
           ("So it is $5 \\text{ cm}$, or $50 \\text{ mm}$.", "6")]
  cases = [(c, g, True) for c, g in right] + [(c, g, False) for c, g in wrong]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def test_a_hedge_or_a_bound_in_words_inside_a_box_matches_no_single_gold(pool):
  """A spelled-out number in a hedge is a number ("12 (or thirteen)" -> "12 or 13"), and a bound or comparative
  ("5 (or more)") an alternative no gold matches, in a box as after a label."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"$\\boxed{12 (or thirteen)}$": "12 or 13",
             "$\\boxed{5 (or more)}$": "5 or more",
             "$\\boxed{5 (or fewer)}$": "5 or fewer",
             "$\\boxed{5 \\text{ (or more)}}$": "5 or more",
             "The answer is 5 (or higher).": "5 or higher",
             "The answer is 12 (or thirteen).": "12 or 13",
             "$\\boxed{5 (or more precisely 5.2)}$": "5",  # a refinement in words, no bound
             "$\\boxed{12 (or 13, if we include the endpoint)}$": "12 or 13"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  wrong = [("$\\boxed{12 (or thirteen)}$", "12"), ("$\\boxed{12 (or thirteen)}$", "13"),
           ("$\\boxed{5 (or more)}$", "5"), ("$\\boxed{5 (or fewer)}$", "5"), ("$\\boxed{5 (or less)}$", "5"),
           ("$\\boxed{5 \\text{ (or more)}}$", "5"), ("The answer is 5 (or more).", "5"),
           ("The answer is 12 (or thirteen).", "12"), ("$\\boxed{12 (or 13, if we include the endpoint)}$", "12")]
  verdicts = rewards.verify_batch([think + c for c, _ in wrong], [g for _, g in wrong], pool=pool)
  assert [(c, g, v) for (c, g), v in zip(wrong, verdicts)] == [(c, g, False) for c, g in wrong]


def test_a_hedge_is_a_set_only_beside_a_gold_of_several_answers(pool):
  """A hedge "2 or 3" read as a whole is the set {2, 3}: it matches a gold set ("2, 3", "\\{2, 3\\}", "\\pm 1"),
  never an ordered pair or an interval ("(2,3)", "[2,3]"), which math-verify would count equal to it."""
  think = "<think>\nok\n</think>\n\n"
  right = [("$\\boxed{2 (or 3)}$", "2, 3"), ("$\\boxed{2 (or 3)}$", "\\{2,3\\}"),
           ("The answer is $x = 1$ or $x = -1$.", "\\pm 1"), ("Solving gives $x = 2$ or $x = 3$.", "2, 3")]
  wrong = [("$\\boxed{2 (or 3)}$", "(2,3)"), ("The answer is $2$ or $3$.", "(2,3)"),
           ("\\boxed{2} or \\boxed{3}", "(2, 3)"), ("The answer is $2$ or $3$.", "[2,3]"),
           ("The answer is 2 or 3.", "(2,3)")]
  cases = [(c, g, True) for c, g in right] + [(c, g, False) for c, g in wrong]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  assert [(c, g, v) for (c, g, _), v in zip(cases, verdicts)] == [(c, g, e) for c, g, e in cases]


def _grades(pool, right, wrong):
  """(completion, gold, verdict) for each case, and what each should be: right ones True, wrong ones False."""
  think = "<think>\nok\n</think>\n\n"
  cases = [(c, g, True) for c, g in right] + [(c, g, False) for c, g in wrong]
  verdicts = rewards.verify_batch([think + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  return [(c, g, v) for (c, g, _), v in zip(cases, verdicts)], cases


def test_a_restatement_in_degrees_a_repeating_decimal_or_another_unit_word_is_right(pool):
  """Degrees restate radians (pi/3 is 60 degrees), a repeating decimal is its fraction (0.\\overline{3} is 1/3), and
  two alternatives each with a unit word of its own restate one quantity; a unit word on one side only is dropped,
  so "12 apples (or 13)" stays a hedge between values."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"The answer is 150 minutes (or 2.5 hours).": "150 minutes or 2.5 hours",
             "The answer is 12 apples (or 13).": "12 or 13", "$\\boxed{12 apples (or 13)}$": "12 or 13"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [("$\\boxed{\\frac{\\pi}{3} (or 60^\\circ)}$", "\\frac{\\pi}{3}"),
           ("$\\boxed{\\frac{\\pi}{3} (or 60^\\circ)}$", "60"),
           ("The answer is $\\frac{\\pi}{3}$ or $60^{\\circ}$.", "\\frac{\\pi}{3}"),
           ("$\\boxed{\\frac{1}{3} (or 0.\\overline{3})}$", "\\frac{1}{3}"),
           ("$\\boxed{0.\\overline{3}}$", "\\frac{1}{3}"),
           ("$\\boxed{0.1\\overline{6}}$", "\\frac{1}{6}"), ("$\\boxed{1.\\overline{27}}$", "\\frac{14}{11}"),
           ("The answer is 150 minutes (or 2.5 hours).", "150"), ("The answer is 5 cm (or 50 mm).", "5")]
  wrong = [("$\\boxed{\\frac{\\pi}{4} (or 60^\\circ)}$", "\\frac{\\pi}{4}"),
           ("$\\boxed{\\frac{1}{3} (or 0.\\overline{4})}$", "\\frac{1}{3}"), ("$\\boxed{0.\\overline{3}}$", "0.3"),
           ("The answer is 12 apples (or 13).", "13"), ("$\\boxed{12 apples (or 13)}$", "13"),
           ("The answer is 12 apples (or 13 apples).", "13")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected

def test_counts_of_one_noun_in_any_plural_or_before_more_words_are_a_hedge(pool):
  """Alternatives each followed by one noun, singular or plural ("box" / "boxes", "child" / "children") and with
  words after it ("$6$ apples left", "in total"), are two counts of one thing: a hedge, which matches no single gold;
  another noun after the last ("$3$ dozen, or $36$ eggs in all") may restate the quantity, so the last stands."""
  think = "<think>\nok\n</think>\n\n"
  hedges = {"Ann has $5$ apples or $6$ apples left.": "5 or 6",
            "The answer is $5$ apples or $6$ apples left.": "5 or 6",
            "Ann has $5$ apples or $6$ apples in total.": "5 or 6", "She has $1$ box or $2$ boxes.": "1 or 2",
            "She has $1$ child or $2$ children.": "1 or 2", "They need $1$ bus or $2$ buses.": "1 or 2",
            "She has $1$ penny or $2$ pennies.": "1 or 2", "It is $1$ foot or $2$ feet.": "1 foot or 2 feet"}
  assert {c: extract_answer(think + c) for c in hedges} == hedges
  assert extract_answer(think + "He needs $3$ dozen, or $36$ eggs in all.") == "36"
  right = [("He needs $3$ dozen, or $36$ eggs in all.", "36"), ("Ann has $5$ apples, or $5$ apples in all.", "5")]
  wrong = [(c, g) for c, a in hedges.items() for g in a.split(" or ")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected



def test_a_mixed_number_is_its_improper_fraction(pool):
  """"2 1/2" (a parser reads 2 * 1/2 = 1) is 5/2, alone, before words or in a box; an improper fraction after the
  whole number ("2 3/2") or more digits ("2 1/2.5") are no mixed number and are left as written."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"The answer is 2 1/2.": "5/2", "The answer is 3 3/4 miles.": "15/4", "$\\boxed{-2 1/2}$": "-5/2",
             "The answer is 2 3/2.": "2 3/2", "The answer is 2 1/2.5.": "2 1/2.5"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  assert extract_gold("2 1/2") == "5/2" and extract_gold("\\boxed{1 1/3}") == "4/3"
  right = [("The answer is 2 1/2.", "\\frac{5}{2}"), ("The answer is 2 1/2 cups.", "2.5"),
           ("$\\boxed{-2 1/2}$", "-\\frac{5}{2}"), ("The answer is 1 1/3 hours.", "1 1/3")]
  wrong = [("The answer is 2 1/2.", "1"), ("$\\boxed{2 1/2}$", "1"), ("The answer is 1 1/3 hours.", "1/3")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected

def test_a_mixed_number_before_a_unit_is_read_whole_with_its_unit(pool):
  """A mixed number before a unit word, as a hedge's alternative or as the answer before one, in a box with the unit
  in `\\text{}`, or in math before one, is its improper fraction with the unit after it, so a restatement in another
  unit is compared as one quantity and the unit does not hide the fraction's end."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"The answer is 150 minutes (or 2 1/2 hours).": "150 minutes or 5/2 hours",
             "The answer is 18 inches (or 1 1/2 feet).": "18 inches or 3/2 feet",
             "The answer is 1 1/2 feet (or 18 inches).": "3/2 feet or 18 inches",
             "The answer is 1 1/2 (or 18 inches).": "3/2 or 18",
             "The answer is \\boxed{2 1/2 \\text{ hours}}.": "5/2", "$\\boxed{2 1/2\\text{ cups}}$": "5/2",
             "It takes $2 1/2$ hours, or $150$ minutes.": "5/2 hours or 150 minutes"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [("The answer is 150 minutes (or 2 1/2 hours).", "150"), ("The answer is 18 inches (or 1 1/2 feet).", "18"),
           ("The answer is 1 1/2 feet (or 18 inches).", "18"), ("The answer is 2 1/2 hours (or 150 minutes).", "150"),
           ("The answer is \\boxed{2 1/2 \\text{ hours}}.", "2.5"), ("$\\boxed{2 1/2\\text{ cups}}$", "2.5"),
           ("It takes $2 1/2$ hours, or $150$ minutes.", "150"), ("\\boxed{1 1/2 \\text{ feet}}", "\\frac{3}{2}")]
  wrong = [("The answer is 1 1/2 (or 18 inches).", "18"), ("The answer is 150 minutes (or 3 1/2 hours).", "150"),
           ("\\boxed{2 1/2 \\text{ hours}}", "1")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected



def test_a_decimal_percent_is_its_number_or_its_value(pool):
  """A percent with decimals matches a plain number as an integer percent does ("50\\%" is 50 and 0.5): "12.5\\%" is
  12.5 and 0.125, either side the gold; a hedge of different values stays one."""
  right = [("$\\boxed{12.5\\%}$", "12.5"), ("The answer is 37.5%.", "37.5"), ("$\\boxed{12.5}$", "12.5\\%"),
           ("That is $\\frac{1}{8}$, or $12.5\\%$.", "12.5"), ("$\\boxed{12.0\\%}$", "12"),
           ("$\\boxed{12.5\\%}$", "0.125"), ("$\\boxed{0.125}$", "12.5\\%"), ("That is $0.125$, or $12.5\\%$.", "12.5"),
           ("$\\boxed{50\\%}$", "50"), ("$\\boxed{50\\%}$", "0.5"), ("$\\boxed{12}$", "12\\%")]
  wrong = [("$\\boxed{12.5\\%}$", "12.6"), ("$\\boxed{12.5\\%}$", "1.25"), ("$\\boxed{12.5}$", "13.5\\%"),
           ("The answer is $12.5$ or $13.5\\%$.", "12.5"), ("The answer is $12.5\\%$ or $13.5\\%$.", "12.5"),
           ("$\\boxed{12.5\\%}$", "\\frac{25}{2}")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_list_of_choice_letters_in_text_is_a_set(pool):
  """`\\text{A, C}` (a MATH gold) is the letters A and C, as "A, C" is, in any order, with or without brackets or
  "and"; a single letter in `\\text{}` is that letter."""
  right = [("$\\boxed{A, D, F, G, H}$", "\\text{A, D, F, G, H}"), ("$\\boxed{\\text{C, A}}$", "\\text{A, C}"),
           ("$\\boxed{\\text{A, C}}$", "A, C"), ("$\\boxed{\\text{(A), (C)}}$", "\\text{A, C}"),
           ("$\\boxed{\\text{A and C}}$", "\\text{A, C}"), ("$\\boxed{\\text{A, C, and E}}$", "\\text{(A), (C), (E)}"),
           ("$\\boxed{B}$", "\\text{B}"), ("$\\boxed{\\text{B}}$", "B"), ("$\\boxed{\\text{B}}$", "\\text{B}")]
  wrong = [("$\\boxed{\\text{A, C}}$", "\\text{A, D}"), ("$\\boxed{A}$", "\\text{A, C}"),
           ("$\\boxed{A, C, D}$", "\\text{A, C}"), ("$\\boxed{\\text{A, C}}$", "\\text{C}"),
           ("$\\boxed{\\text{B}}$", "\\text{A, B}")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_latex_space_before_a_percent_or_a_unit_and_degree_read(pool):
  """A LaTeX space (`\\,`, `\\;`, `\\:`, `\\!`, `~`, `\\ `) before `\\%`, `\\text{}` or `\\mathrm{}` is no product,
  and `\\degree` is a degree sign (restating radians in a hedge)."""
  right = [("$\\boxed{12\\,\\%}$", "12"), ("$\\boxed{12~\\%}$", "12"), ("$\\boxed{12 \\; \\%}$", "12"),
           ("$\\boxed{12.5\\,\\%}$", "12.5"), ("$\\boxed{5~\\text{cm}}$", "5"), ("$\\boxed{5\\ \\mathrm{cm}}$", "5"),
           ("$\\boxed{5\\:\\text{cm}}$", "5"), ("$\\boxed{30\\degree}$", "30"), ("$\\boxed{30^{\\degree}}$", "30"),
           ("That is $\\frac{\\pi}{6}$, or $30\\degree$.", "\\frac{\\pi}{6}"),
           ("So it is $5~\\text{cm}$, or $50~\\text{mm}$.", "5"), ("$\\boxed{12\\%}$", "12"),
           ("$\\boxed{5\\,\\text{cm}}$", "5")]
  wrong = [("$\\boxed{12\\,\\%}$", "13"), ("$\\boxed{5~\\text{cm}}$", "6"), ("$\\boxed{30\\degree}$", "31"),
           ("So it is $5~\\text{cm}$ or $6~\\text{cm}$.", "6")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_alternatives_joined_by_lor_a_worded_or_or_a_hedge_word_are_a_hedge(pool):
  """`\\lor` / `\\vee`, "or" in `\\text{}` between boxes, "or maybe" / "or possibly" between answers, and "or" between
  math after the label join a hedge, which matches no single gold; a gold that is itself such
  a set ("x = 5 \\lor x = 6", "5, 6") still matches it. `\\textrm{ or }` and `\\mbox{ or }` read as `\\text{ or }`."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"$\\boxed{5 \\lor 6}$": "5 or 6", "$\\boxed{5 \\vee 6}$": "5 or 6",
             "$\\boxed{5} \\quad\\text{or}\\quad \\boxed{6}$": "5 or 6", "The answer is $5$, or maybe $6$.": "5 or 6",
             "$\\boxed{5}$, or possibly $\\boxed{6}$": "5 or 6", "The answer is $5$ or $6$.": "5 or 6",
             "$\\boxed{x = 5 \\textrm{ or } x = 6}$": "x = 5 \\text{ or } x = 6"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  assert extract_gold("$\\boxed{x = 5 \\lor x = 6}$") == "x = 5 or x = 6"
  right = [("$\\boxed{x = 5 \\lor x = 6}$", "x = 5 \\lor x = 6"), ("$\\boxed{x = 5 \\lor x = 6}$", "5, 6"),
           ("$\\boxed{5} \\quad\\text{or}\\quad \\boxed{6}$", "5, 6"),
           ("$\\boxed{x = 5 \\textrm{ or } x = 6}$", "5, 6")]
  wrong = [("$\\boxed{5 \\lor 6}$", "5"), ("$\\boxed{5 \\lor 6}$", "6"), ("$\\boxed{5 \\vee 6}$", "6"),
           ("$\\boxed{x = 5 \\lor x = 6}$", "6"), ("$\\boxed{5} \\quad\\text{or}\\quad \\boxed{6}$", "6"),
           ("$\\boxed{5} \\text{ or } \\boxed{6}$", "6"), ("The answer is $5$, or maybe $6$.", "5"),
           ("The answer is 5, or maybe 6.", "5"), ("$\\boxed{5}$, or possibly $\\boxed{6}$", "6"),
           ("The answer is $5$ or $6$.", "5"), ("$\\boxed{5 \\textrm{ or } 6}$", "6"),
           ("$\\boxed{x = 5 \\textrm{ or } x = 6}$", "6"), ("The answer is x = 5 \\mbox{ or } x = 6.", "6")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_value_words_in_textrm_or_mbox_read_as_in_text(pool):
  """`\\textrm{}` and `\\mbox{}` after a number read as `\\text{}` does: "2 \\textrm{ million}" is not 2."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"$\\boxed{2 \\textrm{ million}}$": "2 million", "$\\boxed{2 \\mbox{ million}}$": "2 million",
             "$\\boxed{\\textrm{5 cm}}$": "5", "$\\boxed{5 \\mbox{ (or 6)}}$": "5 or 6"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [("$\\boxed{10 \\textrm{ cm}}$", "10"), ("$\\boxed{10 \\mbox{ cm}}$", "10"),
           ("$\\boxed{\\textrm{5 cm}}$", "5")]
  wrong = [("$\\boxed{2 \\textrm{ million}}$", "2"), ("$\\boxed{2 \\mbox{ million}}$", "2"),
           ("$\\boxed{5 \\textrm{ (or 6)}}$", "5")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_price_is_dropped_only_beside_its_restatement(pool):
  """A price beside a plain number of another value is a hedge ("$\\$5$ or $6$"); beside its value in cents
  ("$\\$1.50$, or $150$ cents", graded on either) or in another form ("$\\$12$, or $20\\%$") it restates one
  quantity."""
  right = [("The total is $\\$1.50$, or $150$ cents.", "1.50"), ("The total is $\\$1.50$, or $150$ cents.", "150"),
           ("The discount is $\\$12$, or $20\\%$.", "20"), ("The answer is $\\$6$ or $6$.", "6")]
  wrong = [("The answer is $\\$5$ or $6$.", "6"),
           ("The answer is $\\$5$ or $6$.", "5"),
           ("The answer is $\\$5$ or $\\$6$.", "6")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_alternatives_in_units_restate_one_quantity_only_where_their_values_agree(pool):
  """Alternatives in units of one dimension restate one quantity only where their values agree once converted
  ("3 hours (or 180 minutes)"); in other units or count nouns ("8 pies (or 9 cakes)") they are rival values unless
  their numbers are equal. After a bracketed hedge, a word that is no unit goes ("13 if we count ...")."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"The answer is 8 pies (or 9 cakes).": "8 or 9",
             "The answer is 12 apples (or 13 if we count the rotten one).": "12 or 13",
             "The answer is 18 km (or 20 for the other case).": "18 or 20",
             "$\\boxed{150 \\text{ minutes} (or 2.5 hours)}$": "150 minutes or 2.5 hours"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [("The answer is 3 hours (or 180 minutes).", "3"), ("The answer is 5 cm (or 50 mm).", "5"),
           ("The answer is 2 kg (or 2000 g).", "2"), ("The answer is $5 \\text{ cm}$ or $50 \\text{ mm}$.", "5"),
           ("$\\boxed{150 \\text{ minutes} (or 2.5 hours)}$", "150"), ("The answer is 12 apples (or 12 pears).", "12"),
           ("The answer is 1 mile (or 1.61 km).", "1"),
           # Two restatements: either pays (the second is often the asked unit).
           ("The answer is 3 hours (or 180 minutes).", "180"), ("The answer is 5 cm (or 50 mm).", "50"),
           ("The answer is $5 \\text{ cm}$ or $50 \\text{ mm}$.", "50"),
           ("$\\boxed{150 \\text{ minutes} (or 2.5 hours)}$", "2.5")]
  wrong = [("The answer is 3 hours (or 150 minutes).", "3"), ("The answer is 5 cm (or 60 mm).", "5"),
           ("Final answer: 45 minutes (or 1 hour).", "45"), ("The answer is 8 pies (or 9 cakes).", "8"),
           ("The answer is 12 apples (or 13 if we count the rotten one).", "12"),
           ("The answer is 18 km (or 20 for the other case).", "18"), ("$\\boxed{3 hours (or 150 minutes)}$", "3"),
           ("The answer is 3 hours (or 4 cm).", "3"), ("The answer is $5 \\text{ cm}$ or $60 \\text{ mm}$.", "5"),
           ("The answer is 1 mile (or 1.62 km).", "1")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_an_exact_value_and_its_rounded_decimal_restate_one_value(pool):
  """A decimal or percent with d decimal places (two significant digits at least) restates a value that rounds to
  it at d places ("$\\pi$, or $3.14$"), so the exact value is right; "5 or 6" and "\\pi or 3" stay hedges."""
  right = [("The answer is thus $\\frac{2}{3}$ or $66.7\\%$.", "\\frac{2}{3}"),
           ("The answer is therefore $\\pi$, or $3.14$.", "\\pi"),
           ("The answer is $\\sqrt{2}$ (or $1.414$).", "\\sqrt{2}")]
  wrong = [("The answer is $\\pi$ or $3$.", "\\pi"), ("The answer is $\\pi$ or $3.15$.", "\\pi"),
           ("The answer is $5$ or $6$.", "5"), ("The answer is $\\frac{2}{3}$ or $66.6\\%$.", "\\frac{2}{3}"),
           ("The answer is $\\frac{1}{30}$ or $0.03$.", "\\frac{1}{30}")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_formula_of_logic_keeps_its_lor(pool):
  """`\\lor` between formulas of logic is no hedge: the formula matches itself, and a list does not match it."""
  right = [("$\\boxed{\\neg p \\lor q}$", "\\neg p \\lor q"),
           ("The answer is $(p \\land q) \\lor r$.", "(p \\land q) \\lor r")]
  wrong = [("$\\boxed{A, B}$", "A \\lor B")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_price_beside_math_or_in_cents_with_separators_is_compared(pool):
  """A price is dropped only beside a percent or a unit word; beside other math it is compared as its plain value
  ("$\\$2$ or $\\frac{5}{2}$" and "$\\$1,200$ or $120000$" are hedges), and beside its value in cents, said so, it
  restates it, thousands separators and a sign included."""
  right = [("The cost is $\\$1,200$ or $120000$ cents.", "1200"), ("The cost is $-\\$5$ or $-500$ cents.", "-5"),
           ("The cost is $\\$2.50$ or $\\frac{5}{2}$.", "\\frac{5}{2}")]
  wrong = [("The cost is $\\$2$ or $\\frac{5}{2}$.", "\\frac{5}{2}"), ("The cost is $\\$3$ or $\\sqrt{16}$.", "4"),
           ("$\\boxed{\\$3 (or \\frac{7}{2})}$", "\\frac{7}{2}"), ("The cost is $\\$3$ or $+4$.", "4"),
           ("The cost is $\\$1,200$ or $130000$ cents.", "1200"), ("The cost is $-\\$5$ or $-500$.", "-5")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_degree_signs_spaced_or_between_boxes_and_grouped_repeating_decimals(pool):
  """"°" reads as `^\\circ` on both sides; "or" between boxes joins them with LaTeX spacing around it
  ("\\quad \\text{or} \\quad", "\\;", "~"); a repeating decimal with thousands separators is one number."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"$\\boxed{2}$ \\quad \\text{or} \\quad $\\boxed{3}$": "2 or 3",
             "$$\\boxed{5} \\qquad \\text{or} \\qquad \\boxed{6}$$": "5 or 6",
             "\\boxed{5} \\; \\text{or} \\; \\boxed{6}": "5 or 6", "\\boxed{5}~\\text{or}~\\boxed{6}": "5 or 6",
             "\\boxed{5} \\quad \\text{which is wrong, so} \\quad \\boxed{6}": "6"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [("The angle is $90°$, or $\\frac{\\pi}{2}$.", "90"),
           ("The angle is $90°$, or $\\frac{\\pi}{2}$.", "\\frac{\\pi}{2}"), ("$\\boxed{90°}$", "90"),
           ("$\\boxed{\\frac{\\pi}{2} (or 90°)}$", "90"), ("$\\boxed{90^\\circ}$", "90°"),
           ("$\\boxed{1000.\\overline{3}}$", "1,000.\\overline{3}"),
           ("$\\boxed{1,000.\\overline{3}}$", "\\frac{3001}{3}")]
  wrong = [("The angle is $90°$, or $\\frac{\\pi}{3}$.", "90"), ("$\\boxed{5} \\; \\text{or} \\; \\boxed{6}$", "6"),
           ("$\\boxed{5}~\\text{or}~\\boxed{6}$", "6"), ("$\\boxed{2}$ \\quad \\text{or} \\quad $\\boxed{3}$", "3"),
           ("$\\boxed{1, \\frac{1}{3}}$", "1,000.\\overline{3}")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_rounding_restates_one_value_only_pairwise_and_is_graded_on_the_most_precise(pool):
  """Every two alternatives must restate one value, not each the first ("$1.0$ or $0.96$ or $1.04$" is a hedge);
  where one only rounds another, the gold is compared with the most precise alone ("$\\pi$, or $3.14$": pi)."""
  right = [("The answer is $1.0$ or $0.96$.", "0.96"), ("The answer is therefore $\\pi$, or $3.14$.", "\\pi"),
           ("The answer is $\\frac{2}{3}$ or $0.67$ or $0.6667$.", "\\frac{2}{3}"),
           ("The answer is $\\frac{1}{4}$ or $25\\%$ or $0.25$.", "0.25")]
  wrong = [("The answer is $1.0$ or $0.96$ or $1.04$.", "0.96"), ("The answer is $1.0$ or $0.96$ or $1.04$.", "1.04"),
           ("\\boxed{4.96} or \\boxed{5.0}", "5"), ("The answer is 1.0 hours (or 57 minutes).", "1"),
           ("The answer is therefore $\\pi$, or $3.14$.", "3.14"), ("The answer is $1.0$ or $0.96$.", "1"),
           ("The answer is $\\frac{2}{3}$ or $0.67$ or $0.6667$.", "0.67")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_number_before_a_unit_is_read_whole_and_graded_without_its_unit(pool):
  """A fraction before a unit is the fraction ("3/4 km (or 3 km)" is a hedge); products of variables are no units
  ("$2ab$ or $2bc$"); alternatives restating one quantity in units of the table are graded on their numbers, areas
  and volumes included, and an integer of two significant digits or more is a rounding in a conversion."""
  right = [("\\boxed{12 \\text{ dollars} (or 1200 \\text{ cents})}", "12"),
           ("\\boxed{2 \\text{ weeks} (or 14 \\text{ days})}", "2"), ("The answer is 500 grams (or 0.5 kg).", "500"),
           ("\\boxed{250 \\text{ mL} (or 0.25 \\text{ liters})}", "250"),
           ("\\boxed{5 \\text{ cm}^2 (or 500 \\text{ mm}^2)}", "5"),
           ("\\boxed{1000 \\text{ cm}^3 (or 1 \\text{ liter})}", "1000"),
           ("\\boxed{1 \\text{ lb} (or 454 \\text{ grams})}", "1"),
           ("\\boxed{1 \\text{ inch} (or 25 \\text{ mm})}", "1"),
           ("\\boxed{100 \\text{ meters} (or 328 \\text{ feet})}", "100"),
           ("\\boxed{\\frac{3}{4} \\text{ hour} (or 45 \\text{ minutes})}", "\\frac{3}{4}"),
           ("\\boxed{5 \\text{ cm}^2 (or 500 \\text{ mm}^2)}", "500"),
           ("\\boxed{\\frac{3}{4} \\text{ hour} (or 45 \\text{ minutes})}", "45")]
  wrong = [("\\boxed{3/4 \\text{ km} (or 3 \\text{ km})}", "3"),
           ("\\boxed{3/4 \\text{ km} (or 3 \\text{ km})}", "\\frac{3}{4}"),
           ("\\boxed{1/2 \\text{ hour} (or 1/3 \\text{ hour})}", "\\frac{1}{3}"),
           ("The answer is 5/2 hours (or 5 hours).", "5"), ("The answer is 5/2 hours (or 5 hours).", "\\frac{5}{2}"),
           ("The answer is $2ab$ or $2bc$.", "2ab"), ("\\boxed{6xy} or \\boxed{6yz} or \\boxed{6xz}", "6xz"),
           ("\\boxed{1 \\text{ lb} (or 454 \\text{ grams})}", "454"),
           ("\\boxed{5 \\text{ cm}^2 (or 50 \\text{ mm}^2)}", "5"),
           ("\\boxed{3 \\text{ cm}^2 (or 3 \\text{ cm})}", "3")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_degree_sign_is_rewritten_only_in_math_and_a_price_is_in_cents_only_beside_the_word(pool):
  """"°" becomes `^{\\circ}` in a boxed, math or labelled answer, not in the plain line read as a last resort; a
  price restates a number as cents only where that number says "cents"."""
  think = "<think>\nok\n</think>\n\n"
  assert extract_answer(think + "The angle is 90°.") == "The angle is 90°"
  assert extract_answer(think + "The total is $\\$1.50$, or $150$ cents.") == "\\$1.50 or 150 cents"
  right = [("The angle is 90°.", "90"), ("It is 30°", "30"), ("The total is $\\$1.50$, or $150$ cents.", "1.50"),
           ("$\\boxed{\\$1.50 (or 150 cents)}$", "1.50"), ("The cost is $\\$1,200$ or $120000$ cents.", "1200"),
           ("$\\boxed{\\$1.50 (or 150 cents)}$", "150")]
  wrong = [("The answer is $\\$0.25$, or $25$.", "0.25"),
           ("The answer is $\\$0.25$, or $25$.", "25"),
           ("The answer is $\\$3$ or $3$ or $300$.", "300"), ("The cost is $\\$1,200$ or $120000$.", "1200")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_layout_adverbs_and_lor_between_values_join_a_hedge(pool):
  """LaTeX spacing (`\\:`, `\\>`, `\\hspace{}`), "or" in `\\mathrm{}`, `\\textbf{}`, `\\textit{}`, "or else" and "or
  perhaps" join boxes into a hedge, and `\\lor` between values with spacing, roots or percents is one."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"$\\boxed{5} \\: \\text{or} \\: \\boxed{6}$": "5 or 6",
             "$\\boxed{5} \\quad \\mathrm{or} \\quad \\boxed{6}$": "5 or 6",
             "$\\boxed{5} \\> \\textbf{or} \\> \\boxed{6}$": "5 or 6",
             "$\\boxed{5} \\hspace{1cm} \\textit{or} \\boxed{6}$": "5 or 6",
             "$\\boxed{5}$ or else $\\boxed{6}$": "5 or 6", "$\\boxed{5}$, or perhaps $\\boxed{6}$": "5 or 6",
             "\\boxed{5 \\;\\lor\\; 6}": "5 or 6", "\\boxed{\\sqrt{4} \\lor 3}": "\\sqrt{4} or 3",
             "\\boxed{5\\% \\lor 6\\%}": "5\\% or 6\\%", "$\\boxed{\\neg p \\lor q}$": "\\neg p \\lor q"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  wrong = [(c, "6") for c in list(answers)[:7]] + [("\\boxed{\\sqrt{4} \\lor 3}", "3"),
                                                    ("\\boxed{5\\% \\lor 6\\%}", "6\\%")]
  verdicts, expected = _grades(pool, [], wrong)
  assert verdicts == expected



MEGABYTE = 1 << 20
PATHOLOGICAL = {
    "open boxes": "\\boxed{" * (MEGABYTE // 7),
    "open braces": "\\boxed{" + "{" * MEGABYTE,
    "dollars": "$" * MEGABYTE,
    "answer phrases": "The answer is " * (MEGABYTE // 14),
    "answer words": "answer " * (MEGABYTE // 7),
    "answer headings": "**Answer**\n" * (MEGABYTE // 11),
    "answer marks": "#### 1 x\n" * (MEGABYTE // 9),
    "digits": "7" * MEGABYTE,
    "backslashes": "\\" * MEGABYTE,
    "special tokens": "<|" * MEGABYTE,
    "think tags": "</think>" * (MEGABYTE // 8) + "<think>" * (MEGABYTE // 7),
    "joined math": "The answer is " + "$1$, " * (MEGABYTE // 5),
    "math joined by or": "$1$ or " * (MEGABYTE // 7),
    "joined boxes": "\\boxed{1} and " * (MEGABYTE // 14),
    "boxes far apart": ("\\boxed{1}" + " " * 4000) * (MEGABYTE // 4009),
}


def test_any_short_gap_holding_or_and_no_math_joins_boxes_into_a_hedge(pool):
  """Between boxes, a short gap that holds the word "or" alone or with one hedge adverb (in any text command, with
  punctuation or a line break) makes them one hedge; a gap of prose, with "or" or without, or "|" / "/", still
  leaves the last box alone."""
  think = "<think>\nok\n</think>\n\n"
  gaps = [" \\text{, or } ", " \\text{ or, } ", " \\text{ (or) } ", " \\text{ or\\;} ", " \\text{\\ or\\ } ",
          " \\mathbf{or} ", " \\textsf{or} ", " \\emph{or} ", " \\operatorname{or} ", " \\hbox{ or } ", "$\nor $",
          " or otherwise ", " or just ", " or... ", " or? ", "$, or, $"]
  boxes = ["$$\\boxed{5}%s\\boxed{6}$$" % gap for gap in gaps]
  assert {c: extract_answer(think + c) for c in boxes} == {c: "5 or 6" for c in boxes}
  assert extract_answer(think + "\\boxed{5} is wrong, so \\boxed{6}") == "6"
  assert extract_answer(think + "$\\boxed{5}$, or, failing that, $\\boxed{6}$") == "6"
  assert extract_answer(think + "The answer is $5$\nor $6$.") == "5 or 6"
  verdicts, expected = _grades(pool, [], [(c, "6") for c in boxes])
  assert verdicts == expected


def test_a_unit_restatement_is_graded_on_the_answer_as_given(pool):
  """Three or more alternatives restating one quantity in units of the table are compared with the gold on the
  first, the answer as given, so listing a quantity in every unit does not hit any gold's unit; two pay either; "¢"
  says cents as the word does."""
  think = "<think>\nok\n</think>\n\n"
  assert extract_answer(think + "The answer is $\\$0.75$, or $75$¢.") == "\\$0.75 or 75 cents"
  assert extract_answer(think + "\\boxed{\\$0.75} or \\boxed{75} cents") == "\\$0.75 or 75 cents"
  right = [("\\boxed{1 \\text{ foot} (or 12 \\text{ inches})}", "1"), ("The answer is $\\$1$, or $100$ cents.", "1"),
           ("\\boxed{1 \\text{ week} (or 7 \\text{ days} or 168 \\text{ hours})}", "1"),
           ("The answer is $\\$0.75$, or $75$¢.", "0.75"), ("\\boxed{\\$0.75} or \\boxed{75} cents", "0.75"),
           ("It takes $2.5$ hours, or $150$ minutes.", "2.5"), ("The answer is $150$ cents, or $\\$1.50$.", "150"),
           ("\\boxed{1 \\text{ foot} (or 12 \\text{ inches})}", "12"), ("The answer is $\\$1$, or $100$ cents.", "100"),
           ("It takes $2.5$ hours, or $150$ minutes.", "150")]
  wrong = [("\\boxed{1 \\text{ week} (or 7 \\text{ days} or 168 \\text{ hours})}", "7"),
           ("\\boxed{1 \\text{ week} (or 7 \\text{ days} or 168 \\text{ hours})}", "168"),
           ("The answer is $\\$1.50$ or $150$ cents or $\\$2$.", "1.50"),
           ("The answer is $3$ hours or $4$.", "4"),
           ("The answer is $3$ hours or $4$.", "3"), ("The answer is $5$ km or $6$ km.", "5")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_or_in_prose_beside_an_answer_joins_no_explanation_math(pool):
  """Only "or" (perhaps with one hedge adverb: "or maybe") joins two answers; prose around it ("or half of the",
  "whether or not", "for one or two") leaves explanation math out of the answer, and "in total" is no unit."""
  think = "<think>\nok\n</think>\n\n"
  right = [("The answer is $12$, or half of the $24$ she started with.", "12"),
           ("The answer is $\\frac{1}{6}$, or roughly one in $6$.", "\\frac16"),
           ("Final answer: $64$, or two to the power $6$.", "64"),
           ("The answer is $12$ whether or not $n$ is even.", "12"), ("For $n$ even or odd we get $5$.", "5"),
           ("With $2$ or more, we get $7$.", "7"), ("First, $\\boxed{4}$. Then, for one or two, $\\boxed{9}$.", "9"),
           ("He needs $3$ dozen, or $36$ eggs.", "36"),
           ("So $\\frac{2}{5}$ of the students, or $12$ students, play chess.", "12"),
           ("The answer is $\\$2$ in total (or $200$ cents).", "2"),
           ("So she gets $\\$1.50$ in change, or $150$ cents.", "150")]
  wrong = [("The answer is $5$, or maybe $6$.", "6"), ("$\\boxed{5}$ or else $\\boxed{6}$", "6")]
  assert extract_answer(think + "The answer is $\\$2$ in total (or $200$ cents).") == "\\$2"
  assert extract_answer(think + "It takes $2$ hours, or maybe $3$ hours.") == "2 hours or 3 hours"
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_two_alternatives_restating_one_quantity_pay_a_gold_equal_to_either(pool):
  """A conversion to the asked unit after the answer ("$2$ hours, or $120$ minutes") is right for either value; of
  three or more restatements only the first, the answer as given, is graded."""
  right = [("It takes $2$ hours, or $120$ minutes.", "120"), ("It takes $2$ hours, or $120$ minutes.", "2"),
           ("The answer is 3 hours, or 180 minutes.", "180"), ("The total is $\\$1.50$, or $150$ cents.", "150"),
           ("The total is $\\$1.50$, or $150$ cents.", "1.50")]
  wrong = [("\\boxed{1 \\text{ week} (or 7 \\text{ days} or 168 \\text{ hours})}", "7"),
           ("It takes $2$ hours, or $150$ minutes.", "150")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_tiny_rival_values_and_lor_between_subscripted_variables_are_hedges(pool):
  """Plain numbers in a hedge are compared with the relative tolerance single answers get (1e-7 is not 4e-7), and
  `\\lor` between values of a subscripted, primed or multi-letter variable, or in braces, joins a hedge."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"\\boxed{a_n = 5 \\vee a_n = 6}": "a_n = 5 or a_n = 6", "\\boxed{x_1 = 5 \\lor x_1 = 6}":
             "x_1 = 5 or x_1 = 6", "\\boxed{xy = 5 \\lor xy = 6}": "xy = 5 or xy = 6",
             "\\boxed{y' = 5 \\lor y' = 6}": "y' = 5 or y' = 6", "\\boxed{5 {\\lor} 6}": "5 or 6",
             "\\boxed{5 \\mathrel{\\lor} 6}": "5 or 6"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [("\\boxed{0.0000001} or \\boxed{0.0000001}", "0.0000001")]
  wrong = [("\\boxed{0.0000001} or \\boxed{0.0000004}", "0.0000001"),
           ("\\boxed{0.0000001} or \\boxed{0.0000004}", "0.0000004"),
           ("\\boxed{0.0000001} or \\boxed{0.0000001}", "0.0000003")] + [(c, "6") for c in answers]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_rounding_after_about_or_approximately_leaves_the_exact_answer(pool):
  """"or about", "or approximately" and "or roughly" before a rounding join no hedge: the exact answer before them is
  the answer, so a coarse rounding ("$12.5$, or about $13$") cannot make a right answer a hedge."""
  think = "<think>\nok\n</think>\n\n"
  assert extract_answer(think + "The answer is $12.5$, or about $13$.") == "12.5"
  right = [("The answer is $12.5$, or about $13$.", "12.5"), ("The answer is $\\frac{100}{3}$, or about $33$.",
                                                                "\\frac{100}{3}"),
           ("The answer is $\\frac{2}{3}$, or approximately $0.7$.", "\\frac23"),
           ("The answer is $\\sqrt{10}$, or approximately $3$.", "\\sqrt{10}"),
           ("The answer is $\\frac{22}{7}$, or about $\\pi$.", "\\frac{22}{7}"),
           ("The answer is $6.25$, or roughly $6$.", "6.25"),
           ("The answer is $\\frac{1}{3}$, or approximately $0.333$.", "\\frac13")]
  wrong = [("The answer is $12.5$, or about $13$.", "13"), ("The answer is $\\frac{100}{3}$, or about $33$.", "33")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_restatement_in_a_unit_outside_the_table_leaves_the_first_answer(pool):
  """An alternative after "<unit>, or" whose own unit word the table lacks ("$5000$ m", "$2000$ g") cannot be
  compared, so the first answer, as given, is graded alone; a plain value after "hours or" still makes a hedge."""
  think = "<think>\nok\n</think>\n\n"
  assert extract_answer(think + "The answer is $5$ km, or $5000$ m.") == "5"
  assert extract_answer(think + "The answer is $3$ hours or $4$.") == "3 or 4"
  right = [("The answer is $5$ km, or $5000$ m.", "5"), ("The answer is $2$ kg, or $2000$ g.", "2"),
           ("The answer is $0.5$ kg, or $500$ g.", "0.5"), ("The answer is $3$ km, or equivalently $3000$ m.", "3"),
           ("The answer is $1.5$ km, or $1500$ m.", "1.5")]
  wrong = [("The answer is $3$ hours or $4$.", "3")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_pipe_or_slash_between_math_joins_no_hedge(pool):
  """"|" (a table's columns) and "/" between math spans are no "or": the last cell, or the first span after a label,
  is the answer."""
  think = "<think>\nok\n</think>\n\n"
  assert extract_answer(think + "Summary: $5$ | $7$ | $12$") == "12"
  assert extract_answer(think + "$$\\boxed{5} | \\boxed{6}$$") == "6"
  right = [("| Mon | Tue | Total |\n|---|---|---|\n| $5$ | $7$ | $12$ |", "12"), ("Summary: $5$ | $7$ | $12$", "12"),
           ("The answer is $5$/$1$", "5"), ("The answer is $5$ | $x$ divides it.", "5"),
           ("Totals: $4$ | $6$ | $\\mathbf{10}$", "10")]
  verdicts, expected = _grades(pool, right, [])
  assert verdicts == expected


def test_boxes_restating_one_quantity_keep_the_unit_inside_each_box(pool):
  """Boxes joined by "or" whose unit word sits inside each box (`\\text{}`, `\\textrm{}`, `\\mbox{}`) restate one
  quantity as "$5$ km, or $5000$ meters" does, so a gold equal to either is paid; a price and cents the same."""
  think = "<think>\nok\n</think>\n\n"
  assert extract_answer(think + "The answer is $\\boxed{5\\textrm{ km}}$, or $\\boxed{5000\\textrm{ meters}}$.") == (
      "5 km or 5000 meters")
  right = [("The answer is $\\boxed{5\\textrm{ km}}$, or $\\boxed{5000\\textrm{ meters}}$.", "5000"),
           ("The answer is $\\boxed{2\\mbox{ hours}}$ (or $\\boxed{120\\mbox{ minutes}}$).", "2"),
           ("The answer is $\\boxed{5\\text{ km}}$, or $\\boxed{5000\\text{ meters}}$.", "5"),
           ("The answer is $\\boxed{3 \\text{ kg}}$, or $\\boxed{3000 \\text{ grams}}$.", "3"),
           ("The answer is $\\boxed{\\$1.50}$, or $\\boxed{150 \\text{ cents}}$.", "1.50"),
           ("\\boxed{3 \\text{ hours}} or \\boxed{3 \\text{ cm}}", "3")]
  wrong = [("The answer is $\\boxed{3 \\text{ hours}}$ or $\\boxed{4}$.", "3")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_boxes_joined_through_a_noun_the_last_does_not_repeat_leave_the_last_box(pool):
  """Boxes joined by "<noun>, or" where the last box is not followed by the same noun ("\\boxed{3} dozen, or
  \\boxed{36} eggs", "\\boxed{50} percent or \\boxed{\\frac{1}{2}}") may restate one quantity in other words, so the
  last box stands alone, as after math; boxes that count one noun stay a hedge."""
  think = "<think>\nok\n</think>\n\n"
  answers = {"The final answer is \\boxed{3} dozen, or \\boxed{36} eggs.": "36",
             "The answer is \\boxed{50} percent or \\boxed{\\frac{1}{2}}.": "\\frac{1}{2}",
             "$\\boxed{12}$ eggs, or $\\boxed{1}$ dozen": "1", "$\\boxed{5}$ apples or $\\boxed{6}$ apples": "5 or 6"}
  assert {c: extract_answer(think + c) for c in answers} == answers
  right = [(c, g) for c, g in answers.items() if " or " not in g]
  wrong = [("$\\boxed{5}$ apples or $\\boxed{6}$ apples", "6"), ("$\\boxed{1}$ box or $\\boxed{2}$ boxes", "2")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_math_or_a_number_that_or_joins_after_the_last_box_is_an_alternative_to_it(pool):
  """Math or a plain number joined by "or" after the last box ("$\\boxed{5}$ or $6$", "\\boxed{5} (or 6)") is an
  alternative to it, as a box would be: a hedge, which matches no single gold; an equation that restates the box
  ("$\\boxed{3}$, or equivalently $n \\equiv 3$"), prose between them, another noun after the alternative, or math
  that goes on from a number join nothing, and a restatement in another unit is compared as one quantity."""
  think = "<think>\nok\n</think>\n\n"
  hedges = {"The answer is $\\boxed{5}$ or $6$.": "5 or 6", "The answer is \\boxed{5} (or 6).": "5 or 6",
            "The answer is $\\boxed{5}$, or maybe $6$.": "5 or 6", "$$\\boxed{5} \\text{ or } 6$$": "5 or 6",
            "\\boxed{5} (or -6)": "5 or -6", "\\boxed{5} apples, or 6 apples.": "5 or 6",
            "\\boxed{1} or \\boxed{2}, or $3$": "1 or 2 or 3"}
  alone = {"Therefore, the answer is $\\boxed{3}$, or equivalently $n \\equiv 3$.": "3",
           "$\\boxed{12}$, or half of the $24$ she had.": "12", "He needs \\boxed{3} dozen, or 36 eggs.": "3",
           "\\boxed{5} or 6 + 1 = 7": "5", "\\boxed{5}, and $6$ is next.": "5", "\\boxed{5} or 6x": "5",
           "So she walks $\\boxed{2}$ miles, or $\\frac{1}{2}$ of the trip.": "2"}
  assert {c: extract_answer(think + c) for c in {**hedges, **alone}} == {**hedges, **alone}
  assert extract_answer(think + "It takes \\boxed{2} hours, or $120$ minutes.") == "2 hours or 120 minutes"
  right = [("Therefore, the answer is $\\boxed{3}$, or equivalently $n \\equiv 3$.", "3"),
           ("It takes \\boxed{2} hours, or $120$ minutes.", "120"),
           ("It takes \\boxed{2} hours, or $120$ minutes.", "2"),
           ("The increase is $\\boxed{20\\%}$, or $0.2$.", "20"), ("The answer is $\\boxed{5}$, or $5$.", "5")]
  wrong = [(c, g) for c, a in hedges.items() for g in a.split(" or ")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_bound_with_no_left_side_or_a_negated_label_gives_no_answer(pool):
  """An answer that opens with an inequality sign ("\\geq 5", "> 4", "≤ 6") is a bound, which matches no gold as "5
  or more" does (math-verify would drop the sign and read 5), and a label whose sentence opens with a negation ("the
  answer is not $5$") gives no answer rather than the math in it; a relation with a left side, "\\approx 5" and a
  worded answer are read as before."""
  think = "<think>\nok\n</think>\n\n"
  none = ["$\\boxed{\\geq 5}$", "$\\boxed{> 4}$", "$\\boxed{< 6}$", "The answer is $\\ge 5$.", "\\boxed{≥ 5}",
          "\\boxed{\\neq 5}", "\\boxed{\\le 5}", "The answer is not $5$.", "The answer is therefore not $5$.",
          "Answer: not $5$", "The answer is not 5."]
  assert {c: extract_answer(think + c) for c in none} == {c: None for c in none}
  kept = {"\\boxed{x \\geq 5}": "x \\geq 5", "\\boxed{\\approx 5}": "\\approx 5", "The answer is nothing.": "nothing",
          "The answer is $5$, not $6$.": "5", "\\boxed{\\left(1, 2\\right)}": "\\left(1, 2\\right)"}
  assert {c: extract_answer(think + c) for c in kept} == kept
  wrong = [("$\\boxed{\\geq 5}$", "5"), ("$\\boxed{> 4}$", "4"), ("$\\boxed{< 6}$", "6"),
           ("The answer is $\\ge 5$.", "5"), ("The answer is not $5$.", "5"), ("The answer is therefore not $5$.", "5")]
  verdicts, expected = _grades(pool, [("The answer is $5$, not $6$.", "5")], wrong)
  assert verdicts == expected


def test_a_filler_word_after_the_label_leaves_the_first_of_answers_that_prose_follows(pool):
  """After "the answer is therefore" (or "then", "only", "so", "thus"), math spans that prose goes on from are not
  joined: the first is the answer."""
  think = "<think>\nok\n</think>\n\n"
  right = [("The answer is therefore $8$, and $2$ were returned.", "8"),
           ("So the answer is then $8$, and $2$ are left over.", "8"),
           ("The answer is only $12$, and $4$ are wasted.", "12"),
           ("Final answer: so $8$ and $2$ are the spare ones.", "8"), ("The answer is thus $8$, $2$ are spare.", "8")]
  assert [extract_answer(think + c) for c, _ in right] == [g for _, g in right]
  verdicts, expected = _grades(pool, right, [])
  assert verdicts == expected


def test_a_label_before_a_sentence_with_a_capitalised_subject_gives_its_one_number(pool):
  """A label followed by a sentence ("Janet makes $18 per day.", capitalised or not) is prose: its one number or
  price is the answer; with two numbers it gives none of them, nor the solution's last math."""
  think = "<think>\nok\n</think>\n\n"
  cases = {"**Answer:** Janet makes **\\$18** per day.": "18", "Answer: Janet makes 18 dollars per day.": "18",
           "### Final Answer\nJanet makes **$18** every day.": "18", "**Answer:** janet makes $18 per day.": "18",
           "Answer: she makes 1,200 dollars a year.": "1200", "We get $x = 3$.\nAnswer: Tom has 5 apples.": "5",
           "We get $x = 3$.\nAnswer: Tom has 5 apples and Ann has 6.": None,
           "Answer: Tom has 2 million dollars.": "Tom has 2 million dollars",
           "The answer is 5. We can double-check that the answer is within 1 of it.": "5",
           "The answer is Seven.": "7", "Answer: New York": "New York", "Answer: Janet makes about 18 dollars.": "18",
           # A check after the answer gives way to it; one after "answer is" in lower case gives no number.
           "Answer: Tom has 5 apples.\n\nWe can double-check that the answer is correct.": "5",
           "Answer: Tom has 5 apples.\n\nWe check that the answer is right for 3 cases.": "5",
           "We get $x = 3$.\nThe answer is right for 4 cases.": "x = 3"}
  assert {c: extract_answer(think + c) for c in cases} == cases
  # A bound, a hedge or a negation around the one number leaves it no answer.
  bounds = ["Answer: Janet makes at least 18 dollars.", "Answer: Janet makes 18 dollars or more.",
            "Answer: Janet does not make 18 dollars.", "Answer: Janet makes more than 18 dollars.",
            "Answer: Janet makes up to 18 dollars.", "Answer: Janet makes 18 dollars, maybe more."]
  assert [extract_answer(think + c) for c in bounds] == [None] * len(bounds)
  right = [("**Answer:** Janet makes **\\$18** per day.", "18"), ("Answer: Janet makes 18 dollars per day.", "18"),
           ("### Final Answer\nJanet makes **$18** every day.", "18")]
  wrong = [("Answer: Tom has 5 apples and Ann has 6.", "5"), ("Answer: Tom has 5 apples and Ann has 6.", "6")]
  wrong += [(c, "18") for c in bounds]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_label_sentence_that_bounds_negates_or_hedges_a_price_or_holds_two_gives_no_answer(pool):
  """A bound before a price or `$..$` number ("at least $18", "less than **\\$18**") bounds it as before a plain
  number, and a sentence a label introduces whose number is refused (a bound, a hedge, a negation, two numbers)
  gives no answer, not the solution's last math, which would be a number of that same sentence ("$18 or $19" ->
  19); a sentence with no number leaves the last math, and one plain price is still the answer."""
  think = "<think>\nok\n</think>\n\n"
  refused = [("Answer: Janet makes at least $18 per day.", "18"), ("Answer: Janet makes less than $18.", "18"),
             ("Answer: Janet does not make $18.", "18"), ("Answer: Janet makes $18 or more.", "18"),
             ("Answer: Janet makes $18 or $19 per day.", "19"), ("**Answer:** It costs $5 or $6.", "6"),
             ("Answer: Janet makes at least $18$ dollars per day.", "18"),
             ("We find $x=4$.\n\nAnswer: The value is not $5$.", "5"),
             ("Answer: She makes $18 per day and $126 per week.", "126"),
             ("Answer: Janet makes at least **\\$18** per day.", "18")]
  assert {c: extract_answer(think + c) for c, _ in refused} == {c: None for c, _ in refused}
  kept = {"We get $x = 3$.\nAnswer: Janet is happy.": "x = 3", "Answer: Janet makes $18$ dollars per day.": "18",
          "Answer: Janet makes exactly $18 per day.": "18"}
  assert {c: extract_answer(think + c) for c in kept} == kept
  verdicts, expected = _grades(pool, [("Answer: Janet makes $18$ dollars per day.", "18")], refused[:6])
  assert verdicts == expected


def test_a_label_negation_before_prose_leaves_the_last_math_and_before_a_value_gives_no_answer(pool):
  """"The answer is not obvious ..." is prose, so the solution's last math is the answer; a negation followed
  directly by a value ("not $5$", "not 5", "**not** 5", "not five", "not -5") gives no answer."""
  think = "<think>\nok\n</think>\n\n"
  right = [("Hmm, the answer is not obvious at first, but 9 * 2 = 18. So she makes $18.", "18"),
           ("The answer is not immediately obvious, so let us compute. We get $2 \\cdot 3 = 6$, so $x = 6$.", "6"),
           ("Note that the answer is not an integer at first glance. Then $x = \\frac{1}{2}$.", "\\frac{1}{2}")]
  assert [extract_answer(think + c) for c, _ in right] == ["18", "x = 6", "x = \\frac{1}{2}"]
  none = ["We get $x = 4$. The answer is not five.", "We get $x = 4$. Answer: not -5",
          "We get $x = 4$. The answer is **not** $5$.", "We get $x = 4$. Answer: not \\frac{1}{2}",
          "We get $x = 4$. The answer is not 5."]
  assert {c: extract_answer(think + c) for c in none} == {c: None for c in none}
  verdicts, expected = _grades(pool, right, [])
  assert verdicts == expected


def test_a_choice_letter_before_its_option_text_is_the_letter_where_the_gold_is_a_letter(pool):
  """Against a gold that is one choice letter ("B", "(B)", "\\text{B}", "\\textbf{(C)}"), an answer that opens with
  a choice ("(B) 12", "B) 12", "\\textbf{(C)}\\ 12") is its letter; against any other gold, or where the answer
  names another choice ("(A) or (B)", "(A) 12, (B) 13"), it stays as it is."""
  from phi_jax.rewards.extract import choice_letter
  think = "<think>\nok\n</think>\n\n"
  cases = [("The correct answer is (B) 12.", "B", "B"), ("Answer: B) 12", "B", "B"),
           ("$\\boxed{\\textbf{(C)}\\ 12}$", "C", "C"), ("The correct answer is (B) 12.", "(B)", "B"),
           ("The correct answer is (B) 12.", "\\text{B}", "B"), ("Answer: B) 12", "\\textbf{(B)}", "B"),
           ("The correct answer is (B) 12.", "12", "(B) 12"), ("The correct answer is (B).", "B", "(B)"),
           ("The answer is (A) or (B).", "A", "(A) or (B)"), ("Answer: (A) 12, (B) 13", "A", "(A) 12, (B) 13"),
           ("The correct answer is (F) 12.", "F", "(F) 12"), ("The correct answer is (B)x.", "B", "(B)x")]
  pairs = [(rewards.readable_gold(g), extract_answer(think + c)) for c, g, _ in cases]
  assert [choice_letter(answer, gold) for gold, answer in pairs] == [read for _, _, read in cases]
  graded = pool.verify_answers([(gold, choice_letter(answer, gold)) for gold, answer in pairs[:6]])
  assert graded == [True] * 6


def test_a_labelled_number_before_a_note_after_a_comma_dash_or_colon_is_the_number(pool):
  """"5, the smallest such number", "5 — ...", "5: ..." are 5; a note that holds a number or opens with "or", "and",
  a hedge or a bound word ("5, or 6", "5, or more", "5, maybe 6", "5 — or 6", "5, at least") is no note, and "2, 3"
  stays a set."""
  think = "<think>\nok\n</think>\n\n"
  cases = {"The answer is 5, the smallest such number.": "5", "The answer is 5 — the smallest such number.": "5",
           "The answer is 5 – the smallest such number.": "5", "The answer is 5: the smallest such number.": "5",
           # A value in words may be a rival answer ("5, a dozen if we count twice"), so this restatement stays too.
           "The answer is 12 apples, a dozen in all.": "12 apples, a dozen in all", "The answer is 5, or 6.": "5, or 6",
           "The answer is 2, 3.": "2, 3", "The answer is 5, or more.": "5, or more",
           "The answer is 5, maybe 6.": "5, maybe 6", "The answer is 5 — or 6.": "5 — or 6",
           "The answer is 5, at least.": "5, at least",
           "The answer is 5 — the answer to part 2.": "5 — the answer to part 2"}
  assert {c: extract_answer(think + c) for c in cases} == cases
  right = [("The answer is 5, the smallest such number.", "5"), ("The answer is 5 — the smallest such number.", "5"),
           ("The answer is 5: the smallest such number.", "5")]
  wrong = [("The answer is 5, or 6.", "5"), ("The answer is 5, or more.", "5"), ("The answer is 5, maybe 6.", "5"),
           ("The answer is 5 — or 6.", "5")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_a_bound_a_condition_or_a_value_word_after_a_labelled_number_is_no_note(pool):
  """After a number, a bound ("5, minimum", "5, tops", "5, max"), a condition or an exception ("5 — unless Tom
  counts", "5, but ...", "5, except ...") and a note holding a value in words ("a dozen", "half") are part of the
  answer, which then matches no single gold; a note in prose is still cut ("5, the smallest such number")."""
  think = "<think>\nok\n</think>\n\n"
  kept = ["5, minimum", "5, tops", "5, max", "5, maximum", "5, at minimum", "5 — unless Tom counts",
          "5, but a dozen if counting Tom", "5, a dozen if we count twice", "5: half if Ann shares",
          "5, except on Sundays", "5, assuming Tom stays", "5 — if Tom counts", "5, otherwise 6"]
  cases = {f"The answer is {c}.": c for c in kept}
  cases.update({"The answer is 5, the smallest such number.": "5", "The answer is 5, a prime.": "5"})
  assert {c: extract_answer(think + c) for c in cases} == cases
  wrong = [(f"The answer is {c}.", "5") for c in kept[:8]]
  verdicts, expected = _grades(pool, [("The answer is 5, a prime.", "5")], wrong)
  assert verdicts == expected


def test_a_plain_number_before_a_compound_unit_or_a_marked_number_before_words_is_the_number(pool):
  """After a label a unit per unit or a unit's power ("5 m/s", "5 cm^2", "3 km/h") leaves the number, as a unit word
  does; a "####" line holding a number before words or after `\\$` is that number. A variable ("5 x/y", "5 x^2"),
  a single letter ("5 m") and a word that changes the value ("#### 2 million") stay."""
  think = "<think>\nok\n</think>\n\n"
  cases = {"Therefore, the answer is 5 cm^2.": "5", "Therefore, the answer is 5 m/s.": "5",
           "The answer is 3 km/h.": "3", "The answer is 2 m^3.": "2", "The answer is 5 x/y.": "5 x/y",
           "The answer is 5 x^2.": "5 x^2", "The answer is 5 m.": "5 m",
           "So 9 * 2 = 18.\n#### 18 dollars": "18", "So 9 * 2 = 18.\n#### \\$18.00": "18.00",
           "So 9 * 2 = 18.\n#### $18": "18", "So 9 * 2 = 18.\n#### $18 per day.": "18",
           "So $x = 4$.\n#### 2 million": "x = 4", "#### Step 1\nWe get $x = 4$.\n#### 2. Done": "x = 4"}
  assert {c: extract_answer(think + c) for c in cases} == cases
  right = [("Therefore, the answer is 5 cm^2.", "5"), ("Therefore, the answer is 5 m/s.", "5"),
           ("So 9 * 2 = 18.\n#### 18 dollars", "18"), ("So 9 * 2 = 18.\n#### \\$18.00", "18")]
  verdicts, expected = _grades(pool, right, [])
  assert verdicts == expected


def test_a_number_whose_unit_a_bound_or_hedge_follows_is_not_the_number_alone(pool):
  """"18 dollars or more" read as 18 (only the word right after the number was looked at), and paid for gold 18."""
  wrong = [("The answer is 18 dollars or more.", "18"), ("The answer is 18 dollars at least.", "18"),
           ("The answer is 18 apples or fewer.", "18"), ("The answer is 5 cm or so.", "5")]
  right = [("The answer is 18 dollars.", "18"), ("The answer is 18 dollars in total.", "18"),
           ("The answer is 18 dollars for one or two people.", "18"), ("The answer is 7 days or one week.", "7"),
           ("The answer is 60 seconds or a minute.", "60")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


def test_rival_nouns_after_boxes_are_a_hedge_and_a_latex_mixed_number_keeps_its_unit(pool):
  """Boxes or math joined through different nouns stay apart only where one of the nouns is a scale or a share
  ("3 dozen, or 36 eggs"); rival count nouns ("8 pies or 9 cakes") or a noun and none ("5 cats or 6") are a hedge,
  which paid its last alternative. A box holding 2\\frac{1}{2} before a unit read as 2 * 1/2 hours."""
  answers = {"\\boxed{8} pies or \\boxed{9} cakes": "8 or 9", "\\boxed{5} cats or \\boxed{6}": "5 or 6",
             "$\\boxed{5}$ apples or $\\boxed{6}$ pears": "5 or 6", "\\boxed{12} eggs (or 13)": "12 or 13",
             "$\\boxed{12}$ eggs, or $\\boxed{1}$ dozen": "1", "\\boxed{3} dozen, or \\boxed{36} eggs": "36",
             "\\boxed{2\\frac{1}{2}} hours (or 150 minutes)": "5/2 hours or 150 minutes"}
  assert {c: extract_answer(c) for c in answers} == answers
  wrong = [("\\boxed{8} pies or \\boxed{9} cakes", "9"), ("\\boxed{5} cats or \\boxed{6}", "6"),
           ("\\boxed{12} students, or perhaps $13$.", "12")]
  right = [("\\boxed{2\\frac{1}{2}} hours (or 150 minutes)", "\\frac{5}{2}"),
           ("$\\boxed{2\\frac{1}{2}}$ hours, or $150$ minutes", "150"),
           ("$\\boxed{12}$ eggs, or $\\boxed{1}$ dozen", "1"),
           ("The answer is $3$ cups, or $\\frac{3}{4}$ of a quart.", "3")]
  verdicts, expected = _grades(pool, right, wrong)
  assert verdicts == expected


@pytest.mark.parametrize("answer,rewritten", [
    ("2*pi", "2*\\pi"), ("pi/2", "\\pi/2"), ("2pi r", "2\\pi r"), ("x**2+1", "x^2+1"), ("1e3", "1000"),
    ("-1.5E-3", "-0.0015"), ("+2e+1", "20"), ("√2", "\\sqrt 2"), ("√(x+1)", "sqrt(x+1)"), ("∞x", "\\infty x"),
    ("3·4", "3\\cdot 4"), ("x≤3", "x\\leq 3"),
    # LaTeX thousands spaces dropped, but not after an exponent or index
    ("12\\,345\\,678", "12345678"), ("1~000", "1000"), ("2^3\\,456", "2^3\\,456"), ("10^{2\\,500}", "10^{2\\,500}"),
    ("x_1\\,000", "x_1\\,000"), ("1\\,2345", "1\\,2345"),
    # a logical "or" joins a hedge only between values; a formula of logic keeps it
    ("5 \\lor 6", "5 or 6"), ("x = 5 \\vee x = -6.5", "x = 5 or x = -6.5"), ("x > 2 \u2228 x < 1", "x > 2 or x < 1"),
    ("\\neg p \\lor q", "\\neg p \\lor q"), ("(p \\land q) \\lor r", "(p \\land q) \\lor r"),
    ("A \\vee B", "A \\vee B"),
    ("90°", "90^{\\circ}"),
    # left alone: LaTeX, words containing "pi", exponents past the bound, "e" inside expressions
    ("\\pi", "\\pi"), ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}"), ("spin", "spin"), ("\\epsilon", "\\epsilon"),
    ("1e999", "1e999"), ("3e-2x", "3e-2x"), ("2e", "2e"), ("1e3e4", "1e3e4"), ("e3", "e3"), ("12", "12"),
])
def test_latex_notation(answer, rewritten):
  assert latex_notation(answer) == rewritten


def test_extraction_and_screen_are_bounded_on_megabyte_inputs():
  for name, text in PATHOLOGICAL.items():
    start = time.perf_counter()
    answer = extract_answer(text)
    if answer is not None:
      screen_problem(answer)
    assert time.perf_counter() - start < 1.0, name


# -- the pre-screen ------------------------------------------------------------------------------------------------

SCREEN_ACCEPTS = ["\\frac{1}{2}", "e^{-x^2}", "2^{10}", "10^{100}", "x^2+y^2", "5!", "2^{100000}", "2024!",
                  "10000!", "[1, 2)", "2^{2^{n}}", "\\{1,2,3\\}", "3 \\cdot 10^{8}", "-\\infty", "2^{3 \\cdot 4}",
                  "(1000)!", "(2+1)!", "2^{\\frac{1}{2}}", "10^{-3.5}", "(10000)!"]
SCREEN_REJECTS = {  # answer -> words in the reason
    "9^{9^{9^9}}": "tower", "9^9^9": "tower", "9**9**9**9": "tower", "2^{3^{11}}": "tower",
    "2^{1000000}": "exponent", "(10^6)!": "factorial", "20000!": "factorial", "{" * 30 + "}" * 30: "nested",
    "1" * 200: "digits", "\\frac{1}{2": "unbalanced", "x" * 2000: "characters", "x^2" * 20: "powers",
    "e^{x^{y^{z^{w}}}}": "exponents nested",
    "2^{100001}": "exponent", "10001!": "factorial",  # just past the limits (100000, 10000) that the accepts reach
    "10!!": "factorial of a factorial", "10! !": "factorial of a factorial",  # read as (10!)!
    "}1{": "unbalanced", ")" * 10 + "(" * 30 + ")" * 30: "nested",  # stray closers do not hide deep nesting
    "2^-1000000": "exponent", "9^{9 \\cdot 9^{9}}": "tower",  # a signed exponent; \cdot keeps a tower numeric
    # bracketed or computed operands: bounded by the product of their numbers
    "(100000000)!": "factorial", "{10001}!": "factorial", "2^{99999*99999}": "computed exponent",
    "2^{(30)!}": "factorial in an exponent",
}


def test_screen():
  for answer in SCREEN_ACCEPTS:
    assert screen_problem(answer) is None, answer
  for answer, why in SCREEN_REJECTS.items():
    problem = screen_problem(answer)
    assert problem is not None and why in problem, (answer, problem)
  assert screen_problem("2^{1000000}", ScreenConfig(max_integer_exponent=10**7)) is None


def test_small_towers_and_factorials_of_numbers_pass_the_screen_and_verify(pool):
  """A tower or nested factorial of numbers is refused by the size its numbers bound, not by its shape."""
  for answer in ("2^{2^{3}}", "2^{2^{2}}+1", "x^{2^{3}}", "3^{3^{3}}", "2^{3^{4}}", "(2^{3})!", "(3!)!",
                 "2^{2^{2^{2}}}", "2^{3!}", "2^{10}!", "{2^{3}}!", "2^{10}\\cdot 2^{10}!", "2^{-2^{4}}",
                 "\\left(2^{3}\\right)!", "9^{9^{2}}", "2^{(3!)!}"):
    assert screen_problem(answer) is None, answer
  # A decimal bounds its reciprocal too (0.001^{-2} is a million); what the bound cannot read ([3]) stays refused.
  for answer, why in {"2^{2^{17}}": "tower", "(2^{14})!": "factorial", "(8!)!": "factorial",
                      "(0.001^{-2})!": "factorial", "2^{(4!)!}": "factorial in an exponent",
                      "2^{[3]^{2}}": "tower"}.items():
    problem = screen_problem(answer)
    assert problem is not None and why in problem, (answer, problem)
  completions = [f"<think>x</think> The answer is $\\boxed{{{answer}}}$."
                 for answer in ("2^{2^{2}}+1", "17", "2^{2^{5}}+1", "(3!)!")]
  assert rewards.verify_batch(completions, ["17", "2^{2^{2}}+1", "4294967297", "720"], pool=pool) == [True] * 4
  assert rewards.gold_problem("2^{2^{2}}+1") is None


SYMPY_HANGS = {  # answer -> words in the reason; sympy computes each exactly, for minutes
    "10^{10}!": "factorial", "2^{20}!": "factorial", "2^20!": "factorial", "10^{7}!": "factorial",
    "{2^{2}}^{20}!": "factorial", "\\Gamma(10)!": "factorial", "\\frac{10^{6}}{1}!": "factorial",
    "\\Gamma(10^{8})": "Gamma", "\\Gamma\\left(10^{8}\\right)": "Gamma", "\\Gamma{100000}": "Gamma",
    "\\binom{10^{9}}{10^{5}}": "binomial", "\\dbinom{10^{9}}{10^{5}}": "binomial",
    "\\tbinom{10^{9}}{10^{5}}": "binomial", "\\binom{10^{9}}{\\frac{1}{2}}": "binomial",
    "\\binom{\\frac{1}{2}}{10^{6}}": "binomial", "\\binom{10^{9}}{20000}": "binomial",
    "2^{\\Gamma(100)}": "exponent", "2^{\\binom{10^{9}}{2}}": "exponent",
}


def test_factorials_of_powers_gamma_and_binomials_too_large_for_sympy_are_screened(pool, monkeypatch):
  for answer, why in SYMPY_HANGS.items():
    problem = screen_problem(answer)
    assert problem is not None and why in problem, (answer, problem)
  for answer in ("\\binom{10^{9}}{2}", "\\binom{n}{2}", "\\Gamma(x+1)", "\\Gamma(\\frac{1}{2})", "\\Gamma(5)",
                 "\\binom{10000}{5000}", "\\dbinom{10}{3}", "2^{\\Gamma(5)}", "\\binom{1000000000}{999999998}"):
    assert screen_problem(answer) is None, answer
  assert "refused by the answer screen" in rewards.gold_problem("10^{7}!")
  sent = []
  monkeypatch.setattr(pool, "verify_answers", lambda pairs, **kwargs: sent.extend(pairs) or [True] * len(pairs))
  completions = [f"\\boxed{{{answer}}}" for answer in SYMPY_HANGS]
  assert pool.verify_batch(completions, ["1"] * len(completions)) == [False] * len(completions) and not sent


def test_a_binomial_of_a_natural_number_within_the_bit_budget_passes_the_screen():
  """binom(n, k) <= 2^n, so for a natural number n up to the budget (10000 * 14 bits, about 10000!'s length) sympy
  computes it in about a second whatever k is. A negative or fractional n takes k steps instead (binom(-5, 10^9) runs
  for hours), so there only k bounds it."""
  for answer in ("\\binom{100000}{50000}", "\\dbinom{140000}{70000}", "\\binom{100000}{49999}", "\\binom{-5}{1000}"):
    assert screen_problem(answer) is None, answer
  for answer in ("\\binom{140001}{70000}", "\\binom{-5}{1000000000}", "\\binom{{-5}}{1000000000}",
                 "\\binom{-100000}{100000}", "\\binom{0.5}{1000000000}", "\\binom{10^{9}}{20000}"):
    assert "binomial" in (screen_problem(answer) or ""), answer


BRACKETED_HANGS = {  # answer -> words in the reason; math-verify reads each bracket pair, sympy computes for minutes
    "\\left[2^{20}\\right]!": "factorial", "[2^{20}]!": "factorial", "\\lbrack 10^{10}\\rbrack!": "factorial",
    "\\lfloor 10^{10}\\rfloor!": "factorial", "\\left\\lceil 10^{10}\\right\\rceil!": "factorial",
    "|10^{10}|!": "factorial", "\\left|10^{10}\\right|!": "factorial", "\\lvert 10^{10}\\rvert!": "factorial",
    "\\left\\vert 10^{10}\\right\\vert!": "factorial", "\\{10^{10}\\}!": "factorial", "[20000]!": "factorial",
    # bars pair as math-verify reads them: |x| * (|10^10|)!, (||10^10| - 1|)!
    "|x|\\cdot|10^{10}|!": "factorial", "||10^{10}|-1|!": "factorial", "|2\\pi||10^{10}|!": "factorial",
    "|-|10^{10}||!": "factorial", "\\lfloor x \\rfloor \\lfloor 10^{10} \\rfloor!": "factorial",
    # a constant before a group takes no argument: pi * (10^10)!
    "\\pi(10^{10})!": "factorial", "\\pi \\lfloor 10^{10}\\rfloor!": "factorial",
    # floor and ceiling keep a power, Gamma or binomial argument numeric
    "7^{\\lfloor 10^{8}\\rfloor}": "exponent", "7^{\\lceil 10^{8} \\rceil}": "exponent",
    "\\Gamma(\\lfloor 10^{8}\\rfloor)": "Gamma", "\\binom{\\lfloor 10^{9}\\rfloor}{10^{5}}": "binomial",
}


def test_factorials_powers_and_functions_of_bracketed_numbers_are_screened():
  for answer, why in BRACKETED_HANGS.items():
    problem = screen_problem(answer)
    assert problem is not None and why in problem, (answer, problem)
  # Intervals pair their mixed brackets without hiding a later factorial; small or symbolic operands pass.
  for answer in ("[1, 2)", "(0, 1]!", "[0, 1) \\cup (2, 3]", "\\left[0, 1\\right)", "\\lfloor 2^{3} \\rfloor!",
                 "|x|!", "\\lfloor x \\rfloor!", "[3]!", "|2|+|3|!", "\\{1, 2\\}", "|x|\\cdot|3|!",
                 "2^{\\lfloor 2.5 \\rfloor}", "\\Gamma(\\lceil 4.5 \\rceil)"):
    assert screen_problem(answer) is None, answer
  for answer in ("[0, 1) \\cup [10^{10}]!", "(0, 1] \\cdot \\lceil 10^{10} \\rceil!"):
    assert "factorial" in (screen_problem(answer) or ""), answer


def test_a_repeating_decimal_is_bounded_as_the_exact_fraction_the_verifier_reads():
  """The verifier writes `0.00000000\\overline{1}` as the exact 1/900000000, so sympy raises 7 to its reciprocal
  exactly, for minutes; a number below 1 is bounded through its leading zeros, the repeating part's too."""
  for answer, why in {"7^{\\frac{1}{0.00000000\\overline{1}}}": "exponent",
                      "7^{\\frac{1}{.\\overline{000000001}}}": "exponent",
                      "7^{\\frac{1}{.\\overline{000000001}} + 2^{2}}": "exponent",
                      "(\\frac{1}{0.00000\\overline{1}})!": "factorial",
                      "\\Gamma(\\frac{1}{0.0000\\overline{1}})": "Gamma",
                      # a float, yet floor, Gamma or a factorial of it is computed exactly: bounded alike
                      "2^{\\frac{1}{0.0000001}}": "exponent", "(\\frac{1}{0.0000001})!": "factorial",
                      "7^{\\lfloor \\frac{1}{0.0000001} \\rfloor}": "exponent"}.items():
    problem = screen_problem(answer)
    assert problem is not None and why in problem, (answer, problem)
  # Decimals with few leading zeros bound small however many digits follow (math-verify reads them as floats).
  for answer in ("e^{-0.693147}", "10^{0.\\overline{3}}", "2^{\\frac{1}{0.\\overline{3}}}", "2^{\\frac{1}{0.0001}}",
                 "(0.5)!", "2^{1.41421356}", "\\overline{z}^{2}"):
    assert screen_problem(answer) is None, answer


def test_a_tiny_decimal_is_bounded_by_its_reciprocal_only_where_it_can_divide():
  """e^{0.000001} is about 1: a number below 1 counts by its reciprocal only in a quotient (`/`, `:`, `\\div`,
  `\\frac`) or under a power or function that may invert it, as `(0.001^{-2})!` does."""
  from phi_jax.rewards import verifier  # pylint: disable=import-outside-toplevel
  for answer in ("e^{0.000001}", "10^{-0.000001}", "x^{0.000001}+1", "(0.00001)!", "\\frac{1}{2}^{0.0000001}",
                 "2^{0.000012}", "e^{0.0001 \\cdot 5}", "0.001!", "e^{0.00000\\overline{1}}",
                 "e^{-0.0000001 \\cdot 3}"):
    assert screen_problem(answer) is None, answer
  for answer, why in {"2^{1/0.0000001}": "exponent", "2^{1:0.0000001}": "exponent", "2^{1 ÷ 0.0000001}": "exponent",
                      "2^{1 \\div 0.0000001}": "exponent", "2^{\\dfrac{1}{0.0000001}}": "exponent",
                      "2^{\\tfrac{1}{0.0000001}}": "exponent", "(1/0.00001)!": "factorial",
                      "(0.00001^{-1})!": "factorial", "\\Gamma(0.0000001)": "Gamma"}.items():
    problem = screen_problem(answer)
    assert problem is not None and why in problem, (answer, problem)
  assert verifier.readable_answer("The answer is \\boxed{e^{0.000001}}") == "e^{0.000001}"
  assert rewards.gold_problem("e^{0.000001}") is None

def test_cfrac_and_over_are_divisions_of_numbers_to_the_screen():
  """math-verify reads \\cfrac and {a \\over b} as quotients; their letters made an exponent look symbolic, so
  7^{\\lfloor \\cfrac{1}{10^{-9}} \\rfloor} (an exact 7^(10^9)) was not screened."""
  for answer in ("7^{\\lfloor \\cfrac{1}{0.000000001} \\rfloor}", "7^{\\lfloor {1 \\over 0.000000001} \\rfloor}"):
    assert "exponent" in (screen_problem(answer) or ""), answer
  for answer in ("7^{\\cfrac{1}{2}}", "2^{0.\\overline{3}}", "x^{\\overline{3}}", "{1 \\over 2}"):
    assert screen_problem(answer) is None, answer


def test_gamma_takes_the_factorial_limit_shifted_by_one():
  """Gamma(n + 1) is n!: the largest factorial the screen passes (10000!) is Gamma(10001)."""
  assert screen_problem("10000!") is None and screen_problem("\\Gamma(10001)") is None
  assert "Gamma" in screen_problem("\\Gamma(10002)")


def test_superscript_digits_are_screened_not_a_crash(pool, monkeypatch):
  """'²'.isdigit() is True yet int('²') raises: a superscript beside a factorial or in an exponent crashed the screen,
  and with it a GRPO step. math-verify reads '3²' as 3, so superscripts are no digits to the screen either."""
  for answer in ("5²!", "3²!", "2^{3²}", "x^{²}", "²!", "10⁹⁹⁹⁹!", "{4²}!"):
    assert screen_problem(answer) is None, answer
  assert "factorial" in screen_problem("²12345!")  # ASCII digits still count
  monkeypatch.setattr(pool, "verify_answers", lambda pairs, **kwargs: [False] * len(pairs))
  assert pool.verify_batch(["<think>t</think> The answer is $\\boxed{3²!}$.", "\\boxed{2^{3²}}"], ["6", "512"]) == [
      False, False]


def test_a_completion_whose_answer_cannot_be_read_is_graded_incorrect_not_raised(pool, monkeypatch, caplog):
  from phi_jax.rewards import verifier  # pylint: disable=import-outside-toplevel
  real = verifier.extract_answer

  def fragile(completion, **kwargs):
    if "trap" in completion:
      raise RuntimeError("unreadable")
    return real(completion, **kwargs)

  monkeypatch.setattr(verifier, "extract_answer", fragile)
  assert verifier.readable_answer("\\boxed{2} trap") is None  # as eval.py's format check reads it
  monkeypatch.setattr(pool, "verify_answers", lambda pairs, **kwargs: [True] * len(pairs))
  assert pool.verify_batch(["\\boxed{2} trap", "\\boxed{2}"], ["2", "2"]) == [False, True]
  assert "RuntimeError: unreadable): graded incorrect" in caplog.text


# -- verification --------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{2024!}", "2024 \\cdot 2023!"),  # a year-sized factorial passes the screen
    ("The answer is 1/2.", "\\frac12"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}"),
    ("\\boxed{[1, 2)}", "[1,2)"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"),
    ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{10\\%}", "0.1"),
    ("\\boxed{1,000}", "1000"),
    ("So $y$ works. Answer: $(x+1)^2$", "x^2+2x+1"),
    ("After all that, the final answer is \\boxed{42}. I hope it is correct.", "42"),
    ("**Answer:** 12", "12"),
    ("**Final Answer**\n\n0.50", "\\frac{1}{2}"),  # a markdown heading, then the answer on its own line
    ("<think>maybe \\boxed{7}</think> Therefore the answer is \\boxed{8}.", "8"),
    ("\\fbox{15}", "15"),
    ("we find $$\\frac{3}{4}$$", "0.75"),
    ("<think>add them</think>\n42", "42"),
    ("\\boxed{2}", "$\\boxed{2}$"),
    ("\\boxed{2*pi}", "2\\pi"),  # plain-text notation on one side, LaTeX on the other
    ("\\boxed{\\frac{\\pi}{2}}", "pi/2"),
    ("The answer is 1e3.", "1000"),
    ("\\boxed{1.5E-3}", "\\frac{3}{2000}"),
    ("\\boxed{x**2 + 1}", "x^2+1"),
    ("\\boxed{2√3}", "\\sqrt{12}"),  # Unicode math
    ("\\boxed{√(x+1)}", "\\sqrt{x+1}"),
    ("\\boxed{(-∞, 3]}", "(-\\infty,3]"),
    ("\\boxed{3·4}", "12"),
    ("The answer is 12 (3 boxes of 4).", "12"),
    ("The answer is 1,000 dollars.", "1000"),
    ("Answer: 5, since 2 + 3 = 5.", "5"),
    ("The answer is **5** apples.", "5"),
    ("The answer is 3/4 (or 0.75 as a decimal).", "\\frac{3}{4}"),
    ("The answer is 1/2 (or equivalently 0.5).", "\\frac{1}{2}"),
    ("\\boxed{18 dollars}", "18 dollars"),  # gold and prediction read alike
    ("\\boxed{\\text{5 cm}}", "\\text{5 cm}"),
    ("\\boxed{\\text{5 cm}}", "5"),
    ("\\boxed{2 xy}", "2xy"),
    ("\\boxed{1\\,000}", "1000"),
    ("The answer is 1~000~000.", "1000000"),
    ("\\boxed{72}", "72.0000001"),
    ("\\boxed{6.02e23}", "602000000000000000000000"),
]
NOT_EQUIVALENT = [
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{[1,2]}", "(1,2]"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}"),
    ("\\boxed{3.14}", "\\pi"),
    ("\\boxed{x+1}", "x-1"),
    ("\\boxed{2}", "-2"),
    ("\\boxed{5 \\text{ cm}}", "6"),
    ("\\boxed{}", "0"),
    ("<think>\\boxed{7}</think> I am not sure.", "7"),  # only the solution section counts
    ("<think>The answer is 7</think>", "7"),
    ("<think>cut off before the end, \\boxed{7}", "7"),
    ("a long discussion\nwith no answer in it", "1"),
    ("\\boxed{2*pi}", "2"),
    ("\\boxed{1e3}", "100"),
    ("\\boxed{√3}", "\\sqrt{2}"),
    ("The answer is 12 (3 boxes of 4).", "4"),  # never the number inside the explanation
    ("The answer is 2 (or 3).", "3"),  # a hedge matches neither answer
    ("The answer is 2 (or 3).", "2"),
    ("The answer is 4 (and not 7).", "7"),
    ("Answer: 10 (or 12 if we count both ends)", "12"),
    ("The answer is 2 million.", "2"),
    ("The answer is 5, not 6.", "6"),
    ("The answer is 1,000 dollars.", "1"),
    ("The answer is 3 eighths.", "3"),
    ("\\boxed{3 eighths}", "3"),
    ("The answer is 6 millions.", "6"),
    ("The answer is 2 (maybe 3).", "2"),
    ("So the answer is 5. Wait, the answer is actually 6.", "5"),
    ("We have $x = 5$ first.\nThe answer is approximately 18.", "5"),
    ("The answer is x = 3 because 2x = 6.", "6"),
    ("The answer is 20 because 35 - 8 = 27.", "27"),
    ("\\boxed{\\text{on}}", "\\text{no}"),
    ("The answer is 5(or 6).", "6"),
    # Small numbers compare relatively, not to six decimal places.
    ("\\boxed{3e-7}", "1e-7"),
    ("\\boxed{9.1e-31}", "1.67e-27"),
    ("\\boxed{0.0000003}", "0.0000001"),
    ("\\boxed{1\\,000}", "0"),  # a thousands space, not a product
    ("\\boxed{123456790}", "123456789"),  # large integers stay exact
]


def test_equivalence_table(pool):
  completions = [c for c, _ in EQUIVALENT + NOT_EQUIVALENT]
  golds = [g for _, g in EQUIVALENT + NOT_EQUIVALENT]
  verdicts = rewards.verify_batch(completions, golds, pool=pool)
  expected = [True] * len(EQUIVALENT) + [False] * len(NOT_EQUIVALENT)
  wrong = [(c, g, v) for c, g, v, e in zip(completions, golds, verdicts, expected) if v != e]
  assert not wrong


def test_is_correct_contract(pool):
  assert rewards.is_correct("<think>1/4 + 1/4</think> The answer is $\\boxed{\\frac{1}{2}}$.", "0.5") is True
  assert rewards.is_correct("<think>1/4 + 1/4</think> The answer is $\\boxed{\\frac{1}{3}}$.", "0.5") is False


def test_batch_of_64_is_fast_and_right(pool):
  golds = [f"\\frac{{{k}}}{{{k + 1}}}" for k in range(1, 65)]  # 64 distinct pairs: nothing is answered from a cache
  completions = [f"<think>counting</think> The answer is \\boxed{{{k + k % 2}/{k + 1}}}." for k in range(1, 65)]
  start = time.perf_counter()
  verdicts = rewards.verify_batch(completions, golds, pool=pool)
  elapsed = time.perf_counter() - start
  assert verdicts == [k % 2 == 0 for k in range(1, 65)]
  assert elapsed < 20.0, elapsed


def _pwn(tag):
  path = f"/tmp/pwned_{tag}_{uuid.uuid4().hex}"
  return path, f"__import__('os').system('touch {path}')"


def test_adversarial_completions_are_incorrect_and_quick(pool):
  marker, injection = _pwn("completion")
  adversarial = [
      "\\boxed{9^{9^{9^9}}}",
      "The answer is 9**9**9**9",
      "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
      "7" * MEGABYTE,
      "\\boxed{" + "7" * MEGABYTE + "}",
      injection,
      f"\\boxed{{{injection}}}",
      f"The answer is ${injection}$",
      f"\\boxed{{\\text{{{injection}}}}}",
      f"Answer: 1+{injection}",
      "\\boxed{\ud800\udfff}",  # lone surrogates: not encodable as UTF-8
      b"\\boxed{\xff\xfe}",  # invalid UTF-8 bytes
      *PATHOLOGICAL.values(),
  ]
  start = time.perf_counter()
  verdicts = rewards.verify_batch(adversarial, ["7"] * len(adversarial), pool=pool)
  assert time.perf_counter() - start < 15.0
  assert verdicts == [False] * len(adversarial)
  assert not os.path.exists(marker)
  # Invalid code points are replaced, not fatal: the rest of the text still counts.
  assert rewards.verifier.sanitize("\\boxed{\ud800}").encode("utf-8") == b"\\boxed{?}"
  assert rewards.verifier.sanitize(b"\\boxed{\xff}") == "\\boxed{\ufffd}"
  assert rewards.verify_batch(["\udcff\\boxed{7}"], ["7"], pool=pool) == [True]


def test_workers_never_evaluate_model_output(pool):
  """Unscreened answers straight to the workers, as gold and as prediction, in every syntax the parsers accept."""
  marker, injection = _pwn("worker")
  forms = [injection, f"\\text{{{injection}}}", f"1+{injection}", f"\\mathrm{{{injection}}}", f"{injection}**2",
           f"\\frac{{{injection}}}{{2}}", f"[{injection}, 1)", f"\\{{{injection}\\}}", f"x={injection}"]
  pairs = [(form, "1") for form in forms] + [("1", form) for form in forms]
  pool.verify_answers(pairs, timeout_s=10.0)
  assert not os.path.exists(marker)


def test_hard_timeout_kills_and_replaces_the_worker(pool):
  assert pool.verify_answers([("x", "x")]) == [True]  # workers are up
  before = set(pool.worker_pids())
  start = time.perf_counter()
  # soft_timeout_s=0: the worker does not interrupt itself, so only the wall-clock kill can end this.
  assert pool.verify_answers([("1", "10^{10^{7}}")], timeout_s=1.5, soft_timeout_s=0) == [False]
  assert time.perf_counter() - start < 4.0
  assert len(before - set(pool.worker_pids())) == 1 and len(pool.worker_pids()) == pool.num_workers
  assert pool.verify_answers([("3", "\\frac{6}{2}")]) == [True]


def test_soft_timeout_answers_without_a_restart(pool):
  assert pool.verify_answers([("x", "x")]) == [True]
  before = set(pool.worker_pids())
  start = time.perf_counter()
  assert pool.verify_answers([("1", "10^{10^{7}}")], timeout_s=4.0, soft_timeout_s=1.0) == [False]
  assert time.perf_counter() - start < 4.0
  assert set(pool.worker_pids()) == before


def test_decimals_equal_to_six_places_verify_and_coarser_ones_do_not(pool):
  """VerifierConfig.float_rounding=6: 2/3 = 0.6666666... matches 0.666667 (rounded to 6 places), not 0.6667."""
  assert pool.verify_answers([("\\frac{2}{3}", "0.666667"), ("\\frac{2}{3}", "0.6667")]) == [True, False]


def test_ready_workers_run_under_the_configured_address_space_limit(pool):
  """Each worker caps its own address space (RLIMIT_AS) at VerifierConfig.worker_memory_bytes once warmed up."""
  assert pool.verify_answers([("x", "x")]) == [True]
  limit = pool.config.worker_memory_bytes
  deadline = time.perf_counter() + 30.0
  while any(resource.prlimit(pid, resource.RLIMIT_AS) != (limit, limit) for pid in pool.worker_pids()):
    assert time.perf_counter() < deadline, [resource.prlimit(pid, resource.RLIMIT_AS) for pid in pool.worker_pids()]
    time.sleep(0.05)


def _process_state(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return None


def test_worker_killed_mid_task_is_replaced(pool):
  assert pool.verify_answers([("x", "x")]) == [True]
  victims = pool.worker_pids()
  result = {}
  task = threading.Thread(target=lambda: result.setdefault(
      "verdicts", pool.verify_answers([("1", "10^{10^{7}}")], timeout_s=60.0, soft_timeout_s=0)))
  start = time.perf_counter()
  task.start()
  while not pool.busy_worker_pids():
    assert time.perf_counter() - start < 30.0
    time.sleep(0.01)
  time.sleep(0.2)
  for pid in victims:  # the busy one dies mid-task, the other one idle or starting up
    os.kill(pid, signal.SIGKILL)
  killed_at = time.perf_counter()
  task.join(30.0)
  assert result["verdicts"] == [False]
  assert time.perf_counter() - killed_at < 5.0  # left alone, this answer takes over 10 s to fail
  for pid in victims:  # an idle worker that is killed but not yet dead would take the next answer down with it
    while _process_state(pid) not in ("Z", "X", None):
      time.sleep(0.01)
  # The replacements verify again; a generous limit, as their first answer may meet a loaded machine (the suite's
  # other worker compiling) and this checks the pool's recovery, not its speed.
  started = time.perf_counter()
  verdict = rewards.verify_batch(["\\boxed{x + 1}"], ["1 + x"], timeout_s=60.0)
  if verdict != [True]:  # still a failure; a second answer tells a one-off from a pool left broken
    took = time.perf_counter() - started
    again = rewards.verify_batch(["\\boxed{x + 1}"], ["1 + x"], timeout_s=60.0)
    pytest.fail(f"the first answer after the kill scored {verdict} in {took:.1f} s, a second one {again}; workers "
                f"{pool.worker_pids()} (killed {victims})")
  assert not set(victims) & set(pool.worker_pids()) and len(pool.worker_pids()) == pool.num_workers


def test_pool_shutdown():
  pool = rewards.VerifierPool(VerifierConfig(num_workers=1))
  pid = pool.worker_pids()[0]
  pool.shutdown(timeout_s=0.5)
  pool.shutdown()
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  with pytest.raises(RuntimeError, match="shut down"):
    pool.verify_answers([("1", "1")])


def test_verify_answers_refuses_timeouts_that_would_kill_every_worker(pool):
  """A per-call timeout_s <= 0 (or soft_timeout_s < 0) is refused before any worker is touched."""
  before = pool.worker_pids()
  for kwargs, name in ((dict(timeout_s=0), "timeout_s"), (dict(timeout_s=-1.0), "timeout_s"),
                       (dict(soft_timeout_s=-0.5), "soft_timeout_s")):
    with pytest.raises(ValueError, match=name):
      pool.verify_answers([("x + 1", "1 + x")], **kwargs)
    if name == "timeout_s":  # what evaluation.verify_timeout_s / rollouts.verify_timeout_s set
      with pytest.raises(ValueError, match="verify_timeout_s"):
        rewards.verify_batch(["\\boxed{x + 1}"], ["1 + x"], pool=pool, **kwargs)
  assert pool.worker_pids() == before
  assert pool.verify_answers([("x + 1", "1 + x")], soft_timeout_s=0) == [True]  # 0: no soft limit, still allowed


def test_verifier_config_refuses_a_negative_worker_count():
  with pytest.raises(ValueError, match="num_workers"):
    VerifierConfig(num_workers=-1)
  assert VerifierConfig(num_workers=0).num_workers == 0


def test_default_worker_count_follows_the_cpus_this_process_may_use(monkeypatch):
  """A container limited to a few cores of a big host starts that many workers, not one per host core."""
  monkeypatch.setattr(os, "cpu_count", lambda: 64)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
  assert rewards.verifier.default_num_workers() == 3
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
  assert rewards.verifier.default_num_workers() == 8


def test_workers_that_cannot_start_raise(monkeypatch):
  monkeypatch.setattr(rewards.verifier, "_WORKER_SCRIPT", os.path.join(REPO, "no_such_worker.py"))
  pool = rewards.VerifierPool(VerifierConfig(num_workers=1))
  with pytest.raises(RuntimeError, match="failing to start"):
    pool.verify_answers([("x", "x")])
  pool.shutdown()


def test_package_imports_neither_jax_nor_sympy():
  assert "jax" in sys.modules  # the workers above served a parent that has imported JAX
  probe = ("import os, sys, types; pkg = types.ModuleType('phi_jax'); pkg.__path__ = [os.path.join(sys.argv[1], "
           "'phi_jax')]; sys.modules['phi_jax'] = pkg; import phi_jax.rewards; "
           "print(sorted(m for m in ('jax', 'sympy', 'math_verify') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", probe, REPO], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


# -- format --------------------------------------------------------------------------------------------------------

FORMATS = [
    ("<think>reasoning</think>The answer is 2.", True),
    ("<think>\nreasoning\n</think>\n\\boxed{2}", True),
    ("The answer is 2.", False),
    ("<think>reasoning with no end", False),
    ("</think>reasoning<think> 2", False),
    ("<think> </think> 2", False),
    ("<think>a</think><think>b</think> 2", False),
    ("<think>a</think> 2 </think>", False),
    ("preamble <think>a</think> 2", False),
    ("<think>reasoning</think>   ", False),
]


@pytest.mark.parametrize("completion,ok", FORMATS)
def test_think_format(completion, ok):
  assert rewards.think_format_ok(completion) is ok


def test_verifier_config_refuses_bad_limits():
  for kwargs in (dict(timeout_s=0.0), dict(timeout_s=-1.0), dict(soft_timeout_ratio=1.0),
                 dict(soft_timeout_ratio=-0.1)):
    with pytest.raises(ValueError):
      VerifierConfig(**kwargs)


def test_verify_batch_sends_only_screened_answers_to_the_workers(pool, monkeypatch):
  """A dangerous predicted answer is refused before any worker sees it; the lengths must match."""
  sent = []
  monkeypatch.setattr(pool, "verify_answers", lambda pairs, **kwargs: sent.extend(pairs) or [True] * len(pairs))
  verdicts = pool.verify_batch(["\\boxed{9^{9^{9^9}}}", "\\boxed{2}", "no answer\nhere"], ["1", "2", "3"])
  assert verdicts == [False, True, False] and sent == [("2", "2")]
  with pytest.raises(ValueError):
    pool.verify_batch(["\\boxed{2}"], [])


def test_think_format_options():
  assert rewards.think_format_ok("reasoning</think> 2", ThinkFormat(prompt_opens_think=True))
  assert not rewards.think_format_ok("<think>reasoning</think> 2", ThinkFormat(prompt_opens_think=True))
  assert rewards.think_format_ok("<think>reasoning</think>", ThinkFormat(require_solution=False))
  assert rewards.format_ok("<think>a</think> 2", finished=True)
  assert not rewards.format_ok("<think>a</think> 2", finished=False)



def test_format_rewards_read_completions_as_the_verifier_is_configured(monkeypatch):
  """A template that opens <think> in the prompt is configured once (rewards.configure): the format and
  length-aware rewards follow it (they kept the default format, scoring every such completion badly formed)."""
  opened = "reasoning</think> The answer is \\boxed{2}."
  fmt, length_aware = rewards.get_reward("format"), rewards.get_reward("length_aware")
  score = lambda fn: fn(opened, "2", length=10, finished=True, correct=True)
  assert (score(fmt), score(length_aware)) == (0.0, pytest.approx(8 / 13 * -1.0))  # default: badly formed
  # What rewards.configure sets, without restarting the module's pool that the other tests hold.
  monkeypatch.setattr(rewards.verifier, "_default_config",
                      dataclasses.replace(rewards.default_config(), think=ThinkFormat(prompt_opens_think=True)))
  assert (score(fmt), score(length_aware)) == (1.0, pytest.approx(8 / 13 * 1.0))


def test_score_batch_reads_completions_with_the_think_format_of_the_pool_it_is_given():
  """score_batch(pool=...) verifies with that pool's think format; format and length-aware follow the same one."""
  pool = rewards.VerifierPool(VerifierConfig(num_workers=1, think=ThinkFormat(prompt_opens_think=True)))
  completion = ["Let me compute 2+3.</think> The answer is \\boxed{5}."]
  try:
    scores = {name: rewards.score_batch(name, completion, ["5"], lengths=[20], finished=[True], pool=pool)
              for name in ("correctness", "format", "length_aware")}
  finally:
    pool.shutdown()
  assert scores == {"correctness": [1.0], "format": [1.0], "length_aware": [pytest.approx(8 / 13)]}
  # Outside that call, the module-wide format again.
  assert rewards.get_reward("format")(completion[0], "5", length=20, finished=True) == 0.0


# -- length-aware reward -------------------------------------------------------------------------------------------

def _reference_accuracy(correct, length, l_max=31744, l_pos=25600, l_neg=3702):
  """The paper's formula, written independently in numpy."""
  length = np.asarray(length, np.float64)
  if correct:
    rho = np.clip((length - l_pos) / (l_max - l_pos), 0.0, 1.0)
    return 0.75 + 0.25 * np.cos(np.pi * rho)
  rho = np.clip(length / l_neg, 0.0, 1.0)
  return -0.75 - 0.25 * np.cos(np.pi * rho)


def test_length_scaled_accuracy_matches_formula():
  config = LengthAwareRewardConfig()
  lengths = np.concatenate([np.arange(0, 40000, 97), [0, 1851, 3702, 3703, 25600, 28672, 31744, 40000]])
  for correct in (True, False):
    ours = np.array([rewards.length_scaled_accuracy(correct, int(n), config) for n in lengths])
    np.testing.assert_allclose(ours, _reference_accuracy(correct, lengths), atol=1e-12)
  boundaries = {(True, 0): 1.0, (True, 25600): 1.0, (True, 28672): 0.75, (True, 31744): 0.5, (True, 50000): 0.5,
                (False, 0): -1.0, (False, 1851): -0.75, (False, 3702): -0.5, (False, 20000): -0.5}
  for (correct, length), value in boundaries.items():
    assert rewards.length_scaled_accuracy(correct, length, config) == pytest.approx(value, abs=1e-12)


def test_unfinished_completions_score_as_unfinished_whatever_their_format():
  """A rollout cut at the length limit, typically inside its think block, gets unfinished_score, not the format
  penalty."""
  config = LengthAwareRewardConfig()
  for completion in ("<think>cut off mid-thought", "no think block at all", "<think>a</think> \\boxed{2}"):
    for correct in (True, False):
      assert rewards.accuracy_term(completion, correct=correct, length=31744, finished=False, config=config) == -0.5
  assert rewards.accuracy_term("<think>cut off", correct=True, length=10, finished=True, config=config) == -1.0


def test_length_config_scaling():
  config = LengthAwareRewardConfig().scaled_to(16384)
  assert (config.l_max, config.l_pos_control, config.l_neg_control) == (16384, 13213, 1911)
  ours = [rewards.length_scaled_accuracy(c, n, config) for c in (True, False) for n in (0, 1000, 14000, 16384)]
  ref = [_reference_accuracy(c, n, 16384, 13213, 1911) for c in (True, False) for n in (0, 1000, 14000, 16384)]
  np.testing.assert_allclose(ours, ref, atol=1e-12)
  with pytest.raises(ValueError):
    LengthAwareRewardConfig(l_pos_control=40000)
  with pytest.raises(ValueError):
    LengthAwareRewardConfig(l_neg_control=0)
  # A tiny budget keeps l_neg_control >= 1 (3702 * 4 / 31744 rounds to 0): the wrong-answer ramp stays defined.
  tiny = LengthAwareRewardConfig().scaled_to(4)
  assert (tiny.l_max, tiny.l_pos_control, tiny.l_neg_control) == (4, 3, 1)


def test_length_config_scaled_to_a_too_small_budget_names_the_budget():
  """The response budget is what the user set (grpo.max_new_tokens, reward.length_aware_max_tokens), not the
  reward's derived constants; the message gives the smallest budget that works."""
  for budget in (-5, 0, 1, 2):
    with pytest.raises(ValueError, match=r"max_new_tokens.*length_aware_max_tokens.*at least 3") as error:
      LengthAwareRewardConfig().scaled_to(budget)
    assert "l_pos_control" not in str(error.value) and str(budget) in str(error.value)
  assert LengthAwareRewardConfig().scaled_to(3).l_max == 3


def test_length_aware_total():
  config = LengthAwareRewardConfig()
  good = "<think>" + " ".join(f"w{i}" for i in range(50)) + "</think> The answer is \\boxed{2}."
  looping = "<think>" + "a b c d e " * 40 + "</think> The answer is \\boxed{2}."
  w_acc, w_rep = 8 / 13, 1 / 13
  assert rewards.length_aware_reward(good, correct=True, length=100, finished=True) == pytest.approx(w_acc * 1.0)
  assert rewards.length_aware_reward(good, correct=False, length=3702, finished=True) == pytest.approx(w_acc * -0.5)
  assert rewards.length_aware_reward(good, correct=True, length=31744, finished=False) == pytest.approx(w_acc * -0.5)
  assert rewards.length_aware_reward(good.replace("<think>", ""), correct=True, length=100,
                                     finished=True) == pytest.approx(w_acc * -1.0)
  rep = repetition_penalty(looping)
  assert rep < -0.9
  assert rewards.length_aware_reward(looping, correct=True, length=28672, finished=True,
                                     config=config) == pytest.approx(w_acc * 0.75 + w_rep * rep)


# -- repetition penalty --------------------------------------------------------------------------------------------

def test_repetition_penalty():
  unique = [f"w{i}" for i in range(1000)]
  assert repetition_penalty(" ".join(unique)) == 0.0
  assert repetition_penalty("a b c") == 0.0
  assert repetition_penalty("a b c d e " * 100) == -1.0  # 5 types, each far above 5 occurrences
  phrase = ["p", "q", "r", "s", "t"]
  five = unique[:100] + phrase * 5 + unique[100:]  # the phrase's 5-grams occur at most 5 times: no penalty
  assert repetition_penalty(five) == 0.0
  six = unique[:100] + phrase * 6 + unique[100:]  # 1030 tokens; 5 of the 5-gram types repeat, top count 6
  types = len({tuple(six[i:i + 5]) for i in range(len(six) - 4)})
  assert types == 1026 - 6 * 5 + 5 + 4  # 1026 5-grams, the 30 inside the loop collapse to 5 types
  assert repetition_penalty(six) == pytest.approx(-max(5 / types, 6 / (1030 / 5)))
  tail_loop = unique[:400] + phrase * 120  # a varied start, then one phrase looping: top count 120 of 200 slots
  assert repetition_penalty(tail_loop) == pytest.approx(-120 / 200)
  # A text that is all loop: 10 types in 66 5-grams, each 6 or 7 times. Share of repeating types 10 / 10 = 1
  # (the top frequency 7 / (70 / 5) = 0.5 is lower), so the penalty is the full -1.
  assert repetition_penalty("a b c d e f g h i j " * 7) == -1.0
  tokens = [7] * 20  # token ids work too: one type, 16 occurrences
  assert repetition_penalty(tokens) == -1.0
  assert repetition_penalty(tokens, max_count=16) == 0.0


# -- registry ------------------------------------------------------------------------------------------------------

def test_registry_and_combine(pool):
  completion = "<think>" + " ".join(f"w{i}" for i in range(20)) + "</think> so \\boxed{\\frac{1}{2}}"
  kwargs = dict(length=500, finished=True)
  assert rewards.get_reward("correctness")(completion, "0.5", **kwargs) == 1.0  # verifies through the pool
  assert rewards.get_reward("correctness")(completion, "0.5", correct=False, **kwargs) == 0.0
  assert rewards.get_reward("format")(completion, "0.5", **kwargs) == 1.0
  assert rewards.get_reward("format")(completion, "0.5", length=500, finished=False) == 0.0
  assert rewards.get_reward("repetition")("x y z w v " * 30, "0.5", **kwargs) == -1.0
  assert rewards.get_reward("length_aware")(completion, "0.5", correct=True, **kwargs) == pytest.approx(8 / 13)
  with pytest.raises(KeyError):
    rewards.get_reward("nope")

  combined = rewards.combine({"correctness": 1.0, "format": 0.5, "length_aware": 2.0})
  assert combined(completion, "0.5", correct=True, **kwargs) == pytest.approx(1.0 + 0.5 + 2.0 * 8 / 13)
  wrong_at_500 = float(_reference_accuracy(False, 500))
  assert combined(completion, "0.3", **kwargs) == pytest.approx(0.0 + 0.5 + 2.0 * 8 / 13 * wrong_at_500)
  assert not rewards.combine({"format": 1.0, "repetition": 1.0}).uses_correctness

  completions = [completion, completion.replace("frac{1}{2}", "frac{1}{3}"), completion.replace("<think>", "")]
  scores = rewards.score_batch(combined, completions, ["0.5"] * 3, lengths=[500] * 3, finished=[True] * 3, pool=pool)
  expected = [1.0 + 0.5 + 2.0 * 8 / 13, 0.5 + 2.0 * 8 / 13 * wrong_at_500, 1.0 + 2.0 * 8 / 13 * -1.0]
  assert scores == pytest.approx(expected)
  assert rewards.score_batch("format", completions, ["0.5"] * 3, lengths=[1] * 3, finished=[True] * 3) == [1, 1, 0]


def test_combined_reward_verifies_once_and_passes_the_verdict_down(monkeypatch):
  calls = []
  monkeypatch.setattr(rewards.registry, "is_correct", lambda completion, gold: calls.append(gold) or True)
  completion = "<think>" + " ".join(f"w{i}" for i in range(20)) + "</think> \\boxed{2}"
  combined = rewards.combine({"correctness": 1.0, "length_aware": 1.0})
  assert combined(completion, "2", length=10, finished=True) == pytest.approx(1.0 + 8 / 13)
  assert calls == ["2"]


def test_score_batch_verifies_for_every_reward_that_needs_it(monkeypatch):
  """Rewards that use correctness, including unregistered functions, get the batch verdicts; the others None."""
  batches = []

  def fake_verify_batch(completions, golds, **kwargs):
    batches.append(list(golds))
    return [g == "1" for g in golds]

  monkeypatch.setattr(rewards.registry, "verify_batch", fake_verify_batch)
  monkeypatch.setattr(rewards.registry, "is_correct", lambda *args: pytest.fail("verified one by one"))
  seen = []
  plain = lambda completion, gold, *, length, finished, correct=None: seen.append(correct) or 0.0
  kwargs = dict(lengths=[5, 5], finished=[True, True])
  rewards.score_batch(plain, ["a", "b"], ["1", "2"], **kwargs)
  assert seen == [True, False]
  completion = "<think>" + " ".join(f"w{i}" for i in range(20)) + "</think> \\boxed{1}"
  scores = rewards.score_batch("length_aware", [completion] * 2, ["1", "2"], **kwargs)
  assert scores == pytest.approx([8 / 13 * 1.0, 8 / 13 * float(_reference_accuracy(False, 5))])
  assert batches == [["1", "2"], ["1", "2"]]
  assert rewards.score_batch("format", [completion], ["1"], lengths=[5], finished=[True]) == [1.0]
  assert len(batches) == 2  # the format reward needs no verdict
  with pytest.raises(ValueError):
    rewards.score_batch("format", [completion] * 2, ["1"], **kwargs)


# tests/data/final_answers.jsonl pins how the checker grades natural final answers of correct GSM8K / MATH / AIME
# solutions (right) and hedges between rival values (wrong); extend it with a line per new case, and a change to the
# checker that moves a line must say why in its commit.
def test_the_final_answers_table_is_graded_as_recorded(pool):
  """Every line of the table is graded as it records, so a change to the checker cannot move one unnoticed."""
  import json
  think = "<think>\nok\n</think>\n\n"
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "final_answers.jsonl")) as f:
    table = [json.loads(line) for line in f if line.strip()]
  verdicts = pool.verify_batch([think + row["completion"] for row in table], [row["gold"] for row in table])
  mismatches = [f"expected {row['right']}: {row['completion']!r} against gold {row['gold']!r}"
                for row, verdict in zip(table, verdicts) if verdict != row["right"]]
  for mismatch in mismatches:
    print(mismatch)
  assert len(table) >= 200 and not mismatches, "\n".join(mismatches)
