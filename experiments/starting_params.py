"""The params a run starts from (`params_loader`: a finished run's params/, a transformers directory, or a random
init), checked for the model's shapes and for the rotary and norm settings that would make the same arrays another
function; `as_trained` keeps the model a run recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import jax

from phi_jax.hf import load_hf
from phi_jax.model import PhiConfig, init_params, presets
from phi_jax.train import loop as loop_lib
from phi_jax.train.state import param_shardings

from gin_bindings import as_plain, bound_or_none, run_model_settings, run_model_settings_named
from run_files import (MODEL_CONFIG_FILE, check_is_dir, check_not_unfinished_run, check_policy_dir,
                       not_a_checkpoint_hint, recorded_model_config)

log = logging.getLogger("phi_jax")


def model_config_of(preset: str = "tiny", hf_path: Optional[str] = None, overrides: Optional[dict] = None,
                    param_dtype: str = "float32") -> PhiConfig:
  """The PhiConfig the `model` settings give, read without gin (a starting run's own settings are rebuilt so)."""
  if overrides and "param_dtype" in overrides:
    raise ValueError(f"model.overrides sets param_dtype={overrides['param_dtype']!r}, which is its own setting: "
                     f"remove it from model.overrides and bind model.param_dtype={overrides['param_dtype']!r}")
  if not hf_path:
    return presets[preset].replace(param_dtype=param_dtype, **(overrides or {}))
  if not os.path.isfile(os.path.join(hf_path, "config.json")):
    raise ValueError(f"model.hf_path={hf_path!r} holds no config.json: point it (and data.tokenizer) at a "
                     "transformers checkpoint directory, e.g. "
                     "--gin_param='model.hf_path=\"/ckpt/Phi-4-mini-instruct\"', or set model.hf_path=None and "
                     f"model.preset for a randomly initialised model{not_a_checkpoint_hint(hf_path)}")
  with open(os.path.join(hf_path, "config.json")) as f:
    from phi_jax.hf import from_hf_config
    checkpoint = from_hf_config(json.load(f))
  config = checkpoint.replace(param_dtype=param_dtype, **(overrides or {}))
  differ = _shape_differences(checkpoint, config)
  if differ:
    raise ValueError(f"model.overrides changes the shape of the checkpoint model.hf_path={hf_path!r} "
                     f"({'; '.join(differ)}): resizing a checkpoint's vocabulary (or any of its arrays) is not "
                     "supported, its weights would not fit. Remove those keys from model.overrides; for a tokenizer "
                     "with more tokens, use the checkpoint's own tokenizer (new tokens can take its unused ids), or "
                     "set model.hf_path=None to train a model of that shape from a random init (model.preset)")
  return config


def _shape_differences(theirs: PhiConfig, ours: PhiConfig) -> list[str]:
  """'field=x there, y here' of the fields that size the arrays (head_dim None and spelled out alike), dtype aside."""
  theirs = dict(dataclasses.asdict(theirs), head_dim=theirs.resolved_head_dim)
  ours = dict(dataclasses.asdict(ours), head_dim=ours.resolved_head_dim)
  return [f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in loop_lib.SHAPE_FIELDS
          if k != "param_dtype" and theirs[k] != ours[k]]


def params_loader(model_config: PhiConfig, hf_path: Optional[str], init_from: Optional[str], the_mesh):
  """Starting params placed in their shards: a previous run's params/, an HF directory, or None (random)."""
  source = init_from or hf_path
  if not source:
    return None
  shardings = param_shardings(model_config, the_mesh)

  def load():
    name = "train.init_from" if init_from else "model.hf_path"
    if init_from:
      check_policy_dir(source, name)
    check_is_dir(name, source)
    if os.path.isdir(os.path.join(source, "params")):
      import orbax.checkpoint as ocp
      shapes = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
      path = os.path.abspath(os.path.join(source, "params"))
      run_settings = run_model_settings(source)
      with ocp.StandardCheckpointer() as ckptr:
        _check_saved_shapes(name, source, ckptr.metadata(path), shapes, run_settings)
        _check_run_math(name, source, run_settings, model_config)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        return ckptr.restore(path, target)
    check_not_unfinished_run(source)
    if init_from and os.path.isfile(os.path.join(source, "config.json")):
      from phi_jax.hf import from_hf_config
      with open(os.path.join(source, "config.json")) as f:
        hf_config = from_hf_config(json.load(f))
      differ = _shape_differences(hf_config, model_config)
      if differ:
        raise ValueError(f"train.init_from={source!r} is a transformers checkpoint of another shape than the model "
                         f"({'; '.join(differ)}): the model comes from model.preset / model.overrides unless "
                         f"model.hf_path is set; set model.hf_path={source!r} to take it from the checkpoint")
      _check_checkpoint_math(name, source, hf_config, model_config,
                             "is a transformers checkpoint whose rotary or norm settings differ from the model's",
                             f"Set model.hf_path={source!r} to take the model from the checkpoint")
    _, params = load_hf(source, dtype=model_config.param_dtype, shardings=shardings)
    return params

  return load


def warn_of_random_start(stage: str, settings: dict, hf_path: Optional[str]) -> None:
  """DPO and GRPO refine a trained model (TRL's trainers take a pretrained one): without starting params
  (`params_loader` gives None) the policy, and the frozen reference beside it, are a random init. Toy runs and
  tests do that on purpose, so it is said, not refused."""
  if stage not in ("dpo", "grpo") or settings["init_from"] or hf_path:
    return
  who = ("the policy and the DPO reference are" if stage == "dpo"
         else "the policy (and the reference, when grpo.beta > 0) is")
  log.warning("train.stage=%r with neither train.init_from nor model.hf_path set: %s the random init of "
              "train.seed=%d, not a trained model; set train.init_from (a finished run's workdir) or model.hf_path "
              "(a transformers checkpoint) to start from one", stage, who, settings["loop"].seed)


# Settings that change the function of the same arrays: the rotary embedding and the norms.
_MATH_FIELDS = ("max_position_embeddings", "original_max_position_embeddings", "rope_theta", "partial_rotary_factor",
                "rope_scaling_type", "rope_short_factor", "rope_long_factor", "rope_attention_factor", "rms_norm_eps")


def _check_checkpoint_math(name: str, source: str, theirs: PhiConfig, ours: PhiConfig, what: str,
                           remedy: str) -> None:
  """Params started from with another model's rotary or norm settings would start as another model; refused (the
  error says the starting point `what` is, and the `remedy`) unless model.overrides names the setting (a context
  extension changes rope_theta on purpose)."""
  theirs, ours = dataclasses.asdict(theirs), dataclasses.asdict(ours)
  deliberate = set(bound_or_none("model.overrides") or {})
  # Without LongRoPE on either side the position limits change no logit (transformers writes a default
  # original_max_position_embeddings of 4096 into every config it saves).
  longrope = "longrope" in (theirs["rope_scaling_type"], ours["rope_scaling_type"])
  fields = [k for k in _MATH_FIELDS if longrope or k not in ("max_position_embeddings",
                                                             "original_max_position_embeddings")]
  differ = {k: f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in fields if theirs[k] != ours[k]}
  unasked = [text for k, text in differ.items() if k not in deliberate]
  if unasked:
    raise ValueError(f"{name}={source!r} {what} ({'; '.join(unasked)}): it would start as another function of the "
                     f"same weights. {remedy}, or name the setting in model.overrides to train with another value on "
                     "purpose")
  if differ:
    log.info("%s=%s: model.overrides changes the starting point's %s", name, source, "; ".join(differ.values()))


def _check_run_math(name: str, source: str, settings: Optional[dict], model_config: PhiConfig) -> None:
  """Refuses a run's params/ trained with other rotary or norm settings than `model_config` (same arrays, another
  function): that run's model is the one it recorded (W/model_config.json), or, for a run from before it recorded
  one, the one rebuilt from its `model` settings as its config.gin records them."""
  theirs = recorded_model_config(source)
  if theirs is None and settings is None:
    return
  try:
    theirs = theirs or model_config_of(**settings)
  except (ValueError, KeyError, TypeError) as e:  # its checkpoint moved, a preset renamed since
    log.warning("%s=%s: the model settings of its config.gin do not rebuild its model here (%s); its rotary and norm "
                "settings are not compared with this run's", name, source, e)
    return
  _check_checkpoint_math(name, source, theirs, model_config,
                         "is a run trained with other rotary or norm settings than the model's",
                         f"Give this run that run's model settings ({run_model_settings_named(settings)}, as in "
                         f"{os.path.join(source, 'config.gin')})")


def _check_saved_shapes(name: str, source: str, saved, wanted, settings: Optional[dict] = None) -> None:
  """Refuses a run's params/ whose arrays have other shapes than this model's, naming them and the way out (the
  model settings of that run's config.gin, `settings`)."""
  saved = getattr(saved, "item_metadata", saved)  # Orbax's StepMetadata -> its tree of ArrayMetadata
  saved = getattr(saved, "tree", saved)
  flat_saved = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  flat_wanted = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(wanted)[0]}
  differ = [f"{k}: {flat_saved.get(k, 'absent')} there, {flat_wanted.get(k, 'absent')} here"
            for k in sorted(set(flat_saved) | set(flat_wanted)) if flat_saved.get(k) != flat_wanted.get(k)]
  if differ:
    raise ValueError(f"{name}={source!r} holds params of another model ({'; '.join(differ[:4])}"
                     + (f"; ... {len(differ) - 4} more" if len(differ) > 4 else "") + "): give this run that "
                     f"run's model settings ({run_model_settings_named(settings)}, as in "
                     f"{os.path.join(source, 'config.gin')})")


# Model settings that change memory and speed, but neither which pairs a reference file holds nor their log-probs
# beyond float rounding: a resumed run may change them.
RUN_TIME_MODEL_FIELDS = ("attention_backend", "max_segments_per_row", "remat_policy")


def as_trained(config: PhiConfig, workdir: str) -> PhiConfig:
  """`config`, a run's model rebuilt from its config.gin, with the settings it was trained with where they differ.

  A run on model.hf_path rebuilds its rotary, shapes and token ids from that checkpoint's config.json as it is now,
  which may have changed since the run trained (a hub revision that updates rope factors); its params compute the
  function they were trained as. Settings named in model.overrides (a command line's deliberate change) and the
  run-time ones (attention backend, remat, dtypes) stay as bound."""
  trained = recorded_model_config(workdir)
  if trained is None:
    return config
  # How the model runs and its precision are eval's or export's to choose anew.
  deliberate = set(bound_or_none("model.overrides") or {}) | {*RUN_TIME_MODEL_FIELDS, "dtype", "param_dtype"}
  ours, theirs = dataclasses.asdict(config), dataclasses.asdict(trained)
  differ = {k: v for k, v in theirs.items() if k not in deliberate and as_plain(v) != as_plain(ours[k])}
  if not differ:
    return config
  message = (f"{workdir} was trained with {', '.join(f'{k}={v!r}' for k, v in differ.items())}, not the "
             f"{', '.join(f'{k}={ours[k]!r}' for k in differ)} that its model settings give now (model.hf_path's "
             f"config.json changed since the run?): its params are used as they were trained "
             f"({os.path.join(workdir, MODEL_CONFIG_FILE)})")
  if message not in _AS_TRAINED_WARNED:  # eval reads the policy's config several times
    _AS_TRAINED_WARNED.add(message)
    log.warning(message)
  return dataclasses.replace(config, **{k: getattr(trained, k) for k in differ})


_AS_TRAINED_WARNED: set[str] = set()
