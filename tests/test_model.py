"""Decoder invariances: full-size shapes, packed == separate, no cross-document gradient, cached == full, remat."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phi_jax
from phi_jax.model import kv_cache, param_logical_axes
from phi_jax.model.api import count_params

# A tiny LongRoPE model whose boundary (8) lies inside the test sequences.
LONGROPE = phi_jax.PhiConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
    max_position_embeddings=32, original_max_position_embeddings=8, partial_rotary_factor=0.75,
    rope_scaling_type="longrope", rope_short_factor=(1.0, 1.2, 1.5), rope_long_factor=(1.0, 3.0, 9.0),
    initializer_range=0.3)  # large weights: sharp attention, so rotary errors show in the logits
GQA = phi_jax.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)


@pytest.mark.parametrize("name,expected", [("phi-4", 14_659_507_200), ("phi-4-mini", 3_836_021_760),
                                           ("phi-4-reasoning", 14_659_507_200),
                                           ("phi-4-mini-reasoning", 3_836_021_760)])
def test_full_size_parameter_counts(name, expected):
  config = phi_jax.presets[name]
  shapes = jax.eval_shape(lambda: phi_jax.init_params(config, jax.random.key(0)))
  assert count_params(shapes) == expected == config.num_params()
  axes = param_logical_axes(config)
  for leaf, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert len(spec) == leaf.ndim  # every dimension of every parameter has a logical name


def test_params_of_a_config_for_another_device_init_on_this_one():
  """A "cudnn" (GPU) or "splash" (TPU) model's parameters, made on a CPU host: the same as the reference backend's
  (the cuDNN backend's init-time forward used to fail with "cuDNN is not detected")."""
  config = GQA.replace(attention_backend="xla")
  expected = phi_jax.init_params(config, jax.random.key(3))
  for backend in ("cudnn", "splash"):
    params = phi_jax.init_params(config.replace(attention_backend=backend), jax.random.key(3))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))


def test_bfloat16_params_are_the_float32_draw_rounded_once():
  """jax.random.normal drawn in bfloat16 has 128 distinct values and no tail past ~2.9 sigma; a bfloat16 init is
  the float32 one rounded (as torch's bfloat16 normal_ is), and a float32 init the plain draw."""
  config = phi_jax.PhiConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_layers=1, num_heads=2,
                             num_kv_heads=1, max_position_embeddings=32)
  f32 = phi_jax.init_params(config, jax.random.key(0))
  bf16 = phi_jax.init_params(config.replace(param_dtype="bfloat16"), jax.random.key(0))
  for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16), np.float32), np.asarray(b, np.float32))
  gate = np.asarray(jax.tree.leaves(bf16)[-1], np.float32).ravel()  # any [D, F]-sized weight will do
  assert len(np.unique(gate)) > 1000 and np.abs(gate).max() / gate.std() > 3.5
  expected = jax.random.normal(jax.random.key(1), (128, 512), jnp.float32) * config.initializer_range
  from phi_jax.model.decoder import _normal  # pylint: disable=import-outside-toplevel
  np.testing.assert_array_equal(_normal(config)(jax.random.key(1), (128, 512), jnp.float32), expected)


def test_a_preset_name_for_a_config_says_what_to_pass():
  """init_params("tiny", key) failed with "str.replace() takes no keyword arguments", forward with an
  AttributeError on vocab_size."""
  with pytest.raises(TypeError, match=r"config must be a PhiConfig, got str 'tiny': pass phi_jax.presets\['tiny'\]"):
    phi_jax.init_params("tiny", jax.random.key(0))
  params = phi_jax.init_params(phi_jax.presets["tiny"], jax.random.key(0))
  with pytest.raises(TypeError, match=r"got str 'phi4': pass a preset .*'phi-4'"):
    phi_jax.forward(params, [[1, 2]], "phi4")
  from phi_jax.sampling import sampler  # pylint: disable=import-outside-toplevel
  with pytest.raises(TypeError, match=r"config must be a PhiConfig, got dict"):
    sampler.generate(params, {"vocab_size": 512}, [[1, 2]], [2], jax.random.key(0), sampler.SamplingConfig())


def test_params_and_a_config_that_disagree_on_tying_are_refused():
  """A tied config ignored a trained lm_head (other logits, no error); an untied one on tied params hit a KeyError."""
  untied = phi_jax.presets["tiny"].replace(tie_word_embeddings=False)
  params = phi_jax.init_params(untied, jax.random.key(0))
  with pytest.raises(ValueError, match=r"hold an lm_head but the config ties .*tie_word_embeddings=False"):
    phi_jax.forward(params, [[1, 2]], untied.replace(tie_word_embeddings=True))
  tied_params = phi_jax.init_params(untied.replace(tie_word_embeddings=True), jax.random.key(0))
  with pytest.raises(ValueError, match=r"hold no lm_head but the config has an untied .*tie_word_embeddings=True"):
    phi_jax.forward(tied_params, [[1, 2]], untied)


def test_preset_shapes():
  mini = phi_jax.presets["phi-4-mini"]
  assert (mini.resolved_head_dim, mini.rotary_dim) == (128, 96)
  assert abs(mini.replace(rope_short_factor=(1.0,) * 48, rope_long_factor=(1.0,) * 48).rope_attention_scale
             - 1.190238) < 1e-6
  assert phi_jax.presets["phi-4"].resolved_head_dim == 128


def test_a_longrope_preset_traces_with_placeholder_factors():
  """The preset leaves the factors to the checkpoint, so tracing its forward pass fails; the placeholder config
  traces to the same shapes (what --dry_run and memory planning need)."""
  mini = phi_jax.presets.get("phi-4-mini", num_layers=1)
  shapes = jax.eval_shape(lambda: phi_jax.init_params(mini, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="LongRoPE short/long factors are not set"):
    jax.eval_shape(lambda p, t: phi_jax.forward(p, t, mini), shapes, tokens)
  traced = phi_jax.presets.with_placeholder_rope_factors(mini)
  assert jax.eval_shape(lambda p, t: phi_jax.forward(p, t, traced), shapes, tokens).shape == (1, 8, mini.vocab_size)
  assert phi_jax.presets.with_placeholder_rope_factors(GQA) is GQA


def test_positions_and_segments_of_shape_1_by_t_stand_for_every_row(model):
  """transformers' position_ids are often [1, T]: LongRoPE's per-row extent failed on them with a vmap error."""
  config, params = model
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 12)).astype(np.int32)
  positions = np.arange(12, dtype=np.int32)[None]
  expected = phi_jax.forward(params, tokens, config)
  for given in ({"positions": positions}, {"segment_ids": np.ones((1, 12), np.int32)}):  # one beside the default
    np.testing.assert_allclose(phi_jax.forward(params, tokens, config, **given), expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module", params=["gqa", "longrope"])
def model(request):
  config = GQA if request.param == "gqa" else LONGROPE
  return config, phi_jax.init_params(config, jax.random.key(1))


def _pack(docs, row_len):
  tokens, positions, segments = (np.zeros((1, row_len), np.int32) for _ in range(3))
  start = 0
  for i, doc in enumerate(docs):
    n = len(doc)
    tokens[0, start:start + n], positions[0, start:start + n], segments[0, start:start + n] = doc, np.arange(n), i + 1
    start += n
  return tokens, positions, segments


def test_packed_equals_separate(model):
  config, params = model
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 32, 11), rng.integers(32, 64, 6)]  # 11 > LongRoPE boundary 8, 6 < 8
  tokens, positions, segments = _pack(docs, 20)  # 3 padding slots at the end
  packed = phi_jax.forward(params, tokens, config, positions=positions, segment_ids=segments)
  start = 0
  for doc in docs:
    alone = phi_jax.forward(params, jnp.asarray(doc)[None], config)
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], atol=1e-5, rtol=1e-5)
    start += len(doc)
  assert np.isfinite(np.asarray(packed)).all()  # padding rows stay finite
  # Segment ids are labels: large ones (document ids, beyond the row length) give the same logits.
  relabelled = jnp.where(segments == 1, 70_000, jnp.where(segments == 2, 1_000, 0))
  np.testing.assert_allclose(phi_jax.forward(params, tokens, config, positions=positions, segment_ids=relabelled),
                             packed, atol=1e-6, rtol=1e-6)


def test_no_gradient_across_documents(model):
  config, params = model
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 32, 9), rng.integers(32, 64, 7)  # disjoint vocabularies
  tokens, positions, segments = _pack([doc_a, doc_b], 16)

  def loss_of_doc(params, which):
    logits = phi_jax.forward(params, tokens, config, positions=positions, segment_ids=segments)
    return jnp.sum(jnp.where(segments[..., None] == which, logits, 0.0) ** 2)

  for which, own, other in ((1, doc_a, doc_b), (2, doc_b, doc_a)):
    grad = jax.grad(loss_of_doc)(params, which)["embed"]["embedding"]
    assert np.all(np.asarray(grad)[np.unique(other)] == 0.0)  # exactly zero, not merely small
    assert np.all(np.abs(np.asarray(grad)[np.unique(own)]).sum(-1) > 0)


def test_causality_is_by_slot_whatever_the_positions(model):
  """Positions only rotate queries and keys; which keys a token sees is decided by its slot in the row. With
  positions falling along the row, or all equal, changing the last four tokens leaves the first six's logits
  unchanged (and does change the last four's)."""
  config, params = model
  rng = np.random.default_rng(8)
  tokens = rng.integers(0, 64, (1, 10))
  changed = tokens.copy()
  changed[0, 6:] = (tokens[0, 6:] + 1 + rng.integers(0, 63, 4)) % 64  # every one of them differs
  # Rows: (original, changed) x (positions 9..0, positions all 0), in one forward pass.
  rows = jnp.asarray(np.concatenate([tokens, changed, tokens, changed]), jnp.int32)
  positions = jnp.asarray([np.arange(10)[::-1]] * 2 + [np.zeros(10)] * 2, jnp.int32)
  logits = np.asarray(phi_jax.forward(params, rows, config, positions=positions))
  for before, after in ((logits[0], logits[1]), (logits[2], logits[3])):
    np.testing.assert_allclose(after[:6], before[:6], atol=1e-6, rtol=1e-6)
    assert np.all(np.abs(after[6:] - before[6:]).max(-1) > 1e-3)


def test_padding_ids_cannot_poison_a_row_and_bad_ids_are_named():
  """Whatever id a padding slot (segment 0) holds, the row's real tokens are unchanged (an out-of-range id used to
  gather NaN, which attention's zero weights spread over the row); an out-of-range id in a real slot is an error."""
  params = phi_jax.init_params(GQA, jax.random.key(1))
  tokens = np.random.default_rng(0).integers(1, GQA.vocab_size, (2, 10)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[0, -3:] = 0
  forward = jax.jit(phi_jax.forward, static_argnums=2)
  clean = np.asarray(forward(params, tokens, GQA, segment_ids=segments))
  for junk in (GQA.vocab_size, -1, 5):
    dirty = tokens.copy()
    dirty[0, -3:] = junk
    np.testing.assert_array_equal(np.asarray(forward(params, dirty, GQA, segment_ids=segments))[0, :-3],
                                  clean[0, :-3])
  dirty = tokens.copy()
  dirty[1, 4] = GQA.vocab_size
  with pytest.raises(ValueError, match=r"token id 64 at \[1, 4\] is outside the vocabulary \[0, 64\)"):
    phi_jax.forward(params, dirty, GQA, segment_ids=segments)


def test_tokens_are_array_likes_of_shape_batch_by_length():
  """1-D tokens failed with an IndexError, a list with an AttributeError, 3-D tokens with a broadcasting TypeError
  inside attention."""
  params = phi_jax.init_params(GQA, jax.random.key(1))
  row = [5, 6, 7, 8]
  expected = np.asarray(phi_jax.forward(params, np.asarray([row], np.int32), GQA))
  np.testing.assert_array_equal(np.asarray(phi_jax.forward(params, [row], GQA)), expected)
  for tokens in (np.asarray(row), row):
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq_len\] .* got shape \(4,\).*tokens\[None\]"):
      phi_jax.forward(params, tokens, GQA)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, seq_len\] .* got shape \(1, 1, 4\)$"):
    phi_jax.forward(params, np.asarray([[row]]), GQA)
  with pytest.raises(ValueError, match=r"got shape \(4,\)"):
    phi_jax.hidden_states(params, np.asarray(row), GQA)
  import torch  # a transformers tokenizer's return_tensors="pt", positions and segment ids alike
  pt = torch.tensor([row])
  np.testing.assert_array_equal(np.asarray(phi_jax.forward(params, pt, GQA, positions=torch.arange(4)[None],
                                                           segment_ids=torch.ones_like(pt))), expected)


def _greedy_with_cache(params, config, prompts, max_new, block_size=None):
  lengths = np.array([len(p) for p in prompts], np.int32)
  padded = np.zeros((len(prompts), lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  cache = kv_cache.init_cache(config, len(prompts), int(lengths.max()) + max_new, block_size=block_size)
  logits, cache = jax.jit(kv_cache.prefill, static_argnames="config")(params, padded, lengths, cache, config)
  step = jax.jit(kv_cache.decode_step, static_argnames="config")
  seqs, all_logits = [list(p) for p in prompts], [logits]
  for _ in range(max_new):
    nxt = np.asarray(jnp.argmax(logits, -1))
    for s, t in zip(seqs, nxt):
      s.append(int(t))
    logits, cache = step(params, jnp.asarray(nxt, jnp.int32), cache, config)
    all_logits.append(logits)
  return seqs, all_logits


@pytest.mark.parametrize("block_size", [None, 4], ids=["one_block", "blocks_of_4"])
def test_cached_decoding_equals_full_forward(model, block_size):
  """The default cache is one block of 16 slots; blocks of 4 put prompts and new tokens across block edges."""
  config, params = model
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 64, 6), rng.integers(0, 64, 3), rng.integers(0, 64, 9)]
  max_new = 7  # rows cross the LongRoPE boundary (8) at different steps; the third starts beyond it
  seqs, step_logits = _greedy_with_cache(params, config, prompts, max_new, block_size)
  if block_size:
    assert kv_cache.init_cache(config, 3, 16, block_size=block_size)["layers"][0]["k"].shape[0] == 4
  else:
    assert kv_cache.init_cache(config, 3, 16)["layers"][0]["k"].shape[0] == 1
  width = max(len(s) for s in seqs)

  @jax.jit
  def last_logits(tokens, length):  # full forward of a prefix, padded to one shape so it compiles once
    valid = (jnp.arange(width) < length).astype(jnp.int32)[None]
    logits = phi_jax.forward(params, tokens[None], config, segment_ids=valid)
    return logits[0, length - 1]

  for row, (prompt, seq) in enumerate(zip(prompts, seqs)):
    padded = jnp.asarray(np.pad(seq, (0, width - len(seq))), jnp.int32)
    for step, length in enumerate(range(len(prompt), len(seq) + 1)):
      full = last_logits(padded, length)
      np.testing.assert_allclose(step_logits[step][row], full, atol=1e-4, rtol=1e-4)
      if length < len(seq):  # greedy token == argmax of the full forward over the sequence so far
        assert int(jnp.argmax(full)) == seq[length]


def test_only_live_rows_crossing_the_longrope_boundary_rebuild_the_cache():
  """Row 1 crosses the boundary (8) at this step; row 0 is far from it. When row 1 is not live (a finished row
  riding along), the cache is not rebuilt: its earlier entries keep their short-factor keys. Row 0's logits are
  the same either way."""
  params = phi_jax.init_params(LONGROPE, jax.random.key(1))
  rng = np.random.default_rng(4)
  prompts = np.zeros((2, 8), np.int32)
  prompts[0, :3], prompts[1] = rng.integers(0, 64, 3), rng.integers(0, 64, 8)
  cache = kv_cache.init_cache(LONGROPE, 2, 16)
  _, cache = jax.jit(kv_cache.prefill, static_argnames="config")(params, prompts, np.array([3, 8], np.int32),
                                                                 cache, LONGROPE)
  step = jax.jit(kv_cache.decode_step, static_argnames="config")
  tokens = jnp.array([5, 6], jnp.int32)
  rebuilt_logits, rebuilt = step(params, tokens, cache, LONGROPE)
  kept_logits, kept = step(params, tokens, cache, LONGROPE, jnp.array([True, False]))
  old_keys, rebuilt_keys, kept_keys = (np.asarray(c["layers"][0]["k"])[..., :8] for c in (cache, rebuilt, kept))
  np.testing.assert_array_equal(kept_keys[:, 1], old_keys[:, 1])
  assert np.abs(rebuilt_keys[:, 1] - old_keys[:, 1]).max() > 1e-3  # the rebuild rewrites them with long factors
  np.testing.assert_allclose(kept_logits[0], rebuilt_logits[0], atol=1e-5)


def test_the_longrope_rebuild_of_a_long_cache_in_overlapping_chunks_equals_the_full_forward():
  """A cache of one 138-slot block is rebuilt in chunks of 128 slots, the second one overlapping the first ([10,
  138)): rows of 130 and 100 prompt tokens, the first crossing the boundary (135) while decoding."""
  config = LONGROPE.replace(max_position_embeddings=256, original_max_position_embeddings=135)
  params = phi_jax.init_params(config, jax.random.key(1))
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 64, 130), rng.integers(0, 64, 100)]
  seqs, step_logits = _greedy_with_cache(params, config, prompts, 8, block_size=138)
  forward = jax.jit(lambda tokens: phi_jax.forward(params, tokens[None], config)[0])
  for row, (prompt, seq) in enumerate(zip(prompts, seqs)):
    full = np.asarray(forward(jnp.asarray(seq, jnp.int32)))  # one forward of the whole row
    for step, length in enumerate(range(len(prompt), len(seq))):
      if row == 1 or length > 135:  # a prefix past the boundary has the whole row's (long) factors
        np.testing.assert_allclose(step_logits[step][row], full[length - 1], atol=1e-4, rtol=1e-4)


def test_init_cache_rounds_up_to_whole_blocks_and_rejects_a_bad_block_size(model):
  config, _ = model
  cache = kv_cache.init_cache(config, 2, 10, block_size=4)  # 10 slots -> 3 blocks of 4
  assert cache["layers"][0]["k"].shape[0] == 3 and cache["layers"][0]["k"].shape[-1] == 4
  assert cache["layers"][0]["segment_ids"].shape == cache["tokens"].shape == (2, 12)
  with pytest.raises(ValueError, match="positive number of slots"):
    kv_cache.init_cache(config, 2, 10, block_size=0)


def test_decoding_into_a_full_cache_is_an_error_or_nan_under_jit(model):
  config, params = model
  cache = kv_cache.init_cache(config, 2, 4, block_size=4)  # 4 slots
  _, cache = kv_cache.prefill(params, jnp.ones((2, 4), jnp.int32), jnp.array([3, 4]), cache, config)
  with pytest.raises(ValueError, match=r"KV cache is full \(lengths \[3, 4\], 4 slots\)"):
    kv_cache.decode_step(params, jnp.ones((2,), jnp.int32), cache, config)
  logits, _ = jax.jit(kv_cache.decode_step, static_argnums=3)(params, jnp.ones((2,), jnp.int32), cache, config)
  assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()  # row 0 had a free slot, row 1 none


def test_a_chunk_of_several_tokens_after_the_prefill_attends_over_the_filled_cache(model):
  """The path of the LongRoPE rebuild's chunks: tokens appended several at a time to a filled cache (rows of
  different lengths, blocks of 4 slots) give the logits of a full forward of each row."""
  config, params = model
  rng = np.random.default_rng(5)
  prompts = rng.integers(0, 64, (2, 4)).astype(np.int32)
  lengths = np.array([3, 4], np.int32)
  _, cache = kv_cache.prefill(params, jnp.asarray(prompts), jnp.asarray(lengths),
                              kv_cache.init_cache(config, 2, 12, block_size=4), config)
  chunk = rng.integers(0, 64, (2, 3)).astype(np.int32)
  positions = lengths[:, None] + np.arange(3, dtype=np.int32)
  h, _ = kv_cache._run(params, config, jnp.asarray(chunk), jnp.asarray(positions), jnp.ones((2, 3), jnp.int32),
                       cache["layers"])
  logits = np.asarray(phi_jax.model.api.logits_from_hidden(params, h, config))
  for row in range(2):
    sequence = np.concatenate([prompts[row, :lengths[row]], chunk[row]])
    full = np.asarray(phi_jax.forward(params, jnp.asarray(sequence)[None], config))[0]
    np.testing.assert_allclose(logits[row], full[lengths[row]:], atol=1e-4, rtol=1e-4)


def test_prefill_temporaries_do_not_grow_with_the_cache_slots():
  """A 64-token prefill into 512 or 4096 slots: the prompt attends to itself, so XLA's temporaries are the same
  (attending over the whole cache took 4.4 MB at 512 slots and 35 MB at 4096)."""
  config = GQA.replace(max_position_embeddings=8192)
  params = phi_jax.init_params(config, jax.random.key(1))

  def temp_bytes(slots):
    prefill = jax.jit(lambda p, t, l, c: kv_cache.prefill(p, t, l, c, config), donate_argnums=3)
    cache = kv_cache.init_cache(config, 4, slots, block_size=64)
    compiled = prefill.lower(params, jnp.ones((4, 64), jnp.int32), jnp.full((4,), 64), cache).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(4096) == temp_bytes(512)


def test_the_longrope_rebuild_adds_little_to_a_decode_step_s_temporaries():
  """A decode step that may rebuild the LongRoPE cache (4096 slots, boundary 8) runs the rebuild in chunks over the
  cache in place: its temporaries stay within a cache's size of a plain decode step's (4.7 MB here). Over the whole
  width at once, with a second cache, they were 3.2 GB (xla attention over 4096 x 4096 scores); a cache no longer
  than the boundary compiles no rebuild at all."""
  def memory(config, slots):
    params = jax.eval_shape(lambda: phi_jax.init_params(config, jax.random.key(1)))
    step = jax.jit(lambda p, t, c: kv_cache.decode_step(p, t, c, config), donate_argnums=2)
    cache = jax.eval_shape(lambda: kv_cache.init_cache(config, 4, slots, block_size=64))
    compiled = step.lower(params, jax.ShapeDtypeStruct((4,), jnp.int32), cache).compile()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    return compiled.memory_analysis().temp_size_in_bytes, cache_bytes

  plain, cache_bytes = memory(GQA.replace(max_position_embeddings=8192), 4096)
  longrope = LONGROPE.replace(max_position_embeddings=8192)
  assert memory(longrope, 4096)[0] < plain + 1.5 * cache_bytes
  assert memory(longrope.replace(original_max_position_embeddings=4096), 4096)[0] < 1.1 * plain


def test_remat_policies_do_not_change_values_or_gradients():
  params = phi_jax.init_params(GQA, jax.random.key(3))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 12)))

  def loss(params, config):
    return jnp.mean(phi_jax.forward(params, tokens, config) ** 2)

  base_value, base_grad = jax.value_and_grad(loss)(params, GQA)
  for policy in ("full", "dots"):
    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, GQA.replace(remat_policy=policy))
    np.testing.assert_allclose(value, base_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_tracks_float32():
  params = phi_jax.init_params(GQA, jax.random.key(4))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 10)))
  f32 = phi_jax.forward(params, tokens, GQA)
  bf16 = phi_jax.forward(params, tokens, GQA.replace(dtype="bfloat16"))
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.05 * float(jnp.max(jnp.abs(f32))) + 1e-2


def test_bad_configs_name_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    GQA.replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="attention_backend"):
    GQA.replace(attention_backend="flash9")
  with pytest.raises(ValueError, match="rope_long_factor"):
    LONGROPE.replace(rope_long_factor=(1.0, 2.0))
  with pytest.raises(ValueError, match=r"partial_rotary_factor=1.5 must be in \(0, 1\]"):
    GQA.replace(partial_rotary_factor=1.5)  # was accepted, then failed inside the rotary with a broadcast error
  with pytest.raises(ValueError, match=r"PhiConfig.dtype='bf16' is not a floating-point dtype"):
    GQA.replace(dtype="bf16")
  # Values that gave NaN logits, failed deep in Flax, or were silently ignored:
  for fields, message in [({"rope_theta": 0.0}, "rope_theta=0.0 must be positive"),
                          ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0 must be >= 0"),
                          ({"param_dtype": "int32"}, "param_dtype='int32' is not a floating-point dtype"),
                          ({"rope_short_factor": (0.0, 1.0, 1.0)}, "rope_short_factor must hold positive factors"),
                          ({"original_max_position_embeddings": 0}, "original_max_position_embeddings=0 must be")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      LONGROPE.replace(**fields)
  with pytest.raises(ValueError, match=r"rope_short_factor, rope_long_factor set without rope_scaling_type="):
    LONGROPE.replace(rope_scaling_type=None)  # the factors would be ignored: plain rotary
  # Values from JSON, YAML or a CLI string that passed, then failed in shapes or changed the model silently:
  for fields, message in [({"num_heads": 4.0}, "PhiConfig.num_heads must be a positive int, got 4.0"),
                          ({"head_dim": 16.0}, "PhiConfig.head_dim must be a positive int or None, got 16.0"),
                          ({"max_position_embeddings": 0}, "PhiConfig.max_position_embeddings must be a positive int"),
                          ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be True or False, got 'false'")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      GQA.replace(**fields)
  # A dtype given as a type (Flax and MaxText style) is its name: equal and hashed alike, and serialisable.
  typed = GQA.replace(dtype=jnp.bfloat16)
  assert typed == GQA.replace(dtype="bfloat16") and typed.dtype == "bfloat16"
  # An explicit attention factor (a checkpoint's rope_scaling.attention_factor) still inits: init drops the rotary
  # setup, which the arrays do not depend on.
  assert jax.eval_shape(lambda: phi_jax.init_params(LONGROPE.replace(rope_attention_factor=1.2), jax.random.key(0)))
  with pytest.raises(ValueError, match="LongRoPE short/long factors are not set"):
    phi_jax.forward(phi_jax.init_params(LONGROPE, jax.random.key(0)), jnp.zeros((1, 4), jnp.int32),
                    LONGROPE.replace(rope_short_factor=None, rope_long_factor=None))


@pytest.mark.parametrize("name,field", [("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                                        ("num_key_value_heads", "num_kv_heads"), ("rope_scaling", "rope_scaling_type"),
                                        ("max_seq_len", "data.seq_len"),
                                        ("max_target_length", r"training sequence length: data.seq_len"),
                                        ("weight_dtype", "model.param_dtype")])
def test_a_field_spelled_as_transformers_or_maxtext_does_is_named_with_ours(name, field):
  """model.overrides and load_hf(config_overrides=...) go through replace: a transformers or MaxText name gave a bare
  TypeError (unexpected keyword argument)."""
  with pytest.raises(ValueError, match=rf"{name}.*{field}.*valid fields: .*remat_policy"):
    GQA.replace(**{name: 4})
  with pytest.raises(ValueError, match=rf"{name}.*{field}"):
    phi_jax.presets.get("tiny", **{name: 4})
  with pytest.raises(ValueError, match=r"'no_such_field'.*valid fields"):
    GQA.replace(no_such_field=1)


def test_a_numpy_head_dim_is_stored_as_an_int():
  """Every other int field is normalised; a numpy head_dim made save_hf's config.json unserialisable."""
  config = GQA.replace(head_dim=np.int64(16))
  assert type(config.head_dim) is int and config == GQA.replace(head_dim=16)  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_backward_equals_autodiff(dtype):
  """The MLP's hand-written backward pass against JAX autodiff of the same forward formula, batch > 1."""
  from phi_jax.model.decoder import swiglu

  def plain(x, w_gate, w_up, w_down):
    return jnp.einsum("btf,fd->btd", jax.nn.silu(x @ w_gate) * (x @ w_up), w_down)

  rng = np.random.default_rng(5)
  x, w_gate, w_up, w_down = (jnp.asarray(rng.normal(size=shape), dtype)
                             for shape in ((2, 7, 12), (12, 20), (12, 20), (20, 12)))
  cotangent = jnp.asarray(rng.normal(size=(2, 7, 12)), dtype)
  ours = jax.vjp(swiglu, x, w_gate, w_up, w_down)
  reference = jax.vjp(plain, x, w_gate, w_up, w_down)
  # bfloat16: the two orders of the same math differ by a few bfloat16 ulps of the largest entries.
  tolerance = 1e-5 if dtype == "float32" else 2e-2

  def close(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())

  close(ours[0], reference[0])
  for got, want in zip(ours[1](cotangent), reference[1](cotangent)):
    assert got.dtype == want.dtype
    close(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weight_shapes", [((12, 4, 3), (12, 2, 3), (12, 2, 3)), ((12, 5),)], ids=["qkv", "output"])
def test_projections_backward_equals_autodiff(dtype, weight_shapes):
  """The projections' hand-written backward pass against JAX autodiff of plain einsums, values and every
  gradient: q/k/v with GQA head shapes, and the output projection's single [F, D] weight (batch > 1)."""
  from phi_jax.model.decoder import projections

  def plain(x, *weights):
    return tuple(jnp.einsum("btd,d...->bt...", x, w) for w in weights)

  rng = np.random.default_rng(7)
  args = tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in ((2, 7, 12), *weight_shapes))
  cotangents = tuple(jnp.asarray(rng.normal(size=(2, 7) + shape[1:]), dtype) for shape in weight_shapes)
  ours, ours_vjp = jax.vjp(projections, *args)
  reference, reference_vjp = jax.vjp(plain, *args)
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  for got, want in zip((*ours, *ours_vjp(cotangents)), (*reference, *reference_vjp(cotangents))):
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_backward_equals_autodiff(dtype):
  """RMSNorm's hand-written backward pass against JAX autodiff of the same forward formula."""
  from phi_jax.model.decoder import rms_norm

  def plain(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
    return scale.astype(x.dtype) * y.astype(x.dtype)

  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 7, 12)) * 3, dtype)
  scale = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, 7, 12)), dtype)
  ours = jax.vjp(lambda x, s: rms_norm(x, s, 1e-5), x, scale)
  reference = jax.vjp(plain, x, scale)
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  for got, want in zip((ours[0], *ours[1](cotangent)), (reference[0], *reference[1](cotangent))):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())


def test_rotary_angles_and_rotation_match_a_numpy_longrope():
  """cos/sin against a numpy LongRoPE (partial rotary: 6 of 8 channels): short factors while a segment's extent
  (largest position + 1) is at most original_max (8), long factors beyond, each packed segment on its own, all
  scaled by sqrt(1 + ln(32 / 8) / ln(8)) = sqrt(5 / 3); then the NeoX half-split rotation of a head."""
  from phi_jax.model import rotary
  config = LONGROPE  # head_dim 8, rotary_dim 6, theta 10000, max 32, original 8
  positions = np.array([list(range(8)) + list(range(9)) + [0, 0, 0]], np.int32)  # extents 8 and 9, then padding
  segments = np.array([[1] * 8 + [2] * 9 + [0] * 3], np.int32)
  cos, sin = rotary.rotary_angles(config, jnp.asarray(positions), jnp.asarray(segments))
  scale = np.sqrt(5.0 / 3.0)
  pair = np.arange(3)
  for factors, cols in ((config.rope_short_factor, slice(0, 8)), (config.rope_long_factor, slice(8, 17))):
    inv_freq = 1.0 / (np.asarray(factors) * 10000.0 ** (2 * pair / 6))
    angles = positions[0, cols, None] * np.concatenate([inv_freq, inv_freq])
    np.testing.assert_allclose(cos[0, cols], np.cos(angles) * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sin[0, cols], np.sin(angles) * scale, rtol=1e-5, atol=1e-6)
  # Rotation: channels (i, i + 3) turn by the pair's angle, channels 6 and 7 pass through.
  x = np.random.default_rng(7).normal(size=(1, 20, 2, 8)).astype(np.float32)
  got = np.asarray(rotary.apply_rotary(jnp.asarray(x), cos, sin))
  c, s = np.asarray(cos)[:, :, None, :3], np.asarray(sin)[:, :, None, :3]
  x1, x2 = x[..., :3], x[..., 3:6]
  np.testing.assert_allclose(got[..., :3], x1 * c - x2 * s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[..., 3:6], x2 * c + x1 * s, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[..., 6:], x[..., 6:])
