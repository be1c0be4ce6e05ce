"""GRPO stage: the small-model filters, temperature annealing, rollout batches, and a toy run whose reward rises."""

import dataclasses
import json
import logging
import os
import sys

import jax
import numpy as np
import pytest

import phi_jax
from phi_jax import sharding
from phi_jax.data import chat
from phi_jax.hf.tokenizer import build_tiny_tokenizer
from phi_jax.stages import grpo
from phi_jax.train import LoopConfig, OptimizerConfig, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # experiments/common.py, imported as `common`


def test_filters_drop_zero_variance_easy_and_ragged_groups_and_balance_negatives():
  rewards = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], np.float32)
  correct = rewards.astype(bool)
  lengths = np.array([[5, 5, 5, 5], [5, 6, 5, 6], [5, 5, 5, 5], [1, 30, 2, 40]])
  cfg = grpo.GRPOConfig(max_group_accuracy=0.5, max_length_cv=0.5, balance_negatives=True)
  keep = grpo.select_rows(rewards, correct, lengths, cfg, np.random.default_rng(0))
  assert not keep[0].any()  # zero variance
  assert keep[1].sum() == 2 and keep[1, 0]  # one positive + one random negative
  assert not keep[2].any()  # accuracy 0.75 > 0.5
  assert not keep[3].any()  # response lengths too uneven
  # 0/1 integers from a custom reward function mean the same as booleans (not a bitwise not).
  as_ints = grpo.select_rows(rewards, correct.astype(np.int64), lengths, cfg, np.random.default_rng(0))
  assert as_ints.tolist() == keep.tolist()
  plain = grpo.select_rows(rewards, correct, lengths, grpo.GRPOConfig(), np.random.default_rng(0))
  assert plain.tolist() == [[False] * 4] + [[True] * 4] * 3


@pytest.mark.parametrize("field,value", [
    ("aggregation", "dapo"), ("group_size", 1), ("num_passes", 0), ("prompts_per_step", 0), ("max_new_tokens", 0),
    ("epsilon_low", 1.0), ("epsilon_high", -0.1), ("beta", -0.01), ("entropy_coef", -1.0),
    ("max_group_accuracy", 50.0), ("max_length_cv", 0.0), ("anneal_fraction", 0.0), ("anneal_fraction", 2.0),
    ("temperature", -1.0), ("final_temperature", -0.6), ("final_temperature", 1e-9)])
def test_grpo_settings_out_of_range_are_an_error_before_any_rollout(field, value):
  """Each would train wrong or fail only after a whole rollout batch was sampled (max_group_accuracy=50, a
  percentage, switched the easy-prompt filter off)."""
  with pytest.raises(ValueError, match=f"grpo.{field}"):
    grpo.GRPOConfig(**{field: value})


def test_a_rollout_cut_at_the_length_limit_is_incorrect():
  """The right answer followed by a loop that never ends its turn is not a solution: no correctness reward, and
  not counted correct by the filters (max_group_accuracy, balance_negatives, the hard-prompt queue)."""
  score = grpo.verifier_rewards("correctness")
  completion = "<think>2 + 2 = 4</think> The answer is \\boxed{4}. " + "And again " * 5
  rewards, correct = score([completion] * 2, ["4", "4"], np.array([40, 40]), np.array([True, False]))
  assert rewards.tolist() == [1.0, 0.0] and correct.tolist() == [True, False]
  length_aware = grpo.verifier_rewards("length_aware")
  rewards, correct = length_aware([completion] * 2, ["4", "4"], np.array([40, 40]), np.array([True, False]))
  assert rewards[0] > 0 > rewards[1] and correct.tolist() == [True, False]


@pytest.mark.parametrize("aggregation", ["token_mean", "constant"])
def test_a_rollout_batch_whose_groups_were_all_dropped_changes_no_parameter(aggregation):
  """All rows dropped (zero mask, zero advantages): zero gradients, yet AdamW's momentum would repeat the previous
  update. Under the constant (Dr. GRPO) aggregation the weight counts every row, so the stage says what trained."""
  from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer
  from phi_jax.train.step import make_train_step

  config = phi_jax.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, max_position_embeddings=32)
  cfg = grpo.GRPOConfig(aggregation=aggregation, max_new_tokens=8, chunk_size=16)
  rng = np.random.default_rng(0)
  b, t = 2, 16
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[:, 4:12] = 1
  batch = {"tokens": rng.integers(0, 64, (b, t)).astype(np.int32), "segment_ids": np.ones((b, t), np.int32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": loss_mask,
           "advantages": np.array([1.0, -1.0], np.float32), "old_logprobs": -rng.random((b, t)).astype(np.float32)}
  dropped = dict(batch, loss_mask=np.zeros_like(loss_mask), advantages=np.zeros(b, np.float32))
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  opt_cfg = OptimizerConfig(learning_rate=1e-2, decay="constant")
  optimizer = make_optimizer(opt_cfg, 10)
  state = create_train_state(config, optimizer, mesh, jax.random.key(0))
  step = make_train_step(grpo.make_loss_fn(config, cfg), optimizer, learning_rate_schedule(opt_cfg, 10), mesh,
                         jax.tree.map(lambda x: x.sharding, state), batch)
  state, _ = step(state, batch, jax.random.key(1))
  before = jax.device_get(state.params)
  state, metrics = step(state, dropped, jax.random.key(1))
  assert float(metrics["grad_norm"]) == 0.0 and int(state.step) == 2
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "constant"])
def test_grpo_metrics_are_token_means_whatever_the_microbatching(aggregation):
  """kl, entropy, ratio and the clip fractions are token means over the batch: under a per-sequence or constant
  loss they used to be weighted by rows per microbatch, so a microbatch of dropped rows halved them."""
  from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer
  from phi_jax.train.step import make_train_step

  config = phi_jax.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, max_position_embeddings=32)
  cfg = grpo.GRPOConfig(aggregation=aggregation, beta=0.1, entropy_coef=0.01, max_new_tokens=8, chunk_size=16)
  rng = np.random.default_rng(0)
  b, t = 4, 16
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[0, 4:12], loss_mask[1, 4:9] = 1, 1  # rows 2 and 3 (the second microbatch of 2) are dropped
  batch = {"tokens": rng.integers(0, 64, (b, t)).astype(np.int32), "segment_ids": np.ones((b, t), np.int32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": loss_mask,
           "advantages": np.array([1.0, -1.0, 0.0, 0.0], np.float32)}
  batch["old_logprobs"], batch["ref_logprobs"] = (-rng.random((b, t)).astype(np.float32) * 5 for _ in range(2))
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  opt_cfg = OptimizerConfig(learning_rate=1e-3, decay="constant")
  optimizer = make_optimizer(opt_cfg, 10)
  metrics = []
  for microbatches in (1, 2):
    state = create_train_state(config, optimizer, mesh, jax.random.key(0))
    step = make_train_step(grpo.make_loss_fn(config, cfg), optimizer, learning_rate_schedule(opt_cfg, 10), mesh,
                           jax.tree.map(lambda x: x.sharding, state), batch, microbatches=microbatches)
    metrics.append(jax.device_get(step(state, batch, jax.random.key(1))[1]))
  for name in ("kl", "entropy", "ratio", "clip_fraction/low", "clip_fraction/high", "loss"):
    np.testing.assert_allclose(metrics[1][name], metrics[0][name], rtol=1e-5, err_msg=name)


def test_the_stage_weight_counts_what_each_aggregation_averages_over():
  """The step divides the summed loss by the weight: completion tokens for token_mean (8 + 5 = 13), sequences with
  any completion token for sequence_mean (2: rows 2 and 3 were dropped), every row for constant (4)."""
  config = phi_jax.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, max_position_embeddings=32)
  params = phi_jax.init_params(config, jax.random.key(0))
  b, t = 4, 16
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[0, 4:12], loss_mask[1, 4:9] = 1, 1
  batch = {"tokens": np.random.default_rng(0).integers(0, 64, (b, t)).astype(np.int32),
           "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           "loss_mask": loss_mask, "advantages": np.array([1.0, -1.0, 0.0, 0.0], np.float32),
           "old_logprobs": np.full((b, t), -1.0, np.float32)}
  for aggregation, weight in (("token_mean", 13), ("sequence_mean", 2), ("constant", 4)):
    cfg = grpo.GRPOConfig(aggregation=aggregation, max_new_tokens=8, chunk_size=16)
    _, aux = grpo.make_loss_fn(config, cfg)(params, batch, jax.random.key(1))
    assert float(aux["weight"]) == weight, aggregation


def test_temperature_anneals_linearly_over_first_half():
  cfg = grpo.GRPOConfig(temperature=1.0, final_temperature=0.6, anneal_fraction=0.5)
  assert [round(cfg.temperature_at(s, 100), 3) for s in (0, 25, 50, 75, 100)] == [1.0, 0.8, 0.6, 0.6, 0.6]
  assert grpo.GRPOConfig(temperature=0.9).temperature_at(70, 100) == 0.9
  # Annealing to greedy passes temperatures too small to sample at: those steps are greedy.
  to_greedy = grpo.GRPOConfig(temperature=1e-3, final_temperature=0.0, anneal_fraction=1.0)
  assert to_greedy.temperature_at(999_999, 1_000_000) == 0.0 < to_greedy.temperature_at(900_000, 1_000_000)


def _digit_share(tokenizer):
  def score(completions, golds, lengths, finished):
    del golds, finished
    rewards = []
    for text, n in zip(completions, lengths):
      ids = tokenizer(text, add_special_tokens=False)["input_ids"]
      rewards.append(sum(tokenizer.decode([i]).strip().isdigit() for i in ids) / max(len(ids), 1))
    rewards = np.asarray(rewards, np.float32)
    return rewards, rewards > 0.5

  return score


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("grpo")
  tokenizer = build_tiny_tokenizer(tmp / "tok", chat_format="phi-4")
  config = phi_jax.PhiConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, max_position_embeddings=128)
  prompts = [{"problem": f"Write digits {i}", "answer": "0"} for i in range(16)]
  return tmp, tokenizer, config, prompts


def test_rollout_batch_layout(toy):
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=8)
  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=4)
  params = phi_jax.init_params(config, jax.random.key(0))
  batch = source.next_batch(params, 0)
  assert batch["tokens"].shape == (8, 40) and batch["advantages"].shape == (8,)
  for r in range(8):
    targets = np.flatnonzero(batch["loss_mask"][r])
    if targets.size:  # completion tokens are targets; their old log-probs sit one position earlier
      assert np.all(batch["old_logprobs"][r, targets - 1] < 0) and np.all(batch["segment_ids"][r, targets] == 1)
    np.testing.assert_allclose(batch["advantages"].reshape(2, 4).mean(1), 0, atol=1e-5)
  assert source.next_batch(params, 1) is not batch  # num_passes == 1: a fresh rollout every step
  assert source.get_state() == {"position": 4, "rollouts": 2, "passes_done": 0, "hard_queue": [],
                                "same_on_every_process": True}  # every process samples the whole batch


def test_rollouts_sampled_in_several_generate_calls(toy, monkeypatch):
  """grpo.rollout_batch_size splits the rollout batch's rows over generate calls (the KV cache of one call is what
  must fit): each row draws with its own key, so one call of all rows, one call of 8 and two calls of 4 sample the
  same batch."""
  _, tokenizer, config, prompts = toy
  calls = []
  real_generate = grpo.generate
  monkeypatch.setattr(grpo, "generate", lambda *a, **k: calls.append(a[2].shape[0]) or real_generate(*a, **k))
  params = phi_jax.init_params(config, jax.random.key(0))

  def batch(rollout_batch_size):
    cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=8, temperature=1.0,
                          rollout_batch_size=rollout_batch_size)
    source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=4)
    return source.next_batch(params, 0)

  whole, one_call, split = batch(None), batch(8), batch(4)
  assert calls == [8, 8, 4, 4]
  for name in whole:
    np.testing.assert_array_equal(one_call[name], whole[name])
    # The same tokens; the old log-probs within float32 rounding (a batch of 4 rows runs other matmul shapes).
    np.testing.assert_allclose(split[name], whole[name], rtol=1e-6, atol=1e-6)
  group = whole["tokens"][:4]  # the four samples of one prompt: each row's own key, not one key repeated
  assert len({row.tobytes() for row in group}) > 1
  with pytest.raises(ValueError, match=r"grpo.rollout_batch_size=3 must divide the 8 rows of a rollout batch"):
    grpo.GRPOConfig(prompts_per_step=2, group_size=4, rollout_batch_size=3)


def test_prompts_longer_than_the_prompt_budget_are_counted_and_named(toy):
  _, tokenizer, config, prompts = toy
  long = prompts[:3] + [{"problem": "Write digits " * 8, "answer": "0"}, {"problem": "Write " * 20, "answer": "0"}]
  lengths = [len(chat.render_prompt(tokenizer, p["problem"])) for p in long]
  budget = max(lengths[:3])
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=2, max_prompt_tokens=budget, max_new_tokens=4)
  with pytest.raises(ValueError, match=rf"2 of 5 prompts are longer than grpo.max_prompt_tokens={budget} once "
                                       rf"rendered .* the first is prompt 3 \({lengths[3]} tokens: 'Write digits .*"
                                       rf"the longest has {max(lengths)}. Raise grpo.max_prompt_tokens to"):
    grpo.GRPORollouts(long, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=1)


def test_resume_between_passes_samples_the_same_prompts_and_trains_the_remaining_passes(toy):
  """num_passes=3 and a checkpoint after the first pass of the second batch: the resumed source samples that
  batch's prompts again with the same random stream (the same tokens from the same params), trains its two
  remaining passes, then goes on with the uninterrupted run's next prompts."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=2, max_prompt_tokens=32, max_new_tokens=4, num_passes=3,
                        temperature=1.0, final_temperature=0.6)  # annealed: the batch's first step sets it
  params = phi_jax.init_params(config, jax.random.key(0))

  def source():
    return grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=9)

  full = source()
  batches = [full.next_batch(params, step) for step in range(9)]
  interrupted = source()
  for step in range(4):  # batch 1 = steps 0-2, batch 2 = steps 3-5: saved after its first pass
    interrupted.next_batch(params, step)
  state = interrupted.get_state()
  assert state == {"position": 2, "rollouts": 1, "passes_done": 1, "hard_queue": [], "hard_queue_after": [],
                   "same_on_every_process": True}
  resumed = source()
  resumed.set_state(json.loads(json.dumps(state)))
  again = [resumed.next_batch(params, step) for step in range(4, 9)]
  np.testing.assert_array_equal(again[0]["tokens"], batches[4]["tokens"])
  assert resumed.step_metrics(5)["temperature"] == pytest.approx(cfg.temperature_at(3, 9))  # logged with step 5
  assert again[1] is again[0] and again[2] is not again[0]  # the two remaining passes, then the next rollout
  for got, want in zip(again[2:], batches[6:]):
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
  assert resumed.get_state() == full.get_state()


def _prompt_recording_source(toy, prompts, cfg, is_correct, seen, num_steps):
  """A GRPO source whose reward is 1 where `is_correct(texts, golds)` says so; it appends each batch's prompt
  numbers (their answers) to `seen`."""
  _, tokenizer, config, _ = toy

  def reward(texts, golds, lengths, finished):
    seen.append([int(g) for g in golds[::cfg.group_size]])
    correct = np.asarray(is_correct(texts, golds), bool)
    return correct.astype(np.float32), correct

  return grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=reward, num_steps=num_steps)


def test_hard_prompts_are_sampled_again_and_the_queue_survives_a_resume(toy, caplog):
  """Prompts with an even answer are never solved (hard), odd ones always: with hard_prompt_fraction=0.5, half of
  each batch's 4 prompts are the oldest queued hard ones, the rest come from the shuffled order; a source restored
  from get_state() picks the same prompts as the uninterrupted one."""
  config = toy[2]
  prompts = [{"problem": f"Write digits {i}", "answer": str(i)} for i in range(16)]
  cfg = grpo.GRPOConfig(prompts_per_step=4, group_size=2, max_prompt_tokens=32, max_new_tokens=2,
                        hard_prompt_fraction=0.5, hard_prompt_accuracy=0.25)
  params = phi_jax.init_params(config, jax.random.key(0))

  def source(seen):
    odd_is_solved = lambda texts, golds: [int(g) % 2 == 1 for g in golds]
    return _prompt_recording_source(toy, prompts, cfg, odd_is_solved, seen, num_steps=6)

  full_seen = []
  full = source(full_seen)
  for step in range(6):
    full.next_batch(params, step)
  order = np.concatenate([np.random.default_rng([0, epoch]).permutation(16) for epoch in range(2)]).tolist()
  queue, fresh, expected, replays = [], iter(order), [], []
  for _ in range(6):  # the same rule written out: up to 2 queued hard prompts first, then fresh ones
    batch = queue[:2]
    queue = queue[2:]
    replays.append(len(batch))
    batch += [next(fresh) for _ in range(4 - len(batch))]
    queue += [i for i in batch if i % 2 == 0 and i not in queue]
    expected.append(batch)
  assert full_seen == expected
  assert replays[1:] == [2] * 5  # every batch after the first starts with two hard prompts seen before
  assert [full.step_metrics(step + 1)["hard_prompts_replayed"] for step in range(6)] == replays

  part_seen = []
  part = source(part_seen)
  for step in range(3):
    part.next_batch(params, step)
  state = json.loads(json.dumps(part.get_state()))
  assert state["hard_queue"] == [i for i in state["hard_queue"] if i % 2 == 0] and state["hard_queue"]
  resumed_seen = []
  resumed = source(resumed_seen)
  resumed.set_state(state)
  for step in range(3, 6):
    resumed.next_batch(params, step)
  assert part_seen + resumed_seen == full_seen
  with pytest.raises(ValueError, match=r"hard_prompt_fraction=1.0"):
    grpo.GRPOConfig(hard_prompt_fraction=1.0)
  # A share below one prompt replays none: said, not silent.
  with caplog.at_level(logging.WARNING, logger="phi_jax"):
    grpo.GRPOConfig(prompts_per_step=4, hard_prompt_fraction=0.25)
    assert "less than one prompt" not in caplog.text
    grpo.GRPOConfig(prompts_per_step=4, hard_prompt_fraction=0.2)
  assert "hard_prompt_fraction=0.2 of prompts_per_step=4 is less than one prompt" in caplog.text


@pytest.mark.parametrize("setting,message", [
    (dict(top_p=1.5), r"grpo.top_k=0, grpo.top_p=1.5\): SamplingConfig.top_p must be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in"), (dict(top_k=-3), r"top_k must be >= 0"),
    (dict(top_k=2.5), r"top_k"), (dict(temperature=float("inf")), r"grpo.temperature=inf must be finite"),
    (dict(final_temperature=float("nan")), r"grpo.final_temperature=nan")])
def test_bad_sampling_settings_are_refused_with_the_config(setting, message):
  with pytest.raises(ValueError, match=message):
    grpo.GRPOConfig(**setting)


def test_hard_queue_is_unique_and_a_resume_between_passes_keeps_it(toy):
  """Two passes per batch, rewards from the text: a checkpoint after the first pass of batch 2 is resumed and that
  batch regenerated with other params (as after a restore), so its rewards differ; the queue is set to what it was
  after the batch, and the next batches draw the uninterrupted run's prompts. The queue never holds a prompt twice."""
  import zlib
  _, tokenizer, config, _ = toy
  prompts = [{"problem": f"Write digits {i}", "answer": str(i)} for i in range(8)]
  cfg = grpo.GRPOConfig(prompts_per_step=4, group_size=4, max_prompt_tokens=32, max_new_tokens=3, num_passes=2,
                        hard_prompt_fraction=0.5, hard_prompt_accuracy=0.25)
  params = phi_jax.init_params(config, jax.random.key(0))
  # Other weights, scaled up so their logits, not the sampling noise, decide the tokens.
  other = jax.tree.map(lambda x: 30 * x, phi_jax.init_params(config, jax.random.key(1)))

  def source(seen):
    text_hash = lambda texts, golds: [zlib.crc32(t.encode()) % 2 == 0 for t in texts]
    return _prompt_recording_source(toy, prompts, cfg, text_hash, seen, num_steps=12)

  full_seen = []
  full = source(full_seen)
  for step in range(12):
    full.next_batch(params, step)
    assert len(set(full.hard_queue)) == len(full.hard_queue)
  part = source([])
  for step in range(3):  # batch 2 = steps 2-3: saved after its first pass
    part.next_batch(params, step)
  state = json.loads(json.dumps(part.get_state()))
  assert state["passes_done"] == 1

  def resume(state):
    seen = []
    resumed = source(seen)
    resumed.set_state(state)
    resumed.next_batch(other, 3)  # the regenerated batch, from other params
    for step in range(4, 12):
      resumed.next_batch(params, step)
    return seen

  assert resume(state)[1:] == full_seen[2:]
  # Without the saved queue the regenerated batch's rewards reorder it: this setup does exercise that case.
  assert resume({k: v for k, v in state.items() if k != "hard_queue_after"})[1:] != full_seen[2:]

  def never_solved(texts, golds, lengths, finished):
    return np.zeros(len(texts), np.float32), np.zeros(len(texts), bool)

  unsolved = grpo.GRPORollouts(prompts, tokenizer, config, dataclasses.replace(cfg, num_passes=1),
                               reward_batch_fn=never_solved, num_steps=8)
  for step in range(8):  # every prompt is hard; replayed ones also come up fresh, in the same batch at times
    unsolved.next_batch(params, step)
    assert len(set(unsolved.hard_queue)) == len(unsolved.hard_queue)


def test_rollout_texts_leave_out_the_stop_token(toy):
  """The rewards read the text without its end-of-turn token (as `generate_text` gives it); training keeps it."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=1, group_size=2, max_prompt_tokens=32, max_new_tokens=4)
  seen = {}

  def record(texts, golds, lengths, finished):
    seen.update(texts=list(texts), lengths=np.asarray(lengths), finished=np.asarray(finished))
    return np.arange(len(texts), dtype=np.float32), np.zeros(len(texts), bool)

  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=record, num_steps=1)
  source.stop_ids = tuple(range(config.vocab_size))  # every token stops: each rollout is one stop token
  batch = source.next_batch(phi_jax.init_params(config, jax.random.key(0)), 0)
  assert seen["finished"].all() and seen["lengths"].tolist() == [1, 1]
  assert seen["texts"] == ["", ""]
  assert batch["loss_mask"].sum(axis=1).tolist() == [1, 1]  # the stop token itself is still a target


@pytest.mark.parametrize("tempered,longrope", [(True, False), (False, False), (True, True)])
def test_old_logps_and_the_loss_score_the_distribution_the_rollouts_were_sampled_from(toy, tempered, longrope):
  """Sampled at temperature 0.7 (top-p 0.9), each completion token's "old" log-prob (one position earlier) is the
  log_softmax of logits / 0.7 of a full forward pass over the rollout, unfiltered (the untempered log_softmax with
  tempered_logprobs=False); the loss scores the policy the same way, so the first pass's ratio is 1. With LongRoPE
  the rows pass original_max_position_embeddings while sampling: the tokens drawn before that were sampled under the
  short factors, and the loss scores the whole row with the long ones, as their old log-probs must."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=1, group_size=2, max_prompt_tokens=32, max_new_tokens=8 if longrope else 4,
                        temperature=0.7, top_p=0.9, tempered_logprobs=tempered, beta=0.1)
  if longrope:
    longest_prompt = max(len(chat.render_prompt(tokenizer, p["problem"])) for p in prompts)
    pairs = config.rotary_dim // 2
    config = config.replace(rope_scaling_type="longrope", original_max_position_embeddings=longest_prompt + 2,
                            rope_short_factor=(1.0,) * pairs, rope_long_factor=tuple(np.linspace(1.0, 48.0, pairs)))

  def ranked(texts, golds, lengths, finished):  # unequal rewards: no group is dropped
    return np.arange(len(texts), dtype=np.float32), np.zeros(len(texts), bool)

  params = phi_jax.init_params(config, jax.random.key(0))
  if longrope:  # weights of a less flat model, so that the two factor sets score tokens differently
    params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
  # With LongRoPE, the reference and the old log-probs are scored one row at a time (the train step's microbatches).
  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=ranked, num_steps=1, ref_params=params,
                             score_microbatches=2 if longrope else 1)
  scored_rows, score = [], source._ref_logps_fn
  source._ref_logps_fn = lambda p, part: scored_rows.append(len(part["tokens"])) or score(p, part)
  batch = source.next_batch(params, 0)
  assert scored_rows == ([1, 1, 1, 1] if longrope else [2])  # old log-probs and reference, or the reference alone
  np.testing.assert_array_equal(batch["temperature"], np.float32([0.7 if tempered else 1.0] * 2))
  logits = np.asarray(phi_jax.forward(params, batch["tokens"], config, segment_ids=batch["segment_ids"]), np.float64)
  scaled = logits / (0.7 if tempered else 1.0)
  shifted = scaled - scaled.max(-1, keepdims=True)
  logps = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  for r in range(2):
    targets = np.flatnonzero(batch["loss_mask"][r])
    assert targets.size
    assert not longrope or targets[-1] + 1 > config.original_max_positions  # the row passed the switch
    expected = logps[r, targets - 1, batch["tokens"][r, targets]]
    np.testing.assert_allclose(batch["old_logprobs"][r, targets - 1], expected, atol=1e-4)
    np.testing.assert_allclose(batch["ref_logprobs"][r, targets - 1], expected, atol=1e-4)  # the reference: the same
  _, aux = grpo.make_loss_fn(config, cfg)(params, batch, None)
  mean = {k: float(v) / float(aux["metric_weights"][k]) for k, v in aux["metrics"].items()}
  assert mean["ratio"] == pytest.approx(1.0, abs=1e-4)  # the policy scored as the rollouts were
  assert mean["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference, scored alike


def test_scoring_blocks_split_over_the_mesh(toy, monkeypatch):
  """The scoring passes' row blocks (up to the train step's microbatches) are whole multiples of the mesh's
  data x fsdp: 8 rows over 4 devices with 4 microbatches score as 2 blocks of 4, the same log-probs as one block."""
  from phi_jax import sharding
  _, tokenizer, config, prompts = toy
  mesh = sharding.make_mesh({"data": 4}, devices=jax.devices()[:4])
  params = phi_jax.init_params(config, jax.random.key(0))
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=8)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (8, 40)).astype(np.int32)
  batch = {"tokens": tokens, "positions": np.tile(np.arange(40, dtype=np.int32), (8, 1)),
           "segment_ids": np.ones_like(tokens), "loss_mask": np.ones_like(tokens),
           "temperature": np.ones(8, np.float32)}
  scored = {}
  for microbatches in (1, 4):
    source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=1,
                               mesh=mesh, score_microbatches=microbatches)
    rows, score = [], source._ref_logps_fn
    source._ref_logps_fn = lambda p, part, rows=rows, score=score: rows.append(len(part["tokens"])) or score(p, part)
    scored[microbatches] = (source._scored_logps(params, batch), rows)
  assert scored[1][1] == [8] and scored[4][1] == [4, 4]
  np.testing.assert_allclose(scored[4][0], scored[1][0], rtol=1e-5, atol=1e-6)
  # The pass is traced under the mesh, as the train step is (the splash backend splits itself over it).
  from phi_jax.model import attention
  meshes, reference = [], attention._BACKENDS["xla"]
  monkeypatch.setitem(attention._BACKENDS, "xla",
                      lambda *a, **k: meshes.append(jax.sharding.get_abstract_mesh().shape) or reference(*a, **k))
  grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=1,
                    mesh=mesh)._scored_logps(params, batch)
  assert meshes and all(shape.get("data") == 4 for shape in meshes)


def test_greedy_rollouts_are_scored_untempered(toy):
  """temperature 0 (greedy, allowed by GRPOConfig) must not divide the logits by 0: the rows are scored at 1, as
  the sampler scores greedy rows, and the loss and its gradients stay finite."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=1, group_size=2, max_prompt_tokens=32, max_new_tokens=4, temperature=1.0,
                        final_temperature=0.0, beta=0.1)
  params = phi_jax.init_params(config, jax.random.key(0))
  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=2,
                             ref_params=params)
  batch = source.next_batch(params, 2)  # past the anneal: greedy
  np.testing.assert_array_equal(batch["temperature"], np.float32([1.0, 1.0]))
  assert np.isfinite(batch["ref_logprobs"]).all()
  loss, grads = jax.value_and_grad(lambda p: grpo.make_loss_fn(config, cfg)(p, batch, None)[0])(params)
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_a_batch_whose_groups_are_all_dropped_is_reported(toy, caplog):
  """Equal rewards in every group: the zero-variance filter drops them all, the step trains nothing, and the log
  says so (metrics.jsonl alone showed loss 0 and groups_kept 0)."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=1, group_size=2, max_prompt_tokens=32, max_new_tokens=4)

  def constant(texts, golds, lengths, finished):
    return np.zeros(len(texts), np.float32), np.zeros(len(texts), bool)

  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=constant, num_steps=1)
  with caplog.at_level("WARNING", logger="phi_jax"):
    batch = source.next_batch(phi_jax.init_params(config, jax.random.key(0)), 0)
  assert batch["loss_mask"].sum() == 0
  assert "step 1: the filters dropped every group of this rollout batch" in caplog.text


def test_reward_functions_may_return_lists_and_reward_std_is_the_within_group_spread(toy):
  """A TRL-style reward function returns lists: it crashed after the whole rollout was sampled. reward_std is TRL's:
  the mean of each group's std, 0 when no group carries signal (the batch-wide std read 0.5 here)."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=4)
  golds_of_batch = []

  def by_group(texts, golds, lengths, finished):  # one group all correct, the other all wrong
    golds_of_batch.append(list(golds))
    first = golds[0]
    return [float(g == first) for g in golds], [g == first for g in golds]

  two_answers = [dict(p, answer=str(i % 2)) for i, p in enumerate(prompts)]
  source = grpo.GRPORollouts(two_answers, tokenizer, config, cfg, reward_batch_fn=by_group, num_steps=2)
  params = phi_jax.init_params(config, jax.random.key(0))
  batch = source.next_batch(params, 0)
  assert len(set(golds_of_batch[0])) == 2 and not batch["advantages"].any()
  metrics = source.step_metrics(1)
  assert metrics["reward_std"] == 0.0 and metrics["reward_std_batch"] == pytest.approx(0.5)

  def one_short(texts, golds, lengths, finished):
    return [0.0] * (len(texts) - 1), [False] * (len(texts) - 1)

  source = grpo.GRPORollouts(two_answers, tokenizer, config, cfg, reward_batch_fn=one_short, num_steps=2)
  with pytest.raises(ValueError, match=r"reward_batch_fn returned rewards of shape \(7,\) .* \(8,\)"):
    source.next_batch(params, 0)

  def one_none(texts, golds, lengths, finished):
    return [0.0, None] + [1.0] * (len(texts) - 2), [False] * len(texts)

  source = grpo.GRPORollouts(two_answers, tokenizer, config, cfg, reward_batch_fn=one_none, num_steps=2)
  with pytest.raises(ValueError, match=r"1 reward\(s\) that are not finite numbers \(None, NaN or infinite\), the "
                     r"first for response 1"):
    source.next_batch(params, 0)


def test_toy_grpo_run_raises_mean_reward(toy, tmp_path):
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=4, group_size=8, max_prompt_tokens=32, max_new_tokens=8, num_passes=2,
                        epsilon_low=0.2, epsilon_high=0.28)
  num_steps = 32  # the reward takes off after ~10 rollout batches, from a start near 0.05
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer),
                             num_steps=num_steps, seed=0, mesh=mesh)
  loop.run(workdir=str(tmp_path), model_config=config,
           optimizer_config=OptimizerConfig(learning_rate=1e-2, decay="constant", max_grad_norm=1.0),
           loss_fn=grpo.make_loss_fn(config, cfg), train_data=source,
           loop=LoopConfig(num_steps=num_steps, checkpoint_every=100, async_checkpoints=False, log_every=4),
           mesh=mesh)
  with open(tmp_path / "metrics.jsonl") as f:
    rewards = [r["reward_mean"] for r in map(json.loads, f) if "reward_mean" in r]
  # Every step's record is written with its rollout batch's metrics, whatever log_every says: each batch's twice.
  assert len(rewards) == num_steps and rewards[::2] == rewards[1::2]
  rewards = rewards[::2]
  start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
  print(f"toy GRPO: mean reward {start:.3f} -> {end:.3f} over {num_steps} steps")
  assert end > start + 0.25, (start, end, rewards)


def test_every_step_of_a_rollout_batch_logs_that_batch_s_rewards(toy, tmp_path):
  """grpo.num_passes=2: the second pass over a batch trains on the same rollouts, so its record carries their reward
  figures too (it had the loss alone, and a reader of r["reward_mean"] on every GRPO record got a KeyError)."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=4, num_passes=2,
                        drop_zero_variance_groups=False)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer), num_steps=4,
                             seed=0, mesh=mesh)
  loop.run(workdir=str(tmp_path), model_config=config, optimizer_config=OptimizerConfig(learning_rate=1e-2),
           loss_fn=grpo.make_loss_fn(config, cfg), train_data=source,
           loop=LoopConfig(num_steps=4, checkpoint_every=100, async_checkpoints=False, log_every=4), mesh=mesh)
  with open(tmp_path / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert sorted(records) == [1, 2, 3, 4] and source.rollouts == 2
  rollout_keys = ("reward_mean", "accuracy", "groups_kept", "responses_kept", "temperature", "response_length_mean")
  batch = lambda step: {k: records[step][k] for k in rollout_keys}
  assert batch(1) == batch(2) and batch(3) == batch(4)
  assert records[1]["loss"] != records[2]["loss"] or records[1]["grad_norm"] != records[2]["grad_norm"]


def test_a_run_resumed_at_a_rollout_batch_boundary_equals_the_uninterrupted_run(toy, tmp_path):
  """GRPO through `loop.run`: 4 steps (2 rollout batches x 2 passes) in one go, and the same run stopped after
  its first batch (checkpoint at step 2) and resumed with fresh objects. The second batch is sampled from the
  same params with the same random stream, so every step's metrics (all but the throughput) and the final params
  are bit-identical."""
  _, tokenizer, config, prompts = toy
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=8, num_passes=2)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])

  def run(workdir, num_steps):
    source = grpo.GRPORollouts(prompts, tokenizer, config, cfg, reward_batch_fn=_digit_share(tokenizer),
                               num_steps=4, seed=0, mesh=mesh)
    state = loop.run(workdir=str(workdir), model_config=config,
                     optimizer_config=OptimizerConfig(learning_rate=1e-2, decay="constant", max_grad_norm=1.0),
                     loss_fn=grpo.make_loss_fn(config, cfg), train_data=source,
                     loop=LoopConfig(num_steps=num_steps, checkpoint_every=2, async_checkpoints=False), mesh=mesh)
    with open(workdir / "metrics.jsonl") as f:
      records = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    return jax.device_get(state.params), records

  full_params, full_records = run(tmp_path / "full", 4)
  halfway_params, _ = run(tmp_path / "resumed", 2)
  resumed_params, resumed_records = run(tmp_path / "resumed", 4)
  assert sorted(resumed_records) == sorted(full_records) == [1, 2, 3, 4]
  untimed = lambda record: {key: value for key, value in record.items() if key != "tokens_per_sec"}
  for step, record in full_records.items():  # loss, grad norm, clip fractions; rewards on each batch's first step
    assert untimed(resumed_records[step]) == untimed(record), step
  assert full_records[3]["groups_kept"] > 0  # the second batch trained
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(halfway_params)))
  for got, want in zip(jax.tree.leaves(resumed_params), jax.tree.leaves(full_params)):
    np.testing.assert_array_equal(got, want)


def test_every_name_of_reward_weights_is_a_term_of_its_own(monkeypatch):
  """Two names of one function, two equal reward objects and an unhashable callable each count once per name (the
  weights were a dict keyed by the functions: merged terms, or a TypeError)."""
  import common  # pylint: disable=import-outside-toplevel
  from phi_jax.rewards import registry

  @dataclasses.dataclass  # not frozen: unhashable
  class Bonus:
    value: float

    def __call__(self, completion, gold, *, length, finished, correct=None):
      return self.value

  monkeypatch.setitem(registry.REWARDS, "bonus", Bonus(1.0))
  monkeypatch.setitem(registry.REWARDS, "bonus_again", registry.REWARDS["bonus"])
  monkeypatch.setitem(registry.REWARDS, "other_bonus", Bonus(1.0))
  reward = common.grpo_reward({"weights": {"bonus": 1.0, "bonus_again": 0.5, "other_bonus": 0.25},
                               "length_aware_max_tokens": None}, grpo.GRPOConfig())
  assert reward("x", "1", length=3, finished=True, correct=True) == pytest.approx(1.75)


@pytest.mark.parametrize("returned,shown", [(None, "None"), (float("nan"), "nan"), ("1.0", "'1.0'")])
def test_a_reward_of_reward_weights_that_returns_no_number_is_named(monkeypatch, returned, shown):
  """A registered reward returning None (TRL's "does not apply"), NaN or a string is refused by its name in
  reward.weights, saying what to return instead, not with a TypeError from the weighted sum (or a NaN reward)."""
  import common  # pylint: disable=import-outside-toplevel
  from phi_jax.rewards import registry

  def picky(completion, gold, *, length, finished, correct=None):
    return returned if completion == "other" else 1.0

  monkeypatch.setitem(registry.REWARDS, "picky", picky)
  reward = common.grpo_reward({"weights": {"correctness": 1.0, "picky": 0.5}, "length_aware_max_tokens": None},
                              grpo.GRPOConfig())
  assert reward("x", "1", length=3, finished=True, correct=True) == pytest.approx(1.5)
  with pytest.raises(ValueError, match=rf"reward 'picky' \(reward.weights\) returned {shown} .*a finite number for "
                     r"every completion.*return 0.0"):
    reward("other", "1", length=3, finished=True, correct=True)
  with pytest.raises(ValueError, match=r"reward 'picky' .*returned"):  # named when combined outside a run too
    registry.combine({"correctness": 1.0, "picky": 1.0})("other", "1", length=3, finished=True, correct=True)


def _wrong_answer_reward(reward, length):
  """The reward of a well-formed, finished, wrong answer of `length` tokens with no repeated 5-grams."""
  return reward("<think>3 + 4 = 8</think> The answer is \\boxed{8}.", "7", length=length, finished=True,
                correct=False)


def test_the_length_aware_reward_registered_by_a_module_is_the_one_trained(monkeypatch):
  """A module that registers its own length-aware constants gets them (scaled to the run's budget), not the
  published ones: wrong answers reach the -0.5 floor at its l_neg_control of 1000 tokens, not at 3702."""
  import common  # pylint: disable=import-outside-toplevel
  from phi_jax.rewards import registry
  from phi_jax.rewards.length_aware import LengthAwareRewardConfig

  published = common.grpo_reward({"weights": {"length_aware": 1.0}, "length_aware_max_tokens": None},
                                 grpo.GRPOConfig(max_new_tokens=31744))
  monkeypatch.setitem(registry.REWARDS, "length_aware",
                      registry.LengthAwareReward(LengthAwareRewardConfig(l_neg_control=1000, w_rep=0.0)))
  own = common.grpo_reward({"weights": {"length_aware": 1.0}, "length_aware_max_tokens": None},
                           grpo.GRPOConfig(max_new_tokens=31744))
  floor = 8 / 13 * -0.5
  assert _wrong_answer_reward(own, 1000) == pytest.approx(floor)
  assert _wrong_answer_reward(published, 1000) < floor - 0.05
  # Scaled with the run's budget like the published constants: at half the length, half the control length.
  halved = common.grpo_reward({"weights": {"length_aware": 1.0}, "length_aware_max_tokens": None},
                              grpo.GRPOConfig(max_new_tokens=31744 // 2))
  assert _wrong_answer_reward(halved, 500) == pytest.approx(floor)
  assert _wrong_answer_reward(halved, 250) < floor - 0.05


def test_length_aware_max_tokens_scales_a_length_aware_reward_of_any_name(monkeypatch):
  """A LengthAwareReward registered under a name of its own is scaled like "length_aware"; the budget binding that
  scales it was refused as unused."""
  import common  # pylint: disable=import-outside-toplevel
  from phi_jax.rewards import registry

  monkeypatch.setitem(registry.REWARDS, "la_short", registry.LengthAwareReward())
  settings = common.reward_settings(weights={"la_short": 1.0}, length_aware_max_tokens=64)
  reward = common.grpo_reward(settings, grpo.GRPOConfig(max_new_tokens=128))
  assert reward.terms[0][0].config.l_max == 64
  with pytest.raises(ValueError, match=r"length_aware_max_tokens=64 scales the 'length_aware' reward"):
    common.reward_settings(weights={"correctness": 1.0}, length_aware_max_tokens=64)


def test_reward_settings_change_a_reward_s_constants():
  """reward.settings = {"length_aware": {...}} sets the constants PHI4_FACTS asks to keep as settings (at the scale
  of l_max, scaled to the run's budget), and {"repetition": {...}} the repetition penalty's n-gram size."""
  import common  # pylint: disable=import-outside-toplevel

  settings = common.reward_settings(weights={"length_aware": 1.0, "repetition": 0.5},
                                    settings={"length_aware": {"l_neg_control": 1000, "w_acc": 1.0, "w_rep": 0.0},
                                              "repetition": {"n": 2, "max_count": 1.0}})
  reward = common.grpo_reward(settings, grpo.GRPOConfig(max_new_tokens=31744))
  assert _wrong_answer_reward(reward, 1000) == pytest.approx(-0.5)  # w_acc 1, the floor at 1000 tokens
  assert _wrong_answer_reward(reward, 0) == pytest.approx(-1.0)
  # The repetition term with bigrams: "a b" three times repeats; with the default 5-grams it would not.
  repeated = "<think>a b a b a b</think> \\boxed{8}"
  default = common.grpo_reward(common.reward_settings(weights={"repetition": 1.0}), grpo.GRPOConfig())
  assert default(repeated, "7", length=10, finished=True, correct=False) == 0.0
  assert reward(repeated, "7", length=10, finished=True, correct=False) < -1.0


@pytest.mark.parametrize("settings,message", [
    ({"length_aware": {"l_neg": 1000}}, r"reward.settings\['length_aware'\] sets 'l_neg', not a constant .*"
                                        r"l_neg_control"),
    ({"length_aware": {"l_neg_control": 1000.5}}, r"\['l_neg_control'\]=1000.5 must be a whole number"),
    ({"length_aware": {"w_rep": "0"}}, r"\['w_rep'\]='0' must be a finite number"),
    ({"length_aware": {"w_rep": float("nan")}}, r"\['w_rep'\]=nan must be a finite number"),
    ({"length_aware": {"l_pos_control": 40000}}, r"need 0 <= l_pos_control < l_max"),
    ({"length_aware": 1000}, r"reward.settings\['length_aware'\]=1000 must be a dict"),
    ({"correctness": {"x": 1}}, r"sets 'x', not a constant of the 'correctness' reward: it has no constants"),
    ({"repetition": {"n": 2}}, r"reward.settings names 'repetition', which reward.weights=.* does not use"),
    ([1], r"reward.settings=\[1\] must be a dict")])
def test_reward_settings_that_cannot_apply_are_refused(settings, message):
  import common  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=message):
    common.reward_settings(weights={"length_aware": 1.0, "correctness": 1.0}, settings=settings)
