"""KV-cache generation for rollouts (DPO, GRPO) and evaluation: one jitted prefill + decode loop per shape."""

from phi_jax.sampling.filters import filter_logits, sample_tokens
from phi_jax.sampling.sampler import SamplingConfig, generate, generate_text
