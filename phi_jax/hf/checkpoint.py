"""transformers `Phi3ForCausalLM` checkpoints (config.json + safetensors) <-> phi_jax config and parameters.

    config, params = load_hf("/ckpt/phi-4-mini-instruct", dtype="bfloat16", shardings=shardings)
    save_hf("/out/phi-4-mini-sft", config, params)   # AutoModelForCausalLM.from_pretrained("/out/...") loads it

Both directions move one tensor at a time: `load_hf` reads each safetensors tensor into its slot of the stacked
[L, ...] parameter, places the finished parameter on its devices and drops the host copy before building the
next; `save_hf` gathers one layer's slice at a time and streams it into the shard file. Host memory therefore
peaks near one stacked parameter group (q/k/v or gate/up, which share a fused tensor) plus one tensor, never at
a second copy of the model.

Layout mapping (PyTorch stores Linear weights as [out, in]):
  model.embed_tokens.weight [V, D]                 = embed/embedding
  layers.{i}.self_attn.qkv_proj.weight [(N+2K)H, D] = rows of q, then k, then v ([D, heads, H] transposed)
  layers.{i}.self_attn.o_proj.weight [D, NH]        = attn/o [N, H, D] transposed
  layers.{i}.mlp.gate_up_proj.weight [2F, D]        = rows of gate, then up ([D, F] transposed)
  layers.{i}.mlp.down_proj.weight [D, F]            = mlp/down [F, D] transposed
  layers.{i}.input_layernorm / post_attention_layernorm = input_norm / post_attn_norm scales
  model.norm.weight = final_norm/scale;  lm_head.weight [V, D] = lm_head/kernel [D, V] transposed (absent if tied)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import operator
import os
import pathlib
import struct
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from phi_jax.hf.config import from_hf_config, to_hf_config, transformers_dtype_name
from phi_jax.model.config import PhiConfig

log = logging.getLogger("phi_jax")

Params = dict[str, Any]
ParamPath = tuple[str, ...]  # keys from the root of the parameter tree to one leaf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_DEFAULT_PARAM_DTYPE = "float32"
_LFS_POINTER = b"version https://git-lfs"


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
  """One HF tensor and the phi_jax parameters it holds: several for the fused qkv and gate_up projections.

  For a per-layer tensor, `name` has an `{i}` for the layer index and `split`/`join` see one layer's slices.
  """

  name: str
  shape: tuple[int, ...]
  paths: tuple[ParamPath, ...]
  split: Callable[[np.ndarray], list[np.ndarray]]  # HF tensor -> one array per path
  join: Callable[[list[np.ndarray]], np.ndarray]  # one array per path -> HF tensor
  per_layer: bool = False


def _same(paths: tuple[ParamPath, ...], name: str, shape, per_layer=False) -> _TensorSpec:
  return _TensorSpec(name, tuple(shape), paths, lambda t: [t], lambda parts: parts[0], per_layer)


def _transposed(paths: tuple[ParamPath, ...], name: str, shape, per_layer=False) -> _TensorSpec:
  return _TensorSpec(name, tuple(shape), paths, lambda t: [t.T], lambda parts: parts[0].T, per_layer)


def _tensor_specs(config: PhiConfig) -> list[_TensorSpec]:
  """Every HF tensor of the checkpoint, in transformers' state-dict order (embeddings, layer 0, ..., norm, head)."""
  d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
  f, v = config.intermediate_size, config.vocab_size
  heads = (n, k, k)

  def split_qkv(t):  # [(N+2K)H, D] -> [D, N, H], [D, K, H], [D, K, H]
    bounds = np.cumsum([x * h for x in heads])[:-1]
    return [part.reshape(x, h, d).transpose(2, 0, 1) for part, x in zip(np.split(t, bounds), heads)]

  def join_qkv(parts):
    return np.concatenate([part.transpose(1, 2, 0).reshape(-1, d) for part in parts])

  layer = "model.layers.{i}."
  specs = [
      _same((("embed", "embedding"),), "model.embed_tokens.weight", (v, d)),
      _TensorSpec(layer + "self_attn.qkv_proj.weight", ((n + 2 * k) * h, d),
                  (("layers", "attn", "q"), ("layers", "attn", "k"), ("layers", "attn", "v")),
                  split_qkv, join_qkv, per_layer=True),
      _TensorSpec(layer + "self_attn.o_proj.weight", (d, n * h), (("layers", "attn", "o"),),
                  lambda t: [t.T.reshape(n, h, d)], lambda parts: parts[0].reshape(n * h, d).T, per_layer=True),
      _TensorSpec(layer + "mlp.gate_up_proj.weight", (2 * f, d), (("layers", "mlp", "gate"), ("layers", "mlp", "up")),
                  lambda t: [t[:f].T, t[f:].T], lambda parts: np.concatenate([p.T for p in parts]), per_layer=True),
      _transposed((("layers", "mlp", "down"),), layer + "mlp.down_proj.weight", (d, f), per_layer=True),
      _same((("layers", "input_norm", "scale"),), layer + "input_layernorm.weight", (d,), per_layer=True),
      _same((("layers", "post_attn_norm", "scale"),), layer + "post_attention_layernorm.weight", (d,), per_layer=True),
      _same((("final_norm", "scale"),), "model.norm.weight", (d,)),
  ]
  if not config.tie_word_embeddings:
    specs.append(_transposed((("lm_head", "kernel"),), "lm_head.weight", (v, d)))
  return specs


def _tensor_names(spec: _TensorSpec, config: PhiConfig) -> list[str]:
  return [spec.name.format(i=i) for i in range(config.num_layers)] if spec.per_layer else [spec.name]


def _get(tree: Any, path: ParamPath) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: ParamPath, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _adapter_error(directory: pathlib.Path) -> Optional[FileNotFoundError]:
  """The error for a PEFT adapter directory (what PEFT's save_pretrained writes), or None for any other."""
  if not (directory / "adapter_config.json").is_file():
    return None
  return FileNotFoundError(
      f"{directory} holds a PEFT adapter (adapter_config.json), which load_hf does not read: merge it into its base "
      "model first (peft.PeftModel.from_pretrained(base, d).merge_and_unload().save_pretrained(out)) and load out")


def not_a_checkpoint_hint(path: str | os.PathLike) -> Optional[str]:
  """What a path without config.json holds instead, where that can be told (a PEFT adapter, maybe a hub id)."""
  directory = pathlib.Path(path)
  if (adapter := _adapter_error(directory)) is not None:
    return str(adapter)
  # "org/name" as given (pathlib drops a leading "./"), and no such local path: maybe a Hugging Face hub id.
  if not directory.exists() and len(directory.parts) == 2 and not os.fspath(path).startswith((".", "~", os.sep)):
    return (f"{path} does not exist; if it is a hub id, note that hub ids are not downloaded: download it first "
            f"(huggingface-cli download {path} --local-dir DIR, or huggingface_hub.snapshot_download('{path}')) and "
            "pass the local directory")
  return None


def _missing_config_error(path: str | os.PathLike) -> FileNotFoundError:
  return FileNotFoundError(not_a_checkpoint_hint(path) or f"{path} has no config.json: point at a transformers "
                           "checkpoint directory (the one save_pretrained wrote)")


def _open_weights(file: pathlib.Path) -> Any:
  """safe_open, failing with the file's name and what to do about it where the file is not whole safetensors."""
  try:
    return safe_open(file, framework="numpy")
  except SafetensorError as error:
    with open(file, "rb") as head:
      lfs_pointer = head.read(len(_LFS_POINTER)) == _LFS_POINTER
    if lfs_pointer:  # what a `git clone` of a hub repository leaves without git-lfs installed
      raise ValueError(f"{file} is a Git LFS pointer, not the weights: run `git lfs install && git lfs pull` in the "
                       "clone, or download the checkpoint with `huggingface-cli download REPO --local-dir DIR`"
                       ) from None
    raise ValueError(f"{file} cannot be read as safetensors ({error}): it is incomplete or damaged (an interrupted "
                     "download or copy); download it again") from error


def _get_tensor(reader: Any, name: str, file: pathlib.Path, directory: pathlib.Path) -> np.ndarray:
  try:
    return reader.get_tensor(name)
  except SafetensorError as error:
    if name not in reader.keys():  # only an index can send a name to a file (a single file's names are its own)
      raise ValueError(f"{directory / INDEX_FILE} maps {name} to {file.name}, which does not hold it: the index and "
                       "the shards do not match (files of different saves?); download or copy the whole checkpoint "
                       "again") from None
    raise ValueError(f"{file}: tensor {name} cannot be read ({error}); download the file again") from error


def weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """tensor name -> the safetensors file that holds it (a single file, or shards with an index), as `load_hf` reads
  them; raises `load_hf`'s FileNotFoundError where there are none (PyTorch .bin weights, an adapter, missing
  shards)."""
  # The single file first, as transformers reads it: its save_pretrained of one file over an earlier sharded save
  # deletes the shards but leaves their index.
  single = directory / SINGLE_FILE
  if single.exists():
    with _open_weights(single) as reader:
      return {name: single for name in reader.keys()}
  index = directory / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    missing = sorted({file for file in weight_map.values() if not (directory / file).is_file()})
    if missing:
      raise FileNotFoundError(f"{index} names shard(s) that are not there: {', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}; copy the whole checkpoint directory (every "
                              f"model-*-of-*.safetensors file), or save it again")
    return {name: directory / file for name, file in weight_map.items()}
  if (adapter := _adapter_error(directory)) is not None:
    raise adapter
  torch_files = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
  hint = (f"; it holds {', '.join(torch_files[:3])}: PyTorch .bin weights are not read, convert them once with "
          "transformers (AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True))"
          if torch_files else "")
  raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _is_auto(dtype: Any) -> bool:
  return isinstance(dtype, str) and dtype == "auto"


def _dtype_argument(dtype: Any) -> Optional[np.dtype]:
  """The dtype a `dtype=` argument names; None for None, "auto" and anything that names no dtype ("bf16").

  A torch dtype (torch.bfloat16), as transformers users spell dtypes, is read by its name: torch is not imported."""
  if dtype is None or _is_auto(dtype):
    return None
  if str(dtype).startswith("torch."):
    dtype = str(dtype).removeprefix("torch.")
  try:
    return jnp.dtype(dtype)
  except TypeError:
    return None


def _load_dtype_or_error(dtype: Any) -> Optional[np.dtype]:
  """load_hf's dtype argument checked before anything is read; None for the default and for "auto"."""
  parsed = _dtype_argument(dtype)
  if dtype is not None and not _is_auto(dtype) and (parsed is None or not jnp.issubdtype(parsed, jnp.floating)):
    raise ValueError(f"load_hf(dtype={dtype!r}) is not a floating-point dtype; use 'auto' (the checkpoint's own), "
                     "'float32', 'bfloat16' or 'float16' (or the numpy, jax or torch dtype of these)")
  return parsed


def _stored_dtype(directory: pathlib.Path) -> str:
  """The embedding's dtype in the safetensors files (transformers' "auto" where config.json names none)."""
  name = "model.embed_tokens.weight"
  file = weight_files(directory).get(name)
  if file is None:
    return _DEFAULT_PARAM_DTYPE  # the tensor check that follows says what is missing
  with _open_weights(file) as reader:
    stored = reader.get_slice(name).get_dtype()
  return {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}.get(stored, _DEFAULT_PARAM_DTYPE)


def _check_tensor_names(available: set[str], specs: list[_TensorSpec], config: PhiConfig, where: str) -> None:
  expected = {name for spec in specs for name in _tensor_names(spec, config)}
  # Tied checkpoints usually leave lm_head.weight out; when present it is a copy of the embedding and unused.
  tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
  missing = sorted(expected - available)
  unexpected = sorted(available - expected - tolerated)
  if missing:
    # A bare Phi3Model (no LM head, names without "model.") or another head class saves other names.
    bare = [name for name in missing if name.startswith("model.") and name[len("model."):] in available]
    hint = (f"; {len(bare)} of them are there without the 'model.' prefix: this looks like a bare Phi3Model "
            "checkpoint, save the Phi3ForCausalLM instead" if bare else "")
    # Another head class (a sequence classifier's score.weight) shows in what is there instead.
    instead = f"; it has {len(unexpected)} other(s) instead: {', '.join(unexpected[:8])}" if unexpected else ""
    raise ValueError(f"{where} lacks {len(missing)} tensor(s) the config needs: {', '.join(missing[:8])}{hint}"
                     f"{instead}")
  if unexpected:
    raise ValueError(f"{where} has {len(unexpected)} tensor(s) a Phi3ForCausalLM with this config does not have: "
                     f"{', '.join(unexpected[:8])}")


def load_hf(path: str | os.PathLike, *, dtype: Optional[str] = None, shardings: Optional[Any] = None,
            config_overrides: Optional[dict[str, Any]] = None) -> tuple[PhiConfig, Params]:
  """Reads a transformers Phi3ForCausalLM checkpoint directory into (config, params).

  Args:
    path: a directory with config.json and model.safetensors, or model-*-of-*.safetensors shards with
      model.safetensors.index.json (model.safetensors is read when both are there, as transformers does).
    dtype: dtype the parameters are stored in (e.g. "bfloat16", jnp.bfloat16 or torch.bfloat16); default float32
      whatever the checkpoint holds, the master-weight dtype for training and exact parity checks. "auto" is the
      checkpoint's own, as transformers' torch_dtype="auto" reads it: config.json's `dtype` / `torch_dtype`, else
      the stored tensors' dtype. The returned config's `param_dtype` is it.
    shardings: optional pytree of `jax.sharding.Sharding` with the structure of the params; each parameter is
      placed with it as soon as it is built. Default: the default device.
    config_overrides: PhiConfig fields to set on the converted config (e.g. {"dtype": "float32",
      "attention_backend": ...}). The compute `dtype` otherwise follows the checkpoint's `dtype` /
      `torch_dtype`, the dtype transformers computes in.

  Raises:
    ValueError: an unsupported config or dtype; a tensor that is missing, unexpected or of the wrong shape; a weight
      file that cannot be read (a Git LFS pointer, a truncated download), named.
  """
  directory = pathlib.Path(path)
  overrides = dict(config_overrides or {})
  if "param_dtype" in overrides:
    raise ValueError("set the parameter dtype with load_hf(dtype=...), not config_overrides['param_dtype']")
  param_dtype = _load_dtype_or_error(dtype)
  if not (directory / "config.json").is_file():
    raise _missing_config_error(path)
  hf_config = json.loads((directory / "config.json").read_text())
  if _is_auto(dtype):
    param_dtype = jnp.dtype(transformers_dtype_name(hf_config) or _stored_dtype(directory))
  elif param_dtype is None:
    param_dtype = jnp.dtype(_DEFAULT_PARAM_DTYPE)
  config = from_hf_config(hf_config, **overrides, param_dtype=param_dtype.name)

  files = weight_files(directory)
  specs = _tensor_specs(config)
  _check_tensor_names(set(files), specs, config, str(directory))

  params: Params = {}
  with contextlib.ExitStack() as stack:
    readers = {file: stack.enter_context(_open_weights(file)) for file in sorted(set(files.values()))}

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
      tensor = _get_tensor(readers[files[name]], name, files[name], directory)
      if tensor.shape != shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)}; the config expects {list(shape)}")
      return tensor

    for spec in specs:
      if spec.per_layer:
        stacked = None
        for i in range(config.num_layers):
          parts = spec.split(read(spec.name.format(i=i), spec.shape))
          if stacked is None:
            stacked = [np.empty((config.num_layers, *part.shape), param_dtype) for part in parts]
          for out, part in zip(stacked, parts):
            out[i] = part
      else:
        stacked = [np.asarray(part, param_dtype) for part in spec.split(read(spec.name, spec.shape))]
      for param_path, host in zip(spec.paths, stacked):
        sharding = _get(shardings, param_path) if shardings is not None else None
        _set(params, param_path, jax.device_put(host, sharding))
      del stacked  # the host copies go before the next parameter is built
    if config.tie_word_embeddings and "lm_head.weight" in files:
      # A tied checkpoint may carry lm_head.weight as a copy of the embedding. One that differs (a head trained
      # untied, saved under a config that still says tied) is ambiguous: transformers 5 then unties and uses it,
      # transformers 4 ignores it, and the two compute different logits.
      embedding = read("model.embed_tokens.weight", (config.vocab_size, config.hidden_size))
      head = read("lm_head.weight", embedding.shape)
      if not np.array_equal(head, embedding):
        raise ValueError(
            f"{directory}: config.json says tie_word_embeddings=true, but lm_head.weight differs from "
            "model.embed_tokens.weight (max |difference| "
            f"{float(np.max(np.abs(head.astype(np.float32) - embedding.astype(np.float32)))):.3g}). If the head "
            "was trained untied, load it with config_overrides={'tie_word_embeddings': False}; if the embedding is "
            "the head, remove lm_head.weight from the checkpoint")
  return config, params


def _leaf_paths(tree: Any, prefix: ParamPath = ()) -> Iterator[ParamPath]:
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _leaf_paths(value, prefix + (key,))
  else:
    yield prefix


@jax.jit
def _take_layer(stacked: jax.Array, layer: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def _layer_slice(stacked: Any, layer: int) -> Any:
  """One layer of a stacked parameter, sliced where it lives: only that slice travels to the host."""
  if isinstance(stacked, jax.Array):
    return _take_layer(stacked, layer)  # the index is traced, so one compile serves every layer
  return np.asarray(stacked)[layer]


def _layer_major(specs: list[_TensorSpec], num_layers: int) -> list[tuple[_TensorSpec, Optional[int]]]:
  """(spec, layer) in transformers' state-dict order: layer 0's tensors, then layer 1's, ... (None: not per layer)."""
  layer_specs = [spec for spec in specs if spec.per_layer]
  ordered = []
  for spec in specs:
    if not spec.per_layer:
      ordered.append((spec, None))
    elif spec is layer_specs[0]:
      ordered.extend((layer_spec, i) for i in range(num_layers) for layer_spec in layer_specs)
  return ordered


def _shard_file_names(num_shards: int) -> list[str]:
  if num_shards == 1:
    return [SINGLE_FILE]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _write_safetensors(file: pathlib.Path, entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                       dtype: np.dtype) -> None:
  """Streams tensors into one safetensors file: the header first (from shapes alone), then each tensor as made."""
  # What transformers writes; transformers 4.x refuses files whose format is not a known framework.
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, _ in entries:
    end = offset + math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, end]}
    offset = end
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # keeps tensor data 8-byte aligned, as the reference writer does
  with open(file, "wb") as out:
    out.write(struct.pack("<Q", len(header_bytes)))
    out.write(header_bytes)
    for name, shape, make in entries:
      tensor = np.ascontiguousarray(make(), dtype=dtype)
      if tensor.shape != shape:
        raise ValueError(f"{name} came out with shape {list(tensor.shape)}; the config implies {list(shape)}")
      out.write(tensor.reshape(-1).view(np.uint8).data)


def _token_ids(stop_token_ids: Sequence[Any]) -> list[int]:
  ids = []
  for token in stop_token_ids:
    try:  # ints of any kind (numpy, a 0-d torch tensor); a token string or a float is refused, not truncated
      if isinstance(token, (bool, np.bool_)):
        raise TypeError(token)
      ids.append(operator.index(token))
    except TypeError:
      raise ValueError(f"stop_token_ids must be token ids (ints), got {token!r}: convert token strings first, e.g. "
                       "with phi_jax.data.chat.stop_token_ids(tokenizer) or tokenizer.convert_tokens_to_ids") from None
  return ids


def _config_files(config: PhiConfig, stop_token_ids: Sequence[Any]) -> dict[str, str]:
  """config.json and generation_config.json as text: made before any file is written, so a config that cannot be
  converted or serialised fails the save while the earlier export is still whole."""
  # torch_dtype is the compute dtype (to_hf_config's), not the tensors' dtype: transformers and vLLM (dtype=auto) load
  # and compute in it, so bfloat16 compute over float32 master weights is served in bfloat16, and load_hf reads it back.
  hf_config = to_hf_config(config)
  stop_ids = _token_ids(stop_token_ids)
  if hf_config["eos_token_id"] is None and stop_ids:
    hf_config["eos_token_id"] = stop_ids[0]
  generation = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config[key] is not None}
  if stop_ids:  # the turn's stop tokens first, then the config's own eos
    generation["eos_token_id"] = list(dict.fromkeys(stop_ids + [hf_config["eos_token_id"]]))
  return {"config.json": json.dumps(hf_config, indent=2) + "\n",
          "generation_config.json": json.dumps(generation, indent=2) + "\n"}


def save_hf(path: str | os.PathLike, config: PhiConfig, params: Params, *, dtype: Optional[str] = None,
            max_shard_bytes: int = 5 * 2**30, stop_token_ids: Sequence[int] = ()) -> None:
  """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads as Phi3ForCausalLM.

  Args:
    path: output directory (created if needed); earlier model*.safetensors files, index, config.json and
      generation_config.json in it are replaced once every new file has been written (a failed save, a config that
      cannot be written included, leaves them as they were; meanwhile the disk holds both).
    config: the model's config; written as config.json (classic layout) and generation_config.json.
    params: the parameter pytree (any devices or shardings; one layer's slice is gathered at a time).
    dtype: dtype of the written tensors ("bfloat16", jnp.bfloat16 or torch.bfloat16; float32, bfloat16 or
      float16); default (or "auto"): the params' own dtype. config.json's `torch_dtype` is the compute
      dtype, `config.dtype`, whatever the tensors hold: transformers and vLLM (dtype="auto") load the model in it, and
      `load_hf` reads it back as `dtype`. To serve in bfloat16, save a config with dtype="bfloat16".
    max_shard_bytes: shard size limit; one file `model.safetensors` when everything fits, else
      `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`.
    stop_token_ids: the token ids (ints) that end a reply (e.g. `phi_jax.data.chat.stop_token_ids(tokenizer)`):
      written as generation_config.json's `eos_token_id` list, so transformers' `generate` stops at the end of a
      turn (and as config.json's `eos_token_id` when the config has none).
  """
  directory = pathlib.Path(path)
  specs = _tensor_specs(config)
  expected_paths = {param_path for spec in specs for param_path in spec.paths}
  given_paths = set(_leaf_paths(params))
  if given_paths != expected_paths:
    raise ValueError(f"params do not match the config: missing {sorted(expected_paths - given_paths)}, "
                     f"unexpected {sorted(given_paths - expected_paths)}")
  # Whole shapes, the layer axis included: a layer is sliced out before a tensor is checked, and slicing clamps (params
  # of 3 layers under a 2-layer config dropped one without a word; of 1 layer, wrote it twice).
  from phi_jax.model.api import init_params  # pylint: disable=import-outside-toplevel  (model imports stay lazy)
  wanted = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  wrong = [f"{'.'.join(p)}: {tuple(np.shape(_get(params, p)))}, the config implies {_get(wanted, p).shape}"
           for p in sorted(expected_paths) if tuple(np.shape(_get(params, p))) != _get(wanted, p).shape]
  if wrong:
    raise ValueError(f"params do not match the config's shapes ({len(wrong)} array(s)): " + "; ".join(wrong[:4]))
  if (config.rope_scaling_type == "longrope" and config.head_dim is not None
      and config.head_dim != config.hidden_size // config.num_heads):
    # transformers' Phi3Config sizes the LongRoPE factors from hidden_size // num_attention_heads, not head_dim.
    log.warning("save_hf: LongRoPE with head_dim=%d (not hidden_size // num_heads = %d): the checkpoint is right, "
                "but transformers' Phi3Config refuses its factors when loading it; phi_jax.load_hf reads it",
                config.head_dim, config.hidden_size // config.num_heads)
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params)):
    raise ValueError("save_hf writes from one process and needs every parameter addressable by it; on several hosts "
                     "gather the parameters first (e.g. jax.experimental.multihost_utils.process_allgather)")
  out_dtype = _dtype_argument(dtype)
  if dtype is not None and not _is_auto(dtype) and (out_dtype is None or out_dtype.name not in _SAFETENSORS_DTYPES):
    raise ValueError(f"save_hf(dtype={dtype!r}) cannot be written; supported: {sorted(_SAFETENSORS_DTYPES)} (or the "
                     "numpy, jax or torch dtype of these), or None / 'auto' for the params' own dtype")
  out_dtype = np.dtype(_get(params, ("embed", "embedding")).dtype if out_dtype is None else out_dtype)
  if out_dtype.name not in _SAFETENSORS_DTYPES:
    raise ValueError(f"the params are {out_dtype.name}, which safetensors checkpoints here do not hold; pass "
                     f"save_hf(dtype=...) one of {sorted(_SAFETENSORS_DTYPES)}")
  config_files = _config_files(config, stop_token_ids)

  def maker(spec: _TensorSpec, layer: Optional[int]) -> Callable[[], np.ndarray]:
    def make():
      arrays = [_get(params, p) if layer is None else _layer_slice(_get(params, p), layer) for p in spec.paths]
      return spec.join([np.asarray(a).astype(out_dtype, copy=False) for a in arrays])
    return make

  entries = [(spec.name if layer is None else spec.name.format(i=layer), spec.shape, maker(spec, layer))
             for spec, layer in _layer_major(specs, config.num_layers)]

  shards: list[list] = [[]]
  shard_bytes = 0
  for entry in entries:
    size = math.prod(entry[1]) * out_dtype.itemsize
    if shards[-1] and shard_bytes + size > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(entry)
    shard_bytes += size

  directory.mkdir(parents=True, exist_ok=True)
  file_names = _shard_file_names(len(shards))
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(math.prod(shape) for _, shape, _ in entries) * out_dtype.itemsize},
             "weight_map": {name: file_name for file_name, shard in zip(file_names, shards) for name, _, _ in shard}}
    config_files[INDEX_FILE] = json.dumps(index, indent=2, sort_keys=True) + "\n"
  # Every file is written under a temporary name first: a failure part-way (a tensor of the wrong shape, a full
  # disk) leaves an earlier export in the directory as it was.
  partial = {name: directory / f".{name}.partial-{os.getpid()}" for name in [*file_names, *config_files]}
  try:
    for file_name, shard in zip(file_names, shards):
      _write_safetensors(partial[file_name], shard, out_dtype)
    for file_name, text in config_files.items():
      partial[file_name].write_text(text)
  except BaseException:
    for file in partial.values():
      file.unlink(missing_ok=True)
    raise
  # Stale weights from an earlier save would shadow or contradict the new index.
  for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  for name, file in partial.items():  # the weights, then the index and configs that name them
    os.replace(file, directory / name)
