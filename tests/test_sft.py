"""SFT: the loss counts exactly assistant tokens + end-of-turn tokens; packed SFT == unpacked SFT per example."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phi_jax
from phi_jax.data.pipeline import build_pipeline, make_tokenize_fn
from phi_jax.data.sources import JsonlSource
from phi_jax.hf.tokenizer import build_tiny_tokenizer
from phi_jax.losses import chunked_token_logprobs, next_token_targets
from phi_jax.model import hidden_states, lm_head_kernel
from phi_jax.stages import next_token

CONFIG = phi_jax.PhiConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=128, initializer_range=0.3)
SEQ = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sft")
  tokenizer = build_tiny_tokenizer(tmp / "tok", chat_format="phi-4")
  rng = np.random.default_rng(0)
  path = tmp / "sft.jsonl"
  with open(path, "w") as f:
    for i in range(10):
      a, b = rng.integers(1, 50, 2)
      turns = [{"role": "user", "content": f"What is {a} + {b}?"},
               {"role": "assistant", "content": f"<think>{a} + {b} = {a + b}</think> \\boxed{{{a + b}}}"}]
      if i % 3 == 0:
        turns = [{"role": "system", "content": "Be brief."}] + turns + [
            {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"{2 * (a + b)}"}]
      f.write(json.dumps({"messages": turns}) + "\n")
  params = phi_jax.init_params(CONFIG, jax.random.key(0))

  def batches(packing):
    it = build_pipeline([(JsonlSource(str(path)), 1.0)], tokenize_fn=make_tokenize_fn(tokenizer), seq_len=SEQ,
                        batch_size=4, seed=0, shuffle=False, num_epochs=1, packing=packing)
    return [b for b in it if b["segment_ids"].any()]

  return tokenizer, params, batches


@jax.jit
def _token_logps(params, batch):
  h = hidden_states(params, batch["tokens"], CONFIG, positions=batch["positions"], segment_ids=batch["segment_ids"])
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  return chunked_token_logprobs(h, lm_head_kernel(params, CONFIG), targets, chunk_size=32), weights


def _per_document(params, batches):
  """{document tokens: (summed target log-prob, number of targets)} over every segment of every row."""
  out = {}
  for batch in batches:
    logps, weights = (np.asarray(x) for x in _token_logps(params, jax.tree.map(jnp.asarray, batch)))
    for row in range(batch["tokens"].shape[0]):
      for seg in set(batch["segment_ids"][row]) - {0}:
        idx = batch["segment_ids"][row] == seg
        out[tuple(batch["tokens"][row][idx])] = (float(np.sum(logps[row] * weights[row] * idx)),
                                                 float(np.sum(weights[row] * idx)))
  return out


def test_loss_counts_exactly_assistant_and_end_tokens(setup):
  tokenizer, params, batches = setup
  loss_fn = next_token.make_loss_fn(CONFIG, chunk_size=32)
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  for batch in batches(None):
    _, aux = loss_fn(params, jax.tree.map(jnp.asarray, batch), None)
    targets = batch["loss_mask"] * (batch["segment_ids"] > 0)
    assert float(aux["weight"]) == targets.sum()  # every assistant token (incl. end) is a target, nothing else
    for row in range(batch["tokens"].shape[0]):
      masked = batch["tokens"][row][targets[row] == 1]
      if masked.size:
        text = tokenizer.decode(masked)
        assert "<|im_end|>" in text and "user" not in text and "What is" not in text
        assert np.sum(masked == im_end) == text.count("<|im_end|>") >= 1  # end of every assistant turn


def test_packed_sft_equals_unpacked_per_example(setup):
  _, params, batches = setup
  unpacked = _per_document(params, batches(None))
  packed = _per_document(params, batches("first_fit"))
  assert len(unpacked) == 10 and set(packed) == set(unpacked)
  assert any(len(set(b["segment_ids"][r]) - {0}) > 1 for b in batches("first_fit") for r in range(4))  # really packed
  for doc, (logp, count) in unpacked.items():
    assert packed[doc][1] == count > 0
    np.testing.assert_allclose(packed[doc][0], logp, rtol=1e-5, atol=1e-5)


def test_packed_rows_keep_each_example_on_its_own_longrope_factors(setup):
  """Under LongRoPE a segment's extent (its largest position + 1) picks the short or the long factors, so the stage
  must give the model each example's own positions: the summed loss over packed rows equals the one over unpacked
  rows, with short examples placed past original_max_position_embeddings in their packed row."""
  _, _, batches = setup
  config = CONFIG.replace(original_max_position_embeddings=48, partial_rotary_factor=0.75,
                          rope_scaling_type="longrope", rope_short_factor=(1.0, 1.2, 1.5),
                          rope_long_factor=(1.0, 3.0, 9.0))
  params = phi_jax.init_params(config, jax.random.key(1))
  loss_fn = jax.jit(next_token.make_loss_fn(config, chunk_size=32))
  totals = {}
  for packing in (None, "first_fit"):
    rows = batches(packing)
    sums = [loss_fn(params, jax.tree.map(jnp.asarray, batch), None) for batch in rows]
    totals[packing] = (sum(float(loss) for loss, _ in sums), sum(float(aux["weight"]) for _, aux in sums))
    if packing:  # a short example ends past slot 48 of its row: its slots alone would pick the long factors
      assert any(np.sum(b["segment_ids"][r] == s) <= 48 < np.flatnonzero(b["segment_ids"][r] == s)[-1] + 1
                 for b in rows for r in range(4) for s in set(b["segment_ids"][r]) - {0})
  assert totals["first_fit"][1] == totals[None][1] > 0
  np.testing.assert_allclose(totals["first_fit"][0], totals[None][0], rtol=1e-5)
