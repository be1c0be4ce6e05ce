"""Mesh shapes and logical-axis rules: how `mesh.shape` resolves, which dimensions each mesh axis splits, and that
the sampler's batch layout is the training step's."""

import functools

import jax
import pytest
from jax.sharding import PartitionSpec as P

from phi_jax import sharding
from phi_jax.model import init_params, param_logical_axes, presets
from phi_jax.train.step import batch_shardings

TINY = presets["tiny"]  # vocab 512, hidden 64, mlp 128, 4 query heads and 2 kv heads of 16, 2 layers


@pytest.mark.parametrize("shape,sizes", [
    ({"fsdp": -1}, {"data": 1, "fsdp": 8, "tensor": 1}),
    ({"data": 2, "tensor": -1}, {"data": 2, "fsdp": 1, "tensor": 4}),  # the rest: 8 / 2
    ({"tensor": 2, "data": -1}, {"data": 4, "fsdp": 1, "tensor": 2}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
])
def test_mesh_shape_fills_the_free_axis_and_defaults_the_missing_ones_to_one(shape, sizes):
  assert sharding.resolve_mesh_shape(shape, 8) == sizes
  assert dict(sharding.make_mesh(shape).shape) == sizes


@pytest.mark.parametrize("shape", [{"data": 0, "fsdp": -1}, {"data": 0}, {"fsdp": -2}])
def test_zero_or_negative_mesh_sizes_are_refused(shape):
  with pytest.raises(ValueError, match="sizes must be positive or -1"):
    sharding.resolve_mesh_shape(shape, 8)


@pytest.mark.parametrize("shape", [{"data": 1.5, "fsdp": -1}, {"data": 2.9, "fsdp": 4}, {"tensor": True, "fsdp": -1}])
def test_mesh_sizes_that_are_not_integers_are_refused(shape):
  """They were cut to integers: 1.5 data-parallel replicas ran as 1, True as a 1-way tensor axis."""
  with pytest.raises(ValueError, match="sizes must be integers"):
    sharding.resolve_mesh_shape(shape, 8)


def test_each_mesh_axis_splits_the_dimensions_it_stands_for():
  """data replicates parameters, fsdp splits the hidden (embed) dimension, tensor splits vocab, heads and mlp."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shapes = jax.eval_shape(lambda: init_params(TINY, jax.random.key(0)))
  shardings = sharding.logical_shardings(param_logical_axes(TINY), mesh, shapes)
  expected = {  # full -> per device: hidden 64 / fsdp 2; vocab 512, heads 4 and 2, mlp 128 / tensor 2
      ("embed", "embedding"): ((512, 64), (256, 32)),
      ("lm_head", "kernel"): ((64, 512), (32, 256)),
      ("layers", "attn", "q"): ((2, 64, 4, 16), (2, 32, 2, 16)),
      ("layers", "attn", "k"): ((2, 64, 2, 16), (2, 32, 1, 16)),
      ("layers", "attn", "o"): ((2, 4, 16, 64), (2, 2, 16, 32)),
      ("layers", "mlp", "down"): ((2, 128, 64), (2, 64, 32)),
      ("final_norm", "scale"): ((64,), (64,)),
  }
  for path, (full, per_device) in expected.items():
    leaf = functools.reduce(lambda tree, key: tree[key], path, shardings)
    assert leaf.shard_shape(full) == per_device, path


def test_an_uneven_split_over_two_mesh_axes_counts_both():
  """A dimension split over data x fsdp must divide by their product, not by either one."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rows = jax.ShapeDtypeStruct((6, 3), jax.numpy.float32)  # 6 rows: even for data (2) or fsdp (2), not for 2 x 2
  with pytest.raises(ValueError, match=r"dimension of 6 that mesh axes \('data', 'fsdp'\) \(size 4\)"):
    sharding.logical_shardings({"x": P("batch", None)}, mesh, {"x": rows})
  sharding.logical_shardings({"x": P("batch", None)}, mesh, {"x": jax.ShapeDtypeStruct((8, 3), jax.numpy.float32)})


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "tensor": 2}, {"fsdp": -1}])
def test_sampler_batches_are_laid_out_like_training_batches(shape):
  """Prompts put on the mesh by `batch_sharding` sit on the devices the training step expects its rows on, so the
  model's activation constraints agree with both; time is never split."""
  mesh = sharding.make_mesh(shape)
  ours = sharding.batch_sharding(mesh)
  training = batch_shardings({"tokens": jax.ShapeDtypeStruct((16, 8), jax.numpy.int32)}, mesh)["tokens"]
  assert ours.is_equivalent_to(training, 2)
  rows = 16 // (mesh.shape["data"] * mesh.shape["fsdp"])
  assert ours.shard_shape((16, 8)) == (rows, 8)


_RESHARD_PROBE = """
import sys
import jax
from phi_jax import sharding
from phi_jax.model import presets
from phi_jax.stages import next_token
from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer
from phi_jax.train.state import state_shardings
from phi_jax.train.step import batch_shardings, make_train_step
config, opt_cfg = presets["tiny"], OptimizerConfig(learning_rate=1e-3)
mesh = sharding.make_mesh(eval(sys.argv[1]))
opt = make_optimizer(opt_cfg, 2)
state = create_train_state(config, opt, mesh, jax.random.key(0))
batch = {k: jax.ShapeDtypeStruct((16, 32), "int32") for k in ("tokens", "positions", "segment_ids", "loss_mask")}
batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for (k, v), s in
         zip(batch.items(), batch_shardings(batch, mesh).values())}
step = make_train_step(next_token.make_loss_fn(config, chunk_size=16), opt, learning_rate_schedule(opt_cfg, 2), mesh,
                       state_shardings(config, opt, mesh), batch)
step.lower(state, batch, jax.random.key(1)).compile()
print("compiled")
"""


@pytest.mark.parametrize("shape", ['{"data": 2, "fsdp": 2, "tensor": 2}', '{"data": 2, "fsdp": 4}'])
def test_the_train_step_keeps_every_activation_split_over_the_batch_axes(shape):
  """No "involuntary full rematerialization" when XLA partitions the step: the embedding lookup from the
  D-sharded table computed the whole global batch's rows on every device on data x fsdp meshes. Compiled in a
  process of its own with the compilation cache off, so XLA partitions it (a cached program prints nothing)."""
  import os
  import subprocess
  import sys
  from xla_flags import xla_flags
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices=8), JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  proc = subprocess.run([sys.executable, "-c", _RESHARD_PROBE, shape], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
  assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]


def test_an_eager_call_inside_the_mesh_context_needs_no_placed_params():
  """The lookup's table constraint (data x fsdp meshes) applies to traced calls only; an eager call with params on
  one device ran before it and still does."""
  import numpy as np
  import phi_jax
  from phi_jax.sharding import rules
  params = init_params(TINY, jax.random.key(0))
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  with rules.mesh_context(sharding.make_mesh({"data": 2, "fsdp": 4})):
    eager = phi_jax.forward(params, tokens, TINY)
  np.testing.assert_allclose(eager, phi_jax.forward(params, tokens, TINY), rtol=1e-5, atol=1e-5)


def test_a_failed_process_keeps_its_own_error_and_names_the_others(monkeypatch):
  """raise_if_any_failed on one process of two: its error, with the other process's error text as a note; and its
  error, not the gather's, when the gather itself fails (another process sat in another collective)."""
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
  monkeypatch.setattr(distributed, "allgather_json", lambda text: [text, "DataError: eval.jsonl:4: invalid JSON"])
  with pytest.raises(ValueError, match="bad eval batch") as raised:
    distributed.raise_if_any_failed(ValueError("bad eval batch"), "reading the eval data")
  assert raised.value.__notes__ == ["process 1: DataError: eval.jsonl:4: invalid JSON"]
  with pytest.raises(RuntimeError, match=r"reading the eval data failed on process\(es\) \[1\].*eval.jsonl:4"):
    distributed.raise_if_any_failed(None, "reading the eval data")

  def mismatched(text):
    raise TypeError("the value to gather is not JSON-serialisable on process(es) [1]")

  monkeypatch.setattr(distributed, "allgather_json", mismatched)
  with pytest.raises(OSError, match="No space left") as raised:
    distributed.raise_if_any_failed(OSError(28, "No space left on device"), "writing the reference log-probs")
  assert isinstance(raised.value.__cause__, TypeError)
