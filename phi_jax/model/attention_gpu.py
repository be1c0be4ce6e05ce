"""NVIDIA GPU attention through cuDNN's fused flash kernels, honouring packed segments.

Self-attention over packed rows (training, a prompt without a cache) goes through cuDNN's packed layout: each
document of a row is handed over as an offset and a length (`segment_runs`), and the kernel runs causal attention
inside each one, skipping cross-document tiles, with no mask in memory. The public `jax.nn.dot_product_attention`
takes one length per row and cannot describe several documents, so this path calls JAX's cuDNN module itself.
A batch the runs cannot describe (a row with more than `max_runs` documents, or a document id that comes back) and
every other call (a prompt against a KV cache) use `jax.nn.dot_product_attention` with the masking rule of
`phi_jax.model.attention` as a boolean [B, 1, T, S] mask, which cuDNN reads as a bias (plus cuDNN's causal mask
for self-attention). On an H100 that mask doubled attention's time at 8K tokens (BENCHMARKS.md); for very long
rows the mask's B * T * S bytes also add up, and the `"blockwise"` backend stays linear in memory.

cuDNN runs only on an NVIDIA GPU (elsewhere the backend is refused with a ValueError naming the one to use) and only
in bfloat16/float16: float32 inputs are computed in bfloat16 and cast back. With `implementation="xla"` the same
code (padding, the runs turned back into a mask, the dense mask, the GQA layout) runs on any device; the CPU suite
checks the wiring that way, and `gpu_check()` checks cuDNN's kernels.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi_jax.model.attention import attention_mask, backend_function, xla_attention

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Segment runs per row that the packed (ragged) cuDNN path describes (`PhiConfig.max_segments_per_row`); a batch
# with a row holding more falls back to the dense mask. cuDNN sizes its buffers for B * MAX_RUNS sequences: the
# softmax statistics are [B * MAX_RUNS, N, T] float32, and on an H100 (jax 0.11.2) the executable's scratch grew by
# about B * MAX_RUNS * N * T * H * 8 bytes, two float32 buffers of that many elements (97.5 GiB asked for one layer
# at B=8, T=8192, N=24, H=128, MAX_RUNS=64, where the formula gives 96 GiB: fitted to that one measurement).
MAX_RUNS = 8


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, *, q_segment_ids, kv_segment_ids, q_index, kv_index,
                    implementation="cudnn", max_runs=MAX_RUNS):
  """Same contract as `attention.xla_attention`. `implementation="xla"` runs this path without cuDNN.

  Self-attention over packed rows (one index array for queries and keys, as in training) goes through cuDNN's
  packed layout (`segment_runs`: each document's offset and length, causal inside each), with no dense mask; a
  batch whose rows it cannot describe exactly, and every other call (a prompt against a KV cache), use the dense
  boolean mask. `max_runs=0` forces the dense mask.
  """
  if implementation == "cudnn":
    _check_cuda_gpu()
  b, t, n, h = q_BTNH.shape
  s = k_BSKH.shape[1]
  # cuDNN's backward pass with a bias needs even sequence lengths; padded queries and keys get segment 0.
  t_pad, s_pad = t % 2, s % 2
  pad_time = lambda x, amount: jnp.pad(x, ((0, 0), (0, amount)) + ((0, 0),) * (x.ndim - 2))
  q, q_seg, q_idx = (pad_time(x, t_pad) for x in (q_BTNH, q_segment_ids, q_index))
  k, v, kv_seg, kv_idx = (pad_time(x, s_pad) for x in (k_BSKH, v_BSKH, kv_segment_ids, kv_index))
  compute_dtype = q.dtype if q.dtype in _CUDNN_DTYPES or implementation != "cudnn" else jnp.bfloat16
  q, k, v = (x.astype(compute_dtype) for x in (q, k, v))

  def dense(q, k, v):
    # With one index array for queries and keys, the index grows with the array position inside a segment, so
    # the rule's causal part is the array's lower triangle and cuDNN's own causal mask (which skips the tiles
    # above the diagonal) is exact; the boolean mask carries the segments.
    return jax.nn.dot_product_attention(
        q, k, v, mask=attention_mask(q_seg, kv_seg, q_idx, kv_idx)[:, None], scale=h ** -0.5,
        is_causal=self_attention, implementation=implementation)

  self_attention = q_index is kv_index and t == s
  # The packed path's key offsets are wrong under grouped-query attention in JAX releases before jax-ml/jax#39521
  # (no error, keys of other tokens): there, GQA rows take the dense mask.
  offsets_fit = implementation != "cudnn" or k_BSKH.shape[2] == n or cudnn_offsets_fit_grouped_keys()
  if self_attention and max_runs > 0 and offsets_fit:
    offsets, lengths, exact = segment_runs(q_seg, max_runs)
    packed = functools.partial(_packed_attention, seg=q_seg, offsets=offsets, lengths=lengths, scale=h ** -0.5,
                               implementation=implementation)
    out = jax.lax.cond(exact, packed, dense, q, k, v)
  else:
    out = dense(q, k, v)
  return out[:, :t].astype(q_BTNH.dtype)


def _check_cuda_gpu() -> None:
  """Without CUDA GPUs JAX fails deep in the lowering ("cuDNN is not detected."), naming neither the setting nor
  what to use instead. JAX tells CUDA apart from ROCm (also platform "gpu", and without cuDNN) the same way."""
  device = jax.devices()[0]  # the default backend's
  if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
    raise ValueError(f'attention_backend="cudnn" needs an NVIDIA GPU with CUDA, and JAX runs on '
                     f'{device.device_kind!r} here: set model.overrides={{"attention_backend": "xla"}} (or '
                     '"blockwise") on this host')


@functools.lru_cache(maxsize=1)
def cudnn_offsets_fit_grouped_keys() -> bool:
  """Whether this JAX scales the cuDNN packed layout's key offsets by the keys' own heads (fixed in
  jax-ml/jax#39521; before it, by the queries' heads). Probed on tiny arrays: 4 query heads, 2 kv heads of 2 dims,
  a run starting at token 2 starts at key element 2 x 2 x 2 = 8. Any failure of the probe counts as no."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # pylint: disable=import-outside-toplevel
    offsets, lengths = np.array([[0, 2, -1]], np.int32), np.array([[2, 2]], np.int32)
    with jax.ensure_compile_time_eval():  # called while the model is traced: values, not tracers
      fixed = cudnn_fmha._fix_seqlen_offsets(lengths, lengths, offsets, offsets, np.zeros((1, 4, 4, 2), np.float32),
                                             np.zeros((1, 4, 2, 2), np.float32))
      return np.asarray(fixed[3]).ravel()[:2].tolist() == [0, 8]
  except Exception:  # pylint: disable=broad-except  (a private function: any change of it means "unknown")
    return False


def segment_runs(segment_ids_BT, max_runs):
  """Each row's runs of one nonzero segment id, as cuDNN's packed layout takes them.

  Returns run starts [B, R + 1] and lengths [B, R] (-1 after a row's last run) with R = max(max_runs, 2), and
  whether they describe the whole batch exactly: at most `max_runs` runs per row, and every run's id above all ids
  before it in its row (an id that comes back after another would be two runs of one document, which may attend
  each other). R is at least 2 because JAX's cuDNN call reads the starts only when they have room for two or more
  runs a row; with room for one it would take each row's run to start at slot 0.
  """
  seg = segment_ids_BT
  room = max(max_runs, 2)
  before = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
  after = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
  starts, ends = (seg != 0) & (seg != before), (seg != 0) & (seg != after)
  first = lambda flags: jax.vmap(lambda row: jnp.nonzero(row, size=room, fill_value=-1)[0])(flags)
  start_at, end_at = first(starts).astype(jnp.int32), first(ends).astype(jnp.int32)
  lengths = jnp.where(start_at >= 0, end_at - start_at + 1, -1)
  offsets = jnp.concatenate([start_at, jnp.full((seg.shape[0], 1), -1, jnp.int32)], axis=1)
  increasing = jnp.where(starts, seg > jax.lax.cummax(before, axis=1), True)
  exact = jnp.all(jnp.sum(starts, axis=1) <= max_runs) & jnp.all(increasing)
  return offsets, lengths, exact


def _packed_attention(q, k, v, *, seg, offsets, lengths, scale, implementation):
  """Causal attention inside each run given by `offsets`/`lengths`. Tokens outside every run (padding) are
  zeroed going in and coming out, so whatever the kernel leaves there reaches neither outputs nor gradients."""
  valid = (seg != 0)[:, :, None, None]
  q, k, v = (jnp.where(valid, x, 0) for x in (q, k, v))
  if implementation == "cudnn":
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha  # the only entry point with segment offsets
    out = cudnn_fmha.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets, scale=scale,
        mask_type=cudnn_fmha.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
  else:  # the same runs as a dense mask: checks on any device that the offsets describe the documents
    position = jnp.arange(q.shape[1])
    inside = ((position >= offsets[:, :-1, None]) & (position < offsets[:, :-1, None] + lengths[:, :, None])
              & (lengths[:, :, None] > 0))  # [B, runs, T]
    run_of = jnp.where(inside.any(1), jnp.argmax(inside, axis=1) + 1, 0)
    mask = ((run_of[:, :, None] == run_of[:, None, :]) & (run_of[:, None, :] != 0)
            & (position[None, None, :] <= position[None, :, None]))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=implementation)
  return jnp.where(valid, out, 0)


def _packed_rows(batch, length, rng):
  """Segment ids with 2-3 documents per row and a padded tail, plus arange indices. With more than one row, the
  last holds the layouts the packed path treats apart: one-token documents and padding between documents."""
  seg = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, int(length * 0.9)), size=rng.integers(1, 3), replace=False))
    bounds = [0, *cuts, int(length * 0.9) + row]
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[row, start:end] = doc + 1
  if batch > 1:  # doc 1 of one token, padding, doc 2, doc 3 of one token, padding to the end
    seg[-1] = 0
    seg[-1, 0], seg[-1, 4:length // 2], seg[-1, length // 2] = 1, 2, 3
  return seg, np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))


def gpu_check(batch=2, length=4096, num_heads=24, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16, repeats=10,
              implementation="cudnn", backends=("xla", "cudnn", "cudnn_dense", "blockwise")):
  """On a GPU: each backend vs a float32 reference on packed rows (values and gradients), and their step times.

  The reference is the "xla" backend run in float32 on the same (`dtype`) inputs, so each backend's error can be
  read against the "xla" backend's own error in `dtype`: what rounding alone gives ("cudnn" takes the packed
  path on these rows, "cudnn_dense" the dense mask). Per backend `name`:
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
               "cudnn_dense": functools.partial(cudnn_attention, implementation=implementation, max_runs=0),
               "blockwise": backend_function("blockwise")}
  as_np = lambda x: np.asarray(x, np.float32)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):  # float32 products (XLA's default on a GPU is TF32)
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
