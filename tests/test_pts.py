"""Pivotal Token Search (phi_jax.stages.pts): the search against brute force on step-shaped p(success), the pairs it
makes, the sampled estimate of p(success) on a tiny model, and the records the DPO reader trains exactly."""

import jax
import pytest

import phi_jax
from phi_jax.data import chat, preference
from phi_jax.hf.tokenizer import build_tiny_tokenizer
from phi_jax.sampling.sampler import SamplingConfig
from phi_jax.stages import pts

COMPLETION = tuple(range(100, 116))  # 16 token ids


class StepOracle:
  """p(success) after a prefix of COMPLETION as a step function of its length; alternatives' p by token; counts the
  estimates asked for."""

  def __init__(self, steps: dict[int, float], first_tokens=(), alternatives=None):
    self.steps, self.first_tokens, self.alternatives, self.asked = steps, tuple(first_tokens), alternatives or {}, []

  def p_after(self, n: int) -> float:
    return self.steps[max(k for k in self.steps if k <= n)]

  def __call__(self, prefix):
    self.asked.append(prefix)
    if prefix != COMPLETION[:len(prefix)]:  # the prefix before a token, then an alternative
      return pts.Estimate(p=self.alternatives[prefix[-1]])
    return pts.Estimate(p=self.p_after(len(prefix)), first_tokens=self.first_tokens)


def _brute_force(oracle: StepOracle, p_gap: float) -> list[int]:
  """Positions whose token alone moves p(success) by p_gap or more, estimating every prefix."""
  return [i for i in range(len(COMPLETION)) if abs(oracle.p_after(i + 1) - oracle.p_after(i)) >= p_gap]


@pytest.mark.parametrize("steps", [
    {0: 0.3, 6: 0.9},  # one token raises it
    {0: 0.5, 4: 0.9, 12: 0.1},  # one raises, a later one lowers it
    {0: 0.5, 0 + 1: 0.1},  # the first token
    {0: 0.4, 15: 1.0},  # the last token
    {0: 0.2, 3: 0.45, 9: 0.7, 13: 0.95},  # three steps of 0.25 each
])
def test_search_finds_what_estimating_every_prefix_finds(steps):
  oracle = StepOracle(steps)
  found = pts.find_pivotal_tokens(COMPLETION, oracle, p_gap=0.2)
  assert [t.position for t in found] == _brute_force(oracle, 0.2)
  for t in found:
    assert t.token == COMPLETION[t.position]
    assert (t.p_before, t.p_after) == (oracle.p_after(t.position), oracle.p_after(t.position + 1))
  assert len(oracle.asked) == len(set(oracle.asked))  # each prefix estimated once
  assert len(oracle.asked) < len(COMPLETION) + 1  # fewer than every prefix


def test_one_pivotal_token_costs_logarithmically_many_estimates():
  oracle = StepOracle({0: 0.3, 11: 0.9})
  assert [t.position for t in pts.find_pivotal_tokens(COMPLETION, oracle, p_gap=0.5)] == [10]
  assert len(oracle.asked) == 2 + 4  # both ends, then one midpoint per halving of 16 tokens


def test_changes_below_the_gap_are_not_pivotal_and_a_span_whose_ends_agree_is_not_searched():
  assert pts.find_pivotal_tokens(COMPLETION, StepOracle({0: 0.5, 7: 0.625}), p_gap=0.25) == []
  # A change of exactly p_gap is pivotal.
  assert [t.position for t in pts.find_pivotal_tokens(COMPLETION, StepOracle({0: 0.5, 7: 0.75}), p_gap=0.25)] == [6]
  # Up at 4, down again at 6: the whole completion's ends agree, so the search stops at once (as documented).
  oracle = StepOracle({0: 0.5, 5: 0.9, 7: 0.5})
  assert pts.find_pivotal_tokens(COMPLETION, oracle, p_gap=0.2) == []
  assert _brute_force(oracle, 0.2) == [4, 6]
  assert len(oracle.asked) == 2


@pytest.mark.parametrize("p_gap", [0.0, -0.1, 1.5])
def test_a_gap_outside_0_1_is_refused(p_gap):
  with pytest.raises(ValueError, match="p_gap"):
    pts.find_pivotal_tokens(COMPLETION, StepOracle({0: 0.5}), p_gap=p_gap)


def test_pairs_take_the_samples_most_frequent_other_token_and_choose_the_more_successful_side():
  # Token 5 raises p from 0.3 to 0.9; the samples at its prefix chose 7 twice, 9 and 8 once, and the token itself.
  up = StepOracle({0: 0.3, 6: 0.9}, first_tokens=(9, 7, COMPLETION[5], 7, 8), alternatives={7: 0.2})
  [pair] = pts.pivotal_pairs(COMPLETION, up, p_gap=0.3)
  assert (pair.prefix, pair.chosen, pair.rejected) == (COMPLETION[:5], COMPLETION[5], 7)
  assert (pair.p_chosen, pair.p_rejected) == (0.9, 0.2) and pair.pivotal.position == 5
  # Token 5 lowers p: the alternative, with the higher p, is chosen.
  down = StepOracle({0: 0.7, 6: 0.1}, first_tokens=(7, 7, 8), alternatives={7: 0.8})
  [pair] = pts.pivotal_pairs(COMPLETION, down, p_gap=0.3)
  assert (pair.chosen, pair.rejected, pair.p_chosen, pair.p_rejected) == (7, COMPLETION[5], 0.8, 0.1)
  # A tie between alternatives goes to the lower id.
  tie = StepOracle({0: 0.3, 6: 0.9}, first_tokens=(9, 8), alternatives={8: 0.0, 9: 1.0})
  assert pts.pivotal_pairs(COMPLETION, tie, p_gap=0.3)[0].rejected == 8


def test_no_pair_without_an_alternative_or_where_the_alternative_does_as_well():
  assert pts.pivotal_pairs(COMPLETION, StepOracle({0: 0.3, 6: 0.9}, first_tokens=(COMPLETION[5],) * 4),
                           p_gap=0.3) == []
  assert pts.pivotal_pairs(COMPLETION, StepOracle({0: 0.3, 6: 0.9}, first_tokens=(7,), alternatives={7: 0.7}),
                           p_gap=0.3) == []


def test_questions_are_searched_within_0_2_and_0_8():
  assert [pts.worth_searching(p) for p in (0.0, 0.19, 0.2, 0.5, 0.8, 0.81, 1.0)] == [
      False, False, True, True, True, False, False]


# ---- on a tiny model -------------------------------------------------------------------------------------------

CONFIG = phi_jax.PhiConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=128, initializer_range=0.3)
K, NEW = 8, 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), chat_format="phi-4")


@pytest.fixture(scope="module")
def params():
  return jax.jit(phi_jax.init_params, static_argnums=0)(CONFIG, jax.random.key(0, impl="rbg"))


def test_sampled_estimate_counts_the_finished_continuations_the_verifier_accepts(params, tokenizer):
  asked = []

  def verify(texts, golds):  # accepts every text, so p is the share of continuations that end on a stop token
    asked.append(list(texts))
    assert golds == ["5"] * len(texts)
    return [True] * len(texts)

  prefix = tuple(tokenizer("The answer is", add_special_tokens=False)["input_ids"])
  common = dict(k=K, rng=jax.random.key(3), verify=verify)
  greedy = pts.sampled_estimator(params, CONFIG, tokenizer, "What is 2 + 3?", "5",
                                 sampling=SamplingConfig(max_new_tokens=NEW, temperature=0.0), **common)
  first = greedy(prefix)
  assert len(first.first_tokens) == K and len(set(first.first_tokens)) == 1  # greedy: k equal continuations
  # Its first token as a stop token: every continuation finishes at once.
  stopping = pts.sampled_estimator(
      params, CONFIG, tokenizer, "What is 2 + 3?", "5",
      sampling=SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=(first.first_tokens[0],)), **common)
  assert stopping(prefix).p == 1.0 and all(text == tokenizer.decode(list(prefix)) for text in asked[-1])
  # One new token, three stop tokens: a continuation finishes where its token is one of them, and only a finished
  # one counts, whatever the verifier says.
  stops = (first.first_tokens[0], 300, 301)
  one_token = pts.sampled_estimator(params, CONFIG, tokenizer, "What is 2 + 3?", "5",
                                    sampling=SamplingConfig(max_new_tokens=1, temperature=1.0, stop_token_ids=stops),
                                    **common)
  estimate = one_token(prefix)
  assert len(estimate.first_tokens) == K and len(set(estimate.first_tokens)) > 1
  assert list(estimate.successes) == [t in stops for t in estimate.first_tokens]
  assert estimate.p == sum(estimate.successes) / K
  assert all(text.startswith(tokenizer.decode(list(prefix))) for text in asked[-1])
  # Each prefix draws with keys of its own: the same estimate again after another prefix's.
  other = one_token(prefix[:-1])
  assert one_token(prefix) == estimate and other.first_tokens != estimate.first_tokens


def test_a_prefix_that_ended_is_judged_as_it_is(params, tokenizer):
  stop = chat.stop_token_ids(tokenizer)[0]
  answer = tuple(tokenizer("The answer is 5", add_special_tokens=False)["input_ids"])
  judged = []

  def verify(texts, golds):
    judged.extend(texts)
    return ["5" in text for text in texts]

  estimate = pts.sampled_estimator(params, CONFIG, tokenizer, "What is 2 + 3?", "5", k=K, rng=jax.random.key(0),
                                   sampling=SamplingConfig(max_new_tokens=NEW, temperature=1.0), verify=verify)
  assert estimate(answer + (stop,)) == pts.Estimate(p=1.0)
  assert estimate(answer[:-1] + (tokenizer(" 6", add_special_tokens=False)["input_ids"][0], stop)).p == 0.0
  assert judged == ["The answer is 5", "The answer is 6"]


def test_pair_records_train_the_one_token_after_the_prefix(tokenizer):
  ids = tokenizer("The answer is 5", add_special_tokens=False)["input_ids"]
  six = tokenizer(" 6", add_special_tokens=False)["input_ids"]
  assert len(six) == 1
  pair = pts.TokenPair(prefix=tuple(ids[:-1]), chosen=ids[-1], rejected=six[0], p_chosen=0.9, p_rejected=0.1,
                       pivotal=pts.PivotalToken(len(ids) - 1, ids[-1], 0.3, 0.9))
  record = pts.pair_record(tokenizer, "What is 2 + 3?", pair)
  assert record["prompt"][-1] == {"role": "assistant", "content": "The answer is"}
  checked, bad = preference.validate_pair(record)
  assert bad is None
  rows, status = preference.encode_pair(tokenizer, checked, seq_len=64)
  assert status == "used"
  prompt_ids = chat.render_prompt(tokenizer, "What is 2 + 3?") + list(pair.prefix)
  for side, token in (("chosen", pair.chosen), ("rejected", pair.rejected)):
    row = rows[side]
    length = int(row["segment_ids"].sum())
    assert row["tokens"][:length].tolist() == prompt_ids + [token]  # the prompt as generation saw it, then the token
    assert row["loss_mask"][:length].tolist() == [0] * len(prompt_ids) + [1]


def test_a_pair_whose_text_merges_with_its_prefix_gives_no_record(tokenizer):
  head = tokenizer("The answ", add_special_tokens=False)["input_ids"]
  tail = tokenizer("er", add_special_tokens=False)["input_ids"]
  whole = tokenizer("The answer", add_special_tokens=False)["input_ids"]
  assert len(tail) == 1 and whole != head + tail  # "answ" + "er" encode as one other token
  other = tokenizer(" 6", add_special_tokens=False)["input_ids"][0]
  pair = pts.TokenPair(prefix=tuple(head), chosen=tail[0], rejected=other, p_chosen=0.9, p_rejected=0.1,
                       pivotal=pts.PivotalToken(len(head), tail[0], 0.3, 0.9))
  assert pts.pair_record(tokenizer, "What is 2 + 3?", pair) is None


def test_search_on_a_tiny_model_gives_pairs_of_its_own_tokens(params, tokenizer):
  """End to end with a verifier that accepts a finished completion holding the completion's last token's text: the
  search finds that token (before it, the random model's continuations rarely hold it), every pair's prefix is a
  prefix of the completion, one side is its pivotal token, and the sides' p(success) differ by the gap."""
  completion = tuple(tokenizer("Two and three make five, so 5", add_special_tokens=False)["input_ids"])
  marker = tokenizer.decode([completion[-1]])
  stops = tuple(t for t in range(0, CONFIG.vocab_size, 3) if t not in completion)  # so that many finish

  def verify(texts, golds):
    return [marker in text for text in texts]

  estimate = pts.sampled_estimator(params, CONFIG, tokenizer, "What is 2 + 3?", "5", k=K, rng=jax.random.key(5),
                                   sampling=SamplingConfig(max_new_tokens=NEW, temperature=1.0, stop_token_ids=stops),
                                   verify=verify)
  found = pts.find_pivotal_tokens(completion, estimate, p_gap=0.25)
  assert len(completion) - 1 in [t.position for t in found]
  pairs = pts.pivotal_pairs(completion, estimate, p_gap=0.25)
  for pair in pairs:
    assert pair.prefix == completion[:pair.pivotal.position] and pair.pivotal in found
    assert completion[pair.pivotal.position] in (pair.chosen, pair.rejected) and pair.chosen != pair.rejected
    assert pair.p_chosen - pair.p_rejected >= 0.25


def test_a_pair_with_an_end_of_turn_side_gives_no_record_and_no_warning(tokenizer, caplog):
  ids = tokenizer("The answer is 5", add_special_tokens=False)["input_ids"]
  stop = chat.stop_token_ids(tokenizer)[0]
  pair = pts.TokenPair(prefix=tuple(ids), chosen=stop, rejected=ids[-1], p_chosen=1.0, p_rejected=0.5,
                       pivotal=pts.PivotalToken(len(ids), stop, 0.5, 1.0))
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert pts.pair_record(tokenizer, "What is 2 + 3?", pair) is None
  assert not caplog.records  # the record would hold the token's text, read back as a control token
