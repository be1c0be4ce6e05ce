"""The Phi-4 decoder: config, presets, rotary, attention backends, pure-functional forward and KV-cache decoding."""

from phi_jax.model.api import (count_params, forward, hidden_states, init_params, lm_head_kernel,
                               logits_from_hidden, param_logical_axes)
from phi_jax.model.config import PhiConfig
from phi_jax.model.presets import presets
