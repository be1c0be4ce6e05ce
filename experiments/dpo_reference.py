"""The DPO stage's set-up (`setup`): the pair files, the frozen reference params (`train.init_from`, or the
random init), and the precomputed reference files of `dpo.reference = "precompute"`, with the bookkeeping that tells
when one must be computed again and refuses a resume that would read another stream of pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Optional, Sequence

import jax

from phi_jax.data import sources as sources_lib
from phi_jax.model import PhiConfig, init_params
from phi_jax.sharding import distributed
from phi_jax.train import loop as loop_lib
from phi_jax.train.state import param_shardings

from run_files import (check_is_dir, check_policy_dir, content_digests, file_sizes, has_checkpoints, read_eval,
                       write_text_atomically)
from starting_params import RUN_TIME_MODEL_FIELDS, params_loader

log = logging.getLogger("phi_jax")


def reference_params(model_config: PhiConfig, hf_path: Optional[str], settings: dict, the_mesh):
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


def check_reference_readable(settings: dict, hf_path: Optional[str]) -> None:
  """Refuses starting or reference params (train.init_from, else model.hf_path) that are not there or that this
  process cannot open, with the errors their loading gives."""
  source = settings["init_from"] or hf_path
  if not source:
    return
  name = "train.init_from" if settings["init_from"] else "model.hf_path"
  if settings["init_from"]:
    check_policy_dir(source, name)
  else:
    check_is_dir(name, source)
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


def check_pairs_sampled_as(train_files: Sequence[str], eval_files: Sequence[str], system_prompt: Optional[str],
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


def setup(workdir: str, model_config: PhiConfig, hf_path: Optional[str], data_cfg: dict, settings: dict, cfg: dict,
          tokenizer, the_mesh, per_process: int):
  """(loss_fn, train_data, eval_batches) of the DPO stage under `cfg`, its settings (`common.dpo_settings`)."""
  from phi_jax.data import preference
  from phi_jax.stages import dpo

  loss_fn = dpo.make_loss_fn(model_config, beta=cfg["beta"], label_smoothing=cfg["label_smoothing"],
                             loss_type=cfg["loss_type"], chunk_size=settings["chunk_size"])
  reader = dict(seq_len=data_cfg["seq_len"], batch_size=per_process, too_long=cfg["too_long"],
                on_bad_record=data_cfg["on_bad_record"], system_prompt=data_cfg["system_prompt"])
  train_files, eval_files = list(data_cfg["train_files"]), list(data_cfg["eval_files"])
  # A resumed run trains from its checkpoints: precompute mode needs train.init_from, since moved away, only to
  # compute a reference file again (which loads it, and names the missing path).
  start_gone = (cfg["reference"] == "precompute" and settings["init_from"]
                and _holds_no_params(settings["init_from"]) and has_checkpoints(workdir))
  # Each host reads these on its own: a file missing or unreadable on one fails there before the set-up's first
  # collective (the reference load's, its checksums', the precompute pass's), and every process stops with it.
  with distributed.failing_together("checking the DPO pair files and reference params"):
    _check_pair_files(train_files, eval_files)
    check_pairs_sampled_as(train_files, eval_files, data_cfg["system_prompt"], settings["init_from"] or hf_path,
                           "train.init_from" if settings["init_from"] else "model.hf_path")
    if cfg["reference"] != "precomputed" and not start_gone:  # "precomputed" loads no reference
      check_reference_readable(settings, hf_path)
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
    ref_params = reference_params(model_config, hf_path, settings, the_mesh)
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
    if settings["init_from"] and not fingerprint and has_checkpoints(workdir):  # none there on process 0
      _take_recorded_params(made_with, outputs, settings["init_from"])
    loaded = []  # the frozen reference, loaded once, and only where a file is computed or its params compared

    def frozen():
      if not loaded:
        loaded.append(reference_params(model_config, hf_path, settings, the_mesh))
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
      yield from read_eval(it, data_cfg["eval_batches"], eval_batches)
  return loss_fn, train_data, eval_batches


_NOT_RECORDED = "(not recorded)"


# What a reference file's settings hold that changes its log-probs but not its list of pairs.
_VALUE_ONLY_SETTINGS = ("model_config", "reference_files", "reference_params")


def _reference_model_config(config):
  """The model settings a precomputed reference file is compared by: `config` (a dict, as recorded) without
  `RUN_TIME_MODEL_FIELDS`, which files written by an earlier phi_jax recorded too."""
  if not isinstance(config, dict):
    return config
  return {k: v for k, v in config.items() if k not in RUN_TIME_MODEL_FIELDS}


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
  if not recorded or not has_checkpoints(workdir):
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
