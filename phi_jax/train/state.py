"""TrainState and its creation directly in its shards (never the full model on one device)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from phi_jax.model import PhiConfig, init_params, param_logical_axes
from phi_jax.sharding import logical_shardings, replicated


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def param_shardings(config: PhiConfig, mesh: Mesh):
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return logical_shardings(param_logical_axes(config), mesh, shapes=shapes)


def state_shardings(config: PhiConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """Shardings of every leaf: params by the logical rules, optimizer moments like their params, scalars replicated."""
  p_shardings = param_shardings(config, mesh)
  abstract_params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt, p_shardings,
      transform_non_params=lambda _: replicated(mesh))
  return TrainState(step=replicated(mesh), params=p_shardings, opt_state=opt_shardings)


def abstract_state(config: PhiConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs with shardings: the target for restoring a checkpoint onto this mesh."""
  shardings = state_shardings(config, optimizer, mesh)
  shapes = jax.eval_shape(lambda: _fresh_state(config, optimizer, jax.random.key(0)))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _fresh_state(config, optimizer, rng, params=None):
  params = init_params(config, rng) if params is None else params
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def create_train_state(config: PhiConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rng,
                       params: Optional[Any] = None) -> TrainState:
  """Initialises (or wraps given, already sharded `params`) inside jit with out_shardings, so each device only
  ever allocates its own shard."""
  shardings = state_shardings(config, optimizer, mesh)
  if params is None:
    make: Callable = jax.jit(lambda rng: _fresh_state(config, optimizer, rng), out_shardings=shardings)
    return make(rng)
  # Given params take the config's param_dtype (load_hf(..., dtype="bfloat16") under a float32 config): kept as
  # they came, the weights and AdamW moments trained in that dtype, and the run could not resume (its checkpoint
  # no longer fit the config's state).
  wanted = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  as_configured = lambda params: jax.tree.map(lambda p, w: p.astype(w.dtype), params, wanted)
  make = jax.jit(lambda params: _fresh_state(config, optimizer, None, as_configured(params)), out_shardings=shardings)
  return make(params)
