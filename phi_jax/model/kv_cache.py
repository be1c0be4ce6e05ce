"""KV-cache decoding: prefill a batch of right-padded prompts of different lengths, then one token per step.

Layout: cache slot == position. Row b's prompt fills slots [0, len_b); its next token goes to slot len_b, so each
row advances independently and rotary positions never need a left-padding offset. A slot is valid when its
`segment_ids` entry is 1; pad slots stay 0 until a generated token overwrites them. `cache["layers"]` is a tuple
with one {k [NB, B, K, H, C], v [NB, B, K, C, H], segment_ids [B, S]} dict per layer (S = NB * C slots in
blocks of C, see `attention.decode_attention`), and the model runs with its layers
unrolled (`Decoder.unrolled`): a decode step then reads each weight and each cache entry once, in place.

LongRoPE (Phi-4-mini): rotary uses `short_factor` while a row's extent (length) is at most
`original_max_position_embeddings`, and `long_factor` beyond. When a row first crosses that boundary during
decoding, every cached key of the batch was rotated with the short factors, so the step re-runs the whole
sequence (prompt + generated tokens, kept in `cache["tokens"]`) through the model with the long factors and
rebuilds the cache. From then on the cache equals what a full forward of the final sequence computes, which is
what transformers' full forward gives for that sequence. The rebuild recomputes the cache in place, a chunk of
slots at a time up to the longest row, at each step where some row crosses (rows of different lengths cross at
different steps); it is compiled in only when the cache has more slots than the boundary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model import attention
from phi_jax.model.api import host_readable, logits_from_hidden
from phi_jax.model.config import PhiConfig
from phi_jax.model.decoder import Decoder, unstack_layers

Cache = dict[str, Any]


def init_cache(config: PhiConfig, batch_size: int, max_len: int, dtype=None, block_size: int | None = None) -> Cache:
  """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + generation).

  Keys and values are kept in blocks of `block_size` slots (default: `attention.decode_block_size`), in the layout
  `attention.decode_attention` reads; the slots are rounded up to whole blocks (the extra ones stay empty).
  """
  if block_size is not None and block_size < 1:
    raise ValueError(f"block_size={block_size}; give a positive number of slots per block, or None for the default")
  dtype = jnp.dtype(dtype or config.dtype)
  k, h = config.num_kv_heads, config.resolved_head_dim
  block = block_size or attention.decode_block_size(batch_size, k, h, max_len, dtype)
  num_blocks = -(-max_len // block)
  layer = lambda: {
      "k": jnp.zeros((num_blocks, batch_size, k, h, block), dtype),  # keys [NB, B, K, H, C], values
      "v": jnp.zeros((num_blocks, batch_size, k, block, h), dtype),  # [NB, B, K, C, H]: `attention.decode_attention`
      "segment_ids": jnp.zeros((batch_size, num_blocks * block), jnp.int32),
  }
  return {
      "layers": tuple(layer() for _ in range(config.num_layers)),
      "tokens": jnp.zeros((batch_size, num_blocks * block), jnp.int32),
      "lengths": jnp.zeros((batch_size,), jnp.int32),
  }


def _run(params, config, tokens_BT, positions_BT, segment_ids_BT, layer_caches, *, fills_empty_cache=False,
         rope_extent=None):
  # Unrolled layers (see `Decoder.unrolled`); callers that loop over steps unstack the params once, outside.
  return Decoder(config, unrolled=True, fills_empty_cache=fills_empty_cache).apply(
      {"params": unstack_layers(params)}, tokens_BT, positions_BT, segment_ids_BT, layer_caches,
      rope_extent=rope_extent)


def check_prompt_lengths(prompt_lengths_B, width: int) -> None:
  """Raises unless every prompt length is in [1, width], where this process can read the lengths."""
  if not host_readable(prompt_lengths_B):
    return
  lengths = np.asarray(prompt_lengths_B)
  if lengths.size and (lengths.min() < 1 or lengths.max() > width):
    raise ValueError(f"prompt_lengths {lengths.tolist()} must be between 1 and the prompt width {width}: every row "
                     "needs at least one prompt token to predict from")


def prefill(params, prompt_tokens_BT, prompt_lengths_B, cache: Cache, config: PhiConfig):
  """Runs right-padded prompts through the model into an empty cache; returns (next-token logits [B, V], cache)."""
  b, t = prompt_tokens_BT.shape
  if b != cache["tokens"].shape[0]:  # it would fail only at the first decode step, inside an einsum
    raise ValueError(f"{b} prompts for a cache of {cache['tokens'].shape[0]} rows: make it with "
                     f"init_cache(config, {b}, max_len)")
  if t > cache["tokens"].shape[1]:
    raise ValueError(f"a {t}-token prompt does not fit a cache of {cache['tokens'].shape[1]} slots: make it with "
                     "init_cache(config, batch_size, max_len) where max_len >= prompt width + new tokens")
  check_prompt_lengths(prompt_lengths_B, t)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segment_ids = (positions < prompt_lengths_B[:, None]).astype(jnp.int32)
  # Whatever follows a prompt is ignored: an id there outside the vocabulary would embed as NaN (`jnp.take`'s
  # fill), and 0 x NaN in the masked attention would spread it to the prompt.
  prompt_tokens_BT = prompt_tokens_BT * segment_ids
  h, layers = _run(params, config, prompt_tokens_BT, positions, segment_ids, cache["layers"], fills_empty_cache=True)
  last = jnp.take_along_axis(h, (prompt_lengths_B - 1)[:, None, None], axis=1)
  tokens = jax.lax.dynamic_update_slice(cache["tokens"], prompt_tokens_BT, (0, 0))
  cache = {"layers": layers, "tokens": tokens, "lengths": prompt_lengths_B.astype(jnp.int32)}
  return logits_from_hidden(params, last, config)[:, 0], cache


def _rebuild(params, config: PhiConfig, cache: Cache):
  """Recomputes every slot of the cache from the token history (used when LongRoPE switches to long factors).

  In place, a chunk of slots at a time: each chunk's keys and values are written over the stale ones and it attends
  over the cache so far (the stale slots after it are in its causal future). A single pass over the whole width
  held a second cache and full-width activations; for Phi-4-mini's 25K-token rollouts that was several times the
  memory of the generation itself.
  """
  b, s = cache["tokens"].shape
  # A chunk's scores against one block are [B, K, G * chunk, block]: at most a block, and 128 slots.
  chunk = min(cache["layers"][0]["k"].shape[-1], 128, s)
  lengths = cache["lengths"]

  def one_chunk(i, carry):
    layers, last = carry
    # The last chunk ends at the last slot, overlapping the one before when the chunk does not divide the slots:
    # recomputing a rebuilt slot gives it the same value again.
    start = jnp.minimum(i * chunk, s - chunk)
    positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    tokens = jax.lax.dynamic_slice_in_dim(cache["tokens"], start, chunk, axis=1)
    # Each row's rotary factors are those of its whole length, as a full forward of the row gives them.
    h, layers = _run(params, config, tokens, positions, segment_ids, layers, rope_extent=lengths[:, None])
    offset = lengths - 1 - start  # where each row's last token is in this chunk, if it is
    here = (offset >= 0) & (offset < chunk)
    h_last = jnp.take_along_axis(h, jnp.clip(offset, 0, chunk - 1)[:, None, None], axis=1)
    return layers, jnp.where(here[:, None, None], h_last, last)

  last = jnp.zeros((b, 1, config.hidden_size), jnp.dtype(config.dtype))
  filled = (jnp.max(lengths) + chunk - 1) // chunk  # chunks past every row's length hold nothing to recompute
  layers, last = jax.lax.fori_loop(0, filled, one_chunk, (cache["layers"], last))
  return last, layers


def decode_step(params, tokens_B, cache: Cache, config: PhiConfig, live_B=None):
  """Appends one token per row at slot `lengths[b]`; returns (next-token logits [B, V], cache).

  A row whose cache is already full cannot take the token: an error when `lengths` is concrete; under jit (where
  JAX would drop the out-of-range writes) that row's logits are NaN. `live_B` ([B] bool, default all) names the
  rows whose logits are used: only they trigger the LongRoPE rebuild when they cross the boundary (finished rows
  and batch padding still riding along would otherwise rebuild the whole cache for nothing); a row that crosses
  while not live keeps its short-factor entries, so its logits no longer equal a full forward's.
  """
  b, slots = tokens_B.shape[0], cache["tokens"].shape[1]
  if host_readable(cache["lengths"]) and np.any(np.asarray(cache["lengths"]) >= slots):
    raise ValueError(f"the KV cache is full (lengths {np.asarray(cache['lengths']).tolist()}, {slots} slots): "
                     "give init_cache a max_len of at least the prompt plus the tokens to decode")
  positions = cache["lengths"][:, None]
  rows = jnp.arange(b)
  history = cache["tokens"].at[rows, cache["lengths"]].set(tokens_B)
  new_lengths = cache["lengths"] + 1

  def incremental(_):
    return _run(params, config, tokens_B[:, None], positions, jnp.ones((b, 1), jnp.int32), cache["layers"])

  boundary = config.original_max_positions
  # A cache of at most `boundary` slots holds no row that could cross it: no rebuild to compile (its full-width
  # forward pass would count towards the program's memory even never taken).
  if config.rope_scaling_type == "longrope" and slots > boundary:
    crossing = (new_lengths > boundary) & (cache["lengths"] <= boundary)
    crossing = jnp.any(crossing if live_B is None else crossing & live_B)
    rebuild = lambda _: _rebuild(params, config, {"tokens": history, "lengths": new_lengths, "layers": cache["layers"]})
    h, layers = jax.lax.cond(crossing, rebuild, incremental, None)
  else:
    h, layers = incremental(None)
  cache = {"layers": layers, "tokens": history, "lengths": new_lengths}
  logits = logits_from_hidden(params, h, config)[:, 0]
  return jnp.where((new_lengths > slots)[:, None], jnp.nan, logits), cache
