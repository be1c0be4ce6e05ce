"""The tokenizer a run trains with (`data.tokenizer`: a directory, or a tiny one built in the workdir), the copy
the workdir keeps, and the checks that a starting point (train.init_from, model.hf_path, a resumed run) was trained
with the same ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from typing import Optional

import jax

from phi_jax.hf.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer, load_tokenizer, save_tokenizer
from phi_jax.model import PhiConfig
from phi_jax.sharding import distributed

from gin_bindings import binding_key, gin_statements
from run_files import has_checkpoints

log = logging.getLogger("phi_jax")


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
    if has_checkpoints(workdir) or os.path.isdir(os.path.join(workdir, "params")):
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
  tidy_run_tokenizer(out)
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


def tidy_run_tokenizer(out: str) -> None:
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
