"""Causal, segment-aware grouped-query attention: one signature, several backends.

Axis letters: B batch, T query time, S key/value time, N query heads, K kv heads, G = N // K query heads per
kv head, H head_dim.

Masking rule shared by every backend: query t may attend key s iff
  kv_segment_ids[s] == q_segment_ids[t]  (same packed document),
  kv_segment_ids[s] != 0                 (not padding or an empty cache slot), and
  kv_index[s] <= q_index[t]              (causal, by slot in the row or the KV cache).
Padding queries see nothing valid; they get a finite (uniform) average instead of NaN, and callers mask them out
of every loss.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index):
  """Boolean [B, T, S] mask implementing the rule in the module docstring."""
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  valid_key = (kv_segment_ids != 0)[:, None, :]
  causal = kv_index[:, None, :] <= q_index[:, :, None]
  return same_segment & valid_key & causal


def xla_attention(q_BTNH, k_BSKH, v_BSKH, *, q_segment_ids, kv_segment_ids, q_index, kv_index):
  """Reference backend: explicit scores in float32. Works on any device; memory is O(T * S) per head."""
  b, t, n, h = q_BTNH.shape
  k_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores = scores * (h ** -0.5)
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q_BTNH.dtype)


def decode_attention(q_BTNH, k_NBKHC, v_NBKCH, *, q_segment_ids, kv_segment_ids, q_index, kv_index):
  """Attention of a few query tokens against a KV cache in decode layout, reading only its filled prefix.

  The cache is kept as NB blocks of C slots, slot s in block s // C at offset s % C: keys [NB, B, K, H, C] and
  values [NB, B, K, C, H] (`to_decode_layout`; the masks stay [B, S] with S = NB * C). Both products are then
  plain batched matmuls over (b, k) on one contiguous block, with no transpose or strided copy of the cache: with
  keys as [B, S, K, H], XLA:CPU copied the whole cache into a transposed layout at every decode step, and with
  [B, K, H, S] it copied each block out of the slot axis element by element. Used by the decoder for one-token
  steps whatever the backend (a decode step reads the cache once; no backend saves anything there).

  A cache is allocated for the longest generation, so most steps find most of it empty. The blocks are visited
  with an online softmax in a loop that stops after the last block holding a valid slot of any row, so a step
  costs what the filled part costs. A cache of one block is the plain one-pass computation.
  """
  num_blocks, b, k_heads, h, c = k_NBKHC.shape
  if num_blocks == 1:
    return _decode_attention_one_pass(q_BTNH, k_NBKHC[0], v_NBKCH[0], q_segment_ids=q_segment_ids,
                                      kv_segment_ids=kv_segment_ids, q_index=q_index, kv_index=kv_index)
  t = q_BTNH.shape[1]
  q_BKMH = _queries_by_kv_head(q_BTNH, k_heads)
  rows = q_BKMH.shape[2]
  slots = jnp.arange(num_blocks * c)
  filled = jnp.max(jnp.where(kv_segment_ids != 0, slots + 1, 0))  # one past the last valid slot of any row
  visited = (filled + c - 1) // c

  def visit(i, carry):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
    block = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)
    mask = attention_mask(q_segment_ids, take(kv_segment_ids), q_index, take(kv_index))  # [B, T, C]
    scores = jnp.einsum("bkmh,bkhc->bkmc", q_BKMH, block(k_NBKHC), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, k_heads, -1, t, c) * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf).reshape(b, k_heads, rows, c)
    return online_softmax_step(carry, scores, block(v_NBKCH))

  init = (jnp.full((b, k_heads, rows), -jnp.inf, jnp.float32), jnp.zeros((b, k_heads, rows), jnp.float32),
          jnp.zeros((b, k_heads, rows, h), jnp.float32))
  _, denominator, acc = jax.lax.fori_loop(0, visited, visit, init)
  # A row's denominator is at least exp(0) = 1 once it has seen a visible key (its maximum); zero means a row with
  # no valid slot at all, whose queries get zeros rather than 0 / 0.
  return _heads_from_kv_groups(acc / jnp.maximum(denominator, 1.0)[..., None], q_BTNH)


def to_decode_layout(k_BSKH, v_BSKH, block_size):
  """Keys and values [B, S, K, H] -> the decode layout of `decode_attention`: keys [NB, B, K, H, C], values
  [NB, B, K, C, H] with C = block_size, which must divide S."""
  b, s, k_heads, h = k_BSKH.shape
  if s % block_size:
    raise ValueError(f"{s} cache slots do not split into blocks of {block_size}; pad the cache to a multiple")
  blocks = lambda x: x.reshape(b, s // block_size, block_size, k_heads, h)  # [B, NB, C, K, H]
  return blocks(k_BSKH).transpose(1, 0, 3, 4, 2), blocks(v_BSKH).transpose(1, 0, 3, 2, 4)


def from_decode_layout(k_NBKHC, v_NBKCH):
  """The inverse of `to_decode_layout`: keys and values as [B, S, K, H] (to read a cache slot by slot)."""
  num_blocks, b, k_heads, h, c = k_NBKHC.shape
  slots = lambda x: x.reshape(b, num_blocks * c, k_heads, h)
  return slots(k_NBKHC.transpose(1, 0, 4, 2, 3)), slots(v_NBKCH.transpose(1, 0, 3, 2, 4))


def online_softmax_step(carry, scores_BKMC, v_BKCH):
  """Folds one block of keys into a running softmax-weighted sum (the FlashAttention recurrence).

  carry: (running max [B, K, M], denominator [B, K, M], unnormalised output [B, K, M, H]), all float32; scores are
  -inf where masked. A row that has seen no visible key keeps max -inf and denominator 0, and the final output is
  acc / denominator wherever the denominator is positive. Shared by `decode_attention` and the blockwise backend.
  """
  running_max, denominator, acc = carry
  new_max = jnp.maximum(running_max, jnp.max(scores_BKMC, axis=-1))
  safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows with nothing visible yet: avoid inf - inf
  probs = jnp.exp(scores_BKMC - safe_max[..., None])
  rescale = jnp.exp(running_max - safe_max)
  pv = jnp.einsum("bkmc,bkch->bkmh", probs.astype(v_BKCH.dtype), v_BKCH, preferred_element_type=jnp.float32)
  return new_max, denominator * rescale + jnp.sum(probs, axis=-1), acc * rescale[..., None] + pv


def decode_block_size(batch, kv_heads, head_dim, slots, dtype):
  """Slots per block of a KV cache (`kv_cache.init_cache`, read by `decode_attention`): the slots split evenly
  into blocks of at most `_DECODE_BLOCK_BYTES` of keys (and at least 64 slots), each rounded up to a multiple of
  64. A cache that fits in one block is one pass.

  On a CPU a block of about 1 MiB of keys stays in cache between its two products; smaller blocks pay the loop's
  per-iteration cost more often. A GPU reads the cache at several TB/s and pays for every loop iteration (kernel
  launches, a predicate read back by the host), so it takes blocks of up to 256 MiB: one pass for the caches the
  device check decodes, a few blocks for long rollouts.
  """
  target = _DECODE_BLOCK_BYTES["cpu" if jax.default_backend() == "cpu" else "accelerator"]
  per_slot = batch * kv_heads * head_dim * jnp.dtype(dtype).itemsize
  ceil_div = lambda a, b: -(-a // b)
  num_blocks = ceil_div(slots, max(64, target // per_slot))
  return min(slots, ceil_div(ceil_div(slots, num_blocks), 64) * 64)


_DECODE_BLOCK_BYTES = {"cpu": 1 << 20, "accelerator": 256 << 20}


def _decode_attention_one_pass(q_BTNH, k_BKHS, v_BKSH, *, q_segment_ids, kv_segment_ids, q_index, kv_index):
  """`decode_attention` over the whole cache at once (the reference math in decode layout)."""
  b, t, n, h = q_BTNH.shape
  k_heads = k_BKHS.shape[1]
  q_BKMH = _queries_by_kv_head(q_BTNH, k_heads)
  scores = jnp.einsum("bkmh,bkhs->bkms", q_BKMH, k_BKHS, preferred_element_type=jnp.float32) * (h ** -0.5)
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index)  # [B, T, S]
  scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, k_heads, -1, t, scores.shape[-1]), _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype).reshape(b, k_heads, -1, scores.shape[-1])
  out = jnp.einsum("bkms,bksh->bkmh", probs, v_BKSH, preferred_element_type=jnp.float32)
  return _heads_from_kv_groups(out, q_BTNH)


def _queries_by_kv_head(q_BTNH, k_heads):
  """[B, T, N, H] -> [B, K, G * T, H]: the G query heads of a kv head and the T tokens as one row axis."""
  b, t, n, h = q_BTNH.shape
  return q_BTNH.reshape(b, t, k_heads, n // k_heads, h).transpose(0, 2, 3, 1, 4).reshape(b, k_heads, -1, h)


def _heads_from_kv_groups(out_BKMH, q_BTNH):
  """The inverse of `_queries_by_kv_head`, cast to the queries' dtype."""
  b, t, n, h = q_BTNH.shape
  k_heads = out_BKMH.shape[1]
  out = out_BKMH.reshape(b, k_heads, n // k_heads, t, h).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]
  return out.reshape(b, t, n, h).astype(q_BTNH.dtype)


# The other backends live in their own modules and are imported on first use ("module:function"), so importing
# the model never pulls in Pallas kernels, and those modules can build on the rule and reference defined here.
_BACKENDS = {
    "xla": xla_attention,
    "blockwise": "phi_jax.model.attention_blockwise:blockwise_attention",
    "cudnn": "phi_jax.model.attention_gpu:cudnn_attention",
    "splash": "phi_jax.model.attention_splash:splash_attention",
}


def backend_function(backend):
  """The attention function registered under `backend`."""
  if backend not in _BACKENDS:
    raise ValueError(f"attention backend {backend!r} is not available; choose one of {sorted(_BACKENDS)}")
  function = _BACKENDS[backend]
  if isinstance(function, str):
    module, name = function.split(":")
    function = getattr(importlib.import_module(module), name)
  return function


def attend(q_BTNH, k_BSKH, v_BSKH, *, q_segment_ids, kv_segment_ids, q_index, kv_index, backend="xla",
           max_segments_per_row=None):
  """Dispatches to the configured backend; all share the masking rule above and the head_dim ** -0.5 scale.

  `max_segments_per_row` (`PhiConfig.max_segments_per_row`) reaches the "cudnn" backend only; None: its default.
  """
  options = {"max_runs": max_segments_per_row} if backend == "cudnn" and max_segments_per_row is not None else {}
  return backend_function(backend)(
      q_BTNH, k_BSKH, v_BSKH,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_index=q_index, kv_index=kv_index, **options)
