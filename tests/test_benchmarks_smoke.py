"""Every benchmark script runs end to end at toy sizes (`--smoke`) and writes the JSON its docs promise.

No timing is asserted here: speed lives in the benchmarks, correctness in the other tests. What is checked is
that each script's measurements exist and are sane (positive times, both sides measured, the greedy outputs of
phi_jax and transformers agree on shared weights, the device check's attention comparison is close).
"""

import json
import os
import subprocess
import sys

import pytest
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke(script, tmp_path, *extra):
  out = tmp_path / f"{script}.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  env["XLA_FLAGS"] = xla_flags()  # the scripts choose their own devices
  proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--smoke", "--threads", "1", "--out", str(out),
                         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_train_step(tmp_path):
  result = run_smoke("train_step", tmp_path)
  for side in ("phi_jax", "transformers"):
    assert len(result[side]["all_s"]) == result["repeats"] and result[side]["tokens_per_s"] > 0
    assert 0 < result[side]["mfu"]
  assert result["matmul_peak"]["peak_flops_per_s"] > 0 and result["machine"]["cpu_model"]
  assert result["machine"]["vector_isa"] in ("avx512f", "avx2", "sse4_2", "other")
  assert result["speedup_phi_jax_over_transformers"] == pytest.approx(
      result["phi_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"])


def test_generation(tmp_path):
  result = run_smoke("generation", tmp_path)
  assert [run["batch"] for run in result["runs"]] == [2, 4]
  for run in result["runs"]:
    assert run["phi_jax"]["tokens_per_s"] > 0 and run["transformers"]["tokens_per_s"] > 0
    assert run["first_token_agreement"] == 1.0  # same weights, greedy: both sides run the same model


def test_blockwise_memory(tmp_path):
  result = run_smoke("blockwise_memory", tmp_path)
  lengths = [r["seq_len"] for r in result["blockwise"]]
  assert lengths == sorted(lengths) and len(lengths) == 3
  peaks = [r["peak_gib"] for r in result["blockwise"]]
  assert peaks == sorted(peaks) and peaks[0] > 0
  assert isinstance(result["blockwise_linear"], bool)


def test_compile_phi4(tmp_path):
  result = run_smoke("compile_phi4", tmp_path)
  assert result["preset"] == "tiny" and result["mesh"]["fsdp"] == 8
  assert result["compile_s"] > 0 and result["per_device_gib"]["arguments"] > 0


def test_grpo_step(tmp_path):
  result = run_smoke("grpo_step", tmp_path)
  assert len(result["steps"]) == 1
  for part in ("generation_s", "reward_s", "update_s"):
    assert result["median"][part] > 0
  assert sum(result["share"].values()) == pytest.approx(1.0)


def test_device_check_script(tmp_path):
  """`bash benchmarks/device_check.sh` is the one command run on an H100; here its CPU smoke mode, output to $OUT."""
  env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  env["XLA_FLAGS"] = xla_flags()
  parts = "attention,mask_cost,train,decode,decode_long,train_alt"  # the defaults and the opt-in decode_long
  proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--smoke", "--threads", "1", "--parts", parts],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:]
  with open(tmp_path / "device_check.json") as f:
    result = json.load(f)
  for part in ("train", "attention", "decode", "decode_long"):
    assert "error" not in result[part], result[part]
  assert result["train"]["batch"] >= 1 and result["train"]["mfu"] > 0
  attention = result["attention"]
  # bfloat16 inputs against the float32 reference: rounding-level error.
  for name in ("xla", "cudnn", "cudnn_dense", "blockwise"):
    assert all(attention[f"{name}_{g}_rel_err"] < 0.02 for g in ("out", "dq", "dk", "dv")), attention
  assert result["decode"]["tokens_per_s"] > 0
  assert result["decode_long"]["speedup_blocked_over_one_pass"] > 0
  assert result["decode_long_one_pass"]["block_bytes"]["cpu"] > result["decode_long_blocked"]["block_bytes"]["cpu"]


def test_more_threads_than_usable_cpus_are_refused(tmp_path):
  """torch would start them all while XLA takes only the CPUs the process may run on: an unfair comparison. The
  default is those CPUs (the process's affinity, not the node's core count)."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import _common  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"--threads=\d+ exceeds the \d+ CPUs this process may run on"):
    _common.pin_threads(_common.usable_cpus() + 1)
  assert _common.usable_cpus() == len(os.sched_getaffinity(0))
