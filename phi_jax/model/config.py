"""The one model config: every field of a Phi-3/Phi-4 `config.json` that changes the math, plus run-time knobs.

A frozen dataclass so it can be a static argument to `jax.jit` and a gin-configurable value in `experiments/`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

ATTENTION_BACKENDS = ("xla", "blockwise", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# Names other codebases give PhiConfig fields (transformers' config.json, MaxText), which overrides copied from
# there use: what each is called here.
_OTHER_NAMES = {
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "rope_scaling": "rope_scaling_type (with rope_short_factor, rope_long_factor, rope_attention_factor)",
    "rope_parameters": "rope_scaling_type, rope_theta, partial_rotary_factor and the rope_* factors",
    "rope_type": "rope_scaling_type", "torch_dtype": "dtype",
    "base_num_decoder_layers": "num_layers", "base_num_query_heads": "num_heads", "base_num_kv_heads": "num_kv_heads",
    "base_emb_dim": "hidden_size", "base_mlp_dim": "intermediate_size", "normalization_layer_epsilon": "rms_norm_eps",
    "logits_via_embedding": "tie_word_embeddings",
}
# Names whose setting is no plain PhiConfig field: what to use instead.
_NOT_FIELDS = {
    "max_target_length": "MaxText's training sequence length: data.seq_len here; the model's position limit is "
                         "max_position_embeddings",
    "max_seq_len": "a training sequence length is data.seq_len; the model's position limit is "
                   "max_position_embeddings",
    "weight_dtype": "the parameters' dtype is its own setting, model.param_dtype (load_hf(dtype=...))",
}


_OPTIONAL_INT_FIELDS = ("original_max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
_FLOAT_FIELDS = ("rope_theta", "partial_rotary_factor", "rms_norm_eps", "initializer_range")


def _optional_int(name: str, value: Any) -> Optional[int]:
  """None, or the value as an int. Whole-number floats (16.0 from JSON or YAML) and numpy ints are converted:
  written to config.json as they are, transformers' strict Phi3Config refuses them (json a numpy int)."""
  if value is None:
    return None
  whole = (isinstance(value, (int, np.integer))
           or (isinstance(value, (float, np.floating)) and float(value).is_integer()))
  if isinstance(value, (bool, np.bool_)) or not whole:
    hint = (": PhiConfig keeps one eos id; pass a list of stop ids to save_hf(stop_token_ids=...) or the sampler"
            if name == "eos_token_id" and isinstance(value, (list, tuple)) else "")
    raise ValueError(f"PhiConfig.{name} must be an int or None, got {value!r}{hint}")
  return int(value)


def _as_float(name: str, value: Any) -> float:
  """The value as a Python float: transformers' strict Phi3Config refuses an int (rms_norm_eps=0) in config.json."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"PhiConfig.{name} must be a number, got {value!r}")
  return float(value)


def check_field_names(changes: Any) -> None:
  """Raises a ValueError naming the keys of `changes` that are not PhiConfig fields (and ours for known aliases)."""
  fields = [field.name for field in dataclasses.fields(PhiConfig)]
  unknown = [name for name in changes if name not in fields]
  if not unknown:
    return
  hint = lambda name: (f" (PhiConfig calls it {_OTHER_NAMES[name]})" if name in _OTHER_NAMES
                       else f" ({_NOT_FIELDS[name]})" if name in _NOT_FIELDS else "")
  hints = [repr(name) + hint(name) for name in unknown]
  raise ValueError(f"PhiConfig has no field(s) {', '.join(hints)}; rename the key in model.overrides, "
                   f"load_hf(config_overrides=...) or PhiConfig.replace(...). valid fields: {', '.join(fields)}")


@dataclasses.dataclass(frozen=True)
class PhiConfig:
  """Shapes and numerics of a Phi-4-family decoder (transformers `Phi3Config` semantics)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None  # None: hidden_size // num_heads, as transformers derives it
  max_position_embeddings: int = 4096
  original_max_position_embeddings: Optional[int] = None  # None: same as max_position_embeddings
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  # LongRoPE (`rope_scaling.type == "longrope"`): per-frequency divisors, length rotary_dim // 2 each.
  rope_scaling_type: Optional[str] = None  # None or "longrope"
  rope_short_factor: Optional[tuple[float, ...]] = None
  rope_long_factor: Optional[tuple[float, ...]] = None
  rope_attention_factor: Optional[float] = None  # `rope_scaling.attention_factor`; None: derived (see below)
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  # Run-time numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`; logits are always float32.
  # A float32 matmul runs at XLA's default precision: float32 on a CPU, TF32 on an A100/H100 and bfloat16 passes on
  # a TPU; `jax.config.update("jax_default_matmul_precision", "highest")` (or JAX_DEFAULT_MATMUL_PRECISION=highest)
  # makes it float32 everywhere, as a parity check against torch (which keeps TF32 off by default) needs.
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_backend: str = "xla"
  # "cudnn" backend: packed documents per row handed to cuDNN's packed layout (no dense mask). A batch with a row
  # holding more falls back to the dense [B, 1, T, S] mask. cuDNN's workspace grows with it (see attention_gpu).
  max_segments_per_row: int = 8
  remat_policy: str = "none"
  initializer_range: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings"):
      value = getattr(self, name)
      # An integer-valued float (4.0 from JSON or YAML) would fail later in array shapes that do not name the field.
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"PhiConfig.{name} must be a positive int, got {value!r}")
      object.__setattr__(self, name, int(value))
    for name in _OPTIONAL_INT_FIELDS:
      object.__setattr__(self, name, _optional_int(name, getattr(self, name)))
    for name in _FLOAT_FIELDS:
      object.__setattr__(self, name, _as_float(name, getattr(self, name)))
    if self.rope_attention_factor is not None:
      object.__setattr__(self, "rope_attention_factor", _as_float("rope_attention_factor", self.rope_attention_factor))
    head_dim_ok = not isinstance(self.head_dim, bool) and isinstance(self.head_dim, (int, np.integer))
    if self.head_dim is not None and (not head_dim_ok or self.head_dim <= 0):
      raise ValueError(f"PhiConfig.head_dim must be a positive int or None, got {self.head_dim!r}")
    if self.head_dim is not None:  # a numpy int would not serialise to config.json
      object.__setattr__(self, "head_dim", int(self.head_dim))
    if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):  # "false" would tie them
      raise ValueError(f"PhiConfig.tie_word_embeddings must be True or False, got {self.tie_word_embeddings!r}")
    object.__setattr__(self, "tie_word_embeddings", bool(self.tie_word_embeddings))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                       "(grouped-query attention)")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
    if not 0.0 < self.partial_rotary_factor <= 1.0:
      raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]: the share of each "
                       "head's channels that rotate (0.75 for Phi-4-mini)")
    for name in ("dtype", "param_dtype"):
      try:
        floating = jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        raise ValueError(f"PhiConfig.{name}={getattr(self, name)!r} is not a floating-point dtype; use e.g. "
                         "'float32' or 'bfloat16'")
      # Its name ("bfloat16"), whatever spelled it (jnp.bfloat16, np.dtype): configs then compare, hash (one jit
      # compile) and serialise (config.json, run metadata) alike.
      object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta={self.rope_theta} must be positive (the rotary base: 10000, 250000 for phi-4)")
    if not self.rms_norm_eps >= 0:
      raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be >= 0")
    if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
      raise ValueError(f"original_max_position_embeddings={self.original_max_position_embeddings} must be >= 1, or "
                       "None (the same as max_position_embeddings)")
    if self.rotary_dim % 2 or self.rotary_dim <= 0:
      raise ValueError(f"rotary_dim = int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be even and > 0")
    if self.attention_backend not in ATTENTION_BACKENDS:
      raise ValueError(f"attention_backend={self.attention_backend!r}; supported: {ATTENTION_BACKENDS}")
    if not isinstance(self.max_segments_per_row, int) or self.max_segments_per_row < 0:
      raise ValueError(f"max_segments_per_row={self.max_segments_per_row!r} must be an int >= 0 (0: always the dense "
                       "mask in the cudnn backend)")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; supported: {REMAT_POLICIES}")
    if self.rope_scaling_type not in (None, "longrope"):
      raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r}; supported: None (default rotary) or 'longrope'")
    # LongRoPE factors may be left None in a shape-only config (a preset); rotary math then refuses to run.
    longrope = ("rope_short_factor", "rope_long_factor", "rope_attention_factor")
    if self.rope_scaling_type is None and any(getattr(self, name) is not None for name in longrope):
      raise ValueError(f"{', '.join(n for n in longrope if getattr(self, n) is not None)} set without "
                       "rope_scaling_type='longrope': they would be ignored (plain rotary); set the type, or drop them")
    for name in ("rope_short_factor", "rope_long_factor"):
      factors = getattr(self, name)
      if factors is not None and len(factors) != self.rotary_dim // 2:
        raise ValueError(f"{name} must have rotary_dim // 2 = {self.rotary_dim // 2} entries, got {len(factors)}")
      if factors is not None and not all(f > 0 for f in factors):
        raise ValueError(f"{name} must hold positive factors (they divide the rotary frequencies)")
    if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
      raise ValueError(f"rope_attention_factor={self.rope_attention_factor} must be positive")
    # Lists (e.g. from JSON or gin) would make the config unhashable, and jit needs it hashable; numpy float32
    # entries would not serialise to config.json.
    for name in ("rope_short_factor", "rope_long_factor"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(float(v) for v in value))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.resolved_head_dim * self.partial_rotary_factor)

  @property
  def original_max_positions(self) -> int:
    return self.original_max_position_embeddings or self.max_position_embeddings

  @property
  def rope_attention_scale(self) -> float:
    """cos/sin scale of LongRoPE: sqrt(1 + ln(s) / ln(original_max)) with s = max / original_max (1 if s <= 1)."""
    if self.rope_scaling_type != "longrope":
      return 1.0
    if self.rope_attention_factor is not None:
      return self.rope_attention_factor
    scale = self.max_position_embeddings / self.original_max_positions
    if scale <= 1.0:
      return 1.0
    return math.sqrt(1 + math.log(scale) / math.log(self.original_max_positions))

  def replace(self, **changes: Any) -> "PhiConfig":
    check_field_names(changes)
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Exact parameter count, matching transformers' `num_parameters()` for the same checkpoint."""
    d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.resolved_head_dim
    attn = d * (self.num_heads + 2 * self.num_kv_heads) * h + self.num_heads * h * d
    per_layer = attn + 3 * d * f + 2 * d
    embeddings = v * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + embeddings + d
