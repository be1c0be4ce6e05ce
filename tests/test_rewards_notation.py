"""phi_jax.rewards verification of notation math-verify misreads: decimal percents, lists of choice letters in
`\\text{}`, LaTeX spaces before a percent or a unit, and `\\degree`."""

import pytest

from phi_jax import rewards
from phi_jax.rewards import VerifierConfig

# One xdist worker runs the module with tests/test_rewards.py, so the verifier pool starts once at a time.
pytestmark = pytest.mark.xdist_group("rewards")

THINK = "<think>\nreasoning\n</think>\n\n"


@pytest.fixture(scope="module")
def pool():
  """The module-wide pool (so `is_correct` shares it), generous limits for a loaded 2-core test machine."""
  rewards.configure(VerifierConfig(num_workers=2, timeout_s=10.0))
  yield rewards.default_pool()
  rewards.shutdown()


def _graded(pool, right, wrong):
  """(verdicts, expected) for completions (after a think block) against golds: `right` pairs True, `wrong` False."""
  cases = [(c, g, True) for c, g in right] + [(c, g, False) for c, g in wrong]
  verdicts = rewards.verify_batch([THINK + c for c, _, _ in cases], [g for _, g, _ in cases], pool=pool)
  return [(c, g, v) for (c, g, _), v in zip(cases, verdicts)], cases


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
  verdicts, expected = _graded(pool, right, wrong)
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
  verdicts, expected = _graded(pool, right, wrong)
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
  verdicts, expected = _graded(pool, right, wrong)
  assert verdicts == expected
