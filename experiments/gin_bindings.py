"""Reading gin bindings: the type check of each configurable's arguments (`typed`), parsing config files and
--gin_param flags (`parse_gin`, with the checks that name a misspelt binding), and reading bindings back, from the
parsed config or from a run's own config.gin, without binding anything.

`common` declares the configurables; together the two are the only modules that know gin.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import logging
import numbers
import os
import re
import shlex
import types
import typing
from typing import Optional, Sequence

import gin
from gin import config_parser
import jax
import numpy as np

from phi_jax import sharding

log = logging.getLogger("phi_jax")


_REFUSED = object()


def is_number(value) -> bool:
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
    whole = is_number(value) and (isinstance(value, numbers.Integral) or float(value).is_integer())
    return int(value) if whole else _REFUSED
  if hint is float:
    return value if is_number(value) else _REFUSED
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


def _run_config_statements(workdir: str) -> Optional[list]:
  """The parsed statements of a run's config.gin, read without binding anything; None where it has none (or it does
  not parse)."""
  try:
    with open(os.path.join(workdir, "config.gin"), encoding="utf-8") as f:
      return gin_statements(f.read())
  except (OSError, SyntaxError):
    return None


def run_model_settings(workdir: str) -> Optional[dict]:
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


def run_model_settings_named(settings: Optional[dict]) -> str:
  """The settings that gave a run's model, as its config.gin binds them (`settings`): its checkpoint where it had
  one, else its preset and overrides."""
  if not settings or not settings.get("hf_path"):
    return "model.preset / model.overrides"
  named = f"model.hf_path={settings['hf_path']!r}"
  return named + (f" with model.overrides={settings['overrides']!r}" if settings.get("overrides") else "")


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


def recorded_num_steps(workdir: str) -> Optional[int]:
  """The train.num_steps a finished run's config.gin records; None where it records none."""
  statements = _run_config_statements(workdir) or []
  value = next((s.value for s in statements if binding_key(s) == "train.num_steps" and not s.scope), None)
  steps = _as_annotated(value, int) if value is not None else _REFUSED
  return None if steps is _REFUSED else steps


def as_plain(value):
  return list(value) if isinstance(value, (list, tuple)) else value
