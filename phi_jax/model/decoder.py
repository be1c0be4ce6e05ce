"""The Phi-4 decoder (transformers `Phi3ForCausalLM` math) as Flax linen modules, used pure-functionally.

Axis letters: B batch, T time, S cache/source time, D model (hidden), N query heads, K kv heads, H head_dim,
F ffn (intermediate), V vocab, L layers.

Parameters are a plain nested dict (see `init_params`); layers are stacked on a leading L axis and run under
`nn.scan`, so compile time does not grow with depth. Every parameter carries logical axis names (see
`param_logical_axes`) that `phi_jax.sharding` maps to mesh axes.

The module returns final hidden states; the LM head is applied separately (`logits`, or chunked inside the
cross-entropy in `phi_jax.losses`), so full [B, T, V] logits need never exist during training.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phi_jax.model import attention, rotary
from phi_jax.model.config import PhiConfig

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _dtype(name: str):
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, shape, axes, init):
  cfg = module.config
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(cfg.param_dtype))


def _normal(config: PhiConfig):
  # Drawn in float32 and rounded once: jax.random.normal in bfloat16 maps 7-bit uniforms through the inverse CDF,
  # giving 128 distinct values cut off near 2.9 standard deviations.
  normal = nn.initializers.normal(stddev=config.initializer_range)
  return lambda key, shape, dtype=jnp.float32: normal(key, shape, jnp.float32).astype(dtype)


class RMSNorm(nn.Module):
  config: PhiConfig

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (self.config.hidden_size,), ("norm",), nn.initializers.ones)
    return rms_norm(x, scale, self.config.rms_norm_eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_BTD, scale_D, eps):
  """scale * x / sqrt(mean(x^2) + eps), statistics in float32, with a hand-written backward pass (autodiff math).

  Why by hand: autodiff's scale gradient came out as a separate reduction over the [B, T] axes that XLA:CPU ran
  far below memory speed (about 3x slower than this whole backward pass, across the 2L norms of a step).
  """
  return _rms_norm_forward(x_BTD, scale_D, eps)[0]


def _rms_norm_forward(x_BTD, scale_D, eps):
  x32 = x_BTD.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale_D.astype(x_BTD.dtype) * (x32 * inv_rms).astype(x_BTD.dtype), (x_BTD, scale_D, inv_rms)


def _rms_norm_backward(eps, residuals, d_out_BTD):
  del eps
  x, scale, inv_rms = residuals
  y32 = x.astype(jnp.float32) * inv_rms
  d_scale = jnp.einsum("...d,...d->d", d_out_BTD.astype(jnp.float32), y32)
  d_y32 = (d_out_BTD * scale.astype(d_out_BTD.dtype)).astype(jnp.float32)
  # d/dx of x * inv_rms(x): inv_rms * (d_y - y * mean(d_y * y)).
  d_x = inv_rms * (d_y32 - y32 * jnp.mean(d_y32 * y32, axis=-1, keepdims=True))
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


@jax.custom_vjp
def projections(x_BTD, *weights):
  """x @ w for each weight w [D, *out], as [B, T, *out], with a hand-written backward pass (same math as autodiff).

  Used for the q/k/v projections (one x, three weights) and the output projection. Why by hand: for autodiff's
  weight gradients XLA:CPU contracted the leading (token) axis of both operands: for q/k/v it multiplied the
  transposed head gradients by x and transposed the products back, fusing the first transpose with the rotary
  backward into a slow loop (~5 ms a layer); for the output projection it copied the output gradient transposed and
  ran a generic dot. Here x is transposed once ([D, B*T], behind a barrier so XLA cannot fold it back into the
  products) and each weight gradient is one plain [D, B*T] x [B*T, out] product, already in the weight's layout. On
  a 2-core CPU (d=512, 8 layers, T=1024) the q/k/v form made the train step 18-56 ms faster (four same-process
  comparisons), the output projection's another 1/29 ms (min/median).
  """
  return tuple(jnp.tensordot(x_BTD, w, axes=1) for w in weights)


def _projections_forward(x_BTD, *weights):
  return projections(x_BTD, *weights), (x_BTD, *weights)


def _projections_backward(residuals, d_outs):
  x, *weights = residuals
  b, t, d = x.shape
  flat = lambda a: a.reshape(b * t, -1)
  x_DN = jax.lax.optimization_barrier(flat(x).T)
  out_axes = lambda a, first: tuple(range(first, a.ndim))
  d_x = functools.reduce(jnp.add, (jnp.tensordot(d_out, w, axes=(out_axes(d_out, 2), out_axes(w, 1)))
                                   for d_out, w in zip(d_outs, weights)))
  d_weights = tuple((x_DN @ flat(d_out)).reshape(w.shape).astype(w.dtype) for d_out, w in zip(d_outs, weights))
  return (d_x.astype(x.dtype), *d_weights)


projections.defvjp(_projections_forward, _projections_backward)


class Attention(nn.Module):
  config: PhiConfig
  # The cache is empty and this chunk fills it from slot 0 (a prefill): attention runs over the chunk's own keys
  # only, as without a cache. The cache's other slots are empty and would only be masked out, at a cost of
  # slots / chunk length (a 128-token prompt in a 33K-slot cache for a long rollout: 250x).
  fills_empty_cache: bool = False

  @nn.compact
  def __call__(self, x_BTD, cos, sin, segment_ids, q_index, layer_cache):
    cfg = self.config
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    dt = _dtype(cfg.dtype)
    init = _normal(cfg)
    w_q = _param(self, "q", (d, n, h), ("embed", "q_heads", "head_dim"), init).astype(dt)
    w_k = _param(self, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), init).astype(dt)
    w_v = _param(self, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), init).astype(dt)
    w_o = _param(self, "o", (n, h, d), ("q_heads", "head_dim", "embed"), init).astype(dt)

    q, k_new, v_new = projections(x_BTD, w_q, w_k, w_v)
    q, k_new = rotary.apply_rotary(q, cos, sin), rotary.apply_rotary(k_new, cos, sin)
    q = nn.with_logical_constraint(q, ("batch", "length", "q_heads", "head_dim"))

    if layer_cache is not None:
      # Slot == position: write this chunk's K/V at its positions. The cache holds keys as [NB, B, K, H, C] and
      # values as [NB, B, K, C, H], slot s in block s // C at s % C (see `attention.decode_attention`).
      rows = jnp.arange(x_BTD.shape[0])[:, None]
      block, offset = jnp.divmod(q_index, layer_cache["k"].shape[-1])
      keys = layer_cache["k"].at[block, rows, :, :, offset].set(k_new.astype(layer_cache["k"].dtype))
      values = layer_cache["v"].at[block, rows, :, offset, :].set(v_new.astype(layer_cache["v"].dtype))
      kv_segment_ids = layer_cache["segment_ids"].at[rows, q_index].set(segment_ids)
      layer_cache = {"k": keys, "v": values, "segment_ids": kv_segment_ids}

    if layer_cache is None or self.fills_empty_cache:  # the chunk attends to itself
      out = attention.attend(
          q, k_new, v_new, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_index=q_index,
          kv_index=q_index, backend=cfg.attention_backend, max_segments_per_row=cfg.max_segments_per_row)
    else:  # a decode step, or a chunk of a LongRoPE rebuild: over the filled cache (slot index == position)
      kv_index = jnp.broadcast_to(jnp.arange(kv_segment_ids.shape[1]), kv_segment_ids.shape)
      out = attention.decode_attention(q, keys.astype(dt), values.astype(dt), q_segment_ids=segment_ids,
                                       kv_segment_ids=kv_segment_ids, q_index=q_index, kv_index=kv_index)
    # One contracted axis of N * H: with two (n, h), the dot's contracting dims came out as (h, n) and XLA
    # transposed the output weight and the attention output on every call.
    b, t = out.shape[:2]
    return projections(out.reshape(b, t, n * h), w_o.reshape(n * h, d))[0], layer_cache


class MLP(nn.Module):
  config: PhiConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    dt = _dtype(cfg.dtype)
    init = _normal(cfg)
    w_gate = _param(self, "gate", (cfg.hidden_size, cfg.intermediate_size), ("embed", "mlp"), init).astype(dt)
    w_up = _param(self, "up", (cfg.hidden_size, cfg.intermediate_size), ("embed", "mlp"), init).astype(dt)
    w_down = _param(self, "down", (cfg.intermediate_size, cfg.hidden_size), ("mlp", "embed"), init).astype(dt)
    return swiglu(x_BTD, w_gate, w_up, w_down)


def _constrain_mlp(x_BTF):
  return nn.with_logical_constraint(x_BTF, ("batch", "length", "mlp"))


@jax.custom_vjp
def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
  """down(silu(x @ gate) * (x @ up)), the Phi-3 MLP, with a hand-written backward pass (same math as autodiff).

  Why by hand: for the autodiff backward, XLA:CPU fused the SiLU derivative with a transposed write of [T, F] for
  the weight-gradient matmuls, which ran far below memory speed; the explicit form below keeps every
  elementwise step in [T, F] layout and writes each weight gradient as one (B*T)-contracted matmul. It saves the
  same residuals as autodiff (the gate and up activations), so it does the same FLOPs.
  """
  return _swiglu_forward(x_BTD, w_gate_DF, w_up_DF, w_down_FD)[0]


def _swiglu_forward(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
  gate = _constrain_mlp(jnp.einsum("btd,df->btf", x_BTD, w_gate_DF))
  up = _constrain_mlp(jnp.einsum("btd,df->btf", x_BTD, w_up_DF))
  out = jnp.einsum("btf,fd->btd", _constrain_mlp(jax.nn.silu(gate) * up), w_down_FD)
  return out, (x_BTD, w_gate_DF, w_up_DF, w_down_FD, gate, up)


def _swiglu_backward(residuals, d_out_BTD):
  x, w_gate, w_up, w_down, gate, up = residuals
  sigmoid = jax.nn.sigmoid(gate)
  silu = gate * sigmoid
  d_hidden = _constrain_mlp(jnp.einsum("btd,fd->btf", d_out_BTD, w_down))
  d_up = d_hidden * silu
  d_gate = d_hidden * up * (sigmoid * (1 + gate * (1 - sigmoid)))  # silu'(g) = s(g) (1 + g (1 - s(g)))
  d_x = jnp.einsum("btf,df->btd", d_gate, w_gate) + jnp.einsum("btf,df->btd", d_up, w_up)
  d, f = w_gate.shape
  flat = lambda a, width: a.reshape(-1, width)
  d_w_gate = flat(x, d).T @ flat(d_gate, f)
  d_w_up = flat(x, d).T @ flat(d_up, f)
  d_w_down = flat(silu * up, f).T @ flat(d_out_BTD, d)
  return (d_x.astype(x.dtype), d_w_gate.astype(w_gate.dtype), d_w_up.astype(w_up.dtype),
          d_w_down.astype(w_down.dtype))


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class DecoderLayer(nn.Module):
  config: PhiConfig
  fills_empty_cache: bool = False  # see `Attention.fills_empty_cache`

  @nn.compact
  def __call__(self, x_BTD, layer_cache, cos, sin, segment_ids, q_index):
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
    attn_out, layer_cache = Attention(self.config, self.fills_empty_cache, name="attn")(
        RMSNorm(self.config, name="input_norm")(x_BTD), cos, sin, segment_ids, q_index, layer_cache)
    x_BTD = x_BTD + attn_out
    x_BTD = x_BTD + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attn_norm")(x_BTD))
    return x_BTD, layer_cache


class Decoder(nn.Module):
  """tokens -> final-normed hidden states [B, T, D] (and the updated KV cache when one is given).

  Parameter tree: embed/embedding [V, D]; layers/{input_norm, attn/{q, k, v, o}, post_attn_norm,
  mlp/{gate, up, down}} stacked on a leading L axis; final_norm/scale [D]; lm_head/kernel [D, V] unless tied.
  """

  config: PhiConfig
  # Inference layout: layers as separate `layer_{i}` params (see `unstack_layers`) run one after another, and the
  # cache as a tuple of per-layer dicts. A scan over stacked weights copies each layer's weights out of the stack
  # before its matmuls; that copy is cheap next to a training step's matmuls but doubles a decode step's
  # weight traffic.
  unrolled: bool = False
  # The given cache is empty and the tokens fill it from slot 0 (a prefill; see `Attention.fills_empty_cache`).
  fills_empty_cache: bool = False

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None, rope_extent=None):
    cfg = self.config
    embedding = Table(cfg, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), name="embed")()
    # Padding slots (segment 0) read row 0 whatever id they hold: an out-of-range id would gather NaN, and
    # attention's zero weights times a NaN value still spread it over the whole row.
    tokens_BT = jnp.where(segment_ids_BT == 0, 0, tokens_BT)
    x = jnp.take(_lookup_table(embedding), tokens_BT, axis=0).astype(_dtype(cfg.dtype))
    if cfg.pad_token_id is not None:
      # As transformers' nn.Embedding(padding_idx=pad_token_id): the pad token's row learns nothing from the
      # lookup (a tied table's row still learns as the LM head). Phi-4's pad id is <|endoftext|>, a real token.
      x = jnp.where((tokens_BT == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
    cos, sin = rotary.rotary_angles(cfg, positions_BT, segment_ids_BT, rope_extent)
    # Without a cache, attention slots are indices in the row (packed rows restart positions, not slots).
    q_index = positions_BT if cache is not None else jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)

    if self.unrolled:
      layer_caches = cache if cache is not None else (None,) * cfg.num_layers
      new_caches = []
      for i, layer_cache in enumerate(layer_caches):
        x, layer_cache = DecoderLayer(cfg, self.fills_empty_cache, name=f"layer_{i}")(
            x, layer_cache, cos, sin, segment_ids_BT, q_index)
        new_caches.append(layer_cache)
      cache = tuple(new_caches) if cache is not None else None
    else:
      layer = DecoderLayer
      if cfg.remat_policy != "none":
        layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
      layers = nn.scan(
          layer,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.fills_empty_cache, name="layers")
      x, cache = layers(x, cache, cos, sin, segment_ids_BT, q_index)
    x = RMSNorm(cfg, name="final_norm")(x)
    if not cfg.tie_word_embeddings:  # registered here so init creates it; applied by `logits`/the losses
      Table(cfg, "kernel", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), name="lm_head")()
    return x, cache


def _lookup_table(embedding_VD):
  """The embedding table as the lookup reads it. On a mesh with both data and fsdp axes it is gathered whole along D
  first (as an FSDP step gathers every weight; [V, D] / tensor per device): from the D-sharded table XLA computed
  the rows of the whole global batch on every device and re-split them ("involuntary full rematerialization",
  [global B, T, D / fsdp] per device, far more than the table at training lengths). With fsdp alone XLA re-splits
  the rows efficiently, and gathering the table would only cost memory."""
  axes = dict(jax.sharding.get_abstract_mesh().shape)
  # Traced only: an eager call runs op by op (nothing to re-split), and its params may not be placed on the mesh.
  if isinstance(embedding_VD, jax.core.Tracer) and axes.get("data", 1) > 1 and axes.get("fsdp", 1) > 1:
    return nn.with_logical_constraint(embedding_VD, ("vocab", None))
  return embedding_VD


def unstack_layers(params: Params) -> Params:
  """Training layout -> the `Decoder(unrolled=True)` layout: params["layers"] (leading L axis) becomes
  params["layer_0"], ..., params["layer_{L-1}"]; everything else is shared as is. Params already in that layout
  are returned unchanged."""
  if "layers" not in params:
    return params
  stacked = params["layers"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  out = {name: value for name, value in params.items() if name != "layers"}
  out.update({f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)})
  return out


class Table(nn.Module):
  """A single weight matrix (the embedding table, the LM head kernel), returned as is."""

  config: PhiConfig
  param_name: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self):
    return _param(self, self.param_name, self.shape, self.axes, _normal(self.config))
