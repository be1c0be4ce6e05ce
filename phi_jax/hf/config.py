"""PhiConfig <-> transformers `Phi3Config` (the `config.json` of a Phi-3/Phi-4 checkpoint).

Two `config.json` layouts are read:
  * classic (the published Phi-4 checkpoints, transformers 4.x): `rope_theta` and `partial_rotary_factor` at the top
    level, `rope_scaling: null | {"type" | "rope_type": "longrope" (legacy aliases "su", "yarn"), "short_factor": [...],
    "long_factor": [...], optional "attention_factor"}`;
  * transformers 5 (`save_pretrained` of 5.x): `rope_parameters: {"rope_type": "default" | "longrope",
    "rope_theta", "partial_rotary_factor", "original_max_position_embeddings", factors...}`, with
    `partial_rotary_factor` and `original_max_position_embeddings` also kept at the top level.
`to_hf_config` writes the classic layout: the one the published checkpoints use, which transformers 5 also reads.

The checkpoint's `dtype` (transformers 5) or else `torch_dtype` (the dtype transformers computes in by default) maps
to `PhiConfig.dtype`, the compute dtype, and `to_hf_config` writes `PhiConfig.dtype` as `torch_dtype`; the stored
tensors may be wider (float32 master weights). Exports of earlier phi_jax versions named the tensors' dtype there
and the compute dtype under `phi_jax_compute_dtype`, which is read while transformers has not re-saved the file.
`PhiConfig.param_dtype` is chosen by whoever stores the parameters (`phi_jax.load_hf(dtype=...)`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from phi_jax.model.config import PhiConfig, check_field_names

log = logging.getLogger("phi_jax")

SUPPORTED_MODEL_TYPE = "phi3"
# "su" and "yarn" are names LongRoPE had in the first Phi-3 checkpoints; transformers' Phi3Config reads both as
# "longrope".
_ROPE_TYPES = {"default": None, "longrope": "longrope", "su": "longrope", "yarn": "longrope"}
_MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "num_experts", "n_routed_experts", "moe_intermediate_size")
_BIAS_FIELDS = ("attention_bias", "mlp_bias")
_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attention_dropout")
# `Phi3Config` defaults for keys that a config.json may leave out.
_HF_DEFAULT_ROPE_THETA = 10000.0
_HF_DEFAULT_MAX_POSITIONS = 4096
_HF_DEFAULT_ORIGINAL_MAX_POSITIONS = 4096  # LongRoPE uses it when the key is absent
# Earlier save_hf exports named the stored tensors' dtype in torch_dtype and a narrower compute dtype under this key
# (see `_dtype_name`); save_hf now writes the compute dtype as torch_dtype and this key no more.
COMPUTE_DTYPE_KEY = "phi_jax_compute_dtype"
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _as_dict(hf: Any) -> dict[str, Any]:
  if isinstance(hf, Mapping):
    return dict(hf)
  if hasattr(hf, "to_dict"):  # a transformers PretrainedConfig
    # to_dict() adds the running transformers' version; the file's own (None: not written by transformers) is what
    # tells whether transformers has re-saved it (see `_dtype_name`).
    return hf.to_dict() | {"transformers_version": getattr(hf, "transformers_version", None)}
  raise TypeError(f"expected a config.json dict or a transformers config, got {type(hf).__name__}")


def _check_supported(hf: dict[str, Any]) -> None:
  model_type = hf.get("model_type")
  if model_type != SUPPORTED_MODEL_TYPE:
    raise ValueError(f"model_type={model_type!r} is not supported; phi_jax reads model_type={SUPPORTED_MODEL_TYPE!r} "
                     "(Phi3ForCausalLM: phi-4, Phi-4-mini, Phi-4-reasoning)")
  for name in _MOE_FIELDS:
    if hf.get(name):
      raise ValueError(f"{name}={hf[name]!r}: mixture-of-experts checkpoints are not supported; phi_jax implements the "
                       "dense Phi3 decoder only")
  for name in _BIAS_FIELDS:
    if hf.get(name):
      raise ValueError(f"{name}=true is not supported; phi_jax implements the bias-free Phi3 decoder")
  hidden_act = hf.get("hidden_act", "silu")
  if hidden_act != "silu":
    raise ValueError(f"hidden_act={hidden_act!r} is not supported; the Phi3 MLP supported here is 'silu' (SwiGLU)")
  quantization = hf.get("quantization_config")
  if quantization:
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else quantization
    raise ValueError(f"quantization_config (quant_method={method!r}): quantized checkpoints are not supported; "
                     "phi_jax reads float weights, so load the bfloat16 / float16 original checkpoint instead")
  architectures = hf.get("architectures") or []
  if architectures and not any(str(name).endswith("ForCausalLM") for name in architectures):
    raise ValueError(f"architectures={architectures}: phi_jax loads only causal-LM checkpoints (Phi3ForCausalLM, "
                     "its LM head included); save the model as AutoModelForCausalLM / Phi3ForCausalLM")
  # An absent key is transformers' default, under which a window still masks.
  sliding_window = hf.get("sliding_window")
  max_positions = _first_set(hf.get("max_position_embeddings"), _HF_DEFAULT_MAX_POSITIONS)
  if sliding_window is not None and sliding_window < max_positions:
    raise ValueError(
        f"sliding_window={sliding_window} < max_position_embeddings={max_positions} is not supported: phi_jax attends "
        "over the full context, which matches only a sliding_window of null or >= max_position_embeddings")


def _rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
  """The one rotary dict of either layout; `rope_scaling` wins over `rope_parameters`, as in transformers."""
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(rope, Mapping):
    raise ValueError(f"rope_scaling / rope_parameters must be a dict or null, got {rope!r}")
  if any(isinstance(value, Mapping) for value in rope.values()):
    raise ValueError(f"rope_parameters nested per layer type ({sorted(rope)}) are not supported; Phi3 has one rotary")
  return dict(rope)


def _first_set(*values: Any) -> Any:
  """The first value that is not None: config.json files write absent settings both as a missing key and as null."""
  return next((value for value in values if value is not None), None)


def _longrope_attention_factor(factor: float, original_max_positions: int) -> float:
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max_positions))


def _dtype_name(hf: dict[str, Any]) -> str | None:
  # The dtype transformers computes in: `dtype` (transformers 5) over the older `torch_dtype`, as its config does.
  # `COMPUTE_DTYPE_KEY` counts only in a config.json as an earlier save_hf wrote it: once transformers has re-saved
  # the checkpoint (it adds `transformers_version`), the key is stale and transformers computes in its own dtype.
  legacy = hf.get(COMPUTE_DTYPE_KEY) if hf.get("transformers_version") is None else None
  return _float_dtype_name(legacy) if legacy is not None else transformers_dtype_name(hf)


def _float_dtype_name(value: Any) -> str | None:
  name = str(value).removeprefix("torch.") if value is not None else None
  return name if name in _DTYPE_NAMES else None


def transformers_dtype_name(hf: Mapping[str, Any]) -> str | None:
  """The dtype config.json names for transformers to load the model in (what from_pretrained(torch_dtype="auto")
  uses): `dtype` (transformers 5) over the older `torch_dtype`; None where neither names a float dtype."""
  return _float_dtype_name(_first_set(hf.get("dtype"), hf.get("torch_dtype")))


def _first_eos_id(eos: Any) -> Any:
  """Some checkpoints list several stop ids; PhiConfig keeps one (the first). Stop lists belong to the sampler and
  to save_hf's stop_token_ids (generation_config.json), so the rest are named for the user to pass there."""
  if not isinstance(eos, (list, tuple)):
    return eos
  if len(eos) > 1:
    log.warning("config.json has eos_token_id=%s; PhiConfig keeps %s only, so an export stops at it alone: pass "
                "save_hf(stop_token_ids=%s) to keep them all in its generation_config.json (and the list to the "
                "sampler)", list(eos), eos[0], list(eos))
  return eos[0] if eos else None


def _warn_about_dropout(hf: dict[str, Any]) -> None:
  set_rates = [f"{key}={hf[key]}" for key in _DROPOUT_FIELDS if hf.get(key)]
  if set_rates:
    log.warning("config.json sets %s: phi_jax has no dropout, so it trains and evaluates without it, and save_hf "
                "writes 0.0", ", ".join(set_rates))


def from_hf_config(hf: Any, **overrides: Any) -> PhiConfig:
  """A `config.json` dict (either layout) or a transformers config -> PhiConfig.

  Args:
    hf: the parsed `config.json`, or a `transformers.Phi3Config`.
    **overrides: PhiConfig fields to set on the result (run-time knobs such as `attention_backend`).

  Raises:
    ValueError: naming the field, for a checkpoint whose math phi_jax does not implement.
  """
  check_field_names(overrides)
  hf = _as_dict(hf)
  _check_supported(hf)
  rope = _rope_dict(hf)
  rope_type_name = rope.get("rope_type", rope.get("type", "default"))
  if rope_type_name not in _ROPE_TYPES:
    raise ValueError(f"rope_scaling type {rope_type_name!r} is not supported; supported: {sorted(_ROPE_TYPES)}")
  rope_type = _ROPE_TYPES[rope_type_name]

  max_positions = _first_set(hf.get("max_position_embeddings"), _HF_DEFAULT_MAX_POSITIONS)
  # transformers takes the top-level key over the one inside the rope dict (a Phi3 exception in its rope utils),
  # and an absent top-level key still counts as its default, 4096: a value only in the dict is never used there.
  original_max = _first_set(hf.get("original_max_position_embeddings"), rope.get("original_max_position_embeddings"))
  if (rope_type == "longrope" and hf.get("original_max_position_embeddings") is None
      and original_max not in (None, _HF_DEFAULT_ORIGINAL_MAX_POSITIONS)):
    raise ValueError(
        f"original_max_position_embeddings={original_max} is set only inside the rope dict; transformers' Phi3Config "
        f"ignores it there and uses {_HF_DEFAULT_ORIGINAL_MAX_POSITIONS}, so the two would disagree. Set it at the "
        "top level of config.json too (transformers' save_pretrained writes both)")
  attention_factor = rope.get("attention_factor")
  short_factor = long_factor = None
  if rope_type == "longrope":
    if original_max is None:
      original_max = _HF_DEFAULT_ORIGINAL_MAX_POSITIONS
    for key in ("short_factor", "long_factor"):
      if not rope.get(key):
        raise ValueError(f"rope_scaling type {rope_type_name!r} (LongRoPE) needs {key!r}, which is missing")
    short_factor, long_factor = tuple(rope["short_factor"]), tuple(rope["long_factor"])
    # An explicit `factor` replaces max / original_max in transformers' attention-factor formula.
    factor = rope.get("factor")
    if attention_factor is None and factor is not None and not math.isclose(factor, max_positions / original_max):
      attention_factor = _longrope_attention_factor(factor, original_max)

  eos = _first_eos_id(hf.get("eos_token_id"))
  _warn_about_dropout(hf)

  num_heads = hf["num_attention_heads"]
  fields: dict[str, Any] = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim"),
      max_position_embeddings=max_positions,
      original_max_position_embeddings=original_max,
      rope_theta=float(_first_set(rope.get("rope_theta"), hf.get("rope_theta"), _HF_DEFAULT_ROPE_THETA)),
      partial_rotary_factor=float(_first_set(rope.get("partial_rotary_factor"), hf.get("partial_rotary_factor"), 1.0)),
      rope_scaling_type=rope_type,
      rope_short_factor=short_factor,
      rope_long_factor=long_factor,
      rope_attention_factor=None if attention_factor is None else float(attention_factor),
      rms_norm_eps=float(_first_set(hf.get("rms_norm_eps"), 1e-5)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=eos,
      pad_token_id=hf.get("pad_token_id"),
      initializer_range=float(_first_set(hf.get("initializer_range"), 0.02)),
  )
  dtype = _dtype_name(hf)
  if dtype is not None:
    fields["dtype"] = dtype
  fields.update(overrides)
  return PhiConfig(**fields)


def to_hf_config(config: PhiConfig) -> dict[str, Any]:
  """PhiConfig -> a classic-layout `config.json` dict for `Phi3ForCausalLM` (transformers 4.x and 5.x)."""
  rope_scaling = None
  original_max = config.original_max_position_embeddings
  if config.rope_scaling_type == "longrope":
    if config.rope_short_factor is None or config.rope_long_factor is None:
      raise ValueError("a LongRoPE config needs rope_short_factor and rope_long_factor to be written to config.json")
    rope_scaling = {"type": "longrope", "short_factor": list(config.rope_short_factor),
                    "long_factor": list(config.rope_long_factor)}
    # Written only when it differs from the value transformers derives from max / original_max: transformers 4.x's
    # Phi3Config refuses a fourth rope_scaling key, so a checkpoint that round-trips a derived factor stays loadable.
    derived = config.replace(rope_attention_factor=None).rope_attention_scale
    if config.rope_attention_factor is not None and not math.isclose(config.rope_attention_factor, derived,
                                                                     rel_tol=1e-6):
      log.warning("rope_attention_factor=%s differs from the derived %s: written as rope_scaling.attention_factor, "
                  "which transformers 5 reads and transformers 4.x's Phi3Config refuses", config.rope_attention_factor,
                  derived)
      rope_scaling["attention_factor"] = config.rope_attention_factor
    # Left out, transformers would use its class default (4096) instead of our max_position_embeddings.
    original_max = config.original_max_positions
  hf: dict[str, Any] = {
      "architectures": ["Phi3ForCausalLM"],
      "model_type": SUPPORTED_MODEL_TYPE,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rope_theta": config.rope_theta,
      "partial_rotary_factor": config.partial_rotary_factor,
      "rope_scaling": rope_scaling,
      "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings,
      # Written even when None, so transformers does not fill in its own defaults (32000 for eos and pad).
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "pad_token_id": config.pad_token_id,
      "initializer_range": config.initializer_range,
      "sliding_window": None,
      "attention_dropout": 0.0,
      "embd_pdrop": 0.0,
      "resid_pdrop": 0.0,
      "use_cache": True,
      "torch_dtype": config.dtype,
  }
  if original_max is not None:
    hf["original_max_position_embeddings"] = original_max
  if config.head_dim is not None:
    hf["head_dim"] = config.head_dim
  return hf
