"""Rollout DPO: preference batches, the DPO/IPO stage loss against independent log-probs, reference log-probs
(in the step and precomputed), resumable pair reading, and rollouts -> pairs -> DPO training end to end."""

import functools
import json
import logging
import os
import shutil
import sys

import gin
import jax
import numpy as np
import pytest

import phi_jax
from phi_jax import rewards, sharding
from phi_jax.data import chat, preference
from phi_jax.data.sources import DataError
from phi_jax.hf.tokenizer import build_tiny_tokenizer
from phi_jax.losses import dpo_loss
from phi_jax.stages import dpo
from phi_jax.train import LoopConfig, OptimizerConfig, checkpoint, loop as loop_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import common  # noqa: E402
import dpo_reference  # noqa: E402
import gin_bindings  # noqa: E402
import pts_pairs  # noqa: E402
import rollouts  # noqa: E402

CONFIG = phi_jax.PhiConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=128, initializer_range=0.3)
MODEL_OVERRIDES = {"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 128,
                   "initializer_range": 0.3}
SEQ, BATCH, CHUNK = 80, 8, 32
MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"},
              {"role": "assistant", "content": "2"}, {"role": "user", "content": "And doubled?"}]


def _pairs(num, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    a, b = (int(x) for x in rng.integers(1, 50, 2))
    prompt = MULTI_TURN if i % 4 == 3 else f"What is {a} + {b}?"
    out.append({"prompt": prompt, "chosen": f"<think>{a} + {b} = {a + b}</think> \\boxed{{{a + b}}}",
                "rejected": f"\\boxed{{{a + b + int(rng.integers(1, 9))}}}" if i % 5 else "", "id": i})
  return out


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dpo")
  tokenizer = build_tiny_tokenizer(tmp / "tok", chat_format="phi-4")
  records = _pairs(7)
  path = _write_jsonl(tmp / "pairs.jsonl", records)
  params = jax.jit(phi_jax.init_params, static_argnums=0)(CONFIG, jax.random.key(0))
  it = preference.build_preference_iterator(path, tokenizer, seq_len=SEQ, batch_size=BATCH, seed=0, shuffle=False,
                                            num_epochs=1, with_index=True, process_index=0, process_count=1)
  batch = next(it)  # 7 pairs and one all-padding filler row
  return {"tmp": tmp, "tokenizer": tokenizer, "records": records, "path": path, "params": params, "batch": batch}


@functools.lru_cache(maxsize=None)
def _jitted_loss(loss_type, label_smoothing):
  return jax.jit(dpo.make_loss_fn(CONFIG, beta=0.5, label_smoothing=label_smoothing, loss_type=loss_type,
                                  chunk_size=CHUNK))


@pytest.fixture(scope="module")
def reference_fn():
  return dpo.reference_logps_fn(CONFIG, CHUNK)


@pytest.fixture(scope="module")
def independent_logps(setup):
  """Summed completion log-probs of each row from a full forward pass and a numpy log-softmax: {side: [B]}."""
  batch, out = setup["batch"], {}
  tokens = np.concatenate([batch[f"{side}_tokens"] for side in preference.SIDES])
  # Right padding after a row's tokens cannot change causal logits at its real positions.
  logits = np.asarray(jax.jit(lambda p, t: phi_jax.forward(p, t, CONFIG))(setup["params"], tokens), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logps = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  masks = np.concatenate([batch[f"{side}_loss_mask"] for side in preference.SIDES])
  sums = np.zeros(len(tokens))
  counts = np.zeros(len(tokens))
  for row in range(len(tokens)):
    for t in np.flatnonzero(masks[row]):
      sums[row] += logps[row, t - 1, tokens[row, t]]
      counts[row] += 1
  for i, side in enumerate(preference.SIDES):
    out[side] = (sums[i * BATCH:(i + 1) * BATCH], counts[i * BATCH:(i + 1) * BATCH])
  return out


def test_preference_rows_mask_exactly_the_completion_and_its_end_token(setup):
  tokenizer, batch, records = setup["tokenizer"], setup["batch"], setup["records"]
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert list(batch["index"]) == list(range(7)) + [-1]
  for row, record in enumerate(records):
    for side in preference.SIDES:
      tokens, mask = batch[f"{side}_tokens"][row], batch[f"{side}_loss_mask"][row]
      segments, positions = batch[f"{side}_segment_ids"][row], batch[f"{side}_positions"][row]
      prompt = chat.render_prompt(tokenizer, record["prompt"])
      completion = tokenizer(record[side], add_special_tokens=False)["input_ids"] + [im_end]
      length = len(prompt) + len(completion)
      assert list(tokens[:length]) == prompt + completion and not tokens[length:].any()
      assert list(mask) == [0] * len(prompt) + [1] * len(completion) + [0] * (SEQ - length)
      assert list(segments) == [1] * length + [0] * (SEQ - length)
      assert list(positions[:length]) == list(range(length))
  assert not any(batch[f"{side}_{f}"][7].any() for side in preference.SIDES for f in preference.ROW_FIELDS)
  # The earlier assistant turn of a multi-turn prompt is context, not a target.
  assert "2<|im_end|>" in tokenizer.decode(batch["chosen_tokens"][3][batch["chosen_loss_mask"][3] == 0])


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_stage_loss_equals_dpo_loss_on_independent_logps(setup, independent_logps, loss_type, label_smoothing):
  batch = dict(setup["batch"])
  rng = np.random.default_rng(1)
  batch["ref_chosen_logps"] = (independent_logps["chosen"][0] + rng.normal(0, 2, BATCH)).astype(np.float32)
  batch["ref_rejected_logps"] = (independent_logps["rejected"][0] + rng.normal(0, 2, BATCH)).astype(np.float32)
  loss_sum, aux = _jitted_loss(loss_type, label_smoothing)(setup["params"], batch, jax.random.key(0))

  real = slice(0, 7)  # the filler row weighs nothing
  inputs = []
  for side in preference.SIDES:
    sums, counts = (x[real] for x in independent_logps[side])
    ref = batch[f"ref_{side}_logps"][real].astype(np.float64)
    inputs.append(sums / counts if loss_type == "ipo" else sums)
    inputs.append(ref / counts if loss_type == "ipo" else ref)
  expected, metrics = dpo_loss(inputs[0], inputs[2], inputs[1], inputs[3], beta=0.5, label_smoothing=label_smoothing,
                               loss_type=loss_type)
  assert float(aux["weight"]) == 7
  np.testing.assert_allclose(float(loss_sum) / 7, float(expected), rtol=2e-4)
  assert set(aux["metrics"]) == set(metrics)
  for name, value in metrics.items():
    np.testing.assert_allclose(float(aux["metrics"][name]) / 7, float(value), rtol=2e-4, atol=2e-4)
  assert 0 < float(metrics["rewards/accuracies"]) < 1  # the random references give a mix of right and wrong


def test_reference_equal_to_policy_gives_log2(setup, reference_fn, independent_logps):
  batch = setup["batch"]
  ref_chosen, ref_rejected = reference_fn(setup["params"], {k: v for k, v in batch.items() if k != "index"})
  np.testing.assert_allclose(ref_chosen, independent_logps["chosen"][0], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ref_rejected, independent_logps["rejected"][0], rtol=1e-4, atol=1e-3)
  batch = dict(batch, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
  loss_sum, aux = _jitted_loss("sigmoid", 0.0)(setup["params"], batch, jax.random.key(0))
  np.testing.assert_allclose(float(loss_sum) / float(aux["weight"]), np.log(2.0), rtol=1e-6)
  assert float(aux["metrics"]["rewards/margins"]) == 0.0 and float(aux["metrics"]["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("microbatches,mesh_axes", [(4, None), (3, None), (2, {"data": 2, "fsdp": 2})])
def test_microbatched_reference_pass_equals_the_whole_batch(setup, independent_logps, microbatches, mesh_axes):
  # 3 does not divide the 8 rows: the pass takes 2 pieces. Each row's sum must come back in its own place.
  mesh = None if mesh_axes is None else sharding.make_mesh(mesh_axes, devices=jax.devices()[:4])
  fn = dpo.reference_logps_fn(CONFIG, CHUNK, mesh=mesh, microbatches=microbatches)
  batch = {k: v for k, v in setup["batch"].items() if k != "index"}
  ref_chosen, ref_rejected = fn(setup["params"], batch if mesh is None else loop_lib.global_batch(batch, mesh))
  np.testing.assert_allclose(ref_chosen, independent_logps["chosen"][0], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ref_rejected, independent_logps["rejected"][0], rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="at least 1"):
    dpo.reference_logps_fn(CONFIG, CHUNK, microbatches=0)


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="loss_type"):
    dpo.make_loss_fn(CONFIG, beta=0.1, loss_type="hinge")
  with pytest.raises(ValueError, match="sigmoid loss only"):
    dpo.make_loss_fn(CONFIG, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_too_long_pairs_are_dropped_or_lose_prompt_tokens_and_are_counted(setup, caplog):
  tokenizer = setup["tokenizer"]
  long_prompt = {"prompt": "What is " + " + ".join(["12"] * 40) + "?", "chosen": "480", "rejected": "12"}
  long_answer = {"prompt": "Hi", "chosen": "1 " * 150, "rejected": "2"}
  path = _write_jsonl(setup["tmp"] / "long.jsonl", [long_prompt, setup["records"][0], long_answer])
  full = [len(chat.render_messages(tokenizer, [{"role": "user", "content": long_prompt["prompt"]},
                                               {"role": "assistant", "content": long_prompt[s]}])[0])
          for s in preference.SIDES]
  seq = max(full) - 5
  assert len(chat.render_prompt(tokenizer, setup["records"][0]["prompt"])) + 30 < seq

  def read(too_long):
    it = preference.build_preference_iterator(path, tokenizer, seq_len=seq, batch_size=4, seed=0, shuffle=False,
                                              too_long=too_long, process_index=0, process_count=1)
    return next(it), it.stats()

  with caplog.at_level("WARNING", logger="phi_jax"):
    batch, stats = read("drop")
  assert "long.jsonl holds 3 pair(s) for this process, fewer than one batch of 4: its one batch is mostly filler" in (
      caplog.text)
  assert stats["records_read"] == 3 and stats["records_used"] == 1 and stats["too_long_dropped"] == 2
  assert batch["chosen_segment_ids"][1:].sum() == 0
  assert caplog.text.count("long.jsonl:1) was longer than seq_len, dropped") == 1  # the first of two

  # Repeating pairs that are all too long: an error at the first batch, not an endless read.
  with pytest.raises(DataError, match=r"long.jsonl: no usable records: every record of a whole epoch"):
    next(preference.build_preference_iterator(path, tokenizer, seq_len=8, batch_size=4, seed=0, num_epochs=None,
                                              process_index=0, process_count=1))

  batch, stats = read("truncate_prompt")
  assert stats["records_used"] == 2 and stats["prompts_truncated"] == 1 and stats["too_long_dropped"] == 1
  for i, side in enumerate(preference.SIDES):
    ids, _ = chat.render_messages(tokenizer, [{"role": "user", "content": long_prompt["prompt"]},
                                              {"role": "assistant", "content": long_prompt[side]}])
    cut = max(full) - seq  # the same number of prompt tokens leaves both rows
    assert list(batch[f"{side}_tokens"][0][:len(ids) - cut]) == ids[cut:]
    assert batch[f"{side}_loss_mask"][0].sum() == len(tokenizer(long_prompt[side])["input_ids"]) + 1


def test_bad_records_name_file_and_line_or_are_counted(setup):
  tokenizer = setup["tokenizer"]
  good = json.dumps(setup["records"][0])
  path = _write_jsonl(setup["tmp"] / "bad.jsonl", [good, "", '{"prompt": "x", "chosen": "y"}', "{oops", good,
                                                   '{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", '
                                                   '"rejected": "b"}'])
  kwargs = dict(seq_len=SEQ, batch_size=8, seed=0, shuffle=False, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field: 'rejected'"):
    next(preference.build_preference_iterator(path, tokenizer, **kwargs))
  it = preference.build_preference_iterator(path, tokenizer, on_bad_record="skip", **kwargs)
  next(it)
  assert it.stats()["records_skipped"] == {"missing field": 1, "invalid JSON": 1, "unknown role": 1}
  assert it.stats()["pairs"] == 2
  with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field: 'ref_chosen_logps'"):
    next(preference.build_preference_iterator(path, tokenizer, reference_logps=True, **kwargs))


def test_preference_iterator_resumes_exactly(setup):
  kwargs = dict(seq_len=SEQ, batch_size=3, seed=7, num_epochs=None, process_index=0, process_count=1)
  it = preference.build_preference_iterator(setup["path"], setup["tokenizer"], **kwargs)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (7 pairs)
  resumed = preference.build_preference_iterator(setup["path"], setup["tokenizer"], **kwargs)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in preference.BATCH_FIELDS)
  assert resumed.stats() == it.stats()
  first = next(preference.build_preference_iterator(setup["path"], setup["tokenizer"], **kwargs))
  other_seed = next(preference.build_preference_iterator(setup["path"], setup["tokenizer"], **dict(kwargs, seed=8)))
  assert not np.array_equal(first["chosen_tokens"], other_seed["chosen_tokens"])


def test_reference_logps_in_the_step_and_precomputed_agree(setup, reference_fn):
  tokenizer, path = setup["tokenizer"], setup["path"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  kwargs = dict(seq_len=SEQ, batch_size=BATCH, seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1)
  in_step = next(dpo.with_reference_logps(preference.build_preference_iterator(path, tokenizer, **kwargs),
                                          setup["params"], dpo.reference_logps_fn(CONFIG, CHUNK, mesh=mesh),
                                          mesh=mesh))
  expected = reference_fn(setup["params"], {k: v for k, v in setup["batch"].items() if k != "index"})
  for key, value in zip(preference.REFERENCE_FIELDS, expected):
    np.testing.assert_allclose(in_step[key], value, rtol=1e-5, atol=1e-4)

  out = str(setup["tmp"] / "pairs.ref.jsonl")
  result = dpo.precompute_reference_logps(path, setup["params"], CONFIG, tokenizer, seq_len=SEQ, batch_size=BATCH,
                                          chunk_size=CHUNK)
  assert result["out_file"] == out and result["pairs"] == 7
  with open(out) as f:
    written = [json.loads(line) for line in f]
  assert [r["id"] for r in written] == list(range(7)) and all(r["ref_seq_len"] == SEQ for r in written)
  loaded = next(preference.build_preference_iterator(out, tokenizer, reference_logps=True, **kwargs))
  for key, value in zip(preference.REFERENCE_FIELDS, expected):
    np.testing.assert_allclose(loaded[key][:7], value[:7], rtol=1e-5, atol=1e-4)
  with pytest.raises(DataError, match="reference mismatch"):
    next(preference.build_preference_iterator(out, tokenizer, reference_logps=True, **dict(kwargs, seq_len=SEQ + 8)))
  # Another system prompt renders other rows than the reference scored: refused too.
  with pytest.raises(DataError, match=r"reference mismatch: .* system_prompt=None there, 'Be brief.' here"):
    next(preference.build_preference_iterator(out, tokenizer, reference_logps=True, system_prompt="Be brief.",
                                              **kwargs))


def test_precomputed_pairs_keep_columns_json_has_no_type_for(setup, tmp_path):
  """A Parquet pair file with a timestamp column: written as its text, not a crash after the reference pass."""
  import datetime

  import pyarrow as pa
  import pyarrow.parquet as pq
  records = [{"prompt": f"What is {i} + 1?", "chosen": f"\\boxed{{{i + 1}}}", "rejected": "\\boxed{0}",
              "made": datetime.datetime(2026, 1, 1 + i)} for i in range(3)]
  path = str(tmp_path / "pairs.parquet")
  pq.write_table(pa.Table.from_pylist(records), path)
  out = str(tmp_path / "pairs.ref.jsonl")
  result = dpo.precompute_reference_logps(path, setup["params"], CONFIG, setup["tokenizer"], seq_len=SEQ,
                                          batch_size=4, chunk_size=CHUNK, out_file=out)
  with open(out) as f:
    written = [json.loads(line) for line in f]
  assert result["pairs"] == 3 and [r["made"] for r in written] == [f"2026-01-0{i + 1} 00:00:00" for i in range(3)]
  assert sorted(os.listdir(tmp_path)) == ["pairs.parquet", "pairs.ref.jsonl"]  # no temporary file left


def test_reference_without_init_from_is_the_loops_initial_policy(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  loop = LoopConfig(num_steps=0, seed=5)  # no steps: the loop returns the state it initialised
  state = loop_lib.run(workdir=str(tmp_path), model_config=CONFIG, optimizer_config=OptimizerConfig(), loss_fn=None,
                       train_data=iter(()), loop=loop, mesh=mesh)
  reference = dpo_reference.reference_params(CONFIG, None, {"init_from": None, "loop": loop}, mesh)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _fake_verify(calls):
  """Verdicts by gold: "all" right, "none" wrong, "even" right when the text has an even number of characters."""
  def verify(completions, golds, timeout_s=None):
    del timeout_s
    verdicts = [g == "all" or (g == "even" and len(c) % 2 == 0) for c, g in zip(completions, golds)]
    calls.append((list(completions), list(golds), verdicts))
    return verdicts
  return verify


@pytest.fixture(scope="module")
def start_run(setup):
  """A previous stage's run directory: its params/ and tokenizer are what rollouts and DPO start from."""
  start = str(setup["tmp"] / "sft_run")
  common.save_final_params(start, setup["params"])
  os.symlink(setup["tmp"] / "tok", os.path.join(start, "tokenizer"))
  return start


def _workdir(setup, name):
  workdir = str(setup["tmp"] / name)
  os.makedirs(workdir)
  os.symlink(setup["tmp"] / "tok", os.path.join(workdir, "tokenizer"))
  return workdir


def _run_gin(files, bindings, fn, *args):
  gin.clear_config()
  try:
    gin_bindings.parse_gin(files, bindings)
    return fn(*args)
  finally:
    gin.clear_config()


def test_pivotal_token_pairs_are_written_and_train_through_the_dpo_stage(setup, start_run, monkeypatch):
  """experiments/pts_pairs.py on the tiny policy, verdicts by the text's length ("even"): its counts add up, each pair
  continues a prefix of one of the policy's completions with one token on each side, and the DPO stage trains on
  them, scoring that one token."""
  tmp, start = setup["tmp"], start_run
  problems = [{"problem": f"What is {i} + {i}?", "answer": "even"} for i in range(16)] + [
      {"problem": "What is 1 + 1?", "answer": "all"}]
  problems_path = _write_jsonl(tmp / "pts_problems.jsonl", problems)
  out = str(tmp / "pts" / "pairs.jsonl")
  monkeypatch.setattr(rewards, "verify_batch", _fake_verify([]))
  gin_files = [os.path.join(ROOT, "experiments/configs/dpo_tiny.gin")]
  common_bindings = [f"model.overrides={MODEL_OVERRIDES!r}", "mesh.shape={'data': 2, 'fsdp': -1}"]
  summary = _run_gin(gin_files, common_bindings + [
      "rollouts.max_new_tokens=12", f"rollouts.stop_token_ids={tuple(range(0, 512, 2))}", "rollouts.batch_size=32"],
      pts_pairs.main, [f"--init_from={start}", f"--problems={problems_path}", "--k=8", "--p_gap=0.25",
                       f"--out={out}", "--seed=1"])
  with open(out) as f:
    pairs = [json.loads(line) for line in f]
  with open(rollouts.summary_path(out)) as f:
    assert json.load(f) == summary
  assert summary["problems"] == 17 and summary["problems_outside_range"] >= 1  # "all": every sample is right
  assert (summary["problems_searched"] + summary["problems_outside_range"] + summary["problems_unfinished"]
          == summary["problems"])
  assert (summary["pairs"] + summary["pairs_not_exact"] + summary["pivotal_tokens_unpaired"]
          == summary["pivotal_tokens"])
  assert summary["pairs"] == len(pairs) >= 2, summary
  tokenizer = setup["tokenizer"]
  for pair in pairs:
    assert pair["prompt"][-1]["role"] == "assistant" and pair["answer"] == "even"
    assert pair["chosen"] != pair["rejected"] and pair["p_chosen"] - pair["p_rejected"] >= 0.25
    for side in ("chosen", "rejected"):
      assert len(tokenizer(pair[side], add_special_tokens=False)["input_ids"]) == 1
  it = preference.build_preference_iterator(out, tokenizer, seq_len=SEQ, batch_size=len(pairs), seed=0,
                                            shuffle=False, num_epochs=1, process_index=0, process_count=1)
  batch = next(it)
  assert it.stats()["records_used"] == len(pairs)
  np.testing.assert_array_equal(batch["chosen_loss_mask"].sum(-1), 1)
  np.testing.assert_array_equal(batch["rejected_loss_mask"].sum(-1), 1)

  workdir = _workdir(setup, "pts_dpo_run")
  _run_gin(gin_files, common_bindings + [
      f"data.train_files=[{out!r}]", f"data.seq_len={SEQ}", f"train.init_from={start!r}", f"train.chunk_size={CHUNK}",
      "train.num_steps=2", "train.checkpoint_every=2", "train.async_checkpoints=False"],
      common.run_training, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 2
  np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-5)  # the frozen reference is the starting policy


def test_precompute_mode_scores_pairs_once_then_needs_no_reference(setup, start_run, reference_fn, monkeypatch,
                                                                   caplog):
  workdir = _workdir(setup, "precompute_run")
  bindings = [f"data.train_files=[{setup['path']!r}]", f"data.seq_len={SEQ}", f"train.init_from={start_run!r}",
              f"train.chunk_size={CHUNK}", "train.num_steps=1", "dpo.reference='precompute'",
              f"model.overrides={MODEL_OVERRIDES!r}", "mesh.shape={'data': 2, 'fsdp': -1}"]

  def setup_stage():
    model_config, hf_path = common.model()
    return dpo_reference.setup(workdir, model_config, hf_path, common.data(), common.train_settings(),
                               common.dpo_settings(), setup["tokenizer"], common.mesh(), BATCH)

  gin_files = [os.path.join(ROOT, "experiments/configs/dpo_tiny.gin")]
  _, train_data, _ = _run_gin(gin_files, bindings, setup_stage)
  written = os.path.join(workdir, "reference", "train0-pairs.jsonl")
  with open(written) as f:
    assert len(f.readlines()) == 7
  batch = next(train_data)
  expected = reference_fn(setup["params"], {k: v for k, v in batch.items() if k in preference.BATCH_FIELDS})
  for key, value in zip(preference.REFERENCE_FIELDS, expected):
    np.testing.assert_allclose(batch[key], value, rtol=1e-5, atol=1e-4)

  def no_reference(*args):
    raise AssertionError("a resumed run must not load the reference model again")

  monkeypatch.setattr(dpo_reference, "reference_params", no_reference)
  _, train_data, _ = _run_gin(gin_files, bindings, setup_stage)
  assert set(preference.REFERENCE_FIELDS) <= set(next(train_data))
  # Another system prompt changes every pair's rows: the stale file is computed again, not reused.
  monkeypatch.undo()
  with open(written) as f:
    before = f.read()
  _run_gin(gin_files, bindings + ["data.system_prompt='Answer briefly.'"], setup_stage)
  assert "computed under other settings (system_prompt changed" in caplog.text
  with open(written) as f:
    assert f.read() != before
  # A pair file edited without changing its size (a pair's chosen and rejected swapped): computed again as well.
  mine = os.path.join(workdir, "mine.jsonl")
  with open(setup["path"]) as f:
    pairs = [json.loads(line) for line in f]
  with open(mine, "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
  mine_bindings = [b for b in bindings if not b.startswith("data.train_files")] + [f"data.train_files=[{mine!r}]"]
  _run_gin(gin_files, mine_bindings, setup_stage)
  pairs[0]["chosen"], pairs[0]["rejected"] = pairs[0]["rejected"], pairs[0]["chosen"]
  with open(mine, "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
  caplog.clear()
  _run_gin(gin_files, mine_bindings, setup_stage)
  assert "computed under other settings (pairs_file changed" in caplog.text


def test_a_reference_file_of_continuations_scored_on_older_rows_is_computed_again(tmp_path, caplog):
  """Precompute mode reuses a file whose settings match; one holding continuation pairs scored before their rows
  ended at the completion (no "ref_rows") is stale, as the reader would refuse it."""
  question, prefix = {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "It is"}
  ref = {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
  made_with = {"seq_len": 64}
  for name, records, stale in (
      ("turns", [{"prompt": [question], "chosen": " 4", "rejected": " 5", **ref}], False),
      ("continued", [{"prompt": [question, prefix], "chosen": " 4", "rejected": " 5", **ref}], True),
      ("rescored", [{"prompt": [question, prefix], "chosen": " 4", "rejected": " 5", **ref,
                     "ref_rows": preference.ROWS_VERSION}], False)):
    out = _write_jsonl(tmp_path / f"{name}.jsonl", records)
    with open(out + ".settings.json", "w") as f:
      json.dump(made_with, f)
    assert preference.holds_old_rows(out) == stale
    assert dpo_reference._reference_is_current(out, made_with, lambda: None) == (
        {"rows": ("older", preference.ROWS_VERSION)} if stale else {}), name
  assert "computed under other settings (rows changed" in caplog.text


def test_precomputed_reference_files_are_named_as_the_jsonl_they_are():
  assert (dpo_reference.reference_file("w", "train0", "/d/pairs.jsonl")
          == os.path.join("w", "reference", "train0-pairs.jsonl"))
  assert dpo_reference.reference_file("w", "eval1", "/d/pairs.parquet").endswith("eval1-pairs.parquet.jsonl")
  assert dpo_reference.reference_file("w", "train0", "/d/saved_pairs/").endswith("train0-saved_pairs.jsonl")


def test_a_run_without_params_is_named_unfinished(tmp_path):
  os.makedirs(tmp_path / "checkpoints" / "2")
  with pytest.raises(ValueError, match="a run that has not finished"):
    common.params_loader(CONFIG, None, str(tmp_path), sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))()
  with pytest.raises(ValueError, match="a run that has not finished"):
    rollouts.load_policy(str(tmp_path), None)


def test_rejected_rollouts_that_ended_on_their_own_are_preferred():
  """A rollout cut off at max_new_tokens is rejected only when no incorrect one ended by itself."""
  def out(text, finished=True):
    return {"text": text, "finished": finished}

  problems = [{"prompt": f"p{i}", "answer": "a"} for i in range(40)]
  rollouts_ = [[out("right"), out("wrong"), out("cut", False), out("cut too", False)]] * 39 + [
      [out("right"), out("cut", False)]]
  verdicts = [[True, False, False, False]] * 39 + [[True, False]]
  pairs, counts = rollouts.make_pairs(problems, rollouts_, verdicts, seed=0)
  assert [p["rejected"] for p in pairs] == ["wrong"] * 39 + ["cut"]
  assert counts["pairs_rejected_unfinished"] == 1 and counts["rollouts_unfinished"] == 79


def test_rollouts_to_pairs_to_dpo_training_end_to_end(setup, start_run, monkeypatch):
  tmp, start = setup["tmp"], start_run
  problems = [{"problem": "What is 1 + 1?", "answer": "all"}, {"problem": "What is 2 + 5?", "answer": "none"}] + [
      {"problem": f"What is {i} + {i}?", "answer": "even"} for i in range(3, 7)]
  problems_path = _write_jsonl(tmp / "problems.jsonl", problems)
  out = str(tmp / "rollouts" / "pairs.jsonl")
  calls = []
  monkeypatch.setattr(rewards, "verify_batch", _fake_verify(calls))
  gin_files = [os.path.join(ROOT, "experiments/configs/dpo_tiny.gin")]
  common_bindings = [f"model.overrides={MODEL_OVERRIDES!r}", "mesh.shape={'data': 2, 'fsdp': -1}"]
  # Even token ids stop a rollout: every rollout finishes within a few tokens, at varied lengths.
  summary = _run_gin(gin_files, common_bindings + [
      "rollouts.max_new_tokens=24", f"rollouts.stop_token_ids={tuple(range(0, 512, 2))}", "rollouts.batch_size=32"],
      rollouts.main, [f"--init_from={start}", f"--problems={problems_path}", "--k=4", f"--out={out}", "--seed=3"])
  (texts, golds, verdicts), = calls
  assert len(texts) == 24 and golds == [p["answer"] for p in problems for _ in range(4)]
  with open(out) as f:
    pairs = [json.loads(line) for line in f]
  with open(rollouts.summary_path(out)) as f:
    assert json.load(f) == summary
  mixed = [i for i in range(2, 6) if 0 < sum(verdicts[4 * i:4 * i + 4]) < 4]
  assert summary["rollouts_unfinished"] == summary["pairs_rejected_unfinished"] == 0
  assert summary["prompts"] == 6 and summary["rollouts"] == 24
  assert summary["pairs"] == len(pairs) == len(mixed) >= 2
  assert summary["prompts_all_correct"] == 1 + sum(sum(verdicts[4 * i:4 * i + 4]) == 4 for i in range(2, 6))
  assert summary["prompts_all_wrong"] == 1 + sum(sum(verdicts[4 * i:4 * i + 4]) == 0 for i in range(2, 6))
  assert summary["accuracy"] == pytest.approx(np.mean(verdicts))
  for pair, i in zip(pairs, mixed):
    rollouts_of_problem = texts[4 * i:4 * i + 4]
    assert pair["prompt"] == problems[i]["problem"] and pair["answer"] == "even"
    assert pair["chosen"] in rollouts_of_problem and len(pair["chosen"]) % 2 == 0
    assert pair["rejected"] in rollouts_of_problem and len(pair["rejected"]) % 2 == 1

  # The pairs train through the gin entry point (train.stage = "dpo"), the reference scored in the step.
  workdir = _workdir(setup, "dpo_run")
  _run_gin(gin_files, common_bindings + [
      f"data.train_files=[{out!r}]", f"data.seq_len={SEQ}", f"train.init_from={start!r}", f"train.chunk_size={CHUNK}",
      "train.num_steps=6", "train.checkpoint_every=6", "train.async_checkpoints=False", "dpo.beta=0.5",
      "optimizer.learning_rate=3e-3", "optimizer.warmup_fraction=0.0", "optimizer.decay='constant'",
      f"data.eval_files=[{out!r}]", "data.eval_batches=1", "train.eval_every=6"],
      common.run_training, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  losses = [r["loss"] for r in records]
  assert len(losses) == 6 and records[0]["weight"] == BATCH
  np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-5)  # the frozen reference is the starting policy
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.6 and records[-1]["rewards/accuracies"] > 0.5 and records[-1]["rewards/margins"] > 0
  # The eval of DPO scores pairs, and says so (its weight counts pairs, not tokens).
  assert records[-1]["eval_pairs"] == min(BATCH, len(pairs)) and "eval_tokens" not in records[-1]
  assert os.path.isdir(os.path.join(workdir, "params"))

  # A resumed run loads its frozen reference again: one whose values changed since the run started is refused.
  import orbax.checkpoint as ocp
  changed = str(tmp / "changed_start")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(start, "params"))
    ckptr.save(os.path.join(changed, "params"), jax.tree.map(lambda x: x * 1.001, params))
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"the frozen reference loaded from "
                     rf"train.init_from='{changed}' is not the one this run started with"):
    _run_gin(gin_files, common_bindings + [
        f"data.train_files=[{out!r}]", f"data.seq_len={SEQ}", f"train.init_from={changed!r}",
        f"train.chunk_size={CHUNK}", "train.num_steps=7", "train.checkpoint_every=6", "train.async_checkpoints=False",
        "dpo.beta=0.5", "optimizer.learning_rate=3e-3", "optimizer.warmup_fraction=0.0", "optimizer.decay='constant'"],
        common.run_training, workdir)


def test_a_nan_in_a_filler_row_changes_neither_the_loss_nor_the_gradients(setup, independent_logps):
  batch = dict(setup["batch"])  # row 7 is all padding
  batch["ref_chosen_logps"] = independent_logps["chosen"][0].astype(np.float32)
  batch["ref_rejected_logps"] = independent_logps["rejected"][0].astype(np.float32)
  poisoned = dict(batch, ref_chosen_logps=batch["ref_chosen_logps"].copy())
  poisoned["ref_chosen_logps"][7] = np.nan
  loss_fn = dpo.make_loss_fn(CONFIG, beta=0.5, chunk_size=CHUNK)
  # Not jitted: XLA may rewrite 0 * x as a select, which would hide the NaN here but not in every program.
  value_and_grad = jax.value_and_grad(lambda p, b: loss_fn(p, b, None), has_aux=True)
  (clean_loss, clean_aux), clean_grads = value_and_grad(setup["params"], batch)
  (loss, aux), grads = value_and_grad(setup["params"], poisoned)
  assert np.isfinite(float(loss)) and float(aux["weight"]) == 7
  np.testing.assert_allclose(float(loss), float(clean_loss), rtol=1e-6)
  for name, metric in aux["metrics"].items():
    np.testing.assert_allclose(float(metric), float(clean_aux["metrics"][name]), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(clean_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_trl_conversational_pairs_read_as_their_string_form(setup):
  question = [{"role": "user", "content": "What is 2 + 2?"}]
  plain = {"messages": question, "chosen": "4", "rejected": "5"}

  def turn(text):
    return {"role": "assistant", "content": text}

  explicit = {"prompt": question, "chosen": [turn("4")], "rejected": [turn("5")]}
  implicit = {"chosen": question + [turn("4")], "rejected": question + [turn("5")]}
  assert preference.validate_pair(explicit) == (plain, None)
  assert preference.validate_pair(implicit) == (plain, None)
  multi = {"chosen": MULTI_TURN + [turn("4")], "rejected": MULTI_TURN + [turn("5")]}
  assert preference.validate_pair(multi) == ({"messages": MULTI_TURN, "chosen": "4", "rejected": "5"}, None)
  # The rows are those of the same pair written with strings.
  path = _write_jsonl(setup["tmp"] / "trl.jsonl", [explicit, implicit, {"prompt": question[0]["content"],
                                                                        "chosen": "4", "rejected": "5"}])
  batch = next(preference.build_preference_iterator(path, setup["tokenizer"], seq_len=SEQ, batch_size=3, seed=0,
                                                    shuffle=False, process_index=0, process_count=1))
  for key in preference.BATCH_FIELDS:
    assert np.array_equal(batch[key][0], batch[key][2]) and np.array_equal(batch[key][1], batch[key][2]), key
  # A side of two turns, or one whose last turn is not the assistant's, is refused with how to write it.
  two_turns = dict(explicit, chosen=[turn("4"), {"role": "user", "content": "sure?"}])
  record, bad = preference.validate_pair(two_turns)
  assert record is None and bad[0] == "mistyped field"
  assert "'chosen' holds 2 message(s)" in bad[1] and "one assistant message" in bad[1]
  record, bad = preference.validate_pair({"chosen": [turn("4")], "rejected": [{"role": "user", "content": "5"}]})
  assert record is None and "share no leading messages" in bad[1]


def test_a_pair_truncate_prompt_cannot_save_is_named_by_that_rule(setup, caplog):
  path = _write_jsonl(setup["tmp"] / "uncuttable.jsonl", [setup["records"][0],
                                                          {"prompt": "Hi", "chosen": "1 " * 150, "rejected": "2"}])
  it = preference.build_preference_iterator(path, setup["tokenizer"], seq_len=SEQ, batch_size=2, seed=0,
                                            shuffle=False, too_long="truncate_prompt", process_index=0,
                                            process_count=1)
  with caplog.at_level("WARNING", logger="phi_jax"):
    next(it)
  assert it.stats()["too_long_dropped"] == 1
  assert "too_long='drop'" not in caplog.text
  assert "uncuttable.jsonl:2) was a pair whose completion does not fit seq_len" in caplog.text
  assert "too_long='truncate_prompt'" in caplog.text


def test_precomputed_reference_logps_of_another_tokenizer_are_refused(setup):
  kwargs = dict(seq_len=SEQ, batch_size=BATCH, seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1)
  out = str(setup["tmp"] / "tokenizer_check.ref.jsonl")
  dpo.precompute_reference_logps(setup["path"], setup["params"], CONFIG, setup["tokenizer"], seq_len=SEQ,
                                 batch_size=BATCH, chunk_size=CHUNK, out_file=out)
  next(preference.build_preference_iterator(out, setup["tokenizer"], reference_logps=True, **kwargs))
  mini = build_tiny_tokenizer(setup["tmp"] / "tok_mini", chat_format="phi-4-mini")
  assert len(mini) == len(setup["tokenizer"])  # the same size: only the vocabulary and template tell them apart
  with pytest.raises(DataError, match=r"reference mismatch: .*tokenizer=.* there, .* here"):
    next(preference.build_preference_iterator(out, mini, reference_logps=True, **kwargs))


def test_eval_skip_warning_of_a_dpo_run_names_dpo_too_long(caplog):
  stats = {"records_read": 8, "records_used": 4, "records_skipped": {"too long": 4}}

  def warn():
    common._warn_of_eval_skips(stats, common.data())

  with caplog.at_level("WARNING", logger="phi_jax"):
    _run_gin([], ["train.stage='dpo'", "dpo.too_long='drop'"], warn)
  assert "change dpo.too_long (now 'drop')" in caplog.text and "data.too_long" not in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):
    _run_gin([], ["train.stage='next_token'"], warn)
  assert "change data.too_long (now 'split')" in caplog.text


def _precompute_bindings(setup, start, pairs, **changes):
  settings = {"data.train_files": [pairs], "data.seq_len": SEQ, "train.init_from": start, "train.chunk_size": CHUNK,
              "train.num_steps": 1, "dpo.reference": "precompute", "model.overrides": MODEL_OVERRIDES,
              "mesh.shape": {"data": 2, "fsdp": -1}, **changes}
  return [f"{key}={value!r}" for key, value in settings.items()]


def _precompute(setup, workdir, bindings):
  def setup_stage():
    model_config, hf_path = common.model()
    return dpo_reference.setup(workdir, model_config, hf_path, common.data(), common.train_settings(),
                               common.dpo_settings(), setup["tokenizer"], common.mesh(), BATCH)

  return _run_gin([os.path.join(ROOT, "experiments/configs/dpo_tiny.gin")], bindings, setup_stage)


def test_precompute_mode_recomputes_when_the_reference_params_change_in_place(setup, monkeypatch, caplog):
  start = str(setup["tmp"] / "retrained_start")
  common.save_final_params(start, setup["params"])
  workdir = _workdir(setup, "precompute_params_change")
  bindings = _precompute_bindings(setup, start, setup["path"])
  _precompute(setup, workdir, bindings)
  written = os.path.join(workdir, "reference", "train0-pairs.jsonl")
  with open(written) as f:
    before = f.read()
  # The same values saved again (new files): compared by their digest, and kept.
  common.save_final_params(start, setup["params"])
  caplog.clear()
  with caplog.at_level("INFO", logger="phi_jax"):
    _precompute(setup, workdir, bindings)
  assert "computed under other settings" not in caplog.text
  with open(written) as f:
    assert f.read() == before
  # The same values under another name (a copy; a path spelled with a trailing slash): kept, even with checkpoints.
  copied = str(setup["tmp"] / "copied_start")
  shutil.copytree(start, copied, dirs_exist_ok=True)
  os.makedirs(os.path.join(workdir, "checkpoints", "1"), exist_ok=True)
  for path in (copied + "/", start):
    caplog.clear()
    with caplog.at_level("INFO", logger="phi_jax"):
      _precompute(setup, workdir, _precompute_bindings(setup, path, setup["path"]))
    assert "computed under other settings" not in caplog.text
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with open(written) as f:
    assert f.read() == before
  # Other values at the same path (the start run trained on, or replaced): computed again, with the new params.
  changed = jax.tree.map(lambda x: x * 1.5, setup["params"])
  common.save_final_params(start, changed)
  with caplog.at_level("INFO", logger="phi_jax"):
    _, train_data, _ = _precompute(setup, workdir, bindings)
  assert "computed under other settings (reference_params changed" in caplog.text
  batch = next(train_data)
  expected = dpo.reference_logps_fn(CONFIG, CHUNK)(changed, {k: batch[k] for k in preference.BATCH_FIELDS})
  for key, value in zip(preference.REFERENCE_FIELDS, expected):
    np.testing.assert_allclose(batch[key], value, rtol=1e-5, atol=1e-4)
  # Unchanged since: reused without loading the reference.
  monkeypatch.setattr(dpo_reference, "reference_params", lambda *args: pytest.fail("the reference was loaded again"))
  _precompute(setup, workdir, bindings)


def test_precompute_mode_refuses_to_rewrite_the_pairs_its_checkpoints_read(setup, start_run, caplog):
  workdir = _workdir(setup, "precompute_resume")
  _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"]))
  # Another rule for bad records keeps other pairs: computed again while the run has no checkpoints.
  with caplog.at_level("INFO", logger="phi_jax"):
    _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"],
                                                     **{"data.on_bad_record": "skip"}))
  assert "computed under other settings (on_bad_record changed" in caplog.text
  written = os.path.join(workdir, "reference", "train0-pairs.jsonl")
  with open(written) as f:
    before = f.read()
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))  # the run has trained and saved its data position
  with pytest.raises(ValueError, match=r"train0-pairs.jsonl .*seq_len: 80 -> 48.*the saved data position.*"
                     r"Restore the settings this run started with, or start a new workdir"):
    _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"], **{
        "data.seq_len": 48, "data.on_bad_record": "skip"}))
  with open(written) as f:
    assert f.read() == before  # refused before rewriting
  _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"],
                                                   **{"data.on_bad_record": "skip"}))



def test_precompute_mode_resumes_after_a_run_time_only_model_change(setup, start_run, monkeypatch, caplog):
  """remat_policy and max_segments_per_row change memory and speed, not the pairs nor (beyond float rounding) their
  log-probs: a resumed run reuses the file, as it does one whose settings recorded them (an earlier phi_jax)."""
  workdir = _workdir(setup, "precompute_run_time_change")
  _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"]))
  written = os.path.join(workdir, "reference", "train0-pairs.jsonl")
  with open(written + ".settings.json") as f:
    recorded = json.load(f)
  recorded["model_config"].update(remat_policy="none", attention_backend="xla", max_segments_per_row=8)
  with open(written + ".settings.json", "w") as f:
    json.dump(recorded, f)
  with open(written) as f:
    before = f.read()
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  monkeypatch.setattr(dpo_reference, "reference_params", lambda *args: pytest.fail("the reference was loaded again"))
  run_time = dict(MODEL_OVERRIDES, remat_policy="full", max_segments_per_row=4)
  with caplog.at_level("INFO", logger="phi_jax"):
    _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"],
                                                     **{"model.overrides": run_time}))
  assert "computed under other settings" not in caplog.text
  with open(written) as f:
    assert f.read() == before


def test_precompute_mode_names_a_model_change_that_moves_the_values_not_the_pairs(setup, start_run):
  workdir = _workdir(setup, "precompute_dtype_change")
  _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"]))
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  with pytest.raises(ValueError, match=r"model_config.dtype: 'float32' -> 'bfloat16'.*change their values, not the "
                     r"list of pairs.*against partway through") as refused:
    _precompute(setup, workdir, _precompute_bindings(setup, start_run, setup["path"], **{
        "model.overrides": dict(MODEL_OVERRIDES, dtype="bfloat16")}))
  assert "would change the list" not in str(refused.value)

def _read_all(batches):
  for _ in batches:
    pass
  return batches.stats()


def test_precompute_mode_counts_the_pairs_it_leaves_out_as_in_step_does(setup, start_run, monkeypatch, caplog):
  long_prompt = {"prompt": "What is " + " + ".join(["12"] * 40) + "?", "chosen": "480", "rejected": "12"}
  path = _write_jsonl(setup["tmp"] / "with_long.jsonl", setup["records"] + [long_prompt] * 3 + ["{oops"])
  workdir = _workdir(setup, "precompute_counts")
  bindings = _precompute_bindings(setup, start_run, path, **{"data.eval_files": [path], "data.num_epochs": 2,
                                                             "dpo.too_long": "drop", "data.on_bad_record": "skip"})
  # In the step, the pair file itself is read: its skipped records are counted as each pass reads them.
  in_step = _read_all(preference.build_preference_iterator(
      path, setup["tokenizer"], seq_len=SEQ, batch_size=BATCH, seed=0, num_epochs=2, too_long="drop",
      on_bad_record="skip", process_index=0, process_count=1))
  assert in_step["records_skipped"] == {"too long": 6, "invalid JSON": 2} and in_step["records_read"] == 22
  keys = ("records_read", "records_used", "records_skipped", "too_long_dropped", "pairs")

  def check(outputs):
    _, train_data, eval_batches = outputs
    assert {k: v for k, v in _read_all(train_data).items() if k in keys} == {k: in_step[k] for k in keys}
    caplog.clear()
    with caplog.at_level("WARNING", logger="phi_jax"):
      _run_gin([], [], lambda: sum(1 for _ in eval_batches(data_only=True)))
      _run_gin([], ["train.stage='dpo'"], lambda: common._warn_of_eval_skips(eval_batches.stats, common.data()))
    assert "4 of 11 eval record(s) read are not scored" in caplog.text
    assert "too long: 3" in caplog.text and "invalid JSON: 1" in caplog.text

  check(_precompute(setup, workdir, bindings))
  # Resumed, the reference files are reused: their counts were kept beside them.
  monkeypatch.setattr(dpo_reference, "reference_params", lambda *args: pytest.fail("the reference was loaded again"))
  check(_precompute(setup, workdir, bindings))
  # A reference file written without its counts (an earlier phi_jax) is used as it is, its left-out pairs uncounted.
  os.remove(os.path.join(workdir, "reference", "train0-with_long.jsonl.skipped.json"))
  with caplog.at_level("INFO", logger="phi_jax"):
    _, train_data, _ = _precompute(setup, workdir, bindings)
  assert "train0-with_long.jsonl does not record the pairs it left out" in caplog.text
  assert _read_all(train_data)["records_skipped"] == {}


def test_a_prompt_ending_in_an_assistant_message_is_continued(setup):
  tokenizer = setup["tokenizer"]
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  question = {"role": "user", "content": "What is 2 + 2?"}
  prefix = {"role": "assistant", "content": "Let me think. The answer is"}
  record, bad = preference.validate_pair({"prompt": [question, prefix], "chosen": [{"role": "assistant",
                                                                                    "content": " 4"}],
                                          "rejected": " 5"})
  assert bad is None
  rows, status = preference.encode_pair(tokenizer, record, seq_len=SEQ)
  assert status == "used"
  for side, text in (("chosen", " 4"), ("rejected", " 5")):
    # The final message's content followed by the completion, and no end of turn: whether the turn ends there is
    # not known (a pivotal-token pair's completion is one token mid-solution). Only the completion is trained.
    ids, _ = chat.render_messages(tokenizer, [question, dict(prefix, content=prefix["content"] + text)])
    assert ids[-1] == im_end
    ids = ids[:-1]
    completion = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[len(ids) - len(completion):] == completion
    assert list(rows[side]["tokens"][:len(ids)]) == ids and not rows[side]["tokens"][len(ids):].any()
    assert list(rows[side]["loss_mask"]) == ([0] * (len(ids) - len(completion)) + [1] * len(completion)
                                             + [0] * (SEQ - len(ids)))
  # A reference file written before continuation rows ended at the completion ("ref_rows" missing) holds the
  # end-of-turn token's log-prob in its sums: refused for continuations, read as before for new turns.
  ref = {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, "ref_seq_len": SEQ}
  old_file = _write_jsonl(setup["tmp"] / "old_reference.jsonl", [
      {"prompt": [question], "chosen": " 4", "rejected": " 5", **ref},
      {"prompt": [question, prefix], "chosen": " 4", "rejected": " 5", **ref}])
  read = lambda path: list(preference.build_preference_iterator(
      str(path), tokenizer, seq_len=SEQ, batch_size=1, seed=0, shuffle=False, num_epochs=1, reference_logps=True,
      process_index=0, process_count=1))
  with pytest.raises(DataError, match=r"old_reference.jsonl:2: reference mismatch: .*rows=1 there"):
    read(old_file)
  ref["ref_rows"] = preference.ROWS_VERSION
  assert len(read(_write_jsonl(setup["tmp"] / "new_reference.jsonl", [
      {"prompt": [question, prefix], "chosen": " 4", "rejected": " 5", **ref}]))) == 1
  # The prompt (the final message's own text included) is what truncate_prompt cuts.
  longest = max(int(rows[side]["segment_ids"].sum()) for side in preference.SIDES)
  cut, status = preference.encode_pair(tokenizer, record, seq_len=longest - 2, too_long="truncate_prompt")
  assert status == "truncated"
  assert [int(cut[side]["loss_mask"].sum()) for side in preference.SIDES] == [
      int(rows[side]["loss_mask"].sum()) for side in preference.SIDES]
  # A completion that starts inside a token of the final message has no exact mask: refused, and counted.
  split = {"prompt": [question, dict(prefix, content="The ans")], "chosen": "wer is 4", "rejected": "wer is 5"}
  with pytest.raises(ValueError, match="completion continues the prompt's final assistant message"):
    preference.encode_pair(tokenizer, preference.validate_pair(split)[0], seq_len=SEQ)
  path = _write_jsonl(setup["tmp"] / "continued.jsonl", [split, {"prompt": [question, prefix], "chosen": " 4",
                                                                 "rejected": " 5"}])
  it = preference.build_preference_iterator(path, tokenizer, seq_len=SEQ, batch_size=2, seed=0, shuffle=False,
                                            on_bad_record="skip", process_index=0, process_count=1)
  batch = next(it)
  assert it.stats()["records_skipped"] == {"tokenization failed": 1}
  assert np.array_equal(batch["chosen_tokens"][0], rows["chosen"]["tokens"])


def test_string_pairs_without_a_prompt_are_refused_with_what_to_give():
  record, bad = preference.validate_pair({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"})
  assert record is None and bad[0] == "missing field"
  assert "'prompt' is missing" in bad[1] and "string 'chosen' and 'rejected'" in bad[1]
  assert "give the prompt under 'prompt'" in bad[1] and "list of messages" in bad[1]


def test_precompute_refuses_a_batch_the_mesh_does_not_split(setup, tmp_path):
  mesh = sharding.make_mesh({"fsdp": -1})  # 8 devices
  for batch_size, microbatches in ((4, 1), (8, 2)):
    with pytest.raises(ValueError, match=rf"batch_size={batch_size} .*microbatches={microbatches}.* data x fsdp "
                       r"mesh size 8"):
      dpo.precompute_reference_logps(setup["path"], setup["params"], CONFIG, setup["tokenizer"], seq_len=SEQ,
                                     batch_size=batch_size, microbatches=microbatches, chunk_size=CHUNK,
                                     out_file=str(tmp_path / "pairs.ref.jsonl"), mesh=mesh)
  assert not os.listdir(tmp_path)


def test_precomputed_mode_resumes_once_its_starting_params_are_gone(setup, tmp_path):
  """dpo.reference='precomputed' loads no reference: train.init_from moved away (a resumed run trains from its
  checkpoints) is no reason to refuse it."""
  scored = str(tmp_path / "pairs.ref.jsonl")
  dpo.precompute_reference_logps(setup["path"], setup["params"], CONFIG, setup["tokenizer"], seq_len=SEQ,
                                 batch_size=BATCH, chunk_size=CHUNK, out_file=scored, too_long="truncate_prompt")
  workdir = _workdir(setup, "precomputed_start_gone")
  bindings = _precompute_bindings(setup, str(tmp_path / "moved_away"), scored, **{"dpo.reference": "precomputed"})
  _, train_data, _ = _precompute(setup, workdir, bindings)
  assert set(preference.REFERENCE_FIELDS) <= set(next(train_data))


def test_precompute_mode_resumes_once_its_starting_params_are_gone(setup, caplog):
  """A resumed run trains from its checkpoints: the reference files it wrote are used as they are, with a warning,
  once train.init_from has moved away. A fresh run still needs them (its starting point)."""
  start = str(setup["tmp"] / "start_to_move")
  common.save_final_params(start, setup["params"])
  workdir = _workdir(setup, "precompute_start_gone")
  bindings = _precompute_bindings(setup, start, setup["path"])
  _precompute(setup, workdir, bindings)
  written = os.path.join(workdir, "reference", "train0-pairs.jsonl")
  with open(written) as f:
    before = f.read()
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  shutil.move(start, start + "_moved")
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):
    _, train_data, _ = _precompute(setup, workdir, bindings)
  assert set(preference.REFERENCE_FIELDS) <= set(next(train_data))
  assert f"train.init_from={start!r} holds no params now" in caplog.text and "not compared" in caplog.text
  with open(written) as f:
    assert f.read() == before
  # The run directory still there, its params/ deleted: the same (it was refused as "a run that has not finished").
  shutil.move(start + "_moved", start)
  shutil.move(os.path.join(start, "params"), start + "_params")
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):
    _precompute(setup, workdir, bindings)
  assert f"train.init_from={start!r} holds no params now" in caplog.text
  # Other settings still decide: refused as before, not reused.
  with pytest.raises(ValueError, match=r"seq_len: 80 -> 48.*the saved data position"):
    _precompute(setup, workdir, _precompute_bindings(setup, start, setup["path"], **{"data.seq_len": 48}))
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with pytest.raises(ValueError, match=r"train.init_from=.*start_to_move'? is neither a run's workdir"):
    _precompute(setup, workdir, bindings)  # a fresh run: they are its starting point


def _refusing_to_open(monkeypatch, *unreadable):
  """Makes `dpo_reference`'s open fail as a file without read permission does (the tests may run as root, whom
  permissions do not bind) for the files named `unreadable`; returns the paths it was asked to open."""
  opened = []

  def fake_open(path, *args, **kwargs):
    opened.append(os.path.basename(path))
    if os.path.basename(path) in unreadable:
      raise PermissionError(13, "Permission denied", path)
    return open(path, *args, **kwargs)

  monkeypatch.setattr(dpo_reference, "open", fake_open, raising=False)
  return opened


@pytest.mark.parametrize("name", ["train.init_from", "model.hf_path"])
def test_reference_check_opens_only_the_files_a_transformers_checkpoint_is_loaded_from(setup, tmp_path, monkeypatch,
                                                                                        name):
  """Files beside the weights that the loader never reads (a trainer's training_args.bin, optimizer.pt) may be
  unreadable; the weights and config.json may not."""
  start = str(tmp_path / "hf")
  phi_jax.save_hf(start, CONFIG, setup["params"])
  for extra in ("training_args.bin", "optimizer.pt"):
    with open(os.path.join(start, extra), "wb") as f:
      f.write(b"\0")
  # A stale index beside model.safetensors (transformers' save_pretrained leaves one): load_hf reads the single file.
  with open(os.path.join(start, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}, f)
  settings, hf_path = ({"init_from": start}, None) if name == "train.init_from" else ({"init_from": None}, start)
  opened = _refusing_to_open(monkeypatch, "training_args.bin", "optimizer.pt", "model.safetensors.index.json")
  dpo_reference.check_reference_readable(settings, hf_path)
  assert {"config.json", "model.safetensors"} <= set(opened), opened
  monkeypatch.undo()
  _refusing_to_open(monkeypatch, "model.safetensors")
  with pytest.raises(ValueError, match=rf"{name}=.*cannot read .*model.safetensors \(Permission denied\): make the "
                     "params readable on every host"):
    dpo_reference.check_reference_readable(settings, hf_path)


def test_params_check_gives_load_hfs_own_error_for_a_directory_without_safetensors(setup, tmp_path):
  """PyTorch .bin weights (older checkpoints ship so): the check before any collective says what load_hf says (convert
  them), not that the files should be copied to every host."""
  start = tmp_path / "hf_bin"
  phi_jax.save_hf(str(start), CONFIG, setup["params"])
  os.rename(start / "model.safetensors", start / "pytorch_model.bin")
  for settings, hf_path in (({"init_from": str(start)}, None), ({"init_from": None}, str(start))):
    with pytest.raises(FileNotFoundError, match=r"it holds pytorch_model.bin: PyTorch .bin weights are not read"):
      dpo_reference.check_reference_readable(settings, hf_path)


def test_reference_check_refuses_a_folder_of_params_it_cannot_list(start_run, monkeypatch):
  """A folder of a run's params/ this process cannot list would fail the load inside Orbax's restore (a collective),
  where the other processes cannot be told."""
  params = os.path.join(start_run, "params")
  folder = next(os.path.join(params, n) for n in sorted(os.listdir(params)) if os.path.isdir(os.path.join(params, n)))
  scandir = os.scandir

  def unlistable(path=".", *args):
    if os.fspath(path) == folder:
      raise PermissionError(13, "Permission denied", folder)
    return scandir(path, *args)

  monkeypatch.setattr(os, "scandir", unlistable)
  with pytest.raises(ValueError, match=rf"train.init_from=.*cannot read {folder} \(Permission denied\): make the "
                     "params readable on every host"):
    dpo_reference.check_reference_readable({"init_from": start_run}, None)


@pytest.fixture(scope="module")
def pairs_with_long(setup):
  """The 7 pairs and 3 whose prompt is too long for SEQ: dpo.too_long='drop' leaves them out."""
  long_prompt = {"prompt": "What is " + " + ".join(["12"] * 40) + "?", "chosen": "480", "rejected": "12"}
  return _write_jsonl(setup["tmp"] / "pairs_with_long.jsonl", setup["records"] + [long_prompt] * 3)


def _train_dpo(setup, start, workdir, pairs, num_steps, **changes):
  """Trains the DPO stage through the gin entry point to `num_steps` (a checkpoint at every step); the steps that
  metrics.jsonl holds."""
  settings = {"data.train_files": [pairs], "data.seq_len": SEQ, "train.init_from": start, "train.chunk_size": CHUNK,
              "train.num_steps": num_steps, "train.checkpoint_every": 1, "train.async_checkpoints": False,
              "dpo.too_long": "drop", "optimizer.warmup_fraction": 0.0, "model.overrides": MODEL_OVERRIDES,
              "mesh.shape": {"data": 2, "fsdp": -1}, **changes}
  _run_gin([os.path.join(ROOT, "experiments/configs/dpo_tiny.gin")], [f"{k}={v!r}" for k, v in settings.items()],
           common.run_training, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_a_dpo_resume_with_the_reference_mode_switched_where_pairs_were_left_out_is_refused(setup, start_run,
                                                                                          pairs_with_long):
  """The saved data position indexes the records the train stream reads: in_step mode reads every pair of the file,
  precompute mode its reference file, which leaves the too-long pairs out. Switched on resume, the shuffle would run
  over another number of records (some pairs trained twice, others never)."""
  workdir = _workdir(setup, "dpo_switch_from_in_step")
  assert _train_dpo(setup, start_run, workdir, pairs_with_long, 1) == [1]
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=(
      r"trained with dpo.reference='in_step'.*data.train_files\[0\]: every record of the pair file then, the pairs "
      r"of W/reference/train0-pairs_with_long.jsonl, which left out some \(too long: 3\) now\), so some pairs would "
      r"be trained twice and others never. Resume with dpo.reference='in_step'")):
    _train_dpo(setup, start_run, workdir, pairs_with_long, 2, **{"dpo.reference": "precompute"})
  # Left, the file would be refused as computed under other settings by a later switch to precompute mode.
  assert not os.path.exists(os.path.join(workdir, "reference", "train0-pairs_with_long.jsonl"))
  assert _train_dpo(setup, start_run, workdir, pairs_with_long, 2) == [1, 2]  # the same mode resumes


def test_a_precompute_mode_resume_that_would_read_other_pairs_is_refused(setup, start_run, pairs_with_long):
  workdir = _workdir(setup, "dpo_switch_from_precompute")
  precompute = {"dpo.reference": "precompute"}
  assert _train_dpo(setup, start_run, workdir, pairs_with_long, 1, **precompute) == [1]
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=(
      r"trained with dpo.reference='precompute'.*which left out some \(too long: 3\) then, every record of the pair "
      r"file now.*Resume with dpo.reference='precompute'")):
    _train_dpo(setup, start_run, workdir, pairs_with_long, 2)
  # The reference train file removed: computed again under another seq_len, it could hold another list of pairs.
  written = os.path.join(workdir, "reference", "train0-pairs_with_long.jsonl")
  os.remove(written)
  with pytest.raises(ValueError, match=r"train0-pairs_with_long.jsonl \(seq_len: 80 -> 96\).*the saved data "
                     r"position .* points into that file's list of pairs"):
    _train_dpo(setup, start_run, workdir, pairs_with_long, 2, **precompute, **{"data.seq_len": 96})
  assert not os.path.exists(written)  # refused before computing it
  # Under the settings the run started with, it holds the same pairs again: the run resumes.
  assert _train_dpo(setup, start_run, workdir, pairs_with_long, 2, **precompute) == [1, 2]


def test_a_reference_mode_switch_that_leaves_no_pair_out_resumes(setup, start_run):
  """A reference file that left no pair out holds every record of the pair file in file order: the stream in_step
  mode reads, so the saved data position points where it did."""
  workdir = _workdir(setup, "dpo_switch_nothing_left_out")
  keep_all = {"dpo.too_long": "truncate_prompt"}
  assert _train_dpo(setup, start_run, workdir, setup["path"], 1, **keep_all) == [1]
  assert _train_dpo(setup, start_run, workdir, setup["path"], 2, **keep_all, **{"dpo.reference": "precompute"}) == [
      1, 2]


def _split_ids(tokenizer, text):
  """Ids of `text` one byte-level character each: a segmentation sampling can draw ('Ġ2', '3') that encoding the
  decoded text gives merged ('Ġ23')."""
  pieces = "".join(tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]))
  return tokenizer.convert_tokens_to_ids(list(pieces))


def _sampled_pair(tokenizer, prompt="What is 20 + 3?", chosen=" The answer is 23.", rejected=" 24", **fields):
  """A pair as experiments/rollouts.py writes it: chosen ended on <|endoftext|>, rejected cut off (no stop token)."""
  eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
          "chosen_token_ids": _split_ids(tokenizer, chosen) + [eot],
          "rejected_token_ids": _split_ids(tokenizer, rejected),
          "tokenizer_id": preference.tokenizer_id(tokenizer), "sampled_system_prompt": None, **fields}


def test_sampled_completion_ids_are_trained_as_they_were_sampled(setup, caplog):
  """A rollout's text encodes again into other ids than were sampled (split digits merge, an invalid byte decodes to
  U+FFFD, an <|endoftext|> stop reads as <|im_end|>): its pair trains the sampled ids after the prompt generation
  was given, masked exactly, unless the ids are another tokenizer's."""
  tokenizer = setup["tokenizer"]
  record = _sampled_pair(tokenizer)
  assert record["chosen_token_ids"][:-1] != tokenizer(record["chosen"], add_special_tokens=False)["input_ids"]
  pair, bad = preference.validate_pair(record)
  assert bad is None
  rows, status = preference.encode_pair(tokenizer, pair, seq_len=SEQ)
  prompt = chat.render_prompt(tokenizer, record["prompt"])  # what generate_text sampled after
  for side in preference.SIDES:
    want = record[f"{side}_token_ids"]
    length = len(prompt) + len(want)
    assert status == "used" and list(rows[side]["tokens"][:length]) == prompt + want
    assert not rows[side]["tokens"][length:].any()
    assert list(rows[side]["loss_mask"]) == [0] * len(prompt) + [1] * len(want) + [0] * (SEQ - length)
  # Too long: measured on the sampled ids; truncate_prompt cuts the prompt only.
  longest = len(prompt) + len(record["chosen_token_ids"])
  assert preference.encode_pair(tokenizer, pair, seq_len=longest - 3, too_long="drop") == (None, "too long")
  rows, status = preference.encode_pair(tokenizer, pair, seq_len=longest - 3, too_long="truncate_prompt")
  assert status == "truncated" and list(rows["chosen"]["tokens"]) == (prompt + record["chosen_token_ids"])[3:]
  assert rows["chosen"]["loss_mask"].sum() == len(record["chosen_token_ids"])
  # Another tokenizer's ids: the text is encoded again, as for a pair without ids, and that is said once.
  other, _ = preference.validate_pair(dict(record, tokenizer_id="100 tokens, vocabulary and template 0123"))
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    for _ in range(2):
      rows, _ = preference.encode_pair(tokenizer, other, seq_len=SEQ)
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  masked = rows["chosen"]["tokens"][rows["chosen"]["loss_mask"] == 1]
  assert list(masked) == tokenizer(record["chosen"], add_special_tokens=False)["input_ids"] + [im_end]
  assert caplog.text.count("100 tokens, vocabulary and template 0123") == 1
  # Ids that do not decode to the side's text (one of them edited since) are refused.
  edited, _ = preference.validate_pair(dict(record, chosen=" The answer is 24."))
  with pytest.raises(ValueError, match=r"'chosen_token_ids' do not decode to 'chosen'"):
    preference.encode_pair(tokenizer, edited, seq_len=SEQ)
  for broken, detail in (({"tokenizer_id": None}, "'tokenizer_id' is missing"),
                         ({"rejected_token_ids": None}, "'rejected_token_ids' is missing"),
                         ({"chosen_token_ids": [1, "2"]}, "'chosen_token_ids' must be a list of token ids")):
    assert preference.validate_pair({**record, **broken})[1][1].startswith(detail), broken


def test_a_reference_scored_before_sampled_ids_were_trained_is_stale(setup, tmp_path):
  """Log-probs precomputed on the re-encoded text of a pair that carries its sampled ids (rows before version 3)
  belong to other ids than the run trains: refused, and precompute mode computes them again. A pair without ids
  trains the same rows as then, and keeps its file."""
  tokenizer = setup["tokenizer"]
  now = preference.reference_settings(tokenizer, seq_len=SEQ, too_long="drop", system_prompt=None)
  ref = {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, **now, "ref_rows": 2}
  kwargs = dict(seq_len=SEQ, batch_size=1, seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1,
                reference_logps=True)
  text_only = _write_jsonl(tmp_path / "text.jsonl", [{"prompt": "q", "chosen": " 1", "rejected": " 2", **ref}])
  assert not preference.holds_old_rows(text_only)
  next(preference.build_preference_iterator(text_only, tokenizer, **kwargs))
  sampled = _write_jsonl(tmp_path / "sampled.jsonl", [dict(_sampled_pair(tokenizer), **ref)])
  assert preference.holds_old_rows(sampled)
  with pytest.raises(DataError, match=r"reference mismatch: .*rows=2 there \(.*sampled ids.*\), 3 here"):
    next(preference.build_preference_iterator(sampled, tokenizer, **kwargs))
  current = _write_jsonl(tmp_path / "current.jsonl", [{**_sampled_pair(tokenizer), **ref, "ref_rows": 3}])
  assert not preference.holds_old_rows(current)
  next(preference.build_preference_iterator(current, tokenizer, **kwargs))


def test_rollouts_write_the_sampled_ids_and_what_the_prompts_were_rendered_with(setup, tmp_path, monkeypatch):
  tokenizer = setup["tokenizer"]
  eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")

  def generate_text(params, config, tokenizer_, prompts, rng, sampling, **kwargs):
    return [{"text": t, "token_ids": _split_ids(tokenizer, t) + [eot], "finished": True, "num_tokens": 0}
            for t in [" 23", " 24"] * (len(prompts) // 2)]

  monkeypatch.setattr(rollouts, "generate_text", generate_text)
  problems = _write_jsonl(tmp_path / "p.jsonl", [{"problem": "What is 20 + 3?", "answer": "23"}])
  out = str(tmp_path / "pairs.jsonl")
  rollouts.rollout_pairs(None, CONFIG, tokenizer, problems, out, k=2, sampling=rollouts.SamplingConfig(),
                         system_prompt="Think step by step.", verify_fn=lambda c, g: [x == " 23" for x in c])
  with open(out) as f:
    pair, = [json.loads(line) for line in f]
  assert pair["chosen_token_ids"] == _split_ids(tokenizer, " 23") + [eot]
  assert pair["rejected_token_ids"] == _split_ids(tokenizer, " 24") + [eot]
  assert pair["tokenizer_id"] == preference.tokenizer_id(tokenizer)
  assert pair["sampled_system_prompt"] == "Think step by step."


def test_a_dpo_run_under_another_system_prompt_than_its_pairs_were_sampled_with_is_refused(setup, start_run,
                                                                                           caplog):
  """Pairs sampled under data.system_prompt='Think step by step.' trained without it: every row would lack the
  system turn its completions were sampled after. Said per record, or by the summary of a pair file that records
  none; another policy than the one sampled (off-policy DPO) is logged only."""
  tokenizer = setup["tokenizer"]
  system = "Think step by step."
  sampled = _write_jsonl(setup["tmp"] / "sampled_system.jsonl",
                         [_sampled_pair(tokenizer, sampled_system_prompt=system)])
  with pytest.raises(ValueError, match=r"sampled_system.jsonl: its pairs were sampled with data.system_prompt="
                     r"'Think step by step.', this run renders them with data.system_prompt=None.*set "
                     r"--gin_param='data.system_prompt=\"Think step by step.\"'"):
    _train_dpo(setup, start_run, _workdir(setup, "dpo_other_system"), sampled, 1)
  legacy = _write_jsonl(setup["tmp"] / "legacy_pairs.jsonl", [{"prompt": "q", "chosen": " 1", "rejected": " 2"}])
  with open(setup["tmp"] / "legacy_pairs.summary.json", "w") as f:
    json.dump({"pairs_file": legacy, "system_prompt": system, "init_from": "/elsewhere/sft"}, f)
  with pytest.raises(ValueError, match=r"legacy_pairs.jsonl: its pairs were sampled with data.system_prompt="
                     r"'Think step by step.' \(legacy_pairs.summary.json\), this run"):
    _train_dpo(setup, start_run, _workdir(setup, "dpo_other_system_legacy"), legacy, 1)
  with caplog.at_level(logging.INFO, logger="phi_jax"):
    dpo_reference.check_pairs_sampled_as([legacy, sampled], [], system, start_run, "train.init_from")
  assert f"sampled from /elsewhere/sft, not train.init_from={start_run!r}" in caplog.text
  # Each record is checked as it is read: a file that mixes prompts is refused at the first other one.
  mixed = _write_jsonl(setup["tmp"] / "mixed_system.jsonl", [
      _sampled_pair(tokenizer, sampled_system_prompt=system), _sampled_pair(tokenizer)])
  it = preference.build_preference_iterator(mixed, tokenizer, seq_len=SEQ, batch_size=2, seed=0, shuffle=False,
                                            system_prompt=system, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"mixed_system.jsonl:2: system prompt mismatch: sampled with "
                     r"data.system_prompt=None, read with 'Think step by step.'"):
    next(it)


def test_pairs_in_a_save_to_disk_directory_are_checked_as_one_source(tmp_path):
  """The sampling check read each .arrow file of a save_to_disk directory as a pair file of its own, which the
  reader refuses ("unknown file type"): a DPO run on such pairs failed at setup."""
  datasets = pytest.importorskip("datasets")
  rows = [{"prompt": f"What is {i} + 3?", "chosen": str(i + 3), "rejected": str(i + 4),
           "sampled_system_prompt": "Be brief."} for i in range(4)]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pairs"))
  dpo_reference.check_pairs_sampled_as([str(tmp_path / "pairs")], [], "Be brief.", None, "train.init_from")
  with pytest.raises(ValueError, match=r"pairs: its pairs were sampled with data.system_prompt='Be brief.'"):
    dpo_reference.check_pairs_sampled_as([str(tmp_path / "pairs")], [], None, None, "train.init_from")


def test_a_problem_whose_prompt_ends_with_an_assistant_message_is_refused(tmp_path):
  """Generation opens a new assistant turn after such a prompt, while a pair's prompt ending with the assistant's
  message is a prefix the completion continues: the trained row would not be the one sampled."""
  conversation = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "Let me think."},
                  {"role": "assistant", "content": "The answer is \\boxed{5}."}]
  path = _write_jsonl(tmp_path / "problems.jsonl", [{"messages": conversation[::2]}, {"messages": conversation}])
  with pytest.raises(DataError, match=r"problems.jsonl:2: prompt ends in an assistant turn: message 1, before the "
                     r"last assistant turn, is the assistant's"):
    rollouts.read_problems(path)
  first = _write_jsonl(tmp_path / "first.jsonl", [{"messages": conversation[::2]}])
  assert rollouts.read_problems(first) == [{"prompt": conversation[:1], "answer": "5"}]
