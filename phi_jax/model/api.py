"""Pure functions over a plain parameter pytree: init, hidden states, LM head, logits.

    params = init_params(config, jax.random.key(0))
    logits = forward(params, tokens, config)                       # [B, T, V] float32
    h = hidden_states(params, tokens, config, positions=..., segment_ids=...)
    logits = h @ lm_head_kernel(params, config)                    # or chunked, see phi_jax.losses
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model.config import PhiConfig
from phi_jax.model.decoder import Decoder

Params = dict[str, Any]


def default_positions_and_segments(tokens_BT, positions=None, segment_ids=None):
  """positions default to arange per row; segment ids to one segment (1) per row. Given ones of shape [1, T] (as
  transformers' position_ids) stand for every row: the LongRoPE extent is computed row by row."""
  if positions is None:
    positions = jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.ones(tokens_BT.shape, jnp.int32)
  return jnp.broadcast_to(positions, tokens_BT.shape), jnp.broadcast_to(segment_ids, tokens_BT.shape)


def checked_config(config) -> PhiConfig:
  """`config` if it is a PhiConfig; a preset's name or a transformers config gets an error saying what to pass."""
  if isinstance(config, PhiConfig):
    return config
  from phi_jax.model.presets import presets  # pylint: disable=import-outside-toplevel
  if isinstance(config, str):
    hint = (f"phi_jax.presets[{config!r}]" if config in presets else
            f"a preset (phi_jax.presets[name], name one of {sorted(presets)}) or the config load_hf returns")
  else:
    hint = "phi_jax.presets[name], the config load_hf returns, or phi_jax.hf.from_hf_config(a transformers config)"
  raise TypeError(f"config must be a PhiConfig, got {type(config).__name__} {config!r:.80}: pass {hint}")


def _boxed_init(config: PhiConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  # Parameters depend on neither the rotary setup nor the attention backend: without them, shape-only presets (no
  # LongRoPE factors) and configs for another device (a "cudnn" model prepared on a CPU host) init anywhere.
  config = config.replace(rope_scaling_type=None, rope_short_factor=None, rope_long_factor=None,
                          rope_attention_factor=None, attention_backend="xla")
  return Decoder(config).init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]


def init_params(config: PhiConfig, rng) -> Params:
  """Random parameters (normal(0, initializer_range), norms at 1) as a plain dict. Works under eval_shape."""
  return nn.meta.unbox(_boxed_init(checked_config(config), rng))


def param_logical_axes(config: PhiConfig) -> Params:
  """Same tree as the params, each leaf a PartitionSpec of logical axis names (e.g. ('layers', 'embed', 'mlp'))."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def host_readable(x) -> bool:
  """Whether this process can read x's values now: not under jit, and not an array spanning other hosts. Value
  checks run only then; traced calls get the checks of the shapes alone."""
  return not isinstance(x, jax.core.Tracer) and not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def check_token_ids(tokens, segment_ids, vocab_size: int) -> None:
  """Raises on an id outside [0, vocab_size) in a real (segment != 0) slot; concrete arrays only (under jit the
  values are unknown, and the lookup of such an id gives NaN hidden states)."""
  if not (host_readable(tokens) and host_readable(segment_ids)):
    return
  tokens, real = np.asarray(tokens), np.asarray(segment_ids) != 0
  bad = real & ((tokens < 0) | (tokens >= vocab_size))
  if bad.any():
    row, col = map(int, np.argwhere(bad)[0])
    raise ValueError(f"token id {int(tokens[row, col])} at [{row}, {col}] is outside the vocabulary "
                     f"[0, {vocab_size}) ({int(bad.sum())} such ids): the tokenizer does not match the model's "
                     "vocab_size, or padding slots lack segment id 0")


def _as_array(x):
  """Lists, tuples and torch tensors as arrays (JAX and NumPy arrays, tracers included, as they are)."""
  return x if x is None or isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(np.asarray(x))


def token_batch(tokens):
  """`tokens` (any array-like) as an array of shape [batch, seq_len], else a ValueError saying how to get one."""
  tokens = _as_array(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq_len] token ids; got shape {tuple(tokens.shape)}"
                     + (": for one sequence pass tokens[None]" if tokens.ndim == 1 else ""))
  return tokens


def hidden_states(params: Params, tokens, config: PhiConfig, *, positions=None, segment_ids=None):
  """Final-normed hidden states [B, T, D] in the compute dtype; `tokens` are [B, T] ids (an array-like)."""
  config = checked_config(config)
  _check_head(params, config)
  tokens, positions, segment_ids = token_batch(tokens), _as_array(positions), _as_array(segment_ids)
  positions, segment_ids = default_positions_and_segments(tokens, positions, segment_ids)
  check_token_ids(tokens, segment_ids, config.vocab_size)
  h, _ = Decoder(config).apply({"params": params}, tokens, positions, segment_ids)
  return h


def lm_head_kernel(params: Params, config: PhiConfig):
  """[D, V]: the LM head, or the transposed embedding table when embeddings are tied (Phi-4-mini)."""
  _check_head(params, config)
  if config.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def _check_head(params: Params, config: PhiConfig) -> None:
  """Params and a config that disagree on tying: a tied config would leave a trained head unused (another model's
  logits, silently), an untied one find no head."""
  if not isinstance(params, dict) or "embed" not in params:
    return  # not a model's params tree (the decoder module's own errors apply)
  has_head = "lm_head" in params
  if config.tie_word_embeddings and has_head:
    raise ValueError("the params hold an lm_head but the config ties the LM head to the embedding "
                     "(tie_word_embeddings=True): they are an untied model's; use the config they were made or "
                     "loaded with (e.g. config.replace(tie_word_embeddings=False))")
  if not config.tie_word_embeddings and not has_head:
    raise ValueError("the params hold no lm_head but the config has an untied LM head (tie_word_embeddings=False): "
                     "they are a tied model's (Phi-4-mini); use the config they were made or loaded with (e.g. "
                     "config.replace(tie_word_embeddings=True))")


def logits_from_hidden(params: Params, h_BTD, config: PhiConfig):
  kernel = lm_head_kernel(params, config).astype(h_BTD.dtype)
  return jnp.einsum("btd,dv->btv", h_BTD, kernel, preferred_element_type=jnp.float32)


def forward(params: Params, tokens, config: PhiConfig, *, positions=None, segment_ids=None):
  """Logits [B, T, V] in float32; no attention crosses segments.

  `positions` default to 0 .. T-1 along each row, also when `segment_ids` are given: a packed row passes its own
  positions, restarting at each document (the data pipeline's rows carry them), so each document is encoded as if
  alone. Positions alone do not separate documents: without `segment_ids` a row is one document whatever its
  positions (transformers' forward with a cache does the same; without one it reads restarting position_ids as
  documents), so a packed row passes both."""
  h = hidden_states(params, tokens, config, positions=positions, segment_ids=segment_ids)
  return logits_from_hidden(params, h, config)


def count_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
