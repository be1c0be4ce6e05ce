"""Choosing the next token from logits: temperature, top-k, top-p (nucleus) and greedy.

    tokens_B, sampling_logprobs_B = sample_tokens(logits_BV, rng, temperature, top_k=50, top_p=0.95)

Order, as in transformers' and vLLM's samplers: divide the logits by the temperature, keep the `top_k` largest,
then keep the nucleus of what remains (the smallest set of tokens, largest first, whose renormalised probability
adds up to at least `top_p`; the most likely token is always kept), renormalise and draw. A temperature of 0 means
greedy: the argmax of the raw logits. The temperature is a traced value (GRPO anneals it during training without
recompiling); `top_k` and `top_p` are static because they change the shapes of the program.

Filters cut at a logit threshold, so tokens tied with the last kept logit are kept too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets every logit outside the top-k and outside the nucleus to -inf. `top_k=0` and `top_p>=1` switch off."""
  vocab = logits_BV.shape[-1]
  use_top_k = 0 < top_k < vocab
  use_top_p = top_p < 1.0
  if not (use_top_k or use_top_p):
    return logits_BV
  if not use_top_k:  # the nucleus alone, found without sorting the vocabulary
    return jnp.where(_order_keys(logits_BV) >= _nucleus_threshold_key(logits_BV, top_p), logits_BV, -jnp.inf)
  # Only the k largest can survive both filters, so the nucleus is computed over them (one top_k, no full sort).
  sorted_BC = jax.lax.top_k(logits_BV, top_k)[0]
  threshold_B1 = sorted_BC[..., -1:]
  if use_top_p:
    # Tokens tied with the k-th logit beyond the k that top_k returned survive top-k too; they count in the
    # normaliser of the nucleus (they would all sort after the k values, so only the normaliser changes).
    extra_ties_B1 = (jnp.sum(logits_BV == threshold_B1, axis=-1, keepdims=True)
                     - jnp.sum(sorted_BC == threshold_B1, axis=-1, keepdims=True)) if use_top_k else 0
    weights_BC = jnp.exp(sorted_BC - sorted_BC[..., :1])
    normaliser_B1 = (jnp.sum(weights_BC, axis=-1, keepdims=True)
                     + extra_ties_B1 * jnp.exp(threshold_B1 - sorted_BC[..., :1]))
    probs_BC = weights_BC / normaliser_B1
    mass_before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
    keep_BC = (mass_before_BC < top_p) | (jnp.arange(sorted_BC.shape[-1]) == 0)
    threshold_B1 = jnp.min(jnp.where(keep_BC, sorted_BC, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def _order_keys(x: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values (-inf lowest, +inf highest); -0.0 takes 0.0's key, since the
  two are tied (a filter keeps both or neither)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)  # (XLA folds away a `+ 0.0`)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _nucleus_threshold_key(logits_BV: jax.Array, top_p: float) -> jax.Array:
  """The key (`_order_keys`) of the smallest logit whose larger logits hold less than `top_p` of the probability:
  the nucleus's last token, every logit at or above it kept ([B, 1]).

  Sorting the vocabulary is the obvious way and a slow one: XLA:CPU sorted [64, 8192] logits in ~90 ms, longer
  than a whole decode step. The mass above a key falls as the key rises, so the key is found by bisection over the
  32-bit key space instead: 32 masked sums over the vocabulary. It is always some logit's key, since the mass above
  a key only changes at one.
  """
  probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
  keys_BV = _order_keys(logits_BV)

  def halve(_, bounds):
    low_B1, high_B1 = bounds  # the threshold lies in [low, high]
    mid_B1 = low_B1 + (high_B1 - low_B1) // 2
    mass_above_B1 = jnp.sum(jnp.where(keys_BV > mid_B1, probs_BV, 0.0), axis=-1, keepdims=True)
    fits = mass_above_B1 < top_p
    return jnp.where(fits, low_B1, mid_B1 + 1), jnp.where(fits, mid_B1, high_B1)

  bounds = (jnp.min(keys_BV, axis=-1, keepdims=True), jnp.max(keys_BV, axis=-1, keepdims=True))
  return jax.lax.fori_loop(0, 32, halve, bounds)[1]


def per_row_keys(rng: jax.Array) -> bool:
  """Whether `rng` holds one key per row: a typed key array [B] or raw uint32 keys [B, n] (one key is [n])."""
  return rng.ndim == (1 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 2)


def _over_rows(fn, xs: jax.Array, key: jax.Array) -> jax.Array:
  """`fn` of each row of `xs`, for keys of `key`'s implementation: vectorised (vmap) for threefry, whose bits depend
  on the key alone; one row at a time (lax.map) for the RBG implementations, whose bits under vmap depend on a key's
  place in the batch, which would make a row's draw depend on the batch it runs in."""
  if str(jax.random.key_impl(key)) == "threefry2x32":
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs)


def row_keys(rng: jax.Array, indices) -> jax.Array:
  """One key per row, `fold_in(rng, index)` for each of `indices`: a row's key depends on its index alone."""
  return _over_rows(lambda index: jax.random.fold_in(rng, index), jnp.asarray(indices), rng)


def fold_in(rng: jax.Array, data) -> jax.Array:
  """`jax.random.fold_in` of one key, or of each row's key."""
  if per_row_keys(rng):
    return _over_rows(lambda key: jax.random.fold_in(key, data), rng, rng)
  return jax.random.fold_in(rng, data)


def _gumbel(rng: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Gumbel noise of `shape` [B, V]: from one key, or row b's from row b's key alone."""
  if per_row_keys(rng):
    return _over_rows(lambda key: jax.random.gumbel(key, shape[1:], dtype), rng, rng)
  return jax.random.gumbel(rng, shape, dtype)


def sample_tokens(logits_BV: jax.Array, rng: jax.Array, temperature, *, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row.

  Args:
    logits_BV: next-token logits (any float dtype; computed in float32).
    rng: a PRNG key, or one per row ([B] typed keys, [B, n] raw ones): a row's draw then depends on its key alone.
    temperature: scalar or [B], traced or concrete; 0 (or less) selects greedy decoding for that row.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the nucleus of probability mass `top_p` (1.0: all).

  Returns:
    (tokens [B] int32, logprobs [B] float32): each token's log-probability under the tempered, filtered
    distribution it was drawn from; 0.0 for greedy rows, whose distribution is a point mass.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  temperature_B = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), logits_BV.shape[:-1])
  greedy_B = temperature_B <= 0.0

  def draw(_):
    tempered_BV = logits_BV / jnp.where(greedy_B, 1.0, temperature_B)[..., None]
    filtered_BV = filter_logits(tempered_BV, top_k=top_k, top_p=top_p)
    # Gumbel-max, the draw `jax.random.categorical` makes (same key, same noise, same token), with a faster argmax.
    sampled_B = _argmax(filtered_BV + _gumbel(rng, filtered_BV.shape, filtered_BV.dtype))
    tokens_B = jnp.where(greedy_B, _argmax(logits_BV), sampled_B).astype(jnp.int32)
    logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(filtered_BV, axis=-1), tokens_B[..., None], axis=-1)[..., 0]
    return tokens_B, jnp.where(greedy_B, 0.0, logprobs_B)

  def all_greedy(_):
    return _argmax(logits_BV).astype(jnp.int32), jnp.zeros(greedy_B.shape, jnp.float32)

  # The temperature is traced, so a greedy call runs the same program as a sampled one: this branch spares it the
  # random draw, the filters and a log-softmax over [B, V] per token (one call at [64, 8192] on a 2-core CPU:
  # 3.4 -> 0.8 ms; with top_p=0.95, as evaluation's greedy run keeps, 89 -> 0.8 ms).
  return jax.lax.cond(jnp.all(greedy_B), all_greedy, draw, None)


def _argmax(x_BV: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` (the first index of the maximum) as a max and a min: two plain reductions, which
  XLA:CPU vectorises, where the one variadic (value, index) reduction of `argmax` ran several times slower inside
  the decode loop.

  A row holding a NaN gives the first NaN's index, as argmax does. The max alone cannot: XLA:CPU's vectorised max
  drops NaNs for some widths and keeps them for others, so a NaN row would get the largest finite logit's index or,
  with no element equal to a NaN max, vocab_size, an id outside the vocabulary. NaNs take keys below every index
  instead, so the one min finds them first whatever the max made of them.
  """
  vocab = x_BV.shape[-1]
  index = jnp.arange(vocab, dtype=jnp.int32)
  is_max = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(jnp.isnan(x_BV), index - vocab, jnp.where(is_max, index, vocab)), axis=-1)
  return jnp.where(first < 0, first + vocab, first)
