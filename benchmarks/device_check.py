"""The prepared single-GPU check: phi-4-mini train-step MFU, GPU attention vs the reference, decode tokens/s.

    bash benchmarks/device_check.sh            # on one H100; JSON to $OUT (or ./device_check_out)
    .venv/bin/python benchmarks/device_check.py --smoke   # CPU, toy sizes: checks the script itself

1. Attention: `attention_gpu.gpu_check` compares the "xla", cuDNN and blockwise backends (bf16) with a float32
   reference on packed rows (outputs and dq/dk/dv) and times each. It runs first: it is short, and it is the
   correctness check.
2. Train step: phi-4-mini (3.8B, 32 layers, LongRoPE with placeholder factors, random weights), bf16 compute,
   packed rows of 8K tokens (several documents per row), the attention backend `--backend` (cuDNN) and remat
   `--remat`. The largest batch that fits is found ahead of time: batches from `--max_batch` down are compiled
   and the first whose buffer assignment (arguments + temporaries) fits in 92% of the memory JAX may allocate
   (`bytes_limit`: XLA_PYTHON_CLIENT_MEM_FRACTION, 0.95 in device_check.sh, of the device's) runs.
   MFU = model FLOPs (`phi_jax.train.flops`, remat not counted) per second / 989 TFLOP/s (H100 SXM dense bf16).
   If the step fails with `--backend`, it is run once more with `--fallback_backend` (blockwise).
3. Decode: `phi_jax.sampling.generate` on the same model, batch `--decode_batch`, 128-token prompts, 256 new
   tokens, greedy; tokens/s over the whole call (prefill included) after a warm-up call.
4. What the packed-segment mask costs cuDNN at the train shape: one layer's attention with the mask vs cuDNN's
   causal mask alone (fwd and fwd+bwd ms).
5. Opt-in, `--parts decode_long`: decode `--decode_long_tokens` new tokens with the blocked decode attention
   (only the filled part of the cache) and again in one pass over the whole cache.
6. If fewer than `--alt_before_s` seconds have passed: the train step again with remat `--alt_remat` (saves the
   weight matmuls' outputs: fewer FLOPs, more memory, a smaller batch), as "train_alt".
Each part writes its figures as soon as it ends, so a run cut short still leaves what it measured. The exit
status is non-zero when a requested part failed (its "error" is in the JSON), and outside `--smoke` the script
stops at once unless JAX runs on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PARTS = ("attention", "mask_cost", "train", "decode", "decode_long", "train_alt")  # in the order they run


def _parts(value: str) -> str:
  """--parts, checked while parsing: a misspelt name would otherwise run nothing and still succeed."""
  unknown = [name for name in value.split(",") if name not in PARTS]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(map(repr, unknown))}; "
                                     f"give a comma-separated list of: {', '.join(PARTS)}")
  return value


def _extra(parser):
  parser.add_argument("--seq", type=int, default=8192)
  parser.add_argument("--max_batch", type=int, default=8)
  parser.add_argument("--backend", default="cudnn")
  parser.add_argument("--fallback_backend", default="blockwise", help="used if the train step fails with --backend")
  parser.add_argument("--remat", default="full")
  parser.add_argument("--param_dtype", default="bfloat16",
                      help="bfloat16 keeps params + AdamW moments at 6 bytes per parameter (23 GB for 3.8B)")
  parser.add_argument("--alt_remat", default="dots_with_no_batch_dims",
                      help="a second train step with this remat, run last if --alt_before_s has not passed")
  parser.add_argument("--alt_before_s", type=float, default=300.0)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--attention_backends", default="xla,cudnn,cudnn_dense,blockwise")
  parser.add_argument("--parts", default="attention,mask_cost,train,decode,train_alt", type=_parts,
                      help=f"which parts to run, of {','.join(PARTS)} (always in that order)")
  parser.add_argument("--profile", action="store_true",
                      help="trace one more train step with jax.profiler; the perfetto trace goes next to --out, as "
                      "NAME_train_step.trace.json.gz for --out NAME.json")
  parser.add_argument("--decode_batch", type=int, default=64)
  parser.add_argument("--decode_long_tokens", type=int, default=2048, help="new tokens of the decode_long part")
  parser.add_argument("--peak_tflops", type=float, default=989.0)


ARGS = _common.parse_args("device_check", __doc__.splitlines()[0], _extra)
if ARGS.smoke:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import phi_jax  # noqa: E402
from phi_jax import sharding  # noqa: E402
from phi_jax.model import attention_gpu, presets  # noqa: E402
from phi_jax.sampling import SamplingConfig, generate  # noqa: E402
from phi_jax.stages import next_token  # noqa: E402
from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer  # noqa: E402
from phi_jax.train.flops import train_flops_per_token  # noqa: E402
from phi_jax.train.state import abstract_state, state_shardings  # noqa: E402
from phi_jax.train.step import make_train_step  # noqa: E402


def log(message):
  print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_config(backend, remat=None):
  if ARGS.smoke:  # the phi-4-mini features (partial rotary, LongRoPE, tied embeddings, GQA) at toy size
    config = presets.get("phi-4-mini", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, original_max_position_embeddings=64,
                         max_position_embeddings=1024, dtype="float32", attention_backend="xla")
  else:
    config = presets.get("phi-4-mini", attention_backend=backend)
  # Placeholder LongRoPE factors: speed and memory do not depend on their values (they live in the checkpoint).
  ones = (1.0,) * (config.rotary_dim // 2)
  return config.replace(rope_short_factor=ones, rope_long_factor=tuple(4.0 for _ in ones),
                        remat_policy=remat or ARGS.remat, param_dtype=ARGS.param_dtype)


def packed_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """Rows of 3-6 documents of random lengths filling the row, positions restarting per document."""
  rng = np.random.default_rng(seed)
  out = {name: np.zeros((batch, seq), np.int32) for name in ("tokens", "positions", "segment_ids", "loss_mask")}
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(64, seq - 64), rng.integers(2, 6), replace=False))
    bounds = [0, *cuts, seq]
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
      out["segment_ids"][row, start:end] = doc + 1
      out["positions"][row, start:end] = np.arange(end - start)
  out["tokens"] = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  out["loss_mask"][:] = 1
  return out


def device_memory_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("bytes_limit", 0)) or float("inf")


def train_check(config, record, key="train"):
  seq = 256 if ARGS.smoke else ARGS.seq
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  opt_cfg = OptimizerConfig(learning_rate=1e-5, decay="constant", max_grad_norm=1.0)
  optimizer = make_optimizer(opt_cfg, 1000)
  loss_fn = next_token.make_loss_fn(config, chunk_size=1024)
  shardings = state_shardings(config, optimizer, mesh)
  state_shapes = abstract_state(config, optimizer, mesh)
  limit = 0.92 * device_memory_bytes()
  tried = []
  batch_size = ARGS.max_batch if not ARGS.smoke else 2
  while batch_size >= 1:
    shapes = {k: jax.ShapeDtypeStruct((batch_size, seq), np.int32) for k in ("tokens", "positions", "segment_ids",
                                                                             "loss_mask")}
    step = make_train_step(loss_fn, optimizer, learning_rate_schedule(opt_cfg, 1000), mesh, shardings, shapes)
    start = time.perf_counter()
    compiled = step.lower(state_shapes, shapes, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
    memory = compiled.memory_analysis()
    peak = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    tried.append({"batch": batch_size, "compile_s": time.perf_counter() - start, "peak_gib": peak / 2**30})
    log(f"{key}: batch {batch_size} compiled: {tried[-1]}")
    record[key] = {"tried": tried}
    if peak <= limit:
      break
    batch_size //= 2
  if batch_size < 1:
    record[key]["error"] = "no batch fits"
    return
  state = create_train_state(config, optimizer, mesh, jax.random.key(0))
  batch = jax.device_put(packed_batch(batch_size, seq, config.vocab_size), jax.devices()[0])
  rng = jax.random.key(1)
  state, metrics = compiled(state, batch, rng)  # warm-up
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(2 if ARGS.smoke else ARGS.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  log(f"{key}: step times {times}")
  step_s = float(np.median(times))
  tokens = batch_size * seq
  flops = train_flops_per_token(config, seq) * tokens
  record[key].update(batch=batch_size, seq_len=seq, backend=config.attention_backend, remat=config.remat_policy,
                         param_dtype=config.param_dtype, step_s=times, median_step_s=step_s,
                         tokens_per_s=tokens / step_s, model_tflops_per_s=flops / step_s / 1e12,
                         mfu=flops / step_s / (ARGS.peak_tflops * 1e12), loss=float(metrics["loss"]))
  if not np.isfinite(record[key]["loss"]):  # a step that computes garbage fast is no MFU figure
    raise FloatingPointError(f"{key}: the step's loss is {record[key]['loss']}; its times are recorded, but they "
                             "measure a wrong computation")
  if ARGS.profile and key == "train":
    _common.write(ARGS, record)  # the measured step is kept even if tracing takes the process down
    try:  # a profiler failure (e.g. no CUPTI access) is not a failure of the step: no fallback rerun
      profile_step(lambda: jax.block_until_ready(compiled(state, batch, rng)[1]["loss"]))
    except Exception as error:  # pylint: disable=broad-except
      record[key]["profile_error"] = f"{type(error).__name__}: {error}"[:2000]
      log(f"profile failed: {record[key]['profile_error'][:300]}")


# Past this relative error against the float32 reference a backend is wrong, not rounded: bfloat16 rounding gives
# the "xla" backend itself ~2e-3 on these rows (H100, 2026-11-26), and a kernel attending to wrong keys ~0.9.
MAX_ATTENTION_REL_ERR = 2e-2


def attention_check(record):
  if ARGS.smoke:
    record["attention"] = attention_gpu.gpu_check(batch=2, length=128, num_heads=4, num_kv_heads=2, head_dim=16,
                                                  repeats=2, implementation="xla")
  else:
    record["attention"] = attention_gpu.gpu_check(batch=4, length=4096,
                                                  backends=tuple(ARGS.attention_backends.split(",")))
  wrong = [f"{key}={value:.3g}" for key, value in record["attention"].items()
           if key.endswith("_rel_err") and not value < MAX_ATTENTION_REL_ERR]
  if wrong:  # the part fails (the script exits non-zero), its figures kept
    raise AssertionError(f"attention backend(s) disagree with the float32 reference beyond {MAX_ATTENTION_REL_ERR}: "
                         f"{', '.join(wrong)}")


def mask_cost_check(record):
  """What packed segments cost cuDNN: fwd and fwd+bwd ms of one phi-4-mini attention layer on 8K rows, through
  the packed layout (the backend), the dense segment mask, and cuDNN's causal mask alone (wrong for packed rows:
  the bound for any segment-aware kernel)."""
  import jax.numpy as jnp
  b, t, n, k, h = (2, 256, 4, 2, 16) if ARGS.smoke else (ARGS.max_batch, ARGS.seq, 24, 8, 128)
  implementation = "xla" if ARGS.smoke else "cudnn"
  rng = np.random.default_rng(0)
  q, key, v = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
               for shape in ((b, t, n, h), (b, t, k, h), (b, t, k, h)))
  seg = jnp.asarray(packed_batch(b, t, 2)["segment_ids"])
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  variants = {
      "segment_runs": lambda q, key, v: attention_gpu.cudnn_attention(
          q, key, v, q_segment_ids=seg, kv_segment_ids=seg, q_index=idx, kv_index=idx, implementation=implementation),
      "segment_mask": lambda q, key, v: attention_gpu.cudnn_attention(
          q, key, v, q_segment_ids=seg, kv_segment_ids=seg, q_index=idx, kv_index=idx, implementation=implementation,
          max_runs=0),
      "causal_only": lambda q, key, v: jax.nn.dot_product_attention(q, key, v, is_causal=True,
                                                                     implementation=implementation),
  }
  result = {"shape": [b, t, n, k, h]}
  for name, fn in variants.items():
    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda q, key, v: jnp.sum(fn(q, key, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    for label, run in (("fwd", lambda: fwd(q, key, v)), ("fwd_bwd", lambda: grad(q, key, v))):
      jax.block_until_ready(run())
      result[f"{name}_{label}_ms"] = 1e3 * float(np.median([_common.timed(lambda: jax.block_until_ready(run()))
                                                           for _ in range(5)]))
  record["mask_cost"] = result


def decode_check(config, record, key="decode", new_tokens=256):
  batch, prompt_len = (4, 16) if ARGS.smoke else (ARGS.decode_batch, 128)
  new_tokens = 8 if ARGS.smoke else new_tokens
  # Decoding keeps the weights in the compute dtype, as a rollout worker would.
  params = jax.jit(lambda rng: phi_jax.init_params(config.replace(param_dtype=config.dtype), rng))(jax.random.key(0))
  prompts = np.random.default_rng(0).integers(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
  lengths = np.full((batch,), prompt_len, np.int32)
  sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
  run = lambda: jax.block_until_ready(generate(params, config, prompts, lengths, jax.random.key(0), sampling)["tokens"])
  first = _common.timed(run)
  times = [_common.timed(run) for _ in range(2)]
  record[key] = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "first_call_s": first,
                 "call_s": times, "tokens_per_s": batch * new_tokens / float(np.median(times))}


def decode_long_check(config, record):
  """A long generation twice: `decode_attention` in blocks up to the last filled slot (the default), then in one
  pass over the whole cache. Opt-in (`--parts decode_long`): two compiles and two long calls each."""
  from phi_jax.model import attention
  defaults = dict(attention._DECODE_BLOCK_BYTES)
  try:
    for key, block_bytes in (("decode_long_blocked", None), ("decode_long_one_pass", 1 << 62)):
      attention._DECODE_BLOCK_BYTES.update({k: block_bytes or v for k, v in defaults.items()})
      jax.clear_caches()  # the block size is read when `generate` is traced
      decode_check(config, record, key, ARGS.decode_long_tokens)
      record[key]["block_bytes"] = dict(attention._DECODE_BLOCK_BYTES)
      _common.write(ARGS, record)
  finally:
    attention._DECODE_BLOCK_BYTES.update(defaults)
  record["decode_long"] = {"speedup_blocked_over_one_pass": record["decode_long_blocked"]["tokens_per_s"]
                           / record["decode_long_one_pass"]["tokens_per_s"]}


def profile_step(run):
  """One traced step; its perfetto trace is copied next to --out (the profiler nests it several folders deep)."""
  import glob
  import shutil
  import tempfile
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run()
  for path in glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True):
    # Named after --out, so each run's trace stays next to its JSON.
    shutil.copy(path, os.path.splitext(os.path.abspath(ARGS.out))[0] + "_train_step.trace.json.gz")
    log(f"profile: {path}")


def train_with_fallback(record):
  failed = None
  try:
    train_check(model_config(ARGS.backend), record)
  except Exception as error:  # e.g. a cuDNN version without the masked kernel: still measure the step
    # A step that ran but computed a non-finite loss is a wrong backend, not a missing one: the part fails.
    if ARGS.smoke or ARGS.fallback_backend in ("", ARGS.backend) or isinstance(error, FloatingPointError):
      raise
    log(f"train with {ARGS.backend} failed ({type(error).__name__}: {str(error)[:300]}); "
        f"running {ARGS.fallback_backend}")
    failed = {"backend": ARGS.backend, "error": f"{type(error).__name__}: {error}"[:2000]}
  if failed is None:
    return
  # Only now, outside the `except` block: while the exception lived, its traceback kept the failed attempt's
  # frames (train state, batch, executable: about 23 GB for phi-4-mini) on the device.
  gc.collect()
  record["train"] = {}
  train_check(model_config(ARGS.fallback_backend), record)
  record["train"]["failed_first"] = failed


def require_gpu():
  """Outside --smoke, stops unless JAX runs on a GPU: with a CPU jaxlib, or CUDA failing to start (JAX then falls
  back to the CPU), the 3.8B train step would run on the CPU until the time limit."""
  if ARGS.smoke or jax.default_backend() == "gpu":
    return
  sys.exit(f"device_check: JAX's default backend is {jax.default_backend()!r}, not 'gpu' (devices: "
           f"{jax.devices()[:2]}). Install a CUDA build of jaxlib (jax[cuda13]) in the environment that runs "
           "this script and check that CUDA starts (JAX logs why it fell back), or pass --smoke for the CPU toy run.")


def main():
  require_gpu()
  config = model_config(ARGS.backend)
  record = {"benchmark": "device_check", "smoke": ARGS.smoke, "machine": _common.machine(),
            "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
            "jax_version": jax.__version__, "peak_tflops": ARGS.peak_tflops, "model_params": config.num_params(),
            # False: this JAX misplaces the packed layout's grouped keys, so GQA attention takes the dense mask.
            "cudnn_offsets_fit_grouped_keys": attention_gpu.cudnn_offsets_fit_grouped_keys()}
  begin = time.perf_counter()
  log(f"{record['device_kind']}, jax {jax.__version__}, {config.num_params() / 1e9:.2f}B params")
  backend = lambda: record.get("train", {}).get("backend", ARGS.backend)  # the one the train step ran with
  for name, part in (("attention", lambda: attention_check(record)), ("mask_cost", lambda: mask_cost_check(record)),
                     ("train", lambda: train_with_fallback(record)),
                     ("decode", lambda: decode_check(model_config(backend()), record)),
                     ("decode_long", lambda: decode_long_check(model_config(backend()), record)),
                     ("train_alt", lambda: train_check(model_config(backend(), ARGS.alt_remat), record, "train_alt"))):
    if name not in ARGS.parts.split(",") or (
        name == "train_alt" and (not ARGS.alt_remat or time.perf_counter() - begin > ARGS.alt_before_s)):
      continue
    start = time.perf_counter()
    log(f"{name}: start")
    try:
      part()
    except Exception as error:  # a failed part must not hide the figures of the others
      record.setdefault(name, {})["error"] = f"{type(error).__name__}: {error}"[:2000]
    record.setdefault(name, {})["wall_s"] = time.perf_counter() - start
    log(f"{name}: {record[name]}")
    _common.write(ARGS, record)
  failed = [name for name in PARTS if "error" in record.get(name, {})]
  if failed:  # after the JSON is written: the other parts' figures stay
    sys.exit(f"device_check: part(s) {', '.join(failed)} failed; their \"error\" entries are in {ARGS.out}")


if __name__ == "__main__":
  main()
