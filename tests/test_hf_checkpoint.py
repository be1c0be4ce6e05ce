"""save_hf / load_hf round trips through transformers, config conversion both ways, and refusals that name the field."""

import json
import logging
import re
import tracemalloc
import weakref

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

import phi_jax
from phi_jax.hf import checkpoint, from_hf_config, to_hf_config
from phi_jax.model import PhiConfig

TOLERANCE = 1e-4
ROTARY_PAIRS = 6  # head_dim 16 * partial_rotary_factor 0.75 / 2

UNTIED = PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=128, original_max_position_embeddings=128, rope_theta=250000.0,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0,
                   rms_norm_eps=1e-3)  # not the default 1e-5: config.json, load_hf and the norms must all carry it
TIED_LONGROPE = UNTIED.replace(
    num_kv_heads=1, tie_word_embeddings=True, partial_rotary_factor=0.75, max_position_embeddings=64,
    original_max_position_embeddings=16, rope_theta=10000.0, rope_scaling_type="longrope",
    rope_short_factor=tuple(np.linspace(1.0, 1.4, ROTARY_PAIRS)),
    rope_long_factor=tuple(np.linspace(1.0, 6.0, ROTARY_PAIRS)))

_forward = jax.jit(phi_jax.forward, static_argnums=2)


def _random_params(config: PhiConfig, seed: int):
  """Parameters of init_params' shapes (no compile needed): normal(0, 0.02) weights, norm scales in [0.5, 1.5]."""
  shapes = jax.eval_shape(lambda key: phi_jax.init_params(config, key), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":  # random, not ones, so a misplaced norm shows in the logits
      return jax.numpy.asarray(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
    return jax.numpy.asarray(rng.normal(0.0, 0.02, leaf.shape).astype(np.float32))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _tokens(config: PhiConfig, length: int) -> np.ndarray:
  return np.random.RandomState(length).randint(0, config.vocab_size, (2, length))


def _transformers_logits(directory, tokens) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _tensor_names(directory) -> set[str]:
  names = set()
  for file in directory.glob("*.safetensors"):
    with safe_open(file, framework="numpy") as reader:
      names.update(reader.keys())
  return names


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (config, params, directory written by save_hf)."""
  out = {}
  for seed, (name, config) in enumerate([("untied", UNTIED), ("tied_longrope", TIED_LONGROPE)]):
    params = _random_params(config, seed)
    directory = tmp_path_factory.mktemp(name)
    phi_jax.save_hf(directory, config, params)
    out[name] = (config, params, directory)
  return out


# ---------------------------------------------------------------------------------------------- save_hf round trips


@pytest.mark.parametrize("name,length", [("untied", 20), ("tied_longrope", 24)])
def test_transformers_loads_save_hf_output(saved, name, length):
  config, params, directory = saved[name]
  tokens = _tokens(config, length)
  ours = np.asarray(_forward(params, tokens, config))
  assert np.abs(ours - _transformers_logits(directory, tokens)).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["untied", "tied_longrope"])
def test_load_hf_of_save_hf_is_identity(saved, name):
  config, params, directory = saved[name]
  loaded_config, loaded = phi_jax.load_hf(directory)
  assert loaded_config == config
  _assert_same_params(loaded, params)


def _tensor_dtypes(directory) -> set[str]:
  dtypes = set()
  for file in directory.glob("*.safetensors"):
    with safe_open(file, framework="pt") as reader:
      dtypes.update(str(reader.get_slice(name).get_dtype()) for name in reader.keys())
  return dtypes


def test_a_narrower_compute_dtype_is_the_exported_torch_dtype(saved, tmp_path):
  """bfloat16 compute over float32 weights (a training run's export): the tensors stay float32, torch_dtype names the
  compute dtype, so transformers (and vLLM's dtype=auto) compute in bfloat16 as the run did, and load_hf gives back
  the same config and params (torch_dtype used to name the tensors' float32: transformers computed in float32)."""
  config, params, _ = saved["untied"]
  mixed = config.replace(dtype="bfloat16")
  phi_jax.save_hf(tmp_path, mixed, params)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["torch_dtype"] == "bfloat16" and "phi_jax_compute_dtype" not in written
  assert _tensor_dtypes(tmp_path) == {"F32"}
  loaded_config, loaded = phi_jax.load_hf(tmp_path)
  assert loaded_config == mixed
  _assert_same_params(loaded, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert model.dtype == torch.bfloat16
  tokens = _tokens(config, 20)
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.float().numpy()
  ours = np.asarray(_forward(params, tokens, mixed))
  exact = np.asarray(_forward(params, tokens, config))
  # Both compute in bfloat16 (in different orders): each is as far from the float32 logits as the other.
  scale = np.abs(exact).max()
  assert np.abs(theirs - ours).max() <= 0.05 * scale and np.abs(ours - exact).max() <= 0.05 * scale
  assert np.abs(_transformers_logits(saved["untied"][2], tokens) - exact).max() <= TOLERANCE


def test_the_compute_dtype_of_older_exports_and_transformers_resaves(saved, tmp_path):
  """Exports of earlier versions named the tensors' dtype in torch_dtype and the compute dtype in
  phi_jax_compute_dtype: still read so. Once transformers has re-saved such a checkpoint, it computes in its own
  dtype / torch_dtype (the older key stays behind, stale), and so does load_hf; `dtype` wins over `torch_dtype`."""
  config, params, directory = saved["untied"]
  _copy_checkpoint(directory, tmp_path)
  old = json.loads((directory / "config.json").read_text()) | {"torch_dtype": "float32",
                                                               "phi_jax_compute_dtype": "bfloat16"}
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert phi_jax.load_hf(tmp_path)[0] == config.replace(dtype="bfloat16")
  # The same file read by transformers first (its to_dict() adds the running version, not the file's).
  assert from_hf_config(transformers.AutoConfig.from_pretrained(tmp_path)).dtype == "bfloat16"
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  for torch_dtype, name in ((torch.float32, "float32"), (torch.float16, "float16")):
    model.to(torch_dtype).save_pretrained(tmp_path / name)
    resaved = json.loads((tmp_path / name / "config.json").read_text())
    assert resaved["phi_jax_compute_dtype"] == "bfloat16"  # what makes the rule needed
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).dtype == torch_dtype
    assert phi_jax.load_hf(tmp_path / name)[0].dtype == name
  both = old | {"dtype": "float16", "transformers_version": "5.0.0"}
  assert from_hf_config(both).dtype == "float16" == str(transformers.Phi3Config(**both).dtype).removeprefix("torch.")


def test_longrope_with_its_own_head_dim_is_exported_with_a_warning(tmp_path, caplog):
  """transformers' Phi3Config sizes LongRoPE factors from hidden_size // num_heads, not head_dim, and refuses such a
  checkpoint: said at export. load_hf reads it back."""
  config = TIED_LONGROPE.replace(head_dim=24, partial_rotary_factor=0.5, rope_short_factor=(1.0,) * 6,
                                 rope_long_factor=(2.0,) * 6)
  params = _random_params(config, 3)
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    phi_jax.save_hf(tmp_path, config, params)
  assert "LongRoPE with head_dim=24 (not hidden_size // num_heads = 16)" in caplog.text
  assert phi_jax.load_hf(tmp_path)[0] == config
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    phi_jax.save_hf(tmp_path / "plain", TIED_LONGROPE, _random_params(TIED_LONGROPE, 3))
  assert "head_dim" not in caplog.text


def test_tied_model_writes_no_lm_head(saved):
  assert "lm_head.weight" not in _tensor_names(saved["tied_longrope"][2])
  assert "lm_head.weight" in _tensor_names(saved["untied"][2])


def test_a_tied_checkpoint_with_a_different_lm_head_is_refused(saved, tmp_path):
  """config.json says tied, yet lm_head.weight is not the embedding: transformers 5 would untie and use it,
  transformers 4 would ignore it. A copy of the embedding loads as before; a different head needs a decision."""
  import shutil
  from safetensors.numpy import load_file, save_file

  config, params, directory = saved["tied_longrope"]
  tensors = load_file(directory / "model.safetensors")
  embedding = tensors["model.embed_tokens.weight"]
  copy_dir, other_dir = tmp_path / "copy", tmp_path / "other"
  for target, head in ((copy_dir, embedding.copy()), (other_dir, embedding + 1.0)):
    shutil.copytree(directory, target)
    save_file(dict(tensors, **{"lm_head.weight": head}), target / "model.safetensors", metadata={"format": "pt"})
  _assert_same_params(phi_jax.load_hf(copy_dir)[1], params)
  with pytest.raises(ValueError, match="tie_word_embeddings.*lm_head.weight differs"):
    phi_jax.load_hf(other_dir)
  untied_config, untied = phi_jax.load_hf(other_dir, config_overrides={"tie_word_embeddings": False})
  assert not untied_config.tie_word_embeddings
  np.testing.assert_array_equal(np.asarray(untied["lm_head"]["kernel"]), (embedding + 1.0).T)


def test_single_file_and_generation_config(saved):
  directory = saved["untied"][2]
  assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
  generation = transformers.GenerationConfig.from_pretrained(directory)
  assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)


def test_stop_tokens_reach_transformers_generate(saved, tmp_path):
  """With the chat family's stop tokens, generation_config lists them (the config's own eos too) and config.json
  gets the first when the config has no eos: transformers' generate then ends a reply at the end of its turn."""
  config, params, _ = saved["untied"]
  phi_jax.save_hf(tmp_path / "with_eos", config, params, stop_token_ids=[7, 9])
  generation = transformers.GenerationConfig.from_pretrained(tmp_path / "with_eos")
  assert generation.eos_token_id == [7, 9, 2]
  no_eos = config.replace(eos_token_id=None)
  phi_jax.save_hf(tmp_path / "no_eos", no_eos, params, stop_token_ids=[7, 9])
  assert json.loads((tmp_path / "no_eos" / "config.json").read_text())["eos_token_id"] == 7
  assert transformers.GenerationConfig.from_pretrained(tmp_path / "no_eos").eos_token_id == [7, 9]
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "no_eos")
  prompt = torch.tensor([[3, 4, 5]])
  first = int(model(prompt).logits[0, -1].argmax())  # make the first greedy token a stop token: one token, no more
  phi_jax.save_hf(tmp_path / "stops", no_eos, params, stop_token_ids=[first])
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stops")
  out = model.generate(prompt, max_new_tokens=5, do_sample=False)
  assert out.shape == (1, 4) and int(out[0, -1]) == first


def test_sharded_save(saved, tmp_path):
  config, params, directory = saved["untied"]
  phi_jax.save_hf(tmp_path, config, params, max_shard_bytes=64 * 1024)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert not (tmp_path / "model.safetensors").exists()
  assert set(index["weight_map"]) == _tensor_names(directory)
  _assert_same_params(phi_jax.load_hf(tmp_path)[1], params)
  tokens = _tokens(config, 20)
  np.testing.assert_array_equal(_transformers_logits(tmp_path, tokens), _transformers_logits(directory, tokens))


def test_params_of_another_layer_count_are_refused_and_a_failed_save_keeps_the_old_export(saved, tmp_path,
                                                                                        monkeypatch):
  """Layers are sliced out before a tensor's shape is checked, and slicing clamps: params of 3 layers under a
  2-layer config lost one, of 1 layer wrote it twice. And the old export was deleted before the new one was made."""
  config, params, _ = saved["untied"]
  phi_jax.save_hf(tmp_path, config, params, max_shard_bytes=64 * 1024)  # a good export, in several shards
  before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
  for layers in (3, 1):
    other = _random_params(config.replace(num_layers=layers), 5)
    with pytest.raises(ValueError, match=rf"params do not match the config's shapes .*\({layers}, "):
      phi_jax.save_hf(tmp_path, config, other)
  # A failure mid-write (here: the second shard's first tensor) leaves every file of the old export as it was.
  calls = []
  real = checkpoint._write_safetensors

  def failing(file, entries, dtype):
    calls.append(file)
    if len(calls) == 2:
      raise OSError("No space left on device")
    return real(file, entries, dtype)

  monkeypatch.setattr(checkpoint, "_write_safetensors", failing)
  with pytest.raises(OSError, match="No space left"):
    phi_jax.save_hf(tmp_path, config, _random_params(config, 6), max_shard_bytes=64 * 1024)
  assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
  _assert_same_params(phi_jax.load_hf(tmp_path)[1], params)


@pytest.mark.parametrize("change,message", [
    (dict(stop_token_ids=["<|im_end|>"]), r"stop_token_ids must be token ids .*'<\|im_end\|>'"),
    (dict(config=TIED_LONGROPE.replace(rope_short_factor=None, rope_long_factor=None)),
     "needs rope_short_factor and rope_long_factor"),
])
def test_a_save_whose_config_json_fails_keeps_the_old_export(saved, tmp_path, change, message):
  """config.json was made after the new weights had replaced the old ones: a config that could not be written left
  new weights under the old config.json, which transformers loaded with the missing layers at random."""
  config, params, _ = saved["tied_longrope"]
  phi_jax.save_hf(tmp_path, config, params)
  before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
  arguments = dict(config=config, stop_token_ids=()) | change
  with pytest.raises(ValueError, match=message):
    phi_jax.save_hf(tmp_path, params=_random_params(config, 7), **arguments)
  assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # no temporary files left either


def test_a_stale_index_beside_model_safetensors_is_ignored_as_transformers_does(saved, tmp_path):
  """transformers reads model.safetensors over an index; its save_pretrained leaves an earlier sharded save's index
  beside a new single file, which load_hf read and then failed on the deleted shards."""
  config, params, directory = saved["untied"]
  phi_jax.save_hf(tmp_path, config, _random_params(config, 8), max_shard_bytes=64 * 1024)
  index = (tmp_path / "model.safetensors.index.json").read_bytes()
  for shard in tmp_path.glob("model-*-of-*.safetensors"):
    shard.unlink()
  _copy_checkpoint(directory, tmp_path)
  (tmp_path / "model.safetensors.index.json").write_bytes(index)
  _assert_same_params(phi_jax.load_hf(tmp_path)[1], params)
  tokens = _tokens(config, 12)
  np.testing.assert_allclose(_transformers_logits(tmp_path, tokens), np.asarray(_forward(params, tokens, config)),
                             atol=TOLERANCE)
  # Only the index: the missing shards are named, with what to do.
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"names shard\(s\) that are not there: model-00001-of-\d+.safetensors"):
    phi_jax.load_hf(tmp_path)


def test_bfloat16_save(saved, tmp_path):
  config, params, _ = saved["untied"]
  phi_jax.save_hf(tmp_path, config, params, dtype="bfloat16")
  assert _tensor_dtypes(tmp_path) == {"BF16"}
  # torch_dtype is the compute dtype (float32 here): transformers computes in it, as phi_jax does.
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
  loaded_config, loaded = phi_jax.load_hf(tmp_path, dtype="bfloat16")
  assert loaded_config.param_dtype == "bfloat16" and loaded_config.dtype == "float32"
  _assert_same_params(loaded, jax.tree.map(lambda x: x.astype("bfloat16"), params))


# ---------------------------------------------------------------------------------------------- load_hf behaviour


def test_load_with_shardings(saved):
  config, params, directory = saved["untied"]
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  # Every parameter split over all 8 devices on its two leading axes (sizes 2, 4, 64, 96 or 128 here).
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(*("a", "b")[:x.ndim])), params)
  _, loaded = phi_jax.load_hf(directory, shardings=shardings)
  for leaf, sharding in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding
  _assert_same_params(loaded, params)


def _nbytes(params, path):
  for key in path:
    params = params[key]
  return params.nbytes


def test_load_keeps_one_parameter_group_on_host(saved, monkeypatch):
  """Each parameter's host copy is gone before the next one is read (fused q/k/v and gate/up form one group)."""
  config, params, directory = saved["untied"]
  device_put = jax.device_put
  placed: list[tuple[weakref.ref, int]] = []
  live_peak = []

  def recording_device_put(host, sharding=None):
    placed.append((weakref.ref(host), host.nbytes))
    live_peak.append(sum(size for ref, size in placed if ref() is not None))
    return device_put(np.array(host), sharding)  # a copy, so jax holds no reference to `host`

  monkeypatch.setattr(jax, "device_put", recording_device_put)
  phi_jax.load_hf(directory)
  largest_group = max(sum(_nbytes(params, path) for path in spec.paths) for spec in checkpoint._tensor_specs(config))
  assert len(placed) == len(jax.tree.leaves(params))
  assert max(live_peak) <= largest_group


def test_save_streams_tensors(tmp_path):
  """save_hf holds about one tensor on the host at a time, never the whole model."""
  config = UNTIED.replace(hidden_size=128, intermediate_size=512, num_layers=8, vocab_size=256)
  params = _random_params(config, 0)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  tracemalloc.start()
  try:
    phi_jax.save_hf(tmp_path, config, params)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 0.5 * model_bytes


def _rewrite_single_file(directory, edit):
  file = directory / "model.safetensors"
  with safe_open(file, framework="numpy") as reader:
    tensors = {name: reader.get_tensor(name) for name in reader.keys()}
  save_file(edit(tensors), file, metadata={"format": "pt"})


def _copy_checkpoint(source, target):
  for file in source.iterdir():
    (target / file.name).write_bytes(file.read_bytes())


@pytest.mark.parametrize("edit,message", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.weight"},
     "model.layers.1.mlp.down_proj.weight"),
    (lambda t: {**t, "model.layers.0.self_attn.qkv_proj.bias": np.zeros(128, np.float32)},
     "model.layers.0.self_attn.qkv_proj.bias"),
    (lambda t: {**t, "model.norm.weight": np.ones(32, np.float32)}, "model.norm.weight"),
    # A bare Phi3Model: the names lack "model." (and there is no LM head).
    (lambda t: {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")},
     "are there without the 'model.' prefix: this looks like a bare Phi3Model checkpoint"),
])
def test_load_refuses_wrong_tensors(saved, tmp_path, edit, message):
  _copy_checkpoint(saved["untied"][2], tmp_path)
  _rewrite_single_file(tmp_path, edit)
  with pytest.raises(ValueError, match=re.escape(message)):
    phi_jax.load_hf(tmp_path)


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0904c2f10a1f7bd9b1ca1e8fce1de0ee2c1a1b2f3\nsize 4933656472\n")


def test_unreadable_weight_files_are_named_with_what_to_do(saved, tmp_path):
  """Git LFS pointers (a clone without git-lfs) and a truncated shard (an interrupted download) failed with the
  safetensors library's bare 'header too large' / 'incomplete metadata', naming no file."""
  config, params, _ = saved["untied"]
  single = tmp_path / "single"
  single.mkdir()
  _copy_checkpoint(saved["untied"][2], single)
  (single / "model.safetensors").write_text(LFS_POINTER)
  with pytest.raises(ValueError, match=r"model\.safetensors is a Git LFS pointer.*git lfs pull.*huggingface-cli"):
    phi_jax.load_hf(single)
  sharded = tmp_path / "sharded"
  phi_jax.save_hf(sharded, config, params, max_shard_bytes=64 * 1024)
  shard = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
  shard.write_text(LFS_POINTER)
  with pytest.raises(ValueError, match=rf"{re.escape(shard.name)} is a Git LFS pointer"):
    phi_jax.load_hf(sharded)
  phi_jax.save_hf(sharded, config, params, max_shard_bytes=64 * 1024)
  with open(shard, "r+b") as file:
    file.truncate(shard.stat().st_size // 2)
  with pytest.raises(ValueError, match=rf"{re.escape(shard.name)} cannot be read .*incomplete.*download it again"):
    phi_jax.load_hf(sharded)


def test_an_index_that_maps_a_tensor_to_the_wrong_shard_names_tensor_shard_and_index(saved, tmp_path):
  config, params, _ = saved["untied"]
  phi_jax.save_hf(tmp_path, config, params, max_shard_bytes=64 * 1024)
  index_file = tmp_path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  name = "model.layers.1.mlp.down_proj.weight"
  wrong = next(file for file in sorted(set(index["weight_map"].values())) if file != index["weight_map"][name])
  index["weight_map"][name] = wrong
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=rf"{re.escape(str(index_file))} maps {re.escape(name)} to {re.escape(wrong)}, "
                     "which does not hold it"):
    phi_jax.load_hf(tmp_path)


def test_load_hf_dtype_takes_auto_and_torch_dtypes(saved, tmp_path):
  """dtype='auto' and torch.bfloat16, as transformers' from_pretrained takes them, failed with numpy TypeErrors."""
  config, params, _ = saved["untied"]
  phi_jax.save_hf(tmp_path, config.replace(dtype="bfloat16"), params, dtype="float16")
  # "auto" is the checkpoint's own dtype, as transformers reads it: config.json's torch_dtype ...
  auto_config, auto = phi_jax.load_hf(tmp_path, dtype="auto")
  assert auto_config.param_dtype == "bfloat16" and {x.dtype.name for x in jax.tree.leaves(auto)} == {"bfloat16"}
  # ... or, where config.json names none, the stored tensors' dtype.
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "torch_dtype"}))
  assert phi_jax.load_hf(tmp_path, dtype="auto")[0].param_dtype == "float16"
  for spelling in (torch.bfloat16, "torch.bfloat16", "bfloat16", jax.numpy.bfloat16):
    assert phi_jax.load_hf(tmp_path, dtype=spelling)[0].param_dtype == "bfloat16"
  for bad in ("bf16", "int8", torch.int8, "nonsense"):
    with pytest.raises(ValueError, match=r"load_hf\(dtype=.*'auto'.*'bfloat16'"):
      phi_jax.load_hf(tmp_path, dtype=bad)


def test_save_hf_dtype_takes_auto_and_torch_dtypes(saved, tmp_path):
  config, params, _ = saved["untied"]
  phi_jax.save_hf(tmp_path / "torch", config, params, dtype=torch.bfloat16)
  assert _tensor_dtypes(tmp_path / "torch") == {"BF16"}
  phi_jax.save_hf(tmp_path / "auto", config, params, dtype="auto")  # the params' own dtype, as dtype=None
  assert _tensor_dtypes(tmp_path / "auto") == {"F32"}
  for bad in ("bf16", torch.int8, "float64"):
    with pytest.raises(ValueError, match=r"save_hf\(dtype=.*supported: .*'bfloat16'"):
      phi_jax.save_hf(tmp_path / "bad", config, params, dtype=bad)


def test_directories_that_are_not_safetensors_checkpoints_say_so(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="has no config.json: point at a transformers checkpoint directory"):
    phi_jax.load_hf(tmp_path)
  (tmp_path / "config.json").write_bytes((saved["untied"][2] / "config.json").read_bytes())
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin: PyTorch .bin weights are not read, convert"):
    phi_jax.load_hf(tmp_path)


def test_adapters_and_hub_ids_say_what_to_do_instead(saved, tmp_path, monkeypatch):
  """A PEFT adapter directory was told to point at what save_pretrained wrote (PEFT's save_pretrained wrote it), and
  a hub id that it lacked a config.json."""
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base"}))
  save_file({"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": np.zeros((8, 64), np.float32)},
            adapter / "adapter_model.safetensors", metadata={"format": "pt"})
  merge = r"PEFT adapter .*not read.*merge_and_unload\(\)\.save_pretrained"
  with pytest.raises(FileNotFoundError, match=merge):
    phi_jax.load_hf(adapter)
  (adapter / "config.json").write_bytes((saved["untied"][2] / "config.json").read_bytes())
  with pytest.raises(FileNotFoundError, match=merge):
    phi_jax.load_hf(adapter)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"hub id.*not downloaded.*snapshot_download"):
    phi_jax.load_hf("microsoft/Phi-4-mini-instruct")
  for local in ("/phi_jax_no_such_directory", "./runs/final"):  # local paths, of two parts too
    with pytest.raises(FileNotFoundError, match="has no config.json"):
      phi_jax.load_hf(local)


def test_quantized_checkpoints_are_refused_naming_the_method(saved, tmp_path):
  """They failed with 'lacks N tensor(s)' (qweight, scales, ... instead of weight)."""
  _copy_checkpoint(saved["untied"][2], tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  hf["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"quant_method='gptq'.*bfloat16 / float16 original"):
    phi_jax.load_hf(tmp_path)


def test_a_checkpoint_with_another_head_is_named(tmp_path):
  """A Phi3ForSequenceClassification was reported only as lacking lm_head.weight."""
  hf = to_hf_config(UNTIED)
  transformers.Phi3ForSequenceClassification(transformers.Phi3Config(**hf, num_labels=1)).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"Phi3ForSequenceClassification.*only causal-LM checkpoints"):
    phi_jax.load_hf(tmp_path)
  # Without `architectures`, the names that are there instead tell.
  written = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in written.items() if k != "architectures"}))
  with pytest.raises(ValueError, match=r"lacks 1 tensor.*lm_head\.weight.*instead: score\.weight"):
    phi_jax.load_hf(tmp_path)


def test_config_overrides_spelled_as_transformers_does_name_our_field(saved):
  with pytest.raises(ValueError, match=r"'num_hidden_layers' \(PhiConfig calls it num_layers\)"):
    phi_jax.load_hf(saved["untied"][2], config_overrides={"num_hidden_layers": 1})


def test_tied_checkpoint_may_carry_lm_head(saved, tmp_path):
  config, params, directory = saved["tied_longrope"]
  _copy_checkpoint(directory, tmp_path)
  _rewrite_single_file(tmp_path, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
  loaded_config, loaded = phi_jax.load_hf(tmp_path)
  assert loaded_config == config
  _assert_same_params(loaded, params)


def test_untied_checkpoint_needs_lm_head(saved, tmp_path):
  _copy_checkpoint(saved["untied"][2], tmp_path)
  _rewrite_single_file(tmp_path, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
  with pytest.raises(ValueError, match=r"lm_head\.weight"):
    phi_jax.load_hf(tmp_path)


# ---------------------------------------------------------------------------------------------- config conversion


def _with_made_up_factors(config: PhiConfig) -> PhiConfig:
  if config.rope_scaling_type != "longrope":
    return config
  pairs = config.rotary_dim // 2
  return config.replace(rope_short_factor=tuple(np.linspace(1.0, 1.1, pairs)),
                        rope_long_factor=tuple(np.linspace(1.0, 48.0, pairs)))


def test_config_fields_take_the_types_transformers_strict_config_needs(tmp_path):
  """Whole-number floats (from JSON or YAML) and numpy ints passed for ints, and ints for floats, reached config.json
  as written, and transformers 5's Phi3Config refused the checkpoint (or json could not write a numpy int)."""
  config = TIED_LONGROPE.replace(original_max_position_embeddings=16.0, bos_token_id=np.int64(1), eos_token_id=2.0,
                                 pad_token_id=np.int32(0), rms_norm_eps=0, initializer_range=1, rope_theta=10000,
                                 partial_rotary_factor=np.float32(0.75))
  ints = ("original_max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
  assert [type(getattr(config, name)) for name in ints] == [int] * 4
  floats = ("rms_norm_eps", "initializer_range", "rope_theta", "partial_rotary_factor")
  assert [type(getattr(config, name)) for name in floats] == [float] * 4
  assert config == TIED_LONGROPE.replace(rms_norm_eps=0.0, initializer_range=1.0) and hash(config)
  phi_jax.save_hf(tmp_path, config, _random_params(config, 0))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert (loaded.config.original_max_position_embeddings, loaded.config.eos_token_id) == (16, 2)
  assert TIED_LONGROPE.replace(eos_token_id=None).eos_token_id is None
  for name, value in (("original_max_position_embeddings", 16.5), ("eos_token_id", True), ("pad_token_id", "0"),
                      ("bos_token_id", 1.5), ("eos_token_id", [2, 3]), ("rms_norm_eps", "1e-5"),
                      ("initializer_range", True)):
    with pytest.raises(ValueError, match=f"PhiConfig.{name} must be"):
      TIED_LONGROPE.replace(**{name: value})


@pytest.mark.parametrize("name", list(phi_jax.presets))
def test_config_round_trip(name):
  config = _with_made_up_factors(phi_jax.presets[name])
  assert from_hf_config(to_hf_config(config)) == config


@pytest.mark.parametrize("name", list(phi_jax.presets))
def test_transformers_reads_our_config(name):
  """Phi3Config built from to_hf_config converts back to the same config (through transformers' own parsing)."""
  config = _with_made_up_factors(phi_jax.presets[name])
  hf = transformers.Phi3Config(**to_hf_config(config))
  converted = from_hf_config(hf)
  if config.original_max_position_embeddings is None:
    # Without LongRoPE the key has no effect; left out, transformers fills in its class default.
    assert config.rope_scaling_type is None
    converted = converted.replace(original_max_position_embeddings=None)
  assert converted == config


MINI_LIKE_CLASSIC = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75, "sliding_window": 262144, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * ROTARY_PAIRS,
                     "long_factor": np.linspace(1, 4, ROTARY_PAIRS).tolist()},
}


def test_classic_and_transformers5_layouts_agree(tmp_path):
  classic = from_hf_config(MINI_LIKE_CLASSIC)
  assert classic.rope_scaling_type == "longrope" and classic.rope_theta == 10000.0
  assert classic.partial_rotary_factor == 0.75 and classic.original_max_position_embeddings == 16
  assert classic.eos_token_id == 2 and classic.dtype == "bfloat16" and classic.tie_word_embeddings
  # What transformers 5 save_pretrained writes for the same model (rope_parameters, no top-level rope_theta).
  transformers.AutoConfig.for_model(**MINI_LIKE_CLASSIC).save_pretrained(tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in written and "rope_theta" not in written
  assert from_hf_config(written) == classic
  assert from_hf_config(transformers.AutoConfig.from_pretrained(tmp_path)) == classic


def test_rope_scaling_variants():
  su = from_hf_config(MINI_LIKE_CLASSIC | {"rope_scaling": MINI_LIKE_CLASSIC["rope_scaling"] | {"type": "su"}})
  assert su == from_hf_config(MINI_LIKE_CLASSIC)
  # transformers' Phi3Config reads "yarn" as LongRoPE too (an alias of the first Phi-3 checkpoints).
  yarn = MINI_LIKE_CLASSIC | {"rope_scaling": MINI_LIKE_CLASSIC["rope_scaling"] | {"type": "yarn"}}
  assert from_hf_config(yarn) == su
  assert transformers.Phi3Config(**yarn).rope_parameters["rope_type"] == "longrope"
  with_factor = {"rope_type": "longrope", "attention_factor": 1.25} | {
      k: MINI_LIKE_CLASSIC["rope_scaling"][k] for k in ("short_factor", "long_factor")}
  assert from_hf_config(MINI_LIKE_CLASSIC | {"rope_scaling": with_factor}).rope_attention_scale == 1.25
  # An explicit `factor` replaces max / original_max (64 / 16) in the default attention factor.
  with_factor = MINI_LIKE_CLASSIC["rope_scaling"] | {"factor": 8.0}
  expected = np.sqrt(1 + np.log(8.0) / np.log(16))
  config = from_hf_config(MINI_LIKE_CLASSIC | {"rope_scaling": with_factor})
  assert config.rope_attention_scale == pytest.approx(expected)
  # transformers 5 layout without LongRoPE: theta and the rotary fraction only inside rope_parameters.
  phi4_like = MINI_LIKE_CLASSIC | {"rope_scaling": None, "rope_theta": None, "partial_rotary_factor": None}
  phi4_like["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 0.5}
  config = from_hf_config(phi4_like)
  assert config.rope_scaling_type is None and config.rope_theta == 250000.0 and config.rotary_dim == 8
  # original_max only inside the rope dict: transformers would use 4096 instead, so it is an error, not a guess.
  dict_only = {k: v for k, v in MINI_LIKE_CLASSIC.items() if k != "original_max_position_embeddings"}
  dict_only["rope_scaling"] = MINI_LIKE_CLASSIC["rope_scaling"] | {"original_max_position_embeddings": 16}
  with pytest.raises(ValueError, match="set only inside the rope dict"):
    from_hf_config(dict_only)


def test_an_attention_factor_is_exported_only_when_it_is_not_the_derived_one(caplog):
  """transformers 4.x's Phi3Config accepts exactly type, short_factor and long_factor in rope_scaling, so a factor
  read from a config.json that spelled out the derived value must not make the export unloadable there."""
  config = from_hf_config(MINI_LIKE_CLASSIC)
  derived = config.replace(rope_attention_factor=config.rope_attention_scale)
  assert set(to_hf_config(derived)["rope_scaling"]) == {"type", "short_factor", "long_factor"}
  with caplog.at_level("WARNING", logger="phi_jax"):
    custom = to_hf_config(config.replace(rope_attention_factor=1.25))
  assert custom["rope_scaling"]["attention_factor"] == 1.25 and "transformers 4.x" in caplog.text
  assert from_hf_config(custom).rope_attention_scale == 1.25


@pytest.mark.parametrize("rope", [
    # The same setting at the top level and in the rope dict, with different values.
    {"rope_theta": 1000.0, "partial_rotary_factor": 0.5,
     "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.75}},
    # Only at the top level, beside a rope dict that leaves them out.
    {"rope_theta": 1000.0, "partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default"}},
    # Both dicts: rope_scaling (the classic key) against rope_parameters.
    {"rope_theta": 1000.0, "rope_scaling": {"rope_type": "default", "rope_theta": 7000.0},
     "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.75}},
])
def test_conflicting_rope_settings_resolve_as_transformers_does(rope):
  """Where a config.json says a rotary setting twice, the value used is the one transformers' Phi3 rotary uses."""
  hf = {k: v for k, v in MINI_LIKE_CLASSIC.items() if k not in ("rope_scaling", "rope_theta", "partial_rotary_factor")}
  hf |= rope
  ours = from_hf_config(hf)
  theirs = transformers.Phi3Config(**hf).rope_parameters  # what modeling_phi3's rotary embedding reads
  assert ours.rope_theta == theirs["rope_theta"]
  assert ours.partial_rotary_factor == theirs.get("partial_rotary_factor", 1.0)


@pytest.mark.parametrize("change,field", [
    ({"model_type": "phimoe"}, "model_type"),
    ({"num_local_experts": 16, "num_experts_per_tok": 2}, "num_local_experts"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu_new"}, "hidden_act"),
    ({"sliding_window": 32}, "sliding_window"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
])
def test_unsupported_configs_name_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    from_hf_config(MINI_LIKE_CLASSIC | change)


def test_a_sliding_window_is_compared_with_the_max_positions_transformers_uses():
  """Without a max_position_embeddings key transformers uses 4096, and a window of 8 masks; it was accepted."""
  no_max = {k: v for k, v in MINI_LIKE_CLASSIC.items() if k != "max_position_embeddings"}
  with pytest.raises(ValueError, match=r"sliding_window=8 < max_position_embeddings=4096"):
    from_hf_config(no_max | {"sliding_window": 8})
  assert from_hf_config(no_max | {"sliding_window": 4096}).max_position_embeddings == 4096


def test_settings_phi_jax_drops_on_load_are_warned_about(caplog):
  """A list of eos ids kept its first without a word (an export then stopped at that one only), and dropout was
  accepted silently though phi_jax has none."""
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    config = from_hf_config(MINI_LIKE_CLASSIC | {"eos_token_id": [2, 5, 7]})
  assert config.eos_token_id == 2
  assert "eos_token_id=[2, 5, 7]" in caplog.text and "save_hf(stop_token_ids=[2, 5, 7])" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    from_hf_config(MINI_LIKE_CLASSIC | {"resid_pdrop": 0.1, "attention_dropout": 0.0, "embd_pdrop": 0.05})
  assert "resid_pdrop=0.1, embd_pdrop=0.05" in caplog.text and "no dropout" in caplog.text
  assert "attention_dropout" not in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    from_hf_config(MINI_LIKE_CLASSIC | {"eos_token_id": [2], "resid_pdrop": 0.0, "embd_pdrop": None})
  assert caplog.text == ""


def test_quantized_configs_are_refused():
  for method in ("gptq", "awq", "bitsandbytes"):
    with pytest.raises(ValueError, match=rf"quantization_config \(quant_method='{method}'\)"):
      from_hf_config(MINI_LIKE_CLASSIC | {"quantization_config": {"quant_method": method}})
