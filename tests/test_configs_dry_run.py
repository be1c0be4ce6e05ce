"""Every shipped real-model gin config builds its stage abstractly and compiles ahead of time on 8 simulated devices.

The check is `experiments/train.py --dry_run` (no weights, no data) on the named preset instead of the placeholder
checkpoint path, at reduced sizes so the suite stays within minutes on a small CPU: rows of 256 tokens (GRPO: 64
prompt + 192 response tokens), a global batch of 8 (GRPO: one prompt x 8 samples), one microbatch. Everything else
(model shapes, dtypes, remat, attention backend, optimizer, the stage's loss and batch fields) is the config's own.
"""

import glob
import json
import logging
import os
import re
import shutil
import sys

import gin
import phi_jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import common  # noqa: E402
import gin_bindings  # noqa: E402
import run_files  # noqa: E402
import tokenizer_setup  # noqa: E402

PRESETS = {"phi4_mini_reasoning": "phi-4-mini", "phi4_reasoning": "phi-4"}
REDUCED = ["data.seq_len=256", "data.batch_size=8", "train.microbatches=1", "grpo.max_prompt_tokens=64",
           "grpo.max_new_tokens=192", "grpo.prompts_per_step=1", "grpo.group_size=8", "grpo.rollout_batch_size=8",
           "mesh.shape={'fsdp': -1}"]
STAGE_FIELDS = {
    "next_token": {"tokens", "positions", "segment_ids", "loss_mask"},
    "dpo": ({f"{side}_{field}" for side in ("chosen", "rejected")
             for field in ("tokens", "positions", "segment_ids", "loss_mask")}
            | {"ref_chosen_logps", "ref_rejected_logps"}),
    "grpo": {"tokens", "positions", "segment_ids", "loss_mask", "old_logprobs", "advantages"},
}
CONFIGS = sorted(os.path.relpath(p, ROOT) for family in PRESETS
                 for p in glob.glob(os.path.join(ROOT, "experiments", "configs", family, "*.gin"))
                 if os.path.basename(p) not in ("model.gin", "eval.gin"))


def dry_run(config_file, extra=(), reduced=True):
  cwd = os.getcwd()
  os.chdir(ROOT)  # configs include each other by repository-relative paths
  try:
    gin.clear_config()
    preset = PRESETS[config_file.split(os.sep)[-2]]
    gin_bindings.parse_gin([config_file], ["model.hf_path=None", f"model.preset='{preset}'"]
                           + (REDUCED if reduced else []) + list(extra))
    return common.dry_run()
  finally:
    gin.clear_config()
    os.chdir(cwd)


def test_every_real_config_is_covered():
  names = {os.path.basename(c) for c in CONFIGS}
  assert {"midtrain.gin", "sft.gin", "dpo.gin", "grpo.gin", "grpo_plus.gin"} <= names
  assert len(CONFIGS) == 6


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_compiles_for_eight_devices(config_file):
  report = dry_run(config_file)
  name = os.path.basename(config_file)[:-len(".gin")]
  stage = {"midtrain": "next_token", "sft": "next_token"}.get(name, name.split("_")[0])
  assert report["stage"] == stage
  assert report["mesh"]["fsdp"] == 8
  fields = set(report["batch_fields"])
  assert fields >= STAGE_FIELDS[stage]
  # Phi-4-reasoning-plus keeps a KL term to the SFT model (beta 0.001): its batches carry reference log-probs.
  assert ("ref_logprobs" in fields) == (name == "grpo_plus")
  assert report["model_params"] > 3e9
  memory = report["per_device"]
  # fp32 params + Adam moments split 8 ways: at least 12 bytes per parameter / 8 on every device.
  assert memory["argument_size_gib"] * 2**30 > 12 * report["model_params"] / 8
  assert memory["peak_estimate_gib"] >= memory["argument_size_gib"]
  # Phi-4-reasoning-plus's KL reference is a frozen copy of the params in their shards, counted in the peak (the
  # DPO config precomputes its reference log-probs, so it keeps none).
  if name == "grpo_plus":
    assert 4 * report["model_params"] / 8 <= memory["reference_params_gib"] * 2**30 < 4.1 * report["model_params"] / 8
    assert memory["peak_estimate_gib"] >= memory["argument_size_gib"] + memory["reference_params_gib"]
  else:
    assert memory["reference_params_gib"] == 0
  # GRPO's rollouts: one generate call's KV cache (8 rows of 64 + 192 - 1 -> 256 slots), keys and values of every
  # layer in bfloat16, its rows over the 8 devices.
  if stage == "grpo":
    config = phi_jax.presets[PRESETS[config_file.split(os.sep)[-2]]]
    keys_and_values = 8 * 256 * config.num_layers * 2 * config.num_kv_heads * config.resolved_head_dim * 2 / 8
    assert keys_and_values <= memory["rollout_kv_cache_gib"] * 2**30 < 1.05 * keys_and_values
  else:
    assert "rollout_kv_cache_gib" not in memory


# What an 80 GB GPU gives a JAX process by default (XLA_PYTHON_CLIENT_MEM_FRACTION=0.75): the estimate must fit
# under it, which leaves a quarter of the device for what the estimate does not count.
GPU_80GB_BUDGET_GIB = 0.75 * 80e9 / 2**30


@pytest.mark.parametrize("config_file", [c for c in CONFIGS if os.path.basename(c) in ("midtrain.gin", "sft.gin",
                                                                                       "dpo.gin")
                                         and "phi4_mini_reasoning" in c])
def test_the_phi4_mini_configs_fit_the_8_gpus_they_are_sized_for_at_their_own_sizes(config_file):
  """At their own batches and row lengths (not the reduced ones above) midtrain, sft and dpo.gin needed 182, 226
  and 183 GiB a device on 8 devices in one microbatch: the README's real-model commands ran out of memory on one
  8 x H100 node. Their train.microbatches bring the estimate under an 80 GB device's share."""
  report = dry_run(config_file, reduced=False)
  assert report["mesh"]["fsdp"] == 8
  assert report["global_batch"][0] in (64, 128)  # the paper's batch, not one cut to fit
  assert report["per_device"]["peak_estimate_gib"] < GPU_80GB_BUDGET_GIB, (config_file, report["per_device"])


def test_mismatched_data_weights_say_what_to_give():
  with pytest.raises(ValueError, match=r"data.weights has 3 entries for 2 data.train_files"):
    common.data(train_files=["a.jsonl", "b.jsonl"], weights=[0.2, 0.3, 0.5])
  assert common.data(train_files=["a.jsonl", "b.jsonl"], weights=[0.4, 0.6])["weights"] == [0.4, 0.6]


def test_dry_run_refuses_what_a_run_refuses_before_compiling():
  """The run's own batch checks, per stage: GRPO's rows are prompts x group and its rows prompt + response."""
  midtrain = os.path.join("experiments", "configs", "phi4_mini_reasoning", "midtrain.gin")
  grpo = os.path.join("experiments", "configs", "phi4_mini_reasoning", "grpo.gin")
  with pytest.raises(ValueError, match=r"data.batch_size=6 \(per microbatch 6\) must be divisible by the data x fsdp"):
    dry_run(midtrain, ["data.batch_size=6"])
  with pytest.raises(ValueError, match=r"data.seq_len=200000 exceeds the model's max_position_embeddings"):
    dry_run(midtrain, ["data.seq_len=200000"])
  with pytest.raises(ValueError, match=r"grpo.prompts_per_step x grpo.group_size=6 \(per microbatch 6\)"):
    dry_run(grpo, ["grpo.group_size=6", "grpo.rollout_batch_size=None"])
  with pytest.raises(ValueError, match=r"grpo.rollout_batch_size=4: each generate call's rows split over the data x "
                                       r"fsdp mesh size 8"):
    dry_run(grpo, ["grpo.rollout_batch_size=4"])
  with pytest.raises(ValueError, match=r"grpo.max_prompt_tokens \+ grpo.max_new_tokens=200064 exceeds"):
    dry_run(grpo, ["grpo.max_new_tokens=200000"])
  with pytest.raises(ValueError, match=r"=16 \(per microbatch 4\) must be divisible by the data x fsdp mesh size "
                                       r"8; change .* or mesh.shape, or lower train.microbatches=4"):
    dry_run(grpo, ["grpo.prompts_per_step=2", "train.microbatches=4", "grpo.rollout_batch_size=None"])
  # Settings the stage would not read: GRPO's rows come from grpo.*, and an eval schedule needs eval files.
  with pytest.raises(ValueError, match=r"train.eval_every=200 evaluates on data.eval_files, which is empty"):
    dry_run(midtrain, ["data.eval_files=[]"])
  with pytest.raises(ValueError, match=r"train.num_steps=0: a run trains at least one step"):
    dry_run(midtrain, ["train.num_steps=0"])
  with pytest.raises(ValueError, match=r"warmup_steps=100 and warmup_fraction=0.1 are both set"):
    dry_run(midtrain, ["optimizer.warmup_steps=100"])  # the file's fraction used to win without a word


def test_the_real_batch_settings_split_over_the_devices_the_configs_are_sized_for():
  """The dry runs above take one microbatch of 8 rows; at their own sizes the configs must split too. grpo_plus.gin
  sizes its rollouts for 32 devices, where 64 microbatches of its 512 rows (8 each) did not split; Phi-4-reasoning's
  SFT takes 32 devices too. The others state one 8-GPU node."""
  sized_for = {os.path.join("experiments", "configs", "phi4_reasoning", name): 32 for name in ("grpo_plus.gin",
                                                                                               "sft.gin")}
  for config_file in CONFIGS:
    gin.clear_config()
    try:
      gin_bindings.parse_gin([os.path.join(ROOT, config_file)], ["model.hf_path=None"])
      settings = common.train_settings()
      stage, microbatches = settings["stage"], settings["loop"].microbatches
      rows = common.stage_batch_shape(stage, common.data())[0]
    finally:
      gin.clear_config()
    devices = sized_for.get(config_file, 8)
    assert rows % microbatches == 0 and (rows // microbatches) % devices == 0, (config_file, rows, microbatches)


def test_loss_settings_are_one_knob_for_every_stage():
  """train.chunk_size reaches the GRPO loss (there is no second knob to forget), and a z-loss on a stage whose loss
  has no such term is refused rather than dropped."""
  grpo = os.path.join("experiments", "configs", "phi4_mini_reasoning", "grpo.gin")
  dpo = os.path.join("experiments", "configs", "phi4_mini_reasoning", "dpo.gin")
  with pytest.raises(ValueError, match=r"denylisted kwarg 'chunk_size'[\s\S]*bind that instead"):
    dry_run(grpo, ["grpo.chunk_size=512"])
  for config_file in (grpo, dpo):
    with pytest.raises(ValueError, match=r"train.z_loss=0.001 applies to the next-token loss only"):
      dry_run(config_file, ["train.z_loss=1e-3"])
  with pytest.raises(ValueError, match=r"reward.length_aware_max_tokens=512 scales the 'length_aware' reward, which "
                                       r"reward.weights=\{'correctness': 1.0\} does not use"):
    dry_run(grpo, ["reward.length_aware_max_tokens=512"])
  # Constants the run's budget cannot hold are refused by the dry run, not when the GRPO stage starts.
  with pytest.raises(ValueError, match=r"cannot be scaled to a response budget of .*, or lower "
                                       r"reward.settings\['length_aware'\]'s l_pos_control against its l_max"):
    dry_run(grpo, ['reward.weights={"length_aware": 1.0}',
                   'reward.settings={"length_aware": {"l_pos_control": 31700}}'])
  with pytest.raises(ValueError, match=r"reward.settings\['length_aware'\]=\{'l_max': 4096\}: need 0 <= l_pos_control"):
    dry_run(grpo, ['reward.weights={"length_aware": 1.0}', 'reward.settings={"length_aware": {"l_max": 4096}}'])
  # Scaled beyond the longest rollout, the reward never pushes for shorter answers within it.
  with pytest.raises(ValueError, match=r"reward.length_aware_max_tokens=32768 is more than grpo.max_new_tokens=16384"):
    dry_run(os.path.join("experiments", "configs", "phi4_reasoning", "grpo_plus.gin"),
            ["reward.length_aware_max_tokens=32768", "grpo.max_new_tokens=16384"])
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    gin.clear_config()
    gin_bindings.parse_gin([grpo], ["train.chunk_size=96"])
    settings = common.train_settings()
    assert common.grpo_config(settings).chunk_size == 96
    assert common._stage_loss_fn("grpo", None, settings).keywords["cfg"].chunk_size == 96
    assert common._stage_settings("grpo", settings)["chunk_size"] == 96
    # GRPO's loss is a signed surrogate near zero: no loss-spike flags unless asked for; other stages keep them.
    assert settings["loop"].loss_spike_factor == 0.0
    gin.clear_config()
    gin_bindings.parse_gin([grpo], ["train.loss_spike_factor=3.0"])
    assert common.train_settings()["loop"].loss_spike_factor == 3.0
    gin.clear_config()
    gin_bindings.parse_gin([dpo], [])
    assert common.train_settings()["loop"].loss_spike_factor == 5.0
  finally:
    gin.clear_config()
    os.chdir(cwd)


def test_resume_logs_a_changed_tokenizer_prompt_or_reward(caplog, tmp_path):
  from phi_jax.train import loop

  grpo = os.path.join("experiments", "configs", "phi4_mini_reasoning", "grpo.gin")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"problem": "1 + 1?", "answer": "2"}\n')

  def meta(extra, vocab):
    gin.clear_config()
    gin_bindings.parse_gin([grpo], [f"data.train_files=['{prompts}']"] + extra)
    return common.run_meta("grpo", common.train_settings(), common.data(), [None] * vocab)

  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    saved = meta([], 100)
    current = meta(["data.tokenizer='/other/tokenizer'", "data.system_prompt='Be brief.'",
                    "reward.weights={'correctness': 1.0, 'repetition': 0.5}", "train.init_from='runs/other'"], 120)
  finally:
    gin.clear_config()
    os.chdir(cwd)
  with caplog.at_level("WARNING", logger="phi_jax"):
    loop.check_resume_compatible(saved, current, "W")
  for change in ("data.tokenizer: '/path/to/Phi-4-mini-instruct' -> '/other/tokenizer'", "data.system_prompt:",
                 "data.tokenizer_size: 100 -> 120", "stage_settings.reward: {'weights': {'correctness': 1.0}",
                 "init_from: None -> 'runs/other'"):
    assert change in caplog.text


def test_reasoning_sft_turns_phi4_into_the_reasoning_preset():
  """phi4_reasoning/sft.gin starts from the phi-4 weights; its overrides must give the phi-4-reasoning preset's
  context, RoPE base and end/pad tokens (an export with phi-4's eos would not stop at the end of a turn)."""
  from phi_jax import presets

  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    gin.clear_config()
    gin_bindings.parse_gin([os.path.join("experiments", "configs", "phi4_reasoning", "sft.gin")],
                           ["model.hf_path=None", "model.preset='phi-4'"])
    config, _ = common.model()
  finally:
    gin.clear_config()
    os.chdir(cwd)
  reasoning = presets["phi-4-reasoning"]
  for field in ("max_position_embeddings", "original_max_position_embeddings", "rope_theta", "bos_token_id",
                "eos_token_id", "pad_token_id", "vocab_size", "num_layers"):
    assert getattr(config, field) == getattr(reasoning, field), field


def test_data_settings_that_cannot_make_a_batch_are_refused():
  for kwargs, match in (({"batch_size": 0}, "data.batch_size=0"), ({"seq_len": 1}, "data.seq_len=1"),
                        ({"num_epochs": 0}, "data.num_epochs=0"), ({"eval_batches": 0}, "data.eval_batches=0")):
    with pytest.raises(ValueError, match=match):
      common.data(**kwargs)


def _configured(binding, make):
  """What `make()` returns with `binding` (and train.num_steps, which train requires) bound."""
  gin.clear_config()
  try:
    gin_bindings.parse_gin([], ["train.num_steps=2", binding])
    return make()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("binding,make,match", [
    ('train.export_hf="False"', lambda: common.train_settings(), r"train.export_hf='False' must be True or False"),
    ("train.async_checkpoints=0", lambda: common.train_settings(), r"train.async_checkpoints=0 must be True or False"),
    ('train.num_steps="10"', lambda: common.train_settings(), r"train.num_steps='10' must be a whole number"),
    ("train.chunk_size=64.5", lambda: common.train_settings(), r"train.chunk_size=64.5 must be a whole number"),
    ('optimizer.learning_rate="1e-3"', lambda: common.optimizer(), r"optimizer.learning_rate='1e-3' must be a number"),
    ("optimizer.warmup_steps=2.5", lambda: common.optimizer(), r"optimizer.warmup_steps=2.5 must be a whole number"),
    ("data.seq_len=128.5", lambda: common.data(), r"data.seq_len=128.5 must be a whole number"),
    ('data.batch_size="8"', lambda: common.data(), r"data.batch_size='8' must be a whole number"),
    ("data.eval_batches=2.5", lambda: common.data(), r"data.eval_batches=2.5 must be a whole number"),
    ('data.weights={"a": 1.0}', lambda: common.data(), r"data.weights=\{'a': 1.0\} must be a list"),
    ('data.weights=["1.0"]', lambda: common.data(train_files=["a.jsonl"]), r"data.weights=\['1.0'\]: .*number"),
    ("data.tokenizer=3", lambda: common.data(), r"data.tokenizer=3 must be a string"),
    ("grpo.group_size=8.5", lambda: common.grpo(), r"grpo.group_size=8.5 must be a whole number"),
    ('grpo.top_p="0.9"', lambda: common.grpo(), r"grpo.top_p='0.9' must be a number"),
    ("grpo.scale_advantages_by_std=1", lambda: common.grpo(), r"grpo.scale_advantages_by_std=1 must be True or False"),
    ('mesh.shape=["fsdp"]', lambda: common.mesh(), r"mesh.shape=\['fsdp'\] must be a dict"),
    ('model.preset=["tiny"]', lambda: common.model(), r"model.preset=\['tiny'\] must be a string"),
    ('dpo.beta="0.1"', lambda: common.dpo_settings(), r"dpo.beta='0.1' must be a number"),
    ("reward.length_aware_max_tokens=10.5", lambda: common.reward_settings(),
     r"reward.length_aware_max_tokens=10.5 must be a whole number"),
])
def test_a_binding_of_the_wrong_type_is_refused_naming_it(binding, make, match):
  """A string for a number or a bool ("False" is truthy: the export was written), a fraction for a count, a dict for
  a list: each failed deep inside Grain, JAX or numpy, or silently did the opposite."""
  with pytest.raises(ValueError, match=match):
    _configured(binding, make)


@pytest.mark.parametrize("weights,match", [
    ("[0, 1]", r"data.weights=\[0, 1\]: each weight must be positive and finite"),
    ("[-1.0, 1]", r"must be positive and finite"),
    ("[1e-30, 1]", r"data.weights=\[1e-30, 1\]: mixture weights .* too far apart"),
    ("[1e300, 1e-300]", r"too far apart")])
def test_data_weights_the_reader_would_refuse_are_refused_with_the_settings(weights, match):
  """A weight the data reader refuses stops a run, its --dry_run and a recipe's check before anything trains, not
  when the stage (perhaps the third of a recipe) builds its data."""
  with pytest.raises(ValueError, match=match):
    _configured(f"data.weights={weights}", lambda: common.data(train_files=["a.jsonl", "b.jsonl"]))
  assert _configured("data.weights=[1e-3, 1]", lambda: common.data(train_files=["a", "b"]))["weights"] == [1e-3, 1]


def test_whole_number_floats_are_taken_as_ints_and_ints_as_floats():
  data = _configured("data.seq_len=128.0", common.data)
  assert data["seq_len"] == 128 and type(data["seq_len"]) is int
  for name in ("batch_size", "eval_batches", "num_epochs"):
    assert type(_configured(f"data.{name}=2.0", common.data)[name]) is int, name
  assert type(_configured("train.chunk_size=64.0", common.train_settings)["chunk_size"]) is int
  assert _configured("train.num_steps=2.0", common.train_settings)["loop"].num_steps == 2
  assert type(_configured("grpo.group_size=8.0", common.grpo).group_size) is int
  assert type(_configured("optimizer.warmup_steps=10.0", common.optimizer).warmup_steps) is int
  assert _configured("optimizer.learning_rate=1", common.optimizer).learning_rate == 1
  assert _configured("train.export_hf=True", common.train_settings)["loop"].export_hf is True
  assert _configured("data.train_files='a.jsonl'", common.data)["train_files"] == ["a.jsonl"]
  assert _configured("data.weights=(1, None)", lambda: common.data(train_files=["a", "b"]))["weights"] == (1, None)
  # Python callers: a path object for a path, a dtype object for a dtype, one string for a list of strings.
  import pathlib
  import jax.numpy as jnp
  assert common.train_settings(num_steps=1, init_from=pathlib.Path("/runs/sft"))["init_from"] == "/runs/sft"
  assert common.model(param_dtype=jnp.bfloat16)[0].param_dtype == "bfloat16"
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import recipe
  assert recipe.recipe_settings(stages="base")["stages"] == ["base"]


@pytest.mark.parametrize("make,match", [
    (lambda: common.reward_settings(weights={"corectness": 1.0}), r"reward.weights names 'corectness', .*correctness"),
    (lambda: common.reward_settings(weights=["correctness"]), r"reward.weights=\['correctness'\] must be a dict"),
    (lambda: common.reward_settings(weights={"correctness": "1"}), r"reward.weights\['correctness'\]='1' .*number"),
    (lambda: common.dpo_settings(too_long="truncate"), r"dpo.too_long='truncate'; .*'drop', 'truncate_prompt'"),
    (lambda: common.dpo_settings(loss_type="hinge"), r"dpo.loss_type='hinge'; .*'sigmoid', 'ipo'"),
    (lambda: common.dpo_settings(beta=-1.0), r"dpo.beta=-1.0 must be > 0"),
    (lambda: common.dpo_settings(beta=0), r"dpo.beta=0 must be > 0"),
    (lambda: common.dpo_settings(label_smoothing=0.5), r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
    (lambda: common.dpo_settings(loss_type="ipo", label_smoothing=0.1), r"dpo.label_smoothing=0.1 .*sigmoid"),
    (lambda: common.data(packing="none"), r"data.packing='none'; .*'first_fit', 'best_fit'.* or None"),
    (lambda: common.data(too_long="truncate"), r"data.too_long='truncate'; .*'split', 'drop'"),
    (lambda: common.data(on_bad_record="ignore"), r"data.on_bad_record='ignore'; .*'raise', 'skip'"),
])
def test_stage_settings_of_no_known_value_are_refused_when_read(make, match):
  """Values the stage's loss, reward or data reader refuses: found when the stage started (in a recipe, after the
  stages before it had trained), now when the settings are read."""
  with pytest.raises(ValueError, match=match):
    make()
  gin.clear_config()


def test_a_dpo_run_on_an_empty_pairs_file_says_where_it_came_from(tmp_path):
  """rollouts.py writes no pairs when every prompt's rollouts agree; DPO then ended in a bare 'empty dataset'."""
  empty = tmp_path / "pairs.jsonl"
  empty.write_text("\n")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    gin.clear_config()
    gin_bindings.parse_gin(["experiments/configs/dpo_tiny.gin"], [f'data.train_files=["{empty}"]', "data.eval_files=[]",
                                                          "train.num_steps=1"])
    with pytest.raises(ValueError, match="holds no preference pairs.*train the policy longer, raise --k"):
      common.run_training(str(tmp_path / "run"))
  finally:
    gin.clear_config()
    os.chdir(cwd)


def test_cli_data_files_open_by_type_and_bad_prompt_lines_name_file_and_line(tmp_path, caplog):
  import datasets

  from phi_jax.data.sources import DataError
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(str(tmp_path / "tok"), chat_format="phi-4")
  records = [{"text": f"document {i}"} for i in range(6)]
  datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "docs_dir"))
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = common.data(seq_len=16, batch_size=2)

  def first_batch(path):
    return next(common._pipeline([path], cfg, tokenizer, seed=0, per_process_batch=2, shuffle=False, num_epochs=1))

  from_dir, from_jsonl = first_batch(str(tmp_path / "docs_dir")), first_batch(str(tmp_path / "docs.jsonl"))
  for key in from_jsonl:
    np.testing.assert_array_equal(from_dir[key], from_jsonl[key])
  (tmp_path / "docs.ndjson").write_text((tmp_path / "docs.jsonl").read_text())
  np.testing.assert_array_equal(first_batch(str(tmp_path / "docs.ndjson"))["tokens"], from_jsonl["tokens"])
  import gzip
  (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress((tmp_path / "docs.jsonl").read_bytes()))
  with pytest.raises(DataError, match="unknown file type"):
    first_batch(str(tmp_path / "docs.jsonl.gz"))
  # Resume compares the sizes of the files a save_to_disk directory holds, a DatasetDict's splits included.
  datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dict_dir"))
  sizes = common.file_sizes([str(tmp_path / "dict_dir"), str(tmp_path / "docs_dir")])
  assert [os.path.relpath(path, tmp_path).split(os.sep)[0] for path, _ in sizes] == ["dict_dir", "docs_dir"]
  # Several splits: the error names a split's directory, which reads as a data file of its own.
  datasets.DatasetDict({"train": datasets.Dataset.from_list(records), "test": datasets.Dataset.from_list(records)}
                       ).save_to_disk(str(tmp_path / "splits_dir"))
  with pytest.raises(DataError, match=rf"ambiguous split: .* point at one split's directory \({tmp_path}/splits_dir/"):
    first_batch(str(tmp_path / "splits_dir"))
  np.testing.assert_array_equal(first_batch(str(tmp_path / "splits_dir" / "train"))["tokens"], from_jsonl["tokens"])

  good = '{"problem": "1 + 1?", "answer": 2}\n'
  for line, match in (('["a list"]', r"p.jsonl:2: not an object"), (b'{"problem": "caf\xe9", "answer": "1"}',
                                                                     r"p.jsonl:2: not UTF-8"),
                      ('{"problem": "Is 2 even?", "answer": true}', r"p.jsonl:2: missing field")):
    (tmp_path / "p.jsonl").write_bytes(good.encode() + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(DataError, match=match):
      common._read_prompts([str(tmp_path / "p.jsonl")])
  # Answers no rollout could be graded against (every one would score incorrect, step after step): left out, named.
  ungradable = ['{"problem": "2 + 2?", "answer": ""}', '{"problem": "Double?", "answer": "15!!"}',
                '{"problem": "Long?", "answer": "' + "1" * 2000 + '"}']
  (tmp_path / "p.jsonl").write_text(good + "\n".join(ungradable) + "\n")
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert common._read_prompts([str(tmp_path / "p.jsonl")]) == [{"problem": "1 + 1?", "answer": "2"}]
  assert re.search(r"left out 3 GRPO prompt\(s\) .*p.jsonl:2 \(''.*p.jsonl:3 \('15!!': refused by the answer screen: "
                   r"a factorial of a factorial\).*p.jsonl:4 \('1111", caplog.text), caplog.text
  (tmp_path / "p.jsonl").write_text(ungradable[0] + "\n")
  with pytest.raises(DataError, match=r"empty dataset: no GRPO prompts the verifier can grade against"):
    common._read_prompts([str(tmp_path / "p.jsonl")])
  datasets.Dataset.from_list([{"problem": "1 + 1?", "answer": "2"}]).to_parquet(str(tmp_path / "p.parquet"))
  assert common._read_prompts([str(tmp_path / "p.parquet")]) == [{"problem": "1 + 1?", "answer": "2"}]


def test_resume_refuses_train_files_that_changed_under_the_same_names(tmp_path):
  """A new shard matching the glob, or an appended file, reshuffles the data the saved position points into."""
  from phi_jax.train import loop

  (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
  cfg = common.data(train_files=[str(tmp_path / "*.jsonl")])
  settings = common.train_settings(num_steps=1)
  saved = common.run_meta("next_token", settings, cfg, [None] * 10)
  loop.check_resume_compatible(saved, common.run_meta("next_token", settings, cfg, [None] * 10), "W")
  (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
  with pytest.raises(loop.IncompatibleCheckpointError, match=r"b.jsonl: absent -> 14 bytes"):
    loop.check_resume_compatible(saved, common.run_meta("next_token", settings, cfg, [None] * 10), "W")
  (tmp_path / "b.jsonl").unlink()
  (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": "c"}\n')
  with pytest.raises(loop.IncompatibleCheckpointError, match=r"a.jsonl: 14 -> 28 bytes"):
    loop.check_resume_compatible(saved, common.run_meta("next_token", settings, cfg, [None] * 10), "W")
  # A checkpoint written before file sizes were recorded resumes as before.
  del saved["data"]["train_file_sizes"]
  loop.check_resume_compatible(saved, common.run_meta("next_token", settings, cfg, [None] * 10), "W")


def test_a_tiny_tokenizer_is_built_whole_into_place(tmp_path, monkeypatch):
  """Built in a temporary directory and renamed (processes started together wrote the same files at once, and one
  read another's half-written tokenizer_config.json); what a crash left half-built is replaced."""
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("")  # a build cut short
  built_in = []
  build = tokenizer_setup.build_tiny_tokenizer
  monkeypatch.setattr(tokenizer_setup, "build_tiny_tokenizer",
                      lambda out, **kw: built_in.append(out) or build(out, **kw))
  built = common.get_tokenizer("tiny:phi-4", str(tmp_path))
  assert len(built_in) == 1 and os.path.basename(built_in[0]) != "tokenizer"  # never where readers look
  assert sorted(os.listdir(tmp_path)) == ["tokenizer"] and built.chat_template
  again = common.get_tokenizer("tiny:phi-4", str(tmp_path))
  assert again.get_vocab() == built.get_vocab()


def test_a_tokenizer_path_without_tokenizer_files_is_named_by_its_binding(tmp_path):
  """The loader's error knows the path alone; the run's says which setting gave it."""
  with pytest.raises(FileNotFoundError, match=rf"^data.tokenizer='{re.escape(str(tmp_path))}': .* holds no tokenizer"):
    common.get_tokenizer(str(tmp_path), str(tmp_path / "run"))


def test_a_tiny_tokenizer_of_another_format_is_rebuilt_before_a_run_starts_and_refused_after(tmp_path, caplog):
  """A workdir whose first attempt stopped at start-up kept the tokenizer of its first data.tokenizer: the fixed
  settings' format was ignored, the data rendered in the old one."""
  from phi_jax.data import chat

  common.get_tokenizer("tiny:phi-4", str(tmp_path))
  with caplog.at_level("WARNING", logger="phi_jax"):
    mini = common.get_tokenizer("tiny:phi-4-mini", str(tmp_path))
  assert chat.chat_family(mini) == "phi-4-mini" and "replacing the tiny 'phi-4' tokenizer" in caplog.text
  assert chat.chat_family(tokenizer_setup.load_tokenizer(str(tmp_path / "tokenizer"))) == "phi-4-mini"
  for trained in ("checkpoints/10", "params"):  # a run in progress, or a finished one whose checkpoints were deleted
    (tmp_path / trained).mkdir(parents=True)
    with pytest.raises(ValueError, match="a run trained with the tiny tokenizer of the 'phi-4-mini' format"):
      common.get_tokenizer("tiny:phi-4-reasoning", str(tmp_path))
    shutil.rmtree(tmp_path / trained.split("/")[0])
  (tmp_path / "params").mkdir()
  assert common.get_tokenizer("tiny:phi-4-mini", str(tmp_path)).get_vocab() == mini.get_vocab()
  with pytest.raises(ValueError, match="unknown chat format 'phi4'"):
    common.get_tokenizer("tiny:phi4", str(tmp_path))


def test_a_tiny_data_tokenizer_on_a_workdir_that_kept_a_real_tokenizer_says_which_it_holds(tmp_path, caplog):
  """A run trained on a tokenizer directory keeps a copy in W/tokenizer, where "tiny:" tokenizers are built: a copy
  of a real tokenizer with a known chat template was taken for the tiny one of that format, and one with another
  template was named a tiny tokenizer of the 'unknown' format."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer
  words = [" ".join(f"w{i}x{j} v{i * j}q" for j in range(40)) for i in range(40)]
  real = build_tiny_tokenizer(tmp_path / "tokenizer", chat_format="phi-4-mini", corpus=words, vocab_size=1024)
  assert len(real) > 512  # more tokens than a tiny one holds, with the real phi-4-mini chat template
  (tmp_path / "params").mkdir()
  for spec in ("tiny:phi-4-mini", "tiny:phi-4"):
    with pytest.raises(ValueError, match=rf"data.tokenizer='{spec}', but .* holds a run trained with the tokenizer "
                                         rf"in .*/tokenizer, not a tiny one: set data.tokenizer='.*/tokenizer' to "
                                         "resume with it, or use a new workdir"):
      common.get_tokenizer(spec, str(tmp_path))
  shutil.rmtree(tmp_path / "params")  # a run that never started: its tokenizer is replaced, as said
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert len(common.get_tokenizer("tiny:phi-4-mini", str(tmp_path))) == 512
  assert "replacing the tokenizer (not a tiny one) that an earlier, unstarted run left" in caplog.text


def test_a_tokenizer_larger_than_the_embedding_or_a_budget_filling_every_position_is_refused(tmp_path):
  """Token ids past the embedding table would be clamped silently by the gather; max_new_tokens equal to the
  positions leaves none for the prompt."""
  from phi_jax.model import presets
  tokenizer = common.get_tokenizer("tiny:phi-4", str(tmp_path))
  small = presets["tiny"].replace(vocab_size=len(tokenizer) - 1)
  with pytest.raises(ValueError, match=f"has {len(tokenizer)} tokens but the model's vocab_size is {small.vocab_size}"):
    common.check_vocab(small, tokenizer)
  common.check_vocab(presets["tiny"].replace(vocab_size=len(tokenizer)), tokenizer)
  positions = presets["tiny"].max_position_embeddings
  with pytest.raises(ValueError, match="leaves no room for a prompt"):
    common.check_new_tokens("evaluation.max_new_tokens", positions, presets["tiny"])
  common.check_new_tokens("evaluation.max_new_tokens", positions - 1, presets["tiny"])


def test_a_grpo_run_names_the_data_settings_it_does_not_read(caplog):
  """Its rows come from grpo.*; a config that includes a next-token stage's file still runs (grpo_tiny.gin)."""
  grpo = os.path.join("experiments", "configs", "phi4_mini_reasoning", "grpo.gin")
  with caplog.at_level("WARNING", logger="phi_jax"):
    dry_run(grpo, ["data.seq_len=32768", "data.num_epochs=1"])
  assert "a GRPO run does not read data.num_epochs=1, data.seq_len=32768: its batch is" in caplog.text


def test_a_dpo_run_names_the_data_settings_it_does_not_read(caplog):
  """Pairs are one stream, one pair per row: mixture weights, packing and data.too_long (dpo.too_long applies) do
  nothing there."""
  dpo = os.path.join("experiments", "configs", "phi4_mini_reasoning", "dpo.gin")
  with caplog.at_level("WARNING", logger="phi_jax"):
    dry_run(dpo, ["data.weights=[2.0]", "data.packing='best_fit'", "data.too_long='drop'"])
  assert ("a DPO run does not read data.packing='best_fit', data.too_long='drop', data.weights=[2.0]: its pairs are "
          "read in one shuffled stream") in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):
    dry_run(dpo, [])
  assert "does not read" not in caplog.text  # the shipped config sets only what DPO reads


@pytest.mark.parametrize("config_file", sorted(os.path.relpath(p, ROOT) for p in glob.glob(
    os.path.join(ROOT, "experiments", "configs", "*_tiny.gin"))))
def test_the_tiny_configs_the_readme_runs_get_through_the_startup_checks(config_file):
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    gin.clear_config()
    gin_bindings.parse_gin([config_file], [])
    settings = common.train_settings()
    common.check_data_settings(settings["stage"], common.data(), settings["loop"])
    common.optimizer()
  finally:
    gin.clear_config()
    os.chdir(cwd)


def test_grpo_refuses_settings_that_compare_eval_losses():
  """A GRPO run logs no eval loss: early stopping on it, or keeping the best evaluation's params, is refused."""
  for kwargs in ({"early_stopping_patience": 2}, {"keep_best_checkpoint": True}):
    with pytest.raises(ValueError, match="a GRPO run has no eval loss"):
      common.train_settings(num_steps=4, stage="grpo", eval_every=1, **kwargs)
    assert common.train_settings(num_steps=4, stage="next_token", eval_every=1, **kwargs)["stage"] == "next_token"


def test_a_starting_point_of_another_model_or_nowhere_is_named(tmp_path):
  """train.init_from of another shape used to fail inside Orbax ("set strict=False") or Flax; a missing one with a
  bare FileNotFoundError."""
  import jax
  import orbax.checkpoint as ocp
  import phi_jax
  from phi_jax import sharding
  from phi_jax.model import presets
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  ours, theirs = presets["tiny"], presets["tiny"].replace(hidden_size=2 * presets["tiny"].hidden_size)
  with pytest.raises(ValueError, match=r"train.init_from='.*/nowhere': no such directory"):
    common.params_loader(ours, None, str(tmp_path / "nowhere"), mesh)()
  run = tmp_path / "run"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(run / "params"), phi_jax.init_params(theirs, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"holds params of another model \(\['embed'\]\['embedding'\]: \(\d+, 128\) "
                     r"there, \(\d+, 64\) here; .*as in .*run/config.gin\)"):
    common.params_loader(ours, None, str(run), mesh)()
  assert common.params_loader(theirs, None, str(run), mesh)()["embed"]["embedding"].shape[1] == 128
  hf = tmp_path / "hf"
  phi_jax.save_hf(hf, theirs, phi_jax.init_params(theirs, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"another shape than the model \(hidden_size=128 there, 64 here; head_dim=32 "
                     r"there, 16 here\).*set "
                     r"model.hf_path='.*/hf' to take it from the checkpoint"):
    common.params_loader(ours, None, str(hf), mesh)()
  # head_dim spelled out with the size it has anyway: the same arrays, loaded.
  spelled = tmp_path / "hf_head_dim"
  phi_jax.save_hf(spelled, ours.replace(head_dim=ours.resolved_head_dim), phi_jax.init_params(ours, jax.random.key(0)))
  assert common.params_loader(ours, None, str(spelled), mesh)()["embed"]["embedding"].shape[1] == 64
  # transformers writes original_max_position_embeddings=4096 into every config it saves: without LongRoPE the
  # position limits change no logit, so such a checkpoint of the same model loads.
  saved_by_transformers = tmp_path / "hf_transformers"
  phi_jax.save_hf(saved_by_transformers, ours, phi_jax.init_params(ours, jax.random.key(0)))
  hf_config = json.loads((saved_by_transformers / "config.json").read_text())
  hf_config.update(original_max_position_embeddings=4096, max_position_embeddings=4096)
  (saved_by_transformers / "config.json").write_text(json.dumps(hf_config))
  assert common.params_loader(ours, None, str(saved_by_transformers), mesh)()["embed"]["embedding"].shape[1] == 64
  # Same arrays, other rotary / norm settings: refused (it would start as another function of the weights) unless
  # model.overrides names them, as a context extension does.
  other_math = tmp_path / "hf_theta"
  phi_jax.save_hf(other_math, ours.replace(rope_theta=250000.0, rms_norm_eps=1e-3),
                  phi_jax.init_params(ours, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"rotary or norm settings differ from the model's \(rope_theta=250000.0 "
                     r"there, 10000.0 here; rms_norm_eps=0.001 there, 1e-05 here\).*Set model.hf_path="):
    common.params_loader(ours, None, str(other_math), mesh)()
  gin.clear_config()
  try:
    gin.parse_config("model.overrides = {'rope_theta': 10000.0, 'rms_norm_eps': 1e-5}")
    assert common.params_loader(ours, None, str(other_math), mesh)()["embed"]["embedding"].shape[1] == 64
  finally:
    gin.clear_config()
  # A recipe stage that was skipped trained no params: named as such, with where the recipe's params are.
  skipped = tmp_path / "recipe" / "dpo"
  skipped.mkdir(parents=True)
  (skipped / "recipe_stage.json").write_text(json.dumps({"skipped": "no preference pairs", "params_from": "sft"}))
  with pytest.raises(ValueError, match=r"train.init_from='.*/dpo' is a recipe stage that was skipped \(no "
                     r"preference pairs\).*point train.init_from there"):
    common.params_loader(ours, None, str(skipped), mesh)()


def test_a_tokenizer_other_than_the_starting_point_s_is_refused(tmp_path, caplog):
  """model.hf_path or train.init_from trained on one tokenizer, data.tokenizer another (a tiny config's default
  beside a real checkpoint): the run trained the params on the other tokenizer's ids without a word. A few renamed
  tokens and another chat template (phi-4 -> Phi-4-reasoning's think tokens) are logged, not refused."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer
  phi4 = build_tiny_tokenizer(tmp_path / "hf", chat_format="phi-4")  # a checkpoint directory's tokenizer
  other = build_tiny_tokenizer(tmp_path / "other", chat_format="phi-4",
                               corpus=["Lorem ipsum dolor sit amet, consectetur adipiscing elit"] * 50)
  mini = build_tiny_tokenizer(tmp_path / "mini", chat_format="phi-4-mini")  # 12 tokens differ, another template
  with pytest.raises(ValueError, match=r"data.tokenizer='/tok' is not the tokenizer model.hf_path='.*/hf' was "
                     r"trained with \(.*/hf: \d+ tokens here, 512 there; ids differ for \d+, e.g. .*\); set "
                     r"--gin_param='data.tokenizer=\".*/hf\"'"):
    common.check_tokenizer_matches_start(other, "/tok", "model.hf_path", str(tmp_path / "hf"))
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    common.check_tokenizer_matches_start(phi4, "tiny:phi-4", "model.hf_path", str(tmp_path / "hf"))
    assert not caplog.text
    reasoning = build_tiny_tokenizer(tmp_path / "reasoning", chat_format="phi-4-reasoning")  # the same family
    common.check_tokenizer_matches_start(reasoning, str(tmp_path / "reasoning"), "model.hf_path", str(tmp_path / "hf"))
  assert "another chat template" in caplog.text
  with pytest.raises(ValueError, match=r"is of the 'phi-4-mini' token family"):  # built tiny: of another family
    common.check_tokenizer_matches_start(mini, "tiny:phi-4-mini", "model.hf_path", str(tmp_path / "hf"))
  hf_run = tmp_path / "hf_run"  # the same as a recipe gives it: a directory holding a tiny tokenizer
  build_tiny_tokenizer(hf_run / "tokenizer", chat_format="phi-4")
  with pytest.raises(ValueError, match=r"is of the 'phi-4-mini' token family"):
    common.check_tokenizer_matches_start(mini, str(tmp_path / "mini"), "train.init_from", str(hf_run))
  # A run's workdir: its built tokenizer (W/tokenizer), or the directory its config.gin names.
  run = tmp_path / "run"
  build_tiny_tokenizer(run / "tokenizer", chat_format="phi-4")
  with pytest.raises(ValueError, match=r"train.init_from='.*/run' was trained with \(.*run/tokenizer: "):
    common.check_tokenizer_matches_start(other, "/tok", "train.init_from", str(run))
  # The run's config.gin as a run writes it (gin.config_str(), which wraps a long path onto a second line).
  long_path = tmp_path / ("a_long_directory_name_" * 4) / "hf"
  build_tiny_tokenizer(long_path, chat_format="phi-4")
  named = tmp_path / "named_run"
  named.mkdir()
  gin.clear_config()
  try:
    gin.parse_config(f"data.tokenizer = '{long_path}'")
    common.data()
    (named / "config.gin").write_text(gin.config_str())
  finally:
    gin.clear_config()
  assert "data.tokenizer = \\\n" in (named / "config.gin").read_text()
  with pytest.raises(ValueError, match=r"named_run' was trained with \(.*_name_/hf: "):
    common.check_tokenizer_matches_start(other, "/tok", "train.init_from", str(named))
  common.check_tokenizer_matches_start(other, "/tok", "train.init_from", str(tmp_path / "nowhere"))


def test_a_config_read_from_another_directory_says_where_its_includes_resolve(monkeypatch):
  monkeypatch.chdir(os.path.join(ROOT, "experiments"))
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match=r"include lines name files from the repository root .*: run the command "
                                         r"from there \(the current directory is .*experiments\)"):
      gin_bindings.parse_gin(["configs/sft_tiny.gin"], [])
  finally:
    gin.clear_config()


def test_a_model_hf_path_without_a_checkpoint_is_named(tmp_path, monkeypatch):
  """A config's placeholder model.hf_path left in place failed with a bare FileNotFoundError on its config.json."""
  with pytest.raises(ValueError, match=r"model.hf_path='.*' holds no config.json: point it \(and data.tokenizer\) at"):
    common.model(hf_path=str(tmp_path / "path" / "to" / "Phi-4-mini-instruct"))
  # A PEFT adapter and a hub id are named as such, here and for eval.py / rollouts.py --init_from.
  (tmp_path / "adapter").mkdir()
  (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"holds no config.json.*PEFT adapter .*merge_and_unload"):
    common.model(hf_path=str(tmp_path / "adapter"))
  with pytest.raises(ValueError, match=r"neither a run's workdir .*PEFT adapter .*merge_and_unload"):
    run_files.check_policy_dir(str(tmp_path / "adapter"))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"holds no config.json.*if it is a hub id.*snapshot_download"):
    common.model(hf_path="microsoft/Phi-4-mini-instruct")
  with pytest.raises(ValueError, match=r"no such directory .*if it is a hub id.*snapshot_download"):
    run_files.check_policy_dir("microsoft/Phi-4-mini-instruct")
  for local in ("./runs/final", "/runs/final"):  # written as a path: no hub id
    with pytest.raises(ValueError, match=r"holds no config.json") as raised:
      common.model(hf_path=local)
    assert "hub id" not in str(raised.value)


def test_one_data_file_given_as_a_string_is_a_list_of_one():
  """data.train_files="x.jsonl" (as TRL takes a dataset) was split into the files 'x', '.', 'j', ..."""
  settings = common.data(train_files="x.jsonl", eval_files="y/*.jsonl")
  assert settings["train_files"] == ["x.jsonl"] and settings["eval_files"] == ["y/*.jsonl"]


def test_path_objects_in_a_list_of_strings_are_taken_as_strings(tmp_path):
  """[pathlib.Path] for data.train_files (from Python, or bound with gin.bind_parameter) stayed paths, which the
  checkpoint's metadata refused as not plain JSON at the first save; an item of no string type is refused."""
  import pathlib
  from phi_jax.train import checkpoint

  (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
  cfg = common.data(train_files=[tmp_path / "a.jsonl"], eval_files=(pathlib.PurePosixPath(tmp_path / "a.jsonl"),))
  assert cfg["train_files"] == cfg["eval_files"] == [str(tmp_path / "a.jsonl")]
  checkpoint._require_json("metadata", common.run_meta("next_token", common.train_settings(num_steps=1), cfg,
                                                       [None] * 10))
  gin.clear_config()
  try:
    gin_bindings.parse_gin([], [])
    gin.bind_parameter("data.train_files", [tmp_path / "a.jsonl", "b.jsonl"])
    assert common.data()["train_files"] == [str(tmp_path / "a.jsonl"), "b.jsonl"]
  finally:
    gin.clear_config()
  with pytest.raises(ValueError, match=r"data.train_files=\['a.jsonl', 3\] must be a list of strings"):
    _configured("data.train_files=['a.jsonl', 3]", common.data)


def test_a_loaded_run_keeps_its_mesh_only_where_it_fits_this_machine(tmp_path):
  """eval.py, rollouts.py and export_hf.py replay the run's config.gin, whose mesh.shape belongs to the machine it
  trained on: a multi-host run's mesh failed the README's one-process export ("needs 16 devices but 1")."""
  import jax
  run = tmp_path / "run"
  run.mkdir()
  shapes = {}
  for name, mesh_line, params in [("other machine", "{'data': 2, 'fsdp': 16}", []),
                                  ("fits", "{'data': 2, 'fsdp': -1}", []),
                                  ("asked", "{'data': 2, 'fsdp': 16}", ["mesh.shape={'tensor': 2, 'fsdp': -1}"])]:
    (run / "config.gin").write_text(f"mesh.shape = {mesh_line}\n")
    gin.clear_config()
    try:
      gin_bindings.parse_gin_for_checkpoint(str(run), [], params)
      shapes[name] = dict(common.mesh().shape)
    finally:
      gin.clear_config()
  n = jax.device_count()
  assert shapes["other machine"] == {"data": 1, "fsdp": n, "tensor": 1}
  assert shapes["fits"] == {"data": 2, "fsdp": n // 2, "tensor": 1}
  assert shapes["asked"] == {"data": 1, "fsdp": n // 2, "tensor": 2}


def test_macros_inside_a_bound_list_or_dict_are_resolved(tmp_path):
  """A run's config.gin with `mesh.shape = {'data': %D, 'fsdp': -1}` lost its mesh on loading even where it fit
  (the unresolved macro is no size); bound_or_none resolves macros at any depth."""
  import jax
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.gin").write_text("D = 2\nHALF = %D\nmesh.shape = {'data': %HALF, 'fsdp': -1}\n")
  gin.clear_config()
  try:
    gin_bindings.parse_gin_for_checkpoint(str(run), [], [])
    assert common.bound_or_none("mesh.shape") == {"data": 2, "fsdp": -1}
    assert dict(common.mesh().shape) == {"data": 2, "fsdp": jax.device_count() // 2, "tensor": 1}
    gin.parse_config("A = 'a.jsonl'\ndata.train_files = [%A, ('b', %A)]\ndata.weights = {'x': [%D]}")
    assert common.bound_or_none("data.train_files") == ["a.jsonl", ("b", "a.jsonl")]
    assert common.bound_or_none("data.weights") == {"x": [2]}
  finally:
    gin.clear_config()


def test_a_gin_scoped_binding_is_refused_as_it_reaches_no_configurable():
  """train.py, eval.py and rollouts.py run no configurable in a gin scope: `sft/train.num_steps=7` was accepted and
  the run went on with the file's value."""
  try:
    with pytest.raises(ValueError, match=r"scope 'sft/'.*train\.num_steps=7"):
      gin_bindings.parse_gin([], ["sft/train.num_steps=7"])
    gin.clear_config()
    gin_bindings.parse_gin([], ["train.num_steps=7"])
    assert common.bound_or_none("train.num_steps") == 7
  finally:
    gin.clear_config()


def test_an_include_given_as_a_gin_param_is_read(tmp_path):
  """An include statement has no selector: the check for bindings without a configurable raised AttributeError."""
  extra = tmp_path / "extra.gin"
  extra.write_text("train.num_steps = 7\n")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    gin_bindings.parse_gin([os.path.join("experiments", "configs", "midtrain_tiny.gin")], [f"include '{extra}'"],
                           macro_files=[])
    assert common.bound_or_none("train.num_steps") == 7
  finally:
    os.chdir(cwd)
    gin.clear_config()


def test_a_binding_without_a_configurable_or_with_an_unquoted_string_says_how_to_write_it(tmp_path):
  """`learning_rate=1e-3` (MaxText's spelling) is a gin macro: the run went on with the file's value, and a sweep over
  it trained the same run twice. A macro a config uses (`%lr`) is still a way to set it."""
  tiny = os.path.join("experiments", "configs", "midtrain_tiny.gin")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for param in ("learning_rate=1e-3", "lr = 0.1"):
      with pytest.raises(ValueError, match=r"binds no configurable's parameter .* optimizer.learning_rate=1e-3"):
        gin_bindings.parse_gin([tiny], [param])
      gin.clear_config()
    with pytest.raises(ValueError, match="quotes that survive the shell"):
      gin_bindings.parse_gin([tiny], ["data.tokenizer=tiny:phi-4"])
    gin.clear_config()
    # YAML's spellings of the constants are Python's capitalised ones, not strings to quote ("false" is refused too).
    for param, spelling in (("train.export_hf=false", "False"), ("model.hf_path=null", "None"),
                            ("train.export_hf = TRUE", "True"), ("data.weights=[1, none]", "None")):
      with pytest.raises(ValueError, match=rf"write it as {spelling}") as raised:
        gin_bindings.parse_gin([tiny], [param])
      assert "quotes that survive the shell" not in str(raised.value), param
      gin.clear_config()
    # The example is one shell word, a dict's own quotes included.
    one_word = r"e.g. '--gin_param=model.overrides=\{'\"'\"'tie_word_embeddings'\"'\"': False\}'"
    with pytest.raises(ValueError, match=one_word):
      gin_bindings.parse_gin([tiny], ["model.overrides={'tie_word_embeddings': false}"])
    gin.clear_config()
    # A quoted string holding such a word stays as it is in the example.
    with pytest.raises(ValueError, match=r"e.g. .*rope_scaling_type'\"'\"': '\"'\"'none'\"'\"', .*False"):
      gin_bindings.parse_gin([tiny], ["model.overrides={'rope_scaling_type': 'none', 'tie_word_embeddings': false}"])
    gin.clear_config()
    # An unquoted string that starts with such a word lacks quotes, not a capital.
    with pytest.raises(ValueError, match="quotes that survive the shell") as raised:
      gin_bindings.parse_gin([tiny], ["data.system_prompt=true story"])
    assert "write it as True" not in str(raised.value)
    gin.clear_config()
    own = tmp_path / "own.gin"
    own.write_text(f"include '{os.path.abspath(tiny)}'\nLR = 1e-2\noptimizer.learning_rate = %LR\n")
    gin_bindings.parse_gin([str(own)], ["LR=1e-3"])
    assert common.optimizer().learning_rate == 1e-3
    gin.clear_config()
    # A run's config.gin keeps its macros (gin writes them): eval.py / rollouts.py / export_hf.py may set one.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.gin").write_text("SP = 'Be brief.'\ndata.system_prompt = %SP\n")
    gin_bindings.parse_gin_for_checkpoint(str(run), [], ["SP='Be verbose.'"])
    assert common.data()["system_prompt"] == "Be verbose."
    gin.clear_config()
    # A syntax error inside a file is not about shell quoting.
    bad = tmp_path / "bad.gin"
    bad.write_text('data.train_files = ["a.jsonl",, "b.jsonl"]\n')
    with pytest.raises(SyntaxError) as raised:
      gin_bindings.parse_gin([str(bad)], [])
    assert "quotes that survive the shell" not in str(raised.value)
  finally:
    gin.clear_config()
    os.chdir(cwd)


def test_dpo_s_too_long_value_under_data_is_warned_of_by_dpo_and_refused_by_a_next_token_stage(tmp_path):
  """A DPO run only warns of data.too_long (it reads dpo.too_long), so a finished DPO run's config.gin may hold
  'truncate_prompt' there: replaying it (eval.py, export_hf.py) must not fail; a next-token stage refuses it."""
  from phi_jax.train import LoopConfig
  data_cfg = common.data(too_long="truncate_prompt")
  common.check_data_settings("dpo", data_cfg, LoopConfig(num_steps=1))
  with pytest.raises(ValueError, match=r"data.too_long='truncate_prompt'; expected one of \('split', 'drop'\) for a "
                     r"next-token stage"):
    common.check_data_settings("next_token", data_cfg, LoopConfig(num_steps=1))
  with pytest.raises(ValueError, match=r"data.too_long='truncate'; expected one of"):
    common.data(too_long="truncate")


def _one_device_mesh():
  import jax
  from phi_jax import sharding
  return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def _save_run(workdir, config, config_gin):
  """A finished run's workdir as train.init_from reads it: params/ of `config` and the text of its config.gin."""
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(workdir / "params"), phi_jax.init_params(config, jax.random.key(0)))
  (workdir / "config.gin").write_text(config_gin)


def test_a_run_started_from_another_run_keeps_its_rotary_settings_or_names_them(tmp_path):
  """train.init_from=<run> compared array shapes only: a run without the rope_theta / partial_rotary_factor of the
  run it started from trained silently as another function of the same weights."""
  import jax
  from phi_jax.model import presets
  mesh, tiny = _one_device_mesh(), presets["tiny"]
  theirs = tiny.replace(rope_theta=1000000.0, partial_rotary_factor=0.5)
  run = tmp_path / "run"
  _save_run(run, theirs, "# Parameters for model:\nROPE = {'partial_rotary_factor': 0.5, 'rope_theta': 1000000.0}\n"
            "model.overrides = %ROPE\nmodel.preset = 'tiny'\n")
  with pytest.raises(ValueError, match=r"train.init_from='.*/run' is a run trained with other rotary or norm settings "
                     r"than the model's \(rope_theta=1000000.0 there, 10000.0 here; partial_rotary_factor=0.5 there, "
                     r"1.0 here\).*Give this run that run's model settings \(model.preset / model.overrides, as in "
                     r".*run/config.gin\)"):
    common.params_loader(tiny, None, str(run), mesh)()
  assert common.params_loader(theirs, None, str(run), mesh)()["embed"]["embedding"].shape == (512, 64)
  gin.clear_config()
  try:  # named in model.overrides: on purpose, as a context extension changes rope_theta
    gin.parse_config("model.overrides = {'rope_theta': 10000.0, 'partial_rotary_factor': 1.0}")
    assert common.params_loader(tiny, None, str(run), mesh)()["embed"]["embedding"].shape == (512, 64)
    gin.clear_config()
    # Bound through a macro, as a run's config.gin records it (replayed by eval, rollouts and export).
    gin.parse_config("OVR = {'rope_theta': 10000.0, 'partial_rotary_factor': 1.0}\nOVR2 = %OVR\n"
                     "model.overrides = %OVR2")
    assert common.params_loader(tiny, None, str(run), mesh)()["embed"]["embedding"].shape == (512, 64)
  finally:
    gin.clear_config()
  # A run whose model came from a transformers checkpoint: that is the setting to give, and the one compared.
  wide = tiny.replace(hidden_size=128, rope_theta=250000.0)
  phi_jax.save_hf(tmp_path / "hf", wide, phi_jax.init_params(wide, jax.random.key(0)))
  from_hf = tmp_path / "from_hf"
  _save_run(from_hf, wide, f"model.hf_path = '{tmp_path / 'hf'}'\n")
  with pytest.raises(ValueError, match=r"holds params of another model .*give this run that run's model settings "
                     r"\(model.hf_path='.*/hf', as in .*from_hf/config.gin\)"):
    common.params_loader(tiny, None, str(from_hf), mesh)()
  with pytest.raises(ValueError, match=r"rope_theta=250000.0 there, 10000.0 here\).*that run's model settings "
                     r"\(model.hf_path='.*/hf', as in .*from_hf/config.gin\)"):
    common.params_loader(wide.replace(rope_theta=10000.0), None, str(from_hf), mesh)()
  from_checkpoint, _ = common.model(hf_path=str(tmp_path / "hf"))
  assert common.params_loader(from_checkpoint, None, str(from_hf), mesh)()["embed"]["embedding"].shape == (512, 128)
  # A run from that checkpoint with overrides of its own: both are the settings to give.
  with_overrides = tmp_path / "with_overrides"
  _save_run(with_overrides, wide.replace(rope_theta=1e6),
            f"model.hf_path = '{tmp_path / 'hf'}'\nmodel.overrides = {{'rope_theta': 1000000.0}}\n")
  with pytest.raises(ValueError, match=r"rope_theta=1000000.0 there, 250000.0 here\).*that run's model settings "
                     r"\(model.hf_path='.*/hf' with model.overrides=\{'rope_theta': 1000000.0\}, as in"):
    common.params_loader(from_checkpoint, None, str(with_overrides), mesh)()


def test_a_checkpoint_s_shapes_are_not_overridden_nor_advised_to_be(tmp_path):
  """model.overrides={'vocab_size': N} on a model.hf_path run (what the vocab check advised) loaded every weight and
  then failed inside Flax with a ScopeParamShapeError."""
  import jax
  from phi_jax.model import presets
  tiny = presets["tiny"]
  hf = tmp_path / "hf"
  phi_jax.save_hf(hf, tiny, phi_jax.init_params(tiny, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"model.overrides changes the shape of the checkpoint model.hf_path='.*/hf' "
                     r"\(vocab_size=512 there, 256 here\): resizing a checkpoint's vocabulary .* is not supported"):
    common.model(hf_path=str(hf), overrides={"vocab_size": 256})
  assert common.model(hf_path=str(hf), overrides={"vocab_size": 512, "rope_theta": 1e5})[0].vocab_size == 512
  tokenizer = common.get_tokenizer("tiny:phi-4", str(tmp_path / "run"))
  small = tiny.replace(vocab_size=len(tokenizer) - 1)
  with pytest.raises(ValueError, match=rf"has {len(tokenizer)} tokens but the model's vocab_size is "
                     rf"{small.vocab_size}, that of model.hf_path='/start'.*resizing a checkpoint's vocabulary is not "
                     r"supported: set data.tokenizer to the tokenizer .* was trained with") as raised:
    common.check_vocab(small, tokenizer, "model.hf_path", "/start")
  assert "model.overrides" not in str(raised.value)
  # A train.init_from model's size comes from this run's own settings, which may differ from the start's.
  with pytest.raises(ValueError, match=rf"the model's vocab_size is {small.vocab_size}\. Params started from "
                     r"\(train.init_from='/start'\) fix the vocabulary.*give this run the model settings of that "
                     r"start .* and set data.tokenizer to the tokenizer it was trained with"):
    common.check_vocab(small, tokenizer, "train.init_from", "/start")
  with pytest.raises(ValueError, match=r"set model.overrides=\{'vocab_size': \d+\} or larger"):
    common.check_vocab(small, tokenizer)


def test_dtype_settings_that_train_or_attend_otherwise_than_asked_are_refused_or_named(caplog):
  """float16 params: AdamW's second moment underflows (updates several times too large); param_dtype in
  model.overrides failed with a TypeError; cuDNN attention casts float32 inputs to bfloat16."""
  with pytest.raises(ValueError, match=r"model.overrides sets param_dtype.*bind model.param_dtype='bfloat16'"):
    common.model(overrides={"param_dtype": "bfloat16", "dtype": "bfloat16"})
  with pytest.raises(ValueError, match=r"model.param_dtype='float16'.*second moment.*Keep model.param_dtype='float32'"):
    common.check_param_dtype(common.model(param_dtype="float16")[0])
  midtrain = os.path.join("experiments", "configs", "phi4_mini_reasoning", "midtrain.gin")
  with pytest.raises(ValueError, match=r"model.param_dtype='float16'"):
    dry_run(midtrain, ["model.param_dtype='float16'"])
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    common.check_param_dtype(common.model()[0])
    assert not caplog.text
    common.check_param_dtype(common.model(param_dtype="bfloat16")[0])
  assert "an update below ~1/256 of a weight rounds away" in caplog.text
  assert "AdamW's moments stall the same way" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    common.model(overrides={"attention_backend": "cudnn", "dtype": "bfloat16"})
    assert not caplog.text
    common.model(overrides={"attention_backend": "cudnn"})
  assert "attention_backend 'cudnn' runs attention in bfloat16" in caplog.text


def test_an_unknown_reward_or_a_missing_reward_module_says_how_to_add_it(tmp_path):
  """The reward error named the built-in rewards only; a run's config.gin importing a module not on the path failed
  eval.py / rollouts.py / export_hf.py with a bare "No module named"."""
  with pytest.raises(ValueError, match=r"reward.weights names 'brevity', not a registered reward.*registry.REWARDS.*"
                     r"import my_rewards.*PYTHONPATH"):
    common.reward_settings(weights={"brevity": 1.0})
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.gin").write_text("import no_such_reward_module\nmodel.preset = 'tiny'\n")
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match=r"run/config.gin imports no_such_reward_module \(its `import` lines\), which "
                       r"does not load here: No module named 'no_such_reward_module'\..*PYTHONPATH"):
      gin_bindings.parse_gin_for_checkpoint(str(run), [], [])
  finally:
    gin.clear_config()


def test_a_run_s_config_records_the_values_it_used_as_comments_beside_the_bindings_given():
  """W/config.gin held only the bindings given: a tool replaying it later took the defaults of the code of its own
  day. The values every configurable used follow as comments; replayed, the file binds what was given."""
  gin.clear_config()
  try:
    gin_bindings.parse_gin([], ["train.num_steps=5", "data.seq_len=64", "model.overrides={'rope_theta': 1e5}"])
    common.train_settings(), common.data(), common.model(), common.optimizer()
    given, text = gin.config_str(), common.run_config_text()
    gin.clear_config()
    gin.parse_config(text)
    assert common.train_settings()["loop"].num_steps == 5 and common.model()[0].rope_theta == 1e5
  finally:
    gin.clear_config()
  assert text.startswith(given)
  assert gin_bindings.binding_keys(text) == gin_bindings.binding_keys(given)
  for used in ("# train.keep_checkpoints = 3", "# data.system_prompt = None", "# optimizer.b2 = ",
               "# model.param_dtype = 'float32'"):
    assert used in text, used
