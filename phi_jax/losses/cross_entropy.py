"""Next-token cross-entropy and per-token log-probs computed from hidden states in sequence chunks.

Axis letters: B batch, T time, C chunk (a slice of T), N number of chunks, D model, V vocab.

Phi-4 has V = 100K-200K and trains at T = 16K, so [B, T, V] float32 logits would need tens of GiB. Here the LM
head is applied to one chunk of C positions at a time inside a `lax.scan`, so neither the forward nor the backward
pass ever holds more than one chunk of logits. Both have hand-written backward passes: the training cross-entropy
forms its gradient during the forward pass (`_fused_cross_entropy_fwd`), so each chunk's logits are computed
once; the log-probs save only the per-token log-normaliser and recompute each chunk's logits in the backward pass
(`_token_logprobs_bwd`). Either way the LM head's gradients come from `_lm_head_grads`.

Logits follow `phi_jax.model.api.logits_from_hidden`: the kernel is cast to the hidden-state dtype and the matmul
accumulates in float32; everything after the matmul is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def next_token_targets(tokens_BT, segment_ids_BT, loss_mask_BT):
  """Shifted targets for next-token prediction on packed rows.

  Position t predicts tokens[t + 1]. It counts (weight 1) when token t + 1 is a loss target and both tokens
  belong to the same non-padding segment, so no prediction crosses a packed-document boundary. The last
  position predicts nothing (target 0, weight 0).

  Returns:
    (targets [B, T] int32, weights [B, T] float32).
  """
  targets = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1))).astype(jnp.int32)
  same_segment = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, :-1] != 0)
  weights = same_segment & (loss_mask_BT[:, 1:] != 0)
  weights = jnp.pad(weights, ((0, 0), (0, 1))).astype(jnp.float32)
  return targets, weights


def _target_logit(logits_BCV, targets_BC):
  # An iota comparison instead of a gather: it fuses into the reduction and partitions cleanly when V is sharded.
  vocab_ids = jnp.arange(logits_BCV.shape[-1], dtype=targets_BC.dtype)
  return jnp.sum(jnp.where(vocab_ids == targets_BC[..., None], logits_BCV, 0.0), axis=-1)


def _chunk_logits(h_BCD, kernel_DV, temperature):
  logits = jnp.einsum("bcd,dv->bcv", h_BCD, kernel_DV.astype(h_BCD.dtype), preferred_element_type=jnp.float32)
  # Always divide: the temperature may be a traced schedule value.
  return logits / temperature


def _token_stats(h_BCD, kernel_DV, targets_BC, *, temperature, with_entropy, with_argmax):
  """Per-token statistics of one chunk: {'lse', 'target_logit'} and optionally 'entropy', 'correct'. [B, C] each."""
  return _stats_from_logits(_chunk_logits(h_BCD, kernel_DV, temperature), targets_BC, with_entropy=with_entropy,
                            with_argmax=with_argmax)


def _stats_from_logits(logits, targets_BC, *, with_entropy, with_argmax):
  lse = jax.nn.logsumexp(logits, axis=-1)
  stats = {"lse": lse, "target_logit": _target_logit(logits, targets_BC)}
  if with_entropy:
    probs = jax.nn.softmax(logits, axis=-1)
    stats["entropy"] = lse - jnp.sum(probs * logits, axis=-1)
  if with_argmax:
    stats["correct"] = (jnp.argmax(logits, axis=-1) == targets_BC).astype(jnp.float32)
  return stats


def _lm_head_grads(h_BCD, kernel_DV, d_logits_BCV, d_kernel_DV):
  """One chunk's share of the LM head's backward pass: (d_kernel_DV + h^T d_logits, d_logits kernel^T).

  d_logits is cast to h's dtype; both products accumulate in float32 and d_h comes back in h's dtype.
  """
  d_logits = d_logits_BCV.astype(h_BCD.dtype)
  # Under explicit sharding a vocab-sharded contraction needs its output sharding named: that of the primal.
  d_h = jnp.einsum("bcv,dv->bcd", d_logits, kernel_DV, preferred_element_type=jnp.float32,
                   out_sharding=jax.typeof(h_BCD).sharding).astype(h_BCD.dtype)
  # One (B * C)-contracted matmul in [D, V] layout, so no [C, V] transpose is written. Its left operand is h
  # transposed once ([D, B * C], a copy the barrier keeps XLA from folding back into the dot): XLA:CPU ran the
  # product with both operands contracted on their leading axis at half the speed of this plain one
  # ([512 x 1024] x [1024 x 8192]: 96-105 ms against 49-51 ms).
  h_DN = jax.lax.optimization_barrier(h_BCD.reshape(-1, h_BCD.shape[-1]).T)
  d_kernel = d_kernel_DV + jnp.einsum("dn,nv->dv", h_DN, d_logits.reshape(-1, d_logits.shape[-1]),
                                      preferred_element_type=jnp.float32, out_sharding=jax.typeof(kernel_DV).sharding)
  return d_kernel, d_h


def _to_chunks(x_BT, chunk_size):
  """[B, T, ...] -> [N, B, C, ...], T zero-padded to N * C (padded positions get weight 0 from their callers)."""
  b, t = x_BT.shape[:2]
  chunk = max(1, min(chunk_size, t))
  num_chunks = -(-t // chunk)
  padded = jnp.pad(x_BT, ((0, 0), (0, num_chunks * chunk - t)) + ((0, 0),) * (x_BT.ndim - 2))
  return padded.reshape(b, num_chunks, chunk, *x_BT.shape[2:]).swapaxes(0, 1)


def _from_chunks(x_NBC, t):
  """The inverse of `_to_chunks` for a sequence of length t."""
  num_chunks, b, chunk = x_NBC.shape[:3]
  return x_NBC.swapaxes(0, 1).reshape(b, num_chunks * chunk, *x_NBC.shape[3:])[:, :t]


def _chunked_token_stats(h_BTD, kernel_DV, targets_BT, *, chunk_size, **stat_kwargs):
  """Runs `_token_stats` over sequence chunks; returns the same dict with [B, T] arrays. Value only: the callers'
  custom VJPs differentiate it."""
  def body(kernel, xs):
    return _token_stats(xs[0], kernel, xs[1], **stat_kwargs)

  stats_NBC = jax.lax.map(functools.partial(body, kernel_DV),
                          (_to_chunks(h_BTD, chunk_size), _to_chunks(targets_BT.astype(jnp.int32), chunk_size)))
  return jax.tree.map(lambda x: _from_chunks(x, h_BTD.shape[1]), stats_NBC)


def chunked_cross_entropy(h_BTD, kernel_DV, targets_BT, weights_BT, *, chunk_size=1024, z_loss=0.0):
  """Summed weighted next-token cross-entropy, never materialising [B, T, V] logits.

  Args:
    h_BTD: final hidden states (`phi_jax.model.api.hidden_states`).
    kernel_DV: LM head kernel (`phi_jax.model.api.lm_head_kernel`).
    targets_BT: target token ids (see `next_token_targets`).
    weights_BT: per-token weights; 0 drops a position. Treated as constants: no gradient flows into them.
    chunk_size: positions per logits chunk; T need not be a multiple of it.
    z_loss: coefficient of the z-loss `z_loss * logsumexp(logits) ** 2`, which keeps the softmax normaliser
      near 1 (PaLM).

  Returns:
    (loss_sum, metrics): loss_sum = sum_t w_t * (-log p(target_t) + z_loss * lse_t ** 2); callers divide by the
    token count they choose. metrics are sums too: 'z_loss' (the z-loss part of loss_sum), 'num_tokens'
    (sum of weights), 'num_correct' (weighted count of argmax == target). Only loss_sum is differentiable.

  Under differentiation the gradient is formed during the forward pass (see `_fused_cross_entropy`): each
  chunk's logits are computed once, and the backward pass only scales the saved gradients.
  """
  if z_loss < 0:  # it would reward a large normaliser, driving the logits up
    raise ValueError(f"z_loss={z_loss} must be >= 0 (0 turns the z-loss off)")
  return _fused_cross_entropy(chunk_size, float(z_loss), h_BTD, kernel_DV, targets_BT.astype(jnp.int32),
                              weights_BT.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_cross_entropy(chunk_size, z_loss, h_BTD, kernel_DV, targets_BT, weights_BT):
  """Value only (no differentiation): the chunked per-token statistics, summed."""
  stats = _chunked_token_stats(h_BTD, kernel_DV, targets_BT, chunk_size=chunk_size, temperature=1.0,
                               with_entropy=False, with_argmax=True)
  return _weighted_cross_entropy(stats, weights_BT, z_loss)


def _fused_cross_entropy_fwd(chunk_size, z_loss, h_BTD, kernel_DV, targets_BT, weights_BT):
  """Loss, metrics, and the gradients of loss_sum w.r.t. h and the kernel, in one pass over the chunks.

  The loss is linear in its cotangent, and dloss/dlogits = w * ((1 + 2 z lse) softmax - onehot) is known as soon
  as a chunk's logits are (the weights are data). So each chunk computes its logits once and immediately turns
  them into dh (saved, [B, T, D] like h) and a running dkernel (saved, [D, V] like the kernel); the backward pass
  multiplies both by the incoming scalar. Autodiff of the chunked forward would instead recompute every chunk's
  logits in the backward pass (a third LM-head matmul) and, on XLA:CPU, transpose the [C, V] softmax gradient.
  Peak memory is unchanged: one chunk of logits at a time, and dkernel is a gradient-sized buffer either way.
  """
  kernel = kernel_DV.astype(h_BTD.dtype)
  vocab_ids = jnp.arange(kernel.shape[-1], dtype=jnp.int32)

  def body(d_kernel, xs):
    h, targets, weights = xs  # [B, C, D], [B, C], [B, C]
    logits = _chunk_logits(h, kernel, 1.0)
    stats = _stats_from_logits(logits, targets, with_entropy=False, with_argmax=True)
    probs = jnp.exp(logits - stats["lse"][..., None])
    is_target = vocab_ids == targets[..., None]
    d_logits = weights[..., None] * ((1 + 2 * z_loss * stats["lse"])[..., None] * probs - is_target)
    d_kernel, d_h = _lm_head_grads(h, kernel, d_logits, d_kernel)
    return d_kernel, (stats, d_h)

  chunks = tuple(_to_chunks(x, chunk_size) for x in (h_BTD, targets_BT, weights_BT))
  d_kernel, (stats, d_h) = jax.lax.scan(body, jnp.zeros_like(kernel, jnp.float32), chunks)
  unchunk = lambda x: _from_chunks(x, h_BTD.shape[1])
  out = _weighted_cross_entropy(jax.tree.map(unchunk, stats), weights_BT, z_loss)
  return out, (unchunk(d_h), d_kernel.astype(kernel_DV.dtype))


def _fused_cross_entropy_bwd(chunk_size, z_loss, residuals, cotangents):
  del chunk_size, z_loss
  d_h, d_kernel = residuals
  d_loss = cotangents[0]  # the metrics are counts: their cotangents are ignored
  # Scaled in float32, then cast: a bfloat16 copy of the scale (1/3, say) would bias every element the same way.
  scale = lambda d: (d_loss.astype(jnp.float32) * d.astype(jnp.float32)).astype(d.dtype)
  return scale(d_h), scale(d_kernel), None, None


_fused_cross_entropy.defvjp(_fused_cross_entropy_fwd, _fused_cross_entropy_bwd)


def cross_entropy_from_logits(logits_BTV, targets_BT, weights_BT, *, z_loss=0.0):
  """Reference: `chunked_cross_entropy` on full logits (for tests and small vocabularies)."""
  logits = logits_BTV.astype(jnp.float32)
  stats = {
      "lse": jax.nn.logsumexp(logits, axis=-1),
      "target_logit": _target_logit(logits, targets_BT.astype(jnp.int32)),
      "correct": (jnp.argmax(logits, axis=-1) == targets_BT).astype(jnp.float32),
  }
  return _weighted_cross_entropy(stats, weights_BT, z_loss)


def _weighted_cross_entropy(stats, weights_BT, z_loss):
  weights = weights_BT.astype(jnp.float32)
  z_term = z_loss * jnp.square(stats["lse"])
  nll = stats["lse"] - stats["target_logit"]
  metrics = {
      "z_loss": jnp.sum(weights * z_term),
      "num_tokens": jnp.sum(weights),
      "num_correct": jnp.sum(weights * stats["correct"]),
  }
  return jnp.sum(weights * (nll + z_term)), metrics


def chunked_token_logprobs(h_BTD, kernel_DV, targets_BT, *, chunk_size=1024, temperature=1.0, with_entropy=False):
  """Per-token log p(target) [B, T] float32 under softmax(logits / temperature), computed chunk by chunk.

  With `with_entropy`, returns (logprobs [B, T], entropy [B, T]) where entropy is that of the same tempered
  distribution. Both are differentiable; the sampling temperature must match the one used in rollouts for
  importance ratios to be meaningful.
  """
  return _token_logprobs(chunk_size, with_entropy, h_BTD, kernel_DV, targets_BT.astype(jnp.int32),
                         jnp.asarray(temperature, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _token_logprobs(chunk_size, with_entropy, h_BTD, kernel_DV, targets_BT, temperature):
  return _token_logprobs_fwd(chunk_size, with_entropy, h_BTD, kernel_DV, targets_BT, temperature)[0]


def _token_logprobs_fwd(chunk_size, with_entropy, h_BTD, kernel_DV, targets_BT, temperature):
  stats = _chunked_token_stats(h_BTD, kernel_DV, targets_BT, chunk_size=chunk_size, temperature=temperature,
                               with_entropy=with_entropy, with_argmax=False)
  logprobs = stats["target_logit"] - stats["lse"]
  out = (logprobs, stats["entropy"]) if with_entropy else logprobs
  return out, (h_BTD, kernel_DV, targets_BT, temperature, stats["lse"], stats.get("entropy"))


def _token_logprobs_bwd(chunk_size, with_entropy, residuals, cotangents):
  """Recomputes each chunk's tempered logits z and, with p = softmax(z) from the saved log-normaliser:
  d log p(target) / dz = onehot - p and d entropy / dz = -p * (log p + entropy); d/dlogits = d/dz / temperature.

  Autodiff of the chunked forward gave the same values, but XLA:CPU transposed each chunk's [C, V] gradient and
  ran the kernel's gradient with both operands contracted on their leading axis: the LM head and log-probs of
  1024 tokens (d=512, V=8192) took 326 ms forward + backward that way, 194 ms here (515 -> 242 ms with entropy).
  """
  h_BTD, kernel_DV, targets_BT, temperature, lse_BT, entropy_BT = residuals
  d_logp_BT, d_entropy_BT = cotangents if with_entropy else (cotangents, None)
  kernel = kernel_DV.astype(h_BTD.dtype)
  vocab_ids = jnp.arange(kernel.shape[-1], dtype=jnp.int32)

  def body(carry, xs):
    d_kernel, d_temperature = carry
    h, targets, lse, d_logp = xs[:4]  # [B, C, D], then [B, C] each
    logp = _chunk_logits(h, kernel, temperature) - lse[..., None]
    p = jnp.exp(logp)
    d_z = d_logp[..., None] * (jnp.where(vocab_ids == targets[..., None], 1.0, 0.0) - p)
    if with_entropy:
      entropy, d_entropy = xs[4:]
      d_z = d_z - d_entropy[..., None] * p * (logp + entropy[..., None])
    # z = logits / temperature, so dz / dtemperature = -z / temperature (z = logp + lse).
    d_temperature = d_temperature - jnp.sum(d_z * (logp + lse[..., None])) / temperature
    d_kernel, d_h = _lm_head_grads(h, kernel, d_z / temperature, d_kernel)
    return (d_kernel, d_temperature), d_h

  xs = [h_BTD, targets_BT, lse_BT, d_logp_BT.astype(jnp.float32)]
  if with_entropy:
    xs += [entropy_BT, d_entropy_BT.astype(jnp.float32)]
  (d_kernel, d_temperature), d_h = jax.lax.scan(
      body, (jnp.zeros_like(kernel, jnp.float32), jnp.zeros((), jnp.float32)),
      tuple(_to_chunks(x, chunk_size) for x in xs))
  return (_from_chunks(d_h, h_BTD.shape[1]), d_kernel.astype(kernel_DV.dtype), None,
          d_temperature.astype(temperature.dtype))


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)
