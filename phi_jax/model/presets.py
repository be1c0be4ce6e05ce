"""Named configs of the Phi-4 family (shapes from the published `config.json` files), plus a tiny test model.

`phi_jax.presets["phi-4-mini"]` or `phi_jax.presets.get("phi-4-mini", dtype="bfloat16")`.

The Phi-4-mini LongRoPE factors are left unset here on purpose: they are 48 tuned numbers per list that belong
to the checkpoint, so `phi_jax.load_hf` reads them from its config.json. A preset is enough for shapes and
`jax.eval_shape(init_params)`; the rotary math refuses to run (or be traced) without the factors. To plan memory
or compile the forward pass of a LongRoPE preset ahead of time without a checkpoint, trace
`presets.with_placeholder_rope_factors(config)`: memory and compile do not depend on the factors' values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

from phi_jax.model.config import PhiConfig

_PHI4 = PhiConfig(
    vocab_size=100352,
    hidden_size=5120,
    intermediate_size=17920,
    num_layers=40,
    num_heads=40,
    num_kv_heads=10,
    max_position_embeddings=16384,
    original_max_position_embeddings=16384,
    rope_theta=250000.0,
    tie_word_embeddings=False,
    bos_token_id=100257,
    eos_token_id=100257,
    pad_token_id=100257,
    dtype="bfloat16",
)

_PHI4_MINI = PhiConfig(
    vocab_size=200064,
    hidden_size=3072,
    intermediate_size=8192,
    num_layers=32,
    num_heads=24,
    num_kv_heads=8,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    partial_rotary_factor=0.75,
    rope_scaling_type="longrope",
    tie_word_embeddings=True,
    bos_token_id=199999,
    eos_token_id=199999,
    pad_token_id=199999,
    dtype="bfloat16",
)

_PRESETS: dict[str, PhiConfig] = {
    "phi-4": _PHI4,
    "phi-4-mini": _PHI4_MINI,
    # Same network as phi-4; 32K context with a doubled RoPE base, <think> tokens repurposed from dummy ids.
    "phi-4-reasoning": _PHI4.replace(
        max_position_embeddings=32768,
        original_max_position_embeddings=32768,
        rope_theta=500000.0,
        eos_token_id=100265,
        pad_token_id=100349,
    ),
    "phi-4-mini-reasoning": _PHI4_MINI,
    "tiny": PhiConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    ),
}


class _Presets(Mapping):
  """Read-only name -> PhiConfig mapping; `get(name, **overrides)` returns a modified copy."""

  def __getitem__(self, name: str) -> PhiConfig:
    if name not in _PRESETS:
      raise KeyError(f"unknown preset {name!r}; available: {sorted(_PRESETS)}")
    return _PRESETS[name]

  def __iter__(self) -> Iterator[str]:
    return iter(_PRESETS)

  def __len__(self) -> int:
    return len(_PRESETS)

  def get(self, name: str, **overrides: Any) -> PhiConfig:  # type: ignore[override]
    return self[name].replace(**overrides) if overrides else self[name]

  @staticmethod
  def with_placeholder_rope_factors(config: PhiConfig) -> PhiConfig:
    """`config` with LongRoPE factors of 1 where a shape-only config leaves them unset, for tracing and compiling
    (same shapes, memory and program); not for numbers, which need the checkpoint's factors."""
    if config.rope_scaling_type != "longrope":
      return config
    ones = (1.0,) * (config.rotary_dim // 2)
    return config.replace(rope_short_factor=config.rope_short_factor or ones,
                          rope_long_factor=config.rope_long_factor or ones)


presets = _Presets()
