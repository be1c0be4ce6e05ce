"""Direct preference losses on per-sequence log-probs: DPO (sigmoid, with conservative label smoothing) and IPO.

Inputs are summed completion log-probs [B] of the policy and the frozen reference for the chosen and rejected
completion of each pair. With h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected):

  sigmoid (DPO, Rafailov et al. 2023; cDPO, Mitchell 2023):
      -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
  ipo (Azar et al. 2023, Eq. 17, as TRL writes it with beta as the regulariser tau):
      (h - 1 / (2 * beta)) ** 2

TRL feeds IPO length-averaged log-probs (the mean over completion tokens) and DPO summed ones; build the
inputs with `sequence_logps(..., length_normalize=True)` to follow TRL's IPO exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(token_logps_BT, mask_BT, *, length_normalize=False):
  """Sum (or, with `length_normalize`, mean) of token log-probs over the masked positions of each row: [B]."""
  mask = mask_BT.astype(jnp.float32)
  total = jnp.sum(token_logps_BT.astype(jnp.float32) * mask, axis=-1)
  if length_normalize:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


def check_dpo_settings(*, beta, label_smoothing=0.0, loss_type="sigmoid"):
  """ValueError for settings that reverse or break the loss: beta <= 0 or label_smoothing outside [0, 0.5) train
  towards the rejected completion, and IPO divides by beta. Traced values (a swept beta under jit) pass unchecked."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
  smoothing, beta_value = _concrete(label_smoothing), _concrete(beta)
  if loss_type == "ipo" and smoothing:
    raise ValueError("label_smoothing applies to the sigmoid loss only; set it to 0 for IPO")
  if smoothing is not None and not 0.0 <= smoothing < 0.5:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5): it is the assumed share of flipped "
                     "preference labels")
  if beta_value is not None and not beta_value > 0:
    raise ValueError(f"beta={beta} must be positive")


def _concrete(x):
  """x as a Python float, or None for a traced value."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
  """Mean preference loss over the batch of pairs; the four log-probs are [B] arrays or scalars (else ValueError).

  Returns:
    (loss, metrics) where metrics hold batch means of the implicit rewards beta * (policy - ref):
    'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies' (share of pairs with
    chosen reward > rejected reward), and 'logps/chosen', 'logps/rejected' of the policy.
  """
  check_dpo_settings(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
  policy_chosen, policy_rejected, ref_chosen, ref_rejected = inputs = [
      jnp.asarray(x, jnp.float32) for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                            ref_rejected_logps)]
  shapes = [x.shape for x in inputs]
  # Broadcasting [B] against [B, 1] (a reference stored as a column) would pair every chosen with every rejected.
  # Scalars (one pair, a reference-free 0.0, each pair under vmap) broadcast harmlessly.
  try:
    joint = jnp.broadcast_shapes(*shapes)
  except ValueError:
    joint = None
  if joint is None or len(joint) > 1 or any(shape not in ((), joint) for shape in shapes):
    raise ValueError("dpo_loss takes the four log-probs as arrays of one shape [B] (one value per pair) or scalars; "
                     f"got shapes {', '.join(map(str, shapes))} (policy chosen, policy rejected, ref chosen, ref "
                     "rejected): flatten a column with x.reshape(-1)")
  chosen_logratio = policy_chosen - ref_chosen
  rejected_logratio = policy_rejected - ref_rejected
  h = chosen_logratio - rejected_logratio
  if loss_type == "sigmoid":
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
  else:
    losses = jnp.square(h - 1.0 / (2.0 * beta))

  chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratio)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratio)
  metrics = {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(policy_chosen)),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(policy_rejected)),
  }
  return jnp.mean(losses), metrics
