"""Shared by the memory tests: what a traced program would hold, read from its jaxpr."""

import jax
import numpy as np


def max_array_size(jaxpr) -> int:
  """Largest array (element count) produced anywhere in a jaxpr, including scan/cond/remat/pjit/custom-vjp bodies."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      largest = max(largest, max_array_size(sub))
  return largest
