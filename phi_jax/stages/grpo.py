"""GRPO with verifiable rewards (stage 4 of Phi-4-mini-reasoning; the RL stage of Phi-4-reasoning-plus).

Per rollout batch: B prompts x G samples from the current policy (the KV-cache sampler, same params and mesh as
training), rewards from a reward function (by default the math verifier + a registry reward), group-relative
advantages, then `num_passes` optimisation steps on that batch with the rollout log-probs as "old" log-probs.
Each pass is one step of the shared train loop; `GRPORollouts` is its data source and reads the current params.

The Phi-4-mini-reasoning fixes for small models are settings of `GRPOConfig`:
- groups with zero reward variance give no gradient and are dropped (`drop_zero_variance_groups`);
- prompts whose group accuracy is above `max_group_accuracy` (e.g. 0.5) are dropped, too easy to teach much;
- `balance_negatives`: keep every positive response and as many randomly chosen negatives (the advantages stay
  those computed over the whole group);
- length uniformity (`max_length_cv`): a group whose response lengths vary more than this coefficient of
  variation is dropped — the paper filters candidate prompts by sampling them several times and keeping those
  with fairly uniform response lengths; here every step's G samples are that sample. A rollout cut at
  `max_new_tokens` counts at its cut length, so one runaway rollout in a group of short ones drops the whole group
  (its correct responses too) for that step, as a pre-pass would drop the prompt;
- temperature annealing: `temperature` -> `final_temperature` linearly over the first `anneal_fraction` of the
  run, then constant (the paper: 1.0 -> 0.6 over the first half); the loss scores the policy at the temperature
  its batch was sampled at (`tempered_logprobs`, each row's `temperature` field), so the importance ratio and the
  KL compare the distributions the rollouts came from;
- oversampling hard prompts (`hard_prompt_fraction`): a prompt whose group accuracy was at most
  `hard_prompt_accuracy` (unsolved ones included) joins a queue, and up to that share of each rollout batch's
  prompts are taken again from the front of the queue before the rest come from the shuffled order.
Dropped rows stay in the batch with a zero mask and zero advantage, so shapes never change and nothing recompiles.

Loss normalisation under the shared step (which divides a sum by a weight after microbatching):
token_mean -> weight = completion tokens; sequence_mean -> weight = kept sequences; constant (Dr. GRPO) ->
weight = all rows, with the constant length = max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from phi_jax.losses import chunked_token_logprobs, group_advantages, grpo_loss, next_token_targets
from phi_jax.losses.grpo import AGGREGATIONS
from phi_jax.model import PhiConfig, hidden_states, lm_head_kernel
from phi_jax.sampling import SamplingConfig, filters, generate
from phi_jax.sampling.sampler import MIN_TEMPERATURE
from phi_jax.sharding import distributed
from phi_jax.train import checkpoint
from phi_jax.train.step import MeshJit, batch_shardings, most_pieces

log = logging.getLogger("phi_jax")

RewardBatchFn = Callable[[Sequence[str], Sequence[str], np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _checked_rewards(result, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """A reward_batch_fn's (rewards, correct) as float32 and bool arrays of one value per response (a TRL-style
  function returns lists)."""
  try:
    rewards, correct = result
    rewards, correct = np.asarray(rewards, np.float32), np.asarray(correct).astype(bool)
  except (TypeError, ValueError) as e:
    raise ValueError(f"reward_batch_fn must return (rewards, correct), each a sequence of {rows} values (one per "
                     f"response): {e}") from e
  if rewards.shape != (rows,) or correct.shape != (rows,):
    raise ValueError(f"reward_batch_fn returned rewards of shape {rewards.shape} and correct of shape "
                     f"{correct.shape}; expected one value per response: ({rows},)")
  bad = np.flatnonzero(~np.isfinite(rewards))
  if bad.size:  # a None (TRL's "does not apply") reads as NaN, which would spread through its group's advantages
    raise ValueError(f"reward_batch_fn returned {bad.size} reward(s) that are not finite numbers (None, NaN or "
                     f"infinite), the first for response {bad[0]}: give every response a finite number")
  return rewards, correct


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  prompts_per_step: int = 8
  group_size: int = 8
  num_passes: int = 1
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.0  # KL to the frozen reference (k3); 0 loads no reference
  entropy_coef: float = 0.0
  aggregation: str = "token_mean"  # "token_mean" (DAPO) | "sequence_mean" (GRPO) | "constant" (Dr. GRPO)
  scale_advantages_by_std: bool = True
  max_prompt_tokens: int = 128
  max_new_tokens: int = 256
  temperature: float = 1.0
  final_temperature: Optional[float] = None
  anneal_fraction: float = 0.5
  top_k: int = 0
  top_p: float = 1.0
  # Score the policy, the rollouts' "old" log-probs and the reference under softmax(logits / the rollout batch's
  # temperature), the distribution the batch was sampled from (top-k / top-p aside), as TRL and verl do; False:
  # under the untempered model whatever the sampling temperature.
  tempered_logprobs: bool = True
  drop_zero_variance_groups: bool = True
  max_group_accuracy: Optional[float] = None
  balance_negatives: bool = False
  max_length_cv: Optional[float] = None
  hard_prompt_fraction: float = 0.0
  hard_prompt_accuracy: float = 0.25
  chunk_size: int = 1024
  # Rows per `generate` call when sampling a rollout batch (None: all prompts_per_step x group_size at once). The KV
  # cache holds max_prompt_tokens + max_new_tokens slots for every row of a call, so long rollouts need several calls
  # (Phi-4-mini at 1K + 24K tokens: ~3.3 GB of bfloat16 cache per row); `experiments/train.py --dry_run` shows it.
  rollout_batch_size: Optional[int] = None

  def __post_init__(self):
    # Checked here, before a run samples its first rollout batch (minutes of generation) only to fail at the loss.
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"grpo.aggregation={self.aggregation!r}; choose one of {AGGREGATIONS}")
    for name in ("prompts_per_step", "num_passes", "max_prompt_tokens", "max_new_tokens", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"grpo.{name}={getattr(self, name)} must be >= 1")
    if self.group_size < 2:
      raise ValueError(f"grpo.group_size={self.group_size}: group-relative advantages need at least 2 samples of "
                       "each prompt")
    if not 0.0 <= self.epsilon_low < 1.0 or not self.epsilon_high >= 0.0:
      raise ValueError(f"grpo.epsilon_low={self.epsilon_low}, grpo.epsilon_high={self.epsilon_high}: the clip "
                       "range is [1 - epsilon_low, 1 + epsilon_high], so epsilon_low must be in [0, 1) and "
                       "epsilon_high >= 0")
    for name in ("beta", "entropy_coef"):
      if not getattr(self, name) >= 0.0:
        raise ValueError(f"grpo.{name}={getattr(self, name)} must be >= 0 (a negative weight rewards the opposite)")
    if self.max_group_accuracy is not None and not 0.0 <= self.max_group_accuracy <= 1.0:
      raise ValueError(f"grpo.max_group_accuracy={self.max_group_accuracy} is a group accuracy, in [0, 1] (0.5 "
                       "drops prompts solved by more than half of their group)")
    if self.max_length_cv is not None and not self.max_length_cv > 0.0:
      raise ValueError(f"grpo.max_length_cv={self.max_length_cv} must be > 0 (a coefficient of variation); None "
                       "turns the length filter off")
    if not 0.0 < self.anneal_fraction <= 1.0:
      raise ValueError(f"grpo.anneal_fraction={self.anneal_fraction} is a fraction of the run, in (0, 1]")
    for name in ("temperature", "final_temperature"):
      value = getattr(self, name)
      if value is not None and not value >= 0.0:
        raise ValueError(f"grpo.{name}={value} must be >= 0 (0 is greedy)")
      if value is not None and not math.isfinite(value):
        raise ValueError(f"grpo.{name}={value} must be finite")
    if not 0.0 <= self.hard_prompt_fraction < 1.0:
      raise ValueError(f"grpo.hard_prompt_fraction={self.hard_prompt_fraction}: the share of each batch's prompts "
                       "sampled again because they were hard, in [0, 1)")
    if not 0.0 <= self.hard_prompt_accuracy <= 1.0:
      raise ValueError(f"grpo.hard_prompt_accuracy={self.hard_prompt_accuracy} is a group accuracy, in [0, 1]")
    if 0.0 < self.hard_prompt_fraction * self.prompts_per_step < 1.0:  # int() of it replays no prompt at all
      # A warning, not an error: a scaled-down test of a real config (one prompt a step) should still run.
      log.warning("grpo.hard_prompt_fraction=%g of prompts_per_step=%d is less than one prompt, so no hard prompt is "
                  "replayed: raise it to at least %.4g, or set 0 to turn the replay off", self.hard_prompt_fraction,
                  self.prompts_per_step, 1 / self.prompts_per_step)
    # The sampling settings, checked as the rollouts will use them and named by their grpo.* bindings.
    try:
      for temperature in {self.temperature, self.final_temperature} - {None}:
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=temperature, top_k=self.top_k,
                       top_p=self.top_p)
    except ValueError as e:
      raise ValueError(f"grpo sampling settings (grpo.temperature={self.temperature}, grpo.final_temperature="
                       f"{self.final_temperature}, grpo.top_k={self.top_k}, grpo.top_p={self.top_p}): {e}") from None
    rows = self.prompts_per_step * self.group_size
    if self.rollout_batch_size is not None and not (0 < self.rollout_batch_size <= rows
                                                    and rows % self.rollout_batch_size == 0):
      raise ValueError(f"grpo.rollout_batch_size={self.rollout_batch_size} must divide the {rows} rows of a rollout "
                       f"batch (prompts_per_step x group_size), or be None to sample them in one call")

  def temperature_at(self, step: int, num_steps: int) -> float:
    if self.final_temperature is None:
      return self.temperature
    anneal_steps = max(1.0, self.anneal_fraction * num_steps)
    frac = min(step / anneal_steps, 1.0)
    temperature = self.temperature + (self.final_temperature - self.temperature) * frac
    # Annealing towards 0 (greedy) passes temperatures too small to sample at: those steps are greedy already.
    return 0.0 if temperature < MIN_TEMPERATURE else temperature


def _temperature(batch) -> jax.Array:
  """The temperature the batch's log-probs are taken at: every row of a rollout batch carries the same one (1.0
  with `GRPOConfig.tempered_logprobs=False`); batches without the field are scored untempered."""
  return batch["temperature"][0] if "temperature" in batch else jnp.float32(1.0)


def grpo_stage_loss(params, batch, rng, *, config: PhiConfig, cfg: GRPOConfig):
  del rng
  h = hidden_states(params, batch["tokens"], config, positions=batch["positions"], segment_ids=batch["segment_ids"])
  targets, mask = next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  kernel = lm_head_kernel(params, config)
  entropy = None
  scoring = dict(chunk_size=cfg.chunk_size, temperature=_temperature(batch))
  if cfg.entropy_coef:
    logps, entropy = chunked_token_logprobs(h, kernel, targets, with_entropy=True, **scoring)
  else:
    logps = chunked_token_logprobs(h, kernel, targets, **scoring)
  old, ref = batch["old_logprobs"], batch.get("ref_logprobs")
  loss, metrics = grpo_loss(logps, old, ref, batch["advantages"], mask,
                            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                            aggregation=cfg.aggregation, max_tokens=cfg.max_new_tokens, entropy=entropy,
                            entropy_coef=cfg.entropy_coef)
  rows = jnp.float32(mask.shape[0])
  if cfg.aggregation == "token_mean":
    weight, scale = jnp.sum(mask), jnp.sum(mask)
  elif cfg.aggregation == "sequence_mean":
    weight, scale = jnp.sum(jnp.any(mask > 0, axis=1)), rows
  else:
    weight, scale = rows, rows
  # The metrics are token means whatever the aggregation: summed per token, so microbatching does not change them.
  tokens = jnp.sum(mask)
  # "trained": the constant aggregation's weight counts every row, so the step learns from the kept tokens whether
  # this batch trains anything at all (see `train.step`).
  return loss * scale, {"weight": weight, "trained": tokens, "metrics": {k: v * tokens for k, v in metrics.items()},
                        "metric_weights": {k: tokens for k in metrics}}


def make_loss_fn(config: PhiConfig, cfg: GRPOConfig):
  loss_fn = functools.partial(grpo_stage_loss, config=config, cfg=cfg)
  loss_fn.model_config = config  # make_train_step checks each batch's token ids against its vocabulary
  return loss_fn


def verifier_rewards(reward_fn) -> RewardBatchFn:
  """Rewards from a `phi_jax.rewards` reward (e.g. `combine({...})` or "correctness"); correctness verified once.

  The verdict returned beside the rewards (which drives the group filters, the hard-prompt queue and the logged
  accuracy) counts a completion cut at the length limit as incorrect, as the `correctness` reward and rollout
  DPO's pairs do.
  """
  from phi_jax.rewards import registry, verify_batch

  fn = registry.get_reward(reward_fn) if isinstance(reward_fn, str) else reward_fn

  def score(completions, golds, lengths, finished):
    correct = np.asarray(verify_batch(list(completions), list(golds)), bool) & np.asarray(finished, bool)
    rewards = [fn(c, g, length=int(n), finished=bool(f), correct=bool(v))
               for c, g, n, f, v in zip(completions, golds, lengths, finished, correct)]
    return np.asarray(rewards, np.float32), correct

  return score


def select_rows(rewards_BG: np.ndarray, correct_BG: np.ndarray, lengths_BG: np.ndarray, cfg: GRPOConfig,
                rng: np.random.Generator) -> np.ndarray:
  """[B, G] bool: which responses train, after the small-model filters (see the module docstring)."""
  # A reward function may return 0/1 integers; `~` on those would be a bitwise not, not "incorrect".
  correct_BG = np.asarray(correct_BG).astype(bool)
  keep = np.ones(rewards_BG.shape, bool)
  for b in range(rewards_BG.shape[0]):
    if cfg.drop_zero_variance_groups and np.ptp(rewards_BG[b]) == 0:
      keep[b] = False
    if cfg.max_group_accuracy is not None and correct_BG[b].mean() > cfg.max_group_accuracy:
      keep[b] = False
    if cfg.max_length_cv is not None:
      mean = lengths_BG[b].mean()
      if mean > 0 and lengths_BG[b].std() / mean > cfg.max_length_cv:
        keep[b] = False
    if cfg.balance_negatives and keep[b].any():
      positives, negatives = np.flatnonzero(correct_BG[b]), np.flatnonzero(~correct_BG[b])
      if len(negatives) > len(positives):
        dropped = rng.choice(negatives, len(negatives) - len(positives), replace=False)
        keep[b, dropped] = False
  return keep


class GRPORollouts:
  """The GRPO data source: `next_batch(params, step)` samples a rollout batch every `num_passes` steps.

  Prompts are records {"problem": str, "answer": str}, visited in a seeded order (reshuffled each epoch), with
  hard prompts sampled again from a queue when `hard_prompt_fraction` > 0.
  State for checkpoints is the position in that order, the rollout count, the hard-prompt queue and, for a
  checkpoint taken between the passes of one rollout batch, where that batch began and how many of its passes were
  trained. Resuming there samples the same prompts again with the same random stream and trains the remaining
  passes on them, so the run keeps its prompt order and its steps per batch; the responses come from the restored
  (newer) params, so that one batch differs from the uninterrupted run's. Its rewards leave the hard queue alone:
  the queue is set to what it was after that batch in the interrupted run.
  """

  def __init__(self, prompts: Sequence[dict], tokenizer, model_config: PhiConfig, cfg: GRPOConfig, *,
               reward_batch_fn: RewardBatchFn, num_steps: int, seed: int = 0, mesh=None, ref_params=None,
               system_prompt: Optional[str] = None, score_microbatches: int = 1):
    from phi_jax.data.chat import render_prompt, stop_token_ids

    if not prompts:
      raise ValueError("GRPO needs at least one prompt")
    if cfg.beta and ref_params is None:
      raise ValueError("GRPOConfig.beta > 0 needs ref_params (the frozen reference model)")
    self.cfg, self.config, self.mesh = cfg, model_config, mesh
    self.tokenizer, self.num_steps, self.seed = tokenizer, num_steps, seed
    self.reward_batch_fn, self.ref_params = reward_batch_fn, ref_params
    # The forward passes that score a whole rollout batch (the reference's log-probs, LongRoPE's old log-probs) run
    # in the train step's microbatches: a batch that needs them to fit in training needs them here too.
    self.score_microbatches = score_microbatches
    self.prompts = list(prompts)
    self.encoded = [render_prompt(tokenizer, record["problem"], system_prompt=system_prompt) for record in self.prompts]
    too_long = [i for i, ids in enumerate(self.encoded) if len(ids) > cfg.max_prompt_tokens]
    if too_long:
      i, longest = too_long[0], max(len(self.encoded[j]) for j in too_long)
      raise ValueError(f"{len(too_long)} of {len(self.prompts)} prompts are longer than grpo.max_prompt_tokens="
                       f"{cfg.max_prompt_tokens} once rendered in the chat format (system prompt included): the "
                       f"first is prompt {i} ({len(self.encoded[i])} tokens: {self.prompts[i]['problem'][:60]!r}), "
                       f"the longest has {longest}. Raise grpo.max_prompt_tokens to {longest}, or remove them")
    self.stop_ids = tuple(stop_token_ids(tokenizer))
    self.position, self.rollouts = 0, 0
    self.hard_queue: list[int] = []  # prompts found hard, oldest first, each at most once
    self._batch, self._batch_pass, self._metrics = None, 0, {}
    self._batch_metrics: dict = {}  # the current batch's rollout figures, logged with each pass over it
    self._batch_start = (0, 0, [])  # (position, rollouts, hard queue) before the current batch was sampled
    self._resume_passes = 0  # passes of a restored, regenerated batch already trained before the checkpoint
    self._resume_queue_after = None  # the hard queue as it was after that batch in the interrupted run
    scorer = functools.partial(_token_logps, config=model_config, chunk_size=cfg.chunk_size)
    # Traced under the mesh, as the train step is: backends that split themselves over it (splash) need it.
    self._ref_logps_fn = jax.jit(scorer) if mesh is None else MeshJit(scorer, mesh)

  def get_state(self) -> dict:
    # Every process samples the whole batch and advances this state alike, so a checkpoint of it restores onto
    # any number of processes.
    same = {checkpoint.GLOBAL_DATA_STATE: True}
    if self._batch is not None and self._batch_pass < self.cfg.num_passes:  # between two passes of one batch
      position, rollouts, hard_queue = self._batch_start
      # The queue after the batch too: the regenerated batch's rewards (newer params) must not reorder it.
      return {"position": position, "rollouts": rollouts, "passes_done": self._batch_pass,
              "hard_queue": list(hard_queue), "hard_queue_after": list(self.hard_queue), **same}
    return {"position": self.position, "rollouts": self.rollouts, "passes_done": 0,
            "hard_queue": list(self.hard_queue), **same}

  def set_state(self, state: dict):
    self.position, self.rollouts = int(state["position"]), int(state["rollouts"])
    self.hard_queue = [int(i) for i in state.get("hard_queue", [])]  # absent in checkpoints from before the queue
    after = state.get("hard_queue_after")
    self._resume_queue_after = None if after is None else [int(i) for i in after]
    self._batch, self._batch_pass = None, 0
    self._resume_passes = int(state.get("passes_done", 0))

  def _next_prompts(self) -> tuple[list[int], int]:
    """The batch's prompt indices, first the hard ones sampled again (oldest first), then the shuffled order; and
    how many were hard."""
    n = len(self.prompts)
    # The epsilon keeps e.g. 0.29 x 100 (28.999...) at 29.
    replayed = min(len(self.hard_queue), int(self.cfg.hard_prompt_fraction * self.cfg.prompts_per_step + 1e-9))
    out, self.hard_queue = self.hard_queue[:replayed], self.hard_queue[replayed:]
    while len(out) < self.cfg.prompts_per_step:
      epoch, index = divmod(self.position, n)
      order = np.random.default_rng([self.seed, epoch]).permutation(n)
      out.append(int(order[index]))
      self.position += 1
    return out, replayed

  def step_metrics(self, step: int) -> dict:
    """The rollout figures (rewards, accuracy, groups kept, ...) of the batch step `step` trained on: every pass over
    a batch carries them, as they describe what that step trained on."""
    return self._metrics.pop(step, {})

  def next_batch(self, params, step: int) -> dict:
    """This process's rows of the step's batch (all of them on one process)."""
    if self._batch is not None and self._batch_pass < self.cfg.num_passes:
      self._batch_pass += 1
      # Keyed by step: the loop reads a step's figures one step late, after the next batch may be sampled.
      self._metrics[step + 1] = dict(self._batch_metrics)
      return self._process_rows(self._batch)
    self._batch_start = (self.position, self.rollouts, list(self.hard_queue))
    # A batch regenerated on resume is sampled as at its first step (its temperature on an annealed schedule).
    self._batch = self._rollout(params, step, first_step=step - self._resume_passes)
    self._batch_pass = 1 + self._resume_passes
    self._resume_passes = 0
    return self._process_rows(self._batch)

  @staticmethod
  def _process_rows(batch: dict) -> dict:
    """Every process holds the whole batch; each trains its own block of rows (each row carries its advantage, so
    which process trains which row does not change the loss)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
      return batch
    rows = batch["tokens"].shape[0]
    if rows % count:
      raise ValueError(f"GRPO's {rows} rows (prompts_per_step x group_size) do not split over {count} processes")
    share = rows // count
    return {k: v[index * share:(index + 1) * share] for k, v in batch.items()}

  def _scored_logps(self, params, batch: dict) -> np.ndarray:
    """[B, T] log-probs of the batch's tokens under `params` by the loss's forward pass, the whole batch on every
    process; scored `score_microbatches` blocks of rows at a time."""
    inputs = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "loss_mask", "temperature")}
    rows = len(inputs["tokens"])
    # The most blocks up to score_microbatches whose rows split evenly, and over the mesh's data x fsdp (1 block
    # when none does).
    ways = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    blocks = most_pieces(rows, self.score_microbatches, ways)
    out = []
    for block in range(blocks):
      part = {k: v[block * rows // blocks:(block + 1) * rows // blocks] for k, v in inputs.items()}
      if self.mesh is None:
        out.append(np.asarray(self._ref_logps_fn(params, part)))
        continue
      part = jax.tree.map(lambda x, s: jax.device_put(x, s), part, batch_shardings(part, self.mesh))
      out.append(multihost_utils.process_allgather(self._ref_logps_fn(params, part), tiled=True))
    return np.concatenate(out)

  def _score(self, out: dict, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, correct) of the sampled responses `out` to the prompts `rows`, by this process's reward function."""
    lengths, finished = np.asarray(out["lengths"]), np.asarray(out["finished"])
    # The stop token ends the turn but is not part of the text the rewards read (as in `sampler.generate_text`):
    # kept, an end-of-turn token right after `</think>` would pass for a solution.
    texts = [self.tokenizer.decode(out["tokens"][r, :lengths[r] - int(finished[r])], skip_special_tokens=False)
             for r in range(len(rows))]
    return _checked_rewards(
        self.reward_batch_fn(texts, [self.prompts[i]["answer"] for i in rows], lengths, finished), len(rows))

  def _rollout(self, params, step: int, first_step: int) -> dict:
    cfg, g = self.cfg, self.cfg.group_size
    indices, replayed = self._next_prompts()
    rows = [i for i in indices for _ in range(g)]
    p = cfg.max_prompt_tokens
    prompt_tokens = np.zeros((len(rows), p), np.int32)
    prompt_lengths = np.array([len(self.encoded[i]) for i in rows], np.int32)
    for r, i in enumerate(rows):
      prompt_tokens[r, :len(self.encoded[i])] = self.encoded[i]
    temperature = self.cfg.temperature_at(first_step, self.num_steps)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, stop_token_ids=self.stop_ids)
    rng = jax.random.fold_in(jax.random.key(self.seed), self.rollouts)
    # Every process samples the whole batch (the same prompts, the same random stream) and gets every row back, in
    # calls of rollout_batch_size rows. Row r draws with the key fold_in(rng, r) whatever call it lands in, so
    # rollout_batch_size (a memory setting) does not change what a run samples.
    calls = 1 if cfg.rollout_batch_size is None else len(rows) // cfg.rollout_batch_size
    outs = []
    for tokens_i, lengths_i, rows_i in zip(np.split(prompt_tokens, calls), np.split(prompt_lengths, calls),
                                           np.split(np.arange(len(rows)), calls)):
      keys = filters.row_keys(rng, rows_i)
      outs.append(multihost_utils.process_allgather(
          generate(params, self.config, tokens_i, lengths_i, keys, sampling, mesh=self.mesh), tiled=True))
    out = {name: np.concatenate([np.asarray(o[name]) for o in outs]) for name in outs[0]}
    self.rollouts += 1
    lengths, finished = np.asarray(out["lengths"]), np.asarray(out["finished"])
    # Before the broadcast of the rewards: a process whose scoring failed (a reward function failing on this host
    # alone) would otherwise wait in the loop's check before the step while the others waited in the broadcast.
    with distributed.failing_together("scoring the rollouts' rewards (grpo reward_batch_fn)"):
      rewards, correct = self._score(out, rows)
    if jax.process_count() > 1:
      # Every process verifies the whole batch under wall-clock limits, so an answer near the limit may pass on one
      # host and time out on another. Process 0's verdicts stand for all: every process then trains the same
      # advantages and queues the same hard prompts (which pick the next batch's prompts on every process).
      rewards, correct = multihost_utils.broadcast_one_to_all(
          (np.asarray(rewards, np.float32), np.asarray(correct).astype(np.int32)))
      rewards, correct = np.asarray(rewards), np.asarray(correct).astype(bool)
    rewards_bg, correct_bg, lengths_bg = (np.asarray(x).reshape(len(indices), g) for x in (rewards, correct, lengths))
    keep = select_rows(rewards_bg, correct_bg, lengths_bg, cfg, np.random.default_rng([self.seed, self.rollouts]))
    if self._resume_queue_after is not None:
      self.hard_queue, self._resume_queue_after = self._resume_queue_after, None
    elif cfg.hard_prompt_fraction:
      accuracy = np.asarray(correct_bg).astype(bool).mean(axis=1)
      for i, a in zip(indices, accuracy):  # a prompt both replayed and drawn fresh in one batch is queued once
        if a <= cfg.hard_prompt_accuracy and i not in self.hard_queue:
          self.hard_queue.append(i)
    if not keep.any():
      log.warning("step %d: the filters dropped every group of this rollout batch (mean reward %.3g, accuracy "
                  "%.3g): its %d step(s) leave the params as they are. Groups whose rewards are all equal, or too easy "
                  "(grpo.max_group_accuracy), or of ragged lengths (grpo.max_length_cv) are dropped, and so are the "
                  "incorrect responses of a group with no correct one (grpo.balance_negatives)", step + 1,
                  float(np.mean(rewards)), float(np.mean(correct)), cfg.num_passes)
    advantages = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), g,
                                             scale_by_std=cfg.scale_advantages_by_std)).reshape(-1)
    advantages = np.where(keep.reshape(-1), advantages, 0.0).astype(np.float32)

    t = p + cfg.max_new_tokens
    old_logprobs = np.asarray(out["tempered_logprobs"] if cfg.tempered_logprobs else out["logprobs"])
    batch = {name: np.zeros((len(rows), t), np.int32) for name in ("tokens", "segment_ids", "loss_mask")}
    batch["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (len(rows), t)).copy()
    batch["old_logprobs"] = np.zeros((len(rows), t), np.float32)
    for r in range(len(rows)):
      lp, lc = prompt_lengths[r], lengths[r]
      batch["tokens"][r, :lp] = prompt_tokens[r, :lp]
      batch["tokens"][r, lp:lp + lc] = out["tokens"][r, :lc]
      batch["segment_ids"][r, :lp + lc] = 1
      batch["loss_mask"][r, lp:lp + lc] = keep.reshape(-1)[r]
      batch["old_logprobs"][r, lp - 1:lp - 1 + lc] = old_logprobs[r, :lc]  # position t scores token t + 1
    batch["advantages"] = advantages
    # Greedy rollouts (temperature 0) come from the model's own distribution, scored untempered (as the sampler does).
    scored_at = temperature if cfg.tempered_logprobs and temperature > 0 else 1.0
    batch["temperature"] = np.full((len(rows),), scored_at, np.float32)
    crossed = prompt_lengths + lengths > self.config.original_max_positions
    if self.config.rope_scaling_type == "longrope" and crossed.any():
      # LongRoPE switches to its long factors once a row passes original_max_position_embeddings: the sampler scored
      # the tokens drawn before the switch with the short factors, while the loss scores the finished row with the
      # long ones, so the first pass's ratio was not 1 on them. The loss's own forward pass gives the old log-probs.
      scored = self._scored_logps(params, dict(batch, loss_mask=(batch["segment_ids"] > 0).astype(np.int32)))
      for r in np.flatnonzero(crossed):
        lp, lc = prompt_lengths[r], lengths[r]
        batch["old_logprobs"][r, lp - 1:lp - 1 + lc] = scored[r, lp - 1:lp - 1 + lc]
    if cfg.beta:
      batch["ref_logprobs"] = self._scored_logps(self.ref_params, batch)
    self._batch_metrics = {
        # As TRL logs it: the mean over groups of each group's reward std (0 when no group has any signal).
        "reward_std": float(np.asarray(rewards_bg, np.float64).std(axis=1, ddof=1 if g > 1 else 0).mean()),
        "reward_mean": float(rewards.mean()), "reward_std_batch": float(rewards.std()),
        "accuracy": float(np.mean(correct)), "response_length_mean": float(lengths.mean()),
        "response_length_std": float(lengths.std()), "groups_kept": float(keep.any(axis=1).mean()),
        "responses_kept": float(keep.mean()), "finished_fraction": float(finished.mean()),
        "temperature": float(temperature)}
    if cfg.hard_prompt_fraction:
      self._batch_metrics.update(hard_prompts_replayed=float(replayed), hard_queue_size=float(len(self.hard_queue)))
    self._metrics[step + 1] = dict(self._batch_metrics)
    return batch


def _token_logps(params, batch, *, config, chunk_size):
  h = hidden_states(params, batch["tokens"], config, positions=batch["positions"], segment_ids=batch["segment_ids"])
  targets, _ = next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  return chunked_token_logprobs(h, lm_head_kernel(params, config), targets, chunk_size=chunk_size,
                                temperature=_temperature(batch))
