"""The evaluation command: pass@k and interval math against brute force, the summary of known outcomes, and the
command end to end on a saved tiny run (files, per-item records, numbers in range)."""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import sys

import gin
import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import common  # noqa: E402
import gin_bindings  # noqa: E402
import run_files  # noqa: E402
import tokenizer_setup  # noqa: E402
from phi_jax.data.sources import DataError  # noqa: E402
import eval as eval_lib  # noqa: E402


@pytest.mark.parametrize("n,c,k", [(5, 2, 2), (4, 0, 1), (4, 4, 3), (6, 1, 6), (8, 3, 4)])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n, c, k):
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(samples, k))
  assert eval_lib.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_and_its_settings_refuse_k_outside_the_samples():
  for n, c, k in ((3, 0, 8), (3, 1, 0), (3, 4, 1)):
    with pytest.raises(ValueError, match="pass@k needs 0 < k <= n"):
      eval_lib.pass_at_k(n, c, k)
  with pytest.raises(ValueError, match=r"evaluation.pass_k=\[1, 2.0\]: every k must be a whole number"):
    eval_lib.eval_settings(num_samples=2, pass_k=[1, 2.0])


def test_the_eval_batch_is_rounded_up_to_the_mesh(monkeypatch):
  sizes = []

  def generate_text(params, config, tokenizer, prompts, rng, sampling, batch_size, **kwargs):
    sizes.append(batch_size)
    return [{"text": "x", "num_tokens": 1, "finished": True} for _ in prompts]

  monkeypatch.setattr(eval_lib, "generate_text", generate_text)
  mesh = type("Mesh", (), {"shape": {"data": 3, "fsdp": 2}})()  # all evaluate reads of a mesh
  settings = eval_lib.eval_settings(num_samples=1, batch_size=64)
  summary, _ = eval_lib.evaluate(None, None, None, [{"prompt": "q", "answer": "1"}], settings=settings, mesh=mesh,
                                 verify_fn=lambda completions, golds: [True] * len(completions))
  assert sizes == [66, 66] and settings["batch_size"] == 64
  # The batch used is recorded (float rounding may differ from another batch shape).
  assert summary["batch_size"] == 66 and summary["data_parallel_devices"] == 6


def test_the_rollout_summary_records_the_batch_its_samples_were_drawn_in(monkeypatch, tmp_path):
  import rollouts
  sizes = []

  def generate_text(params, config, tokenizer, prompts, rng, sampling, batch_size, **kwargs):
    sizes.append(batch_size)
    return [{"text": "x", "num_tokens": 1, "finished": True} for _ in prompts]

  monkeypatch.setattr(rollouts, "generate_text", generate_text)
  problems = tmp_path / "p.jsonl"
  problems.write_text("".join(json.dumps({"problem": f"q{i}", "answer": str(i)}) + "\n" for i in range(3)))
  mesh = type("Mesh", (), {"shape": {"data": 3, "fsdp": 2}})()
  summary = rollouts.rollout_pairs(None, None, None, str(problems), str(tmp_path / "pairs.jsonl"), k=2,
                                   sampling=rollouts.SamplingConfig(max_new_tokens=4, stop_token_ids=(1,)),
                                   batch_size=5, mesh=mesh,
                                   verify_fn=lambda completions, golds: [True] * len(completions))
  assert sizes == [6]  # 5 rows rounded up to the 6 devices
  assert summary["batch_size"] == 6 and summary["data_parallel_devices"] == 6
  assert json.loads((tmp_path / "pairs.summary.json").read_text())["batch_size"] == 6


def test_mean_ci_is_the_normal_interval_of_the_mean():
  values = [0.0, 0.5, 1.0, 1.0, 0.25]
  mean, low, high = eval_lib.mean_ci(values)
  half = 1.959964 * np.std(values, ddof=1) / math.sqrt(len(values))
  assert (mean, low, high) == pytest.approx((np.mean(values), np.mean(values) - half, np.mean(values) + half))


def _item(answer, sample_verdicts, greedy_verdict):
  out = lambda ok: {"text": "x", "correct": ok, "num_tokens": 3, "finished": True, "format_error": False}
  return {"prompt": "q", "answer": answer, "greedy": [out(greedy_verdict)],
          "samples": [out(v) for v in sample_verdicts], "score": float(np.mean(sample_verdicts))}


def test_summary_and_paired_difference_of_known_outcomes():
  before = [_item("1", [False, False], False), _item("2", [True, False], False), _item("3", [True, True], True)]
  after = [_item("1", [True, False], True), _item("2", [True, True], True), _item("3", [True, True], True)]
  summary = eval_lib.summarize(before, pass_k=(1, 2))
  assert summary["accuracy"] == pytest.approx(0.5)
  assert summary["accuracy_per_run"] == pytest.approx([2 / 3, 1 / 3])
  assert summary["pass_at_k"] == pytest.approx({"1": 0.5, "2": 2 / 3})
  assert summary["greedy_accuracy"] == pytest.approx(1 / 3)
  diff = eval_lib.paired_difference(after, before)
  assert diff["delta"] == pytest.approx(1 / 3)
  assert diff["ci95"][0] < 1 / 3 < diff["ci95"][1]
  assert eval_lib.paired_difference(after, before, key="greedy")["delta"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="same problems"):
    eval_lib.paired_difference(after[:2], before[1:])


def test_summary_counts_lengths_and_unfinished_samples_of_known_outputs():
  """Lengths, unfinished and think-format rates are over every sample; the greedy format-error rate over greedy."""
  def out(num_tokens, finished, text="<think>a</think> The answer is \\boxed{1}."):
    return {"text": text, "correct": False, "num_tokens": num_tokens, "finished": finished,
            "format_error": not finished}
  items = [{"answer": "1", "greedy": [out(5, False)], "samples": [out(2, True), out(3, False, "no think")],
            "score": 0.0},
           {"answer": "2", "greedy": [out(5, True)], "samples": [out(10, True, "no think"), out(4, True)],
            "score": 0.0}]
  summary = eval_lib.summarize(items)
  assert summary["response_tokens_mean"] == pytest.approx(19 / 4)  # (2 + 3 + 10 + 4) / 4
  assert summary["response_tokens_median"] == pytest.approx(3.5)  # between 3 and 4
  assert summary["response_tokens_max"] == 10
  assert summary["unfinished_rate"] == pytest.approx(1 / 4) == summary["format_error_rate"]
  assert summary["think_format_rate"] == pytest.approx(2 / 4)
  assert summary["greedy_format_error_rate"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("kwargs,match", [({"num_samples": 0, "pass_k": ()}, "num_samples=0 must be at least 1"),
                                          ({"num_samples": 2, "pass_k": (1, 3)}, r"pass_k=\[1, 3\]"),
                                          ({"pass_k": (0,)}, r"pass_k=\[0\]"),
                                          ({"batch_size": -1}, r"evaluation.batch_size=-1 must be at least 1")])
def test_eval_settings_refuse_impossible_sample_counts(kwargs, match):
  """pass@k needs k of the n samples: k above n (or below 1), or no samples at all, is a config mistake; so is a
  batch size below 1 (-1 generated nothing, and eval then crashed)."""
  with pytest.raises(ValueError, match=match):
    eval_lib.eval_settings(**kwargs)


def test_rollout_settings_refuse_a_batch_size_below_one():
  """rollouts.batch_size=-1 generated nothing and wrote an empty pairs file with a summary of 0 rollouts."""
  import rollouts
  with pytest.raises(ValueError, match=r"rollouts.batch_size=-1 must be at least 1"):
    rollouts.rollout_settings(batch_size=-1)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_verification_time_limit_that_is_not_a_positive_number_is_refused_with_the_settings(value):
  """It used to be refused only at the first verification, after every sample had been generated."""
  import rollouts
  with pytest.raises(ValueError, match=rf"evaluation.verify_timeout_s={value} must be a finite number of seconds"):
    eval_lib.eval_settings(verify_timeout_s=value)
  with pytest.raises(ValueError, match=rf"rollouts.verify_timeout_s={value} must be a finite number of seconds"):
    rollouts.rollout_settings(verify_timeout_s=value)
  assert eval_lib.eval_settings(verify_timeout_s=None)["verify_timeout_s"] is None
  assert rollouts.rollout_settings(verify_timeout_s=2.5)["verify_timeout_s"] == 2.5


def test_format_errors(monkeypatch):
  assert not eval_lib.format_error({"text": "<think>1 + 1 = 2.</think> The answer is \\boxed{2}.", "finished": True})
  assert eval_lib.format_error({"text": "<think>1 + 1 = 2.</think> The answer is \\boxed{2}.", "finished": False})
  assert eval_lib.format_error({"text": "", "finished": True})
  # A template that opens <think> in the prompt (configured once for the verifier): a reply that never closes it
  # holds no answer, and is counted a format error here too, as the verifier scores it.
  from phi_jax import rewards
  thoughts = {"text": "still thinking... The answer is \\boxed{2}.", "finished": True}
  assert not eval_lib.format_error(thoughts)
  monkeypatch.setattr(rewards.verifier, "_default_config",  # what rewards.configure sets
                      dataclasses.replace(rewards.default_config(), think=rewards.ThinkFormat(prompt_opens_think=True)))
  assert eval_lib.format_error(thoughts)


def test_a_format_error_is_an_answer_the_verifier_cannot_read():
  """An answer longer than the verifier's screen.max_answer_chars, or one its screen refuses, scores incorrect
  whatever it says: it is a format error too (they used to be read with other limits, and counted as answers)."""
  from phi_jax import rewards
  long = "The answer is \\boxed{" + "+".join(["1"] * 600) + "}"  # a 1199-character answer equal to 600
  screened = "The answer is \\boxed{" + "9" * 400 + "}"  # a number past the screen's longest digit run
  try:
    verdicts = rewards.verify_batch([long, "The answer is \\boxed{600}."], ["600", "600"])
  finally:
    rewards.shutdown()
  assert verdicts == [False, True]
  for text in (long, screened):
    assert eval_lib.format_error({"text": text, "finished": True}), text[:40]
  assert not eval_lib.format_error({"text": "The answer is \\boxed{600}.", "finished": True})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A saved run directory of the tiny model (random params) with its config.gin and tokenizer, plus problems."""
  from phi_jax.model import init_params, presets

  run = tmp_path_factory.mktemp("run")
  common.get_tokenizer("tiny:phi-4", str(run))
  common.save_final_params(str(run), init_params(presets["tiny"], jax.random.key(0)))
  (run / "config.gin").write_text('model.preset = "tiny"\ndata.tokenizer = "tiny:phi-4"\n'
                                  'mesh.shape = {"data": -1, "fsdp": 1}\n')
  problems = run / "problems.jsonl"
  problems.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                              for i in range(5)))
  return run, problems


def test_export_hf_writes_a_finished_run_as_a_transformers_checkpoint(tiny_run, tmp_path):
  """What a multi-host run uses instead of train.export_hf: the same files, from its params/ in one process."""
  import export_hf
  import orbax.checkpoint as ocp
  from phi_jax import load_hf

  run, _ = tiny_run
  try:
    out = export_hf.main([f"--init_from={run}", f"--out={tmp_path / 'hf'}"])
  finally:
    gin.clear_config()
  config, params = load_hf(out)
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore(os.path.abspath(run / "params"))
  assert config.num_layers == 2 and jax.tree.structure(params) == jax.tree.structure(saved)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  with pytest.raises(ValueError, match="has no params/"):
    export_hf.main([f"--init_from={tmp_path}"])


def test_a_run_on_a_checkpoint_whose_config_json_changed_since_is_exported_and_evaluated_as_trained(
    tiny_run, tmp_path, capsys):
  """A run on model.hf_path rebuilds its model from that checkpoint's config.json; one changed since (a hub revision
  with other rope settings) exported the trained params as another function. The run's recorded model wins, with a
  warning; a setting named in model.overrides on the command line still applies."""
  import export_hf
  import rollouts
  from phi_jax import load_hf

  run, _ = tiny_run
  base = pathlib.Path(_export(export_hf, f"--init_from={run}", f"--out={tmp_path / 'base'}"))
  trained_config, params = load_hf(str(base))
  from_hf = tmp_path / "from_hf"
  common.get_tokenizer(str(base), str(from_hf))
  common.save_final_params(str(from_hf), params, trained_config)
  (from_hf / "config.gin").write_text(f'model.hf_path = "{base}"\ndata.tokenizer = "{base}"\n'
                                      'mesh.shape = {"data": -1, "fsdp": 1}\n')
  hf_config = json.loads((base / "config.json").read_text())
  assert hf_config["rope_theta"] == trained_config.rope_theta == 10000.0
  (base / "config.json").write_text(json.dumps(dict(hf_config, rope_theta=20000.0, eos_token_id=7)))
  out = _export(export_hf, f"--init_from={from_hf}", f"--out={tmp_path / 'export'}")  # logs to stdout
  exported = json.loads((pathlib.Path(out) / "config.json").read_text())
  assert exported["rope_theta"] == 10000.0 and exported["eos_token_id"] == trained_config.eos_token_id
  warned = re.findall(r"was trained with rope_theta=10000.0, eos_token_id=\d+, not the rope_theta=20000.0, "
                      r"eos_token_id=7 that its model settings give now", capsys.readouterr().out)
  assert len(warned) == 1  # once, though the export reads the run's model config more than once
  try:
    gin_bindings.parse_gin_for_checkpoint(str(from_hf), [], ['model.overrides={"rope_theta": 40000.0}'])
    assert rollouts.policy_config(str(from_hf))[0].rope_theta == 40000.0
  finally:
    gin.clear_config()


def _export(export_hf, *args):
  try:
    return export_hf.main(list(args))
  finally:
    gin.clear_config()


def _digests(directory):
  import hashlib
  return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in sorted(os.listdir(directory))
          if (directory / name).is_file()}


def test_export_hf_keeps_the_checkpoints_a_run_started_from_and_earlier_exports(tiny_run, tmp_path):
  """--out at the run's model.hf_path (its weights and tokenizer) replaced the checkpoint the run was trained from;
  an existing export was replaced without being asked. Both are refused; --overwrite replaces an earlier export."""
  import export_hf

  run, _ = tiny_run
  base = pathlib.Path(_export(export_hf, f"--init_from={run}", f"--out={tmp_path / 'base'}"))
  start = tmp_path / "start"
  shutil.copytree(base, start)
  from_hf = tmp_path / "from_hf"
  shutil.copytree(run / "params", from_hf / "params")
  (from_hf / "config.gin").write_text(f'model.hf_path = "{base}"\ndata.tokenizer = "{base}"\n'
                                      f'train.init_from = "{start}"\nmesh.shape = {{"data": -1, "fsdp": 1}}\n')
  (tmp_path / "link").symlink_to(base)
  before = _digests(base), _digests(start)
  for out, name, *flags in ((base, "model.hf_path"), (tmp_path / "link", "model.hf_path", "--overwrite"),
                            (start, "train.init_from", "--overwrite")):
    with pytest.raises(ValueError, match=rf"--out='{re.escape(str(out))}' is the run's {re.escape(name)}="):
      _export(export_hf, f"--init_from={from_hf}", f"--out={out}", *flags)
  (from_hf / "config.gin").write_text(f'data.tokenizer = "{start}"\nmesh.shape = {{"data": -1, "fsdp": 1}}\n')
  with pytest.raises(ValueError, match=r"is the run's data.tokenizer="):
    _export(export_hf, f"--init_from={from_hf}", f"--out={start}/")
  assert (_digests(base), _digests(start)) == before
  # An earlier export is replaced only when asked to.
  with pytest.raises(ValueError, match=r"already holds a transformers checkpoint \(config.json, model.safetensors\): "
                                       r"pass --overwrite to replace it, or choose another --out"):
    _export(export_hf, f"--init_from={run}", f"--out={base}")
  assert _digests(base) == before[0]
  for _ in range(2):
    assert _export(export_hf, f"--init_from={run}", f"--out={tmp_path / 'again'}", "--overwrite")
  assert _digests(tmp_path / "again") == before[0]


def test_eval_command_on_a_saved_run(tiny_run, capsys):
  run, problems = tiny_run
  out = run / "eval"
  try:
    summary = eval_lib.main([f"--init_from={run}", f"--problems={problems}", f"--out={out}",
                             "--gin_param=evaluation.max_new_tokens=8", "--gin_param=evaluation.num_samples=3",
                             "--gin_param=evaluation.pass_k=[1, 3]", "--gin_param=evaluation.batch_size=8"])
  finally:
    gin.clear_config()
  assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
  items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
  assert [i["answer"] for i in items] == [str(2 * i) for i in range(5)]
  assert all(len(i["samples"]) == 3 and len(i["greedy"]) == 1 for i in items)
  outputs = [o for i in items for o in i["samples"] + i["greedy"]]
  assert all(1 <= o["num_tokens"] <= 8 and isinstance(o["text"], str) for o in outputs)
  assert summary["num_problems"] == 5 and len(summary["accuracy_per_run"]) == 3
  assert summary["sampling"]["max_new_tokens"] == 8 and summary["num_samples"] == 3 and summary["limit"] is None
  assert summary["sampling"]["stop_token_ids"]  # the chat format's, which generation used: not an empty list
  assert summary["batch_size"] == 8 and summary["data_parallel_devices"] == jax.device_count()  # mesh data=-1
  assert 0 <= summary["accuracy"] <= 1 and 0 <= summary["pass_at_k"]["3"] <= 1
  assert summary["accuracy_ci95"][0] <= summary["accuracy"] <= summary["accuracy_ci95"][1]
  assert 1 <= summary["response_tokens_mean"] <= 8
  # A random model rarely stops or answers within 8 tokens: its format errors are counted, not hidden.
  errors = [o["format_error"] for i in items for o in i["samples"]]
  assert summary["format_error_rate"] == pytest.approx(np.mean(errors))
  assert summary["format_error_rate"] > 0.5


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny SFT run trained two steps with data.tokenizer a tokenizer directory (the path its config.gin records),
  and that directory."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  root = tmp_path_factory.mktemp("trained")
  tokenizer_dir = str(root / "tokenizer")
  build_tiny_tokenizer(tokenizer_dir, chat_format="phi-4")
  _train_run(root / "run", tokenizer_dir, num_steps=2)
  return root / "run", tokenizer_dir


def _train_run(workdir, tokenizer, num_steps):
  """The `trained_run` fixture's training (started, resumed or rerun) in `workdir` with data.tokenizer=`tokenizer`."""
  try:
    gin_bindings.parse_gin([os.path.join(ROOT, "experiments", "configs", "sft_tiny.gin")],
                           [f"train.num_steps={num_steps}", "train.eval_every=0", "data.eval_files=[]",
                            "data.seq_len=64", "train.async_checkpoints=False", f"data.tokenizer='{tokenizer}'",
                            'mesh.shape={"data": -1, "fsdp": 1}'])
    return common.run_training(str(workdir))
  finally:
    gin.clear_config()


def _load_policy(run, *bindings):
  import rollouts
  try:
    gin_bindings.parse_gin_for_checkpoint(str(run), [], list(bindings))
    return rollouts.load_policy(str(run), common.mesh())
  finally:
    gin.clear_config()


def _train_next_stage(run, tokenizer, workdir, num_steps=1):
  """A next SFT stage from `run` (train.init_from) with data.tokenizer=`tokenizer`."""
  try:
    gin_bindings.parse_gin([os.path.join(ROOT, "experiments", "configs", "sft_tiny.gin")],
                           [f"train.num_steps={num_steps}", "train.eval_every=0", "data.eval_files=[]",
                            "data.seq_len=128", "train.async_checkpoints=False", f"data.tokenizer='{tokenizer}'",
                            f"train.init_from='{run}'", 'mesh.shape={"data": -1, "fsdp": 1}'])
    return common.run_training(str(workdir))
  finally:
    gin.clear_config()


@contextlib.contextmanager
def _replaced(tokenizer_dir, make):
  """Other tokenizer files (`make(tokenizer_dir)`) at `tokenizer_dir` for the block; the original ones after it."""
  os.rename(tokenizer_dir, f"{tokenizer_dir}.trained")
  try:
    make(tokenizer_dir)
    yield
  finally:
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.rename(f"{tokenizer_dir}.trained", tokenizer_dir)


def test_a_run_keeps_its_tokenizer_and_a_next_stage_and_eval_refuse_files_replaced_at_its_path(trained_run,
                                                                                                 tmp_path, caplog):
  """Files replaced at the data.tokenizer path a run's config.gin records (a tokenizer trained on other text) would
  give the params other ids than they learned: the run keeps a copy of the tokenizer it trained with (W/tokenizer),
  and a next stage (train.init_from) as well as eval, rollouts and export compare with that copy."""
  import re
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  run, tokenizer_dir = trained_run
  other_text = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit"] * 50
  with _replaced(tokenizer_dir, lambda d: build_tiny_tokenizer(d, chat_format="phi-4", corpus=other_text)):
    refused = rf"data.tokenizer='{re.escape(tokenizer_dir)}' is not the tokenizer {{}}='{re.escape(str(run))}' was " \
              rf"trained with \({re.escape(str(run / 'tokenizer'))}: .*ids differ for \d+"
    with pytest.raises(ValueError, match=refused.format("train.init_from")):
      _train_next_stage(run, tokenizer_dir, tmp_path / "next")
    assert not (tmp_path / "next" / "checkpoints").exists()
    with pytest.raises(ValueError, match=refused.format("--init_from")):
      _load_policy(run)
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    try:
      with pytest.raises(ValueError, match=refused.format("--init_from")):
        eval_lib.main([f"--init_from={run}", f"--problems={problems}", f"--out={tmp_path / 'eval'}",
                       "--gin_param=evaluation.max_new_tokens=4"])
    finally:
      gin.clear_config()
    assert not (tmp_path / "eval" / "summary.json").exists()
    # Pointed at the run's copy, as the error says, the run loads again.
    assert len(_load_policy(run, f"data.tokenizer='{run / 'tokenizer'}'")[2]) == 512
  with caplog.at_level("WARNING", logger="phi_jax"):
    _load_policy(run)  # the files it trained with: loaded without a word
  assert not caplog.text


def test_another_chat_template_is_logged_by_eval_and_a_next_stage_not_refused(trained_run, tmp_path, caplog):
  """The same tokens rendered in another chat format (tiny "phi-4" -> "phi-4-reasoning", as a recipe's DPO stage may
  bind through recipe.stage_bindings; phi-4's with a default system prompt) are a deliberate change: training from
  the run and eval both log it. The next stage keeps the tokenizer it trained with, and a run resumed with another
  one on purpose keeps that one instead."""
  from phi_jax.data.chat import with_default_system_prompt
  from phi_jax.hf.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer, load_tokenizer

  run, tokenizer_dir = trained_run
  reasoning = str(tmp_path / "reasoning")
  build_tiny_tokenizer(reasoning, chat_format="phi-4-reasoning")
  with caplog.at_level("WARNING", logger="phi_jax"):
    _, _, tokenizer = _load_policy(run, f"data.tokenizer='{reasoning}'")
    assert tokenizer.chat_template == CHAT_TEMPLATES["phi-4-reasoning"]
    assert "same tokens; another chat template" in caplog.text and "--init_from" in caplog.text
    caplog.clear()
    common.check_tokenizer_matches_start(tokenizer, reasoning, "train.init_from", str(run))
    assert "same tokens; another chat template" in caplog.text
  # Phi-4-reasoning's system prompt alone outgrows the tiny model's positions: a shorter one trains.
  brief = tmp_path / "brief"
  shutil.copytree(tokenizer_dir, brief)
  config = json.loads((brief / "tokenizer_config.json").read_text())
  config["chat_template"] = with_default_system_prompt(config["chat_template"], "Be brief.")
  (brief / "tokenizer_config.json").write_text(json.dumps(config))
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert int(_train_next_stage(run, brief, tmp_path / "next").step) == 1
  assert "same tokens; another chat template" in caplog.text and "train.init_from" in caplog.text
  assert load_tokenizer(tmp_path / "next" / "tokenizer").chat_template == config["chat_template"]
  _train_next_stage(run, tokenizer_dir, tmp_path / "next", num_steps=2)  # resumed with the phi-4 one
  assert load_tokenizer(tmp_path / "next" / "tokenizer").chat_template == CHAT_TEMPLATES["phi-4"]


def test_a_tokenizer_that_splits_text_into_other_ids_is_refused(trained_run, tmp_path):
  """The same vocabulary and chat template with other merges (or normalizer, pre-tokenizer) encodes text into
  other ids: refused by a next stage and by eval as another vocabulary is."""
  from phi_jax.hf.tokenizer import load_tokenizer

  run, tokenizer_dir = trained_run
  merges = tmp_path / "merges"
  shutil.copytree(tokenizer_dir, merges)
  spec = json.loads((merges / "tokenizer.json").read_text())
  spec["model"]["merges"] = spec["model"]["merges"][:len(spec["model"]["merges"]) // 4]
  (merges / "tokenizer.json").write_text(json.dumps(spec))
  tokenizer = load_tokenizer(merges)
  assert tokenizer.get_vocab() == load_tokenizer(tokenizer_dir).get_vocab()
  refused = r"encodes text into other ids than the tokenizer {}=.* was trained with \(.*/run/tokenizer: the same " \
            r"vocabulary, but a probe text's ids first differ at position \d+"
  with pytest.raises(ValueError, match=refused.format("train.init_from")):
    common.check_tokenizer_matches_start(tokenizer, str(merges), "train.init_from", str(run))
  with pytest.raises(ValueError, match=refused.format("--init_from")):
    _load_policy(run, f"data.tokenizer='{merges}'")


def test_a_run_from_before_runs_kept_their_tokenizer_loads_as_before(trained_run, tmp_path, caplog):
  """A run with no copy of its tokenizer (params/ and config.gin alone) is compared with the files at its config's
  data.tokenizer path, as before."""
  run, _ = trained_run
  old = tmp_path / "old"
  shutil.copytree(run / "params", old / "params")
  shutil.copy(run / "config.gin", old / "config.gin")
  with caplog.at_level("WARNING", logger="phi_jax"):
    config, _, tokenizer = _load_policy(old)
  assert len(tokenizer) <= config.vocab_size and not caplog.text


_OTHER_TEXT = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit"] * 50


def test_a_resume_compares_its_tokenizer_with_the_runs_copy_before_training(trained_run, tmp_path):
  """Files replaced at a run's data.tokenizer path would train its checkpoints on other ids and then become its copy:
  a resume is held to the copy before any step, and the copy is left as it was."""
  import re
  from phi_jax.hf.tokenizer import _DEFAULT_CORPUS, build_tiny_tokenizer

  run, tokenizer_dir = trained_run
  resumed = tmp_path / "run"
  shutil.copytree(run, resumed)
  kept = (resumed / "tokenizer" / "tokenizer.json").read_text()
  # Of the same size, and the training data still fits seq_len with it: nothing but the copy tells them apart.
  corpus = list(_DEFAULT_CORPUS)[::-1] + _OTHER_TEXT[:3]
  with _replaced(tokenizer_dir, lambda d: build_tiny_tokenizer(d, chat_format="phi-4", corpus=corpus)):
    with pytest.raises(ValueError, match=rf"is not the tokenizer --workdir='{re.escape(str(resumed))}' was trained "
                                         rf"with \({re.escape(str(resumed / 'tokenizer'))}: "):
      _train_run(resumed, tokenizer_dir, num_steps=3)
  assert (resumed / "tokenizer" / "tokenizer.json").read_text() == kept
  assert sorted(int(n) for n in os.listdir(resumed / "checkpoints") if n.isdigit())[-1] == 2


def test_a_rerun_that_trains_nothing_writes_no_copy_into_an_older_run(trained_run, tmp_path):
  """A finished run from before runs kept their tokenizer, rerun as complete with another data.tokenizer, trained
  nothing with it: the rerun leaves the run's files alone (its config.gin still names the tokenizer it trained with)."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  run, _ = trained_run
  old = tmp_path / "run"
  shutil.copytree(run, old)
  shutil.rmtree(old / "tokenizer")
  build_tiny_tokenizer(tmp_path / "other", chat_format="phi-4", corpus=_OTHER_TEXT)
  assert int(_train_run(old, tmp_path / "other", num_steps=2).step) == 2
  assert not (old / "tokenizer").exists()


def test_a_token_both_tokenizers_hold_under_other_ids_is_refused(tmp_path, caplog):
  """A rename gives an id another string; a string both tokenizers hold under other ids (two added tokens in the
  other order, two vocabulary entries swapped) moves what the params learned for it: refused, whatever the probe."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer, load_tokenizer, save_tokenizer

  build_tiny_tokenizer(tmp_path / "tiny", chat_format="phi-4")

  def tiny_with(*added):
    tokenizer = load_tokenizer(tmp_path / "tiny")
    tokenizer.add_tokens(list(added))
    return tokenizer
  save_tokenizer(tiny_with("<tool_call>", "</tool_call>"), tmp_path / "W" / "tokenizer")
  run = str(tmp_path / "W")
  with pytest.raises(ValueError, match=r"gives 2 token\(s\) other ids than the tokenizer train.init_from=.* was "
                                       r"trained with .*'</tool_call>': \d+ here, \d+ there"):
    common.check_tokenizer_matches_start(tiny_with("</tool_call>", "<tool_call>"), "B", "train.init_from", run)
  swapped = tmp_path / "swapped"
  shutil.copytree(tmp_path / "W" / "tokenizer", swapped)
  spec = json.loads((swapped / "tokenizer.json").read_text())
  vocab = spec["model"]["vocab"]
  vocab["Ġthe"], vocab["Ġis"] = vocab["Ġis"], vocab["Ġthe"]
  (swapped / "tokenizer.json").write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"gives 2 token\(s\) other ids"):
    common.check_tokenizer_matches_start(load_tokenizer(swapped), str(swapped), "train.init_from", run)
  with caplog.at_level("WARNING", logger="phi_jax"):  # one renamed: logged
    common.check_tokenizer_matches_start(tiny_with("<tool_call>", "<tool_response>"), "C", "train.init_from", run)
  assert "2 token(s) renamed or added" in caplog.text


def test_a_tokenizer_that_only_adds_a_bos_token_is_not_refused(trained_run, tmp_path, caplog):
  """No data path adds special tokens (text and chat turns are encoded without them): a tokenizer whose post-processor
  puts a BOS first encodes training data into the same ids."""
  from phi_jax.hf.tokenizer import load_tokenizer

  run, tokenizer_dir = trained_run
  bos = tmp_path / "bos"
  shutil.copytree(tokenizer_dir, bos)
  spec = json.loads((bos / "tokenizer.json").read_text())
  token = "<|endoftext|>"
  token_id = load_tokenizer(tokenizer_dir).convert_tokens_to_ids(token)
  spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": token, "type_id": 0}},
                                                                      {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                            "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}}}
  (bos / "tokenizer.json").write_text(json.dumps(spec))
  tokenizer = load_tokenizer(bos)
  assert tokenizer.encode("hi")[0] == token_id != load_tokenizer(tokenizer_dir).encode("hi")[0]
  with caplog.at_level("WARNING", logger="phi_jax"):
    common.check_tokenizer_matches_start(tokenizer, str(bos), "train.init_from", str(run))
  assert not caplog.text


def test_a_run_whose_tokenizer_directory_is_gone_is_pointed_at_its_copy(trained_run, tmp_path):
  run, _ = trained_run
  import re
  use_copy = re.escape(f"--gin_param='data.tokenizer=\"{run / 'tokenizer'}\"'")
  with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path / 'gone'))}.* does not exist.*{use_copy}"):
    _load_policy(run, f"data.tokenizer='{tmp_path / 'gone'}'")


def test_eval_with_a_tiny_tokenizer_of_another_format_logs_the_template_and_keeps_the_runs(tiny_run, caplog):
  """A 'tiny:' data.tokenizer of another chat format than the run's is a deliberate template change for eval, as
  a tokenizer directory's is: built aside and compared with the run's, logged, and the run's own left as it was."""
  from phi_jax.hf.tokenizer import CHAT_TEMPLATES

  run, _ = tiny_run
  with caplog.at_level("WARNING", logger="phi_jax"):
    _, _, tokenizer = _load_policy(run, "data.tokenizer='tiny:phi-4-reasoning'")
  assert tokenizer.chat_template == CHAT_TEMPLATES["phi-4-reasoning"]
  assert "same tokens; another chat template" in caplog.text
  assert tokenizer_setup._tiny_tokenizer_format(str(run / "tokenizer")) == "phi-4"
  assert sorted(n for n in os.listdir(run) if n.startswith("tokenizer")) == ["tokenizer"]


def test_a_kill_while_the_copy_is_replaced_leaves_a_copy_and_the_next_write_tidies(tmp_path, monkeypatch):
  from phi_jax.hf.tokenizer import build_tiny_tokenizer, load_tokenizer

  old = build_tiny_tokenizer(tmp_path / "old", chat_format="phi-4")
  new = build_tiny_tokenizer(tmp_path / "new", chat_format="phi-4", corpus=_OTHER_TEXT)
  run = tmp_path / "W"
  run.mkdir()
  common.keep_run_tokenizer(str(run), str(tmp_path / "old"), old, replace=True)

  def killed(src, dst):
    raise KeyboardInterrupt("killed")
  with monkeypatch.context() as m:
    m.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
      common.keep_run_tokenizer(str(run), str(tmp_path / "new"), new, replace=True)
  assert load_tokenizer(run / "tokenizer").get_vocab() == old.get_vocab()
  common.keep_run_tokenizer(str(run), str(tmp_path / "new"), new, replace=True)
  assert sorted(os.listdir(run)) == ["tokenizer"]
  assert load_tokenizer(run / "tokenizer").get_vocab() == new.get_vocab()


def test_eval_refuses_a_tiny_tokenizer_of_another_token_family_than_the_runs(tiny_run):
  """The two token families number their control tokens in the same slots: a phi-4 run read with a phi-4-mini tiny
  tokenizer differs from it by a few renamed tokens only, yet reads each control id as another token. Refused,
  naming the format the run trained with; one of the run's own family is still built aside."""
  import re

  run, _ = tiny_run
  for chat_format in ("phi-4-mini", "phi-4-mini-reasoning"):
    with pytest.raises(ValueError, match=rf"data.tokenizer='tiny:{chat_format}' is of the 'phi-4-mini' token family, "
                                         rf"but the run in {re.escape(str(run))} was trained with .*'tiny:phi-4'"):
      _load_policy(run, f"data.tokenizer='tiny:{chat_format}'")
  assert len(_load_policy(run, "data.tokenizer='tiny:phi-4-reasoning'")[2]) == 512
  assert tokenizer_setup._tiny_tokenizer_format(str(run / "tokenizer")) == "phi-4"


def test_training_refuses_a_tiny_tokenizer_of_another_token_family_than_its_start(tiny_run, tmp_path, caplog):
  """A next stage (train.init_from, model.hf_path, a resume) is checked as rollouts are: a phi-4 run trained on with
  a phi-4-mini tiny tokenizer reads every control id as another token, though only a few tokens are renamed."""
  import re
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  run, _ = tiny_run
  mini = build_tiny_tokenizer(tmp_path / "mini", chat_format="phi-4-mini")
  with pytest.raises(ValueError, match=rf"data.tokenizer='tiny:phi-4-mini' is of the 'phi-4-mini' token family, but "
                                       rf"train.init_from='{re.escape(str(run))}' was trained with "
                                       r"data.tokenizer='tiny:phi-4' \('phi-4' family\).*set "
                                       r"--gin_param='data.tokenizer=\"tiny:phi-4\"'"):
    common.check_tokenizer_matches_start(mini, "tiny:phi-4-mini", "train.init_from", str(run))
  reasoning = build_tiny_tokenizer(tmp_path / "reasoning", chat_format="phi-4-reasoning")
  with caplog.at_level("WARNING", logger="phi_jax"):  # the same family: a recipe's change of template, logged
    common.check_tokenizer_matches_start(reasoning, "tiny:phi-4-reasoning", "train.init_from", str(run))
  assert "another chat template" in caplog.text


def test_the_copys_tidy_leaves_folders_of_names_it_does_not_write(tmp_path):
  """Only the names `keep_run_tokenizer` writes (W/tokenizer.tmp<pid>, W/tokenizer.old<pid>) are what a kill left:
  a user's W/tokenizer.old_phi4 or W/tokenizer.old is neither removed nor put in place of the copy."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer, load_tokenizer

  tokenizer = build_tiny_tokenizer(tmp_path / "tok", chat_format="phi-4")
  build_tiny_tokenizer(tmp_path / "other", chat_format="phi-4-mini")
  run = tmp_path / "W"
  run.mkdir()
  common.keep_run_tokenizer(str(run), str(tmp_path / "tok"), tokenizer, replace=True)
  for name in ("tokenizer.old_phi4", "tokenizer.tmpl", "tokenizer.old"):
    shutil.copytree(tmp_path / "other", run / name)
  common.keep_run_tokenizer(str(run), str(tmp_path / "tok"), tokenizer, replace=True)
  assert sorted(os.listdir(run)) == ["tokenizer", "tokenizer.old", "tokenizer.old_phi4", "tokenizer.tmpl"]
  fresh = tmp_path / "W2"
  shutil.copytree(tmp_path / "other", fresh / "tokenizer.old")
  common.keep_run_tokenizer(str(fresh), str(tmp_path / "tok"), tokenizer, replace=False)
  assert load_tokenizer(fresh / "tokenizer").get_vocab() == tokenizer.get_vocab()
  assert (fresh / "tokenizer.old" / "tokenizer.json").read_text() == (tmp_path / "other" / "tokenizer.json").read_text()


def test_a_copy_a_kill_left_aside_is_compared_with_and_put_back_by_the_next_resume(trained_run, tmp_path,
                                                                                 monkeypatch):
  """A kill between the copy's two renames leaves no W/tokenizer, only the old copy set aside: eval compares with
  that copy, and a resume puts it back before it compares, rather than train on files replaced since."""
  import re
  from phi_jax.hf.tokenizer import _DEFAULT_CORPUS, build_tiny_tokenizer, load_tokenizer

  run, tokenizer_dir = trained_run
  resumed = tmp_path / "run"
  shutil.copytree(run, resumed)
  kept = (resumed / "tokenizer" / "tokenizer.json").read_text()
  replace = os.replace

  def killed(src, dst):
    if str(dst) == str(resumed / "tokenizer"):
      raise KeyboardInterrupt("killed")
    replace(src, dst)
  with monkeypatch.context() as m:
    m.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
      common.keep_run_tokenizer(str(resumed), tokenizer_dir, load_tokenizer(tokenizer_dir), replace=True)
  aside = [n for n in os.listdir(resumed) if re.fullmatch(r"tokenizer\.old\d+", n)]
  assert len(aside) == 1 and not (resumed / "tokenizer").exists()
  corpus = list(_DEFAULT_CORPUS)[::-1] + _OTHER_TEXT[:3]
  with _replaced(tokenizer_dir, lambda d: build_tiny_tokenizer(d, chat_format="phi-4", corpus=corpus)):
    with pytest.raises(ValueError, match=rf"is not the tokenizer --init_from=.* was trained with "
                                         rf"\({re.escape(str(resumed / aside[0]))}: "):
      _load_policy(resumed)
    with pytest.raises(ValueError, match=rf"is not the tokenizer --workdir='{re.escape(str(resumed))}' was trained "
                                         rf"with \({re.escape(str(resumed / 'tokenizer'))}: "):
      _train_run(resumed, tokenizer_dir, num_steps=3)
  assert sorted(n for n in os.listdir(resumed) if n.startswith("tokenizer")) == ["tokenizer"]
  assert (resumed / "tokenizer" / "tokenizer.json").read_text() == kept
  assert sorted(int(n) for n in os.listdir(resumed / "checkpoints") if n.isdigit())[-1] == 2


def test_a_refused_resume_says_how_to_restore_the_files_it_trained_with(trained_run, tmp_path):
  """Binding data.tokenizer to the copy changes the eval set's recorded path, which keep_best_checkpoint and early
  stopping refuse: the refusal first gives the command that restores the trained files at the bound path, and a
  resume that follows it trains on."""
  import subprocess
  from phi_jax.hf.tokenizer import _DEFAULT_CORPUS, build_tiny_tokenizer

  run, _ = trained_run
  resumed = tmp_path / "run"
  shutil.copytree(run, resumed)
  tokenizer_dir = tmp_path / "tok"
  build_tiny_tokenizer(tokenizer_dir, chat_format="phi-4", corpus=list(_DEFAULT_CORPUS)[::-1] + _OTHER_TEXT[:3])
  with pytest.raises(ValueError) as refused:
    _train_run(resumed, tokenizer_dir, num_steps=3)
  command = f"cp -r {resumed / 'tokenizer'}/. {tokenizer_dir}"
  assert command in str(refused.value)
  assert "train.keep_best_checkpoint" in str(refused.value) and "train.early_stopping_patience" in str(refused.value)
  assert str(refused.value).index(command) < str(refused.value).index("data.tokenizer=\"")
  subprocess.run(command, shell=True, check=True)
  assert int(_train_run(resumed, tokenizer_dir, num_steps=3).step) == 3


def _stub_generate_text(finished):
  """A sampler stand-in: output i of each call, ended on a stop token as `finished(i)` says."""
  def generate_text(params, config, tokenizer, prompts, rng, sampling, **kwargs):
    return [{"text": f"output {i}", "num_tokens": 3, "finished": finished(i)} for i in range(len(prompts))]
  return generate_text


def test_evaluate_scores_with_the_verifier_it_is_given(monkeypatch):
  problems = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
  settings = dict(eval_lib.eval_settings(num_samples=2, max_new_tokens=4, pass_k=(1, 2), batch_size=8))
  monkeypatch.setattr(eval_lib, "generate_text", _stub_generate_text(lambda i: True))
  calls = []

  def every_other(completions, golds):
    calls.append(len(completions))
    return [i % 2 == 0 for i in range(len(completions))]

  summary, _ = eval_lib.evaluate(None, None, None, problems, settings=settings, verify_fn=every_other)
  assert calls == [4, 8]  # greedy rows, then 4 problems x 2 samples
  assert summary["accuracy_per_run"] == [1.0, 0.0]  # sample 0 of every problem is "correct", sample 1 is not
  assert summary["pass_at_k"] == {"1": 0.5, "2": 1.0}
  assert summary["greedy_accuracy"] == 0.5


def test_the_default_verifier_uses_the_settings_time_limit(monkeypatch):
  """evaluation.verify_timeout_s reaches the verifier without the caller wiring it (the recipe used to drop it)."""
  problems = [{"prompt": "What is 1 + 1?", "answer": "2"}]
  settings = dict(eval_lib.eval_settings(num_samples=1, max_new_tokens=4, batch_size=8, verify_timeout_s=30.0))
  monkeypatch.setattr(eval_lib, "generate_text", _stub_generate_text(lambda i: True))
  limits = []

  def spy(completions, golds, *, timeout_s=None, pool=None):
    limits.append(timeout_s)
    return [True] * len(completions)

  monkeypatch.setattr(eval_lib.rewards, "verify_batch", spy)
  eval_lib.evaluate(None, None, None, problems, settings=settings)
  assert limits == [30.0, 30.0]  # the greedy run and the sampled one


def test_a_response_cut_at_max_new_tokens_is_incorrect_whatever_it_wrote(monkeypatch):
  """The right answer followed by a loop that never ends its turn is not a solution: the rewards give it 0 and
  rollout DPO rejects it, so evaluation must not count it either."""
  problems = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
  settings = dict(eval_lib.eval_settings(num_samples=2, max_new_tokens=4, pass_k=(1, 2), batch_size=8))
  monkeypatch.setattr(eval_lib, "generate_text", _stub_generate_text(lambda i: i % 2 == 1))  # odd rows ended
  summary, items = eval_lib.evaluate(None, None, None, problems, settings=settings,
                                     verify_fn=lambda completions, golds: [True] * len(completions))
  assert summary["accuracy_per_run"] == [0.0, 1.0]  # sample 0 of every problem ran into the limit
  assert summary["greedy_accuracy"] == 0.5 and summary["unfinished_rate"] == 0.5
  assert [s["correct"] for s in items[0]["samples"]] == [False, True]


def test_samples_at_temperature_zero_repeat_the_greedy_output_of_their_own_problem(tiny_run):
  """At temperature 0 every sample is the greedy output, so each problem's samples must equal its own greedy
  row: a mix-up of which rows belong to which problem shows. A problem's score is the mean over its samples."""
  from phi_jax.hf.tokenizer import load_tokenizer
  from phi_jax.model import init_params, presets

  run, _ = tiny_run
  problems = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
  settings = dict(eval_lib.eval_settings(num_samples=2, max_new_tokens=4, temperature=0.0, batch_size=8))
  verdicts = iter([True, False, False, True] + [True, False, False, False, True, True, False, True])  # greedy, 4 x 2
  _, items = eval_lib.evaluate(init_params(presets["tiny"], jax.random.key(0)), presets["tiny"],
                               load_tokenizer(str(run / "tokenizer")), problems, settings=settings,
                               verify_fn=lambda completions, golds: [next(verdicts) for _ in completions])
  greedy = [item["greedy"][0]["text"] for item in items]
  assert len(set(greedy)) > 1  # distinct prompts give distinct outputs, so a mix-up cannot go unseen
  for item, text in zip(items, greedy):
    assert [o["text"] for o in item["samples"]] == [text, text]
  # A problem's score is the mean of its samples' verdicts, each counted only if the sample ended its turn.
  for item, verdict in zip(items, ([True, False], [False, False], [True, True], [False, True])):
    correct = [v and o["finished"] for v, o in zip(verdict, item["samples"])]
    assert [o["correct"] for o in item["samples"]] == correct and item["score"] == sum(correct) / 2


def test_eval_and_rollouts_layer_gin_files_over_the_runs_config(tmp_path):
  """Both commands read a run's own config.gin first, then --gin_file, then --gin_param (later ones win)."""
  import rollouts
  # (grpo.chunk_size: written by GRPO runs from before train.chunk_size became GRPO's loss chunk; still loads.)
  (tmp_path / "config.gin").write_text("rollouts.temperature = 0.5\nrollouts.top_k = 3\nrollouts.batch_size = 7\n"
                                       "grpo.chunk_size = 128\n")
  extra = tmp_path / "extra.gin"
  extra.write_text("rollouts.temperature = 0.25\nrollouts.batch_size = 5\n")
  try:
    gin_bindings.parse_gin_for_checkpoint(str(tmp_path), [str(extra)], ["rollouts.batch_size = 9"])
    settings = rollouts.rollout_settings()
    assert settings["sampling"].top_k == 3  # the run's config.gin is kept
    assert settings["sampling"].temperature == 0.25  # --gin_file overrides it
    assert settings["batch_size"] == 9  # --gin_param overrides both
  finally:
    gin.clear_config()
  try:  # a transformers checkpoint directory has no config.gin: the files alone
    gin_bindings.parse_gin_for_checkpoint(str(tmp_path / "hf_checkpoint"), [str(extra)], [])
    assert rollouts.rollout_settings()["sampling"].top_k == 0
  finally:
    gin.clear_config()


def test_an_empty_problem_set_or_a_limit_below_one_is_refused(tmp_path):
  with pytest.raises(SystemExit):
    eval_lib.parse_args(["--init_from=x", "--problems=p", "--out=o", "--limit=0"])
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  try:
    with pytest.raises(DataError, match="empty dataset"):
      eval_lib.main([f"--init_from={tmp_path}", f"--problems={empty}", f"--out={tmp_path / 'out'}"])
  finally:
    gin.clear_config()


def test_a_generation_budget_beyond_the_models_positions_is_refused(tiny_run, monkeypatch):
  """The 32K default of evaluation.max_new_tokens on a 512-position model would generate for hours; the error
  names the binding to change, before the weights load. The recipe's eval.gin (the documented way to evaluate its
  runs) parses on its own."""
  import rollouts
  run, problems = tiny_run
  monkeypatch.setattr(rollouts, "load_policy", lambda *a: pytest.fail("the model was loaded"))
  try:
    with pytest.raises(ValueError, match=r"evaluation.max_new_tokens=32768 leaves no room for a prompt within the "
                                         r"model's max_position_embeddings=\d+; set --gin_param='evaluation"):
      eval_lib.main([f"--init_from={run}", f"--problems={problems}", f"--out={run / 'eval_long'}"])
  finally:
    gin.clear_config()
  try:
    gin_bindings.parse_gin_for_checkpoint(str(run), [os.path.join(ROOT, "experiments/configs/recipe_tiny/eval.gin")],
                                          [])
    assert eval_lib.eval_settings()["sampling"].max_new_tokens == 80
  finally:
    gin.clear_config()


def test_outputs_and_settings_are_refused_before_the_model_loads(tiny_run, tmp_path, monkeypatch):
  """An --out of the wrong kind, or rollouts' --k=1, used to fail after every sample was generated (or after the
  checkpoint loaded); now before anything loads. A single evaluation.pass_k is a list of one."""
  import pts_pairs
  import rollouts
  run, problems = tiny_run
  monkeypatch.setattr(rollouts, "load_policy", lambda *a: pytest.fail("the model was loaded"))
  (tmp_path / "a_file").write_text("")
  cases = [(eval_lib.main, [f"--out={tmp_path / 'a_file'}"], r"--out='.*a_file' is a file: give a directory"),
           (rollouts.main, [f"--out={tmp_path}"], r"--out='.*' is a directory: give the path of the file"),
           (rollouts.main, [f"--out={tmp_path / 'p.jsonl'}", "--k=1"], r"--k=1: a pair needs at least two"),
           (rollouts.main, [f"--out={tmp_path / 'pairs'}"], r"--out=.*pairs: name the pairs file \*.jsonl"),
           # Found only when the results were written, after every sample was generated.
           (eval_lib.main, [f"--out={tmp_path / 'a_file' / 'eval'}"], r"--out='.*a_file/eval': cannot create or "),
           (rollouts.main, [f"--out={tmp_path / 'a_file' / 'p.jsonl'}"], r"--out='.*a_file/p.jsonl': cannot create"),
           (eval_lib.main, [f"--out={tmp_path / 'e'}", "--gin_param=evaluation.verify_timeout_s=0"],
            r"evaluation.verify_timeout_s=0 must be a finite number"),
           (rollouts.main, [f"--out={tmp_path / 'p.jsonl'}", "--gin_param=rollouts.verify_timeout_s=-1.0"],
            r"rollouts.verify_timeout_s=-1.0 must be a finite number"),
           (pts_pairs.main, [f"--out={tmp_path / 'pairs'}"], r"--out=.*pairs: name the pairs file \*.jsonl"),
           (pts_pairs.main, [f"--out={tmp_path / 'p.jsonl'}", "--k=1"], r"--k=1: estimating p\(success\) needs"),
           (pts_pairs.main, [f"--out={tmp_path / 'p.jsonl'}", "--p_gap=0"], r"--p_gap=0.0 must be in \(0, 1\]"),
           (pts_pairs.main, [f"--out={tmp_path / 'p.jsonl'}", "--gin_param=rollouts.max_new_tokens=256"],
            r"rollouts.max_new_tokens=256: a completion and a continuation .* N well below 256"),
           # The run's mesh puts all 8 devices on the data axis.
           (pts_pairs.main, [f"--out={tmp_path / 'p.jsonl'}", "--k=12", "--gin_param=rollouts.max_new_tokens=64"],
            r"--k=12 continuations .* a multiple of 8")]
  for fn, flags, message in cases:
    try:
      with pytest.raises(ValueError, match=message):
        fn([f"--init_from={run}", f"--problems={problems}"] + flags)
    finally:
      gin.clear_config()
  assert eval_lib.eval_settings(pass_k=3, num_samples=4)["pass_k"] == (3,)


def test_the_output_path_is_created_and_checked_writable_before_any_work(tmp_path):
  """eval's --out directory, or the directory of rollouts' --out file, is made at once and written to (a probe
  file, removed), so a path that cannot hold the results is refused before the model loads."""
  run_files.check_output_path("--out", str(tmp_path / "a" / "eval"), directory=True)
  run_files.check_output_path("--out", str(tmp_path / "b" / "pairs.jsonl"), directory=False)
  assert os.listdir(tmp_path / "a" / "eval") == [] and os.listdir(tmp_path / "b") == []
  (tmp_path / "a_file").write_text("")
  for path, directory in ((tmp_path / "a_file" / "eval", True), (tmp_path / "a_file" / "p.jsonl", False)):
    with pytest.raises(ValueError, match=r"--out='.*a_file/(eval|p.jsonl)': cannot create or write in .*a_file"):
      run_files.check_output_path("--out", str(path), directory=directory)
  if os.geteuid() != 0:  # permissions do not bind root
    (tmp_path / "read_only").mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"cannot create or write in .*read_only.*Permission denied"):
      run_files.check_output_path("--out", str(tmp_path / "read_only"), directory=True)


def test_results_are_written_summary_last_and_a_stale_summary_first_removed(tmp_path):
  """Re-used output directories: an interrupted write left new items beside the old summary, looking finished."""
  eval_lib.write_results(str(tmp_path), {"accuracy": 0.5}, [{"a": 1}])
  assert eval_lib.read_items(str(tmp_path)) == [{"a": 1}]
  calls = []
  real = run_files.write_text_atomically

  def interrupted(path, text):
    calls.append(path)
    if path.endswith("summary.json"):
      raise KeyboardInterrupt
    real(path, text)

  run_files.write_text_atomically = interrupted
  try:
    with pytest.raises(KeyboardInterrupt):
      eval_lib.write_results(str(tmp_path), {"accuracy": 0.9}, [{"a": 2}])
  finally:
    run_files.write_text_atomically = real
  assert not (tmp_path / "summary.json").exists() and eval_lib.read_items(str(tmp_path)) == [{"a": 2}]
  assert sorted(os.listdir(tmp_path)) == ["items.jsonl"]  # no temporary file left


def test_a_policy_directory_that_holds_none_says_what_it_is(tmp_path):
  """--init_from of eval.py / rollouts.py: a missing directory, a recipe stage that was skipped and a directory with
  neither params/ nor config.json are named (they raised a bare FileNotFoundError for config.json)."""
  import rollouts
  with pytest.raises(ValueError, match=r"--init_from='.*/nowhere': no such directory"):
    rollouts.load_policy(str(tmp_path / "nowhere"), None)
  (tmp_path / "sft").mkdir()
  (tmp_path / "dpo").mkdir()
  (tmp_path / "dpo" / "recipe_stage.json").write_text(json.dumps({"skipped": "no preference pairs",
                                                                  "params_from": "sft"}))
  with pytest.raises(ValueError, match=rf"is a recipe stage that was skipped \(no preference pairs\): it trained no "
                                       rf"params, and the recipe went on with those of {tmp_path / 'sft'}; point"):
    rollouts.load_policy(str(tmp_path / "dpo"), None)
  import export_hf
  with pytest.raises(ValueError, match=r"is a recipe stage that was skipped \(no preference pairs\)"):
    export_hf.main(["--init_from", str(tmp_path / "dpo")])
  with pytest.raises(ValueError, match=r"is neither a run's workdir \(it has no params/\) nor a transformers"):
    rollouts.load_policy(str(tmp_path / "sft"), None)


def test_a_transformers_directory_without_tokenizer_files_takes_the_bound_data_tokenizer(tmp_path, caplog):
  """phi_jax.save_hf writes no tokenizer files: eval.py / rollouts.py on its output crashed inside transformers
  whatever data.tokenizer said. The bound data.tokenizer is used; without one the error names the binding; a
  directory with tokenizer files of its own keeps them, saying the binding is not used."""
  import shutil

  import phi_jax
  import rollouts
  from phi_jax import sharding
  from phi_jax.model import init_params, presets

  hf = tmp_path / "hf"
  phi_jax.save_hf(str(hf), presets["tiny"], init_params(presets["tiny"], jax.random.key(0)))
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  tiny = common.get_tokenizer("tiny:phi-4", str(tmp_path))
  try:
    gin_bindings.parse_gin_for_checkpoint(str(hf), [], [])
    with pytest.raises(ValueError, match=r"has no tokenizer files .*--gin_param='data.tokenizer=\"DIR\"'"):
      rollouts.load_policy(str(hf), mesh)
    gin.clear_config()
    gin_bindings.parse_gin_for_checkpoint(str(hf), [], [f'data.tokenizer="{tmp_path / "tokenizer"}"'])
    _, _, tokenizer = rollouts.load_policy(str(hf), mesh)
    assert tokenizer.get_vocab() == tiny.get_vocab()
    gin.clear_config()
    gin_bindings.parse_gin_for_checkpoint(str(hf), [], ['data.tokenizer="tiny:phi-4"'])
    assert rollouts.load_policy(str(hf), mesh)[2].get_vocab() == tiny.get_vocab()
    assert sorted(os.listdir(hf)) == ["config.json", "generation_config.json", "model.safetensors"]  # built elsewhere
    for name in os.listdir(tmp_path / "tokenizer"):
      shutil.copy(tmp_path / "tokenizer" / name, hf / name)
    with caplog.at_level("WARNING", logger="phi_jax"):
      rollouts.load_policy(str(hf), mesh)
    assert "has tokenizer files of its own: using them, not data.tokenizer='tiny:phi-4'" in caplog.text
    # A bound tokenizer with more tokens than the checkpoint's vocabulary is refused at load, not at generation.
    small = tmp_path / "small"
    phi_jax.save_hf(str(small), presets["tiny"].replace(vocab_size=128),
                    init_params(presets["tiny"].replace(vocab_size=128), jax.random.key(0)))
    gin.clear_config()
    gin_bindings.parse_gin_for_checkpoint(str(small), [], ['data.tokenizer="tiny:phi-4"'])
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ tokens but the model's vocab_size is 128, that of "
                       r"--init_from='.*small'"):
      rollouts.load_policy(str(small), mesh)
    for name in os.listdir(tmp_path / "tokenizer"):  # its own tokenizer, larger than its embedding table
      shutil.copy(tmp_path / "tokenizer" / name, small / name)
    with pytest.raises(ValueError, match=r"its own tokenizer has \d+ tokens but its embedding table 128 rows"):
      rollouts.load_policy(str(small), mesh)
  finally:
    gin.clear_config()


def test_problem_files_read_a_numeric_answer_as_its_text_as_grpo_does(tmp_path):
  import rollouts
  path = tmp_path / "p.jsonl"
  path.write_text('{"problem": "What is 2 + 3?", "answer": 5}\n{"problem": "Half of 3?", "answer": 1.5}\n')
  assert [p["answer"] for p in rollouts.read_problems(str(path))] == ["5", "1.5"]
  assert [p["answer"] for p in common._read_prompts([str(path)])] == ["5", "1.5"]  # GRPO's reader
  for bad, kind in (("true", "bool"), ('["5"]', "list")):
    path.write_text(f'{{"problem": "What is 2 + 3?", "answer": {bad}}}\n')
    with pytest.raises(DataError, match=rf"p.jsonl:1: mistyped field: 'answer' is {kind}, expected a string or a "):
      rollouts.read_problems(str(path))


def test_conversation_problems_grade_against_the_final_answer_and_bad_turns_are_refused(tmp_path, caplog):
  import rollouts
  path = tmp_path / "c.jsonl"

  def conversation(*turns):
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})

  # The reference's thoughts hold another boxed number; its final answer is after </think>, here in a label.
  path.write_text(conversation(("system", "Be brief."), ("user", "3 + 4?"),
                               ("assistant", "<think>Is it \\boxed{12}? No.</think> The answer is 7.")) + "\n")
  [problem] = rollouts.read_problems(str(path))
  assert problem == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 4?"}],
                     "answer": "7"}
  cases = [(conversation(("user", "3 + 4?"), ("assistant", "Not sure.\nNo idea.")), r"c.jsonl:1: no answer: message 1"),
           # Working with no marked answer: no number from it becomes the gold.
           (conversation(("user", "10 - 5 + 2?"), ("assistant", "After giving away 5 she keeps $x = 7$ pens.")),
            r"c.jsonl:1: no answer: message 1, the last assistant turn, marks no final answer"),
           (conversation(("tool", "x"), ("assistant", "\\boxed{7}")), r"c.jsonl:1: unknown role: prompt message 0"),
           (json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "7"}]}),
            r"c.jsonl:1: missing field: prompt message 0 has no 'content'"),
           (json.dumps({"problem": "3 + 4?", "answer": " "}), r"c.jsonl:1: empty answer")]
  for record, error in cases:
    path.write_text(record + "\n")
    with pytest.raises(DataError, match=error):
      rollouts.read_problems(str(path))
  # A gold answer the verifier cannot grade against is kept (a benchmark keeps its denominator), and named.
  path.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in (
      ("2 + 2?", "4"), ("Double factorial?", "15!!"), ("Tower?", "9^{9^{9^9}}"))))
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert len(rollouts.read_problems(str(path))) == 3
  assert re.search(r"2 problem\(s\) of .*c.jsonl have a gold answer the verifier cannot grade against, so every "
                   r"answer to them scores incorrect: .*c.jsonl:2 \('15!!': refused by the answer screen: a factorial "
                   r"of a factorial\); .*c.jsonl:3", caplog.text), caplog.text


def test_warn_unread_bindings_names_each_binding_of_a_configurable_the_tool_does_not_read(caplog):
  """eval.py registers rollouts.* (it imports rollouts) but samples with evaluation.*: a rollouts.temperature given
  to it was accepted and ignored."""
  import common
  with caplog.at_level("WARNING", logger="phi_jax"):
    gin_bindings.warn_unread_bindings(["rollouts.temperature=0.0", "evaluation.temperature=0.0", "grpo.top_p=0.9"],
                                      ("rollouts", "grpo"), "eval.py", "use evaluation.*")
  assert "eval.py does not read rollouts.temperature (given as --gin_param=rollouts.temperature=0.0)" in caplog.text
  assert "grpo.top_p" in caplog.text and "evaluation.temperature" not in caplog.text


def test_the_rollout_summary_records_the_stop_tokens_system_prompt_and_policy_it_sampled_with(tiny_run, tmp_path,
                                                                                              monkeypatch):
  """pairs.jsonl holds the bare problems: pairs rendered with another data.system_prompt, stopped on other tokens or
  drawn from another policy could not be told apart without the summary."""
  import rollouts
  from phi_jax.data.chat import stop_token_ids
  from phi_jax.model import presets
  run, problems = tiny_run
  tokenizer = common.get_tokenizer("tiny:phi-4", str(run))

  def generate_text(params, config, tokenizer, prompts, rng, sampling, **kwargs):
    return [{"text": f"\\boxed{{{i % 2}}}", "num_tokens": 1, "finished": True} for i in range(len(prompts))]

  monkeypatch.setattr(rollouts, "generate_text", generate_text)
  monkeypatch.setattr(rollouts, "load_policy", lambda *a: (presets["tiny"], None, tokenizer))
  out = tmp_path / "pairs.jsonl"
  try:
    summary = rollouts.main([f"--init_from={run}", f"--problems={problems}", f"--out={out}", "--k=2",
                             "--gin_param=rollouts.max_new_tokens=8", "--gin_param=data.system_prompt='Be brief.'"])
  finally:
    gin.clear_config()
  written = json.loads((tmp_path / "pairs.summary.json").read_text())
  assert written == json.loads(json.dumps(summary))
  assert written["stop_token_ids"] == list(stop_token_ids(tokenizer)) != []  # the chat format's, as generation used
  assert written["system_prompt"] == "Be brief." and written["init_from"] == str(run)
  given = rollouts.rollout_pairs(None, None, None, str(problems), str(tmp_path / "given.jsonl"), k=2,
                                 sampling=rollouts.SamplingConfig(max_new_tokens=4, stop_token_ids=(7, 9)),
                                 verify_fn=lambda completions, golds: [True] * len(completions))
  assert given["stop_token_ids"] == [7, 9] and given["system_prompt"] is None and given["init_from"] is None


def test_a_problem_whose_prompt_and_budget_exceed_the_models_positions_is_refused_before_the_model_loads(
    tiny_run, tmp_path, monkeypatch):
  """A 700-word problem on the 512-position tiny model was only logged by the sampler (no problem named) and scored
  like any other; now it is named with its length before the weights load, by eval and rollouts alike."""
  import rollouts
  from phi_jax.data.chat import render_prompt
  run, _ = tiny_run
  long_problem = "word " * 700 + "?"
  problems = tmp_path / "long.jsonl"
  problems.write_text("".join(json.dumps({"problem": p, "answer": "1"}) + "\n" for p in ("1 + 0?", long_problem)))
  length = len(render_prompt(common.get_tokenizer("tiny:phi-4", str(run)), long_problem))
  assert length + 8 > 512
  monkeypatch.setattr(rollouts, "load_policy", lambda *a: pytest.fail("the model was loaded"))
  cases = [(eval_lib.main, [f"--out={tmp_path / 'e'}", "--gin_param=evaluation.max_new_tokens=8"],
            r"evaluation.max_new_tokens=8.*--limit=1"),
           (rollouts.main, [f"--out={tmp_path / 'p.jsonl'}", "--gin_param=rollouts.max_new_tokens=8"],
            r"rollouts.max_new_tokens=8.*Drop them")]
  for fn, flags, advice in cases:
    try:
      with pytest.raises(ValueError, match=rf"long.jsonl:2 \({length} prompt tokens\)") as info:
        fn([f"--init_from={run}", f"--problems={problems}"] + flags)
    finally:
      gin.clear_config()
    message = str(info.value)
    assert "max_position_embeddings=512" in message and "long.jsonl:1" not in message
    assert re.search(advice, message, re.S), message
    assert "with N <=" not in message  # no budget makes room for a prompt longer than the context
  medium = tmp_path / "medium.jsonl"
  medium.write_text(json.dumps({"problem": "word " * 50 + "?", "answer": "1"}) + "\n")
  length = len(render_prompt(common.get_tokenizer("tiny:phi-4", str(run)), "word " * 50 + "?"))
  try:
    with pytest.raises(ValueError, match=rf"medium.jsonl:1 \({length} prompt tokens\).*Set --gin_param="
                                         rf"'rollouts.max_new_tokens=N' with N <= {512 - length}, or drop them"):
      rollouts.main([f"--init_from={run}", f"--problems={medium}", f"--out={tmp_path / 'p.jsonl'}",
                     "--gin_param=rollouts.max_new_tokens=400"])
  finally:
    gin.clear_config()
  # pts_pairs.py continues a completion by as many tokens again: the prompt needs room for twice the budget.
  import pts_pairs
  try:
    with pytest.raises(ValueError, match=rf"rollouts.max_new_tokens=200 taken 2 times \(a prompt may have at most "
                                         rf"{512 - 400} tokens\): .*medium.jsonl:1 \({length} prompt tokens\). Set "
                                         rf"--gin_param='rollouts.max_new_tokens=N' with N <= {(512 - length) // 2}, "
                                         rf"or drop them"):
      pts_pairs.main([f"--init_from={run}", f"--problems={medium}", f"--out={tmp_path / 'p.jsonl'}",
                      "--gin_param=rollouts.max_new_tokens=200"])
  finally:
    gin.clear_config()
  try:  # the problems before it fit: evaluated (the model loads)
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
      eval_lib.main([f"--init_from={run}", f"--problems={problems}", f"--out={tmp_path / 'e'}", "--limit=1",
                     "--gin_param=evaluation.max_new_tokens=8"])
  finally:
    gin.clear_config()


def test_evaluate_and_summarize_refuse_an_empty_problem_list():
  with pytest.raises(ValueError, match="no problems to evaluate"):
    eval_lib.evaluate(None, None, None, [], settings=eval_lib.eval_settings())
  with pytest.raises(ValueError, match="no problems to evaluate"):
    eval_lib.summarize([])


@pytest.mark.parametrize("param", ["rollouts.temperature=0.0", "rollouts.top_k=1"])
def test_greedy_rollouts_of_several_per_problem_are_refused_before_the_model_loads(tiny_run, tmp_path, monkeypatch,
                                                                                   param):
  """Greedy rollouts of a problem are identical, all right or all wrong, so they never make a pair."""
  import rollouts
  run, problems = tiny_run
  monkeypatch.setattr(rollouts, "load_policy", lambda *a: pytest.fail("the model was loaded"))
  try:
    with pytest.raises(ValueError, match=rf"{re.escape(param)} with --k=8: the 8 rollouts of a problem would be "
                                         r"identical.*rollouts.temperature > 0"):
      rollouts.main([f"--init_from={run}", f"--problems={problems}", f"--out={tmp_path / 'p.jsonl'}",
                     f"--gin_param={param}"])
  finally:
    gin.clear_config()
  with pytest.raises(ValueError, match="identical"):
    rollouts.rollout_pairs(None, None, None, str(problems), str(tmp_path / "q.jsonl"), k=2,
                           sampling=rollouts.SamplingConfig(max_new_tokens=4, top_k=1),
                           verify_fn=lambda completions, golds: [True] * len(completions))
