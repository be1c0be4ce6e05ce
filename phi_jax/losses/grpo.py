"""GRPO: group-relative advantages and the clipped policy-gradient loss with its aggregation variants.

Per completion token, with ratio r = exp(logp - old_logp) and the sequence's advantage A:

    loss_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t   = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator of KL(pi || ref), always >= 0)

Aggregations over the completion mask, named as in TRL's GRPOTrainer `loss_type`:
  "token_mean"    ("bnpo"/"dapo", DAPO): sum over all tokens / number of tokens;
  "sequence_mean" ("grpo", DeepSeekMath): per-sequence token mean, then mean over sequences;
  "constant"      ("dr_grpo", Dr. GRPO): sum / (B * max completion length), a length-independent constant.
Decoupled eps_low / eps_high is DAPO's clip-higher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def group_advantages(rewards, group_size, *, scale_by_std=True, eps=1e-4):
  """(r - group mean) / (group std + eps) for contiguous groups of `group_size` completions of one prompt.

  The std is the unbiased (n - 1) one, as `torch.Tensor.std` computes it in TRL. With `scale_by_std=False`
  the advantage is only centred (Dr. GRPO), which does not up-weight groups with nearly equal rewards.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards must be flat with a length divisible by group_size={group_size}; got {rewards.shape}")
  if scale_by_std and group_size < 2:
    raise ValueError("an unbiased group std needs group_size >= 2")
  grouped = rewards.reshape(-1, group_size)
  advantages = grouped - jnp.mean(grouped, axis=1, keepdims=True)
  if scale_by_std:
    advantages = advantages / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
  # Equal rewards give exactly 0: a float32 mean of equal values can miss them by ~1e-8, which the std scaling
  # (a std of ~1e-8 + eps) turned into same-sign advantages of ~1e-3.
  equal = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
  return jnp.where(equal, 0.0, advantages).reshape(-1)


def aggregate(values_BT, mask_BT, aggregation, *, max_tokens=None):
  """Reduces per-token values over the mask as the named aggregation does (see the module docstring)."""
  mask = mask_BT.astype(jnp.float32)
  masked = values_BT * mask
  if aggregation == "token_mean":
    return jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0)
  if aggregation == "sequence_mean":
    return jnp.mean(jnp.sum(masked, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))
  if aggregation == "constant":
    length = values_BT.shape[1] if max_tokens is None else max_tokens
    return jnp.sum(masked) / (values_BT.shape[0] * length)
  raise ValueError(f"unknown GRPO aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def _masked_mean(values_BT, mask_BT):
  mask = mask_BT.astype(jnp.float32)
  return jnp.sum(values_BT * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def grpo_loss(logps, old_logprobs, ref_logprobs, advantages, mask, *, epsilon_low=0.2, epsilon_high=0.2,
              beta=0.0, aggregation="token_mean", max_tokens=None, entropy=None, entropy_coef=0.0):
  """Clipped surrogate loss (+ beta * k3 KL, - entropy_coef * entropy) aggregated over completion tokens.

  Args:
    logps: [B, T] policy log-probs of the sampled tokens (differentiated).
    old_logprobs: [B, T] log-probs of the policy that sampled the rollouts. Treated as constants, so on the first
      update from fresh rollouts `logps` itself may be passed (ratio 1, gradient of the unclipped objective).
    ref_logprobs: [B, T] reference-model log-probs (constants), or None when beta == 0.
    advantages: [B] one advantage per completion (see `group_advantages`).
    mask: [B, T] 1 on completion tokens.
    epsilon_low, epsilon_high: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high].
    beta: KL coefficient.
    aggregation: "token_mean", "sequence_mean" or "constant" (module docstring).
    max_tokens: the constant length of the "constant" aggregation; defaults to T.
    entropy: optional [B, T] per-token policy entropy; its aggregate times `entropy_coef` is subtracted.

  Returns:
    (loss, metrics) with means over masked tokens: 'clip_fraction/low' (ratio below 1 - eps_low where A < 0),
    'clip_fraction/high' (above 1 + eps_high where A > 0), 'clip_fraction/total', 'ratio', and 'kl' when
    ref_logprobs is given, 'entropy' when entropy is given.
  """
  if beta and ref_logprobs is None:
    raise ValueError("beta > 0 needs ref_logprobs")
  valid = mask != 0
  logps = logps.astype(jnp.float32)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.shape != logps.shape[:1]:  # a [B, 1] column would broadcast every row's advantage onto every row
    raise ValueError(f"advantages must be one per completion, shape {logps.shape[:1]}; got {advantages.shape}")
  advantages_B1 = advantages[:, None]
  # Padding positions may hold arbitrary log-probs; zeroing the differences there keeps exp() finite so that
  # masking cannot turn inf * 0 into NaN (in the value or its gradient).
  log_ratio = jnp.where(valid, logps - jax.lax.stop_gradient(old_logprobs).astype(jnp.float32), 0.0)
  ratio = jnp.exp(jax.lax.stop_gradient(log_ratio))
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  # min(r A, clip(r) A) as a select, so that where the two are equal (r at an edge of the clip range, e.g. r = 1 with
  # epsilon_low = 0) the gradient is A: jnp.minimum splits a tie between its arguments and jnp.clip passes half a
  # gradient at its bounds, which gave 0.75 A. The clipped side is chosen only outside the clip range, where it has
  # no gradient; the branch is picked on values, and the differentiable exp() sees a log-ratio of 0 where it is not
  # used, so an overflowing ratio there (e^89 after a diverging pass) cannot send 0 * inf = NaN into the gradient.
  clipped = clipped_ratio * advantages_B1
  use_clipped = ~(ratio * advantages_B1 <= clipped)  # also where r A is NaN (r = inf, A = 0): the clipped value, 0
  unclipped = jnp.exp(jnp.where(use_clipped, 0.0, log_ratio)) * advantages_B1
  per_token = -jnp.where(use_clipped, clipped, unclipped)

  metrics = {}
  if ref_logprobs is not None:
    ref_minus_logp = jnp.where(valid, jax.lax.stop_gradient(ref_logprobs).astype(jnp.float32) - logps, 0.0)
    kl = jnp.exp(ref_minus_logp) - ref_minus_logp - 1.0
    if beta:
      per_token = per_token + beta * kl
    metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl), mask)
  loss = aggregate(per_token, mask, aggregation, max_tokens=max_tokens)
  if entropy is not None:
    entropy = jnp.where(valid, entropy.astype(jnp.float32), 0.0)
    if entropy_coef:
      loss = loss - entropy_coef * aggregate(entropy, mask, aggregation, max_tokens=max_tokens)
    metrics["entropy"] = _masked_mean(jax.lax.stop_gradient(entropy), mask)

  low = ((ratio < 1.0 - epsilon_low) & (advantages_B1 < 0)).astype(jnp.float32)
  high = ((ratio > 1.0 + epsilon_high) & (advantages_B1 > 0)).astype(jnp.float32)
  metrics["clip_fraction/low"] = _masked_mean(low, mask)
  metrics["clip_fraction/high"] = _masked_mean(high, mask)
  metrics["clip_fraction/total"] = _masked_mean(jnp.maximum(low, high), mask)
  metrics["ratio"] = _masked_mean(ratio, mask)
  return loss, metrics
