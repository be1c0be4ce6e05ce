"""Device mesh, logical-axis rules and multi-host start-up."""

from phi_jax.sharding.mesh import MESH_AXES, make_mesh, resolve_mesh_shape
from phi_jax.sharding.rules import (LOGICAL_AXIS_RULES, batch_sharding, logical_shardings, mesh_context,
                                    replicated)
