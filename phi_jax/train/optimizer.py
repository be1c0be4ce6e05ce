"""AdamW with a linear or cosine warmup + cosine/linear/constant decay, global-norm clipping and a weight-decay mask
(optax)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  warmup_fraction: Optional[float] = None  # instead of warmup_steps, e.g. 0.1 = 10% of the run (mid-training)
  warmup_shape: str = "linear"  # "linear" | "cosine" (a half cosine from 0 to the peak)
  decay: str = "cosine"  # "cosine" | "linear" | "constant"
  final_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_norms_and_embeddings: bool = False
  max_grad_norm: Optional[float] = 1.0

  def __post_init__(self):
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")
    if self.warmup_fraction is not None and self.warmup_steps:
      # One would be ignored: a config file's warmup_fraction silently outranked a warmup_steps given on top.
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} and warmup_fraction="
                       f"{self.warmup_fraction} are both set; keep one (warmup_fraction=None to use warmup_steps)")
    if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction <= 1.0:
      raise ValueError(f"OptimizerConfig.warmup_fraction={self.warmup_fraction} must be in [0, 1] (a fraction of the "
                       "run: 0.1 is 10%)")
    if self.warmup_shape not in ("linear", "cosine"):
      raise ValueError(f"OptimizerConfig.warmup_shape={self.warmup_shape!r}; supported: 'linear', 'cosine'")
    if self.decay not in ("cosine", "linear", "constant"):
      raise ValueError(f"OptimizerConfig.decay={self.decay!r}; supported: 'cosine', 'linear', 'constant'")
    # Values that would train silently wrong: a negative rate or weight decay climbs the loss, and a clip
    # threshold of 0 zeroes every update (TRL and MaxText read 0 as "no clipping"; here that is None).
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      raise ValueError(f"OptimizerConfig.max_grad_norm={self.max_grad_norm} must be > 0; use None to turn "
                       "gradient clipping off")
    if not self.learning_rate >= 0:
      raise ValueError(f"OptimizerConfig.learning_rate={self.learning_rate} must be >= 0")
    if not 0.0 <= self.final_lr_fraction <= 1.0:
      raise ValueError(f"OptimizerConfig.final_lr_fraction={self.final_lr_fraction} must be in [0, 1] (the final "
                       "learning rate as a fraction of the peak)")
    if self.decay == "constant" and self.final_lr_fraction:
      raise ValueError(f"OptimizerConfig.final_lr_fraction={self.final_lr_fraction} does nothing with "
                       "decay='constant' (the rate stays at learning_rate after warmup): use decay='linear' or "
                       "'cosine' to decay to that fraction, or leave final_lr_fraction at 0")
    if not self.weight_decay >= 0:
      raise ValueError(f"OptimizerConfig.weight_decay={self.weight_decay} must be >= 0")
    if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
      raise ValueError(f"OptimizerConfig b1={self.b1}, b2={self.b2}: Adam's decay rates must be in [0, 1)")
    if not self.eps > 0:
      raise ValueError(f"OptimizerConfig.eps={self.eps} must be > 0")


def warmup_length(cfg: OptimizerConfig, num_steps: int) -> int:
  """The warmup's steps: `warmup_steps`, or `warmup_fraction` of the run, rounded."""
  return int(round(cfg.warmup_fraction * num_steps)) if cfg.warmup_fraction is not None else cfg.warmup_steps


def learning_rate_schedule(cfg: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Warmup (`warmup_steps`, or `warmup_fraction` of the run, rounded), then the decay to `final_lr_fraction` of the
  peak at step `num_steps`. A warmup longer than the run keeps its slope (as transformers' and optax's schedules
  do): the run ends before the peak (`train.loop.run` logs it)."""
  warmup = warmup_length(cfg, num_steps)
  decay_steps = max(num_steps - warmup, 1)
  end = cfg.learning_rate * cfg.final_lr_fraction
  if cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.final_lr_fraction)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  elif cfg.decay == "constant":
    decay = optax.constant_schedule(cfg.learning_rate)
  else:
    raise ValueError(f"OptimizerConfig.decay={cfg.decay!r}; supported: 'cosine', 'linear', 'constant'")
  if warmup == 0:
    return decay
  # Warmup starts above zero so step 0 already trains (a zero first step wastes a batch), and reaches the peak at
  # its last step, warmup - 1.
  if cfg.warmup_shape == "cosine":
    def ramp(step):
      return cfg.learning_rate * 0.5 * (1.0 - jnp.cos(jnp.pi * (step + 1) / warmup))
  else:
    ramp = optax.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup - 1 if warmup > 1 else 1)
  return optax.join_schedules([ramp, decay], [warmup])


def weight_decay_mask(params):
  """True where weight decay applies: matrices inside layers and the LM head; not norms, not the embedding. A tied
  LM head (Phi-4-mini) is the embedding table, so it is not decayed either (transformers' Trainer and TRL decay
  both; `OptimizerConfig.decay_norms_and_embeddings` decays it)."""
  def decays(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    return not ("embed" in names or any(n.endswith("norm") for n in names))
  return jax.tree_util.tree_map_with_path(decays, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` (g * max_norm / ||g|| when ||g|| > max_norm), written as one multiply by
  min(1, max_norm / ||g||).

  Same result (NaN and Inf norms included); optax's select between the clipped and unclipped trees kept XLA:CPU
  from fusing the clip into the AdamW update, which doubled the optimizer's time (106 vs 47 ms for 32M params).
  """
  def update_fn(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
  # max_grad_norm=None and decay_norms_and_embeddings change the state's tree (one transform fewer; no mask
  # wrapper), which checkpoints record: changing either on resume is refused as incompatible, not mistaken for damage.
  mask = None if cfg.decay_norms_and_embeddings else weight_decay_mask
  chain = []
  if cfg.max_grad_norm is not None:
    chain.append(clip_by_global_norm(cfg.max_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*chain)
