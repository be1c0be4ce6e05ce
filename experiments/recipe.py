"""The Phi-4-mini-reasoning recipe end to end on the embedded word-problem task: a base model, then packed
distillation mid-training, distillation SFT, rollout DPO and GRPO, each evaluated on the held-out test split.

    python experiments/recipe.py --workdir runs/demo             # the full demo (make demo), minutes on a CPU
    python experiments/recipe.py --workdir /tmp/smoke --quick    # the 1-2 minute smoke run of the test suite
    python experiments/recipe.py --workdir runs/demo --gin_param='recipe.stages=["base", "midtrain", "sft"]'

Stages (each a `experiments/train.py` stage configured by `<config_dir>/<stage>.gin`, started from the previous
stage's params):
  base      stage 0: packed next-token training from scratch on questions with direct answers, no reasoning;
  midtrain  stage 1: packed next-token training on teacher reasoning traces;
  sft       stage 2: unpacked next-token training on a curated subset, so the model learns where to stop;
  dpo       stage 3: k rollouts per prompt from the SFT model, verified; (correct, incorrect) pairs; DPO;
  grpo      stage 4: GRPO with the verifier as reward and the small-model fixes.
After each stage the model answers the test problems (greedy, and `evaluation.num_samples` samples) and the
verifier scores them. Everything lands under --workdir: data/ (the task files and tokenizer), one directory per
stage (metrics.jsonl, params/, checkpoints/, eval/summary.json + items.jsonl), summary.json, report.md and PNG
plots. Re-running the command skips finished stages and resumes an interrupted one from its newest checkpoint;
a finished stage trained from another stage than the one now before it (a stage inserted or dropped, or its
parent trained again) is refused rather than reused, as is an interrupted stage started from another (each stage
records the training of the stage it starts from in recipe_started.json before it samples or trains), and
finished stages are evaluated again when the evaluation.* settings changed, so the report compares like with like;
the task settings (recipe.task_counts, task_seed, difficulty, difficulty_overrides) must stay those data/ was
written with (a new --workdir, or --fresh, for others). The task's longest teacher reply and SFT conversation
must fit the evaluation's, the DPO rollouts' and the stages still to train's token budgets, or nothing trains (the
"hard" level needs more than recipe_tiny's; the refusal names the bindings to raise). No stage selects a checkpoint
on held-out data: each starts from the previous stage's final params and is evaluated on its own. The recipe reports
the test split (recipe.eval_split); the valid split is for your own tuning and comparisons
(recipe.eval_split="valid", or eval.py --problems=<workdir>/data/valid.jsonl), so test results stay unbiased.

Settings: --gin_file and the recipe.*, evaluation.* and rollouts.* bindings of --gin_param configure the recipe
itself. Every other --gin_param binding (train.*, model.*, data.*, optimizer.*, mesh.*, ...) configures the
training stages: it is applied to each stage this run trains, after the stage's file and the recipe gin files'
entry of recipe.stage_bindings for that stage, and before the command line's own entry (the place for a binding of
one stage only, such as recipe.stage_bindings={"sft": ["train.num_steps=7"]}: a gin scope, sft/train.num_steps=7,
reaches no stage and is refused); the command line wins over the files, and a binding for one stage over one for
every stage. Each stage of recipe.stages checks its settings before any stage trains, so a binding one of them
refuses fails at the start. Stages finished before are not trained again: where this run's settings for one differ
from those it was trained with (the --gin_param bindings, its recipe.stage_bindings entry, or the settings its gin
file, under recipe.config_dir, and those give it together), it is kept and warned of. data.train_files,
data.tokenizer and train.init_from differ per stage and are set by the recipe; change them for a stage through
recipe.stage_bindings. A relative path in a binding of --gin_param or recipe.stage_bindings (data.train_files,
data.eval_files, data.tokenizer, train.init_from, model.hf_path) is read from the directory recipe.py is run from
where it is found there, else from the repository root, as --gin_file is; the stage gin files' own paths are
repository-relative. A stage's data.train_files, data.eval_files or train.init_from found in neither is refused
before any stage trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any, Optional

# Two simulated CPU devices use both cores of a small machine (data parallel); a set XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from gin import config_parser  # noqa: E402

import common  # noqa: E402  (gin configurables shared by every entry script)
import eval as eval_lib  # noqa: E402
import gin_bindings  # noqa: E402
import make_task_data  # noqa: E402
import rollouts  # noqa: E402
import tokenizer_setup  # noqa: E402
from phi_jax.data import pipeline as pipeline_lib  # noqa: E402
from phi_jax.sharding import distributed  # noqa: E402
from phi_jax.tasks import word_problems  # noqa: E402

log = logging.getLogger("phi_jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base", "midtrain", "sft", "dpo", "grpo")
# The task file each stage trains on (DPO trains on the pairs it samples from `dpo_prompts`).
STAGE_DATA = {"base": "base_train", "midtrain": "midtrain", "sft": "sft", "dpo": "dpo_prompts", "grpo": "rl_prompts"}
DEFAULT_COUNTS = {"base_train": 4000, "midtrain": 4000, "sft": 1000, "dpo_prompts": 256, "rl_prompts": 512,
                  "valid": 200, "test": 200}
# The configurables recipe.py reads itself; bindings of any other configure the training stages.
RECIPE_CONFIGURABLES = ("recipe", "evaluation", "rollouts")
# Bindings the recipe writes for each stage (its own task file, the workdir's tokenizer, the previous stage's
# params): one value for every stage would be wrong for all but one of them.
PER_STAGE_KEYS = ("data.train_files", "data.tokenizer", "train.init_from")
# The settings whose values are paths (files, globs, directories): a relative one a user gives is read from the
# directory recipe.py was started in where it is found there (see `resolve_binding_paths`).
PATH_KEYS = ("data.train_files", "data.eval_files", "data.tokenizer", "train.init_from", "model.hf_path")


@gin_bindings.configurable("recipe")
def recipe_settings(stages: Sequence[str] = STAGES, config_dir: str = "experiments/configs/recipe_tiny",
                    task_counts: Optional[dict] = None, task_seed: int = 0, difficulty: str = "medium",
                    difficulty_overrides: Optional[dict] = None, stage_bindings: Optional[dict] = None,
                    rollout_k: int = 8, eval_split: str = "test") -> dict[str, Any]:
  """The recipe: which stages run, their gin files (`<config_dir>/<stage>.gin`), the task data, extra gin bindings
  per stage (`stage_bindings = {"sft": ["train.num_steps=10"]}`), the rollouts per DPO prompt, the reported split."""
  unknown = [s for s in stages if s not in STAGES]
  if not stages or unknown or list(stages) != [s for s in STAGES if s in stages]:
    raise ValueError(f"recipe.stages={list(stages)}: expected stages of {STAGES}, in that order")
  if stages and stages[0] == "dpo":
    raise ValueError(f"recipe.stages={list(stages)} starts at 'dpo', whose pairs are rollouts of the stage before it: "
                     f"list the stages from the first one, {list(STAGES[:STAGES.index('dpo') + 1])} and on (the "
                     "first listed stage trains from random initialisation; stages this workdir has finished are not "
                     "trained again)")
  if eval_split not in ("valid", "test"):
    raise ValueError(f"recipe.eval_split={eval_split!r}; expected 'valid' or 'test'")
  # One string is a list of one, in a file as on the command line.
  stage_bindings = {k: [v] if isinstance(v, str) else v for k, v in (stage_bindings or {}).items()}
  # Keys are checked against every stage, not just `stages`: quick.gin binds all five and may run fewer.
  not_stages = sorted(set(stage_bindings or {}) - set(STAGES))
  if not_stages:
    raise ValueError(f"recipe.stage_bindings has bindings for {not_stages}, which are not stages: use the names "
                     f"{list(STAGES)}")
  not_lists = sorted(k for k, v in (stage_bindings or {}).items()
                     if not isinstance(v, (list, tuple)) or not all(isinstance(b, str) for b in v))
  if not_lists:
    raise ValueError(f"recipe.stage_bindings[{not_lists[0]!r}] must be a list of binding strings, e.g. "
                     f'{{"{not_lists[0]}": ["train.num_steps=10"]}}')
  scoped = [(stage, *found) for stage, entry in stage_bindings.items() for found in gin_bindings.scoped_bindings(entry)]
  if scoped:  # no stage runs in a gin scope: gin took the binding, and it reached nothing
    stage, binding, scope, plain = scoped[0]
    raise ValueError(f"recipe.stage_bindings[{stage!r}] has {binding!r}, whose gin scope {scope + '/'!r} reaches "
                     f"no stage: its entry applies to the {stage} stage already; write {json.dumps(plain)}")
  not_counts = sorted(set(task_counts or {}) - set(DEFAULT_COUNTS))
  if not_counts:  # a misspelt key used to be dropped, and its default used
    raise ValueError(f"recipe.task_counts has {not_counts}, which are not task files; the counts are "
                     f"{sorted(DEFAULT_COUNTS)}")
  _check_stages_can_run(stages, {**DEFAULT_COUNTS, **(task_counts or {})}, stage_bindings, rollout_k, eval_split)
  return dict(stages=list(stages), config_dir=config_dir, task_counts={**DEFAULT_COUNTS, **(task_counts or {})},
              task_seed=task_seed, difficulty=difficulty, difficulty_overrides=dict(difficulty_overrides or {}),
              stage_bindings={k: list(v) for k, v in (stage_bindings or {}).items()}, rollout_k=rollout_k,
              eval_split=eval_split)


def _check_stages_can_run(stages: Sequence[str], counts: dict, stage_bindings: dict, rollout_k: int,
                          eval_split: str) -> None:
  """Refuses settings the DPO rollouts, a stage's data or the evaluation cannot run with, which were found only when
  that stage started (DPO's and GRPO's after the stages before them had trained)."""
  if "dpo" in stages and rollout_k < 2:
    raise ValueError(f"recipe.rollout_k={rollout_k}: the dpo stage's pairs need at least 2 rollouts per prompt (a "
                     "right and a wrong one); set recipe.rollout_k >= 2 (the paper samples 8), or leave 'dpo' out of "
                     "recipe.stages")
  for stage in stages:
    # DPO's rollouts read its prompts file whatever data.train_files the stage trains on.
    own_data = stage != "dpo" and any(key == "data.train_files" for b in stage_bindings.get(stage, [])
                                      for key in gin_bindings.binding_keys(b))
    name = STAGE_DATA[stage]
    if counts[name] == 0 and not own_data:
      raise ValueError(f"recipe.task_counts[{name!r}]=0: the {stage} stage {'samples' if stage == 'dpo' else 'trains'} "
                       f"on {name}.jsonl, which would be empty; give it a count > 0, or leave {stage!r} out of "
                       "recipe.stages")
  if counts[eval_split] == 0:
    raise ValueError(f"recipe.task_counts[{eval_split!r}]=0: recipe.eval_split={eval_split!r} evaluates every stage "
                     f"on that split, which would be empty; give it a count > 0")


def task_request(settings: dict) -> dict:
  """The settings the task data is made from, as the manifest records them (`recipe_task`): the difficulty's
  effective parameters rather than its overrides, as those are what the files depend on."""
  base = word_problems.get_difficulty(settings["difficulty"])
  unknown = sorted(set(settings["difficulty_overrides"]) - {f.name for f in dataclasses.fields(base)})
  if unknown:
    raise ValueError(f"recipe.difficulty_overrides names {unknown}, which are not difficulty parameters: use "
                     f"{[f.name for f in dataclasses.fields(base)]}")
  level = dataclasses.replace(base, **settings["difficulty_overrides"])
  return {"task_seed": settings["task_seed"], "difficulty": settings["difficulty"],
          "difficulty_params": dataclasses.asdict(level), "task_counts": dict(settings["task_counts"]),
          "split_version": word_problems.SPLIT_VERSION}


def _recorded_task(manifest: dict) -> dict:
  """The task settings of existing data: as recorded, or, for a manifest written before they were, as far as the
  manifest tells them (the count asked for sft is only known up to the midtrain count it is a subset of)."""
  if "recipe_task" in manifest:
    return manifest["recipe_task"]
  return {"task_seed": manifest.get("seed"), "difficulty": manifest.get("difficulty"),
          "difficulty_params": manifest.get("difficulty_params"), "task_counts": manifest.get("counts"),
          "split_version": manifest.get("split_version")}


def task_differences(manifest: dict, request: dict) -> list[str]:
  """One line per task setting in which the data of `manifest` differs from `request` (see `task_request`)."""
  recorded, out = _recorded_task(manifest), []
  if recorded.get("split_version") != request["split_version"]:
    out.append(f"the task's split rules: version {recorded.get('split_version') or 'older, unrecorded'} in data/, "
               f"{request['split_version']} now (other held-out problems; see word_problems.SPLIT_VERSION)")
  for key in ("task_seed", "difficulty"):
    if recorded.get(key) is not None and recorded[key] != request[key]:
      out.append(f"recipe.{key}: {recorded[key]!r} in data/, {request[key]!r} now")
  for key in ("difficulty_params", "task_counts"):
    saved, asked = recorded.get(key) or {}, dict(request[key])
    if key == "task_counts" and "recipe_task" not in manifest and "sft" in asked:
      asked["sft"] = min(asked["sft"], asked.get("midtrain", asked["sft"]))
    where = ("difficulty parameter {} (recipe.difficulty, recipe.difficulty_overrides)" if key == "difficulty_params"
             else f"recipe.{key}[{{!r}}]")
    out += [f"{where.format(name)}: {saved[name]!r} in data/, {asked.get(name)!r} now"
            for name in sorted(saved) if saved[name] != asked.get(name)]
  return out


def prepare_data(workdir: str, settings: dict) -> dict:
  """Writes the task files and tokenizer under workdir/data once; returns the manifest. Data made with other task
  settings than `settings` raises (a resumed stage would train on it, and the report would describe the new ones)."""
  data_dir = os.path.join(workdir, "data")
  manifest_path = os.path.join(data_dir, "manifest.json")
  request = task_request(settings)
  if not os.path.exists(manifest_path):
    log.info("writing the task data to %s", data_dir)
    # The task record goes into the manifest make_task_data renames into place last: a kill leaves either no
    # manifest (the data is written again) or a whole one.
    make_task_data.make_task_data(data_dir, seed=settings["task_seed"], difficulty=settings["difficulty"],
                                  counts=settings["task_counts"], extra={"recipe_task": request},
                                  **settings["difficulty_overrides"])
  with open(manifest_path) as f:
    manifest = json.load(f)
  differ = task_differences(manifest, request)
  if differ:
    raise ValueError(f"{data_dir} holds task data made with other settings than this run asks for: "
                     f"{'; '.join(differ)}. Use a new --workdir for the new settings (or --fresh to delete this "
                     "workdir, trained stages included), or set them back to go on with this workdir.")
  return manifest


def _stage_config(settings: dict, workdir: str, stage: str, read):
  """`read()` under the gin config `stage` trains with."""
  try:
    _configure(settings, stage, stage_bindings(stage, workdir, None, settings))
    return read()
  finally:
    gin.clear_config()


def _short_budgets(workdir: str, settings: dict, eval_cfg: dict, rollout_cfg: dict, reply: int,
                   conversation: int) -> list[tuple[str, int, Optional[str], int]]:
  """(binding, its value, the stage it is bound for or None for the command line, tokens needed) of each token
  budget the task's longest reply or SFT conversation does not fit. Stages finished before are not trained again."""
  to_train = [s for s in settings["stages"] if not os.path.exists(os.path.join(workdir, s, "recipe_stage.json"))]
  budgets = [("evaluation.max_new_tokens", eval_cfg["sampling"].max_new_tokens, None, reply)]
  if "dpo" in to_train:
    budgets.append(("rollouts.max_new_tokens", rollout_cfg["sampling"].max_new_tokens, None, reply))
  if "grpo" in to_train:
    grpo_tokens = _stage_config(settings, workdir, "grpo", lambda: common.grpo().max_new_tokens)
    budgets.append(("grpo.max_new_tokens", grpo_tokens, "grpo", reply))
  if "sft" in to_train:
    data = _stage_config(settings, workdir, "sft", common.data)
    if data["too_long"] == "drop":  # split or truncated conversations still train; dropped ones are lost
      budgets.append(("data.seq_len", data["seq_len"], "sft", _sft_conversation_tokens(workdir, data, conversation)))
  return [b for b in budgets if b[1] < b[3]]


def _sft_conversation_tokens(workdir: str, data: dict, bare: int) -> int:
  """The longest SFT conversation as the SFT stage's data pipeline tokenizes it: `bare` (manifest.json's, without a
  system prompt) unless data.system_prompt is set, which the stage's chat format renders into every conversation."""
  if data["system_prompt"] is None:
    return bare
  with tempfile.TemporaryDirectory() as scratch:  # where a "tiny:<chat format>" data.tokenizer is built
    tokenizer = tokenizer_setup.get_tokenizer(data["tokenizer"], scratch)
  tokenize = pipeline_lib.make_tokenize_fn(tokenizer, system_prompt=data["system_prompt"])
  with open(os.path.join(workdir, "data", "sft.jsonl"), encoding="utf-8") as f:
    return max((len(tokenize(json.loads(line))["ids"]) for line in f if line.strip()), default=bare)


def check_token_budgets(workdir: str, manifest: dict, settings: dict, eval_cfg: dict, rollout_cfg: dict) -> None:
  """Raises if the task's longest teacher reply or SFT conversation (the manifest's token counts) does not fit the
  evaluation's or a stage's token budget, before any stage trains: a reply cut at max_new_tokens is scored incorrect
  (in evaluation, DPO rollouts and GRPO alike), and an SFT conversation longer than its row is dropped. An SFT
  conversation counts the tokens of the SFT stage's data.system_prompt too. The "hard" level's six-step problems
  need more than recipe_tiny's 80 new tokens and 128-token SFT rows."""
  tokens = manifest.get("tokens", {})
  reply = tokens["trace"]["max"] + 1 if "trace" in tokens else 0  # a finished reply ends with the end-of-turn token
  conversation = tokens.get("sft_conversation", {}).get("max", 0)  # without a system prompt
  short = _short_budgets(workdir, settings, eval_cfg, rollout_cfg, reply, conversation)
  if not short:
    return
  named = ", ".join(f"{name}={value}" + (f" (the {stage} stage)" if stage else "") for name, value, stage, _ in short)
  fixes = [f"--gin_param='{name}={need}'" for name, _, stage, need in short if stage is None]
  per_stage = {stage: [f"{name}={need}"] for name, _, stage, need in short if stage is not None}
  if per_stage:
    fixes.append(f"--gin_param='recipe.stage_bindings={json.dumps(per_stage)}'")
  lengths, harms = [], []
  if any(stage != "sft" for _, _, stage, _ in short):
    lengths.append(f"teacher replies of up to {reply} tokens (the end-of-turn token included)")
    harms.append("a reply cut short is scored incorrect")
  sft_need = next((need for _, _, stage, need in short if stage == "sft"), None)
  if sft_need is not None:
    lengths.append(f"SFT conversations of up to {sft_need} tokens" + (
        f" once the sft stage's data.system_prompt is rendered into each, {conversation} without it"
        if sft_need != conversation else ""))
    harms.append("an SFT conversation longer than its row is dropped (data.too_long=\"drop\")")
  raise ValueError(
      f"the task data in {os.path.join(workdir, 'data')} has {' and '.join(lengths)} (manifest.json's tokens), more "
      f"than the token budgets {named} allow: {', and '.join(harms)}. Raise them, e.g. {' '.join(fixes)} (or in "
      "the recipe's gin files), or ask for shorter problems (recipe.difficulty, recipe.difficulty_overrides max_steps)")


def mesh_bindings(params: Sequence[str]) -> list[str]:
  """The --gin_param bindings that set the mesh (`mesh.shape=...`, in any spelling gin takes)."""
  return [p for p in params
          if any((gin_bindings.binding_key(st) or "").startswith("mesh.") for st in gin_bindings.gin_statements(p))]


def _is_recipe_binding(statement) -> bool:
  key = gin_bindings.binding_key(statement)
  return key is not None and key.split(".")[0] in RECIPE_CONFIGURABLES


def split_params(params: Sequence[str]) -> tuple[list[str], list[str]]:
  """(recipe bindings, stage bindings) of the --gin_param values; see the module docstring. A macro, an include or
  an import goes to the stages (a stage file may use it) as well as to the recipe."""
  recipe_params, stage_params = [], []
  for param in params:
    statements = gin_bindings.gin_statements(param)
    if all(map(_is_recipe_binding, statements)):
      recipe_params.append(param)
      continue
    per_stage = [k for k in map(gin_bindings.binding_key, statements) if k in PER_STAGE_KEYS]
    if per_stage:
      raise ValueError(f"--gin_param={param}: the recipe sets {per_stage[0]} for each stage itself; to change it "
                       f'for one stage, use recipe.stage_bindings = {{"sft": [{json.dumps(param)}]}} (with that '
                       "stage's name)")
    if "data.eval_files" in map(gin_bindings.binding_key, statements):  # the GRPO stage refuses it: it has no eval loss
      raise ValueError(f"--gin_param={param}: data.eval_files would reach every stage, GRPO too, which has no eval "
                       'loss; give it to the stages that read it, e.g. recipe.stage_bindings = {"midtrain": '
                       f"[{json.dumps(param)}]}}")
    stage_params.append(param)
  return recipe_params, stage_params


def _file_stage_bindings(path: str, seen: set) -> list[str]:
  """'file: configurable.param' of the bindings in a recipe gin file (and its includes) that are not the recipe's."""
  if path in seen or not os.path.exists(path):  # a file gin found on a search path of its own is not checked
    return []
  seen.add(path)
  with open(path) as f:
    statements = gin_bindings.gin_statements(f.read())
  out = []
  for statement in statements:
    if isinstance(statement, config_parser.IncludeStatement):
      out += _file_stage_bindings(statement.filename, seen)
    elif gin_bindings.binding_key(statement) is not None and not _is_recipe_binding(statement):
      out.append(f"{path}: {gin_bindings.binding_key(statement)}")
  return out


def _path_exists(path: str) -> bool:
  """Whether `path` (a file, a directory or a glob, from the current directory) names anything."""
  if os.path.exists(path) or not glob.has_magic(path):
    return os.path.exists(path)
  return bool(glob.glob(path, recursive=True))


def resolve_binding_paths(binding: str, caller_dir: str) -> str:
  """`binding` with each relative path of a path-valued setting (`PATH_KEYS`) found from `caller_dir` made absolute
  there: recipe.py reads its files from the repository root, and a user's file beside them was "no such file" only
  when its stage started. Other paths stay as they are (the repository's own; a missing one `_check_stage_paths`
  names). A binding of several statements, or whose value holds a macro, is left as it is."""
  try:
    statements = gin_bindings.gin_statements(binding)
  except SyntaxError:
    return binding  # parse_gin reports it
  if len(statements) != 1 or gin_bindings.binding_key(statements[0]) not in PATH_KEYS:
    return binding
  statement = statements[0]

  def resolve(path: str) -> str:
    in_caller_dir = os.path.join(caller_dir, path)
    if not path or os.path.isabs(path) or path.startswith("tiny:") or not _path_exists(in_caller_dir):
      return path
    return os.path.abspath(in_caller_dir)

  value = statement.value
  if isinstance(value, str):
    resolved = resolve(value)
  elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    resolved = [resolve(v) for v in value]
  else:
    return binding
  if resolved == value or (not isinstance(value, str) and resolved == list(value)):
    return binding
  scope = f"{statement.scope}/" if statement.scope else ""
  return f"{scope}{statement.selector}.{statement.arg_name}={json.dumps(resolved)}"


def _refuse_scoped_params(params: Sequence[str]) -> None:
  """Refuses a --gin_param with a gin scope (`sft/train.num_steps=7`): no stage runs in one, so gin took it and
  every stage trained with the unscoped value."""
  scoped = gin_bindings.scoped_bindings(params)
  if scoped:
    param, scope, plain = scoped[0]
    example = json.dumps({scope if scope in STAGES else "sft": [plain]})
    raise ValueError(f"--gin_param {param!r} has the gin scope {scope + '/'!r}, which reaches no stage (no stage "
                     f"runs in a gin scope): give a binding for one stage as --gin_param='recipe.stage_bindings="
                     f"{example}'{'' if scope in STAGES else ' (with the stage name)'}, or drop the scope")


def configure(gin_files: Sequence[str], params: Sequence[str], caller_dir: Optional[str] = None,
              workdir: Optional[str] = None) -> tuple[dict, dict, dict]:
  """(recipe settings, evaluation settings, rollout settings) of the recipe's gin files and --gin_param values;
  the settings' `stage_params` are the bindings every training stage gets (see the module docstring). A relative
  recipe.config_dir found from `caller_dir` (and not the repository root) is read from there, and so is a relative
  path found from `caller_dir` in a path-valued binding (`PATH_KEYS`) of `params` or recipe.stage_bindings, as a
  --gin_file is."""
  _refuse_scoped_params(params)
  gin.clear_config()
  gin_bindings.parse_gin(gin_files, [])
  # Their macros stay unresolved: merged with the --gin_param dicts and bound again below, they take the values the
  # command line may give those macros.
  in_file_dicts = {name: gin_bindings.bound_or_none(name, nested=False) for name in MERGED_DICTS}
  file_difficulty = gin_bindings.bound_or_none("recipe.difficulty")
  gin.clear_config()
  # All of them, so a misspelt name fails now rather than at its stage; a macro is checked against the stage files
  # that may use it, in `_configure`.
  gin_bindings.parse_gin(gin_files, params, macro_files=None)
  difficulty = gin_bindings.bound_or_none("recipe.difficulty")
  if difficulty != file_difficulty and in_file_dicts["recipe.difficulty_overrides"]:
    # Another level asked for on the command line is that level: the file's overrides were written for the file's
    # level (recipe_tiny's set every parameter, which would leave the new name without effect).
    log.info("recipe.difficulty=%r from the command line: the file's recipe.difficulty_overrides %s are not applied "
             "(give recipe.difficulty_overrides on the command line to change that level)", difficulty,
             in_file_dicts["recipe.difficulty_overrides"])
    in_file_dicts["recipe.difficulty_overrides"] = None
    asked = any(gin_bindings.binding_key(st) == "recipe.difficulty_overrides"
                for p in params for st in gin_bindings.gin_statements(p))
    gin.bind_parameter("recipe.difficulty_overrides",
                       gin_bindings.bound_or_none("recipe.difficulty_overrides") if asked else {})
  for name, in_file in in_file_dicts.items():  # a --gin_param dict adds to the file's rather than replacing it
    # Each --gin_param of the name in turn (gin keeps only the last): one flag per stage adds up too.
    given = [gin_bindings.resolve_bound_macros(st.value) for p in params for st in gin_bindings.gin_statements(p)
             if gin_bindings.binding_key(st) == name and isinstance(st.value, dict)]
    merged = dict(gin_bindings.resolve_bound_macros(in_file) or {})  # the macros as the command line left them
    if name == "recipe.stage_bindings":  # see `stage_bindings`: the files' entries go before the command line's
      replaced = any(gin_bindings.binding_key(st) == name and not isinstance(st.value, dict)
                     for p in params for st in gin_bindings.gin_statements(p))
      from_files = {} if replaced else {stage: len(_bindings_list(entry)) for stage, entry in merged.items()}
    for value in given:
      merged = ({k: _bindings_list(merged.get(k, [])) + _bindings_list(value.get(k, [])) for k in {**merged, **value}}
                if name == "recipe.stage_bindings" else {**merged, **value})
    if given and merged != gin_bindings.bound_or_none(name, nested=False):
      gin.bind_parameter(name, merged)
  in_files = [b for path in gin_files for b in _file_stage_bindings(path, set())]
  if in_files:
    raise ValueError(f"recipe gin files configure the recipe only (recipe.*, evaluation.*, rollouts.*), but "
                     f"{'; '.join(in_files)} binds a training setting: put it in <config_dir>/<stage>.gin, in "
                     "recipe.stage_bindings, or pass it as --gin_param to apply it to every stage")
  _, stage_params = split_params(params)
  settings = recipe_settings()
  settings["stage_params"] = stage_params
  settings["stage_bindings_from_files"] = from_files
  # Run from the repository root, the paths are read from there already and stay as given: a stage's records and
  # checkpoints compare them with the next run's.
  if caller_dir and os.path.realpath(caller_dir) != os.path.realpath(os.getcwd()):
    settings["stage_params"] = [resolve_binding_paths(p, caller_dir) for p in stage_params]
    settings["stage_bindings"] = {stage: [resolve_binding_paths(b, caller_dir) for b in entry]
                                  for stage, entry in settings["stage_bindings"].items()}
  settings["recipe_files"] = list(gin_files)
  in_caller_dir = os.path.join(caller_dir or "", settings["config_dir"])
  if (caller_dir and not os.path.isabs(settings["config_dir"]) and not os.path.isdir(settings["config_dir"])
      and os.path.isdir(in_caller_dir)):  # the repository's own configs first, as gin finds the recipe's files
    log.info("recipe.config_dir=%r: reading the stage configs from %s", settings["config_dir"], in_caller_dir)
    settings["config_dir"] = in_caller_dir
  eval_cfg, rollout_cfg = eval_lib.eval_settings(), rollouts.rollout_settings()
  if "dpo" in settings["stages"]:  # greedy rollouts would make no pair, found after the stages before DPO
    rollouts.check_sampling_varies(rollout_cfg["sampling"], settings["rollout_k"], "recipe.rollout_k")
  # A stage finished in `workdir` is not trained again: its data files and starting point may be gone.
  check_stage_settings(settings, finished=[stage for stage in settings["stages"] if workdir and os.path.exists(
      os.path.join(workdir, stage, "recipe_stage.json"))])
  task_request(settings)  # the task settings are good, before --fresh deletes anything
  make_task_data.check_counts(settings["task_counts"])
  return settings, eval_cfg, rollout_cfg


def _check_stage_paths(stage: str, data_cfg: dict, init_from: Optional[str]) -> None:
  """Raises if a data file or starting point the stage is given, other than those the recipe writes as it runs,
  does not exist: it used to be found when the stage started, after the stages before it had trained. Under
  `_check_stage` the recipe's own paths are those of an empty workdir ("data/sft.jsonl")."""
  own = [os.path.join("dpo", "pairs.jsonl") if stage == "dpo" else os.path.join("data", f"{STAGE_DATA[stage]}.jsonl")]
  named = [("data.train_files", p) for p in data_cfg["train_files"] if data_cfg["train_files"] != own]
  named += [("data.eval_files", p) for p in data_cfg["eval_files"]]
  named += [("train.init_from", init_from)] if init_from is not None else []
  missing = [f"{name} {path!r}" for name, path in named if not _path_exists(path)]
  if missing:
    raise ValueError(f"{', '.join(missing)}: no such file or directory (a relative path is read from the directory "
                     f"recipe.py is run from, or else from the repository root {ROOT})")


def _check_stage(settings: dict, stage: str, params: Sequence[str], check_paths: bool = True) -> None:
  """The settings checks `common.run_training` makes before it reads data or loads params, on the gin config of
  `stage` with `params` as the --gin_param bindings."""
  settings = dict(settings, stage_params=list(params))
  # No workdir yet: the per-stage paths are bound but not read here.
  _configure(settings, stage, stage_bindings(stage, "", None, settings))
  model_config, _ = common.model()
  data_cfg, train, _ = common.data(), common.train_settings(), common.optimizer()
  kind = train["stage"]
  if kind not in ("next_token", "dpo", "grpo"):
    raise ValueError(f"train.stage={kind!r}; supported: 'next_token' (mid-training, SFT), 'dpo', 'grpo'")
  common.check_data_settings(kind, data_cfg, train["loop"])
  if check_paths:
    _check_stage_paths(stage, data_cfg, train["init_from"])
  common.check_param_dtype(model_config)
  # Each stage checks the settings it reads (each configurable refuses values of no known kind): a binding that
  # combines with another stage's file (reward.length_aware_max_tokens beside grpo.gin's reward.weights) is checked
  # where it combines.
  if kind == "dpo":
    common.dpo_settings()
  if kind == "grpo":
    common.grpo_config(train)
    common.reward_settings()
  common.check_batch_shape(kind, model_config, data_cfg, train["loop"], common.mesh())


def _refusal(settings: dict, stage: str, params: Sequence[str], check_paths: bool = True) -> Optional[Exception]:
  """The error `_check_stage` raises, or None. Its warnings are left to the stage's own run (a GRPO stage warns of
  data settings it does not read): logged here too, they would come twice, and for stages finished before."""
  was_disabled, log.disabled = log.disabled, True
  try:
    _check_stage(settings, stage, params, check_paths)
  except (ValueError, TypeError) as e:
    return e
  finally:
    log.disabled = was_disabled
    gin.clear_config()
  return None


_ONE_STAGE_CONFIGURABLES = ("dpo", "grpo", "reward")


def _bindings_list(value) -> list:
  """A stage's entry of recipe.stage_bindings as a list: one string is a list of one (list() split it into
  characters)."""
  return [value] if isinstance(value, str) else list(value)


def check_stage_settings(settings: dict, finished: Sequence[str] = ()) -> None:
  """Raises if a stage of `settings["stages"]` refuses its training settings, before any stage trains: a --gin_param
  binding reaches every stage, and one that only some stages take (train.z_loss: not DPO or GRPO) used to fail at
  the first stage that refuses it, after the stages before it had trained. The data files and starting points of
  `finished` stages, which are not trained again, are not looked for."""
  params = settings.get("stage_params", [])
  refused = {stage: e for stage in settings["stages"]
             if (e := _refusal(settings, stage, params, stage not in finished)) is not None}
  if not refused:
    return
  stage, error = next(iter(refused.items()))
  where = f"{settings['config_dir']}/{stage}.gin with recipe.stage_bindings[{stage!r}]"
  # It takes its own settings, not the command line's:
  if params and _refusal(settings, stage, [], stage not in finished) is None:
    culprits = ([p for p in params if _refusal(settings, stage, [p], stage not in finished) is not None]
                or list(params))
    takers = [s for s in settings["stages"] if all(_refusal(settings, s, [p], s not in finished) is None
                                                   for p in culprits)]
    # DPO, GRPO and reward settings are read by their own stage alone: the others "take" any value, and moving the
    # binding there would drop it silently.
    keys = [key for p in culprits for key in gin_bindings.binding_keys(p)]
    if keys and all(key.split(".")[0] in _ONE_STAGE_CONFIGURABLES for key in keys):
      takers = []
    if not takers:
      raise ValueError(f"--gin_param {', '.join(culprits)} is refused by every stage of this recipe "
                       f"({stage}: {error}): change or remove it") from error
    example = json.dumps({s: culprits for s in takers})
    names = (f"{', '.join(list(refused)[:-1])} and {list(refused)[-1]} stages refuse" if len(refused) > 1
             else f"{stage} stage refuses")
    raise ValueError(
        f"--gin_param {', '.join(culprits)} applies to every stage this recipe trains, and the {names} it "
        f"({stage}: {error})\nGive it only to the stages it applies to, e.g. "
        f"--gin_param='recipe.stage_bindings={example}' (with the stages you mean it for)") from error
  raise ValueError(f"the {stage} stage refuses its training settings ({where}"
                   f"{' and the --gin_param bindings' if params else ''}): {error}") from error


# Recipe dicts a --gin_param extends rather than replaces: quick.gin's per-stage step counts and task counts stay
# when the command line adds a binding for one stage or changes one count. A stage's list gets the command line's
# entries after the file's (later bindings win).
MERGED_DICTS = ("recipe.stage_bindings", "recipe.task_counts", "recipe.difficulty_overrides")


def stage_bindings(stage: str, workdir: str, init_from: Optional[str], settings: dict) -> list[str]:
  """The gin bindings the recipe adds to a stage's file: its data, the tokenizer, its starting point, the recipe gin
  files' entries of recipe.stage_bindings for it, the --gin_param bindings for every stage, then the command line's
  entries for it. Later ones win: the command line over the files, and an entry for one stage over a binding for
  every stage."""
  data_dir = os.path.join(workdir, "data")
  train_file = (os.path.join(workdir, stage, "pairs.jsonl") if stage == "dpo"
                else os.path.join(data_dir, f"{STAGE_DATA[stage]}.jsonl"))
  bindings = [f"data.train_files={json.dumps([train_file])}",
              f"data.tokenizer={json.dumps(os.path.join(data_dir, 'tokenizer'))}"]
  if init_from is not None:
    bindings.append(f"train.init_from={json.dumps(init_from)}")
  entry = settings["stage_bindings"].get(stage, [])
  in_files = settings.get("stage_bindings_from_files", {}).get(stage, 0)  # settings not from `configure`: none
  return bindings + entry[:in_files] + settings.get("stage_params", []) + entry[in_files:]


def _configure(settings: dict, stage: str, bindings: Sequence[str]) -> None:
  gin.clear_config()
  # A macro given to every stage may be used by any stage file, the recipe's own files, or any stage's bindings.
  users = [os.path.join(settings["config_dir"], f"{s}.gin") for s in settings["stages"]]
  users += settings.get("recipe_files", [])
  macro_texts = [b for entry in settings["stage_bindings"].values() for b in _bindings_list(entry)]
  gin_bindings.parse_gin([os.path.join(settings["config_dir"], f"{stage}.gin")], bindings, macro_files=users,
                         macro_texts=macro_texts)


def _policy(init_from: str):
  """(config, params, tokenizer, mesh) of a finished stage, under the currently parsed gin config."""
  the_mesh = common.mesh()
  config, params, tokenizer = rollouts.load_policy(init_from, the_mesh)
  return config, params, tokenizer, the_mesh


def sample_dpo_pairs(workdir: str, init_from: str, settings: dict, rollout_cfg: dict) -> dict:
  """Rollouts of the previous stage's model on the DPO prompts -> workdir/dpo/pairs.jsonl (once); the summary."""
  out = os.path.join(workdir, "dpo", "pairs.jsonl")
  if not os.path.exists(rollouts.summary_path(out)):
    config, params, tokenizer, the_mesh = _policy(init_from)
    rollouts.rollout_pairs(params, config, tokenizer, os.path.join(workdir, "data", "dpo_prompts.jsonl"), out,
                           k=settings["rollout_k"], sampling=rollout_cfg["sampling"], seed=settings["task_seed"],
                           batch_size=rollout_cfg["batch_size"], mesh=the_mesh,
                           system_prompt=common.data()["system_prompt"],
                           verify_timeout_s=rollout_cfg["verify_timeout_s"], init_from=init_from)
  with open(rollouts.summary_path(out)) as f:
    summary = json.load(f)
  warn_if_rollouts_changed(summary, settings, rollout_cfg, os.path.dirname(out))
  return summary


def warn_if_rollouts_changed(summary: dict, settings: dict, rollout_cfg: dict, dpo_dir: str) -> None:
  """The DPO pairs are sampled once: a rerun with another recipe.rollout_k or rollouts.* sampling keeps them, and
  says so."""
  now = {"k": settings["rollout_k"], "sampling": rollouts.sampling_record(rollout_cfg["sampling"])}
  was = {"k": summary.get("k"), "sampling": summary.get("sampling", now["sampling"])}  # older summaries lack it
  if was != now:
    log.warning("the DPO pairs in %s were sampled with %s, not %s as this run asks: they are kept (delete %s and "
                "the stages after it to sample them again)", dpo_dir, was, now, dpo_dir)


def evaluate_stage(stage_dir: str, params_from: str, problems: list[dict], eval_cfg: dict) -> dict:
  """Evaluates the params of `params_from` on the problems -> stage_dir/eval/{summary.json, items.jsonl}."""
  config, params, tokenizer, the_mesh = _policy(params_from)
  summary, items = eval_lib.evaluate(params, config, tokenizer, problems, settings=eval_cfg, mesh=the_mesh,
                                     system_prompt=common.data()["system_prompt"])
  eval_lib.write_results(os.path.join(stage_dir, "eval"), summary, items)
  return summary


def evaluation_settings(settings: dict, eval_cfg: dict) -> dict:
  """What a stage's evaluation results depend on (the verifier's time limit does not change them; the batch size may,
  through float rounding, though each sample draws with its own key); a finished stage whose record holds other values
  is evaluated again (see `run_recipe`)."""
  sampling = eval_cfg["sampling"]
  return {"split": settings["eval_split"], "num_samples": eval_cfg["num_samples"], "greedy": eval_cfg["greedy"],
          "pass_k": list(eval_cfg["pass_k"]), "seed": eval_cfg["seed"], "temperature": sampling.temperature,
          "top_p": sampling.top_p, "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
          "batch_size": eval_cfg["batch_size"]}


def _write_record(stage_dir: str, record: dict) -> None:
  # Through a temporary file: a record cut short by a kill would make every rerun fail on it.
  path = os.path.join(stage_dir, "recipe_stage.json")
  with open(f"{path}.tmp{jax.process_index()}", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(f"{path}.tmp{jax.process_index()}", path)


def check_lineage(stage: str, record: dict, parent: Optional[dict], workdir: str, unfinished: bool = False) -> None:
  """Raises unless the finished stage `record` was trained from `parent` (the record of the stage before it in this
  recipe, None for the first): the same stage, and the same training of it (its `stage_id`). `unfinished`: `record`
  is the start record of a stage that has not finished (see `check_unfinished_stage`)."""
  if "parent" in record:
    was = (record["parent"], record.get("parent_id"))
    now = (parent["name"], parent.get("stage_id")) if parent else (None, None)
  else:  # a record written before lineage was recorded: the starting point's directory is all it tells
    was = os.path.basename(record["init_from"]) if record.get("init_from") else None
    now = parent["params_from"] and os.path.basename(parent["params_from"]) if parent else None
  if was != now:
    describe = lambda x: "random initialisation" if x in (None, (None, None)) else (
        x if isinstance(x, str) else f"{x[0]} (training {x[1] or 'unrecorded'})")
    stage_dir = os.path.join(workdir, stage)
    if unfinished:
      raise ValueError(
          f"{stage_dir} holds an unfinished {stage} stage started from {describe(was)}, but this recipe trains "
          f"{stage} from {describe(now)}: resuming it would mix two lineages (its checkpoints, and any DPO pairs and "
          f"reference log-probs in it, come from the earlier parent). Delete {stage_dir} to train {stage} again "
          "from the start (or restore the parent it was started from), or use a fresh --workdir")
    raise ValueError(
        f"{stage} in {stage_dir} was trained from {describe(was)}, but this recipe trains it from {describe(now)}: "
        "its params, evaluation and the report's change vs previous would belong to another lineage. Delete "
        f"{stage_dir} and the stage directories after it, finished or interrupted (their checkpoints, DPO pairs "
        "and reference log-probs descend from it too), to train them again, or use a fresh --workdir")


def check_no_finished_stage_after_one_to_train(workdir: str, stages) -> None:
  """Refuses, before anything trains, a finished stage after one that will train (its directory deleted to retrain
  it): the stage would train, and the finished one after it would then be refused as another lineage's."""
  to_train = None
  for stage in stages:
    finished = os.path.exists(os.path.join(workdir, stage, "recipe_stage.json"))
    if not finished and to_train is None:
      to_train = stage
    elif finished and to_train is not None:
      raise ValueError(
          f"{stage} in {os.path.join(workdir, stage)} is finished, but {to_train}, a stage before it, is not and "
          f"would train now: {stage} would then be refused as trained from an earlier training of {to_train}. "
          f"Delete {os.path.join(workdir, stage)} and the stage directories after it to train them again from the "
          f"new {to_train}, or restore {os.path.join(workdir, to_train)}")


def check_fresh_workdir(workdir: str, settings: dict) -> None:
  """What --fresh checks before it deletes `workdir`: that it is a recipe's workdir (or empty), not a train.py run
  or a parent directory given by mistake, and that the task data can be made with these settings (a count the
  difficulty cannot fill used to be found after the deletion)."""
  entries = os.listdir(workdir) if os.path.isdir(workdir) else [os.path.basename(workdir)]
  is_recipe = (os.path.exists(os.path.join(workdir, "data", "manifest.json")) or entries == ["data"]  # data cut short
               or any(os.path.exists(os.path.join(workdir, stage, name)) for stage in STAGES
                      for name in ("recipe_stage.json", STARTED)))
  if entries and not is_recipe:
    raise ValueError(f"--fresh deletes a recipe's workdir, and {workdir} is not one (no data/manifest.json, no stage "
                     f"records; it holds {sorted(entries)[:6]}): give the recipe's own --workdir, or delete it by hand")
  make_task_data.draw_problems(settings["task_seed"], settings["difficulty"], settings["task_counts"],
                               **settings["difficulty_overrides"])


# Written in a stage's directory before it samples or trains anything: which training of which stage it starts
# from. A rerun resumes an interrupted stage (its checkpoints, DPO pairs, reference log-probs) only from that one.
STARTED = "recipe_started.json"


def check_unfinished_stage(stage: str, parent: Optional[dict], workdir: str) -> None:
  """Before `stage` samples or trains: raises if its directory holds the unfinished work of a start from another
  parent than `parent` (a parent trained again, or a stage inserted or dropped, since it was interrupted); else
  records `parent` as the one it starts from."""
  stage_dir = os.path.join(workdir, stage)
  path = os.path.join(stage_dir, STARTED)
  if os.path.exists(path):
    with open(path) as f:
      check_lineage(stage, json.load(f), parent, workdir, unfinished=True)
    return
  if os.path.isdir(stage_dir) and os.listdir(stage_dir):
    log.warning("%s holds files of a %s stage started before recipes recorded where a stage starts from: it is "
                "resumed as it is; delete %s first if its parent was trained again since", stage_dir, stage,
                stage_dir)
  os.makedirs(stage_dir, exist_ok=True)
  tmp = f"{path}.tmp{jax.process_index()}"  # one per process: each may write it to a shared file system
  with open(tmp, "w") as f:
    json.dump({"name": stage, "parent": parent["name"] if parent else None,
               "parent_id": parent.get("stage_id") if parent else None}, f, indent=1)
  os.replace(tmp, path)


def run_stage(stage: str, index: int, workdir: str, init_from: Optional[str], settings: dict, eval_cfg: dict,
              rollout_cfg: dict, problems: list[dict], parent: Optional[dict] = None) -> dict:
  """Trains (or resumes) one stage and evaluates it; returns its record for summary.json."""
  stage_dir = os.path.join(workdir, stage)
  check_unfinished_stage(stage, parent, workdir)
  record: dict[str, Any] = {"name": stage, "init_from": init_from, "stage_id": uuid.uuid4().hex,
                            "parent": parent["name"] if parent else None,
                            "parent_id": parent.get("stage_id") if parent else None,
                            "stage_params": list(settings.get("stage_params", [])),
                            "stage_bindings": list(settings["stage_bindings"].get(stage, []))}
  bindings = stage_bindings(stage, workdir, init_from, settings)
  _configure(settings, stage, bindings)
  log.info("== stage %d/%d: %s (%s, %d steps)%s ==", index + 1, len(settings["stages"]), stage,
           common.train_settings()["stage"], common.train_settings()["loop"].num_steps,
           f" from {os.path.relpath(init_from, workdir)}" if init_from else " from random initialisation")
  started = time.time()
  params_from = stage_dir
  if stage == "dpo":
    record["rollouts"] = sample_dpo_pairs(workdir, init_from, settings, rollout_cfg)
    log.info("dpo rollouts: %d pairs from %d prompts (rollout accuracy %.3f)", record["rollouts"]["pairs"],
             record["rollouts"]["prompts"], record["rollouts"]["accuracy"])
    _configure(settings, stage, bindings)  # sampling read the config; start the stage from a fresh one
  # Pairs of the user's own (data.train_files bound through recipe.stage_bindings) train whatever the rollouts gave.
  own_pairs = stage == "dpo" and common.data()["train_files"] == [os.path.join(stage_dir, "pairs.jsonl")]
  if own_pairs and record["rollouts"]["pairs"] == 0:
    log.warning("no preference pairs (every prompt all right or all wrong): DPO is skipped, the params of %s go on",
                parent["name"] if parent else init_from)
    record["skipped"] = "no preference pairs"
    params_from = init_from
  else:
    common.run_training(stage_dir)
  record["train_seconds"] = time.time() - started
  _configure(settings, stage, bindings)
  started = time.time()
  record["eval"] = evaluate_stage(stage_dir, params_from, problems, eval_cfg)
  record["evaluation"] = evaluation_settings(settings, eval_cfg)
  record["eval_seconds"] = time.time() - started
  # Relative to the workdir, so a moved or copied workdir still finds the finished stages' params. A stage
  # interrupted there does not resume: its config.gin and checkpoints hold absolute paths (data.train_files,
  # data.tokenizer, train.init_from), and the changed data.train_files refuses the resume; deleting that stage's
  # directory trains it again from the start.
  record["params_from"] = os.path.relpath(params_from, workdir)
  _write_record(stage_dir, record)
  e = record["eval"]
  log.info("%s: accuracy %.3f [%.3f, %.3f] (greedy %.3f), %.1f response tokens, format errors %.3f", stage,
           e["accuracy"], *e["accuracy_ci95"], e.get("greedy_accuracy", float("nan")), e["response_tokens_mean"],
           e["format_error_rate"])
  return record


def _config_bindings(text: str) -> dict[str, str]:
  """{binding name: value} of the bindings in gin config text as `gin.config_str()` writes it (the top of a run's
  config.gin; comments skipped, a long value's continuation lines joined)."""
  entries, key = {}, None
  for line in text.splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    part = line.strip().removesuffix("\\").strip()
    if line[0].isspace() and key is not None:
      entries[key] = f"{entries[key]} {part}".strip()
    else:
      key, _, value = part.partition("=")  # a long value starts on the next line: "key = \"
      key = key.strip()
      entries[key] = value.strip()
  return entries


def stage_config_changes(settings: dict, workdir: str, stage: str, init_from: Optional[str]) -> list[str]:
  """'binding = value now, value when trained' for each setting that the config `stage` would train with now gives
  another value than its run's config.gin records (its <config_dir>/<stage>.gin edited, another recipe.config_dir,
  a binding of the command line and of recipe.stage_bindings applied in another order). The paths the recipe binds
  per stage are left out: they name the workdir, which may have moved. None where the stage wrote no config.gin (a
  DPO stage skipped for want of pairs)."""
  path = os.path.join(workdir, stage, "config.gin")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    was = _config_bindings(f.read())
  try:
    _configure(settings, stage, stage_bindings(stage, workdir, init_from, settings))
    now = _config_bindings(gin.config_str())
  finally:
    gin.clear_config()
  return [f"{key} = {now.get(key, '(unset)')} now, {was.get(key, '(unset)')} when trained"
          for key in sorted(set(was) | set(now)) if key not in PER_STAGE_KEYS and was.get(key) != now.get(key)]


def warn_if_stage_settings_changed(stage: str, record: dict, settings: dict, workdir: str,
                                   init_from: Optional[str]) -> None:
  """A finished stage is not trained again: warns where this run would train it with other settings than its
  record and config.gin hold (the --gin_param bindings, its recipe.stage_bindings entry, or else what its gin file
  and those give together)."""
  stage_dir = os.path.join(workdir, stage)
  warned = False
  for key, where in (("stage_params", "--gin_param bindings"), ("stage_bindings", "recipe.stage_bindings")):
    now = settings.get(key, []) if key == "stage_params" else settings["stage_bindings"].get(stage, [])
    if now != record.get(key, now if key == "stage_bindings" else []):
      log.warning("%s is not trained again, so its %s %s do not apply to it (it was trained with %s; delete %s "
                  "and the stage directories after it to retrain it with them: a later stage trained from the old "
                  "%s is refused)", stage, where, now, record.get(key), stage_dir, stage)
      warned = True
  changes = [] if warned else stage_config_changes(settings, workdir, stage, init_from)
  if changes:
    log.warning("%s is not trained again, so the settings %s/%s.gin and the recipe's bindings give it now do not "
                "apply to it: %s (its config.gin holds those it was trained with; delete %s and the stage "
                "directories after it to retrain it with them: a later stage trained from the old %s is refused)",
                stage, settings["config_dir"], stage, "; ".join(changes), stage_dir, stage)


def run_recipe(workdir: str, settings: dict, eval_cfg: dict, rollout_cfg: dict) -> dict:
  """Runs every stage not yet finished, then writes summary.json, report.md and the plots; returns the summary."""
  started = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  check_no_finished_stage_after_one_to_train(workdir, settings["stages"])
  manifest = prepare_data(workdir, settings)
  check_token_budgets(workdir, manifest, settings, eval_cfg, rollout_cfg)
  problems = rollouts.read_problems(os.path.join(workdir, "data", f"{settings['eval_split']}.jsonl"))
  records, init_from, parent = [], None, None
  evaluation = evaluation_settings(settings, eval_cfg)
  for index, stage in enumerate(settings["stages"]):
    stage_dir = os.path.join(workdir, stage)
    done = os.path.join(stage_dir, "recipe_stage.json")
    if os.path.exists(done):
      with open(done) as f:
        record = json.load(f)
      check_lineage(stage, record, parent, workdir)
      log.info("== stage %d/%d: %s already done (accuracy %.3f) ==", index + 1, len(settings["stages"]), stage,
               record["eval"]["accuracy"])
      warn_if_stage_settings_changed(stage, record, settings, workdir, init_from)
      if stage == "dpo" and "rollouts" in record:
        warn_if_rollouts_changed(record["rollouts"], settings, rollout_cfg, stage_dir)
      evaluated = record.get("evaluation")
      if evaluated is not None and "batch_size" not in evaluated:  # recorded before the batch size was
        evaluated = dict(evaluated, batch_size=evaluation["batch_size"])
      if evaluated != evaluation:
        # The report compares stages item by item under one set of evaluation settings.
        log.warning("%s was evaluated with %s; evaluating it again with %s", stage, record.get("evaluation"),
                    evaluation)
        # Under the config the params were trained with (their run's config.gin), not this run's bindings, which
        # were just said not to apply to the stage: a changed model override or system prompt would score those
        # params as another model.
        params_dir = os.path.join(workdir, record["params_from"])
        gin.clear_config()
        # What is about this run's machine and place, not the params, stays this run's: the tokenizer under the
        # workdir as it is now (a moved workdir), and a mesh given on the command line.
        here = [f"data.tokenizer={json.dumps(os.path.join(workdir, 'data', 'tokenizer'))}"]
        here += mesh_bindings(settings.get("stage_params", []))
        gin_bindings.parse_gin_for_checkpoint(params_dir, [], here)
        eval_started = time.time()
        record["eval"] = evaluate_stage(stage_dir, params_dir, problems, eval_cfg)
        record.update(evaluation=evaluation, eval_seconds=time.time() - eval_started)
        _write_record(stage_dir, record)
    else:
      record = run_stage(stage, index, workdir, init_from, settings, eval_cfg, rollout_cfg, problems, parent)
    records.append(record)
    init_from, parent = os.path.join(workdir, record["params_from"]), record
  gin.clear_config()
  summary = build_summary(workdir, records, manifest, settings, eval_cfg)
  summary["wall_seconds_this_run"] = time.time() - started
  write_report(workdir, summary)
  return summary


def read_metrics(stage_dir: str) -> list[dict]:
  path = os.path.join(stage_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def _model_params(workdir: str, stage: str) -> Optional[int]:
  path = os.path.join(workdir, stage, "config.gin")
  if not os.path.exists(path):
    return None
  gin.clear_config()
  gin_bindings.parse_gin([path], [])
  count = common.model()[0].num_params()
  gin.clear_config()
  return count


def _verdict(effect: dict) -> str:
  low, high = effect["ci95"]
  if low > 0:
    return "helped"
  if high < 0:
    return "hurt"
  return "no significant change"


def _pass_at_every_sample(items: Sequence[dict]) -> dict[str, float]:
  """{"n": pass@n} over the items' n samples each: the table's pass column, whatever evaluation.pass_k lists."""
  if not items or "samples" not in items[0]:
    return {}
  n = len(items[0]["samples"])
  return {str(n): float(np.mean([eval_lib.pass_at_k(n, sum(o["correct"] for o in item["samples"]), n)
                                 for item in items]))}


def build_summary(workdir: str, records: Sequence[dict], manifest: dict, settings: dict, eval_cfg: dict) -> dict:
  """summary.json: one entry per stage (accuracies with intervals, paired effects, lengths, training numbers)."""
  stages, previous_items, base_items = [], None, None
  for record in records:
    stage_dir = os.path.join(workdir, record["name"])
    items = eval_lib.read_items(os.path.join(stage_dir, "eval"))
    metrics = read_metrics(stage_dir)
    e = record["eval"]
    entry = {"name": record["name"], "accuracy": e["accuracy"], "accuracy_ci95": e["accuracy_ci95"],
             "greedy_accuracy": e.get("greedy_accuracy"), "greedy_accuracy_ci95": e.get("greedy_accuracy_ci95"),
             "pass_at_k": dict(e["pass_at_k"], **_pass_at_every_sample(items)),
             "response_tokens_mean": e["response_tokens_mean"],
             "format_error_rate": e["format_error_rate"], "think_format_rate": e["think_format_rate"],
             "num_eval": e["num_problems"], "steps": metrics[-1]["step"] if metrics else 0,
             # The last finite loss: a last step that trained no token (GRPO with every group dropped) logs null.
             "final_loss": next((r["loss"] for r in reversed(metrics) if r.get("loss") is not None), None),
             "train_seconds": record.get("train_seconds"), "eval_seconds": record.get("eval_seconds")}
    for key in ("rollouts", "skipped"):
      if key in record:
        entry[key] = record[key]
    # Every step carries the rollout numbers (reward_mean, groups_kept, ...) of the batch it trained on, each batch's
    # num_passes times alike; in runs written before that, only a batch's first step did, and counting the others
    # as zeros would scale the figures down by the number of passes. The quarters are quarters of the steps that
    # carry them.
    rollout_steps = [r for r in metrics if "reward_mean" in r] if record["name"] == "grpo" else []
    if rollout_steps:
      quarter = max(1, len(rollout_steps) // 4)
      head, tail = rollout_steps[:quarter], rollout_steps[-quarter:]
      entry["reward_mean_first_quarter"] = sum(r["reward_mean"] for r in head) / len(head)
      entry["reward_mean_last_quarter"] = sum(r["reward_mean"] for r in tail) / len(tail)
      kept = [r["groups_kept"] for r in metrics if "groups_kept" in r]
      entry["groups_kept_mean"] = sum(kept) / len(kept) if kept else None
    if previous_items is not None:
      entry["delta_vs_previous"] = eval_lib.paired_difference(items, previous_items)
      entry["delta_vs_previous"]["verdict"] = _verdict(entry["delta_vs_previous"])
      if "greedy" in items[0]:
        entry["greedy_delta_vs_previous"] = eval_lib.paired_difference(items, previous_items, key="greedy")
    if base_items is not None:
      entry["delta_vs_base"] = eval_lib.paired_difference(items, base_items)
    base_items = items if base_items is None else base_items
    previous_items = items
    stages.append(entry)
  return {"stages": stages, "workdir": workdir,
          "task": {"difficulty": settings["difficulty"], "difficulty_params": manifest["difficulty_params"],
                   "counts": manifest["counts"], "vocab_size": manifest["vocab_size"]},
          "model_params": _model_params(workdir, records[0]["name"]) if records else None,
          "evaluation": {"split": settings["eval_split"], "num_samples": eval_cfg["num_samples"],
                         "greedy": eval_cfg.get("greedy", True), "temperature": eval_cfg["sampling"].temperature,
                         "max_new_tokens": eval_cfg["sampling"].max_new_tokens}}


def _pct(value: Optional[float]) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def _interval(value: Optional[float], ci: Optional[Sequence[float]], signed: bool = False) -> str:
  if value is None:
    return "-"
  sign = "+" if signed and value >= 0 else ""
  return f"{sign}{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def stage_table(summary: dict) -> str:
  """The markdown stage table: accuracies in percent with 95% intervals, effects paired by problem."""
  n = summary["evaluation"]["num_samples"]
  lines = [f"| stage | steps | final loss | greedy acc. % [95% CI] | mean@{n} acc. % [95% CI] | "
           f"change vs previous, points [95% CI] | pass@{n} % | response tokens | format errors % |",
           "|---|---|---|---|---|---|---|---|---|"]
  for s in summary["stages"]:
    delta = s.get("delta_vs_previous")
    pass_k = s["pass_at_k"].get(str(n))
    loss = "-" if s["final_loss"] is None else f"{s['final_loss']:.3f}"
    lines.append(
        f"| {s['name']}{' (skipped)' if s.get('skipped') else ''} | {s['steps']} | {loss} | "
        f"{_interval(s['greedy_accuracy'], s['greedy_accuracy_ci95'])} | "
        f"{_interval(s['accuracy'], s['accuracy_ci95'])} | "
        f"{_interval(delta['delta'], delta['ci95'], signed=True) if delta else '-'} | {_pct(pass_k)} | "
        f"{s['response_tokens_mean']:.1f} | {_pct(s['format_error_rate'])} |")
  return "\n".join(lines)


def findings(summary: dict) -> list[str]:
  """One sentence per stage on whether it changed held-out accuracy, judged by its paired 95% interval."""
  out = []
  stages = summary["stages"]
  for s in stages[1:]:
    d = s["delta_vs_previous"]
    if s.get("skipped"):
      out.append(f"- **{s['name']}** was skipped ({s['skipped']}).")
      continue
    change = {"helped": "raised", "hurt": "lowered", "no significant change": "did not significantly change"}
    out.append(f"- **{s['name']}** {change[d['verdict']]} mean accuracy: {_interval(d['delta'], d['ci95'], True)} "
               "points.")
  if len(stages) > 1:
    d = stages[-1]["delta_vs_base"]
    out.append(f"- The full recipe vs the base model: {_interval(d['delta'], d['ci95'], True)} points "
               f"({_pct(stages[0]['accuracy'])}% -> {_pct(stages[-1]['accuracy'])}%).")
  return out


def write_plots(workdir: str, summary: dict) -> list[str]:
  """loss.png (training loss per stage), grpo.png (reward and response length per step), accuracy.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  stages = summary["stages"]
  fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
  for ax, s in zip(axes[0], stages):
    metrics = read_metrics(os.path.join(workdir, s["name"]))
    ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics], marker=".", markersize=3)
    ax.set_title(s["name"] + (" (skipped)" if s.get("skipped") else ""))
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("training loss")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "loss.png"), dpi=90)
  plt.close(fig)
  written.append("loss.png")

  grpo = read_metrics(os.path.join(workdir, "grpo")) if any(s["name"] == "grpo" for s in stages) else []
  if grpo:
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    # The steps that carry the field: in runs written before every step carried its rollout batch's figures, only a
    # batch's first step did, and NaN gaps at the others would leave the curves as unconnected points.
    series = lambda key: ([r["step"] for r in grpo if key in r], [r[key] for r in grpo if key in r])
    axes[0].plot(*series("reward_mean"), marker=".", label="reward")
    axes[0].plot(*series("accuracy"), marker=".", label="rollout accuracy", alpha=0.7)
    axes[0].legend()
    axes[1].plot(*series("response_length_mean"), marker=".")
    axes[1].set_ylabel("response tokens")
    for ax in axes:
      ax.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "grpo.png"), dpi=90)
    plt.close(fig)
    written.append("grpo.png")

  fig, ax = plt.subplots(figsize=(1.2 * len(stages) + 2.5, 3))
  x = range(len(stages))
  acc = [100 * s["accuracy"] for s in stages]
  err = [[100 * (s["accuracy"] - s["accuracy_ci95"][0]) for s in stages],
         [100 * (s["accuracy_ci95"][1] - s["accuracy"]) for s in stages]]
  ax.bar(x, acc, yerr=err, capsize=4, label=f"mean@{summary['evaluation']['num_samples']}")
  if all(s["greedy_accuracy"] is not None for s in stages):
    ax.plot(x, [100 * s["greedy_accuracy"] for s in stages], "ko", label="greedy")
  ax.set_xticks(list(x), [s["name"] for s in stages])
  ax.set_ylabel(f"{summary['evaluation']['split']} accuracy %")
  ax.set_ylim(0, 100)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy.png"), dpi=90)
  plt.close(fig)
  written.append("accuracy.png")
  return written


def write_report(workdir: str, summary: dict) -> None:
  """summary.json, the plots and report.md."""
  plots = write_plots(workdir, summary)
  summary["plots"] = plots
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  ev, task, level = summary["evaluation"], summary["task"], summary["task"]["difficulty_params"]
  lines = ["# phi_jax reasoning recipe", "",
           f"A {summary['model_params'] or '?'}-parameter model through the Phi-4-mini-reasoning stages on the "
           f"embedded word-problem task ({task['difficulty']}, {level['min_steps']}-{level['max_steps']} operations, "
           f"values up to {level['max_value']})."
           f" Held-out {ev['split']} split: {summary['stages'][0]['num_eval'] if summary['stages'] else 0} problems, "
           f"{'greedy and ' if ev.get('greedy', True) else ''}{ev['num_samples']} samples each at temperature "
           f"{ev['temperature']}, at most "
           f"{ev['max_new_tokens']} new tokens; intervals are 95% normal intervals over problems, changes are paired "
           "by problem.", "", "## Stage table", "", stage_table(summary), "", "## What each stage did", ""]
  lines += findings(summary)
  for s in summary["stages"]:
    if "rollouts" in s:
      r = s["rollouts"]
      lines += ["", f"DPO rollouts: {r['k']} per prompt on {r['prompts']} prompts, rollout accuracy "
                f"{_pct(r['accuracy'])}%, {r['pairs']} pairs ({r['prompts_all_correct']} prompts all correct, "
                f"{r['prompts_all_wrong']} all wrong)."]
    if "reward_mean_first_quarter" in s:
      lines += ["", f"GRPO: mean reward {s['reward_mean_first_quarter']:.3f} in the first quarter of the steps, "
                f"{s['reward_mean_last_quarter']:.3f} in the last; {_pct(s['groups_kept_mean'])}% of the groups "
                "passed the GRPO filters (reward variance, group accuracy, length spread) and trained."]
  lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
  # Seconds of the attempt that finished each stage: one interrupted and resumed counts from its resume.
  lines += ["", "## Time", "", "Seconds of the attempt that finished each stage (a resumed stage's count from its "
            "resume).", "", "| stage | train s | eval s |", "|---|---|---|"]
  lines += [f"| {s['name']} | {s['train_seconds'] or 0:.0f} | {s['eval_seconds'] or 0:.0f} |"
            for s in summary["stages"]]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="everything goes here; re-running resumes")
  parser.add_argument("--quick", action="store_true", help="the smoke run: tiny data, a few steps per stage")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="recipe gin file(s) (recipe.*, evaluation.*, rollouts.*), from the current directory or "
                      "else the repository root; default recipe_tiny/recipe.gin (quick.gin with --quick)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding 'k=v' (repeatable): recipe.*, evaluation.*, rollouts.* configure the recipe, "
                      "any other applies to every stage trained (see above)")
  parser.add_argument("--fresh", action="store_true", help="delete --workdir (a recipe's workdir) first instead of "
                      "resuming, once the settings are checked and the task data can be made")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.quick and args.gin_file:
    raise ValueError("--quick picks experiments/configs/recipe_tiny/quick.gin as the recipe's gin file, and --gin_file "
                     "replaces it: include 'experiments/configs/recipe_tiny/quick.gin' in your file instead of --quick")
  distributed.initialize()  # before any JAX call; the stages' own calls then do nothing
  if jax.process_count() > 1:
    raise ValueError(f"recipe.py runs in one process (it writes the task data, the stage records and the report "
                     f"itself), not {jax.process_count()}: on several hosts, run its stages one by one with "
                     "experiments/train.py, each with train.init_from set to the workdir of the stage before it")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  workdir = os.path.abspath(args.workdir)
  # A --gin_file found from the caller's directory is read from there; any other (experiments/configs/...) from the
  # repository root, as before.
  gin_files = [os.path.abspath(path) if os.path.exists(path) else path for path in args.gin_file]
  caller_dir = os.getcwd()
  os.chdir(ROOT)  # gin files include each other by repository-relative paths
  default = os.path.join("experiments/configs/recipe_tiny", "quick.gin" if args.quick else "recipe.gin")
  settings, eval_cfg, rollout_cfg = configure(gin_files or [default], args.gin_param, caller_dir=caller_dir,
                                              workdir=None if args.fresh else workdir)
  if args.fresh and os.path.exists(workdir):  # only once the settings are known to be good
    check_fresh_workdir(workdir, settings)
    shutil.rmtree(workdir)
  log.info("recipe: %d devices (%s); stages %s", jax.device_count(), jax.devices()[0].platform, settings["stages"])
  summary = run_recipe(workdir, settings, eval_cfg, rollout_cfg)
  print(stage_table(summary))
  print(f"\nreport: {os.path.join(workdir, 'report.md')}")
  return summary


if __name__ == "__main__":
  main()
