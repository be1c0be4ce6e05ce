"""Train step (forward + backward + AdamW) tokens/s and MFU: phi_jax against transformers + torch, same run.

    .venv/bin/python benchmarks/train_step.py [--threads 2] [--repeats 7] [--batch 1] [--backend blockwise]

Both sides train the same Phi-3-shaped model (d=512, 8 layers, 8 query / 2 kv heads, FFN 1536, vocab 8192,
float32) on the same random [batch, 1024] tokens with cross-entropy over every position, global-norm clipping
at 1.0 and AdamW. phi_jax runs `make_train_step` (jitted, state donated, chunked cross-entropy, the attention
backend of `--backend`: "blockwise" by default, the faster one on CPU at this length);
transformers runs `Phi3ForCausalLM(...)(input_ids, labels=...)`, `loss.backward()`,
`clip_grad_norm_` and `torch.optim.AdamW.step()`, with the fused AdamW that transformers' Trainer (and TRL)
use by default (`optim="adamw_torch_fused"`; `--torch_adamw` picks torch's "foreach" or per-tensor "loop"
implementation instead). The steps are timed interleaved (A B A B ...) after a warm-up, and the JSON holds both
medians, the ratio, and MFU against the measured float32 matmul peak of the machine (`_common.matmul_peak_flops`,
measured before and after the steps, the higher one: a machine whose speed drifts is not credited with a low
peak), with model FLOPs from `phi_jax.train.flops`.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _extra(parser):
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--backend", default="blockwise", help="phi_jax attention backend")
  parser.add_argument("--remat", default="none", help="phi_jax remat policy")
  parser.add_argument("--torch_adamw", choices=("fused", "foreach", "loop"), default="fused",
                      help="torch's AdamW implementation (transformers' default optim is the fused one)")


ARGS = _common.parse_args("train_step", __doc__.splitlines()[0], _extra)
_common.pin_threads(ARGS.threads)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from phi_jax import sharding  # noqa: E402
from phi_jax.model import PhiConfig  # noqa: E402
from phi_jax.stages import next_token  # noqa: E402
from phi_jax.train import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer  # noqa: E402
from phi_jax.train.flops import train_flops_per_token  # noqa: E402
from phi_jax.train.state import state_shardings  # noqa: E402
from phi_jax.train.step import make_train_step  # noqa: E402

LEARNING_RATE = 1e-4


def hf_config(config: PhiConfig):
  return transformers.Phi3Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
      rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False,
      bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


def jax_step_fn(config: PhiConfig, tokens: np.ndarray):
  """A zero-argument callable running one phi_jax train step (state carried across calls)."""
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  opt_cfg = OptimizerConfig(learning_rate=LEARNING_RATE, decay="constant", max_grad_norm=1.0, weight_decay=0.0)
  optimizer = make_optimizer(opt_cfg, 1000)
  batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape),
           "segment_ids": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
  batch = jax.device_put(batch, jax.devices()[0])
  step = make_train_step(next_token.make_loss_fn(config, chunk_size=1024), optimizer,
                         learning_rate_schedule(opt_cfg, 1000), mesh, state_shardings(config, optimizer, mesh), batch)
  holder = {"state": create_train_state(config, optimizer, mesh, jax.random.key(0))}
  rng = jax.random.key(1)

  def run():
    holder["state"], metrics = step(holder["state"], batch, rng)
    jax.block_until_ready(metrics["loss"])
    return metrics

  return run


def torch_step_fn(config: PhiConfig, tokens: np.ndarray):
  torch.manual_seed(0)
  model = transformers.Phi3ForCausalLM(hf_config(config)).train()
  implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                **implementation[ARGS.torch_adamw])
  input_ids = torch.from_numpy(tokens.astype(np.int64))

  def run():
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  return run


def main():
  config = _common.bench_config(ARGS.smoke, attention_backend=ARGS.backend, remat_policy=ARGS.remat)
  batch, seq = (2, 64) if ARGS.smoke else (ARGS.batch, ARGS.seq)
  repeats = 2 if ARGS.smoke else ARGS.repeats
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
  compile_s = {}
  steps = {"phi_jax": jax_step_fn(config, tokens), "transformers": torch_step_fn(config, tokens)}
  peak_size, peak_repeats = (256, 3) if ARGS.smoke else (2048, 10)
  peak_before = _common.matmul_peak_flops(peak_size, peak_repeats)
  for name, fn in steps.items():
    compile_s[name] = _common.timed(fn)  # first call: compile (JAX) / allocator warm-up (torch)
  # One untimed interleaved round, so that every timed step follows one step of the other side, the first included:
  # warmed up one side after the other, the first timed phi_jax step came right after two torch steps and took
  # 0.8-1.0 s of system time (page faults) against ~0.2 s on later steps.
  _common.interleaved(steps, 1)
  times = _common.interleaved(steps, repeats)
  peak = max(peak_before, _common.matmul_peak_flops(peak_size, peak_repeats), key=lambda p: p["peak_flops_per_s"])
  flops_per_token = train_flops_per_token(config, seq)
  tokens_per_step = batch * seq
  result = {"benchmark": "train_step", "smoke": ARGS.smoke, "machine": _common.machine(), "threads": ARGS.threads,
            "model": {"hidden": config.hidden_size, "layers": config.num_layers, "heads": config.num_heads,
                      "kv_heads": config.num_kv_heads, "ffn": config.intermediate_size, "vocab": config.vocab_size,
                      "params": config.num_params(), "dtype": config.dtype,
                      "attention_backend": config.attention_backend, "remat": config.remat_policy},
            "batch": batch, "seq_len": seq, "repeats": repeats, "matmul_peak": peak,
            "matmul_peak_before_steps": peak_before, "torch_adamw": ARGS.torch_adamw,
            "model_flops_per_token": flops_per_token, "first_call_s": compile_s}
  for name, seconds in times.items():
    median = statistics.median(seconds)
    result[name] = {**_common.summary(seconds), "tokens_per_s": tokens_per_step / median,
                    "mfu": flops_per_token * tokens_per_step / median / peak["peak_flops_per_s"]}
  result["speedup_phi_jax_over_transformers"] = (result["phi_jax"]["tokens_per_s"]
                                                 / result["transformers"]["tokens_per_s"])
  _common.write(ARGS, result)


if __name__ == "__main__":
  main()
