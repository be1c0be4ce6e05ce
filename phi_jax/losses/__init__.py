"""Pure loss functions on hidden states and log-probs: chunked next-token cross-entropy, DPO/IPO, GRPO variants."""

from phi_jax.losses.cross_entropy import (chunked_cross_entropy, chunked_token_logprobs, cross_entropy_from_logits,
                                          next_token_targets)
from phi_jax.losses.dpo import dpo_loss, sequence_logps
from phi_jax.losses.grpo import aggregate, group_advantages, grpo_loss
