"""The one table from logical axis names (on every parameter and activation) to mesh axes."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Activates the mesh and rules, so the model's logical activation constraints take effect while tracing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _check_divisible(path, shape, spec, mesh):
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    size = 1
    for axis in axes:
      size *= mesh.shape[axis]
    if dim % size:
      raise ValueError(
          f"parameter {path} has a dimension of {dim} that mesh axes {axes} (size {size}) cannot split evenly; "
          f"choose a mesh.shape whose {'x'.join(axes)} size divides {dim}")


def logical_shardings(logical_axes_tree, mesh: Mesh, shapes=None, rules=LOGICAL_AXIS_RULES):
  """Maps a tree of logical PartitionSpecs to NamedShardings; with `shapes`, checks every split is even."""
  specs = nn.logical_to_mesh(logical_axes_tree, rules)
  if shapes is not None:
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    flat_shapes = jax.tree.leaves(shapes)
    for (path, spec), shape in zip(flat_specs, flat_shapes):
      _check_divisible(jax.tree_util.keystr(path), shape.shape, spec, mesh)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """[B, T] arrays: batch split over data x fsdp, time unsplit."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
