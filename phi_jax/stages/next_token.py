"""Next-token loss for packed mid-training and SFT: the same function, fed packed or unpacked rows.

Position t predicts token t+1 when both are in the same segment and loss_mask[t+1] is set: for chat and
prompt/completion records (SFT, and mid-training on chat-format traces) the assistant tokens and their end-of-turn
token; for text records every token (`phi_jax.data.pipeline` builds the mask). The loss is summed and the
train step divides by the number of target tokens in the whole (global, all-microbatch) batch.
"""

from __future__ import annotations

import functools

from phi_jax.losses import chunked_cross_entropy, next_token_targets
from phi_jax.model import PhiConfig, hidden_states, lm_head_kernel


def next_token_loss(params, batch, rng, *, config: PhiConfig, chunk_size: int = 1024, z_loss: float = 0.0):
  del rng  # deterministic loss: no dropout in Phi-4
  h = hidden_states(params, batch["tokens"], config, positions=batch["positions"], segment_ids=batch["segment_ids"])
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  loss_sum, sums = chunked_cross_entropy(h, lm_head_kernel(params, config), targets, weights,
                                         chunk_size=chunk_size, z_loss=z_loss)
  # Next-token accuracy of the trained positions ("accuracy" is GRPO's share of verified answers).
  metrics = {"token_accuracy": sums["num_correct"]}
  if z_loss:
    metrics["z_loss"] = sums["z_loss"]
  return loss_sum, {"weight": sums["num_tokens"], "metrics": metrics}


def make_loss_fn(config: PhiConfig, *, chunk_size: int = 1024, z_loss: float = 0.0):
  loss_fn = functools.partial(next_token_loss, config=config, chunk_size=chunk_size, z_loss=z_loss)
  loss_fn.model_config = config  # make_train_step checks each batch's token ids against its vocabulary
  return loss_fn
