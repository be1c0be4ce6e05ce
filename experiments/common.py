"""gin bindings for the entry scripts: `mesh`, `model`, `data`, `optimizer`, `train`.

The library takes plain frozen dataclasses and functions; this module is the only place that knows gin.
A binding such as `train.num_steps = 100`, `mesh.shape = {"data": 2, "fsdp": -1}` or
`model.overrides = {"rope_theta": 250000.0, "max_position_embeddings": 16384}` (the 4K -> 16K context extension
of Phi-4's mid-training) is all a run needs to change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from phi_jax import sharding
from phi_jax.data import pipeline as pipeline_lib
from phi_jax.data import sources as sources_lib
from phi_jax.hf import load_hf, save_hf
from phi_jax.hf.tokenizer import build_tiny_tokenizer, load_tokenizer
from phi_jax.model import PhiConfig, init_params, presets
from phi_jax.sharding import distributed
from phi_jax.stages import next_token
from phi_jax.train import LoopConfig, OptimizerConfig, loop as loop_lib
from phi_jax.train.state import abstract_state, param_shardings
from phi_jax.train.optimizer import learning_rate_schedule, make_optimizer
from phi_jax.train.step import make_train_step

log = logging.getLogger("phi_jax")

optimizer = gin.external_configurable(OptimizerConfig, name="optimizer")


def parse_gin(files: Sequence[str], params: Sequence[str]):
  gin.parse_config_files_and_bindings(list(files), list(params), finalize_config=False, skip_unknown=False)


@gin.configurable
def mesh(shape: Optional[dict] = None):
  """`mesh.shape`: {axis: size} over data / fsdp / tensor; -1 takes the remaining devices (default: all on fsdp)."""
  return sharding.make_mesh(shape)


@gin.configurable
def model(preset: str = "tiny", hf_path: Optional[str] = None, overrides: Optional[dict] = None,
          param_dtype: str = "float32") -> tuple[PhiConfig, Optional[str]]:
  """The model config: a preset, or the config.json of `hf_path`, then `overrides` (e.g. rotary changes)."""
  if hf_path:
    with open(os.path.join(hf_path, "config.json")) as f:
      from phi_jax.hf import from_hf_config
      config = from_hf_config(json.load(f))
  else:
    config = presets[preset]
  config = config.replace(param_dtype=param_dtype, **(overrides or {}))
  return config, hf_path


@gin.configurable
def data(train_files: Sequence[str] = (), eval_files: Sequence[str] = (), weights: Optional[Sequence[float]] = None,
         tokenizer: str = "tiny:phi-4", seq_len: int = 256, batch_size: int = 8, packing: Optional[str] = "first_fit",
         too_long: str = "split", on_bad_record: str = "raise", num_epochs: Optional[int] = None,
         system_prompt: Optional[str] = None, eval_batches: int = 4):
  """Global batch settings and sources. `tokenizer`: a tokenizer directory, or "tiny:<chat format>" to build the
  small test tokenizer. `batch_size` is global; each process reads batch_size / process_count rows."""
  return dict(train_files=list(train_files), eval_files=list(eval_files), weights=weights, tokenizer=tokenizer,
              seq_len=seq_len, batch_size=batch_size, packing=packing, too_long=too_long,
              on_bad_record=on_bad_record, num_epochs=num_epochs, system_prompt=system_prompt,
              eval_batches=eval_batches)


@gin.configurable("train")
def train_settings(num_steps: int = gin.REQUIRED, seed: int = 0, stage: str = "next_token", microbatches: int = 1,
          log_every: int = 1, checkpoint_every: int = 100, keep_checkpoints: Optional[int] = 3,
          async_checkpoints: bool = True, eval_every: int = 0, init_from: Optional[str] = None,
          export_hf: bool = False, peak_flops_per_device: Optional[float] = None, on_nonfinite: str = "stop",
          chunk_size: int = 1024, z_loss: float = 0.0):
  """Loop settings. `init_from`: an HF checkpoint directory or a previous run's workdir (its params/)."""
  return dict(loop=LoopConfig(num_steps=num_steps, seed=seed, microbatches=microbatches, log_every=log_every,
                              checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                              async_checkpoints=async_checkpoints, eval_every=eval_every, on_nonfinite=on_nonfinite,
                              peak_flops_per_device=peak_flops_per_device, export_hf=export_hf),
              stage=stage, init_from=init_from, chunk_size=chunk_size, z_loss=z_loss)


def get_tokenizer(spec: str, workdir: str):
  if spec.startswith("tiny:"):
    out = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
      return load_tokenizer(out)
    return build_tiny_tokenizer(out, chat_format=spec.split(":", 1)[1])
  return load_tokenizer(spec)


def _pipeline(files, data_cfg, tokenizer, *, seed, per_process_batch, shuffle=True, num_epochs=None):
  components = [(sources_lib.JsonlSource(f) if not str(f).endswith(".parquet") else sources_lib.ParquetSource(f),
                 (data_cfg["weights"] or [1.0] * len(files))[i]) for i, f in enumerate(files)]
  return pipeline_lib.build_pipeline(
      components, tokenize_fn=pipeline_lib.make_tokenize_fn(tokenizer, system_prompt=data_cfg["system_prompt"]),
      seq_len=data_cfg["seq_len"], batch_size=per_process_batch, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      packing=data_cfg["packing"], too_long=data_cfg["too_long"], on_bad_record=data_cfg["on_bad_record"])


def _init_params_fn(model_config: PhiConfig, hf_path: Optional[str], init_from: Optional[str], the_mesh):
  """Starting params placed in their shards: a previous run's params/, an HF directory, or None (random)."""
  source = init_from or hf_path
  if not source:
    return None
  shardings = param_shardings(model_config, the_mesh)

  def load():
    if os.path.isdir(os.path.join(source, "params")):
      import orbax.checkpoint as ocp
      target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(lambda: init_params(model_config, jax.random.key(0))), shardings)
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(os.path.join(source, "params")), target)
    _, params = load_hf(source, dtype=model_config.param_dtype, shardings=shardings)
    return params

  return load


def _check_vocab(model_config: PhiConfig, tokenizer):
  if len(tokenizer) > model_config.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model_config.vocab_size}; set model.overrides={{'vocab_size': {len(tokenizer)}}} or larger")


def run_training(workdir: str):
  """Runs the configured stage in `workdir` (resuming from its newest checkpoint)."""
  distributed.initialize()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  the_mesh = mesh()
  model_config, hf_path = model()
  data_cfg = data()
  settings = train_settings()
  loop = settings["loop"]
  tokenizer = get_tokenizer(data_cfg["tokenizer"], workdir)
  _check_vocab(model_config, tokenizer)
  if not data_cfg["train_files"]:
    raise ValueError("no training data: set data.train_files = ['path/to/*.jsonl', ...]")
  global_batch = data_cfg["batch_size"]
  if global_batch % jax.process_count():
    raise ValueError(f"data.batch_size={global_batch} must be divisible by the {jax.process_count()} processes")
  data_ways = the_mesh.shape["data"] * the_mesh.shape["fsdp"]
  if global_batch % data_ways or (global_batch // loop.microbatches) % data_ways:
    raise ValueError(f"data.batch_size={global_batch} (per microbatch {global_batch // loop.microbatches}) must be "
                     f"divisible by the data x fsdp mesh size {data_ways}; change data.batch_size or mesh.shape")
  per_process = global_batch // jax.process_count()
  train_data = _pipeline(data_cfg["train_files"], data_cfg, tokenizer, seed=loop.seed,
                         per_process_batch=per_process, num_epochs=data_cfg["num_epochs"])
  eval_batches = None
  if data_cfg["eval_files"]:
    def eval_batches():
      it = _pipeline(data_cfg["eval_files"], dict(data_cfg, weights=None), tokenizer, seed=0,
                     per_process_batch=per_process, shuffle=False, num_epochs=1)
      for _, batch in zip(range(data_cfg["eval_batches"]), it):
        yield batch
  loss_fn = next_token.make_loss_fn(model_config, chunk_size=settings["chunk_size"], z_loss=settings["z_loss"])
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write(gin.config_str())

  def show(record):
    keys = ("loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu", "eval_loss")
    log.info("step %d  %s", record["step"], "  ".join(f"{k}={record[k]:.4g}" for k in keys if k in record))

  state = loop_lib.run(
      workdir=workdir, model_config=model_config, optimizer_config=optimizer(), loss_fn=loss_fn,
      train_data=train_data, loop=loop, mesh=the_mesh,
      init_params=_init_params_fn(model_config, hf_path, settings["init_from"], the_mesh),
      eval_batches=eval_batches, run_meta={"stage": settings["stage"]}, on_log=show)
  save_final_params(workdir, state.params)
  if loop.export_hf:
    save_hf(os.path.join(workdir, "hf"), model_config, state.params)
    tokenizer.save_pretrained(os.path.join(workdir, "hf"))
  return state


def save_final_params(workdir: str, params):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "params")
  if os.path.exists(path):
    import shutil
    if jax.process_index() == 0:
      shutil.rmtree(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)


def dry_run() -> dict[str, Any]:
  """Compiles the stage's train step for the configured mesh from abstract shapes (no weights, no data)."""
  the_mesh = mesh()
  model_config, _ = model()
  if model_config.rope_scaling_type == "longrope" and model_config.rope_long_factor is None:
    # Memory and compile do not depend on the LongRoPE factor values, which live in the checkpoint.
    ones = (1.0,) * (model_config.rotary_dim // 2)
    model_config = model_config.replace(rope_short_factor=ones, rope_long_factor=ones)
  data_cfg = data()
  settings = train_settings()
  loop = settings["loop"]
  opt = make_optimizer(optimizer(), loop.num_steps)
  state = abstract_state(model_config, opt, the_mesh)
  shape = (data_cfg["batch_size"], data_cfg["seq_len"])
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32) for k in pipeline_lib.BATCH_FIELDS}
  loss_fn = next_token.make_loss_fn(model_config, chunk_size=settings["chunk_size"], z_loss=settings["z_loss"])
  step = make_train_step(loss_fn, opt, learning_rate_schedule(optimizer(), loop.num_steps), the_mesh,
                         jax.tree.map(lambda s: s.sharding, state), batch, microbatches=loop.microbatches)
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=s)
           for (k, _), s in zip(batch.items(), jax.tree.leaves(loop_lib.batch_shardings(batch, the_mesh)))}
  compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
  memory = compiled.memory_analysis()
  gib = 2.0 ** 30
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
  per_device = {f.replace("_in_bytes", "_gib"): getattr(memory, f) / gib for f in fields if memory is not None}
  if memory is not None:
    # Donated state: outputs alias the arguments, so the peak is arguments + temporaries.
    per_device["peak_estimate_gib"] = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / gib
  return {"model_params": model_config.num_params(), "mesh": dict(the_mesh.shape), "global_batch": list(shape),
          "per_device": per_device}

