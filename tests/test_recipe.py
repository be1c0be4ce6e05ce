"""The recipe runner: the quick smoke run of all five stages end to end (files, stage table, numbers in range),
then a re-run that skips every finished stage; and the recipe's settings and stage chaining."""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import filelock
import pytest
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import recipe  # noqa: E402  (first: it sets up XLA before jax loads)
import common  # noqa: E402
import gin  # noqa: E402
from phi_jax.tasks import word_problems  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_notebooks import execute_notebook  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices=2))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "recipe.py"), f"--workdir={workdir}",
                         "--quick", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


# The tests of this module share one xdist worker: the smoke run below is then made once and nobody waits for it
# (the lock still makes it once per session when the tests are spread some other way).
pytestmark = pytest.mark.xdist_group("recipe_smoke")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One quick recipe run per test session, shared by the xdist workers (the first to arrive runs it)."""
  # Under xdist the parent of a worker's basetemp is the session's directory, the same for every worker; without
  # xdist the parent is shared by every session (pytest-of-<user>), so the session's own basetemp is used.
  basetemp = tmp_path_factory.getbasetemp()
  shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
  workdir = shared / "recipe_smoke"
  with filelock.FileLock(str(shared / "recipe_smoke.lock")):
    if not (workdir / "stdout.txt").exists():
      workdir.mkdir(exist_ok=True)
      (workdir / "stdout.txt").write_text(_run(workdir))
  return workdir, (workdir / "stdout.txt").read_text()


@pytest.mark.slow
def test_quick_recipe_writes_summary_report_and_plots(smoke):
  workdir, stdout = smoke
  summary = json.loads((workdir / "summary.json").read_text())
  names = [s["name"] for s in summary["stages"]]
  assert names == list(recipe.STAGES)
  for s in summary["stages"]:
    for key in ("accuracy", "greedy_accuracy", "format_error_rate", "think_format_rate"):
      assert 0.0 <= s[key] <= 1.0, (s["name"], key)
    assert s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
    assert 1 <= s["response_tokens_mean"] <= summary["evaluation"]["max_new_tokens"]
    assert s["num_eval"] == 16
    if s["name"] != "base":
      low, high = s["delta_vs_previous"]["ci95"]
      assert -1.0 <= low <= s["delta_vs_previous"]["delta"] <= high <= 1.0
    stage_dir = workdir / s["name"]
    assert (stage_dir / "eval" / "items.jsonl").read_text().count("\n") == 16
    if not s.get("skipped"):
      assert s["steps"] >= 2 and os.path.isdir(stage_dir / "params")
  assert [s["steps"] for s in summary["stages"] if not s.get("skipped")] == \
      [n for n, s in zip((4, 4, 3, 2, 2), summary["stages"]) if not s.get("skipped")]
  grpo = [json.loads(line) for line in (workdir / "grpo" / "metrics.jsonl").read_text().splitlines()]
  assert all("reward_mean" in r and "response_length_mean" in r for r in grpo)
  report = (workdir / "report.md").read_text()
  assert "| stage | steps |" in report
  table = [line for line in report.splitlines() if line.startswith("| ") and "|---" not in line]
  assert [row.split("|")[1].split()[0] for row in table[1:6]] == list(recipe.STAGES)
  for plot in summary["plots"]:
    assert plot in report and (workdir / plot).read_bytes()[:8] == PNG_MAGIC
  assert {"loss.png", "grpo.png", "accuracy.png"} <= set(summary["plots"])
  assert "== stage 5/5: grpo" in stdout and "| base |" in stdout  # progress, then the table


@pytest.mark.slow
def test_rerun_skips_finished_stages(smoke, tmp_path):
  # A copy: the other tests read the shared run while this one rewrites its summary.
  workdir = tmp_path / "rerun"
  shutil.copytree(smoke[0], workdir)
  before = json.loads((workdir / "summary.json").read_text())
  stdout = _run(workdir)
  assert stdout.count("already done") == len(recipe.STAGES)
  assert "step " not in stdout  # nothing trained again
  after = json.loads((workdir / "summary.json").read_text())
  assert [s["accuracy"] for s in after["stages"]] == [s["accuracy"] for s in before["stages"]]


@pytest.mark.slow
def test_a_finished_stage_evaluated_again_is_scored_as_it_was_trained(smoke, tmp_path, monkeypatch, caplog):
  """Changed evaluation settings evaluate the finished stages again, under the config each stage's params were
  trained with: a training binding of this rerun (here a model override), which does not apply to finished stages,
  used to reach their evaluation. The tokenizer is the moved workdir's own. Changed rollout settings keep the DPO
  pairs, and say so."""
  workdir = tmp_path / "again"
  shutil.copytree(smoke[0], workdir)
  for config_gin in workdir.glob("*/config.gin"):  # as if moved: the paths written in the stages' configs are gone
    config_gin.write_text(config_gin.read_text().replace(str(smoke[0]), "/no/longer/here"))
  monkeypatch.chdir(ROOT)
  settings, eval_cfg, rollout_cfg = recipe.configure(
      ["experiments/configs/recipe_tiny/quick.gin"],
      ["evaluation.seed=5", 'model.overrides={"rope_theta": 1234.0}', "recipe.rollout_k=4"])
  seen = []

  def evaluate(stage_dir, params_from, problems, eval_cfg):  # the config at evaluation time; the old results
    assert os.path.isdir(common.data()["tokenizer"])  # the moved workdir's own tokenizer
    seen.append(common.model()[0].rope_theta)
    return json.loads((workdir / os.path.basename(stage_dir) / "recipe_stage.json").read_text())["eval"]

  monkeypatch.setattr(recipe, "evaluate_stage", evaluate)
  try:
    recipe.run_recipe(str(workdir), settings, eval_cfg, rollout_cfg)
  finally:
    gin.clear_config()
  assert len(seen) == len(recipe.STAGES) and 1234.0 not in seen
  assert "the DPO pairs in" in caplog.text and "'k': 8" in caplog.text and "'k': 4" in caplog.text


@pytest.mark.slow
def test_walkthrough_notebook_runs_on_the_smoke_run(smoke, monkeypatch):
  workdir, _ = smoke
  monkeypatch.setenv("PHI_JAX_RECIPE_WORKDIR", str(workdir))
  nb = execute_notebook("recipe_walkthrough.ipynb")
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert outputs.count("already done") == len(recipe.STAGES)  # it read the smoke run and trained nothing
  assert "loss=" not in outputs


def test_a_finished_stage_of_another_lineage_is_refused_not_reused(tmp_path):
  """Inserting a stage, dropping one, or training a parent again leaves a finished stage trained from something
  else: reused, its evaluation and the report's change vs previous would describe another lineage."""
  base = {"name": "base", "stage_id": "b1", "parent": None, "parent_id": None, "params_from": "base"}
  sft = {"name": "sft", "stage_id": "s1", "parent": "base", "parent_id": "b1", "init_from": "/w/base"}
  recipe.check_lineage("sft", sft, base, str(tmp_path))  # the lineage it was trained in
  midtrain = {"name": "midtrain", "stage_id": "m1", "params_from": "midtrain"}
  for parent, was in ((midtrain, "base"), (dict(base, stage_id="b2"), "training b1"), (None, "base")):
    with pytest.raises(ValueError, match=f"sft in .* was trained from .*{was}.*Delete .* finished or interrupted"):
      recipe.check_lineage("sft", sft, parent, str(tmp_path))
  # Records from before lineage was recorded: the starting point's directory decides.
  old = {"name": "sft", "init_from": "/elsewhere/base"}
  recipe.check_lineage("sft", old, {"name": "base", "params_from": "base"}, str(tmp_path))
  with pytest.raises(ValueError, match="trained from base, but this recipe trains it from midtrain"):
    recipe.check_lineage("sft", old, midtrain, str(tmp_path))


def test_a_finished_stage_after_one_that_would_train_is_refused_before_anything_trains(tmp_path):
  """A stage's directory deleted to retrain it (as a finished stage's changed settings advise) trained it, and then
  the finished stage after it was refused as another lineage's, hours later on the real recipe."""
  for stage in ("base", "sft", "dpo"):
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "recipe_stage.json").write_text("{}")
  stages = ["base", "midtrain", "sft", "dpo", "grpo"]  # midtrain inserted (or deleted); grpo not yet trained
  with pytest.raises(ValueError, match=r"sft in .*/sft is finished, but midtrain, a stage before it, is not and would "
                     r"train now.*Delete .*/sft and the stage directories after it"):
    recipe.check_no_finished_stage_after_one_to_train(str(tmp_path), stages)
  recipe.check_no_finished_stage_after_one_to_train(str(tmp_path), ["base", "sft", "dpo", "grpo"])  # resumes
  (tmp_path / "sft" / "recipe_stage.json").unlink()  # sft to retrain, dpo after it finished
  with pytest.raises(ValueError, match=r"dpo in .* is finished, but sft"):
    recipe.check_no_finished_stage_after_one_to_train(str(tmp_path), ["base", "sft", "dpo"])


def test_an_interrupted_stage_started_from_another_parent_is_refused_not_resumed(monkeypatch, tmp_path):
  """DPO interrupted, then SFT deleted and trained again: the rerun resumed DPO's checkpoint and reused its pairs and
  reference log-probs, all made from the earlier SFT, and named the new SFT as the finished DPO's parent."""
  monkeypatch.chdir(ROOT)  # the stage files include each other by repository-relative paths
  settings = recipe.recipe_settings()
  sft = {"name": "sft", "stage_id": "s1", "params_from": "sft"}
  dpo_dir = tmp_path / "dpo"

  class Interrupted(Exception):
    pass

  def interrupted_sampling(*args, **kwargs):
    assert (dpo_dir / recipe.STARTED).exists()  # the parent is recorded before anything is sampled or trained
    (dpo_dir / "pairs.jsonl").write_text("")
    raise Interrupted

  monkeypatch.setattr(recipe, "sample_dpo_pairs", interrupted_sampling)
  run = lambda parent: recipe.run_stage("dpo", 3, str(tmp_path), str(tmp_path / "sft"), settings, {}, {}, [], parent)
  try:
    for _ in range(2):  # started, then resumed from the same SFT
      with pytest.raises(Interrupted):
        run(sft)
    for parent, now in ((dict(sft, stage_id="s2"), r"sft \(training s2\)"),
                        ({"name": "midtrain", "stage_id": "m1"}, r"midtrain \(training m1\)")):
      with pytest.raises(ValueError, match=rf"{re.escape(str(dpo_dir))} holds an unfinished dpo stage started from "
                                           rf"sft \(training s1\), but this recipe trains dpo from {now}.*Delete "
                                           rf"{re.escape(str(dpo_dir))} "):
        run(parent)
  finally:
    gin.clear_config()
  # A stage directory from before starts were recorded cannot be checked: it is resumed, and recorded from now on.
  (tmp_path / "grpo" / "checkpoints").mkdir(parents=True)
  recipe.check_unfinished_stage("grpo", {"name": "dpo", "stage_id": "d1"}, str(tmp_path))
  with pytest.raises(ValueError, match="unfinished grpo stage started from dpo"):
    recipe.check_unfinished_stage("grpo", {"name": "dpo", "stage_id": "d2"}, str(tmp_path))


def test_quick_with_a_gin_file_or_several_processes_is_refused(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="--quick picks experiments/configs/recipe_tiny/quick.gin"):
    recipe.main([f"--workdir={tmp_path}", "--quick", "--gin_file=experiments/configs/recipe_tiny/recipe.gin"])
  monkeypatch.setattr(recipe.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="recipe.py runs in one process"):
    recipe.main([f"--workdir={tmp_path}", "--quick"])
  assert not os.listdir(tmp_path)  # nothing written


def test_fresh_deletes_only_a_recipe_workdir_and_only_once_its_task_data_can_be_made(tmp_path, monkeypatch):
  """--fresh deleted whatever --workdir named, and a count the difficulty cannot fill was found after the deletion."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(recipe, "run_recipe", lambda *a: pytest.fail("the recipe ran"))
  run = tmp_path / "a_train_run"
  (run / "params").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"--fresh deletes a recipe's workdir, and .*a_train_run is not one"):
    recipe.main([f"--workdir={run}", "--fresh", "--quick"])
  assert (run / "params").is_dir()
  demo = tmp_path / "demo"
  (demo / "data").mkdir(parents=True)
  (demo / "data" / "manifest.json").write_text("{}")
  with pytest.raises(ValueError, match=r"(valid|test): 200 problems of the 'easy' difficulty cannot be made"):
    recipe.main([f"--workdir={demo}", "--fresh", "--gin_param=recipe.difficulty='easy'",
                 "--gin_param=recipe.task_counts={'test': 200}"])
  assert (demo / "data" / "manifest.json").exists()


def test_a_config_dir_found_from_the_callers_directory_is_read_from_there(tmp_path, monkeypatch):
  shutil.copytree(os.path.join(ROOT, "experiments/configs/recipe_tiny"), tmp_path / "my_cfg")
  monkeypatch.chdir(tmp_path)
  ran = {}
  monkeypatch.setattr(recipe, "run_recipe", lambda workdir, settings, *a: ran.update(settings) or {})
  monkeypatch.setattr(recipe, "stage_table", lambda summary: "")
  recipe.main([f"--workdir={tmp_path / 'w'}", "--quick", "--gin_param=recipe.config_dir='my_cfg'"])
  assert ran["config_dir"] == str(tmp_path / "my_cfg")
  # The repository's own configs come first: another checkout's copy in the caller's directory is not read.
  shutil.copytree(tmp_path / "my_cfg", tmp_path / "experiments" / "configs" / "recipe_tiny")
  recipe.main([f"--workdir={tmp_path / 'w'}", "--quick"])
  assert ran["config_dir"] == "experiments/configs/recipe_tiny"


def test_relative_paths_in_bindings_are_read_from_the_callers_directory_and_checked_before_any_stage_trains(
    tmp_path, monkeypatch):
  """`cd mydir && recipe.py --gin_param='recipe.stage_bindings={"grpo": ["data.train_files=[\\"my_prompts.jsonl\\"]"]}'`
  read my_prompts.jsonl from the repository root: base to dpo trained, then GRPO failed on "no such file"."""
  (tmp_path / "my_prompts.jsonl").write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
  (tmp_path / "my_eval.jsonl").write_text('{"text": "x"}\n')
  monkeypatch.chdir(tmp_path)
  ran = {}
  monkeypatch.setattr(recipe, "run_recipe", lambda workdir, settings, *a: ran.update(settings) or {})
  monkeypatch.setattr(recipe, "stage_table", lambda summary: "")
  own = {"grpo": ['data.train_files=["my_prompts.jsonl"]'], "midtrain": ["data.eval_files='my_eval.jsonl'"]}
  recipe.main([f"--workdir={tmp_path / 'w'}", "--quick", f"--gin_param=recipe.stage_bindings={json.dumps(own)}"])
  assert ran["stage_bindings"]["grpo"][-1] == f"data.train_files={json.dumps([str(tmp_path / 'my_prompts.jsonl')])}"
  assert ran["stage_bindings"]["midtrain"][-1] == f"data.eval_files={json.dumps(str(tmp_path / 'my_eval.jsonl'))}"
  assert ran["stage_bindings"]["sft"] == ["train.num_steps=3"]  # the recipe's own bindings as they were
  # A path found in neither the caller's directory nor the repository root is refused before any stage trains.
  for stage, binding, name in (("grpo", 'data.train_files=["my_prompt.jsonl"]', "data.train_files"),
                               ("grpo", 'train.init_from="runs/no_such_run"', "train.init_from"),
                               ("midtrain", 'data.eval_files=["no_eval.jsonl"]', "data.eval_files")):
    ran.clear()
    with pytest.raises(ValueError, match=rf"the {stage} stage refuses .*{name} .*no such file"):
      recipe.main([f"--workdir={tmp_path / 'w'}", "--quick",
                   f"--gin_param=recipe.stage_bindings={json.dumps({stage: [binding]})}"])
    assert not ran
  # A stage finished in the workdir is not trained again: its files may be gone.
  (tmp_path / "w" / "midtrain").mkdir(parents=True)
  (tmp_path / "w" / "midtrain" / "recipe_stage.json").write_text("{}")
  gone = json.dumps({"midtrain": ['data.eval_files=["gone.jsonl"]']})
  recipe.main([f"--workdir={tmp_path / 'w'}", "--quick", f"--gin_param=recipe.stage_bindings={gone}"])
  assert ran
  # A path found from the repository root (and not the caller's directory) is read from there, as before, and one
  # given from the repository root stays as it was given.
  for caller_dir in (tmp_path, ROOT):
    settings = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"], [
        'recipe.stage_bindings={"midtrain": ["data.eval_files=[\\"experiments/data/tiny_traces_train.jsonl\\"]"]}'],
        caller_dir=str(caller_dir))[0]
    assert settings["stage_bindings"]["midtrain"][-1] == (
        'data.eval_files=["experiments/data/tiny_traces_train.jsonl"]'), caller_dir
  gin.clear_config()


def test_the_path_valued_settings_of_a_binding_are_resolved_from_the_callers_directory(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "tok").mkdir()
  (tmp_path / "a1.jsonl").write_text("")
  resolve = lambda binding: recipe.resolve_binding_paths(binding, str(tmp_path))
  assert resolve('model.hf_path="ckpt"') == f"model.hf_path={json.dumps(str(tmp_path / 'ckpt'))}"
  assert resolve("data.tokenizer='tok'") == f"data.tokenizer={json.dumps(str(tmp_path / 'tok'))}"
  assert resolve('data.train_files=["a*.jsonl", "elsewhere.jsonl"]') == (
      f"data.train_files={json.dumps([str(tmp_path / 'a*.jsonl'), 'elsewhere.jsonl'])}")
  for kept in ('data.tokenizer="tiny:phi-4"', "train.num_steps=3", f'train.init_from="{tmp_path}"',
               'data.system_prompt="ckpt"', "model.hf_path=None"):
    assert resolve(kept) == kept


def test_mesh_bindings_are_found_in_any_spelling():
  params = ['mesh.shape={"fsdp": 2}', 'common.mesh.shape = {"data": 1}', "train.num_steps=3", "meshy.x=1"]
  assert recipe.mesh_bindings(params) == params[:2]


@pytest.mark.parametrize("binding,message", [
    ('recipe.difficulty="Hard"', "unknown difficulty 'Hard'"),
    ('recipe.difficulty_overrides={"max_step": 4}', r"names \['max_step'\], which are not difficulty parameters"),
    ('recipe.difficulty_overrides={"min_steps": 4}', "need 1 <= min_steps <= max_steps"),
    ('recipe.task_counts={"sft": 10000}', r"sft=10000 exceeds midtrain=\d+: the SFT data is a subset"),
    ('recipe.task_counts={"base_train": -1}', r"task counts must be >= 0, got \{'base_train': -1\}"),
])
def test_bad_task_settings_are_refused_before_fresh_deletes_the_workdir(tmp_path, monkeypatch, binding, message):
  monkeypatch.chdir(ROOT)  # main moves to the repository root; this puts the test's directory back after
  (tmp_path / "sft").mkdir(parents=True)
  (tmp_path / "sft" / "marker").write_text("a trained stage")
  with pytest.raises(ValueError, match=message):
    recipe.main([f"--workdir={tmp_path}", "--fresh", f"--gin_param={binding}"])
  assert (tmp_path / "sft" / "marker").exists()


def test_settings_reject_unknown_or_reordered_stages():
  assert recipe.recipe_settings(stages=["base", "sft"])["stages"] == ["base", "sft"]
  with pytest.raises(ValueError, match="in that order"):
    recipe.recipe_settings(stages=["sft", "base"])
  with pytest.raises(ValueError, match="in that order"):
    recipe.recipe_settings(stages=["base", "pretrain"])
  with pytest.raises(ValueError, match="starts at 'dpo'"):  # its pairs are rollouts of the stage before it
    recipe.recipe_settings(stages=["dpo", "grpo"])
  with pytest.raises(ValueError, match="in that order"):  # no stage at all (it failed at the end, plotting)
    recipe.recipe_settings(stages=[])


def test_task_counts_must_name_task_files():
  assert recipe.recipe_settings(task_counts={"rl_prompts": 4})["task_counts"]["rl_prompts"] == 4
  with pytest.raises(ValueError, match=r"recipe.task_counts has \['dpo', 'rl'\], which are not task files"):
    recipe.recipe_settings(task_counts={"rl": 4, "dpo": 2})  # the defaults were used without a word


@pytest.mark.parametrize("kwargs,match", [
    (dict(rollout_k=1), r"recipe.rollout_k=1: the dpo stage's pairs need at least 2 rollouts per prompt"),
    (dict(task_counts={"dpo_prompts": 0}), r"recipe.task_counts\['dpo_prompts'\]=0: the dpo stage"),
    (dict(task_counts={"rl_prompts": 0}), r"recipe.task_counts\['rl_prompts'\]=0: the grpo stage"),
    (dict(task_counts={"test": 0}), r"recipe.task_counts\['test'\]=0: recipe.eval_split='test'"),
    (dict(eval_split="valid", task_counts={"valid": 0}), r"recipe.task_counts\['valid'\]=0: recipe.eval_split"),
])
def test_settings_dpo_grpo_or_the_evaluation_cannot_run_with_are_refused_up_front(kwargs, match):
  """Accepted until DPO's rollouts, GRPO or the first evaluation started, after the stages before had trained."""
  with pytest.raises(ValueError, match=match):
    recipe.recipe_settings(**kwargs)


def test_settings_only_a_stage_left_out_or_given_its_own_data_cannot_run_with_are_accepted():
  assert recipe.recipe_settings(stages=["base", "midtrain", "sft"], rollout_k=1)["rollout_k"] == 1
  assert recipe.recipe_settings(stages=["base", "midtrain", "sft", "dpo"],
                                task_counts={"rl_prompts": 0})["task_counts"]["rl_prompts"] == 0
  own = {"grpo": ['data.train_files=["my_prompts.jsonl"]']}
  assert recipe.recipe_settings(task_counts={"rl_prompts": 0}, stage_bindings=own)["task_counts"]["rl_prompts"] == 0
  assert recipe.recipe_settings(eval_split="valid", task_counts={"test": 0})["task_counts"]["test"] == 0


@pytest.mark.parametrize("param", ["rollouts.temperature=0.0", "rollouts.top_k=1"])
def test_greedy_dpo_rollouts_that_can_never_make_a_pair_are_refused_up_front(monkeypatch, param):
  """k identical greedy rollouts of a prompt are all right or all wrong: DPO got no pair, after three stages."""
  monkeypatch.chdir(ROOT)
  quick = "experiments/configs/recipe_tiny/quick.gin"
  try:
    greedy = re.escape(param.split('=')[0])
    with pytest.raises(ValueError, match=rf"{greedy}=.* with recipe.rollout_k=8: the 8 rollouts of a problem would be "
                       "identical"):
      recipe.configure([quick], [param])
    # Without DPO, or with one rollout per prompt there is nothing to refuse (one rollout is refused on its own).
    settings, _, _ = recipe.configure([quick], [param, 'recipe.stages=["base"]'])
    assert settings["stages"] == ["base"]
  finally:
    gin.clear_config()


def test_each_stage_starts_from_the_previous_one_and_reads_its_own_data(tmp_path):
  settings = recipe.recipe_settings(stage_bindings={"sft": ["train.num_steps=7"]})
  sft = recipe.stage_bindings("sft", str(tmp_path), str(tmp_path / "midtrain"), settings)
  assert f'train.init_from="{tmp_path / "midtrain"}"' in sft
  assert f'data.train_files=["{tmp_path / "data" / "sft.jsonl"}"]' in sft
  assert sft[-1] == "train.num_steps=7"
  dpo = recipe.stage_bindings("dpo", str(tmp_path), str(tmp_path / "sft"), settings)
  assert f'data.train_files=["{tmp_path / "dpo" / "pairs.jsonl"}"]' in dpo
  assert not any("init_from" in b for b in recipe.stage_bindings("base", str(tmp_path), None, settings))


def test_stage_bindings_for_a_name_that_is_no_stage_are_refused():
  with pytest.raises(ValueError, match=r"\['mid_train'\], which are not stages: use the names \['base', 'midtrain'"):
    recipe.recipe_settings(stage_bindings={"mid_train": ["train.num_steps=1"]})
  with pytest.raises(ValueError, match="must be a list of binding strings"):
    recipe.recipe_settings(stage_bindings={"sft": [3]})
  assert recipe.recipe_settings(stage_bindings={"sft": "train.num_steps=1"})["stage_bindings"]["sft"] == [
      "train.num_steps=1"]  # one string is a list of one
  # A stage this run leaves out is still a stage: quick.gin binds all five, and may run fewer.
  assert recipe.recipe_settings(stages=["base"], stage_bindings={"grpo": ["train.num_steps=1"]})["stages"] == ["base"]


def test_command_line_training_bindings_reach_every_stage(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)  # gin files include each other by repository-relative paths
  settings, _, rollout_cfg = recipe.configure(
      ["experiments/configs/recipe_tiny/recipe.gin"],
      ["train.num_steps=1", 'model.overrides={"num_layers": 1}', "rollouts.batch_size=8",
       'recipe.stage_bindings={"sft": ["train.num_steps=7"]}'])
  assert rollout_cfg["batch_size"] == 8 and settings["stage_params"] == ["train.num_steps=1",
                                                                          'model.overrides={"num_layers": 1}']
  try:
    for stage, steps in (("base", 1), ("midtrain", 1), ("sft", 7)):  # the stage's own entry comes last and wins
      recipe._configure(settings, stage, recipe.stage_bindings(stage, str(tmp_path), None, settings))
      assert common.train_settings()["loop"].num_steps == steps, stage
      assert common.model()[0].num_layers == 1, stage
  finally:
    gin.clear_config()


def test_command_line_recipe_dicts_add_to_the_files(monkeypatch):
  """A binding for one stage, or one task count, given on the command line keeps the file's other entries: it used
  to replace quick.gin's whole dict, turning the one-minute smoke run into minutes of default step counts."""
  monkeypatch.chdir(ROOT)
  try:
    settings, _, _ = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"],
                                      ['recipe.stage_bindings={"sft": ["train.num_steps=5"]}',
                                       'recipe.task_counts={"valid": 8}'])
    assert settings["stage_bindings"]["base"] == ["train.num_steps=4"]
    assert settings["stage_bindings"]["sft"] == ["train.num_steps=3", "train.num_steps=5"]  # the later one wins
    assert settings["task_counts"]["valid"] == 8 and settings["task_counts"]["base_train"] == 64
    # One flag per stage or count: each adds (gin alone keeps only the last binding of a name).
    settings, _, _ = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"],
                                      ['recipe.stage_bindings={"sft": ["train.num_steps=5"]}',
                                       'recipe.stage_bindings={"dpo": ["train.num_steps=7"]}',
                                       'recipe.task_counts={"valid": 8}', 'recipe.task_counts={"test": 40}'])
    assert settings["stage_bindings"]["sft"] == ["train.num_steps=3", "train.num_steps=5"]
    assert settings["stage_bindings"]["dpo"] == ["train.num_steps=2", "train.num_steps=7"]
    assert settings["task_counts"]["valid"] == 8 and settings["task_counts"]["test"] == 40
  finally:
    gin.clear_config()


def test_a_macro_in_a_files_recipe_dict_takes_its_command_line_value(monkeypatch, tmp_path):
  """The file's dict is merged with the command line's and bound again: a macro inside it must keep the value a
  --gin_param gives the macro, not the file's."""
  monkeypatch.chdir(ROOT)
  counts = tmp_path / "counts.gin"
  counts.write_text("include 'experiments/configs/recipe_tiny/quick.gin'\nSFT_N = 1000\n"
                    'recipe.task_counts = {"base_train": 64, "sft": %SFT_N, "valid": 16}\n')
  try:
    settings, _, _ = recipe.configure([str(counts)], ["SFT_N = 50", "recipe.task_counts = {'valid': 8}"])
    assert (settings["task_counts"]["sft"], settings["task_counts"]["valid"]) == (50, 8)
    gin.clear_config()
    # A macro as a stage's whole list of bindings, merged with a command-line dict.
    counts.write_text("include 'experiments/configs/recipe_tiny/quick.gin'\nSFT_B = ['train.num_steps=3']\n"
                      'recipe.stage_bindings = {"sft": %SFT_B}\n')
    settings, _, _ = recipe.configure([str(counts)], ["recipe.stage_bindings = {'grpo': ['train.num_steps=4']}"])
    assert settings["stage_bindings"] == {"sft": ["train.num_steps=3"], "grpo": ["train.num_steps=4"]}
    gin.clear_config()
    # A macro in a command-line dict is merged too (a TypeError from the merge before); the macro's own binding,
    # which no stage reads, is then named.
    with pytest.raises(ValueError, match=r"CLI_B = \['train.num_steps=4'\] is refused by every stage"):
      recipe.configure([str(counts)], ["CLI_B = ['train.num_steps=4']", "recipe.stage_bindings = {'grpo': %CLI_B}"])
  finally:
    gin.clear_config()


def test_a_command_line_difficulty_is_that_level_not_the_files_overrides(monkeypatch):
  """recipe_tiny's overrides set every difficulty parameter: merged under another level's name they made
  --gin_param recipe.difficulty="hard" a no-op. Another level drops the file's overrides; the command line's stay."""
  monkeypatch.chdir(ROOT)
  quick = ["experiments/configs/recipe_tiny/quick.gin"]
  try:
    made = lambda params: recipe.task_request(recipe.configure(quick, params)[0])["difficulty_params"]
    assert made([])["max_steps"] == 3  # the file's overrides
    assert made(['recipe.difficulty="hard"']) == dataclasses.asdict(word_problems.DIFFICULTIES["hard"])
    assert made(['recipe.difficulty="hard"', 'recipe.difficulty_overrides={"max_value": 50}']) == dict(
        dataclasses.asdict(word_problems.DIFFICULTIES["hard"]), max_value=50)
    assert made(['recipe.difficulty_overrides={"max_value": 50}'])["max_steps"] == 3  # same level: merged
  finally:
    gin.clear_config()


def test_bindings_the_recipe_cannot_apply_are_refused(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)
  recipe_gin = "experiments/configs/recipe_tiny/recipe.gin"
  with pytest.raises(ValueError, match="sets data.train_files for each stage itself.*recipe.stage_bindings"):
    recipe.configure([recipe_gin], ['data.train_files=["x.jsonl"]'])
  with pytest.raises(ValueError, match=r"data.eval_files would reach every stage, GRPO too"):
    recipe.configure([recipe_gin], ['data.eval_files=["x.jsonl"]'])
  with pytest.raises(ValueError, match=r"not stages"):
    recipe.configure([recipe_gin], ['recipe.stage_bindings={"mid_train": ["train.num_steps=1"]}'])
  custom = tmp_path / "custom.gin"
  custom.write_text(f"include '{recipe_gin}'\ntrain.num_steps = 3\n")
  with pytest.raises(ValueError, match=r"custom.gin: train.num_steps binds a training setting.*--gin_param"):
    recipe.configure([str(custom)], [])
  gin.clear_config()


def test_a_binding_a_stage_refuses_is_refused_before_any_stage_trains(monkeypatch):
  """train.z_loss reaches every stage, and DPO and GRPO refuse it: the recipe trained base, midtrain and sft and
  then failed at DPO. configure() now runs each stage's settings checks first and names the refusing stages."""
  monkeypatch.chdir(ROOT)
  quick = "experiments/configs/recipe_tiny/quick.gin"
  try:
    with pytest.raises(ValueError, match=r"--gin_param train.z_loss=1e-4 applies to every stage this recipe trains, "
                                         r"and the dpo and grpo stages refuse it \(dpo: train.z_loss=0.0001 applies "
                                         r"to the next-token loss only") as refusal:
      recipe.configure([quick], ["train.z_loss=1e-4", "train.seed=3"])
    assert ("""recipe.stage_bindings={"base": ["train.z_loss=1e-4"], "midtrain": ["train.z_loss=1e-4"], """
            """"sft": ["train.z_loss=1e-4"]}""") in str(refusal.value)  # the stages that take it, and no other binding
    settings, _, _ = recipe.configure([quick], ['recipe.stages=["base", "midtrain", "sft"]', "train.z_loss=1e-4"])
    assert settings["stage_params"] == ["train.z_loss=1e-4"]  # the stages of this run take it
    settings, _, _ = recipe.configure([quick], ['recipe.stage_bindings={"sft": ["train.z_loss=1e-4"]}'])
    assert settings["stage_bindings"]["sft"][-1] == "train.z_loss=1e-4"
    with pytest.raises(ValueError, match=r"the grpo stage refuses its training settings \(.*grpo.gin with "
                                         r"recipe.stage_bindings\['grpo'\]\): train.z_loss"):
      recipe.configure([quick], ['recipe.stage_bindings={"grpo": ["train.z_loss=1e-4"]}'])
    with pytest.raises(ValueError, match=r"data.seq_len=1024 exceeds the model's max_position_embeddings"):
      recipe.configure([quick], ['recipe.stage_bindings={"sft": ["data.seq_len=1024"]}'])
    with pytest.raises(ValueError, match=r"--gin_param train.chunk_size=0 is refused by every stage of this recipe "
                                         r"\(base: train.chunk_size=0: [\s\S]*\): change or remove it"):
      recipe.configure([quick], ["train.chunk_size=0"])
    with pytest.raises(ValueError, match=r"--gin_param model.param_dtype='float16' is refused by every stage"):
      recipe.configure([quick], ["model.param_dtype='float16'"])
  finally:
    gin.clear_config()


@pytest.mark.parametrize("param,match", [
    ('reward.weights={"corectness": 1.0}', r"every stage .*reward.weights names 'corectness'"),
    ('reward.weights=["correctness"]', r"every stage .*reward.weights=\['correctness'\] must be a dict"),
    ('dpo.too_long="truncate"', r"every stage .*dpo.too_long='truncate'"),
    ('dpo.loss_type="hinge"', r"every stage .*dpo.loss_type='hinge'"),
    ("dpo.beta=-1.0", r"every stage .*dpo.beta=-1.0 must be > 0"),
    ("grpo.group_size=8.5", r"every stage .*grpo.group_size=8.5 must be a whole number"),
    ('train.export_hf="False"', r"every stage .*train.export_hf='False' must be True or False"),
    ('recipe.stage_bindings={"sft": ["data.too_long=\\"truncate\\""]}', r"sft stage .*data.too_long='truncate'"),
    ('recipe.stage_bindings={"sft": ["data.packing=\\"none\\""]}', r"sft stage .*data.packing='none'"),
    ('recipe.stage_bindings={"sft": ["data.on_bad_record=\\"ignore\\""]}', r"sft stage .*data.on_bad_record='ignore'"),
])
def test_a_stage_setting_of_no_known_value_is_refused_before_any_stage_trains(monkeypatch, param, match):
  """Refused only when their stage started (DPO's and GRPO's after three stages had trained): now by the recipe's
  up-front checks, whichever stage binds them."""
  monkeypatch.chdir(ROOT)
  try:
    with pytest.raises(ValueError, match=match):
      recipe.configure(["experiments/configs/recipe_tiny/quick.gin"], [param])
  finally:
    gin.clear_config()


@pytest.mark.parametrize("make,match", [
    (lambda: recipe.eval_lib.eval_settings(temperature="0.6"), r"evaluation.temperature='0.6' must be a number"),
    (lambda: recipe.eval_lib.eval_settings(greedy="False"), r"evaluation.greedy='False' must be True or False"),
    (lambda: recipe.eval_lib.eval_settings(batch_size=8.5), r"evaluation.batch_size=8.5 must be a whole number"),
    (lambda: recipe.rollouts.rollout_settings(batch_size="8"), r"rollouts.batch_size='8' must be a whole number"),
    (lambda: recipe.rollouts.rollout_settings(stop_token_ids=5), r"rollouts.stop_token_ids=5 must be a list"),
    (lambda: recipe.recipe_settings(rollout_k=2.5), r"recipe.rollout_k=2.5 must be a whole number"),
    (lambda: recipe.recipe_settings(task_counts=["sft"]), r"recipe.task_counts=\['sft'\] must be a dict"),
])
def test_eval_rollout_and_recipe_settings_of_the_wrong_type_are_refused_naming_them(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_eval_rollout_and_recipe_settings_take_whole_number_floats_as_ints():
  assert type(recipe.eval_lib.eval_settings(batch_size=8.0)["batch_size"]) is int
  assert recipe.eval_lib.eval_settings(pass_k=3, num_samples=4)["pass_k"] == (3,)  # one k, as before
  assert type(recipe.rollouts.rollout_settings(batch_size=8.0)["batch_size"]) is int
  assert type(recipe.recipe_settings(rollout_k=4.0)["rollout_k"]) is int


def test_gin_files_are_found_from_the_callers_directory_then_the_repository_root(tmp_path):
  """`cd elsewhere && recipe.py --gin_file=my_recipe.gin` failed with "Unable to open file: my_recipe.gin": the
  paths were read after the chdir to the repository root. A repository-relative path still works from elsewhere.
  my_recipe.gin starts the recipe at DPO, which configure() refuses, so nothing trains."""
  (tmp_path / "my_recipe.gin").write_text('recipe.stages = ["dpo", "grpo"]\n')
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices=2))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "recipe.py"), "--workdir=w",
                         "--gin_file=experiments/configs/recipe_tiny/quick.gin", "--gin_file=my_recipe.gin"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "recipe.stages=['dpo', 'grpo'] starts at 'dpo'" in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "w").exists()


def _stage(name, accuracy, delta=None, base=None):
  """A summary entry; `delta` / `base`: (change, low, high) vs the previous stage / the first stage."""
  entry = {"name": name, "steps": 4, "final_loss": 1.5, "greedy_accuracy": accuracy, "greedy_accuracy_ci95": [0, 1],
           "accuracy": accuracy, "accuracy_ci95": [accuracy - 0.1, accuracy + 0.1],
           "pass_at_k": {"1": accuracy, "3": 0.9}, "response_tokens_mean": 20.0, "format_error_rate": 0.25}
  for key, value in (("delta_vs_previous", delta), ("delta_vs_base", base)):
    if value is not None:
      entry[key] = {"delta": value[0], "ci95": list(value[1:])}
  if delta is not None:
    entry["delta_vs_previous"]["verdict"] = recipe._verdict(entry["delta_vs_previous"])
  return entry


def test_stage_table_and_findings_report_each_stage_against_the_right_one():
  """The table's change column and the per-stage sentences compare with the previous stage, the last sentence with
  the first stage; pass@n is the n of the samples; a change is only called one when its interval excludes zero."""
  summary = {"evaluation": {"num_samples": 3}, "stages": [
      _stage("base", 0.2),
      _stage("midtrain", 0.5, delta=(0.3, 0.1, 0.5), base=(0.3, 0.1, 0.5)),
      _stage("sft", 0.4, delta=(-0.1, -0.3, 0.1), base=(0.2, 0.05, 0.35)),
      _stage("dpo", 0.3, delta=(-0.1, -0.15, -0.05), base=(0.1, -0.05, 0.25))]}
  rows = [line.split(" | ") for line in recipe.stage_table(summary).splitlines()[2:]]
  assert [row[5] for row in rows] == ["-", "+30.0 [10.0, 50.0]", "-10.0 [-30.0, 10.0]", "-10.0 [-15.0, -5.0]"]
  assert [row[6] for row in rows] == ["90.0"] * 4  # pass@3, not pass@1
  assert recipe.findings(summary) == [
      "- **midtrain** raised mean accuracy: +30.0 [10.0, 50.0] points.",
      "- **sft** did not significantly change mean accuracy: -10.0 [-30.0, 10.0] points.",
      "- **dpo** lowered mean accuracy: -10.0 [-15.0, -5.0] points.",
      "- The full recipe vs the base model: +10.0 [-5.0, 25.0] points (20.0% -> 30.0%)."]


def _summary_of_scores(workdir, scores):
  """recipe.build_summary over stages whose evaluations gave these per-problem scores ({stage: [score, ...]})."""
  records = []
  for name, per_problem in scores.items():
    items = [{"answer": str(i), "score": s} for i, s in enumerate(per_problem)]
    recipe.eval_lib.write_results(str(workdir / name / "eval"), {}, items)
    records.append({"name": name, "eval": {"accuracy": 0.0, "accuracy_ci95": [0, 0], "pass_at_k": {},
                                           "response_tokens_mean": 1.0, "format_error_rate": 0.0,
                                           "think_format_rate": 0.0, "num_problems": len(per_problem)}})
  manifest = {"difficulty_params": {}, "counts": {}, "vocab_size": 1}
  return recipe.build_summary(str(workdir), records, manifest, recipe.recipe_settings(),
                              {"num_samples": 1, "sampling": recipe.eval_lib.SamplingConfig(max_new_tokens=4)})


def test_the_summary_has_pass_at_every_sample_whatever_pass_k_lists(tmp_path):
  """The table's pass@n column (n = evaluation.num_samples) showed "-" when evaluation.pass_k did not list n."""
  out = lambda ok: {"text": "x", "correct": ok, "num_tokens": 3, "finished": True, "format_error": False}
  items = [{"answer": "1", "score": 0.25, "samples": [out(True), out(False), out(False), out(False)]},
           {"answer": "2", "score": 0.0, "samples": [out(False)] * 4}]
  recipe.eval_lib.write_results(str(tmp_path / "base" / "eval"), {}, items)
  record = {"name": "base", "eval": {"accuracy": 0.125, "accuracy_ci95": [0, 0], "pass_at_k": {"1": 0.125},
                                     "response_tokens_mean": 3.0, "format_error_rate": 0.0, "think_format_rate": 0.0,
                                     "num_problems": 2}}
  summary = recipe.build_summary(str(tmp_path), [record], {"difficulty_params": {}, "counts": {}, "vocab_size": 1},
                                 recipe.recipe_settings(),
                                 {"num_samples": 4, "sampling": recipe.eval_lib.SamplingConfig(max_new_tokens=4)})
  assert summary["stages"][0]["pass_at_k"] == {"1": 0.125, "4": 0.5}
  assert recipe.stage_table(summary).splitlines()[2].split(" | ")[6] == "50.0"


def test_a_stage_s_final_loss_is_its_last_finite_one(tmp_path):
  """A last step that trained no token (GRPO with every group dropped) logs a null loss: the table showed "-"."""
  (tmp_path / "grpo").mkdir()
  lines = ['{"step": 1, "loss": 0.25}', '{"step": 2, "loss": null, "weight": 0}']
  (tmp_path / "grpo" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  stage = _summary_of_scores(tmp_path, {"grpo": [0.5]})["stages"][0]
  assert stage["final_loss"] == 0.25 and stage["steps"] == 2


def test_summary_compares_each_stage_with_the_previous_and_the_first(tmp_path):
  """Stage effects are paired by problem: vs the stage before (delta_vs_previous) and vs the first stage."""
  summary = _summary_of_scores(tmp_path, {"base": [0.0, 0.0, 0.5], "midtrain": [1.0, 0.0, 0.5],
                                          "sft": [1.0, 1.0, 1.0]})
  midtrain, sft = summary["stages"][1:]
  assert midtrain["delta_vs_previous"]["delta"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
  assert midtrain["delta_vs_base"]["delta"] == pytest.approx(1 / 3)
  assert sft["delta_vs_previous"]["delta"] == pytest.approx(0.5)  # (0 + 1 + 0.5) / 3
  assert sft["delta_vs_base"]["delta"] == pytest.approx(2.5 / 3)  # (1 + 1 + 0.5) / 3


TINY_COUNTS = {"base_train": 8, "midtrain": 8, "sft": 4, "dpo_prompts": 4, "rl_prompts": 4, "valid": 4, "test": 4}


def test_data_of_other_task_settings_is_refused_not_reused(tmp_path):
  settings = recipe.recipe_settings(task_counts=TINY_COUNTS)
  assert recipe.prepare_data(str(tmp_path), settings)["counts"]["test"] == 4
  assert recipe.prepare_data(str(tmp_path), settings)["recipe_task"]["task_seed"] == 0  # the same settings go on
  other = recipe.recipe_settings(task_counts={**TINY_COUNTS, "test": 50}, difficulty="hard")
  with pytest.raises(ValueError, match=r"recipe.difficulty: 'medium' in data/, 'hard' now.*"
                                       r"recipe.task_counts\['test'\]: 4 in data/, 50 now.*new --workdir"):
    recipe.prepare_data(str(tmp_path), other)
  # Data made under other split rules has other held-out problems: refused, a manifest that predates the recorded
  # version included (compared on what it tells otherwise).
  path = tmp_path / "data" / "manifest.json"
  manifest = json.loads(path.read_text())
  version = word_problems.SPLIT_VERSION
  manifest["recipe_task"]["split_version"] -= 1
  path.write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=rf"the task's split rules: version {version - 1} in data/, {version} now"):
    recipe.prepare_data(str(tmp_path), settings)
  del manifest["recipe_task"], manifest["split_version"]
  path.write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=rf"split rules: version older, unrecorded in data/, {version} now \(other "
                                       r"held-out problems.*\); recipe.task_seed: 0 in data/, 1 now"):
    recipe.prepare_data(str(tmp_path), recipe.recipe_settings(task_counts=TINY_COUNTS, task_seed=1))


RECIPE_OVERRIDES = {"min_steps": 2, "max_steps": 3, "max_value": 30, "max_start": 12, "max_operand": 5,
                    "max_containers": 4}


def test_data_made_by_hand_with_the_recipes_settings_is_used(tmp_path):
  """base.gin's make_task_data.py command wrote a manifest without the split rules' version: the recipe refused the
  data as made under older, unrecorded rules."""
  made = recipe.make_task_data.make_task_data(str(tmp_path / "data"), counts=TINY_COUNTS, **RECIPE_OVERRIDES)
  settings = recipe.recipe_settings(task_counts=TINY_COUNTS, difficulty_overrides=RECIPE_OVERRIDES)
  assert recipe.prepare_data(str(tmp_path), settings)["tokens"] == made["tokens"]  # used as written


def test_a_first_data_write_cut_short_leaves_a_workdir_that_goes_on(tmp_path, monkeypatch):
  """make_task_data's manifest was renamed into place, then rewritten with the recipe's task record: a kill between
  the two left a manifest the recipe refused on every later run."""
  settings = recipe.recipe_settings(task_counts=TINY_COUNTS)
  replace = os.replace

  def killed_once_a_manifest_lands(src, dst):
    replace(src, dst)
    if os.path.basename(dst) == "manifest.json":
      raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed_once_a_manifest_lands)
  with pytest.raises(KeyboardInterrupt):
    recipe.prepare_data(str(tmp_path), settings)
  monkeypatch.undo()
  assert recipe.prepare_data(str(tmp_path), settings)["recipe_task"] == recipe.task_request(settings)


def test_task_data_longer_than_the_stages_token_budgets_is_refused_before_any_stage_trains(tmp_path, monkeypatch):
  """recipe.difficulty="hard" has six-step problems whose teacher reply needs more than the 80 new tokens of the
  evaluation, the DPO rollouts and GRPO (a reply cut short is scored incorrect), and SFT conversations longer than
  the SFT stage's 128-token rows (dropped). The bindings the refusal suggests are enough; recipe_tiny's own task
  fits; a finished stage is not trained again, so its budget is not checked."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(recipe, "run_stage", lambda *a, **k: pytest.fail("a stage trained"))
  quick = ["experiments/configs/recipe_tiny/quick.gin"]
  hard = ['recipe.difficulty="hard"', f"recipe.task_counts={json.dumps(TINY_COUNTS)}"]
  workdir = str(tmp_path / "hard")
  try:
    settings, eval_cfg, rollout_cfg = recipe.configure(quick, hard)
    with pytest.raises(ValueError, match=r"evaluation.max_new_tokens=80.*rollouts.max_new_tokens=80.*"
                                         r"grpo.max_new_tokens=80.*data.seq_len=128") as refusal:
      recipe.run_recipe(workdir, settings, eval_cfg, rollout_cfg)
    manifest = json.loads((tmp_path / "hard" / "data" / "manifest.json").read_text())
    assert f"{manifest['tokens']['trace']['max'] + 1} tokens" in str(refusal.value)
    suggested = re.findall(r"--gin_param='([^']+)'", str(refusal.value))
    assert len(suggested) == 3, refusal.value
    settings, eval_cfg, rollout_cfg = recipe.configure(quick, hard + suggested)
    recipe.check_token_budgets(workdir, manifest, settings, eval_cfg, rollout_cfg)

    settings, eval_cfg, rollout_cfg = recipe.configure(quick, hard)
    (tmp_path / "hard" / "sft").mkdir()
    (tmp_path / "hard" / "sft" / "recipe_stage.json").write_text("{}")
    with pytest.raises(ValueError) as refusal:
      recipe.check_token_budgets(workdir, manifest, settings, eval_cfg, rollout_cfg)
    assert "grpo.max_new_tokens" in str(refusal.value) and "data.seq_len" not in str(refusal.value)

    settings, eval_cfg, rollout_cfg = recipe.configure(quick, hard[1:])
    medium = str(tmp_path / "medium")
    recipe.check_token_budgets(medium, recipe.prepare_data(medium, settings), settings, eval_cfg, rollout_cfg)
  finally:
    gin.clear_config()


def test_the_sft_budget_counts_the_tokens_data_system_prompt_adds_to_every_conversation(tmp_path, monkeypatch):
  """manifest.json's SFT conversation lengths have no system prompt; the SFT stage's data pipeline renders
  data.system_prompt into every conversation, so rows that hold the longest bare conversation drop them all."""
  from phi_jax.data.pipeline import make_tokenize_fn
  from phi_jax.hf.tokenizer import load_tokenizer
  monkeypatch.chdir(ROOT)
  quick = ["experiments/configs/recipe_tiny/quick.gin"]
  counts = f"recipe.task_counts={json.dumps(TINY_COUNTS)}"
  workdir = str(tmp_path)
  system_prompt = "You are a careful tutor. Reason step by step, then give the final answer."
  try:
    settings, eval_cfg, rollout_cfg = recipe.configure(quick, [counts])
    manifest = recipe.prepare_data(workdir, settings)
    bare = manifest["tokens"]["sft_conversation"]["max"]
    tokenize = make_tokenize_fn(load_tokenizer(os.path.join(workdir, "data", "tokenizer")),
                                system_prompt=system_prompt)
    with open(os.path.join(workdir, "data", "sft.jsonl")) as f:
      longest = max(len(tokenize(json.loads(line))["ids"]) for line in f)
    assert longest > bare
    exact = f'recipe.stage_bindings={json.dumps({"sft": [f"data.seq_len={bare}"]})}'
    settings, eval_cfg, rollout_cfg = recipe.configure(quick, [counts, exact])
    recipe.check_token_budgets(workdir, manifest, settings, eval_cfg, rollout_cfg)  # fits without a system prompt
    settings, eval_cfg, rollout_cfg = recipe.configure(quick, [counts, exact, f"data.system_prompt={system_prompt!r}"])
    with pytest.raises(ValueError, match=rf"data.seq_len={bare} \(the sft stage\)") as refusal:
      recipe.check_token_budgets(workdir, manifest, settings, eval_cfg, rollout_cfg)
    assert f"data.seq_len={longest}" in str(refusal.value) and "data.system_prompt" in str(refusal.value)
    fits = f'recipe.stage_bindings={json.dumps({"sft": [f"data.seq_len={longest}"]})}'
    settings, eval_cfg, rollout_cfg = recipe.configure(quick, [counts, fits, f"data.system_prompt={system_prompt!r}"])
    recipe.check_token_budgets(workdir, manifest, settings, eval_cfg, rollout_cfg)
  finally:
    gin.clear_config()


def test_summary_gives_grpo_mean_reward_of_its_first_and_last_quarter_of_steps(tmp_path):
  """Eight GRPO steps with rewards 0..7: the first quarter (steps 1-2) averages 0.5, the last (7-8) 6.5."""
  (tmp_path / "grpo").mkdir()
  with open(tmp_path / "grpo" / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps({"step": i + 1, "loss": 0.0, "reward_mean": float(i)}) + "\n" for i in range(8))
  grpo = _summary_of_scores(tmp_path, {"sft": [1.0], "grpo": [1.0]})["stages"][1]
  assert (grpo["reward_mean_first_quarter"], grpo["reward_mean_last_quarter"]) == (0.5, 6.5)


def _grpo_metrics_of_two_passes(workdir):
  """A GRPO metrics.jsonl of grpo.num_passes=2: 8 steps, 4 rollout batches; only each batch's first step carries
  the rollout numbers (rewards 1, 3, 5, 7; half the groups kept), the second pass logs the loss alone."""
  (workdir / "grpo").mkdir()
  with open(workdir / "grpo" / "metrics.jsonl", "w") as f:
    for step in range(1, 9):
      record = {"step": step, "loss": 0.0}
      if step % 2:
        record.update(reward_mean=float(step), groups_kept=0.5, temperature=1.0, response_length_mean=10.0)
      f.write(json.dumps(record) + "\n")


def test_summary_counts_only_the_rollout_steps_of_a_grpo_run_of_several_passes(tmp_path):
  """The pass-only steps have no reward_mean or groups_kept: counted as zeros, they halved the reported figures."""
  _grpo_metrics_of_two_passes(tmp_path)
  grpo = _summary_of_scores(tmp_path, {"sft": [1.0], "grpo": [1.0]})["stages"][1]
  assert (grpo["reward_mean_first_quarter"], grpo["reward_mean_last_quarter"]) == (1.0, 7.0)
  assert grpo["groups_kept_mean"] == 0.5


def test_walkthrough_grpo_plot_skips_steps_without_rollout_numbers(tmp_path):
  """The notebook's GRPO plot cell on a run of two passes per batch (it indexed r["reward_mean"]: a KeyError)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  _grpo_metrics_of_two_passes(tmp_path)
  with open(os.path.join(ROOT, "notebooks", "recipe_walkthrough.ipynb")) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  [cell] = [c for c in cells if 'read_metrics(os.path.join(WORKDIR, "grpo"))' in "".join(c["source"])]
  try:
    exec("".join(cell["source"]), {"recipe": recipe, "os": os, "plt": plt, "WORKDIR": str(tmp_path)})
    reward, temperature = plt.gcf().axes[0].get_lines()
    assert list(reward.get_xdata()) == [1, 3, 5, 7] and list(temperature.get_ydata()) == [1.0] * 4
  finally:
    plt.close("all")


def test_task_differences_name_a_changed_difficulty_parameter():
  """Data made with another value of one difficulty parameter differs in that parameter and nothing else."""
  made = recipe.task_request(recipe.recipe_settings(task_counts=TINY_COUNTS))
  asked = recipe.task_request(recipe.recipe_settings(task_counts=TINY_COUNTS, difficulty_overrides={"max_value": 41}))
  differences = recipe.task_differences({"recipe_task": made}, asked)
  assert len(differences) == 1 and differences[0].startswith("difficulty parameter max_value")
  assert differences[0].endswith(", 41 now")


def test_an_older_manifest_counts_sft_as_capped_by_midtrain():
  """A manifest without recipe_task records the sft rows written, at most the midtrain count (sft is a subset):
  asking for 10 sft problems of 8 midtrain ones matches data holding 8 of each."""
  made = recipe.task_request(recipe.recipe_settings(task_counts={**TINY_COUNTS, "sft": 8}))
  old = {"seed": made["task_seed"], "difficulty": made["difficulty"], "difficulty_params": made["difficulty_params"],
         "counts": made["task_counts"]}
  asked = recipe.task_request(recipe.recipe_settings(task_counts={**TINY_COUNTS, "sft": 10}))
  assert [line.split(":")[0] for line in recipe.task_differences(old, asked)] == ["the task's split rules"]
  assert recipe.task_differences(dict(old, split_version=asked["split_version"]), asked) == []
  assert recipe.task_differences({"recipe_task": made}, asked) == ["recipe.task_counts['sft']: 8 in data/, 10 now"]


def test_the_reported_split_must_be_a_held_out_one():
  """The recipe reports accuracy on valid or test problems only."""
  for split in ("valid", "test"):
    assert recipe.recipe_settings(eval_split=split)["eval_split"] == split
  with pytest.raises(ValueError, match="recipe.eval_split='train'"):
    recipe.recipe_settings(eval_split="train")


def _recipe_tiny_with(tmp_path, stage: str, lines: str):
  """A copy of recipe_tiny's config directory whose `stage`.gin ends with `lines`."""
  own = tmp_path / "recipe"
  shutil.copytree(os.path.join(ROOT, "experiments", "configs", "recipe_tiny"), own)
  with open(own / f"{stage}.gin", "a") as f:
    f.write(f"\n{lines}\n")
  return own


def test_a_macro_a_stage_file_uses_goes_to_the_stages_and_one_no_file_uses_is_refused(monkeypatch, tmp_path):
  """`SFT_LR=1e-3` sets a macro that only sft.gin reads: every stage gets the bindings, so every stage file counts as
  a user of it. A macro no file uses (`learning_rate=1e-3`) changes nothing and is refused."""
  monkeypatch.chdir(ROOT)
  own = _recipe_tiny_with(tmp_path, "sft", "SFT_LR = 3e-4\noptimizer.learning_rate = %SFT_LR")
  try:
    settings, _, _ = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"],
                                      [f'recipe.config_dir="{own}"', "SFT_LR=1e-3"])
    assert "SFT_LR=1e-3" in settings["stage_params"]
    with pytest.raises(ValueError, match=r"binds no configurable's parameter"):
      recipe.configure(["experiments/configs/recipe_tiny/quick.gin"], [f'recipe.config_dir="{own}"', "lr=1e-3"])
    # A macro the recipe's own file uses, or another stage's recipe.stage_bindings entry.
    recipe_file = tmp_path / "my_recipe.gin"
    recipe_file.write_text(f"include '{ROOT}/experiments/configs/recipe_tiny/quick.gin'\nrecipe.rollout_k = %K\n")
    settings, _, _ = recipe.configure([str(recipe_file)], ["K=4"])
    assert settings["rollout_k"] == 4
    settings, _, _ = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"],
                                      ['recipe.stage_bindings={"sft": ["optimizer.learning_rate=%LR"]}', "LR=1e-3"])
    assert "optimizer.learning_rate=%LR" in settings["stage_bindings"]["sft"]
    # One string for a stage's entry is a list of one (it was split into characters).
    settings, _, _ = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"],
                                      ['recipe.stage_bindings={"sft": "train.num_steps=5"}'])
    assert settings["stage_bindings"]["sft"][-1] == "train.num_steps=5"
  finally:
    gin.clear_config()


def test_a_reward_setting_that_combines_with_the_grpo_file_is_checked_by_the_grpo_stage_only(monkeypatch, tmp_path):
  """reward.length_aware_max_tokens given on the command line goes with grpo.gin's length-aware reward; the other
  stages, which read no reward settings, refused it as unused by their own (default) reward.weights."""
  monkeypatch.chdir(ROOT)
  own = _recipe_tiny_with(tmp_path, "grpo", 'reward.weights = {"correctness": 1.0, "length_aware": 0.5}')
  try:
    settings, _, _ = recipe.configure(["experiments/configs/recipe_tiny/quick.gin"],
                                      [f'recipe.config_dir="{own}"', "reward.length_aware_max_tokens=64"])
    assert "reward.length_aware_max_tokens=64" in settings["stage_params"]
  finally:
    gin.clear_config()


@pytest.mark.parametrize("param", ["dpo.beta=-1.0", "grpo.group_size=0", 'reward.weights={"corectness": 1.0}'])
def test_a_bad_value_for_the_one_stage_that_reads_it_is_to_be_changed_not_moved(monkeypatch, param):
  """The stages that do not read dpo.* / grpo.* / reward.* accept any value: the advice to give the binding only to
  them dropped it silently."""
  monkeypatch.chdir(ROOT)
  try:
    with pytest.raises(ValueError, match=r"(?s)is refused by every stage of this recipe .*change or remove it"):
      recipe.configure(["experiments/configs/recipe_tiny/quick.gin"], [param])
  finally:
    gin.clear_config()


def test_one_string_as_a_stage_bindings_entry_is_a_list_of_one_in_a_file_too(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)
  own = tmp_path / "my_recipe.gin"
  own.write_text(f"include '{ROOT}/experiments/configs/recipe_tiny/quick.gin'\n"
                 "recipe.stage_bindings = {'sft': 'train.num_steps=5'}\n")
  try:
    settings, _, _ = recipe.configure([str(own)], [])
    assert settings["stage_bindings"]["sft"] == ["train.num_steps=5"]
  finally:
    gin.clear_config()


def _steps(settings, stage, workdir):
  return recipe._stage_config(settings, str(workdir), stage, lambda: common.train_settings()["loop"].num_steps)


def test_a_command_line_training_binding_wins_over_the_files_stage_bindings(monkeypatch, tmp_path):
  """quick.gin's recipe.stage_bindings bind train.num_steps for every stage: applied after the command line's
  bindings, they silently undid `--gin_param=train.num_steps=10`. The command line's own entry for a stage still
  wins over its bindings for every stage."""
  monkeypatch.chdir(ROOT)
  quick = ["experiments/configs/recipe_tiny/quick.gin"]
  try:
    settings, _, _ = recipe.configure(quick, ["train.num_steps=10"])
    assert {stage: _steps(settings, stage, tmp_path) for stage in ("base", "sft")} == {"base": 10, "sft": 10}
    # What the stage records is what it trained with: the lists themselves are as before.
    assert settings["stage_params"] == ["train.num_steps=10"]
    assert settings["stage_bindings"]["base"] == ["train.num_steps=4"]
    settings, _, _ = recipe.configure(quick, ["train.num_steps=10",
                                              'recipe.stage_bindings={"sft": ["train.num_steps=7"]}'])
    assert {stage: _steps(settings, stage, tmp_path) for stage in ("base", "sft")} == {"base": 10, "sft": 7}
    settings, _, _ = recipe.configure(quick, [])
    assert {stage: _steps(settings, stage, tmp_path) for stage in ("base", "sft")} == {"base": 4, "sft": 3}
  finally:
    gin.clear_config()


def _finish(workdir, settings, stage, init_from=None):
  """A finished stage as `run_stage` leaves it, as far as its rerun reads it: its config.gin and record."""
  try:
    recipe._configure(settings, stage, recipe.stage_bindings(stage, str(workdir), init_from, settings))
    os.makedirs(workdir / stage, exist_ok=True)
    (workdir / stage / "config.gin").write_text(common.run_config_text())
  finally:
    gin.clear_config()
  return {"name": stage, "stage_params": list(settings["stage_params"]),
          "stage_bindings": list(settings["stage_bindings"].get(stage, []))}


def test_a_finished_stage_whose_config_changed_is_kept_and_warned_of(monkeypatch, tmp_path, caplog):
  """An edited <stage>.gin, or another recipe.config_dir, reused the finished stages without a word, as a changed
  --gin_param did before it was warned of. Unchanged settings, a moved workdir and a stage that wrote no config.gin
  (a DPO stage skipped for want of pairs) warn of nothing."""
  monkeypatch.chdir(ROOT)
  quick = ["experiments/configs/recipe_tiny/quick.gin"]
  workdir = tmp_path / "work"
  own = _recipe_tiny_with(tmp_path, "sft", "optimizer.learning_rate = 1e-3")
  warnings = lambda: [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  try:
    settings, _, _ = recipe.configure(quick, [])
    record = _finish(workdir, settings, "sft", str(workdir / "midtrain"))
    caplog.set_level(logging.INFO, logger="phi_jax")
    recipe.warn_if_stage_settings_changed("sft", record, settings, str(workdir), str(workdir / "midtrain"))
    assert warnings() == []
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    recipe.warn_if_stage_settings_changed("sft", record, settings, str(moved), str(moved / "midtrain"))
    assert warnings() == []
    edited, _, _ = recipe.configure(quick, [f'recipe.config_dir="{own}"'])
    recipe.warn_if_stage_settings_changed("sft", record, edited, str(workdir), str(workdir / "midtrain"))
    assert len(warnings()) == 1 and re.search(
        r"sft is not trained again.*optimizer\.learning_rate = 0\.001 now, 0\.0003 when trained.*delete "
        + re.escape(str(workdir / "sft")), warnings()[0]), warnings()
    caplog.clear()
    # A stage trained when the files' recipe.stage_bindings came after the command line's bindings: the same
    # lists, trained with the file's value.
    old = dict(record, stage_params=["train.num_steps=10"])
    now, _, _ = recipe.configure(quick, ["train.num_steps=10"])
    recipe.warn_if_stage_settings_changed("sft", old, now, str(workdir), str(workdir / "midtrain"))
    assert len(warnings()) == 1 and "train.num_steps = 10 now, 3 when trained" in warnings()[0], warnings()
    caplog.clear()
    (workdir / "sft" / "config.gin").unlink()
    recipe.warn_if_stage_settings_changed("sft", record, edited, str(workdir), str(workdir / "midtrain"))
    assert warnings() == []
  finally:
    gin.clear_config()


def test_a_gin_scoped_binding_is_refused_naming_the_stage_bindings_form(monkeypatch):
  """No stage runs in a gin scope: `sft/train.num_steps=7` was accepted and reached no stage."""
  monkeypatch.chdir(ROOT)
  files = ["experiments/configs/recipe_tiny/recipe.gin"]
  try:
    with pytest.raises(ValueError, match=re.escape('recipe.stage_bindings={"sft": ["train.num_steps=7"]}')):
      recipe.configure(files, ["sft/train.num_steps=7"])
    with pytest.raises(ValueError, match=r"scope 'sft/'.*\"train\.num_steps=7\""):
      recipe.configure(files, ['recipe.stage_bindings={"sft": ["sft/train.num_steps=7"]}'])
    with pytest.raises(ValueError, match=r"recipe\.stage_bindings\['sft'\].*scope 'grpo/'"):
      recipe.recipe_settings(stage_bindings={"sft": ["grpo/optimizer.learning_rate=0.5"]})
  finally:
    gin.clear_config()
