"""gin bindings for the entry scripts: `mesh`, `model`, `data`, `optimizer`, `train`.

The library takes plain frozen dataclasses and functions; this module declares the configurables and runs a stage
(`run_training`, `dry_run`), and `gin_bindings` parses and reads the bindings: the two are the only places that know
gin. What a stage needs besides them lives beside it: `run_files` (a run's workdir and outputs), `tokenizer_setup`
(data.tokenizer and its checks against a starting point), `starting_params` (train.init_from / model.hf_path) and
`dpo_reference` (the DPO stage's pairs and frozen reference).

A binding such as `train.num_steps = 100`, `mesh.shape = {"data": 2, "fsdp": -1}` or
`model.overrides = {"rope_theta": 250000.0, "max_position_embeddings": 16384}` (the 4K -> 16K context extension
of Phi-4's mid-training) is all a run needs to change.

Each binding is checked against its parameter's annotation when the configurable is read (`typed`): a string is
refused for a number or a bool (`train.export_hf="False"` would be true), a fraction for a whole number, a dict for a
list; a whole-number float is taken as an int (`train.num_steps=1e4`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import os
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from phi_jax import sharding
from phi_jax.data import packing as packing_lib
from phi_jax.data import pipeline as pipeline_lib
from phi_jax.data import sources as sources_lib
from phi_jax.model import PhiConfig, presets
from phi_jax.sampling import sampler
from phi_jax.sharding import distributed
from phi_jax.stages import grpo as grpo_stage
from phi_jax.stages import next_token
from phi_jax.stages.grpo import GRPOConfig
from phi_jax.train import LoopConfig, OptimizerConfig, loop as loop_lib
from phi_jax.train.state import abstract_state
from phi_jax.train.optimizer import learning_rate_schedule, make_optimizer
from phi_jax.train.step import check_rows_per_process, make_train_step

import dpo_reference
from gin_bindings import as_plain, bound_or_none, configurable, is_number, run_config_text, typed
from run_files import (export_hf, file_sizes, finished_without_checkpoints, has_checkpoints, read_eval,
                       remove_final_outputs, save_final_params, write_text_atomically)
from tokenizer_setup import (check_tokenizer_matches_start, check_vocab, get_tokenizer, keep_run_tokenizer,
                             tidy_run_tokenizer)
from starting_params import model_config_of, params_loader, warn_of_random_start

log = logging.getLogger("phi_jax")


optimizer = gin.external_configurable(typed("optimizer")(OptimizerConfig), name="optimizer")


@configurable("mesh")
def mesh(shape: Optional[dict] = None):
  """`mesh.shape`: {axis: size} over data / fsdp / tensor; -1 takes the remaining devices (default: all on fsdp)."""
  return sharding.make_mesh(shape)


@configurable("model")
def model(preset: str = "tiny", hf_path: Optional[str] = None, overrides: Optional[dict] = None,
          param_dtype: str = "float32") -> tuple[PhiConfig, Optional[str]]:
  """The model config: a preset, or the config.json of `hf_path`, then `overrides` (e.g. rotary changes)."""
  config = model_config_of(preset, hf_path, overrides, param_dtype)
  if config.attention_backend == "cudnn" and config.dtype not in ("bfloat16", "float16"):
    # attention_gpu casts q/k/v to bfloat16 for cuDNN, which takes no float32: the rest of the model stays float32.
    log.warning("model dtype=%r with attention_backend 'cudnn' runs attention in bfloat16 (cuDNN's fused attention "
                "takes no %s inputs), the rest of the model in %s: give model.overrides 'attention_backend': 'xla' "
                "to keep attention in %s too, or 'dtype': 'bfloat16' to run the whole model in bfloat16",
                config.dtype, config.dtype, config.dtype, config.dtype)
  return config, hf_path


def _check_mixture_weights(weights) -> None:
  """The data reader's checks of data.weights, made here so a run, its --dry_run and a recipe refuse them before any
  stage trains (the reader made them only when the stage built its data)."""
  given = [w for w in (weights or ()) if w is not None]  # None: its file's record count, known only when read
  if not all(math.isfinite(w) and w > 0 for w in given):
    raise ValueError(f"data.weights={weights!r}: each weight must be positive and finite (its file's share of the "
                     "records); to read none of a file, leave it out of data.train_files")
  if len(given) > 1:
    try:
      pipeline_lib._ProportionalSelection([1] * len(given), given)  # pylint: disable=protected-access
    except ValueError as e:
      raise ValueError(f"data.weights={weights!r}: {e}") from None


@configurable("data")
def data(train_files: Sequence[str] = (), eval_files: Sequence[str] = (), weights: Optional[Sequence[float]] = None,
         tokenizer: str = "tiny:phi-4", seq_len: int = 256, batch_size: int = 8, packing: Optional[str] = "first_fit",
         too_long: str = "split", on_bad_record: str = "raise", num_epochs: Optional[int] = None,
         system_prompt: Optional[str] = None, eval_batches: int = 4, special_tokens_in_text: str = "split"):
  """Global batch settings and sources. `tokenizer`: a tokenizer directory, or "tiny:<chat format>" to build the
  small test tokenizer. `batch_size` is global; each process reads batch_size / process_count rows.

  Several `train_files` are mixed by `weights` (shares of records in every batch, equal by default); with
  `num_epochs` set, the mixture ends when its first file runs out, and the run logs how much of the others it
  did not read. A weight of None is its file's record count (this process's share of it): weights all None make
  it one pass over all the files on any number of processes. Weights proportional to the files' record counts do
  so on one process only: each process's shares of the files are not in that proportion (they may differ by a
  record), so a process may end its mixture a record short of a file. Several `eval_files` are read whole,
  interleaved in proportion to their sizes.
  `special_tokens_in_text`: "split" reads a special token's string inside a text record (`<|endoftext|>` in code)
  as literal text; "parse" as the control token (see `phi_jax.data.pipeline.make_tokenize_fn`)."""
  # One file (or glob) given as a string, as TRL takes a dataset: a list of one (list() would split its characters).
  train_files = [train_files] if isinstance(train_files, str) else train_files
  eval_files = [eval_files] if isinstance(eval_files, str) else eval_files
  if batch_size < 1 or seq_len < 2:
    raise ValueError(f"data.batch_size={batch_size} and data.seq_len={seq_len}: a batch needs at least one row and a "
                     "row at least two tokens (one input, one target)")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"data.num_epochs={num_epochs}: give a number of passes >= 1, or None to repeat forever")
  if eval_batches < 1:
    raise ValueError(f"data.eval_batches={eval_batches} must be >= 1 (eval runs when data.eval_files is set)")
  # The data reader's own checks, made here so a run, its --dry_run and a recipe refuse them before any stage trains.
  if packing is not None and packing not in packing_lib.PACKINGS:
    raise ValueError(f"data.packing={packing!r}; expected one of {packing_lib.PACKINGS}, or None for one example per "
                     "row (SFT)")
  for setting, value, allowed in (("on_bad_record", on_bad_record, pipeline_lib.ON_BAD_RECORD),
                                  ("special_tokens_in_text", special_tokens_in_text, ("split", "parse"))):
    if value not in allowed:
      raise ValueError(f"data.{setting}={value!r}; expected one of {allowed}")
  # A DPO run reads dpo.too_long, not this, and a finished DPO run's config.gin may hold DPO's value here (a DPO run
  # only warned of it): replaying that config (eval.py, export_hf.py) must not fail on it.
  if too_long not in packing_lib.TOO_LONG + ("truncate_prompt",):
    raise ValueError(f"data.too_long={too_long!r}; expected one of {packing_lib.TOO_LONG} (a DPO run's over-long "
                     "pairs are dpo.too_long's: 'drop' or 'truncate_prompt')")
  if weights is not None and not all(w is None or is_number(w) for w in weights):
    raise ValueError(f"data.weights={weights!r}: each weight must be a number (its file's share of the records) or "
                     "None (its file's record count)")
  if weights is not None and len(weights) != len(train_files):
    raise ValueError(f"data.weights has {len(weights)} entries for {len(train_files)} data.train_files: give one "
                     "weight per train file (or pattern), in the same order, or leave weights unset for equal ones")
  _check_mixture_weights(weights)
  return dict(train_files=list(train_files), eval_files=list(eval_files), weights=weights, tokenizer=tokenizer,
              seq_len=seq_len, batch_size=batch_size, packing=packing, too_long=too_long,
              on_bad_record=on_bad_record, num_epochs=num_epochs, system_prompt=system_prompt,
              eval_batches=eval_batches, special_tokens_in_text=special_tokens_in_text)


@configurable("train")
def train_settings(num_steps: int = gin.REQUIRED, seed: int = 0, stage: str = "next_token", microbatches: int = 1,
                   log_every: int = 1, checkpoint_every: int = 100, keep_checkpoints: Optional[int] = 3,
                   async_checkpoints: bool = True, eval_every: int = 0, init_from: Optional[str] = None,
                   export_hf: bool = False, peak_flops_per_device: Optional[float] = None,
                   on_nonfinite: str = "stop", chunk_size: int = 1024, z_loss: float = 0.0,
                   preemption_grace_s: Optional[float] = None, loss_spike_factor: Optional[float] = None,
                   loss_spike_window: int = 20, early_stopping_patience: Optional[int] = None,
                   early_stopping_min_delta: float = 0.0, keep_best_checkpoint: bool = False):
  """Loop settings. `init_from`: an HF checkpoint directory or a previous run's workdir (its params/).

  `chunk_size`: positions per logits chunk in every stage's loss. `z_loss`: the z-loss coefficient of the
  next-token loss (mid-training, SFT); the DPO and GRPO losses have no such term.
  `early_stopping_patience`, `early_stopping_min_delta`, `keep_best_checkpoint`: stop once the eval loss stalls,
  and end with the best evaluation's params (see `phi_jax.train.LoopConfig`); they need data.eval_files.
  `loss_spike_factor`: flag a loss above this x its running median (0: off); by default 5 for the next-token and DPO
  stages and off for GRPO, whose loss is a signed surrogate near zero (a ratio to its median flags noise)."""
  if num_steps < 1:
    raise ValueError(f"train.num_steps={num_steps}: a run trains at least one step (with none, its params/ would be "
                     "its starting weights under a trained run's name)")
  if chunk_size < 1:
    raise ValueError(f"train.chunk_size={chunk_size}: the positions per logits chunk of the loss must be >= 1 "
                     "(default 1024; a sequence shorter than it is one chunk)")
  if stage == "grpo" and (early_stopping_patience is not None or keep_best_checkpoint):
    raise ValueError("a GRPO run has no eval loss for train.early_stopping_patience / train.keep_best_checkpoint "
                     "to compare: remove those bindings")
  if z_loss < 0:
    raise ValueError(f"train.z_loss={z_loss} must be >= 0: a negative coefficient rewards a large softmax normaliser "
                     "and drives the logits up; use 0 to turn the z-loss off (PaLM used 1e-4)")
  if z_loss and stage != "next_token":
    raise ValueError(f"train.z_loss={z_loss} applies to the next-token loss only; the {stage!r} stage's loss has "
                     "no z-loss term: remove the binding")
  if loss_spike_factor is None:
    loss_spike_factor = 0.0 if stage == "grpo" else 5.0
  return dict(loop=LoopConfig(num_steps=num_steps, seed=seed, microbatches=microbatches, log_every=log_every,
                              checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                              async_checkpoints=async_checkpoints, eval_every=eval_every, on_nonfinite=on_nonfinite,
                              peak_flops_per_device=peak_flops_per_device, export_hf=export_hf,
                              preemption_grace_s=preemption_grace_s, loss_spike_factor=loss_spike_factor,
                              loss_spike_window=loss_spike_window, early_stopping_patience=early_stopping_patience,
                              early_stopping_min_delta=early_stopping_min_delta,
                              keep_best_checkpoint=keep_best_checkpoint),
              stage=stage, init_from=init_from, chunk_size=chunk_size, z_loss=z_loss)


def _pipeline(files, data_cfg, tokenizer, *, seed, per_process_batch, shuffle=True, num_epochs=None, warn=True):
  components = [(sources_lib.open_source(f), (data_cfg["weights"] or [1.0] * len(files))[i])
                for i, f in enumerate(files)]
  return pipeline_lib.build_pipeline(
      components, tokenize_fn=pipeline_lib.make_tokenize_fn(
          tokenizer, system_prompt=data_cfg["system_prompt"],
          special_tokens_in_text=data_cfg.get("special_tokens_in_text", "split")),
      seq_len=data_cfg["seq_len"], batch_size=per_process_batch, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      packing=data_cfg["packing"], too_long=data_cfg["too_long"], on_bad_record=data_cfg["on_bad_record"], warn=warn)


def check_new_tokens(name: str, max_new_tokens: int, model_config: PhiConfig):
  """A generation budget that leaves no room for a prompt in the model's positions is a config mistake (e.g. the
  32K default of a reasoning eval on a small test model), not something to spend hours generating."""
  if max_new_tokens >= model_config.max_position_embeddings:
    raise ValueError(f"{name}={max_new_tokens} leaves no room for a prompt within the model's "
                     f"max_position_embeddings={model_config.max_position_embeddings}; set "
                     f"--gin_param='{name}=N' with N well below it")


def _next_token_setup(model_config: PhiConfig, data_cfg: dict, settings: dict, tokenizer, per_process: int):
  """(loss_fn, train_data, eval_batches) of mid-training (packed) and SFT (data.packing = None)."""
  seed = settings["loop"].seed
  train_data = _pipeline(data_cfg["train_files"], data_cfg, tokenizer, seed=seed, per_process_batch=per_process,
                         num_epochs=data_cfg["num_epochs"])
  eval_batches = None
  if data_cfg["eval_files"]:
    def eval_batches(data_only=False):
      del data_only  # the batches are data only
      # Weights None: each file's share is its record count, so the files interleave and are read whole (equal
      # weights ended the eval set when its smallest file ran out).
      weights = [None] * len(data_cfg["eval_files"])
      it = _pipeline(data_cfg["eval_files"], dict(data_cfg, weights=weights), tokenizer, seed=0,
                     per_process_batch=per_process, shuffle=False, num_epochs=1, warn=False)
      yield from read_eval(it, data_cfg["eval_batches"], eval_batches)
  loss_fn = next_token.make_loss_fn(model_config, chunk_size=settings["chunk_size"], z_loss=settings["z_loss"])
  return loss_fn, train_data, eval_batches


def check_param_dtype(model_config: PhiConfig) -> None:
  """The storage dtype of trained params, which AdamW's state shares (there is no float32 master copy): float16 is
  refused, bfloat16 warned of. A run and its dry run alike."""
  if model_config.param_dtype == "float16":
    # Squared gradients below float16's smallest normal (~6e-5) flush towards zero: the updates came out 4-9x
    # too large.
    raise ValueError("model.param_dtype='float16' is not supported for training: AdamW's second moment (the running "
                     "mean of squared gradients) is stored in float16 too and underflows, so the updates come out "
                     "several times too large. Keep model.param_dtype='float32' (matmuls can still run in a 16-bit "
                     "dtype: model.overrides={'dtype': 'bfloat16'}), or 'bfloat16' where memory rules float32 out "
                     "(small updates then round away)")
  if model_config.param_dtype == "bfloat16":
    log.warning("model.param_dtype='bfloat16': the weights and AdamW moments are stored and updated in bfloat16, "
                "with no float32 master copy, so an update below ~1/256 of a weight rounds away (at "
                "optimizer.learning_rate=%g most weights may not move). AdamW's moments stall the same way: a step "
                "moves each by (1 - optimizer.b1 or b2) of its distance to the new gradient (squared), which rounds "
                "away once below ~1/256 of the moment (at b2=0.999 under a steady gradient of 1 the second moment "
                "stops at 0.5 where it should reach 0.63 after 1000 steps), and every update is scaled by them. Keep "
                "param_dtype='float32' (matmuls still run in the model's dtype, model.overrides={'dtype': "
                "'bfloat16'}) unless memory rules it out", optimizer().learning_rate)


def run_training(workdir: str):
  """Runs the configured stage in `workdir` (resuming from its newest checkpoint)."""
  distributed.initialize()
  loop_lib.check_workdir(workdir)  # before abspath turns a URL into a local directory
  workdir = os.path.abspath(workdir)
  # Held from the first write (a tiny tokenizer, DPO's reference log-probs) to the last (params/, hf/).
  with loop_lib.workdir_lock(workdir):
    return _train_in(workdir)


def _stage_setup(stage: str, workdir: str, model_config: PhiConfig, hf_path: Optional[str], data_cfg: dict,
                 settings: dict, tokenizer, the_mesh, per_process: int):
  """(loss_fn, train_data, eval_batches) of `stage` (train.stage)."""
  warn_of_random_start(stage, settings, hf_path)
  if stage == "next_token":
    return _next_token_setup(model_config, data_cfg, settings, tokenizer, per_process)
  if stage == "dpo":
    return dpo_reference.setup(workdir, model_config, hf_path, data_cfg, settings, dpo_settings(), tokenizer, the_mesh,
                               per_process)
  if stage == "grpo":
    return _grpo_setup(model_config, hf_path, data_cfg, settings, tokenizer, the_mesh)
  raise ValueError(f"train.stage={stage!r}; supported: 'next_token' (mid-training, SFT), 'dpo', 'grpo'")


def _train_in(workdir: str):
  """`run_training`'s work, under the workdir's lock."""
  the_mesh = mesh()
  with distributed.failing_together("reading model.hf_path's config.json"):  # on each host, before a collective
    model_config, hf_path = model()
  data_cfg = data()
  settings = train_settings()
  loop, stage = settings["loop"], settings["stage"]
  if jax.process_index() == 0:
    # A copy a kill left set aside is put back first: the tiny tokenizer's build and the resume check read W/tokenizer.
    tidy_run_tokenizer(os.path.join(workdir, "tokenizer"))
  distributed.barrier(f"run tokenizer {workdir}")
  start = settings["init_from"] or hf_path
  start_name = "train.init_from" if settings["init_from"] else "model.hf_path"
  # Each process reads these files alone, on its own host: one missing there stops every process with its cause
  # named, where the others waited in the next collective until JAX's timeout. Nothing in the block is a collective
  # but get_tokenizer's, which agrees on its own errors first. The starting params' directory is checked here, as
  # loading them (train.init_params) runs collectives.
  with distributed.failing_together("reading data.tokenizer, the starting params' directory (train.init_from or "
                                    "model.hf_path) or data.eval_files"):
    tokenizer = get_tokenizer(data_cfg["tokenizer"], workdir)
    check_vocab(model_config, tokenizer, start_name, start)
    fresh = not has_checkpoints(workdir)
    # A run finished before (its checkpoints deleted) trains nothing and loads no params: its start may be gone.
    finished = fresh and finished_without_checkpoints(workdir, settings["loop"].num_steps)
    if start and fresh and not finished:  # loaded (params_loader's checks, then collectives) only by a fresh run
      dpo_reference.check_reference_readable(settings, hf_path)
    if start:
      check_tokenizer_matches_start(tokenizer, data_cfg["tokenizer"], start_name, start)
    if not fresh and os.path.isdir(os.path.join(workdir, "tokenizer")):
      # Files replaced at data.tokenizer's path would train the checkpoints on other ids, then become the copy.
      check_tokenizer_matches_start(tokenizer, data_cfg["tokenizer"], "--workdir", workdir)
    if not data_cfg["train_files"]:
      raise ValueError("no training data: set data.train_files = ['path/to/*.jsonl', ...]")
    if not finished:
      check_data_settings(stage, data_cfg, loop)
      file_sizes(data_cfg["eval_files"])  # a missing eval file is an error now, not at the first evaluation
  if finished:
    return None
  if loop.export_hf and jax.process_count() > 1:
    raise ValueError(f"train.export_hf writes from one process, and no one of these {jax.process_count()} holds "
                     "every parameter: leave it off and, once the run has finished, export in one process with "
                     f"python experiments/export_hf.py --init_from {workdir}")
  check_param_dtype(model_config)
  global_batch, _ = check_batch_shape(stage, model_config, data_cfg, loop, the_mesh)
  per_process = global_batch // jax.process_count()
  # The data is opened and the eval data read on each process alone (a train or eval file too small for the
  # processes, a bad eval record fail on one): every process raises together rather than wait in the loop's first
  # collective for one that already stopped.
  with distributed.failing_together("opening the training data or reading data.eval_files"):
    loss_fn, train_data, eval_batches = _stage_setup(stage, workdir, model_config, hf_path, data_cfg, settings,
                                                     tokenizer, the_mesh, per_process)
    # Read once now: a bad eval record, or eval files too small for the processes, fails here rather than at the
    # first evaluation (by default the last step, before its checkpoint is saved).
    local_count = None if eval_batches is None else sum(1 for _ in eval_batches(data_only=True))
  if eval_batches is not None:
    # Processes' shares may differ by a batch: the longest is scored, the others padded (`loop._evaluate`).
    count = max(distributed.allgather_json(local_count))
    log.info("eval_loss is measured on %d batch(es) of %d rows of data.eval_files, the same ones at every evaluation "
             "(%s)", count, global_batch, "all of the files" if count < data_cfg["eval_batches"] else
             f"the first data.eval_batches={data_cfg['eval_batches']}; raise it to cover more of the files")
    _warn_of_eval_skips(getattr(eval_batches, "stats", None), data_cfg)
  def write_config(replace: bool):  # eval.py and rollouts.py rebuild the model and tokenizer from it
    path = os.path.join(workdir, "config.gin")
    if jax.process_index() == 0 and (replace or not os.path.exists(path)):
      write_text_atomically(path, run_config_text())
    if replace or fresh:  # a rerun that trains nothing did not train with it (a run from before runs kept a copy)
      keep_run_tokenizer(workdir, data_cfg["tokenizer"], tokenizer, replace)  # the one that config names, as it is

  def on_start():  # once the workdir's checkpoints fit this config
    # A rerun that trains nothing (the run is complete) keeps the config its params were trained with: rewritten
    # here, other settings given to the rerun would be what eval, rollouts and export read.
    write_config(replace=False)

  def on_first_step():
    if jax.process_index() == 0:
      remove_final_outputs(workdir, loop.export_hf)
    write_config(replace=True)

  def show(record):
    keys = ("loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu", "eval_loss", "token_accuracy",
            "reward_mean", "accuracy")
    log.info("step %d  %s", record["step"], "  ".join(f"{k}={record[k]:.4g}" for k in keys if k in record))

  state = loop_lib.run(
      workdir=workdir, model_config=model_config, optimizer_config=optimizer(), loss_fn=loss_fn,
      train_data=train_data, loop=loop, mesh=the_mesh,
      init_params=params_loader(model_config, hf_path, settings["init_from"], the_mesh),
      eval_batches=eval_batches, on_log=show, on_start=on_start, on_first_step=on_first_step,
      run_meta=run_meta(stage, settings, data_cfg, tokenizer))
  save_final_params(workdir, state.params, model_config)
  if loop.export_hf:
    export_hf(os.path.join(workdir, "hf"), model_config, state.params, tokenizer, data_cfg["system_prompt"])
  return state


def run_meta(stage: str, settings: dict, data_cfg: dict, tokenizer) -> dict:
  """What a run records beside its checkpoints and compares on resume: a changed list of train files, or files they
  match that appeared, vanished or changed size, is refused (the saved data position belongs to the old sources), and
  so is another eval set when early stopping or keep_best compare eval losses, and a frozen reference (DPO, GRPO)
  whose values changed (a DPO train stream that reads other records than the checkpoints' is refused before, by
  `dpo_reference._refuse_another_pair_stream`); every other change (another tokenizer or system prompt, the loss or
  reward settings, the starting point `train.init_from`) is logged. The tokenizer itself is kept as W/tokenizer
  (`keep_run_tokenizer`)."""
  data_meta = {k: data_cfg[k] for k in _RESUME_DATA_FIELDS}
  data_meta["tokenizer_size"] = len(tokenizer)
  data_meta["train_file_sizes"] = file_sizes(data_cfg["train_files"])
  if "train_source" in settings:  # DPO: what its train stream reads of each pair file (`dpo_reference.setup`)
    data_meta["train_source"] = settings["train_source"]
  # What the eval loss is measured on: early stopping and keep_best compare it with the losses of earlier steps.
  eval_set = {k: data_cfg[k] for k in ("eval_files", "eval_batches", "seq_len", "batch_size", "tokenizer",
                                       "system_prompt")}
  eval_set["eval_file_sizes"] = file_sizes(data_cfg["eval_files"])
  return {"stage": stage, "data": data_meta, "eval_set": eval_set,
          "stage_settings": _stage_settings(stage, settings),
          "init_from": settings["init_from"],  # also the frozen reference of DPO and GRPO
          "reference_digest": settings.get("reference_digest")}  # that reference's values, where one is loaded


def _stage_settings(stage: str, settings: dict) -> dict:
  """The loss (and GRPO reward) settings of the stage, kept in the run metadata."""
  if stage == "grpo":
    return dict(dataclasses.asdict(grpo_config(settings)), reward=reward_settings())
  out = {"chunk_size": settings["chunk_size"], "z_loss": settings["z_loss"]}
  return dict(out, **dpo_settings()) if stage == "dpo" else out


_RESUME_DATA_FIELDS = ("train_files", "weights", "seq_len", "batch_size", "packing", "too_long", "num_epochs",
                       "tokenizer", "system_prompt", "special_tokens_in_text")


DPO_REFERENCE = ("in_step", "precompute", "precomputed")


@configurable("dpo")
def dpo_settings(beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 reference: str = "in_step", too_long: str = "drop"):
  """Rollout-DPO settings (`train.stage = "dpo"`; data files hold preference pairs, see phi_jax.data.preference).

  `reference`: "in_step" scores every batch with a frozen copy of the starting params (`train.init_from`, or the
  random init of `train.seed`); "precompute" scores all pairs once into W/reference/ and then trains with no
  reference model (a resumed run reuses the files; they are computed again when the pair file, the reference
  params, the tokenizer, a model setting (not the run-time remat_policy, attention_backend or
  max_segments_per_row) or a data setting they depend on changed, and a workdir with checkpoints refuses to rewrite
  the train file its data position points into, or, removed, to compute it again under other settings that choose
  its pairs; one whose train.init_from has moved away or lost its params/ uses them as they are, with a warning);
  "precomputed": the pair files already carry the log-probs
  (`phi_jax.stages.dpo.precompute_reference_logps`, tokenizer checked). A resume that switches `reference` between
  "precompute" and another mode is refused where the reference train file left pairs out (too long, bad): the saved
  data position indexes the records of the stream the run read (`dpo_reference._refuse_another_pair_stream`). Both
  reference passes run in `train.microbatches` pieces, like the step. `too_long`: "drop" or "truncate_prompt".
  `data.weights` and `data.packing` do not apply: pairs are read in one shuffled stream, one example per row.
  """
  from phi_jax.data import preference
  from phi_jax.losses.dpo import LOSS_TYPES

  if reference not in DPO_REFERENCE:
    raise ValueError(f"dpo.reference={reference!r}; expected one of {DPO_REFERENCE}")
  # The loss and the pair reader check these only when the stage starts (in a recipe, after earlier stages trained).
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"dpo.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
  if too_long not in preference.TOO_LONG:
    raise ValueError(f"dpo.too_long={too_long!r}; expected one of {preference.TOO_LONG}")
  if not beta > 0:
    raise ValueError(f"dpo.beta={beta} must be > 0 (the strength of the pull towards the reference; 0.1 is usual)")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5) (the assumed share of pairs whose "
                     "preference is wrong)")
  if loss_type == "ipo" and label_smoothing:
    raise ValueError(f"dpo.label_smoothing={label_smoothing} applies to the sigmoid loss only: set it to 0 with "
                     "dpo.loss_type='ipo'")
  return dict(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, reference=reference,
              too_long=too_long)


def _warn_of_eval_skips(stats: Optional[dict], data_cfg: dict) -> None:
  """Eval records left out of every evaluation (too long for seq_len, or bad under on_bad_record='skip'), named
  once: eval_loss and the checkpoint choices made on it measure the rest only."""
  if not stats or not stats["records_skipped"]:
    return
  share = f" of this process's {stats['records_read']}" if jax.process_count() > 1 else f" of {stats['records_read']}"
  # A DPO run reads its own length rule, not data.too_long.
  too_long = (("dpo.too_long", dpo_settings()["too_long"]) if bound_or_none("train.stage") == "dpo"
              else ("data.too_long", data_cfg["too_long"]))
  log.warning("%d%s eval record(s) read are not scored (%s): eval_loss measures the other %d. Raise data.seq_len%s",
              sum(stats["records_skipped"].values()), share,
              ", ".join(f"{reason}: {n}" for reason, n in stats["records_skipped"].items()), stats["records_used"],
              ", or fix the records (on_bad_record='raise' names the first)" if set(stats["records_skipped"]) - {
                  "too long"} else f" (now {data_cfg['seq_len']}) or change {too_long[0]} (now {too_long[1]!r})")


def abstract_stage_batch(stage: str, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global batch of `stage`, as its loss_fn reads it.

  next_token: the pipeline's rows. dpo: a chosen and a rejected row per pair plus the reference log-prob sums.
  grpo: prompt + completion rows (seq_len = grpo.max_prompt_tokens + grpo.max_new_tokens, batch_size = prompts x
  group size) with the rollout log-probs, the advantages, the rows' sampling temperature and, when grpo.beta > 0,
  the reference log-probs.
  """
  def rows(dtype=np.int32):
    return jax.ShapeDtypeStruct((batch_size, seq_len), dtype)

  if stage == "next_token":
    return {k: rows() for k in pipeline_lib.BATCH_FIELDS}
  if stage == "dpo":
    from phi_jax.data import preference
    batch = {k: rows() for k in preference.BATCH_FIELDS}
    return batch | {k: jax.ShapeDtypeStruct((batch_size,), np.float32) for k in preference.REFERENCE_FIELDS}
  if stage == "grpo":
    batch = {k: rows() for k in pipeline_lib.BATCH_FIELDS}
    batch.update(old_logprobs=rows(np.float32), advantages=jax.ShapeDtypeStruct((batch_size,), np.float32),
                 temperature=jax.ShapeDtypeStruct((batch_size,), np.float32))
    if grpo().beta:
      batch["ref_logprobs"] = rows(np.float32)
    return batch
  raise ValueError(f"train.stage={stage!r}; supported: 'next_token', 'dpo', 'grpo'")


def _stage_loss_fn(stage: str, model_config: PhiConfig, settings: dict):
  if stage == "dpo":
    from phi_jax.stages import dpo
    cfg = dpo_settings()
    return dpo.make_loss_fn(model_config, beta=cfg["beta"], label_smoothing=cfg["label_smoothing"],
                            loss_type=cfg["loss_type"], chunk_size=settings["chunk_size"])
  if stage == "grpo":
    return grpo_stage.make_loss_fn(model_config, grpo_config(settings))
  return next_token.make_loss_fn(model_config, chunk_size=settings["chunk_size"], z_loss=settings["z_loss"])


def stage_batch_shape(stage: str, data_cfg: dict) -> tuple[int, int, str, str]:
  """(rows, length) of one global batch of `stage` and the settings that give them: GRPO's rollout rows are
  prompts x group and its rows hold prompt + response slots; the other stages read data.batch_size x seq_len."""
  if stage == "grpo":
    cfg = grpo()
    return (cfg.prompts_per_step * cfg.group_size, cfg.max_prompt_tokens + cfg.max_new_tokens,
            "grpo.prompts_per_step x grpo.group_size", "grpo.max_prompt_tokens + grpo.max_new_tokens")
  return data_cfg["batch_size"], data_cfg["seq_len"], "data.batch_size", "data.seq_len"


def check_batch_shape(stage: str, model_config: PhiConfig, data_cfg: dict, loop, the_mesh) -> tuple[int, int]:
  """The checks a run and its --dry_run share: the rows split over processes, the mesh and the microbatches, and
  the row length fits the model's positions. Returns (rows, length) of the global batch."""
  rows, length, rows_name, length_name = stage_batch_shape(stage, data_cfg)
  if length > model_config.max_position_embeddings:
    raise ValueError(f"{length_name}={length} exceeds the model's max_position_embeddings="
                     f"{model_config.max_position_embeddings}, the longest sequence its rotary setup supports; lower "
                     f"{length_name}, or extend the context (e.g. model.overrides={{'max_position_embeddings': ..., "
                     "'rope_theta': ...})")
  if stage != "grpo" and rows % jax.process_count():
    raise ValueError(f"{rows_name}={rows} must be divisible by the {jax.process_count()} processes")
  if rows % loop.microbatches:
    raise ValueError(f"{rows_name}={rows} must be divisible by train.microbatches={loop.microbatches}; change "
                     "either")
  data_ways = the_mesh.shape["data"] * the_mesh.shape["fsdp"]
  if rows % data_ways or (rows // loop.microbatches) % data_ways:
    raise ValueError(f"{rows_name}={rows} (per microbatch {rows // loop.microbatches}) must be divisible by the "
                     f"data x fsdp mesh size {data_ways}; change {rows_name} or mesh.shape"
                     + (f", or lower train.microbatches={loop.microbatches}" if loop.microbatches > 1 else ""))
  rollout_rows = grpo().rollout_batch_size if stage == "grpo" else None
  if rollout_rows is not None and rollout_rows % data_ways:
    raise ValueError(f"grpo.rollout_batch_size={rollout_rows}: each generate call's rows split over the data x fsdp "
                     f"mesh size {data_ways}; give a multiple of it that divides {rows}")
  check_rows_per_process(the_mesh, rows)
  return rows, length


def dry_run() -> dict[str, Any]:
  """Compiles the configured stage's train step for the mesh from abstract shapes (no weights, no data) and
  returns the per-device memory XLA plans for it."""
  from phi_jax.train.step import batch_shardings

  the_mesh = mesh()
  model_config, _ = model()
  # Memory and compile do not depend on the LongRoPE factor values, which live in the checkpoint.
  model_config = presets.with_placeholder_rope_factors(model_config)
  data_cfg = data()
  settings = train_settings()
  loop, stage = settings["loop"], settings["stage"]
  check_data_settings(stage, data_cfg, loop)
  check_param_dtype(model_config)
  shape = check_batch_shape(stage, model_config, data_cfg, loop, the_mesh)
  opt = make_optimizer(optimizer(), loop.num_steps)
  state = abstract_state(model_config, opt, the_mesh)
  batch = abstract_stage_batch(stage, *shape)
  step = make_train_step(_stage_loss_fn(stage, model_config, settings), opt,
                         learning_rate_schedule(optimizer(), loop.num_steps), the_mesh,
                         jax.tree.map(lambda s: s.sharding, state), batch, microbatches=loop.microbatches)
  batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                       batch_shardings(batch, the_mesh))
  compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
  memory = compiled.memory_analysis()
  gib = 2.0 ** 30
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
  per_device = {f.replace("_in_bytes", "_gib"): getattr(memory, f) / gib for f in fields if memory is not None}
  # A frozen reference model (DPO reference="in_step", GRPO beta > 0) stays on the devices beside the state: one
  # more copy of the params in their shards, used outside the step.
  uses_reference = ((stage == "dpo" and dpo_settings()["reference"] == "in_step")
                    or (stage == "grpo" and grpo().beta > 0))
  reference_bytes = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                        for leaf in jax.tree.leaves(state.params)) if uses_reference else 0
  per_device["reference_params_gib"] = reference_bytes / gib
  rollout_bytes = 0
  if stage == "grpo":
    # GRPO samples its rollouts beside the state (and reference): one generate call's KV cache, its rows over
    # data x fsdp and its kv heads over tensor. Not in the step's figures; grpo.rollout_batch_size bounds it.
    cfg = grpo()
    rows_per_call = cfg.rollout_batch_size or cfg.prompts_per_step * cfg.group_size
    tensor = the_mesh.shape.get("tensor", 1)
    rollout_bytes = (sampler.kv_cache_bytes(model_config, rows_per_call, cfg.max_prompt_tokens, cfg.max_new_tokens)
                     / (the_mesh.shape["data"] * the_mesh.shape["fsdp"] * tensor))
    per_device["rollout_kv_cache_gib"] = rollout_bytes / gib
  if memory is not None:
    # Donated state: outputs alias the arguments, so the peak is arguments + temporaries (+ the reference and, for
    # GRPO, the larger of the step's temporaries and the rollouts' KV cache, which do not coexist).
    per_device["peak_estimate_gib"] = (memory.argument_size_in_bytes + max(memory.temp_size_in_bytes, rollout_bytes)
                                       + reference_bytes) / gib
  return {"stage": stage, "model_params": model_config.num_params(), "mesh": dict(the_mesh.shape),
          "global_batch": list(shape), "batch_fields": sorted(batch), "per_device": per_device}


# GRPOConfig.chunk_size is not a gin setting: every stage's loss chunks its logits by train.chunk_size.
grpo = gin.external_configurable(typed("grpo")(GRPOConfig), name="grpo", denylist=["chunk_size"])


def grpo_config(settings: dict) -> GRPOConfig:
  """The GRPO stage's settings: the `grpo` bindings with train.chunk_size."""
  return dataclasses.replace(grpo(), chunk_size=settings["chunk_size"])


@configurable("reward")
def reward_settings(weights: Optional[dict] = None, length_aware_max_tokens: Optional[int] = None,
                    settings: Optional[dict] = None):
  """The GRPO reward: a weighted sum of `phi_jax.rewards` registry rewards (default {"correctness": 1.0}).

  "length_aware" (the Phi-4-reasoning-plus reward) is scaled to `length_aware_max_tokens` (default: the
  stage's grpo.max_new_tokens), since its published constants are for 31,744-token responses.
  `settings` changes a weighted reward's constants by name, e.g. {"length_aware": {"l_neg_control": 5000,
  "w_rep": 0.0}, "repetition": {"n": 4}}: the fields of `LengthAwareRewardConfig` (its lengths at the scale of
  its l_max, 31,744 unless set, and scaled with it) or of the registered reward's dataclass.
  """
  from phi_jax.rewards import registry

  weights = weights or {"correctness": 1.0}
  unknown = [name for name in weights if name not in registry.REWARDS]
  if unknown:
    raise ValueError(f"reward.weights names {', '.join(map(repr, unknown))}, not a registered reward: use names of "
                     f"{sorted(registry.REWARDS)}, or add a reward of your own: a function with the signature in "
                     "phi_jax/rewards/registry.py, put into phi_jax.rewards.registry.REWARDS under its name by a "
                     "module of yours (registry.REWARDS['my_reward'] = my_reward), which the gin config imports with "
                     "a line `import my_rewards` (the module on PYTHONPATH)")
  for name, weight in weights.items():
    if not is_number(weight):
      raise ValueError(f"reward.weights[{name!r}]={weight!r} must be a number (the reward's weight in the sum)")
  if length_aware_max_tokens is not None and not any(
      isinstance(registry.get_reward(name), registry.LengthAwareReward) for name in weights):
    raise ValueError(f"reward.length_aware_max_tokens={length_aware_max_tokens} scales the 'length_aware' reward, "
                     f"which reward.weights={weights} does not use: add it to the weights, or remove the binding")
  if settings is not None and not isinstance(settings, dict):
    raise ValueError(f"reward.settings={settings!r} must be a dict from reward names to dicts of their constants, "
                     'e.g. {"length_aware": {"l_neg_control": 5000}}')
  for name, overrides in (settings or {}).items():
    if name not in weights:
      raise ValueError(f"reward.settings names {name!r}, which reward.weights={weights} does not use: add it to the "
                       "weights, or remove its entry")
    with_settings(registry.get_reward(name), name, overrides)  # checks the names and values
  out = dict(weights=weights, length_aware_max_tokens=length_aware_max_tokens)
  # Recorded only when given, so a run from before the setting existed resumes without a logged change.
  return dict(out, settings=settings) if settings else out


def with_settings(fn, name: str, overrides):
  """The registered reward `fn` (reward.weights' `name`) with the constants of reward.settings[name] replaced."""
  from phi_jax.rewards import registry  # pylint: disable=import-outside-toplevel
  if not overrides:
    return fn
  is_length_aware = isinstance(fn, registry.LengthAwareReward)
  target = fn.config if is_length_aware else fn
  fields = dataclasses.fields(target) if dataclasses.is_dataclass(target) and not isinstance(target, type) else ()
  # The numeric constants: a reward's other fields (the think format) are objects a gin dict cannot write.
  settable = {f.name: getattr(target, f.name) for f in fields if is_number(getattr(target, f.name))}
  if not isinstance(overrides, dict):
    raise ValueError(f"reward.settings[{name!r}]={overrides!r} must be a dict of the reward's constants, e.g. "
                     f"{{{next(iter(settable), 'name')!r}: ...}}")
  unknown = sorted(set(overrides) - set(settable))
  if unknown:
    has = f"its constants are {', '.join(sorted(settable))}" if settable else "it has no constants to set"
    raise ValueError(f"reward.settings[{name!r}] sets {', '.join(map(repr, unknown))}, not a constant of the "
                     f"{name!r} reward: {has}")
  for key, value in overrides.items():
    whole = isinstance(settable[key], numbers.Integral)
    if not is_number(value) or not math.isfinite(value) or (whole and value != int(value)):
      kind = "a whole number" if whole else "a finite number"
      raise ValueError(f"reward.settings[{name!r}][{key!r}]={value!r} must be {kind}")
  try:
    changed = dataclasses.replace(target, **{key: int(value) if isinstance(settable[key], numbers.Integral) else
                                             float(value) for key, value in overrides.items()})
  except ValueError as e:  # the reward's own check of its constants together
    raise ValueError(f"reward.settings[{name!r}]={overrides!r}: {e}") from None
  return registry.LengthAwareReward(changed) if is_length_aware else changed


def _read_prompts(files) -> list[dict]:
  """{"problem", "answer"} records of the GRPO prompt files (JSONL, Parquet or save_to_disk directories, globs
  allowed), with file:line (or row) errors for bad ones. A record whose answer the verifier cannot grade against is
  left out, named in a warning: every rollout of it would score incorrect, a group with nothing to learn from, and
  the hard-prompt replay would bring it back."""
  from phi_jax.rewards import gold_problem  # pylint: disable=import-outside-toplevel
  records, left_out = [], []
  for path in files:
    source = sources_lib.open_source(path)
    for i in range(len(source)):
      raw = source[i]
      if raw["error"] is not None:
        raise sources_lib.DataError(raw["where"], *raw["error"])
      record = raw["data"]
      if not isinstance(record, dict):
        raise sources_lib.DataError(raw["where"], "not an object", f"got {type(record).__name__}")
      answer = record.get("answer")
      if not isinstance(record.get("problem"), str) or isinstance(answer, bool) or not isinstance(
          answer, (str, int, float)):
        raise sources_lib.DataError(raw["where"], "missing field",
                                    'GRPO prompts need a string "problem" and a string or number "answer"')
      if (why := gold_problem(str(answer))) is not None:
        left_out.append(f"{raw['where']} ({str(answer)[:40]!r}: {why})")
        continue
      records.append({"problem": record["problem"], "answer": str(answer)})
  if left_out:
    log.warning("left out %d GRPO prompt(s) whose answer the verifier cannot grade against: %s%s", len(left_out),
                "; ".join(left_out[:5]), f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
  if not records:
    raise sources_lib.DataError(",".join(map(str, files)), "empty dataset",
                                "no GRPO prompts" + (" the verifier can grade against" if left_out else ""))
  return records


def length_aware_scale(reward_cfg: dict, cfg: GRPOConfig) -> int:
  """The length the length-aware reward is scaled to: reward.length_aware_max_tokens, or grpo.max_new_tokens."""
  scale = reward_cfg["length_aware_max_tokens"] or cfg.max_new_tokens
  if scale > cfg.max_new_tokens:  # lengths no rollout reaches: no pressure to be concise within the real budget
    raise ValueError(f"reward.length_aware_max_tokens={scale} is more than grpo.max_new_tokens={cfg.max_new_tokens}, "
                     "the longest a rollout can be: leave it unset to scale the reward to grpo.max_new_tokens, or "
                     "set it at most that")
  return scale


def check_data_settings(stage: str, data_cfg: dict, loop) -> None:
  """Data settings the stage would not read, refused before anything is built (a run and its dry run alike); the
  reward settings of a GRPO run too."""
  if stage == "next_token" and data_cfg["too_long"] not in packing_lib.TOO_LONG:
    raise ValueError(f"data.too_long={data_cfg['too_long']!r}; expected one of {packing_lib.TOO_LONG} for a "
                     "next-token stage")
  if stage == "grpo":  # the reward as the stage builds it: its settings' checks and the length-aware scaling
    grpo_reward(reward_settings(), grpo())
  if stage == "grpo" and data_cfg["eval_files"]:
    raise ValueError("data.eval_files is not read by a GRPO run (it has no eval loss); score held-out problems with "
                     "experiments/eval.py, and remove the binding")
  if stage == "grpo":
    _warn_ignored_data(data_cfg, (*GRPO_DATA_FIELDS, "eval_files"),  # eval_files refused above
                       "a GRPO run does not read {}: its batch is grpo.prompts_per_step x grpo.group_size rows of "
                       "grpo.max_prompt_tokens + grpo.max_new_tokens tokens, its prompts data.train_files")
  if stage == "dpo":
    _warn_ignored_data(data_cfg, DPO_DATA_FIELDS,
                       "a DPO run does not read {}: its pairs are read in one shuffled stream (data.train_files "
                       "together), one pair per row, over-long pairs handled by dpo.too_long")
  if loop.eval_every and not data_cfg["eval_files"]:
    raise ValueError(f"train.eval_every={loop.eval_every} evaluates on data.eval_files, which is empty: set "
                     "data.eval_files, or train.eval_every=0" + (" (a GRPO run has no eval loss)" if stage == "grpo"
                                                                else ""))


# The data settings a GRPO run reads: its prompts, their tokenizer and system prompt. Its batch is
# grpo.prompts_per_step x grpo.group_size rows of grpo.max_prompt_tokens + grpo.max_new_tokens tokens.
GRPO_DATA_FIELDS = ("train_files", "tokenizer", "system_prompt")


# The data settings a DPO run reads (`dpo_reference.setup`): no mixture weights, no packing, its own length rule.
DPO_DATA_FIELDS = ("train_files", "eval_files", "tokenizer", "system_prompt", "seq_len", "batch_size",
                   "on_bad_record", "num_epochs", "eval_batches")


def _warn_ignored_data(data_cfg: dict, read: Sequence[str], message: str) -> None:
  """Warns of data settings changed from their defaults that the stage does not read (`message` formats their
  list). A warning, not an error: a stage's config often includes another stage's file (grpo_tiny.gin does)."""
  defaults = {name: p.default for name, p in inspect.signature(data).parameters.items()}
  ignored = sorted(name for name, value in data_cfg.items()
                   if name in defaults and name not in read and as_plain(value) != as_plain(defaults[name]))
  if ignored:
    log.warning(message.format(", ".join(f"data.{name}={data_cfg[name]!r}" for name in ignored)))


def grpo_reward(reward_cfg: dict, cfg: GRPOConfig):
  """The weighted sum of reward.weights: one term per name, whatever function it names (a dict keyed by the
  functions merged two names of one function, or two equal ones, into one term, and refused unhashable ones)."""
  from phi_jax.rewards import registry  # pylint: disable=import-outside-toplevel
  terms = []
  for name, weight in reward_cfg["weights"].items():
    overrides = (reward_cfg.get("settings") or {}).get(name) or {}
    fn = with_settings(registry.get_reward(name), name, overrides)
    if isinstance(fn, registry.LengthAwareReward):  # the registered one's constants (a module's own included)
      try:
        fn = registry.LengthAwareReward(fn.config.scaled_to(length_aware_scale(reward_cfg, cfg)))
      except ValueError as e:
        if not {"l_pos_control", "l_max"} & set(overrides):
          raise
        raise ValueError(f"{e}, or lower reward.settings[{name!r}]'s l_pos_control against its l_max "
                         f"({overrides})") from None
    terms.append((fn, float(weight)))
  return registry.CombinedReward(tuple(terms), tuple(reward_cfg["weights"]))


def _grpo_setup(model_config: PhiConfig, hf_path: Optional[str], data_cfg: dict, settings: dict, tokenizer, the_mesh):
  """(loss_fn, on-policy data source, None) of the GRPO stage; prompts are data.train_files."""
  cfg = grpo_config(settings)  # its rows were checked against the mesh by check_batch_shape
  loop = settings["loop"]
  reward_fn = grpo_stage.verifier_rewards(grpo_reward(reward_settings(), cfg))
  ref_params = dpo_reference.reference_params(model_config, hf_path, settings, the_mesh) if cfg.beta else None
  source = grpo_stage.GRPORollouts(
      _read_prompts(data_cfg["train_files"]), tokenizer, model_config, cfg, reward_batch_fn=reward_fn,
      num_steps=loop.num_steps, seed=loop.seed, mesh=the_mesh, ref_params=ref_params,
      system_prompt=data_cfg["system_prompt"], score_microbatches=loop.microbatches)
  return grpo_stage.make_loss_fn(model_config, cfg), source, None
