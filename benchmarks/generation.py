"""Generation tokens/s: phi_jax's jitted KV-cache sampler against transformers `generate` with its KV cache.

    .venv/bin/python benchmarks/generation.py [--threads 2] [--repeats 3] [--batches 8,64]

Same model as `train_step.py` (d=512, 8 layers, 8/2 heads, vocab 8192, float32, random weights shared by both
sides), prompts of 128 random tokens per row, 256 new tokens, greedy, no stop tokens (every row generates all
256). phi_jax runs `phi_jax.sampling.generate` (prefill + `lax.while_loop` of `decode_step`, one program);
transformers runs `model.generate(..., do_sample=False, use_cache=True)` with its dynamic KV cache. Timed
interleaved after a warm-up; tokens/s counts generated tokens (batch x 256) over the whole call, prefill included.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _extra(parser):
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", default="8,64")
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=256)


ARGS = _common.parse_args("generation", __doc__.splitlines()[0], _extra)
_common.pin_threads(ARGS.threads)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import phi_jax  # noqa: E402
from phi_jax.hf.checkpoint import save_hf  # noqa: E402
from phi_jax.sampling import SamplingConfig, generate  # noqa: E402


def main():
  import tempfile

  config = _common.bench_config(ARGS.smoke)
  batches = [2, 4] if ARGS.smoke else [int(b) for b in ARGS.batches.split(",")]
  prompt_len, new_tokens = (16, 8) if ARGS.smoke else (ARGS.prompt_len, ARGS.new_tokens)
  repeats = 2 if ARGS.smoke else ARGS.repeats
  params = phi_jax.init_params(config, jax.random.key(0))
  with tempfile.TemporaryDirectory() as tmp:  # the same weights on both sides
    save_hf(tmp, config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
  sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
  result = {"benchmark": "generation", "smoke": ARGS.smoke, "machine": _common.machine(), "threads": ARGS.threads,
            "model_params": config.num_params(), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "runs": []}
  for batch in batches:
    prompts = np.random.default_rng(batch).integers(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    lengths = np.full((batch,), prompt_len, np.int32)
    input_ids = torch.from_numpy(prompts.astype(np.int64))

    def ours():
      out = generate(params, config, prompts, lengths, jax.random.key(0), sampling)
      return jax.block_until_ready(out["tokens"])

    def theirs():
      with torch.inference_mode():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    first_call = {"phi_jax": _common.timed(ours), "transformers": _common.timed(theirs)}
    times = _common.interleaved({"phi_jax": ours, "transformers": theirs}, repeats)
    run = {"batch": batch, "first_call_s": first_call}
    for name, seconds in times.items():
      run[name] = {**_common.summary(seconds), "tokens_per_s": batch * new_tokens / statistics.median(seconds)}
    run["speedup_phi_jax_over_transformers"] = run["phi_jax"]["tokens_per_s"] / run["transformers"]["tokens_per_s"]
    # Greedy decoding of identical weights: the first generated tokens agree (later ones may drift on near-ties).
    ours_tokens = np.asarray(ours())
    theirs_tokens = theirs()[:, prompt_len:].numpy()
    run["first_token_agreement"] = float(np.mean(ours_tokens[:, 0] == theirs_tokens[:, 0]))
    result["runs"].append(run)
    _common.write(ARGS, result)  # after every batch size, so a long run cut short keeps what it measured


if __name__ == "__main__":
  main()
