"""Final-answer extraction from model completions and gold strings.

A completion's answer lives in its solution section: the text after the last `</think>` (the whole text when it
has no think tags; nothing when its last `<think>` is never closed, as in a rollout cut off mid-thought, whose
tentative answers are not final; with a chat template that opens the think block in the prompt,
`ThinkFormat.prompt_opens_think`, a completion without `</think>` is all thoughts). Inside it, the answer is, in
order of preference:

1. the content of the last `\\boxed{...}` or `\\fbox{...}` (balanced braces, escaped `\\{ \\}` ignored), a
   number followed by words (plain or in `\\text{}`) and a hedge in brackets read as in 2 (`\\boxed{18 dollars}`,
   `\\boxed{\\text{5 cm}}`, `\\boxed{5 \\text{ cm}}` -> 18, 5, 5; `\\boxed{5 \\text{ (or 6)}}` -> "5 or 6" and
   `\\boxed{5 \\text{ or more}}` -> "5 or more", which match no single gold, and `\\boxed{2 \\text{ million}}` ->
   "2 million", as do other words that change the value alone: a scale, a fraction, "percent", a word joining
   another number ("2 to 1"); `\\boxed{10 \\text{ m/s}}`, `\\boxed{4 \\text{ (rounded)}}` and other words
   (`\\boxed{3 \\text{ times as many}}`, `\\boxed{6 \\text{ more cookies}}`) stay as they are, for math-verify to
   drop the `\\text{}`; a hedge's alternative that is math stays too, the verifier judging whether it restates the
   value: `\\boxed{\\sqrt{2} (or \\sqrt{3})}` -> "\\sqrt{2} or \\sqrt{3}", `\\boxed{1/2 (or 50\\%)}` -> "1/2 or
   50\\%"; a spelled-out alternative is a number and a comparative a bound: `\\boxed{12 (or thirteen)}` -> "12 or
   13", `\\boxed{5 (or more)}` -> "5 or more"; `\\textrm{}` and `\\mbox{}` read as `\\text{}`),
   and the boxes right before it that ",", "and" or "or" join to
   it taken with it, and the math or plain number that "or" joins after it ("$\\boxed{5}$ or $6$", "\\boxed{5} (or
   6)" -> "5 or 6"; see "Several answers" below); failing that, the number on a last line marked "####", alone,
   as a price or before words as in 2 (GSM8K's format: "#### 1,200", "#### \\$18.00", "#### 18 dollars" -> 1200,
   18.00, 18; a markdown heading such as "#### Step 1" or a numbered "#### 2." is not an answer);
2. what follows the last "answer is" / "answer:" (case-insensitive, markdown around the word allowed) up to the
   end of that sentence, or the line after a "Final Answer" / "Answer" heading; a label followed by prose rather
   than math ("the answer is correct", or a sentence with a capitalised subject: "Janet makes $18 per day") gives
   way to an earlier label, or else to 3, and counts only when the solution holds no math ("the answer is even"),
   but a number in words ("seven apples"), a bare "yes" / "no" and a name ("New York") are answers, not prose, and
   a sentence that the label introduces as the answer ("Answer: ...", a heading, or a capitalised subject) is its
   one number or price ("Janet makes $18 per day" -> 18; no answer at all, not 3's last math, where it holds two or
   more, or a bound, a hedge or a negation stands by it: "Tom has 5 and Ann has 6", "at least $18", "$18 or more"); a
   label whose sentence opens with a negation and then a value ("the answer is not $5$", "not 5", "not five";
   "not", "is not", "isn't", "cannot be") gives no answer at all, while "the answer is not obvious" is prose.
   Qualifiers before the answer are dropped ("actually 6", "approximately 18"), a special token ends it, and a `$`
   before a number that no `$` closes within the sentence is a price (so is one whose number prose follows past the
   end of its sentence or line: "$13. She spent $5", but "$3 +\\n4 = 7$" is math). In plain text (not `$...$`) the
   sentence is cut to its answer: bold markers inside it dropped, a trailing explanation cut (", since ...",
   " because ...", "; " before prose, "(3 boxes of 4)", "(9 * 2)" after a number, and after a leading number a note
   in prose that holds no number, in digits or words: "5, the smallest such number", "5 — ...", "5: ...", but not
   "5, or 6", "5, or more", "5, maybe 6", "5, tops", "5 — unless ...", "5, a dozen if ..."), and a number followed
   only by words or a compound unit is the number ("1,200 people", "5 m/s", "5 cm^2" -> 1200, 5, 5) unless a word
   changes its value ("2 million", "3 dozen", "3 eighths", "2 and 3", "5 at least"); a hedge "2 (or 3)" stays two
   answers, which match no single gold, as do "12 (or thirteen)" and a bound "5 (or more)", and an alternative that
   is not a plain number is dropped ("1/2 (or 50%)"); a word after the numbers stays only where the answer has one
   and the alternative's is a unit (`UNIT_SIZES`: "150 minutes (or 2.5 hours)", which the verifier converts, a mixed
   number as its fraction: "1 1/2 feet (or 18 inches)" -> "3/2 feet or 18 inches"; "12 apples (or 13)", "8 pies (or 9
   cakes)" -> "12 or 13", "8 or 9");
3. the last inline or display math (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`), where a `$` before a number is
   a price as in 2 (a `$$` never is), neither closing nor opening math, and a price after the last math is the
   answer ("We get $6 \\times 7 = 42$, so she earns $42." -> 42), taken with the math before it when "or" joins
   them (see "Several answers");
4. the whole solution section when it is one short line (a model that answers only "42").

Several answers: math spans after a label, or boxes, joined by "," or "and" alone ("$\\boxed{2}$ and $\\boxed{3}$",
"$2$, $3$, and $5$", LaTeX layout between them), or by a short gap that holds "or" (or "\\lor"; "|" and "/" are no
"or") and no other math or words but the first answer's unit or noun before "or" and up to two hedge adverbs after it
(not "about" or "approximately": "$12.5$, or about $13$" is 12.5; nor a unit the verifier lacks after the first's:
"$5$ km, or $5000$ m" is 5; nouns join as a hedge ("$5$ apples or $6$ apples left", "$1$ box or $2$ boxes", "$8$
pies or $9$ cakes") unless one of them is a scale or a share (`_another_noun`: "$3$ dozen, or $36$ eggs" may restate
one quantity in other words and is not joined, so the answer, or the last box or math, stands alone)), whatever
commands or lines
stand with it ("the answer is $5$ or $6$", "\\quad \\text{, or } \\quad", "\\mathbf{or}", ", or maybe ", " hours, or
": `_joins_answers`; not "$12$, or half of the $24$"), are one
answer: a set, comma-separated ("2, 3, 5"), which matches the same set as gold; or, where "or" joins any two, a
hedge, joined by `HEDGE_JOINER` ("5 or 6", as is "5 \\lor 6"), which the verifier grades right when every two of its
alternatives restate one value and any of them is the gold ("$\\frac{1}{4}$, or $25\\%$" and 25; degrees restate
radians; a price its value in cents where that says "cents" or "¢", and units of one dimension a quantity where the
values agree once converted, a unit word after each alternative taken with it (`_units_after`), two graded on
either, more on the first alone: "$\\$1.50$, or $150$ cents" is 1.50 or 150, "$2.5$ hours, or $150$ minutes" 2.5 or
150) or, where one only rounds another ("$\\pi$, or $3.14$"), when the most precise is the gold (pi); or when every
alternative is the gold, or, as a whole, a gold of several answers ("x = 2 or x = 3" and "2, 3", but not the pair
"(2, 3)"), so a hedge between values matches no single gold; an
alternative it cannot compare (a number with a unit word beside plain numbers, a price beside a percent or a unit
word: "$\\$12$, or $20\\%$") is dropped, not taken as a rival value, but a price beside other math is compared as its
plain value ("$\\$5$ or $6$", "$\\$0.25$ or $25$" are hedges). An inequality and an equation joined by "or" are no
alternatives ("since $n > 0$ or $n = 5$" -> "n = 5").
The last math (3) is joined so only when "or" joins any two of the spans ("So Ann has $5$ or $6$ apples." -> "5 or
6", "$5$, $6$, or $7$" -> "5 or 6 or 7"): math that "and" or "," alone joins to it stays apart, since there it is
mostly a derivation ("$a = 3$, $b = 7$, and $a + b = 10$." -> "a + b = 10"; "$12$ and $4$ is the remainder" -> 4).

The answer (and a gold answer) is then rewritten where plain-text notation would be misread as LaTeX:
"2*pi", "1e3", "x**2" (`latex_notation`), and a whole number in words is written in digits ("twenty-one" -> 21).
An answer that opens with an inequality sign ("\\geq 5", "> 4", "\\ne 5": a bound with no left side, which math-verify
would read as the number) is no answer, as "5 or more" matches no gold; "\\approx 5" stays.
Against a gold that is one choice letter ("B", "(B)", "\\textbf{(B)}"), `choice_letter` reads an answer that opens
with a choice and goes on with the option's text ("(B) 12", "B) 12", "\\textbf{(C)}\\ 12") as its letter; it needs
the gold, so the caller that pairs an answer with its gold applies it.

Model output is untrusted and may be a megabyte of noise, so every step is linear in the input or bounded by
`max_chars`: plain `str.rfind` scans and character loops that stop after `max_chars`, and regular expressions
without nested or adjacent repetition, which cannot backtrack far (`_RELATION`, `_INEQUALITY`, `_LOGICAL_OR`,
`_VALUE_OF`, `_COMMAND`, `_LAYOUT`, `_GAP_LAYOUT`, `_GAP_WORD`, `_WORD_AFTER`, `_NOUN_AFTER`, `_MIXED_NUMBER`,
`_NEGATION`).
"""

from __future__ import annotations

import collections
import decimal
import re
from typing import Optional

from phi_jax.rewards.think_format import ThinkFormat
from phi_jax.rewards.verify_worker import UNIT_SIZES

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DEFAULT_MAX_ANSWER_CHARS = 4096
# A short single-line solution section is taken as the answer itself (fallback 4).
BARE_ANSWER_MAX_CHARS = 64

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# How many `\boxed` occurrences to try from the end before giving up: an unbalanced last box (a truncated answer)
# falls back to the one before it, but a megabyte of `\boxed{` must not turn into a quadratic scan.
_MAX_BOX_TRIES = 8
# Answers joined into one ("$\\boxed{2}$ and $\\boxed{3}$", "$5$ or $6$"): at most this many, each at most this far
# from the next, so a megabyte of "$1$, " stays a bounded scan.
_MAX_JOINED_ANSWERS = 16
_MAX_JOIN_GAP_CHARS = 24
# What alone may stand between two answers that are one set: "2, 3 and 5". Where "or" alone stands between them,
# with punctuation, perhaps after the first answer's unit and before one or two of these adverbs ("or maybe", "or
# perhaps even", "\\text{, or }", " hours, or "), they are one hedge; other words make it prose ("or half of the",
# "whether or not", "one or two"). A rounding after "or about" / "or approximately" is no rival value: the exact
# answer before it is the answer ("$12.5$, or about $13$" is 12.5).
_SET_WORDS = frozenset((",", "and"))
_OR_ADVERBS = frozenset(("maybe", "possibly", "perhaps", "else", "otherwise", "just", "even", "equivalently",
                         "alternatively"))
# What a gap between answers is read without: LaTeX commands and spacing ("\\quad \\text{or} \\quad", "\\;",
# "\\hspace{1em}"), braces, brackets and dollar signs; its words are then runs of letters and single other marks, of
# which these are math ("|" and "/", a table's columns or a ratio, are no "or").
_GAP_LAYOUT = re.compile(r"\\(?:hspace\*?\{[^{}]*\}|[A-Za-z]+|[,;:!> ])|[~{}()\[\]$\\]")
_GAP_WORD = re.compile(r"[A-Za-z]+|\S")
_GAP_MATH = frozenset("0123456789=<>+^_*")
# LaTeX spacing, and text mode around words (group 1), which pad the operands of a logical "or" (`latex_notation`).
_LAYOUT = re.compile(r"\\(?:q?quad(?![A-Za-z])|[,;:!> ]|hspace\*?\{[^{}]*\})|~"
                     r"|\\(?:text|textrm|textbf|textit|mathrm|mbox)\{([A-Za-z ]*)\}")
# How the alternatives of a hedge are joined in an extracted answer ("5 or 6"); a set's answers are joined by ", ".
# The verifier's worker reads an answer with this at its top level as a hedge (`verify_worker.alternatives`).
HEDGE_JOINER = " or "
_ANSWER_WORD = "answer"
# GSM8K's answer marker: "#### 72" on the solution's last line.
_ANSWER_MARK = "####"
# How many answer labels to weigh from the end (a prose one gives way to the one before it; see
# `_after_answer_label`), so a megabyte of labels stays a linear scan.
_MAX_LABEL_TRIES = 8
# Connectives that may stand between a label and its answer: "the answer is therefore 5".
_FILLER_WORDS = ("therefore", "thus", "hence", "indeed", "clearly", "simply", "exactly", "then", "so", "just",
                 # A qualified or corrected last answer is still the answer: "actually 6", "approximately 18".
                 "actually", "really", "now", "instead", "definitely", "approximately", "approx.", "approx", "ca.",
                 "about", "around", "roughly", "nearly", "only", "still", "also", "in fact", "equal to")
# Lower-case words that open math rather than prose after a label.
_MATH_WORDS = frozenset(("pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "infinity", "inf"))
# Whole answers in words that a label's sentence may be, though they are not math: "the answer is no".
_WORDED_ANSWERS = frozenset(("yes", "no"))
# After a label, a comma and one of these words start an explanation, not more of the answer: "5, since 2 + 3 = 5".
_CONNECTIVES = frozenset(("since", "because", "as", "which", "so", "where", "given", "from", "for", "that", "due",
                          "not", "i.e.", "meaning", "giving", "when", "we", "this", "it", "hence", "thus",
                          "therefore"))
_MAX_CONNECTIVE_CHARS = 16
# ... and these without a comma: "x = 3 because 2x = 6" (math-verify would read the chain of equations).
_CLAUSE_WORDS = frozenset(("because", "since", "so"))  # not "when", "where", "given": they qualify an answer
# Abbreviations whose period does not end the answer's sentence ("approx. 18", "5, i.e. 2 + 3").
_ABBREVIATIONS = ("i.e", "e.g", "approx", "ca", "vs", "cf", "resp")
# A hedge in parentheses opens with one of these: "2 (or 3)", "2 (maybe 3)", "3/4 (or equivalently 0.75)".
_HEDGES = frozenset(("maybe", "possibly", "perhaps", "equivalently", "alternatively", "or", "i.e.", "i.e", "ie"))
# Inside math (a boxed or gold answer), a word after a number must be this long to be a unit or a noun: "2 xy" and
# "3 abc" are products of variables, "18 dollars" is 18.
_MIN_UNIT_CHARS_IN_MATH = 4
# ... or be one of these units.
_SHORT_UNITS = frozenset(("oz", "in", "mi", "yd", "ft", "lb", "lbs", "qt", "pt", "pts", "pcs", "kg", "km", "cm", "mm",
                          "ml", "hr", "hrs", "min", "mins", "sec", "mph", "kph", "sq", "cu", "gal", "mg", "kb", "mb"))
# Words after a number that make it a fraction ("3 eighths"); an ordinal does so when it is the last word ("1 fourth"
# but "45 fourth graders").
_FRACTION_WORDS = frozenset(("halves", "thirds", "fourths", "fifths", "sixths", "sevenths", "eighths", "ninths",
                             "tenths", "elevenths", "twelfths", "twentieths", "hundredths", "thousandths",
                             "millionths"))
_ORDINALS = frozenset(("half", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                       "eleventh", "twelfth", "twentieth", "hundredth", "thousandth", "millionth"))
# Words after a number that change its value or add another, so "2 million" is not the answer 2 (fractions:
# `_FRACTION_WORDS`, `_ORDINALS`).
_VALUE_WORDS = frozenset((
    "and", "or", "out", "of", "times", "plus", "minus", "over", "divided", "to", "hundred", "thousand", "million",
    "billion", "trillion", "dozen", "hundreds", "thousands", "millions", "billions", "trillions", "dozens",
    "score", "gross", "percent", "quarter", "quarters", "squared", "cubed", "factorial", "mod", "modulo", "less",
    "more", "degrees"))
# ... and first words that do so with the word after them: "5 at least" is a bound, "45 at the store" is 45.
_BOUND_WORDS = frozenset((("at", "least"), ("at", "most")))
# In `\\text{}` after a number (a box), the narrower set of words that change its value alone ("2 million", "3
# dozen", "20 percent"); a count noun or a comparative there ("3 times as many", "6 more cookies", "12 quarters")
# stays in `\\text{}`, which math-verify drops, leaving the number.
_SCALE_WORDS = frozenset((
    "hundred", "thousand", "million", "billion", "trillion", "dozen", "score", "gross", "hundreds", "thousands",
    "millions", "billions", "trillions", "dozens", "scores", "percent"))
# ... words that do so as the last word ("3 squared", but "3 squared units" is 3) ...
_POWER_WORDS = frozenset(("squared", "cubed", "factorial"))
# ... and words that do so joined to another number there ("2 and 3", "2 to 1", "5 and a half"), in brackets only
# "and" ("3 (and 4)"; "40 (to 2 decimal places)" is 40, "7 (mod 12)" 7).
_JOINING_VALUE_WORDS = frozenset(("and", "plus", "minus", "to"))
# Spelled-out whole numbers up to 999 ("seven", "twenty-one", "three hundred and five"), read as digits.
_UNIT_WORDS = {word: n for n, word in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"))}
_TENS_WORDS = {word: 10 * n for n, word in enumerate(
    ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"), start=2)}
# LaTeX spaces that may separate thousands groups: "1\\,000", "1\\ 000", "1~000".
_GROUP_SPACES = ("\\,", "\\ ", "\\;", "\\:", "\\!", "~")
# Words after a spelled number that change its value: "two thirds", "one million", "zero point five", "twenty one".
_CHANGE_A_SPELLED_NUMBER = (_VALUE_WORDS | _FRACTION_WORDS | _ORDINALS | frozenset(_UNIT_WORDS)
                            | frozenset(_TENS_WORDS) | frozenset(("point", "decimal")))
_SENTENCE_PUNCTUATION = ".,;:!?"
# A heading line holds at most this much before "answer" ("### **Final "); longer, the word is inside prose.
_MAX_HEADING_PREFIX = 16
# Markdown and spacing that may surround "answer" in a label ("**Answer**:", "### Final Answer").
_MARKUP = " \t*_#"
# What may wrap an answer in prose besides white space: markdown bold, math delimiters.
_WRAPPERS = "*$"
# Special tokens rendered into the text (`<|im_end|>`, `<|end|>`) end an answer.
_SPECIAL_TOKEN_START = "<|"
# A whole answer in scientific notation ("1e-3") is written out as a decimal when |exponent| is at most this; a
# larger one stays as it is rather than becoming a long run of digits.
_MAX_WRITTEN_OUT_EXPONENT = 99
_SCIENTIFIC_CHARS = frozenset("0123456789.eE+-")
# Text-mode commands read as `\\text{...}` (`_as_text_command`).
_TEXT_COMMANDS = ("\\textrm{", "\\mbox{")
# A logical "or", alone in braces (of a command: "\\mathrel{\\lor}") or not, joins the alternatives of a hedge ("5
# \\lor 6", "5 {\\lor} 6"), which math-verify would read as its last one.
_LOGICAL_OR = re.compile(r"(?:\\[A-Za-z]+)?\{\s*(?:\\(?:lor|vee)(?![A-Za-z])|\u2228)\s*\}"
                         r"|\\(?:lor|vee)(?![A-Za-z])|\u2228")
# Unicode math a LaTeX parser does not know, as LaTeX (a command ends in a space so that a letter after it stays
# apart: "∞x" -> "\\infty x"). "√(" becomes plain "sqrt(", which the parser reads with its argument.
_UNICODE_MATH = (("√(", "sqrt("), ("√", "\\sqrt "), ("∞", "\\infty "), ("·", "\\cdot "), ("⋅", "\\cdot "),
                 ("≠", "\\neq "), ("≥", "\\geq "), ("≤", "\\leq "))
# ... and a degree sign, which text mode ("25 \\text{ °C}") keeps as it is.
_DEGREE_SIGN = ("°", "^{\\circ}")
# An operand of a logical "or" that makes it a hedge is a value, perhaps of one variable ("x = ", "x_1 > ", "a_{n} =
# ", "y' = ", "xy = "), with no letters but in LaTeX commands of no logic ("5", "\\sqrt{4}", "5\\%", "x = -6.5");
# between other operands ("\\neg p \\lor q", "A \\vee B") it is logic (`_is_hedged_value`).
_VALUE_OF = re.compile(r"[A-Za-z]+(?:_(?:\{\w*\}|\w))?'*\s*"
                       r"(?:[=<>\u2260\u2264\u2265]|\\(?:le|ge|leq|geq|neq|ne|lt|gt)(?![A-Za-z]))")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_LOGIC_COMMANDS = frozenset(("\\neg", "\\lnot", "\\top", "\\bot", "\\land", "\\wedge", "\\to", "\\implies", "\\iff",
                             "\\rightarrow", "\\Rightarrow", "\\leftrightarrow", "\\Leftrightarrow"))


def solution_section(completion: str, close_tag: str = THINK_CLOSE, open_tag: str = THINK_OPEN) -> str:
  """The text after the last `close_tag`; the whole completion when it has neither tag; "" when the last
  `open_tag` comes after the last `close_tag` (an unclosed think block holds no answer yet)."""
  cut = completion.rfind(close_tag)
  if completion.rfind(open_tag) > cut:
    return ""
  return completion if cut < 0 else completion[cut + len(close_tag):]


def matching_brace(text: str, open_index: int, max_chars: int) -> Optional[int]:
  """Index of the `}` closing the `{` at `open_index`, or None if it is not closed within `max_chars`."""
  depth = 0
  end = min(len(text), open_index + max_chars + 2)
  i = open_index
  while i < end:
    ch = text[i]
    if ch == "\\":
      i += 2  # `\{`, `\}` and `\\` are escapes, not grouping
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def last_boxed(text: str, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> Optional[str]:
  """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), or None."""
  box = _last_box(text, 0, len(text), max_chars)
  return None if box is None else box[2]


def last_boxes(text: str, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> list[str]:
  """Contents of the last complete box and of the boxes right before it that are joined to it by ",", "and" or
  "or" ("$\\boxed{2}$ and $\\boxed{3}$" -> ["2", "3"]: one answer, a set or a hedge), in order; [] when none."""
  return _chained_boxes(text, max_chars, alternative=False)[0]


def _chained_boxes(text: str, max_chars: int, alternative: bool = True) -> tuple[list[str], str, list[str]]:
  """`last_boxes`, with `alternative` the math or number that "or" joins after the last box as one more
  (`_alternative_after_box`), how to join them: `HEDGE_JOINER` when "or" joins any two (a hedge), else ", " (a set),
  and the unit word after each (`_units_after`: "\\boxed{\\$0.75} or \\boxed{75} cents")."""
  box = _last_box(text, 0, len(text), max_chars)
  if box is None:
    return [], ", ", []
  after = _alternative_after_box(text, box, max_chars) if alternative else None
  boxes, hedge = ([box], False) if after is None else ([after, box], True)
  while len(boxes) < _MAX_JOINED_ANSWERS:
    start = boxes[-1][0]
    # Only a box that can end within the gap is looked for, so the chain stays a bounded scan.
    before = _last_box(text, max(0, start - max_chars - _MAX_JOIN_GAP_CHARS - 16), start, max_chars)
    # "\\boxed{3} dozen, or \\boxed{36} eggs" may restate one quantity in other words, as math does (`_math_chain`).
    if before is None or not _joins_answers(text[before[1]:start]) or (
        _another_noun(text, text[before[1]:start], boxes[-1][1])):
      break
    hedge = hedge or _joined_by_or(text[before[1]:start])
    boxes.append(before)
  boxes.reverse()
  contents = [content for _, _, content in boxes]
  inside = [_unit_in_box(content) for content in contents] if hedge else None
  if inside and len({UNIT_SIZES[u.lower()][0] for u in inside if u}) > 1:
    inside = None  # "3 hours or 3 cm" restates no one quantity: the values alone are compared, as given
  return contents, HEDGE_JOINER if hedge else ", ", _units_after(text, [b[1] for b in boxes], contents, hedge, inside)


def _alternative_after_box(text: str, box: tuple[int, int, str], max_chars: int) -> Optional[tuple[int, int, str]]:
  """(start, end, content) of the math or plain number after `box` that "or" joins to it as a box would be
  (`_joins_answers`: "$\\boxed{5}$ or $6$", "\\boxed{5} (or 6)", "\\boxed{5}, or maybe $6$"), so a hedge cannot
  escape the hedge rule by leaving its alternative unboxed; None where none is, or where `_math_chain` would keep
  them apart ("$\\boxed{3}$, or equivalently $n \\equiv 3$", "\\boxed{3} dozen, or 36 eggs")."""
  end = box[1]
  start = end + len(text[end:end + 8]) - len(text[end:end + 8].lstrip(" "))
  # The box's own math closes first: "$\\boxed{5}$ or $6$".
  start += next((len(c) for c in ("$$", "$", "\\)", "\\]") if text.startswith(c, start)), 0)
  while start < len(text) and start - end <= _MAX_JOIN_GAP_CHARS and not (
      text[start] == "$" or text[start].isdigit() or text.startswith(("\\(", "\\["), start)):
    start += 1
  if start < len(text) and text[start].isdigit() and start > end and text[start - 1] in "-\u2212":
    start -= 1  # "(or -6)": the sign is the number's
  gap = text[end:start]
  if start >= len(text) or text[start - 1] == "." or not (_joins_answers(gap) and _joined_by_or(gap)):
    return None
  span = _inline_math_at(text, start) if text[start] in "$\\" else _plain_number_at(text, start)
  if span is None or len(span[0]) > max_chars or (_is_relation(span[0]) and not _is_relation(box[2])) or (
      _is_condition_and_equation(box[2], span[0]) or _in_unknown_unit(text, gap, span[1], any_word=True)
      or _another_noun(text, gap, span[1])):
    return None
  return start, span[1], span[0]


def _plain_number_at(text: str, start: int) -> Optional[tuple[str, int]]:
  """The plain or mixed number at text[start] that no math goes on from ("6" in "(or 6).", "or 6 apples"; not "6x",
  "6 + 1", "6\\%"), a mixed number as its fraction, and where it ends; None otherwise."""
  head = text[start:start + BARE_ANSWER_MAX_CHARS]
  end = _whole_number_end(head)
  touching, after = head[end:end + 1], head[end:].lstrip(" ")[:1]
  if not end or (touching and (touching.isalnum() or touching == "%")) or (
      after and (after.isdigit() or after in _MATH_MARKS)):
    return None
  mixed = _mixed_number(head)
  return head[:end].replace(",", "") if mixed is None else mixed[0], start + end


def _unit_in_box(content: str) -> Optional[str]:
  """The unit word of `UNIT_SIZES` that a box holds after its number ("5\\textrm{ km}", "\\text{2 hours}"), which
  `_number_in_box` drops; None when it holds none or keeps it."""
  unwrapped = _without_text_command(_as_text_command(content.strip()))
  end = _whole_number_end(unwrapped)
  words = unwrapped[end:].split()
  if not end or len(words) != 1 or words[0].lower() not in UNIT_SIZES:
    return None
  mixed = _mixed_number(unwrapped)
  number = unwrapped[:end].replace(",", "") if mixed is None else mixed[0]
  return words[0] if _number_in_box(content.strip()) == number else None


def _last_box(text: str, lo: int, hi: int, max_chars: int) -> Optional[tuple[int, int, str]]:
  """(start, end, content) of the last complete box starting in text[lo:hi], trying `_MAX_BOX_TRIES` from the end."""
  for _ in range(_MAX_BOX_TRIES):
    start, command = max((text.rfind(c, lo, hi), c) for c in _BOX_COMMANDS)
    if start < 0:
      return None
    hi = start
    i = start + len(command)
    while i < len(text) and i < start + len(command) + 8 and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] == "{":
      close = matching_brace(text, i, max_chars)
      if close is not None:
        return start, close + 1, text[i + 1:close]
    elif i > start + len(command) and i < len(text) and text[i].isalnum():
      # `\boxed 5`: TeX takes the next token as the argument.
      end = i
      while end < len(text) and end - i < max_chars and not text[end].isspace() and text[end] not in "$.,;":
        end += 1
      return start, end, text[i:end]
  return None


def _joins_answers(gap: str) -> bool:
  """Whether `gap`, the text between two answers, makes them one: at most `_MAX_JOIN_GAP_CHARS` long without its
  layout (`_GAP_LAYOUT`), and either holding no math and, of words, only "or" with at most two of `_OR_ADVERBS`
  after it and the first answer's unit or noun before it, on any lines (" (or ", ", or maybe ", "\\quad \\text{, or }
  \\quad", "\\n or just ", " hours, or ": a hedge, `_joined_by_or`), or holding only "," and "and" on one line ("$
  and $", ", ": a set)."""
  if len(_GAP_LAYOUT.sub("", gap)) > _MAX_JOIN_GAP_CHARS:
    return False
  words = _gap_words(gap)
  if "or" in words:
    letters = [w for w in words if w.isalpha()]
    # The first answer's unit or noun ("$5$ km, or $6$ km", "$5$ apples or $6$ apples"; `_another_noun` says which
    # nouns join): a unit's alternative is compared as a quantity (`_units_after`), a noun's as a value.
    if len(letters) > 1 and letters[0] != "or" and letters[1] == "or":
      letters = letters[1:]
    return (not any(w[0] in _GAP_MATH for w in words) and letters[0] == "or" and len(letters) <= 3
            and all(w in _OR_ADVERBS for w in letters[1:]))
  return "\n" not in gap and bool(words) and all(w in _SET_WORDS for w in words)


def _joined_by_or(gap: str) -> bool:
  """Whether "or" stands in `gap`, text that joins two answers (`_joins_answers`): they are a hedge."""
  return "or" in _gap_words(gap)


def _gap_words(gap: str) -> list[str]:
  """The words of `gap` (`_GAP_WORD`), lower-case, without its layout (`_GAP_LAYOUT`), the words in text mode kept;
  `\\lor` reads as "or"."""
  return _GAP_WORD.findall(_GAP_LAYOUT.sub(" ", _LOGICAL_OR.sub(" or ", gap)).lower())


def _sentence(text: str, max_chars: int) -> str:
  """Text up to the end of its first line or sentence (a period followed by white space), at most max_chars."""
  # "Final answer:\n42": the answer may start on the next line, so leading newlines go before the line end is found.
  head = text[:max_chars + 1].lstrip(" \t\n:*")
  cut = head.find(_SPECIAL_TOKEN_START)  # "18 dollars.<|im_end|>": a special token ends the answer
  head = head if cut < 0 else head[:cut]
  # Math after a filler word ("therefore $8$, and $2$ were returned") is read by `_after_answer_label` as plain text,
  # where its first span is the answer.
  inline_math = _joined_inline_math(head)
  if inline_math is not None:
    return inline_math
  end = len(head)
  for stop in ("\n", ". ", ".\t"):
    found = head.find(stop)
    while found >= 0 and stop != "\n" and _ends_with_abbreviation(head, found):
      found = head.find(stop, found + 1)  # "approx. 18": not the end of the sentence
    if found >= 0:
      end = min(end, found)
  return head[:end]


def _ends_with_abbreviation(text: str, end: int) -> bool:
  """Whether text[:end] ends with a whole word of `_ABBREVIATIONS` ("approx", not "Africa")."""
  tail = text[max(0, end - 8):end]
  for word in _ABBREVIATIONS:
    if tail.endswith(word) and not (len(tail) > len(word) and tail[-len(word) - 1].isalnum()):
      return True
  return False


def _first_inline_math(text: str) -> Optional[str]:
  """`$x$` / `\\(x\\)` / `\\[x\\]` at the very start of `text`: its content; None otherwise."""
  span = _inline_math_at(text, 0)
  return None if span is None else span[0]


def _joined_inline_math(text: str) -> Optional[str]:
  """The math opening `text` and the math joined to it by ",", "and" or "or" as one answer: "$5$ or $6$." -> "5 or
  6" (a hedge, which matches no single gold), "$x = 2$ and $x = 3$" -> "x = 2, x = 3" (a set, which matches the
  gold "2, 3"); None when `text` does not open with math.

  Alternatives joined by "or" always stay joined: a hedge, or a restatement ("$\sqrt{2}$ or $1.414$"), is several
  answers, each of which the verifier checks. Answers joined by "and" or "," stay joined where they end the
  sentence or clause, or a bracket, colon, dash, "respectively" or a plural verb ("are the solutions") follows; where
  prose goes on from the last ("$12$ and $4$ is the remainder", "$8$ and $2$ heads") the first span is the answer."""
  chain = _math_chain(text, 0)
  if chain is None:
    return None
  contents, end, hedge = chain
  if len(contents) > 1 and not hedge and not _ends_answers(text[end:]):
    return contents[0]
  return (HEDGE_JOINER if hedge else ", ").join(contents)


def _math_chain(text: str, start: int) -> Optional[tuple[list[str], int, bool]]:
  """The math at text[start] and the math that ",", "and" or "or" join to it (see `_joined_inline_math`): their
  contents, where the last of them ends, and whether "or" joins any two (a hedge); None when no math starts there."""
  span = _inline_math_at(text, start)
  if span is None:
    return None
  contents, end, hedge, ends = [span[0]], span[1], False, [span[1]]
  while len(contents) < _MAX_JOINED_ANSWERS:
    start = end
    # Up to the next `$`, `\\(` or `\\[`; a command ("\\text{ or }") is part of the gap.
    while start < len(text) and start - end <= _MAX_JOIN_GAP_CHARS and text[start] != "$" and (
        text[start] != "\\" or text[start + 1:start + 2].isalpha()):
      start += 1
    span = _inline_math_at(text, start) if _joins_answers(text[end:start]) else None
    joined_by_or = _joined_by_or(text[end:start])
    # "$12$, and $12 = 3 \cdot 4$": an equation joined to a bare value justifies it, rather than answering again;
    # "since $n > 0$ or $n = 5$": a condition and an equation are no alternatives to each other.
    if span is None or (_is_relation(span[0]) and not _is_relation(contents[0])) or (
        joined_by_or and _is_condition_and_equation(contents[-1], span[0])) or (
        _in_unknown_unit(text, text[end:start], span[1]) or _another_noun(text, text[end:start], span[1])):
      break
    hedge = hedge or joined_by_or
    contents.append(span[0])
    end = span[1]
    ends.append(end)
  units = _units_after(text, ends, contents, hedge)
  return [_with_unit(c, u) for c, u in zip(contents, units)], end, hedge


def _with_unit(math: str, unit: str) -> str:
  """`math` with the `unit` word after it (`_units_after`), a mixed number written as its improper fraction ("2 1/2"
  or "2\\frac{1}{2}" and " hours" -> "5/2 hours"), which the verifier reads whole as a quantity (with a unit after
  it, "2\\frac{1}{2} hours" reads as 2 * 1/2)."""
  if not unit:
    return math
  mixed = _mixed_number(math.strip())
  if mixed is not None and mixed[1] == len(math.strip()):
    return mixed[0] + unit
  latex = _LATEX_MIXED_NUMBER.fullmatch(math.strip())
  if latex is not None and 0 < int(latex.group(3)) < int(latex.group(4)):
    whole, numerator, denominator = (int(latex.group(i)) for i in (2, 3, 4))
    return f"{latex.group(1)}{whole * denominator + numerator}/{denominator}{unit}"
  return math + unit


# "2\\frac{1}{2}", "-3\\tfrac{3}{4}": a whole number and a proper fraction in LaTeX.
_LATEX_MIXED_NUMBER = re.compile(r"(-?)(\d{1,9})\s*\\[dt]?frac\{(\d{1,9})\}\{(\d{1,9})\}")


def _in_unknown_unit(text: str, gap: str, end: int, any_word: bool = False) -> bool:
  """Whether the alternative ending at text[end], joined through the previous answer's unit (`gap`: " km, or "),
  has a unit word of its own that `UNIT_SIZES` lacks ("$5$ km, or $5000$ m"): the two cannot be compared, so the
  alternative is left out and the answer as given stands. With `any_word`, a word that prose follows counts too
  ("\\boxed{2} miles, or $\\frac{1}{2}$ of the trip" restates the box in other words)."""
  letters = [w for w in _gap_words(gap) if w.isalpha()]
  if not letters or letters[0] not in UNIT_SIZES:
    return False
  match = (_NOUN_AFTER if any_word else _WORD_AFTER).match(text, end)
  return bool(match and match.group(1)) and match.group(1).lower() not in UNIT_SIZES


def _another_noun(text: str, gap: str, end: int) -> bool:
  """Whether the first answer's word before "or" in `gap` (no unit of `UNIT_SIZES`; a unit is compared as a
  quantity) and the word after the alternative ending at text[end] may restate one quantity in other words: one of
  them a scale or a share (`_RESTATING_WORDS`: "$3$ dozen, or $36$ eggs", "$25$ percent, or $\\frac{1}{4}$", "$12$
  eggs, or $1$ dozen"), or "of" after the alternative ("$3$ cups, or $\\frac{3}{4}$ of a quart"), so the answers
  stay apart and the later one stands. Counts of one noun, in any plural ("$5$ apples or $6$ apples left", "$1$ box or
  $2$ boxes"), of rival nouns ("$8$ pies or $9$ cakes") or of a noun and nothing ("$5$ cats or $6$") are a hedge."""
  letters = [w for w in _gap_words(gap) if w.isalpha()]
  if len(letters) < 2 or letters[0] == "or" or letters[1] != "or" or letters[0] in UNIT_SIZES:
    return False
  # Any word, though prose follows it ("$6$ apples left").
  match = _NOUN_AFTER.match(text, end)
  after = match.group(1).lower() if match else ""
  if after and _same_noun(after, letters[0]):
    return False
  # "of" after the alternative makes it a share of something ("$3$ cups, or $\\frac{3}{4}$ of a quart").
  return letters[0] in _RESTATING_WORDS or after in _RESTATING_WORDS or after == "of"


# Words by which one count may restate another ("3 dozen" is 36 eggs, "25 percent" a quarter).
_RESTATING_WORDS = _SCALE_WORDS | frozenset(("half", "halves", "quarter", "quarters", "third", "thirds",
                                             "percentage", "pair", "pairs"))
# The word right after an answer, whatever follows it (`_WORD_AFTER` takes a unit, so it rejects "apples left").
_NOUN_AFTER = re.compile(r"[\s$]{0,3}([A-Za-z]+)")
# Plurals that adding "s", "es" or "ies" does not make ("$1$ child or $2$ children").
_IRREGULAR_PLURALS = {"child": "children", "person": "people", "man": "men", "woman": "women", "foot": "feet",
                      "tooth": "teeth", "mouse": "mice", "goose": "geese", "leaf": "leaves", "knife": "knives",
                      "loaf": "loaves", "shelf": "shelves", "wife": "wives", "life": "lives", "half": "halves"}


def _same_noun(a: str, b: str) -> bool:
  """Whether words `a` and `b` are one noun, each singular or plural ("box" and "boxes", "penny" and "pennies")."""
  a, b = a.lower(), b.lower()
  return a == b or b in _plurals(a) or a in _plurals(b)


def _plurals(word: str) -> tuple[str, ...]:
  """The plural forms lower-case `word` may take ("box" -> "boxes", "penny" -> "pennies", "child" -> "children")."""
  irregular = _IRREGULAR_PLURALS.get(word, word)
  return word + "s", word + "es", (word[:-1] + "ies" if word.endswith("y") else word), irregular


# A word or a cent sign right after an answer ("$5$ cm", "$75$¢", "\\boxed{75}$ cents"); a word that another word
# but "or" follows is prose ("$\\$2$ in total", "in change").
_WORD_AFTER = re.compile(r"[\s$]{0,3}(?:([A-Za-z]+)(?![A-Za-z]| {1,3}(?!or(?![A-Za-z]))[A-Za-z])"
                         r"|\u00a2|\\(?:text)?cent(?![A-Za-z]))")


def _units_after(text: str, ends: list[int], contents: list[str], hedge: bool,
                 inside: Optional[list[Optional[str]]] = None) -> list[str]:
  """" <unit>" for each alternative of a hedge, ending at `ends`, that a unit word of `UNIT_SIZES` (or a cent sign:
  " cents") follows, where each has one or is a price ("$2.5$ hours, or $150$ minutes", "$\\$0.75$, or $75$¢"), for
  the verifier to compare them as one quantity; "" for each otherwise ("$3$ hours or $4$" is a hedge of values).
  `inside`: a box's own unit word (`_unit_in_box`), taken where none follows the box."""
  matches = [_WORD_AFTER.match(text, end) for end in ends]
  words = [m and ("cents" if m.group(1) is None else m.group(1)) for m in matches]
  words = [w if w and w.lower() in UNIT_SIZES else u for w, u in zip(words, inside or [None] * len(words))]
  words = [w if w and w.lower() in UNIT_SIZES else None for w in words]
  if hedge and any(words) and all(w or _is_price(c) for w, c in zip(words, contents)):
    return ["" if w is None else " " + w for w in words]
  return [""] * len(contents)


def _is_price(math: str) -> bool:
  return math.lstrip("-").startswith("\\$")


_ENDING_WORDS = frozenset(("respectively", "resp", "are", "were"))


def _ends_answers(rest: str) -> bool:
  """Whether `rest`, the text after answers joined by "and" or ",", ends them: nothing; or closing brackets and
  then the end, a line break, punctuation, an opening bracket, a colon, a dash, a special token; or "respectively"
  or a plural verb ("$2$ and $3$ are the roots")."""
  rest = rest.lstrip(" \t)]}*\\_")
  if not rest or rest[0] in ".,;!?\n(:\u2014\u2013-\"'" or rest.startswith("<|"):
    return True
  first = rest.split(None, 1)[0].lower().strip(".,;:!?*_")
  return first in _ENDING_WORDS


_RELATION = re.compile(r"[=<>\u2260\u2264\u2265\u2248]|\\(?:le|ge|leq|geq|leqslant|geqslant|leqq|geqq|neq|ne|approx"
                       r"|lt|gt|equiv|sim|simeq|lesssim|gtrsim|ll|gg)(?![A-Za-z])")


def _is_relation(math: str) -> bool:
  """Whether `math` states a relation (`x = 2`, `a \le b`; not `\left(`)."""
  return _RELATION.search(math) is not None


_INEQUALITY = re.compile(r"[<>\u2260\u2264\u2265]|\\(?:le|ge|leq|geq|leqslant|geqslant|leqq|geqq|neq|ne|lt|gt|ll|gg)"
                         r"(?![A-Za-z])")


def _is_condition_and_equation(a: str, b: str) -> bool:
  """Whether one of two math spans is an inequality (`n > 0`, `x \\neq 1`) and the other an equation (`n = 5`)."""
  a_inequality, b_inequality = _INEQUALITY.search(a) is not None, _INEQUALITY.search(b) is not None
  return a_inequality != b_inequality and _is_relation(a) and _is_relation(b)


def _inline_math_at(text: str, start: int) -> Optional[tuple[str, int]]:
  """`$x$` / `\\(x\\)` / `\\[x\\]` starting at text[start]: its content and where it ends; None otherwise."""
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if text.startswith(left, start):
      close = text.find(right, start + len(left))
      while left == "$" and close > 0 and _escaped(text, close):  # "$\$20$": an escaped dollar sign is content
        close = text.find(right, close + 1)
      if close > start + len(left):
        content = text[start + len(left):close]
        if left == "$" and _is_priced_text(content):
          return None
        return content, close + len(right)
      return None
  return None


def _is_priced_text(content: str) -> bool:
  """Whether `content`, found between two `$`, opens with a price rather than being math: "$13. She spent $5" and
  "$13 (each).\\nShe spent 5 $" run from a number across a sentence or line into prose, up to the next dollar sign.
  Math that opens with a number and goes on over a line or after a period ("$3 +\\n4 = 7$", "$1. \\; 42$") has an
  operator, `=` or LaTeX there instead."""
  end = _number_end(content) if content[:1].isdigit() else 0
  cut = min((i for i in (content.find("\n", end), content.find(". ", end)) if i >= 0), default=-1)
  if not end or cut < 0 or any(c in _MATH_MARKS for c in content[end:cut]):
    return False
  word = (content[cut + 1:cut + 1 + _MAX_CONNECTIVE_CHARS].split() or [""])[0].rstrip(_SENTENCE_PUNCTUATION)
  return not word or (len(word) >= 2 and word.isalpha() and word.lower() not in _MATH_WORDS)


# What in the words between a number and the end of its line or sentence makes them math, not a price's prose.
_MATH_MARKS = frozenset("=+-*/^\\{}<>_\u00d7\u00f7\u00b7")


def _after_answer_label(text: str, max_chars: int) -> tuple[Optional[str], bool]:
  """What follows the last "answer is", "answer:" or answer heading, in prose or markdown: "the answer is 4",
  "Answer: 4", "**Answer:** 4", "**Answer**: 4", and "**Final Answer**" / "### Answer" alone on a line with the
  answer below it. Other uses of the word ("the answer matches") are passed over; one scan, each use checked in
  bounded time.

  A label followed by prose rather than an answer ("... the answer is correct", "we verify the answer: plug in")
  gives way to the last label before it that is followed by an answer, so a check after the answer does not
  replace it; a sentence that a label introduces as the answer gives its one number (`_label_answer`: "Answer:
  Janet makes $18 per day." -> "18"); when every label is followed by prose, this is the last label's that is
  followed by anything (`extract_answer` then prefers the solution's last math, and takes the prose only when there
  is none: "the answer is even"). A number in words or a bare "yes" / "no" is an answer, not prose
  (`_is_worded_answer`).

  Returned with whether the label that decides is refused: a sentence it introduces bounds, hedges or negates its
  number or holds two ("Answer: Janet makes at least $18."), so no answer stands in, not even the last math, which
  would be a number of that same sentence."""
  lowered = text.lower()
  label_ends = collections.deque(maxlen=_MAX_LABEL_TRIES)
  start = lowered.find(_ANSWER_WORD)
  while start >= 0:
    end = _label_end(text, lowered, start)
    if end is not None:
      label_ends.append(end)
    start = lowered.find(_ANSWER_WORD, start + 1)
  if not label_ends:
    return None, False
  ends = list(reversed(label_ends))
  candidates = [_plain_answer(_without_leading_filler(_sentence(text[end:end + max_chars + 1], max_chars)))
                for end in ends]
  written = [(c, end) for c, end in zip(candidates, ends) if clean_answer(c)]
  answer = next((a for a in (_label_answer(text, c, end) for c, end in written) if a is not None), None)
  if answer == "":
    return None, True
  return (answer if answer is not None else written[0][0] if written else candidates[0]), False


def _label_answer(text: str, candidate: str, end: int) -> Optional[str]:
  """A label's candidate (the label ending at text[end]) when it is an answer rather than prose; for a sentence of
  prose that the label introduces as the answer ("Answer: Janet makes $18 per day.", a heading, or a capitalised
  subject after "answer is"), its one number (`_sole_number`), as the sentence says it in words, or "" where the
  sentence refuses its numbers ("Janet makes at least $18", "$18 or $19"); None otherwise ("the answer is right for
  3 cases" checks an answer, and gives way to an earlier label)."""
  if not _starts_with_prose(candidate):
    return candidate
  introduced = text[end - 1:end] == ":" or text[end:end + 1] in (":", "\n", "")
  return _sole_number(candidate) if introduced or candidate.lstrip(" \t*")[:1].isupper() else None


def _plain_answer(candidate: str) -> str:
  """A label's plain-text sentence cut to its answer (math in `$...$` is left as it is): markdown bold closed
  inside it dropped ("**18** dollars"), a trailing explanation cut ("5, since 2 + 3 = 5", "12 (3 boxes of 4)",
  "42; we are done", "5, the smallest such number", "5 — the smallest"), a hedge in parentheses kept as an
  alternative ("2 (or 3)" -> "2 or 3", which matches no single answer), and a number followed only by words taken
  alone ("1,200 people" -> "1200", "18 km/h", "5 m/s", "5 cm^2" -> "18", "5", "5") unless the first word changes its
  value ("2 million", "12 out of 20", "3 dozen", "2 and 3")."""
  if candidate.lstrip().startswith(("$", "\\(", "\\[")):
    return candidate
  return _number_before_words(_without_explanation(_without_bold(candidate)), compound_units=True)


def _without_bold(text: str) -> str:
  """Drops the `**` that open or close markdown bold inside `text`; `x**2` and `2 ** 3` (powers) stay."""
  last = text.rfind("**")
  out, i = [], 0
  while i < len(text):
    if text.startswith("**", i):
      before = text[i - 1] if i else " "
      after = text[i + 2] if i + 2 < len(text) else " "
      closing = not before.isspace() and (after.isspace() or after in _SENTENCE_PUNCTUATION + ")")
      opening = before.isspace() and not after.isspace() and after != "*" and i + 2 <= last - 1
      if closing or opening:
        i += 2
        continue
    out.append(text[i])
    i += 1
  return "".join(out)


def _is_prose_word(word: str) -> bool:
  word = word.strip(_SENTENCE_PUNCTUATION)
  return len(word) >= 2 and word.isalpha() and word.islower() and word not in _MATH_WORDS


def _without_explanation(text: str) -> str:
  """`text` up to a trailing explanation: ", since ..." or " because ..." (a connective), "; ..." before prose, a
  note in prose with no number after a leading number (", the ...", " — ...", ": ...": `_opens_note`), a
  parenthetical holding a prose word or only arithmetic after a number ("12 (3 boxes of 4)", "18 (9 * 2)"); a hedge
  in brackets "(or 3)", "[maybe 3]" keeps its alternative when that is a plain number (see `_plain_answer`).
  One pass."""
  # Where a bracket right after a leading plain number would open ("18 (9 * 2)"): found once, so the scan stays
  # linear however many brackets follow.
  number_end = _number_end(text)
  after_number = number_end + len(text[number_end:]) - len(text[number_end:].lstrip(" ")) if number_end else -1
  # A note after a leading number holds no other number, which could be a rival value ("5, the answer to part 2").
  notes_from = _numbers_end(text) if number_end else len(text)
  pairs = _bracket_pairs(text)
  depth, i = 0, 0
  while i < len(text):
    ch = text[i]
    close = pairs.get(i) if ch in _BRACKETS and depth == 0 and i > 0 else None
    if close is not None:  # an unclosed one ("[2, 5)", an interval) is counted below like any other bracket
      words = text[i + 1:close].split()
      hedged = _hedged(text[:i], words)
      if hedged is not None:
        return hedged
      if text[i - 1] == " " and (any(map(_is_prose_word, words))
                                 or (i == after_number and words and _is_arithmetic(text[i + 1:close]))):
        return text[:i].rstrip()
      i = close + 1
      continue
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth = max(0, depth - 1)
    elif depth == 0 and i >= notes_from and _opens_note(text, i):
      return text[:i].rstrip(" ,")  # "5, the smallest such number", "5 — the smallest", "5: the smallest"
    elif depth == 0 and ch in ", " and text[i + 1:i + 2] == (" " if ch == "," else text[i + 1:i + 2]):
      gap = 2 if ch == "," else 1
      next_word = text[i + gap:i + gap + _MAX_CONNECTIVE_CHARS].split(" ", 1)[0].lower().rstrip(",")
      if next_word in (_CONNECTIVES if ch == "," else _CLAUSE_WORDS):
        return text[:i].rstrip(" ,")
    elif depth == 0 and ch == ";" and text[i + 1:i + 2] in ("", " ") and (
        i + 2 >= len(text) or _is_prose_word(text[i + 2:i + 2 + _MAX_CONNECTIVE_CHARS].split(" ", 1)[0])):
      return text[:i].rstrip()  # "42; we are done", not "x = 1; y = 2"
    i += 1
  return text


_BRACKETS = {"(": ")", "[": "]"}  # not "{", a LaTeX group ("\\text{ or }")


def _opens_note(text: str, i: int) -> bool:
  """Whether a note in prose opens at text[i] (`_NOTE_SEPARATORS` and then "a", "an" or a lower-case word not of
  `_NOT_A_NOTE`)."""
  sep = next((s for s in _NOTE_SEPARATORS if text.startswith(s, i)), None)
  if sep is None:
    return False
  word = text[i + len(sep):i + len(sep) + _MAX_CONNECTIVE_CHARS].split(" ", 1)[0].rstrip(_SENTENCE_PUNCTUATION)
  return word in ("a", "an") or (_is_prose_word(word) and word not in _NOT_A_NOTE)


def _numbers_end(text: str) -> int:
  """Where the last number of `text`, in digits or in words ("six", "a dozen", "half", but not "one": "the only
  one"), ends."""
  end = max(text.rfind(d) for d in "0123456789") + 1
  for match in _GAP_WORD.finditer(text, end):
    word = match.group(0).lower()
    if word != "one" and (word in _UNIT_WORDS or word in _TENS_WORDS or word in _COUNT_WORDS):
      end = match.end()
  return end


# Words that are a value alone, so a note holding one may be a rival answer ("5, a dozen if we count twice").
_COUNT_WORDS = _SCALE_WORDS | _FRACTION_WORDS | frozenset((
    "half", "quarter", "quarters", "couple", "pair", "pairs", "twice", "double", "triple", "thrice"))


def _hedged(before: str, words: list[str], keep_math: bool = False) -> Optional[str]:
  """An answer `before` a bracket holding `words` that open with a hedge: "2 (or 3)", "3/4 (or 0.75 as a decimal)",
  "5(or 6)", "12 (or thirteen)" -> "2 or 3", "12 or 13" (two answers, which match no single gold unless they restate
  one value: the verifier decides), "5 (or more)" -> "5 or more" (a bound, which matches no gold); the alternative
  dropped when it is not a plain number ("1/2 (or 50%)" -> "1/2"), or with `keep_math` (a box) only when it is words
  ("12 (or as computed above)" -> "12", but "x = 2 (or x = 3)" -> "x = 2 or x = 3", "1/2 (or 50\\% as a
  percentage)" -> "1/2 or 50\\%"); None when the bracket holds no hedge."""
  first = 0  # the hedge words at the start, counted without slicing (the scan stays linear)
  while first < len(words) and words[first].lower().strip(",") in _HEDGES:
    first += 1
  if not first:
    return None
  other, before = _alternative(words[first:], keep_math), _without_text_command(before.rstrip())
  if other and _number_end(other) == len(other):
    # With a unit word on each side the two may restate one quantity ("150 minutes (or 2.5 hours)": the verifier
    # converts them); an alternative's word that is no unit ("13 if we count ...", "9 cakes") goes, and a unit word
    # on one side only, so that "12 apples (or 13)" stays a hedge between values.
    unit = _word_after_number(words[first:])
    number = _number_before_words(before, _MIN_UNIT_CHARS_IN_MATH if keep_math else 2)
    in_cents = _is_price(before) and unit.lower() in ("cent", "cents")  # "\\$1.50 (or 150 cents)"
    # A mixed number alone ("1 1/2") differs from its fraction but has no word after it.
    mixed = _mixed_number(before)
    worded = number != before and not (mixed and not before[mixed[1]:].strip())
    if (worded or in_cents) and unit.lower() in UNIT_SIZES:
      other += " " + unit
      # "1 1/2 feet" -> "3/2 feet": the verifier reads a quantity's number whole, as a parser reads "2 1/2" as 2 * 1/2.
      before = before if mixed is None else mixed[0] + before[mixed[1]:]
    else:
      before = number
  return before + (HEDGE_JOINER + other if other else "")


def _word_after_number(words: list[str]) -> str:
  """The word after the plain or mixed number that `words` open with ("2.5 hours", "2 1/2 hours" -> "hours"); ""
  when they open with no number or it ends them."""
  pair = " ".join(words[:2])
  mixed = _mixed_number(pair)
  if mixed is not None and mixed[1] == len(pair):
    return words[2] if len(words) > 2 else ""
  return words[1] if len(words) > 1 and _number_end(words[0]) == len(words[0]) else ""


def _alternative(words: list[str], keep_math: bool) -> Optional[str]:
  """A hedge's alternative, from the `words` after its hedge words (see `_hedged`); None where it is dropped."""
  if not words:
    return None
  bound = words[0].lower().strip(_SENTENCE_PUNCTUATION)
  # "more precisely 5.2" refines the answer rather than bounding it.
  if bound in _COMPARATIVES and not (len(words) > 1 and words[1].lower().endswith("ly")):
    return bound
  other = _number_before_words(_spelled_number(" ".join(words)))
  if _number_end(other) == len(other):
    return other
  if not keep_math or _is_prose_word(other.split()[0]):
    return None
  # "50\\% as a percentage", "13, if we include the endpoint": the math, without the note in words after it.
  head, *notes = other.split()
  return head.rstrip(",;:") if all(w.isalpha() for w in notes) else other


# A hedge's alternative that is one of these bounds the answer ("5 (or more)"), so it matches no gold.
_COMPARATIVES = frozenset(("more", "less", "fewer", "higher", "lower", "greater", "smaller", "larger", "above",
                           "below", "over", "under"))
# What opens a note after a leading number ("5, the smallest such number", "5 — the smallest", "5: the smallest").
_NOTE_SEPARATORS = (", ", " \u2014 ", " \u2013 ", ": ")
# First words after one that keep the rest part of the answer: a hedge, a bound, a condition or an exception, or
# another value ("5, or more", "5, maybe 6", "5, at least", "5, tops", "5 — or 6", "5, and more", "5 — unless Tom
# counts", "5, but 6 if ...").
_NOT_A_NOTE = _HEDGES | _OR_ADVERBS | _VALUE_WORDS | _COMPARATIVES | frozenset((
    "at", "up", "give", "either", "minimum", "maximum", "min", "max", "tops", "most", "least", "probably", "likely",
    "unless", "but", "except", "if", "when", "assuming", "provided", "supposing", "though", "although", "whereas"))


def _without_box_hedge(answer: str) -> str:
  """A boxed (or gold) answer ending in a bracket that holds a hedge, read as a label's (`_hedged`), though an
  alternative that is math stays ("5 (or 6)" -> "5 or 6", "\\sqrt{2} (or \\sqrt{3})" -> "\\sqrt{2} or \\sqrt{3}",
  "1/2 (or 50\\%)" -> "1/2 or 50\\%", a restatement the verifier recognises); a bracket inside a group
  ("\\sqrt{2 (or 3)}") or inside another bracket stays."""
  if answer[-1:] not in ")]":
    return answer
  opener = next((i for i, close in _bracket_pairs(answer).items() if close == len(answer) - 1), 0)
  if opener == 0 or answer.count("{", 0, opener) != answer.count("}", 0, opener):
    return answer
  hedged = _hedged(answer[:opener], answer[opener + 1:-1].split(), keep_math=True)
  return answer if hedged is None else hedged


def _bracket_pairs(text: str) -> dict[int, int]:
  """{index of an opening bracket: index of the one closing it} for each kind of `_BRACKETS` (nested ones of its
  kind counted; unclosed ones absent), in one pass."""
  pairs, stacks = {}, {opener: [] for opener in _BRACKETS}
  closers = {closer: opener for opener, closer in _BRACKETS.items()}
  for j, ch in enumerate(text):
    if ch in stacks:
      stacks[ch].append(j)
    elif ch in closers and stacks[closers[ch]]:
      pairs[stacks[closers[ch]].pop()] = j
  return pairs


def _is_arithmetic(text: str) -> bool:
  """Digits, operators and spaces only ("9 * 2", "3 × 4"): a worked check, not part of the answer."""
  return any(c.isdigit() for c in text) and all(c.isdigit() or c in " +-*/×·.=,^" for c in text)


def _without_text_command(answer: str) -> str:
  """`\\text{5 cm}` or `5 \\text{ cm}` as a whole answer -> "5 cm": a number given in text mode, or followed by
  words in it that read as a label's words do (`_reads_as_words`: "5 \\text{ or more}" stays "5 or more" and
  "2 \\text{ million}" "2 million", matching neither 5 nor 2, not the number with the `\\text{}` dropped). Other
  words after a number ("10 \\text{ m/s}") and words alone stay in `\\text{}` (unwrapped, math-verify would read
  "m/s" or "no" as a product of variables, "no" equal to "on")."""
  lead = _whole_number_end(answer)
  rest = answer[lead:].lstrip()
  if not rest.startswith("\\text{") or matching_brace(rest, len("\\text"), len(rest)) != len(rest) - 1:
    return answer
  inner = rest[len("\\text{"):-1].strip()
  if lead and inner:
    unwrapped = answer[:lead] + " " + inner
    return unwrapped if _reads_as_words(unwrapped) else answer
  return inner if not lead and _number_end(inner) else answer


def _reads_as_words(answer: str) -> bool:
  """Whether a number and the words after it, taken out of `\\text{}`, read as a label's plain text: as the number
  alone ("5 apples", "5 cm"), as a hedge or a bound ("5 (or 6)", "5 or more", "5 at least"), or as words that
  change the value alone (`_changes_value_alone`: "2 million", "3 eighths", "2 and 3", "3 (and 4)"), which the
  `\\text{}` must not hide. A unit of one letter or with a slash ("10 m/s", "5 N"), a degree sign ("25 °C"), a note
  ("4 (rounded)", "1200 meters (or 3 laps)") or other words ("3 times as many", "6 more cookies", "7 of them") do
  not: math-verify drops the `\\text{}` around them, and would read them unwrapped as a product or not at all."""
  words = answer[_whole_number_end(answer):].lower().split()
  if words[0].strip(",").lstrip("([") in _HEDGES or _changes_value_alone(words):
    return True
  number = _number_before_words(answer)
  return _number_end(number) == len(number)


def _changes_value_alone(words: list[str]) -> bool:
  """Whether `words`, after a number in `\\text{}`, change its value alone: a scale or "percent" (`_SCALE_WORDS`),
  a fraction ("3 eighths"), an ordinal or a power as the last word ("1 fourth", "3 squared"; not "45 fourth
  graders", "3 squared units"), a bound ("at least"), or a word joining another number ("2 and 3", "3 (and 4)", "2
  to 1", "5 and a half")."""
  word = words[0].strip(",.")
  first = word.lstrip("([")
  alone = first in _FRACTION_WORDS or ((first in _ORDINALS or first in _POWER_WORDS) and len(words) == 1)
  bound = tuple(w.strip(".,") for w in words[:2]) in _BOUND_WORDS
  if first in _JOINING_VALUE_WORDS and len(words) > 1 and (first == "and" or first == word):
    second = words[1].strip(",.)]")
    part = second in ("a", "an", "one") and len(words) > 2 and words[2].strip(",.)]") in _ORDINALS
    return part or _number_end(second) > 0 or second in _UNIT_WORDS
  return alone or bound or first in _SCALE_WORDS


def _number_in_box(answer: str) -> str:
  """A boxed (or gold) answer's number followed by words: `\\text{30 pts}` or `30 \\text{ pts}` (text mode: words)
  -> 30, "18 dollars" -> 18, but "2 xy" (math: a product) stays; a hedge in brackets is two answers, as after a
  label ("5 (or 6)" -> "5 or 6", `_without_box_hedge`); `\\textrm{}` and `\\mbox{}` read as `\\text{}`."""
  answer = _as_text_command(answer)
  unwrapped = _without_text_command(answer)
  min_word_chars = 2 if unwrapped is not answer else _MIN_UNIT_CHARS_IN_MATH
  return _number_before_words(_without_box_hedge(unwrapped), min_word_chars)


def _as_text_command(answer: str) -> str:
  """`\\textrm{...}` and `\\mbox{...}` written as `\\text{...}`, the one text-mode command math-verify reads (it
  takes `x = 5 \\textrm{ or } x = 6` as x = 6, `\\text{ or }` as a set) and the one this module unwraps."""
  for command in _TEXT_COMMANDS:
    answer = answer.replace(command, "\\text{")
  return answer


def _number_end(text: str) -> int:
  """The end of a plain number opening `text` (a sign, digits with optional thousands groups, a decimal part or
  a /b), 0 when it does not open with one."""
  start = 1 if text[:1] in ("-", "\u2212") else 0
  end = start
  while end < len(text) and text[end].isdigit():
    end += 1
  if end == start:
    return 0
  if end - start <= 3:  # "1,200,000": groups of exactly three digits
    while text[end:end + 1] == "," and text[end + 1:end + 4].isdigit() and not text[end + 4:end + 5].isdigit():
      end += 4
  if text[end:end + 1] in (".", "/") and text[end + 1:end + 2].isdigit():
    end += 1
    while end < len(text) and text[end].isdigit():
      end += 1
  return end


def _whole_number_end(text: str) -> int:
  """The end of the mixed number ("2 1/2") or else of the plain number (`_number_end`) opening `text`, 0 when none."""
  mixed = _mixed_number(text)
  return _number_end(text) if mixed is None else mixed[1]


def _number_before_words(text: str, min_word_chars: int = 2, compound_units: bool = False) -> str:
  """"18 dollars" -> "18", "1,200 people" -> "1200", "2 1/2 cups" -> "5/2": a number followed by words only is that
  number, unless the first word is shorter than `min_word_chars` (a variable: "5 x"; inside math, where "2 xy" is a
  product, 4), math, or changes the value ("2 million", "3 dozen", "12 out of", "3 eighths", "5 at least"). A mixed
  number alone or before words is its improper fraction (the parser would read "2 1/2" as 2 * 1/2). With
  `compound_units` (plain text) a unit per unit or a unit's power counts as a word (`_is_compound_unit`: "5 m/s",
  "5 cm^2" -> "5")."""
  mixed = _mixed_number(text)
  end = mixed[1] if mixed else _number_end(text)
  number = mixed[0] if mixed else text[:end].replace(",", "")
  if mixed and not text[end:].strip():
    return number
  if end == 0 or text[end:end + 1] != " ":
    return text
  words = text[end:].split()
  if not words:  # only white space after the number ("42 " before a line break or a special token): as "42"
    return number if mixed else text[:end]
  compound = [compound_units and _is_compound_unit(w.rstrip(_SENTENCE_PUNCTUATION)) for w in words]
  if not all(c or w.replace("/", "").replace("-", "").replace(".", "").isalpha() for w, c in zip(words, compound)):
    return text  # digits or symbols after the number: an expression, left as it is
  first = words[0].lower().strip(".")
  short = len(first.split("/")[0]) < max(2, min_word_chars) and first not in _SHORT_UNITS and not compound[0]
  if short or _changes_value(words) or first in _MATH_WORDS or _bound_later(words):
    return text
  return number


def _bound_later(words: list[str]) -> bool:
  """Whether a bound or "or so" follows the unit that `words` open with: "18 dollars or more", "18 apples or fewer",
  "18 dollars at least", "5 cm or so" bound or hedge the number, which alone would match its gold; an "or" further on
  ("18 dollars for one or two people") or a restatement ("7 days or one week") is no bound."""
  lowered = [w.lower().strip(".,;:!?") for w in words[1:3]]
  return (len(lowered) == 2 and lowered[0] == "or" and (lowered[1] in _COMPARATIVES or lowered[1] == "so")) or (
      tuple(lowered) in _BOUND_WORDS)


# One-letter unit symbols, read as units only inside a compound unit ("m/s", "m^2"; "5 m" alone may be a variable).
_UNIT_SYMBOLS = frozenset(("m", "s", "h", "g", "l", "L", "N", "J", "W"))


def _is_compound_unit(word: str) -> bool:
  """Whether `word` is a unit per unit or a unit squared or cubed ("m/s", "km/h", "cm^2", "m^3"), each part a unit
  of `UNIT_SIZES`, `_SHORT_UNITS` or `_UNIT_SYMBOLS`; "x/y" and "x^2" are math."""
  base = word[:-2] if word.endswith(("^2", "^3")) else word
  parts = base.split("/")
  if len(parts) > 2 or (base == word and len(parts) == 1):
    return False
  return all(p in _UNIT_SYMBOLS or p.lower() in UNIT_SIZES or p.lower() in _SHORT_UNITS for p in parts)


# "2 1/2", "-3 3/4": a whole number, one space and a proper fraction, then no more digits or fraction.
_MIXED_NUMBER = re.compile(r"([-\u2212]?)(\d{1,9}) (\d{1,9})/(\d{1,9})(?![\d/.,]\d|[\d/])")


def _mixed_number(text: str) -> Optional[tuple[str, int]]:
  """The improper fraction of a mixed number opening `text` ("2 1/2" -> "5/2") and where the mixed number ends; None
  when `text` opens with none (the fraction is not proper: "2 3/2", "2 0/5")."""
  match = _MIXED_NUMBER.match(text)
  if match is None or not 0 < int(match.group(3)) < int(match.group(4)):
    return None
  whole, numerator, denominator = (int(match.group(i)) for i in (2, 3, 4))
  return f"{'-' if match.group(1) else ''}{whole * denominator + numerator}/{denominator}", match.end()


def _changes_value(words: list[str]) -> bool:
  """Whether `words`, after a number, change its value or add another: "million", "dozen", "and 3", "eighths", an
  ordinal as the last word ("1 fourth", but "45 fourth graders" is 45), a bound ("at least")."""
  first = words[0].lower().strip(".")
  fraction = first in _FRACTION_WORDS or (first in _ORDINALS and len(words) == 1)
  bound = tuple(w.lower().strip(".,") for w in words[:2]) in _BOUND_WORDS
  return fraction or bound or first in _VALUE_WORDS


def _below_hundred(words: list[str], i: int) -> tuple[Optional[int], int]:
  """The number 0-99 that words[i:] open with ("twenty one", "seven") and where its words end, or (None, i)."""
  if i < len(words) and words[i] in _UNIT_WORDS:
    return _UNIT_WORDS[words[i]], i + 1
  if i < len(words) and words[i] in _TENS_WORDS:
    tens = _TENS_WORDS[words[i]]
    if i + 1 < len(words) and 0 < _UNIT_WORDS.get(words[i + 1], 0) < 10:
      return tens + _UNIT_WORDS[words[i + 1]], i + 2
    return tens, i + 1
  return None, i


def _spelled_number(answer: str) -> str:
  """"seven" -> "7", "Twenty-one apples" -> "21", "three hundred and five" -> "305": an answer in words alone, or in
  words followed by a noun, is that number; one followed by a word that changes its value ("two thirds", "one
  million", "one of them") or by anything not a word stays as it is."""
  if len(answer) > 64:
    return answer
  words = answer.lower().replace("-", " ").split()
  value, i = _below_hundred(words, 0)
  if value is None:
    return answer
  if i < len(words) and words[i] == "hundred" and 0 < value < 10:
    below, j = _below_hundred(words, i + 2 if words[i + 1:i + 2] == ["and"] else i + 1)
    value, i = value * 100 + (below or 0), j if below is not None else i + 1
  rest = words[i:]
  # Words only, none of which changes the value or makes it an expression ("two pi", "five x", "one hour and thirty
  # minutes"), the first a noun or a unit.
  if (not all(w.isalpha() for w in rest) or any(w in _CHANGE_A_SPELLED_NUMBER or w in _MATH_WORDS for w in rest)
      or (rest and len(rest[0]) < 3 and rest[0] not in _SHORT_UNITS)):
    return answer
  return str(value)


def _without_leading_filler(candidate: str) -> str:
  """"therefore 5" -> "5": drops the connectives that may stand between a label and its answer."""
  for _ in range(3):  # "so therefore actually 5"
    lowered = candidate.lower()
    word = next((w for w in _FILLER_WORDS if lowered.startswith(w) and lowered[len(w):len(w) + 1] in (" ", ",")),
                None)
    if word is None:
      break
    candidate = candidate[len(word):].lstrip(" ,")
  return candidate


def _starts_with_prose(candidate: str) -> bool:
  """Whether a label's candidate opens with a lower-case word ("correct", "consistent with", "independent of
  $a$") or with a capitalised one that a lower-case word follows ("Janet makes $18"), not with math ("5", "$x=3$",
  "x = 5", "\\frac12", "(A)"), a function name ("sqrt(2)", "pi") or a name alone ("New York")."""
  head = candidate.lstrip(" \t*")
  capitalised = head[:1].isupper() and head[:1].isalpha()
  n = 1 if capitalised else 0
  while n < len(head) and "a" <= head[n] <= "z":
    n += 1
  if n < 2 or head[:n].lower() in _MATH_WORDS or _is_worded_answer(candidate):
    return False
  if capitalised:  # a sentence's subject, not a name: a lower-case word goes on from it
    return head[n:n + 1] == " " and _is_prose_word(head[n + 1:n + 1 + _MAX_CONNECTIVE_CHARS].split(" ", 1)[0])
  return n == len(head) or head[n] in " ,.;:!?"


def _sole_number(sentence: str) -> Optional[str]:
  """The one number of a label's sentence of prose ("Janet makes $18 per day." -> "18", "she makes 1,200 dollars"
  -> "1200"), read as after a label (`_number_before_words`); "" when it holds two or more or a bound, a hedge or a
  negation stands by its one (`_bounded`): it says the answer is none of them; None when it holds none, or where
  math or a word that changes the value goes on from it ("x+5", "18%", "2 million dollars"). One pass."""
  found, i = None, 0
  while i < len(sentence):
    if not sentence[i].isdigit():
      i += 1
      continue
    if found is not None:
      return ""  # "Tom has 5 apples and Ann has 6": which is the answer is not for this to guess
    start = i - 1 if i and sentence[i - 1] in "-\u2212" else i
    found = start, start + _whole_number_end(sentence[start:])
    i = max(found[1], i + 1)
  if found is None or (found[0] and sentence[found[0] - 1] not in " $*("):
    return None
  if _bounded(sentence, *found):
    return ""
  head = sentence[found[0]:found[1]]
  # A closing `$` or bold right after it wraps the number ("$18$ per day", "**18** dollars").
  words = sentence[found[1]:].lstrip("$*").rstrip(_SENTENCE_PUNCTUATION + " *$")
  if not words:
    mixed = _mixed_number(head)
    return head.replace(",", "") if mixed is None else mixed[0]
  number = _number_before_words(head + words, compound_units=True)
  return None if number == head + words else number


# Words before a sentence's one number that bound it ("at least 18", "more than 18", "up to 18") ...
_BOUNDS_BEFORE = _COMPARATIVES | frozenset(("least", "most", "than", "to", "exceed", "exceeds", "beyond"))
# ... and words after it that hedge or bound it ("18 dollars or more", "18, maybe 19", "18 and 20").
_HEDGES_AFTER = _HEDGES | _COMPARATIVES | frozenset(("and", "least", "most", "than", "plus"))


def _bounded(sentence: str, start: int, end: int) -> bool:
  """Whether the one number at sentence[start:end] is bounded, hedged or negated ("Janet makes at least 18", "18 or
  more", "Janet does not make 18"): then it is not what the sentence says the answer is."""
  before = sentence[:start].lower().replace("\u2019", "'").split()
  after = [w.strip(_SENTENCE_PUNCTUATION + "*$") for w in sentence[end:].lower().split()]
  negated = any(w in ("not", "never", "no", "cannot") or w.endswith("n't") for w in before)
  # The word before a price or math, past the `$`, `\\$` or bold that stands alone before it ("at least $18").
  words = [w for w in (w.strip("*$\\") for w in before) if w]
  bound = bool(words) and words[-1] in _BOUNDS_BEFORE
  return negated or bound or any(w in _HEDGES_AFTER for w in after)


def _is_worded_answer(candidate: str) -> bool:
  """Whether a label's candidate is an answer in words: "yes" or "no" alone, or a number in words that
  `_spelled_number` reads ("seven", "seven apples"), not followed by a clause ("one that works", "one which")."""
  answer = clean_answer(candidate)
  if answer.lower() in _WORDED_ANSWERS:
    return True
  words = answer.lower().split()
  return _spelled_number(answer) != answer and not any(w in _CONNECTIVES or w in _CLAUSE_WORDS for w in words)


# A label's sentence that opens with these and then a value says what the answer is not ("the answer is not $5$",
# "not 5", "**not** five"); followed by words it is prose ("the answer is not obvious"), and the last math stands in.
# "one" is no value here: "not one of them".
_NEGATION = re.compile(r"(?:not|isn't|isn\u2019t|is not|cannot be|can't be|can\u2019t be)[\s*]{0,4}(?:[-\u2212]?\.?\d|"
                       r"[$\\]|(?:" + "|".join(sorted((set(_UNIT_WORDS) | set(_TENS_WORDS)) - {"one"}, key=len,
                                                     reverse=True)) + r")(?![A-Za-z]))", re.IGNORECASE)


def _label_end(text: str, lowered: str, start: int) -> Optional[int]:
  """Where the answer starts when the word at `start` labels it; None for any other use of the word."""
  after = start + len(_ANSWER_WORD)
  if lowered.startswith(" is", after) and not lowered[after + 3:after + 4].isalpha():
    return after + 3
  j = after
  while j < len(text) and j < after + 8 and text[j] in _MARKUP:
    j += 1
  if j < len(text) and text[j] == ":":
    return j + 1
  if j == len(text) or text[j] == "\n":  # a heading: only markup, or "final", before the word on its line
    before = lowered[max(0, start - _MAX_HEADING_PREFIX):start]
    cut = before.rfind("\n")
    if cut < 0 and start > _MAX_HEADING_PREFIX:
      return None
    if before[cut + 1:].strip(_MARKUP) in ("", "final"):
      return j
  return None


def _marked_number(text: str) -> Optional[str]:
  """The number of a last line marked with "####" (GSM8K's answer format: "#### 1,200" -> "1200"), or None.

  Only the text's last non-blank line counts, and only when it holds a number, perhaps a price ("#### $18", "####
  \\$18.00") or followed by words as after a label ("#### 18 dollars", not "#### 2 million"): markdown level-4
  headings open with "####" too ("#### Step 2", "#### 2."), and a numbered step heading is never the end of a
  solution."""
  end = len(text.rstrip())
  start = text.rfind("\n", 0, end) + 1
  if not text.startswith(_ANSWER_MARK, start):
    return None
  line = text[start:end].lstrip("#").strip().rstrip(".").strip()
  if line.startswith(("$", "\\$")) and not line.startswith("$$"):
    line = line[line.index("$") + 1:]  # a price: "#### $18", "#### \\$18.00"
  if _number_end(line) < len(line):
    line = _number_before_words(line, compound_units=True)
  return line.replace(",", "") if line and _number_end(line) == len(line) else None


def _last_math(text: str, max_chars: int) -> Optional[str]:
  """Content of the last `$...$`, `$$...$$`, `\\(...\\)` or `\\[...\\]` whose content is at most max_chars, or the
  number of a price after it ("so she earns $42." -> "42"; see `_last_dollar_math`); with the math that "or" joins
  to it, one hedge (`_hedge_ending_with`)."""
  best_close, best, best_start = _last_dollar_math(text, max_chars)
  for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
    close = text.rfind(right)
    if close < 0 or close <= best_close:
      continue
    open_ = text.rfind(left, max(0, close - max_chars - 2), close)
    if open_ < 0:
      continue
    best_close, best, best_start = close, text[open_ + len(left):close].strip("$"), open_
  hedge = None if best_start < 0 else _hedge_ending_with(text, best_start, max_chars)
  return best if hedge is None else hedge


def _hedge_ending_with(text: str, start: int, max_chars: int) -> Optional[str]:
  """The math at text[start] (the last math) and the math before it joined to it, as a label's math is
  (`_math_chain`), as one hedge when "or" joins any two ("$5$ or $6$", "$5$, $6$, or $7$" -> "5 or 6 or 7", which
  matches no single gold); None otherwise. Math joined only by "and" or "," is left to the
  last: there it is mostly a derivation ("$a = 3$, $b = 7$, and $a + b = 10$"), not a set of answers."""
  last = _inline_math_at(text, start)
  starts = []
  while last is not None and len(starts) < _MAX_JOINED_ANSWERS - 1:
    before = _math_ending_before(text, start, max_chars)
    if before is None or not _joins_answers(text[before[1]:start]):
      break
    start = before[0]
    starts.append(start)
  if not starts:
    return None
  # Chains are read within this window, so an unclosed `\\(` after the last math costs no scan to the text's end.
  window = text[starts[-1]:last[1] + max_chars]
  # The longest chain that reaches the last math: one from further back may stop short of it, at an equation that
  # justifies a value ("$6$, or $6 = 2 \\cdot 3$").
  for start in reversed(starts):
    chain = _math_chain(window, start - starts[-1])
    if chain is not None and chain[1] == last[1] - starts[-1]:
      return HEDGE_JOINER.join(chain[0]) if chain[2] else None
  return None


def _math_ending_before(text: str, start: int, max_chars: int) -> Optional[tuple[int, int]]:
  """(start, end) of the `$...$`, `$$...$$`, `\\(...\\)` or `\\[...\\]` that ends within `_MAX_JOIN_GAP_CHARS`
  before text[start], or None."""
  lo = max(0, start - _MAX_JOIN_GAP_CHARS - 2)
  close = max(_rfind_dollar(text, lo, start), text.rfind("\\)", lo, start), text.rfind("\\]", lo, start))
  if close < 0:
    return None
  end = close + (1 if text[close] == "$" else 2)
  if text[close] == "$":
    if close > 0 and text[close - 1] == "$":
      close -= 1  # `$$...$$`
    open_ = _rfind_dollar(text, max(0, close - max_chars - 2), close)
    if open_ > 0 and text[open_ - 1] == "$":
      open_ -= 1
  else:
    open_ = text.rfind("\\(" if text[close + 1] == ")" else "\\[", max(0, close - max_chars - 2), close)
  # Read forward as a label's math is, so both agree on where it ends (and a price is no math).
  span = None if open_ < 0 else _inline_math_at(text, open_)
  return (open_, end) if span is not None and span[1] == end else None


def _last_dollar_math(text: str, max_chars: int) -> tuple[int, Optional[str], int]:
  """Where the last `$...$` / `$$...$$` ends, its content and where it starts, or the last price's `$`, its number
  and -1 ("earns $42." -> "42": a `$` before a number closes no math); (-1, None, -1) when there is neither."""
  close = _rfind_dollar(text, 0, len(text))
  if close >= 0 and not text[close + 1:close + 2].isdigit():
    if close > 0 and text[close - 1] == "$":
      close -= 1  # `$$...$$`: look for the opening pair before the closing one
    open_ = _rfind_dollar(text, max(0, close - max_chars - 2), close)
    if open_ < 0:
      return -1, None, -1
    start = open_ - 1 if open_ > 0 and text[open_ - 1] == "$" else open_  # `$$` opens a character earlier
    display = start < open_ and text.startswith("$$", close)  # `$$...$$` is display math, never a price
    if display or not _is_priced_text(text[open_ + 1:close]):
      return close, text[open_ + 1:close].strip("$"), start
    close = open_  # "$13.\nShe spent 5 $": the opening `$` is a price, read below
  if close < 0:
    return -1, None, -1
  number = text[close + 1:close + 1 + _number_end(text[close + 1:close + 1 + max_chars])]
  return close, number.replace(",", ""), -1


def _escaped(text: str, i: int) -> bool:
  """Whether text[i] follows an odd number of backslashes (`\$` is a dollar sign, `\\$` a line break and then `$`)."""
  j = i
  while j > 0 and text[j - 1] == "\\":
    j -= 1
  return (i - j) % 2 == 1


def _rfind_dollar(text: str, start: int, end: int) -> int:
  """The last `$` in text[start:end] that is a math delimiter: not escaped (`\\$12` is a price), or -1."""
  i = text.rfind("$", start, end)
  while i >= 0 and _escaped(text, i):
    i = text.rfind("$", start, i)
  return i


def clean_answer(answer: str) -> str:
  """Strips what surrounds an answer in prose: white space, markdown bold, math delimiters, a final period."""
  cut = answer.find(_SPECIAL_TOKEN_START)
  if cut >= 0:
    answer = answer[:cut]
  answer = answer.strip().strip("*").strip()
  inline_math = _first_inline_math(answer)
  if inline_math is not None:
    answer = inline_math
  # Bold, math and a final period in any nesting ("**7**.", "$7$."), in one pass; a leading "." stays (".5").
  start, end = 0, len(answer)
  while start < end and (answer[start].isspace() or answer[start] in _WRAPPERS):
    start += 1
  while end > start and (answer[end - 1].isspace() or answer[end - 1] in _WRAPPERS + "."):
    end -= 1
  return answer[start:end]


def extract_answer(completion: str, *, max_chars: int = DEFAULT_MAX_ANSWER_CHARS,
                   think: ThinkFormat = ThinkFormat(), marked_only: bool = False) -> Optional[str]:
  """The final answer of a completion (see the module docstring), or None when there is none.

  `think` names the think tags; with `think.prompt_opens_think` (a chat template that opens the think block in
  the prompt) a completion without the closing tag is still inside its thoughts and holds no answer.
  `marked_only` takes only an answer the text marks as one (1 and 2: a box, a "####" line, an answer label), not
  its last math or a short last line: for a reference solution read as a gold answer.
  """
  text = think.open_tag + completion if think.prompt_opens_think else completion
  solution = solution_section(text, think.close_tag, think.open_tag)
  boxes, joiner, units = _chained_boxes(solution, max_chars)
  marked, bare = None if boxes else _marked_number(solution), None
  if boxes:
    candidate = joiner.join(_with_unit(_number_in_box(box.strip()), unit) for box, unit in zip(boxes, units))
  elif marked is not None:
    candidate = marked
  else:
    label, refused = _after_answer_label(solution, max_chars)
    if refused:
      return None  # "Answer: Janet makes at least $18.": the last math would be that same refused number
    if label is not None and _NEGATION.match(label.lstrip(" \t*")):
      return None  # "the answer is not $5$": the math there is what the answer is not, so no last math stands in
    labelled = label is not None and bool(clean_answer(label))
    candidate = label if labelled and not _starts_with_prose(label) else (
        None if marked_only else _last_math(solution, max_chars))
    if candidate is None and labelled:
      candidate = label  # prose after the label and no math anywhere: a worded answer ("the answer is even")
    if candidate is None and not marked_only:
      bare = solution.strip()
      cut = bare.find(_SPECIAL_TOKEN_START)
      bare = bare if cut < 0 else bare[:cut].strip()
      if len(bare) <= BARE_ANSWER_MAX_CHARS and "\n" not in bare:
        candidate = bare
  if candidate is None:
    return None
  # A degree sign is math only in a math answer; the plain line ("The angle is 90°.") is left to math-verify.
  answer = latex_notation(_spelled_number(clean_answer(candidate)), degrees=candidate is not bare)
  # "\\geq 5" is a bound, as "5 or more" is, with no value to match a gold; math-verify would drop the sign and read 5.
  bound = _INEQUALITY.match(answer) is not None
  return answer if answer and len(answer) <= max_chars and not bound else None


def extract_gold(gold: str, *, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> Optional[str]:
  """A dataset's reference answer: its last `\\boxed{}` when it has one, else the number of its last "####" line (a
  GSM8K solution), else the whole string, cleaned."""
  boxes, joiner, units = _chained_boxes(gold, max_chars)
  marked = None if boxes else _marked_number(gold[-max_chars - 8:])
  if marked is not None:
    return marked
  # Read as a boxed prediction is ("18 dollars" -> 18, joined boxes), so the same string on both sides stays equal.
  answer = joiner.join(_number_in_box(clean_answer(box)) + unit for box, unit in zip(boxes or [gold], units or [""]))
  answer = latex_notation(_spelled_number(answer))
  return answer if answer and len(answer) <= max_chars else None


_CHOICE_LETTERS = "ABCDE"
# Commands that may wrap a choice letter: "\\textbf{(C)}", "\\text{B}".
_CHOICE_WRAPPERS = ("\\textbf{", "\\text{", "\\mathbf{", "\\mathrm{")


def choice_letter(answer: str, gold: str) -> str:
  """`answer` as the choice letter it opens with ("(B) 12", "B) 12", "\\textbf{(C)}\\ 12" -> "B", "B", "C") where
  `gold` (read by `extract_gold`) is one choice letter A-E, perhaps in brackets or `\\text{}` / `\\textbf{}`: the
  option's text after the letter restates the choice. `answer` as it is against any other gold (against "12", "(B)
  12" may be the value), where nothing follows the letter, or where the rest names another choice or a hedge ("(A)
  or (B)", "(A) 12, (B) 13"), which must not pay as the first letter alone."""
  if _choice_at(gold.strip(), whole=True) is None:
    return answer
  choice = _choice_at(answer.strip(), whole=False)
  if choice is None:
    return answer
  rest = answer.strip()[choice[1]:]
  if not rest.strip() or rest[0] not in " ~:.\\" or HEDGE_JOINER.strip() in rest.lower().split():
    return answer
  return answer if any(c + ")" in rest for c in _CHOICE_LETTERS) else choice[0]


def _choice_at(text: str, whole: bool) -> Optional[tuple[str, int]]:
  """The choice letter opening `text` ("(B)", "B)", "\\textbf{(B)}"; with `whole`, `text` is the letter alone,
  perhaps in brackets or wrapped: "B", "(B)", "\\text{B}") and where it ends; None when it opens with none."""
  wrapper = next((w for w in _CHOICE_WRAPPERS if text.startswith(w)), None)
  if wrapper is not None:
    close = text.find("}", len(wrapper))
    content = text[len(wrapper):close].strip() if close > 0 else ""
    # One wrapper only ("\\textbf{\\text{...}}" is no choice), so nested commands cost no deep recursion.
    inner = None if content.startswith("\\") else _choice_at(content, whole)
    if inner is None or inner[1] != len(content) or (whole and close != len(text) - 1):
      return None
    return inner[0], close + 1
  if whole:
    letter = text[1:-1] if text[:1] == "(" and text[-1:] == ")" else text
    return (letter, len(text)) if len(letter) == 1 and letter in _CHOICE_LETTERS else None
  if text[:1] == "(" and text[2:3] == ")" and text[1] in _CHOICE_LETTERS:
    return text[1], 3
  if text[1:2] == ")" and text[0] in _CHOICE_LETTERS:
    return text[0], 2
  return None


def _joined_digit_groups(answer: str) -> str:
  """"1\\,000\\,000" -> "1000000", "12~345.5" -> "12345.5": a LaTeX space between a run of 1-3 digits (or a group
  just joined) and exactly three digits is a thousands separator; anywhere else ("x\\,2", "1\\,2345") it stays."""
  if "\\" not in answer and "~" not in answer:
    return answer
  pieces, start, i, chained = [], 0, 0, -1
  while i < len(answer):
    sep = next((s for s in _GROUP_SPACES if answer.startswith(s, i)), None) if answer[i] in "\\~" else None
    if sep is None:
      i += 1
      continue
    after = i + len(sep)
    run = 0  # digits just before the space, counted up to 4
    while run < 4 and i - run > 0 and answer[i - run - 1].isdigit():
      run += 1
    # Not an exponent or index: "2^3\\,456" is 2^3 times 456.
    before = answer[max(0, i - run - 2):i - run]
    script = before[-1:] in ("^", "_") or before in ("^{", "_{")
    group_after = answer[after:after + 3]
    if ((i == chained or (1 <= run <= 3 and not script)) and len(group_after) == 3 and group_after.isdigit()
        and not answer[after + 3:after + 4].isdigit()):
      pieces.append(answer[start:i])
      start = i = after
      chained = after + 3
    else:
      i = after
  return "".join(pieces) + answer[start:]


def latex_notation(answer: str, degrees: bool = True) -> str:
  """Rewrites the plain-text math that a LaTeX parser misreads, so both sides of a comparison mean what they say.

  Answers are parsed as LaTeX, where "pi" is p * i, "1e3" is 1 * e * 3 and "**" is not a power: a model's
  `\\boxed{2*pi}` would not match the gold "2\\pi", nor "1e3" the gold "1000". So: a whole answer in scientific
  notation becomes its decimal ("1.5e-3" -> "0.0015"; only a whole answer, since "3e-2" inside an expression may
  be 3e - 2), a whole answer that is a mixed number its improper fraction ("2 1/2" -> "5/2", which a parser reads
  as 2 * 1/2), "**" becomes "^", the Unicode symbols of `_UNICODE_MATH` ("√2", "∞", "3·4") their LaTeX, and "pi"
  standing alone (no letter or backslash before it, no letter after) becomes "\\pi", LaTeX spaces between
  thousands groups are dropped ("1\\,000" -> "1000", which a parser reads as 1 * 0), a logical "or" between values,
  perhaps of one variable, joins a hedge ("5 \\;\\lor\\; 6", "\\sqrt{4} \\lor 3", "x = 5 \\lor x = 6" -> "5 or 6",
  "\\sqrt{4} or 3", "x = 5 or x = 6", which the parser reads as the last; "\\neg p \\lor q" stays logic), "°"
  becomes "^{\\circ}" in an answer without text mode, with `degrees` (math, not a plain line of prose: the verifier
  reads it as degrees), and `\\textrm{}`, `\\mbox{}` become `\\text{}`. Linear in the answer's length, like the rest
  of this module.
  """
  stripped = answer.strip()
  if ("e" in stripped or "E" in stripped) and set(stripped) <= _SCIENTIFIC_CHARS:
    try:
      value = decimal.Decimal(stripped)
    except decimal.InvalidOperation:
      value = None
    if value is not None and value.is_finite() and abs(value.adjusted()) <= _MAX_WRITTEN_OUT_EXPONENT:
      return format(value, "f")
  mixed = _mixed_number(stripped)
  if mixed is not None and mixed[1] == len(stripped):
    return mixed[0]
  answer = _joined_digit_groups(_as_text_command(answer).replace("**", "^"))
  # Spacing around the operands goes ("5 \\;\\lor\\; 6"); their text mode stays, but is no letters of logic.
  operands = [_LAYOUT.sub(lambda m: " " if m.group(1) is None else m.group(0), a).strip()
              for a in _LOGICAL_OR.split(answer)]
  if len(operands) > 1 and all(_is_hedged_value(_LAYOUT.sub(" ", operand)) for operand in operands):
    answer = HEDGE_JOINER.join(operands)
  for symbol, latex in _UNICODE_MATH + (() if "\\text{" in answer or not degrees else (_DEGREE_SIGN,)):
    answer = answer.replace(symbol, latex)
  pieces, start = [], 0
  at = answer.find("pi")
  while at >= 0:
    before = answer[at - 1] if at > 0 else ""
    after = answer[at + 2] if at + 2 < len(answer) else ""
    if not (before.isalpha() or before == "\\" or after.isalpha()):
      pieces += [answer[start:at], "\\pi"]
      start = at + 2
    at = answer.find("pi", at + 2)
  return "".join(pieces) + answer[start:]


def _is_hedged_value(operand: str) -> bool:
  """Whether `operand` of a logical "or" is a value that makes it a hedge (see `_VALUE_OF`)."""
  prefix = _VALUE_OF.match(operand)
  value = operand[prefix.end() if prefix else 0:].strip()
  letters = any(c.isalpha() for c in _COMMAND.sub("", value))
  return bool(value) and not letters and _LOGIC_COMMANDS.isdisjoint(_COMMAND.findall(value))
