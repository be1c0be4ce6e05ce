"""Ahead-of-time compile time of the phi-4 (14B, 40 layers) train step on CPU, with its per-device memory plan.

    .venv/bin/python benchmarks/compile_phi4.py [--seq 4096] [--batch 8] [--remat full]

What `experiments/train.py --dry_run` does, timed in parts: on 8 simulated CPU devices with an fsdp=8 mesh,
the next-token train step of phi-4 (bf16 compute, float32 params and AdamW moments, remat "full") is traced and
lowered from abstract shapes (`jax.ShapeDtypeStruct`, no weights), then compiled. The persistent compilation
cache is off, so the figure is a cold compile. Layers run under `nn.scan`, so this time does not grow with depth.
"""

from __future__ import annotations

import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _extra(parser):
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--remat", default="full")


ARGS = _common.parse_args("compile_phi4", __doc__.splitlines()[0], _extra)
_common.pin_threads(ARGS.threads)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from phi_jax import sharding  # noqa: E402
from phi_jax.model import presets  # noqa: E402
from phi_jax.stages import next_token  # noqa: E402
from phi_jax.train import OptimizerConfig, learning_rate_schedule, make_optimizer  # noqa: E402
from phi_jax.train.state import abstract_state  # noqa: E402
from phi_jax.train.step import batch_shardings, make_train_step  # noqa: E402

GIB = 2.0 ** 30
BATCH_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def main():
  jax.config.update("jax_enable_compilation_cache", False)
  name = "tiny" if ARGS.smoke else "phi-4"
  config = presets.get(name, remat_policy=ARGS.remat)
  shape = (8, 64) if ARGS.smoke else (ARGS.batch, ARGS.seq)
  mesh = sharding.make_mesh({"fsdp": 8})
  opt_cfg = OptimizerConfig(learning_rate=1e-5, warmup_steps=10)
  optimizer = make_optimizer(opt_cfg, 1000)
  start = time.perf_counter()
  state = abstract_state(config, optimizer, mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32) for k in BATCH_FIELDS}
  shardings = batch_shardings(batch, mesh)
  step = make_train_step(next_token.make_loss_fn(config), optimizer, learning_rate_schedule(opt_cfg, 1000), mesh,
                         jax.tree.map(lambda s: s.sharding, state), batch)
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=shardings[k]) for k in BATCH_FIELDS}
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = step.lower(state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result = {"benchmark": "compile_phi4", "smoke": ARGS.smoke, "machine": _common.machine(), "preset": name,
            "params": config.num_params(), "layers": config.num_layers, "remat": config.remat_policy,
            "mesh": dict(mesh.shape), "global_batch": list(shape),
            "abstract_state_s": setup_s, "trace_and_lower_s": lower_s, "compile_s": compile_s,
            "total_s": setup_s + lower_s + compile_s,
            "per_device_gib": {"arguments": memory.argument_size_in_bytes / GIB,
                               "temporaries": memory.temp_size_in_bytes / GIB,
                               "peak_estimate": (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / GIB}}
  _common.write(ARGS, result)


if __name__ == "__main__":
  main()
