"""NVIDIA GPU attention: cuDNN flash attention through `jax.nn.dot_product_attention`, honouring packed segments.

The public cuDNN entry point expresses padding only as one length per row (`query_seq_lengths`), which cannot
describe several documents packed into a row, so the backend passes the full masking rule of
`phi_jax.model.attention` as a boolean mask ([B, 1, T, S], shared by all heads); cuDNN applies it as an additive
bias inside its fused kernel. For self-attention over a row (training, a prompt without cache) it also sets
cuDNN's causal mask, so the kernel skips the tiles above the diagonal. The scores never reach memory, but the mask does: B * T * S bytes (bf16 bias: twice
that), fine at a few thousand tokens per row. For very long packed rows, the `"blockwise"` backend stays linear.

cuDNN runs only on an NVIDIA GPU and only in bfloat16/float16: float32 inputs are computed in bfloat16 and cast
back. With `implementation="xla"` the same code path (padding, mask, GQA layout) runs on any device; the CPU test
suite checks the wiring that way, and `gpu_check()` checks the cuDNN kernel itself on a GPU.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model.attention import attention_mask, backend_function, xla_attention

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, *, q_segment_ids, kv_segment_ids, q_index, kv_index,
                    implementation="cudnn"):
  """Same contract as `attention.xla_attention`. `implementation="xla"` runs this path without cuDNN."""
  b, t, n, h = q_BTNH.shape
  s = k_BSKH.shape[1]
  # cuDNN's backward pass with a bias needs even sequence lengths; padded queries and keys get segment 0.
  t_pad, s_pad = t % 2, s % 2
  pad_time = lambda x, amount: jnp.pad(x, ((0, 0), (0, amount)) + ((0, 0),) * (x.ndim - 2))
  q, q_seg, q_idx = (pad_time(x, t_pad) for x in (q_BTNH, q_segment_ids, q_index))
  k, v, kv_seg, kv_idx = (pad_time(x, s_pad) for x in (k_BSKH, v_BSKH, kv_segment_ids, kv_index))
  mask_B1TS = attention_mask(q_seg, kv_seg, q_idx, kv_idx)[:, None]
  # Self-attention over packed rows (one index array for queries and keys, as in training): inside a segment the
  # index grows with the array position, so the rule's causal part is the array's lower triangle, and cuDNN's own
  # causal mask (which skips the tiles above the diagonal: half the work) is exact; the boolean mask still
  # carries the segments. Any other call (a prompt against a KV cache) relies on the mask alone.
  is_causal = q_index is kv_index and t == s
  compute_dtype = q.dtype if q.dtype in _CUDNN_DTYPES or implementation != "cudnn" else jnp.bfloat16
  out = jax.nn.dot_product_attention(
      q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype), mask=mask_B1TS,
      scale=h ** -0.5, is_causal=is_causal, implementation=implementation)
  return out[:, :t].astype(q_BTNH.dtype)


def _packed_rows(batch, length, rng):
  """Segment ids with 2-3 documents per row and a padded tail, plus arange indices."""
  seg = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, int(length * 0.9)), size=rng.integers(1, 3), replace=False))
    bounds = [0, *cuts, int(length * 0.9) + row]
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[row, start:end] = doc + 1
  return seg, np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))


def gpu_check(batch=2, length=4096, num_heads=24, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16, repeats=10,
              implementation="cudnn", backends=("xla", "cudnn", "blockwise")):
  """On a GPU: each backend vs a float32 reference on packed rows (values and gradients), and their step times.

  The reference is the "xla" backend run in float32 on the same (`dtype`) inputs, so each backend's error can be
  read against the "xla" backend's own error in `dtype`: what rounding alone gives. Per backend `name`:
  `{name}_ms` (one jitted forward + backward), `{name}_out_rel_err` (||out - ref|| / ||ref|| over valid queries)
  and `{name}_out_max_abs_err`, and the same two for dq, dk and dv (everywhere). With the default
  `implementation="cudnn"` it runs only on an NVIDIA GPU; `"xla"` runs the cuDNN path's code anywhere.
  """
  rng = np.random.default_rng(0)
  seg, idx = _packed_rows(batch, length, rng)
  q, k, v, weights = (jnp.asarray(rng.normal(size=shape), dtype) for shape in (
      (batch, length, num_heads, head_dim), (batch, length, num_kv_heads, head_dim),
      (batch, length, num_kv_heads, head_dim), (batch, length, num_heads, head_dim)))
  weights = weights.astype(jnp.float32) * jnp.asarray(seg != 0, jnp.float32)[:, :, None, None]
  seg, idx = jnp.asarray(seg), jnp.asarray(idx)

  def loss_and_grads(backend):
    def loss(q, k, v):
      out = backend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_index=idx, kv_index=idx)
      return jnp.sum(out.astype(jnp.float32) * weights), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  functions = {"xla": xla_attention, "cudnn": functools.partial(cudnn_attention, implementation=implementation),
               "blockwise": backend_function("blockwise")}
  as_np = lambda x: np.asarray(x, np.float32)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  (_, out_ref), grads_ref = jax.block_until_ready(loss_and_grads(xla_attention)(*upcast))
  valid = np.asarray(seg != 0)[:, :, None, None]
  references = {"out": as_np(out_ref) * valid, **{g: as_np(x) for g, x in zip(("dq", "dk", "dv"), grads_ref)}}
  results = {f"{g}_max_abs": float(np.max(np.abs(x))) for g, x in references.items()}
  for name in backends:
    step = loss_and_grads(functions[name])
    (_, out), grads = jax.block_until_ready(step(q, k, v))
    start = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(step(q, k, v))
    results[f"{name}_ms"] = (time.perf_counter() - start) / repeats * 1e3
    for g, actual in zip(("out", "dq", "dk", "dv"), (as_np(out) * valid, *map(as_np, grads))):
      diff = actual - references[g]
      results[f"{name}_{g}_max_abs_err"] = float(np.max(np.abs(diff)))
      results[f"{name}_{g}_rel_err"] = float(np.linalg.norm(diff) / np.linalg.norm(references[g]))
  return results
