"""Attention backends vs the reference on packed rows: values, gradients, KV-cache shapes, memory, the full model.

Tolerance: every backend does the same float32 math as the reference in another order (online softmax, blocked
sums), so outputs and gradients agree to float32 rounding: rtol = atol = 1e-5 on values of order 1-5.
The cuDNN backend runs here with implementation="xla" (same padding, mask and GQA wiring; cuDNN itself needs an
NVIDIA GPU and is checked by `attention_gpu.gpu_check`). Splash runs in Pallas interpret mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_probe import max_array_size

import phi_jax
from phi_jax.model import attention, presets
from phi_jax.model.attention_blockwise import blockwise_attention
from phi_jax.model.attention_gpu import cudnn_attention, gpu_check, segment_runs
from phi_jax.model.attention_splash import splash_attention
from phi_jax.model.config import ATTENTION_BACKENDS

B, T, N, K, H = 2, 200, 4, 2, 16  # T is a multiple of neither the blockwise (64, 48) nor the splash (128) blocks
TOL = dict(rtol=1e-5, atol=1e-5)

BACKENDS = {
    "blockwise": functools.partial(blockwise_attention, block_q=64, block_kv=48),
    "splash": functools.partial(splash_attention, block_q=128, block_kv=128),
    "cudnn_wiring": functools.partial(cudnn_attention, implementation="xla"),
}


def _packed_segments():
  """Row 0: three documents and a padded tail; row 1: two documents and a shorter tail."""
  seg = np.zeros((B, T), np.int32)
  seg[0, :60], seg[0, 60:141], seg[0, 141:183] = 1, 2, 3
  seg[1, :110], seg[1, 110:197] = 1, 2
  return seg


@pytest.fixture(scope="module")
def packed():
  rng = np.random.default_rng(0)
  seg = _packed_segments()
  idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  # Callers mask padding queries out of every loss; the cotangent does the same.
  weights = jnp.asarray(rng.normal(size=(B, T, N, H)) * (seg != 0)[:, :, None, None], jnp.float32)
  return dict(q=q, k=k, v=v, seg=jnp.asarray(seg), idx=jnp.asarray(idx), weights=weights, valid=seg != 0)


def _loss_and_grads(fn, packed):
  def loss(q, k, v):
    out = fn(q, k, v, q_segment_ids=packed["seg"], kv_segment_ids=packed["seg"], q_index=packed["idx"],
             kv_index=packed["idx"])
    return jnp.sum(out * packed["weights"]), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(packed["q"], packed["k"], packed["v"])


@pytest.fixture(scope="module")
def reference(packed):
  return _loss_and_grads(attention.xla_attention, packed)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_reference_on_packed_rows(name, packed, reference):
  (loss, out), grads = _loss_and_grads(BACKENDS[name], packed)
  (ref_loss, ref_out), ref_grads = reference
  assert np.all(np.isfinite(out))  # padding queries included
  valid = packed["valid"]
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref_out)[valid], **TOL)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), **TOL)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def _cache_layout(rng, queries, slots, lengths, decode):
  """KV-cache attention: S cache slots filled up to `lengths`; queries at the next slot (decode) or slots 0..T."""
  kv_seg = (np.arange(slots)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  kv_idx = np.broadcast_to(np.arange(slots, dtype=np.int32), (len(lengths), slots))
  if decode:
    kv_seg[np.arange(len(lengths)), lengths] = 1  # the new token's slot, written before attending
    q_seg, q_idx = np.ones((len(lengths), 1), np.int32), np.asarray(lengths, np.int32)[:, None]
  else:
    q_idx = np.broadcast_to(np.arange(queries, dtype=np.int32), (len(lengths), queries))
    q_seg = kv_seg[:, :queries]
  q = rng.normal(size=(len(lengths), queries, N, H)).astype(np.float32)
  k, v = (rng.normal(size=(len(lengths), slots, K, H)).astype(np.float32) for _ in range(2))
  args = tuple(jnp.asarray(x) for x in (q, k, v))
  masks = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg), q_index=jnp.asarray(q_idx),
               kv_index=jnp.asarray(kv_idx))
  return args, masks, q_seg != 0


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_backend_matches_reference_on_kv_cache_shapes(name, decode):
  """Decode: T=1 at each row's next slot against 150 slots; prefill: a 100-token prompt into 150 slots."""
  rng = np.random.default_rng(1)
  args, masks, valid = _cache_layout(rng, 1 if decode else 100, 150, [37, 99], decode)
  expected = attention.xla_attention(*args, **masks)
  actual = jax.jit(functools.partial(BACKENDS[name], **masks))(*args)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(np.asarray(actual)[valid], np.asarray(expected)[valid], **TOL)


def _decode(q, k, v, masks, block_size):
  """`decode_attention` on keys and values [B, S, K, H] put into the cache's decode layout."""
  return jax.jit(functools.partial(attention.decode_attention, **masks))(
      q, *attention.to_decode_layout(k, v, block_size))


def test_decode_layout_round_trips_and_puts_each_slot_in_its_block():
  rng = np.random.default_rng(3)
  k, v = (jnp.asarray(rng.normal(size=(2, 192, K, H)).astype(np.float32)) for _ in range(2))
  k_blocks, v_blocks = attention.to_decode_layout(k, v, 64)
  assert k_blocks.shape == (3, 2, K, H, 64) and v_blocks.shape == (3, 2, K, 64, H)
  np.testing.assert_array_equal(k_blocks[2, 1, :, :, 5], k[1, 2 * 64 + 5])  # slot 133 of row 1
  np.testing.assert_array_equal(v_blocks[2, 1, :, 5, :], v[1, 2 * 64 + 5])
  for original, back in zip((k, v), attention.from_decode_layout(k_blocks, v_blocks)):
    np.testing.assert_array_equal(back, original)
  with pytest.raises(ValueError, match="pad the cache"):
    attention.to_decode_layout(k, v, 100)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_decode_attention_on_cache_layout_matches_reference(decode):
  """One block over the whole 150-slot cache: the one-pass form."""
  rng = np.random.default_rng(4)
  (q, k, v), masks, valid = _cache_layout(rng, 1 if decode else 100, 150, [37, 99], decode)
  expected = attention.xla_attention(q, k, v, **masks)
  actual = _decode(q, k, v, masks, 150)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(np.asarray(actual)[valid], np.asarray(expected)[valid], **TOL)


@pytest.mark.parametrize("block_size", [16, 48, 64, 192], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_decode_attention_blocks_match_reference(block_size, decode):
  """Blocks of 16, 48 and 64 slots over a 192-slot cache filled to slot 130 (the last visited block partly
  filled), and one block over the whole cache."""
  rng = np.random.default_rng(5)
  (q, k, v), masks, valid = _cache_layout(rng, 1 if decode else 100, 192, [37, 130], decode)
  expected = attention.xla_attention(q, k, v, **masks)
  actual = _decode(q, k, v, masks, block_size)
  np.testing.assert_allclose(np.asarray(actual)[valid], np.asarray(expected)[valid], **TOL)


@pytest.mark.parametrize("batch,slots", [(8, 384), (64, 384), (16, 1152), (8, 2048), (64, 100), (2, 150)])
def test_decode_block_size_splits_the_cache_into_even_blocks_within_the_byte_budget(batch, slots):
  block = attention.decode_block_size(batch, K, 64, slots, jnp.float32)
  budget_slots = attention._DECODE_BLOCK_BYTES["cpu"] // (batch * K * 64 * 4)
  num_blocks = -(-slots // block)
  if block == slots:  # one pass: the whole cache fits the budget
    assert slots <= max(64, budget_slots)
  else:
    assert block % 64 == 0 and block <= max(64, budget_slots)
    assert num_blocks * block - slots < 64 * num_blocks  # even blocks: rounding up to whole blocks adds little
    assert -(-slots // max(64, budget_slots)) == num_blocks  # as few blocks as the budget allows


def test_decode_attention_reads_only_the_blocks_up_to_the_last_filled_slot():
  """Slots past the longest row's filled extent hold NaN: the blocked loop never reaches them."""
  rng = np.random.default_rng(6)
  (q, k, v), masks, valid = _cache_layout(rng, 1, 256, [20, 70], decode=True)  # filled: slots 0..70
  expected = attention.xla_attention(q, k, v, **masks)
  poisoned = lambda x: x.at[:, 128:].set(jnp.nan)  # the third and fourth 64-slot blocks
  actual = _decode(q, poisoned(k), poisoned(v), masks, 64)
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **TOL)
  whole = _decode(q, poisoned(k), poisoned(v), masks, 256)  # one block: reads every slot
  assert np.isnan(np.asarray(whole)).all()


@pytest.mark.parametrize("lengths", [[0, 0], [0, 200]], ids=["empty_cache", "empty_row_beside_a_filled_one"])
def test_decode_attention_gives_zeros_to_rows_with_no_valid_slot(lengths):
  """A row with no valid slot gets zeros, not 0 / 0 (the one-pass form gives a finite average), both when the loop
  visits no block and when it visits blocks that hold only other rows' keys; the filled row matches the reference."""
  rng = np.random.default_rng(7)
  (q, k, v), masks, valid = _cache_layout(rng, 1, 256, lengths, decode=False)
  out = _decode(q, k, v, masks, 64)
  np.testing.assert_array_equal(np.asarray(out)[~valid], 0.0)
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(attention.xla_attention(q, k, v, **masks))[valid],
                             **TOL)


def test_blockwise_forward_and_backward_hold_no_score_matrix():
  t = s = 1024
  shapes = (jax.ShapeDtypeStruct((1, t, N, H), jnp.float32), jax.ShapeDtypeStruct((1, s, K, H), jnp.float32),
            jax.ShapeDtypeStruct((1, s, K, H), jnp.float32))
  ids = jnp.ones((1, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (1, t))

  def grad_jaxpr(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_segment_ids=ids[0], kv_segment_ids=ids[0], q_index=ids[1],
                                      kv_index=ids[1]))
    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*shapes).jaxpr

  assert max_array_size(grad_jaxpr(attention.xla_attention)) >= t * s  # the probe sees scores when they exist
  assert max_array_size(grad_jaxpr(functools.partial(blockwise_attention, block_q=128, block_kv=128))) < t * s


@pytest.mark.parametrize("in_layer_scan", [False, True])
def test_blockwise_compiled_memory_is_linear(in_layer_scan):
  """XLA's buffer assignment for forward + backward: far below one head's [T, S] scores, and ~linear in T.

  Inside a differentiated `lax.scan` over layers (the decoder's layer scan) with loop-invariant segment ids, JAX
  hoists loop-invariant work out of the loop; work inside the attention's block loops must not be hoisted and
  stacked per tile (that is quadratic).
  """
  def temp_bytes(t):
    shapes = (jax.ShapeDtypeStruct((1, t, N, H), jnp.float32), jax.ShapeDtypeStruct((1, t, K, H), jnp.float32),
              jax.ShapeDtypeStruct((1, t, K, H), jnp.float32), jax.ShapeDtypeStruct((1, t), jnp.int32))
    attend = lambda q, k, v, ids: blockwise_attention(
        q, k, v, q_segment_ids=ids, kv_segment_ids=ids, q_index=ids, kv_index=ids, block_q=256, block_kv=256)

    def loss(q, k, v, ids):
      if not in_layer_scan:
        return jnp.sum(attend(q, k, v, ids))
      layer = lambda x, scale: (x + attend(x * scale, k, v, ids), None)
      return jnp.sum(jax.lax.scan(layer, q, jnp.ones((2,)))[0])

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  short, long = temp_bytes(2048), temp_bytes(8192)
  assert long < (0.1 if in_layer_scan else 0.05) * 8192 * 8192 * 4
  assert long < 6 * short  # 4x the tokens: linear growth (plus the fixed tiles), not 16x


def test_full_model_blockwise_equals_xla_on_packed_rows():
  config = phi_jax.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)
  params = phi_jax.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, 64, size=(2, 40)), jnp.int32)
  seg = np.zeros((2, 40), np.int32)
  seg[0, :13], seg[0, 13:30], seg[0, 30:36] = 1, 2, 3
  seg[1, :25], seg[1, 25:40] = 1, 2
  positions = np.concatenate([np.arange(n) for n in (13, 17, 6, 4, 25, 15)]).reshape(2, 40)
  inputs = dict(positions=jnp.asarray(positions, jnp.int32), segment_ids=jnp.asarray(seg))
  expected = phi_jax.forward(params, tokens, config, **inputs)
  actual = phi_jax.forward(params, tokens, config.replace(attention_backend="blockwise"), **inputs)
  valid = seg != 0
  np.testing.assert_allclose(np.asarray(actual)[valid], np.asarray(expected)[valid], **TOL)


def test_splash_on_a_mesh_runs_per_device_and_lowers_for_tpu(monkeypatch):
  """Under a data x fsdp x tensor mesh the splash kernel runs in shard_map, each device on its rows and heads: the
  model's loss and gradients equal the reference backend's on packed rows (interpret mode), and the forward lowers
  for TPU on 8 devices (XLA refuses to partition a Mosaic kernel, so without shard_map it failed on any pod)."""
  from phi_jax import sharding
  from phi_jax.sharding.rules import mesh_context
  config = phi_jax.PhiConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, max_position_embeddings=256, initializer_range=0.3)
  params = phi_jax.init_params(config, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 64, (4, 128)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[:, 60:], seg[1, 100:] = 2, 0
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

  def loss(params, backend):
    logits = phi_jax.forward(params, tokens, config.replace(attention_backend=backend), segment_ids=seg)
    return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) / 1e4

  expected = jax.value_and_grad(loss)(params, "xla")
  with mesh_context(mesh):
    actual = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "splash")
  np.testing.assert_allclose(float(actual[0]), float(expected[0]), rtol=1e-5)
  for a, e in zip(jax.tree.leaves(actual[1]), jax.tree.leaves(expected[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-3, atol=1e-5)

  # Three rows, which the mesh's four row shards do not divide (an eval or rollout batch): run replicated over the
  # axis that does not divide them (a shard_map error before).
  with mesh_context(mesh):
    odd = jax.jit(lambda p: phi_jax.forward(p, tokens[:3], config.replace(attention_backend="splash"),
                                            segment_ids=seg[:3]))(params)
  np.testing.assert_allclose(np.asarray(odd)[seg[:3] > 0], np.asarray(phi_jax.forward(
      params, tokens[:3], config, segment_ids=seg[:3]))[seg[:3] > 0], rtol=1e-4, atol=1e-4)

  monkeypatch.setitem(attention._BACKENDS, "splash", functools.partial(splash_attention, interpret=False))
  tpu = config.replace(head_dim=128, dtype="bfloat16", attention_backend="splash")
  shapes = jax.eval_shape(lambda: phi_jax.init_params(config.replace(head_dim=128), jax.random.key(0)))
  with mesh_context(mesh):
    forward = jax.jit(lambda p, t: phi_jax.forward(p, t, tpu, segment_ids=jnp.ones_like(t)))
    jax.export.export(forward, platforms=["tpu"])(shapes, jax.ShapeDtypeStruct((4, 256), jnp.int32))


def test_gpu_check_runs_its_comparison():
  """The GPU check's own code path, with XLA in place of cuDNN so it runs here; float32 inputs, so every backend
  must match the float32 reference to float32 accuracy."""
  results = gpu_check(batch=1, length=48, num_heads=4, num_kv_heads=2, head_dim=16, dtype=jnp.float32, repeats=1,
                      implementation="xla")
  for name in ("xla", "cudnn", "cudnn_dense", "blockwise"):
    assert all(results[f"{name}_{g}_rel_err"] < 1e-5 for g in ("out", "dq", "dk", "dv")), results
    assert results[f"{name}_ms"] > 0


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="not available"):
    attention.backend_function("flash")
  with pytest.raises(ValueError, match="attention_backend"):
    phi_jax.PhiConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      attention_backend="flash")
  assert all(callable(attention.backend_function(name)) for name in ATTENTION_BACKENDS)


def test_segment_runs_match_a_numpy_walk_of_each_row():
  seg = np.array([[1, 1, 2, 2, 2, 0, 3, 0],    # a padding gap between documents
                  [5, 5, 5, 5, 9, 9, 0, 0],    # ids need only increase
                  [1, 1, 2, 2, 1, 1, 0, 0],    # id 1 comes back: one document in two runs
                  [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  offsets, lengths, exact = jax.jit(segment_runs, static_argnums=1)(jnp.asarray(seg), 4)
  for row in range(len(seg)):
    runs = [(start, end - start) for start, end in _numpy_runs(seg[row])]
    expect_offsets = [r[0] for r in runs] + [-1] * (5 - len(runs))
    expect_lengths = [r[1] for r in runs] + [-1] * (4 - len(runs))
    assert list(np.asarray(offsets[row])) == expect_offsets and list(np.asarray(lengths[row])) == expect_lengths
  assert not exact  # row 2
  assert jax.jit(segment_runs, static_argnums=1)(jnp.asarray(seg[[0, 1, 3]]), 4)[2]
  assert not jax.jit(segment_runs, static_argnums=1)(jnp.asarray(seg[[0, 1, 3]]), 2)[2]  # row 0 has 3 runs
  assert not segment_runs(jnp.asarray([[1, 1, 0, 1, 1, 0, 0, 0]], jnp.int32), 4)[2]  # id 1 back after a gap
  # One run allowed: the arrays still have room for two, since JAX's cuDNN call ignores starts of a [B, 2] shape
  # (row 1 below starts at slot 2, which it would take as 0).
  offsets, lengths, exact = segment_runs(jnp.asarray([[1, 1, 1, 0], [0, 0, 1, 1]], jnp.int32), 1)
  assert np.asarray(offsets).tolist() == [[0, -1, -1], [2, -1, -1]] and np.asarray(lengths).tolist() == [[3, -1],
                                                                                                          [2, -1]]
  assert exact and not segment_runs(jnp.asarray([[1, 2, 0, 0]], jnp.int32), 1)[2]  # two runs > max_runs 1


def _numpy_runs(row):
  runs, start = [], None
  for i, value in enumerate(list(row) + [0]):
    if start is not None and (value != row[start]):
      runs.append((start, i))
      start = None
    if start is None and value != 0 and i < len(row):
      start = i
  return runs


@pytest.mark.parametrize("case", ["repeated_id", "too_many_runs"])
def test_cudnn_wiring_falls_back_to_the_dense_mask_where_runs_cannot_describe_a_row(case, packed):
  """The packed path's cases that need the dense mask: a document id that comes back after another (both runs
  attend each other) and more documents than `max_runs`."""
  seg = np.asarray(packed["seg"]).copy()
  max_runs = 64
  if case == "repeated_id":
    seg[0, 141:183] = 1  # row 0's third document reuses the first one's id
  else:
    max_runs = 2  # row 0 has three documents
  inputs = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), q_index=packed["idx"],
                kv_index=packed["idx"])
  assert not segment_runs(inputs["q_segment_ids"], max_runs)[2]
  expected = attention.xla_attention(packed["q"], packed["k"], packed["v"], **inputs)
  actual = cudnn_attention(packed["q"], packed["k"], packed["v"], implementation="xla", max_runs=max_runs, **inputs)
  valid = seg != 0
  np.testing.assert_allclose(np.asarray(actual)[valid], np.asarray(expected)[valid], **TOL)


def test_the_cudnn_key_offsets_probe_tells_a_fixed_jax_from_one_before_the_fix(monkeypatch):
  """Before jax-ml/jax#39521 the packed layout's key offsets were scaled by the query heads (wrong keys under GQA,
  with no error); the probe that sends GQA rows to the dense mask there tells the two behaviours apart."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha
  from phi_jax.model import attention_gpu

  def offsets_scaled_by(heads_of):  # in jnp, as JAX's own: called while the model is traced, it must still answer
    def fix(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
      tokens = lambda x, width: jnp.where(x >= 0, x, width)
      b, t, n, h = query.shape
      return (q_seqlen, kv_seqlen, tokens(q_offsets, b * t) * n * h,
              tokens(kv_offsets, b * t) * heads_of(query, key) * h)
    return fix

  probe = attention_gpu.cudnn_offsets_fit_grouped_keys.__wrapped__
  for heads_of, fits in ((lambda q, k: q.shape[2], False), (lambda q, k: k.shape[2], True)):
    monkeypatch.setattr(cudnn_fmha, "_fix_seqlen_offsets", offsets_scaled_by(heads_of))
    answers = []
    jax.jit(lambda x: answers.append(probe()) or x)(0)
    assert probe() is fits and answers == [fits]
  monkeypatch.setattr(cudnn_fmha, "_fix_seqlen_offsets", None)  # a JAX without the function: not trusted
  assert attention_gpu.cudnn_offsets_fit_grouped_keys.__wrapped__() is False


def test_max_segments_per_row_reaches_the_cudnn_backend_only(monkeypatch):
  seen = {}
  monkeypatch.setattr(attention, "backend_function", lambda name: lambda *args, **kwargs: seen.update({name: kwargs}))
  masks = dict(q_segment_ids=None, kv_segment_ids=None, q_index=None, kv_index=None)
  for backend in ("cudnn", "blockwise"):
    attention.attend(None, None, None, backend=backend, max_segments_per_row=3, **masks)
  assert seen["cudnn"]["max_runs"] == 3 and "max_runs" not in seen["blockwise"]
  with pytest.raises(ValueError, match="max_segments_per_row"):
    presets.get("tiny", max_segments_per_row=-1)


def test_blockwise_keeps_a_tile_whose_only_visible_pair_is_on_the_diagonal():
  """Blocks of 5 queries and 4 keys over 8 tokens: the tile of queries 0-4 and keys 4-7 holds a single visible
  pair (query 4 on its own key 4); skipping that tile would drop key 4 from query 4's average."""
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((1, 8, 2, 8), (1, 8, 1, 8), (1, 8, 1, 8)))
  ids = dict(q_segment_ids=jnp.ones((1, 8), jnp.int32), kv_segment_ids=jnp.ones((1, 8), jnp.int32),
             q_index=jnp.arange(8)[None], kv_index=jnp.arange(8)[None])
  actual = jax.jit(functools.partial(blockwise_attention, block_q=5, block_kv=4, **ids))(q, k, v)
  np.testing.assert_allclose(actual, attention.xla_attention(q, k, v, **ids), **TOL)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a host without CUDA GPUs")
def test_cudnn_backend_without_a_cuda_gpu_names_the_backend_to_use_instead():
  """On a CPU host cuDNN failed deep inside JAX ("cuDNN is not detected."), naming neither the setting nor a fix.
  The wiring itself still runs here with implementation="xla" (the tests above)."""
  config = presets.get("tiny", attention_backend="cudnn")
  params = phi_jax.init_params(config, jax.random.key(0))
  message = r'attention_backend="cudnn" needs an NVIDIA GPU.*model.overrides=\{"attention_backend": "xla"\}'
  with pytest.raises(ValueError, match=message):
    phi_jax.forward(params, jnp.ones((2, 8), jnp.int32), config)
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  ids = dict(q_segment_ids=jnp.ones((1, 4), jnp.int32), kv_segment_ids=jnp.ones((1, 4), jnp.int32),
             q_index=jnp.arange(4)[None], kv_index=jnp.arange(4)[None])
  with pytest.raises(ValueError, match=message):
    cudnn_attention(q, q, q, **ids)
