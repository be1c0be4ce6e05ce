"""transformers checkpoint interop: `load_hf` / `save_hf` and the config conversion behind them."""

from phi_jax.hf.checkpoint import load_hf, save_hf
from phi_jax.hf.config import from_hf_config, to_hf_config
