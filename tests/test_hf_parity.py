"""load_hf on checkpoints written by transformers' save_pretrained gives the logits of Phi3ForCausalLM.

Tiny random models (hidden 64, 2 layers, eager attention) in float32; max abs logit difference <= 1e-4.
"""

import copy
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import phi_jax

TOLERANCE = 1e-4
VOCAB = 97
ORIGINAL_MAX = 16  # LongRoPE pretraining length of the mini-like model; its max_position_embeddings is 64
ROTARY_PAIRS = 6  # head_dim 16 * partial_rotary_factor 0.75 / 2

# The shape families of the Phi-4 checkpoints, shrunk.
VARIANTS = {
    "phi4": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=250000.0, max_position_embeddings=128,
                 original_max_position_embeddings=128),
    "mini": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, partial_rotary_factor=0.75,
                 max_position_embeddings=64, original_max_position_embeddings=ORIGINAL_MAX, tie_word_embeddings=True,
                 rope_scaling={"type": "longrope",
                               "short_factor": np.linspace(1.0, 1.5, ROTARY_PAIRS).tolist(),
                               "long_factor": np.linspace(1.0, 8.0, ROTARY_PAIRS).tolist()}),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128),
}

_forward = jax.jit(phi_jax.forward, static_argnums=2)


def _hf_model(seed: int, **overrides) -> transformers.Phi3ForCausalLM:
  torch.manual_seed(seed)
  config = transformers.Phi3Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, attn_implementation="eager", **overrides)
  model = transformers.Phi3ForCausalLM(config).eval()
  # Default init leaves the norms at 1; random scales make a swapped norm visible.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("layernorm.weight") or name == "model.norm.weight":
        param.uniform_(0.5, 1.5)
  return model


def _tokens(length: int) -> np.ndarray:
  return np.random.RandomState(length).randint(0, VOCAB, (2, length))


def _reference_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _max_diff(params, config, model, tokens) -> float:
  ours = np.asarray(_forward(params, tokens, config))
  return float(np.abs(ours - _reference_logits(model, tokens)).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """variant -> (checkpoint directory, the transformers model it holds)."""
  saved = {}
  for seed, (name, overrides) in enumerate(VARIANTS.items()):
    model = _hf_model(seed, **overrides)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    saved[name] = (directory, model)
  return saved


@pytest.mark.parametrize("variant,length", [
    ("phi4", 20),
    ("mini", ORIGINAL_MAX - 4),  # short factors
    ("mini", 2 * ORIGINAL_MAX - 2),  # long factors
    ("mha", 20),
    ("mqa", 20),
])
def test_logits_match_transformers(checkpoints, variant, length):
  directory, model = checkpoints[variant]
  config, params = phi_jax.load_hf(directory)
  assert config.param_dtype == "float32" and config.dtype == "float32"
  assert _max_diff(params, config, model, _tokens(length)) <= TOLERANCE


def test_mini_config_is_read_from_the_checkpoint(checkpoints):
  config, params = phi_jax.load_hf(checkpoints["mini"][0])
  rope = VARIANTS["mini"]["rope_scaling"]
  assert config.rope_scaling_type == "longrope"
  assert config.rope_short_factor == pytest.approx(rope["short_factor"])
  assert config.rope_long_factor == pytest.approx(rope["long_factor"])
  assert (config.partial_rotary_factor, config.original_max_position_embeddings) == (0.75, ORIGINAL_MAX)
  assert config.tie_word_embeddings and "lm_head" not in params


def test_long_factors_decide_long_sequences(checkpoints):
  """Reading the long factors matters: with short factors in their place the long-sequence logits drift."""
  directory, model = checkpoints["mini"]
  config, params = phi_jax.load_hf(directory)
  tokens = _tokens(2 * ORIGINAL_MAX - 2)
  assert _max_diff(params, config, model, tokens) <= TOLERANCE
  short_only = config.replace(rope_long_factor=config.rope_short_factor)
  assert _max_diff(params, short_only, model, tokens) > 10 * TOLERANCE


def test_sharded_checkpoint(checkpoints, tmp_path):
  _, model = checkpoints["phi4"]
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  config, params = phi_jax.load_hf(tmp_path)
  assert _max_diff(params, config, model, _tokens(20)) <= TOLERANCE


def test_a_single_file_saved_over_a_sharded_checkpoint(checkpoints, tmp_path):
  """save_pretrained of one file into a directory that held shards deletes them but leaves their index; transformers
  then reads model.safetensors, and so must load_hf (it failed on the missing shards)."""
  checkpoints["phi4"][1].save_pretrained(tmp_path, max_shard_size="40KB")
  _, model = checkpoints["mha"]  # another model (of another shape) saved over it
  model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors.index.json").exists()
  config, params = phi_jax.load_hf(tmp_path)
  assert _max_diff(params, config, model, _tokens(20)) <= TOLERANCE


def test_bfloat16_checkpoint(checkpoints, tmp_path):
  bf16_model = copy.deepcopy(checkpoints["phi4"][1]).to(torch.bfloat16)
  bf16_model.save_pretrained(tmp_path)
  config, params = phi_jax.load_hf(tmp_path, dtype="bfloat16", config_overrides={"dtype": "float32"})
  assert config.param_dtype == "bfloat16"
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(params)} == {"bfloat16"}
  embedding = bf16_model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32), embedding)
  # bf16 values are exact in float32: the float32 reference of the same weights must agree closely.
  assert _max_diff(params, config, bf16_model.float(), _tokens(20)) <= TOLERANCE
  # Without an override the compute dtype follows the checkpoint's torch_dtype.
  assert phi_jax.load_hf(tmp_path, dtype="bfloat16")[0].dtype == "bfloat16"


@pytest.mark.parametrize("variant", ["phi4", "mini"])
def test_gradients_match_transformers(checkpoints, variant, tmp_path):
  """Every parameter's gradient of a weighted logit sum equals torch's, the pad token's embedding row included (no
  gradient from the lookup, as nn.Embedding(padding_idx); a tied table's row keeps its LM-head share)."""
  directory, model = checkpoints[variant]
  config, params = phi_jax.load_hf(directory)
  tokens = _tokens(20)
  tokens[:, ::5] = config.pad_token_id  # the pad id as an ordinary token, as <|endoftext|> is in Phi-4 data
  weights = np.random.RandomState(1).normal(size=(*tokens.shape, VOCAB)).astype(np.float32)

  grads = jax.grad(lambda p: (phi_jax.forward(p, tokens, config) * weights).sum())(params)
  phi_jax.save_hf(tmp_path, config, grads)  # the gradient tree in transformers' names and layouts
  ours = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  model = copy.deepcopy(model)
  (model(torch.tensor(tokens)).logits * torch.tensor(weights)).sum().backward()
  theirs = {name: p.grad.numpy() for name, p in model.named_parameters()}
  assert set(ours) == set(theirs)
  for name, grad in theirs.items():
    np.testing.assert_allclose(ours[name], grad, atol=1e-3 * np.abs(grad).max(), err_msg=name)
  pad_row = theirs["model.embed_tokens.weight"][config.pad_token_id]
  if config.tie_word_embeddings:
    assert np.abs(pad_row).max() > 1.0
  else:
    assert not pad_row.any()
