"""phi_jax.losses against independent float64 numpy derivations of the published formulas.

Values and gradients: cross-entropy and token log-prob gradients are checked against closed-form numpy
gradients, DPO/GRPO gradients against central finite differences of the numpy references.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_probe import max_array_size

from phi_jax import losses

B, T, D, V = 2, 37, 8, 50


def _np_log_softmax(logits):
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return logits - lse[..., None], lse


def _finite_difference(fn, x, eps=1e-6):
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[i] += eps
    minus[i] -= eps
    grad[i] = (fn(plus) - fn(minus)) / (2 * eps)
  return grad


def _close(actual, expected, rtol=1e-4, atol=1e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def lm_batch():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(B, T, D)).astype(np.float32)
  kernel = (rng.normal(size=(D, V)) / np.sqrt(D) * 3).astype(np.float32)
  # Half the targets are the argmax so that the correct-prediction count is far from zero.
  targets = np.where(rng.random((B, T)) < 0.5, (h @ kernel).argmax(-1), rng.integers(0, V, size=(B, T)))
  return {"h": h, "kernel": kernel, "targets": targets.astype(np.int32),
          "weights": (rng.random((B, T)) < 0.7).astype(np.float32)}


# ----------------------------------------------------------------------------------------------- targets


def test_next_token_targets_on_packed_rows():
  tokens = np.array([[5, 6, 7, 8, 9, 10, 11, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  # The mask is set on padding at [0, 7]: padding never predicts padding, whatever the mask says.
  loss_mask = np.array([[0, 1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 1, 1, 1]])
  expected_w = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1] - 1):
      same = segment_ids[b, t + 1] == segment_ids[b, t] and segment_ids[b, t] != 0
      expected_w[b, t] = float(loss_mask[b, t + 1] and same)
  targets, weights = losses.next_token_targets(jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(loss_mask))
  np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
  np.testing.assert_array_equal(targets[:, -1], 0)
  np.testing.assert_array_equal(weights, expected_w)
  assert weights[0, 2] == 0 and weights[0, 5] == 0 and weights[0, 6] == 0  # no boundary-crossing predictions


# ----------------------------------------------------------------------------------------------- cross-entropy


def _np_cross_entropy(h, kernel, targets, weights, z_loss):
  """Loss sum, metrics and closed-form gradients: dL/dlogits = w * ((1 + 2 z lse) softmax - onehot)."""
  h, kernel = h.astype(np.float64), kernel.astype(np.float64)
  logits = h @ kernel
  logp, lse = _np_log_softmax(logits)
  onehot = np.eye(logits.shape[-1])[targets]
  nll = -np.sum(logp * onehot, -1)
  loss = np.sum(weights * (nll + z_loss * lse ** 2))
  dlogits = weights[..., None] * ((1 + 2 * z_loss * lse)[..., None] * np.exp(logp) - onehot)
  metrics = {
      "z_loss": np.sum(weights * z_loss * lse ** 2),
      "num_tokens": np.sum(weights),
      "num_correct": np.sum(weights * (np.argmax(logits, -1) == targets)),
  }
  return loss, metrics, dlogits @ kernel.T, np.einsum("btd,btv->dv", h, dlogits)


@functools.partial(jax.jit, static_argnames=("chunk_size", "z_loss"))
def _ce_value_and_grad(h, kernel, targets, weights, *, chunk_size, z_loss):
  def loss_fn(h, kernel):
    return losses.chunked_cross_entropy(h, kernel, targets, weights, chunk_size=chunk_size, z_loss=z_loss)
  return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(h, kernel)


@pytest.mark.parametrize("chunk_size,z_loss", [(5, 0.0), (16, 1e-2), (37, 0.0), (64, 1e-2)])
def test_chunked_cross_entropy_values_and_gradients(lm_batch, chunk_size, z_loss):
  (loss, metrics), (dh, dkernel) = _ce_value_and_grad(
      lm_batch["h"], lm_batch["kernel"], lm_batch["targets"], lm_batch["weights"], chunk_size=chunk_size,
      z_loss=z_loss)
  ref_loss, ref_metrics, ref_dh, ref_dkernel = _np_cross_entropy(
      lm_batch["h"], lm_batch["kernel"], lm_batch["targets"], lm_batch["weights"], z_loss)
  naive_loss, _ = losses.cross_entropy_from_logits(lm_batch["h"] @ lm_batch["kernel"], lm_batch["targets"],
                                                   lm_batch["weights"], z_loss=z_loss)
  assert loss.dtype == jnp.float32
  _close(loss, ref_loss)
  np.testing.assert_allclose(loss, naive_loss, rtol=1e-5)
  for name, value in ref_metrics.items():
    _close(metrics[name], value, atol=1e-4)
  _close(dh, ref_dh)
  _close(dkernel, ref_dkernel)


def test_chunked_cross_entropy_gradient_scales_with_cotangent(lm_batch):
  """Callers differentiate loss_sum / num_tokens: the gradient of c * loss_sum is c times the closed form."""
  scale = -2.5

  def loss_fn(h, kernel):
    loss, _ = losses.chunked_cross_entropy(h, kernel, lm_batch["targets"], lm_batch["weights"], chunk_size=16,
                                           z_loss=1e-2)
    return scale * loss

  dh, dkernel = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(lm_batch["h"], lm_batch["kernel"])
  _, _, ref_dh, ref_dkernel = _np_cross_entropy(lm_batch["h"], lm_batch["kernel"], lm_batch["targets"],
                                                lm_batch["weights"], 1e-2)
  _close(dh, scale * ref_dh)
  _close(dkernel, scale * ref_dkernel)


def test_cross_entropy_from_logits_matches_numpy(lm_batch):
  logits = lm_batch["h"] @ lm_batch["kernel"]
  weights, targets = lm_batch["weights"], lm_batch["targets"]
  loss_fn = lambda x: losses.cross_entropy_from_logits(x, targets, weights, z_loss=1e-2)
  (loss, metrics), dlogits = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(logits)
  logp, lse = _np_log_softmax(logits.astype(np.float64))
  onehot = np.eye(V)[targets]
  _close(loss, np.sum(weights * (-np.sum(logp * onehot, -1) + 1e-2 * lse ** 2)))
  _close(metrics["num_correct"], np.sum(weights * (logits.argmax(-1) == targets)))
  _close(dlogits, weights[..., None] * ((1 + 2e-2 * lse)[..., None] * np.exp(logp) - onehot))


def test_chunked_cross_entropy_bfloat16_hidden_states(lm_batch):
  h_bf16 = jnp.asarray(lm_batch["h"], jnp.bfloat16)
  loss, _ = losses.chunked_cross_entropy(h_bf16, jnp.asarray(lm_batch["kernel"]), lm_batch["targets"],
                                         lm_batch["weights"], chunk_size=16)
  # Reference on the same bfloat16-rounded operands (the kernel is cast to the hidden dtype, as the model does).
  h_rounded = lm_batch["h"].astype(jnp.bfloat16).astype(np.float64)
  kernel_rounded = lm_batch["kernel"].astype(jnp.bfloat16).astype(np.float64)
  ref_loss, *_ = _np_cross_entropy(h_rounded, kernel_rounded, lm_batch["targets"], lm_batch["weights"], 0.0)
  assert loss.dtype == jnp.float32
  _close(loss, ref_loss, rtol=1e-5)
  # The gradient of a scaled loss (a mean, loss / n) is the saved gradient scaled in float32, then rounded: a
  # bfloat16 copy of 1/3 (0.333984375) would make every element 0.2% too large.
  kernel_bf16 = jnp.asarray(lm_batch["kernel"], jnp.bfloat16)
  grad = lambda n: jax.grad(lambda h, k: losses.chunked_cross_entropy(
      h, k, lm_batch["targets"], lm_batch["weights"], chunk_size=16)[0] / n, argnums=(0, 1))(h_bf16, kernel_bf16)
  for whole, third in zip(grad(1.0), grad(3.0)):
    assert third.dtype == jnp.bfloat16
    np.testing.assert_array_equal(third, (whole.astype(jnp.float32) * np.float32(1 / 3)).astype(jnp.bfloat16))


def test_chunked_cross_entropy_sharded_matches_single_device(lm_batch):
  """Batch sharded over 'data' and the vocab over 'model' (tensor-parallel LM head) give the same loss and grads."""
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
  shard = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  args = (shard(lm_batch["h"], ("data",)), shard(lm_batch["kernel"], (None, "model")),
          shard(lm_batch["targets"], ("data",)), shard(lm_batch["weights"], ("data",)))
  (loss, metrics), (dh, dkernel) = _ce_value_and_grad(*args, chunk_size=16, z_loss=1e-2)
  (ref_loss, ref_metrics), (ref_dh, ref_dkernel) = _ce_value_and_grad(
      lm_batch["h"], lm_batch["kernel"], lm_batch["targets"], lm_batch["weights"], chunk_size=16, z_loss=1e-2)
  assert dkernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  for actual, expected in [(loss, ref_loss), (metrics["num_correct"], ref_metrics["num_correct"]), (dh, ref_dh),
                           (dkernel, ref_dkernel)]:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_never_builds_full_logits(lm_batch):
  args = (lm_batch["h"], lm_batch["kernel"], lm_batch["targets"], lm_batch["weights"])
  full_logits = B * T * V

  def chunked(h, kernel, targets, weights):
    return losses.chunked_cross_entropy(h, kernel, targets, weights, chunk_size=8)[0]

  def naive(h, kernel, targets, weights):
    return losses.cross_entropy_from_logits(h @ kernel, targets, weights)[0]

  grad_jaxpr = lambda fn: jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1)))(*args).jaxpr
  assert max_array_size(grad_jaxpr(naive)) >= full_logits  # the probe does see full logits when they exist
  assert max_array_size(grad_jaxpr(chunked)) < full_logits
  assert max_array_size(grad_jaxpr(chunked)) == B * 8 * V


def test_chunked_cross_entropy_compiled_memory():
  """XLA's own buffer assignment: forward + backward temporaries stay well below one full set of logits."""
  b, t, d, v = 2, 4096, 64, 8192
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))

  def loss_fn(h, kernel, targets, weights):
    return losses.chunked_cross_entropy(h, kernel, targets, weights, chunk_size=256)[0]

  compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(*shapes).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes < 0.25 * b * t * v * 4


# ----------------------------------------------------------------------------------------------- token log-probs


def _np_token_logprobs(h, kernel, targets, temperature):
  """log p(target), entropy and the closed-form gradient of sum(c_logp * logp + c_ent * entropy) w.r.t. logits."""
  logits = (h.astype(np.float64) @ kernel.astype(np.float64)) / temperature
  logp, _ = _np_log_softmax(logits)
  p = np.exp(logp)
  onehot = np.eye(logits.shape[-1])[targets]
  token_logp = np.sum(logp * onehot, -1)
  entropy = -np.sum(p * logp, -1)

  def grad_logits(c_logp, c_ent):
    d_logp = onehot - p
    d_ent = -p * (logp + entropy[..., None])
    return (c_logp[..., None] * d_logp + c_ent[..., None] * d_ent) / temperature

  return token_logp, entropy, grad_logits


def _token_logprobs_objective(targets, c_logp, c_ent, *, chunk_size, temperature):
  """sum(c_logp * logp [+ c_ent * entropy]) and its log-probs (and entropy); entropy only when c_ent is given."""
  def objective(h, kernel):
    out = losses.chunked_token_logprobs(h, kernel, targets, chunk_size=chunk_size, temperature=temperature,
                                        with_entropy=c_ent is not None)
    if c_ent is None:
      return jnp.sum(c_logp * out), (out,)
    return jnp.sum(c_logp * out[0] + c_ent * out[1]), out
  return objective


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("chunk_size", [16, 37])
def test_chunked_token_logprobs_and_entropy(lm_batch, with_entropy, chunk_size):
  h, kernel, targets = lm_batch["h"], lm_batch["kernel"], lm_batch["targets"]
  rng = np.random.default_rng(1)
  c_logp, c_ent = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  temperature = 0.7
  objective = _token_logprobs_objective(targets, c_logp, c_ent if with_entropy else None, chunk_size=chunk_size,
                                        temperature=temperature)
  (_, out), (dh, dkernel) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(h, kernel)
  ref_logp, ref_ent, grad_logits = _np_token_logprobs(h, kernel, targets, temperature)
  _close(out[0], ref_logp)
  if with_entropy:
    _close(out[1], ref_ent)
  g = grad_logits(c_logp, c_ent if with_entropy else np.zeros_like(c_ent))
  _close(dh, g @ kernel.T.astype(np.float64))
  _close(dkernel, np.einsum("btd,btv->dv", h.astype(np.float64), g))
  # The temperature is an input too (a traced schedule value): logits / T, so d/dT = -sum(g * logits) / T.
  def of_temperature(t):
    out = losses.chunked_token_logprobs(h, kernel, targets, chunk_size=chunk_size, temperature=t,
                                        with_entropy=with_entropy)
    return jnp.sum(c_logp * out[0] + c_ent * out[1]) if with_entropy else jnp.sum(c_logp * out)
  d_temperature = jax.jit(jax.grad(of_temperature))(jnp.float32(temperature))
  logits = h.astype(np.float64) @ kernel.astype(np.float64)
  _close(d_temperature, -np.sum(g * logits) / temperature)


def test_chunked_token_logprobs_sharded_matches_single_device(lm_batch):
  """Batch over 'data' and vocab over 'model': the hand-written backward pass gives the single-device gradients."""
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
  shard = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  rng = np.random.default_rng(2)
  c_logp, c_ent = rng.normal(size=(B, T)).astype(np.float32), rng.normal(size=(B, T)).astype(np.float32)
  grad = lambda targets, c_logp, c_ent: jax.jit(jax.value_and_grad(_token_logprobs_objective(
      targets, c_logp, c_ent, chunk_size=16, temperature=0.7), argnums=(0, 1), has_aux=True))
  (_, out), (dh, dkernel) = grad(shard(lm_batch["targets"], ("data",)), shard(c_logp, ("data",)),
                                 shard(c_ent, ("data",)))(shard(lm_batch["h"], ("data",)),
                                                          shard(lm_batch["kernel"], (None, "model")))
  (_, ref_out), (ref_dh, ref_dkernel) = grad(lm_batch["targets"], c_logp, c_ent)(lm_batch["h"], lm_batch["kernel"])
  assert dkernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  for actual, expected in [(out[0], ref_out[0]), (out[1], ref_out[1]), (dh, ref_dh), (dkernel, ref_dkernel)]:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_chunked_token_logprobs_never_builds_full_logits(lm_batch):
  """The gradient of the token log-probs and entropy recomputes each chunk's logits instead of saving all of them."""
  def objective(h, kernel):
    logp, ent = losses.chunked_token_logprobs(h, kernel, lm_batch["targets"], chunk_size=8, with_entropy=True)
    return jnp.sum(logp) + jnp.sum(ent)

  jaxpr = jax.make_jaxpr(jax.value_and_grad(objective, argnums=(0, 1)))(lm_batch["h"], lm_batch["kernel"]).jaxpr
  assert max_array_size(jaxpr) == B * 8 * V  # one chunk of logits, never the [N, B, C, V] stack of all chunks


def test_chunked_token_logprobs_compiled_memory():
  """XLA's buffer assignment for the hand-written backward pass: temporaries well below one full set of logits."""
  b, t, d, v = 2, 4096, 64, 8192
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))

  def objective(h, kernel, targets):
    logp, ent = losses.chunked_token_logprobs(h, kernel, targets, chunk_size=256, with_entropy=True)
    return jnp.sum(logp) + jnp.sum(ent)

  compiled = jax.jit(jax.grad(objective, argnums=(0, 1))).lower(*shapes).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * b * t * v * 4


# ----------------------------------------------------------------------------------------------- DPO


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_dpo(pc, pr, rc, rr, beta, label_smoothing, loss_type):
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    per_pair = -(1 - label_smoothing) * _np_log_sigmoid(beta * h) - label_smoothing * _np_log_sigmoid(-beta * h)
  else:
    per_pair = (h - 1 / (2 * beta)) ** 2
  return per_pair.mean()


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                            ("ipo", 0.1, 0.0)])
def test_dpo_loss(loss_type, beta, label_smoothing):
  rng = np.random.default_rng(2)
  inputs = [rng.normal(scale=3.0, size=32) - 20.0 for _ in range(4)]
  loss_fn = lambda *x: losses.dpo_loss(*x, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(
      *[jnp.asarray(x, jnp.float32) for x in inputs])
  _close(loss, _np_dpo(*inputs, beta, label_smoothing, loss_type))
  for k in range(4):
    def ref_k(x, k=k):
      args = list(inputs)
      args[k] = x
      return _np_dpo(*args, beta, label_smoothing, loss_type)
    _close(grads[k], _finite_difference(ref_k, inputs[k]), rtol=1e-3, atol=1e-5)

  chosen, rejected = beta * (inputs[0] - inputs[2]), beta * (inputs[1] - inputs[3])
  _close(metrics["rewards/chosen"], chosen.mean())
  _close(metrics["rewards/rejected"], rejected.mean())
  _close(metrics["rewards/margins"], (chosen - rejected).mean())
  _close(metrics["rewards/accuracies"], (chosen > rejected).mean())
  assert 0 < float(metrics["rewards/accuracies"]) < 1


def test_dpo_policy_logps_metrics_and_ties():
  """'logps/*' are the policy's own means; a pair whose implicit rewards tie is not counted as accurate."""
  pc, pr = np.array([-3.0, -5.0, -2.0]), np.array([-4.0, -1.0, -6.0])
  rc, rr = np.array([-3.0, -5.0, -1.0]), np.array([-4.0, -2.0, -6.0])
  # beta * (policy - ref): chosen (0, 0, -1) vs rejected (0, 1, 0) -> a tie, then two losses: accuracy 0.
  _, metrics = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=1.0)
  _close(metrics["logps/chosen"], pc.mean())
  _close(metrics["logps/rejected"], pr.mean())
  assert float(metrics["rewards/accuracies"]) == 0.0
  _, metrics = losses.dpo_loss(*(jnp.asarray(x) for x in (pr, pc, rr, rc)), beta=1.0)  # swapped roles
  _close(metrics["rewards/accuracies"], 2 / 3)  # the tie still does not count


def test_dpo_rejects_unknown_settings():
  x = jnp.zeros(2)
  with pytest.raises(ValueError):
    losses.dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
  with pytest.raises(ValueError):
    losses.dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.1, loss_type="ipo")


@pytest.mark.parametrize("settings", [dict(beta=-0.1), dict(beta=0.0, loss_type="ipo"), dict(beta=0.0),
                                      dict(beta=0.1, label_smoothing=0.9), dict(beta=0.1, label_smoothing=-0.1),
                                      dict(beta=0.1, label_smoothing=0.5)])  # 0.5 erases the preference
def test_dpo_loss_refuses_settings_that_reverse_the_preference(settings):
  """A negative beta or a label smoothing of 0.5 or more flips the gradient towards the rejected completion, and IPO
  divides by beta: the library function refuses them as the gin stage does."""
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="beta|label_smoothing"):
    losses.dpo_loss(x, x - 1.0, x, x, **settings)


def test_dpo_loss_takes_a_traced_beta():
  x = jnp.asarray([-1.0, -2.0])
  loss_at = jax.jit(lambda beta: losses.dpo_loss(x, x - 1.0, x, x, beta=beta)[0])
  np.testing.assert_allclose(float(loss_at(0.5)), float(losses.dpo_loss(x, x - 1.0, x, x, beta=0.5)[0]), rtol=1e-6)


def test_dpo_inputs_of_other_shapes_than_one_flat_batch_are_refused():
  """A reference stored as a column ([B, 1]) broadcast against the policy's [B] into [B, B]: every pair mixed with
  every other, a wrong loss and metrics and no error."""
  x = jnp.asarray([-1.0, -2.0])
  for args, shapes in (((x, x, x[:, None], x[:, None]), r"\(2,\), \(2,\), \(2, 1\), \(2, 1\)"),
                       ((x, x, x, x[:1]), r"\(2,\), \(2,\), \(2,\), \(1,\)"),
                       ((x[:, None],) * 4, r"\(2, 1\), \(2, 1\), \(2, 1\), \(2, 1\)")):
    with pytest.raises(ValueError, match=rf"one shape \[B\] .* got shapes {shapes}"):
      losses.dpo_loss(*args, beta=0.1)
  loss, _ = losses.dpo_loss(x, x, x, x, beta=0.1)  # four [B]: as before
  np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
  # Scalars broadcast harmlessly: a reference-free 0.0, one pair, each pair under vmap.
  free, _ = losses.dpo_loss(x, x - 1.0, 0.0, 0.0, beta=0.1)
  np.testing.assert_allclose(float(free), np.log1p(np.exp(-0.1)), rtol=1e-6)
  np.testing.assert_allclose(float(losses.dpo_loss(-1.0, -2.0, 0.0, 0.0, beta=0.1)[0]), float(free), rtol=1e-6)
  per_pair = jax.vmap(lambda a, b: losses.dpo_loss(a, b, 0.0, 0.0, beta=0.1)[0])(x, x - 1.0)
  np.testing.assert_allclose(np.asarray(per_pair), float(free), rtol=1e-6)


def test_sequence_logps():
  rng = np.random.default_rng(3)
  token_logps = rng.normal(size=(3, 6))
  mask = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
  sums = np.array([token_logps[b][mask[b] == 1].sum() for b in range(3)])
  _close(losses.sequence_logps(jnp.asarray(token_logps), jnp.asarray(mask)), sums)
  _close(losses.sequence_logps(jnp.asarray(token_logps), jnp.asarray(mask), length_normalize=True),
         sums / mask.sum(-1))


def test_sequence_logps_empty_row_is_zero():
  """A row with no completion tokens sums (and averages) to 0 rather than 0 / 0."""
  token_logps = jnp.asarray([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
  mask = jnp.asarray([[0, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(losses.sequence_logps(token_logps, mask), [-5.0, 0.0])
  np.testing.assert_array_equal(losses.sequence_logps(token_logps, mask, length_normalize=True), [-2.5, 0.0])


# ----------------------------------------------------------------------------------------------- GRPO


def _np_grpo(logps, old, ref, adv, mask, entropy, *, eps_low, eps_high, beta, aggregation, max_tokens,
             entropy_coef):
  """Per-row lists of the masked tokens, then the three published normalisations."""
  rows, ent_rows = [], []
  for b in range(logps.shape[0]):
    keep = mask[b] == 1
    ratio = np.exp(logps[b, keep] - old[b, keep])
    token_loss = -np.minimum(ratio * adv[b], np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[b])
    if beta:
      d = ref[b, keep] - logps[b, keep]
      token_loss = token_loss + beta * (np.exp(d) - d - 1)
    rows.append(token_loss)
    ent_rows.append(entropy[b, keep] if entropy is not None else np.zeros(keep.sum()))

  def reduce(per_row):
    if aggregation == "token_mean":
      return np.concatenate(per_row).sum() / sum(len(r) for r in per_row)
    if aggregation == "sequence_mean":
      return np.mean([r.sum() / max(len(r), 1) for r in per_row])
    return np.concatenate(per_row).sum() / (len(per_row) * (max_tokens or logps.shape[1]))

  return reduce(rows) - entropy_coef * reduce(ent_rows)


@pytest.fixture(scope="module")
def rl_batch():
  rng = np.random.default_rng(4)
  b, t = 4, 12
  lengths = np.array([12, 7, 3, 9])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  old = -rng.random((b, t)) * 3
  logps = old + rng.normal(scale=0.3, size=(b, t))
  # Garbage beyond each completion: exp of these differences overflows float32 unless masked first.
  logps = np.where(mask == 1, logps, 60.0)
  old = np.where(mask == 1, old, -60.0)
  return {
      "logps": logps, "old": old, "ref": logps + rng.normal(scale=0.2, size=(b, t)),
      "adv": np.array([1.3, -0.7, 0.4, -1.1]), "mask": mask, "entropy": rng.random((b, t)) * 2,
  }


GRPO_CASES = [
    dict(aggregation="token_mean", eps_low=0.2, eps_high=0.2, beta=0.0, entropy_coef=0.0, max_tokens=None),
    dict(aggregation="token_mean", eps_low=0.2, eps_high=0.28, beta=0.04, entropy_coef=0.01, max_tokens=None),
    dict(aggregation="sequence_mean", eps_low=0.2, eps_high=0.2, beta=0.04, entropy_coef=0.0, max_tokens=None),
    dict(aggregation="sequence_mean", eps_low=0.1, eps_high=0.3, beta=0.0, entropy_coef=0.001, max_tokens=None),
    dict(aggregation="constant", eps_low=0.2, eps_high=0.2, beta=0.1, entropy_coef=0.0, max_tokens=None),
    dict(aggregation="constant", eps_low=0.15, eps_high=0.25, beta=0.0, entropy_coef=0.01, max_tokens=20),
]


@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_loss_values_and_gradients(rl_batch, case):
  r = rl_batch
  with_entropy = case["entropy_coef"] > 0
  ref = r["ref"] if case["beta"] else None
  entropy = r["entropy"] if with_entropy else None

  def loss_fn(logps, entropy):
    return losses.grpo_loss(
        logps, jnp.asarray(r["old"], jnp.float32), None if ref is None else jnp.asarray(ref, jnp.float32),
        jnp.asarray(r["adv"], jnp.float32), jnp.asarray(r["mask"]), epsilon_low=case["eps_low"],
        epsilon_high=case["eps_high"], beta=case["beta"], aggregation=case["aggregation"],
        max_tokens=case["max_tokens"], entropy=entropy, entropy_coef=case["entropy_coef"])

  (loss, metrics), (d_logps, d_entropy) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      jnp.asarray(r["logps"], jnp.float32), None if entropy is None else jnp.asarray(entropy, jnp.float32))

  np_kwargs = dict(eps_low=case["eps_low"], eps_high=case["eps_high"], beta=case["beta"],
                   aggregation=case["aggregation"], max_tokens=case["max_tokens"], entropy_coef=case["entropy_coef"])
  reference = lambda lp, ent: _np_grpo(lp, r["old"], ref, r["adv"], r["mask"], ent, **np_kwargs)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(d_logps))
  _close(loss, reference(r["logps"], entropy))
  _close(d_logps, _finite_difference(lambda lp: reference(lp, entropy), r["logps"]), rtol=1e-3, atol=1e-6)
  if with_entropy:
    _close(d_entropy, _finite_difference(lambda ent: reference(r["logps"], ent), r["entropy"]), atol=1e-6)

  keep = r["mask"] == 1
  ratio = np.exp(r["logps"] - r["old"])[keep]
  adv = np.broadcast_to(r["adv"][:, None], r["mask"].shape)[keep]
  low = (ratio < 1 - case["eps_low"]) & (adv < 0)
  high = (ratio > 1 + case["eps_high"]) & (adv > 0)
  assert low.any() and high.any()  # the batch exercises both clip sides
  _close(metrics["clip_fraction/low"], low.mean())
  _close(metrics["clip_fraction/high"], high.mean())
  _close(metrics["clip_fraction/total"], (low | high).mean())
  _close(metrics["ratio"], ratio.mean())
  if ref is not None:
    d = (ref - r["logps"])[keep]
    _close(metrics["kl"], np.mean(np.exp(d) - d - 1))
  if with_entropy:
    _close(metrics["entropy"], r["entropy"][keep].mean())


@pytest.mark.parametrize("eps_low,eps_high", [(0.0, 0.2), (0.2, 0.0), (0.0, 0.0), (0.2, 0.2)])
def test_grpo_gradient_at_an_edge_of_the_clip_range_is_the_unclipped_one(eps_low, eps_high):
  """The first pass after fresh rollouts has ratio 1 at most tokens; with an epsilon of 0, 1 is an edge of the clip
  range where min(r A, clip(r) A) = r A on both sides, so its derivative is A (as in TRL). jnp.minimum's split of a
  tie and jnp.clip's half gradient at a bound gave 0.75 A (0.625 A with both epsilons 0)."""
  logps = jnp.asarray([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.5]], jnp.float32)
  advantages, mask = jnp.asarray([1.0, -1.0]), jnp.ones((2, 3))
  grad = jax.grad(lambda lp: losses.grpo_loss(lp, logps, None, advantages, mask, epsilon_low=eps_low,
                                              epsilon_high=eps_high, aggregation="token_mean")[0])(logps)
  np.testing.assert_allclose(np.asarray(grad), -np.asarray(advantages)[:, None] / 6 * np.ones((2, 3)), rtol=1e-6)


def test_grpo_clipped_tokens_with_an_overflowing_ratio_have_no_gradient():
  """A log-ratio of 100 (a policy that diverged between passes) overflows exp() to inf; where the clipped side is
  chosen (A > 0) or A = 0, the token has no gradient, and its unused branch must not make it NaN."""
  logps, old = jnp.asarray([[100.0, 0.1], [100.0, 0.1]]), jnp.zeros((2, 2))
  advantages, mask = jnp.asarray([1.0, 0.0]), jnp.ones((2, 2))
  loss_fn = lambda lp: losses.grpo_loss(lp, old, None, advantages, mask, aggregation="token_mean")[0]
  loss, grad = jax.value_and_grad(loss_fn)(logps)
  np.testing.assert_allclose(float(loss), -(1.2 + np.exp(0.1)) / 4, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), [[0.0, -np.exp(0.1) / 4], [0.0, 0.0]], rtol=1e-6)


def test_grpo_refuses_advantages_that_are_not_one_per_row():
  """A [B, 1] column (as TRL holds them after unsqueeze) broadcast every row's advantage onto every row."""
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"advantages must be one per completion, shape \(2,\); got \(2, 1\)"):
    losses.grpo_loss(x, x, None, jnp.ones((2, 1)), jnp.ones((2, 3)))


def test_grpo_needs_ref_logps_for_kl(rl_batch):
  x = jnp.zeros((4, 12))
  with pytest.raises(ValueError):
    losses.grpo_loss(x, x, None, jnp.zeros(4), x, beta=0.1)


def test_grpo_old_and_ref_logps_are_constants(rl_batch):
  """No gradient reaches old_logprobs or ref_logprobs; passing logps as old_logprobs gives the unclipped gradient
  -A / n."""
  r = rl_batch
  args = [jnp.asarray(r[k], jnp.float32) for k in ("logps", "old", "ref", "adv", "mask")]

  def loss_fn(logps, old, ref):
    return losses.grpo_loss(logps, old, ref, args[3], args[4], beta=0.04)[0]

  _, d_old, d_ref = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(*args[:3])
  np.testing.assert_array_equal(np.asarray(d_old), 0.0)
  np.testing.assert_array_equal(np.asarray(d_ref), 0.0)

  # At ratio 1 the token loss is -r * A with d(-r * A)/dlogp = -A; token_mean divides by the token count.
  first_update = lambda logps: losses.grpo_loss(logps, logps, None, args[3], args[4])[0]
  d_logps = jax.jit(jax.grad(first_update))(args[0])
  _close(d_logps, -r["adv"][:, None] * r["mask"] / r["mask"].sum())


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_grpo_empty_rows_and_non_finite_padding(rl_batch, aggregation):
  """A completion with no tokens and inf/NaN entropy on padding leave the loss finite and equal to the reference."""
  r = rl_batch
  mask = r["mask"].copy()
  mask[2] = 0  # an empty completion
  entropy = np.where(mask == 1, r["entropy"], np.inf)
  entropy[1, -1] = np.nan  # row 1 has 7 completion tokens: position 11 is padding
  loss, metrics = losses.grpo_loss(
      jnp.asarray(r["logps"], jnp.float32), jnp.asarray(r["old"], jnp.float32), jnp.asarray(r["ref"], jnp.float32),
      jnp.asarray(r["adv"], jnp.float32), jnp.asarray(mask), beta=0.04, aggregation=aggregation,
      entropy=jnp.asarray(entropy, jnp.float32), entropy_coef=0.01)
  expected = _np_grpo(r["logps"], r["old"], r["ref"], r["adv"], mask, entropy, eps_low=0.2, eps_high=0.2, beta=0.04,
                      aggregation=aggregation, max_tokens=None, entropy_coef=0.01)
  assert np.isfinite(expected)
  _close(loss, expected)
  _close(metrics["entropy"], r["entropy"][mask == 1].mean())
  # With no completion tokens at all every aggregation is 0, not 0 / 0.
  empty, _ = losses.grpo_loss(jnp.asarray(r["logps"], jnp.float32), jnp.asarray(r["old"], jnp.float32), None,
                              jnp.asarray(r["adv"], jnp.float32), jnp.zeros(mask.shape), aggregation=aggregation)
  assert float(empty) == 0.0


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages(scale_by_std):
  rng = np.random.default_rng(5)
  group_size = 4
  rewards = rng.normal(size=3 * group_size)
  rewards[8:12] = 1.0  # a group with no reward variance gets zero advantage, not NaN
  expected = np.empty_like(rewards)
  for start in range(0, rewards.size, group_size):
    group = rewards[start:start + group_size]
    centred = group - group.sum() / group_size
    std = np.sqrt(np.sum(centred ** 2) / (group_size - 1))
    expected[start:start + group_size] = centred / (std + 1e-4) if scale_by_std else centred
  advantages = losses.group_advantages(jnp.asarray(rewards), group_size, scale_by_std=scale_by_std)
  _close(advantages, expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(advantages[8:12]), 0.0)
  # Equal rewards whose float32 mean is inexact (0.3 x 8, 0.7 x 16) still give exactly 0, not ~1e-3.
  for value, size in ((0.3, 8), (0.7, 16), (-0.95, 16)):
    equal = losses.group_advantages(jnp.full((size,), value, jnp.float32), size, scale_by_std=scale_by_std)
    np.testing.assert_array_equal(np.asarray(equal), 0.0)


def test_group_advantages_rejects_bad_shapes():
  with pytest.raises(ValueError):
    losses.group_advantages(jnp.zeros(6), 4)  # 6 completions do not split into groups of 4
  with pytest.raises(ValueError):
    losses.group_advantages(jnp.zeros((2, 4)), 4)  # must be flat
  with pytest.raises(ValueError):
    losses.group_advantages(jnp.arange(3.0), 1)  # the unbiased std of one sample is undefined
  # Centring alone is defined for one completion per prompt: each is its own group mean.
  np.testing.assert_array_equal(np.asarray(losses.group_advantages(jnp.arange(3.0), 1, scale_by_std=False)), 0.0)


def test_a_negative_z_loss_is_an_error():
  h, kernel = jnp.zeros((1, 4, 8)), jnp.zeros((8, 16))
  targets, weights = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4))
  with pytest.raises(ValueError, match=r"z_loss=-0.001 must be >= 0"):
    losses.chunked_cross_entropy(h, kernel, targets, weights, z_loss=-1e-3)
