"""Rotary position embeddings: default, partial (Phi-4-mini rotates 96 of 128 dims) and LongRoPE.

Conventions follow transformers' Phi-3 code exactly (NeoX half-split, float32 angles, cos/sin scaled by the
LongRoPE attention factor for every sequence length).

LongRoPE picks `short_factor` or `long_factor` from the *extent* of a sequence (its largest position + 1)
compared with `original_max_position_embeddings`. transformers takes the extent of the whole batch; phi_jax
takes it per packed segment, so a document gets the same rotary whether it is alone, padded, or packed with
others. For a batch of one unpacked sequence the two rules agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model.config import PhiConfig


def inverse_frequencies(config: PhiConfig, factors=None) -> np.ndarray:
  """inv_freq[i] = 1 / (factor[i] * theta ** (2i / rotary_dim)), float32, shape [rotary_dim // 2]."""
  dim = config.rotary_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  base = np.float32(config.rope_theta) ** exponents
  if factors is not None:
    base = np.asarray(factors, np.float32) * base
  return (1.0 / base).astype(np.float32)


def segment_extent(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, T] -> [B, T]: for each token, 1 + the largest position in its segment (its sequence's extent)."""
  t = positions.shape[1]

  def one_row(pos, seg):
    # Segment ids may be any integers (document ids, say): renumber them 0..T-1, equal ids staying equal, so none
    # falls outside segment_max's range.
    _, dense = jnp.unique(seg, size=t, return_inverse=True)
    dense = dense.reshape(t)
    return jax.ops.segment_max(pos, dense, num_segments=t)[dense] + 1

  return jax.vmap(one_row)(positions, segment_ids)


def rotary_angles(config: PhiConfig, positions: jax.Array, segment_ids: jax.Array, extent=None):
  """Returns (cos, sin) of shape [B, T, rotary_dim], float32, including the LongRoPE attention factor.

  `extent` ([B, T] or [B, 1]): the sequence extents LongRoPE compares with its boundary, where the tokens given are a
  chunk of longer sequences (a KV-cache rebuild); default: each segment's extent among the tokens given."""
  positions = positions.astype(jnp.int32)
  if config.rope_scaling_type == "longrope":
    if config.rope_short_factor is None or config.rope_long_factor is None:
      raise ValueError(
          "LongRoPE short/long factors are not set. They are read from the checkpoint's config.json by "
          "phi_jax.load_hf; for a from-scratch run pass PhiConfig(rope_short_factor=..., rope_long_factor=...).")
    short = jnp.asarray(inverse_frequencies(config, config.rope_short_factor))
    long = jnp.asarray(inverse_frequencies(config, config.rope_long_factor))
    extent = segment_extent(positions, segment_ids) if extent is None else extent
    use_long = extent > config.original_max_positions
    inv_freq = jnp.where(use_long[..., None], long, short)  # [B, T, rotary_dim // 2]
    scale = config.rope_attention_scale
  else:
    inv_freq = jnp.asarray(inverse_frequencies(config))[None, None, :]
    scale = 1.0
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rotary(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
  """Rotates the first R = rotary_dim channels of each head (NeoX half split); the rest pass through."""
  rot_dim = cos_BTR.shape[-1]
  cos = cos_BTR[:, :, None, :].astype(x_BTNH.dtype)
  sin = sin_BTR[:, :, None, :].astype(x_BTNH.dtype)
  x_rot, x_pass = x_BTNH[..., :rot_dim], x_BTNH[..., rot_dim:]
  half = rot_dim // 2
  rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos + rotated_half * sin
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
