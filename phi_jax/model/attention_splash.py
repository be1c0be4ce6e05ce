"""TPU attention: the Pallas splash-attention kernel with segment ids, grouped-query heads and a causal mask.

Splash attention takes a static mask (here causal, `kv slot <= query slot`) and-ed with dynamic segment ids, and
skips the tiles the static mask empties. Grouped-query attention uses the multi-query kernel (G query heads
against one kv head) mapped over the K kv heads, so K/V are never repeated.

Precondition: the causal part of the masking rule is read from slot order, i.e. `q_index == arange(T)` and
`kv_index == arange(S)` per row. That is how the model calls attention in training, in the packed forward and in
a KV-cache prefill (prompt slots [0, T) of an S-slot cache). A decode step (T == 1) carries per-row cache
positions in `q_index`, which no static mask can express, so it goes to the reference backend; its scores are
one row per head, small at any cache length.

Segment rule: splash lets a query see keys of its own segment id, so real queries match the rule of
`phi_jax.model.attention` exactly (keys of segment 0 never equal a real segment). Padding queries (segment 0) see
padding keys instead of nothing; their outputs stay finite and callers mask them out, as with every backend.

On a mesh (the train step's, entered with `jax.set_mesh`) the kernel runs under `shard_map`, each device on its own
rows and heads (replicated over a mesh axis that does not divide the batch or the kv heads): XLA refuses to partition
a TPU kernel itself.

Off TPU the kernel runs in Pallas interpret mode (slow, exact), which lets the CPU suite test this wiring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from phi_jax.model.attention import xla_attention

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
_LANES = 128  # TPU tiles are multiples of 128 along the sequence axes


def splash_attention(q_BTNH, k_BSKH, v_BSKH, *, q_segment_ids, kv_segment_ids, q_index, kv_index,
                     block_q=DEFAULT_BLOCK_Q, block_kv=DEFAULT_BLOCK_KV, interpret=None):
  """Same contract as `attention.xla_attention`, under the slot-order precondition in the module docstring.

  `interpret=None` runs the compiled kernel on TPU and interpret mode elsewhere.
  """
  if q_BTNH.shape[1] == 1:
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         q_index=q_index, kv_index=kv_index)
  if interpret is None:
    interpret = jax.devices()[0].platform != "tpu"
  local = functools.partial(_splash_local, block_q=block_q, block_kv=block_kv, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids)
  # XLA cannot split a TPU kernel over devices itself: each device runs it on its own rows (data, fsdp) and heads
  # (tensor; the kv heads split with their query heads), the sequence whole, as the model's activations are laid out.
  # A batch or head count those axes do not divide (an eval or rollout batch of other rows) runs replicated over
  # the axes that do not divide it: the same values, each such device computing the whole share.
  rows, row_devices = [], 1
  for axis in ("data", "fsdp"):
    if axis in mesh.axis_names and q_BTNH.shape[0] % (row_devices * mesh.shape[axis]) == 0:
      rows.append(axis)
      row_devices *= mesh.shape[axis]
  rows = tuple(rows) or None
  heads = "tensor" if "tensor" in mesh.axis_names and k_BSKH.shape[2] % mesh.shape["tensor"] == 0 else None
  by_row, by_head = P(rows, None), P(rows, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(by_head, by_head, by_head, by_row, by_row), out_specs=by_head,
                       check_vma=False)(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids)


def _splash_local(q_BTNH, k_BSKH, v_BSKH, q_segment_ids, kv_segment_ids, *, block_q, block_kv, interpret):
  """Splash attention of the rows and heads at hand (one device's share on a mesh)."""
  b, t, n, h = q_BTNH.shape
  s, k_heads = k_BSKH.shape[1], k_BSKH.shape[2]
  block_q, block_kv = min(block_q, _round_up(t, _LANES)), min(block_kv, _round_up(s, _LANES))
  t_pad, s_pad = _round_up(t, block_q) - t, _round_up(s, block_kv) - s
  kernel = _kernel(t + t_pad, s + s_pad, n // k_heads, block_q, block_kv, interpret)

  # Splash does not scale the scores; scaling q first is the same math.
  # Scaled in float32 and rounded once (1/sqrt(128) rounded to bfloat16 first is 1e-4 off).
  q = (q_BTNH.astype(jnp.float32) * h ** -0.5).astype(q_BTNH.dtype).reshape(b, t, k_heads, n // k_heads, h)
  q_BKGTH = jnp.pad(jnp.einsum("btkgh->bkgth", q), ((0, 0), (0, 0), (0, 0), (0, t_pad), (0, 0)))
  pad_kv = lambda x_BSKH: jnp.pad(jnp.einsum("bskh->bksh", x_BSKH), ((0, 0), (0, 0), (0, s_pad), (0, 0)))
  k_BKSH, v_BKSH = pad_kv(k_BSKH), pad_kv(v_BSKH)
  segment_ids = splash.SegmentIds(q=jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad))),
                                  kv=jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad))))

  per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # [K, G, T, H] queries against [K, S, H] keys
  out_BKGTH = jax.vmap(per_kv_head)(q_BKGTH, k_BKSH, v_BKSH, segment_ids)
  return jnp.einsum("bkgth->btkgh", out_BKGTH[:, :, :, :t]).reshape(b, t, n, h).astype(q_BTNH.dtype)


def _round_up(length, multiple):
  return -(-length // multiple) * multiple


def _kernel(q_len, kv_len, groups, block_q, block_kv, interpret):
  """A multi-query splash kernel for one kv head: [G, T, H] queries, [S, H] keys and values.

  Built per trace, not cached: the kernel holds its block-sparsity tables as arrays of the trace that made it.
  Splash caches the expensive part (mask processing, in numpy) itself.
  """
  mask = splash.MultiHeadMask([splash.CausalMask((q_len, kv_len))] * groups)
  block_sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  return splash.make_splash_mqa_single_device(mask, block_sizes=block_sizes, interpret=interpret)
