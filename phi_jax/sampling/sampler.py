"""Batched generation from the training params: prefill + decode loop in one jitted program.

    sampling = SamplingConfig(max_new_tokens=512, temperature=0.6, top_p=0.95, stop_token_ids=stop_token_ids(tok))
    out = generate(params, config, prompt_tokens_BP, prompt_lengths_B, rng, sampling, mesh=mesh)
    out["tokens"], out["logprobs"], out["lengths"], out["finished"]
    texts = generate_text(params, config, tokenizer, ["What is 2 + 2?"], rng, sampling)

Prompts are right-padded ([B, P] plus their lengths), as `phi_jax.model.kv_cache` stores them (slot ==
position). The program prefills the cache, then a `jax.lax.while_loop` draws a token for every row, feeds it back
with `kv_cache.decode_step` and stops as soon as every row has emitted a stop token or `max_new_tokens` are out.
Rows that are done keep riding along (the batch moves in lockstep) but record nothing more.

It compiles once per (B, P, max_new_tokens, top_k, top_p, model config, mesh); the temperature and the stop
tokens are run-time arguments, so annealing the temperature or switching tokenizers does not recompile (what
does: a temperature that changes from one value to one per row, and a number of stop ids that passes a multiple of
4). With a
mesh, the batch is split over data x fsdp, the params stay in (or are put into) their training shards, and the
KV cache is sharded like the activations.

LongRoPE: a row that crosses `original_max_position_embeddings` while generating has its cache rebuilt with the
long factors (see `kv_cache`), so each token's log-prob is the one a full forward of the sequence *so far*
gives. Tokens drawn before the crossing were scored with the short factors; a full forward of the finished
sequence scores them with the long ones. Recompute log-probs with a forward pass where that difference matters
(the GRPO stage does so for the rows that crossed).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phi_jax.data import chat
from phi_jax.model import init_params, kv_cache, param_logical_axes
from phi_jax.model.api import checked_config
from phi_jax.model.config import PhiConfig
from phi_jax.model.decoder import unstack_layers
from phi_jax.sampling import filters
from phi_jax.sampling.filters import sample_tokens
from phi_jax.sharding import batch_sharding, logical_shardings, mesh_context, replicated

Params = dict[str, Any]
Prompt = Union[str, Sequence[Mapping[str, Any]]]

_STOP_IDS_MULTIPLE = 4
_CACHE_SLOTS_MULTIPLE = 64

# Logical axes of the cache, so `mesh_context`'s rules shard it like the decoder's activations.
_LAYER_CACHE_AXES = {
    "k": (None, "batch", "kv_heads", "head_dim", None),  # [NB, B, K, H, C]: blocks of slots, see
    "v": (None, "batch", "kv_heads", None, "head_dim"),  # `attention.decode_attention`
    "segment_ids": ("batch", "length"),
}


def _cache_axes(config: PhiConfig):
  return {"layers": (_LAYER_CACHE_AXES,) * config.num_layers, "tokens": ("batch", "length"), "lengths": ("batch",)}


# The smallest positive temperature: below it the tempered logits lose the precision log-probs need (vLLM treats
# temperatures under 1e-5 as greedy).
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to generate.

  Attributes:
    max_new_tokens: generated tokens per row at most (N, the width of the outputs).
    temperature: divides the logits before sampling; 0.0 is greedy decoding, and a positive one at least
      `MIN_TEMPERATURE`. May be a traced or device scalar.
    top_k: keep only the k most likely tokens (0: off).
    top_p: nucleus sampling, keep the smallest set of most likely tokens with probability >= top_p (1.0 or None:
      off).
    stop_token_ids: a row ends after emitting any of these (the stop token is part of the output); None is ().
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    # None is "off" for these, as transformers and TRL spell it (top_k=None, top_p=None, eos_token_id=None).
    if self.top_k is None:
      object.__setattr__(self, "top_k", 0)
    if self.top_p is None:
      object.__setattr__(self, "top_p", 1.0)
    if self.stop_token_ids is None:
      object.__setattr__(self, "stop_token_ids", ())
    for name in ("max_new_tokens", "top_k"):  # they size arrays and loops: 2.5 would fail deep inside jit
      if not isinstance(getattr(self, name), (int, np.integer)) or isinstance(getattr(self, name), bool):
        raise ValueError(f"SamplingConfig.{name} must be an integer, got {getattr(self, name)!r}")
    # Checked whatever holds it (a float, a NumPy / JAX scalar from a schedule, one value per row); a traced value
    # cannot be. NaN used to sample token id vocab_size.
    concrete = not isinstance(self.temperature, jax.core.Tracer)
    temperature = np.asarray(self.temperature, np.float64) if concrete else None
    if concrete and not np.all(np.isfinite(temperature)):
      raise ValueError(f"SamplingConfig.temperature must be finite, got {self.temperature}")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 switches it off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 switches it off), got {self.top_p}")
    if concrete and np.any(temperature < 0):
      raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if concrete and np.any((temperature > 0) & (temperature < MIN_TEMPERATURE)):
      # logits / T of ~1e10 and more overflow exp() in log_softmax under jit: log-probs of +-inf.
      raise ValueError(f"SamplingConfig.temperature={self.temperature}: a positive temperature must be at least "
                       f"{MIN_TEMPERATURE:g}; use 0 for greedy decoding")
    # A list (from gin or JSON) would make the config unhashable, and the jitted program is keyed on it. One id
    # (transformers' eos_token_id=2) is a list of one.
    ids = self.stop_token_ids
    ids = (ids,) if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool) else ids
    if isinstance(ids, (str, bytes)) or not all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
      raise ValueError(f"SamplingConfig.stop_token_ids must be token ids (integers), got {self.stop_token_ids!r}; "
                       "for a token's text, use tokenizer.convert_tokens_to_ids")
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))


def generate(params: Params, config: PhiConfig, prompt_tokens, prompt_lengths, rng, sampling: SamplingConfig, *,
             mesh: Optional[Mesh] = None, active=None) -> dict[str, jax.Array]:
  """Generates up to `sampling.max_new_tokens` tokens after each right-padded prompt.

  Args:
    params: model parameters (e.g. `TrainState.params`; sharded ones stay in their shards).
    config: the model config.
    prompt_tokens: [B, P] integers (a JAX or NumPy array, a list, a torch tensor), right-padded: row b's prompt
      in [0, prompt_lengths[b]), anything after it is ignored. With `config.pad_token_id` set, a row that looks
      left-padded (pad ids first, a token in the last slot) is refused.
    prompt_lengths: [B] integers, each in [1, P].
    rng: a PRNG key (`jax.random.key(seed)`), needed even when every row is greedy (which draw nothing from it);
      or one key per row ([B] typed keys, [B, n] raw ones), so that a row's tokens depend on its own key and not on
      the batch it runs in (as `generate_text` uses them).
    sampling: max_new_tokens, top_k and top_p pick the compiled program; temperature and stop tokens are
      passed at run time.
    mesh: shard the batch over its data x fsdp axes (B must divide evenly) and the params by the logical rules.
      Host prompts (and `active`, the key, the temperature) are placed onto the mesh's global sharding with
      `jax.device_put`, so with several processes every process must pass the same whole batch, not its own
      rows (as `generate_text` and the GRPO stage do).
    active: [B] bool, the rows to generate for (default all); the others are batch padding: they generate
      nothing (length 0, not finished) and do not keep the batch decoding.

  Returns:
    dict of arrays, N = max_new_tokens:
      tokens [B, N] int32: generated tokens, the stop token included, 0 after the end of each row;
      logprobs [B, N] float32: log_softmax of the model's logits at each generated token (untempered,
        unfiltered), 0 after the end;
      tempered_logprobs [B, N] float32: log_softmax(logits / temperature) at each generated token, unfiltered
        (GRPO's "old" log-probs; equal to logprobs at temperature 1 and for greedy rows), 0 after the end;
      sampling_logprobs [B, N] float32: log-prob under the tempered, filtered distribution actually sampled
        from (0 for greedy decoding and after the end);
      lengths [B] int32: generated tokens per row, the stop token included;
      finished [B] bool: True when the row emitted a stop token, False when it ran into max_new_tokens.
  """
  config = checked_config(config)
  prompt_tokens, prompt_lengths = _as_array(prompt_tokens), _as_array(prompt_lengths)
  active = np.ones(prompt_lengths.shape, bool) if active is None else active
  if np.shape(active) != np.shape(prompt_lengths):
    raise ValueError(f"active must be one bool per row, shape {np.shape(prompt_lengths)}, got {np.shape(active)}")
  # 0/1 integers mean the same as booleans (`~` on them would be a bitwise not: every row finished at once).
  active = active.astype(bool) if isinstance(active, jax.Array) else np.asarray(active, bool)
  _check_prompts(config, prompt_tokens, prompt_lengths, sampling.max_new_tokens)
  if np.ndim(sampling.temperature) > 0 and np.shape(sampling.temperature) != np.shape(prompt_lengths):
    raise ValueError(f"a per-row temperature needs one value per row: {np.shape(sampling.temperature)} for "
                     f"{np.shape(prompt_lengths)[0]} rows")
  dtype = getattr(rng, "dtype", None)  # a typed key, or a raw uint32 one (jax.random.PRNGKey)
  if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == np.uint32):
    raise ValueError(f"rng must be a PRNG key such as jax.random.key(seed), even for greedy decoding; got "
                     f"{type(rng).__name__}")
  if filters.per_row_keys(rng) and rng.shape[0] != np.shape(prompt_lengths)[0]:
    raise ValueError(f"per-row keys need one key per row: {rng.shape[0]} keys for {np.shape(prompt_lengths)[0]} rows")
  outside = [t for t in sampling.stop_token_ids if not 0 <= t < config.vocab_size]
  if outside:  # never sampled: every row would run to max_new_tokens, scored unfinished
    raise ValueError(f"stop_token_ids {outside} lie outside the model's vocabulary [0, {config.vocab_size}), so "
                     "generation would never stop on them: take the stop ids from this model's tokenizer "
                     "(phi_jax.data.chat.stop_token_ids)")
  # Temperature and stop tokens are arguments, not part of the compiled program's key.
  static = dataclasses.replace(sampling, temperature=0.0, stop_token_ids=())
  temperature = jnp.asarray(sampling.temperature, jnp.float32)
  stop_ids = _padded_stop_ids(sampling.stop_token_ids)
  if mesh is None:
    return _generate_program(params, prompt_tokens, prompt_lengths, active, rng, temperature, stop_ids,
                             config=config, sampling=static)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if prompt_tokens.shape[0] % rows:
    raise ValueError(f"batch size {prompt_tokens.shape[0]} does not split over the mesh's data x fsdp = {rows} "
                     "devices; pad the batch to a multiple of it")
  with mesh_context(mesh):
    params = jax.device_put(params, _param_shardings(config, mesh))  # no copy when already in these shards
    prompt_tokens = jax.device_put(jnp.asarray(prompt_tokens, jnp.int32), batch_sharding(mesh))
    prompt_lengths, active = jax.device_put((jnp.asarray(prompt_lengths, jnp.int32), jnp.asarray(active, bool)),
                                            NamedSharding(mesh, P(("data", "fsdp"))))
    # A key array cannot be placed on other processes' devices: its raw data can (every process holds the same).
    typed_key = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    rng_data, temperature, stop_ids = jax.device_put(
        (np.asarray(jax.random.key_data(rng)), temperature, stop_ids), replicated(mesh))
    rng = jax.random.wrap_key_data(rng_data, impl=jax.random.key_impl(rng)) if typed_key else rng_data
    return _generate_program(params, prompt_tokens, prompt_lengths, active, rng, temperature, stop_ids,
                             config=config, sampling=static)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def _generate_program(params, prompt_tokens_BP, prompt_lengths_B, active_B, rng, temperature, stop_ids_S, *,
                      config: PhiConfig, sampling: SamplingConfig):
  b, p = prompt_tokens_BP.shape
  n = sampling.max_new_tokens
  prompt_tokens_BP = prompt_tokens_BP.astype(jnp.int32)
  prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
  # The last generated token is never fed back, so its slot is never written: P + N - 1 slots suffice. Rounded
  # up to a multiple of 64 (the extra slots stay empty and masked): on XLA:CPU a 384-slot decode step at batch 64
  # ran ~20% faster than a 383-slot one.
  cache = kv_cache.init_cache(config, b, _round_up(p + n - 1, _CACHE_SLOTS_MULTIPLE))
  cache = jax.tree.map(nn.with_logical_constraint, cache, _cache_axes(config))  # axes tuples: leaves' subtrees
  params = unstack_layers(params)  # once, outside the decode loop (see `Decoder.unrolled`)
  logits_BV, cache = kv_cache.prefill(params, prompt_tokens_BP, prompt_lengths_B, cache, config)

  def choose_and_record(step, logits_BV, out):
    """Draws the token of output column `step` for every row still running and records it."""
    tokens_B, sampling_logprobs_B = sample_tokens(logits_BV, filters.fold_in(rng, step), temperature,
                                                  top_k=sampling.top_k, top_p=sampling.top_p)
    logits32_BV = logits_BV.astype(jnp.float32)
    logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(logits32_BV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
    greedy = temperature <= 0  # greedy rows: the model's own distribution
    if 0 < sampling.top_k < logits_BV.shape[-1] or sampling.top_p < 1.0:
      divisor_B1 = jnp.broadcast_to(jnp.where(greedy, 1.0, temperature), tokens_B.shape)[:, None]  # scalar or [B]
      tempered_B = jnp.take_along_axis(jax.nn.log_softmax(logits32_BV / divisor_B1, axis=-1), tokens_B[:, None],
                                       axis=-1)[:, 0]
    else:  # nothing filtered: the distribution sampled from is softmax(logits / temperature) itself
      tempered_B = jnp.where(greedy, logprobs_B, sampling_logprobs_B)
    running_B = ~out["finished"]
    tokens_B = jnp.where(running_B, tokens_B, 0)
    stopped_B = running_B & jnp.isin(tokens_B, stop_ids_S)
    out = {
        "tokens": out["tokens"].at[:, step].set(tokens_B),
        "logprobs": out["logprobs"].at[:, step].set(jnp.where(running_B, logprobs_B, 0.0)),
        "tempered_logprobs": out["tempered_logprobs"].at[:, step].set(jnp.where(running_B, tempered_B, 0.0)),
        "sampling_logprobs": out["sampling_logprobs"].at[:, step].set(jnp.where(running_B, sampling_logprobs_B, 0.0)),
        "lengths": out["lengths"] + running_B.astype(jnp.int32),
        "finished": out["finished"] | stopped_B,
    }
    return tokens_B, out

  def keep_going(carry):
    step, _, _, out = carry
    return (step < n - 1) & ~jnp.all(out["finished"])

  def decode(carry):
    step, logits_BV, cache, out = carry
    tokens_B, out = choose_and_record(step, logits_BV, out)
    # Rows done by now ride along, but their logits are never used again: they need no LongRoPE rebuild.
    logits_BV, cache = kv_cache.decode_step(params, tokens_B, cache, config, live_B=~out["finished"])
    return step + 1, logits_BV, cache, out

  out = {
      "tokens": jnp.zeros((b, n), jnp.int32),
      "logprobs": jnp.zeros((b, n), jnp.float32),
      "tempered_logprobs": jnp.zeros((b, n), jnp.float32),
      "sampling_logprobs": jnp.zeros((b, n), jnp.float32),
      "lengths": jnp.zeros((b,), jnp.int32),
      "finished": ~active_B,  # batch padding counts as done from the start, and is reported unfinished below
  }
  step, logits_BV, _, out = jax.lax.while_loop(keep_going, decode, (jnp.int32(0), logits_BV, cache, out))
  # The loop stops before the last column (or once every row is done, when this records nothing).
  _, out = choose_and_record(step, logits_BV, out)
  return dict(out, finished=out["finished"] & active_B)


def generate_text(params: Params, config: PhiConfig, tokenizer, prompts: Sequence[Prompt], rng,
                  sampling: SamplingConfig, *, mesh: Optional[Mesh] = None, system_prompt: Optional[str] = None,
                  batch_size: Optional[int] = None, length_multiple: int = 64) -> list[dict[str, Any]]:
  """Renders prompts with the tokenizer's chat template, generates, decodes.

  Shapes are bucketed so that repeated calls reuse one compiled program: the prompt width is rounded up to a
  multiple of `length_multiple` and the batch to `batch_size` (default: the next power of two of the number of
  prompts, at least the mesh's data x fsdp size). More prompts than `batch_size` run as several batches.

  Args:
    params, config, mesh: as for `generate`.
    tokenizer: a tokenizer with a chat template (`phi_jax.hf.tokenizer.load_tokenizer`).
    prompts: user questions (str) or conversations (lists of {"role", "content"} dicts).
    rng: PRNG key; prompt i draws with `fold_in(rng, i)`, whatever batch it runs in, so the outputs do not depend on
      `batch_size` or the mesh (beyond float rounding, which another batch shape may change).
    sampling: as for `generate`; with no stop tokens, the chat family's stop tokens (`chat.stop_token_ids`).
    system_prompt: system text for prompts without a system message of their own.
    batch_size: rows per generated batch.
    length_multiple: prompt widths are rounded up to a multiple of this.

  Returns:
    One dict per prompt: `text` (the generation decoded without its stop token), `token_ids` (generated ids, the
    stop token included), `finished` (ended on a stop token) and `num_tokens` (len(token_ids)).
  """
  config = checked_config(config)
  if isinstance(prompts, str):  # one question: a str is a sequence too, of one-character questions
    raise ValueError("prompts must be a list of prompts (questions or conversations), got one str: pass [prompt]")
  if isinstance(tokenizer, (str, os.PathLike)):
    raise ValueError(f"tokenizer={tokenizer!r} is a path: load it first, "
                     "phi_jax.hf.tokenizer.load_tokenizer(path)")
  if isinstance(prompts, Mapping):  # iterated, a dict gives its keys as questions
    raise ValueError("prompts is one dict (a message or a record): pass a list of questions or conversations, e.g. "
                     "[question] or [[message, ...]]")
  prompts = list(prompts)  # a tuple or a generator alike
  if prompts and isinstance(prompts[0], dict) and "role" in prompts[0]:  # one conversation, not a list of them
    raise ValueError("prompts is one conversation (a list of messages): pass [messages], a list of conversations")
  if not prompts:
    return []
  if not sampling.stop_token_ids:
    sampling = dataclasses.replace(sampling, stop_token_ids=chat.stop_token_ids(tokenizer))
  rendered = [chat.render_prompt(tokenizer, prompt, system_prompt=system_prompt) for prompt in prompts]
  rows = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                 or batch_size < 1):
    raise ValueError(f"batch_size={batch_size!r} must be a positive whole number of rows, or None for the default")
  if isinstance(length_multiple, bool) or not isinstance(length_multiple, (int, np.integer)) or length_multiple < 1:
    raise ValueError(f"length_multiple={length_multiple!r} must be a positive whole number of tokens (1 turns the "
                     "rounding of prompt widths off)")
  batch_size = batch_size or _round_up(1 << (len(rendered) - 1).bit_length(), rows)
  if batch_size % rows:
    raise ValueError(f"batch_size={batch_size} does not split over the mesh's data x fsdp = {rows} devices")

  per_row = np.ndim(sampling.temperature) > 0
  if per_row and np.shape(sampling.temperature) != (len(prompts),):
    raise ValueError(f"a per-row temperature needs one value per prompt: {np.shape(sampling.temperature)} for "
                     f"{len(prompts)} prompts")
  results = []
  for start in range(0, len(rendered), batch_size):
    chunk = rendered[start:start + batch_size]
    chunk_sampling = sampling
    if per_row:  # this batch's rows' temperatures; the filler rows generate nothing (greedy, inactive)
      temperatures = np.zeros((batch_size,), np.float32)
      temperatures[:len(chunk)] = np.asarray(sampling.temperature, np.float32)[start:start + batch_size]
      chunk_sampling = dataclasses.replace(sampling, temperature=temperatures)
    width = _round_up(max(len(ids) for ids in chunk), length_multiple)
    tokens = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)  # filler rows: a one-token prompt, inactive (generates nothing)
    for row, ids in enumerate(chunk):
      tokens[row, :len(ids)] = ids
      lengths[row] = len(ids)
    row_keys = filters.row_keys(rng, np.arange(start, start + batch_size))
    out = generate(params, config, tokens, lengths, row_keys, chunk_sampling, mesh=mesh,
                   active=np.arange(batch_size) < len(chunk))
    out = multihost_utils.process_allgather(out, tiled=True)  # every process gets every row
    for row in range(len(chunk)):
      token_ids = [int(t) for t in out["tokens"][row, :out["lengths"][row]]]
      finished = bool(out["finished"][row])
      text = tokenizer.decode(token_ids[:-1] if finished else token_ids, skip_special_tokens=False)
      results.append({"text": text, "token_ids": token_ids, "finished": finished, "num_tokens": len(token_ids)})
  return results


@functools.lru_cache(maxsize=16)
def _param_shardings(config: PhiConfig, mesh: Mesh):
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return logical_shardings(param_logical_axes(config), mesh, shapes=shapes)


def _padded_stop_ids(stop_token_ids: tuple[int, ...]) -> jax.Array:
  """Stop ids padded with -1 (never a token) to a multiple of 4, so most stop sets share one compiled program."""
  size = _round_up(max(len(stop_token_ids), 1), _STOP_IDS_MULTIPLE)
  return jnp.asarray(list(stop_token_ids) + [-1] * (size - len(stop_token_ids)), jnp.int32)


def _as_array(x):
  """Python lists, numbers and torch tensors as NumPy arrays, integers as int32 (floats stay floats, which
  `_check_prompts` refuses, as it does a wrong shape); JAX and NumPy arrays (tracers included) as they are."""
  if isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
    return x
  x = np.asarray(x)
  return x.astype(np.int32) if x.dtype.kind in "iu" else x


def _check_prompts(config: PhiConfig, prompt_tokens, prompt_lengths, max_new_tokens: int) -> None:
  if prompt_tokens.ndim != 2 or prompt_lengths.shape != prompt_tokens.shape[:1]:
    raise ValueError(f"expected prompt_tokens [B, P] and prompt_lengths [B], got shapes {prompt_tokens.shape} "
                     f"and {prompt_lengths.shape}")
  if prompt_tokens.shape[0] == 0:
    raise ValueError("no prompts: prompt_tokens has 0 rows")
  for name, x in (("prompt_tokens", prompt_tokens), ("prompt_lengths", prompt_lengths)):
    if not jnp.issubdtype(x.dtype, jnp.integer):  # 3.7 would be cut to 3 without a word
      raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
  if not all(map(kv_cache.host_readable, (prompt_tokens, prompt_lengths))):
    return
  kv_cache.check_prompt_lengths(prompt_lengths, prompt_tokens.shape[1])
  lengths = np.asarray(prompt_lengths)
  tokens = np.asarray(prompt_tokens)
  _check_right_padded(tokens, lengths, config.pad_token_id, config.bos_token_id)
  valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  if np.any(valid & ((tokens < 0) | (tokens >= config.vocab_size))):
    raise ValueError(f"prompt token ids must lie in [0, vocab_size={config.vocab_size})")
  if lengths.max() + max_new_tokens > config.max_position_embeddings:
    logging.getLogger("phi_jax").warning(
        "generating sequences of up to %d tokens (longest prompt %d + max_new_tokens %d), longer than the model's "
        "max_position_embeddings=%d: the positions past it were never trained", lengths.max() + max_new_tokens,
        lengths.max(), max_new_tokens, config.max_position_embeddings)


def _check_right_padded(tokens: np.ndarray, lengths: np.ndarray, pad_token_id: Optional[int],
                        bos_token_id: Optional[int]) -> None:
  """Refuses rows that look left-padded (transformers' and TRL's padding_side="left"): generation would read the
  padding as the prompt and start from it. A short row whose last slot is not the pad id looks so when it opens
  with a run of at least P - length pad ids: a right-padded prompt ends in padding and hardly opens with pad ids.
  Where the pad id is also the BOS (phi-4, phi-4-mini), a right-padded prompt may open with one pad id, its BOS,
  so the run must be at least max(P - length, 2): a run of two or more is padding, while one pad before a prompt
  one slot short of P reads as well as a BOS and passes.
  Whatever the pad id (the phi-4 tokenizer pads with <|dummy_85|>, not the config's pad id), a row at least two
  slots short that opens with a run of one id covering the gap, and does not end with a run as long (a right-padded
  row's padding), looks left-padded too."""
  width = tokens.shape[1]
  gap = width - lengths
  left = np.zeros(lengths.shape, bool)
  if pad_token_id is not None:
    leading_pads = np.cumprod(tokens == pad_token_id, axis=1).sum(axis=1)
    min_run = np.maximum(gap, 2) if pad_token_id == bos_token_id else gap
    left |= (lengths < width) & (leading_pads >= min_run) & (tokens[:, -1] != pad_token_id)
  first_run = np.cumprod(tokens == tokens[:, :1], axis=1).sum(axis=1)
  last_run = np.cumprod((tokens == tokens[:, -1:])[:, ::-1], axis=1).sum(axis=1)
  left |= (gap >= 2) & (first_run >= gap) & (last_run < gap)
  if left.any():
    row = int(np.flatnonzero(left)[0])
    raise ValueError(
        f"prompt row(s) {np.flatnonzero(left)[:8].tolist()} look left-padded (row {row} opens with "
        f"{int(first_run[row])} copies of id {int(tokens[row, 0])} before its tokens): prompts must be right-padded, "
        "the tokens first and the padding after, with prompt_lengths the number of real tokens; with a transformers "
        "tokenizer use padding_side=\"right\"")


def kv_cache_bytes(config: PhiConfig, rows: int, prompt_width: int, max_new_tokens: int) -> int:
  """Bytes of the KV cache `generate` allocates for `rows` prompts of `prompt_width` tokens and `max_new_tokens`
  (all layers, keys and values, the whole batch: on a mesh its rows split over data x fsdp, its kv heads over
  tensor)."""
  slots = _round_up(prompt_width + max_new_tokens - 1, _CACHE_SLOTS_MULTIPLE)
  cache = jax.eval_shape(lambda: kv_cache.init_cache(config, rows, slots))
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def _round_up(value: int, multiple: int) -> int:
  return math.ceil(value / multiple) * multiple
