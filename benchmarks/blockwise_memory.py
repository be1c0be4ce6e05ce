"""Peak memory of forward + backward against sequence length with the blockwise attention backend.

    .venv/bin/python benchmarks/blockwise_memory.py [--lengths 4096,8192,16384,32768]

For one row of T tokens the script compiles (ahead of time, nothing runs) the gradient of the next-token loss of
the benchmark model (d=512, 8 layers, 8/2 heads, vocab 8192, float32, no remat) and reads XLA's buffer
assignment: arguments (params + batch) + temporaries is the peak the compiled program can reach. With the
blockwise backend the temporaries must grow linearly in T (bytes per token roughly constant); the reference "xla"
backend, which materialises [heads, T, T] scores, is compiled at the shorter lengths for contrast.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _extra(parser):
  parser.add_argument("--lengths", default="4096,8192,16384,32768")
  parser.add_argument("--reference_lengths", default="4096,8192", help="lengths also compiled with 'xla'")


ARGS = _common.parse_args("blockwise_memory", __doc__.splitlines()[0], _extra)
_common.pin_threads(ARGS.threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import phi_jax  # noqa: E402
from phi_jax.stages import next_token  # noqa: E402

GIB = 2.0 ** 30


def compiled_memory(config, seq_len: int) -> dict:
  loss_fn = next_token.make_loss_fn(config, chunk_size=1024)
  grad_fn = jax.jit(jax.grad(lambda params, batch: loss_fn(params, batch, None)[0]))
  params = jax.eval_shape(lambda: phi_jax.init_params(config, jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((1, seq_len), jnp.int32) for k in ("tokens", "positions", "segment_ids",
                                                                       "loss_mask")}
  start = time.perf_counter()
  memory = grad_fn.lower(params, batch).compile().memory_analysis()
  # The gradients are outputs of their own (nothing is donated): the peak holds them beside the arguments.
  outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
  return {"seq_len": seq_len, "compile_s": time.perf_counter() - start,
          "argument_gib": memory.argument_size_in_bytes / GIB, "temp_gib": memory.temp_size_in_bytes / GIB,
          "output_gib": outputs / GIB,
          "peak_gib": (memory.argument_size_in_bytes + memory.temp_size_in_bytes + outputs) / GIB,
          "temp_bytes_per_token": memory.temp_size_in_bytes / seq_len}


def main():
  lengths = [1024, 2048, 4096] if ARGS.smoke else sorted({int(x) for x in ARGS.lengths.split(",") if x})
  if not lengths:
    raise SystemExit("blockwise_memory: --lengths names no sequence length (e.g. --lengths 4096,8192)")
  reference_lengths = [256] if ARGS.smoke else [int(x) for x in ARGS.reference_lengths.split(",") if x]
  result = {"benchmark": "blockwise_memory", "smoke": ARGS.smoke, "machine": _common.machine(),
            "method": "XLA buffer assignment of the compiled grad program (arguments + temporaries + outputs), "
                      "batch 1"}
  for backend, backend_lengths in (("blockwise", lengths), ("xla", reference_lengths)):
    config = _common.bench_config(ARGS.smoke, attention_backend=backend)
    result[backend] = [compiled_memory(config, t) for t in backend_lengths]
  runs = result["blockwise"]
  per_token = [r["temp_bytes_per_token"] for r in runs]
  result["blockwise_per_token_growth"] = max(per_token) / min(per_token)
  # Linear: each added token costs the same temporaries (within 10%) from one length to the next. The average per
  # token is no test at short lengths, where a fixed overhead spread over more tokens makes it fall.
  marginal = [(b["temp_gib"] - a["temp_gib"]) * GIB / (b["seq_len"] - a["seq_len"]) for a, b in zip(runs, runs[1:])]
  result["blockwise_marginal_bytes_per_token"] = marginal
  # None with one length: nothing to compare.
  result["blockwise_linear"] = (min(marginal) > 0 and max(marginal) / min(marginal) < 1.1) if marginal else None
  _common.write(ARGS, result)


if __name__ == "__main__":
  main()
