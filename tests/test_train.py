"""Training-core invariances: sharded == single device, microbatched == full batch, optimizer details, meshes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import phi_jax
from phi_jax import sharding
from phi_jax.model import presets
from phi_jax.stages import next_token
from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer
from phi_jax.train.loop import global_batch, host_scalar, initial_params_key
from phi_jax.train.optimizer import clip_by_global_norm, weight_decay_mask
from phi_jax.train.state import param_shardings, state_shardings
from phi_jax.train.step import check_rows_per_process, make_train_step

CONFIG = presets["tiny"]
# eps well above float32 gradient noise: with eps -> 0 Adam turns a 1e-9 gradient into a full-size step, and the
# sign of such a gradient depends on the summation order, which legitimately differs between meshes.
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=1, weight_decay=0.1, max_grad_norm=1.0, eps=1e-4)
NUM_STEPS = 3


def packed_batches(num, batch=8, seq=32, seed=0):
  """Random packed rows: 2-3 documents per row, padding at the end, loss on a random 80% of tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    tokens = rng.integers(0, CONFIG.vocab_size, (batch, seq)).astype(np.int32)
    segment_ids, positions = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
    for row in range(batch):
      cuts = np.sort(rng.choice(np.arange(4, seq - 4), 2, replace=False))
      bounds = [0, cuts[0], cuts[1], seq - rng.integers(0, 4)]
      for seg in range(3):
        segment_ids[row, bounds[seg]:bounds[seg + 1]] = seg + 1
        positions[row, bounds[seg]:bounds[seg + 1]] = np.arange(bounds[seg + 1] - bounds[seg])
    loss_mask = ((rng.random((batch, seq)) < 0.8) & (segment_ids > 0)).astype(np.int32)
    out.append(dict(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=loss_mask))
  return out


def grpo_rollouts(tokenizer, mesh, num_steps):
  """(GRPOConfig, GRPORollouts) of the two-process GRPO run (multihost_worker.py) and of its resume on one process
  (test_resume.py): 2 of 4 prompts a step, 4 samples each, rewards that vary within every group, and the KL
  reference the recipe uses without `init_from`: the loop's initial policy (seed 0)."""
  from phi_jax.stages import grpo
  cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_prompt_tokens=32, max_new_tokens=4, beta=0.01,
                        drop_zero_variance_groups=False)

  def rank_rewards(texts, golds, lengths, finished):
    # Another process's verifier may disagree (a timeout near the limit): process 0's rewards must stand for all.
    return (np.arange(len(texts)) + jax.process_index()).astype(np.float32) % 3, np.zeros(len(texts), bool)

  key = initial_params_key(0)
  reference = jax.jit(lambda: phi_jax.init_params(CONFIG, key), out_shardings=param_shardings(CONFIG, mesh))()
  prompts = [{"problem": f"Write digits {i}", "answer": "0"} for i in range(4)]
  return cfg, grpo.GRPORollouts(prompts, tokenizer, CONFIG, cfg, reward_batch_fn=rank_rewards, num_steps=num_steps,
                                mesh=mesh, ref_params=reference)


def run_steps(mesh_shape, *, devices=None, microbatches=1, batches=None):
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  optimizer = make_optimizer(OPT, NUM_STEPS)
  state = create_train_state(CONFIG, optimizer, mesh, jax.random.key(0))
  batches = batches or packed_batches(NUM_STEPS)
  step = make_train_step(next_token.make_loss_fn(CONFIG, chunk_size=16), optimizer,
                         learning_rate_schedule(OPT, NUM_STEPS), mesh, state_shardings(CONFIG, optimizer, mesh),
                         batches[0], microbatches=microbatches)
  losses = []
  for b in batches:
    state, metrics = step(state, global_batch(b, mesh), jax.random.key(1))
    losses.append(host_scalar(metrics["loss"]))
  params = jax.device_get(state.params) if jax.process_count() == 1 else None
  return losses, params, state


@pytest.fixture(scope="module")
def single_device_run():
  return run_steps({"data": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_equals_single_device(single_device_run, mesh_shape):
  ref_losses, ref_params, _ = single_device_run
  losses, params, state = run_steps(mesh_shape)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert ref_losses[-1] < ref_losses[0]  # the steps do train
  if mesh_shape.get("fsdp", 1) > 1 or mesh_shape.get("tensor", 1) > 1:
    q = state.params["layers"]["attn"]["q"]  # [L, D, N, H]: D on fsdp, N on tensor
    assert q.addressable_shards[0].data.shape[1] < q.shape[1] or q.addressable_shards[0].data.shape[2] < q.shape[2]


def test_microbatched_equals_full_batch(single_device_run):
  ref_losses, ref_params, _ = single_device_run
  losses, params, _ = run_steps({"data": 1}, devices=jax.devices()[:1], microbatches=4)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_is_mean_over_target_tokens_of_whole_batch():
  """The normaliser is the global token count, not a mean of per-microbatch means."""
  batch = packed_batches(1, seed=5)[0]
  params = jax.jit(lambda k: __import__("phi_jax").init_params(CONFIG, k))(jax.random.key(0))
  loss_sum, aux = next_token.make_loss_fn(CONFIG, chunk_size=16)(params, jax.tree.map(jnp.asarray, batch), None)
  logits = np.asarray(__import__("phi_jax").forward(params, batch["tokens"], CONFIG, positions=batch["positions"],
                                                    segment_ids=batch["segment_ids"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  seg, mask, tok = batch["segment_ids"], batch["loss_mask"], batch["tokens"]
  total, count, correct = 0.0, 0, 0
  for b in range(tok.shape[0]):
    for t in range(tok.shape[1] - 1):
      if seg[b, t + 1] == seg[b, t] != 0 and mask[b, t + 1]:
        total -= logp[b, t, tok[b, t + 1]]
        count += 1
        correct += int(logp[b, t].argmax() == tok[b, t + 1])
  assert float(aux["weight"]) == count
  np.testing.assert_allclose(float(loss_sum), total, rtol=1e-5)
  # The next-token accuracy metric (a sum, divided by the weight when logged) under its own name.
  assert set(aux["metrics"]) == {"token_accuracy"} and float(aux["metrics"]["token_accuracy"]) == correct


def test_schedule_warmup_and_decay():
  cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, decay="linear", final_lr_fraction=0.1)
  lr = [float(learning_rate_schedule(cfg, 14)(s)) for s in range(15)]
  assert lr[0] == pytest.approx(0.25) and lr[3] == pytest.approx(1.0) and max(lr) == pytest.approx(1.0)
  assert lr[14] == pytest.approx(0.1)
  cos = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_fraction=0.5, decay="cosine"), 10)
  assert float(cos(4)) == pytest.approx(1.0) and float(cos(10)) == pytest.approx(0.0, abs=1e-6)
  # A cosine warmup (Phi-4-reasoning-plus: 10 steps) into a constant LR: 0.5 (1 - cos(pi (t + 1) / 10)).
  plus = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=10, warmup_shape="cosine",
                                                decay="constant"), 90)
  lr = np.array([float(plus(s)) for s in range(90)])
  np.testing.assert_allclose(lr[:10], 1.0 - np.cos(np.pi * np.arange(1, 11) / 10), rtol=1e-5)
  np.testing.assert_allclose(lr[10:], 2.0)
  with pytest.raises(ValueError, match="warmup_shape='exp'"):
    OptimizerConfig(warmup_shape="exp")
  with pytest.raises(ValueError, match="warmup_steps=450 and warmup_fraction=0.1 are both set"):
    OptimizerConfig(warmup_steps=450, warmup_fraction=0.1)  # a config file's fraction used to win silently


def test_weight_decay_skips_norms_and_embeddings():
  params = jax.eval_shape(lambda: __import__("phi_jax").init_params(CONFIG, jax.random.key(0)))
  mask = weight_decay_mask(params)
  assert mask["embed"]["embedding"] is False and mask["final_norm"]["scale"] is False
  assert mask["layers"]["input_norm"]["scale"] is False and mask["layers"]["mlp"]["down"] is True
  assert mask["lm_head"]["kernel"] is True


def test_optimizer_state_is_sharded_like_params():
  mesh = sharding.make_mesh({"fsdp": 8})
  shardings = state_shardings(CONFIG, make_optimizer(OPT, 10), mesh)
  adam = [s for s in jax.tree.leaves(shardings.opt_state) if s.spec != jax.sharding.PartitionSpec()]
  assert len(adam) == 2 * len(jax.tree.leaves(shardings.params))  # mu and nu of every parameter
  assert shardings.params["layers"]["mlp"]["gate"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.parametrize("shape,message", [
    ({"data": 3}, "needs 3 devices but 8 are available"),
    ({"data": 3, "fsdp": -1}, "does not divide"),
    ({"data": -1, "fsdp": -1}, "more than one -1"),
    ({"model": 2}, "unknown axes"),
])
def test_bad_mesh_shapes_say_what_to_change(shape, message):
  with pytest.raises(ValueError, match=message) as error:
    sharding.make_mesh(shape)
  # On a CPU the message also says how to get more devices (tests run with 8 simulated ones).
  assert ("xla_force_host_platform_device_count=N" in str(error.value)) == ("devices" in message
                                                                            or "divide" in message)


@pytest.mark.parametrize("shape,processes,shared", [
    ({"fsdp": -1}, 2, None), ({"fsdp": 2, "tensor": 4}, 2, None), ({"data": 2, "fsdp": 4}, 8, None),
    ({"tensor": 8}, 2, "processes [0, 1] would hold the same rows 0:16"),  # tensor spans both processes
    ({"fsdp": 4, "tensor": 2}, 8, "4 blocks of rows (data x fsdp) for 8 processes"),  # one process per device
])
def test_every_process_must_hold_rows_of_its_own(shape, processes, shared):
  """Each process loads its own rows; a mesh whose batch blocks span processes would drop half of them silently.
  The 8 devices play `processes` processes of 8 / processes devices each."""
  mesh, per_process = sharding.make_mesh(shape), 8 // processes
  if shared is None:
    check_rows_per_process(mesh, 16, process_of=lambda d: d.id // per_process)
  else:
    with pytest.raises(ValueError, match=re.escape(shared) + ".*make data x fsdp a multiple of the process count"):
      check_rows_per_process(mesh, 16, process_of=lambda d: d.id // per_process)


def test_global_batch_names_a_leaf_it_cannot_batch_and_rows_the_mesh_cannot_split():
  """A passthrough string column (as transformers' collators keep) failed with "'str' object has no attribute
  'shape'"; rows that data x fsdp does not divide with an IndivisibleError naming sharding internals."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = {"tokens": np.zeros((8, 16), np.int32), "lengths": np.arange(8)}
  assert {k: v.shape for k, v in global_batch(batch, mesh).items()} == {"tokens": (8, 16), "lengths": (8,)}
  for extra, found in ((["a"] * 8, r"\['id'\]\[0\] is a str"), (np.asarray(["a"] * 8), r"\['id'\] holds U1 values"),
                       (3, r"\['id'\] is a int"), (np.int32(3), r"\['id'\] has no batch axis")):
    with pytest.raises(TypeError, match=found + ".*only arrays .* can be batched.*'id'"):
      global_batch(dict(batch, id=extra), mesh)
  with pytest.raises(ValueError, match=r"batch\['tokens'\] has 6 rows, .* data x fsdp = 4 .* a multiple of 4"):
    global_batch({"tokens": np.zeros((6, 16), np.int32)}, mesh)


def test_mesh_that_cannot_split_a_parameter_is_named():
  mesh = sharding.make_mesh({"tensor": 8})  # tiny has 2 kv heads: 8-way tensor parallelism cannot split them
  with pytest.raises(ValueError, match=r"kv_heads|\['k'\]|\['v'\]|cannot split evenly"):
    state_shardings(CONFIG, make_optimizer(OPT, 10), mesh)


@pytest.mark.parametrize("max_norm", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0, np.inf, np.nan])  # global norm ~0.2 (unclipped), ~4, ~120
def test_clip_by_global_norm_equals_optax(scale, max_norm):
  rng = np.random.default_rng(7)
  grads = {"a": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
           "b": {"c": jnp.asarray(rng.normal(size=(5,)) * min(scale, 1.0), jnp.float32)}}
  ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  reference, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-6)  # NaNs must sit in the same places
  if np.isfinite(scale):
    assert float(optax.global_norm(ours)) <= max_norm * (1 + 1e-6)


def test_bfloat16_state_keeps_its_dtypes_across_a_step():
  """With bfloat16 params the AdamW moments are bfloat16 too; the float32 update math must not promote them, or the
  second step sees a new state signature (a recompile, undonatable buffers, a checkpoint that no longer matches)."""
  config = CONFIG.replace(param_dtype="bfloat16")
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  optimizer = make_optimizer(OPT, NUM_STEPS)
  state = create_train_state(config, optimizer, mesh, jax.random.key(0))
  batch = {k: v[:2] for k, v in packed_batches(1)[0].items()}
  step = make_train_step(next_token.make_loss_fn(config, chunk_size=16), optimizer,
                         learning_rate_schedule(OPT, NUM_STEPS), mesh, state_shardings(config, optimizer, mesh), batch)
  signature = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
  before = signature(state)
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.opt_state))  # the moments follow the params
  new_state, _ = step(state, global_batch(batch, mesh), jax.random.key(1))
  assert signature(new_state) == before


def test_a_skipped_update_keeps_the_moments_but_not_the_learning_rate_schedule_behind():
  """on_nonfinite='skip': after a dropped update the rate applied is still schedule(step), the one logged."""
  from phi_jax.train.state import TrainState
  from phi_jax.train.step import train_step
  cfg = OptimizerConfig(learning_rate=1.0, decay="linear", eps=1e-12, max_grad_norm=None, weight_decay=0.0)
  optimizer, schedule = make_optimizer(cfg, 4), learning_rate_schedule(cfg, 4)
  params = {"w": jnp.zeros(3)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  def loss_fn(p, batch, rng):  # gradient x: with a constant gradient Adam moves each weight by exactly -lr
    del rng
    return jnp.sum(p["w"] * batch["x"]), {"weight": jnp.float32(1.0), "metrics": {}}

  step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(0), loss_fn=loss_fn, optimizer=optimizer,
                                         schedule=schedule, skip_nonfinite=True))
  applied, logged = [], []
  for x in (np.nan, 1.0, 1.0, 1.0):  # the first batch is bad
    before = float(state.params["w"][0])
    state, metrics = step(state, {"x": jnp.full(3, x, jnp.float32)})
    applied.append(before - float(state.params["w"][0]))
    logged.append(float(metrics["learning_rate"]))
  assert applied[0] == 0.0 and logged == [1.0, 0.75, 0.5, 0.25]
  np.testing.assert_allclose(applied[1:], logged[1:], rtol=1e-5)


def test_a_batch_that_trains_nothing_changes_no_parameter():
  """Zero weight (every token masked, every GRPO group dropped): the gradients are zero, but AdamW would still step
  along its momentum, repeating the last update. The params stay; the moments see a zero gradient."""
  from phi_jax.train.state import TrainState
  from phi_jax.train.step import train_step
  cfg = OptimizerConfig(learning_rate=0.1, decay="constant", max_grad_norm=None, weight_decay=0.1, b1=0.9)
  optimizer, schedule = make_optimizer(cfg, 8), learning_rate_schedule(cfg, 8)

  def loss_fn(p, batch, rng):  # "trained" overrides the weight where a stage normalises by something else
    del rng
    aux = {"weight": batch["weight"], "metrics": {}}
    if "trained" in batch:
      aux["trained"] = batch["trained"]
    return jnp.sum(p["w"] * batch["x"]) * batch["weight"], aux

  step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(0), loss_fn=loss_fn, optimizer=optimizer,
                                         schedule=schedule))
  params = {"w": jnp.ones(3)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  state, _ = step(state, {"x": jnp.ones(3), "weight": jnp.float32(2.0)})
  adam = lambda s: next(x for x in jax.tree.leaves(s.opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState))
  for empty in ({"x": jnp.ones(3), "weight": jnp.float32(0.0)},
                {"x": jnp.zeros(3), "weight": jnp.float32(2.0), "trained": jnp.float32(0.0)}):
    new, metrics = step(state, empty)
    assert int(new.step) == int(state.step) + 1 and float(metrics["grad_norm"]) == 0.0
    np.testing.assert_array_equal(new.params["w"], state.params["w"])  # no momentum step, no weight decay
    np.testing.assert_allclose(adam(new).mu["w"], 0.9 * adam(state).mu["w"], rtol=1e-6)
  moved, _ = step(state, {"x": jnp.zeros(3), "weight": jnp.float32(2.0), "trained": jnp.float32(5.0)})
  assert not np.array_equal(moved.params["w"], state.params["w"])  # zero gradient, but something trained


def test_a_batch_that_trains_nothing_logs_its_loss_and_metrics_as_nan_not_zero():
  """A step without targets (every token masked; GRPO's constant aggregation, whose weight counts rows, with every
  group dropped) has no loss: a logged 0.0 looked perfect. Its loss and per-weight metrics are NaN, its weight 0."""
  from phi_jax.train.state import TrainState
  from phi_jax.train.step import train_step
  optimizer = optax.sgd(1.0)

  def loss_fn(p, batch, rng):
    del rng
    aux = {"weight": batch["weight"], "metrics": {"ratio": jnp.sum(p["w"]) * 0, "rows": jnp.float32(0.0)},
           "metric_weights": {"ratio": batch["tokens"]}}
    if "trained" in batch:
      aux["trained"] = batch["trained"]
    return jnp.sum(p["w"] * batch["x"]), aux

  params = {"w": jnp.ones(3)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(0), loss_fn=loss_fn, optimizer=optimizer,
                                         schedule=optax.constant_schedule(1.0)))
  for empty in ({"x": jnp.zeros(3), "weight": jnp.float32(0.0), "tokens": jnp.float32(0.0)},
                {"x": jnp.zeros(3), "weight": jnp.float32(4.0), "tokens": jnp.float32(0.0),
                 "trained": jnp.float32(0.0)}):
    _, metrics = step(state, empty)
    assert np.isnan(float(metrics["loss"])) and np.isnan(float(metrics["ratio"])) and np.isnan(float(metrics["rows"]))
    assert float(metrics["weight"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
  _, metrics = step(state, {"x": jnp.ones(3), "weight": jnp.float32(2.0), "tokens": jnp.float32(2.0)})
  assert float(metrics["loss"]) == 1.5 and float(metrics["ratio"]) == 0.0 and float(metrics["weight"]) == 2.0


@pytest.mark.parametrize("field,value", [
    ("warmup_fraction", 10.0), ("warmup_fraction", -0.1), ("warmup_steps", -1), ("decay", "exp"),
    ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("learning_rate", -1e-5), ("final_lr_fraction", 2.0),
    ("weight_decay", -0.1), ("b1", 1.5), ("b2", 1.0), ("eps", 0.0)])
def test_optimizer_settings_out_of_range_are_an_error(field, value):
  """Each of these would train silently wrong (frozen weights, gradient ascent, a rising learning rate)."""
  with pytest.raises(ValueError, match=field):
    OptimizerConfig(**{field: value})


def test_a_warmup_longer_than_the_run_keeps_its_slope():
  """As transformers' and optax's schedules: 10 warmup steps in a 4-step run climb 0.1, 0.2, 0.3, 0.4 (they were
  squeezed into the run, 2.5x steeper, to the peak)."""
  schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10), 4)
  np.testing.assert_allclose([float(schedule(s)) for s in range(4)], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_a_final_fraction_without_a_decay_is_an_error():
  with pytest.raises(ValueError, match=r"final_lr_fraction=0.1 does nothing with decay='constant'"):
    OptimizerConfig(decay="constant", final_lr_fraction=0.1)
  OptimizerConfig(decay="linear", final_lr_fraction=0.1)


@pytest.mark.parametrize("microbatches", [0, -2, 2.5, float("nan"), "2", True])
def test_a_train_step_made_without_the_loop_refuses_a_bad_microbatch_count(microbatches):
  """make_train_step called directly (a notebook) failed inside the split with a modulo by zero or a reshape error."""
  with pytest.raises(ValueError, match=r"microbatches=.* must be a whole number >= 1"):
    run_steps({"data": 1}, devices=jax.devices()[:1], microbatches=microbatches)


@pytest.mark.parametrize("field", ["microbatches", "log_every", "checkpoint_every", "keep_checkpoints"])
def test_loop_counts_below_one_are_an_error(field):
  from phi_jax.train import LoopConfig
  with pytest.raises(ValueError, match=f"LoopConfig.{field}=0 must be at least 1"):
    LoopConfig(num_steps=2, **{field: 0})


def test_loop_counts_are_whole_numbers():
  """train.num_steps=1e4 (as MaxText configs write it) is 10000; 2.5 steps or a negative eval_every are errors, not a
  crash inside the loop or an evaluation at every step."""
  from phi_jax.train import LoopConfig
  config = LoopConfig(num_steps=1e4, eval_every=5.0)
  assert (config.num_steps, config.eval_every) == (10000, 5) and isinstance(config.num_steps, int)
  with pytest.raises(ValueError, match=r"LoopConfig.num_steps=2.5 must be a whole number"):
    LoopConfig(num_steps=2.5)
  with pytest.raises(ValueError, match=r"LoopConfig.eval_every=-1 must be >= 0"):
    LoopConfig(num_steps=2, eval_every=-1)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_a_seed_outside_32_bits_is_refused_before_any_stage_reads_data(seed):
  """DPO's shuffle takes seeds in [0, 2**32) only, the midtrain and SFT pipelines refused negative ones inside numpy:
  a recipe trained its first stages and then died at DPO. The loop's settings refuse such a seed up front."""
  from phi_jax.train import LoopConfig
  with pytest.raises(ValueError, match=re.escape(f"train.seed={seed} must be in [0, 2**32)")):
    LoopConfig(num_steps=2, seed=seed)
  assert LoopConfig(num_steps=2, seed=2**32 - 1).seed == 2**32 - 1
  assert LoopConfig(num_steps=2, seed=np.uint32(7)).seed == 7

def test_schedule_values_at_every_step():
  """Every step of two schedules against their formulas (peak 2.0, so the final rate must scale with the peak):
  a linear warmup to the peak at step warmup - 1, then the decay over the remaining num_steps - warmup steps."""
  linear = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=4, decay="linear",
                                                  final_lr_fraction=0.1), 14)
  # Warmup 2 (s + 1) / 4; decay 2 (1 - 0.9 (s - 4) / 10) from step 4, reaching 0.2 at step 14 and staying there.
  expected = [0.5 * (s + 1) for s in range(4)] + [2.0 * (1 - 0.9 * min(s - 4, 10) / 10) for s in range(4, 17)]
  np.testing.assert_allclose([float(linear(s)) for s in range(17)], expected, rtol=1e-6)
  cosine = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=2, decay="cosine",
                                                  final_lr_fraction=0.1), 12)
  # Warmup 1.0, 2.0; then 2 (0.1 + 0.9 * 0.5 (1 + cos(pi k / 10))) with k = s - 2 steps into the decay.
  k = np.minimum(np.arange(2, 15) - 2, 10)
  expected = [1.0, 2.0] + list(2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 10))))
  np.testing.assert_allclose([float(cosine(s)) for s in range(15)], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decay_everything", [False, True])
def test_weight_decay_reaches_the_update_only_where_the_mask_allows(decay_everything):
  """With zero gradients an AdamW step is the decay alone, p -= lr * wd * p = 0.1 * 0.5 * 1: 1.0 -> 0.95 for layer
  matrices and the LM head; norms and the embedding stay at 1.0 unless decay_norms_and_embeddings."""
  cfg = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, decay="constant", max_grad_norm=None,
                        decay_norms_and_embeddings=decay_everything)
  params = {"embed": {"embedding": jnp.ones((3, 2))}, "final_norm": {"scale": jnp.ones(2)},
            "layers": {"input_norm": {"scale": jnp.ones((1, 2))}, "mlp": {"down": jnp.ones((1, 2, 2))}},
            "lm_head": {"kernel": jnp.ones((2, 3))}}
  optimizer = make_optimizer(cfg, 10)
  updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  decayed = {"mlp", "lm_head"} if not decay_everything else {"mlp", "lm_head", "embed", "final_norm", "input_norm"}
  for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
    names = {getattr(key, "key", None) for key in path}
    np.testing.assert_allclose(leaf, 0.95 if names & decayed else 1.0, rtol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_train_step_divides_sums_by_the_whole_batch_weight(microbatches):
  """loss = w . x summed over rows, weight = per-row counts n (4 rows, total 10). With SGD at rate 1 the step must
  move w by -sum(x) / sum(n) = -(4, 6) / 10 whether or not the batch is split (microbatches of rows 0, 2 and 1, 3
  weigh 4 and 6: a mean of their means would differ), and log loss = sum(w . x) / 10 = (1 + 2 + 6 + 7) / 10."""
  from phi_jax.train.state import TrainState
  from phi_jax.train.step import train_step

  def loss_fn(params, batch, rng):
    del rng
    per_row = batch["x"] @ params["w"]
    return jnp.sum(per_row), {"weight": jnp.sum(batch["n"]),
                              "metrics": {"rows": jnp.float32(per_row.shape[0]), "per_row": jnp.sum(per_row)},
                              "metric_weights": {"per_row": jnp.float32(per_row.shape[0])}}

  batch = {"x": jnp.asarray([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 3.0]]), "n": jnp.asarray([1.0, 1.0, 3.0, 5.0])}
  optimizer = optax.sgd(1.0)
  params = {"w": jnp.asarray([1.0, 2.0])}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  new, metrics = train_step(state, batch, jax.random.key(0), loss_fn=loss_fn, optimizer=optimizer,
                            schedule=optax.constant_schedule(1.0), microbatches=microbatches)
  np.testing.assert_allclose(new.params["w"], [0.6, 1.4], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], 1.6, rtol=1e-6)
  np.testing.assert_allclose(metrics["rows"], 4 / 10, rtol=1e-6)  # a metric without its own weight: / 10
  np.testing.assert_allclose(metrics["per_row"], 16 / 4, rtol=1e-6)  # its own weight: a mean over the 4 rows
  assert int(new.step) == 1 and float(metrics["weight"]) == 10.0


def test_train_flops_per_token_of_the_tiny_model():
  """tiny: D 64, F 128, H 16, N 4, K 2, L 2, V 512. Attention weights 64 (4 + 2 * 2) 16 + 4 * 16 * 64 = 12288, MLP
  3 * 64 * 128 = 24576, two layers plus the 64 x 512 LM head: 106496 matmul weights, 6 FLOPs each = 638976; at
  T = 32 the causal attention adds 12 * 2 * 4 * 16 * 32 / 2 = 24576."""
  from phi_jax.train.flops import matmul_params, train_flops_per_token
  assert matmul_params(CONFIG) == 106496
  assert train_flops_per_token(CONFIG) == 638976
  assert train_flops_per_token(CONFIG, seq_len=32) == 638976 + 24576


def test_mfu_counts_the_peak_of_the_mesh_devices_only(tmp_path):
  """A mesh over one of the process's 8 devices: the step ran on one device, so its MFU is against one peak."""
  from phi_jax.train import LoopConfig, flops
  from phi_jax.train.loop import run
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  batches, records, peak = packed_batches(2), [], 1e9
  run(workdir=str(tmp_path), model_config=CONFIG, optimizer_config=OPT, train_data=batches,
      loss_fn=next_token.make_loss_fn(CONFIG, chunk_size=16), mesh=mesh,
      loop=LoopConfig(num_steps=2, checkpoint_every=100, peak_flops_per_device=peak), on_log=records.append)
  last, batch = records[-1], batches[-1]
  elapsed = int((batch["segment_ids"] > 0).sum()) / last["tokens_per_sec"]  # real tokens over the step's time
  seq_len = batch["tokens"].shape[1]
  expected = flops.train_flops_per_token(CONFIG, seq_len) * batch["tokens"].size / elapsed / peak
  np.testing.assert_allclose(last["mfu"], expected, rtol=1e-5)


def test_a_finite_loss_with_a_nonfinite_gradient_is_skipped():
  """sqrt(w) at w = 0: the loss is 0 but its gradient is +inf; skip_nonfinite must drop that update too."""
  from phi_jax.train.state import TrainState
  from phi_jax.train.step import train_step
  optimizer = optax.sgd(1.0)
  params = {"w": jnp.zeros(2)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  loss_fn = lambda p, batch, rng: (jnp.sum(jnp.sqrt(p["w"])), {"weight": jnp.float32(1.0), "metrics": {}})
  new, metrics = train_step(state, {}, jax.random.key(0), loss_fn=loss_fn, optimizer=optimizer,
                            schedule=optax.constant_schedule(1.0), skip_nonfinite=True)
  assert float(metrics["loss"]) == 0.0 and not np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["skipped_update"]) == 1.0 and int(new.step) == 1
  np.testing.assert_array_equal(new.params["w"], [0.0, 0.0])


def test_patience_counts_gains_above_min_delta_and_the_best_is_the_lowest_eval_loss():
  """Early stopping counts evaluations since one lowered the best by more than min_delta (a tie, a gain of exactly
  min_delta or a NaN does not), while the best evaluation, whose params keep_best keeps, is the lowest eval_loss,
  min_delta or not (it used to be the last one that beat the best by min_delta: a worse model was kept). A history
  rebuilt from records (a resume) gives the same as the evaluations seen live."""
  from phi_jax.train.loop import _EvalHistory
  losses = [(1, 2.0), (2, 2.0), (3, 1.75), (4, float("nan")), (5, 1.875), (6, 1.5), (7, 1.0)]  # exact in binary
  history = _EvalHistory(min_delta=0.25)
  assert [history.add(step, loss) for step, loss in losses] == [True, False, True, False, False, True, True]
  assert (history.best_loss, history.best_step, history.since_best) == (1.0, 7, 0)
  rebuilt = _EvalHistory(0.25, [{"step": s, "eval_loss": v} for s, v in losses[:6]])
  assert (rebuilt.best_loss, rebuilt.best_step, rebuilt.since_best) == (1.5, 6, 5)
  assert rebuilt.describe() == ("5 evaluations without an eval_loss below the best by more than 0.25 (best eval_loss "
                                "1.5 at step 6)")
  plain = _EvalHistory(min_delta=0.0)
  assert [plain.add(s, v) for s, v in ((1, 3.0), (2, 3.0), (3, 2.5))] == [True, False, True]


def direct_step(mesh_shape, batch, loss_fn=None, **kwargs):
  """(mesh, state, step) as a notebook makes them: make_train_step called directly, without the loop's checks."""
  devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  optimizer = make_optimizer(OPT, NUM_STEPS)
  state = create_train_state(CONFIG, optimizer, mesh, jax.random.key(0))
  loss_fn = loss_fn or next_token.make_loss_fn(CONFIG, chunk_size=16)
  step = make_train_step(loss_fn, optimizer, learning_rate_schedule(OPT, NUM_STEPS), mesh,
                         state_shardings(CONFIG, optimizer, mesh), batch, **kwargs)
  return mesh, state, step


def test_a_direct_train_step_refuses_a_token_id_outside_the_vocabulary():
  """One id past the vocabulary made the loss, the gradients and then every parameter NaN, silently."""
  batch = packed_batches(1)[0]
  bad = dict(batch, tokens=batch["tokens"].copy(), segment_ids=np.ones_like(batch["segment_ids"]))
  bad["tokens"][0, 5] = 50000
  mesh, state, step = direct_step({"data": 2, "fsdp": 2, "tensor": 2}, batch)
  with pytest.raises(ValueError, match=r"'tokens': token id 50000 at \[0, 5\] is outside the vocabulary \[0, 512\)"):
    step(state, global_batch(bad, mesh), jax.random.key(0))
  with pytest.raises(ValueError, match=r"token id 50000 at \[0, 5\]"):  # a numpy batch, not yet on the devices
    step(state, bad, jax.random.key(0))
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))  # refused before the step: the state is intact


def test_a_direct_train_step_refuses_a_state_an_earlier_call_consumed():
  """The step donates the old state; passing it again (a notebook cell run twice) segfaulted on a multi-device
  mesh."""
  batch = packed_batches(1)[0]
  mesh, state, step = direct_step({"data": 2, "fsdp": 2, "tensor": 2}, batch)
  new_state, _ = step(state, global_batch(batch, mesh), jax.random.key(0))
  with pytest.raises(ValueError, match=r"this TrainState was donated to an earlier call of the step .* pass the "
                                       r"state that call returned"):
    step(state, global_batch(batch, mesh), jax.random.key(0))
  new_state, metrics = step(new_state, global_batch(batch, mesh), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 2


def _mean_loss(params, batch, rng):
  del rng
  logits = phi_jax.forward(params, batch["tokens"], CONFIG)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:]).mean()


@pytest.mark.parametrize("loss_fn, message", [
    (_mean_loss, r"loss_fn must return \(loss_sum, aux\) .*; got one array of shape \(\)"),
    (lambda p, b, r: (_mean_loss(p, b, r), {"loss": _mean_loss(p, b, r)}),
     r"loss_fn's aux must be a dict with a \"weight\" .*; got keys \['loss'\]")])
def test_a_direct_train_step_refuses_a_loss_fn_of_another_form(loss_fn, message):
  """A scalar loss failed inside value_and_grad, a loss without aux["weight"] with a bare KeyError."""
  batch = packed_batches(1)[0]
  mesh, state, step = direct_step({"data": 1}, batch, loss_fn=loss_fn)
  with pytest.raises(TypeError, match=message):
    step(state, global_batch(batch, mesh), jax.random.key(0))


def test_a_direct_train_step_names_a_missing_or_misshaped_batch_key():
  """A batch without positions was a bare KeyError, a loss_mask a column short a broadcast error inside the loss."""
  batch = packed_batches(1)[0]
  no_positions = {k: v for k, v in batch.items() if k != "positions"}
  mesh, state, step = direct_step({"data": 1}, no_positions)
  with pytest.raises(ValueError, match=r"loss_fn failed with KeyError 'positions', a key the batch lacks \(it has "
                                       r"\['loss_mask', 'segment_ids', 'tokens'\]\)"):
    step(state, global_batch(no_positions, mesh), jax.random.key(0))
  short_mask = dict(batch, loss_mask=batch["loss_mask"][:, :-1])
  mesh, state, step = direct_step({"data": 1}, short_mask)
  with pytest.raises(ValueError, match=r"batch\['loss_mask'\] has shape \(8, 31\), but batch\['tokens'\] is "
                                       r"\(8, 32\)"):
    step(state, global_batch(short_mask, mesh), jax.random.key(0))
  # A step made for one batch's keys, called with another's: named, rather than JAX's pytree mismatch.
  mesh, state, step = direct_step({"data": 1}, batch)
  with pytest.raises(ValueError, match=r"the batch lacks 'positions', a key of the batch this step was made for"):
    step(state, global_batch(no_positions, mesh), jax.random.key(0))


def test_the_loss_contract_check_wraps_a_loss_fn_once_and_keeps_its_attributes():
  """loop.run checks the loss fn and hands it to make_train_step, which checks a loss fn given directly."""
  from phi_jax.train.step import checked_loss_fn
  loss_fn = next_token.make_loss_fn(CONFIG)
  checked = checked_loss_fn(loss_fn)
  assert checked is not loss_fn and checked_loss_fn(checked) is checked
  assert checked.model_config is CONFIG  # what the step reads the vocabulary size from
