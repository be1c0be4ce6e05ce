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


def decode_attention(q_BTNH, k_BKHS, v_BKSH, *, q_segment_ids, kv_segment_ids, q_index, kv_index):
  """The reference math for a few query tokens against a KV cache stored in decode layout.

  The cache keeps keys as [B, K, H, S] and values as [B, K, S, H], so both products are plain batched matmuls
  over (b, k) with no transpose of the cache: with keys as [B, S, K, H], XLA:CPU copied the whole cache into a
  transposed layout at every decode step. Used by the decoder for one-token steps whatever the backend (a
  decode step reads the cache once; no backend saves anything there).
  """
  b, t, n, h = q_BTNH.shape
  k_heads = k_BKHS.shape[1]
  q_BKGTH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h).transpose(0, 2, 3, 1, 4)
  q_BKMH = q_BKGTH.reshape(b, k_heads, -1, h)  # M = G * T query rows per kv head
  scores = jnp.einsum("bkmh,bkhs->bkms", q_BKMH, k_BKHS, preferred_element_type=jnp.float32) * (h ** -0.5)
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index)  # [B, T, S]
  scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, k_heads, -1, t, scores.shape[-1]), _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype).reshape(b, k_heads, -1, scores.shape[-1])
  out = jnp.einsum("bkms,bksh->bkmh", probs, v_BKSH, preferred_element_type=jnp.float32)
  out = out.reshape(b, k_heads, n // k_heads, t, h).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]
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
