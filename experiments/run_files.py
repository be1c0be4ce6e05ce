"""A run's workdir and the files the entry scripts write: atomic writes, output paths checked before a long job,
finished runs (params/, W/model_config.json, the transformers export), file sizes and digests recorded in the run
metadata, and the eval batches read once at the start.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Optional, Sequence

import jax

from phi_jax.data import sources as sources_lib
from phi_jax.hf import save_hf
from phi_jax.hf.tokenizer import save_tokenizer
from phi_jax.model import PhiConfig
from phi_jax.sharding import distributed
from phi_jax.train.checkpoint import CORRUPT_DIR

from gin_bindings import recorded_num_steps

log = logging.getLogger("phi_jax")


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


def check_is_dir(name: str, path: str) -> None:
  if not os.path.isdir(path):
    raise ValueError(f"{name}={path!r}: no such directory (give a finished run's workdir, which holds params/, or a "
                     f"transformers checkpoint directory){not_a_checkpoint_hint(path)}")


def check_policy_dir(path: str, name: str = "--init_from") -> None:
  """Refuses a --init_from (or `name`) that holds no policy, saying what it is instead and where the params are."""
  check_is_dir(name, path)
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
                     f"checkpoint (it has no config.json){not_a_checkpoint_hint(path)}")


def not_a_checkpoint_hint(path: str) -> str:
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


def has_checkpoints(workdir: str) -> bool:
  checkpoints = os.path.join(workdir, "checkpoints")
  return os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))


def check_not_unfinished_run(path: str) -> None:
  """A run workdir has params/ only once it has finished; without them it is not a transformers checkpoint either."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.basename(os.path.abspath(path)) == "params" and os.path.isfile(os.path.join(parent, "config.gin")):
    raise ValueError(f"{path} is the params/ of a run: point at the run's workdir, {parent}")
  if not os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(f"{path} is a run that has not finished: its final params/ are written at the end. Rerun its "
                     "command to finish it (it resumes from its newest checkpoint), or point at a finished run")


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


def read_eval(it, max_batches: int, holder):
  """The first `max_batches` batches of `it`; once they are all read, `holder.stats` is `it.stats()` (what was read,
  used and skipped), which the run reports once at its start."""
  for _, batch in zip(range(max_batches), it):
    yield batch
  holder.stats = it.stats()


def finished_without_checkpoints(workdir: str, num_steps: int) -> bool:
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
  configured = recorded_num_steps(workdir)
  if last_step >= num_steps or (configured is not None and num_steps <= configured):
    log.info("%s is finished (step %d; it was run with train.num_steps=%s; its checkpoints were deleted): nothing to "
             "train", workdir, last_step, configured if configured is not None else num_steps)
    return True
  raise ValueError(f"{workdir} holds a finished run's params/ (step {last_step}) but no checkpoint to resume from "
                   f"(were checkpoints/ deleted?): training on to step {num_steps} would start again from step 0 and "
                   f"replace them. To train these params further, use a new workdir with train.init_from={workdir!r}; "
                   f"to retrain from scratch here, delete {params} first")


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
