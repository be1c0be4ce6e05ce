"""Generation: cached greedy == full-forward greedy, stop tokens, filter statistics, sharded == single device,
LongRoPE across the boundary, and the text wrapper."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phi_jax
from phi_jax.data import chat
from phi_jax.hf.tokenizer import build_tiny_tokenizer
from phi_jax.model import kv_cache
from phi_jax.sampling import SamplingConfig, filter_logits, generate, generate_text, sample_tokens
from phi_jax.sampling.sampler import _check_prompts, _generate_program
from phi_jax.sharding import make_mesh
from phi_jax.train.state import param_shardings

# Large weights: peaked next-token distributions, so a wrong cache or rotary shows up in the argmax.
CONFIG = phi_jax.PhiConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)
# LongRoPE with its boundary (8) inside the generated sequences, as in test_model.
LONGROPE = phi_jax.PhiConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    max_position_embeddings=32, original_max_position_embeddings=8, partial_rotary_factor=0.75,
    rope_scaling_type="longrope", rope_short_factor=(1.0, 1.2, 1.5), rope_long_factor=(1.0, 3.0, 9.0),
    initializer_range=0.3)
PROMPT_LENGTHS = (5, 2, 9, 7, 3, 1, 8, 4)  # eight rows, so the batch splits over a 2 x 4 mesh
# generate_text's bucket for up to 8 prompts; the same [8, 64] shape everywhere compiles each program once.
BATCH, WIDTH = 8, 64
NEW = 8
GREEDY = SamplingConfig(max_new_tokens=NEW, temperature=0.0)


def _prompts(lengths, vocab, seed, width):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), width), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, :n] = rng.integers(0, vocab, n)
  tokens[1, lengths[1]:] = 7  # junk after a prompt's end must be ignored
  return tokens, np.asarray(lengths, np.int32)


@functools.partial(jax.jit, static_argnames="config")
def _row_logits(params, seqs, lengths, config):
  """Logits [B, W, V] of each row's first `length` tokens of `seqs` [B, W], by a full forward (no cache)."""
  valid = (jnp.arange(seqs.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
  return phi_jax.forward(params, seqs, config, segment_ids=valid)


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _reference_greedy(params, config, tokens, lengths, steps):
  """Greedy decoding by a full forward over each row's whole sequence per step: no KV cache anywhere."""
  b, p = tokens.shape
  seqs = np.pad(tokens, ((0, 0), (0, steps)))
  seqs[np.arange(p + steps)[None, :] >= lengths[:, None]] = 0
  chosen, logprobs = np.zeros((b, steps), np.int32), np.zeros((b, steps), np.float32)
  for step in range(steps):
    cur = lengths + step
    logits = np.asarray(_row_logits(params, seqs, cur, config))[np.arange(b), cur - 1]
    chosen[:, step] = logits.argmax(-1)
    logprobs[:, step] = _log_softmax(logits)[np.arange(b), chosen[:, step]]
    seqs[np.arange(b), cur] = chosen[:, step]
  return chosen, logprobs


def _init(config, seed):
  # One jitted init with the RngBitGenerator key: compiles in a fraction of the time of threefry, op by op.
  return jax.jit(phi_jax.init_params, static_argnums=0)(config, jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def params():
  return _init(CONFIG, 0)


@pytest.fixture(scope="module")
def prompts():
  return _prompts(PROMPT_LENGTHS, CONFIG.vocab_size, seed=1, width=WIDTH)


@pytest.fixture(scope="module")
def reference(params, prompts):
  return _reference_greedy(params, CONFIG, *prompts, NEW)


@pytest.fixture(scope="module")
def greedy_run(params, prompts):
  return jax.device_get(generate(params, CONFIG, *prompts, jax.random.key(2), GREEDY))


def test_greedy_equals_full_forward_argmax(greedy_run, reference):
  ref_tokens, ref_logprobs = reference
  np.testing.assert_array_equal(greedy_run["tokens"], ref_tokens)
  np.testing.assert_allclose(greedy_run["logprobs"], ref_logprobs, atol=1e-4)
  np.testing.assert_array_equal(greedy_run["lengths"], NEW)
  assert not greedy_run["finished"].any()  # ran into max_new_tokens
  np.testing.assert_array_equal(greedy_run["sampling_logprobs"], 0.0)  # greedy: a point mass
  assert greedy_run["tokens"].dtype == np.int32 and greedy_run["logprobs"].dtype == np.float32


def _pick_stop_tokens(ref_tokens):
  """Two tokens that end some rows at different steps while at least one row never meets either."""
  for first in np.unique(ref_tokens):
    for second in np.unique(ref_tokens):
      hits = np.isin(ref_tokens, [first, second])
      ends = {int(row.argmax()) for row in hits if row.any()}
      if first < second and len(ends) >= 2 and (~hits.any(-1)).any() and max(ends) < NEW - 1:
        return int(first), int(second)
  raise AssertionError("the fixture gives no usable stop tokens; change the seed")


def test_stop_tokens_end_rows_while_others_continue(params, prompts, reference):
  ref_tokens, ref_logprobs = reference
  stops = _pick_stop_tokens(ref_tokens)
  out = jax.device_get(generate(params, CONFIG, *prompts, jax.random.key(2),
                                SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=stops)))
  for row in range(len(PROMPT_LENGTHS)):
    hit = np.flatnonzero(np.isin(ref_tokens[row], stops))
    length = int(hit[0]) + 1 if hit.size else NEW
    assert out["finished"][row] == bool(hit.size)
    assert out["lengths"][row] == length
    np.testing.assert_array_equal(out["tokens"][row, :length], ref_tokens[row, :length])  # stop token included
    np.testing.assert_array_equal(out["tokens"][row, length:], 0)
    np.testing.assert_allclose(out["logprobs"][row, :length], ref_logprobs[row, :length], atol=1e-4)
    np.testing.assert_array_equal(out["logprobs"][row, length:], 0.0)


def _expected_distribution(logits, temperature, top_k, top_p):
  """Independent numpy reference of temperature -> top-k -> nucleus -> renormalise."""
  probs = np.exp(logits / temperature - np.max(logits / temperature))
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  keep = np.zeros(len(probs), bool)
  kept_mass = 0.0
  allowed = order[:top_k] if top_k else order
  allowed_mass = probs[allowed].sum()
  for token in allowed:
    keep[token] = True
    kept_mass += probs[token] / allowed_mass
    if kept_mass >= top_p:
      break
  filtered = np.where(keep, probs, 0.0)
  return filtered / filtered.sum()


def test_what_follows_a_prompt_and_inactive_rows_change_nothing(params, prompts, greedy_run):
  """Ids after a prompt are ignored even outside the vocabulary (they used to embed as NaN and poison the row);
  inactive rows (batch padding) generate nothing; Python lists are accepted."""
  tokens, lengths = prompts
  after = np.arange(WIDTH)[None, :] >= lengths[:, None]
  junk = jax.device_get(generate(params, CONFIG, np.where(after, CONFIG.vocab_size + 7, tokens), lengths,
                                 jax.random.key(2), GREEDY))
  for name in ("tokens", "logprobs", "lengths", "finished"):
    np.testing.assert_array_equal(junk[name], greedy_run[name])
  active = np.arange(BATCH) % 2 == 0
  half = jax.device_get(generate(params, CONFIG, tokens.tolist(), lengths.tolist(), jax.random.key(2), GREEDY,
                                 active=active))
  for name in ("tokens", "logprobs", "lengths", "finished"):
    np.testing.assert_array_equal(half[name][active], greedy_run[name][active])
  assert not any(half[name][~active].any() for name in ("tokens", "lengths", "finished"))
  with pytest.raises(ValueError, match=r"active must be one bool per row"):
    generate(params, CONFIG, tokens, lengths, jax.random.key(2), GREEDY, active=active[:3])
  # 0/1 integers mean what the booleans do (`~1` is -2, truthy: every row used to stop after one token).
  as_ints = jax.device_get(generate(params, CONFIG, tokens, lengths, jax.random.key(2), GREEDY,
                                    active=active.astype(np.int32)))
  for name in ("tokens", "lengths", "finished"):
    np.testing.assert_array_equal(as_ints[name], half[name])
  with pytest.raises(ValueError, match=r"2 prompts for a cache of 1 rows"):  # not an einsum error a step later
    kv_cache.prefill(params, tokens[:2, :4], lengths[:2], kv_cache.init_cache(CONFIG, 1, 8), CONFIG)
  with pytest.raises(ValueError, match="no prompts"):
    generate(params, CONFIG, tokens[:0], lengths[:0], jax.random.key(2), GREEDY)
  with pytest.raises(ValueError, match=r"a 6-token prompt does not fit a cache of 4 slots"):
    kv_cache.prefill(params, tokens[:1, :6], lengths[:1], kv_cache.init_cache(CONFIG, 1, 4, block_size=4), CONFIG)
  with pytest.raises(ValueError, match=r"prompt_lengths \[0\] must be between 1 and the prompt width"):
    kv_cache.prefill(params, tokens[:1, :4], np.zeros(1, np.int32), kv_cache.init_cache(CONFIG, 1, 8), CONFIG)


_sample = jax.jit(sample_tokens, static_argnames=("top_k", "top_p"))
_filter = jax.jit(filter_logits, static_argnames=("top_k", "top_p"))
FIXED_LOGITS = np.log(np.array([0.05, 0.3, 0.02, 0.15, 0.2, 0.12, 0.1, 0.06], np.float32))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.7), (0.7, 5, 0.8), (1.3, 6, 0.55)])
def test_sampling_matches_filtered_distribution(temperature, top_k, top_p):
  draws = 100_000
  logits = jnp.broadcast_to(jnp.asarray(FIXED_LOGITS), (draws, FIXED_LOGITS.size))
  tokens, logprobs = jax.device_get(_sample(logits, jax.random.key(3), temperature, top_k=top_k, top_p=top_p))
  expected = _expected_distribution(FIXED_LOGITS.astype(np.float64), temperature, top_k, top_p)
  counts = np.bincount(tokens, minlength=FIXED_LOGITS.size)
  assert np.all(counts[expected == 0] == 0)  # outside the top-k / nucleus: never drawn
  assert np.max(np.abs(counts / draws - expected)) < 0.01
  np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-5)  # log-prob of what was sampled


def test_greedy_filters_and_per_row_temperature():
  logits = jnp.asarray(np.stack([FIXED_LOGITS, FIXED_LOGITS[::-1]]))
  tokens, logprobs = _sample(logits, jax.random.key(4), jnp.zeros(2), top_k=2, top_p=0.5)
  np.testing.assert_array_equal(tokens, [1, 6])
  np.testing.assert_array_equal(logprobs, 0.0)
  # A tiny nucleus keeps only the most likely token; top-k keeps exactly the k largest.
  np.testing.assert_array_equal(np.isfinite(_filter(logits, top_p=0.01)).sum(-1), [1, 1])
  kept = np.isfinite(np.asarray(_filter(logits, top_k=3)))
  np.testing.assert_array_equal(np.flatnonzero(kept[0]), [1, 3, 4])
  # Ties with the last kept logit are kept, by each filter and by both together: top-k=2 keeps 2 and the nine 1s,
  # whose renormalised mass puts every one of them inside the 0.5 nucleus (the nucleus alone keeps them too).
  tied = jnp.asarray([[2.0] + [1.0] * 9 + [-5.0]])
  for k, p in ((2, 1.0), (2, 0.5), (0, 0.5)):
    np.testing.assert_array_equal(np.isfinite(np.asarray(_filter(tied, top_k=k, top_p=p)))[0], [True] * 10 + [False])
  # Per-row temperatures: the greedy row takes the argmax, the other samples at its own temperature.
  tokens, logprobs = _sample(logits, jax.random.key(5), jnp.array([0.0, 0.3]))
  assert tokens[0] == 1 and logprobs[0] == 0.0
  expected = _expected_distribution(FIXED_LOGITS[::-1].astype(np.float64), 0.3, 0, 1.0)
  np.testing.assert_allclose(logprobs[1], np.log(expected[int(tokens[1])]), atol=1e-5)


def test_draws_equal_jax_categorical_and_argmax_with_ties():
  """The sampler's own argmax and Gumbel-max draw give exactly what jnp.argmax / jax.random.categorical give."""
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(16, 300)).astype(np.float32)
  logits[:4, 10] = logits[:4, 200] = logits[:4].max(-1) + 1.0  # ties: the first index wins
  logits = jnp.asarray(logits)
  greedy, _ = _sample(logits, jax.random.key(0), jnp.zeros(16))
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
  assert np.all(np.asarray(greedy[:4]) == 10)
  for seed in range(3):
    key = jax.random.key(seed)
    sampled, _ = _sample(logits, key, jnp.ones(16))
    np.testing.assert_array_equal(sampled, jax.random.categorical(key, logits, axis=-1))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (5, 0.9)])
def test_nan_logits_never_give_an_id_outside_the_vocabulary(top_k, top_p):
  """A row holding a NaN (a diverged model) gives the first NaN's index, as jnp.argmax and
  jax.random.categorical do; it used to give vocab_size, which embeds as garbage and fails detokenizing."""
  vocab = 300
  logits = np.random.default_rng(7).normal(size=(6, vocab)).astype(np.float32)
  logits[0, 0] = logits[1, 137] = logits[2, vocab - 1] = np.nan
  logits[3, [40, 90]] = np.nan
  logits[4] = np.nan  # a whole row, as a full cache's guard in decode_step leaves it
  logits = jnp.asarray(logits)  # row 5 stays finite
  for temperature in (0.0, 1.0):
    for seed in range(3):
      key = jax.random.key(seed)
      tokens, _ = _sample(logits, key, jnp.full(6, temperature), top_k=top_k, top_p=top_p)
      tokens = np.asarray(tokens)
      assert np.all((tokens >= 0) & (tokens < vocab)), (temperature, tokens)
      if temperature == 0.0:
        np.testing.assert_array_equal(tokens, [0, 137, vocab - 1, 40, 0, np.argmax(np.asarray(logits[5]))])
      elif (top_k, top_p) == (0, 1.0):  # nothing filtered: the NaN survives into the Gumbel-max draw
        np.testing.assert_array_equal(tokens, jax.random.categorical(key, logits, axis=-1))
  mixed, _ = _sample(logits, jax.random.key(0), jnp.array([0.0, 1.0] * 3), top_k=top_k, top_p=top_p)
  assert np.all((np.asarray(mixed) >= 0) & (np.asarray(mixed) < vocab))


def test_a_full_cache_row_samples_an_id_in_range_with_a_nan_logprob(params):
  """decode_step under jit sets a full row's logits to NaN; its sampled id stays in the vocabulary, and the NaN
  stays visible in the model log-prob generate records for it."""
  cache = kv_cache.init_cache(CONFIG, 2, 4, block_size=4)
  _, cache = kv_cache.prefill(params, jnp.ones((2, 4), jnp.int32), jnp.array([3, 4]), cache, CONFIG)
  logits, _ = jax.jit(kv_cache.decode_step, static_argnums=3)(params, jnp.ones((2,), jnp.int32), cache, CONFIG)
  assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()  # row 1 had no free slot
  for temperature in (0.0, 1.0):
    tokens, _ = _sample(logits, jax.random.key(0), jnp.full(2, temperature))
    assert int(tokens[1]) == 0  # the first NaN
    logprob = jax.nn.log_softmax(logits, axis=-1)[1, tokens[1]]
    assert np.isnan(logprob)


def test_generate_with_nan_logits_emits_ids_in_the_vocabulary(params, prompts):
  """A NaN output column of the head: greedy generation picks that id at every step for every row, as jnp.argmax
  does (it used to pick the largest finite logit here, and vocab_size where XLA's max kept the NaN), and its
  log-probs are NaN."""
  poisoned = jax.tree.map(lambda x: x, params)
  poisoned["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 300].set(jnp.nan)
  out = jax.device_get(generate(poisoned, CONFIG, *prompts, jax.random.key(2), GREEDY))
  np.testing.assert_array_equal(out["tokens"], 300)
  assert np.isnan(out["logprobs"]).all()


def test_temperature_is_a_runtime_argument(params, prompts, greedy_run):
  compiled = _generate_program._cache_size()
  out = jax.device_get(generate(params, CONFIG, *prompts, jax.random.key(6), SamplingConfig(max_new_tokens=NEW)))
  assert _generate_program._cache_size() == compiled  # temperature 1.0 reuses the greedy program
  assert not np.array_equal(out["tokens"], greedy_run["tokens"])
  # Temperature 1 without filters samples from the model's own distribution.
  np.testing.assert_allclose(out["sampling_logprobs"], out["logprobs"], atol=1e-5)
  again = jax.device_get(generate(params, CONFIG, *prompts, jax.random.key(6), SamplingConfig(max_new_tokens=NEW)))
  np.testing.assert_array_equal(again["tokens"], out["tokens"])  # the rng decides


def test_sampled_rollouts_respect_filters_and_model_logprobs(params, prompts, reference):
  stops = _pick_stop_tokens(reference[0])
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_k=3, top_p=0.9, stop_token_ids=stops)
  out = jax.device_get(generate(params, CONFIG, *prompts, jax.random.key(7), sampling))
  tokens, lengths = prompts
  seqs = np.zeros((len(lengths), tokens.shape[1] + NEW), np.int32)
  for row, n in enumerate(lengths):
    seqs[row, :n] = tokens[row, :n]
    seqs[row, n:n + NEW] = out["tokens"][row]
  logits = np.asarray(_row_logits(params, seqs, lengths + out["lengths"], CONFIG))
  for row, n in enumerate(lengths):
    length = out["lengths"][row]
    generated = out["tokens"][row, :length]
    assert out["finished"][row] == np.isin(generated[-1], stops)
    assert not np.isin(generated[:-1], stops).any()
    np.testing.assert_array_equal(out["tokens"][row, length:], 0)
    for step, token in enumerate(generated):
      step_logits = logits[row, n + step - 1].astype(np.float64)
      expected = _expected_distribution(step_logits, 0.8, 3, 0.9)
      assert expected[token] > 0  # inside the top-3 nucleus of the full forward
      np.testing.assert_allclose(out["sampling_logprobs"][row, step], np.log(expected[token]), atol=1e-4)
      np.testing.assert_allclose(out["logprobs"][row, step], _log_softmax(step_logits)[token], atol=1e-4)


def test_sharded_generation_equals_single_device(params, prompts, greedy_run):
  mesh = make_mesh({"data": 2, "fsdp": 4})
  sharded_params = jax.device_put(params, param_shardings(CONFIG, mesh))
  out = generate(sharded_params, CONFIG, *prompts, jax.random.key(2), GREEDY, mesh=mesh)
  assert out["tokens"].sharding.spec[0] == ("data", "fsdp")  # rows stay where their devices generated them
  np.testing.assert_array_equal(out["tokens"], greedy_run["tokens"])
  np.testing.assert_allclose(out["logprobs"], greedy_run["logprobs"], atol=1e-5)
  np.testing.assert_array_equal(out["lengths"], greedy_run["lengths"])
  # Sampled too: random bits do not depend on how the batch is split.
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
  single = generate(params, CONFIG, *prompts, jax.random.key(8), sampling)
  sharded = generate(sharded_params, CONFIG, *prompts, jax.random.key(8), sampling, mesh=mesh)
  np.testing.assert_array_equal(sharded["tokens"], single["tokens"])
  with pytest.raises(ValueError, match="data x fsdp"):
    generate(params, CONFIG, prompts[0][:6], prompts[1][:6], jax.random.key(2), GREEDY, mesh=mesh)


def test_longrope_generation_across_the_boundary():
  params = _init(LONGROPE, 9)
  # Rows cross original_max_position_embeddings (8) at different steps; one starts beyond it.
  tokens, lengths = _prompts((6, 3, 9, 2), LONGROPE.vocab_size, seed=10, width=9)
  ref_tokens, ref_logprobs = _reference_greedy(params, LONGROPE, tokens, lengths, 7)
  out = jax.device_get(generate(params, LONGROPE, tokens, lengths, jax.random.key(2),
                                SamplingConfig(max_new_tokens=7, temperature=0.0)))
  np.testing.assert_array_equal(out["tokens"], ref_tokens)
  np.testing.assert_allclose(out["logprobs"], ref_logprobs, atol=1e-4)


def test_a_full_width_prompt_decodes_into_the_65th_cache_slot(params):
  """A 64-token prompt and 2 new tokens need P + N - 1 = 65 cache slots (the first new token is written at slot
  64 before the second is drawn), one more than a 64-slot multiple: both tokens and their log-probs still equal
  the full forward's."""
  tokens, lengths = _prompts((64, 3), CONFIG.vocab_size, seed=13, width=64)
  ref_tokens, ref_logprobs = _reference_greedy(params, CONFIG, tokens, lengths, 2)
  out = jax.device_get(generate(params, CONFIG, tokens, lengths, jax.random.key(2),
                                SamplingConfig(max_new_tokens=2, temperature=0.0)))
  np.testing.assert_array_equal(out["tokens"], ref_tokens)
  np.testing.assert_allclose(out["logprobs"], ref_logprobs, atol=1e-4)


def test_generate_text(params, tmp_path):
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4")
  assert len(tokenizer) <= CONFIG.vocab_size
  prompts = ["What is 2 + 2?", [{"role": "user", "content": "Name a prime."}], "x"]
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=0.0)
  results = generate_text(params, CONFIG, tokenizer, prompts, jax.random.key(11), sampling, batch_size=BATCH)

  rendered = [chat.render_prompt(tokenizer, p) for p in prompts]
  ref_tokens, _ = _reference_greedy(params, CONFIG, *_right_pad(rendered), NEW)
  ref_tokens = ref_tokens[:len(prompts)]
  stops = chat.stop_token_ids(tokenizer)  # the default when the config names none
  assert len(results) == len(prompts)
  for result, ref in zip(results, ref_tokens.tolist()):
    hit = [i for i, token in enumerate(ref) if token in stops]
    end = hit[0] + 1 if hit else NEW
    text = tokenizer.decode(ref[:end - 1] if hit else ref, skip_special_tokens=False)
    assert result == {"text": text, "token_ids": ref[:end], "finished": bool(hit), "num_tokens": end}

  # Sharded over the 2 x 4 mesh: the same answers.
  mesh = make_mesh({"data": 2, "fsdp": 4})
  assert generate_text(params, CONFIG, tokenizer, prompts, jax.random.key(11), sampling, mesh=mesh) == results

  # Same bucket and an explicit stop token: no new compile.
  compiled = _generate_program._cache_size()
  stop = results[0]["token_ids"][2]
  stopped = generate_text(params, CONFIG, tokenizer, prompts[:1] + ["y", "z"], jax.random.key(11),
                          SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=(stop,)), batch_size=BATCH)
  assert _generate_program._cache_size() == compiled
  end = results[0]["token_ids"].index(stop) + 1
  assert stopped[0] == {"text": tokenizer.decode(results[0]["token_ids"][:end - 1], skip_special_tokens=False),
                        "token_ids": results[0]["token_ids"][:end], "finished": True, "num_tokens": end}

  # Without stop tokens in the config, the chat family's end-of-turn token ends the answer. Doubling the LM-head
  # column of the first greedy token into <|im_end|>'s column makes <|im_end|> the argmax of the first step.
  im_end = chat.stop_token_ids(tokenizer)[0]
  eager = jax.tree.map(lambda x: x, params)
  kernel = params["lm_head"]["kernel"]
  eager["lm_head"]["kernel"] = kernel.at[:, im_end].set(2.0 * kernel[:, results[0]["token_ids"][0]])
  (answer,) = generate_text(eager, CONFIG, tokenizer, prompts[:1], jax.random.key(11), sampling, batch_size=BATCH)
  assert answer == {"text": "", "token_ids": [im_end], "finished": True, "num_tokens": 1}

  # A temperature per prompt, as generate takes one per row, over several batches of BATCH rows: greedy rows give the
  # greedy answers, and a sampled row runs too.
  many = prompts * 3
  per_row = SamplingConfig(max_new_tokens=NEW, temperature=np.array([0.0] * 8 + [1.0]))
  mixed = generate_text(params, CONFIG, tokenizer, many, jax.random.key(11), per_row, batch_size=BATCH)
  assert mixed[:8] == (results * 3)[:8] and len(mixed) == 9
  with pytest.raises(ValueError, match=r"a per-row temperature needs one value per prompt: \(2,\) for 3 prompts"):
    generate_text(params, CONFIG, tokenizer, prompts, jax.random.key(11),
                  SamplingConfig(max_new_tokens=NEW, temperature=np.array([0.0, 1.0])), batch_size=BATCH)
  # One question given as a str (as vLLM's generate takes it): refused, not answered character by character.
  with pytest.raises(ValueError, match=r"prompts must be a list of prompts .* got one str: pass \[prompt\]"):
    generate_text(params, CONFIG, tokenizer, "What is 2 + 2?", jax.random.key(11), sampling, batch_size=BATCH)


def _right_pad(rendered):
  """Rows of `rendered` ids right-padded to [BATCH, WIDTH]; filler rows hold a one-token prompt."""
  lengths = np.ones((BATCH,), np.int32)
  tokens = np.zeros((BATCH, WIDTH), np.int32)
  for row, ids in enumerate(rendered):
    tokens[row, :len(ids)] = ids
    lengths[row] = len(ids)
  return tokens, lengths


@pytest.mark.parametrize("fields,message", [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 0.0}, "top_p"),
                                            ({"top_k": -1}, "top_k"), ({"temperature": -0.5}, "temperature"),
                                            ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
                                            ({"top_k": 2.5}, "top_k must be an integer"),
                                            ({"temperature": float("nan")}, "temperature must be finite"),
                                            # NumPy / JAX scalars (a schedule's value) and one value per row too:
                                            ({"temperature": np.float32("nan")}, "temperature must be finite"),
                                            ({"temperature": np.float32(-0.5)}, "temperature must be >= 0"),
                                            ({"temperature": jnp.float32(-0.5)}, "temperature must be >= 0"),
                                            ({"temperature": np.array([0.5, np.inf])}, "must be finite"),
                                            ({"stop_token_ids": "<|im_end|>"}, "stop_token_ids must be token ids"),
                                            ({"stop_token_ids": (2, 2.5)}, "stop_token_ids must be token ids"),
                                            # logits / 1e-10 overflowed log_softmax under jit: log-probs of +-inf.
                                            ({"temperature": 1e-10}, r"at least 1e-05; use 0 for greedy"),
                                            ({"temperature": np.array([0.5, 1e-8])}, r"at least 1e-05")])
def test_bad_sampling_configs_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    SamplingConfig(**fields)


def test_none_switches_top_p_and_stop_ids_off_as_in_transformers():
  """top_p=None and stop_token_ids=None (eos_token_id=None) failed with bare TypeErrors."""
  assert SamplingConfig(top_p=None, stop_token_ids=None) == SamplingConfig(top_p=1.0, stop_token_ids=())


def test_one_stop_id_is_a_tuple_of_one_and_ids_outside_the_vocabulary_are_refused(params, prompts):
  assert SamplingConfig(stop_token_ids=2).stop_token_ids == (2,)  # transformers' eos_token_id=2
  assert SamplingConfig(stop_token_ids=np.int64(2)).stop_token_ids == (2,)
  # Another family's end-of-turn id (Phi-4-mini's <|end|>) can never be drawn: every row would run to the end.
  with pytest.raises(ValueError, match=r"stop_token_ids \[200020\] lie outside the model's vocabulary \[0, 512\)"):
    generate(params, CONFIG, *prompts, jax.random.key(0), dataclasses.replace(GREEDY, stop_token_ids=(3, 200020)))


def test_bad_prompts_are_refused(params, prompts, caplog):
  tokens, lengths = prompts
  long_prompt = np.where(np.arange(BATCH) == 0, 60, lengths)  # 60 + 8 new tokens > max_position_embeddings 64
  generate(params, CONFIG, tokens, long_prompt, jax.random.key(0), GREEDY)
  assert "generating sequences of up to 68 tokens" in caplog.text
  with pytest.raises(ValueError, match=r"prompt_lengths \[.*\] must be between 1 and the prompt width"):
    generate(params, CONFIG, tokens, np.where(lengths == 1, 0, lengths), jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match="vocab_size"):
    generate(params, CONFIG, np.where(tokens == tokens[0, 0], CONFIG.vocab_size, tokens), lengths,
             jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match="prompt_lengths must hold integers"):  # 3.7 was cut to 3
    generate(params, CONFIG, tokens, lengths + 0.7, jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match="prompt_tokens must hold integers"):
    generate(params, CONFIG, tokens.astype(np.float32), lengths, jax.random.key(0), GREEDY)
  per_row = dataclasses.replace(GREEDY, temperature=np.zeros(2, np.float32))
  with pytest.raises(ValueError, match=r"a per-row temperature needs one value per row: \(2,\) for 8 rows"):
    generate(params, CONFIG, tokens, lengths, jax.random.key(0), per_row)
  for rng in (None, 3):
    with pytest.raises(ValueError, match="rng must be a PRNG key such as jax.random.key"):
      generate(params, CONFIG, tokens, lengths, rng, GREEDY)
  with pytest.raises(ValueError, match=r"expected prompt_tokens \[B, P\] and prompt_lengths \[B\]"):
    generate(params, CONFIG, tokens[:1], 3, jax.random.key(0), GREEDY)  # one length as a number
  # Python lists are arrays too.
  listed = generate(params, CONFIG, tokens.tolist(), lengths.tolist(), jax.random.key(0), GREEDY)
  np.testing.assert_array_equal(listed["tokens"], generate(params, CONFIG, tokens, lengths, jax.random.key(0),
                                                           GREEDY)["tokens"])


def test_left_padded_prompts_are_refused_and_right_padded_ones_pass():
  """transformers / TRL tokenizers left-pad (padding_side="left"): the row [0, 0, 9, 10] with length 2 was read as
  the prompt [0, 0] and generated from the pad tokens without a word."""
  config = CONFIG.replace(pad_token_id=0)
  lengths = np.array([4, 2], np.int32)
  left = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], np.int32)
  with pytest.raises(ValueError, match=r'must be right-padded.*padding_side="right"'):
    generate(None, config, left, lengths, jax.random.key(0), GREEDY)
  check = lambda tokens, lengths, config=config: _check_prompts(config, tokens, lengths, NEW)
  check(np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32), lengths)  # right-padded with the pad id
  check(np.array([[5, 6, 7, 8], [0, 0, 9, 0]], np.int32), np.array([4, 3], np.int32))  # a prompt opening on pads
  check(np.array([[0, 0, 7, 8], [0, 0, 9, 10]], np.int32), np.array([4, 4], np.int32))  # full rows: no padding
  with pytest.raises(ValueError, match=r"row\(s\) \[1\] look left-padded \(row 1 opens with 2 copies of id 0"):
    check(left, lengths, config=CONFIG)  # no pad id in the config: a run that covers the gap is padding
  check(np.array([[5, 6, 7, 8], [0, 9, 10, 11]], np.int32), np.array([4, 3], np.int32), config=CONFIG)  # gap 1
  jax.eval_shape(check, left, lengths)  # traced prompts: no values to check, and no error
  with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
    check(jnp.asarray(left), lengths)  # concrete device arrays are checked too


def _refused_rows(config, tokens, lengths):
  """The rows `_check_prompts` calls left-padded, [] when it passes them all."""
  try:
    _check_prompts(config, np.array(tokens, np.int32), np.array(lengths, np.int32), NEW)
  except ValueError as e:
    return [int(i) for i in re.search(r"row\(s\) \[([\d, ]*)\]", str(e)).group(1).split(",")]
  return []


def test_right_padded_prompts_opening_on_a_pad_id_bos_pass():
  """phi-4's pad id is its BOS: the right-padded row [7, 11, 12, 13, 14, 0] of length 5 (a BOS-prefixed prompt one
  slot short of the batch width, zero-padded as generate_text pads) was refused as left-padded."""
  bos_is_pad = CONFIG.replace(pad_token_id=7, bos_token_id=7)
  assert _refused_rows(bos_is_pad, [[7, 11, 12, 13, 14, 0], [7, 21, 22, 0, 0, 0]], [5, 3]) == []
  assert _refused_rows(bos_is_pad, [[7, 11, 12, 13, 14, 7], [7, 21, 22, 7, 7, 7]], [5, 3]) == []
  # Left-padded rows of P - L = 1, 2, 3 pads, without and then with a BOS after the padding: all refused but the
  # first, one pad before a prompt of no BOS, which reads as well as a right-padded prompt opening on its BOS.
  left = [[7, 11, 12, 13, 14, 15], [7, 7, 12, 13, 14, 15], [7, 7, 7, 13, 14, 15],
          [7, 7, 12, 13, 14, 15], [7, 7, 7, 13, 14, 15], [7, 7, 7, 7, 14, 15]]
  lengths = [5, 4, 3, 5, 4, 3]
  assert _refused_rows(bos_is_pad, left, lengths) == [1, 2, 3, 4, 5]
  # A pad id apart from the BOS: one leading pad is padding, whatever follows it.
  bos_apart = CONFIG.replace(pad_token_id=7, bos_token_id=1)
  left_apart = [[7, 11, 12, 13, 14, 15], [7, 7, 12, 13, 14, 15], [7, 7, 7, 13, 14, 15],
                [7, 1, 12, 13, 14, 15], [7, 7, 1, 13, 14, 15], [7, 7, 7, 1, 14, 15]]
  assert _refused_rows(bos_apart, left_apart, lengths) == [0, 1, 2, 3, 4, 5]
  assert _refused_rows(bos_apart, [[1, 11, 12, 13, 14, 0], [1, 21, 22, 0, 0, 0]], [5, 3]) == []
  assert _refused_rows(CONFIG.replace(pad_token_id=7), left_apart, lengths) == [0, 1, 2, 3, 4, 5]  # no BOS id


def test_left_padding_with_another_id_than_the_config_s_pad_is_refused():
  """The phi-4 tokenizer pads with <|dummy_85|> while the config's pad id is <|endoftext|>: a batch left-padded by
  the tokenizer (as transformers' generate wants) passed, and its short rows generated from their padding."""
  config = CONFIG.replace(pad_token_id=3, bos_token_id=3)  # the config's pad id; the tokenizer pads with 4
  assert _refused_rows(config, [[11, 12, 13, 14, 15], [4, 4, 4, 4, 92], [4, 4, 21, 22, 23]], [5, 1, 3]) == [1, 2]
  # Right-padded with that id, or with zeros, or one slot short (a BOS and a pad read alike): all pass.
  assert _refused_rows(config, [[11, 12, 13, 14, 15], [92, 4, 4, 4, 4], [21, 22, 23, 4, 4]], [5, 1, 3]) == []
  assert _refused_rows(config, [[4, 4, 4, 14, 0], [4, 4, 0, 0, 0]], [4, 2]) == []  # prompts opening on a run
  assert _refused_rows(config, [[11, 12, 13, 14, 15], [4, 21, 22, 23, 24]], [5, 4]) == []


def test_none_switches_top_k_off_and_length_multiple_is_checked(params, tmp_path):
  """top_k=None (TRL's "off") was refused while top_p=None was taken; length_multiple=0 was a ZeroDivisionError."""
  assert SamplingConfig(top_k=None).top_k == 0
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4")
  for multiple in (None, 0, -64, 2.5):
    with pytest.raises(ValueError, match=r"length_multiple=.* must be a positive whole number of tokens"):
      generate_text(params, CONFIG, tokenizer, ["2 + 2?"], jax.random.key(0), GREEDY, length_multiple=multiple)


def test_torch_tensors_are_prompts_too(params, prompts, greedy_run):
  """torch tensors (int64 from a transformers tokenizer) failed with "Cannot interpret 'torch.int64' as a data
  type"; they now give what the same NumPy prompts give."""
  torch = pytest.importorskip("torch")
  tokens, lengths = prompts
  out = generate(params, CONFIG, torch.tensor(tokens.tolist()), torch.tensor(lengths.tolist()), jax.random.key(2),
                 GREEDY)
  np.testing.assert_array_equal(out["tokens"], greedy_run["tokens"])
  np.testing.assert_array_equal(out["lengths"], greedy_run["lengths"])


def test_generate_text_names_likely_mistakes(params, tmp_path):
  """A negative batch_size generated nothing (eval crashed, rollouts wrote an empty file); a tokenizer's path and one
  unwrapped conversation failed inside the tokenizer or the chat renderer."""
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4")
  for batch_size in (-2, 0, 2.5):
    with pytest.raises(ValueError, match=r"batch_size=.* must be a positive whole number of rows"):
      generate_text(params, CONFIG, tokenizer, ["2 + 2?"], jax.random.key(0), GREEDY, batch_size=batch_size)
  with pytest.raises(ValueError, match=r"is a path: load it first"):
    generate_text(params, CONFIG, str(tmp_path), ["2 + 2?"], jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match=r"prompts is one conversation .*pass \[messages\]"):
    generate_text(params, CONFIG, tokenizer, [{"role": "user", "content": "2 + 2?"}], jax.random.key(0), GREEDY)
  for one in ({"role": "user", "content": "2 + 2?"}, {"problem": "2 + 2?", "answer": "4"}):  # generated for its keys
    with pytest.raises(ValueError, match=r"prompts is one dict"):
      generate_text(params, CONFIG, tokenizer, one, jax.random.key(0), GREEDY)
  one = dataclasses.replace(GREEDY, max_new_tokens=2)
  assert generate_text(params, CONFIG, tokenizer, (p for p in ["2 + 2?"]), jax.random.key(0), one) == generate_text(
      params, CONFIG, tokenizer, ["2 + 2?"], jax.random.key(0), one)  # a generator of prompts too


def test_each_step_and_row_draws_fresh_noise(params, prompts):
  """With every parameter zero the logits are all 0, so each step is a uniform draw over 512 tokens: a row
  repeating one token for all 8 steps (or two rows drawing the same 8 tokens) has probability 512 ** -7."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  out = jax.device_get(generate(zeros, CONFIG, *prompts, jax.random.key(12), SamplingConfig(max_new_tokens=NEW)))
  np.testing.assert_allclose(out["logprobs"], -np.log(CONFIG.vocab_size), rtol=1e-5)  # uniform, as assumed
  assert all(len(set(row)) > 1 for row in out["tokens"].tolist())
  assert len({tuple(row) for row in out["tokens"].tolist()}) == BATCH


def test_negative_zero_is_tied_with_zero_in_every_filter():
  """The nucleus alone compared order keys, which put -0.0 below 0.0: a -0.0 logit tied with the last kept 0.0 was
  cut, while top-k + top-p (float comparisons) kept it."""
  logits = jnp.asarray([[1.0, 0.0, -0.0, -3.0]], jnp.float32)
  for kwargs in ({"top_p": 0.7}, {"top_k": 3, "top_p": 0.7}):
    np.testing.assert_array_equal(np.isfinite(np.asarray(_filter(logits, **kwargs)))[0], [True, True, True, False])


def test_nucleus_stops_at_the_first_token_that_reaches_top_p():
  """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in float32): the nucleus is the smallest set whose mass reaches top_p,
  so top_p = 0.5 keeps the first token alone (its mass is exactly 0.5) and top_p = 0.75 the first two."""
  logits = jnp.log(jnp.asarray([[0.25, 0.5, 0.125, 0.125]], jnp.float32))
  np.testing.assert_array_equal(np.isfinite(np.asarray(_filter(logits, top_p=0.5)))[0], [False, True, False, False])
  np.testing.assert_array_equal(np.isfinite(np.asarray(_filter(logits, top_p=0.75)))[0], [True, True, False, False])


def test_nucleus_equals_a_float64_sort_of_the_vocabulary():
  """The nucleus found by bisection over the logits' order (no sort) is the one a float64 sort gives, on rows with
  ties, -inf entries and very peaked or flat distributions; rows whose mass at the nucleus's edge lies within
  float32 rounding of top_p are left out."""
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(48, 1000)) * np.repeat([0.3, 1.0, 4.0, 12.0], 12)[:, None]
  logits[::3] = np.round(logits[::3], 1)  # ties
  logits[1::4, :50] = -np.inf
  logits = logits.astype(np.float32)
  for top_p in (0.3, 0.8, 0.95, 0.99):
    kept = np.isfinite(np.asarray(_filter(jnp.asarray(logits), top_p=top_p)))
    checked = 0
    for row, x in enumerate(logits.astype(np.float64)):
      probs = np.exp(x - x.max())
      probs /= probs.sum()
      order = np.argsort(-x, kind="stable")
      mass_before = np.cumsum(probs[order]) - probs[order]
      if np.min(np.abs(mass_before - top_p)) < 1e-5:
        continue
      threshold = x[order][(mass_before < top_p) | (np.arange(len(x)) == 0)].min()
      np.testing.assert_array_equal(kept[row], x >= threshold, err_msg=f"row {row}, top_p {top_p}")
      checked += 1
    assert checked >= 40


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8)])
def test_tempered_logprobs_score_each_row_at_its_own_temperature(params, prompts, top_k, top_p):
  """GRPO's old log-probs: log_softmax(logits / T) of each generated token, unfiltered, T per row (greedy rows at
  T = 0: the untempered log_softmax), whether or not top-k / top-p filtered the draw."""
  tokens, lengths = prompts
  temperatures = np.float32([0.7, 0.0, 1.3, 0.5, 1.0, 0.9, 0.0, 2.0])
  out = jax.device_get(generate(params, CONFIG, tokens, lengths, jax.random.key(5),
                                SamplingConfig(max_new_tokens=NEW, temperature=temperatures, top_k=top_k,
                                               top_p=top_p)))
  seqs = np.zeros((BATCH, WIDTH + NEW), np.int32)
  for row, n in enumerate(lengths):
    seqs[row, :n], seqs[row, n:n + NEW] = tokens[row, :n], out["tokens"][row]
  logits = np.asarray(_row_logits(params, seqs, lengths + out["lengths"], CONFIG), np.float64)
  for row, n in enumerate(lengths):
    steps = int(out["lengths"][row])
    scale = temperatures[row] if temperatures[row] > 0 else 1.0
    expected = _log_softmax(logits[row, n - 1:n - 1 + steps] / scale)[np.arange(steps), out["tokens"][row, :steps]]
    np.testing.assert_allclose(out["tempered_logprobs"][row, :steps], expected, atol=1e-4)
    np.testing.assert_array_equal(out["tempered_logprobs"][row, steps:], 0.0)


def test_generate_text_samples_do_not_depend_on_the_batch_they_run_in(params, tmp_path):
  """Each prompt draws with its own key (fold_in(rng, its index)): batches of 2, of 8 and split over a mesh give one
  prompt the same sampled tokens. Zero parameters make every logit exactly 0 in any batch, so the draws are compared
  exactly; repeated prompts still get draws of their own."""
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4")
  zeros = jax.tree.map(jnp.zeros_like, params)
  prompts = ["What is 2 + 2?", "Name a prime.", "x", "x", "y"]
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
  for impl in ("threefry2x32", "rbg"):  # RBG's bits under vmap depend on a key's place in the batch
    run = lambda impl=impl, **kwargs: [r["token_ids"] for r in generate_text(
        zeros, CONFIG, tokenizer, prompts, jax.random.key(5, impl=impl), sampling, **kwargs)]
    by_two = run(batch_size=2)
    assert run(batch_size=8) == by_two, impl
    assert run(mesh=make_mesh({"data": 2, "fsdp": 4})) == by_two, impl
    assert by_two[2] != by_two[3]  # the same prompt twice: two draws


def test_per_row_keys_make_a_row_depend_on_its_key_alone(params, prompts):
  zeros = jax.tree.map(jnp.zeros_like, params)
  tokens, lengths = prompts
  keys = jax.random.split(jax.random.key(3), BATCH)
  order = np.arange(BATCH)[::-1]
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
  out = jax.device_get(generate(zeros, CONFIG, tokens, lengths, keys, sampling))
  flipped = jax.device_get(generate(zeros, CONFIG, tokens[order], lengths[order], keys[order], sampling))
  np.testing.assert_array_equal(flipped["tokens"], out["tokens"][order])
  raw = jax.device_get(generate(zeros, CONFIG, tokens, lengths, jax.random.key_data(keys), sampling))
  np.testing.assert_array_equal(raw["tokens"], out["tokens"])  # raw uint32 keys [B, 2] alike
  with pytest.raises(ValueError, match=r"per-row keys need one key per row: 3 keys for"):
    generate(zeros, CONFIG, tokens, lengths, keys[:3], sampling)
