"""gin bindings for the entry scripts: `mesh`, `model`, `data`, `optimizer`, `train`.

The library takes plain frozen dataclasses and functions; this module is the only place that knows gin.
A binding such as `train.num_steps = 100`, `mesh.shape = {"data": 2, "fsdp": -1}` or
`model.overrides = {"rope_theta": 250000.0, "max_position_embeddings": 16384}` (the 4K -> 16K context extension
of Phi-4's mid-training) is all a run needs to change.

Each binding is checked against its parameter's annotation when the configurable is read (`typed`): a string is
refused for a number or a bool (`train.export_hf="False"` would be true), a fraction for a whole number, a dict for a
list; a whole-number float is taken as an int (`train.num_steps=1e4`).
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import functools
import glob
import hashlib
import inspect
import json
import logging
import math
import numbers
import os
import pathlib
import re
import shlex
import shutil
import tempfile
import types
import typing
from typing import Any, Optional, Sequence

import gin
from gin import config_parser
import jax
import numpy as np

from phi_jax import sharding
from phi_jax.data import packing as packing_lib
from phi_jax.data import pipeline as pipeline_lib
from phi_jax.data import sources as sources_lib
from phi_jax.hf import load_hf, save_hf
from phi_jax.hf.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer, load_tokenizer, save_tokenizer
from phi_jax.model import PhiConfig, init_params, presets
from phi_jax.sampling import sampler
from phi_jax.sharding import distributed
from phi_jax.stages import grpo as grpo_stage
from phi_jax.stages import next_token
from phi_jax.stages.grpo import GRPOConfig
from phi_jax.train import LoopConfig, OptimizerConfig, loop as loop_lib
from phi_jax.train.checkpoint import CORRUPT_DIR
from phi_jax.train.state import abstract_state, param_shardings
from phi_jax.train.optimizer import learning_rate_schedule, make_optimizer
from phi_jax.train.step import check_rows_per_process, make_train_step

log = logging.getLogger("phi_jax")

_REFUSED = object()


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_annotated(value, hint):
  """`value` as a setting annotated `hint` takes it, or _REFUSED. A whole-number float is the int it is (gin and
  MaxText-style configs write train.num_steps=1e4); an int is a float. Annotations other than these simple ones
  (Any, classes) are left to the configurable."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    taken = (_as_annotated(value, arg) for arg in args if arg is not type(None))
    return next((t for t in taken if t is not _REFUSED), _REFUSED)
  if hint is bool:  # "False" and 0 would be read by truth value
    return bool(value) if isinstance(value, (bool, np.bool_)) else _REFUSED
  if hint is int:
    whole = _is_number(value) and (isinstance(value, numbers.Integral) or float(value).is_integer())
    return int(value) if whole else _REFUSED
  if hint is float:
    return value if _is_number(value) else _REFUSED
  if hint is str:
    if isinstance(value, os.PathLike):  # a pathlib.Path from Python
      return os.fspath(value)
    return value if isinstance(value, str) else _REFUSED
  container = origin or hint
  if container is dict:
    return value if isinstance(value, dict) else _REFUSED
  if container in (list, tuple, collections.abc.Sequence):
    # One string is a list of one where the items are strings (data.train_files = "a.jsonl").
    if isinstance(value, str) and args == (str,):
      return [value]
    if not isinstance(value, (list, tuple)):
      return _REFUSED
    if args == (str,):  # path objects as strings: the run's metadata, checkpointed as plain JSON, holds them
      items = [_as_annotated(item, str) for item in value]
      return _REFUSED if _REFUSED in items else type(value)(items)
    return value
  return value


def _describe(hint) -> str:
  """The values `hint` asks for, as an error names them."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    kinds = [_describe(arg) for arg in args if arg is not type(None)]
    return " or ".join(kinds + (["None"] if type(None) in args else []))
  named = {bool: "True or False", int: "a whole number", float: "a number", str: "a string", dict: "a dict"}
  if (origin or hint) in named:
    return named[origin or hint]
  if (origin or hint) in (list, tuple, collections.abc.Sequence):
    return "a list of strings (or one string)" if args == (str,) else "a list"
  return getattr(hint, "__name__", str(hint))


def check_setting_types(name: str, values: dict, hints: dict) -> dict:
  """`values`, the arguments of the configurable `name`, as their annotations `hints` take them; a value of another
  type is refused naming its binding (else it failed deep inside Grain, JAX or numpy, or a "False" was true)."""
  out = dict(values)
  for key, value in values.items():
    if key not in hints:
      continue
    if key.endswith("dtype") and value is not None and not isinstance(value, str):
      try:  # jnp.bfloat16 / np.float32 from Python: the name the setting takes
        value = np.dtype(value).name
      except TypeError:
        pass
    out[key] = _as_annotated(value, hints[key])
    if out[key] is _REFUSED:
      quoted = isinstance(value, str) and "a string" not in _describe(hints[key])
      raise ValueError(f"{name}.{key}={value!r} must be {_describe(hints[key])}"
                       + (": write the value without quotes" if quoted else f", not {type(value).__name__}"))
  return out


def typed(name: str):
  """Decorates a configurable (a function or a dataclass) so its arguments are checked by `check_setting_types`
  before it runs, errors naming the gin binding `name`.param."""
  def decorate(fn):
    signature = inspect.signature(fn)
    hints = []  # resolved on the first call: annotations may name what the module defines later

    @functools.wraps(fn, updated=())  # a class's __dict__ stays its own
    def checked(*args, **kwargs):
      if not hints:
        hints.append(typing.get_type_hints(fn))
      bound = signature.bind(*args, **kwargs)
      bound.arguments.update(check_setting_types(name, bound.arguments, hints[0]))
      return fn(*bound.args, **bound.kwargs)

    checked.__signature__ = signature  # gin reads the parameters with getfullargspec, which ignores __wrapped__
    return checked
  return decorate


def configurable(name: str):
  """`gin.configurable(name)` of a function whose bindings are checked against its annotations (`typed`)."""
  return lambda fn: gin.configurable(name)(typed(name)(fn))


optimizer = gin.external_configurable(typed("optimizer")(OptimizerConfig), name="optimizer")


def parse_gin(files: Sequence[str], params: Sequence[str], macro_files: Optional[Sequence[str]] = (),
              macro_texts: Sequence[str] = ()):
  """Parses gin `files`, then the bindings `params`. A binding without a configurable (a gin macro) is refused unless
  `files`, `macro_files` or `macro_texts` (other configs the same bindings go to) use it; `macro_files=None` skips
  that check. A binding of `params` with a gin scope (`sft/train.num_steps=7`) is refused."""
  if macro_files is not None:
    _check_macro_params(list(files) + list(macro_files), params, macro_texts)
  scoped = scoped_bindings(params)
  if scoped:
    # gin applies a scoped binding only inside that scope, and no configurable here is called in one: gin took it
    # and the run went on with the unscoped value.
    param, scope, plain = scoped[0]
    raise ValueError(f"--gin_param {param!r} has the gin scope {scope + '/'!r}, which reaches no setting (no "
                     f"configurable runs in a gin scope here, so the run would go on without it): drop the scope, "
                     f"--gin_param={shlex.quote(plain)}")
  try:
    gin.parse_config_files_and_bindings(list(files), list(params), finalize_config=False, skip_unknown=False)
  except SyntaxError as e:
    if not any(_fails_to_parse(p) for p in params):
      raise
    constant, param = _misspelt_constant(e), next(p for p in params if _fails_to_parse(p))
    # Quoted strings ('none' a string value) are kept as they are.
    fixed = re.sub(r"('[^']*'|\"[^\"]*\")|\b(?i:true|false|none|null)\b",
                   lambda m: m.group(1) or _CONSTANTS[m.group(0).lower()], param)
    # YAML's and JSON's spelling: quoting it would give the string "false", which is refused too. Only where the
    # Python spelling parses: in "data.system_prompt=true story" the quotes are missing, not a capital.
    if constant and not _fails_to_parse(fixed):
      spelling = _CONSTANTS[constant.lower()]
      raise ValueError(f"{e}\n{constant!r} is not a gin value: write it as {spelling} (capitalised, no quotes), "
                       f"e.g. {shlex.quote('--gin_param=' + fixed)}") from e
    raise ValueError(f"{e}\nA string value needs quotes that survive the shell: "
                     "--gin_param='data.tokenizer=\"tiny:phi-4\"' (single quotes around the whole binding, double "
                     "quotes around the string)") from e
  except ValueError as e:
    if "denylisted kwarg 'chunk_size'" in str(e):
      raise ValueError(f"{e}\nThe logits chunk of every stage's loss is train.chunk_size; bind that instead.") from e
    raise
  except (OSError, TypeError) as e:
    if "include" not in str(e):
      raise
    raise ValueError(f"{e}\nA config's include lines name files from the repository root "
                     f"('experiments/configs/...'): run the command from there (the current directory is "
                     f"{os.getcwd()})") from e


_CONSTANTS = {"true": "True", "false": "False", "none": "None", "null": "None"}


def _misspelt_constant(error: SyntaxError) -> Optional[str]:
  """The token gin failed to parse when it is true / false / none / null in some other case than Python's."""
  match = re.search(r"Failed to parse token '(\w+)'", str(error.msg))
  return match.group(1) if match and match.group(1).lower() in _CONSTANTS else None


def _fails_to_parse(param: str) -> bool:
  try:
    gin_statements(param)
  except SyntaxError:
    return True
  return False


def _check_macro_params(files: Sequence[str], params: Sequence[str], extra_texts: Sequence[str] = ()) -> None:
  """Refuses a --gin_param without a configurable (`learning_rate=1e-3`, MaxText's spelling): gin reads it as a macro
  definition, which changes nothing unless a config uses it as %learning_rate, so the run went on with the file's
  value (and a sweep over it trained the same run twice)."""
  texts = list(params) + list(extra_texts) + _config_texts(files)
  for param in params:
    try:
      statements = gin_statements(param)
    except SyntaxError:
      continue  # parse_gin's own parse reports it
    for statement in statements:
      if not isinstance(statement, config_parser.BindingStatement):  # an include or import has no selector
        continue
      used = re.compile(rf"%{re.escape(statement.selector)}(?![\w.])")
      if not statement.arg_name and not any(used.search(text) for text in texts):
        raise ValueError(f"--gin_param {param!r} binds no configurable's parameter ({statement.selector!r} is read as "
                         "a gin macro that no config uses): write configurable.parameter=value, e.g. "
                         "optimizer.learning_rate=1e-3, train.num_steps=100, data.seq_len=4096")


def _config_texts(files: Sequence[str], depth: int = 0) -> list[str]:
  """The text of gin files and of the files they include (a missing one is left to gin to report)."""
  texts = []
  for path in files:
    try:
      with open(path) as f:
        text = f.read()
    except OSError:
      continue
    texts.append(text)
    try:
      includes = [s.filename for s in gin_statements(text) if isinstance(s, config_parser.IncludeStatement)]
    except SyntaxError:
      continue
    if depth < 8:
      texts += _config_texts([i if os.path.exists(i) else os.path.join(os.path.dirname(path), i) for i in includes],
                             depth + 1)
  return texts


def parse_gin_for_checkpoint(init_from: str, files: Sequence[str], params: Sequence[str]):
  """Config for a command that loads `init_from` (eval, rollouts): when it is a run's workdir, that run's own
  config.gin first (the model and tokenizer the params were trained with), then `files`, then `params`; each
  later one overrides the earlier. A transformers checkpoint directory has no config.gin: `files` and `params`
  alone."""
  run_config = os.path.join(init_from, "config.gin")
  if os.path.exists(run_config):
    with open(run_config) as f:
      # A GRPO run written when GRPO had its own chunk size recorded `grpo.chunk_size`, no longer a setting (the
      # loss chunk is train.chunk_size): its line is left out, as it changes nothing a loaded policy does.
      text = "\n".join(line for line in f.read().splitlines() if not line.startswith("grpo.chunk_size"))
    try:
      gin.parse_config(text)
    except ImportError as e:  # a module of the run's own (its rewards), named by an `import` line
      modules = [s.module for s in gin_statements(text) if isinstance(s, config_parser.ImportStatement)]
      raise ValueError(f"{run_config} imports {', '.join(modules)} (its `import` lines), which does not load here: "
                       f"{str(e).splitlines()[0]}. The run was trained with that module (a reward of its own, say): "
                       "put the directory holding it on PYTHONPATH (PYTHONPATH=/path/to/dir python "
                       "experiments/...)") from e
    except Exception as e:
      raise ValueError(f"{run_config}: {e}") from e
  run_mesh = bound_or_none("mesh.shape")
  parse_gin(files, params, macro_files=[run_config])  # gin writes a run's macros into its config.gin
  if run_mesh is not None and bound_or_none("mesh.shape") == run_mesh:
    # The run's mesh belongs to the machine it trained on; the params load onto any mesh. Kept where it fits.
    try:
      sharding.resolve_mesh_shape(run_mesh, jax.device_count())
    except ValueError:
      log.info("the run's mesh.shape=%s does not fit this machine's %d device(s): loading onto mesh.shape={'fsdp': "
               "-1} (give --gin_param='mesh.shape=...' to choose another)", run_mesh, jax.device_count())
      gin.bind_parameter("mesh.shape", {"fsdp": -1})


def gin_statements(text: str) -> list:
  """The statements of gin config text (bindings, includes, imports), parsed as gin parses them."""
  return list(config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)))


def binding_key(statement) -> Optional[str]:
  """'configurable.param' of a binding statement (scope and module path dropped); None for a macro, an include or
  an import."""
  if not isinstance(statement, config_parser.BindingStatement) or not statement.arg_name:
    return None
  return f"{statement.selector.split('.')[-1]}.{statement.arg_name}"


def scoped_bindings(params: Sequence[str]) -> list[tuple[str, str, str]]:
  """(param, its gin scope, the param without the scope) of each binding of `params` that has a scope
  (`sft/train.num_steps=7`); none where a param does not parse (gin's own parse says why)."""
  out = []
  for param in params:
    try:
      statements = gin_statements(param)
    except SyntaxError:
      continue
    out += [(param, st.scope, param.replace(f"{st.scope}/", "", 1)) for st in statements
            if isinstance(st, config_parser.BindingStatement) and st.scope]
  return out


def warn_unread_bindings(params: Sequence[str], unread: Sequence[str], tool: str, instead: str) -> None:
  """Warns of --gin_param bindings of configurables `tool` registers but never reads (eval.py given
  rollouts.temperature): gin accepts them, and the run went on with other values."""
  for param in params:
    for key in binding_keys(param):
      if key.split(".")[0] in unread:
        log.warning("%s does not read %s (given as --gin_param=%s): %s", tool, key, param, instead)


def binding_keys(text: str) -> list[str]:
  """'configurable.param' of each binding in gin `text` (none where it does not parse: gin's own parse says why)."""
  try:
    return [k for k in map(binding_key, gin_statements(text)) if k]
  except SyntaxError:
    return []


def bound_or_none(name: str, nested: bool = True):
  """The value gin binds to `name` ("mesh.shape"), with the macros it holds resolved, at any depth
  (`model.overrides = %OVR` or `mesh.shape = {'data': %D}`, as a run's config.gin may record them), or None where
  nothing binds it. `nested=False` resolves a macro bound to `name` itself but keeps those inside its value: for
  a value bound again later, whose macros a later binding (a --gin_param) may still change."""
  try:
    return resolve_bound_macros(gin.query_parameter(name), nested)
  except ValueError:  # not bound
    return None


def resolve_bound_macros(value, nested: bool = True, depth: int = 0):
  """`value` with each macro reference in it (`nested`: in its lists, tuples and dict values too) replaced by the
  value gin binds to the macro (`_resolve_macros` does so for a config file's statements, which gin has not bound)."""
  if depth > 32:  # a macro may name another macro, but not forever
    return value
  if isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
    return resolve_bound_macros(gin.query_parameter(repr(value)), nested, depth + 1)  # "%NAME"
  if nested and isinstance(value, (list, tuple)):
    return type(value)(resolve_bound_macros(item, nested, depth + 1) for item in value)
  if nested and isinstance(value, dict):
    return {key: resolve_bound_macros(item, nested, depth + 1) for key, item in value.items()}
  return value


def write_text_atomically(path: str, text: str) -> None:
  """`text` into `path` through a temporary file and a rename: a reader (or a crash) never sees it half-written."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_results_atomically(records_path: str, records: Sequence[dict], summary_path: str, summary: dict) -> None:
  """A results file and its summary, the summary last: a stale summary is removed first, so an interrupted write
  leaves records without a summary (incomplete) rather than new records beside an old summary (looking finished)."""
  if os.path.exists(summary_path):
    os.remove(summary_path)
  write_text_atomically(records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  write_text_atomically(summary_path, json.dumps(summary, indent=1))


def check_output_path(flag: str, path: str, *, directory: bool) -> None:
  """Refuses an output path of the wrong kind, or one where nothing can be written, before any work is done (found
  only when writing, it cost the run). Creates the directory (`directory`) or the file's parent directory."""
  if directory and os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag}={path!r} is a file: give a directory for the results (it is created if missing)")
  if not directory and os.path.isdir(path):
    raise ValueError(f"{flag}={path!r} is a directory: give the path of the file to write")
  _check_writable_directory(flag, path, path if directory else os.path.dirname(os.path.abspath(path)))


def _check_writable_directory(flag: str, path: str, folder: str) -> None:
  """Creates `folder` and writes a probe file in it (then removes it): a path under a regular file, a read-only or
  a permission-denied directory fails here, as it would when the results are written."""
  try:
    os.makedirs(folder, exist_ok=True)
    handle, probe = tempfile.mkstemp(prefix=".write_check", dir=folder)  # a name of its own on each host
    os.close(handle)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{flag}={path!r}: cannot create or write in {folder!r} ({e.strerror or e}): give a path in a "
                     "directory this process can write to") from e


def _check_is_dir(name: str, path: str) -> None:
  if not os.path.isdir(path):
    raise ValueError(f"{name}={path!r}: no such directory (give a finished run's workdir, which holds params/, or a "
                     f"transformers checkpoint directory){_not_a_checkpoint_hint(path)}")


def check_policy_dir(path: str, name: str = "--init_from") -> None:
  """Refuses a --init_from (or `name`) that holds no policy, saying what it is instead and where the params are."""
  _check_is_dir(name, path)
  stage_record = os.path.join(path, "recipe_stage.json")
  if not os.path.isdir(os.path.join(path, "params")) and os.path.isfile(stage_record):
    with open(stage_record) as f:
      record = json.load(f)
    if record.get("skipped") and record.get("params_from"):
      where = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), record["params_from"]))
      raise ValueError(f"{name}={path!r} is a recipe stage that was skipped ({record['skipped']}): it trained "
                       f"no params, and the recipe went on with those of {where}; point {name} there")
  check_not_unfinished_run(path)
  if not os.path.isdir(os.path.join(path, "params")) and not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"{name}={path!r} is neither a run's workdir (it has no params/) nor a transformers "
                     f"checkpoint (it has no config.json){_not_a_checkpoint_hint(path)}")


def _not_a_checkpoint_hint(path: str) -> str:
  """'': what a path without config.json holds instead (a PEFT adapter, maybe a hub id), where that can be told."""
  from phi_jax.hf.checkpoint import not_a_checkpoint_hint
  hint = not_a_checkpoint_hint(path)
  return f". {hint}" if hint else ""


def add_checkpoint_args(parser):
  """The flags of a command that loads a trained policy (eval, rollouts); `parse_gin_for_checkpoint` reads them."""
  parser.add_argument("--init_from", required=True, help="run workdir (with params/) or transformers checkpoint dir")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config (repeatable), after the run's own config.gin when --init_from is a run")
  parser.add_argument("--gin_param", action="append", default=[], help="gin binding 'k=v' (repeatable)")


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
                     f"model.preset for a randomly initialised model{_not_a_checkpoint_hint(hf_path)}")
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
  if weights is not None and not all(w is None or _is_number(w) for w in weights):
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


def get_tokenizer(spec: str, workdir: str):
  """The tokenizer `spec` names; "tiny:<chat format>" is built once into workdir/tokenizer and read from there."""
  if spec.startswith("tiny:"):
    out = os.path.join(workdir, "tokenizer")
    # The check or process 0's build may fail on one process alone: every process learns it here, in the collective
    # that also holds the others back until the files are built.
    with distributed.failing_together(f"building data.tokenizer={spec!r} into {out}"):
      _build_tiny_tokenizer_once(spec, workdir, out)
    return load_tokenizer(out)
  try:
    return load_tokenizer(spec)
  except FileNotFoundError as e:  # name the binding: the loader knows only the path
    raise FileNotFoundError(f"data.tokenizer={spec!r}: {e}") from None


def _build_tiny_tokenizer_once(spec: str, workdir: str, out: str) -> None:
  """Builds the tiny tokenizer `spec` names into `out` (process 0 alone) unless it is there already."""
  chat_format = tiny_chat_format(spec)
  built = _tiny_tokenizer_format(out)
  if built is not None and built != chat_format:
    # A workdir keeps the tokenizer it was first given (a run resumes with it); a spec naming another format
    # would otherwise be ignored without a word, the data rendered in the old format.
    # Not a tiny one: the copy a run trained on a tokenizer directory keeps there (`keep_run_tokenizer`).
    held, binding = ((f"the tiny tokenizer of the {built!r} format ({out})", f"tiny:{built}") if built != "unknown"
                     else (f"the tokenizer in {out}, not a tiny one", out))
    if _has_checkpoints(workdir) or os.path.isdir(os.path.join(workdir, "params")):
      raise ValueError(f"data.tokenizer={spec!r}, but {workdir} holds a run trained with {held}: set "
                       f"data.tokenizer='{binding}' to resume with it, or use a new workdir")
    log.warning("data.tokenizer=%r: replacing the %s that an earlier, unstarted run left in %s", spec,
                f"tiny {built!r} tokenizer" if built != "unknown" else "tokenizer (not a tiny one)", out)
  # Process 0 alone builds it, into a temporary directory renamed into place: processes started together would
  # otherwise write the same files at once, and one could read another's half-written file.
  if jax.process_index() == 0 and built != chat_format:
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_tokenizer(tmp, chat_format=chat_format)
    shutil.rmtree(out, ignore_errors=True)  # what a crash left half-built
    os.replace(tmp, out)


def keep_run_tokenizer(workdir: str, spec: str, tokenizer, replace: bool) -> None:
  """Saves the tokenizer a run trains with (data.tokenizer=`spec`) as W/tokenizer, over a copy already there when
  `replace`: a next stage (train.init_from), eval, rollouts and export compare theirs with it
  (`check_tokenizer_matches_start`), where the files at `spec` may since have been replaced. Process 0 alone writes;
  a "tiny:" tokenizer is built there already."""
  out = os.path.join(workdir, "tokenizer")
  if spec.startswith("tiny:") or os.path.realpath(spec) == os.path.realpath(out) or jax.process_index() != 0:
    return
  _tidy_run_tokenizer(out)
  if os.path.exists(out) and not replace:
    return
  # Into a temporary directory renamed into place, the old copy renamed aside first and removed last: a reader never
  # sees half of the files, and a kill at any point leaves a whole copy (or, between the two renames, one aside).
  tmp, aside = f"{out}.tmp{os.getpid()}", f"{out}.old{os.getpid()}"
  save_tokenizer(tokenizer, tmp)
  if os.path.islink(out):  # a link the user made: replaced, what it points to kept
    os.remove(out)
  elif os.path.exists(out):
    os.replace(out, aside)
  os.replace(tmp, out)
  shutil.rmtree(aside, ignore_errors=True)


def _tidy_run_tokenizer(out: str) -> None:
  """Removes what a `keep_run_tokenizer` killed midway left beside `out`: a copy half-written, an old one set aside
  (put back where the kill came between the two renames)."""
  aside = _written_beside(out, "old")
  if aside and not os.path.lexists(out):
    os.replace(aside.pop(0), out)
  for stray in aside + _written_beside(out, "tmp"):
    shutil.rmtree(stray, ignore_errors=True)


def _written_beside(out: str, kind: str) -> list:
  """The folders `keep_run_tokenizer` (or `get_tokenizer`) names `out`.<kind><pid> beside `out`, newest first: "old"
  a copy set aside, "tmp" one being written. Any other name there (W/tokenizer.old_phi4) is the user's."""
  parent, name = os.path.split(out)
  try:
    names = os.listdir(parent or ".")
  except FileNotFoundError:
    return []
  paths = [os.path.join(parent, n) for n in names if re.fullmatch(rf"{re.escape(name)}\.{kind}\d+", n)]
  return sorted((p for p in paths if os.path.isdir(p)), key=os.path.getmtime, reverse=True)


def tiny_chat_format(spec: str) -> str:
  """The chat format a "tiny:<chat format>" data.tokenizer names, refused unless it is a known one."""
  chat_format = spec.split(":", 1)[1]
  if chat_format not in CHAT_TEMPLATES:
    raise ValueError(f"data.tokenizer={spec!r}: unknown chat format {chat_format!r}; expected 'tiny:' followed by "
                     f"one of {sorted(CHAT_TEMPLATES)}")
  return chat_format


# The most tokens a tiny tokenizer has: build_tiny_tokenizer's vocab_size, which `get_tokenizer` builds with.
_TINY_TOKENIZER_SIZE = 512


def _tiny_tokenizer_format(path: str) -> Optional[str]:
  """The chat format of the tiny tokenizer built into `path` (read from its chat template); None when there is none,
  "unknown" for a tokenizer that is no tiny one of a known format (a run's copy of a real tokenizer, whose chat
  template may well be a known one)."""
  try:
    with open(os.path.join(path, "tokenizer_config.json")) as f:
      template = json.load(f).get("chat_template")
  except (OSError, ValueError):
    return None
  try:
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
      vocab = (json.load(f).get("model") or {}).get("vocab") or ()
  except OSError:
    return None
  except ValueError:
    return "unknown"
  if len(vocab) > _TINY_TOKENIZER_SIZE:
    return "unknown"
  return next((name for name, known in CHAT_TEMPLATES.items() if known == template), "unknown")


def _has_checkpoints(workdir: str) -> bool:
  checkpoints = os.path.join(workdir, "checkpoints")
  return os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))


def _pipeline(files, data_cfg, tokenizer, *, seed, per_process_batch, shuffle=True, num_epochs=None, warn=True):
  components = [(sources_lib.open_source(f), (data_cfg["weights"] or [1.0] * len(files))[i])
                for i, f in enumerate(files)]
  return pipeline_lib.build_pipeline(
      components, tokenize_fn=pipeline_lib.make_tokenize_fn(
          tokenizer, system_prompt=data_cfg["system_prompt"],
          special_tokens_in_text=data_cfg.get("special_tokens_in_text", "split")),
      seq_len=data_cfg["seq_len"], batch_size=per_process_batch, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      packing=data_cfg["packing"], too_long=data_cfg["too_long"], on_bad_record=data_cfg["on_bad_record"], warn=warn)


def check_not_unfinished_run(path: str) -> None:
  """A run workdir has params/ only once it has finished; without them it is not a transformers checkpoint either."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.basename(os.path.abspath(path)) == "params" and os.path.isfile(os.path.join(parent, "config.gin")):
    raise ValueError(f"{path} is the params/ of a run: point at the run's workdir, {parent}")
  if not os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(f"{path} is a run that has not finished: its final params/ are written at the end. Rerun its "
                     "command to finish it (it resumes from its newest checkpoint), or point at a finished run")


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
    _check_is_dir(name, source)
    if os.path.isdir(os.path.join(source, "params")):
      import orbax.checkpoint as ocp
      shapes = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
      path = os.path.abspath(os.path.join(source, "params"))
      run_settings = _run_model_settings(source)
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


def _run_config_statements(workdir: str) -> Optional[list]:
  """The parsed statements of a run's config.gin, read without binding anything; None where it has none (or it does
  not parse)."""
  try:
    with open(os.path.join(workdir, "config.gin"), encoding="utf-8") as f:
      return gin_statements(f.read())
  except (OSError, SyntaxError):
    return None


def _run_model_settings(workdir: str) -> Optional[dict]:
  """The `model` arguments a run's config.gin binds (its unscoped model.* bindings, the file's own macros resolved);
  None where it has no config.gin, or binds them in a way not read here (a scope, a reference)."""
  statements = _run_config_statements(workdir)
  if statements is None:
    return None
  bindings = [s for s in statements if isinstance(s, config_parser.BindingStatement)]
  macros = {s.selector: s.value for s in bindings if not s.arg_name and not s.scope}
  settings = {}
  for statement in bindings:
    key = binding_key(statement)
    if key is None or not key.startswith("model."):
      continue
    value = _resolve_macros(statement.value, macros)
    if statement.scope or value is _REFUSED:
      return None
    settings[statement.arg_name] = value
  return settings


def _resolve_macros(value, macros: dict, depth: int = 0):
  """`value` with the %MACRO references of `macros` replaced by their values; _REFUSED for any other reference."""
  if isinstance(value, dict):
    items = {k: _resolve_macros(v, macros, depth) for k, v in value.items()}
    return _REFUSED if _REFUSED in items.values() else items
  if isinstance(value, (list, tuple)):
    items = [_resolve_macros(v, macros, depth) for v in value]
    return _REFUSED if _REFUSED in items else type(value)(items)
  if isinstance(value, (str, numbers.Number, type(None))):
    return value
  name = repr(value)[1:] if repr(value).startswith("%") else None
  if name not in macros or depth > 8:
    return _REFUSED
  return _resolve_macros(macros[name], macros, depth + 1)


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
                         f"Give this run that run's model settings ({_run_model_settings_named(settings)}, as in "
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
                     f"run's model settings ({_run_model_settings_named(settings)}, as in "
                     f"{os.path.join(source, 'config.gin')})")


def _run_model_settings_named(settings: Optional[dict]) -> str:
  """The settings that gave a run's model, as its config.gin binds them (`settings`): its checkpoint where it had
  one, else its preset and overrides."""
  if not settings or not settings.get("hf_path"):
    return "model.preset / model.overrides"
  named = f"model.hf_path={settings['hf_path']!r}"
  return named + (f" with model.overrides={settings['overrides']!r}" if settings.get("overrides") else "")


def check_new_tokens(name: str, max_new_tokens: int, model_config: PhiConfig):
  """A generation budget that leaves no room for a prompt in the model's positions is a config mistake (e.g. the
  32K default of a reasoning eval on a small test model), not something to spend hours generating."""
  if max_new_tokens >= model_config.max_position_embeddings:
    raise ValueError(f"{name}={max_new_tokens} leaves no room for a prompt within the model's "
                     f"max_position_embeddings={model_config.max_position_embeddings}; set "
                     f"--gin_param='{name}=N' with N well below it")


# More tokens than this with other ids than the starting point's tokenizer gives them: another tokenizer, refused.
MAX_CHANGED_TOKENS = 256


def _start_tokenizer(source: str):
  """(where, tokenizer) of what a starting point was trained with: a transformers checkpoint's own tokenizer files, a
  run's own tokenizer (W/tokenizer: a tiny one built there, or the copy `keep_run_tokenizer` kept) or, for a run from
  before runs kept one, the tokenizer directory its config.gin names; None when it has none. Where a kill left the
  copy set aside (W/tokenizer.old<pid>, no W/tokenizer), that copy."""
  copy = os.path.join(source, "tokenizer")
  aside = [] if os.path.lexists(copy) else _written_beside(copy, "old")[:1]
  for where in (source, copy, *aside):
    if any(os.path.isfile(os.path.join(where, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
      return where, load_tokenizer(where)
  run_config = os.path.join(source, "config.gin")
  if os.path.isfile(run_config):
    with open(run_config, encoding="utf-8") as f:
      spec = next((st.value for st in gin_statements(f.read()) if binding_key(st) == "data.tokenizer"), None)
    if isinstance(spec, str) and os.path.isdir(spec):
      return spec, load_tokenizer(spec)
  return None


def check_tokenizer_matches_start(tokenizer, spec: str, name: str, source: str) -> None:
  """Refuses a data.tokenizer other than the one the starting params were trained with: the run would train (and
  export) them on another tokenizer's ids, and nothing else would notice while the new one is no larger. So is one
  that gives a token both hold another id, and one that encodes text into other ids (`_TOKENIZER_PROBE`) with the
  same vocabulary, and a tiny one of another token family than the tiny one trained with (`check_token_family`). A
  few renamed or added tokens (each found on one side only), or another chat template, are logged instead. Training
  checks train.init_from or model.hf_path with it, and a resumed run's copy (--workdir), and
  `rollouts.load_policy` a run workdir given as --init_from (eval, rollouts, export)."""
  if not os.path.isdir(source):
    return  # the params loader names a missing directory
  start = _start_tokenizer(source)
  if start is None:
    return
  where, theirs = start
  # The tiny families differ by a few renamed tokens, which the vocabulary comparison below only logs.
  ours_format = (tiny_chat_format(spec) if spec.startswith("tiny:") else
                 _tiny_tokenizer_format(spec) if os.path.isdir(spec) else None)  # a recipe's is a directory
  check_token_family(spec, ours_format, _tiny_tokenizer_format(where), f"{name}={source!r}", "To train on from it,")
  ours, their_vocab = tokenizer.get_vocab(), theirs.get_vocab()
  differ = sorted(t for t in set(ours) | set(their_vocab) if ours.get(t) != their_vocab.get(t))
  use_start = _use_start_hint(spec, name, where)
  if len(differ) > MAX_CHANGED_TOKENS:
    raise ValueError(f"data.tokenizer={spec!r} is not the tokenizer {name}={source!r} was trained with ({where}: "
                     f"{len(ours)} tokens here, {len(their_vocab)} there; ids differ for {len(differ)}, e.g. "
                     f"{differ[:3]}); {use_start}")
  # A rename gives an id another string; a string both hold under other ids moves what the params learned for it.
  moved = [t for t in differ if t in ours and t in their_vocab]
  if moved:
    raise ValueError(f"data.tokenizer={spec!r} gives {len(moved)} token(s) other ids than the tokenizer "
                     f"{name}={source!r} was trained with ({where}), e.g. "
                     f"{', '.join(f'{t!r}: {ours[t]} here, {their_vocab[t]} there' for t in moved[:3])}; {use_start}")
  changed_ids = {v.get(t) for v in (ours, their_vocab) for t in differ} - {None}
  encoding = _probe_difference(tokenizer, theirs, changed_ids)
  if encoding is not None:
    vocabulary = f"{len(differ)} token(s) renamed or added only" if differ else "the same vocabulary"
    raise ValueError(f"data.tokenizer={spec!r} encodes text into other ids than the tokenizer {name}={source!r} was "
                     f"trained with ({where}: {vocabulary}, but {encoding}: other merges, normalizer or "
                     f"pre-tokenizer); {use_start}")
  if differ or tokenizer.chat_template != theirs.chat_template:
    # A few renamed or added tokens and another chat template are how a recipe moves on (Phi-4-reasoning's think
    # tokens on phi-4's placeholders, with its own template): said, not refused.
    log.warning("data.tokenizer=%r differs from the tokenizer %s=%r was trained with (%s): %s%s", spec, name, source,
                where, f"{len(differ)} token(s) renamed or added (e.g. {differ[:3]})" if differ else "same tokens",
                "; another chat template" if tokenizer.chat_template != theirs.chat_template else "")


def check_token_family(spec: str, ours: Optional[str], trained: Optional[str], starting_point: str,
                       purpose: str) -> None:
  """Refuses a tiny data.tokenizer `spec` (of the tiny chat format `ours`: "tiny:<format>", or a directory holding a
  tiny tokenizer) of another token family than the tiny chat format `trained` that `starting_point` (e.g.
  "train.init_from='runs/sft'") was trained with. The families number their control tokens in the same slots, so
  comparing the two vocabularies finds a few renamed tokens only, while every control id would be read as another
  token. `ours` or `trained` None (no tokenizer) or "unknown" (no tiny one) is left to the vocabulary comparison of
  `check_tokenizer_matches_start`. `purpose` starts the advice ("To eval, roll out or export it,")."""
  from phi_jax.hf.tokenizer import CHAT_FORMAT_FAMILY  # pylint: disable=import-outside-toplevel
  if ours in (None, "unknown") or trained in (None, "unknown"):
    return
  family = CHAT_FORMAT_FAMILY[ours]
  if CHAT_FORMAT_FAMILY[trained] == family:
    return
  same = sorted(name for name, of in CHAT_FORMAT_FAMILY.items() if of == CHAT_FORMAT_FAMILY[trained])
  raise ValueError(f"data.tokenizer={spec!r} is of the {family!r} token family, but {starting_point} was trained "
                   f"with data.tokenizer='tiny:{trained}' ({CHAT_FORMAT_FAMILY[trained]!r} family): its params read "
                   f"other ids for the control tokens. {purpose} set "
                   f"--gin_param='data.tokenizer=\"tiny:{trained}\"' (or another format of its family: "
                   f"{', '.join(f'tiny:{name}' for name in same if name != trained)})")


def _use_start_hint(spec: str, name: str, where: str) -> str:
  """The way out of `check_tokenizer_matches_start`'s refusals: the tokenizer at `where`. A resume (`name`
  --workdir) is told first to put its files back at data.tokenizer's path: the eval set that keep_best_checkpoint
  and early stopping compare records that path, so binding the copy's path instead is refused there."""
  binding = f"set --gin_param='data.tokenizer=\"{where}\"'"
  if name != "--workdir":
    return f"{binding} so the params see the ids they learned"
  return (f"restore the files the run trained with at that path from its copy, `cp -r {shlex.quote(where)}/. "
          f"{shlex.quote(spec)}` (the files there now are overwritten), then resume as before; or {binding} (refused "
          "while train.keep_best_checkpoint or train.early_stopping_patience compare eval losses)")


# Text both tokenizers encode, beyond comparing vocabularies: English, digits, code, LaTeX, non-ASCII and runs of
# whitespace, where merges, normalizers and pre-tokenizers tell apart. No control token: a recipe renames those.
_TOKENIZER_PROBE = ("What is 12 + 35? The answer is 47, i.e. 4.7e1 (about 0.0470 x 10^3).\n"
                    "def f(n):\n    return [n ** 2 for n in range(10)]  # squares\n"
                    "$\\frac{a}{b} + \\sqrt{x^2 - 1} = \\boxed{\\pi}$, \\int_0^1 x\\,dx\n"
                    "Café, naïve façade; 数学 Ωμέγα — “quoted” 🙂\n"
                    "\t\ttabs,   spaces    and\n\n\nnewlines   ")


def _probe_difference(tokenizer, theirs, changed_ids: set) -> Optional[str]:
  """Where `tokenizer` encodes `_TOKENIZER_PROBE` into other ids than `theirs`; None where the ids agree, or where
  they differ on tokens of `changed_ids` (renamed or added: logged with the vocabulary). Encoded without special
  tokens, as the data path encodes text and chat turns (a BOS/EOS a post-processor adds reaches no training row)."""
  ids, their_ids = (t.encode(_TOKENIZER_PROBE, add_special_tokens=False) for t in (tokenizer, theirs))
  if ids == their_ids or changed_ids & (set(ids) | set(their_ids)):
    return None
  at = next((i for i, (a, b) in enumerate(zip(ids, their_ids)) if a != b), min(len(ids), len(their_ids)))

  def token(t, encoded):
    return f"{encoded[at]} {t.convert_ids_to_tokens(encoded[at])!r}" if at < len(encoded) else "the end"
  return (f"a probe text's ids first differ at position {at}: {token(tokenizer, ids)} here, "
          f"{token(theirs, their_ids)} there ({len(ids)} and {len(their_ids)} ids)")


def check_vocab(model_config: PhiConfig, tokenizer, start_name: Optional[str] = None, start: Optional[str] = None):
  """Refuses a tokenizer with ids past the embedding table. Params started from (`start`, given as `start_name`)
  fix the table's size: there the way out is their own tokenizer, not a larger vocab_size."""
  if len(tokenizer) <= model_config.vocab_size:
    return
  found = f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.vocab_size}"
  if start is None:
    raise ValueError(f"{found}; set model.overrides={{'vocab_size': {len(tokenizer)}}} or larger")
  if start_name == "train.init_from":  # the model's shapes are compared with the start's only later
    raise ValueError(f"{found}. Params started from (train.init_from={start!r}) fix the vocabulary at their own "
                     "size: give this run the model settings of that start (model.preset / model.overrides, or "
                     "model.hf_path) and set data.tokenizer to the tokenizer it was trained with, or one of at most "
                     "that many tokens (new tokens can take its unused ids)")
  raise ValueError(f"{found}, that of {start_name}={start!r}: resizing a checkpoint's vocabulary is not supported: "
                   f"set data.tokenizer to the tokenizer {start_name} was trained with, or one of at most "
                   f"{model_config.vocab_size} tokens (new tokens can take its unused ids)")


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
      yield from _read_eval(it, data_cfg["eval_batches"], eval_batches)
  loss_fn = next_token.make_loss_fn(model_config, chunk_size=settings["chunk_size"], z_loss=settings["z_loss"])
  return loss_fn, train_data, eval_batches


def run_config_text() -> str:
  """W/config.gin: the bindings given, which eval.py, rollouts.py, export_hf.py and a rerun replay, then the value
  of every setting the configurables read so far (defaults included) as comments. Those values are a record, not
  bindings: replayed, a setting a later version of the code renamed or removed would fail every old run's replay."""
  used = [line for line in gin.operative_config_str().splitlines() if not line.startswith("#")]
  rule = "# " + "=" * 78
  header = [rule, "# Values used: every setting the run read, defaults included (a record; not read back, replaying",
            "# this file reads the bindings above)", rule]
  lines = [gin.config_str().rstrip("\n"), ""] + header + [f"# {line}" if line else "#" for line in used]
  return "\n".join(lines) + "\n"


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
    return _dpo_setup(workdir, model_config, hf_path, data_cfg, settings, tokenizer, the_mesh, per_process)
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
    _tidy_run_tokenizer(os.path.join(workdir, "tokenizer"))
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
    fresh = not _has_checkpoints(workdir)
    # A run finished before (its checkpoints deleted) trains nothing and loads no params: its start may be gone.
    finished = fresh and _finished_without_checkpoints(workdir, settings["loop"].num_steps)
    if start and fresh and not finished:  # loaded (params_loader's checks, then collectives) only by a fresh run
      _check_reference_readable(settings, hf_path)
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


def export_hf(out: str, model_config: PhiConfig, params, tokenizer, system_prompt: Optional[str] = None) -> None:
  """The params as a transformers checkpoint with the tokenizer; generation stops at the chat format's turn end.

  A `system_prompt` the run was trained with (data.system_prompt) goes into the exported chat template as the
  default system message, so prompts rendered from the export (transformers, vLLM, eval.py on it) are the ones the
  model learned on."""
  from phi_jax.data.chat import stop_token_ids, with_default_system_prompt
  save_hf(out, model_config, params, stop_token_ids=stop_token_ids(tokenizer))
  if system_prompt is not None and tokenizer.chat_template:
    tokenizer = copy.copy(tokenizer)  # the run's own tokenizer keeps rendering as it did
    tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, system_prompt)
  save_tokenizer(tokenizer, out)


def run_meta(stage: str, settings: dict, data_cfg: dict, tokenizer) -> dict:
  """What a run records beside its checkpoints and compares on resume: a changed list of train files, or files they
  match that appeared, vanished or changed size, is refused (the saved data position belongs to the old sources), and
  so is another eval set when early stopping or keep_best compare eval losses, and a frozen reference (DPO, GRPO)
  whose values changed (a DPO train stream that reads other records than the checkpoints' is refused before, by
  `_refuse_another_pair_stream`); every other change (another tokenizer or system prompt, the loss or reward
  settings, the starting point `train.init_from`) is logged. The tokenizer itself is kept as W/tokenizer
  (`keep_run_tokenizer`)."""
  data_meta = {k: data_cfg[k] for k in _RESUME_DATA_FIELDS}
  data_meta["tokenizer_size"] = len(tokenizer)
  data_meta["train_file_sizes"] = file_sizes(data_cfg["train_files"])
  if "train_source" in settings:  # DPO: what its train stream reads of each pair file (`_reference_source`)
    data_meta["train_source"] = settings["train_source"]
  # What the eval loss is measured on: early stopping and keep_best compare it with the losses of earlier steps.
  eval_set = {k: data_cfg[k] for k in ("eval_files", "eval_batches", "seq_len", "batch_size", "tokenizer",
                                       "system_prompt")}
  eval_set["eval_file_sizes"] = file_sizes(data_cfg["eval_files"])
  return {"stage": stage, "data": data_meta, "eval_set": eval_set,
          "stage_settings": _stage_settings(stage, settings),
          "init_from": settings["init_from"],  # also the frozen reference of DPO and GRPO
          "reference_digest": settings.get("reference_digest")}  # that reference's values, where one is loaded


def file_sizes(patterns) -> list[list]:
  """[path, bytes] of every file the patterns match (a save_to_disk directory: its arrow files, of every split)."""
  out = []
  for pattern in patterns:
    paths = [pattern] if os.path.isdir(pattern) else sources_lib.expand_paths(pattern)
    for path in paths:
      files = sorted(glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True)) if os.path.isdir(path) else [path]
      out.extend([f, os.path.getsize(f)] for f in files)
  return out


def content_digests(patterns) -> list[list]:
  """[path, sha256 of its bytes] of every file the patterns match (as `file_sizes`): an edit that keeps the size
  (chosen and rejected swapped) changes it."""
  out = []
  for path, _ in file_sizes(patterns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
    out.append([path, digest.hexdigest()])
  return out


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
  data position indexes the records of the stream the run read (`_refuse_another_pair_stream`). Both reference
  passes run in `train.microbatches` pieces, like the step. `too_long`: "drop" or "truncate_prompt". `data.weights` and
  `data.packing` do not apply: pairs are read in one shuffled stream, one example per row.
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


def _dpo_reference_params(model_config: PhiConfig, hf_path: Optional[str], settings: dict, the_mesh):
  """The frozen reference: the params the policy starts from, loaded (or initialised) a second time.

  Its checksums go into the run metadata (`settings["reference_digest"]`): a resumed run loads the reference again,
  and refuses one that changed since the run started (say, its train.init_from run was trained on)."""
  load = params_loader(model_config, hf_path, settings["init_from"], the_mesh)
  if load is not None:
    # A load that fails on one host before any collective of its own (a file missing or unreadable there, a
    # checkpoint of another shape) stops every process here, rather than leave the others in the checksums'.
    with distributed.failing_together("loading the DPO reference params (train.init_from or model.hf_path)"):
      params = load()
  else:  # the loop's own initialisation key gives the same params
    rng = loop_lib.initial_params_key(settings["loop"].seed)
    params = jax.jit(lambda: init_params(model_config, rng), out_shardings=param_shardings(model_config, the_mesh))()
  from phi_jax.train.checkpoint import digest, state_checksums
  settings["reference_digest"] = digest(state_checksums(params))
  return params


def _has_a_record(path: str) -> bool:
  with open(path, "rb") as f:
    return any(line.strip() for line in f)


def _check_pair_files(train_files: Sequence[str], eval_files: Sequence[str]) -> None:
  """Refuses a pair file (or glob) that names no file, one this process cannot open, and a train file without a
  pair."""
  for pattern in [*train_files, *eval_files]:
    for path, _ in file_sizes([pattern]):  # a missing file or a glob matching none is a DataError naming it
      open(path, "rb").close()
  for path in train_files:
    if os.path.isfile(path) and not _has_a_record(path):
      raise ValueError(f"{path} holds no preference pairs. Written by experiments/rollouts.py, that means every "
                       "prompt's rollouts were all correct or all incorrect (its .summary.json has the counts): "
                       "train the policy longer, raise --k, or use prompts nearer the policy's ability")


def _check_reference_readable(settings: dict, hf_path: Optional[str]) -> None:
  """Refuses starting or reference params (train.init_from, else model.hf_path) that are not there or that this
  process cannot open, with the errors their loading gives."""
  source = settings["init_from"] or hf_path
  if not source:
    return
  name = "train.init_from" if settings["init_from"] else "model.hf_path"
  if settings["init_from"]:
    check_policy_dir(source, name)
  else:
    _check_is_dir(name, source)
  def unreadable(e: OSError):
    raise ValueError(f"{name}={source!r}: this process cannot read {e.filename} ({e.strerror or e}): make the "
                     "params readable on every host") from e

  params = os.path.join(source, "params")
  if os.path.isdir(params):  # a run's params/ are read from all its folders (one not listed fails Orbax's restore)
    files = [os.path.join(folder, n) for folder, _, names in os.walk(params, onerror=unreadable) for n in names]
  else:
    from phi_jax.hf.checkpoint import weight_files  # pylint: disable=import-outside-toplevel
    weight_files(pathlib.Path(source))  # load_hf's own error where it would find no weights (.bin ones, an adapter)
    files = _hf_files_loaded(source)
    missing = [file for file in files if not os.path.isfile(file)]
    if missing:  # copied to some hosts but not all, or half-copied
      raise ValueError(f"{name}={source!r}: this process finds no {', '.join(map(os.path.basename, missing[:3]))} "
                       "there: copy the whole checkpoint directory to every host")
  for file in files:
    try:
      if os.path.isfile(file):
        open(file, "rb").close()
    except OSError as e:
      unreadable(e)


def _hf_files_loaded(source: str) -> list[str]:
  """The files of a transformers checkpoint that `load_hf` reads: config.json and the weights (model.safetensors
  where it is there, as `load_hf` prefers it, else the shards an index names). Others beside them (a trainer's
  training_args.bin, a stale index) are never opened."""
  from phi_jax.hf.checkpoint import INDEX_FILE, SINGLE_FILE
  files = [os.path.join(source, "config.json")]
  index = os.path.join(source, INDEX_FILE)
  if os.path.isfile(os.path.join(source, SINGLE_FILE)) or not os.path.isfile(index):
    return files + [os.path.join(source, SINGLE_FILE)]
  try:
    with open(index, "rb") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError):  # opened again below, or named by the load
    shards = []
  return files + [index] + [os.path.join(source, shard) for shard in shards]


def _agreed_copies(pair_files: dict, start: Optional[str]) -> tuple[dict, list]:
  """({key: content digests of the pair file `pair_files[key]`}, `_params_fingerprint(start)`), process 0's on
  every process; a copy of a pair file whose contents differ from process 0's is refused on every process.

  Each host reads its own copy for the precompute pass: its devices' rows would be scored from it, and process 0
  would write them against its own pairs. Copies of the params on hosts with disks of their own have mtimes of
  their own: with process 0's fingerprint every process decides alike whether a reference file is current, and so
  whether to load the reference (collectives) and which files to compute again."""
  with distributed.failing_together("reading the DPO pair files and the reference params' files"):
    digests = [content_digests([path]) for path in pair_files.values()]
    fingerprint = _params_fingerprint(start) if jax.process_index() == 0 else None
  gathered = distributed.allgather_json([digests, fingerprint])
  first, mine = gathered[0][0], gathered[jax.process_index()][0]
  # The contents decide: another host may name the same file another way (a glob, a mount point).
  differ = [key for key, a, b in zip(pair_files, mine, first) if [d for _, d in a] != [d for _, d in b]]
  with distributed.failing_together("comparing each host's copy of the DPO pair files"):
    if differ:
      kind, i = differ[0]
      raise ValueError(f"data.{kind}_files[{i}]={pair_files[differ[0]]!r} holds other pairs on this process than on "
                       "process 0: each process scores its share of the reference pass (dpo.reference='precompute') "
                       "from its own copy, and process 0 writes the scores against its pairs; copy the same file to "
                       "every host")
  return dict(zip(pair_files, first)), gathered[0][1]


def pairs_summary_path(pairs_file: str) -> str:
  """Where experiments/rollouts.py writes the summary of the pair file `pairs_file` (<stem>.summary.json)."""
  return (pairs_file[:-len(".jsonl")] if pairs_file.endswith(".jsonl") else pairs_file) + ".summary.json"


def _rollout_summary(pairs_file: str) -> dict:
  """The summary experiments/rollouts.py wrote beside `pairs_file`; {} where there is none (or it is unreadable)."""
  try:
    with open(pairs_summary_path(pairs_file)) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return {}
  return summary if isinstance(summary, dict) else {}


def _first_record(path: str) -> Any:
  """The first record of the pair file (or save_to_disk directory) `path`, None where it cannot be read (the pair
  reader names why)."""
  try:
    source = sources_lib.open_source(path)
    raw = source[0] if len(source) else {"error": True}
  except (OSError, ValueError):
    return None
  return raw["data"] if raw["error"] is None else None


def _check_pairs_sampled_as(train_files: Sequence[str], eval_files: Sequence[str], system_prompt: Optional[str],
                            start: Optional[str], start_name: str) -> None:
  """Refuses pair files sampled (experiments/rollouts.py) under another data.system_prompt than this run renders
  their prompts with: every row would lack, or gain, the system turn its completions were sampled after. Read from a
  file's first record ("sampled_system_prompt"; the reader checks every record), else from its summary (pair files
  written before records held it). Rollouts of another policy than `start` (off-policy DPO) are logged."""
  for pattern in [*train_files, *eval_files]:
    # A save_to_disk directory is one source (its .arrow files are no pair files of their own).
    for path in [pattern] if os.path.isdir(pattern) else sources_lib.expand_paths(pattern):
      summary, first = _rollout_summary(path), _first_record(path)
      if isinstance(first, dict) and "sampled_system_prompt" in first:
        sampled, told = first["sampled_system_prompt"], ""
      elif "system_prompt" in summary:
        sampled, told = summary["system_prompt"], f" ({os.path.basename(pairs_summary_path(path))})"
      else:
        continue  # pairs from elsewhere (hand-made, TRL's): nothing says how they were sampled
      if sampled != system_prompt:
        raise ValueError(f"{path}: its pairs were sampled with data.system_prompt={sampled!r}{told}, this run renders "
                         f"them with data.system_prompt={system_prompt!r}: every completion would be trained after "
                         "another prompt than it answered; set --gin_param='data.system_prompt="
                         f"{'None' if sampled is None else json.dumps(sampled)}'")
      sampled_from = summary.get("init_from")
      if sampled_from and start and os.path.realpath(sampled_from) != os.path.realpath(start):
        log.warning("%s was sampled from %s, not %s=%r: the DPO is off-policy (intended where the pairs come from "
                    "another policy)", path, sampled_from, start_name, start)


def _dpo_setup(workdir: str, model_config: PhiConfig, hf_path: Optional[str], data_cfg: dict, settings: dict,
               tokenizer, the_mesh, per_process: int):
  """(loss_fn, train_data, eval_batches) of the DPO stage."""
  from phi_jax.data import preference
  from phi_jax.stages import dpo

  cfg = dpo_settings()
  loss_fn = dpo.make_loss_fn(model_config, beta=cfg["beta"], label_smoothing=cfg["label_smoothing"],
                             loss_type=cfg["loss_type"], chunk_size=settings["chunk_size"])
  reader = dict(seq_len=data_cfg["seq_len"], batch_size=per_process, too_long=cfg["too_long"],
                on_bad_record=data_cfg["on_bad_record"], system_prompt=data_cfg["system_prompt"])
  train_files, eval_files = list(data_cfg["train_files"]), list(data_cfg["eval_files"])
  # A resumed run trains from its checkpoints: precompute mode needs train.init_from, since moved away, only to
  # compute a reference file again (which loads it, and names the missing path).
  start_gone = (cfg["reference"] == "precompute" and settings["init_from"]
                and _holds_no_params(settings["init_from"]) and _has_checkpoints(workdir))
  # Each host reads these on its own: a file missing or unreadable on one fails there before the set-up's first
  # collective (the reference load's, its checksums', the precompute pass's), and every process stops with it.
  with distributed.failing_together("checking the DPO pair files and reference params"):
    _check_pair_files(train_files, eval_files)
    _check_pairs_sampled_as(train_files, eval_files, data_cfg["system_prompt"], settings["init_from"] or hf_path,
                            "train.init_from" if settings["init_from"] else "model.hf_path")
    if cfg["reference"] != "precomputed" and not start_gone:  # "precomputed" loads no reference
      _check_reference_readable(settings, hf_path)
    if cfg["reference"] == "precompute":
      os.makedirs(os.path.join(workdir, "reference"), exist_ok=True)
  ref_params = ref_fn = None
  # Precomputed reference files hold only the pairs that were used; those left out (too long, bad) are counted in
  # the data stats as read and skipped, per (kind, file) and then per kind.
  left_out, skipped = {}, {"train": {}, "eval": {}}
  # What the train stream reads of each pair file (the checkpoints' data position indexes it), and the reference
  # train files this set-up computes.
  source, computed = [_PAIR_FILE] * len(train_files), []
  if cfg["reference"] == "in_step":
    ref_params = _dpo_reference_params(model_config, hf_path, settings, the_mesh)
    ref_fn = dpo.reference_logps_fn(model_config, settings["chunk_size"], mesh=the_mesh,
                                    microbatches=settings["loop"].microbatches)
  elif cfg["reference"] == "precompute":
    outputs = {}
    for kind, files in (("train", train_files), ("eval", eval_files)):
      for i, path in enumerate(files):
        outputs[(kind, i)] = reference_file(workdir, f"{kind}{i}", path)
    # What the reference log-probs depend on, kept beside each file: a file computed under other settings (another
    # system prompt, starting point, tokenizer, length rule, or a changed pair file) is computed again.
    start = settings["init_from"] or hf_path
    pair_digests, fingerprint = _agreed_copies(
        {key: (train_files if key[0] == "train" else eval_files)[key[1]] for key in outputs}, start)
    made_with = {key: dict(pairs_file=pair_digests[key],
                           reference_params=start or f"random init, seed {settings['loop'].seed}",
                           reference_files=fingerprint, tokenizer=data_cfg["tokenizer"],
                           tokenizer_size=len(tokenizer), tokenizer_id=preference.tokenizer_id(tokenizer),
                           system_prompt=data_cfg["system_prompt"],
                           seq_len=data_cfg["seq_len"], too_long=cfg["too_long"],
                           on_bad_record=data_cfg["on_bad_record"],
                           model_config=_reference_model_config(dataclasses.asdict(model_config)))
                 for key in outputs}
    if settings["init_from"] and not fingerprint and _has_checkpoints(workdir):  # none there on process 0
      _take_recorded_params(made_with, outputs, settings["init_from"])
    loaded = []  # the frozen reference, loaded once, and only where a file is computed or its params compared

    def frozen():
      if not loaded:
        loaded.append(_dpo_reference_params(model_config, hf_path, settings, the_mesh))
      return loaded[0]

    def digest_now():
      frozen()
      return settings["reference_digest"]

    changes = {key: _reference_is_current(out, made_with[key], digest_now) for key, out in outputs.items()}
    missing = [key for key, changed in changes.items() if changed != {}]
    stale = {outputs[key]: changes[key] for key in missing if key[0] == "train"}
    stale.update(_removed_since_checkpoints(workdir, outputs, changes, made_with))
    _refuse_rewriting_trained_pairs(workdir, stale)
    computed = [outputs[key] for key in missing if key[0] == "train"]
    if missing:
      for kind, i in missing:
        path = (train_files if kind == "train" else eval_files)[i]
        result = dpo.precompute_reference_logps(
            path, frozen(), model_config, tokenizer, out_file=outputs[(kind, i)], chunk_size=settings["chunk_size"],
            mesh=the_mesh, microbatches=settings["loop"].microbatches,
            **dict(reader, batch_size=data_cfg["batch_size"]))
        log.info("reference log-probs of %d pairs of %s -> %s", result["pairs"], path, result["out_file"])
        left_out[(kind, i)] = result["stats"]["records_skipped"]
        # Process 0 writes alone: the others must not go on to the next file's pass without it.
        with distributed.failing_together(f"writing the settings beside {outputs[(kind, i)]}"):
          if jax.process_index() == 0:
            write_text_atomically(outputs[(kind, i)] + ".skipped.json",
                                  json.dumps({"records_skipped": left_out[(kind, i)]}))
            with open(outputs[(kind, i)] + ".settings.json", "w") as f:
              json.dump(dict(made_with[(kind, i)], reference_digest=settings["reference_digest"]), f, default=str)
    loaded.clear()  # the run trains with no reference model
    for key in outputs.keys() - left_out.keys():  # reused: counted when it was written
      left_out[key] = _pairs_left_out(outputs[key])
    for (kind, _), counts in left_out.items():
      for reason, number in counts.items():
        skipped[kind][reason] = skipped[kind].get(reason, 0) + number
    source = [_reference_source(outputs[("train", i)], left_out[("train", i)], made_with[("train", i)],
                                computed_now=("train", i) in missing) for i in range(len(train_files))]
    train_files = [outputs[("train", i)] for i in range(len(train_files))]
    eval_files = [outputs[("eval", i)] for i in range(len(eval_files))]
  settings["train_source"] = source  # kept in the run metadata (`run_meta`)
  with distributed.failing_together("comparing the DPO train pairs with the checkpoints' data position"):
    _refuse_another_pair_stream(workdir, source, computed)

  def pairs(files, **kwargs):
    it = preference.build_preference_iterator(files, tokenizer, reference_logps=ref_fn is None, **reader, **kwargs)
    return it if ref_fn is None else dpo.with_reference_logps(it, ref_params, ref_fn, mesh=the_mesh)

  train_data = pairs(train_files, seed=settings["loop"].seed, num_epochs=data_cfg["num_epochs"],
                     skipped_when_written=skipped["train"])
  eval_batches = None
  if eval_files:
    def eval_batches(data_only=False):  # data_only: the pairs without their in-step reference log-probs
      once = dict(seed=0, shuffle=False, num_epochs=1, warn=False, skipped_when_written=skipped["eval"])
      it = (preference.build_preference_iterator(eval_files, tokenizer, reference_logps=ref_fn is None, **reader,
                                                 **once) if data_only else pairs(eval_files, **once))
      yield from _read_eval(it, data_cfg["eval_batches"], eval_batches)
  return loss_fn, train_data, eval_batches


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


def _read_eval(it, max_batches: int, holder):
  """The first `max_batches` batches of `it`; once they are all read, `holder.stats` is `it.stats()` (what was read,
  used and skipped), which the run reports once at its start."""
  for _, batch in zip(range(max_batches), it):
    yield batch
  holder.stats = it.stats()


_NOT_RECORDED = "(not recorded)"
# Model settings that change memory and speed, but neither which pairs a reference file holds nor their log-probs
# beyond float rounding: a resumed run may change them.
_RUN_TIME_MODEL_FIELDS = ("attention_backend", "max_segments_per_row", "remat_policy")
# What a reference file's settings hold that changes its log-probs but not its list of pairs.
_VALUE_ONLY_SETTINGS = ("model_config", "reference_files", "reference_params")


def _reference_model_config(config):
  """The model settings a precomputed reference file is compared by: `config` (a dict, as recorded) without
  `_RUN_TIME_MODEL_FIELDS`, which files written by an earlier phi_jax recorded too."""
  if not isinstance(config, dict):
    return config
  return {k: v for k, v in config.items() if k not in _RUN_TIME_MODEL_FIELDS}


def _reference_is_current(out_file: str, made_with: dict, digest_now) -> Optional[dict]:
  """{} when precompute mode's `out_file` was computed under `made_with`; else {setting: (then, now)} (then:
  `_NOT_RECORDED` where the file's settings lack it), or None where there is no file yet. Logs what changed.

  The reference params are compared by the files holding them (`_params_fingerprint`) and, only once those changed
  (saved again, copied), by the digest of their values: `digest_now()` loads them to return it."""
  if not os.path.exists(out_file):
    return None
  saved = _recorded_settings(out_file)
  if "model_config" in saved:
    saved["model_config"] = _reference_model_config(saved["model_config"])
  current = json.loads(json.dumps(made_with, default=str))
  changed = {k: (saved.get(k, _NOT_RECORDED), current.get(k)) for k in sorted(set(saved) | set(current))
             if k != "reference_digest" and saved.get(k, _NOT_RECORDED) != current.get(k)}
  from phi_jax.data import preference  # pylint: disable=import-outside-toplevel
  if preference.holds_old_rows(out_file):  # pairs scored on rows (`preference._old_rows`) they no longer train
    changed["rows"] = ("older", preference.ROWS_VERSION)
  # Where only names changed (the params saved again, copied or moved, a path spelled another way, the tokenizer's
  # path), the contents decide: the params' digest, and `tokenizer_id` (compared as a setting of its own).
  if changed and set(changed) <= {"reference_files", "reference_params", "tokenizer"} and (
      not {"reference_files", "reference_params"} & set(changed) or saved.get("reference_digest") == digest_now()):
    return {}
  if changed:
    log.warning("the reference log-probs in %s were computed under other settings (%s changed, or not recorded): "
                "computing them again", out_file,
                ", ".join(dict.fromkeys(k.replace("reference_files", "reference_params") for k in changed)))
  return changed


def _recorded_settings(out_file: str) -> dict:
  """The settings precompute mode wrote beside `out_file`; {} where there are none, or they cannot be read."""
  try:
    with open(out_file + ".settings.json") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return {}
  return saved if isinstance(saved, dict) else {}


def _take_recorded_params(made_with: dict, outputs: dict, init_from: str) -> None:
  """Takes the reference params each written file of `outputs` records as the current ones, where a resumed run's
  train.init_from holds none (moved away): they cannot be compared, and the run trains from its checkpoints. Every
  other setting is still compared; a file missing, or computed again, loads them (and names the missing path)."""
  for key, out in outputs.items():
    recorded = _recorded_settings(out)
    if os.path.exists(out) and "reference_files" in recorded:
      made_with[key]["reference_files"] = recorded["reference_files"]
      log.warning("train.init_from=%r holds no params now (moved or deleted?): the reference log-probs in %s, "
                  "computed from it, are used as they are, not compared with its params again", init_from, out)


def _holds_no_params(path: str) -> bool:
  """Whether `path` holds neither a run's params/ nor a transformers checkpoint: moved away, or a run whose params/
  were deleted."""
  return not os.path.isdir(os.path.join(path, "params")) and not os.path.isfile(os.path.join(path, "config.json"))


def _params_fingerprint(source: Optional[str]) -> list[list]:
  """[relative path, bytes, mtime in ns] of the files holding the params at `source` (a run's params/, or an HF
  directory; [] for a random init): params saved again in place change it, and reading it loads nothing."""
  if not source or _holds_no_params(source):
    return []
  root = os.path.join(source, "params") if os.path.isdir(os.path.join(source, "params")) else source
  out = []
  for folder, _, names in sorted(os.walk(root)):
    for name in sorted(names):
      stat = os.stat(os.path.join(folder, name))
      out.append([os.path.relpath(os.path.join(folder, name), root), stat.st_size, stat.st_mtime_ns])
  return out


def _pairs_left_out(reference_path: str) -> dict[str, int]:
  """The counts per reason of the pairs a precomputed reference file left out, which it records beside it; {} for a
  file written before they were recorded, which is used as it is (computing it again could change its list of pairs,
  which a saved data position indexes), its left-out pairs uncounted."""
  if not os.path.exists(reference_path + ".skipped.json"):
    log.info("%s does not record the pairs it left out (written by an earlier phi_jax): data_stats.json will not "
             "count them", reference_path)
    return {}
  with open(reference_path + ".skipped.json") as f:
    return json.load(f)["records_skipped"]


def _refuse_rewriting_trained_pairs(workdir: str, stale: dict[str, Optional[dict]]) -> None:
  """Refuses to compute a reference train file again under other settings once the workdir has checkpoints: their
  saved data position indexes the file's list of usable pairs, which other settings change (some pairs would be
  trained twice, others never), or whose values the model settings and reference params change (the reference the
  checkpoints were trained against would change partway through the run). Settings the file never recorded do not
  count, nor does a file removed, unless the checkpoints' run metadata records other settings that chose its pairs
  (`_removed_since_checkpoints`)."""
  recorded = {path: {k: v for k, v in (changes or {}).items() if v[0] != _NOT_RECORDED}
              for path, changes in stale.items()}
  recorded = {path: changes for path, changes in recorded.items() if changes}
  if not recorded or not _has_checkpoints(workdir):
    return

  def describe(key, then, now):
    if key == "reference_files":
      return "reference params (their values at the same path)"
    if key == "rows":  # no setting of the run's: this version renders continuation pairs' rows differently
      return "rows of its continuation pairs, which no longer end with an end-of-turn token (a new workdir only)"
    if isinstance(then, dict) and isinstance(now, dict):  # model_config: the fields that differ
      return ", ".join(f"{key}.{k}: {then.get(k, _NOT_RECORDED)!r} -> {now.get(k, _NOT_RECORDED)!r}"
                       for k in sorted(set(then) | set(now)) if then.get(k, _NOT_RECORDED) != now.get(k, _NOT_RECORDED))
    return key if isinstance(then, (list, dict)) or isinstance(now, (list, dict)) else f"{key}: {then!r} -> {now!r}"

  details = "; ".join(f"{path} ({', '.join(describe(k, *v) for k, v in changes.items())})"
                      for path, changes in recorded.items())
  if all(key in _VALUE_ONLY_SETTINGS for changes in recorded.values() for key in changes):
    consequence = ("which change their values, not the list of pairs: computing them again would change the "
                   "reference log-probs this workdir's checkpoints were trained against partway through the run")
  else:
    consequence = ("and the saved data position of this workdir's checkpoints points into that file's list of "
                   "pairs: computing it again would change the list, so some pairs would be trained twice and "
                   "others never")
  raise ValueError(f"the reference log-probs in {details} were computed under other settings, {consequence}. "
                   "Restore the settings this run started with, or start a new workdir (train.init_from can start "
                   "it from this run's params/ once it has finished)")


# A DPO train stream that reads every record of a pair file, in file order (in_step and precomputed modes, and
# precompute mode where the reference file left no pair out): the same records, so the same shuffled order.
_PAIR_FILE = "every record of the pair file"
# What a reference file's settings hold that decides which pairs it holds.
_PAIR_LIST_SETTINGS = ("pairs_file", "tokenizer_id", "tokenizer_size", "system_prompt", "seq_len", "too_long",
                       "on_bad_record")


def _chosen_under(made_with: dict) -> dict:
  """The settings of `made_with` that decide a reference file's list of pairs, as JSON holds them; the pair file by
  its contents (its name is data.train_files')."""
  chosen = {k: made_with[k] for k in _PAIR_LIST_SETTINGS}
  chosen["pairs_file"] = [sha for _, sha in chosen["pairs_file"]]
  return json.loads(json.dumps(chosen, default=str))


def _reference_source(out_file: str, left_out: dict, made_with: dict, computed_now: bool):
  """What precompute mode's train stream reads of one pair file: `_PAIR_FILE` where its reference file `out_file`
  left no pair out; else the file, the pairs it left out (`_NOT_RECORDED` for a file written before they were
  counted) and the settings that chose them."""
  recorded = computed_now or os.path.exists(out_file + ".skipped.json")
  if recorded and not sum(left_out.values()):
    return _PAIR_FILE
  return {"reference_file": os.path.basename(out_file), "pairs_left_out": left_out if recorded else _NOT_RECORDED,
          "chosen_under": _chosen_under(made_with)}


def _saved_train_source(workdir: str) -> tuple[Optional[list], Optional[str]]:
  """(`_reference_source`s of the train stream the newest checkpoint's run read, its dpo.reference) as its run
  metadata records them; (None, None) where it records none (no checkpoint, a checkpoint written before they were
  recorded, or one the loop will set aside as damaged)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if os.path.isdir(checkpoints) else []
  if not steps:
    return None, None
  try:
    with open(os.path.join(checkpoints, str(max(steps)), "meta", "metadata")) as f:  # the step's "meta" item
      meta = json.load(f)
    return meta["data"]["train_source"], meta["stage_settings"]["reference"]
  except (OSError, ValueError, KeyError, TypeError):
    return None, None


def _removed_since_checkpoints(workdir: str, outputs: dict, changes: dict, made_with: dict) -> dict[str, dict]:
  """{reference train file: {setting: (then, now)}} of the files removed since the checkpoints were saved whose
  run metadata records them chosen under other settings than now: computed again, they would hold another list of
  pairs than the one the saved data position indexes."""
  saved, _ = _saved_train_source(workdir)
  out = {}
  for (kind, i), path in outputs.items():
    if kind != "train" or changes[(kind, i)] is not None or not saved or i >= len(saved):
      continue  # a file still there is compared by its own settings
    then = saved[i].get("chosen_under", {}) if isinstance(saved[i], dict) else {}
    now = _chosen_under(made_with[(kind, i)])
    differ = {k: (then[k], now[k]) for k in now if k in then and then[k] != now[k]}
    if differ:
      out[path] = differ
  return out


def _describe_source(source) -> str:
  if source == _PAIR_FILE:
    return source
  left_out = source.get("pairs_left_out")
  counts = ", ".join(f"{reason}: {n}" for reason, n in left_out.items()) if isinstance(left_out, dict) else left_out
  return f"the pairs of W/reference/{source.get('reference_file')}, which left out some ({counts})"


def _refuse_another_pair_stream(workdir: str, source: list, computed: Sequence[str]) -> None:
  """Refuses a DPO resume whose train stream reads other records than the stream the checkpoints' data position
  indexes (`dpo.reference` switched between modes where precompute mode left pairs out; a reference file removed
  and computed again with another list): its shuffle runs over another number of records, so some pairs would be
  trained twice and others never. The reference train files `computed` for it are removed first: left, a resume
  with the settings the run started with would refuse them as computed under other settings. Checkpoints written
  before the stream was recorded are not compared."""
  from phi_jax.train.checkpoint import IncompatibleCheckpointError  # pylint: disable=import-outside-toplevel
  saved, mode = _saved_train_source(workdir)
  current = json.loads(json.dumps(source, default=str))
  if saved is None or len(saved) != len(current) or saved == current:
    return  # another list of train files is the loop's to refuse, naming them
  details = "; ".join(f"data.train_files[{i}]: {_describe_source(a)} then, {_describe_source(b)} now"
                      for i, (a, b) in enumerate(zip(saved, current)) if a != b)
  if jax.process_index() == 0:
    for path in computed:
      for name in (path, path + ".settings.json", path + ".skipped.json"):
        if os.path.exists(name):
          os.remove(name)
  raise IncompatibleCheckpointError(
      f"cannot resume from the checkpoints in {os.path.join(workdir, 'checkpoints')}: they were trained with "
      f"dpo.reference={mode!r}, and their data position indexes the records that stream read, but this run's "
      f"stream reads others ({details}), so some pairs would be trained twice and others never. Resume with "
      f"dpo.reference={mode!r} and the data settings the run started with, or start a new workdir (train.init_from "
      "can start it from this run's params/ once it has finished)")


def reference_file(workdir: str, tag: str, pairs_path: str) -> str:
  """Where precompute mode writes a pair file with its reference log-probs: always JSONL, whatever the input's
  format (JSONL, Parquet, a save_to_disk directory), and named so, since readers go by the extension."""
  name = os.path.basename(os.path.normpath(pairs_path))
  return os.path.join(workdir, "reference", f"{tag}-{name if name.endswith('.jsonl') else name + '.jsonl'}")


def _finished_without_checkpoints(workdir: str, num_steps: int) -> bool:
  """Whether `workdir` is a finished run whose checkpoints were deleted (params/ kept) that reached `num_steps`, or
  was run with at least that train.num_steps (its config.gin) and stopped early: nothing to train (a re-run sweep
  leaves it as it is). Asked for more steps than that, it raises: training would
  start again from step 0 over its params/ (a workdir whose checkpoints were all set aside as damage is left to the
  loop, which says so)."""
  params, checkpoints = os.path.join(workdir, "params"), os.path.join(workdir, "checkpoints")
  entries = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
  if not os.path.isdir(params) or any(d.isdigit() for d in entries) or CORRUPT_DIR in entries:
    return False
  last_step = 0
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      for line in f:
        try:
          last_step = max(last_step, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):  # a line cut short by a kill
          continue
  # A run that stopped early (early stopping, data.num_epochs ran out) ends below its train.num_steps: asked for no
  # more steps than it was configured with, it would stop where it did again.
  configured = _recorded_num_steps(workdir)
  if last_step >= num_steps or (configured is not None and num_steps <= configured):
    log.info("%s is finished (step %d; it was run with train.num_steps=%s; its checkpoints were deleted): nothing to "
             "train", workdir, last_step, configured if configured is not None else num_steps)
    return True
  raise ValueError(f"{workdir} holds a finished run's params/ (step {last_step}) but no checkpoint to resume from "
                   f"(were checkpoints/ deleted?): training on to step {num_steps} would start again from step 0 and "
                   f"replace them. To train these params further, use a new workdir with train.init_from={workdir!r}; "
                   f"to retrain from scratch here, delete {params} first")


def _recorded_num_steps(workdir: str) -> Optional[int]:
  """The train.num_steps a finished run's config.gin records; None where it records none."""
  statements = _run_config_statements(workdir) or []
  value = next((s.value for s in statements if binding_key(s) == "train.num_steps" and not s.scope), None)
  steps = _as_annotated(value, int) if value is not None else _REFUSED
  return None if steps is _REFUSED else steps


def remove_final_outputs(workdir: str, export_hf: bool) -> None:
  """Before a finished run trains on (a raised num_steps): removes W/params/, and W/hf/ when train.export_hf writes
  it again. Left in place, an interruption would leave the old params looking like this run's result to
  export_hf.py, eval.py, rollouts.py and a next stage's train.init_from. The newest checkpoint holds the same
  params; the run writes params/ again when it ends. An hf/ the run will not write (exported separately) is kept,
  with a warning that it goes stale."""
  params, hf = os.path.join(workdir, "params"), os.path.join(workdir, "hf")
  if os.path.exists(params):
    log.warning("removing %s: the finished run's params, superseded as this run trains on (it writes them again "
                "when it ends; the checkpoints keep them)", params)
    shutil.rmtree(params)
  if os.path.isfile(os.path.join(workdir, MODEL_CONFIG_FILE)):
    os.remove(os.path.join(workdir, MODEL_CONFIG_FILE))
  if os.path.exists(hf) and export_hf:
    log.warning("removing %s: the finished run's export, written again when this run ends (train.export_hf)", hf)
    shutil.rmtree(hf)
  elif os.path.exists(hf):
    log.warning("%s holds the export of the params before this run trains on; with train.export_hf off it is not "
                "written again: export the new params with experiments/export_hf.py once the run ends", hf)


def save_final_params(workdir: str, params, model_config: Optional[PhiConfig] = None):
  """W/params/, and the model they were trained as in W/model_config.json (`as_trained`)."""
  import orbax.checkpoint as ocp
  path, recorded = os.path.join(workdir, "params"), os.path.join(workdir, MODEL_CONFIG_FILE)
  if jax.process_index() == 0:
    for old in (path, recorded):
      if os.path.isdir(old):
        shutil.rmtree(old)
      elif os.path.exists(old):
        os.remove(old)
  distributed.barrier("final_params_removed")  # every process: none starts writing into a directory being removed
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)
  if model_config is not None and jax.process_index() == 0:
    write_text_atomically(recorded, json.dumps(dataclasses.asdict(model_config), indent=1) + "\n")


MODEL_CONFIG_FILE = "model_config.json"


def recorded_model_config(workdir: str) -> Optional[PhiConfig]:
  """The model a run's params/ were trained as (W/model_config.json), None for a run from before it was recorded."""
  try:
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), encoding="utf-8") as f:
      fields = json.load(f)
  except FileNotFoundError:
    return None
  known = {f.name for f in dataclasses.fields(PhiConfig)}
  return PhiConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})


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
  deliberate = set(bound_or_none("model.overrides") or {}) | {*_RUN_TIME_MODEL_FIELDS, "dtype", "param_dtype"}
  ours, theirs = dataclasses.asdict(config), dataclasses.asdict(trained)
  differ = {k: v for k, v in theirs.items() if k not in deliberate and _as_plain(v) != _as_plain(ours[k])}
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
    if not _is_number(weight):
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
  settable = {f.name: getattr(target, f.name) for f in fields if _is_number(getattr(target, f.name))}
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
    if not _is_number(value) or not math.isfinite(value) or (whole and value != int(value)):
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


# The data settings a DPO run reads (`_dpo_setup`): no mixture weights, no packing, its own length rule.
DPO_DATA_FIELDS = ("train_files", "eval_files", "tokenizer", "system_prompt", "seq_len", "batch_size",
                   "on_bad_record", "num_epochs", "eval_batches")


def _warn_ignored_data(data_cfg: dict, read: Sequence[str], message: str) -> None:
  """Warns of data settings changed from their defaults that the stage does not read (`message` formats their
  list). A warning, not an error: a stage's config often includes another stage's file (grpo_tiny.gin does)."""
  defaults = {name: p.default for name, p in inspect.signature(data).parameters.items()}
  ignored = sorted(name for name, value in data_cfg.items()
                   if name in defaults and name not in read and _as_plain(value) != _as_plain(defaults[name]))
  if ignored:
    log.warning(message.format(", ".join(f"data.{name}={data_cfg[name]!r}" for name in ignored)))


def _as_plain(value):
  return list(value) if isinstance(value, (list, tuple)) else value


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
  ref_params = _dpo_reference_params(model_config, hf_path, settings, the_mesh) if cfg.beta else None
  source = grpo_stage.GRPORollouts(
      _read_prompts(data_cfg["train_files"]), tokenizer, model_config, cfg, reward_batch_fn=reward_fn,
      num_steps=loop.num_steps, seed=loop.seed, mesh=the_mesh, ref_params=ref_params,
      system_prompt=data_cfg["system_prompt"], score_microbatches=loop.microbatches)
  return grpo_stage.make_loss_fn(model_config, cfg), source, None
