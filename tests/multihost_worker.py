"""One process of a two-process CPU run (see test_resume.py::test_two_processes_equal_one): each process feeds
its half of every global batch and prints the losses as JSON on its last line."""

import json
import os
import sys

from xla_flags import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from phi_jax.sharding import distributed  # noqa: E402

distributed.initialize()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_train  # noqa: E402  (same config, batches and step as the single-process tests)

half = test_train.packed_batches(test_train.NUM_STEPS)
rows = slice(4 * jax.process_index(), 4 * (jax.process_index() + 1))
local = [{k: v[rows] for k, v in b.items()} for b in half]
losses, _, _ = test_train.run_steps({"fsdp": -1}, batches=local)
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses}))
