"""phi_jax: the Phi-4 family of small reasoning models in JAX."""

from phi_jax.model import PhiConfig, forward, hidden_states, init_params, presets
from phi_jax.hf import load_hf, save_hf

__version__ = "0.1.0"
