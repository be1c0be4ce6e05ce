"""Every benchmark script runs end to end at toy sizes (`--smoke`) and writes the JSON its docs promise.

No timing is asserted here: speed lives in the benchmarks, correctness in the other tests. What is checked is
that each script's measurements exist and are sane (positive times, both sides measured, the greedy outputs of
phi_jax and transformers agree on shared weights, the device check's attention comparison is close).
"""

import importlib.util
import json
import os
import subprocess
import sys
import weakref

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
  assert result["blockwise_linear"] is True, result["blockwise_marginal_bytes_per_token"]


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
  assert isinstance(result["cudnn_offsets_fit_grouped_keys"], bool)


def test_device_check_fails_a_backend_that_attends_to_the_wrong_keys(tmp_path):
  """The check compares each backend with the float32 reference: a packed path reading other tokens' keys must
  fail the part (and the script) with its figures kept, not be reported beside an MFU."""
  script = (
      "import runpy, sys\n"
      "import jax.numpy as jnp\n"
      "from phi_jax.model import attention_gpu\n"
      "real = attention_gpu._packed_attention\n"
      "attention_gpu._packed_attention = lambda q, k, v, **kw: real(q, jnp.flip(k, 1), v, **kw)\n"
      f"sys.argv = ['benchmarks/device_check.py', '--smoke', '--parts', 'attention', '--out', '{tmp_path}/dc.json']\n"
      "runpy.run_path('benchmarks/device_check.py', run_name='__main__')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "part(s) attention failed" in proc.stderr, proc.stderr[-2000:]
  with open(tmp_path / "dc.json") as f:
    attention = json.load(f)["attention"]
  assert "disagree with the float32 reference" in attention["error"] and attention["cudnn_out_rel_err"] > 0.1


def device_check_env(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  env["XLA_FLAGS"] = xla_flags()
  return env


def test_device_check_runs_in_one_out_keep_their_files(tmp_path):
  """Two runs into one $OUT (as a lent GPU session makes them): the second must not erase the first's figures."""
  for parts in ("attention", "mask_cost"):
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--smoke", "--threads", "1", "--parts", parts],
                          cwd=ROOT, env=device_check_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
  with open(tmp_path / "device_check.json") as f:
    first = json.load(f)
  with open(tmp_path / "device_check_2.json") as f:
    second = json.load(f)
  assert "attention" in first and "mask_cost" not in first
  assert "mask_cost" in second and "attention" not in second
  assert "attention: start" in (tmp_path / "device_check.log").read_text()
  assert "mask_cost: start" in (tmp_path / "device_check_2.log").read_text()
  # The card each run saw, too (nvidia-smi's output, or its error where there is none).
  assert (tmp_path / "device_check_nvidia_smi.csv").exists() and (tmp_path / "device_check_2_nvidia_smi.csv").exists()


def run_device_check_py(tmp_path, *args):
  return subprocess.run([sys.executable, "benchmarks/device_check.py", "--threads", "1",
                         "--out", str(tmp_path / "device_check.json"), *args],
                        cwd=ROOT, env=device_check_env(tmp_path), capture_output=True, text=True, timeout=600)


def test_device_check_refuses_to_run_without_a_gpu(tmp_path):
  """Outside --smoke, a CPU backend (a CPU jaxlib, or CUDA failing to start) would train 3.8B parameters on the CPU
  until the time limit: the script must stop at once and say why."""
  proc = run_device_check_py(tmp_path, "--parts", "mask_cost")
  assert proc.returncode != 0
  assert "'gpu'" in proc.stderr and "--smoke" in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "device_check.json").exists()


def test_device_check_exit_code_reports_a_failed_part(tmp_path):
  proc = run_device_check_py(tmp_path, "--smoke", "--parts", "train_alt", "--alt_remat", "no_such_policy")
  assert proc.returncode != 0, proc.stdout[-3000:]
  with open(tmp_path / "device_check.json") as f:  # the figures are written before the exit
    assert "no_such_policy" in json.load(f)["train_alt"]["error"]


def test_device_check_refuses_unknown_parts(tmp_path):
  proc = run_device_check_py(tmp_path, "--smoke", "--parts", "attention,trian")
  assert proc.returncode == 2
  assert "'trian'" in proc.stderr and "decode_long" in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "device_check.json").exists()


@pytest.fixture
def device_check(monkeypatch, tmp_path):
  """benchmarks/device_check.py imported as a module with real-run arguments and a tiny phi-4-mini-shaped model, so
  its train step and fallback run here on the CPU at toy sizes."""
  monkeypatch.setattr(sys, "argv", ["device_check.py", "--backend", "xla", "--fallback_backend", "blockwise",
                                    "--seq", "256", "--max_batch", "2", "--steps", "1",
                                    "--out", str(tmp_path / "device_check.json")])
  spec = importlib.util.spec_from_file_location("device_check_under_test",
                                                os.path.join(ROOT, "benchmarks", "device_check.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from phi_jax.model import presets  # pylint: disable=import-outside-toplevel

  def tiny(backend, remat=None):
    config = presets.get("phi-4-mini", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, original_max_position_embeddings=64,
                         max_position_embeddings=1024, dtype="float32", attention_backend=backend)
    ones = (1.0,) * (config.rotary_dim // 2)
    return config.replace(rope_short_factor=ones, rope_long_factor=tuple(4.0 for _ in ones), remat_policy="none")

  monkeypatch.setattr(module, "model_config", tiny)
  return module


def test_device_check_fallback_starts_after_the_failed_attempt_is_freed(device_check, monkeypatch):
  """A train step failing at run time (after its state exists) must not keep that state alive while the fallback
  backend sizes its batch: for phi-4-mini it is about 23 GB of an 80 GB card."""
  import jax  # pylint: disable=import-outside-toplevel
  before = {id(x) for x in jax.live_arrays()}
  first_attempt = []  # weak references to the arrays the failed attempt created

  def failing_batch(*args, **kwargs):
    first_attempt.extend(weakref.ref(x) for x in jax.live_arrays() if id(x) not in before)
    raise RuntimeError("simulated failure after create_train_state")

  alive_at_fallback = []

  def fallback(config, record, key="train"):
    alive_at_fallback.append(sum(ref() is not None for ref in first_attempt))
    record[key]["backend"] = config.attention_backend

  real_train_check = device_check.train_check
  monkeypatch.setattr(device_check, "packed_batch", failing_batch)
  monkeypatch.setattr(device_check, "train_check", lambda config, record, key="train": (
      real_train_check(config, record, key) if not first_attempt else fallback(config, record, key)))
  record = {}
  device_check.train_with_fallback(record)
  assert first_attempt, "the failing attempt created no arrays"
  assert alive_at_fallback == [0]
  assert record["train"]["backend"] == "blockwise" and "simulated" in record["train"]["failed_first"]["error"]


def test_device_check_a_non_finite_loss_fails_the_part_with_no_fallback(device_check, monkeypatch):
  """A backend whose step computes a NaN loss is wrong, not missing: its figures are not replaced by the fallback
  backend's (which would let the script pass)."""
  calls = []

  def nan_step(config, record, key="train"):
    calls.append(config.attention_backend)
    raise FloatingPointError(f"{key}: the step's loss is nan")

  monkeypatch.setattr(device_check, "train_check", nan_step)
  with pytest.raises(FloatingPointError, match="loss is nan"):
    device_check.train_with_fallback({})
  assert len(calls) == 1


def test_device_check_profiler_failure_keeps_the_measured_step(device_check, monkeypatch):
  """--profile traces one more step after the timed ones; a profiler error must neither discard the times nor
  rerun the train step with the fallback backend."""
  monkeypatch.setattr(device_check.ARGS, "profile", True)

  def broken_profiler(run):
    raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES (simulated)")

  monkeypatch.setattr(device_check, "profile_step", broken_profiler)
  record = {}
  device_check.train_with_fallback(record)
  train = record["train"]
  assert train["backend"] == "xla" and "failed_first" not in train, train
  assert train["median_step_s"] > 0 and "CUPTI" in train["profile_error"]


def test_more_threads_than_usable_cpus_are_refused(tmp_path):
  """torch would start them all while XLA takes only the CPUs the process may run on: an unfair comparison. The
  default is those CPUs (the process's affinity, not the node's core count)."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import _common  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"--threads=\d+ exceeds the \d+ CPUs this process may run on"):
    _common.pin_threads(_common.usable_cpus() + 1)
  assert _common.usable_cpus() == len(os.sched_getaffinity(0))
