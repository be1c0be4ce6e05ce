"""Shared pieces of the benchmark scripts: arguments, machine description, interleaved timing, JSON output.

Every benchmark is a script run from the repository root (`python benchmarks/NAME.py [--smoke] [--out F]`) that
prints one JSON object and writes it to `--out` (default `benchmarks/results/NAME.json`). `--smoke` runs the
same code path at toy sizes, for the test suite; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def parse_args(name: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the script runs end to end")
  parser.add_argument("--out", default=None, help=f"JSON output path (default {RESULTS_DIR}/{name}.json; with "
                      f"--smoke, {name}_smoke.json in the temporary directory, so a smoke run leaves the recorded "
                      "results alone)")
  parser.add_argument("--threads", type=int, default=usable_cpus(),
                      help="CPU threads for JAX and torch alike (default: the CPUs this process may run on)")
  if extra is not None:
    extra(parser)
  args = parser.parse_args()
  if args.out is None:
    args.out = (os.path.join(tempfile.gettempdir(), f"{name}_smoke.json") if args.smoke
                else os.path.join(RESULTS_DIR, f"{name}.json"))
  return args


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity: a taskset, cgroup cpuset or container limit), not the node's."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def pin_threads(threads: int) -> None:
  """Gives XLA and torch the same number of CPU threads. Must run before JAX creates its CPU client."""
  if threads > usable_cpus():  # torch would take them all, XLA only the CPUs it may run on
    raise ValueError(f"--threads={threads} exceeds the {usable_cpus()} CPUs this process may run on")
  # XLA's CPU client sizes its Eigen intra-op pool from the CPUs this process may run on.
  if hasattr(os, "sched_setaffinity") and threads < len(os.sched_getaffinity(0)):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    import torch
  except ImportError:
    return
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)


def machine() -> dict[str, Any]:
  """Where the figures came from: CPU model, cores, load, library versions, date."""
  info: dict[str, Any] = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                          "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                          "load_average_1m_5m_15m": list(os.getloadavg())}
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    info["cpu_model"] = fields.get("Model name", "").strip()
    info["cpus"] = int(fields.get("CPU(s)", "0").strip() or 0)
    # "AMD EPYC" names several generations; family/model and the widest vector unit tell them apart.
    info["cpu_family_model"] = f"{fields.get('CPU family', '?').strip()}/{fields.get('Model', '?').strip()}"
    flags = set(fields.get("Flags", "").split())
    info["vector_isa"] = next((isa for isa in ("avx512f", "avx2", "sse4_2") if isa in flags), "other")
  except (OSError, subprocess.CalledProcessError):
    info["cpu_model"] = platform.processor()
  import jax
  info["jax"] = jax.__version__
  info["jax_devices"] = [str(d) for d in jax.devices()[:2]]
  try:
    import torch
    import transformers
    info.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads())
  except ImportError:
    pass
  return info


def timed(fn: Callable[[], Any]) -> float:
  """Seconds for one call of `fn` (which must block until its result is ready)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Times each function `repeats` times in the order A B A B ..., so load changes hit all of them alike."""
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return times


def summary(seconds: list[float]) -> dict[str, Any]:
  return {"median_s": statistics.median(seconds), "min_s": min(seconds), "all_s": seconds}


def write(args, result: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  json.dump(result, sys.stdout, indent=2)
  print()


def matmul_peak_flops(size: int, repeats: int) -> dict[str, float]:
  """Measured float32 matmul FLOP/s of this machine (the MFU denominator): the best of JAX and torch on a square
  [size, size] x [size, size] product, each the median of `repeats` calls."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  flops = 2.0 * size ** 3
  a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
  ja = jnp.asarray(a)
  jax_matmul = jax.jit(lambda x: x @ x)
  jax_matmul(ja).block_until_ready()
  ta = torch.from_numpy(a)
  torch.mm(ta, ta)
  times = interleaved({"jax": lambda: jax_matmul(ja).block_until_ready(), "torch": lambda: torch.mm(ta, ta)},
                      repeats)
  rates = {f"{name}_flops_per_s": flops / statistics.median(t) for name, t in times.items()}
  rates["peak_flops_per_s"] = max(rates.values())
  return rates


def bench_config(smoke: bool, **overrides):
  """The mid-size Phi-3-shaped model of the train-step and generation benchmarks (a toy one with `smoke`)."""
  from phi_jax.model import PhiConfig

  if smoke:
    return PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     **overrides)
  return PhiConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2,
                   max_position_embeddings=4096, **overrides)
