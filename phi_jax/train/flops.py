"""Model FLOPs per trained token, for MFU.

Training FLOPs per token, for a row of T tokens:
  6 * N_matmul                      forward (2) + backward (4) FLOPs per weight of every matmul, where
                                    N_matmul = L * (attention + MLP weights) + D * V (the LM head; the input
                                    embedding is a lookup, not a matmul);
  + 12 * L * N * H * T_attn         attention scores and weighted values (QK^T and PV: 2 matmuls x 2 FLOPs x 3
                                    for forward + backward), with T_attn = T / 2 for causal attention: on
                                    average a token attends to half the row.
This is the PaLM appendix-B formula with the causal halving; remat recomputation is *not* counted (MFU counts
useful model FLOPs only), so remat lowers MFU, as it should.
"""

from __future__ import annotations

from phi_jax.model.config import PhiConfig


def matmul_params(config: PhiConfig) -> int:
  d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
  attn = d * (config.num_heads + 2 * config.num_kv_heads) * h + config.num_heads * h * d
  return config.num_layers * (attn + 3 * d * f) + d * config.vocab_size


def train_flops_per_token(config: PhiConfig, seq_len: int = 0) -> float:
  """Forward + backward FLOPs per token; `seq_len` adds the attention term (0: weights only)."""
  attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * (seq_len / 2)
  return 6.0 * matmul_params(config) + attention
