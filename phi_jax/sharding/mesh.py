"""A device mesh from a {axis: size} dict, e.g. {"data": 2, "fsdp": -1, "tensor": 1}; -1 takes the rest."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# data: pure data parallel (params replicated); fsdp: data parallel with params/optimizer sharded (ZeRO-3);
# tensor: heads / ffn / vocab split across devices (Megatron-style).
MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one -1 entry (if any) so the product equals num_devices; missing axes are 1."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh.shape has unknown axes {sorted(unknown)}; use only {MESH_AXES}")
  not_ints = {axis: size for axis, size in shape.items()
              if isinstance(size, bool) or not isinstance(size, (int, np.integer))}
  if not_ints:  # int() would cut 1.5 to 1 and read True as 1
    raise ValueError(f"mesh.shape={dict(shape)}: sizes must be integers (or -1), got {not_ints}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh.shape={dict(shape)} has more than one -1 axis ({free}); at most one may take the rest")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh.shape={dict(shape)}: sizes must be positive or -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh.shape={dict(shape)}: the fixed axes use {fixed} devices, which does not divide the "
                       f"{num_devices} available; change the sizes so their product divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh.shape={dict(shape)} needs {fixed} devices but {num_devices} are available; make the "
                     f"product of the sizes equal {num_devices}, or set one axis to -1")
  return sizes


def make_mesh(shape: Optional[Mapping[str, int]] = None, devices: Optional[Sequence] = None) -> Mesh:
  """Mesh over all (global) devices; the default puts every device on `fsdp`."""
  devices = list(devices if devices is not None else jax.devices())
  try:
    sizes = resolve_mesh_shape(shape or {"fsdp": -1}, len(devices))
  except ValueError as e:
    if jax.default_backend() != "cpu" or "available" not in str(e):  # only a device-count mismatch
      raise
    raise ValueError(f"{e}. On a CPU, simulate devices by starting the process with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N (N devices)") from None
  dims = tuple(sizes[axis] for axis in MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))

